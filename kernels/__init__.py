"""Triton kernels of focal_triton (installed as ``focal_triton.kernels``): ``@triton.jit`` code and launch helpers.

No autograd and no ``nn.Module`` here: the torch-facing layer lives in ``focal_triton``.
"""
from .launch import interpreter_enabled
from .multilevel_focal import multilevel_focal_backward, multilevel_focal_forward
from .sigmoid_focal import sigmoid_focal_backward, sigmoid_focal_forward

__all__ = ["interpreter_enabled", "sigmoid_focal_forward", "sigmoid_focal_backward", "multilevel_focal_forward",
           "multilevel_focal_backward"]
