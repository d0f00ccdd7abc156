"""Autotuning of the launch configs per GPU, persisted on disk as plain JSON, so a second process starts tuned.

What is tuned: the dense kernels' (BLOCK, num_warps) and the multi-level kernel's (BLOCK_HW, BLOCK_C, num_warps),
one choice per key (num_stages is not a candidate: the kernels' loops are while loops, which Triton does not
pipeline, so every num_stages compiles to the same PTX)

    <launcher>|n<size bucket>|C<classes>|L<channels_last mask>|<dtype>|<mode>

(size bucket = the power of two at or above the number of logits: the best config changes with the size class,
not with every image size). The first launch with a new key on a GPU times the heuristic config (the empty
config {}: what the launcher chooses untuned) and every candidate with `triton.testing.do_bench` on the real
arguments, on the tensors' device (the launch is repeated: outputs are rewritten, inputs are read), and keeps the
fastest; `python -m focal_triton.tune` pre-tunes the shapes of common detectors.

Failures: a candidate that does not compile or does not fit (out of resources) is skipped; if none is usable, or
the timing itself runs out of memory (do_bench's 256 MB flush buffer), the key takes the heuristic config for the
rest of the process (warned once, never retried per call, not written to the file). A CUDA error (a fault) is
raised: it leaves the device unusable and must not be mistaken for a slow candidate. Inside a CUDA-graph capture
nothing is timed: an untuned key takes the heuristic config.

Where: `$FOCAL_TRITON_CACHE_DIR` or `~/.cache/focal_triton/`, file `tune-<GPU name>-triton<version>.json`
(one file per GPU model and triton version; a new triton retunes). Written atomically (temporary file, then
`os.replace`). A corrupt file is set aside with a warning and retuned; an unwritable directory warns once and keeps
the tuned configs in memory for the process. Never pickle: the file holds only numbers and strings.

Switches: `FOCAL_TRITON_AUTOTUNE=0` uses the heuristic configs (those documented in launch.py and
multilevel.py, also what the ahead-of-time report compiles). The interpreter path (TRITON_INTERPRET=1, CPU
tensors) and CPU tensors never tune: they use their fixed configs.

Determinism: the persistent grid and the per-program partial sums follow from the config, so a tuned config can
change the summation order of a reduction, and so its last bits, between machines (or after deleting the cache),
never between runs on one machine with the same cache file.
"""
import contextlib
import json
import os
import re
import tempfile
import threading
import warnings

import torch

from . import launch

AUTOTUNE_ENV = "FOCAL_TRITON_AUTOTUNE"
CACHE_DIR_ENV = "FOCAL_TRITON_CACHE_DIR"
# 2: configs without num_stages (format 1 held duplicate candidates that differed only there). 3: the bf16 kernels of
# class-aligned heads launch with a register budget (multilevel.max_registers): configs timed without it are retuned.
FORMAT_VERSION = 3

# The heuristic config of a launcher (launch.py, multilevel.py): launchers take it (or None) as "no tuned choice".
HEURISTIC = {}
# Candidates, as dicts of launch parameters. Dense kernels: elements per tile, warps.
DENSE_CANDIDATES = [dict(BLOCK=b, num_warps=w) for b in (512, 1024, 2048, 4096) for w in (4, 8) if b // (32 * w) >= 4]
# Multi-level kernel: positions x classes per tile, warps.
MULTILEVEL_CANDIDATES = [dict(BLOCK_HW=hw, BLOCK_C=c, num_warps=w)
                         for hw, c in ((32, 16), (64, 16), (128, 16), (32, 32), (64, 32), (16, 16))
                         for w in (2, 4, 8) if hw * c // (32 * w) >= 2]

_local = threading.local()


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def size_bucket(numel: int) -> int:
    """The power of two at or above numel (at least 1)."""
    return 1 << max(0, int(numel) - 1).bit_length()


def make_key(launcher: str, numel: int, num_classes: int = 0, layout_mask: int = 0, dtype=None, mode="") -> str:
    dt = str(dtype).replace("torch.", "") if dtype is not None else "-"
    return f"{launcher}|n{size_bucket(numel)}|C{num_classes}|L{layout_mask}|{dt}|{mode}"


def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unknown"


def cache_path(device_name: str, triton_version: str = None) -> str:
    if triton_version is None:
        import triton

        triton_version = triton.__version__
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "focal_triton")
    return os.path.join(root, f"tune-{sanitize(device_name)}-triton{sanitize(triton_version)}.json")


def _valid_entry(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, int) and not isinstance(x, bool)
                                       for k, x in v.items())


class TuneCache:
    """Tuned configs of one GPU model and triton version: a dict key -> config (dict of ints), mirrored to a JSON
    file. Failures to read or write never raise: they warn once and the cache lives in memory."""

    def __init__(self, path: str, device_name: str = ""):
        self.path = path
        self.device_name = device_name
        self.configs = {}
        # Keys whose tuning failed in this process (key -> reason): they take the heuristic, untimed, until exit.
        self.failed = {}
        self.persistent = True
        self._warned = set()
        self._load()

    def _warn(self, what: str, msg: str):
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"focal_triton tuning cache {self.path}: {msg}", RuntimeWarning, stacklevel=3)

    def _load(self):
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            self._warn("read", f"unreadable ({type(e).__name__}: {e}); retuning")
            return
        configs = data.get("configs") if isinstance(data, dict) else None
        if not isinstance(configs, dict) or data.get("format") != FORMAT_VERSION:
            self._warn("read", "not a focal_triton tuning file of this format; retuning")
            return
        self.configs = {k: v for k, v in configs.items() if isinstance(k, str) and _valid_entry(v)}

    def get(self, key: str):
        return self.configs.get(key)

    def put(self, key: str, config: dict, timings=None):
        self.configs[key] = {k: int(v) for k, v in config.items()}
        self.save()

    def save(self):
        if not self.persistent:
            return
        data = {"format": FORMAT_VERSION, "device": self.device_name, "configs": self.configs}
        try:
            directory = os.path.dirname(self.path) or "."
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".json", dir=directory)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as e:
            self.persistent = False
            self._warn("write", f"cannot write ({type(e).__name__}: {e}); tuned configs kept in memory")


def _cuda_fault(e: BaseException) -> bool:
    """A CUDA error raised by a launch or a sync (an illegal address, a device assert): the context is unusable."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(e, accelerator_error):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("CUDA error", "Triton Error [CUDA]",
                                                                   "CUDA_ERROR", "cudaError"))


def tune(candidates, run, timer):
    """(best config, {index: ms}, {index: failure}) of `candidates` by `timer(lambda: run(config))` (milliseconds).

    A candidate that fails (does not compile, out of resources, any other error of that candidate) is skipped and
    its failure recorded; out of memory stops the sweep (nothing more can be timed); a CUDA error is raised. The best
    config is None if no candidate was timed."""
    times, failures = {}, {}
    for i, cfg in enumerate(candidates):
        try:
            times[i] = float(timer(lambda cfg=cfg: run(cfg)))
        except torch.cuda.OutOfMemoryError as e:
            failures[i] = f"{type(e).__name__}: {e}"
            break
        except Exception as e:  # noqa: BLE001 - an unusable candidate is just not chosen
            if _cuda_fault(e):
                raise
            failures[i] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    if not times:
        return None, {}, failures
    best = min(times, key=lambda i: (times[i], i))
    return dict(candidates[best]), times, failures


def _do_bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25)


_CACHES = {}
_TIMER = [_do_bench]


def set_timer(timer):
    """Replace the timing function (tests use a fake one); returns the previous one."""
    old, _TIMER[0] = _TIMER[0], timer
    return old


def cache_for(device: torch.device) -> TuneCache:
    name = torch.cuda.get_device_name(device)
    path = cache_path(name)
    if path not in _CACHES:
        _CACHES[path] = TuneCache(path, name)
    return _CACHES[path]


@contextlib.contextmanager
def use(config):
    """Pin `config` for every launch of this thread inside the block (tools that compile or time one candidate:
    the GPU check, the tests): run_tuned hands it to the launcher instead of choosing."""
    prev = getattr(_local, "pinned", None)
    _local.pinned = config
    try:
        yield
    finally:
        _local.pinned = prev


def options_of(config: dict) -> dict:
    """Triton launch options of a tuned config: num_warps (and num_stages where a config of an older file has it)."""
    return {k: config[k] for k in ("num_warps", "num_stages") if k in config}


def choose(device: torch.device, key: str, candidates, run, cache: TuneCache = None):
    """The config for `key` on `device`: None (the launcher's heuristic) where tuning is off or cannot run (not
    CUDA, the interpreter, FOCAL_TRITON_AUTOTUNE=0, inside a CUDA-graph capture, a failed tuning), else the cached or
    freshly tuned one, timing run(candidate) for each. Timing runs on `device` (do_bench records events on the
    current device's stream)."""
    if device.type != "cuda" or launch.interpreter_enabled() or not autotune_enabled():
        return None
    cache = cache or cache_for(device)
    cfg = cache.get(key)
    if cfg is not None or key in cache.failed:
        return cfg
    with launch.device_guard(device):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return None  # timing cannot run inside a CUDA-graph capture: the heuristic (warm up or pre-tune first)
        best, _, failures = tune([HEURISTIC] + [c for c in candidates if c != HEURISTIC], run, _TIMER[0])
    if best is None:
        reason = next(iter(failures.values()), "no candidate")
        cache.failed[key] = reason
        warnings.warn(f"focal_triton: tuning {key} failed ({reason}); the heuristic config is used for it in this "
                      "process", RuntimeWarning, stacklevel=3)
        return None
    cache.put(key, best)
    return best


def run_tuned(device: torch.device, key, candidates, launch):
    """launch(config) under the config chosen for this launch: the pinned one (`use`), else on CUDA the cached or
    freshly tuned one for key() (`choose`: the key is computed only there), else None (the launcher's heuristic).
    Tuning times launch(candidate) itself."""
    pinned = getattr(_local, "pinned", None)
    if pinned is not None:
        return launch(pinned)
    if device.type != "cuda":
        return launch(None)
    return launch(choose(device, key(), candidates, launch))
