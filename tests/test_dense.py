"""Values and gradients of focal_triton.sigmoid_focal_loss against the float64 reference, on both backends."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from reference import TOL, assert_close, focal_grad_ref, focal_loss_ref

import focal_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "mean", "sum"]
ALPHAS = [-1, 0, 0.25, 1]
GAMMAS = [0, 0.5, 1, 2, 3.5]


def make_inputs(shape, dtype, device, seed=0, soft=False, scale=4.0):
    """Logits spread over the saturated and the small range, with hard (or soft) targets; 5 elements of 13 saturate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    flat = x.view(-1)
    flat[::13] = 25.0
    flat[5::13] = -25.0
    flat[7::13] = 1e-3
    t = torch.rand(shape, generator=g, dtype=torch.float64) if soft else (torch.rand(shape, generator=g) < 0.3).double()
    return x.to(dtype).to(device), t.to(dtype).to(device)


# Not a multiple of the interpreter's tile (128) nor of the GPU's, and more tiles than programs: every program runs
# several full tiles and one of them the masked tail.
SHAPE = (5, 7, 19)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha,gamma", list(itertools.product(ALPHAS, GAMMAS)))
def test_matrix_value_and_grad(backend, poisoned, device, dtype, reduction, alpha, gamma):
    x, t = make_inputs(SHAPE, dtype, device, seed=hash((alpha, gamma)) % 1000)
    x.requires_grad_(True)
    loss = focal_triton.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction)
    assert loss.dtype == dtype and loss.device == x.device
    assert loss.shape == (SHAPE if reduction == "none" else ())
    assert_close(loss, focal_loss_ref(x, t, alpha, gamma, reduction), what="loss")

    grad_out = torch.randn(loss.shape, dtype=torch.float64).to(dtype).to(device)
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    assert grad.dtype == dtype and grad.shape == x.shape
    expected = focal_grad_ref(x, t, alpha, gamma, reduction, grad_out)
    assert_close(grad, expected, what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_targets(backend, poisoned, device, dtype):
    x, t = make_inputs((3, 300), dtype, device, soft=True)
    x.requires_grad_(True)
    for gamma in (0.5, 2.0):
        loss = focal_triton.sigmoid_focal_loss(x, t, alpha=0.25, gamma=gamma)
        assert_close(loss, focal_loss_ref(x, t, 0.25, gamma), what=f"loss gamma={gamma}")
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert_close(grad, focal_grad_ref(x, t, 0.25, gamma), what=f"grad gamma={gamma}")


def test_mixed_dtypes(backend, poisoned, device):
    """bfloat16 logits with float32 targets: math in float32, result and gradient in the logits' dtype."""
    x, t = make_inputs(SHAPE, torch.bfloat16, device, soft=True)
    t = t.float()
    x.requires_grad_(True)
    loss = focal_triton.sigmoid_focal_loss(x, t, reduction="sum")
    assert loss.dtype == torch.bfloat16
    assert_close(loss, focal_loss_ref(x, t, 0.25, 2.0, "sum"), what="loss")
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == torch.bfloat16
    assert_close(grad, focal_grad_ref(x, t, 0.25, 2.0, "sum"), what="grad")


def test_float32_math_inside_low_precision(backend, device):
    """A float16 sum of many small losses must be accumulated in float32: an accumulation in float16 stalls."""
    x = torch.full((4096,), 3.0, dtype=torch.float16, device=device)
    t = torch.ones_like(x)
    got = focal_triton.sigmoid_focal_loss(x, t, reduction="sum")
    assert_close(got, focal_loss_ref(x, t, 0.25, 2.0, "sum"), what="sum")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gamma0_alpha_off_is_bce(backend, poisoned, device, reduction, dtype):
    """gamma = 0 with alpha = -1 is binary_cross_entropy_with_logits, in value and gradient (soft targets too)."""
    x, t = make_inputs(SHAPE, dtype, device, soft=True)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    ours = focal_triton.sigmoid_focal_loss(x1, t, alpha=-1, gamma=0, reduction=reduction)
    bce = F.binary_cross_entropy_with_logits(x2, t, reduction=reduction)
    # Two float32 formulas of the same function agree to float32 rounding (the reference's float32 tolerance).
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours, bce, **tol)
    g = torch.randn(ours.shape, dtype=dtype, device=device)
    torch.testing.assert_close(torch.autograd.grad(ours, x1, g)[0], torch.autograd.grad(bce, x2, g)[0], **tol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1, 0.5), (0.75, 1.0), (0.0, 3.5)])
def test_parity_with_torchvision(backend, device, reduction, alpha, gamma):
    tv = pytest.importorskip("torchvision.ops")
    x, t = make_inputs((4, 9, 11, 3), torch.float32, device, soft=True, scale=3.0)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    ours = focal_triton.sigmoid_focal_loss(x1, t, alpha, gamma, reduction)
    theirs = tv.sigmoid_focal_loss(x2, t, alpha, gamma, reduction)
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)
    g = torch.randn(ours.shape, device=device)
    torch.testing.assert_close(torch.autograd.grad(ours, x1, g)[0], torch.autograd.grad(theirs, x2, g)[0],
                               rtol=2e-5, atol=1e-6)


def test_module_matches_function(backend, device):
    x, t = make_inputs(SHAPE, torch.float32, device)
    for kwargs in ({}, dict(alpha=-1, gamma=0.5, reduction="mean"), dict(alpha=0.5, gamma=1, reduction="sum")):
        module = focal_triton.SigmoidFocalLoss(**kwargs)
        torch.testing.assert_close(module(x, t), focal_triton.sigmoid_focal_loss(x, t, **kwargs), rtol=0, atol=0)
    assert "reduction='sum'" in repr(module)
