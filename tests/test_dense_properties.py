"""Property-based tests (hypothesis): any shape, any finite logits, any targets in [0, 1], any valid alpha, gamma."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import assert_close, focal_grad_ref, focal_loss_ref

import focal_triton
from conftest import DEVICE

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
logit = st.floats(-60, 60, allow_nan=False, width=32)
target = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1, width=32))
alphas = st.one_of(st.just(-1.0), st.floats(0, 1))
gammas = st.one_of(st.sampled_from([0.0, 1.0, 2.0, 3.0]), st.floats(0, 5))
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    shape = draw(shapes)
    n = 1
    for s in shape:
        n *= s
    x = torch.tensor(draw(st.lists(logit, min_size=n, max_size=n)), dtype=torch.float64).reshape(shape)
    t = torch.tensor(draw(st.lists(target, min_size=n, max_size=n)), dtype=torch.float64).reshape(shape)
    return x, t


def _alpha_t(alpha, t):
    return torch.ones_like(t) if alpha < 0 else alpha * t + (1 - alpha) * (1 - t)


@SETTINGS
@given(problem=problems(), alpha=alphas, gamma=gammas, reduction=st.sampled_from(["none", "mean", "sum"]))
def test_matches_reference(problem, alpha, gamma, reduction):
    x, t = (v.to(DEVICE) for v in problem)
    for dtype in (torch.float64, torch.float32):
        xd = x.to(dtype).requires_grad_(True)
        loss = focal_triton.sigmoid_focal_loss(xd, t.to(dtype), alpha, gamma, reduction)
        assert_close(loss, focal_loss_ref(x, t, alpha, gamma, reduction), what=f"loss {dtype}")
        if x.numel():
            (grad,) = torch.autograd.grad(loss.sum(), xd)
            expected = focal_grad_ref(x, t, alpha, gamma, reduction)
            # autograd of the reference meets 0 ** (gamma - 1) where float64 rounds 1 - p_t to 0 (|x| >~ 37);
            # there the exact gradient is alpha_t (p - t) with p = 0 or 1.
            limit = _alpha_t(alpha, t) * ((x > 0).double() - t) / (x.numel() if reduction == "mean" else 1)
            expected = torch.where(torch.isnan(expected), limit, expected)
            assert_close(grad, expected, what=f"grad {dtype}")


@SETTINGS
@given(problem=problems(), alpha=alphas, gamma=gammas)
def test_invariants(problem, alpha, gamma):
    """Loss >= 0 and finite; sum = sum of "none"; mean = sum / n; zero exactly where alpha_t = 0."""
    x, t = (v.to(DEVICE).float() for v in problem)
    none = focal_triton.sigmoid_focal_loss(x, t, alpha, gamma)
    assert torch.isfinite(none).all() and (none >= 0).all()
    total = focal_triton.sigmoid_focal_loss(x, t, alpha, gamma, "sum")
    torch.testing.assert_close(total, none.double().sum().float(), rtol=1e-5, atol=1e-6)
    if x.numel():
        mean = focal_triton.sigmoid_focal_loss(x, t, alpha, gamma, "mean")
        torch.testing.assert_close(mean, total / x.numel(), rtol=1e-5, atol=1e-7)
    if alpha >= 0:
        assert (none[_alpha_t(alpha, t.double()) == 0] == 0).all()
