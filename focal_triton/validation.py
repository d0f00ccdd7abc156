"""Argument checks shared by the functional API and the modules. They run before anything is allocated or
written, and every message names the argument, what was expected and what was given."""
import math
import numbers

import torch

REDUCTIONS = ("none", "mean", "sum")
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_reduction(reduction) -> str:
    # The message is torchvision's, so code that matches on it keeps working.
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: 'none', 'mean', 'sum'"
        )
    return reduction


def _number(name: str, value) -> float:
    if isinstance(value, torch.Tensor) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a Python number, got {type(value).__name__} (a tensor would have to be read on the host)"
        )
    return float(value)


def check_alpha(alpha) -> float:
    alpha = _number("alpha", alpha)
    # torchvision's condition and message; NaN and +-inf fail it too.
    if not (0 <= alpha <= 1) and alpha != -1:
        raise ValueError(f"Invalid alpha value: {alpha}. alpha must be in the range [0,1] or -1 for ignore.")
    return alpha


def check_gamma(gamma) -> float:
    gamma = _number("gamma", gamma)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    return gamma


def check_logits_and_targets(inputs, targets, inputs_name: str = "inputs", targets_name: str = "targets") -> None:
    for name, t in ((inputs_name, inputs), (targets_name, targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if inputs.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{inputs_name} must be float16, bfloat16, float32 or float64, got {inputs.dtype}")
    if not targets.is_floating_point():
        raise TypeError(f"{targets_name} must be a floating-point tensor (0/1 or soft targets), got {targets.dtype}")
    if targets.shape != inputs.shape:
        raise ValueError(
            f"{targets_name} must have the shape of {inputs_name} {tuple(inputs.shape)}, got {tuple(targets.shape)}"
        )
    if targets.device != inputs.device:
        raise ValueError(
            f"{targets_name} must be on the device of {inputs_name} ({inputs.device}), got {targets.device}"
        )
    if targets.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{targets_name} requires grad, but focal_triton differentiates only w.r.t. {inputs_name}: "
            f"pass {targets_name}.detach()"
        )
