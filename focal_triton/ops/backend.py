"""Which implementation runs for a device, and the operands it gets.

- CUDA tensors: the compiled Triton kernels (`focal_triton.kernels`).
- CPU tensors with TRITON_INTERPRET=1 set before triton was imported: the same Triton kernels, interpreted.
- anything else (CPU without the interpreter, other devices, or triton not installed): the pure-torch CPU path
  (`focal_triton.cpu`), which runs on any device torch does.
FOCAL_TRITON_BACKEND=torch forces the torch path everywhere (a debugging aid); =triton demands the kernels and
fails loudly where they cannot run; =auto (the default) chooses as above. Nothing here imports triton unless the
kernels are chosen: the package works without it.

Operands: the implementations walk a flat range in storage order, so dense operands must share strides
(`dense_operands`); a multi-level call's levels are NCHW-contiguous or channels_last (`native_layout`).
"""
import contextlib
import functools
import importlib.util
import os
import sys
import threading
import warnings

import torch

from ..cpu import dense as _cpu_dense
from ..cpu import matching as _cpu_matching
from ..cpu import multilevel as _cpu_multilevel
from ..layouts import is_dense  # noqa: F401 - dense_operands' rule, also imported from here

BACKEND_ENV = "FOCAL_TRITON_BACKEND"
BACKEND_CHOICES = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on CPU tensors with its interpreter (TRITON_INTERPRET=1 was set before triton
    was imported). Imports triton only where that can be the case."""
    if not triton_available():
        return False
    if "triton" not in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        return False  # triton imported now would not interpret
    from ..kernels.launch import interpreter_enabled as interpreted

    return interpreted()


def select_backend(device: torch.device) -> str:
    """"triton" or "torch" for tensors on `device` (see the module docstring)."""
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKEND_CHOICES}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if device.type == "cuda" and not triton_available():
        if choice == "triton":
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed")
        _warn_no_triton()
        return "torch"
    triton_runs_here = device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    if choice == "triton" and not triton_runs_here:
        raise RuntimeError(
            f"{BACKEND_ENV}=triton but Triton kernels cannot run on device {device}: use a CUDA device, or set "
            "TRITON_INTERPRET=1 before importing triton to interpret them on CPU"
        )
    return "triton" if triton_runs_here else "torch"


@functools.lru_cache(maxsize=None)
def _warn_no_triton():
    warnings.warn("focal_triton: triton is not installed, so CUDA tensors take the pure-torch path (correct, not "
                  "fused): pip install triton for the kernels", RuntimeWarning, stacklevel=4)


_CPU = {"dense": _cpu_dense, "multilevel": _cpu_multilevel, "matching": _cpu_matching}


def implementation(device: torch.device, op: str):
    """The module holding op ("dense", "multilevel" or "matching") for tensors on `device`: kernels.<op> (imported at first
    use: it imports Triton) or cpu.<op> (imported with this module, never first inside a torch.compile trace, where
    its module-level tensors would be created as fake tensors)."""
    if select_backend(device) == "triton":
        return importlib.import_module(f"focal_triton.kernels.{op}")
    return _CPU[op]


# Triton's interpreter keeps a launch's grid and program ids in module-level state: two threads launching at once
# corrupt each other's (seen: "x >= grid_dim[0]" from 2 of 4 threads). Its launches take this lock; compiled
# kernels and the torch path run concurrently as usual.
_INTERPRETER_LOCK = threading.RLock()


def serialized(device: torch.device):
    """A context for running an implementation on `device`: the interpreter's lock where the Triton kernels are
    interpreted (CPU tensors, TRITON_INTERPRET=1), else nothing."""
    if device.type == "cpu" and select_backend(device) == "triton":
        return _INTERPRETER_LOCK
    return contextlib.nullcontext()


# --- operands ---------------------------------------------------------------------------------------------------

def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every dim of size > 1 (size-1 dims may carry any stride)."""
    return a.shape == b.shape and all(
        sa == sb for s, sa, sb in zip(a.shape, a.stride(), b.stride()) if s != 1
    )


def like(reference: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t itself when it already has reference's dense layout, else one copy of t in that layout."""
    if same_layout(reference, t):
        return t
    return torch.empty_like(reference, dtype=t.dtype).copy_(t)


def dense_operands(inputs: torch.Tensor, targets: torch.Tensor):
    """(x, t) holding the same values as (inputs, targets), dense and with identical strides.

    Dense inputs are used in place whatever their dim order (NCHW, channels_last, a permuted view); a non-dense
    one (a strided slice, an expanded tensor) is copied once into the contiguous layout. targets follow x's layout,
    copied only when their strides differ.
    """
    x = inputs if is_dense(inputs) else inputs.contiguous()
    return x, like(x, targets)


def is_broadcast_scalar(t: torch.Tensor) -> bool:
    """True when every element of t aliases one storage slot (e.g. the ones that loss.sum() sends backward)."""
    return t.numel() > 0 and all(st == 0 for s, st in zip(t.shape, t.stride()) if s != 1)


def native_layout(level: torch.Tensor) -> torch.Tensor:
    """The level itself when NCHW-contiguous or channels_last (read in place), else one contiguous copy."""
    if level.is_contiguous() or level.is_contiguous(memory_format=torch.channels_last):
        return level
    return level.contiguous()


def like_levels(outs, levels, native):
    """Per-level outputs computed on the native-layout levels, in the layout of the levels as given (what the fake
    implementations promise: torch.empty_like of each level); a copy only for a level that was copied."""
    return [o if n is lv else torch.empty_like(lv, dtype=o.dtype).copy_(o) for o, lv, n in zip(outs, levels, native)]


def is_one(upstream: torch.Tensor) -> bool:
    """Whether the upstream gradient is 1, where that can be read for free: a real CPU tensor (not a fake or
    functional one being traced by torch.compile or opcheck, which hold no value)."""
    return (type(upstream) is torch.Tensor and upstream.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._is_functional_tensor(upstream) and float(upstream) == 1.0)


def scaled(kept, upstream):
    """Gradients a forward computed (for upstream 1) times the upstream gradient: as they are for the usual
    upstream 1, else one multiply."""
    if upstream is None:
        return [torch.zeros_like(k) for k in kept]
    if is_one(upstream):
        return list(kept)
    return [k * upstream.to(k.dtype) for k in kept]
