"""Which implementation runs for a device: the Triton kernels or the fused pure-torch path.

- CUDA tensors: the compiled Triton kernels.
- CPU tensors with TRITON_INTERPRET=1 set before triton was imported: the same Triton kernels, interpreted.
- anything else (CPU without the interpreter, other devices): the chunked pure-torch path (`torch_path`).
FOCAL_TRITON_BACKEND=torch forces the torch path everywhere (a debugging aid); =triton demands the kernels and
fails loudly where they cannot run; =auto (the default) chooses as above.
"""
import contextlib
import os
import threading

import torch

from .kernels import interpreter_enabled

BACKEND_ENV = "FOCAL_TRITON_BACKEND"
BACKEND_CHOICES = ("auto", "triton", "torch")


def select_backend(device: torch.device) -> str:
    """"triton" or "torch" for tensors on `device` (see the module docstring)."""
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKEND_CHOICES}, got {choice!r}")
    if choice == "torch":
        return "torch"
    triton_runs_here = device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    if choice == "triton" and not triton_runs_here:
        raise RuntimeError(
            f"{BACKEND_ENV}=triton but Triton kernels cannot run on device {device}: use a CUDA device, or set "
            "TRITON_INTERPRET=1 before importing triton to interpret them on CPU"
        )
    return "triton" if triton_runs_here else "torch"


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
