"""Float64 reference of the sigmoid focal loss, written from the paper's formula and independent of focal_triton
(this module never imports it).

FL = alpha_t (1 - p_t)^gamma BCE(x, t), p = sigmoid(x), p_t = p t + (1 - p)(1 - t),
alpha_t = alpha t + (1 - alpha)(1 - t) (1 when alpha = -1). Valid for finite logits; the tests state the limits at
+-inf by hand. Gradients come from autograd through this float64 graph.
"""
import torch
import torch.nn.functional as F


def focal_loss_ref(x: torch.Tensor, t: torch.Tensor, alpha: float, gamma: float, reduction: str = "none"):
    x = x.double()
    t = t.double()
    log_p, log_q = F.logsigmoid(x), F.logsigmoid(-x)
    ce = -(t * log_p + (1 - t) * log_q)
    one_minus_pt = torch.exp(log_p) * (1 - t) + torch.exp(log_q) * t
    loss = ce * one_minus_pt**gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def focal_grad_ref(x, t, alpha, gamma, reduction="none", grad_out=None):
    """d(loss)/dx in float64 for the upstream gradient grad_out (ones by default)."""
    xd = x.detach().double().requires_grad_(True)
    loss = focal_loss_ref(xd, t, alpha, gamma, reduction)
    g = torch.ones_like(loss) if grad_out is None else grad_out.double()
    (grad,) = torch.autograd.grad(loss, xd, g)
    return grad


# Tolerances for comparing a result of dtype d (rounded once from float32 math) with the float64 reference.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-7),  # one ulp of float16 (round-to-nearest gives half of it)
    torch.bfloat16: dict(rtol=2**-7, atol=1e-7),  # one ulp of bfloat16
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, what: str = ""):
    """assert_close against the float64 reference with the tolerance of `dtype`, listing the worst mismatches."""
    dtype = dtype or actual.dtype
    tol = TOL[dtype]
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    bad = ~torch.isclose(a, e, rtol=tol["rtol"], atol=tol["atol"], equal_nan=True)
    if bad.any():
        idx = bad.nonzero()[:8].tolist()
        rows = "\n".join(f"  at {i}: got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements differ ({dtype}, {tol}):\n{rows}")
