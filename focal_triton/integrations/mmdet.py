"""A drop-in for mmdet's `FocalLoss` (mmdet.models.losses.FocalLoss): same constructor and forward arguments and
the same numbers, computed by focal_triton's fused kernels from the class-index labels (no one-hot target).

    loss_cls=dict(type="FocalTritonLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0)

after `register()` (or `custom_imports=dict(imports=["focal_triton.integrations.mmdet"])`, which registers it on
import when mmdet is installed). mmdet's semantics: pred (num_priors, C) logits, target (num_priors,) labels with
C meaning background, weight per prior (num_priors,) or per prior and class (num_priors, C) or flattened;
reduction "mean" = sum / avg_factor (+ float32 eps, as mmdet) or the mean over all elements without avg_factor,
"sum" (no avg_factor), "none"; the result times loss_weight.
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
        num_classes = pred.shape[-1]
        if weight is not None and weight.shape != target.shape and weight.numel() == target.numel():
            weight = weight.reshape(target.shape)  # e.g. (num_priors, 1): one weight per prior
        if weight is not None and weight.shape != target.shape:
            return self.loss_weight * self._elementwise_weights(pred, target, weight, reduction, avg_factor)
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

    def _elementwise_weights(self, pred, target, weight, reduction, avg_factor):
        """A weight per prior and class (FSAF): the dense kernel on one-hot targets (a logit-sized target; slower)."""
        if weight.numel() != pred.numel():
            raise ValueError(f"weight must have shape {tuple(target.shape)} (per prior) or {tuple(pred.shape)} "
                             f"(per prior and class, possibly flattened), got {tuple(weight.shape)}")
        classes = torch.arange(pred.shape[-1], device=pred.device)
        onehot = (target.unsqueeze(-1) == classes).to(pred.dtype)
        loss = sigmoid_focal_loss(pred, onehot, alpha=self.alpha, gamma=self.gamma, reduction="none")
        loss = loss * weight.reshape(pred.shape)
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
