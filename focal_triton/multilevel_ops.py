"""Registered ops of the class-index focal loss over the levels of a detector head (``torch.ops.focal_triton.*``).

    focal_triton::multilevel_focal_loss(levels, labels, weights, alpha_per_class, alpha, gamma, smoothing,
        ignore_index, has_ignore, num_anchors, normalizer, norm_value, reduction, upcast, loss_kind, beta,
        iou_weighted, scores, with_stats) -> Tensor[]
        "sum": [loss (0-d, float32; float64 for float64 logits), scale (N,)], with_stats adding the (N, M)
        per-anchor losses of the same pass (not differentiable); "none": the per-level losses, each in its level's
        layout and dtype (float32 with upcast, what autocast asks for).
    focal_triton::multilevel_focal_loss_backward(grads, levels, labels, weights, alpha_per_class, alpha, gamma,
        smoothing, ignore_index, has_ignore, num_anchors, scale, loss_kind, beta, iou_weighted, scores) -> Tensor[]
        (one gradient per level)

Arguments arrive validated and laid out by `focal_triton.multilevel`: levels NCHW-contiguous or channels_last,
labels (N, M) contiguous int32/int64, weights / alpha_per_class contiguous in the compute dtype, normalizer 0-d or
(N,) (or None with the host number norm_value). `scale` is the per-image factor of the forward (1 / normalizer, or
1 / (N normalizer_n)), the one thing of the forward the backward needs besides the inputs. loss_kind (0 FL, 1 FL*,
2 QFL, 3 VFL), beta and iou_weighted as in focal_triton.ops; scores: QFL / VFL's (N, M) per-anchor target scores
in the compute dtype, contiguous (None for FL / FL*).
"""
from typing import List, Optional

import torch

from . import torch_path_multilevel
from .dispatch import select_backend
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


@torch.library.custom_op("focal_triton::multilevel_focal_loss", mutates_args=())
def multilevel_focal_loss_op(levels: List[torch.Tensor], labels: torch.Tensor, weights: Optional[torch.Tensor],
                             alpha_per_class: Optional[torch.Tensor], alpha: float, gamma: float, smoothing: float,
                             ignore_index: int, has_ignore: bool, num_anchors: int,
                             normalizer: Optional[torch.Tensor], norm_value: float,
                             reduction: str, upcast: bool, loss_kind: int, beta: float, iou_weighted: bool,
                             scores: Optional[torch.Tensor], with_stats: bool) -> List[torch.Tensor]:
    x = levels[0]
    ignore = ignore_index if has_ignore else None
    alpha_arg = alpha_per_class if alpha_per_class is not None else alpha
    if _is_empty(levels):
        if reduction == "none":
            return [torch.empty_like(lv, dtype=loss_dtype(lv, upcast)) for lv in levels]
        cdt = compute_dtype(x.dtype)
        return [torch.zeros((), dtype=cdt, device=x.device), torch.zeros(x.shape[0], dtype=cdt, device=x.device)] \
            + ([torch.zeros(labels.shape, dtype=cdt, device=x.device)] if with_stats else [])
    impl = _implementation(x.device)
    out = impl.multilevel_focal_forward(levels, labels, weights, alpha_arg, gamma, smoothing, ignore, num_anchors,
                                        reduction, _norm_mode(normalizer), normalizer, norm_value,
                                        loss_dtype(x, upcast), loss=LossSpec(loss_kind, beta, iou_weighted, scores),
                                        with_stats=with_stats)
    return list(out)


@multilevel_focal_loss_op.register_fake
def _(levels, labels, weights, alpha_per_class, alpha, gamma, smoothing, ignore_index, has_ignore, num_anchors,
      normalizer, norm_value, reduction, upcast, loss_kind, beta, iou_weighted, scores, with_stats):
    x = levels[0]
    if reduction == "none":
        return [torch.empty_like(lv, dtype=loss_dtype(lv, upcast)) for lv in levels]
    cdt = compute_dtype(x.dtype)
    return [x.new_empty((), dtype=cdt), x.new_empty((x.shape[0],), dtype=cdt)] \
        + ([x.new_empty(labels.shape, dtype=cdt)] if with_stats else [])


@torch.library.custom_op("focal_triton::multilevel_focal_loss_backward", mutates_args=())
def multilevel_focal_loss_backward_op(grads: List[torch.Tensor], levels: List[torch.Tensor], labels: torch.Tensor,
                                      weights: Optional[torch.Tensor], alpha_per_class: Optional[torch.Tensor],
                                      alpha: float, gamma: float, smoothing: float, ignore_index: int,
                                      has_ignore: bool, num_anchors: int,
                                      scale: Optional[torch.Tensor], loss_kind: int, beta: float,
                                      iou_weighted: bool, scores: Optional[torch.Tensor]) -> List[torch.Tensor]:
    if _is_empty(levels):
        return [torch.zeros_like(lv) for lv in levels]
    if scale is None:
        # Upstream gradients of "none" losses, in each level's layout (one copy only where they differ).
        grads = [like(lv, g) for lv, g in zip(levels, grads)]
    ignore = ignore_index if has_ignore else None
    alpha_arg = alpha_per_class if alpha_per_class is not None else alpha
    impl = _implementation(levels[0].device)
    return list(impl.multilevel_focal_backward(grads, levels, labels, weights, alpha_arg, gamma, smoothing, ignore,
                                               num_anchors, scale=scale,
                                               loss=LossSpec(loss_kind, beta, iou_weighted, scores)))


@multilevel_focal_loss_backward_op.register_fake
def _(grads, levels, labels, weights, alpha_per_class, alpha, gamma, smoothing, ignore_index, has_ignore,
      num_anchors, scale, loss_kind, beta, iou_weighted, scores):
    return [torch.empty_like(lv) for lv in levels]


def _setup_context(ctx, inputs, output):
    (levels, labels, weights, alpha_per_class, alpha, gamma, smoothing, ignore_index, has_ignore, num_anchors,
     normalizer, norm_value, reduction, upcast, loss_kind, beta, iou_weighted, scores, with_stats) = inputs
    scale = output[1] if reduction != "none" else None
    ctx.num_levels = len(levels)
    ctx.reduction = reduction
    ctx.save_for_backward(*levels, labels, weights, alpha_per_class, scale, scores)
    ctx.params = (alpha, gamma, smoothing, ignore_index, has_ignore, num_anchors)
    ctx.loss = (loss_kind, beta, iou_weighted)


def _backward(ctx, grads):
    saved = ctx.saved_tensors
    levels, (labels, weights, alpha_per_class, scale, scores) = list(saved[:ctx.num_levels]), saved[ctx.num_levels:]
    if ctx.reduction == "none":
        # A level whose loss was not used gets no gradient from autograd: its upstream gradient is zero.
        upstream = [g if g is not None else torch.zeros_like(lv) for g, lv in zip(grads, levels)]
    else:
        upstream = [grads[0] if grads[0] is not None else torch.zeros((), dtype=scale.dtype, device=scale.device)]
    grad_levels = multilevel_focal_loss_backward_op(upstream, levels, labels, weights, alpha_per_class,
                                                    *ctx.params, scale if ctx.reduction != "none" else None,
                                                    *ctx.loss, scores)
    # One entry per input of the op: the levels' gradients, nothing for the other 18 inputs.
    return (grad_levels,) + (None,) * 18


multilevel_focal_loss_op.register_autograd(_backward, setup_context=_setup_context)
