"""Float64 references of the classification losses of today's DETR and YOLO detectors, transcribed from the libraries
that define them (the file and function named in each docstring), as elementwise (..., C) losses before their
reduction. Independent of focal_triton (this module never imports it). Gradients come from autograd through these
float64 graphs, so a `.detach()` of the library stays a detach here.

Common arguments: logits (..., C); labels (...) with background = any value outside [0, C) (the libraries write
num_classes there and drop the extra one-hot column); ious (...) the matched box's IoU of each query (anything for
background queries, as the libraries multiply it by the one-hot target).
"""
import torch
import torch.nn.functional as F


def _one_hot(logits, labels):
    """The libraries' `F.one_hot(target_classes, num_classes + 1)[..., :-1]` for labels outside [0, C) mapped to C."""
    c = logits.shape[-1]
    labels = labels.long()
    labels = torch.where((labels >= 0) & (labels < c), labels, torch.full_like(labels, c))
    return F.one_hot(labels, c + 1)[..., :-1].double()


def yolo_bce(logits, labels, ious, class_weights=None):
    """ultralytics/utils/loss.py v8DetectionLoss: `self.bce(pred_scores, target_scores)` with
    `nn.BCEWithLogitsLoss(reduction="none")` and target_scores = one-hot(labels) * the assigner's normalized
    alignment metric (`ious` here); a per-class weight (C,) multiplies each class's term (BCE's `weight`)."""
    x = logits.double()
    target_scores = _one_hot(x, labels) * ious.double()[..., None]
    weight = None if class_weights is None else class_weights.double().expand_as(x)
    return F.binary_cross_entropy_with_logits(x, target_scores, weight=weight, reduction="none")


def detr_bce(logits, labels):
    """transformers/loss/loss_rt_detr.py RTDetrLoss.loss_labels_bce: BCE-with-logits against the one-hot target."""
    x = logits.double()
    return F.binary_cross_entropy_with_logits(x, _one_hot(x, labels) * 1.0, reduction="none")


def rtdetr_vfl(logits, labels, ious, alpha=0.75, gamma=2.0):
    """transformers/loss/loss_rt_detr.py RTDetrLoss.loss_labels_vfl (D-FINE's the same):
    target_score = ious * one_hot, pred_score = sigmoid(logits).detach(),
    weight = alpha * pred_score**gamma * (1 - target) + target_score, BCE-with-logits(logits, target_score, weight)."""
    x = logits.double()
    target = _one_hot(x, labels)
    target_score = ious.double()[..., None] * target
    pred_score = torch.sigmoid(x.detach())
    weight = alpha * pred_score.pow(gamma) * (1 - target) + target_score
    return F.binary_cross_entropy_with_logits(x, target_score, weight=weight, reduction="none")


def ultralytics_vfl(logits, labels, ious, alpha=0.75, gamma=2.0):
    """ultralytics/utils/loss.py VarifocalLoss.forward(pred_score, gt_score, label): the weight
    `alpha * pred_score.sigmoid().pow(gamma) * (1 - label) + gt_score * label` is not detached."""
    x = logits.double()
    label = _one_hot(x, labels)
    gt_score = ious.double()[..., None] * label
    weight = alpha * x.sigmoid().pow(gamma) * (1 - label) + gt_score * label
    return F.binary_cross_entropy_with_logits(x, gt_score, reduction="none") * weight


def deim_mal(logits, labels, ious, alpha=1.0, gamma=1.5):
    """transformers/loss/loss_deim.py DEIMLoss.loss_labels_mal (DEIM / DEIMv2's matching-aware loss):
    target_score = (ious * one_hot)**gamma, pred_score = sigmoid(logits).detach(),
    weight = mal_alpha * pred_score**gamma * (1 - target) + target (mal_alpha None: 1)."""
    x = logits.double()
    target = _one_hot(x, labels)
    target_score = (ious.double()[..., None] * target).pow(gamma)
    pred_score = torch.sigmoid(x).detach()
    weight = alpha * pred_score.pow(gamma) * (1 - target) + target
    return F.binary_cross_entropy_with_logits(x, target_score, weight=weight, reduction="none")


def lwdetr_ia_bce(logits, labels, ious, alpha=0.25, gamma=2.0):
    """rfdetr/models/lwdetr.py SetCriterion.loss_labels, ia_bce_loss branch (LW-DETR's the same): prob =
    sigmoid(logits), neg_weights = prob**gamma (not detached), at the matched (query, class) t =
    clamp(prob**alpha * iou**(1 - alpha), 0.01).detach(), pos_weights = t, neg_weights = 1 - t; loss =
    neg_weights * logits - logsigmoid(logits) * (pos_weights + neg_weights)."""
    x = logits.double()
    prob = x.sigmoid()
    hit = _one_hot(x, labels).bool()
    t = torch.clamp(prob.pow(alpha) * ious.double()[..., None].pow(1 - alpha), 0.01).detach()
    pos_weights = torch.where(hit, t, torch.zeros_like(x))
    neg_weights = torch.where(hit, 1 - t, prob.pow(gamma))
    return neg_weights * x - F.logsigmoid(x) * (pos_weights + neg_weights)


REFERENCES = {"bce": yolo_bce, "vfl_rtdetr": rtdetr_vfl, "vfl_rtdetr_grad": ultralytics_vfl, "mal": deim_mal,
              "ia_bce": lwdetr_ia_bce}
