"""Functional API of focal_triton."""
import torch

from .ops import sigmoid_focal_loss_op
from .validation import (check_alpha, check_bool, check_gamma, check_logits_and_targets, check_qfl_beta,
                         check_reduction, check_star_beta, check_star_gamma, check_vfl_alpha)


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
    return sigmoid_focal_loss_op(inputs, targets, alpha, gamma, reduction, autocast_upcast(inputs), 0, 0.0, True,
                                 _requires_grad(inputs))[0]


def sigmoid_focal_loss_star(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = -1, gamma: float = 1.0,
                            beta: float = 0.0, reduction: str = "none") -> torch.Tensor:
    r"""FL* of Lin et al. (2017), appendix A, fused in one kernel; beta = 0 is fvcore's ``sigmoid_focal_loss_star``
    (same signature, defaults and numbers)::

        x_t = inputs * (2 targets - 1)            (x for targets = 1, -x for targets = 0: fvcore's form)
        FL* = -alpha_t log(sigmoid(gamma x_t + beta)) / gamma = alpha_t softplus(-(gamma x_t + beta)) / gamma

    Args:
        inputs, targets, reduction: as :func:`sigmoid_focal_loss` (targets 0/1; soft targets use fvcore's x_t).
        alpha: alpha_t weighting as in FL, in [0, 1], or -1 for none (default -1, fvcore's).
        gamma: > 0 (default 1). beta: any finite number (default 0).

    Finite for logits of any magnitude where the formula's limit is (0 as gamma x_t + beta -> +inf), with finite
    gradients; NaN propagates.
    """
    check_logits_and_targets(inputs, targets)
    alpha = check_alpha(alpha)
    gamma = check_star_gamma(gamma)
    beta = check_star_beta(beta)
    reduction = check_reduction(reduction)
    return sigmoid_focal_loss_op(inputs, targets, alpha, gamma, reduction, autocast_upcast(inputs), 1, beta, True,
                                 _requires_grad(inputs))[0]


def quality_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, beta: float = 2.0,
                       reduction: str = "none") -> torch.Tensor:
    r"""Quality Focal Loss of Li et al., "Generalized Focal Loss" (2020), with dense soft targets, fused::

        sigma = sigmoid(inputs), y = targets (the IoU score on the positive's class, 0 elsewhere)
        QFL = -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log(sigma)) = |y - sigma|^beta BCE_with_logits(x, y)

    Elementwise: mmdet's ``quality_focal_loss`` (label, score) and tensor-target forms return this summed over the
    classes (dim 1), i.e. ``quality_focal_loss(...).sum(-1)``; for the class-index form use
    ``focal_loss(..., loss="qfl", scores=...)``.

    Args:
        inputs, reduction: as :func:`sigmoid_focal_loss`.
        targets: soft scores y in [0, 1], same shape. No gradient flows to it.
        beta: exponent >= 0 (default 2); integer beta costs no pow.

    Saturated logits give the formula's limit (0, or inf where y is strictly between 0 and 1 or opposite to the
    logit's sign) with a finite gradient; NaN propagates.
    """
    check_logits_and_targets(inputs, targets)
    beta = check_qfl_beta(beta)
    reduction = check_reduction(reduction)
    return sigmoid_focal_loss_op(inputs, targets, -1.0, 0.0, reduction, autocast_upcast(inputs), 2, beta, True,
                                 _requires_grad(inputs))[0]


def varifocal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0,
                   iou_weighted: bool = True, reduction: str = "none") -> torch.Tensor:
    r"""Varifocal Loss of Zhang et al., "VarifocalNet" (2021), with dense IoU-aware targets q, fused::

        p = sigmoid(inputs), q = targets
        VFL = -q (q log p + (1 - q) log(1 - p)) = q BCE_with_logits(x, q)    where q > 0
              -alpha p^gamma log(1 - p)        = alpha p^gamma BCE(x, 0)     where q = 0

    mmdet's ``varifocal_loss`` (same numbers, elementwise before its reduction); iou_weighted=False weights the
    positives by 1 instead of q (mmdet's ``iou_weighted=False``).

    Args:
        inputs, reduction: as :func:`sigmoid_focal_loss`.
        targets: q in [0, 1], same shape (0 for negatives). No gradient flows to it.
        alpha: weight of the negatives, >= 0 (default 0.75). gamma: exponent >= 0 (default 2).
        iou_weighted: weight positives by q (default True) or by 1.
    """
    check_logits_and_targets(inputs, targets)
    alpha = check_vfl_alpha(alpha)
    gamma = check_gamma(gamma)
    iou_weighted = check_bool("iou_weighted", iou_weighted)
    reduction = check_reduction(reduction)
    return sigmoid_focal_loss_op(inputs, targets, alpha, gamma, reduction, autocast_upcast(inputs), 3, 0.0,
                                 iou_weighted, _requires_grad(inputs))[0]


def autocast_upcast(logits: torch.Tensor) -> bool:
    """Whether the loss comes back in float32 rather than in the logits' dtype: under torch.autocast for the
    logits' device, as autocast's own losses (binary_cross_entropy_with_logits, and so torchvision's focal loss)
    do. The logits are read as they are, never upcast by a copy."""
    try:
        return torch.is_autocast_enabled(logits.device.type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def _requires_grad(inputs: torch.Tensor) -> bool:
    """Whether this call's loss will be differentiated: the caller's grad mode and inputs.requires_grad (the CPU
    path then computes the gradient in the forward's pass)."""
    return torch.is_grad_enabled() and inputs.requires_grad
