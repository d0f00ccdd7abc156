"""The registered PyTorch ops (``torch.ops.focal_triton.*``): device dispatch, fake (meta) shapes and autograd.

    focal_triton::sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction, upcast, loss_kind, beta,
        iou_weighted) -> loss
    focal_triton::sigmoid_focal_loss_backward(grad, inputs, targets, alpha, gamma, reduction, loss_kind, beta,
        iou_weighted) -> grad_inputs

loss_kind: 0 FL, 1 FL*, 2 QFL, 3 VFL (kernels.sigmoid_focal.kernel_scalars says what alpha, gamma, beta and
iou_weighted mean for each).

Arguments arrive validated (see `focal_triton.functional`). upcast: return the loss in float32 instead of the
logits' dtype (what `focal_triton.functional` asks for under autocast). The forward saves only inputs and targets;
the backward recomputes everything else in one pass.
"""
import torch

from . import torch_path
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


@torch.library.custom_op("focal_triton::sigmoid_focal_loss", mutates_args=())
def sigmoid_focal_loss_op(inputs: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float,
                          reduction: str, upcast: bool, loss_kind: int, beta: float,
                          iou_weighted: bool) -> torch.Tensor:
    x, t = dense_operands(inputs, targets)
    if x.numel() == 0:
        return _empty_result(x, reduction, upcast)
    with serialized(x.device):
        return _implementation(x.device).sigmoid_focal_forward(x, t, alpha, gamma, reduction, loss_dtype(x, upcast),
                                                               loss_kind, beta, iou_weighted)


@sigmoid_focal_loss_op.register_fake
def _(inputs, targets, alpha, gamma, reduction, upcast, loss_kind, beta, iou_weighted):
    x, _ = dense_operands(inputs, targets)
    dtype = loss_dtype(x, upcast)
    return torch.empty_like(x, dtype=dtype) if reduction == "none" else x.new_empty((), dtype=dtype)


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
    logits, targets, alpha, gamma, reduction, upcast, loss_kind, beta, iou_weighted = inputs
    ctx.save_for_backward(logits, targets)
    ctx.params = (alpha, gamma, reduction, loss_kind, beta, iou_weighted)


def _backward(ctx, grad):
    logits, targets = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = sigmoid_focal_loss_backward_op(grad, logits, targets, *ctx.params)
    return grad_logits, None, None, None, None, None, None, None, None


sigmoid_focal_loss_op.register_autograd(_backward, setup_context=_setup_context)
