"""The compile-time specializations of the kernels (issue 13): exponents compiled in, options compiled in, the bf16
channels_last pair path of a class-aligned head, and what the launch plan derives from them (tuning keys, grid).

Every value is checked against the independent float64 references, with the tolerance of the result's dtype."""
import pytest
import torch
from reference import assert_close, focal_grad_ref, focal_loss_ref
from reference_multilevel import multilevel_value_and_grads

import focal_triton
from focal_triton.kernels import multilevel as mf
from focal_triton.kernels import dense as sf
from focal_triton.kernels import math as km
from focal_triton.losses import FL, encode

SUM_TOL = dict(rtol=1e-5, atol=1e-6)


def _head(shapes, num_anchors, num_classes, dtype, device, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = []
    for h, w in shapes:
        x = (torch.randn(2, num_anchors * num_classes, h, w, generator=g, dtype=torch.float64) * 4).to(dtype)
        x.view(-1)[::11] = 20.0  # saturated logits on both sides
        x.view(-1)[5::11] = -20.0
        levels.append(x.to(memory_format=torch.channels_last).to(device) if channels_last else x.to(device))
    m = sum(h * w for h, w in shapes) * num_anchors
    labels = torch.randint(-2, num_classes, (2, m), generator=g)
    labels[:, ::3] = torch.randint(0, num_classes, (labels[:, ::3].shape), generator=g)  # more positives
    return levels, labels.to(device)


OPTION_SETS = {
    "none": dict(ignore_index=None),
    "ignore": dict(),  # torchvision's labels: -2 ignored (the default)
    "all": dict(weights=True, alpha="per-class", label_smoothing=0.1),
}


def _options(name, labels, num_classes, device):
    kw = dict(OPTION_SETS[name])
    if "ignore_index" in kw:
        labels.clamp_(min=-1)  # no ignore value: -1 is the background
    if kw.pop("weights", False):
        kw["weights"] = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)).to(device)
    if kw.get("alpha") == "per-class":
        kw["alpha"] = torch.linspace(0.1, 0.9, num_classes, device=device)
    return kw


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_class_aligned_head(poisoned, device, monkeypatch, dtype, channels_last, options):
    """C = 16: full tiles (unmasked) and edge tiles of both layouts; bf16 channels_last reads pairs of logits per
    32-bit word, bf16 NCHW four positions per 64-bit access (h*w a multiple of 4), two per 32-bit word (other
    even h*w) or two 16-bit halves at one address (odd h*w). Sum, elementwise loss and both backward modes against
    the float64 reference."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    # 36, 35 and 42 positions: full and edge position tiles of the interpreter's 32 (h*w = 0 mod 4, odd, 2 mod 4;
    # three levels: the loop over levels must not overwrite a later level's arguments)
    shapes = [(9, 4), (5, 7), (7, 6)]
    levels, labels = _head(shapes, 2, 16, dtype, device, channels_last)
    kw = _options(options, labels, 16, device)
    xs = [x.detach().requires_grad_(True) for x in levels]
    total = focal_triton.multilevel_focal_loss(xs, labels, 2, normalizer=3.0, **kw)
    ref, ref_grads = multilevel_value_and_grads(levels, labels, 2, normalizer=3.0, **kw)
    torch.testing.assert_close(total.double(), ref, **SUM_TOL)
    for g, r in zip(torch.autograd.grad(total, xs), ref_grads):
        assert_close(g, r, what=f"grad {options}")
    outs = focal_triton.multilevel_focal_loss(xs, labels, 2, reduction="none", **kw)
    ref_outs, _ = multilevel_value_and_grads(levels, labels, 2, reduction="none", **kw)
    for o, r in zip(outs, ref_outs):
        assert_close(o, r, what=f"loss none {options}")
    upstream = [torch.randn(o.shape, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)
                .contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                for o in outs]
    _, ref_grads = multilevel_value_and_grads(levels, labels, 2, grad_outputs=upstream, reduction="none", **kw)
    for g, r in zip(torch.autograd.grad(outs, xs, upstream), ref_grads):
        assert_close(g, r, what=f"grad none {options}")


@pytest.mark.parametrize("channels_last", [True, False])
def test_class_aligned_limits_and_nan(poisoned, device, monkeypatch, channels_last):
    """The limits and NaN rules of the pair path (bf16 channels_last, C = 16) and of NCHW: +inf on its own class
    gives 0 and 0, +inf on another class inf and the finite gradient 1 - alpha, an ignored anchor's NaN logits 0,
    a NaN logit NaN in its loss, its gradient and the sum."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    inf, nan = float("inf"), float("nan")
    x = torch.zeros(1, 16, 1, 4, dtype=torch.bfloat16)
    x[0, 0, 0, 0] = inf    # anchor 0, label 0: its own class
    x[0, 1, 0, 0] = -inf   # anchor 0, class 1: the right side
    x[0, 2, 0, 1] = inf    # anchor 1, background: a confident wrong logit
    x[0, :, 0, 2] = nan    # anchor 2, ignored
    x[0, 5, 0, 3] = nan    # anchor 3, one NaN
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    x = x.to(device).requires_grad_(True)
    labels = torch.tensor([[0, -1, -2, 1]], device=device)
    (loss,) = focal_triton.multilevel_focal_loss([x], labels, 1, reduction="none")
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    loss, grad = loss[0, :, 0].float().cpu(), grad[0, :, 0].float().cpu()  # (class, anchor)
    assert loss[0, 0] == 0 and grad[0, 0] == 0 and loss[1, 0] == 0 and grad[1, 0] == 0
    assert loss[2, 1] == inf and grad[2, 1] == 0.75
    assert (loss[:, 2] == 0).all() and (grad[:, 2] == 0).all()
    assert torch.isnan(loss[5, 3]) and torch.isnan(grad[5, 3])
    others = torch.ones(16, dtype=torch.bool)
    others[5] = False
    assert torch.isfinite(loss[others, 3]).all() and torch.isfinite(grad[others, 3]).all()
    assert torch.isnan(focal_triton.multilevel_focal_loss([x], labels, 1))


@pytest.mark.parametrize("gamma", [0.0, 1.0, 3.0, 4.0, 5.0, 0.5, 2.5])
def test_exponents_compiled_in_and_at_runtime(poisoned, device, monkeypatch, gamma):
    """Integer gamma up to 4 is a compile-time power (GAMMA), others (fractional, 5) the runtime path: both give
    the reference's values and gradients, in the multi-level (bf16 channels_last pairs, float32 NCHW) and the
    dense kernel."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    assert km.power_constexpr(gamma) == (int(gamma) if gamma in (0.0, 1.0, 3.0, 4.0) else -1)
    for dtype, channels_last in ((torch.bfloat16, True), (torch.float32, False)):
        levels, labels = _head([(6, 6)], 2, 16, dtype, device, channels_last, seed=int(gamma * 10))
        xs = [x.detach().requires_grad_(True) for x in levels]
        total = focal_triton.multilevel_focal_loss(xs, labels, 2, gamma=gamma)
        ref, ref_grads = multilevel_value_and_grads(levels, labels, 2, gamma=gamma)
        torch.testing.assert_close(total.double(), ref, **SUM_TOL)
        for g, r in zip(torch.autograd.grad(total, xs), ref_grads):
            assert_close(g, r, what=f"gamma {gamma} {dtype}")
    x = (torch.randn(3, 100, generator=torch.Generator().manual_seed(1)) * 6).to(device).requires_grad_(True)
    t = (torch.rand(3, 100, generator=torch.Generator().manual_seed(2)) < 0.3).float().to(device)
    loss = focal_triton.sigmoid_focal_loss(x, t, alpha=0.25, gamma=gamma, reduction="none")
    assert_close(loss, focal_loss_ref(x, t, 0.25, gamma), what=f"dense loss gamma {gamma}")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert_close(grad, focal_grad_ref(x, t, 0.25, gamma), what=f"dense grad gamma {gamma}")


def test_tuning_keys_carry_the_specializations():
    """A tuned config belongs to one compiled kernel: the keys differ by exponent specialization and options."""
    levels = [torch.empty(2, 9 * 80, 10, 12)]
    def key(gamma=2.0, weights=None, alpha=None, smoothing=0.0, ignore=-2):
        spec = encode(FL, alpha=0.25, gamma=gamma, smoothing=smoothing)
        return mf.tuning_key("sum", levels, 9, spec, mf.option_constexprs(weights, alpha, spec, ignore))

    keys = {key(), key(gamma=1.5), key(gamma=3.0), key(weights=torch.empty(1)), key(alpha=torch.empty(80)),
            key(smoothing=0.1), key(ignore=None)}
    assert len(keys) == 7
    assert key(gamma=1.5) == key(gamma=2.5)  # one runtime-exponent kernel
    x = torch.empty(100)
    dense = {sf.tuning_key("sigmoid_focal_fwd", x, x, encode(FL, alpha=0.25, gamma=g), "sum") for g in (2.0, 1.5, 0.0)}
    assert len(dense) == 3


def test_grid_is_one_wave_rounded_down(monkeypatch):
    """P = floor(resident programs / N): 660 slots over 16 images is 41 programs each (656), never a second wave."""
    monkeypatch.setattr(mf, "max_programs", lambda kernel, args, constexprs, cfg, device: 660)
    levels = [torch.empty(16, 9 * 80, 100, 167, dtype=torch.bfloat16)]
    plan = mf.Plan(levels, 9, torch.device("cuda"), 2)
    assert plan.programs_per_image([levels[0]], {}) == 41


def test_register_budget_of_the_bf16_class_aligned_kernels(monkeypatch):
    """bf16 logits of a class-aligned head launch with maxnreg = PAIR_TILE_MAX_REGISTERS (tuned configs too), and
    the grid is sized by the kernel compiled with it; other dtypes and heads keep ptxas's choice, the interpreter
    takes none."""
    cfgs = []
    monkeypatch.setattr(mf, "max_programs", lambda kernel, args, constexprs, cfg, device: cfgs.append(cfg) or 660)
    cuda = torch.device("cuda")
    head = [torch.empty(16, 9 * 80, 100, 167, dtype=torch.bfloat16)]
    plan = mf.Plan(head, 9, cuda, 2)
    assert plan.class_aligned and plan.options() == {"num_warps": 2, "maxnreg": mf.PAIR_TILE_MAX_REGISTERS}
    plan.programs_per_image(head, {})
    assert cfgs[-1].options() == {"num_warps": 2, "maxnreg": mf.PAIR_TILE_MAX_REGISTERS}
    tuned = mf.Plan(head, 9, cuda, 2, config=dict(BLOCK_HW=128, BLOCK_C=16, num_warps=4))
    assert tuned.options() == {"num_warps": 4, "maxnreg": mf.PAIR_TILE_MAX_REGISTERS}
    assert mf.Plan([head[0].float()], 9, cuda, 4).options() == {"num_warps": 4}
    assert "maxnreg" not in mf.Plan([torch.empty(2, 9 * 81, 5, 5, dtype=torch.bfloat16)], 9, cuda, 2).options()
    assert mf.Plan(head, 9, torch.device("cpu"), 2).options() == {"num_warps": 1}
