"""The registered dense ops (``torch.ops.focal_triton.*``): backend choice, fake (meta) shapes and autograd.

    focal_triton::sigmoid_focal_loss(inputs, targets, kind, c0, c1, gamma, beta, reduction, out_dtype,
        requires_grad) -> [loss] or [loss, grad_inputs]
    focal_triton::sigmoid_focal_loss_backward(grad, inputs, targets, kind, c0, c1, gamma, beta, reduction)
        -> grad_inputs

kind, c0, c1, gamma, beta: the loss in the implementations' encoding (`losses.LossSpec`). out_dtype: the loss's
dtype (the logits', or float32 under autocast). requires_grad: the caller's grad mode and inputs.requires_grad.
Where `keeps_gradient` (the CPU path's float32 FL with requires_grad) the forward also returns the gradient (of
the loss, or for "none" of each element's loss), computed in its own pass and saved for this call's backward in
the autograd graph; otherwise the forward saves only inputs and targets and the backward recomputes everything
else in one pass.
"""
from typing import List

import torch

from ..losses import LossSpec
from .backend import dense_operands, implementation, is_broadcast_scalar, like, scaled, select_backend, serialized


def keeps_gradient(x: torch.Tensor, spec: LossSpec, requires_grad: bool) -> bool:
    """Whether the forward op also returns the gradient: only when it will be needed (requires_grad) and the CPU
    path computes it in the forward's own pass."""
    if not requires_grad or select_backend(x.device) != "torch":
        return False
    return implementation(x.device, "dense").keeps_gradient(x, spec)


def _empty_result(x: torch.Tensor, reduction: str, out_dtype) -> torch.Tensor:
    if reduction == "none":
        return torch.empty_like(x, dtype=out_dtype)
    # torch's conventions for an empty tensor: sum 0, mean NaN.
    return torch.full((), 0.0 if reduction == "sum" else float("nan"), dtype=out_dtype, device=x.device)


@torch.library.custom_op("focal_triton::sigmoid_focal_loss", mutates_args=())
def sigmoid_focal_loss_op(inputs: torch.Tensor, targets: torch.Tensor, kind: int, c0: float, c1: float,
                          gamma: float, beta: float, reduction: str, out_dtype: torch.dtype,
                          requires_grad: bool) -> List[torch.Tensor]:
    x, t = dense_operands(inputs, targets)
    spec = LossSpec(kind, c0, c1, gamma, beta)
    keep = keeps_gradient(x, spec, requires_grad)
    if x.numel() == 0:
        return [_empty_result(x, reduction, out_dtype)] + ([torch.zeros_like(x)] if keep else [])
    impl = implementation(x.device, "dense")
    if keep:
        return list(impl.forward(x, t, spec, reduction, out_dtype, keep_grad=True))
    with serialized(x.device):
        return [impl.forward(x, t, spec, reduction, out_dtype)]


@sigmoid_focal_loss_op.register_fake
def _(inputs, targets, kind, c0, c1, gamma, beta, reduction, out_dtype, requires_grad):
    x, _ = dense_operands(inputs, targets)
    loss = torch.empty_like(x, dtype=out_dtype) if reduction == "none" else x.new_empty((), dtype=out_dtype)
    keep = keeps_gradient(x, LossSpec(kind, c0, c1, gamma, beta), requires_grad)
    return [loss] + ([torch.empty_like(x)] if keep else [])


@torch.library.custom_op("focal_triton::sigmoid_focal_loss_backward", mutates_args=())
def sigmoid_focal_loss_backward_op(grad: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, kind: int,
                                   c0: float, c1: float, gamma: float, beta: float,
                                   reduction: str) -> torch.Tensor:
    x, t = dense_operands(inputs, targets)
    if x.numel() == 0:
        return torch.empty_like(x)
    if reduction == "none":
        # The ones that loss.sum() sends back are an expanded scalar: read its one element instead of copying it.
        grad = grad.as_strided((), ()) if is_broadcast_scalar(grad) else like(x, grad)
    with serialized(x.device):
        return implementation(x.device, "dense").backward(grad, x, t, LossSpec(kind, c0, c1, gamma, beta),
                                                          reduction)


@sigmoid_focal_loss_backward_op.register_fake
def _(grad, inputs, targets, kind, c0, c1, gamma, beta, reduction):
    x, _ = dense_operands(inputs, targets)
    return torch.empty_like(x)


# The backward returns one gradient per input of the op: the logits', and None for every other one.
_OTHER_INPUTS = len(torch.ops.focal_triton.sigmoid_focal_loss.default._schema.arguments) - 1


def _setup_context(ctx, inputs, output):
    logits, targets, kind, c0, c1, gamma, beta, reduction, out_dtype, requires_grad = inputs
    ctx.kept = len(output) == 2
    ctx.reduction = reduction
    ctx.set_materialize_grads(False)  # the kept gradient output gets no gradient: None, not zeros made for it
    if ctx.kept:  # the forward computed the gradient: all the backward needs
        ctx.save_for_backward(output[1])
        return
    ctx.save_for_backward(logits, targets)
    ctx.params = (kind, c0, c1, gamma, beta, reduction)


def _kept_times(kept, grad, reduction):
    """The kept gradient times the upstream gradient: as it is for an upstream of 1 (or of loss.sum()'s expanded
    ones), else one multiply (elementwise for "none")."""
    if grad is not None and reduction == "none":
        if not is_broadcast_scalar(grad):
            return kept * grad
        grad = grad.as_strided((), ())
    return scaled([kept], grad)[0]


def _backward(ctx, grads):
    grad = grads[0]
    if ctx.kept:
        return (_kept_times(ctx.saved_tensors[0], grad, ctx.reduction),) + (None,) * _OTHER_INPUTS
    logits, targets = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0] and grad is not None:
        grad_logits = sigmoid_focal_loss_backward_op(grad, logits, targets, *ctx.params)
    return (grad_logits,) + (None,) * _OTHER_INPUTS


sigmoid_focal_loss_op.register_autograd(_backward, setup_context=_setup_context)


def op_args(call) -> tuple:
    """The forward op's arguments for a validated dense call (`validation.DenseCall`)."""
    s = call.spec
    return (call.inputs, call.targets, int(s.kind), s.c0, s.c1, s.gamma, s.beta, call.reduction, call.out_dtype,
            call.requires_grad)


def sigmoid_focal_loss(call) -> torch.Tensor:
    """The loss of a validated dense call."""
    return sigmoid_focal_loss_op(*op_args(call))[0]
