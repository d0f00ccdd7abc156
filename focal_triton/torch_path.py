"""Fused pure-torch implementation (CPU without the Triton interpreter, or FOCAL_TRITON_BACKEND=torch).

The same formulas as `focal_triton.kernels.focal_math`, evaluated chunk by chunk over the flat storage of dense
operands: the intermediates are CHUNK elements long (cache-sized), never input-sized, and partial sums are added in
chunk order, so results are repeatable. float32 math (float64 for float64 logits).
"""
import torch

from .kernels.sigmoid_focal import alpha_coefficients  # plain Python: alpha_t = c0 + c1 t, shared with the kernels
from .layout import flat

# 64 Ki elements: intermediates of 256 KiB in float32 stay in L2 while the ~20 elementwise ops run over them.
CHUNK = 1 << 16


def compute_dtype(x_dtype):
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def focal_terms(x, t, ts, c0, c1, gamma: float, want_grad: bool):
    """(FL, dFL/dx or None) for chunks already in the compute dtype: t modulates, ts is the BCE target, and
    alpha_t = c0 + c1 t with c0, c1 numbers or tensors broadcasting against x (see kernels/focal_math.py)."""
    e = torch.exp(-x.abs())
    r = 1.0 / (1.0 + e)
    er = e * r
    pos = x >= 0
    p = torch.where(pos, r, er)
    q = torch.where(pos, er, r)
    u = p * (1.0 - t) + q * t
    zero = x.new_zeros(())
    lin = torch.where(pos, torch.where(ts == 1, zero, (1.0 - ts) * x), torch.where(ts == 0, zero, -ts * x))
    ce = lin + torch.log1p(e)
    m = u.pow(gamma)
    alpha_t = c0 + c1 * t if (isinstance(c1, torch.Tensor) or c1 != 0.0) else c0  # no chunk-sized ones
    loss = alpha_t * m * ce
    if not want_grad:
        return loss, None
    if gamma == 0:
        g = torch.zeros_like(u)
    elif float(gamma).is_integer():
        g = gamma * u.pow(gamma - 1) * p * q
    else:
        g = gamma * m * torch.where(u > 0, p * q / u, zero)
    grad = alpha_t * (m * (p - ts) + torch.where(g == 0, zero, g * (1.0 - 2.0 * t) * ce))
    return loss, grad


def _loss_and_grad(x, t, alpha: float, gamma: float, want_grad: bool):
    """(FL, dFL/dx or None) for 1-D chunks x, t already in the compute dtype."""
    return focal_terms(x, t, t, *alpha_coefficients(alpha), gamma, want_grad)


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)


@torch.no_grad()
def sigmoid_focal_forward(x, t, alpha: float, gamma: float, reduction: str, out_dtype=None):
    """Same contract as `focal_triton.kernels.sigmoid_focal_forward`: dense x, t with equal strides, n > 0; the
    elementwise loss in x's layout for "none", else the 0-d sum / mean in x's dtype."""
    n = x.numel()
    cdt = compute_dtype(x.dtype)
    x_flat, t_flat = flat(x), flat(t)
    out_dtype = out_dtype or x.dtype
    out = torch.empty_like(x, dtype=out_dtype) if reduction == "none" else None
    out_flat = flat(out) if out is not None else None
    partials = []
    for s, e in _chunks(n):
        loss, _ = _loss_and_grad(x_flat[s:e].to(cdt), t_flat[s:e].to(cdt), alpha, gamma, want_grad=False)
        if out is not None:
            out_flat[s:e] = loss
        else:
            partials.append(loss.sum())
    if out is not None:
        return out
    total = torch.stack(partials).sum()
    if reduction == "mean":
        total = total / n
    return total.to(out_dtype)


@torch.no_grad()
def sigmoid_focal_backward(grad_out, x, t, alpha: float, gamma: float, reduction: str):
    """Same contract as `focal_triton.kernels.sigmoid_focal_backward`: grad_out is 0-d (a scalar upstream
    gradient, divided by n for "mean") or dense with x's strides; returns dx in x's layout and dtype."""
    n = x.numel()
    cdt = compute_dtype(x.dtype)
    x_flat, t_flat = flat(x), flat(t)
    grad_in = torch.empty_like(x)
    out_flat = flat(grad_in)
    scalar = grad_out.dim() == 0
    if scalar:
        g0 = grad_out.to(cdt) / n if reduction == "mean" else grad_out.to(cdt)
    else:
        g_flat = flat(grad_out)
    for s, e in _chunks(n):
        _, dfl = _loss_and_grad(x_flat[s:e].to(cdt), t_flat[s:e].to(cdt), alpha, gamma, want_grad=True)
        out_flat[s:e] = (g0 if scalar else g_flat[s:e].to(cdt)) * dfl
    return grad_in
