"""Adapter (until the kernel files are renamed): the multi-level kernel's launchers with the op layer's contract."""
from .dense import _public
from .multilevel_focal import multilevel_focal_backward, multilevel_focal_forward
from .sigmoid_focal import LossSpec as _KernelLoss


def _args(spec, alpha_per_class, scores):
    alpha, gamma, beta, iou = _public(spec)
    return (alpha_per_class if alpha_per_class is not None else alpha), gamma, _KernelLoss(int(spec.kind), beta, iou,
                                                                                         scores)


def forward(levels, labels, weights, scores, alpha_per_class, spec, ignore_index, num_anchors, reduction,
            normalizer=None, norm_value=1.0, out_dtype=None, with_stats=False):
    alpha, gamma, loss = _args(spec, alpha_per_class, scores)
    mode = 0 if normalizer is None else (1 if normalizer.dim() == 0 else 2)
    return multilevel_focal_forward(levels, labels, weights, alpha, gamma, spec.smoothing, ignore_index, num_anchors,
                                    reduction, mode, normalizer, norm_value, out_dtype, loss=loss,
                                    with_stats=with_stats)


def backward(grads, levels, labels, weights, scores, alpha_per_class, spec, ignore_index, num_anchors, scale=None):
    alpha, gamma, loss = _args(spec, alpha_per_class, scores)
    return multilevel_focal_backward(grads, levels, labels, weights, alpha, gamma, spec.smoothing, ignore_index,
                                     num_anchors, scale=scale, loss=loss)
