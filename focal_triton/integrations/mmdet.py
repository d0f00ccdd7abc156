"""A drop-in for mmdet's `FocalLoss` (mmdet.models.losses.FocalLoss, mmdet 3.x): same constructor and forward
arguments and the same numbers, computed by focal_triton's fused kernels.

    loss_cls=dict(type="FocalTritonLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0)

after `register()` (or `custom_imports=dict(imports=["focal_triton.integrations.mmdet"])`, which registers it on
import when mmdet is installed). mmdet 3.x's semantics (mmdet/models/losses/focal_loss.py, FocalLoss.forward):
pred (num_priors, C) logits and a target that is either
- class labels (num_priors,), C meaning background: the fused class-index kernel (no one-hot target is built), or
- a tensor of pred's number of dims (mmdet's test `pred.dim() == target.dim()`), one-hot or soft targets in
  [0, 1], as mmdet's py_sigmoid_focal_loss (torchvision's formula): the dense kernel;
weight per prior (num_priors,) or (num_priors, 1), or per prior and class (num_priors, C) or flattened; reduction
"mean" = sum / (avg_factor + float32 eps), as mmdet's weight_reduce_loss, or the mean over all elements without
avg_factor, "sum" (no avg_factor), "none"; the result times loss_weight. docs/integrations.md lists the differences.
"""
import torch
from torch import nn

from ..functional import focal_loss, sigmoid_focal_loss

_EPS = torch.finfo(torch.float32).eps  # mmdet's weight_reduce_loss divides by avg_factor + eps


class FocalLoss(nn.Module):
    """mmdet's FocalLoss arguments: use_sigmoid (must be True), gamma, alpha, reduction ("mean", "sum", "none"),
    loss_weight, activated (must be False: the inputs are logits)."""

    def __init__(self, use_sigmoid=True, gamma=2.0, alpha=0.25, reduction="mean", loss_weight=1.0, activated=False):
        super().__init__()
        if use_sigmoid is not True:
            raise ValueError("use_sigmoid must be True: focal_triton computes the sigmoid focal loss")
        if activated:
            raise ValueError("activated must be False: focal_triton takes logits, not probabilities")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        self.use_sigmoid, self.gamma, self.alpha = use_sigmoid, gamma, alpha
        self.reduction, self.loss_weight, self.activated = reduction, loss_weight, activated

    def forward(self, pred, target, weight=None, avg_factor=None, reduction_override=None):
        if reduction_override not in (None, "none", "mean", "sum"):
            raise ValueError(f"reduction_override must be None, 'none', 'mean' or 'sum', got {reduction_override!r}")
        reduction = reduction_override or self.reduction
        if reduction == "sum" and avg_factor is not None:
            raise ValueError('avg_factor can not be used with reduction="sum"')  # mmdet's message
        if target.dim() == pred.dim():
            return self.loss_weight * self._dense(pred, target, weight, reduction, avg_factor)
        num_classes = pred.shape[-1]
        if weight is not None and weight.shape != target.shape and weight.numel() == target.numel():
            weight = weight.reshape(target.shape)  # e.g. (num_priors, 1): one weight per prior
        if weight is not None and weight.shape != target.shape:
            # A weight per prior and class (FSAF): the dense kernel on one-hot targets (a logit-sized target).
            classes = torch.arange(num_classes, device=pred.device)
            onehot = (target.unsqueeze(-1) == classes).to(pred.dtype)
            return self.loss_weight * self._dense(pred, onehot, weight, reduction, avg_factor)
        if reduction == "none":
            loss = focal_loss(pred, target, alpha=self.alpha, gamma=self.gamma, weights=weight,
                              background=num_classes, ignore_index=None, reduction="none")
            return self.loss_weight * loss
        if reduction == "mean" and avg_factor is None and pred.numel() == 0:
            return self.loss_weight * pred.sum() / pred.numel()  # mmdet: the mean of nothing, NaN
        if reduction == "mean":
            normalizer = pred.numel() if avg_factor is None else avg_factor + _EPS
        else:
            normalizer = None
        loss = focal_loss(pred, target, alpha=self.alpha, gamma=self.gamma, weights=weight,
                          background=num_classes, ignore_index=None, normalizer=normalizer)
        return self.loss_weight * loss

    def _dense(self, pred, target, weight, reduction, avg_factor):
        """Targets of pred's shape (one-hot or soft): the dense kernel, its own sum or mean where no weight is given,
        else the elementwise loss times the weight (per prior (num_priors,) / (num_priors, 1), or per element)."""
        if target.shape != pred.shape:
            raise ValueError(f"target must have pred's shape {tuple(pred.shape)} (one-hot or soft targets) or "
                             f"pred.shape[:-1] = {tuple(pred.shape[:-1])} (class labels), got {tuple(target.shape)}")
        if not target.is_floating_point():
            target = target.to(pred.dtype)  # mmdet's target.type_as(pred), for an integer one-hot target
        if weight is None:
            if reduction == "mean" and avg_factor is not None:
                return sigmoid_focal_loss(pred, target, self.alpha, self.gamma, "sum") / (avg_factor + _EPS)
            return sigmoid_focal_loss(pred, target, self.alpha, self.gamma, reduction)
        if weight.numel() == pred.shape[0]:
            weight = weight.reshape(pred.shape[0], *([1] * (pred.dim() - 1)))
        elif weight.numel() == pred.numel():
            weight = weight.reshape(pred.shape)
        else:
            raise ValueError(f"weight must have shape ({pred.shape[0]},) (per prior) or {tuple(pred.shape)} (per "
                             f"prior and class, possibly flattened), got {tuple(weight.shape)}")
        loss = sigmoid_focal_loss(pred, target, self.alpha, self.gamma, "none") * weight
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        return loss.mean() if avg_factor is None else loss.sum() / (avg_factor + _EPS)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, alpha={self.alpha}, reduction={self.reduction!r}, "
                f"loss_weight={self.loss_weight}")


def register(name: str = "FocalTritonLoss"):
    """Register FocalLoss in mmdet's registry of losses under `name` (mmdet 3: MODELS, mmdet 2: LOSSES; mmdet must
    be installed); returns the class."""
    try:
        from mmdet.registry import MODELS as registry
    except ImportError:
        from mmdet.models.builder import LOSSES as registry
    registry.register_module(name=name, module=FocalLoss, force=True)
    return FocalLoss


try:  # registered on import where mmdet is installed (custom_imports in a config)
    register()
except ImportError:
    pass
