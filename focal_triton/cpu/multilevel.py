"""The CPU path of the class-index loss over a head's levels: the kernels' contract in torch (and one C loop).

Each level is viewed in place as (N, HW, A, C) (`losses.anchor_view`: NCHW and channels_last alike, no copy).

- The common case, FL with "sum", a number for alpha, no per-anchor weights, 16/32-bit logits: the negatives'
  pass over each level's raw storage, image by image in chunks (`cpu.native`'s compiled loop for float32 and
  bfloat16 where it was built, else the torch form of `cpu.math`), then the few other elements fixed up
  by index: their storage offsets are excluded from the chunk sums, each positive anchor's element (class = label)
  gets its t = 1 value and gradient (the general formula), each ignored anchor's row of C classes contributes 0
  and gets a zero gradient, whatever its logits. With keep_grad the forward computes the gradient in the same
  pass, each image's normalization factor folded into its last multiply. A chunk whose negatives are not finite
  (an inf or NaN logit) sends the call to the general form: slower, the exact limits.
- Everything else (per-anchor weights, per-class alpha, float64, "none", the other kinds, statistics): the
  general form per image in chunks of whole positions of about GENERAL_CHUNK logits; the one-hot target and every
  intermediate are chunk-sized, never logit-sized.

Sums are added in a fixed order (chunks, levels, images) in float64: repeatable (the torch form: for a given number
of torch threads), accurate to float32 rounding whatever the share of positives.
"""
import torch

from ..losses import BCE, FL, anchor_view, compute_dtype, flat, per_level
from . import math, native


def keeps_gradient(levels, weights, alpha_per_class, spec, with_stats) -> bool:
    """Whether a "sum" forward whose logits need a gradient computes it in its own pass (float32 FL)."""
    return _fast(levels, weights, alpha_per_class, spec, with_stats) and levels[0].dtype == torch.float32


def _fast(levels, weights, alpha_per_class, spec, with_stats) -> bool:
    return (spec.kind == FL and not with_stats and weights is None and alpha_per_class is None
            and levels[0].dtype in math.FAST_DTYPES)


def _scale(normalizer, norm_value, num_images, dtype, device):
    """Each image's factor of the "sum": 1 / v (a number, 1 without normalizer), 1 / Z (a 0-d tensor) or
    1 / (N Z_n) (per image)."""
    if normalizer is None:
        scale = torch.full((num_images,), 1.0 / norm_value, dtype=dtype)
    elif normalizer.dim() == 0:
        scale = (1.0 / normalizer.to(dtype)).reshape(1).expand(num_images)
    else:
        scale = 1.0 / (normalizer.to(dtype) * num_images)
    return scale.to(device).contiguous()


# --- general form -----------------------------------------------------------------------------------------------

def _level_chunks(levels, labels, weights, num_anchors, scores=None):
    """Yield (level index, image, position slice, label chunk (R, A), weight chunk or None, score chunk or None) in
    a fixed order."""
    per_anchor = [per_level(t, levels, num_anchors) if t is not None else [None] * len(levels)
                  for t in (labels, weights, scores)]
    for li, (level, lab, wts, scs) in enumerate(zip(levels, *per_anchor)):
        hw = level.shape[2] * level.shape[3]
        rows = max(1, math.GENERAL_CHUNK // max(1, level.shape[1]))
        for image in range(level.shape[0]):
            for r0 in range(0, hw, rows):
                sl = slice(r0, min(r0 + rows, hw))
                yield (li, image, sl, lab[image, sl], (wts[image, sl] if wts is not None else None),
                       (scs[image, sl] if scs is not None else None))


def _chunk_terms(x, lab, w, alpha_per_class, spec, ignore_index, want_grad, score=None):
    """Loss and gradient of one chunk x (R, A, C) in the compute dtype, weighted and with ignored anchors zeroed.
    QFL, VFL and the DETR / YOLO kinds: the target is the anchor's score (chunk (R, A)) on its label's class, 0
    elsewhere."""
    num_classes = x.shape[-1]
    cls = torch.arange(num_classes, device=x.device)
    hit = lab[..., None] == cls
    if spec.kind >= BCE:  # the DETR / YOLO kinds
        c0, c1 = spec.c0, spec.c1
        if alpha_per_class is not None:  # BCE's class weights
            c0 = c1 = alpha_per_class.to(x.dtype)
        s = math.row_target(score.to(x.dtype), spec)[..., None]
        loss, grad = math.detr_terms(x, hit, s, spec, c0, c1, want_grad)
        return _weighted(loss, grad, lab, w, ignore_index)
    if score is not None:
        t = torch.where(hit, score.to(x.dtype)[..., None], x.new_zeros(()))
    else:
        t = hit.to(x.dtype)
    smoothing = spec.smoothing
    ts = t * (1.0 - smoothing) + 0.5 * smoothing if smoothing else t
    c0, c1 = spec.c0, spec.c1
    if alpha_per_class is not None:
        a = alpha_per_class.to(x.dtype)
        c0, c1 = 1.0 - a, a
    loss, grad = math.terms(x, t, ts, spec, c0, c1, want_grad)
    return _weighted(loss, grad, lab, w, ignore_index)


def _weighted(loss, grad, lab, w, ignore_index):
    """[loss, grad] times the anchors' weights w, zero on ignored anchors (None stays None)."""
    factor = w.to(loss.dtype)[..., None] if w is not None else None
    keep = None if ignore_index is None else (lab != ignore_index)[..., None]
    out = []
    for v in (loss, grad):
        if v is None:
            out.append(None)
            continue
        if factor is not None:
            v = v * factor
        if keep is not None:
            v = torch.where(keep, v, v.new_zeros(()))
        out.append(v)
    return out


# --- negatives' pass --------------------------------------------------------------------------------------------

def _chunks(level, size):
    """(start, end, image) storage ranges of one level: per image, in chunks of at most size elements."""
    per_image = level[0].numel() if level.shape[0] else 0
    return [(s, min(s + size, (n + 1) * per_image), n)
            for n in range(level.shape[0]) for s in range(n * per_image, (n + 1) * per_image, size)]


def _tasks(levels, size):
    """Every chunk of every level: (level index, chunk index in the level, start, end, image), in a fixed order."""
    return [(li, i, start, end, n) for li, level in enumerate(levels)
            for i, (start, end, n) in enumerate(_chunks(level, size))]


class _Special(math.Offsets):
    """The elements of one level that are not plain negatives: positive anchors' (class = label) elements and
    every class of ignored anchors, as sorted storage offsets (from the level's strides: any dense layout)."""

    def __init__(self, level, lab, num_anchors, ignore_index, chunks):
        n_img, K, H, W = level.shape
        C = K // num_anchors
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
        super().__init__(math.merge_sorted(ignored, positives), chunks)

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


def _specials(levels, labels, num_anchors, ignore_index, size):
    return [_Special(level, lab, num_anchors, ignore_index, _chunks(level, size))
            for level, lab in zip(levels, per_level(labels, levels, num_anchors))]


def _positive_terms(levels, specials, num_anchors, spec, want_grad):
    """Per level: (index of the positives' elements in the (N, HW, A, C) view, their loss, gradient or None)."""
    out = []
    for level, sp in zip(levels, specials):
        idx = sp.positives + (sp.classes,)
        x = anchor_view(level, num_anchors)[idx].float()
        one = torch.ones_like(x)
        loss, grad = math.focal_terms(x, one, one - 0.5 * spec.smoothing, spec.c0, spec.c1, spec.gamma, want_grad)
        out.append((idx, loss, grad))
    return out


def _fix_gradients(outs, specials, positives, num_anchors, factor):
    """Positives' elements get their t = 1 gradient (`_positive_terms`, times factor[image]); ignored anchors' rows
    get 0."""
    for out, sp, (idx, _, grad) in zip(outs, specials, positives):
        view = anchor_view(out, num_anchors)
        if grad.numel():
            view[idx] = (grad * factor[sp.positives[0].long()]).to(out.dtype)
        if sp.ignored is not None:
            view[sp.ignored] = 0


def _negatives_pass(levels, labels, spec, ignore_index, num_anchors, factors):
    """The negatives' pass over every level: (per image the float64 sum of m bce over its negatives, specials,
    gradients or None). factors None (no gradient) or per image the gradient's factor (upstream times scale[n]):
    each level's gradient of c0 sum_n factors[n] loss_n over its negatives, 0 at its specials (fixed up by the
    caller), in the level's layout. The compiled loop (`cpu.native`) where it takes the dtype, else the torch form
    in chunks; the same formulas, the factor folded into the last multiply (for upstream 1 the forward's and the
    backward's gradients are the same bits)."""
    c0, gamma, ts = spec.c0, spec.gamma, 0.5 * spec.smoothing
    compiled = native.available(levels[0].dtype)
    size = native.CHUNK if compiled else math.FAST_CHUNK
    tasks = _tasks(levels, size)
    specials = _specials(levels, labels, num_anchors, ignore_index, size)
    flats = [flat(lv) for lv in levels]
    outs = [torch.empty_like(lv) for lv in levels] if factors is not None else None
    out_flats = [flat(o) for o in outs] if outs is not None else None
    k = [c0 * v for v in factors] if factors is not None else None

    def chunk(task, buf):
        li, i, start, end, n = task
        x, m, e, p, q, s = buf.take(end - start)
        x = math.load(flats[li][start:end], x)
        math.negative_parts(x, p, q if outs is not None else None, s, ts)
        special = specials[li].in_chunk(i, start)
        if special is not None:                         # positives and ignored rows: not negatives
            s.index_fill_(0, special, 0.0)
            p.index_fill_(0, special, 0.0)
        m = math.power(m, p, gamma)
        loss = math.negative_loss(e, s, m)
        if outs is not None:
            math.negative_grad(p, q, s, m, out_flats[li][start:end], k[n], gamma, ts)
        # torch's cascade sum (a BLAS dot accumulates sequentially, ~10x the rounding error over a chunk)
        return loss.sum()

    if compiled:
        values = native.negatives(
            [(flats[li], out_flats[li] if outs is not None else None, start, end,
              (specials[li].offsets,) + specials[li].bounds(i), k[n] if k is not None else 0.0)
             for li, i, start, end, n in tasks], levels[0].dtype, gamma, ts).tolist()
    else:
        values = [v.item() for v in math.run_chunks(chunk, tasks)]
    per_image = [0.0] * levels[0].shape[0]
    for (_, _, _, _, n), v in zip(tasks, values):  # in order: repeatable
        per_image[n] += v
    return torch.tensor(per_image, dtype=torch.float64), specials, outs


@torch.no_grad()
def _fast_forward(levels, labels, spec, ignore_index, num_anchors, with_grad, scale):
    """(per-image sums (N,) float64 of the focal loss, gradients or None), or None where a negative's logit is not
    finite. with_grad: also the gradient of sum_n scale[n] loss_n, one tensor per level in its layout, from the
    same pass over the logits."""
    sums, specials, outs = _negatives_pass(levels, labels, spec, ignore_index, num_anchors,
                                           scale.float().tolist() if with_grad else None)
    # float64 from here: a float32 running sum of many positives' terms (index_add_) would drift by ~n eps.
    sums = sums * spec.c0
    positives = _positive_terms(levels, specials, num_anchors, spec, with_grad)
    for sp, (_, loss, _) in zip(specials, positives):
        if loss.numel():
            sums.index_add_(0, sp.positives[0].long(), loss.double())
    if not bool(torch.isfinite(sums).all()):
        return None
    if with_grad:
        _fix_gradients(outs, specials, positives, num_anchors, scale.float())
    return sums, outs


@torch.no_grad()
def _fast_backward(upstream, scale, levels, labels, spec, ignore_index, num_anchors):
    """Gradients of upstream * sum_n scale[n] * loss_n w.r.t. each level (in its layout and dtype), or None where a
    negative's logit is not finite. upstream: the 0-d upstream gradient; scale: (N,)."""
    factor = upstream.float() * scale.float()
    sums, specials, outs = _negatives_pass(levels, labels, spec, ignore_index, num_anchors, factor.tolist())
    if not bool(torch.isfinite(sums).all()):
        return None
    _fix_gradients(outs, specials, _positive_terms(levels, specials, num_anchors, spec, True), num_anchors, factor)
    return outs


# --- the contract -----------------------------------------------------------------------------------------------

def _image_sums(levels, labels, weights, scores, alpha_per_class, spec, ignore_index, num_anchors, scale, keep_grad,
                per_anchor):
    """(float64 (N,) per-image loss sums, the gradients kept by the negatives' pass or None); per_anchor None or the
    (N, M) tensor the per-anchor losses are written into (statistics)."""
    cdt = compute_dtype(levels[0].dtype)
    num_images = levels[0].shape[0]
    with_stats = per_anchor is not None
    if _fast(levels, weights, alpha_per_class, spec, with_stats):
        fast = _fast_forward(levels, labels, spec, ignore_index, num_anchors, keep_grad and cdt == levels[0].dtype,
                             scale)
        if fast is not None:
            return fast
    # the general form (also where the negatives' pass declines)
    views = [anchor_view(lv, num_anchors) for lv in levels]
    sums = [[] for _ in range(num_images)]
    anchor_views = per_level(per_anchor, levels, num_anchors) if with_stats else None
    for li, n, sl, lab, w, sc in _level_chunks(levels, labels, weights, num_anchors, scores):
        value, _ = _chunk_terms(views[li][n, sl].to(cdt), lab, w, alpha_per_class, spec, ignore_index, False, sc)
        sums[n].append(value.sum())
        if with_stats:
            anchor_views[li][n, sl] = value.sum(-1)
    per_image = torch.stack([torch.stack(s).double().sum() if s else torch.zeros((), dtype=torch.float64)
                             for s in sums]) if num_images else torch.zeros(0, dtype=torch.float64)
    return per_image, None


@torch.no_grad()
def forward(levels, labels, weights, scores, alpha_per_class, spec, ignore_index, num_anchors, reduction,
            normalizer=None, norm_value=1.0, out_dtype=None, with_stats=False, keep_grad=False):
    """levels: NCHW-contiguous or channels_last (N, A*C, H, W); labels (N, M) contiguous; weights / scores (N, M)
    or None; alpha_per_class (C,) or None; spec the loss (`losses.LossSpec`); normalizer None (the number
    norm_value), 0-d or (N,).

    "none": the per-level losses in each level's layout, in out_dtype (default: the levels' dtype). "sum":
    (loss, scale), loss 0-d in the compute dtype and scale (N,) each image's factor (the backward's); with_stats
    adds the (N, M) per-anchor losses (weighted, 0 for ignored anchors, not normalized), keep_grad the list of the
    loss's gradients w.r.t. the levels (upstream 1)."""
    cdt = compute_dtype(levels[0].dtype)
    if reduction == "none":
        views = [anchor_view(lv, num_anchors) for lv in levels]
        outs = [torch.empty_like(lv, dtype=out_dtype or lv.dtype) for lv in levels]
        out_views = [anchor_view(o, num_anchors) for o in outs]
        for li, n, sl, lab, w, sc in _level_chunks(levels, labels, weights, num_anchors, scores):
            value, _ = _chunk_terms(views[li][n, sl].to(cdt), lab, w, alpha_per_class, spec, ignore_index, False,
                                    sc)
            out_views[li][n, sl] = value
        return outs
    num_images = levels[0].shape[0]
    scale = _scale(normalizer, norm_value, num_images, cdt, labels.device)
    per_anchor = torch.empty(labels.shape, dtype=cdt, device=labels.device) if with_stats else None
    per_image, kept = _image_sums(levels, labels, weights, scores, alpha_per_class, spec, ignore_index, num_anchors,
                                  scale, keep_grad, per_anchor)
    # Images added in float64, in order (a few terms; the chunk sums inside each are float32 cascade sums).
    total = (per_image.double() * scale.double()).sum().to(cdt)
    out = (total, scale) + ((per_anchor,) if with_stats else ())
    if keep_grad:
        if kept is None:
            kept = backward([torch.ones((), dtype=cdt)], levels, labels, weights, scores, alpha_per_class, spec,
                            ignore_index, num_anchors, scale=scale)
        out += (kept,)
    return out


@torch.no_grad()
def backward(grads, levels, labels, weights, scores, alpha_per_class, spec, ignore_index, num_anchors, scale=None):
    """Gradients w.r.t. each level, in the level's layout and dtype. grads: one 0-d upstream gradient of the "sum"
    loss (then `scale` is the forward's per-image factor), or per-level upstream gradients laid out like the levels
    ("none")."""
    cdt = compute_dtype(levels[0].dtype)
    if scale is not None and _fast(levels, weights, alpha_per_class, spec, False):
        outs = _fast_backward(grads[0].to(cdt), scale.to(cdt), levels, labels, spec, ignore_index, num_anchors)
        if outs is not None:
            return outs
    views = [anchor_view(lv, num_anchors) for lv in levels]
    outs = [torch.empty_like(lv) for lv in levels]
    out_views = [anchor_view(o, num_anchors) for o in outs]
    grad_views = None if scale is not None else [anchor_view(g, num_anchors) for g in grads]
    for li, n, sl, lab, w, sc in _level_chunks(levels, labels, weights, num_anchors, scores):
        _, dfl = _chunk_terms(views[li][n, sl].to(cdt), lab, w, alpha_per_class, spec, ignore_index, True, sc)
        g = grads[0].to(cdt) * scale[n].to(cdt) if scale is not None else grad_views[li][n, sl].to(cdt)
        out_views[li][n, sl] = g * dfl
    return outs


# --- segments ---------------------------------------------------------------------------------------------------

def _segment_columns(levels, labels, weights, scores, num_anchors):
    """Per segment: its (N, M_s) label, weight and score columns (contiguous), in order."""
    start = 0
    for lv in levels:
        cols = slice(start, start + lv.shape[2] * lv.shape[3] * num_anchors)
        start = cols.stop
        yield tuple(t[:, cols].contiguous() if t is not None else None for t in (labels, weights, scores))


@torch.no_grad()
def segments_forward(levels, labels, label_row, weights, scores, alpha_per_class, spec, ignore_index, num_anchors,
                     divisors):
    """The kernels' segments_forward contract: levels NCHW-contiguous or channels_last; each segment's per-image
    sums (the level forward's) divided by its row of divisors (S, N). Returns (total, per-segment losses (S,),
    scale (S, N)); segments and images added in float64, in order."""
    cdt = compute_dtype(levels[0].dtype)
    scale = (1.0 / divisors.to(cdt)).contiguous()
    per_segment = []
    for s, (lv, (lab, w, sc)) in enumerate(zip(levels, _segment_columns(levels, labels, weights, scores,
                                                                          num_anchors))):
        per_image, _ = _image_sums([lv], lab, w, sc, alpha_per_class, spec, ignore_index, num_anchors, scale[s],
                                   False, None)
        per_segment.append((per_image.double() * scale[s].double()).sum())
    per_segment = torch.stack(per_segment)
    return per_segment.sum().to(cdt), per_segment.to(cdt), scale


@torch.no_grad()
def segments_backward(grad_per_segment, levels, outs, labels, label_row, weights, scores, alpha_per_class, spec,
                      ignore_index, num_anchors, scale):
    """Writes the gradients of sum_s grad_per_segment[s] loss_s w.r.t. each segment into outs (any strides)."""
    for s, (lv, out, (lab, w, sc)) in enumerate(zip(levels, outs, _segment_columns(levels, labels, weights, scores,
                                                                                     num_anchors))):
        out.copy_(backward([grad_per_segment[s]], [lv], lab, w, sc, alpha_per_class, spec, ignore_index,
                           num_anchors, scale=scale[s])[0])
