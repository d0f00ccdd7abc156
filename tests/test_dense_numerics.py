"""Hard numeric edges: infinite and saturated logits, 0 < gamma < 1 at p_t -> 1, NaN propagation, empty tensors."""
import math

import pytest
import torch
from reference import assert_close, focal_grad_ref, focal_loss_ref

import focal_triton

INF = float("inf")
NAN = float("nan")
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def loss_and_grad(x, t, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = focal_triton.sigmoid_focal_loss(x, t, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss, grad


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("alpha", [-1, 0.25])
def test_infinite_logits_with_hard_targets(backend, poisoned, device, dtype, gamma, alpha):
    """Limits by hand: a right prediction at +-inf costs 0 with gradient 0; a wrong one costs inf (alpha_t > 0)
    with the finite gradient alpha_t * (p - t) = +-alpha_t."""
    x = torch.tensor([INF, -INF, INF, -INF], dtype=dtype, device=device)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=dtype, device=device)
    a_pos, a_neg = (1.0, 1.0) if alpha < 0 else (alpha, 1 - alpha)
    loss, grad = loss_and_grad(x, t, alpha=alpha, gamma=gamma)
    assert loss.tolist() == [0.0, 0.0, INF, INF]
    assert grad.tolist() == pytest.approx([0.0, 0.0, a_neg, -a_pos], abs=0, rel=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_saturated_finite_logits(backend, poisoned, device, dtype):
    big = {torch.float16: 6e4, torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e300}[dtype]
    x = torch.tensor([big, -big, 88.0, -88.0, 40.0, -40.0, 17.0, -17.0], dtype=dtype, device=device)
    for t_val in (0.0, 1.0, 0.3):
        t = torch.full_like(x, t_val)
        for gamma in (0.5, 2.0):
            loss, grad = loss_and_grad(x, t, gamma=gamma)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (t_val, gamma, loss, grad)
            assert_close(loss, focal_loss_ref(x, t, 0.25, gamma), what=f"loss t={t_val} gamma={gamma}")
            expected = focal_grad_ref(x, t, 0.25, gamma)
            # Past float64's range autograd meets 0 ** (gamma - 1) too; there the gradient's limit is
            # alpha_t (p - t) with p = 0 or 1 (the modulation term vanishes exponentially).
            td = t.double()
            limit = (0.75 - 0.5 * td) * ((x.double() > 0).double() - td)
            expected = torch.where(torch.isnan(expected), limit, expected)
            assert_close(grad, expected, what=f"grad t={t_val} gamma={gamma}")


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9])
def test_fractional_gamma_gradient_finite_as_pt_to_1(backend, poisoned, device, gamma):
    """Where float32 rounds p_t to exactly 1, (1 - p_t)^(gamma - 1) is inf and the eager/autograd gradient is NaN;
    ours is finite and equals the float64 value (computed where float64 still resolves 1 - p_t)."""
    x = torch.tensor([20.0, 30.0, 60.0, -20.0, -30.0, -60.0], device=device)
    t = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], device=device)
    xe = x.clone().requires_grad_(True)
    expected_loss = focal_loss_ref(x, t, 0.25, gamma)
    p = torch.sigmoid(xe)
    pt = p * t + (1 - p) * (1 - t)
    eager32 = (1 - pt) ** gamma * torch.nn.functional.binary_cross_entropy_with_logits(xe, t, reduction="none")
    (eager_grad,) = torch.autograd.grad(eager32.sum(), xe)
    assert torch.isnan(eager_grad).any(), "the float32 eager formula was expected to hit pow-at-zero here"
    loss, grad = loss_and_grad(x, t, gamma=gamma)
    assert torch.isfinite(grad).all()
    assert_close(loss, expected_loss, dtype=torch.float32, what="loss")
    assert_close(grad, focal_grad_ref(x, t, 0.25, gamma), dtype=torch.float32, what="grad")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_nan_propagates(backend, poisoned, device, dtype, gamma):
    """NaN in a logit or a target gives NaN loss and gradient there (never a silent 0); other elements are intact."""
    x = torch.tensor([NAN, 1.0, -2.0, 0.5, INF, -INF], dtype=dtype, device=device)
    t = torch.tensor([1.0, NAN, 0.0, 1.0, NAN, NAN], dtype=dtype, device=device)
    loss, grad = loss_and_grad(x, t, gamma=gamma)
    nan_at = [True, True, False, False, True, True]
    assert torch.isnan(loss).tolist() == nan_at
    assert torch.isnan(grad).tolist() == nan_at
    assert_close(loss[2:4], focal_loss_ref(x[2:4], t[2:4], 0.25, gamma), what="loss")
    for reduction in ("sum", "mean"):
        assert math.isnan(focal_triton.sigmoid_focal_loss(x, t, gamma=gamma, reduction=reduction).item())


@pytest.mark.parametrize("shape", [(0,), (3, 0, 5), (0, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty(backend, device, shape, dtype):
    x = torch.empty(shape, dtype=dtype, device=device, requires_grad=True)
    t = torch.empty(shape, dtype=dtype, device=device)
    none = focal_triton.sigmoid_focal_loss(x, t)
    assert none.shape == shape and none.dtype == dtype
    total = focal_triton.sigmoid_focal_loss(x, t, reduction="sum")
    mean = focal_triton.sigmoid_focal_loss(x, t, reduction="mean")
    assert total.shape == () and total.item() == 0.0
    assert math.isnan(mean.item())  # torch's mean of nothing
    (grad,) = torch.autograd.grad(total + none.sum(), x)
    assert grad.shape == shape


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_zero_dim_input(backend, poisoned, device, reduction):
    x = torch.tensor(1.5, device=device, requires_grad=True)
    t = torch.tensor(1.0, device=device)
    loss = focal_triton.sigmoid_focal_loss(x, t, reduction=reduction)
    assert loss.shape == ()
    assert_close(loss, focal_loss_ref(x, t, 0.25, 2.0), what="loss")
    (grad,) = torch.autograd.grad(loss, x)
    assert_close(grad, focal_grad_ref(x, t, 0.25, 2.0), what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_losses_keep_relative_accuracy(backend, poisoned, device, dtype):
    """Confident right predictions have losses down to 1e-35: BCE = log1p(exp(-|x|)) must keep its relative
    accuracy there (log(1 + e) would round them to 0). gamma = 0, alpha = -1 is plain BCE."""
    x = torch.tensor([10.0, 17.0, 25.0, 40.0, 60.0, 80.0, -10.0, -40.0, -80.0], dtype=dtype, device=device)
    t = (x > 0).to(dtype)
    loss = focal_triton.sigmoid_focal_loss(x, t, alpha=-1, gamma=0)
    expected = focal_loss_ref(x, t, -1, 0)
    assert (expected > 0).all()
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=0)


def test_gamma_0_alpha_minus_1_is_bce_to_rounding(backend, device):
    """gamma = 0, alpha = -1 is BCE-with-logits to rounding, not bitwise: against a float64 BCE (written here),
    focal_triton's float32 loss is within 2e-6 relative per element (measured: 1.1e-7 on the torch path, 5.9e-7
    interpreted), at least as close as torch's own float32 binary_cross_entropy_with_logits (7.3e-5 relative where
    its loss is small, torch 2.14); the two float32 results agree to 5e-6 absolute and often differ in the last bits,
    which is why exact-equality tests of other projects can fail."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    x = torch.cat([torch.randn(n, generator=g) * s for s in (1, 3, 10, 30)])
    t = torch.cat([torch.zeros(n), torch.ones(n), torch.rand(2 * n, generator=g)])
    xd, td = x.double(), t.double()
    bce64 = xd.clamp_min(0) - xd * td + torch.log1p(torch.exp(-xd.abs()))
    loss, grad = loss_and_grad(x.to(device), t.to(device), alpha=-1, gamma=0)
    torch_bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none").double()

    def max_rel(a):
        return ((a.double().cpu() - bce64).abs() / bce64).max().item()

    assert max_rel(loss) <= 2e-6
    assert max_rel(loss) <= max_rel(torch_bce)
    torch.testing.assert_close(loss.double().cpu(), torch_bce, rtol=0, atol=5e-6)
    # The gradient is sigmoid(x) - t, to float32 rounding.
    torch.testing.assert_close(grad.double().cpu(), torch.sigmoid(xd) - td, rtol=0, atol=2e-7)


@pytest.mark.parametrize("alpha", [1e-7, 1e-4, 1 - 1e-7])
@pytest.mark.parametrize("loss", ["fl", "fl_star"])
def test_extreme_alpha_keeps_relative_accuracy(backend, poisoned, device, alpha, loss):
    """alpha_t at both ends is exact in float32 (it is encoded by alpha_t(0) = 1 - alpha and alpha_t(1) = alpha):
    with alpha = 1e-7 a positive's loss keeps float32's relative accuracy also where its BCE is large (an encoding
    c0 + c1 t with c1 = 2 alpha - 1 gave 1.49e-6 for 2.5e-6 here). Dense and class-index forms."""
    x = torch.tensor([0.0, -25.0, 3.0, 25.0, -3.0, 0.5], device=device)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 1.0], device=device)
    if loss == "fl":
        out = focal_triton.sigmoid_focal_loss(x, t, alpha=alpha, gamma=0, reduction="none")
        expected = focal_loss_ref(x, t, alpha, 0)
    else:
        out = focal_triton.sigmoid_focal_loss_star(x, t, alpha=alpha, gamma=1.0, reduction="none")
        expected = -torch.nn.functional.logsigmoid(x.double() * (2 * t.double() - 1)) * \
            (alpha * t.double() + (1 - alpha) * (1 - t.double()))
    torch.testing.assert_close(out.double().cpu(), expected.cpu(), rtol=2e-5, atol=0)
    labels = torch.where(t > 0, 0, -1).to(device)  # one class: the positives' label is 0
    flat = focal_triton.focal_loss(x.view(-1, 1), labels, alpha=alpha, gamma=0 if loss == "fl" else 1.0,
                                   loss=loss, reduction="none")
    torch.testing.assert_close(flat.view(-1).double().cpu(), expected.cpu(), rtol=2e-5, atol=0)
