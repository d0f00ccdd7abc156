"""Pure-torch path of the class-index, multi-level focal loss (CPU without the Triton interpreter, or
FOCAL_TRITON_BACKEND=torch), with the contract of `focal_triton.kernels.multilevel_focal`.

Each level is viewed in place as (N, HW, A, C) (a permuted view of NCHW or channels_last storage, no copy) and
processed per image in chunks of whole positions of about CHUNK logits: the one-hot target and every intermediate
are chunk-sized, never logit-sized. Sums are added in a fixed order (chunks, levels, then images), so results repeat.
"""
import torch

from . import torch_path_fast
from .layout import anchor_view as _anchor_view
from .kernels.sigmoid_focal import FL, LossSpec, kernel_scalars
from .torch_path import CHUNK, compute_dtype, family_terms


def _per_level_anchor_views(t, levels, num_anchors):
    """(N, M) per-anchor tensor -> one (N, H_l W_l, A) view per level."""
    views, mb = [], 0
    for level in levels:
        hw = level.shape[2] * level.shape[3]
        views.append(t[:, mb:mb + hw * num_anchors].view(t.shape[0], hw, num_anchors))
        mb += hw * num_anchors
    return views


def _level_chunks(levels, labels, weights, num_anchors, scores=None):
    """Yield (level index, image, position slice, label chunk (R, A), weight chunk or None, score chunk or None) in
    a fixed order."""
    mb = 0
    for li, level in enumerate(levels):
        hw = level.shape[2] * level.shape[3]
        n = level.shape[0]
        lab = labels[:, mb:mb + hw * num_anchors].view(n, hw, num_anchors)
        wts = weights[:, mb:mb + hw * num_anchors].view(n, hw, num_anchors) if weights is not None else None
        scs = scores[:, mb:mb + hw * num_anchors].view(n, hw, num_anchors) if scores is not None else None
        rows = max(1, CHUNK // max(1, level.shape[1]))
        for image in range(n):
            for r0 in range(0, hw, rows):
                sl = slice(r0, min(r0 + rows, hw))
                yield (li, image, sl, lab[image, sl], (wts[image, sl] if wts is not None else None),
                       (scs[image, sl] if scs is not None else None))
        mb += hw * num_anchors


def _chunk_terms(x, lab, w, alpha, gamma, smoothing, ignore_index, want_grad, loss_spec=LossSpec(), score=None):
    """Loss and gradient of one chunk x (R, A, C) in the compute dtype, weighted and with ignored anchors zeroed.
    QFL / VFL: the target is the anchor's score (chunk (R, A)) on its label's class, 0 elsewhere."""
    num_classes = x.shape[-1]
    cls = torch.arange(num_classes, device=x.device)
    hit = lab[..., None] == cls
    if score is not None:
        t = torch.where(hit, score.to(x.dtype)[..., None], x.new_zeros(()))
    else:
        t = hit.to(x.dtype)
    ts = t * (1.0 - smoothing) + 0.5 * smoothing if smoothing else t
    per_class = isinstance(alpha, torch.Tensor)
    c0, c1, g, _, b, _ = kernel_scalars(loss_spec.kind, 0.0 if per_class else alpha, gamma, loss_spec.beta,
                                        loss_spec.iou_weighted)
    if per_class:
        a = alpha.to(x.dtype)
        c0, c1 = 1.0 - a, 2.0 * a - 1.0
    loss, grad = family_terms(x, t, ts, c0, c1, g, b, loss_spec.kind, want_grad)
    factor = None
    if w is not None:
        factor = w.to(x.dtype)[..., None]
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


@torch.no_grad()
def multilevel_focal_forward(levels, labels, weights, alpha, gamma, smoothing, ignore_index, num_anchors,
                             reduction, norm_mode=0, normalizer=None, norm_value=1.0, out_dtype=None, loss=LossSpec(),
                             with_stats=False, keep_grad=False):
    """The kernels' contract (`focal_triton.kernels.multilevel_focal.multilevel_focal_forward`), plus keep_grad
    ("sum" only): also return the gradient of the loss w.r.t. each level (upstream 1) as a last output, computed in
    the same pass where the fast path applies (`torch_path_fast.keeps_gradient`), else by the backward's code."""
    cdt = compute_dtype(levels[0].dtype)
    views = [_anchor_view(lv, num_anchors) for lv in levels]
    if reduction == "none":
        outs = [torch.empty_like(lv, dtype=out_dtype or lv.dtype) for lv in levels]
        out_views = [_anchor_view(o, num_anchors) for o in outs]
        for li, n, sl, lab, w, sc in _level_chunks(levels, labels, weights, num_anchors, loss.scores):
            value, _ = _chunk_terms(views[li][n, sl].to(cdt), lab, w, alpha, gamma, smoothing, ignore_index, False,
                                    loss, sc)
            out_views[li][n, sl] = value
        return outs
    num_images = levels[0].shape[0]
    if norm_mode == 0:
        scale = torch.full((num_images,), 1.0 / norm_value, dtype=cdt)
    elif norm_mode == 1:
        scale = (1.0 / normalizer.to(cdt)).reshape(1).expand(num_images)
    else:
        scale = 1.0 / (normalizer.to(cdt) * num_images)
    scale = scale.to(labels.device).contiguous()
    per_image, kept = None, None
    per_anchor = torch.empty(labels.shape, dtype=cdt, device=labels.device) if with_stats else None
    if loss.kind == FL and not with_stats and torch_path_fast.applicable(levels, weights, alpha):  # the common case
        fast = torch_path_fast.forward_sum(levels, labels, alpha, gamma, smoothing, ignore_index, num_anchors,
                                           with_grad=keep_grad, grad_scale=scale)
        if fast is not None:
            per_image, kept = fast
    if per_image is None:  # the general path (also where the fast one declines: None)
        sums = [[] for _ in range(num_images)]
        anchor_views = _per_level_anchor_views(per_anchor, levels, num_anchors) if with_stats else None
        for li, n, sl, lab, w, sc in _level_chunks(levels, labels, weights, num_anchors, loss.scores):
            value, _ = _chunk_terms(views[li][n, sl].to(cdt), lab, w, alpha, gamma, smoothing, ignore_index, False,
                                    loss, sc)
            sums[n].append(value.sum())
            if with_stats:
                anchor_views[li][n, sl] = value.sum(-1)
        per_image = torch.stack([torch.stack(s).double().sum() if s else torch.zeros((), dtype=torch.float64)
                                 for s in sums]) if num_images else torch.zeros(0, dtype=torch.float64)
    # Images added in float64, in order (a few terms; the chunk sums inside each are float32 cascade sums).
    total = (per_image.double() * scale.double()).sum().to(cdt)
    out = (total, scale) + ((per_anchor,) if with_stats else ())
    if keep_grad:
        if kept is None:
            kept = multilevel_focal_backward([torch.ones((), dtype=cdt)], levels, labels, weights, alpha, gamma,
                                             smoothing, ignore_index, num_anchors, scale=scale, loss=loss)
        out += (kept,)
    return out


@torch.no_grad()
def multilevel_focal_backward(grads, levels, labels, weights, alpha, gamma, smoothing, ignore_index, num_anchors,
                              scale=None, loss=LossSpec()):
    cdt = compute_dtype(levels[0].dtype)
    if loss.kind == FL and scale is not None and torch_path_fast.applicable(levels, weights, alpha):
        outs = torch_path_fast.backward_scalar(grads[0].to(cdt), scale.to(cdt), levels, labels, alpha, gamma,
                                               smoothing, ignore_index, num_anchors)
        if outs is not None:
            return outs
    views = [_anchor_view(lv, num_anchors) for lv in levels]
    outs = [torch.empty_like(lv) for lv in levels]
    out_views = [_anchor_view(o, num_anchors) for o in outs]
    grad_views = None if scale is not None else [_anchor_view(g, num_anchors) for g in grads]
    for li, n, sl, lab, w, sc in _level_chunks(levels, labels, weights, num_anchors, loss.scores):
        _, dfl = _chunk_terms(views[li][n, sl].to(cdt), lab, w, alpha, gamma, smoothing, ignore_index, True, loss,
                              sc)
        g = grads[0].to(cdt) * scale[n].to(cdt) if scale is not None else grad_views[li][n, sl].to(cdt)
        out_views[li][n, sl] = g * dfl
    return outs
