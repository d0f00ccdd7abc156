"""Code paths of the multi-level kernel that the value tests reach only by luck: the unmasked channels_last tiles of
a class-aligned head (C % 16 == 0), eight levels (the maximum), levels without positions, the tile plan, and the
registered ops under torch.library.opcheck."""
import dataclasses

import pytest
import torch
from reference import TOL
from reference_multilevel import multilevel_value_and_grads

import focal_triton
from focal_triton.kernels import multilevel as mf
from focal_triton import validation as V
from focal_triton.ops.multilevel import (backward_op_args, multilevel_focal_loss_backward_op,
                                        multilevel_focal_loss_op, op_args)


def _head(shapes, num_anchors, num_classes, device, layouts, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = []
    for (h, w), cl in zip(shapes, layouts):
        x = torch.randn(2, num_anchors * num_classes, h, w, generator=g, dtype=torch.float64) * 3
        x = x.to(dtype).to(device)
        levels.append(x.to(memory_format=torch.channels_last) if cl else x)
    m = sum(h * w for h, w in shapes) * num_anchors
    labels = torch.randint(-2, num_classes, (2, m), generator=g).to(device)
    return levels, labels


def _check(levels, labels, num_anchors, **kw):
    xs = [x.detach().requires_grad_(True) for x in levels]
    loss = focal_triton.multilevel_focal_loss(xs, labels, num_anchors, **kw)
    grads = torch.autograd.grad(loss, xs)
    ref, ref_grads = multilevel_value_and_grads(levels, labels, num_anchors, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r, x in zip(grads, ref_grads, xs):
        assert g.stride() == x.stride()
        torch.testing.assert_close(g.double(), r, **TOL[torch.float32])


def test_class_aligned_channels_last_takes_unmasked_tiles(backend, poisoned, device):
    """C = 16: channels_last tiles whose rows lie inside the level are unmasked (the wide-load path on a GPU)."""
    shapes = [(9, 4), (3, 3)]  # 36 and 9 positions: full and partial position tiles of the interpreter's 32
    plan = mf.Plan(_head(shapes, 2, 16, device, [True, True])[0], 2, torch.device("cpu"), 4)
    assert plan.C % 16 == 0 and plan.tile[1] < plan.C  # several class tiles, all full
    levels, labels = _head(shapes, 2, 16, device, [True, False])
    _check(levels, labels, 2, weights=torch.rand(labels.shape, device=device), label_smoothing=0.1)


def test_eight_levels_with_empty_ones(backend, poisoned, device):
    shapes = [(4, 3), (0, 5), (2, 2), (1, 1), (3, 1), (0, 0), (1, 2), (2, 1)]
    levels, labels = _head(shapes, 3, 5, device, [i % 2 == 1 for i in range(8)])
    _check(levels, labels, 3, normalizer=torch.tensor([2.0, 5.0], device=device))
    with pytest.raises(ValueError, match="level_logits"):
        focal_triton.multilevel_focal_loss(levels + levels[:1], labels, 3)


def test_tile_plan_counts_every_tile_once():
    """Per image: A * ceil(C / BLOCK_C) * ceil(HW / BLOCK_HW) tiles per level, numbered level after level; unused
    level slots start at the end, so no tile maps to them."""
    shapes = [(8, 6), (4, 3), (0, 2), (1, 1)]
    levels = [torch.empty(3, 4 * 7, h, w) for h, w in shapes]
    plan = mf.Plan(levels, 4, torch.device("cpu"), 4)
    bh, bc = plan.tile
    per_level = [4 * -(-7 // bc) * -(-h * w // bh) for h, w in shapes]
    assert plan.tiles_per_image == sum(per_level)
    starts = [sum(per_level[:i]) for i in range(1, len(shapes))]
    assert plan.starts == starts + [plan.tiles_per_image] * (mf.MAX_LEVELS - len(shapes))
    assert plan.num_anchors_total == sum(h * w for h, w in shapes) * 4
    assert plan.cl_mask == 0
    assert mf.Plan([levels[0].to(memory_format=torch.channels_last), levels[1]], 4, torch.device("cpu"), 4).cl_mask == 1


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_opcheck(backend, device, reduction):
    """torch.library.opcheck of both registered ops: schema, fake (meta) shapes, autograd registration (the op
    arguments of a public call: validation's record)."""
    levels, labels = _head([(3, 2), (2, 1)], 2, 3, device, [False, True])
    levels = [x.requires_grad_(True) for x in levels]
    weights = torch.rand(labels.shape, device=device)
    alpha = torch.rand(3, device=device)
    norm = torch.tensor([2.0, 3.0], device=device) if reduction == "sum" else None
    options = dict(alpha=alpha, gamma=2.0, weights=weights, label_smoothing=0.1, background=-1, ignore_index=-2,
                   normalizer=norm, reduction=reduction, check_labels=False, loss="fl", scores=None, beta=None,
                   iou_weighted=None, return_stats=False)
    call = V.multilevel_call(levels, labels, 2, options)
    torch.library.opcheck(multilevel_focal_loss_op, op_args(call))
    if reduction == "sum":  # with the per-anchor losses of the statistics
        torch.library.opcheck(multilevel_focal_loss_op, op_args(dataclasses.replace(call, with_stats=True)))
        # no weights and no per-class alpha, float32: on the torch path the forward also returns the gradients
        plain = V.multilevel_call(levels, labels, 2, dict(options, alpha=None, weights=None))
        torch.library.opcheck(multilevel_focal_loss_op, op_args(plain))
    if reduction == "sum":
        bargs = backward_op_args(call, [torch.tensor(1.5, device=device)], torch.tensor([0.25, 1 / 6], device=device))
    else:
        bargs = backward_op_args(call, [torch.randn_like(x) for x in levels], None)
    torch.library.opcheck(multilevel_focal_loss_backward_op, bargs)


def test_gpu_grid_is_one_wave_split_over_images(monkeypatch):
    """On CUDA: P = ceil(programs that fit on the GPU / N) programs per image (at most the tiles of an image), and
    the occupancy lookup sees no size (integer arguments are not specialized), so it is cached once per dtype."""
    seen = []

    def fake_max_programs(kernel, args, constexprs, cfg, device):
        seen.append([a for a in args if isinstance(a, int) and not isinstance(a, bool)])
        return 264

    monkeypatch.setattr(mf, "max_programs", fake_max_programs)
    levels = [torch.empty(3, 4 * 16, 40, 50, dtype=torch.bfloat16), torch.empty(3, 64, 20, 25, dtype=torch.bfloat16)]
    plan = mf.Plan(levels, 4, torch.device("cuda"), 2)
    assert plan.tile == mf.gpu_tile(2) == (64, 16)
    args = [levels[0], 7, 1, 16, 2.0]
    assert plan.programs_per_image(args, {}) == 88  # ceil(264 / 3)
    assert seen == [[0, 0, 0]]
    small = mf.Plan([torch.empty(3, 64, 2, 2, dtype=torch.bfloat16)], 4, torch.device("cuda"), 2)
    assert small.tiles_per_image == 4 and small.programs_per_image(args, {}) == 4


@pytest.mark.parametrize("channels_last", [False, True])
def test_infinite_and_nan_logits(backend, poisoned, device, channels_last):
    """Limits by hand, one level (N = 1, A = 1, C = 2, 1 x 4 positions), alpha = 0.25, gamma = 2:
    anchor 0, class 0 positive at x = +inf and class 1 at x = -inf: loss 0, gradient 0 (eager code gives NaN);
    anchor 1, background at x = +inf: loss inf, gradient (1 - alpha) = 0.75 (finite);
    anchor 2, ignored, NaN logits: loss 0 and gradient 0 (dropped, as torchvision does);
    anchor 3, NaN logit of class 1: NaN there, in the sum, and in its gradient."""
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[inf, inf, nan, 0.0], [-inf, 0.0, nan, nan]], device=device).view(1, 2, 1, 4)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    labels = torch.tensor([[0, -1, -2, 1]], device=device)
    (loss,) = focal_triton.multilevel_focal_loss([x], labels, 1, reduction="none")
    grad = torch.autograd.grad(loss, x, torch.ones_like(loss))[0]
    loss, grad = loss.view(2, 4).cpu(), grad.view(2, 4).cpu()
    assert loss[0, 0] == 0 and loss[1, 0] == 0 and grad[0, 0] == 0 and grad[1, 0] == 0
    assert loss[0, 1] == inf and grad[0, 1] == 0.75
    assert loss[0, 2] == 0 and loss[1, 2] == 0 and grad[0, 2] == 0 and grad[1, 2] == 0
    assert torch.isnan(loss[1, 3]) and torch.isnan(grad[1, 3])
    assert torch.isfinite(loss[0, 3]) and torch.isfinite(grad[0, 3])
    total = focal_triton.multilevel_focal_loss([x], labels, 1)
    assert torch.isnan(total)
    labels[0, 3] = -2  # ignore the NaN anchor: the sum is inf (anchor 1), not NaN
    assert focal_triton.multilevel_focal_loss([x], labels, 1).item() == inf


def test_fractional_gamma_saturated_gradients_finite(backend, poisoned, device):
    """0 < gamma < 1 at p_t -> 1 (|x| = 30, right class): autograd through the eager formula gives NaN there."""
    x = torch.tensor([30.0, -30.0, -30.0, 30.0], device=device).view(1, 2, 1, 2).requires_grad_(True)
    labels = torch.tensor([[0, 1]], device=device)
    loss = focal_triton.multilevel_focal_loss([x], labels, 1, gamma=0.5)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() < 1e-12 and grad.abs().max().item() < 1e-12
