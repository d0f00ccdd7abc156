"""Launch configuration: block size, warps and the persistent grid, with the reason for each number.

Compiled path (CUDA). Each thread owns 16 bytes of logits per tile (one 128-bit load): BLOCK = 128 threads * 16 B /
itemsize with 4 warps. (32 bytes per thread made ptxas spill in the fractional-gamma backward of 16-bit logits,
seen in SASS.) The grid is persistent and exactly one wave: as many programs as fit on the device at once
(occupancy from the compiled kernel's registers and shared memory, as in Triton's fused-softmax tutorial), each
looping over tiles with a fixed stride. A fixed grid per (device, specialization) makes the per-program partial
sums of a reduction, and so its bits, the same on every run.

Interpreter path (TRITON_INTERPRET=1, CPU tensors). One fixed config: small tiles and 4 programs, so that small test
tensors take several loop iterations per program and a masked tail tile, the control flow the GPU sees on large
tensors. Autotuning cannot run there (it needs a GPU to time configs).
"""
import contextlib
import ctypes
import functools
from dataclasses import dataclass

import torch
import triton

# Index arithmetic switches to 64 bits when an offset could pass INT32_MAX (tile starts go up to numel + BLOCK).
from ..losses import INT32_MAX


@triton.jit
def _probe_kernel():
    pass


@functools.lru_cache(maxsize=None)
def interpreter_enabled() -> bool:
    """True when Triton runs kernels on CPU tensors with its interpreter: triton.jit then made every kernel of this
    process an InterpretedFunction (TRITON_INTERPRET=1 was set before triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe_kernel, InterpretedFunction)


@dataclass(frozen=True)
class ElementwiseConfig:
    """BLOCK elements per tile, num_warps per program; max_programs caps the grid where it is fixed in advance
    (the interpreter) and is None where the device's occupancy decides it (CUDA)."""

    block: int
    num_warps: int
    max_programs: int = None
    num_stages: int = None  # None: triton's default
    maxnreg: int = None  # None: ptxas's choice of registers per thread

    def options(self) -> dict:
        """Launch options: num_warps, num_stages where tuning chose one, maxnreg where the launcher sets one."""
        return dict(num_warps=self.num_warps, **({} if self.num_stages is None else dict(num_stages=self.num_stages)),
                    **({} if self.maxnreg is None else dict(maxnreg=self.maxnreg)))


GPU_NUM_WARPS = 4
GPU_BYTES_PER_THREAD = 16
INTERPRETER_CONFIG = ElementwiseConfig(block=128, num_warps=1, max_programs=4)
# Partial sums the final reduction adds per loop iteration (one program, 4 KiB of float32).
PARTIAL_SUM_BLOCK = 1024


def gpu_block(itemsize: int) -> int:
    return GPU_NUM_WARPS * 32 * GPU_BYTES_PER_THREAD // itemsize


class _StandIn:
    """Set by focal_triton.jit_check while CPU tensors stand in for CUDA ones (a stand-in driver compiles each launch
    for a GPU target with `warmup`): the launchers then take the compiled path's configs and grids."""

    sm = None  # SMResources of the stand-in GPU, or None: no stand-in


STANDIN = _StandIn()


def compiled_path(device: torch.device) -> bool:
    """True where the kernels are compiled for a GPU: CUDA tensors (or a stand-in GPU, see _StandIn)."""
    return device.type == "cuda" or STANDIN.sm is not None


def config_for(device: torch.device, itemsize: int, tuned: dict = None) -> ElementwiseConfig:
    """The config of a launch for logits of this itemsize on this device: on the compiled path the tuned config
    handed over by tuning.run_tuned when it holds one (BLOCK, num_warps), else the heuristic above."""
    if not compiled_path(device):
        return INTERPRETER_CONFIG
    if tuned and "BLOCK" in tuned:
        return ElementwiseConfig(tuned["BLOCK"], tuned["num_warps"], num_stages=tuned.get("num_stages"))
    return ElementwiseConfig(gpu_block(itemsize), GPU_NUM_WARPS)


def gpu_configs_for(itemsize: int) -> list:
    """Every compiled-path config the launcher can pick for logits of this itemsize (for the ahead-of-time check)."""
    return [ElementwiseConfig(gpu_block(itemsize), GPU_NUM_WARPS)]


def device_guard(device: torch.device):
    """Triton compiles and launches on the current CUDA device: make it the tensors' device for the launch."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def needs_int64(numel: int, block: int) -> bool:
    return numel + block > INT32_MAX


@dataclass(frozen=True)
class SMResources:
    count: int
    regs_per_sm: int
    threads_per_sm: int
    shared_per_sm: int


@functools.lru_cache(maxsize=None)
def sm_resources(device_index: int) -> SMResources:
    p = torch.cuda.get_device_properties(device_index)
    return SMResources(p.multi_processor_count, p.regs_per_multiprocessor, p.max_threads_per_multi_processor,
                       p.shared_memory_per_multiprocessor)


def programs_per_sm(n_regs: int, shared_bytes: int, num_warps: int, sm: SMResources) -> int:
    """Programs of one kernel resident on an SM at once: limited by registers (allocated per warp in units of 256,
    i.e. per-thread counts rounded up to 8), by threads, and by shared memory."""
    threads = 32 * num_warps
    by_regs = sm.regs_per_sm // (-(-max(n_regs, 1) // 8) * 8 * threads)
    by_threads = sm.threads_per_sm // threads
    by_shared = sm.shared_per_sm // shared_bytes if shared_bytes else by_threads
    return max(1, min(by_regs, by_threads, by_shared))


_PERSISTENT_GRID = {}


def _specialization_key(arg):
    """What Triton's JIT specializes a kernel on for one argument: dtype and 16-byte alignment for tensors,
    divisibility by 16 and equality to 1 for ints."""
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, int) and not isinstance(arg, bool):
        return (int, arg % 16 == 0, arg == 1, arg > INT32_MAX)
    return type(arg)


def max_programs(kernel, args, constexprs: dict, cfg: ElementwiseConfig, device: torch.device) -> int:
    """cfg.max_programs, or on CUDA the number of programs of this specialization that fit on the device at once
    (compiled once with kernel.warmup and cached for the process). Only the types and alignment of `args` matter."""
    if cfg.max_programs is not None:
        return cfg.max_programs
    key = (kernel.fn.__name__, device.index, cfg.num_warps, cfg.num_stages, cfg.maxnreg,
           tuple(_specialization_key(a) for a in args), tuple(sorted(constexprs.items(), key=lambda kv: kv[0])))
    if STANDIN.sm is not None:  # compiled for the stand-in GPU, never loaded: a grid of 4 programs per SM
        kernel.warmup(*args, grid=(1,), **cfg.options(), **constexprs)
        return STANDIN.sm.count * 4
    grid = _PERSISTENT_GRID.get(key)
    if grid is None:
        with capture_permits_loading(device):
            compiled = kernel.warmup(*args, grid=(1,), **cfg.options(), **constexprs)
            compiled._init_handles()
        sm = sm_resources(device.index)
        grid = sm.count * programs_per_sm(compiled.n_regs, compiled.metadata.shared, cfg.num_warps, sm)
        _PERSISTENT_GRID[key] = grid
    return grid


def load_before_launch(kernel, grid, args, options: dict, constexprs: dict, device: torch.device):
    """Inside a CUDA-graph capture, compile and load the specialization of this launch first, in a thread capture
    mode that permits it (see capture_permits_loading); elsewhere nothing (the launch compiles and loads as usual).
    For the kernels whose launch is not preceded by max_programs (the final sums)."""
    if _capturing(device):
        with capture_permits_loading(device):
            kernel.warmup(*args, grid=grid, **options, **constexprs)._init_handles()


# CUstreamCaptureMode of the CUDA driver API.
_CAPTURE_MODE_RELAXED = 2


def _capturing(device: torch.device) -> bool:
    """Whether the current stream of `device` (the current device: the launchers run under device_guard) captures a
    CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=None)
def _libcuda():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        from triton.backends.nvidia.driver import libcuda_dirs

        return ctypes.CDLL(f"{libcuda_dirs()[0]}/libcuda.so.1")


@contextlib.contextmanager
def capture_permits_loading(device: torch.device):
    """Loading a module (cuModuleLoadData, what Triton's `_init_handles` does on a kernel's first launch) is not
    permitted while a stream captures a CUDA graph in the default (global) mode: inside a capture, this thread's
    capture mode is set to relaxed (cuThreadExchangeStreamCaptureMode) for the duration, and a failure is raised
    with what to do. Outside a capture: nothing."""
    if not _capturing(device):
        yield
        return
    lib = _libcuda()
    mode = ctypes.c_int(_CAPTURE_MODE_RELAXED)
    if lib.cuThreadExchangeStreamCaptureMode(ctypes.byref(mode)) != 0:
        raise RuntimeError("focal_triton: cannot set this thread's CUDA-graph capture mode to relaxed")
    try:
        yield
    except RuntimeError as e:
        raise RuntimeError(
            "focal_triton: a kernel specialization met for the first time inside a CUDA-graph capture could not be "
            f"loaded there ({e}); run the captured step once before capturing it (a warm-up)") from e
    finally:
        lib.cuThreadExchangeStreamCaptureMode(ctypes.byref(mode))


def persistent_grid(kernel, args, constexprs: dict, cfg: ElementwiseConfig, n: int, device: torch.device) -> int:
    """Programs to launch over n elements: min(tiles, max_programs), at least 1."""
    return max(1, min(-(-n // cfg.block), max_programs(kernel, args, constexprs, cfg, device)))
