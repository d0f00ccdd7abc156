"""Float64 references of the relatives of the focal loss, written from the papers' formulas, and of the libraries a
user may switch from (fvcore, mmdet), transcribed from their published source. Independent of focal_triton (this
module never imports it). Valid for finite logits; the tests state the limits at +-inf by hand. Gradients come from
autograd through these float64 graphs.
"""
import torch
import torch.nn.functional as F
from reference_detr import REFERENCES as DETR_REFERENCES


# ---- the papers -------------------------------------------------------------------------------------------------

def focal_star_ref(x, t, alpha=-1.0, gamma=1.0, beta=0.0):
    """FL* (Lin et al. 2017, appendix A): x_t = x for t = 1, -x for t = 0 (x (2t - 1) for soft t, as fvcore),
    FL* = -log(sigmoid(gamma x_t + beta)) / gamma, times alpha_t = alpha t + (1 - alpha)(1 - t) when alpha >= 0
    (alpha a number, or a tensor of per-class values along the last dim)."""
    x, t = x.double(), t.double()
    loss = -F.logsigmoid(gamma * x * (2 * t - 1) + beta) / gamma
    if isinstance(alpha, torch.Tensor):  # per class (last dim)
        alpha = alpha.double()
        return (alpha * t + (1 - alpha) * (1 - t)) * loss
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def quality_focal_ref(x, y, beta=2.0):
    """QFL (Li et al. 2020, eq. 3): -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log(sigma)), sigma = sigmoid(x)."""
    x, y = x.double(), y.double()
    sigma = torch.sigmoid(x)
    return -(y - sigma).abs() ** beta * ((1 - y) * F.logsigmoid(-x) + y * F.logsigmoid(x))


def varifocal_ref(x, q, alpha=0.75, gamma=2.0, iou_weighted=True):
    """VFL (Zhang et al. 2021, eq. 2): -q (q log p + (1 - q) log(1 - p)) where q > 0, -alpha p^gamma log(1 - p)
    where q = 0; positives weighted by 1 instead of q for iou_weighted=False."""
    x, q = x.double(), q.double()
    p = torch.sigmoid(x)
    w = q if iou_weighted else torch.ones_like(q)
    positive = -w * (q * F.logsigmoid(x) + (1 - q) * F.logsigmoid(-x))
    negative = -alpha * p ** gamma * F.logsigmoid(-x)
    return torch.where(q > 0, positive, negative)


def reduce(loss, reduction):
    return loss.sum() if reduction == "sum" else loss.mean() if reduction == "mean" else loss


# ---- the libraries ----------------------------------------------------------------------------------------------

def fvcore_sigmoid_focal_loss_star(inputs, targets, alpha=-1, gamma=1, reduction="none"):
    """facebookresearch/fvcore, fvcore/nn/focal_loss.py, sigmoid_focal_loss_star (transcribed)."""
    shifted_inputs = gamma * (inputs * (2 * targets - 1))
    loss = -F.logsigmoid(shifted_inputs) / gamma
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = loss * alpha_t
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss


def mmdet_weight_reduce_loss(loss, weight=None, reduction="mean", avg_factor=None):
    """open-mmlab/mmdetection, mmdet/models/losses/utils.py, weight_reduce_loss (transcribed)."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        loss = reduce(loss, reduction)
    elif reduction == "mean":
        eps = torch.finfo(torch.float32).eps
        loss = loss.sum() / (avg_factor + eps)
    elif reduction != "none":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


def mmdet_quality_focal_loss(pred, target, weight=None, beta=2.0, reduction="mean", avg_factor=None):
    """open-mmlab/mmdetection, mmdet/models/losses/gfocal_loss.py, quality_focal_loss under @weighted_loss
    (transcribed): target = (label (N,), score (N,)), background label = C; returns per anchor, summed over classes."""
    label, score = target
    pred_sigmoid = pred.sigmoid()
    scale_factor = pred_sigmoid
    zerolabel = scale_factor.new_zeros(pred.shape)
    loss = F.binary_cross_entropy_with_logits(pred, zerolabel, reduction="none") * scale_factor.pow(beta)
    bg_class_ind = pred.size(1)
    pos = ((label >= 0) & (label < bg_class_ind)).nonzero().squeeze(1)
    pos_label = label[pos].long()
    scale_factor = score[pos] - pred_sigmoid[pos, pos_label]
    loss[pos, pos_label] = F.binary_cross_entropy_with_logits(
        pred[pos, pos_label], score[pos], reduction="none") * scale_factor.abs().pow(beta)
    loss = loss.sum(dim=1, keepdim=False)
    return mmdet_weight_reduce_loss(loss, weight, reduction, avg_factor)


def mmdet_varifocal_loss(pred, target, weight=None, alpha=0.75, gamma=2.0, iou_weighted=True, reduction="mean",
                         avg_factor=None):
    """open-mmlab/mmdetection, mmdet/models/losses/varifocal_loss.py, varifocal_loss (transcribed). Note the
    negatives' factor |p - q|^gamma, which is the paper's p^gamma at q = 0."""
    assert pred.size() == target.size()
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    if iou_weighted:
        focal_weight = target * (target > 0.0).float() + \
            alpha * (pred_sigmoid - target).abs().pow(gamma) * (target <= 0.0).float()
    else:
        focal_weight = (target > 0.0).float() + \
            alpha * (pred_sigmoid - target).abs().pow(gamma) * (target <= 0.0).float()
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    return mmdet_weight_reduce_loss(loss, weight, reduction, avg_factor)


# ---- class-index form: the dense formula on one-hot (times score) targets ----------------------------------------

def class_index_ref(kind, logits, labels, scores=None, weights=None, ignore_index=-2, normalizer=None,
                    reduction="sum", **params):
    """logits (..., C) (images: dim 0 when 3-D), labels (...): the target is 1 (FL*) or the anchor's score (QFL,
    VFL) on the label's class, 0 elsewhere (the DETR / YOLO kinds of reference_detr: their libraries' formulas);
    labels outside [0, C) other than ignore_index are background; ignored
    anchors give 0; weights multiply each anchor's row; normalizer a number, 0-d or per-image (N,) tensor."""
    x = logits.double()
    c = x.shape[-1]
    labels = labels.long()
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    positive = (labels >= 0) & (labels < c) & valid
    t = F.one_hot(torch.where(positive, labels, torch.zeros_like(labels)), c).double() * positive[..., None]
    if kind in DETR_REFERENCES:  # the libraries' own formulas on their labels (background: outside [0, C))
        ious = scores if scores is not None else torch.ones(labels.shape, dtype=torch.float64, device=x.device)
        loss = DETR_REFERENCES[kind](x, torch.where(positive, labels, torch.full_like(labels, c)), ious, **params)
    else:
        if scores is not None:
            t = t * scores.double()[..., None]
        fn = {"fl_star": focal_star_ref, "qfl": quality_focal_ref, "vfl": varifocal_ref}[kind]
        loss = fn(x, t, **params)
    if weights is not None:
        loss = loss * weights.double()[..., None]
    loss = torch.where(valid[..., None], loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if normalizer is None:
        return loss.sum()
    if not isinstance(normalizer, torch.Tensor) or normalizer.dim() == 0:
        return loss.sum() / (normalizer.double() if isinstance(normalizer, torch.Tensor) else normalizer)
    per_image = loss.sum(tuple(range(1, x.dim())))
    return (per_image / normalizer.double()).sum() / per_image.numel()
