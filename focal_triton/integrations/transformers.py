"""Switch a Hugging Face transformers DETR-family detector's classification loss to focal_triton, per model.

    from focal_triton.integrations.transformers import use_focal_triton
    model = use_focal_triton(RTDetrForObjectDetection(config))      # or .from_pretrained(...)

The model's `loss_function` becomes transformers' own loss function for that model with its criterion class
replaced by a subclass whose classification loss is one `focal_triton.focal_loss` call per loss call (main output,
each auxiliary layer, the encoder's proposals and each denoising layer: one call each):

| criterion (models) | method | focal_triton |
| --- | --- | --- |
| `RTDetrLoss` (RT-DETR, RT-DETRv2), `DFineLoss` (D-FINE) | `loss_labels_vfl` | `loss="vfl_rtdetr"`, scores = IoU of the matched queries |
| `Deimv2Loss` (DEIMv2) | `loss_labels_mal` | `loss="mal"`, alpha = `mal_alpha` (1 when None) |
| `DeformableDetrImageLoss` (Deformable, Conditional, DAB-DETR) | `loss_labels` | `loss="fl"`, gamma 2 |
| `LwDetrImageLoss` (LW-DETR, RF-DETR detection) | `loss_labels` | `loss="ia_bce"`, gamma 2 |

with the labels (B, Q) = the matched target class, `num_classes` for unmatched queries (background), and
normalizer = transformers' `num_boxes`. Everything else (the matcher, box and other losses, weights, the
auxiliary / denoising bookkeeping) is transformers' code, run unchanged. Not built: the one-hot target
(B, Q, C + 1) int64 and the float (B, Q, C) targets, weights, probabilities and elementwise loss of the stock
methods; what remains per call are the (B, Q) labels and scores. The label check (check_labels=True, default) is
one host sync per call; check_labels=False makes none (transformers' own matcher, `cost_matrix.cpu()`, and its
`num_boxes`, `.item()`, sync on every call anyway, which is why the check stays on by default).
"""
import functools
import types

import torch
from transformers.loss import loss_d_fine, loss_deformable_detr, loss_deimv2, loss_lw_detr, loss_rt_detr
from transformers.loss.loss_utils import LOSS_MAPPING

from ..functional import focal_loss
from ..validation import check_bool


def _matched_labels(criterion, outputs, targets, indices):
    """(batch, query) index of the matched queries, and the (B, Q) labels: the matched class, else num_classes."""
    logits = outputs["logits"]
    idx = criterion._get_source_permutation_idx(indices)
    classes = torch.cat([t["class_labels"][j] for t, (_, j) in zip(targets, indices)])
    labels = torch.full(logits.shape[:2], criterion.num_classes, dtype=torch.int64, device=logits.device)
    labels[idx] = classes
    return idx, labels


def _matched_iou(outputs, targets, indices, idx, dtype):
    """(B, Q) IoU of each matched query's box with its target (0 elsewhere), in the logits' dtype, as the stock
    losses compute it (transformers' box_iou on the detached boxes)."""
    to_corners = loss_rt_detr.center_to_corners_format
    src_boxes = outputs["pred_boxes"][idx].detach()
    target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
    ious = torch.diag(loss_rt_detr.box_iou(to_corners(src_boxes), to_corners(target_boxes))[0])
    scores = torch.zeros(outputs["logits"].shape[:2], dtype=dtype, device=outputs["logits"].device)
    scores[idx] = ious.to(dtype)
    return scores


def _class_index_loss(criterion, outputs, targets, indices, num_boxes, loss, alpha, gamma, with_scores):
    if "logits" not in outputs:
        raise KeyError("No logits were found in the outputs")
    logits = outputs["logits"]
    idx, labels = _matched_labels(criterion, outputs, targets, indices)
    scores = _matched_iou(outputs, targets, indices, idx, logits.dtype) if with_scores else None
    return focal_loss(logits, labels, loss=loss, alpha=alpha, gamma=gamma, scores=scores,
                      background=criterion.num_classes, ignore_index=None, normalizer=num_boxes,
                      check_labels=criterion.focal_triton_check_labels)


class _RTDetrFamily:
    """RTDetrLoss, DFineLoss, Deimv2Loss: VFL (and DEIMv2's MAL) on the matched queries' IoU."""

    def loss_labels_vfl(self, outputs, targets, indices, num_boxes, log=True):
        if "pred_boxes" not in outputs:
            raise KeyError("No predicted boxes found in outputs")
        return {"loss_vfl": _class_index_loss(self, outputs, targets, indices, num_boxes, "vfl_rtdetr",
                                              self.alpha, self.gamma, with_scores=True)}

    def loss_labels_mal(self, outputs, targets, indices, num_boxes):
        alpha = 1.0 if self.mal_alpha is None else self.mal_alpha
        return {"loss_mal": _class_index_loss(self, outputs, targets, indices, num_boxes, "mal", alpha,
                                              self.gamma, with_scores=True)}


class _DeformableFamily:
    """DeformableDetrImageLoss: the sigmoid focal loss (gamma 2) on the one-hot of the matched classes."""

    def loss_labels(self, outputs, targets, indices, num_boxes):
        return {"loss_ce": _class_index_loss(self, outputs, targets, indices, num_boxes, "fl", self.focal_alpha,
                                             2.0, with_scores=False)}


class _LwDetrFamily:
    """LwDetrImageLoss: the IoU-aware BCE (gamma 2, alpha = focal_alpha)."""

    def loss_labels(self, outputs, targets, indices, num_boxes):
        return {"loss_ce": _class_index_loss(self, outputs, targets, indices, num_boxes, "ia_bce", self.focal_alpha,
                                             2.0, with_scores=True)}


# transformers' loss function -> (the name it builds its criterion by, the criterion class, the override).
_SUPPORTED = {
    loss_rt_detr.RTDetrForObjectDetectionLoss: ("RTDetrLoss", loss_rt_detr.RTDetrLoss, _RTDetrFamily),
    loss_d_fine.DFineForObjectDetectionLoss: ("DFineLoss", loss_d_fine.DFineLoss, _RTDetrFamily),
    loss_deimv2.Deimv2ForObjectDetectionLoss: ("Deimv2Loss", loss_deimv2.Deimv2Loss, _RTDetrFamily),
    loss_deformable_detr.DeformableDetrForObjectDetectionLoss: (
        "DeformableDetrImageLoss", loss_deformable_detr.DeformableDetrImageLoss, _DeformableFamily),
    loss_lw_detr.LwDetrForObjectDetectionLoss: ("LwDetrImageLoss", loss_lw_detr.LwDetrImageLoss, _LwDetrFamily),
}


@functools.lru_cache(maxsize=None)
def _patched_loss_function(loss_type, check_labels):
    """transformers' loss function of `loss_type`, its code run with the criterion name bound to the subclass
    (a new function object over a copy of its module's globals: nothing in transformers is modified)."""
    stock = LOSS_MAPPING[loss_type]
    name, criterion, family = _SUPPORTED[stock]
    if name not in stock.__code__.co_names:
        raise RuntimeError(f"transformers' {stock.__name__} no longer builds its criterion as {name}(...): "
                           "this focal_triton does not support the installed transformers")
    subclass = type(f"FocalTriton{criterion.__name__}", (family, criterion),
                    {"focal_triton_check_labels": check_labels, "__module__": __name__})
    patched = types.FunctionType(stock.__code__, {**stock.__globals__, name: subclass}, stock.__name__,
                                 stock.__defaults__, stock.__closure__)
    patched.__kwdefaults__ = stock.__kwdefaults__
    return patched


class FocalTritonLossFunction:
    """A patched model's `loss_function`: transformers' loss function for `loss_type` with focal_triton's
    classification loss (picklable: it holds names and flags, and rebuilds the function where it is loaded)."""

    def __init__(self, loss_type, check_labels=True):
        self.loss_type = loss_type
        self.check_labels = check_labels

    def __call__(self, *args, **kwargs):
        return _patched_loss_function(self.loss_type, self.check_labels)(*args, **kwargs)

    def __repr__(self):
        return f"FocalTritonLossFunction({self.loss_type!r}, check_labels={self.check_labels})"


def use_focal_triton(model, *, check_labels: bool = True):
    """Make a transformers detector's training loss use focal_triton for its classification loss, in place;
    returns the model. Supported: the models whose loss is RT-DETR's / RT-DETRv2's, D-FINE's, DEIMv2's, Deformable /
    Conditional / DAB-DETR's or LW-DETR's / RF-DETR's (detection); calling it again changes the options.

    check_labels=False skips the check that every matched class label lies in [0, num_labels] (one host sync per
    loss call); an out-of-range label then counts as background where the stock F.one_hot raises.
    Inference is untouched (the loss function runs only when labels are passed).
    """
    check_bool("check_labels", check_labels)
    loss_type = getattr(model, "loss_type", None)
    stock = LOSS_MAPPING.get(loss_type) if isinstance(loss_type, str) else None
    if stock not in _SUPPORTED:
        names = sorted(k for k, v in LOSS_MAPPING.items() if v in _SUPPORTED)
        raise TypeError(f"model must be a transformers detector with one of the loss types {names}, got "
                        f"{type(model).__name__} (loss_type {loss_type!r})")
    _patched_loss_function(loss_type, check_labels)  # fails now, not in the first training step
    model.loss_function = FocalTritonLossFunction(loss_type, check_labels)
    return model
