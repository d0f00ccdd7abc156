"""The registered PyTorch ops (``torch.ops.focal_triton.*``): device dispatch, fake (meta) shapes and autograd.

    focal_triton::sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction, upcast, loss_kind, beta,
        iou_weighted, requires_grad) -> [loss] or [loss, grad_inputs]
    focal_triton::sigmoid_focal_loss_backward(grad, inputs, targets, alpha, gamma, reduction, loss_kind, beta,
        iou_weighted) -> grad_inputs

loss_kind: 0 FL, 1 FL*, 2 QFL, 3 VFL (kernels.sigmoid_focal.kernel_scalars says what alpha, gamma, beta and
iou_weighted mean for each).

Arguments arrive validated (see `focal_triton.functional`). upcast: return the loss in float32 instead of the
logits' dtype (what `focal_triton.functional` asks for under autocast). requires_grad: the caller's grad mode and
inputs.requires_grad. Where `keeps_gradient` (the CPU path's float32 FL with requires_grad) the forward also
returns the gradient (of the loss, or for "none" of each element's loss), computed in its own pass and saved for
this call's backward in the autograd graph; otherwise the forward saves only inputs and targets and the backward
recomputes everything else in one pass.
"""
from typing import List

import torch

from . import torch_path, torch_path_fast
from .dispatch import select_backend, serialized
from .layout import dense_operands, is_broadcast_scalar, like


def _implementation(device: torch.device):
    if select_backend(device) == "triton":
        from . import kernels

        return kernels
    return torch_path


def loss_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    """The dtype of an elementwise loss: the logits', or float32 for 16-bit logits when upcast (autocast)."""
    return torch.float32 if upcast and x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _empty_result(x: torch.Tensor, reduction: str, upcast: bool) -> torch.Tensor:
    if reduction == "none":
        return torch.empty_like(x, dtype=loss_dtype(x, upcast))
    # torch's conventions for an empty tensor: sum 0, mean NaN.
    return torch.full((), 0.0 if reduction == "sum" else float("nan"), dtype=loss_dtype(x, upcast), device=x.device)


def keeps_gradient(x: torch.Tensor, loss_kind: int, requires_grad: bool) -> bool:
    """Whether the forward op also returns the gradient: only when it will be needed (requires_grad) and the CPU
    path computes it in the forward's own pass."""
    return (requires_grad and select_backend(x.device) == "torch"
            and torch_path_fast.dense_keeps_gradient(x, loss_kind))


@torch.library.custom_op("focal_triton::sigmoid_focal_loss", mutates_args=())
def sigmoid_focal_loss_op(inputs: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float,
                          reduction: str, upcast: bool, loss_kind: int, beta: float,
                          iou_weighted: bool, requires_grad: bool) -> List[torch.Tensor]:
    x, t = dense_operands(inputs, targets)
    keep = keeps_gradient(x, loss_kind, requires_grad)
    if x.numel() == 0:
        return [_empty_result(x, reduction, upcast)] + ([torch.zeros_like(x)] if keep else [])
    if keep:
        return list(torch_path.sigmoid_focal_forward(x, t, alpha, gamma, reduction, loss_dtype(x, upcast),
                                                     loss_kind, beta, iou_weighted, keep_grad=True))
    with serialized(x.device):
        return [_implementation(x.device).sigmoid_focal_forward(x, t, alpha, gamma, reduction,
                                                                loss_dtype(x, upcast), loss_kind, beta,
                                                                iou_weighted)]


@sigmoid_focal_loss_op.register_fake
def _(inputs, targets, alpha, gamma, reduction, upcast, loss_kind, beta, iou_weighted, requires_grad):
    x, _ = dense_operands(inputs, targets)
    dtype = loss_dtype(x, upcast)
    loss = torch.empty_like(x, dtype=dtype) if reduction == "none" else x.new_empty((), dtype=dtype)
    return [loss] + ([torch.empty_like(x)] if keeps_gradient(x, loss_kind, requires_grad) else [])


@torch.library.custom_op("focal_triton::sigmoid_focal_loss_backward", mutates_args=())
def sigmoid_focal_loss_backward_op(grad: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, alpha: float,
                                   gamma: float, reduction: str, loss_kind: int, beta: float,
                                   iou_weighted: bool) -> torch.Tensor:
    x, t = dense_operands(inputs, targets)
    if x.numel() == 0:
        return torch.empty_like(x)
    if reduction == "none":
        # The ones that loss.sum() sends back are an expanded scalar: read its one element instead of copying it.
        grad = grad.as_strided((), ()) if is_broadcast_scalar(grad) else like(x, grad)
    with serialized(x.device):
        return _implementation(x.device).sigmoid_focal_backward(grad, x, t, alpha, gamma, reduction, loss_kind, beta,
                                                                iou_weighted)


@sigmoid_focal_loss_backward_op.register_fake
def _(grad, inputs, targets, alpha, gamma, reduction, loss_kind, beta, iou_weighted):
    x, _ = dense_operands(inputs, targets)
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    logits, targets, alpha, gamma, reduction, upcast, loss_kind, beta, iou_weighted, requires_grad = inputs
    ctx.kept = len(output) == 2
    ctx.reduction = reduction
    ctx.set_materialize_grads(False)  # the kept gradient output gets no gradient: None, not zeros made for it
    if ctx.kept:  # the forward computed the gradient: all the backward needs
        ctx.save_for_backward(output[1])
        return
    ctx.save_for_backward(logits, targets)
    ctx.params = (alpha, gamma, reduction, loss_kind, beta, iou_weighted)


def _kept_times(kept, grad, reduction):
    """The kept gradient times the upstream gradient: as it is for an upstream of 1 (or of loss.sum()'s expanded
    ones), else one multiply (elementwise for "none")."""
    from .multilevel_ops import _scaled

    if grad is not None and reduction == "none":
        if not is_broadcast_scalar(grad):
            return kept * grad
        grad = grad.as_strided((), ())
    return _scaled([kept], grad)[0]


def _backward(ctx, grads):
    grad = grads[0]
    if ctx.kept:
        return (_kept_times(ctx.saved_tensors[0], grad, ctx.reduction),) + (None,) * 9
    logits, targets = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0] and grad is not None:
        grad_logits = sigmoid_focal_loss_backward_op(grad, logits, targets, *ctx.params)
    return (grad_logits,) + (None,) * 9


sigmoid_focal_loss_op.register_autograd(_backward, setup_context=_setup_context)
