"""Elementwise focal-loss math shared by every kernel of the family (``@triton.jit`` helpers only).

Notation, per element: logit x, a = |x|, target t in [0, 1] (the modulating target), BCE target t_s (t_s = t, or the
label-smoothed t (1 - s) + s / 2 of the class-index kernels),
    e = exp(-a)                    (the only exp)
    r = sigmoid(a) = 1 / (1 + e),  er = sigmoid(-a) = e r,  p = sigmoid(x), q = 1 - p  (selects of r and er)
    L = log(1 + e)                 (softplus(-a); BCE is L plus a linear part)
    u = 1 - p_t = p (1 - t) + q t  (p_t = p t + q (1 - t))
    ce = BCE(x, t_s) = (x >= 0 ? (1 - t_s) x : -t_s x) + L
    FL = alpha_t * u**gamma * ce,  alpha_t = c0 (1 - t) + c1 t  (c0 = 1 - alpha, c1 = alpha; both 1 without alpha)
    dFL/dx = alpha_t * (u**gamma (p - t_s) + gamma u**(gamma - 1) p q (1 - 2 t) ce)

Hard targets (t in {0, 1}, the class-index kernels' FL: `focal_binary_loss_and_grad`) take the form of the logit seen
from the wrong side, z = t ? -x : x: u = sigmoid(z), 1 - u = sigmoid(-z), ce = softplus(z) - (s / 2) z, and
    FL = alpha_t u**gamma ce,   dFL/dz = alpha_t u**gamma (gamma (1 - u) ce + u - s / 2),   dz/dx = t ? -1 : 1,
the same for every gamma > 0 (no u**(gamma - 1), no division), with u**gamma = exp2(-gamma log2(e) softplus(-z))
for fractional gamma (softplus(-z) = log(1 / u) is L plus a select: no log).

The relatives of FL, chosen by the LOSS_KIND constexpr of `family_loss_and_grad` (one kernel source for all):
    0 FL   as above.
    1 FL*  (Lin et al., appendix A): z = gamma x_t + beta, x_t = x (2t - 1) (fvcore's form, = +-x for t = 1 / 0),
           FL* = alpha_t softplus(-z) / gamma,  dFL*/dx = -alpha_t (2t - 1) sigmoid(-z).
    2 QFL  (Li et al. 2020), t = y the soft score, exponent in gamma (the paper's beta):
           d = y - p = y q - (1 - y) p (no cancellation at y = 0 or 1),  QFL = |d|**gamma BCE(x, y),
           dQFL/dx = |d|**gamma (p - y) + gamma |d|**(gamma - 1) sign(p - y) p q BCE(x, y).
    3 VFL  (Zhang et al. 2021), t = q the IoU-aware score: w = c0 (1 - q) + c1 q (c0 = 0, c1 = 1: weighted by q;
           c0 = c1 = 1: by 1), alpha of the negatives in beta:
           q > 0: VFL = w BCE(x, q), dVFL/dx = w (p - q);   q <= 0: VFL = FL(x, 0) with alpha_t = beta.

The class-index kinds of the DETR and YOLO detectors (`detr_loss_and_grad`; hit: the element is on the anchor's
label's class, s: the anchor's score there after its per-row transform `row_target`; alpha_neg = beta, 1 for IA_BCE):
    4 BCE        w BCE(x, hit ? s : 0), w = c0 (the class weight),  d/dx = w (p - t).
    5 VFL_RTDETR hit: s BCE(x, s) (weight c0 (1 - s) + c1 s with c0 = 0, c1 = 1);  else alpha_neg p**gamma BCE(x, 0)
                 with p**gamma detached: d/dx = alpha_neg p**gamma p.
    6            the same with p**gamma's derivative: + alpha_neg gamma p**gamma q BCE(x, 0).
    7 MAL        as 5 with the positives' target s = score**gamma and weight 1 (c0 = c1 = 1).
    8 IA_BCE     hit: BCE(x, t_ia), t_ia = max(p**alpha s, 0.01) (s = score**(1 - alpha), alpha in beta; t_ia
                 detached);  else p**gamma BCE(x, 0) with its derivative (alpha_neg = 1).

Compile-time switches: GAMMA >= 0 is an integer gamma (powers by repeated multiplication, unrolled), GAMMA < 0 the
runtime `gamma` (fractional: one exp2). FAST (float32 compute, `fast_math`) selects the short forms below; float64
compute (gradcheck, FAST = 0) keeps libdevice's exp and log and IEEE division.
    e = exp2(-a log2(e))            one MUFU.EX2 (Triton's exp adds a denormal fix-up around it)
    r = 1 / (1 + e)                 FAST = 2 (compiled for a GPU): rcp.approx.ftz.f32 (one MUFU.RCP; 1 + e is in
                                    [1, 2], where Triton's `1 / w`, div.full, would add range checks); FAST = 1
                                    (Triton's interpreter, which cannot run PTX): the division, which numpy computes
                                    exactly. The one line the two run differently: no Triton builtin emits rcp.approx.
    L = er P(e)                     P a degree-7 minimax polynomial of log(1 + e) (1 + e) / e on [0, 1] (relative
                                    error 5e-8), 7 FMAs: Triton's float32 log is a ~24-instruction polynomial too,
                                    and lg2.approx (MUFU.LG2) has an absolute error near 1 that log1p cannot take.
                                    SHORT (a backward whose gradient is rounded to 16 bits): degree 4 (1.1e-5, 1/40
                                    of fp16's half-ulp); degree 3 (9.4e-5, 1/21 of bf16's) for bf16 hard-target FL
                                    (`short_log`).
"""
import torch
import triton
import triton.language as tl

from ..losses import LossKind, compute_dtype
from .launch import interpreter_enabled

_LOG2E = tl.constexpr(1.4426950408889634)
# Largest float32: caps a cross-entropy that only a vanishing factor multiplies (0 * inf = NaN otherwise).
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
# P(e) ~ log(1 + e) (1 + e) / e on [0, 1], coefficients of e**0 .. e**7 (float32; Lawson-iterated least squares,
# relative error 5e-8), a degree-4 one (_Q, relative error 1.1e-5) for gradients rounded to 16 bits (1/40 of fp16's
# half-ulp) and a degree-3 one (_R, relative error 9.4e-5) for bf16 gradients of the hard-target FL (1/21 of bf16's
# half-ulp; `short_log`).
_P0 = tl.constexpr(1.0)
_P1 = tl.constexpr(0.499996542930603)
_P2 = tl.constexpr(-0.1665850430727005)
_P3 = tl.constexpr(0.08259351551532745)
_P4 = tl.constexpr(-0.04662107303738594)
_P5 = tl.constexpr(0.02446727082133293)
_P6 = tl.constexpr(-0.009295516647398472)
_P7 = tl.constexpr(0.0017386733088642359)
_Q0 = tl.constexpr(1.0000109672546387)
_Q1 = tl.constexpr(0.4993461072444916)
_Q2 = tl.constexpr(-0.16046540439128876)
_Q3 = tl.constexpr(0.061771102249622345)
_Q4 = tl.constexpr(-0.014383568428456783)
_R0 = tl.constexpr(1.000093936920166)
_R1 = tl.constexpr(0.4962979257106781)
_R2 = tl.constexpr(-0.14396974444389343)
_R3 = tl.constexpr(0.03400242328643799)


@triton.jit
def logistic_of_abs(a, FAST: tl.constexpr):
    """(e, r, er) = (exp(-a), sigmoid(a), sigmoid(-a)) for a = |x| >= 0 (or NaN)."""
    if FAST:
        e = tl.exp2(a * -_LOG2E)
        if FAST == 2:
            r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32,
                                          is_pure=True, pack=1)
        else:
            r = 1.0 / (1.0 + e)
    else:
        e = tl.exp(-a)
        r = 1.0 / (1.0 + e)
    return e, r, e * r


@triton.jit
def logistic_parts(x, FAST: tl.constexpr):
    """(a, e, r, er) = (|x|, exp(-|x|), sigmoid(|x|), sigmoid(-|x|)): p = x >= 0 ? r : er, q = x >= 0 ? er : r,
    both without cancellation; exact at x = +-inf, NaN stays NaN."""
    a = tl.abs(x)
    e, r, er = logistic_of_abs(a, FAST)
    return a, e, r, er


@triton.jit
def log1p_exp(e, r, er, FAST: tl.constexpr, SHORT: tl.constexpr = False):
    """L = log(1 + e) for e = exp(-|x|) in [0, 1] (r = 1 / (1 + e), er = e r), relatively accurate down to e -> 0.

    FAST: er P(e) (see the module docstring; SHORT: the short P for results rounded to 16 bits, SHORT = 2 the
    degree-3 one of bf16, else degree 4). Otherwise
    log(w) + (e - (w - 1)) r with w = 1 + e: the rounding of w corrected to first order, with the caller's r (no
    division of its own)."""
    if FAST:
        if SHORT == 2:
            p = _R3 * e + _R2
            p = p * e + _R1
            p = p * e + _R0
        elif SHORT:
            p = _Q4 * e + _Q3
            p = p * e + _Q2
            p = p * e + _Q1
            p = p * e + _Q0
        else:
            p = _P7 * e + _P6
            p = p * e + _P5
            p = p * e + _P4
            p = p * e + _P3
            p = p * e + _P2
            p = p * e + _P1
            p = p * e + _P0
        return er * p
    w = 1.0 + e
    return tl.log(w) + (e - (w - 1.0)) * r


@triton.jit
def bce_with_logits(x, ts, a, L):
    """BCE(x, t_s) = L + a t_o, t_o = the weight of the logit's own side (1 - t_s for x >= 0, t_s otherwise).

    The linear part is zeroed where its weight is exactly 0, so x = +inf with t_s = 1 (and -inf with t_s = 0) give 0
    instead of inf * 0 = NaN; a NaN logit still gives NaN through L."""
    t_own = tl.where(x >= 0, 1.0 - ts, ts)
    return tl.where(t_own == 0.0, L, L + t_own * a)


@triton.jit
def log2_for_power(u, GAMMA: tl.constexpr):
    """log2(u) where `modulation` needs it (fractional gamma), else u unchanged (nothing is computed)."""
    if GAMMA < 0:
        lu = tl.log2(u)
    else:
        lu = u
    return lu


@triton.jit
def modulation(u, log2_u, pq, gamma, GAMMA: tl.constexpr):
    """(m, g) = (u**gamma, gamma u**(gamma - 1) p q) for u in [0, 1]; g is dm/dx up to the sign of du/dx.

    GAMMA >= 0 (an integer gamma): powers by repeated multiplication, unrolled at compile time; g is finite for every
    gamma and 0 for gamma = 0. GAMMA < 0: gamma > 0 is the runtime `gamma`, m = exp2(gamma log2_u) (log2_u =
    log2(u), computed by the caller: only this path uses it), 0 at u = 0; g = gamma m (p q / u) with p q / u <=
    max(p, q) <= 1 (u is a convex combination of p and q), taken as 0 at u = 0, which is its limit times m. This avoids
    the u**(gamma - 1) = inf at u = 0 that makes autograd versions NaN for 0 < gamma < 1."""
    if GAMMA == 0:
        m = tl.full(u.shape, 1.0, u.dtype)
        g = tl.zeros(u.shape, u.dtype)
    elif GAMMA > 0:
        um1 = tl.full(u.shape, 1.0, u.dtype)
        for _ in tl.static_range(GAMMA - 1):
            um1 = um1 * u
        m = um1 * u
        g = GAMMA * um1 * pq
    else:
        m = tl.exp2(gamma * log2_u)
        g = gamma * m * tl.where(u > 0, pq / u, 0.0)
    return m, g


@triton.jit
def focal_loss_and_grad(x, t, ts, c0, c1, gamma, GAMMA: tl.constexpr, FAST: tl.constexpr,
                        SHORT: tl.constexpr = False, UNWEIGHTED: tl.constexpr = False):
    """(FL, dFL/dx) per element for any target t in [0, 1], in the dtype of x (float32 or float64). See the module
    docstring for the formulas: t modulates (u, alpha_t), ts is the BCE target (pass t itself without smoothing).

    Unused outputs cost nothing: the compiler drops the gradient in the forward kernel and keeps only what it needs.
    At saturation p q = 0 and ce may be inf (x = +inf, t = 0): the product g (1 - 2t) ce tends to 0 there and is
    taken as 0 (the gradient's ce is L + ts_own min(|x|, float32 max), at most the float32 maximum, which only a
    vanishing g multiplies), so the gradient stays finite; NaN inputs make L NaN and still propagate. SHORT: L to the
    accuracy of a 16-bit result (log1p_exp), for a caller that keeps only the gradient, rounded to bf16 / fp16.
    UNWEIGHTED: the loss without alpha_t (u**gamma ce), for a caller that weights sums of it; the gradient keeps it.

    Integer gamma > 0: dFL/dx = sign(x) alpha_t u**(gamma - 1) (u (ts_own - e r) + gamma (2 t_own - 1) p q ce),
    the sign of x taken out of p - ts and 1 - 2t at once (one select) and gamma (2 t_own - 1) one FMA."""
    a, e, r, er = logistic_parts(x, FAST)
    L = log1p_exp(e, r, er, FAST, SHORT)
    pos = x >= 0
    # The weights of the logit's own side (1 - t for x >= 0, t otherwise): u = er + t_own (r - er) is a sum of two
    # non-negative terms, and p - ts = sign(x) (ts_own - er), 1 - 2t = sign(x) (2 t_own - 1) carry no cancellation
    # where p and ts are both near 1 (r - 1 would lose the bits of er).
    t_own = tl.where(pos, 1.0 - t, t)
    ts_own = tl.where(pos, 1.0 - ts, ts)
    u = er + t_own * (r - er)
    ce = tl.where(ts_own == 0.0, L, L + ts_own * a)
    # The gradient's ce, capped: L + ts_own min(a, float32 max) is ce wherever ce is finite (no 0 * inf at
    # ts_own = 0), at most the float32 maximum elsewhere, where only p q = 0 multiplies it.
    ce_capped = L + ts_own * tl.minimum(a, _FLOAT32_MAX)
    m, g = modulation(u, log2_for_power(u, GAMMA), r * er, gamma, GAMMA)
    if FAST:
        alpha_t = c0 * (1.0 - t) + c1 * t  # exact at t = 0 and 1 (losses.LossSpec)
    else:
        # float64: c1 - c0 of the two float32 scalars is exact, so is c0 + (c1 - c0) at t = 1 (one FMA, and the
        # register budget of the float64 backward on sm_80 holds without a spill)
        alpha_t = c0 + (tl.full([], c1, x.dtype) - tl.full([], c0, x.dtype)) * t
    if UNWEIGHTED:
        loss = m * ce
    else:
        loss = alpha_t * m * ce
    signed_alpha = tl.where(pos, alpha_t, -alpha_t)
    if GAMMA > 0:
        um1 = tl.full(u.shape, 1.0, u.dtype)
        for _ in tl.static_range(GAMMA - 1):
            um1 = um1 * u
        inner = u * (ts_own - er) + (r * er) * (t_own * (2.0 * GAMMA) - GAMMA) * ce_capped
        grad = signed_alpha * (um1 * inner)
    else:
        grad = signed_alpha * (m * (ts_own - er) + g * (2.0 * t_own - 1.0) * ce_capped)
    return loss, grad


@triton.jit
def focal_binary_loss_and_grad(a, nonneg, hit, loss_c0, loss_c1, grad_c0, grad_c1, gamma, half_smoothing,
                               GAMMA: tl.constexpr, SMOOTH: tl.constexpr, FAST: tl.constexpr,
                               SHORT: tl.constexpr = False):
    """(loss_c * FL, grad_c * dFL/dx) of the logit x given as a = |x| and nonneg = (x >= 0; for NaN either), for a
    hard target t = hit (a boolean tensor) and the BCE target
    t (1 - s) + s / 2 (SMOOTH; half_smoothing = s / 2), with the per-side factors loss_c = hit ? loss_c1 : loss_c0
    and grad_c = hit ? grad_c1 : grad_c0 (alpha_t, times the upstream gradient, and for grad_c1 the sign dz/dx = -1:
    the caller folds them so that each costs one select). FL and dFL/dz as in the module docstring. SHORT: L to the
    accuracy of a 16-bit result (log1p_exp), for a caller that keeps only the gradient, rounded to bf16 / fp16.

    Limits: x = +inf on its own class (u = 0, ce = 0) gives 0 and 0; on the other side (u = 1, ce = inf) inf and a
    finite gradient (1 - u = 0 times a capped ce); a NaN logit gives NaN (every term carries it)."""
    e, r, er = logistic_of_abs(a, FAST)
    L = log1p_exp(e, r, er, FAST, SHORT)
    hard = nonneg != hit  # z >= 0: the logit lies on the wrong side of its target
    u = tl.where(hard, r, er)
    v = tl.where(hard, er, r)  # 1 - u
    if SMOOTH:
        ce = L + a * tl.where(hard, 1.0 - half_smoothing, half_smoothing)
        slope = u - half_smoothing  # dce/dz
    else:
        ce = L + tl.where(hard, a, 0.0)
        slope = u
    if GAMMA == 0:
        m = tl.full(u.shape, 1.0, u.dtype)
    elif GAMMA > 0:
        m = u
        for _ in tl.static_range(GAMMA - 1):
            m = m * u
    else:
        m = tl.exp2((L + tl.where(hard, 0.0, a)) * (gamma * -_LOG2E))  # u**gamma = exp(-gamma softplus(-z))
    if GAMMA == 0:
        dz = slope
    elif GAMMA > 0:
        dz = m * (GAMMA * v * tl.minimum(ce, _FLOAT32_MAX) + slope)
    else:
        dz = m * (gamma * v * tl.minimum(ce, _FLOAT32_MAX) + slope)
    loss = tl.where(hit, loss_c1, loss_c0) * m * ce
    grad = tl.where(hit, grad_c1, grad_c0) * dz
    return loss, grad


@triton.jit
def focal_star_loss_and_grad(x, t, c0, c1, gamma, beta, FAST: tl.constexpr):
    """(FL*, dFL*/dx): softplus(-z) = max(-z, 0) + log(1 + exp(-|z|)), one exp and one log, finite wherever z is
    finite or +inf. t = 1/2 makes x_t = 0 for every x (the limit, so x = +-inf stays finite); a NaN x stays NaN."""
    s = 2.0 * t - 1.0
    xt = tl.where((s == 0.0) & (x == x), 0.0, x * s)
    z = gamma * xt + beta
    _, e, r, er = logistic_parts(z, FAST)
    qz = tl.where(z >= 0, er, r)
    alpha_t = c0 * (1.0 - t) + c1 * t  # exact at t = 0 and 1 (losses.LossSpec)
    loss = alpha_t * (tl.where(z >= 0, 0.0, -z) + log1p_exp(e, r, er, FAST)) / gamma
    grad = -alpha_t * s * qz
    return loss, grad


@triton.jit
def quality_focal_loss_and_grad(x, y, beta, BETA: tl.constexpr, FAST: tl.constexpr):
    """(QFL, dQFL/dx) with the exponent beta (BETA: its integer value or < 0, as GAMMA; see the module docstring).
    |d| goes through `modulation`, whose du/dx bound p q / u <= max(p, q) does not hold here: near d = 0 with
    0 < beta < 1 the gradient is large, as the formula's (it is infinite at d = 0, taken as 0 there, the subgradient
    of |d|). Saturated logits: the loss is 0 or inf (its limit), the gradient finite (p q = 0 makes the modulation
    term 0)."""
    a, e, r, er = logistic_parts(x, FAST)
    pos = x >= 0
    p = tl.where(pos, r, er)
    q = tl.where(pos, er, r)
    d = y * q - (1.0 - y) * p
    u = tl.where(d < 0, -d, d)
    ce = bce_with_logits(x, y, a, log1p_exp(e, r, er, FAST))
    m, g = modulation(u, log2_for_power(u, BETA), r * er, beta, BETA)
    gs = tl.where(d < 0, g, -g)
    grad = m * (0.0 - d) + tl.where((g == 0.0) | (d == 0.0), 0.0, gs * ce)
    return m * ce, grad


@triton.jit
def varifocal_loss_and_grad(x, t, c0, c1, gamma, alpha_neg, GAMMA: tl.constexpr, FAST: tl.constexpr):
    """(VFL, dVFL/dx), t = q the target score (see the module docstring); the negatives' term is FL's at t = 0,
    whose u = p has log2(p) = -log2(e) softplus(-x), a select and no log."""
    a, e, r, er = logistic_parts(x, FAST)
    L = log1p_exp(e, r, er, FAST)
    pos = t > 0
    xpos = x >= 0
    p = tl.where(xpos, r, er)
    ts = tl.where(t <= 0, 0.0, t)  # the BCE target: q for positives, 0 for negatives, NaN stays NaN
    ce = bce_with_logits(x, ts, a, L)
    m, g = modulation(p, (L + tl.where(xpos, 0.0, a)) * -_LOG2E, r * er, gamma, GAMMA)
    w = c0 + (c1 - c0) * t  # c0 (1 - t) + c1 t, exact for VFL's two encodings (0, 1) and (1, 1)
    loss = tl.where(pos, w * ce, alpha_neg * m * ce)
    grad = tl.where(pos, w, alpha_neg * m) * (p - ts) + tl.where(pos | (g == 0.0), 0.0, alpha_neg * g * ce)
    return loss, grad


@triton.jit
def row_target(score, gamma, beta, LOSS_KIND: tl.constexpr, GAMMA: tl.constexpr):
    """The per-anchor part of the target on the label's class, once per row: MAL score**gamma (gamma > 0, 0 at
    score 0), IA_BCE score**(1 - alpha) (alpha = beta in [0, 1]; 1 at alpha = 1, as torch's 0**0), else the score."""
    if LOSS_KIND == 7:
        m, _ = modulation(score, log2_for_power(score, GAMMA), score, gamma, GAMMA)
        return m
    elif LOSS_KIND == 8:
        return tl.where(beta == 1.0, 1.0, tl.exp2((1.0 - beta) * tl.log2(score)))
    else:
        return score


@triton.jit
def detr_loss_and_grad(x, hit, s, c0, c1, gamma, beta, LOSS_KIND: tl.constexpr, GAMMA: tl.constexpr,
                       FAST: tl.constexpr):
    """(loss, dloss/dx) of the class-index kinds 4 .. 8 (module docstring): hit a boolean tensor, s the row's
    `row_target` broadcast against x, c0 / c1 the positives' weight (BCE: the class weight c0). The negatives'
    p**gamma has log2(p) = -log2(e) softplus(-x), a select and no log; saturated logits give the formulas' limits
    (0, or inf for a negative at x = +inf) with finite gradients; a NaN logit gives NaN."""
    a, e, r, er = logistic_parts(x, FAST)
    L = log1p_exp(e, r, er, FAST)
    xpos = x >= 0
    p = tl.where(xpos, r, er)
    if LOSS_KIND == 4:
        t = tl.where(hit, s, 0.0)
        loss = c0 * bce_with_logits(x, t, a, L)
        grad = c0 * (p - t)
    else:
        log2_p = (L + tl.where(xpos, 0.0, a)) * -_LOG2E
        m, g = modulation(p, log2_p, r * er, gamma, GAMMA)
        if LOSS_KIND == 8:
            # p**alpha, with log2(p) = -inf at x = -inf taken to the largest finite value (0**0 = 1 at alpha = 0)
            # (0.01 in the compute dtype: a Python float is float32 in the interpreter)
            floor = tl.full([], 0.01, x.dtype)
            t = tl.where(hit, tl.maximum(tl.exp2(beta * tl.maximum(log2_p, -_FLOAT32_MAX)) * s, floor), 0.0)
            alpha_neg = 1.0
        else:
            t = tl.where(hit, s, 0.0)
            alpha_neg = beta
        ce = bce_with_logits(x, t, a, L)
        w = c0 + (c1 - c0) * t  # c0 (1 - t) + c1 t, exact for the encodings (0, 1) and (1, 1)
        loss = tl.where(hit, w * ce, alpha_neg * m * ce)
        grad = tl.where(hit, w, alpha_neg * m) * (p - t)
        if (LOSS_KIND == 6) or (LOSS_KIND == 8):
            grad += tl.where(hit | (g == 0.0), 0.0, alpha_neg * g * ce)
    return loss, grad


@triton.jit
def family_loss_and_grad(x, t, ts, c0, c1, gamma, beta, LOSS_KIND: tl.constexpr, GAMMA: tl.constexpr,
                         FAST: tl.constexpr, SHORT: tl.constexpr = False, UNWEIGHTED: tl.constexpr = False):
    """(loss, dloss/dx) of the loss kind LOSS_KIND (0 FL, 1 FL*, 2 QFL, 3 VFL; see the module docstring) for any
    target in [0, 1], chosen at compile time: each specialization holds the code of one kind only. SHORT and
    UNWEIGHTED (FL only): see focal_loss_and_grad."""
    if LOSS_KIND == 0:
        loss, grad = focal_loss_and_grad(x, t, ts, c0, c1, gamma, GAMMA, FAST, SHORT, UNWEIGHTED)
    elif LOSS_KIND == 1:
        loss, grad = focal_star_loss_and_grad(x, t, c0, c1, gamma, beta, FAST)
    elif LOSS_KIND == 2:
        loss, grad = quality_focal_loss_and_grad(x, t, gamma, GAMMA, FAST)
    else:
        loss, grad = varifocal_loss_and_grad(x, t, c0, c1, gamma, beta, GAMMA, FAST)
    return loss, grad


# ---------------------------------------------------------------------------------------------------------------
# Host side: the compile-time switches of the math above for one launch (shared by the launchers and the
# ahead-of-time check, so that the check compiles exactly what the library launches).

_TRITON_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}

# Integer exponents up to this one are compiled in (GAMMA = the exponent: multiplications, no transcendental);
# fractional and larger ones take the runtime-exponent path (GAMMA = -1). Bounded: at most 6 variants per kernel.
MAX_CONSTANT_POWER = 4


def triton_compute_dtype(x_dtype: torch.dtype):
    """COMPUTE_DTYPE: losses.compute_dtype of the logits' dtype, as a Triton dtype."""
    return _TRITON_DTYPE[compute_dtype(x_dtype)]


def power_constexpr(exponent: float) -> int:
    """The GAMMA constexpr of an exponent (FL's, VFL's and the DETR kinds' gamma, QFL's beta): the integer itself in
    [0, MAX_CONSTANT_POWER], else -1 (the runtime path, exact for integers too)."""
    exponent = float(exponent)
    return int(exponent) if exponent.is_integer() and 0 <= exponent <= MAX_CONSTANT_POWER else -1


def spec_power(spec) -> int:
    """GAMMA of a launch of `spec` (a losses.LossSpec, whose gamma holds QFL's exponent too); FL* has no power
    (gamma only scales it) and BCE none: 0."""
    return 0 if spec.kind in (LossKind.FL_STAR, LossKind.BCE) else power_constexpr(spec.gamma)


def fast_math(x_dtype, gpu: bool = None) -> int:
    """FAST: float32 compute takes the short exp2 / reciprocal / polynomial forms (2: compiled for a GPU, the
    reciprocal rcp.approx; 1: in Triton's interpreter, a division), float64 compute the libdevice ones (0).
    gpu: whether the kernel is compiled (None: unless the interpreter is on; the ahead-of-time check passes True)."""
    if compute_dtype(x_dtype) != torch.float32:
        return 0
    if gpu is None:
        gpu = not interpreter_enabled()
    return 2 if gpu else 1


def short_log(x_dtype, backward: bool, hard: bool = False) -> int:
    """SHORT: the backward of 16-bit logits, whose gradient is rounded to 16 bits, takes the short log1p
    (log1p_exp): 2 (degree 3) for bf16 where the gradient is the hard-target FL's (`hard`: no label smoothing), whose
    terms all have one sign, so that L's relative error bounds the gradient's; 1 (degree 4) for the other 16-bit
    backwards (fp16; soft targets and smoothing, whose gradient can cancel: a dense bf16 gradient came out 2.3 ulps
    off with degree 3); else 0."""
    if not (compute_dtype(x_dtype) == torch.float32 and backward and x_dtype.itemsize == 2):
        return 0
    return 2 if (x_dtype == torch.bfloat16 and hard) else 1


def power_key(power: int) -> str:
    """The exponent specialization in a tuning key: it changes the compiled code (and its registers)."""
    return f" pow={power}" if power >= 0 else " pow=runtime"
