"""The registered op of the focal matching cost (``torch.ops.focal_triton.focal_matching_cost``): backend choice
and fake (meta) shape. No autograd: a matcher's cost is not differentiated (the matchers run it under
torch.no_grad), and the public function hands the op detached logits, so its output never requires grad.

    focal_triton::focal_matching_cost(logits, labels, alpha, gamma) -> cost

logits (N, C) any strides, labels (G,) contiguous int32 / int64, both validated (`validation.matching_call`);
cost (N, G) contiguous, float32 (float64 for float64 logits).
"""
import torch

from ..losses import compute_dtype
from .backend import implementation, serialized


@torch.library.custom_op("focal_triton::focal_matching_cost", mutates_args=())
def focal_matching_cost_op(logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    n, g = logits.shape[0], labels.shape[0]
    if n == 0 or g == 0:
        return logits.new_empty((n, g), dtype=compute_dtype(logits.dtype))
    with serialized(logits.device):
        return implementation(logits.device, "matching").forward(logits, labels, alpha, gamma)


@focal_matching_cost_op.register_fake
def _(logits, labels, alpha, gamma):
    return logits.new_empty((logits.shape[0], labels.shape[0]), dtype=compute_dtype(logits.dtype))


def focal_matching_cost(call) -> torch.Tensor:
    """The cost of a validated call (`validation.MatchingCall`)."""
    return focal_matching_cost_op(call.logits, call.labels, call.alpha, call.gamma)
