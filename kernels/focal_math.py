"""Elementwise focal-loss math shared by every kernel of the family (``@triton.jit`` helpers only).

Notation, per element: logit x, target t in [0, 1] (the modulating target), BCE target t_s (t_s = t, or the
label-smoothed t (1 - s) + s / 2 of the class-index kernels),
    e = exp(-|x|)                  (the only exp)
    p = sigmoid(x),  q = 1 - p     (both formed without cancellation)
    u = 1 - p_t = p (1 - t) + q t  (p_t = p t + q (1 - t))
    ce = BCE(x, t_s) = (x >= 0 ? (1 - t_s) x : -t_s x) + log1p(e)   (the only log)
    FL = alpha_t * u**gamma * ce,  alpha_t = c0 + c1 t  (c0 = 1 - alpha, c1 = 2 alpha - 1; c0 = 1, c1 = 0 without alpha)
    dFL/dx = alpha_t * (u**gamma (p - t_s) + gamma u**(gamma - 1) p q (1 - 2 t) ce)
"""
import triton
import triton.language as tl


@triton.jit
def log1p_small(e):
    """log(1 + e) for e in [0, 1], accurate where e << 1 (Goldberg: log(w) * e / (w - 1), w = 1 + e).

    One log; libdevice.log1p is not available to the Triton interpreter.
    """
    w = 1.0 + e
    return tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))


@triton.jit
def sigmoid_parts(x):
    """(e, p, q) with e = exp(-|x|), p = sigmoid(x), q = sigmoid(-x); exact at x = +-inf, NaN stays NaN."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    er = e * r
    pos = x >= 0
    return e, tl.where(pos, r, er), tl.where(pos, er, r)


@triton.jit
def bce_with_logits(x, t, e):
    """BCE(x, t) = t softplus(-x) + (1 - t) softplus(x).

    The linear part is zeroed where its coefficient is exactly 0, so x = +inf with t = 1 (and -inf with t = 0) give
    0 instead of inf * 0 = NaN; a NaN logit still gives NaN through log1p(e).
    """
    lin = tl.where(x >= 0, tl.where(t == 1.0, 0.0, (1.0 - t) * x), tl.where(t == 0.0, 0.0, -t * x))
    return lin + log1p_small(e)


@triton.jit
def modulation(u, p, q, gamma, gamma_int, INT_GAMMA: tl.constexpr):
    """(m, g) = (u**gamma, gamma u**(gamma - 1) p q) for u = 1 - p_t in [0, 1]; g is dm/dx up to the sign (1 - 2t).

    INT_GAMMA (gamma == gamma_int >= 0): powers by repeated multiplication, no transcendental; g is finite for
    every gamma and 0 for gamma = 0. Otherwise gamma > 0 is fractional: m = exp2(gamma log2 u), the one pow, 0 at
    u = 0; g = gamma m (p q / u) with p q / u <= max(p, q) <= 1 (u is a convex combination of p and q), taken as 0 at
    u = 0, which is its limit times m. This avoids the u**(gamma - 1) = inf at u = 0 that makes autograd versions
    NaN for 0 < gamma < 1.
    """
    if INT_GAMMA:
        um1 = tl.full(u.shape, 1.0, u.dtype)
        k = 1
        while k < gamma_int:  # (while, not range: triton 3.6's interpreter cannot take a tensor bound)
            um1 = um1 * u
            k += 1
        m = tl.where(gamma_int > 0, um1 * u, 1.0)
        g = gamma_int * um1 * p * q
    else:
        m = tl.exp2(gamma * tl.log2(u))
        g = gamma * m * tl.where(u > 0, p * q / u, 0.0)
    return m, g


@triton.jit
def focal_loss_and_grad(x, t, ts, c0, c1, gamma, gamma_int, INT_GAMMA: tl.constexpr):
    """(FL, dFL/dx) per element, in the dtype of x (float32 or float64). See the module docstring for the formulas:
    t modulates (u, alpha_t), ts is the BCE target (pass t itself when there is no label smoothing).

    Unused outputs cost nothing: the compiler drops the gradient in the forward kernel and keeps only what it needs.
    At saturation p q = 0 and ce may be inf (x = +inf, t = 0): the product g (1 - 2t) ce tends to 0 there and is
    taken as 0, so the gradient stays finite; NaN inputs make g NaN and still propagate.
    """
    e, p, q = sigmoid_parts(x)
    u = p * (1.0 - t) + q * t
    ce = bce_with_logits(x, ts, e)
    m, g = modulation(u, p, q, gamma, gamma_int, INT_GAMMA)
    alpha_t = c0 + c1 * t
    loss = alpha_t * m * ce
    grad = alpha_t * (m * (p - ts) + tl.where(g == 0.0, 0.0, g * (1.0 - 2.0 * t) * ce))
    return loss, grad
