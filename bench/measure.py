"""Time, peak memory and copy bandwidth, on CUDA and on CPU.

CUDA: median of `triton.testing.do_bench` (CUDA-graph replay with `do_bench_cudagraph` below GRAPH_BELOW logits,
where launch overhead would dominate; plain do_bench if capture fails); peak memory is
`torch.cuda.max_memory_allocated` after a reset, minus what was allocated before the call (the inputs); the copy
bandwidth is measured on the device (a 1 GiB device-to-device copy: read + write bytes / time).
CPU: median wall time of repeated calls (at least `min_reps`, up to ~`budget_s` seconds), the providers of a case
timed in turns (`time_cpu_interleaved`), so that the machine's load drifts equally over all of them; peak memory is counted
at the torch-op level by a dispatch mode that adds the bytes of every new storage an op returns and subtracts them
when the storage is freed (the internal scratch of a fused op, such as focal_triton's ~1 MiB of chunk buffers on
CPU, is not seen); the copy bandwidth is that of a 256 MiB tensor copy.
"""
import gc
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GRAPH_BELOW = 10_000_000


def time_cuda(fn, numel: int) -> float:
    import triton.testing

    if numel < GRAPH_BELOW:
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
        except Exception:  # noqa: BLE001 - capture can fail (autograd, host syncs): plain timing then
            torch.cuda.synchronize()
    return float(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median"))


def time_cpu(fn, min_reps: int = 3, budget_s: float = 3.0) -> float:
    """Median milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_cpu_interleaved(fns, min_reps: int = 5, budget_s: float = 8.0) -> list:
    """Median milliseconds of each fn in fns, timed in turns (fn0, fn1, ..., fn0, fn1, ...) after one warm-up call
    each: on a shared machine a slow spell then slows every fn alike, so the ratios between them hold."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_reps or (time.perf_counter() - start < budget_s and len(times[0]) < 50):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e3 for ts in times]


def time_ms(fn, device: torch.device, numel: int, **kw) -> float:
    if device.type == "cuda":
        return time_cuda(fn, numel)
    return time_cpu(fn, **kw)


def times_ms(fns, device: torch.device, numel: int) -> list:
    """Milliseconds of each fn: one after the other on CUDA (do_bench is stable there), interleaved on CPU."""
    if device.type == "cuda":
        return [time_cuda(fn, numel) for fn in fns]
    return time_cpu_interleaved(fns)


class PeakBytes(TorchDispatchMode):
    """Live and peak bytes of the storages that torch ops allocate while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "focal_triton":  # a fused op: its outputs count, its inner ops are not traced
            from torch.utils._python_dispatch import _disable_current_modes

            with _disable_current_modes():
                out = func(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0]
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n == 0 or key in self._seen or key in inputs:  # views and in-place results: no new memory
                    continue
                self._seen[key] = n
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, n)
        return out

    def _free(self, key, n):
        if self._seen.pop(key, None) is not None:
            self.live -= n


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated by fn() beyond what existed before it (outputs and gradients included)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    with PeakBytes() as mode:
        fn()
    return int(mode.peak)


def copy_bandwidth(device: torch.device) -> float:
    """Measured copy bandwidth in GB/s (bytes read + written per second) of a large tensor copy."""
    n = (1 << 30 if device.type == "cuda" else 1 << 28) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, n, min_reps=5, budget_s=2.0) if device.type == "cpu" else \
        time_cuda(lambda: dst.copy_(src), GRAPH_BELOW)
    del src, dst
    return 2 * n * 4 / (ms * 1e-3) / 1e9
