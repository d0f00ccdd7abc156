"""Functional API of focal_triton."""
import torch

from .ops import sigmoid_focal_loss_op
from .validation import check_alpha, check_gamma, check_logits_and_targets, check_reduction


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
    check_logits_and_targets(inputs, targets)
    alpha = check_alpha(alpha)
    gamma = check_gamma(gamma)
    reduction = check_reduction(reduction)
    return sigmoid_focal_loss_op(inputs, targets, alpha, gamma, reduction, autocast_upcast(inputs))


def autocast_upcast(logits: torch.Tensor) -> bool:
    """Whether the loss comes back in float32 rather than in the logits' dtype: under torch.autocast for the
    logits' device, as autocast's own losses (binary_cross_entropy_with_logits, and so torchvision's focal loss)
    do. The logits are read as they are, never upcast by a copy."""
    try:
        return torch.is_autocast_enabled(logits.device.type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False
