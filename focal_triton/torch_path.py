"""Fused pure-torch implementation (CPU without the Triton interpreter, or FOCAL_TRITON_BACKEND=torch).

The same formulas as `focal_triton.kernels.focal_math`, evaluated chunk by chunk over the flat storage of dense
operands: the intermediates are CHUNK elements long (cache-sized), never input-sized, and partial sums are added in
chunk order, so results are repeatable. float32 math (float64 for float64 logits).
"""
import torch

# Plain Python shared with the kernels: alpha_t = c0 + c1 t, and each loss kind's scalars.
from .kernels.sigmoid_focal import FL, FL_STAR, QFL, alpha_coefficients, kernel_scalars
from .layout import flat

# 64 Ki elements: intermediates of 256 KiB in float32 stay in L2 while the ~20 elementwise ops run over them.
CHUNK = 1 << 16


def compute_dtype(x_dtype):
    return torch.float64 if x_dtype == torch.float64 else torch.float32


def _sigmoid_parts(x):
    """(e, p, q, x >= 0): e = exp(-|x|), p = sigmoid(x), q = sigmoid(-x), without cancellation
    (focal_math.sigmoid_parts)."""
    e = torch.exp(-x.abs())
    r = 1.0 / (1.0 + e)
    er = e * r
    pos = x >= 0
    return e, torch.where(pos, r, er), torch.where(pos, er, r), pos


def _bce(x, target, e, pos):
    """BCE(x, target) with the linear part zeroed where its coefficient is exactly 0 (focal_math.bce_with_logits)."""
    zero = x.new_zeros(())
    lin = torch.where(pos, torch.where(target == 1, zero, (1.0 - target) * x),
                      torch.where(target == 0, zero, -target * x))
    return lin + torch.log1p(e)


def _slope(u, m, p, q, gamma: float):
    """gamma u**(gamma - 1) p q for m = u**gamma, 0 where it is the limit of 0 * inf (focal_math.modulation)."""
    if gamma == 0:
        return torch.zeros_like(u)
    if float(gamma).is_integer():
        return gamma * u.pow(gamma - 1) * p * q
    return gamma * m * torch.where(u > 0, p * q / u, u.new_zeros(()))


def focal_terms(x, t, ts, c0, c1, gamma: float, want_grad: bool):
    """(FL, dFL/dx or None) for chunks already in the compute dtype: t modulates, ts is the BCE target, and
    alpha_t = c0 + c1 t with c0, c1 numbers or tensors broadcasting against x (see kernels/focal_math.py)."""
    e, p, q, pos = _sigmoid_parts(x)
    u = p * (1.0 - t) + q * t
    zero = x.new_zeros(())
    ce = _bce(x, ts, e, pos)
    m = u.pow(gamma)
    alpha_t = c0 + c1 * t if (isinstance(c1, torch.Tensor) or c1 != 0.0) else c0  # no chunk-sized ones
    loss = alpha_t * m * ce
    if not want_grad:
        return loss, None
    g = _slope(u, m, p, q, gamma)
    grad = alpha_t * (m * (p - ts) + torch.where(g == 0, zero, g * (1.0 - 2.0 * t) * ce))
    return loss, grad


def family_terms(x, t, ts, c0, c1, gamma: float, beta: float, kind: int, want_grad: bool):
    """(loss, dloss/dx or None) of the loss kind `kind` with the kernels' scalars (kernel_scalars): the formulas of
    focal_math.family_loss_and_grad. FL is `focal_terms`."""
    if kind == FL:
        return focal_terms(x, t, ts, c0, c1, gamma, want_grad)
    zero = x.new_zeros(())
    if kind == FL_STAR:
        s = 2.0 * t - 1.0
        z = gamma * torch.where((s == 0) & (x == x), zero, x * s) + beta
        alpha_t = c0 + c1 * t
        loss = alpha_t * (torch.where(z >= 0, zero, -z) + torch.log1p(torch.exp(-z.abs()))) / gamma
        return loss, (-alpha_t * s * torch.sigmoid(-z) if want_grad else None)
    e, p, q, pos = _sigmoid_parts(x)
    if kind == QFL:
        d = t * q - (1.0 - t) * p  # y - p without cancellation at y = 0, 1
        ce = _bce(x, t, e, pos)
        u = d.abs()
        m = u.pow(gamma)
        loss = m * ce
        if not want_grad:
            return loss, None
        g = _slope(u, m, p, q, gamma)
        gs = torch.where(d < 0, g, -g)
        return loss, m * (-d) + torch.where((g == 0) | (d == 0), zero, gs * ce)
    # VFL
    positive = t > 0
    target = torch.where(t <= 0, zero, t)  # NaN stays NaN
    ce = _bce(x, target, e, pos)
    m = p.pow(gamma)
    w = c0 + c1 * t
    loss = torch.where(positive, w * ce, beta * m * ce)
    if not want_grad:
        return loss, None
    g = _slope(p, m, p, q, gamma)
    return loss, (torch.where(positive, w, beta * m) * (p - target)
                  + torch.where(positive | (g == 0), zero, beta * g * ce))


def _loss_and_grad(x, t, alpha: float, gamma: float, want_grad: bool, loss_kind: int = FL, beta: float = 0.0,
                   iou_weighted: bool = True):
    """(loss, dloss/dx or None) for 1-D chunks x, t already in the compute dtype."""
    c0, c1, g, _, b, _ = kernel_scalars(loss_kind, alpha, gamma, beta, iou_weighted)
    return family_terms(x, t, t, c0, c1, g, b, loss_kind, want_grad)


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)


@torch.no_grad()
def sigmoid_focal_forward(x, t, alpha: float, gamma: float, reduction: str, out_dtype=None, loss_kind: int = FL,
                          beta: float = 0.0, iou_weighted: bool = True, keep_grad: bool = False):
    """Same contract as `focal_triton.kernels.sigmoid_focal_forward`: dense x, t with equal strides, n > 0; the
    elementwise loss in x's layout for "none", else the 0-d sum / mean in x's dtype. keep_grad: return
    (loss, dloss/dx) (upstream 1; computed in the same pass where the fast path applies)."""
    from . import torch_path_fast

    n = x.numel()
    cdt = compute_dtype(x.dtype)
    out_dtype = out_dtype or x.dtype
    if torch_path_fast.dense_applicable(x, loss_kind):
        fast = torch_path_fast.dense_pass(x, t, alpha, gamma, reduction, out_dtype, True, keep_grad,
                                          factor=1.0 / n if reduction == "mean" else 1.0)
        if fast is not None:
            return fast if keep_grad else fast[0]
    x_flat, t_flat = flat(x), flat(t)
    out = torch.empty_like(x, dtype=out_dtype) if reduction == "none" else None
    out_flat = flat(out) if out is not None else None
    partials = []
    for s, e in _chunks(n):
        loss, _ = _loss_and_grad(x_flat[s:e].to(cdt), t_flat[s:e].to(cdt), alpha, gamma, False, loss_kind, beta,
                                 iou_weighted)
        if out is not None:
            out_flat[s:e] = loss
        else:
            partials.append(loss.sum())
    if out is None:
        total = torch.stack(partials).double().sum()
        if reduction == "mean":
            total = total / n
        out = total.to(out_dtype)
    if keep_grad:
        return out, sigmoid_focal_backward(torch.ones((), dtype=cdt), x, t, alpha, gamma, reduction, loss_kind,
                                           beta, iou_weighted)
    return out


@torch.no_grad()
def sigmoid_focal_backward(grad_out, x, t, alpha: float, gamma: float, reduction: str, loss_kind: int = FL,
                           beta: float = 0.0, iou_weighted: bool = True):
    """Same contract as `focal_triton.kernels.sigmoid_focal_backward`: grad_out is 0-d (a scalar upstream
    gradient, divided by n for "mean") or dense with x's strides; returns dx in x's layout and dtype."""
    from . import torch_path_fast

    n = x.numel()
    cdt = compute_dtype(x.dtype)
    scalar = grad_out.dim() == 0
    if torch_path_fast.dense_applicable(x, loss_kind):
        factor = float(grad_out) / (n if reduction == "mean" else 1) if scalar else 1.0
        fast = torch_path_fast.dense_pass(x, t, alpha, gamma, reduction, None, False, True, factor=factor,
                                          upstream=None if scalar else grad_out)
        if fast is not None:
            return fast[1]
    x_flat, t_flat = flat(x), flat(t)
    grad_in = torch.empty_like(x)
    out_flat = flat(grad_in)
    if scalar:
        g0 = grad_out.to(cdt) / n if reduction == "mean" else grad_out.to(cdt)
    else:
        g_flat = flat(grad_out)
    for s, e in _chunks(n):
        _, dfl = _loss_and_grad(x_flat[s:e].to(cdt), t_flat[s:e].to(cdt), alpha, gamma, True, loss_kind, beta,
                                iou_weighted)
        out_flat[s:e] = (g0 if scalar else g_flat[s:e].to(cdt)) * dfl
    return grad_in
