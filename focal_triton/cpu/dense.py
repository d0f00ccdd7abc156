"""The CPU path of the dense loss (`sigmoid_focal_loss` and its relatives): the kernels' contract in pure torch.

Operands are dense with equal strides (the op layer sees to it) and read as one flat range in storage order.

- FL on 16/32-bit logits, every reduction: the negatives' pass (`cpu.math`): every element taken as a negative
  (t = 0) in chunks, then the elements whose target is not 0 (positives, soft targets, NaN) recomputed by the
  general formula, by index; dense detector targets are almost all 0. A chunk whose negatives are not finite sends
  the call to the general form.
- Everything else: the general form over chunks of GENERAL_CHUNK elements.

Sums are added in a fixed order (chunks, then the fix-ups) in float64: repeatable, accurate to float32 rounding.
"""
import torch

from ..losses import FL, compute_dtype, flat
from . import math, native


def keeps_gradient(x, spec) -> bool:
    """Whether a forward whose logits need a gradient computes it in its own pass (float32 FL)."""
    return _fast(x, spec) and x.dtype == torch.float32


def _fast(x, spec) -> bool:
    return spec.kind == FL and x.dtype in math.FAST_DTYPES


@torch.no_grad()
def _negatives_pass(x, t, spec, reduction, out_dtype, want_loss, want_grad, factor=1.0, upstream=None):
    """(loss or None, gradient or None) of FL by the negatives' pass, or None when a negative's logit is not
    finite (the caller takes the general form).

    loss (want_loss): "none" the elementwise loss in x's layout, else the 0-d sum / mean, in out_dtype.
    gradient (want_grad), in x's layout and dtype: factor * dloss/dx (factor: the upstream scalar, times 1 / n for
    "mean"), times the elementwise upstream gradient `upstream` (x's layout) where given."""
    n = x.numel()
    c0, c1 = spec.c0, spec.c1
    gamma = spec.gamma
    elementwise = want_loss and reduction == "none"
    # The compiled pass: sums and a scalar-factor gradient (an elementwise loss or upstream: the torch form).
    compiled = native.available(x.dtype) and not elementwise and upstream is None
    size = native.CHUNK if compiled else math.FAST_CHUNK
    chunks = [(start, min(start + size, n), 0) for start in range(0, n, size)]
    fx, ft = flat(x), flat(t)
    special = math.Offsets(ft.nonzero().squeeze(1), chunks)
    loss = torch.empty_like(x, dtype=out_dtype) if elementwise else None
    grad = torch.empty_like(x) if want_grad else None
    fl = flat(loss) if elementwise else None
    fg = flat(grad) if want_grad else None
    fu = flat(upstream) if upstream is not None else None

    def chunk_pass(task, buf):
        i, (start, end, _) = task
        xb, m, e, p, q, s = buf.take(end - start)
        xb = math.load(fx[start:end], xb)
        math.negative_parts(xb, p, q if want_grad else None, s, 0.0)
        sp = special.in_chunk(i, start)
        if sp is not None:                              # fixed up below, whatever their logits
            s.index_fill_(0, sp, 0.0)
            p.index_fill_(0, sp, 0.0)
        m = math.power(m, p, gamma)
        if want_loss:
            loss_chunk = math.negative_loss(e, s, m)
            if elementwise:
                torch.mul(loss_chunk, c0, out=fl[start:end])
            check = loss_chunk.sum()
        else:
            check = s.sum()
        if want_grad:
            if fu is None:
                math.negative_grad(p, q, s, m, fg[start:end], c0 * factor, gamma, 0.0)
            else:  # times the upstream gradient in float32, then rounded once to x's dtype (e is free here)
                math.negative_grad(p, q, s, m, e, c0 * factor, gamma, 0.0)
                fg[start:end] = e.mul_(fu[start:end])
        return check

    if compiled:
        sums = native.negatives([(fx, fg, start, end, (special.offsets,) + special.bounds(i), c0 * factor)
                                 for i, (start, end, _) in enumerate(chunks)], x.dtype, gamma, 0.0)
    else:
        sums = torch.stack(math.run_chunks(chunk_pass, list(enumerate(chunks)))).double()
    if not bool(torch.isfinite(sums).all()):
        return None
    idx = special.offsets
    xs, ts = fx[idx].float(), ft[idx].float()
    ls, gs = math.focal_terms(xs, ts, ts, c0, c1, gamma, want_grad)
    if want_grad:
        gs = gs * factor
        fg[idx] = (gs * fu[idx] if fu is not None else gs).to(fg.dtype)
    if not want_loss:
        return None, grad
    if elementwise:
        fl[idx] = ls.to(fl.dtype)
        return loss, grad
    total = sums.sum() * c0 + ls.double().sum()
    return (total / n if reduction == "mean" else total).to(out_dtype), grad


@torch.no_grad()
def forward(x, t, spec, reduction: str, out_dtype=None, keep_grad: bool = False):
    """Loss of dense x, t (equal strides, n > 0): elementwise in x's layout for "none", else the 0-d sum / mean, in
    out_dtype (x's dtype by default). keep_grad: return (loss, dloss/dx) (upstream 1, computed in the same pass
    where the negatives' pass applies)."""
    n = x.numel()
    cdt = compute_dtype(x.dtype)
    out_dtype = out_dtype or x.dtype
    if _fast(x, spec):
        fast = _negatives_pass(x, t, spec, reduction, out_dtype, True, keep_grad,
                               factor=1.0 / n if reduction == "mean" else 1.0)
        if fast is not None:
            return fast if keep_grad else fast[0]
    x_flat, t_flat = flat(x), flat(t)
    out = torch.empty_like(x, dtype=out_dtype) if reduction == "none" else None
    out_flat = flat(out) if out is not None else None
    partials = []
    for s, e in math.general_chunks(n):
        tc = t_flat[s:e].to(cdt)
        loss, _ = math.terms(x_flat[s:e].to(cdt), tc, tc, spec, spec.c0, spec.c1, False)
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
        return out, backward(torch.ones((), dtype=cdt), x, t, spec, reduction)
    return out


@torch.no_grad()
def backward(grad_out, x, t, spec, reduction: str):
    """dx in x's layout and dtype. grad_out: 0-d (the upstream scalar of mean / sum, or an expanded scalar of
    "none", passed as its one element) or dense with x's strides."""
    n = x.numel()
    cdt = compute_dtype(x.dtype)
    scalar = grad_out.dim() == 0
    if _fast(x, spec):
        factor = float(grad_out) / (n if reduction == "mean" else 1) if scalar else 1.0
        fast = _negatives_pass(x, t, spec, reduction, None, False, True, factor=factor,
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
    for s, e in math.general_chunks(n):
        tc = t_flat[s:e].to(cdt)
        _, dfl = math.terms(x_flat[s:e].to(cdt), tc, tc, spec, spec.c0, spec.c1, True)
        out_flat[s:e] = (g0 if scalar else g_flat[s:e].to(cdt)) * dfl
    return grad_in
