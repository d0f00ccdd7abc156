"""The public functions of focal_triton: the dense losses (drop-ins for torchvision's and fvcore's, mmdet's QFL and
VFL), the class-index losses of a detector head (`multilevel_focal_loss` on the per-level outputs, `focal_loss`
on concatenated (..., C) logits) and the focal matching cost of Hungarian matchers (`focal_matching_cost`).

Each function checks and encodes its arguments (`validation`), calls its registered op (`ops`) and shapes the
result; the formulas are in each docstring and in `losses`.

Class-index forms, per (anchor, class) with the hard target t = (label == class):

    FL = alpha_t (1 - p_t)**gamma BCE(x, t (1 - s) + s / 2),   p = sigmoid(x), p_t = p t + (1 - p)(1 - t),
    alpha_t = alpha t + (1 - alpha)(1 - t)   (alpha per class: alpha[c]; alpha = -1: 1)

times the anchor's weight; anchors labelled ignore_index contribute 0 (and get a zero gradient). Label smoothing s
moves only the BCE targets to s/2 and 1 - s/2 (apex's definition); modulation and alpha_t use the hard target.
`loss=` picks a relative of FL instead (the same kernel, another compile-time specialization): "fl_star" (FL*),
"qfl" (Quality Focal Loss) or "vfl" (Varifocal Loss); for the last two the per-element target is the anchor's score
(`scores`, e.g. the IoU of its box) on its label's class and 0 on the other classes.
"""
from typing import NamedTuple, Optional, Union

import torch

from . import validation as V
from .losses import LossKind
from .ops.dense import sigmoid_focal_loss as _dense
from .ops.matching import focal_matching_cost as _matching_cost
from .ops.multilevel import multilevel_focal_loss as _class_index
from .ops.multilevel import segmented_focal_loss as _segments
from .stats import loss_statistics


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> torch.Tensor:
    r"""Sigmoid focal loss of Lin et al., "Focal Loss for Dense Object Detection" (2017), fused in one kernel.

    A drop-in for ``torchvision.ops.sigmoid_focal_loss`` (same signature, defaults, semantics and errors)::

        p   = sigmoid(inputs)
        p_t = p * targets + (1 - p) * (1 - targets)
        FL  = alpha_t * (1 - p_t) ** gamma * BCE_with_logits(inputs, targets)
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets), or 1 when alpha = -1

    Args:
        inputs: logits of any shape, float16, bfloat16, float32 or float64. The math runs in float32 (float64 for
            float64 logits); alpha and gamma enter the kernels as float32 scalars.
        targets: float tensor of the same shape and device, 0/1 or soft targets in [0, 1]. No gradient flows to it.
        alpha: weight of positives in [0, 1], or -1 for no weighting. Default 0.25.
        gamma: focusing exponent >= 0. Integer gamma costs no pow. Default 2.
        reduction: ``"none"`` (loss of inputs' shape), ``"mean"`` or ``"sum"`` (0-d). Default ``"none"``.

    Returns:
        The loss in inputs' dtype (float32 under ``torch.autocast``, as torchvision's there); for ``"none"`` in
        inputs' memory layout when inputs are dense (channels_last, permuted views), contiguous otherwise. Empty
        inputs give an empty loss, a sum of 0 and a mean of NaN.

    Numerics beyond torchvision: finite for logits of any magnitude, 0 at x = +inf with target 1 (and x = -inf with
    target 0) where the eager formula gives NaN; gradients finite for every gamma >= 0, including 0 < gamma < 1 as
    p_t -> 1. NaN in gives NaN out. Sum and mean are deterministic (fixed-order partial sums, no atomics).
    """
    if torch.jit.is_scripting():  # the registered op whose kernel is this function (focal_triton.torchscript)
        return torch.ops.focal_triton.api_sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)
    return _dense(V.dense_call(LossKind.FL, inputs, targets, reduction, alpha, gamma))


def sigmoid_focal_loss_star(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = -1, gamma: float = 1.0,
                            beta: float = 0.0, reduction: str = "none") -> torch.Tensor:
    r"""FL* of Lin et al. (2017), appendix A, fused in one kernel; beta = 0 is fvcore's ``sigmoid_focal_loss_star``
    (same signature, defaults and numbers)::

        x_t = inputs * (2 targets - 1)            (x for targets = 1, -x for targets = 0: fvcore's form)
        FL* = -alpha_t log(sigmoid(gamma x_t + beta)) / gamma = alpha_t softplus(-(gamma x_t + beta)) / gamma

    Args:
        inputs, targets, reduction: as :func:`sigmoid_focal_loss` (targets 0/1; soft targets use fvcore's x_t).
        alpha: alpha_t weighting as in FL, in [0, 1], or -1 for none (default -1, fvcore's).
        gamma: > 0 (default 1). beta: any finite number (default 0).

    Finite for logits of any magnitude where the formula's limit is (0 as gamma x_t + beta -> +inf), with finite
    gradients; NaN propagates.
    """
    if torch.jit.is_scripting():  # the registered op whose kernel is this function (focal_triton.torchscript)
        return torch.ops.focal_triton.api_sigmoid_focal_loss_star(inputs, targets, alpha, gamma, beta, reduction)
    return _dense(V.dense_call(LossKind.FL_STAR, inputs, targets, reduction, alpha, gamma, beta))


def quality_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, beta: float = 2.0,
                       reduction: str = "none") -> torch.Tensor:
    r"""Quality Focal Loss of Li et al., "Generalized Focal Loss" (2020), with dense soft targets, fused::

        sigma = sigmoid(inputs), y = targets (the IoU score on the positive's class, 0 elsewhere)
        QFL = -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log(sigma)) = |y - sigma|^beta BCE_with_logits(x, y)

    Elementwise: mmdet's ``quality_focal_loss`` (label, score) and tensor-target forms return this summed over the
    classes (dim 1), i.e. ``quality_focal_loss(...).sum(-1)``; for the class-index form use
    ``focal_loss(..., loss="qfl", scores=...)``.

    Args:
        inputs, reduction: as :func:`sigmoid_focal_loss`.
        targets: soft scores y in [0, 1], same shape. No gradient flows to it.
        beta: exponent >= 0 (default 2); integer beta costs no pow.

    Saturated logits give the formula's limit (0, or inf where y is strictly between 0 and 1 or opposite to the
    logit's sign) with a finite gradient; NaN propagates.
    """
    if torch.jit.is_scripting():  # the registered op whose kernel is this function (focal_triton.torchscript)
        return torch.ops.focal_triton.api_quality_focal_loss(inputs, targets, beta, reduction)
    return _dense(V.dense_call(LossKind.QFL, inputs, targets, reduction, beta=beta))


def varifocal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0,
                   iou_weighted: bool = True, reduction: str = "none") -> torch.Tensor:
    r"""Varifocal Loss of Zhang et al., "VarifocalNet" (2021), with dense IoU-aware targets q, fused::

        p = sigmoid(inputs), q = targets
        VFL = -q (q log p + (1 - q) log(1 - p)) = q BCE_with_logits(x, q)    where q > 0
              -alpha p^gamma log(1 - p)        = alpha p^gamma BCE(x, 0)     where q = 0

    mmdet's ``varifocal_loss`` (same numbers, elementwise before its reduction); iou_weighted=False weights the
    positives by 1 instead of q (mmdet's ``iou_weighted=False``).

    Args:
        inputs, reduction: as :func:`sigmoid_focal_loss`.
        targets: q in [0, 1], same shape (0 for negatives). No gradient flows to it.
        alpha: weight of the negatives, >= 0 (default 0.75). gamma: exponent >= 0 (default 2).
        iou_weighted: weight positives by q (default True) or by 1.
    """
    if torch.jit.is_scripting():  # the registered op whose kernel is this function (focal_triton.torchscript)
        return torch.ops.focal_triton.api_varifocal_loss(inputs, targets, alpha, gamma, iou_weighted, reduction)
    return _dense(V.dense_call(LossKind.VFL, inputs, targets, reduction, alpha, gamma,
                                    iou_weighted=iou_weighted))


def multilevel_focal_loss(level_logits, labels, num_anchors, *, alpha=None, gamma=None, weights=None,
                          label_smoothing=0.0, background=-1, ignore_index=-2, normalizer=None, reduction="sum",
                          check_labels=True, loss="fl", scores=None, beta=None, iou_weighted=None,
                          return_stats=False, class_weights=None, detach_weight=None):
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
            gamma, default 2; iou_weighted, default True); the DETR / YOLO losses below, with p = sigmoid(x),
            hit = the label's class, s = the anchor's score, p_d = p without gradient:
              "bce": class_weights[c] BCE(x, hit ? s : 0) (ultralytics' v8DetectionLoss on its task-aligned
                  soft targets; class_weights: optional (C,) tensor; scores optional: 1 without);
              "vfl_rtdetr": hit ? s BCE(x, s) : alpha p**gamma BCE(x, 0) (alpha 0.75, gamma 2), with p**gamma
                  detached (detach_weight=True, default: transformers' and D-FINE's RT-DETR loss) or not
                  (detach_weight=False: ultralytics' VarifocalLoss);
              "mal": hit ? BCE(x, s**gamma) : alpha p_d**gamma BCE(x, 0) (DEIMv2's matching-aware loss; alpha
                  its mal_alpha, default 1; gamma > 0, default 1.5);
              "ia_bce": hit ? BCE(x, max(p_d**alpha s**(1 - alpha), 0.01)) : p**gamma BCE(x, 0) (LW-DETR's and
                  RF-DETR's IoU-aware BCE; alpha in [0, 1], default 0.25; gamma 2; the negatives' p**gamma keeps
                  its gradient).
            label_smoothing is FL's only. Options a loss does not take must stay None.
        scores: "qfl" / "vfl" / "vfl_rtdetr" / "mal" / "ia_bce" (required there) and "bce" (optional): (N, M)
            float target score of each anchor's label, in [0, 1] (e.g. the IoU of a positive's box; anything for
            background and ignored anchors). No gradient.
        beta, iou_weighted, class_weights, detach_weight: see `loss`.
        return_stats: also return a `focal_triton.stats.LossStatistics` (per level: numbers of positive, negative
            and ignored anchors and their summed loss; histograms of the per-anchor loss of positives and
            negatives), from the same kernel pass, left on the device. reduction="sum" only.

    Returns:
        The loss (see reduction), or (loss, statistics) with return_stats. Gradients flow to the logits only, each
        level's in its own layout and dtype.
    """
    options = dict(alpha=alpha, gamma=gamma, weights=weights, label_smoothing=label_smoothing, background=background,
                   ignore_index=ignore_index, normalizer=normalizer, reduction=reduction, check_labels=check_labels,
                   loss=loss, scores=scores, beta=beta, iou_weighted=iou_weighted, return_stats=return_stats,
                   class_weights=class_weights, detach_weight=detach_weight)
    return _result(V.multilevel_call(level_logits, labels, num_anchors, options))


def focal_loss(logits, labels, *, alpha=None, gamma=None, weights=None, label_smoothing=0.0, background=-1,
               ignore_index=-2, normalizer=None, reduction="sum", check_labels=True, loss="fl", scores=None,
               beta=None, iou_weighted=None, return_stats=False, class_weights=None, detach_weight=None):
    r"""Focal loss of concatenated head outputs (..., C) with integer labels (...): the form of torchvision's and
    detectron2's concatenated logits, of mmcv and of apex. Same arguments and semantics as
    `multilevel_focal_loss`; the images are the first dim when logits have 3 or more dims ((N, M, C); a per-image
    normalizer is then (N,)), and a 2-D (M, C) input is one image. weights and scores have the labels' shape.
    "none" returns a loss of the logits' shape and dtype. return_stats: (loss, statistics) with a single level.
    """
    options = dict(alpha=alpha, gamma=gamma, weights=weights, label_smoothing=label_smoothing, background=background,
                   ignore_index=ignore_index, normalizer=normalizer, reduction=reduction, check_labels=check_labels,
                   loss=loss, scores=scores, beta=beta, iou_weighted=iou_weighted, return_stats=return_stats,
                   class_weights=class_weights, detach_weight=detach_weight)
    out = _result(V.flat_call(logits, labels, options))
    if reduction == "none":
        return out[0].permute(0, 2, 3, 1).reshape(logits.shape)
    return out


class Segment(NamedTuple):
    """One head output of a `segmented_focal_loss` call and its targets.

    logits: (N, Q, C) (decoder queries, anchor points: any strides, e.g. ``stacked[l]`` of (L, N, Q, C),
        ``stacked[:, l]`` of (N, L, Q, C), ``x[:, :num_dn]``, or ultralytics' class-major (N, C, A) scores as
        ``scores.permute(0, 2, 1)``) or (N, A*C, H, W) (a conv head's level: NCHW, channels_last or any view).
    labels: (N, Q) or (N, H*W*A) int32 / int64 class indices ((h, w, a) row-major), background or ignore_index.
    weights: optional (N, Q) per-anchor weights. scores: (N, Q) target scores ("qfl", "vfl" only; required there).
    normalizer: None, a number, a 0-d tensor (loss = sum / Z) or an (N,) tensor (loss = mean over images of
        sum_n / Z_n), as in `multilevel_focal_loss`; never read on the host.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    weights: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    normalizer: Union[None, float, torch.Tensor] = None


class SegmentLosses(NamedTuple):
    """`segmented_focal_loss`'s result: the sum of the segments' losses (0-d) and each segment's loss (S,)."""

    total: torch.Tensor
    per_segment: torch.Tensor


def segmented_focal_loss(segments, *, num_anchors=1, alpha=None, gamma=None, label_smoothing=0.0, background=-1,
                         ignore_index=-2, check_labels=True, loss="fl", beta=None, iou_weighted=None,
                         class_weights=None, detach_weight=None):
    r"""The class-index focal loss (or a relative, `loss=`) of several head outputs in one kernel launch: the
    decoder layers, encoder and denoising groups of a DETR, the one-to-many and one-to-one heads of a YOLO, the
    levels of an FPN. Each `Segment` brings its own logits (read in place, whatever their strides), labels, weights
    / scores and normalizer; per segment s (formulas as `multilevel_focal_loss`)

        loss_s = sum over its anchors and classes of FL / normalizer_s,      total = sum_s loss_s

    in fixed order (deterministic, no atomics, no host sync). Labels that are consecutive column slices of one
    tensor (FPN levels: ``labels[:, start:end]``) are read in place, others are concatenated once (1/C of the
    logits' bytes).

    Args:
        segments: 1 to 16 `Segment`\ s (or tuples in its field order, or dicts of its fields) sharing dtype,
            device, N and C.
        num_anchors: A of 4-D logits (N, A*C, H, W); 3-D logits need A = 1 (the default).
        alpha, gamma, label_smoothing, background, ignore_index, check_labels, loss, beta, iou_weighted,
            class_weights, detach_weight: as `multilevel_focal_loss`, shared by the segments (e.g. ultralytics'
            YOLO: loss="bce" with the assigner's soft scores; RT-DETR: loss="vfl_rtdetr" with the IoU scores).

    Returns:
        `SegmentLosses(total, per_segment)`: float32 (float64 for float64 logits) 0-d and (S,). Gradients flow to
        every segment's logits (from either output), written in the logits' own strides where they are dense and
        image by image with the logits' strides within an image where they are a view with gaps. Segments that
        are disjoint slices of one tensor (a stacked decoder output) are differentiated through that tensor: one
        gradient of its size, no view-backward copies (autograd.grad w.r.t. such a view sees none).
    Errors: a ValueError or TypeError naming the segment and the argument (``segments[3].labels must have shape
    ...``), before anything runs.
    """
    options = dict(alpha=alpha, gamma=gamma, label_smoothing=label_smoothing, background=background,
                   ignore_index=ignore_index, check_labels=check_labels, loss=loss, beta=beta,
                   iou_weighted=iou_weighted, class_weights=class_weights, detach_weight=detach_weight)
    total, per_segment = _segments(V.segments_call(segments, num_anchors, options))
    return SegmentLosses(total, per_segment)


def _result(call):
    """The op's outputs as the public functions return them: the per-level losses ("none"), the loss, or (loss,
    statistics)."""
    out = _class_index(call)
    if call.reduction == "none":
        return out
    if call.with_stats:
        alpha = call.alpha_per_class if call.alpha is None else call.alpha
        return out[0], loss_statistics(out[2], call.labels, call.levels, call.num_anchors, call.num_classes,
                                       call.ignore_index, call.gamma, alpha, call.loss_name)
    return out[0]


def focal_matching_cost(logits, labels, alpha: float = 0.25, gamma: float = 2.0, *, check_labels: bool = True):
    r"""The focal classification cost of the Hungarian matchers of DETR-style detectors, fused and numerically
    stable: for every query q and target g,

        cost[q, g] = alpha (1 - p)**gamma (-log p) - (1 - alpha) p**gamma (-log(1 - p)),
        p = sigmoid(logits[q, labels[g]])

    the cost of RT-DETR, D-FINE, DEIM, Deformable / Conditional / DAB-DETR (transformers' RTDetrHungarianMatcher
    in transformers/loss/loss_rt_detr.py, DeformableDetrHungarianMatcher in loss_deformable_detr.py). Those write
    -log(p + 1e-8) and -log(1 - p + 1e-8) of a probability in the logits' dtype; here -log p = softplus(-x) and
    -log(1 - p) = softplus(x), so the cost is finite for every finite logit of every dtype and keeps falling with
    the logit (the stock formula stops at -(1 - alpha) log(1e8) ~ -13.8 once p rounds to 1: from x ~ 6 in bf16,
    ~17 in float32; it is -inf / +inf for fp16 logits beyond ~8.3 / below ~-17), and equal to it up to that 1e-8
    for moderate logits.
    Grounding DINO's cost is ``focal_matching_cost(logits, torch.arange(C)) @ label_maps.T``.

    Args:
        logits: (..., C) classification logits, e.g. (B, Q, C) or the matchers' (B*Q, C); the leading dims are
            flattened into N queries (a view where they allow one, else one copy). float16, bfloat16, float32 or
            float64, any strides. Never differentiated: a tensor that requires grad is read detached.
        labels: (G,) int32 or int64 class indices in [0, C) of the batch's targets, concatenated over its images
            (the matchers' ``torch.cat([v["class_labels"] for v in targets])``).
        alpha: weight of the positive term, in [0, 1]. Default 0.25. gamma: exponent >= 0 (integer gamma costs
            no pow). Default 2. Both enter the kernel as float32 scalars.
        check_labels: verify that every label lies in [0, C) (one host sync; a device-side assertion inside
            torch.compile). False skips it (CUDA-graph capture): a label out of range then gives a NaN column.

    Returns:
        The (N, G) cost, contiguous, float32 (float64 for float64 logits), not requiring grad; (N, 0) or (0, G)
        for empty inputs. The (N, C) probabilities are never formed: each cost reads its one logit. +-inf logits
        give the formula's limit (-inf / +inf, or 0 where alpha = 1 / 0 removes the infinite term); NaN gives NaN.
        Deterministic (no reduction).
    """
    return _matching_cost(V.matching_call(logits, labels, alpha, gamma, check_labels))
