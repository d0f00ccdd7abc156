"""Triton kernels of focal_triton (installed as ``focal_triton.kernels``): ``@triton.jit`` code and its launchers.

    math.py        the family's elementwise math (@triton.jit helpers) and its compile-time switches
    dense.py       the dense kernels (a flat range of logits and targets): forward, backward
    multilevel.py  the class-index kernel over all levels of a head, and its final reduction
    matching.py    the focal matching cost of DETR-style Hungarian matchers (no reduction, no gradient)
    launch.py      block sizes, warps, the persistent grid (occupancy), device and capture guards
    tuning.py      autotuning per GPU, its JSON cache, and the config each launch is handed

Imports only `focal_triton.losses` from the layers above (the loss kinds, LossSpec, limits). No autograd and no
``nn.Module`` here: the ops layer (`focal_triton.ops`) calls `dense.forward/backward` and
`multilevel.forward/backward` and `matching.forward`.
"""
from .launch import interpreter_enabled

__all__ = ["interpreter_enabled"]
