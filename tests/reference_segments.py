"""Float64 reference of the segmented loss, independent of focal_triton (this module never imports it): each
segment's logits flattened by hand to (N, M_s, C) (a conv level: torchvision's permute + reshape; (N, Q, C) as it
is), the flat class-index reference on each, the per-segment losses stacked and summed."""
import torch
from reference_multilevel import flatten_levels, focal_loss_ref
from reference_detr import rtdetr_vfl, yolo_bce
from reference_variants import class_index_ref

# The DETR / YOLO kinds: the libraries' elementwise losses (tests/reference_detr.py).
DETR_KINDS = {"bce": lambda x, lab, s, **kw: yolo_bce(x, lab, torch.ones(lab.shape) if s is None else s, **kw),
              "vfl_rtdetr": rtdetr_vfl}


def segment_flat(logits, num_anchors=1):
    x = logits.double()
    return x if x.dim() == 3 else flatten_levels([x], num_anchors)


def segments_ref(segments, num_anchors=1, loss="fl", **kwargs):
    """(total, per-segment losses) in float64; segments as (logits, labels, weights, scores, normalizer)."""
    per = []
    for logits, labels, weights, scores, normalizer in segments:
        x = segment_flat(logits, num_anchors)
        if loss == "fl":
            per.append(focal_loss_ref(x, labels, weights=weights, normalizer=normalizer, **kwargs))
        elif loss in DETR_KINDS:
            kw = dict(kwargs)
            ignore_index = kw.pop("ignore_index", -2)
            el = DETR_KINDS[loss](x, labels, scores, **kw)
            if weights is not None:
                el = el * weights.double()[..., None]
            el = torch.where((labels != ignore_index)[..., None], el, torch.zeros_like(el))
            per.append(el.sum() / (1.0 if normalizer is None else normalizer))
        else:
            per.append(class_index_ref(loss, x, labels, scores=scores, weights=weights, normalizer=normalizer,
                                       **kwargs))
    per = torch.stack(per)
    return per.sum(), per


def segments_value_and_grads(leaves, make_segments, upstream_total=1.0, upstream_per_segment=None, **kwargs):
    """Reference (total, per-segment) and the float64 gradients w.r.t. `leaves` of
    upstream_total * total + sum_s upstream_per_segment[s] * loss_s; make_segments(leaves) builds the segments
    from the (float64 copies of the) leaves, as the test built them from its own tensors."""
    doubles = [t.detach().double().requires_grad_(True) for t in leaves]
    total, per = segments_ref(make_segments(doubles), **kwargs)
    objective = upstream_total * total
    if upstream_per_segment is not None:
        objective = objective + (upstream_per_segment.double() * per).sum()
    grads = torch.autograd.grad(objective, doubles, allow_unused=True)
    return total, per, [torch.zeros_like(d) if g is None else g for g, d in zip(grads, doubles)]
