"""Registered ops of the class-index loss over the levels of a detector head (``torch.ops.focal_triton.*``):
backend choice, fake (meta) shapes and autograd.

    focal_triton::multilevel_focal_loss(levels, labels, weights, scores, alpha_per_class, normalizer,
        norm_value, num_anchors, kind, c0, c1, gamma, beta, smoothing, ignore_index, reduction, out_dtype,
        with_stats, requires_grad) -> Tensor[]
        "sum": [loss (0-d, float32; float64 for float64 logits), scale (N,)], with_stats adding the (N, M)
        per-anchor losses of the same pass (not differentiable), and where `keeps_gradient` (the CPU path's
        float32 FL with requires_grad: the caller's grad mode and the levels' requires_grad) the gradient of the
        loss w.r.t. each level, computed in the forward's pass and saved for this call's backward (in the autograd
        graph: freed with it); "none": the per-level losses, each in its level's layout, in out_dtype.
    focal_triton::multilevel_focal_loss_backward(grads, levels, labels, weights, scores, alpha_per_class, scale,
        num_anchors, kind, c0, c1, gamma, beta, smoothing, ignore_index) -> Tensor[] (one gradient per level)

Arguments arrive validated and encoded by `focal_triton.validation` (a `ClassIndexCall`): levels in any layout
(NCHW-contiguous and channels_last ones are read in place; another is copied once into NCHW inside the op, so that
no layout question is asked while torch.compile traces the caller: it would guard on sizes equal to 1), labels
(N, M) contiguous int32/int64, weights / scores (N, M) and alpha_per_class (C,) contiguous in the compute dtype,
normalizer None (the number norm_value), 0-d or (N,); kind .. smoothing the loss (`losses.LossSpec`). `scale` is
the per-image factor of the forward, the one thing of the forward the backward needs besides the inputs.
"""
from typing import List, Optional

import torch

from ..layouts import empty_out, is_dense, reads_in_place, segment_view
from ..losses import LossSpec, compute_dtype
from .backend import implementation, like, like_levels, native_layout, scaled, select_backend, serialized


def _is_empty(levels) -> bool:
    return all(lv.numel() == 0 for lv in levels)


def keeps_gradient(levels, weights, alpha_per_class, spec, reduction, with_stats, requires_grad) -> bool:
    """Whether the forward op also returns the levels' gradients (one per level, after the other outputs): only
    when they will be needed (requires_grad) and the CPU path computes them in the forward's own pass."""
    if not requires_grad or reduction != "sum" or select_backend(levels[0].device) != "torch":
        return False
    return implementation(levels[0].device, "multilevel").keeps_gradient(levels, weights, alpha_per_class, spec,
                                                                       with_stats)


@torch.library.custom_op("focal_triton::multilevel_focal_loss", mutates_args=())
def multilevel_focal_loss_op(levels: List[torch.Tensor], labels: torch.Tensor, weights: Optional[torch.Tensor],
                             scores: Optional[torch.Tensor], alpha_per_class: Optional[torch.Tensor],
                             normalizer: Optional[torch.Tensor], norm_value: float, num_anchors: int, kind: int,
                             c0: float, c1: float, gamma: float, beta: float, smoothing: float,
                             ignore_index: Optional[int], reduction: str, out_dtype: torch.dtype, with_stats: bool,
                             requires_grad: bool) -> List[torch.Tensor]:
    x = levels[0]
    spec = LossSpec(kind, c0, c1, gamma, beta, smoothing)
    keep = keeps_gradient(levels, weights, alpha_per_class, spec, reduction, with_stats, requires_grad)
    if _is_empty(levels):
        if reduction == "none":
            return [torch.empty_like(lv, dtype=out_dtype) for lv in levels]
        cdt = compute_dtype(x.dtype)
        return [torch.zeros((), dtype=cdt, device=x.device), torch.zeros(x.shape[0], dtype=cdt, device=x.device)] \
            + ([torch.zeros(labels.shape, dtype=cdt, device=x.device)] if with_stats else []) \
            + ([torch.zeros_like(lv) for lv in levels] if keep else [])
    native = [native_layout(lv) for lv in levels]
    args = (native, labels, weights, scores, alpha_per_class, spec, ignore_index, num_anchors, reduction,
            normalizer, norm_value, out_dtype)
    impl = implementation(x.device, "multilevel")
    if keep:
        *out, kept = impl.forward(*args, keep_grad=True)
        return list(out) + like_levels(kept, levels, native)
    with serialized(x.device):
        out = list(impl.forward(*args, with_stats=with_stats))
    return like_levels(out, levels, native) if reduction == "none" else out


@multilevel_focal_loss_op.register_fake
def _(levels, labels, weights, scores, alpha_per_class, normalizer, norm_value, num_anchors, kind, c0, c1, gamma,
      beta, smoothing, ignore_index, reduction, out_dtype, with_stats, requires_grad):
    x = levels[0]
    if reduction == "none":
        return [torch.empty_like(lv, dtype=out_dtype) for lv in levels]
    cdt = compute_dtype(x.dtype)
    keep = keeps_gradient(levels, weights, alpha_per_class, LossSpec(kind, c0, c1, gamma, beta, smoothing),
                          reduction, with_stats, requires_grad)
    return [x.new_empty((), dtype=cdt), x.new_empty((x.shape[0],), dtype=cdt)] \
        + ([x.new_empty(labels.shape, dtype=cdt)] if with_stats else []) \
        + ([torch.empty_like(lv) for lv in levels] if keep else [])


@torch.library.custom_op("focal_triton::multilevel_focal_loss_backward", mutates_args=())
def multilevel_focal_loss_backward_op(grads: List[torch.Tensor], levels: List[torch.Tensor], labels: torch.Tensor,
                                      weights: Optional[torch.Tensor], scores: Optional[torch.Tensor],
                                      alpha_per_class: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                                      num_anchors: int, kind: int, c0: float, c1: float, gamma: float, beta: float,
                                      smoothing: float, ignore_index: Optional[int]) -> List[torch.Tensor]:
    if _is_empty(levels):
        return [torch.zeros_like(lv) for lv in levels]
    native = [native_layout(lv) for lv in levels]
    if scale is None:
        # Upstream gradients of "none" losses, in each level's layout (one copy only where they differ).
        grads = [like(lv, g) for lv, g in zip(native, grads)]
    device = levels[0].device
    with serialized(device):
        outs = implementation(device, "multilevel").backward(
            grads, native, labels, weights, scores, alpha_per_class, LossSpec(kind, c0, c1, gamma, beta, smoothing),
            ignore_index, num_anchors, scale=scale)
    return like_levels(outs, levels, native)


@multilevel_focal_loss_backward_op.register_fake
def _(grads, levels, labels, weights, scores, alpha_per_class, scale, num_anchors, kind, c0, c1, gamma, beta,
      smoothing, ignore_index):
    return [torch.empty_like(lv) for lv in levels]


# The backward returns one entry per input of the op: the levels' gradients, and None for every other one.
_OTHER_INPUTS = len(torch.ops.focal_triton.multilevel_focal_loss.default._schema.arguments) - 1


def _setup_context(ctx, inputs, output):
    (levels, labels, weights, scores, alpha_per_class, normalizer, norm_value, num_anchors, kind, c0, c1, gamma,
     beta, smoothing, ignore_index, reduction, out_dtype, with_stats, requires_grad) = inputs
    ctx.num_levels = len(levels)
    ctx.reduction = reduction
    # The outputs other than the loss(es) get no gradient: None, not logit-sized zeros made for them.
    ctx.set_materialize_grads(False)
    ctx.kept = keeps_gradient(levels, weights, alpha_per_class, LossSpec(kind, c0, c1, gamma, beta, smoothing),
                              reduction, with_stats, requires_grad)
    if ctx.kept:  # the forward computed the gradients: they are all the backward needs
        ctx.save_for_backward(*output[-len(levels):])
        return
    scale = output[1] if reduction != "none" else None
    ctx.save_for_backward(*levels, labels, weights, scores, alpha_per_class, scale)
    ctx.params = (num_anchors, kind, c0, c1, gamma, beta, smoothing, ignore_index)


def _backward(ctx, grads):
    saved = ctx.saved_tensors
    if ctx.kept:
        return (scaled(saved, grads[0]),) + (None,) * _OTHER_INPUTS
    levels, (labels, weights, scores, alpha_per_class, scale) = list(saved[:ctx.num_levels]), saved[ctx.num_levels:]
    if ctx.reduction == "none":
        # A level whose loss was not used gets no gradient from autograd: its upstream gradient is zero.
        upstream = [g if g is not None else torch.zeros_like(lv) for g, lv in zip(grads, levels)]
    else:
        upstream = [grads[0] if grads[0] is not None else torch.zeros((), dtype=scale.dtype, device=scale.device)]
    grad_levels = multilevel_focal_loss_backward_op(upstream, levels, labels, weights, scores, alpha_per_class,
                                                    scale, *ctx.params)
    return (grad_levels,) + (None,) * _OTHER_INPUTS


multilevel_focal_loss_op.register_autograd(_backward, setup_context=_setup_context)


def op_args(call) -> tuple:
    """The forward op's arguments for a validated class-index call (`validation.ClassIndexCall`)."""
    s = call.spec
    return (call.levels, call.labels, call.weights, call.scores, call.alpha_per_class, call.normalizer,
            call.norm_value, call.num_anchors, int(s.kind), s.c0, s.c1, s.gamma, s.beta, s.smoothing,
            call.ignore_index, call.reduction, call.out_dtype, call.with_stats, call.requires_grad)


def backward_op_args(call, grads, scale) -> tuple:
    """The backward op's arguments for the same call: upstream gradients (one 0-d for "sum", with the forward's
    scale; per-level for "none", scale None)."""
    s = call.spec
    return (grads, [lv.detach() for lv in call.levels], call.labels, call.weights, call.scores,
            call.alpha_per_class, scale, call.num_anchors, int(s.kind), s.c0, s.c1, s.gamma, s.beta, s.smoothing,
            call.ignore_index)


def multilevel_focal_loss(call) -> list:
    """The op's outputs for a validated class-index call."""
    return multilevel_focal_loss_op(*op_args(call))


# --- segments ---------------------------------------------------------------------------------------------------
#
#     focal_triton::segmented_focal_loss(sources, geometry, labels, label_row, weights, scores, alpha_per_class,
#         divisors, num_anchors, kind, c0, c1, gamma, beta, smoothing, ignore_index)
#         -> [total, per_segment (S,), scale (S, N)]
#     focal_triton::segmented_focal_loss_backward(grad_per_segment, sources, geometry, labels, ..., scale, ...)
#         -> one gradient per source
#
# sources: the tensors the gradients flow to: the base of views that share one (the decoder layers of a stacked
# tensor: its gradient written in place, segment by segment, with no view-backward copies) or a segment's logits
# themselves. geometry: per segment (source index, N, K, H, W, sn, sk, sh, sw, storage offset), the (N, A*C, H, W)
# view of its logits (`validation.SEGMENT_GEOMETRY`). The kernels read each view in place where
# `layouts.reads_in_place` (else one contiguous copy), the CPU path in native layout (a copy otherwise); labels
# (N, >= M) with row stride label_row, segment s owning A H_s W_s columns after those of the segments before it;
# weights / scores laid out like the labels; divisors (S, N): loss_s = sum_n (sum over image n of s) / divisors[s, n].

GEOMETRY = 10


def _views(sources, geometry):
    """Each segment's (N, A*C, H, W) view of its source (no copy)."""
    out = []
    for j in range(0, len(geometry), GEOMETRY):
        src, n, k, h, w, sn, sk, sh, sw, offset = geometry[j:j + GEOMETRY]
        out.append(sources[src].as_strided((n, k, h, w), (sn, sk, sh, sw), offset))
    return out


def _segment_operands(logits, device):
    """The logits as the implementation reads them."""
    if select_backend(device) == "triton":
        return [lv if reads_in_place(lv) else lv.contiguous() for lv in logits]
    return [native_layout(lv) for lv in logits]


def _covered(source, views) -> bool:
    """Whether the views of `source` (non-overlapping, on disjoint storage ranges: validation grouped them so)
    cover each of its elements: then its gradient needs no zero fill."""
    return sum(v.numel() for v in views) == source.numel()


def _source_gradients(sources, geometry):
    """(gradient of each source, each segment's view of its source's gradient): a dense source's gradient has its
    strides, the segments write into it through their own views; a source that is one non-dense view gets
    `layouts.out_strides`."""
    views = _views(sources, geometry)
    index = geometry[::GEOMETRY]
    grads = []
    for i, src in enumerate(sources):
        mine = [v for v, j in zip(views, index) if j == i]
        if is_dense(src):
            grads.append(torch.empty_like(src) if _covered(src, mine) else torch.zeros_like(src))
        else:
            grads.append(empty_out(src))
    outs = []
    for v, j in zip(views, index):
        g, src = grads[j], sources[j]
        outs.append(segment_view(g) if not is_dense(src) else
                    g.as_strided(v.shape, v.stride(), v.storage_offset() - src.storage_offset() + g.storage_offset()))
    return grads, outs


@torch.library.custom_op("focal_triton::segmented_focal_loss", mutates_args=())
def segmented_focal_loss_op(sources: List[torch.Tensor], geometry: List[int], labels: torch.Tensor, label_row: int,
                            weights: Optional[torch.Tensor], scores: Optional[torch.Tensor],
                            alpha_per_class: Optional[torch.Tensor], divisors: torch.Tensor, num_anchors: int,
                            kind: int, c0: float, c1: float, gamma: float, beta: float, smoothing: float,
                            ignore_index: Optional[int]) -> List[torch.Tensor]:
    logits = _views(sources, geometry)
    x = logits[0]
    cdt = compute_dtype(x.dtype)
    if _is_empty(logits):
        return [torch.zeros((), dtype=cdt, device=x.device), torch.zeros(len(logits), dtype=cdt, device=x.device),
                (1.0 / divisors.to(cdt)).contiguous()]
    spec = LossSpec(kind, c0, c1, gamma, beta, smoothing)
    with serialized(x.device):
        total, per_segment, scale = implementation(x.device, "multilevel").segments_forward(
            _segment_operands(logits, x.device), labels, label_row, weights, scores, alpha_per_class, spec,
            ignore_index, num_anchors, divisors)
    return [total, per_segment, scale]


@segmented_focal_loss_op.register_fake
def _(sources, geometry, labels, label_row, weights, scores, alpha_per_class, divisors, num_anchors, kind, c0, c1,
      gamma, beta, smoothing, ignore_index):
    x, segments = sources[0], len(geometry) // GEOMETRY
    cdt = compute_dtype(x.dtype)
    return [x.new_empty((), dtype=cdt), x.new_empty((segments,), dtype=cdt),
            x.new_empty((segments, geometry[1]), dtype=cdt)]


@torch.library.custom_op("focal_triton::segmented_focal_loss_backward", mutates_args=())
def segmented_focal_loss_backward_op(grad_per_segment: torch.Tensor, sources: List[torch.Tensor],
                                     geometry: List[int], labels: torch.Tensor, label_row: int,
                                     weights: Optional[torch.Tensor], scores: Optional[torch.Tensor],
                                     alpha_per_class: Optional[torch.Tensor], scale: torch.Tensor, num_anchors: int,
                                     kind: int, c0: float, c1: float, gamma: float, beta: float, smoothing: float,
                                     ignore_index: Optional[int]) -> List[torch.Tensor]:
    grads, outs = _source_gradients(sources, geometry)
    logits = _views(sources, geometry)
    if _is_empty(logits):
        return [g.zero_() for g in grads]
    device = logits[0].device
    operands = _segment_operands(logits, device)
    # Where the implementation reads a copy (or the CPU path a native-layout one), it writes a gradient of that
    # layout, copied into the segment's view.
    direct = [o if op is lv else torch.empty_like(op) for o, op, lv in zip(outs, operands, logits)]
    with serialized(device):
        implementation(device, "multilevel").segments_backward(
            grad_per_segment, operands, direct, labels, label_row, weights, scores, alpha_per_class,
            LossSpec(kind, c0, c1, gamma, beta, smoothing), ignore_index, num_anchors, scale)
    for o, d in zip(outs, direct):
        if d is not o:
            o.copy_(d)
    return grads


@segmented_focal_loss_backward_op.register_fake
def _(grad_per_segment, sources, geometry, labels, label_row, weights, scores, alpha_per_class, scale, num_anchors,
      kind, c0, c1, gamma, beta, smoothing, ignore_index):
    return [torch.empty_like(src) if is_dense(src) else empty_out(src) for src in sources]


_SEGMENT_OTHER_INPUTS = len(torch.ops.focal_triton.segmented_focal_loss.default._schema.arguments) - 1


def _segments_setup_context(ctx, inputs, output):
    (sources, geometry, labels, label_row, weights, scores, alpha_per_class, divisors, num_anchors, kind, c0, c1,
     gamma, beta, smoothing, ignore_index) = inputs
    ctx.set_materialize_grads(False)
    ctx.num_sources = len(sources)
    ctx.save_for_backward(*sources, labels, weights, scores, alpha_per_class, output[2])
    ctx.params = (num_anchors, kind, c0, c1, gamma, beta, smoothing, ignore_index)
    ctx.geometry, ctx.label_row = geometry, label_row


def _segments_backward(ctx, grads):
    saved = ctx.saved_tensors
    sources, (labels, weights, scores, alpha_per_class, scale) = list(saved[:ctx.num_sources]), \
        saved[ctx.num_sources:]
    g_total, g_segment = grads[0], grads[1]
    # d/dx of g_total * total + sum_s g_segment[s] * loss_s: one upstream factor per segment.
    upstream = torch.zeros(scale.shape[0], dtype=scale.dtype, device=scale.device)
    if g_total is not None:
        upstream = upstream + g_total.to(scale.dtype)
    if g_segment is not None:
        upstream = upstream + g_segment.to(scale.dtype)
    grad_sources = segmented_focal_loss_backward_op(upstream.contiguous(), sources, ctx.geometry, labels,
                                                    ctx.label_row, weights, scores, alpha_per_class, scale,
                                                    *ctx.params)
    return (grad_sources,) + (None,) * _SEGMENT_OTHER_INPUTS


segmented_focal_loss_op.register_autograd(_segments_backward, setup_context=_segments_setup_context)


def segmented_focal_loss(call) -> list:
    """(total, per-segment losses) for a validated segments call (`validation.SegmentsCall`)."""
    s = call.spec
    out = segmented_focal_loss_op(call.sources, call.geometry, call.labels, call.label_row, call.weights, call.scores,
                                  call.alpha_per_class, call.divisors, call.num_anchors, int(s.kind), s.c0, s.c1,
                                  s.gamma, s.beta, s.smoothing, call.ignore_index)
    return out[0], out[1]
