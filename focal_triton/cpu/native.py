"""The negatives' pass as one compiled loop: `focal_triton.cpu._negatives`, built from cpu/negatives.c by pip where
a C compiler is found (an optional extension: without one, focal_triton installs and the torch form of `cpu.math`
runs instead). One call takes every chunk of a loss (all levels, all images) as a table of tasks, runs them on
`torch.get_num_threads()` threads, and returns each task's float64 loss sum.

The loop evaluates the negatives' formulas of `cpu.math` (FL_neg = m bce, dFL_neg/dx = k m (p - ts + gamma q
bce)) with the kernels' float32 shortcuts (negatives.c states them): one pass over the logits instead of ~10 torch
ops, for float32 and bfloat16 logits. FOCAL_TRITON_CPU_NATIVE=0 turns it off (the torch form then runs).
"""
import os

import torch

try:
    from . import _negatives
except ImportError:  # built without a C compiler
    _negatives = None

NATIVE_ENV = "FOCAL_TRITON_CPU_NATIVE"
DTYPES = (torch.float32, torch.bfloat16)
# Elements per task: ~250 tasks per COCO image for the threads to share (each a few tens of microseconds).
CHUNK = 1 << 16


def built() -> bool:
    """Whether the extension was built (and imports)."""
    return _negatives is not None


def available(dtype: torch.dtype) -> bool:
    """Whether the compiled pass takes logits of this dtype (and is not turned off)."""
    return _negatives is not None and dtype in DTYPES and os.environ.get(NATIVE_ENV, "1") != "0"


def negatives(tasks, dtype: torch.dtype, gamma: float, ts: float) -> torch.Tensor:
    """Per task, the float64 sum of m bce over its range (a non-finite sum: a logit was inf or NaN).

    tasks: (x, grad, start, end, skip, factor) with x the flat (storage-order) logits of dtype, grad None or a flat
    tensor like x that receives factor * dFL_neg/dx on [start, end) (0 at skipped elements), skip None or (offsets,
    lo, hi): offsets[lo:hi] the sorted element indices in [start, end) to leave out (contiguous int64).
    Every tensor must stay alive during the call (the caller holds them)."""
    n = len(tasks)
    sums = torch.empty(n, dtype=torch.float64)
    if n == 0:
        return sums
    rows, factors = [], []
    for x, grad, start, end, skip, factor in tasks:
        if skip is not None:
            offsets, lo, hi = skip
            if offsets.dtype != torch.int64 or not offsets.is_contiguous():
                raise ValueError("negatives: skip offsets must be contiguous int64")
            skip_addr, nskip = (offsets.data_ptr() + 8 * lo, hi - lo) if hi > lo else (0, 0)
        else:
            skip_addr, nskip = 0, 0
        if x.dtype != dtype or not (0 <= start <= end <= x.numel()) or (grad is not None and (
                grad.dtype != dtype or grad.numel() != x.numel())):
            raise ValueError("negatives: a task's logits, range or gradient do not match")  # a caller's bug
        rows.append((x.data_ptr(), grad.data_ptr() if grad is not None else 0, start, end, skip_addr, nskip))
        factors.append(factor)
    table = torch.tensor(rows, dtype=torch.int64)
    factors = torch.tensor(factors, dtype=torch.float64)
    int_gamma = int(gamma) if float(gamma).is_integer() and 0 <= gamma <= 4 else -1
    _negatives.negatives(table.data_ptr(), factors.data_ptr(), sums.data_ptr(), n, int(dtype == torch.bfloat16),
                         int_gamma, float(gamma), float(ts), torch.get_num_threads())
    return sums
