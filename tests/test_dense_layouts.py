"""Memory layouts (non-contiguous, channels_last, expanded), gradcheck in float64 and bitwise determinism."""
import pytest
import torch
from reference import assert_close, focal_grad_ref, focal_loss_ref

import focal_triton


def _rand(shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)


def _targets(shape, device, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < 0.2).to(dtype).to(device)


def _check(x, t, reduction="none"):
    x = x.detach().requires_grad_(True)
    loss = focal_triton.sigmoid_focal_loss(x, t, reduction=reduction)
    assert_close(loss, focal_loss_ref(x, t, 0.25, 2.0, reduction), what="loss")
    g = torch.randn(loss.shape, device=x.device)
    (grad,) = torch.autograd.grad(loss, x, g)
    assert grad.shape == x.shape
    assert_close(grad, focal_grad_ref(x, t, 0.25, 2.0, reduction, g), what="grad")
    return loss, grad


def test_channels_last_read_in_place(backend, poisoned, device):
    """A dense channels_last head output is read in its own layout, and the "none" loss comes back in it."""
    x = _rand((2, 12, 5, 7), device).to(memory_format=torch.channels_last)
    t = _targets((2, 12, 5, 7), device).to(memory_format=torch.channels_last)
    loss, grad = _check(x, t)
    assert loss.is_contiguous(memory_format=torch.channels_last)
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_non_contiguous_and_expanded(backend, poisoned, device, reduction):
    base = _rand((6, 40), device)
    _check(base[:, ::3], _targets((6, 14), device), reduction)  # strided slice: copied once
    _check(base.t(), _targets((40, 6), device), reduction)  # dense transpose vs contiguous targets
    _check(base.t(), _targets((6, 40), device).t(), reduction)  # both transposed alike: no copy
    row = _targets((1, 40), device)
    _check(base, row.expand(6, 40), reduction)  # broadcast targets (stride 0)
    _check(_rand((1, 40), device).expand(6, 40), _targets((6, 40), device), reduction)  # expanded logits


@pytest.mark.parametrize("offset", [0, 1])
def test_bf16_views_at_any_element_offset(backend, poisoned, device, offset):
    """bf16 logits and soft targets starting on an odd element (2-byte aligned): full tiles read pairs of them as
    int32 words only where every bf16 input starts on a 4-byte boundary (dense.words_aligned), else element by
    element; both give the reference's loss and gradient, with full tiles and a tail."""
    from focal_triton.kernels import dense

    x = _rand((4001,), device, torch.bfloat16)[offset:offset + 4000]
    g = torch.Generator().manual_seed(2)
    t = torch.rand(4001, generator=g).to(torch.bfloat16).to(device)[offset:offset + 4000]
    assert dense.words_aligned(x, t) == (offset == 0)
    assert dense.words_aligned(x, t.float()) == (offset == 0)
    x.requires_grad_(True)
    for reduction in ("none", "sum"):
        loss = focal_triton.sigmoid_focal_loss(x, t, reduction=reduction)
        assert_close(loss, focal_loss_ref(x, t, 0.25, 2.0, reduction), what=f"loss {reduction}")
        (grad,) = torch.autograd.grad(loss.sum(), x)  # an upstream of ones: exact in bf16
        assert_close(grad, focal_grad_ref(x, t, 0.25, 2.0, "sum"), what=f"grad {reduction}")


def test_upstream_grad_layouts(backend, poisoned, device):
    """The gradient of "none" for an expanded scalar, a dense and a strided upstream gradient."""
    x = _rand((9, 31), device).requires_grad_(True)
    t = _targets((9, 31), device)
    loss = focal_triton.sigmoid_focal_loss(x, t)
    for g in (torch.tensor(2.5, device=device).expand(9, 31), torch.randn(9, 1, device=device).expand(9, 31),
              torch.randn(1, 31, device=device).expand(9, 31), torch.randn(9, 31, device=device),
              torch.randn(31, 9, device=device).t(), torch.randn(9, 62, device=device)[:, ::2]):
        (grad,) = torch.autograd.grad(loss, x, g, retain_graph=True)
        assert_close(grad, focal_grad_ref(x, t, 0.25, 2.0, "none", g), what=f"grad strides {g.stride()}")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1, 0.5), (0.6, 0.0), (0.25, 3.0), (1.0, 1.5)])
def test_gradcheck_float64(backend, device, reduction, alpha, gamma):
    x = _rand((2, 3, 7), device, torch.float64).requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    t = torch.rand((2, 3, 7), generator=g, dtype=torch.float64).to(device)
    t[0] = (t[0] > 0.5).double()  # hard and soft targets
    assert torch.autograd.gradcheck(
        lambda inp: focal_triton.sigmoid_focal_loss(inp, t, alpha, gamma, reduction), (x,), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bitwise_deterministic(backend, device, dtype, reduction):
    x = _rand((7, 333), device, dtype)
    t = _targets((7, 333), device, dtype)
    runs = []
    for _ in range(3):
        xi = x.clone().requires_grad_(True)
        loss = focal_triton.sigmoid_focal_loss(xi, t, reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), xi)
        runs.append((loss, grad))
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])
