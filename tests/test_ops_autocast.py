"""Automatic mixed precision: under torch.autocast the ops take the head's 16-bit logits as they are (no upcast
copy), compute in float32 and return float32 losses; gradients come back in the logits' dtype; with a GradScaler
the scaled backward is the unscaled one times the scale."""
import pytest
import torch
from helpers import LogitCopies
from reference import TOL, focal_grad_ref, focal_loss_ref
from reference_multilevel import multilevel_value_and_grads

import focal_triton

A, C = 3, 5
SIZES = [(5, 4), (3, 2)]


def _head_under_autocast(device, dtype, seed=0):
    """A conv head run under autocast: its per-level logits come out in the autocast dtype."""
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(4, A * C, 3, padding=1).to(device)
    feats = [torch.randn(2, 4, h, w, generator=g).to(device) for h, w in SIZES]
    m = A * sum(h * w for h, w in SIZES)
    labels = torch.randint(-2, C, (2, m), generator=g).to(device)
    with torch.autocast(device.type, dtype=dtype):
        levels = [conv(f) for f in feats]
    assert all(x.dtype == dtype for x in levels)
    return levels, labels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multilevel_under_autocast(backend, poisoned, device, dtype):
    levels, labels = _head_under_autocast(device, dtype)
    xs = [x.detach().requires_grad_(True) for x in levels]
    norm = (labels >= 0).sum(1).clamp(min=1)
    with torch.autocast(device.type, dtype=dtype):
        with LogitCopies(levels[-1].numel()) as mode:
            loss = focal_triton.multilevel_focal_loss(xs, labels, A, normalizer=norm)
            outs = focal_triton.multilevel_focal_loss(xs, labels, A, reduction="none")
    assert mode.seen == []
    assert loss.dtype == torch.float32 and all(o.dtype == torch.float32 for o in outs)
    grads = torch.autograd.grad(loss, xs)
    assert all(g.dtype == dtype and g.stride() == x.stride() for g, x in zip(grads, xs))
    ref, ref_grads = multilevel_value_and_grads(levels, labels, A, normalizer=norm)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)  # float32 math on the 16-bit logits as they are
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, **TOL[dtype])
    ref_none, _ = multilevel_value_and_grads(levels, labels, A, reduction="none")
    for o, r in zip(outs, ref_none):
        torch.testing.assert_close(o.double(), r, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dense_under_autocast(backend, poisoned, device, dtype, reduction):
    """torchvision's sigmoid_focal_loss under autocast returns float32 (its BCE is an autocast float32 op):
    focal_triton does the same, without an upcast copy of the logits, and with float32 math throughout (torchvision
    computes sigmoid and the modulation in the 16-bit dtype there, so the values are compared with the float64
    reference instead)."""
    from torchvision.ops import sigmoid_focal_loss as tv_loss

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 40, generator=g) * 3).to(dtype).to(device).requires_grad_(True)
    t = (torch.rand(6, 40, generator=g) < 0.2).to(dtype).to(device)
    with torch.autocast(device.type, dtype=dtype):
        with LogitCopies(x.numel()) as mode:
            loss = focal_triton.sigmoid_focal_loss(x, t, reduction=reduction)
        ref = tv_loss(x, t, reduction=reduction)
    assert mode.seen == [] and loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss.double(), focal_loss_ref(x, t, 0.25, 2.0, reduction), **TOL[torch.float32])
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), focal_grad_ref(x, t, 0.25, 2.0, reduction), **TOL[dtype])


def test_outside_autocast_the_dense_loss_keeps_the_logits_dtype(backend, device):
    x = torch.randn(3, 7, dtype=torch.bfloat16, device=device)
    assert focal_triton.sigmoid_focal_loss(x, torch.zeros_like(x), reduction="sum").dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grad_scaler_scales_the_backward_exactly(backend, device, dtype):
    """GradScaler multiplies the loss by a power of two: the gradients of the scaled loss are exactly the unscaled
    ones times the scale (the upstream scalar enters the kernels in float32 and the scale is exact)."""
    levels, labels = _head_under_autocast(device, torch.bfloat16)
    levels = [x.to(dtype) for x in levels]
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    xs = [x.detach().requires_grad_(True) for x in levels]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = focal_triton.multilevel_focal_loss(xs, labels, A, normalizer=(labels >= 0).sum().clamp(min=1))
    scaled = torch.autograd.grad(scaler.scale(loss), xs, retain_graph=True)
    plain = torch.autograd.grad(loss, xs)
    for s, p in zip(scaled, plain):
        assert torch.equal(s, p * 2.0**12)
    x = levels[0].detach().reshape(-1).requires_grad_(True)
    dense = focal_triton.sigmoid_focal_loss(x, (torch.rand(x.shape) < 0.1).to(dtype).to(device), reduction="mean")
    (s,) = torch.autograd.grad(scaler.scale(dense), x, retain_graph=True)
    (p,) = torch.autograd.grad(dense, x)
    assert torch.equal(s, p * 2.0**12)
