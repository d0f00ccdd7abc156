"""Class-index focal loss: a detector head's logits and its assigner's integer labels, in one fused pass.

`multilevel_focal_loss` takes the head's per-level outputs as they are, (N, A*C, H_l, W_l) each; `focal_loss` takes
the concatenated form (..., C) with labels (...). Per (anchor, class) with the hard target t = (label == class):

    FL = alpha_t (1 - p_t)**gamma BCE(x, t (1 - s) + s / 2),   p = sigmoid(x), p_t = p t + (1 - p)(1 - t),
    alpha_t = alpha t + (1 - alpha)(1 - t)   (alpha per class: alpha[c]; alpha = -1: 1)

times the anchor's weight; anchors labelled ignore_index contribute 0 (and get a zero gradient). Label smoothing s
moves only the BCE targets to s/2 and 1 - s/2 (apex's definition); modulation and alpha_t use the hard target.

`loss=` picks a relative of FL instead (the same kernel, another compile-time specialization): "fl_star" (FL*),
"qfl" (Quality Focal Loss) or "vfl" (Varifocal Loss); for the last two the per-element target is the anchor's score
(`scores`, e.g. the IoU of its box) on its label's class and 0 on the other classes.
"""
import torch

from . import validation as V
from .functional import autocast_upcast
from .multilevel_ops import multilevel_focal_loss_op
from .stats import loss_statistics
from .torch_path import compute_dtype

_NORMALIZER_DTYPES = (torch.int64,)


def _prepare_normalizer(normalizer, num_images, dtype):
    """(tensor or None, host number): tensors kept on the device (never read), in the compute dtype or int64."""
    if not isinstance(normalizer, torch.Tensor):
        return None, 1.0 if normalizer is None else float(normalizer)
    t = normalizer
    # A (1,) tensor for N != 1 images is one number. Compared as "not N" (not "== 1"): a per-image normalizer has
    # N's own symbolic size under torch.compile, so this needs no guard on N's value (no recompile per batch size).
    if t.dim() == 1 and not (t.shape[0] == num_images):
        t = t.reshape(())
    if t.dtype not in _NORMALIZER_DTYPES + (dtype,):
        t = t.to(dtype)
    return t.contiguous(), 1.0


def multilevel_focal_loss(level_logits, labels, num_anchors, *, alpha=None, gamma=None, weights=None,
                          label_smoothing=0.0, background=-1, ignore_index=-2, normalizer=None, reduction="sum",
                          check_labels=True, loss="fl", scores=None, beta=None, iou_weighted=None,
                          return_stats=False):
    r"""Focal loss of every FPN level of a dense detector's classification head, in one kernel launch.

    Args:
        level_logits: 1 to 8 tensors (N, A*C, H_l, W_l), channel a*C + c = class c of anchor a, each
            NCHW-contiguous or channels_last (read in place; any other layout is copied once). Same dtype
            (float16 / bfloat16 / float32 / float64), device, N and channels.
        labels: (N, M) int32 or int64, M = sum_l H_l W_l A, in torchvision's and detectron2's anchor order
            (levels in order; inside a level (h, w, a) row-major). 0 <= label < C: positive of that class;
            background: negative for every class; ignore_index: no loss, zero gradient.
        num_anchors: A.
        alpha: weight of positives in [0, 1], -1 for none, or a (C,) tensor of per-class weights. Default 0.25
            (loss="fl"; see `loss` for the others).
        gamma: focusing exponent >= 0 (integer gamma costs no pow). Default 2 (loss="fl").
        weights: optional (N, M) per-anchor weights, multiplying the loss of every class of the anchor.
        label_smoothing: s in [0, 1): BCE targets s/2 and 1 - s/2 (apex); modulation from the hard target.
        background: the label of negatives (default -1: torchvision, apex; C for detectron2 and mmdet).
        ignore_index: the label of ignored anchors, or None (default -2: torchvision, apex; -1 for detectron2).
        normalizer: None; a number or 0-d tensor Z: loss = sum / Z (detectron2, mmdet's avg_factor, FCOS); or an
            (N,) tensor: loss = mean over images n of (sum over image n) / Z_n (torchvision's RetinaNet). Tensors
            stay on the device and are never read on the host. With reduction="sum" only.
        reduction: "sum" (default): a 0-d float32 loss (float64 for float64 logits); "none": the per-level
            losses, each with its level's shape, layout and dtype (float32 under torch.autocast).
        check_labels: verify that every label is a class, the background or the ignore value (one host sync);
            False skips it (for CUDA-graph capture): unknown labels then act as background.
        loss: "fl" (default), "fl_star" (FL*: alpha as FL's, default -1; gamma > 0, default 1; beta, default 0),
            "qfl" (beta >= 0, default 2; no alpha / gamma) or "vfl" (alpha of the negatives >= 0, default 0.75;
            gamma, default 2; iou_weighted, default True). label_smoothing is FL's only. Options a loss does not
            take must stay None.
        scores: "qfl" / "vfl" only (and required there): (N, M) float target score of each anchor's label, in
            [0, 1] (e.g. the IoU of a positive's box; anything for background and ignored anchors). No gradient.
        beta, iou_weighted: see `loss`.
        return_stats: also return a `focal_triton.stats.LossStatistics` (per level: numbers of positive, negative
            and ignored anchors and their summed loss; histograms of the per-anchor loss of positives and
            negatives), from the same kernel pass, left on the device. reduction="sum" only.

    Returns:
        The loss (see reduction), or (loss, statistics) with return_stats. Gradients flow to the logits only, each
        level's in its own layout and dtype.
    """
    V.check_level_logits(level_logits, num_anchors)
    first = level_logits[0]
    num_images, num_classes = first.shape[0], first.shape[1] // num_anchors
    num_anchors_total = sum(x.shape[2] * x.shape[3] for x in level_logits) * num_anchors
    return _class_index_loss(list(level_logits), labels, num_anchors, num_images,
                             num_classes, (num_images, num_anchors_total), "N, sum of H*W*A over levels", alpha,
                             gamma, weights, label_smoothing, background, ignore_index, normalizer, reduction,
                             check_labels, loss_options=(loss, scores, beta, iou_weighted), return_stats=return_stats)


def focal_loss(logits, labels, *, alpha=None, gamma=None, weights=None, label_smoothing=0.0, background=-1,
               ignore_index=-2, normalizer=None, reduction="sum", check_labels=True, loss="fl", scores=None,
               beta=None, iou_weighted=None, return_stats=False):
    r"""Focal loss of concatenated head outputs (..., C) with integer labels (...): the form of torchvision's and
    detectron2's concatenated logits, of mmcv and of apex. Same arguments and semantics as
    `multilevel_focal_loss`; the images are the first dim when logits have 3 or more dims ((N, M, C); a per-image
    normalizer is then (N,)), and a 2-D (M, C) input is one image. weights and scores have the labels' shape.
    "none" returns a loss of the logits' shape and dtype. return_stats: (loss, statistics) with a single level.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., C) with C >= 1 classes, got {tuple(logits.shape)}")
    if logits.dtype not in V.LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    num_classes = logits.shape[-1]
    num_images = logits.shape[0] if logits.dim() >= 3 else 1
    rows = logits.numel() // num_classes // num_images if num_images else 0
    x = logits.contiguous()
    # (N, M, C) storage is a channels_last (N, C, M, 1) head output with one anchor per position: a view, no copy.
    level = x.reshape(num_images, rows, 1, num_classes).permute(0, 3, 1, 2)
    if rows * num_classes > V.INT32_MAX:
        raise ValueError(f"logits: one image must have < 2**31 logits, got {rows * num_classes}")
    V.check_labels_tensor(labels, logits.shape[:-1], logits.device, "logits.shape[:-1]")
    V.check_weights(weights, logits.shape[:-1], logits.device)
    flat_labels = labels.reshape(num_images, rows)
    flat_weights = weights.reshape(num_images, rows) if weights is not None else None
    V.check_scores(scores, loss, logits.shape[:-1], logits.device)
    flat_scores = scores.reshape(num_images, rows) if scores is not None else None
    out = _class_index_loss([level], flat_labels, 1, num_images, num_classes, (num_images, rows), None, alpha,
                            gamma, flat_weights, label_smoothing, background, ignore_index, normalizer, reduction,
                            check_labels, labels_checked=True, loss_options=(loss, flat_scores, beta, iou_weighted),
                            return_stats=return_stats)
    if reduction == "none":
        return out[0].permute(0, 2, 3, 1).reshape(logits.shape)
    return out


def _class_index_loss(levels, labels, num_anchors, num_images, num_classes, label_shape, label_what, alpha, gamma,
                      weights, label_smoothing, background, ignore_index, normalizer, reduction, check_labels,
                      labels_checked=False, loss_options=("fl", None, None, None), return_stats=False):
    first = levels[0]
    device = first.device
    loss, scores, beta, iou_weighted = loss_options
    if not labels_checked:
        V.check_labels_tensor(labels, label_shape, device, label_what)
        V.check_weights(weights, label_shape, device)
        V.check_scores(scores, loss, label_shape, device)
    kind, alpha, gamma, beta, iou_weighted, smoothing, reduction = V.check_class_index_options(
        loss, alpha, gamma, beta, iou_weighted, label_smoothing, background, ignore_index, reduction, check_labels,
        return_stats, num_classes, device)
    normalizer = V.check_normalizer(normalizer, num_images, device, reduction)
    if check_labels and labels.numel():
        V.check_label_range(labels, num_classes, background, ignore_index)

    cdt = compute_dtype(first.dtype)
    alpha_tensor = None
    if isinstance(alpha, torch.Tensor):
        alpha_tensor, alpha = alpha.detach().to(cdt).contiguous(), 0.0
    if weights is not None:
        weights = weights.to(cdt).contiguous()
    if scores is not None:
        scores = scores.detach().to(cdt).contiguous()
    norm_tensor, norm_value = _prepare_normalizer(normalizer, num_images, cdt)
    out = multilevel_focal_loss_op(list(levels), labels.contiguous(), weights, alpha_tensor, float(alpha), gamma,
                                   smoothing, 0 if ignore_index is None else int(ignore_index),
                                   ignore_index is not None, num_anchors, norm_tensor, norm_value, reduction,
                                   autocast_upcast(first), kind, beta, iou_weighted, scores, return_stats,
                                   torch.is_grad_enabled() and any(lv.requires_grad for lv in levels))
    if return_stats:
        level_anchors = [x.shape[2] * x.shape[3] * num_anchors for x in levels]
        return out[0], loss_statistics(out[2], labels, level_anchors, num_classes, ignore_index, gamma,
                                       alpha_tensor if alpha_tensor is not None else alpha, loss)
    return out if reduction == "none" else out[0]
