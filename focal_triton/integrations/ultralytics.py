"""Switch ultralytics' YOLO detection loss to focal_triton's classification loss (tested with ultralytics 8.4.190).

    from focal_triton.integrations.ultralytics import use_focal_triton
    model = YOLO("yolo11n.yaml")
    use_focal_triton(model)          # or a trainer, a DetectionModel, or its v8DetectionLoss / E2ELoss
    model.train(data=...)

`v8DetectionLoss` (YOLOv8, YOLO11; both branches of `E2ELoss` / `E2EDetectLoss`: YOLO26, YOLOv10) computes its
classification loss as BCE-with-logits against the task-aligned assigner's soft targets, summed over every
(anchor, class) and divided by target_scores_sum:

    cls = sum_{b,a,c} w_c BCE(x[b, c, a], t[b, a, c]) / max(sum t, 1),   t = one_hot(label) * score (0 off the label)

(w: the optional per-class weights, model.class_weights), which is focal_triton's class-index "bce" kind (QFL with
exponent 0, |t - p|**0 = 1, with class weights): one `multilevel_focal_loss` call with the head's class-major
scores (B, C, A) read in place as one NCHW level (B, C, A, 1) with num_anchors = 1, the assigned label per anchor
(-1 for background) and its score. What changes against ultralytics' own code:
- the logits are not copied: ultralytics makes a (B, A, C) `permute(0, 2, 1).contiguous()` copy of the scores
  and a (B, A, C) elementwise BCE (and their gradients); here the assigner reads a permuted view of the sigmoid
  (the same values) and the kernel writes the gradient in the scores' own (B, C, A) layout;
- the per-anchor targets are two (B, A) tensors: the label and a gather of the assigner's score at the label.
  The assigner still builds its (B, A, C) target_scores (ultralytics' box and DFL losses weight by it and
  target_scores_sum sums it); avoiding it would mean re-implementing the assigner, which stays ultralytics';
- the classification term reads nothing on the host (labels are valid by construction: check_labels=False; the
  normalizer stays a 0-d device tensor); under autocast the soft targets stay float32 (ultralytics rounds them to
  the logits' dtype).
The assigner, box (CIoU) and DFL losses, gains and outputs are ultralytics' own calls, unchanged. Two E2E branches
are two launches (their labels, normalizers and gains differ).

RT-DETR (`RTDETRDetectionLoss`, `RTDETR("rtdetr-l.yaml")`) computes, per decoder layer and denoising group,
`DETRLoss._get_loss_class` on a one-hot (B, Q, C+1) target of the Hungarian matcher's labels (C: unmatched) and
IoUs s of the matched boxes:

    VarifocalLoss (use_vfl, ground truth present): sum_{b,q,c} (hit ? s BCE(x, s) : alpha p**gamma BCE(x, 0)) / num_gts
    FocalLoss (no ground truth, or use_vfl=False):  sum FL_{alpha,gamma}(x, hit) / max(num_gts, 1)
    BCE (use_fl=False):                             sum BCE(x, hit ? s : 0) / Q

(ultralytics writes the normalizers as `.mean(1).sum() / (max(num_gts, 1) / Q)` and `.mean(1).sum()`; p**gamma keeps
its gradient, alpha / gamma are its VarifocalLoss' and FocalLoss' own, 0.25 / 1.5 by default), which are
focal_triton's class-index "vfl_rtdetr" with detach_weight=False, "fl" and "bce": one `focal_loss` call each on the
(B, Q, C) logits with the (B, Q) labels (background C) and IoUs, no one-hot tensor. A FocalLoss whose alpha is not
one number in [0, 1] (a per-class tensor, or above 1: negatives weighted 1 - alpha < 0) is no focal_triton kind:
that call runs ultralytics' own code. Matcher, box losses, denoising groups and gains stay ultralytics'.
"""
import warnings

import torch
import ultralytics
from torch import nn
from ultralytics.engine.model import Model
from ultralytics.engine.trainer import BaseTrainer
from ultralytics.models.utils.loss import RTDETRDetectionLoss
from ultralytics.nn.tasks import BaseModel, RTDETRDetectionModel
from ultralytics.utils.loss import E2EDetectLoss, E2ELoss, v8DetectionLoss
from ultralytics.utils.tal import make_anchors
from ultralytics.utils.torch_utils import unwrap_model

from ..functional import focal_loss, multilevel_focal_loss

BACKGROUND = -1
TESTED_VERSION = "8.4.190"  # the classes below restate this version's glue (pyproject's integrations extra)


class FocalTritonDetectionLoss(v8DetectionLoss):
    """ultralytics' v8DetectionLoss with the classification BCE computed by focal_triton (module docstring).
    `use_focal_triton` turns an existing v8DetectionLoss into one in place (its state is kept)."""

    def get_assigned_targets_and_loss(self, preds, batch, **assign_kwargs):
        """ultralytics 8.4.190's v8DetectionLoss.get_assigned_targets_and_loss, with the scores read in place and
        the classification term from `classification_loss`; same returns."""
        loss = torch.zeros(3, device=self.device)  # box, cls, dfl
        scores = preds["scores"]  # (B, C, A) class-major logits, as the head concatenates them
        pred_distri = preds["boxes"].permute(0, 2, 1).contiguous()
        pred_scores = scores.permute(0, 2, 1)  # (B, A, C) view, not copied
        anchor_points, stride_tensor = make_anchors(preds["feats"], self.stride, 0.5)

        dtype = scores.dtype
        batch_size = scores.shape[0]
        imgsz = torch.tensor(preds["feats"][0].shape[2:], device=self.device, dtype=dtype) * self.stride[0]

        targets = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"].view(-1, 1), batch["bboxes"]), 1)
        targets = self.preprocess(targets.to(self.device), batch_size, scale_tensor=imgsz[[1, 0, 1, 0]])
        gt_labels, gt_bboxes = targets.split((1, 4), 2)  # cls, xyxy
        mask_gt = gt_bboxes.sum(2, keepdim=True).gt_(0.0)

        pred_bboxes = self.bbox_decode(anchor_points, pred_distri)  # xyxy, (b, h*w, 4)

        target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx = self.assigner(
            pred_scores.detach().sigmoid(),
            (pred_bboxes.detach() * stride_tensor).type(gt_bboxes.dtype),
            anchor_points * stride_tensor,
            gt_labels,
            gt_bboxes,
            mask_gt,
            **assign_kwargs,
        )
        target_scores_sum = target_scores.sum().clamp_(min=1)

        loss[1] = self.classification_loss(scores, target_labels, target_scores, fg_mask, target_scores_sum)

        loss[0], loss[2] = self.bbox_loss(
            pred_distri,
            pred_bboxes,
            anchor_points,
            target_bboxes / stride_tensor,
            target_scores,
            target_scores_sum,
            fg_mask,
            imgsz,
            stride_tensor,
        )

        loss[0] *= self.hyp.box
        loss[1] *= self.hyp.cls
        loss[2] *= self.hyp.dfl
        return (
            (fg_mask, target_gt_idx, target_bboxes, anchor_points, stride_tensor),
            loss,
            dict(zip(self.loss_names, loss.detach())),
        )

    def classification_loss(self, scores, target_labels, target_scores, fg_mask, target_scores_sum):
        """sum w_c BCE(scores, target_scores) / target_scores_sum, scores (B, C, A), the assigner's outputs per anchor
        (labels (B, A), fg_mask (B, A)) and target_scores (B, A, C): at most one non-zero per row, at the label;
        w the optional per-class weights (model.class_weights). focal_triton's "bce" kind."""
        labels = torch.where(fg_mask, target_labels.long(), BACKGROUND)
        quality = target_scores.gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, A), reads B*A
        weights = None if self.class_weights is None else self.class_weights.reshape(-1).to(torch.float32)
        return multilevel_focal_loss([scores.unsqueeze(-1)], labels, 1, loss="bce", scores=quality,
                                     class_weights=weights, background=BACKGROUND, ignore_index=None,
                                     normalizer=target_scores_sum, check_labels=False)


class FocalTritonRTDETRLoss(RTDETRDetectionLoss):
    """ultralytics' RTDETRDetectionLoss with its classification term computed by focal_triton (module docstring).
    `use_focal_triton` turns an existing RTDETRDetectionLoss into one in place (its state is kept)."""

    def _get_loss_class(self, pred_scores, targets, gt_scores, num_gts, postfix=""):
        """ultralytics 8.4.190's DETRLoss._get_loss_class without the one-hot target: pred_scores (B, Q, C) logits,
        targets (B, Q) the matched class or C, gt_scores (B, Q) the matched box's IoU (0 elsewhere), num_gts the
        number of matched boxes (a host int, as ultralytics passes it); same return."""
        kind = _class_loss_kind(self, num_gts)
        if kind is None:  # not one of focal_triton's kinds: ultralytics' own code
            return super()._get_loss_class(pred_scores, targets, gt_scores, num_gts, postfix)
        loss, options = kind
        nq = pred_scores.shape[1]
        normalizer = float(nq) if loss == "bce" else float(max(num_gts, 1))
        if loss != "fl":
            options["scores"] = gt_scores.view(targets.shape)
        loss_cls = focal_loss(pred_scores, targets, loss=loss, background=self.nc, ignore_index=None,
                              normalizer=normalizer, check_labels=False, **options)
        return {f"loss_class{postfix}": loss_cls.squeeze() * self.loss_gain["class"]}


def _class_loss_kind(criterion, num_gts):
    """(loss, options) of the focal_triton kind equal to the branch DETRLoss._get_loss_class takes, or None."""
    if not criterion.fl:
        return "bce", {}
    if num_gts and criterion.vfl:
        alpha, gamma = float(criterion.vfl.alpha), float(criterion.vfl.gamma)
        if alpha < 0 or gamma < 0:
            return None  # negative weights or a weight infinite at p = 0: outside focal_triton's options
        return "vfl_rtdetr", dict(alpha=alpha, gamma=gamma, detach_weight=False)
    alpha, gamma = criterion.fl.alpha, float(criterion.fl.gamma)
    if torch.is_tensor(alpha):
        if alpha.numel() != 1:
            return None  # per-class alpha, applied to every class once any entry is > 0
        alpha = alpha.item()
    if alpha > 1 or gamma < 0:
        return None  # FocalLoss weights negatives by 1 - alpha < 0, or (1 - p_t)**gamma is infinite at p_t = 1
    return "fl", dict(alpha=alpha if alpha > 0 else -1.0, gamma=gamma)  # alpha <= 0: FocalLoss weights nothing


def _switch_loss(criterion):
    """The criterion with its v8DetectionLoss / RTDETRDetectionLoss parts switched in place (TypeError for others)."""
    if type(criterion) in (RTDETRDetectionLoss, FocalTritonRTDETRLoss):
        criterion.__class__ = FocalTritonRTDETRLoss
        return criterion
    if isinstance(criterion, (E2ELoss, E2EDetectLoss)):
        for branch in (criterion.one2many, criterion.one2one):
            _check_loss(branch, f"{type(criterion).__name__}'s branch")
        criterion.one2many.__class__ = criterion.one2one.__class__ = FocalTritonDetectionLoss
        return criterion
    _check_loss(criterion, "criterion")
    criterion.__class__ = FocalTritonDetectionLoss
    return criterion


def _check_loss(criterion, what):
    if type(criterion) not in (v8DetectionLoss, FocalTritonDetectionLoss):
        raise TypeError(f"{what} must be ultralytics' v8DetectionLoss (YOLOv8/11 detection), an E2ELoss of them or "
                        f"an RTDETRDetectionLoss, got {type(criterion).__name__}")


def _switch_model(model):
    """A DetectionModel's criterion, created as ultralytics would (init_criterion) if it has none yet, switched."""
    model = unwrap_model(model)
    model = getattr(model, "student_model", model)  # distillation: the student builds the loss
    criterion = getattr(model, "criterion", None)
    if criterion is None and isinstance(model, RTDETRDetectionModel):
        if not hasattr(model, "nc"):  # RTDETRDetectionModel.init_criterion reads it
            raise ValueError("RT-DETR model has no criterion yet and no model.nc (set it as the trainer does, or "
                             "pass the trainer or the RTDETR model)")
        criterion = model.init_criterion()
    elif criterion is None:
        if not hasattr(getattr(model, "args", None), "box"):  # the loss gains v8DetectionLoss reads
            raise ValueError("model has no criterion yet and model.args is not ultralytics' hyperparameters "
                             "namespace (set model.args = ultralytics.cfg.get_cfg() as the trainer does, or pass "
                             "the trainer or the YOLO model)")
        criterion = model.init_criterion()
    model.criterion = _switch_loss(criterion)
    return model


def _on_train_start(trainer):
    """Trainer callback: the model the trainer built (after its setup and any resume) gets the switched loss."""
    _switch_model(trainer.model)


def use_focal_triton(target):
    """Make ultralytics' YOLO or RT-DETR detection loss compute its classification term with focal_triton; returns
    target.

    target: a `YOLO` / `RTDETR` model (ultralytics.engine.model.Model) or a trainer: the model its training builds is
    switched when training starts (a callback on "on_train_start"); a DetectionModel: its criterion (created now if
    it has none, from model.args as ultralytics would; an RTDETRDetectionModel needs model.nc); a v8DetectionLoss,
    an E2ELoss / E2EDetectLoss of them or an RTDETRDetectionLoss: switched in place. Calling it again is harmless.
    Raises TypeError for other losses (segmentation, pose, OBB) before anything is changed. Multi-GPU training
    through ultralytics' DDP launcher runs a fresh trainer in a subprocess without the callback: switch the model in
    a trainer subclass there. Another ultralytics version than the tested one gets a warning (run
    tests/test_integrations_ultralytics.py with it).
    """
    if ultralytics.__version__ != TESTED_VERSION:
        warnings.warn(f"focal_triton.integrations.ultralytics is tested with ultralytics {TESTED_VERSION}, this is "
                      f"{ultralytics.__version__}: check its v8DetectionLoss / DETRLoss against the tests",
                      stacklevel=2)
    if isinstance(target, (Model, BaseTrainer)):
        if _on_train_start not in target.callbacks["on_train_start"]:
            target.add_callback("on_train_start", _on_train_start)
        return target
    if isinstance(target, nn.Module) and isinstance(unwrap_model(target), BaseModel):
        _switch_model(target)
        return target
    return _switch_loss(target)
