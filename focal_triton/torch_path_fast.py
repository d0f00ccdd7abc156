"""Fast pure-torch path of the class-index focal loss ("sum" forward and its scalar-upstream backward) on CPU.

A detector's labels make almost every (anchor, class) element a negative (t = 0). So every element is first
treated as a negative, over the raw storage of each level (layout-agnostic: NCHW and channels_last alike, image by
image, in cache-sized chunks, with a few in-place ops):

    p = sigmoid(x), q = sigmoid(-x), m = p**gamma, bce = softplus(x) - ts x   (ts = s / 2, label smoothing s)
    FL_neg = c0 m bce                               c0 = 1 - alpha (1 without alpha)
    dFL_neg/dx = c0 m (p - ts + gamma q bce)

(torch's sigmoid and softplus, and q = exp(-softplus(x)): two transcendental ops per element, three with the
gradient), then the few other elements are fixed up by index: their storage offsets are excluded from the chunk
sums, each positive anchor's element (class = label) gets its t = 1 value and gradient (the general formula of
`torch_path.focal_terms`), and each ignored anchor's row of C classes contributes 0 to the sum and gets a zero
gradient, whatever its logits.

When float32 logits require grad (and grad mode is on: the op layer decides, `multilevel_ops`), the forward
computes the gradient, each image's normalization factor folded into its last multiply, in the same pass and
returns it beside the loss; the registered op saves it for the backward of that very call, in the autograd graph
(nothing is kept here). With an upstream gradient of 1 the backward returns it as it is: the same bits as
recomputing it (`backward_scalar`).

Exactness: for finite logits the values equal the general path's to float32 rounding. Where a chunk holds a
non-finite logit (inf, NaN) at a negative element, the formulas above can differ from the general path's limits
(inf * 0), so such a call returns None and the caller runs the general path (`torch_path_multilevel`): slower,
exact semantics. Per-anchor weights, per-class alpha, float64 logits, "none" losses and per-element upstream
gradients also go to the general path (`applicable`). Sums are added in a fixed order (chunks, then levels, then
images), whatever the number of worker threads: results repeat for a given number of torch threads (which may
split a chunk's sum differently).
"""
import torch

from .layout import anchor_view as _anchor_view
from .layout import flat as _flat
from .torch_path import FL, alpha_coefficients, focal_terms

# Elements per chunk, and Python worker threads. Measured on the 2-core machine here, idle, one COCO RetinaNet image
# (16M logits), forward with gradient: 32 Ki-element chunks over 2 Python threads (each op below torch's grain size,
# so on its calling thread) took 135 ms: ~11 small ops per chunk are dispatch-bound and serialized by the GIL;
# 512 Ki-element chunks on one thread, each op split over torch's intra-op threads, took 68-75 ms (256 Ki: 72-84,
# 2 Mi: 93, falling out of cache). On a machine busy with other jobs, intra-op barriers can wait for a time slice:
# WORKERS > 1 with a smaller CHUNK is the alternative there.
CHUNK = 1 << 19
WORKERS = 1
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ZERO = torch.zeros(())


def applicable(levels, weights, alpha) -> bool:
    """The cases this path covers (the others keep the general path)."""
    return weights is None and not isinstance(alpha, torch.Tensor) and levels[0].dtype in _DTYPES


def keeps_gradient(levels, weights, alpha, loss_kind, with_stats) -> bool:
    """Whether a "sum" forward whose logits need a gradient computes it in its own pass (float32 FL here)."""
    return (loss_kind == FL and not with_stats and applicable(levels, weights, alpha)
            and levels[0].dtype == torch.float32)


class _Buffers:
    def __init__(self, n: int):
        self.all = torch.empty(6, n)

    def take(self, n: int):
        return tuple(b[:n] for b in self.all)


def _parts(x, p, q, s, ts):
    """p = sigmoid(x), s = BCE(x, ts) = softplus(x) - ts x and, where q is given, q = sigmoid(-x), in place.

    q = exp(-softplus(x)) = 1 / (1 + exp(x)): relative error a few float32 roundings where q matters (softplus(x)
    of a few units), ~x roundings for large x, where q and its terms vanish beside p. Finite for every finite x
    (softplus(x) = x above 20): only inf and NaN logits send a call to the general path (see above)."""
    torch.sigmoid(x, out=p)
    torch._C._nn.softplus(x, 1.0, 20.0, out=s)
    if q is not None:
        torch.neg(s, out=q)
        torch.exp(q, out=q)
    if ts:
        s.sub_(x, alpha=ts)


def _power(m: torch.Tensor, p: torch.Tensor, gamma: float):
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


def _chunks(level):
    """(start, end) storage ranges of one level: per image, in chunks of at most CHUNK, in a fixed order."""
    per_image = level[0].numel() if level.shape[0] else 0
    return [(s, min(s + CHUNK, (n + 1) * per_image), n)
            for n in range(level.shape[0]) for s in range(n * per_image, (n + 1) * per_image, CHUNK)]


def _load(chunk: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    if chunk.dtype == torch.float32:
        return chunk
    return buf.copy_(chunk)


class _Offsets:
    """Sorted storage offsets of the elements a pass must not treat as plain negatives, split by chunk."""

    def __init__(self, offsets, chunks):
        self.offsets = offsets
        starts = torch.tensor([c[0] for c in chunks], dtype=torch.int64)
        ends = torch.tensor([c[1] for c in chunks], dtype=torch.int64)
        self.lo = torch.searchsorted(self.offsets, starts).tolist()
        self.hi = torch.searchsorted(self.offsets, ends).tolist()

    def in_chunk(self, i: int, start: int):
        """Offsets inside chunk i, relative to its start (None if none)."""
        lo, hi = self.lo[i], self.hi[i]
        return self.offsets[lo:hi] - start if hi > lo else None


class _Special(_Offsets):
    """The elements of one level that are not plain negatives: positive anchors' (class = label) elements and
    every class of ignored anchors, as sorted storage offsets (from the level's strides: any dense layout)."""

    def __init__(self, level, lab, num_anchors, ignore_index, chunks):
        n_img, K, H, W = level.shape
        C = K // num_anchors
        lab = lab.view(n_img, H * W, num_anchors)
        st = level.stride()
        pos = (lab >= 0) & (lab < C)
        self.ignored = None
        ignored = torch.empty(0, dtype=torch.int64)
        if ignore_index is not None:
            is_ign = lab == ignore_index
            pos &= ~is_ign
            ignored = self._ignored_offsets(level, is_ign, C)
        self.positives = pos.nonzero(as_tuple=True)
        self.classes = lab[self.positives].long()
        positives = self._offsets(st, self.positives, self.classes, W, C).sort().values  # a few: sorted directly
        super().__init__(_merge_sorted(ignored, positives), chunks)

    def _ignored_offsets(self, level, is_ign, C):
        """Sorted offsets of every class of the ignored anchors (sets self.ignored), built in storage order for
        the two native layouts (a detector may ignore ~1 % of its anchors: C offsets each, too many to sort)."""
        n_img, K, H, W = level.shape
        A = K // C
        HW = H * W
        cls = torch.arange(C)
        if level.is_contiguous(memory_format=torch.channels_last) and not level.is_contiguous():
            # offset = n st0 + hw K + a C + c: nonzero's (n, hw, a) order, then c, is storage order
            self.ignored = is_ign.nonzero(as_tuple=True)
            n, hw, a = (i.long() for i in self.ignored)
            return ((n * level.stride(0) + hw * K + a * C)[:, None] + cls[None, :]).reshape(-1)
        if level.is_contiguous():
            # offset = n st0 + (a C + c) HW + hw: storage order is (n, a, c, hw). Anchors in (n, a, hw) order
            # (nonzero of the (N, A, HW) view) form runs of equal (n, a); a run of G anchors starting at index S
            # puts its element (anchor S + r, class c) at position C S + c G + r.
            n, a, hw = (i.long() for i in is_ign.permute(0, 2, 1).nonzero(as_tuple=True))
            self.ignored = (n, hw, a)
            if n.numel() == 0:
                return n
            _, size = torch.unique_consecutive(n * A + a, return_counts=True)
            start = torch.cumsum(size, 0) - size
            run_size = torch.repeat_interleave(size, size)
            run_start = torch.repeat_interleave(start, size)
            rank = torch.arange(n.numel()) - run_start
            where = (C * run_start + rank)[:, None] + cls[None, :] * run_size[:, None]
            out = torch.empty(n.numel() * C, dtype=torch.int64)
            out[where.reshape(-1)] = ((n * level.stride(0) + a * C * HW + hw)[:, None] + cls[None, :] * HW).reshape(-1)
            return out
        self.ignored = is_ign.nonzero(as_tuple=True)  # another dense layout: offsets from the strides, sorted
        return self._offsets(level.stride(), self.ignored, cls[None, :], W, C).reshape(-1).sort().values

    @staticmethod
    def _offsets(st, idx, cls, W, C):
        n, hw, a = (i.long() for i in idx)
        if cls.dim() == 2:
            n, hw, a = n[:, None], hw[:, None], a[:, None]
        return n * st[0] + (a * C + cls) * st[1] + (hw // W) * st[2] + (hw % W) * st[3]


def _merge_sorted(a, b):
    """The sorted union of two sorted int64 tensors with no common element (each element's place: its index plus
    the number of elements of the other tensor below it)."""
    if a.numel() == 0 or b.numel() == 0:
        return b if a.numel() == 0 else a
    out = torch.empty(a.numel() + b.numel(), dtype=torch.int64)
    out[torch.arange(a.numel()) + torch.searchsorted(b, a)] = a
    out[torch.arange(b.numel()) + torch.searchsorted(a, b)] = b
    return out


def _specials(levels, labels, num_anchors, ignore_index, chunks):
    out, mb = [], 0
    for level, ch in zip(levels, chunks):
        m = level.shape[2] * level.shape[3] * num_anchors
        out.append(_Special(level, labels[:, mb:mb + m], num_anchors, ignore_index, ch))
        mb += m
    return out


def _tasks(levels):
    """Every chunk of every level: (level index, chunk index in the level, start, end, image), in a fixed order."""
    return [(li, i, start, end, n) for li, level in enumerate(levels)
            for i, (start, end, n) in enumerate(_chunks(level))]


_POOL = None


def _workers() -> int:
    return max(1, min(WORKERS, torch.get_num_threads()))


def _map(fn, tasks):
    """[fn(task, buffers) for task in tasks], the tasks split into contiguous runs over the workers (threads: torch
    ops release the GIL). Each result depends only on its task, so the results are the same for any worker count."""
    global _POOL
    workers = _workers()
    if workers == 1 or len(tasks) < 2 * workers:
        buf = _Buffers(CHUNK)
        return [fn(t, buf) for t in tasks]
    if _POOL is None or _POOL._max_workers < workers:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="focal_triton")
    step = -(-len(tasks) // workers)

    def run(part):
        with torch.no_grad():                           # grad mode is per thread
            buf = _Buffers(CHUNK)
            return [fn(t, buf) for t in part]

    futures = [_POOL.submit(run, tasks[i:i + step]) for i in range(0, len(tasks), step)]
    return [r for f in futures for r in f.result()]


def _negative_loss(e, s, m):
    """The negatives' loss before its alpha weight, m bce (s = bce, m = p**gamma or None for 1): e, or s itself."""
    if m is None:
        return s
    return torch.mul(s, m, out=e)


def _grad_terms(p, q, s, m, out, k, gamma, ts):
    """out = k m (p - ts + gamma q bce) (s = bce, m = p**gamma or None for 1); q is overwritten."""
    if gamma == 0:
        torch.sub(p, ts, out=q)
        torch.mul(q, k, out=out)
        return
    torch.addcmul(p, q, s, value=gamma, out=q)
    if ts:
        q.sub_(ts)
    torch.addcmul(_ZERO, q, m, value=k, out=out)


def _fix_gradients(outs, levels, specials, num_anchors, factor, c0, c1, gamma, ts):
    """Positives' elements get their t = 1 gradient (times factor[image]); ignored anchors' rows get 0."""
    for li, sp in enumerate(specials):
        out = _anchor_view(outs[li], num_anchors)
        if sp.positives[0].numel():
            idx = sp.positives + (sp.classes,)
            x = _anchor_view(levels[li], num_anchors)[idx].float()
            one = torch.ones_like(x)
            _, grad = focal_terms(x, one, one - ts, c0, c1, gamma, True)
            out[idx] = (grad * factor[sp.positives[0].long()]).to(out.dtype)
        if sp.ignored is not None:
            out[sp.ignored] = 0


@torch.no_grad()
def forward_sum(levels, labels, alpha, gamma, smoothing, ignore_index, num_anchors, with_grad=False,
                grad_scale=None):
    """(per-image sums (N,) float32 of the focal loss, gradients or None), or None when a non-finite value calls for
    the general path.

    with_grad (float32 logits only): also compute the gradient of sum_n grad_scale[n] loss_n (grad_scale: the (N,)
    normalization factors, known before the pass; 1 without) in the same pass over the logits (one exp and one
    log1p per element instead of two of each for the forward and the backward), one tensor per level in its
    layout; the caller hands it to the backward of this call. Each image's sum is accurate to float32 rounding:
    chunk sums (torch's cascade sum) and the positives' corrections are added in float64."""
    N = levels[0].shape[0]
    c0, c1 = alpha_coefficients(alpha)
    ts = 0.5 * smoothing
    tasks = _tasks(levels)
    specials = _specials(levels, labels, num_anchors, ignore_index, [_chunks(lv) for lv in levels])
    flats = [_flat(lv) for lv in levels]
    with_grad = with_grad and levels[0].dtype == torch.float32
    grad_scale = torch.ones(N) if grad_scale is None else grad_scale.float()
    f = grad_scale.tolist()
    outs = [torch.empty_like(lv) for lv in levels] if with_grad else None
    out_flats = [_flat(o) for o in outs] if with_grad else None

    def chunk_sum(task, buf):
        li, i, start, end, n = task
        x, m, e, p, q, s = buf.take(end - start)
        x = _load(flats[li][start:end], x)
        _parts(x, p, q if with_grad else None, s, ts)
        special = specials[li].in_chunk(i, start)
        if special is not None:                         # positives and ignored rows: not negatives
            s.index_fill_(0, special, 0.0)
            p.index_fill_(0, special, 0.0)
        m = _power(m, p, gamma)
        loss = _negative_loss(e, s, m)
        if with_grad:                                   # the image's factor folded into the last multiply
            _grad_terms(p, q, s, m, out_flats[li][start:end], c0 * f[n], gamma, ts)
        # torch's cascade sum (a BLAS dot accumulates sequentially, ~10x the rounding error over a chunk)
        return loss.sum()

    values = _map(chunk_sum, tasks)
    partials = [[] for _ in range(N)]
    for task, v in zip(tasks, values):
        partials[task[4]].append(v)
    # float64 from here: a float32 running sum of many positives' terms (index_add_) would drift by ~n eps.
    sums = torch.stack([torch.stack(ps).double().sum() if ps else torch.zeros((), dtype=torch.float64)
                        for ps in partials]) * c0
    for li, sp in enumerate(specials):
        if sp.positives[0].numel():
            x = _anchor_view(levels[li], num_anchors)[sp.positives + (sp.classes,)].float()
            one = torch.ones_like(x)
            pos, _ = focal_terms(x, one, one - ts, c0, c1, gamma, False)
            sums.index_add_(0, sp.positives[0].long(), pos.double())
    if not bool(torch.isfinite(sums).all()):
        return None
    if with_grad:
        _fix_gradients(outs, levels, specials, num_anchors, grad_scale, c0, c1, gamma, ts)
    return sums.float(), outs


@torch.no_grad()
def backward_scalar(upstream, scale, levels, labels, alpha, gamma, smoothing, ignore_index, num_anchors):
    """Gradients of upstream * sum_n scale[n] * loss_n w.r.t. each level (in its layout and dtype), or None when a
    non-finite value calls for the general path. upstream: the 0-d upstream gradient; scale: (N,) float32."""
    factor = upstream.float() * scale.float()
    c0, c1 = alpha_coefficients(alpha)
    ts = 0.5 * smoothing
    outs = [torch.empty_like(lv) for lv in levels]
    tasks = _tasks(levels)
    specials = _specials(levels, labels, num_anchors, ignore_index, [_chunks(lv) for lv in levels])
    flats, out_flats = [_flat(lv) for lv in levels], [_flat(o) for o in outs]
    f = factor.tolist()

    def chunk_grad(task, buf):
        li, i, start, end, n = task
        x, m, e, p, q, s = buf.take(end - start)
        x = _load(flats[li][start:end], x)
        _parts(x, p, q, s, ts)
        special = specials[li].in_chunk(i, start)
        if special is not None:                         # overwritten below, whatever their logits
            s.index_fill_(0, special, 0.0)
            p.index_fill_(0, special, 0.0)
        check = s.sum()
        # The forward's arithmetic (with_grad), the factor folded in the same way: with upstream gradient 1, the
        # same bits whichever pass computes it.
        _grad_terms(p, q, s, _power(m, p, gamma), out_flats[li][start:end], c0 * f[n], gamma, ts)
        return check

    checks = _map(chunk_grad, tasks)
    if checks and not bool(torch.isfinite(torch.stack(checks)).all()):
        return None
    _fix_gradients(outs, levels, specials, num_anchors, factor, c0, c1, gamma, ts)
    return outs


# --- dense targets (sigmoid_focal_loss, FL) ---------------------------------------------------------------------
# The same idea on a flat range: every element as a negative (t = 0), then the elements whose target is not 0
# (positives, soft targets, NaN) by the general formula, by index. Dense detector targets are almost all 0.

def dense_applicable(x, loss_kind) -> bool:
    return loss_kind == FL and x.dtype in _DTYPES


def dense_keeps_gradient(x, loss_kind) -> bool:
    """Whether a dense forward whose logits need a gradient computes it in its own pass (float32 FL here)."""
    return dense_applicable(x, loss_kind) and x.dtype == torch.float32


@torch.no_grad()
def dense_pass(x, t, alpha, gamma, reduction, out_dtype, want_loss, want_grad, factor=1.0, upstream=None):
    """(loss or None, gradient or None) of FL on dense x, t with equal strides (n > 0), or None when a negative's
    logit is non-finite or above 88 (the caller runs the general path).

    loss (want_loss): "none" the elementwise loss in x's layout, else the 0-d sum / mean, in out_dtype.
    gradient (want_grad), in x's layout and dtype: factor * dloss/dx (factor: the upstream scalar, times 1 / n for
    "mean"), times the elementwise upstream gradient `upstream` (x's layout) where given."""
    n = x.numel()
    c0, c1 = alpha_coefficients(alpha)
    chunks = [(start, min(start + CHUNK, n), 0) for start in range(0, n, CHUNK)]
    fx, ft = _flat(x), _flat(t)
    special = _Offsets(ft.nonzero().squeeze(1), chunks)
    elementwise = want_loss and reduction == "none"
    loss = torch.empty_like(x, dtype=out_dtype) if elementwise else None
    grad = torch.empty_like(x) if want_grad else None
    fl = _flat(loss) if elementwise else None
    fg = _flat(grad) if want_grad else None
    fu = _flat(upstream) if upstream is not None else None

    def chunk_pass(task, buf):
        i, (start, end, _) = task
        xb, m, e, p, q, s = buf.take(end - start)
        xb = _load(fx[start:end], xb)
        _parts(xb, p, q if want_grad else None, s, 0.0)
        sp = special.in_chunk(i, start)
        if sp is not None:                              # fixed up below, whatever their logits
            s.index_fill_(0, sp, 0.0)
            p.index_fill_(0, sp, 0.0)
        m = _power(m, p, gamma)
        if want_loss:
            loss_chunk = _negative_loss(e, s, m)
            if elementwise:
                torch.mul(loss_chunk, c0, out=fl[start:end])
            check = loss_chunk.sum()
        else:
            check = s.sum()
        if want_grad:
            _grad_terms(p, q, s, m, fg[start:end], c0 * factor, gamma, 0.0)
            if fu is not None:
                fg[start:end].mul_(fu[start:end])
        return check

    checks = _map(chunk_pass, list(enumerate(chunks)))
    sums = torch.stack(checks).double()
    if not bool(torch.isfinite(sums).all()):
        return None
    idx = special.offsets
    xs, ts = fx[idx].float(), ft[idx].float()
    ls, gs = focal_terms(xs, ts, ts, c0, c1, gamma, want_grad)
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
