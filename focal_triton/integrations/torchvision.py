"""Switch torchvision's RetinaNet and FCOS to focal_triton's classification loss, in place.

    from focal_triton.integrations.torchvision import use_focal_triton
    model = use_focal_triton(torchvision.models.detection.retinanet_resnet50_fpn(...))

In training, the classification head then returns its per-level outputs (N, A*C, H_l, W_l) as they are (no
permute, no cat) and its loss is one `multilevel_focal_loss` call on them, with torchvision's labels (the matched
ground-truth class, -1 background, -2 between thresholds for RetinaNet) and normalization (RetinaNet: each image's
sum over its number of foreground anchors, averaged over images; FCOS: the sum over the batch's number of
foreground anchors). Nothing is read on the host (torchvision's FCOS reads the count with `.item()`). In eval mode
the heads run torchvision's own code, so detections are unchanged.

With collect_stats=True each training forward also keeps the loss statistics of its classification loss (from the
same kernel pass) in `model.focal_triton.stats` (a `focal_triton.stats.LossStatistics`).
"""
import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.ops import generalized_box_iou_loss

from ..functional import multilevel_focal_loss
from ..stats import LossStatistics
from ..validation import check_alpha, check_bool, check_gamma


@dataclass
class FocalTritonOptions:
    """What a patched model does (`model.focal_triton`): torchvision's alpha = 0.25 and gamma = 2 by default."""

    check_labels: bool = True
    alpha: float = 0.25
    gamma: float = 2.0
    collect_stats: bool = False
    stats: Optional[LossStatistics] = None  # of the last training forward, with collect_stats


def _focal_loss(options: FocalTritonOptions, levels, labels, num_anchors, **kw):
    out = multilevel_focal_loss(list(levels), labels, num_anchors, alpha=options.alpha, gamma=options.gamma,
                                background=-1, check_labels=options.check_labels,
                                return_stats=options.collect_stats, **kw)
    if options.collect_stats:
        out, options.stats = out
    return out


class LevelLogits(list):
    """The per-level classification outputs (N, A*C, H, W) a patched head returns in training, instead of their
    concatenation (N, sum H*W*A, C)."""


def _level_forward(self, x):
    if not self.training:
        return type(self).forward(self, x)
    return LevelLogits(self.cls_logits(self.conv(features)) for features in x)


def _class_labels(targets, matched_idxs):
    """(N, M) labels: the class of the matched ground-truth box, or the matcher's negative value (-1, -2)."""
    labels = []
    for target, matched in zip(targets, matched_idxs):
        if target["labels"].numel() == 0:
            labels.append(matched.clone())
        else:
            labels.append(torch.where(matched >= 0, target["labels"][matched.clamp(min=0)], matched))
    return torch.stack(labels)


def _retinanet_cls_loss(self, targets, head_outputs, matched_idxs):
    levels = head_outputs["cls_logits"]
    if not isinstance(levels, LevelLogits):
        return type(self).compute_loss(self, targets, head_outputs, matched_idxs)
    labels = _class_labels(targets, matched_idxs)
    num_foreground = (labels >= 0).sum(dim=1).clamp(min=1)  # per image, as torchvision: max(1, num_foreground)
    return _focal_loss(self.focal_triton, levels, labels, self.num_anchors, ignore_index=self.BETWEEN_THRESHOLDS,
                       normalizer=num_foreground)


def _fcos_loss(self, targets, head_outputs, anchors, matched_idxs):
    levels = head_outputs["cls_logits"]
    if not isinstance(levels, LevelLogits):
        return type(self).compute_loss(self, targets, head_outputs, anchors, matched_idxs)
    labels = _class_labels(targets, matched_idxs).clamp(min=-1)  # FCOS: every unmatched point is background
    boxes = torch.stack([t["boxes"][m.clip(min=0)] if t["labels"].numel() else t["boxes"].new_zeros((len(m), 4))
                         for t, m in zip(targets, matched_idxs)])
    anchors = torch.stack(anchors)
    foreground = labels >= 0
    normalizer = foreground.sum().clamp(min=1)  # torchvision: max(1, num_foreground), read on the host there
    loss_cls = _focal_loss(self.focal_triton, levels, labels, self.classification_head.num_anchors,
                           ignore_index=None, normalizer=normalizer)
    # Box regression (GIoU) and centerness: torchvision's FCOSHead.compute_loss, unchanged.
    pred_boxes = self.box_coder.decode(head_outputs["bbox_regression"], anchors)
    loss_bbox_reg = generalized_box_iou_loss(pred_boxes[foreground], boxes[foreground], reduction="sum")
    bbox_reg_targets = self.box_coder.encode(anchors, boxes)
    if len(bbox_reg_targets) == 0:
        gt_ctrness = bbox_reg_targets.new_zeros(bbox_reg_targets.size()[:-1])
    else:
        left_right, top_bottom = bbox_reg_targets[:, :, [0, 2]], bbox_reg_targets[:, :, [1, 3]]
        gt_ctrness = torch.sqrt((left_right.min(dim=-1)[0] / left_right.max(dim=-1)[0])
                                * (top_bottom.min(dim=-1)[0] / top_bottom.max(dim=-1)[0]))
    pred_ctrness = head_outputs["bbox_ctrness"].squeeze(dim=2)
    loss_ctrness = nn.functional.binary_cross_entropy_with_logits(pred_ctrness[foreground], gt_ctrness[foreground],
                                                                  reduction="sum")
    return {"classification": loss_cls, "bbox_regression": loss_bbox_reg / normalizer,
            "bbox_ctrness": loss_ctrness / normalizer}


def use_focal_triton(model, *, check_labels: bool = True, alpha: float = 0.25, gamma: float = 2.0,
                     collect_stats: bool = False):
    """Switch a torchvision RetinaNet or FCOS to focal_triton's classification loss, in place; returns the model.
    Calling it again on a patched model changes its options.

    check_labels=False skips the label check (one host sync), e.g. when the loss stage is compiled or captured.
    alpha, gamma: the focal loss's (torchvision's values by default). collect_stats: keep each training forward's
    loss statistics in `model.focal_triton.stats`. The options live in `model.focal_triton`.
    """
    if not isinstance(model, (RetinaNet, FCOS)):
        raise TypeError(f"model must be a torchvision RetinaNet or FCOS, got {type(model).__name__}")
    options = FocalTritonOptions(check_bool("check_labels", check_labels), check_alpha(alpha), check_gamma(gamma),
                                 check_bool("collect_stats", collect_stats))
    cls_head = model.head.classification_head
    # Instance attributes holding partials of module-level functions (not bound methods): the patched model
    # pickles (torch.save(model)) and deep-copies, and unpickles wherever focal_triton is importable.
    cls_head.forward = functools.partial(_level_forward, cls_head)
    if isinstance(model, RetinaNet):
        cls_head.compute_loss = functools.partial(_retinanet_cls_loss, cls_head)
        cls_head.focal_triton = options
    else:
        model.head.compute_loss = functools.partial(_fcos_loss, model.head)
        model.head.focal_triton = options
    model.focal_triton = options
    return model
