"""``nn.Module`` wrappers over the functional API."""
import torch
from torch import nn

from .functional import sigmoid_focal_loss
from .multilevel import focal_loss, multilevel_focal_loss
from .validation import (check_alpha, check_class_index_reduction, check_gamma, check_reduction,
                         check_smoothing)


class SigmoidFocalLoss(nn.Module):
    """Module form of :func:`focal_triton.sigmoid_focal_loss`, with the same defaults (alpha 0.25, gamma 2,
    reduction "none"); the arguments are checked when the module is built. ``forward(inputs, targets)``."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.gamma = check_gamma(gamma)
        self.reduction = check_reduction(reduction)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class FocalLoss(nn.Module):
    """Module form of :func:`focal_triton.focal_loss` (logits (..., C), integer labels (...)). A per-class alpha
    tensor is kept as a buffer, so it follows the module's ``.to(device)``. Labels are checked at every call unless
    ``check_labels=False``. ``forward(logits, labels, weights=None, normalizer=None)``."""

    def __init__(self, alpha=0.25, gamma: float = 2.0, label_smoothing: float = 0.0, background: int = -1,
                 ignore_index=-2, reduction: str = "sum", check_labels: bool = True):
        super().__init__()
        if isinstance(alpha, torch.Tensor):
            self.register_buffer("alpha", alpha.detach().clone())
        else:
            self.alpha = check_alpha(alpha)
        self.gamma = check_gamma(gamma)
        self.label_smoothing = check_smoothing(label_smoothing)
        self.background, self.ignore_index = background, ignore_index
        self.reduction = check_class_index_reduction(reduction)
        self.check_labels = check_labels

    def _options(self) -> dict:
        return dict(alpha=self.alpha, gamma=self.gamma, label_smoothing=self.label_smoothing,
                    background=self.background, ignore_index=self.ignore_index, reduction=self.reduction,
                    check_labels=self.check_labels)

    def forward(self, logits, labels, weights=None, normalizer=None):
        return focal_loss(logits, labels, weights=weights, normalizer=normalizer, **self._options())

    def extra_repr(self) -> str:
        alpha = "per-class tensor" if isinstance(self.alpha, torch.Tensor) else self.alpha
        return (f"alpha={alpha}, gamma={self.gamma}, label_smoothing={self.label_smoothing}, "
                f"background={self.background}, ignore_index={self.ignore_index}, reduction={self.reduction!r}")


class MultiLevelFocalLoss(FocalLoss):
    """Module form of :func:`focal_triton.multilevel_focal_loss`: ``forward(level_logits, labels, weights=None,
    normalizer=None)`` with the head's per-level outputs (N, A*C, H_l, W_l)."""

    def __init__(self, num_anchors: int, alpha=0.25, gamma: float = 2.0, label_smoothing: float = 0.0,
                 background: int = -1, ignore_index=-2, reduction: str = "sum", check_labels: bool = True):
        super().__init__(alpha, gamma, label_smoothing, background, ignore_index, reduction, check_labels)
        self.num_anchors = num_anchors

    def forward(self, level_logits, labels, weights=None, normalizer=None):
        return multilevel_focal_loss(level_logits, labels, self.num_anchors, weights=weights, normalizer=normalizer,
                                     **self._options())

    def extra_repr(self) -> str:
        return f"num_anchors={self.num_anchors}, " + super().extra_repr()
