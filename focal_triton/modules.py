"""``nn.Module`` wrappers over the functional API."""
import torch
from torch import nn

from .functional import sigmoid_focal_loss
from .validation import check_alpha, check_gamma, check_reduction


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
