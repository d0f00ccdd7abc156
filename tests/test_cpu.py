"""The CPU path's negatives' pass (focal_triton/cpu/): every element as a negative over raw storage, then
positives and ignored anchors (dense targets: every nonzero target) fixed up by index. Both of its forms, the
compiled loop (cpu/native.py, cpu/negatives.c) and the torch form (cpu/math.py), through the `form` fixture.
Checked against the float64 reference and the general torch path, and checked to have run (not silently fallen
back). The gradient its forward computes lives in the autograd graph of its own call (focal_triton/ops/): tested
for staleness, grad modes, inference tensors, lifetime and precision."""
import gc

import numpy as np
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from reference import assert_close, focal_grad_ref
from reference import focal_loss_ref as focal_loss_ref_dense
from reference_multilevel import flatten_levels, focal_loss_ref
from helpers import HWS, SMALL, check_multilevel, leaves_of, make_labels, make_levels

import focal_triton
from focal_triton.cpu import dense as cpu_dense
from focal_triton.cpu import math as cpu_math
from focal_triton.cpu import multilevel as cpu_multilevel
from focal_triton.cpu import native as cpu_native

# Elements per task of the compiled loop in these tests: many tasks per level, ragged last ones.
SMALL_TASKS = 1000


@pytest.fixture(params=["compiled", "torch form"])
def form(request, monkeypatch):
    """The negatives' pass's form: the compiled loop (small tasks; skipped where the extension was not built,
    which tests/test_cpu_native.py::test_extension_is_built_where_a_compiler_is allows only without a compiler) or
    the torch form."""
    if request.param == "compiled":
        if not cpu_native.built():
            pytest.skip("focal_triton.cpu._negatives was not built (no C compiler at install)")
        monkeypatch.setenv(cpu_native.NATIVE_ENV, "1")
        monkeypatch.setattr(cpu_native, "CHUNK", SMALL_TASKS)
    else:
        monkeypatch.setenv(cpu_native.NATIVE_ENV, "0")
    return request.param


@pytest.fixture
def fast(monkeypatch, form):
    """Force the torch path and record, in order, whether the fast path produced each result (None = fell back):
    ("forward_sum", ok), ("backward_scalar", ok), and ("kept_gradient", True) where a backward used the gradient
    its forward computed (no pass over the logits)."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")
    calls = []
    for name, fn in (("forward_sum", "_fast_forward"), ("backward_scalar", "_fast_backward")):
        real = getattr(cpu_multilevel, fn)

        def spy(*a, _real=real, _name=name, **k):
            out = _real(*a, **k)
            calls.append((_name, out is not None))
            return out

        monkeypatch.setattr(cpu_multilevel, fn, spy)
    real_scaled = focal_triton.ops.multilevel.scaled
    monkeypatch.setattr(focal_triton.ops.multilevel, "scaled", lambda *a: calls.append(("kept_gradient", True))
                        or real_scaled(*a))
    return calls


FAST_FP32 = [("forward_sum", True), ("kept_gradient", True)]
# A dense sum or mean of ~19K float32 terms, returned in the logits' dtype: float32 rounding, or one bfloat16 rounding.
TOL_SUM = {torch.float32: 1e-6, torch.bfloat16: 2**-8}  # float32: the backward takes the forward's gradient


def general(levels, labels, monkeypatch, **kw):
    """Loss and gradients of the general torch path."""
    monkeypatch.setattr(cpu_multilevel, "_fast", lambda *a: False)
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, 3, **kw)
    grads = torch.autograd.grad(loss, leaves)
    monkeypatch.undo()
    return loss, grads


@pytest.mark.parametrize("layout", ["nchw", "cl", "mix"])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 1.5, 3.0])
def test_matches_reference(fast, layout, gamma):
    check_multilevel(make_levels(HWS, layout=layout), make_labels(hws=HWS), gamma=gamma,
                     normalizer=torch.tensor([3.0, 5.0]))
    assert fast == FAST_FP32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(fast, dtype):
    check_multilevel(make_levels(dtype=dtype, layout="mix"), make_labels(), label_smoothing=0.1)
    assert fast == [("forward_sum", True), ("backward_scalar", True)]


@pytest.mark.parametrize("convention", [dict(background=-1, ignore_index=-2), dict(background=5, ignore_index=-1),
                                        dict(background=5, ignore_index=None)])
def test_positives_and_ignored_fixups(fast, convention):
    labels = make_labels(p_pos=0.4, p_ign=0.3, convention={-2: "torchvision", -1: "detectron2", None: "mmdet"}[
        convention["ignore_index"]])
    check_multilevel(make_levels(layout="mix", scale=6.0), labels, alpha=0.3, label_smoothing=0.2, **convention)
    assert fast == FAST_FP32


def test_ignored_anchors_with_inf_and_nan_logits_give_exact_zero(fast, monkeypatch):
    levels = make_levels(layout="mix")
    levels[0] = levels[0].contiguous()                    # NCHW: (N, A, C, HW) view of the storage
    labels = torch.full((2, sum(h * w for h, w in SMALL) * 3), -2)
    labels[0, 1] = 2                                      # image 0, position 0, anchor 1: a positive
    labels[0, 0] = -1                                     # image 0, position 0, anchor 0: background
    levels[0].view(2, 3, 5, 15)[:, :, :, 1:] = float("inf")  # every other anchor is ignored: inf and NaN logits
    levels[0].view(2, 3, 5, 15)[1] = float("nan")
    levels[1].fill_(float("-inf"))
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, 3, label_smoothing=0.1)
    loss.backward()
    assert fast == FAST_FP32
    ref, ref_grads = general(levels, labels, monkeypatch, label_smoothing=0.1)
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    for leaf, r in zip(leaves, ref_grads):
        torch.testing.assert_close(leaf.grad, r, rtol=1e-5, atol=1e-7)
    assert leaves[1].grad.abs().sum() == 0 and leaves[0].grad[1].abs().sum() == 0
    assert leaves[0].grad[0].view(3, 5, 15)[:2, :, 0].abs().sum() > 0


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 100.0])
def test_non_finite_negatives_fall_back_to_the_general_path(fast, monkeypatch, value):
    levels = make_levels(layout="mix")
    levels[1].view(-1)[3] = value
    labels = make_labels(p_pos=0.0, p_ign=0.0)            # element 3 is a negative
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, 3, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, leaves)
    ref, ref_grads = general(levels, labels, monkeypatch, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0, equal_nan=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, equal_nan=True)
    # inf, NaN, and -inf with a smoothed target (-ts * x = inf) take the general path; the forward then computes
    # the gradient it keeps by the general backward (which the fast backward declines too). A large finite logit
    # (100: softplus(x) = x, q = 0) stays on the fast path, with the values above.
    if value == 100.0:
        assert fast == FAST_FP32
    else:
        assert fast == [("forward_sum", False), ("backward_scalar", False), ("kept_gradient", True)]


def test_weights_and_per_class_alpha_keep_the_general_path(fast):
    levels, labels = make_levels(), make_labels()
    check_multilevel(levels, labels, weights=torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)))
    check_multilevel(levels, labels, alpha=torch.tensor([0.125, 0.25, 0.5, 0.75, 0.875]))
    assert fast == []


def _spy_passes(monkeypatch):
    """The multi-level negatives' passes over the logits, in order: "loss" or "loss and gradient"."""
    passes = []
    real = cpu_multilevel._negatives_pass
    monkeypatch.setattr(cpu_multilevel, "_negatives_pass", lambda *a: passes.append(
        "loss" if a[5] is None else "loss and gradient") or real(*a))
    return passes


def test_forward_computes_the_gradient_the_backward_scales(fast, monkeypatch):
    """float32 logits that require grad: the forward computes the gradient in its own pass and the backward only
    scales it (no second pass over the logits), also a second time (retain_graph); the same values either way."""
    levels, labels = make_levels(HWS, layout="mix"), make_labels(hws=HWS)
    passes = _spy_passes(monkeypatch)
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, 3, normalizer=torch.tensor([3.0, 5.0]))
    (g1,) = torch.autograd.grad(loss, leaves[0], retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 1.0, leaves[0])
    assert passes == ["loss and gradient"]
    assert torch.equal(g1, g2)
    # the recomputing backward (what 16-bit logits take: no kept gradient) gives the same bits as the kept one
    monkeypatch.setattr(cpu_multilevel, "keeps_gradient", lambda *a: False)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, 3, normalizer=torch.tensor([3.0, 5.0]))
    (g3,) = torch.autograd.grad(loss, leaves[0])
    assert passes == ["loss and gradient", "loss", "loss and gradient"] and torch.equal(g1, g3)
    ref_loss, ref_grads = general(levels, labels, monkeypatch, normalizer=torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(g1, ref_grads[0], rtol=1e-5, atol=1e-8)


def _reference_grads(head, features, levels, labels, normalizer):
    """Through the float64 reference (an independent formula, no focal_triton): the loss's gradients w.r.t. the
    given float32 levels (taken exactly), and the head's weight gradient of the float64 head."""
    leaves = [lv.detach().double().requires_grad_(True) for lv in levels]
    level_grads = torch.autograd.grad(focal_loss_ref(flatten_levels(leaves, 3), labels) / normalizer, leaves)
    h64 = torch.nn.Conv2d(8, 15, 3, padding=1).double()
    h64.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    loss = focal_loss_ref(flatten_levels([h64(f.double()) for f in features], 3), labels) / normalizer
    loss.backward()
    return level_grads, h64.weight.grad


@pytest.mark.parametrize("general_forward", ["return_stats", "weights"])
def test_no_stale_gradient_in_a_training_loop(fast, general_forward):
    """The hardening issue's row 1: a fast-path forward whose backward never runs (a loss for logging), then a
    forward on the same level tensors that takes the general path, with fresh labels: the backward must be that
    call's. The fresh labels reuse the old ones' memory (numpy memory rewritten in place: the label tensor keeps
    its address and its version, what a side table keyed on pointers and versions could not tell apart).

    The levels' gradients (the op's output) are held to the suite's float32 tolerance; the head's float32 weight
    gradient, a sum of ~100 products per element by the convolution's backward, to 8 float32 ulps of its largest
    element (its own rounding: ~2e-7 here, with either form; a stale gradient is off by tens of percent)."""
    torch.manual_seed(0)
    head = torch.nn.Conv2d(8, 15, 3, padding=1)
    features = [torch.randn(2, 8, 5, 3), torch.randn(2, 8, 1, 2)]
    m = 3 * (15 + 2)
    buffer = np.full((2, m), -1, dtype=np.int64)
    labels = torch.from_numpy(buffer)
    rng = np.random.default_rng(0)
    for step in range(8):
        levels = [head(f) for f in features]
        for lv in levels:
            lv.retain_grad()
        buffer[...] = np.where(rng.random((2, m)) < 0.3, rng.integers(0, 5, (2, m)), -1)
        focal_triton.multilevel_focal_loss(levels, labels, 3, normalizer=4.0).detach()  # logged, no backward
        buffer[...] = np.where(rng.random((2, m)) < 0.3, rng.integers(0, 5, (2, m)), -1)  # the next labels
        kw = dict(return_stats=True) if general_forward == "return_stats" else dict(weights=torch.ones(2, m))
        out = focal_triton.multilevel_focal_loss(levels, labels, 3, normalizer=4.0, **kw)
        loss = out[0] if general_forward == "return_stats" else out
        head.zero_grad()
        loss.backward()
        ref_levels, ref = _reference_grads(head, features, levels, labels, 4.0)
        for lv, r in zip(levels, ref_levels):
            torch.testing.assert_close(lv.grad.double(), r, rtol=1e-5, atol=1e-7, msg=f"step {step}")
        torch.testing.assert_close(head.weight.grad.double(), ref, rtol=2e-5, atol=8 * 2**-23 * ref.abs().max().item(),
                                   msg=f"step {step}")
    assert ("forward_sum", True) in fast


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_gradient_work_without_grad_mode(fast, monkeypatch, mode):
    """A loss computed under no_grad / inference_mode (a validation loss) on logits that require grad computes
    and allocates no gradient."""
    passes = _spy_passes(monkeypatch)
    levels, labels = make_levels(HWS, layout="mix"), make_labels(hws=HWS)
    leaves = leaves_of(levels)
    allocated = []
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, *a, **k: allocated.append(tuple(t.shape))
                        or real_empty_like(t, *a, **k))
    with getattr(torch, mode)():
        loss = focal_triton.multilevel_focal_loss(leaves, labels, 3)
    ref = focal_loss_ref(flatten_levels(levels, 3), labels)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    assert fast == [("forward_sum", True)] and passes == ["loss"]
    assert not any(shape in allocated for shape in [tuple(x.shape) for x in levels])
    # the same call with grad mode on does keep the gradient (the spy sees it)
    focal_triton.multilevel_focal_loss(leaves, labels, 3)
    assert passes == ["loss", "loss and gradient"]


def test_inference_mode_tensors(fast):
    """float32 logits with requires_grad and labels created inside inference_mode: the loss inside it; and labels
    made there, used in a training step outside it."""
    levels, labels = make_levels(HWS, layout="mix"), make_labels(hws=HWS)
    ref = focal_loss_ref(flatten_levels(levels, 3), labels)
    with torch.inference_mode():
        inf_leaves = [x.clone().requires_grad_(True) for x in levels]
        inf_labels = labels.clone()
        loss = focal_triton.multilevel_focal_loss(inf_leaves, inf_labels, 3)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, inf_labels, 3)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)


def test_kept_gradient_lives_and_dies_with_the_graph(fast, monkeypatch):
    """The kept gradient is held by the loss's autograd graph only: freed with it (a loss never backpropagated
    leaves nothing behind), and 10,000 calls leave the number of live objects flat."""
    kept = []  # weak references to the kept gradients' storages (C++ weak references: Python objects come and go)
    real = cpu_multilevel._fast_forward
    monkeypatch.setattr(cpu_multilevel, "_fast_forward", lambda *a, **k: (lambda out: kept.extend(
        StorageWeakRef(g.untyped_storage()) for g in (out[1] or [])) or out)(real(*a, **k)))
    levels, labels = make_levels(), make_labels()
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, 3)
    assert len(kept) == 2 and not any(r.expired() for r in kept)
    del loss
    assert all(r.expired() for r in kept)
    monkeypatch.undo()
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")
    tiny, tiny_labels = [torch.randn(1, 3, 1, 2, requires_grad=True)], torch.tensor([[1, -1]])

    def calls(n):  # n calls: forwards whose loss is dropped and forward + backward, alternating
        for i in range(n):
            loss = focal_triton.multilevel_focal_loss(tiny, tiny_labels, 1)
            if i % 2:
                loss.backward()

    calls(50)
    gc.collect()
    before = len(gc.get_objects())
    calls(10_000)
    gc.collect()
    assert len(gc.get_objects()) - before < 100


def test_in_place_change_between_forward_and_backward_is_caught(fast):
    """Autograd refuses a backward after the labels changed in place (they are saved by the op)."""
    levels, labels = make_levels(), make_labels()
    levels[0] = levels[0].to(torch.bfloat16)  # 16-bit logits: no kept gradient, the backward reads the labels
    levels[1] = levels[1].to(torch.bfloat16)
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, 3)
    labels.neg_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, leaves)


def test_kept_gradient_belongs_to_its_normalizer_and_upstream(fast, monkeypatch):
    """The forward folds its normalizer into the kept gradient: a later forward on the same tensors with another
    normalizer replaces it, and the first loss's backward must then recompute with its own; an upstream gradient
    other than 1 scales the kept one."""
    levels, labels = make_levels(HWS, layout="mix"), make_labels(hws=HWS)
    leaves = leaves_of(levels)
    loss3 = focal_triton.multilevel_focal_loss(leaves, labels, 3, normalizer=3.0)
    loss5 = focal_triton.multilevel_focal_loss(leaves, labels, 3, normalizer=5.0)  # replaces the kept gradient
    (g3,) = torch.autograd.grad(loss3 * 2.5, leaves[0])
    (g5,) = torch.autograd.grad(loss5 * 2.5, leaves[0])
    _, ref3 = general(levels, labels, monkeypatch, normalizer=3.0)
    _, ref5 = general(levels, labels, monkeypatch, normalizer=5.0)
    torch.testing.assert_close(g3, 2.5 * ref3[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(g5, 2.5 * ref5[0], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("share", [0.0, 0.05, 0.5, 1.0])
def test_sum_is_accurate_to_float32_rounding_at_any_share_of_positives(fast, share):
    """The hardening issue's row 2: 763K float32 logits (A = 9, C = 80, two levels), the total within a few float32
    roundings of the float64 reference whatever the share of positive anchors (each positive's term is a
    correction added to its image's sum)."""
    g = torch.Generator().manual_seed(0)
    levels = [torch.randn(2, 720, h, w, generator=g) * 2 - 3 for h, w in ((20, 21), (10, 11))]
    m = 9 * (20 * 21 + 10 * 11)
    u = torch.rand(2, m, generator=g)
    labels = torch.where(u < share, torch.randint(0, 80, (2, m), generator=g), torch.full((2, m), -1))
    loss = focal_triton.multilevel_focal_loss(leaves_of(levels), labels, 9, normalizer=torch.tensor(3.0))
    ref = focal_loss_ref(flatten_levels(levels, 9), labels) / 3.0
    assert fast == [("forward_sum", True)]
    assert abs(loss.double().item() - ref.item()) <= 3e-7 * abs(ref.item())


# ---- dense targets (sigmoid_focal_loss) ------------------------------------------------------------------------

@pytest.fixture
def dense_fast(monkeypatch, form):
    """Force the torch path with small chunks or tasks (many, ragged last one) and record each dense pass:
    ("forward", ok) / ("backward", ok), and ("kept_gradient", True) where a backward used the forward's gradient."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")
    monkeypatch.setattr(cpu_math, "FAST_CHUNK", 1000)
    calls = []
    real = cpu_dense._negatives_pass

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(("forward" if a[5] else "backward", out is not None))
        return out

    monkeypatch.setattr(cpu_dense, "_negatives_pass", spy)
    real_kept = focal_triton.ops.dense._kept_times
    monkeypatch.setattr(focal_triton.ops.dense, "_kept_times", lambda *a: calls.append(("kept_gradient", True))
                        or real_kept(*a))
    return calls


def _dense_inputs(dtype, soft, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 700, 9, generator=g, dtype=torch.float64) * 4 - 2
    x.view(-1)[::17] = 30.0                              # saturated negatives and positives
    t = (torch.rand(x.shape, generator=g) < 0.02).double()
    if soft:
        t = torch.where(torch.rand(x.shape, generator=g) < 0.05, torch.rand(x.shape, generator=g, dtype=torch.float64), t)
    return x.to(dtype), t.to(dtype)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1, 0.0), (0.5, 0.5), (0.25, 3.0)])
@pytest.mark.parametrize("soft", [False, True])
def test_dense_matches_reference(dense_fast, poisoned, reduction, dtype, alpha, gamma, soft):
    x, t = _dense_inputs(dtype, soft)
    leaf = x.clone().requires_grad_(True)
    loss = focal_triton.sigmoid_focal_loss(leaf, t, alpha=alpha, gamma=gamma, reduction=reduction)
    ref = focal_loss_ref_dense(x, t, alpha, gamma, reduction)
    if reduction == "none":
        assert_close(loss, ref, dtype, "loss")
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(loss.dtype)
    else:
        torch.testing.assert_close(loss.double(), ref, rtol=TOL_SUM[dtype], atol=0)
        upstream = torch.tensor(0.75, dtype=loss.dtype)
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    assert_close(grad, focal_grad_ref(x, t, alpha, gamma, reduction, upstream), dtype, "gradient")
    if dtype == torch.float32:
        assert dense_fast == [("forward", True), ("kept_gradient", True)]
    else:
        assert dense_fast == [("forward", True), ("backward", True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_elementwise_upstream_is_rounded_once(dense_fast, dtype):
    """16-bit logits, "none" and an elementwise upstream gradient: the gradient times the upstream in float32, then
    rounded once to the logits' dtype, so each element is within one ulp of the correctly rounded value (the product
    of two 16-bit roundings was two ulps off in fp16's subnormal range)."""
    g = torch.Generator().manual_seed(3)
    x = (-4.0 - 5.0 * torch.rand(20000, generator=g, dtype=torch.float64)).to(dtype)  # easy negatives: tiny grads
    t = torch.zeros_like(x)
    t[::97] = 1.0
    upstream = (0.3 + 2.7 * torch.rand(20000, generator=g, dtype=torch.float64)).to(dtype)
    leaf = x.clone().requires_grad_(True)
    loss = focal_triton.sigmoid_focal_loss(leaf, t, alpha=0.25, gamma=2.0, reduction="none")
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    assert dense_fast == [("forward", True), ("backward", True)]
    exact = focal_grad_ref(x.double(), t.double(), 0.25, 2.0, "none", upstream.double()).to(dtype)
    ulp = (torch.nextafter(exact.abs(), torch.tensor(float("inf"), dtype=dtype)) - exact.abs()).double()
    off = (grad.double() - exact.double()).abs()
    assert (off <= ulp).all(), f"{int((off > ulp).sum())} elements more than one ulp off, worst {(off / ulp).max()}"


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 100.0])
def test_dense_non_finite_negatives_fall_back(dense_fast, value):
    x, t = _dense_inputs(torch.float32, False)
    x.view(-1)[4] = value
    t.view(-1)[4] = 0.0
    leaf = x.clone().requires_grad_(True)
    loss = focal_triton.sigmoid_focal_loss(leaf, t, reduction="sum")
    loss.backward()
    # inf and NaN: the general path; -inf (p = 0, loss 0) and 100 (softplus(x) = x) are exact on the fast path
    assert dense_fast[0] == ("forward", value in (float("-inf"), 100.0))
    finite = x.clone()
    finite.view(-1)[4] = max(min(value, 1e4), -1e4)      # the reference is written for finite logits
    ref = focal_loss_ref_dense(finite, t, 0.25, 2.0, "sum")
    if value == value and value != float("inf"):         # -inf and 100 at t = 0: finite limits
        torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
        assert torch.isfinite(leaf.grad).all()
    else:                                                # inf at a negative costs inf; NaN propagates
        assert not torch.isfinite(loss)


def test_dense_kept_gradient_with_loss_sum_is_taken_as_it_is(dense_fast, monkeypatch):
    """torchvision's usage, reduction="none" then .sum(): the kept gradient is the one returned (no pass at all);
    .mean() and a weighted sum scale it."""
    x, t = _dense_inputs(torch.float32, True)
    kept = []
    real = cpu_dense._negatives_pass
    monkeypatch.setattr(cpu_dense, "_negatives_pass", lambda *a, **k: (lambda out: kept.append(
        out[1].data_ptr()) or out)(real(*a, **k)))
    leaf = x.clone().requires_grad_(True)
    focal_triton.sigmoid_focal_loss(leaf, t).sum().backward()
    assert leaf.grad.data_ptr() == kept[0]
    assert_close(leaf.grad, focal_grad_ref(x, t, 0.25, 2.0, "sum"), torch.float32, "sum")
    w = torch.rand(x.shape)
    for upstream, how in ((lambda loss: loss.mean(), "mean"), (lambda loss: (loss * w).sum(), "weighted")):
        leaf.grad = None
        upstream(focal_triton.sigmoid_focal_loss(leaf, t)).backward()
        g = torch.full(x.shape, 1 / x.numel()) if how == "mean" else w
        assert_close(leaf.grad, focal_grad_ref(x, t, 0.25, 2.0, "none", g), torch.float32, how)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("hw", [(5, 7), (1, 1), (1, 4)])
def test_special_offsets_are_the_sorted_offsets(layout, hw):
    """The excluded elements' offsets (built in storage order without a sort) are exactly the sorted offsets of
    the positives' elements and of every class of the ignored anchors."""
    g = torch.Generator().manual_seed(0)
    n, a, c = 3, 4, 6
    level = torch.randn(n, a * c, *hw, generator=g)
    if layout == "cl":
        level = level.contiguous(memory_format=torch.channels_last)
    m = hw[0] * hw[1] * a
    labels = torch.randint(-2, c, (n, m), generator=g)
    chunks = cpu_multilevel._chunks(level, 7)
    special = cpu_multilevel._Special(level, labels.view(n, hw[0] * hw[1], a), a, -2, chunks)
    expected = []
    for i in range(n):
        for pos in range(hw[0] * hw[1]):
            for k in range(a):
                lab = int(labels[i, pos * a + k])
                classes = range(c) if lab == -2 else ([lab] if lab >= 0 else [])
                h, w = divmod(pos, hw[1])
                st = level.stride()
                expected += [i * st[0] + (k * c + cl) * st[1] + h * st[2] + w * st[3] for cl in classes]
    assert special.offsets.tolist() == sorted(expected)
