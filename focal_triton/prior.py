"""The focal-loss paper's initialization of the classification layer (Lin et al., 2017, section 4.1)."""
import math

import torch
from torch import nn


@torch.no_grad()
def init_prior_bias_(module_or_tensor, prior: float = 0.01):
    """Set the classification bias to b = -log((1 - prior) / prior), so that every anchor starts with
    sigmoid(b) = prior: the many easy negatives then do not swamp the loss in the first iterations (pi = 0.01 in the
    paper). Takes a module with a `bias` (e.g. the head's last Conv2d) or the bias tensor itself; returns it."""
    if not (0.0 < prior < 1.0):
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    bias = module_or_tensor
    if isinstance(module_or_tensor, nn.Module):
        bias = getattr(module_or_tensor, "bias", None)
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"{type(module_or_tensor).__name__} has no bias to initialize")
    elif not isinstance(bias, torch.Tensor):
        raise TypeError(f"init_prior_bias_ takes a module or a tensor, got {type(module_or_tensor).__name__}")
    bias.fill_(-math.log((1.0 - prior) / prior))
    return module_or_tensor
