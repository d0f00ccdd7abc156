"""Registered ops of the class-index focal loss over the levels of a detector head (``torch.ops.focal_triton.*``).

    focal_triton::multilevel_focal_loss(levels, labels, weights, alpha_per_class, alpha, gamma, smoothing,
        ignore_index, has_ignore, num_anchors, normalizer, norm_value, reduction, upcast, loss_kind, beta,
        iou_weighted, scores, with_stats, requires_grad) -> Tensor[]
        "sum": [loss (0-d, float32; float64 for float64 logits), scale (N,)], with_stats adding the (N, M)
        per-anchor losses of the same pass (not differentiable), and where `keeps_gradient` (the CPU path's
        float32 FL with requires_grad: the caller's grad mode and the levels' requires_grad) the gradient of the
        loss w.r.t. each level, computed in the forward's pass and saved for this call's backward (in the autograd
        graph: freed with it); "none": the per-level losses, each in its level's layout and dtype (float32 with
        upcast, what autocast asks for).
    focal_triton::multilevel_focal_loss_backward(grads, levels, labels, weights, alpha_per_class, alpha, gamma,
        smoothing, ignore_index, has_ignore, num_anchors, scale, loss_kind, beta, iou_weighted, scores) -> Tensor[]
        (one gradient per level)

Arguments arrive validated by `focal_triton.multilevel`: levels in any layout (NCHW-contiguous and channels_last
ones are read in place; another is copied once into NCHW, inside the op, so that no layout question is asked
while torch.compile traces the caller: it would guard on sizes equal to 1), labels (N, M) contiguous int32/int64, weights / alpha_per_class contiguous in the compute dtype, normalizer 0-d or
(N,) (or None with the host number norm_value). `scale` is the per-image factor of the forward (1 / normalizer, or
1 / (N normalizer_n)), the one thing of the forward the backward needs besides the inputs. loss_kind (0 FL, 1 FL*,
2 QFL, 3 VFL), beta and iou_weighted as in focal_triton.ops; scores: QFL / VFL's (N, M) per-anchor target scores
in the compute dtype, contiguous (None for FL / FL*).
"""
from typing import List, Optional

import torch

from . import torch_path_fast, torch_path_multilevel
from .dispatch import select_backend, serialized
from .layout import like
from .kernels.sigmoid_focal import LossSpec
from .ops import loss_dtype
from .torch_path import compute_dtype


def _implementation(device: torch.device):
    if select_backend(device) == "triton":
        from .kernels import multilevel_focal

        return multilevel_focal
    return torch_path_multilevel


def _norm_mode(normalizer: Optional[torch.Tensor]) -> int:
    if normalizer is None:
        return 0
    return 1 if normalizer.dim() == 0 else 2


def _is_empty(levels) -> bool:
    return all(lv.numel() == 0 for lv in levels)


def _native_layout(level: torch.Tensor) -> torch.Tensor:
    """The level itself when NCHW-contiguous or channels_last (read in place), else one contiguous copy."""
    if level.is_contiguous() or level.is_contiguous(memory_format=torch.channels_last):
        return level
    return level.contiguous()


def _like_levels(outs, levels, native):
    """Per-level outputs computed on the native-layout levels, in the layout of the levels as given (what the fake
    implementations promise: torch.empty_like of each level); a copy only for a level that was copied."""
    return [o if n is lv else torch.empty_like(lv, dtype=o.dtype).copy_(o) for o, lv, n in zip(outs, levels, native)]


def keeps_gradient(levels, weights, alpha_per_class, reduction, loss_kind, with_stats, requires_grad) -> bool:
    """Whether the forward op also returns the levels' gradients (one per level, after the loss and scale): only
    when they will be needed (requires_grad) and the CPU path computes them in the forward's own pass."""
    return (requires_grad and reduction == "sum" and select_backend(levels[0].device) == "torch"
            and torch_path_fast.keeps_gradient(levels, weights, alpha_per_class, loss_kind, with_stats))


@torch.library.custom_op("focal_triton::multilevel_focal_loss", mutates_args=())
def multilevel_focal_loss_op(levels: List[torch.Tensor], labels: torch.Tensor, weights: Optional[torch.Tensor],
                             alpha_per_class: Optional[torch.Tensor], alpha: float, gamma: float, smoothing: float,
                             ignore_index: int, has_ignore: bool, num_anchors: int,
                             normalizer: Optional[torch.Tensor], norm_value: float,
                             reduction: str, upcast: bool, loss_kind: int, beta: float, iou_weighted: bool,
                             scores: Optional[torch.Tensor], with_stats: bool,
                             requires_grad: bool) -> List[torch.Tensor]:
    x = levels[0]
    ignore = ignore_index if has_ignore else None
    alpha_arg = alpha_per_class if alpha_per_class is not None else alpha
    keep = keeps_gradient(levels, weights, alpha_per_class, reduction, loss_kind, with_stats, requires_grad)
    if _is_empty(levels):
        if reduction == "none":
            return [torch.empty_like(lv, dtype=loss_dtype(lv, upcast)) for lv in levels]
        cdt = compute_dtype(x.dtype)
        return [torch.zeros((), dtype=cdt, device=x.device), torch.zeros(x.shape[0], dtype=cdt, device=x.device)] \
            + ([torch.zeros(labels.shape, dtype=cdt, device=x.device)] if with_stats else []) \
            + ([torch.zeros_like(lv) for lv in levels] if keep else [])
    loss = LossSpec(loss_kind, beta, iou_weighted, scores)
    native = [_native_layout(lv) for lv in levels]
    args = (native, labels, weights, alpha_arg, gamma, smoothing, ignore, num_anchors, reduction,
            _norm_mode(normalizer), normalizer, norm_value, loss_dtype(x, upcast))
    if keep:
        *out, kept = torch_path_multilevel.multilevel_focal_forward(*args, loss=loss, keep_grad=True)
        return list(out) + _like_levels(kept, levels, native)
    with serialized(x.device):
        out = list(_implementation(x.device).multilevel_focal_forward(*args, loss=loss, with_stats=with_stats))
    return _like_levels(out, levels, native) if reduction == "none" else out


@multilevel_focal_loss_op.register_fake
def _(levels, labels, weights, alpha_per_class, alpha, gamma, smoothing, ignore_index, has_ignore, num_anchors,
      normalizer, norm_value, reduction, upcast, loss_kind, beta, iou_weighted, scores, with_stats, requires_grad):
    x = levels[0]
    if reduction == "none":
        return [torch.empty_like(lv, dtype=loss_dtype(lv, upcast)) for lv in levels]
    cdt = compute_dtype(x.dtype)
    keep = keeps_gradient(levels, weights, alpha_per_class, reduction, loss_kind, with_stats, requires_grad)
    return [x.new_empty((), dtype=cdt), x.new_empty((x.shape[0],), dtype=cdt)] \
        + ([x.new_empty(labels.shape, dtype=cdt)] if with_stats else []) \
        + ([torch.empty_like(lv) for lv in levels] if keep else [])


@torch.library.custom_op("focal_triton::multilevel_focal_loss_backward", mutates_args=())
def multilevel_focal_loss_backward_op(grads: List[torch.Tensor], levels: List[torch.Tensor], labels: torch.Tensor,
                                      weights: Optional[torch.Tensor], alpha_per_class: Optional[torch.Tensor],
                                      alpha: float, gamma: float, smoothing: float, ignore_index: int,
                                      has_ignore: bool, num_anchors: int,
                                      scale: Optional[torch.Tensor], loss_kind: int, beta: float,
                                      iou_weighted: bool, scores: Optional[torch.Tensor]) -> List[torch.Tensor]:
    if _is_empty(levels):
        return [torch.zeros_like(lv) for lv in levels]
    native = [_native_layout(lv) for lv in levels]
    if scale is None:
        # Upstream gradients of "none" losses, in each level's layout (one copy only where they differ).
        grads = [like(lv, g) for lv, g in zip(native, grads)]
    ignore = ignore_index if has_ignore else None
    alpha_arg = alpha_per_class if alpha_per_class is not None else alpha
    device = levels[0].device
    with serialized(device):
        outs = _implementation(device).multilevel_focal_backward(
            grads, native, labels, weights, alpha_arg, gamma, smoothing, ignore, num_anchors, scale=scale,
            loss=LossSpec(loss_kind, beta, iou_weighted, scores))
    return _like_levels(outs, levels, native)


@multilevel_focal_loss_backward_op.register_fake
def _(grads, levels, labels, weights, alpha_per_class, alpha, gamma, smoothing, ignore_index, has_ignore,
      num_anchors, scale, loss_kind, beta, iou_weighted, scores):
    return [torch.empty_like(lv) for lv in levels]


def _setup_context(ctx, inputs, output):
    (levels, labels, weights, alpha_per_class, alpha, gamma, smoothing, ignore_index, has_ignore, num_anchors,
     normalizer, norm_value, reduction, upcast, loss_kind, beta, iou_weighted, scores, with_stats,
     requires_grad) = inputs
    ctx.num_levels = len(levels)
    ctx.reduction = reduction
    # The outputs other than the loss(es) get no gradient: None, not logit-sized zeros made for them.
    ctx.set_materialize_grads(False)
    ctx.kept = keeps_gradient(levels, weights, alpha_per_class, reduction, loss_kind, with_stats, requires_grad)
    if ctx.kept:  # the forward computed the gradients: they are all the backward needs
        ctx.save_for_backward(*output[-len(levels):])
        return
    scale = output[1] if reduction != "none" else None
    ctx.save_for_backward(*levels, labels, weights, alpha_per_class, scale, scores)
    ctx.params = (alpha, gamma, smoothing, ignore_index, has_ignore, num_anchors)
    ctx.loss = (loss_kind, beta, iou_weighted)


def _is_one(upstream: torch.Tensor) -> bool:
    """Whether the upstream gradient is 1, where that can be read for free: a real CPU tensor (not a fake or
    functional one being traced by torch.compile or opcheck, which hold no value)."""
    return (type(upstream) is torch.Tensor and upstream.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._is_functional_tensor(upstream) and float(upstream) == 1.0)


def _scaled(kept, upstream):
    """The kept gradients times the upstream gradient of the loss: as they are for the usual upstream 1, else one
    multiply."""
    if upstream is None:
        return [torch.zeros_like(k) for k in kept]
    if _is_one(upstream):
        return list(kept)
    return [k * upstream.to(k.dtype) for k in kept]


def _backward(ctx, grads):
    saved = ctx.saved_tensors
    # One entry per input of the op: the levels' gradients, nothing for the other 19 inputs.
    if ctx.kept:
        return (_scaled(saved, grads[0]),) + (None,) * 19
    levels, (labels, weights, alpha_per_class, scale, scores) = list(saved[:ctx.num_levels]), saved[ctx.num_levels:]
    if ctx.reduction == "none":
        # A level whose loss was not used gets no gradient from autograd: its upstream gradient is zero.
        upstream = [g if g is not None else torch.zeros_like(lv) for g, lv in zip(grads, levels)]
    else:
        upstream = [grads[0] if grads[0] is not None else torch.zeros((), dtype=scale.dtype, device=scale.device)]
    grad_levels = multilevel_focal_loss_backward_op(upstream, levels, labels, weights, alpha_per_class,
                                                    *ctx.params, scale if ctx.reduction != "none" else None,
                                                    *ctx.loss, scores)
    return (grad_levels,) + (None,) * 19


multilevel_focal_loss_op.register_autograd(_backward, setup_context=_setup_context)
