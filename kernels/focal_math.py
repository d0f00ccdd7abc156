"""Elementwise focal-loss math shared by every kernel of the family (``@triton.jit`` helpers only).

Notation, per element: logit x, target t in [0, 1] (the modulating target), BCE target t_s (t_s = t, or the
label-smoothed t (1 - s) + s / 2 of the class-index kernels),
    e = exp(-|x|)                  (the only exp)
    p = sigmoid(x),  q = 1 - p     (both formed without cancellation)
    u = 1 - p_t = p (1 - t) + q t  (p_t = p t + q (1 - t))
    ce = BCE(x, t_s) = (x >= 0 ? (1 - t_s) x : -t_s x) + log1p(e)   (the only log)
    FL = alpha_t * u**gamma * ce,  alpha_t = c0 + c1 t  (c0 = 1 - alpha, c1 = 2 alpha - 1; c0 = 1, c1 = 0 without alpha)
    dFL/dx = alpha_t * (u**gamma (p - t_s) + gamma u**(gamma - 1) p q (1 - 2 t) ce)

The relatives of FL, chosen by the LOSS_KIND constexpr of `family_loss_and_grad` (one kernel source for all):
    0 FL   as above.
    1 FL*  (Lin et al., appendix A): z = gamma x_t + beta, x_t = x (2t - 1) (fvcore's form, = +-x for t = 1 / 0),
           FL* = alpha_t softplus(-z) / gamma,  dFL*/dx = -alpha_t (2t - 1) sigmoid(-z).
    2 QFL  (Li et al. 2020), t = y the soft score, exponent in gamma (the paper's beta):
           d = y - p = y q - (1 - y) p (no cancellation at y = 0 or 1),  QFL = |d|**gamma BCE(x, y),
           dQFL/dx = |d|**gamma (p - y) + gamma |d|**(gamma - 1) sign(p - y) p q BCE(x, y).
    3 VFL  (Zhang et al. 2021), t = q the IoU-aware score: w = c0 + c1 q (c0 = 0, c1 = 1: weighted by q; c0 = 1,
           c1 = 0: by 1), alpha of the negatives in beta:
           q > 0: VFL = w BCE(x, q), dVFL/dx = w (p - q);   q <= 0: VFL = FL(x, 0) with alpha_t = beta.
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


@triton.jit
def focal_star_loss_and_grad(x, t, c0, c1, gamma, beta):
    """(FL*, dFL*/dx): softplus(-z) = max(-z, 0) + log1p(exp(-|z|)), one exp and one log, finite wherever z is
    finite or +inf. t = 1/2 makes x_t = 0 for every x (the limit, so x = +-inf stays finite); a NaN x stays NaN."""
    s = 2.0 * t - 1.0
    xt = tl.where((s == 0.0) & (x == x), 0.0, x * s)
    z = gamma * xt + beta
    e, _, qz = sigmoid_parts(z)
    alpha_t = c0 + c1 * t
    loss = alpha_t * (tl.where(z >= 0, 0.0, -z) + log1p_small(e)) / gamma
    grad = -alpha_t * s * qz
    return loss, grad


@triton.jit
def quality_focal_loss_and_grad(x, y, beta, beta_int, INT_BETA: tl.constexpr):
    """(QFL, dQFL/dx) with the exponent beta (see the module docstring). |d| goes through `modulation`, whose
    du/dx bound p q / u <= max(p, q) does not hold here: near d = 0 with 0 < beta < 1 the gradient is large, as the
    formula's (it is infinite at d = 0, taken as 0 there, the subgradient of |d|). Saturated logits: the loss is 0
    or inf (its limit), the gradient finite (p q = 0 makes the modulation term 0)."""
    e, p, q = sigmoid_parts(x)
    d = y * q - (1.0 - y) * p
    u = tl.where(d < 0, -d, d)
    ce = bce_with_logits(x, y, e)
    m, g = modulation(u, p, q, beta, beta_int, INT_BETA)
    gs = tl.where(d < 0, g, -g)
    grad = m * (0.0 - d) + tl.where((g == 0.0) | (d == 0.0), 0.0, gs * ce)
    return m * ce, grad


@triton.jit
def varifocal_loss_and_grad(x, t, c0, c1, gamma, gamma_int, alpha_neg, INT_GAMMA: tl.constexpr):
    """(VFL, dVFL/dx), t = q the target score (see the module docstring); the negatives' term is FL's at t = 0."""
    e, p, q = sigmoid_parts(x)
    pos = t > 0
    ts = tl.where(t <= 0, 0.0, t)  # the BCE target: q for positives, 0 for negatives, NaN stays NaN
    ce = bce_with_logits(x, ts, e)
    m, g = modulation(p, p, q, gamma, gamma_int, INT_GAMMA)
    w = c0 + c1 * t
    loss = tl.where(pos, w * ce, alpha_neg * m * ce)
    grad = tl.where(pos, w, alpha_neg * m) * (p - ts) + tl.where(pos | (g == 0.0), 0.0, alpha_neg * g * ce)
    return loss, grad


@triton.jit
def family_loss_and_grad(x, t, ts, c0, c1, gamma, gamma_int, beta, LOSS_KIND: tl.constexpr,
                         INT_GAMMA: tl.constexpr):
    """(loss, dloss/dx) of the loss kind LOSS_KIND (0 FL, 1 FL*, 2 QFL, 3 VFL; see the module docstring), chosen at
    compile time: each specialization holds the code of one kind only, and FL's is `focal_loss_and_grad` as is."""
    if LOSS_KIND == 0:
        loss, grad = focal_loss_and_grad(x, t, ts, c0, c1, gamma, gamma_int, INT_GAMMA)
    elif LOSS_KIND == 1:
        loss, grad = focal_star_loss_and_grad(x, t, c0, c1, gamma, beta)
    elif LOSS_KIND == 2:
        loss, grad = quality_focal_loss_and_grad(x, t, gamma, gamma_int, INT_GAMMA)
    else:
        loss, grad = varifocal_loss_and_grad(x, t, c0, c1, gamma, gamma_int, beta, INT_GAMMA)
    return loss, grad
