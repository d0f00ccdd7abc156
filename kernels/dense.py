"""Adapter (until the kernel files are renamed): the dense kernels' launchers with the op layer's contract."""
from ..losses import FL_STAR, QFL, VFL
from .sigmoid_focal import sigmoid_focal_backward, sigmoid_focal_forward


def _public(spec):
    if spec.kind == QFL:
        return -1.0, 0.0, spec.gamma, True
    if spec.kind == VFL:
        return spec.beta, spec.gamma, 0.0, spec.c1 == 1.0
    alpha = -1.0 if (spec.c0, spec.c1) == (1.0, 0.0) else 1.0 - spec.c0
    return alpha, spec.gamma, spec.beta if spec.kind == FL_STAR else 0.0, True


def forward(x, t, spec, reduction, out_dtype=None):
    alpha, gamma, beta, iou = _public(spec)
    return sigmoid_focal_forward(x, t, alpha, gamma, reduction, out_dtype, int(spec.kind), beta, iou)


def backward(grad, x, t, spec, reduction):
    alpha, gamma, beta, iou = _public(spec)
    return sigmoid_focal_backward(grad, x, t, alpha, gamma, reduction, int(spec.kind), beta, iou)
