"""The CPU path's elementwise math (pure torch): the family's loss and gradient in general form, and the few-pass
form for negatives that the fast paths evaluate over raw storage, with their chunking.

General form (`terms`): the formulas of `focal_triton.kernels.math`, evaluated with cancellation-free sigmoid
parts, for chunks already in the compute dtype; used wherever an element may be anything (positives, soft
targets, ignored anchors, non-finite logits).

Negatives' form (t = 0, alpha_t = c0; BCE target ts = s/2 with label smoothing s):

    p = sigmoid(x), q = sigmoid(-x) = exp(-softplus(x)), m = p**gamma, bce = softplus(x) - ts x
    FL_neg = c0 m bce,   dFL_neg/dx = c0 m (p - ts + gamma q bce)

torch's sigmoid and softplus: two transcendental ops per element (three with q), a few in-place ops more, in
chunks of FAST_CHUNK elements whose ops run on torch's intra-op threads. Finite for every finite logit (softplus(x)
= x above 20); an inf or NaN logit makes a chunk's sum non-finite, which the callers check to take the general
form instead.
"""
import torch

from ..losses import BCE, FL, FL_STAR, IA_BCE, MAL, QFL, VFL_RTDETR_GRAD

# The general form runs over chunks of GENERAL_CHUNK elements: its ~20 intermediates of 256 KiB (float32) stay in
# L2. The negatives' form: FAST_CHUNK elements per chunk (6 buffers of 2 MiB), each op split over torch's
# intra-op threads (docs/benchmarks.md has the measurements behind the size).
GENERAL_CHUNK = 1 << 16
FAST_CHUNK = 1 << 19
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ZERO = torch.zeros(())


# --- general form -----------------------------------------------------------------------------------------------

def _sigmoid_parts(x):
    """(e, p, q, x >= 0): e = exp(-|x|), p = sigmoid(x), q = sigmoid(-x), without cancellation."""
    e = torch.exp(-x.abs())
    r = 1.0 / (1.0 + e)
    er = e * r
    pos = x >= 0
    return e, torch.where(pos, r, er), torch.where(pos, er, r), pos


def _bce(x, target, e, pos):
    """BCE(x, target) with the linear part zeroed where its coefficient is exactly 0 (x = +inf with target 1 and
    -inf with target 0 give 0, not inf * 0)."""
    zero = x.new_zeros(())
    lin = torch.where(pos, torch.where(target == 1, zero, (1.0 - target) * x),
                      torch.where(target == 0, zero, -target * x))
    return lin + torch.log1p(e)


def _slope(u, m, p, q, gamma: float):
    """gamma u**(gamma - 1) p q for m = u**gamma, 0 where it is the limit of 0 * inf."""
    if gamma == 0:
        return torch.zeros_like(u)
    if float(gamma).is_integer():
        return gamma * u.pow(gamma - 1) * p * q
    return gamma * m * torch.where(u > 0, p * q / u, u.new_zeros(()))


def _alpha_t(t, c0, c1):
    """c0 (1 - t) + c1 t (exact at t = 0 and 1), or the number c0 itself where c0 == c1 (no chunk-sized ones)."""
    if not isinstance(c0, torch.Tensor) and not isinstance(c1, torch.Tensor) and c0 == c1:
        return c0
    return c0 * (1.0 - t) + c1 * t


def focal_terms(x, t, ts, c0, c1, gamma: float, want_grad: bool):
    """(FL, dFL/dx or None): t modulates, ts is the BCE target, alpha_t = c0 (1 - t) + c1 t with c0, c1 numbers or
    tensors broadcasting against x."""
    e, p, q, pos = _sigmoid_parts(x)
    u = p * (1.0 - t) + q * t
    zero = x.new_zeros(())
    ce = _bce(x, ts, e, pos)
    m = u.pow(gamma)
    alpha_t = _alpha_t(t, c0, c1)
    loss = alpha_t * m * ce
    if not want_grad:
        return loss, None
    g = _slope(u, m, p, q, gamma)
    grad = alpha_t * (m * (p - ts) + torch.where(g == 0, zero, g * (1.0 - 2.0 * t) * ce))
    return loss, grad


def row_target(score, spec):
    """The per-anchor part of the DETR kinds' target (kernels.math.row_target): MAL score**gamma, IA_BCE
    score**(1 - alpha) (torch's pow: 0**0 = 1), else the score."""
    if spec.kind == MAL:
        return score.pow(spec.gamma)
    if spec.kind == IA_BCE:
        return score.pow(1.0 - spec.beta)
    return score


def detr_terms(x, hit, s, spec, c0, c1, want_grad: bool):
    """(loss, dloss/dx or None) of the class-index kinds BCE .. IA_BCE (kernels.math.detr_loss_and_grad): hit the
    boolean of the label's class, s the row target broadcast against x, c0 / c1 the positives' weight (BCE: the
    class weight c0, a number or a per-class tensor)."""
    kind, gamma, beta = spec.kind, spec.gamma, spec.beta
    zero = x.new_zeros(())
    e, p, q, pos = _sigmoid_parts(x)
    if kind == BCE:
        t = torch.where(hit, s, zero)
        loss = c0 * _bce(x, t, e, pos)
        return loss, (c0 * (p - t) if want_grad else None)
    m = p.pow(gamma)
    if kind == IA_BCE:
        # p**alpha at p = 0 (x = -inf): 0, or 1 for alpha = 0 (torch's pow)
        t = torch.where(hit, (p.pow(beta) * s).clamp_min(0.01), zero)
        alpha_neg = 1.0
    else:
        t = torch.where(hit, s, zero)
        alpha_neg = beta
    ce = _bce(x, t, e, pos)
    w = _alpha_t(t, c0, c1)
    loss = torch.where(hit, w * ce, alpha_neg * m * ce)
    if not want_grad:
        return loss, None
    grad = torch.where(hit, w, alpha_neg * m) * (p - t)
    if kind in (VFL_RTDETR_GRAD, IA_BCE):
        g = _slope(p, m, p, q, gamma)
        grad = grad + torch.where(hit | (g == 0), zero, alpha_neg * g * ce)
    return loss, grad


def terms(x, t, ts, spec, c0, c1, want_grad: bool):
    """(loss, dloss/dx or None) of the loss kind spec.kind (a `LossSpec`; c0, c1: its alpha_t coefficients, or
    per-class tensors), t the target (FL*: 0/1, QFL / VFL: the score), ts FL's BCE target."""
    kind, gamma, beta = spec.kind, spec.gamma, spec.beta
    if kind == FL:
        return focal_terms(x, t, ts, c0, c1, gamma, want_grad)
    zero = x.new_zeros(())
    if kind == FL_STAR:
        s = 2.0 * t - 1.0
        z = gamma * torch.where((s == 0) & (x == x), zero, x * s) + beta
        alpha_t = _alpha_t(t, c0, c1)
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
    # VFL: positives (t > 0) weighted c0 (1 - t) + c1 t, negatives beta p**gamma
    positive = t > 0
    target = torch.where(t <= 0, zero, t)  # NaN stays NaN
    ce = _bce(x, target, e, pos)
    m = p.pow(gamma)
    w = _alpha_t(t, c0, c1)
    loss = torch.where(positive, w * ce, beta * m * ce)
    if not want_grad:
        return loss, None
    g = _slope(p, m, p, q, gamma)
    return loss, (torch.where(positive, w, beta * m) * (p - target)
                  + torch.where(positive | (g == 0), zero, beta * g * ce))


def general_chunks(n: int):
    """(start, end) ranges of the general form over n elements."""
    for start in range(0, n, GENERAL_CHUNK):
        yield start, min(start + GENERAL_CHUNK, n)


# --- negatives' form --------------------------------------------------------------------------------------------

class Buffers:
    """Six FAST_CHUNK-element float32 buffers of one worker: x (16-bit logits, converted), m, e, p, q, s."""

    def __init__(self):
        self.all = torch.empty(6, FAST_CHUNK)

    def take(self, n: int):
        return tuple(b[:n] for b in self.all)


def load(chunk: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """A chunk of logits in float32: itself, or converted into buf."""
    if chunk.dtype == torch.float32:
        return chunk
    return buf.copy_(chunk)


def negative_parts(x, p, q, s, ts):
    """p = sigmoid(x), s = BCE(x, ts) = softplus(x) - ts x and, where q is given, q = sigmoid(-x), in place.

    q = exp(-softplus(x)) = 1 / (1 + exp(x)): relative error a few float32 roundings where q matters (softplus(x)
    of a few units), ~x roundings for large x, where q and its terms vanish beside p."""
    torch.sigmoid(x, out=p)
    torch._C._nn.softplus(x, 1.0, 20.0, out=s)
    if q is not None:
        torch.neg(s, out=q)
        torch.exp(q, out=q)
    if ts:
        s.sub_(x, alpha=ts)


def power(m: torch.Tensor, p: torch.Tensor, gamma: float):
    """p**gamma: None for gamma 0, p itself for 1, else written to m (repeated multiplication for integer gamma
    up to 4, one pow otherwise)."""
    if gamma == 0:
        return None
    if gamma == 1:
        return p
    if float(gamma).is_integer() and gamma <= 4:
        torch.mul(p, p, out=m)
        for _ in range(int(gamma) - 2):
            m.mul_(p)
        return m
    return torch.pow(p, gamma, out=m)


def negative_loss(e, s, m):
    """The negatives' loss before its alpha weight, m bce (s = bce, m = p**gamma or None for 1): e, or s itself."""
    if m is None:
        return s
    return torch.mul(s, m, out=e)


def negative_grad(p, q, s, m, out, k, gamma, ts):
    """out = k m (p - ts + gamma q bce) (s = bce, m = p**gamma or None for 1); q is overwritten."""
    if gamma == 0:
        torch.sub(p, ts, out=q)
        torch.mul(q, k, out=out)
        return
    torch.addcmul(p, q, s, value=gamma, out=q)
    if ts:
        q.sub_(ts)
    torch.addcmul(_ZERO, q, m, value=k, out=out)


class Offsets:
    """Sorted storage offsets of the elements a pass must not take as negatives, split by chunk."""

    def __init__(self, offsets, chunks):
        self.offsets = offsets
        starts = torch.tensor([c[0] for c in chunks], dtype=torch.int64)
        ends = torch.tensor([c[1] for c in chunks], dtype=torch.int64)
        self.lo = torch.searchsorted(self.offsets, starts).tolist()
        self.hi = torch.searchsorted(self.offsets, ends).tolist()

    def bounds(self, i: int):
        """(lo, hi): offsets[lo:hi] lie in chunk i."""
        return self.lo[i], self.hi[i]

    def in_chunk(self, i: int, start: int):
        """Offsets inside chunk i, relative to its start (None if none)."""
        lo, hi = self.lo[i], self.hi[i]
        return self.offsets[lo:hi] - start if hi > lo else None


def merge_sorted(a, b):
    """The sorted union of two sorted int64 tensors with no common element (each element's place: its index plus
    the number of elements of the other tensor below it)."""
    if a.numel() == 0 or b.numel() == 0:
        return b if a.numel() == 0 else a
    out = torch.empty(a.numel() + b.numel(), dtype=torch.int64)
    out[torch.arange(a.numel()) + torch.searchsorted(b, a)] = a
    out[torch.arange(b.numel()) + torch.searchsorted(a, b)] = b
    return out


def run_chunks(fn, tasks):
    """[fn(task, buffers) for task in tasks], in order, with one set of chunk buffers (each op of a chunk runs on
    torch's intra-op threads)."""
    buf = Buffers()
    return [fn(t, buf) for t in tasks]
