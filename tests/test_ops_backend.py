"""Which implementation runs where (focal_triton/ops/backend.py), the interpreter's lock, and the interpreter's one
fixed launch configuration."""
import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import HAS_CUDA
from helpers import leaves_of, make_labels, make_levels
from reference import assert_close, focal_loss_ref

import focal_triton
from focal_triton.ops import backend
from focal_triton.kernels import launch
from focal_triton.kernels import dense as sf

# On a GPU these run on the CUDA launch path: `make gpu-check` runs them with the gpu tests.
pytestmark = pytest.mark.cuda_path


def test_auto_backend_in_this_session():
    """CUDA -> compiled kernels; CPU in this test session (TRITON_INTERPRET=1 from conftest) -> interpreted kernels."""
    if HAS_CUDA:
        assert backend.select_backend(torch.device("cuda", 0)) == "triton"
    else:
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert backend.interpreter_enabled()
        assert backend.select_backend(torch.device("cpu")) == "triton"


def test_backend_env_choices(monkeypatch):
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")
    assert backend.select_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FOCAL_TRITON_BACKEND must be one of"):
        backend.select_backend(torch.device("cpu"))
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="cannot run on device meta"):
        backend.select_backend(torch.device("meta"))


def _run_without_interpreter(code: str, **env):
    child_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FOCAL_TRITON_BACKEND")}
    child_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env, timeout=300)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU default, which a CUDA machine's tests do not use")
def test_cpu_without_interpreter_uses_torch_path():
    code = (
        "import torch, focal_triton\n"
        "from focal_triton.ops import backend\n"
        "print(backend.select_backend(torch.device('cpu')))\n"
        "x = torch.linspace(-5, 5, 1000, requires_grad=True); t = (torch.arange(1000) % 7 == 0).float()\n"
        "loss = focal_triton.sigmoid_focal_loss(x, t, reduction='sum'); loss.backward()\n"
        "print(repr(loss.item()), repr(x.grad.double().sum().item()))\n"
    )
    r = _run_without_interpreter(code)
    assert r.returncode == 0, r.stderr
    backend, values = r.stdout.splitlines()
    assert backend == "torch"
    x = torch.linspace(-5, 5, 1000)
    t = (torch.arange(1000) % 7 == 0).float()
    loss, _ = map(float, values.split())
    assert_close(torch.tensor(loss), focal_loss_ref(x, t, 0.25, 2.0, "sum"), dtype=torch.float32)
    r = _run_without_interpreter(code, FOCAL_TRITON_BACKEND="triton")
    assert r.returncode != 0 and "set TRITON_INTERPRET=1" in r.stderr


def test_interpreter_uses_its_one_fixed_config():
    """On CPU one config is launched (autotuning needs a GPU to time configs), whatever the dtype, and it gives the
    dense tests' shape (tests/test_dense.py: 5 x 7 x 19 elements) the control flow large tensors take on a GPU:
    more tiles than programs (every program loops) and a masked tail tile."""
    from test_dense import SHAPE

    n = SHAPE[0] * SHAPE[1] * SHAPE[2]
    configs = {launch.config_for(torch.device("cpu"), itemsize) for itemsize in (2, 4, 8)}
    assert len(configs) == 1
    (cfg,) = configs
    assert -(-n // cfg.block) > cfg.max_programs and n % cfg.block != 0


def test_gpu_config_heuristic():
    """Compiled path: 16 bytes of logits per thread per tile (one 128-bit load), 4 warps, grid from occupancy."""
    for dtype, block in ((torch.float32, 512), (torch.bfloat16, 1024), (torch.float16, 1024), (torch.float64, 256)):
        itemsize = torch.empty(0, dtype=dtype).element_size()
        cfg = launch.config_for(torch.device("cuda", 0), itemsize)
        assert (cfg.block, cfg.num_warps, cfg.max_programs) == (block, 4, None)


H100 = launch.SMResources(count=132, regs_per_sm=65536, threads_per_sm=2048, shared_per_sm=233472)


@pytest.mark.parametrize("n_regs,shared,expected", [
    (32, 0, 16),     # 16 x 4 warps = 64 warps: the thread limit
    (64, 0, 8),      # 64 regs x 128 threads = 8192 registers per program
    (72, 1024, 7),   # registers are allocated in units of 8 per thread: 72 -> 7 programs
    (75, 0, 6),      # 75 rounds up to 80 -> 6
    (255, 0, 2),
    (32, 100_000, 2),  # shared memory bound
])
def test_programs_per_sm(n_regs, shared, expected):
    assert launch.programs_per_sm(n_regs, shared, 4, H100) == expected


def test_persistent_grid_from_occupancy_is_cached(monkeypatch):
    """On CUDA the grid is SMs x resident programs of the compiled specialization, compiled once (warmup) per
    specialization key and reused, so the grid and a reduction's partial sums are the same on every call."""
    calls = []

    class Compiled:
        n_regs, metadata = 64, type("M", (), {"shared": 0})

        def _init_handles(self):
            pass

    class FakeKernel:
        fn = type("F", (), {"__name__": "fake_kernel"})

        def warmup(self, *args, grid, num_warps, **constexprs):
            calls.append((args, grid, num_warps, constexprs))
            return Compiled()

    monkeypatch.setattr(launch, "sm_resources", lambda index: H100)
    monkeypatch.setattr(launch, "_PERSISTENT_GRID", {})
    cfg = launch.config_for(torch.device("cuda", 0), 2)
    x = torch.empty(64, dtype=torch.bfloat16)
    args = (x, 4096, 0.5)
    assert launch.persistent_grid(FakeKernel(), args, {"BLOCK": cfg.block}, cfg, 10**8, torch.device("cuda", 0)) \
        == 132 * 8
    assert launch.persistent_grid(FakeKernel(), args, {"BLOCK": cfg.block}, cfg, 10**8, torch.device("cuda", 0)) \
        == 132 * 8
    assert len(calls) == 1 and calls[0][1] == (1,) and calls[0][2] == 4
    # Few tiles: one program per tile. Another specialization (dtype) compiles its own.
    assert launch.persistent_grid(FakeKernel(), args, {"BLOCK": cfg.block}, cfg, 3 * cfg.block + 1,
                                  torch.device("cuda", 0)) == 4
    launch.persistent_grid(FakeKernel(), (x.float(), 4096, 0.5), {"BLOCK": cfg.block}, cfg, 10**8,
                           torch.device("cuda", 0))
    assert len(calls) == 2


def test_launch_grid_and_loop(monkeypatch, device):
    """The grid is min(tiles, max_programs): with more tiles than programs each program loops, and the result is
    still right (the tail tile runs on program num_full % grid)."""
    seen = []
    real = sf.sigmoid_focal_fwd_kernel

    class Spy:
        """Records the grid of each launch; everything else (fn, warmup for the occupancy on CUDA) is the kernel's."""

        def __getitem__(self, grid):
            seen.append(grid)
            return real[grid]

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(sf, "sigmoid_focal_fwd_kernel", Spy())
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    cfg = launch.config_for(device, 4)
    n = cfg.block * (cfg.max_programs + 3) + 5 if device.type == "cpu" else 7 * cfg.block + 5
    x = torch.linspace(-8, 8, n, device=device)
    t = (torch.arange(n, device=device) % 5 == 0).float()
    for reduction in ("none", "sum"):
        got = focal_triton.sigmoid_focal_loss(x, t, reduction=reduction)
        assert_close(got, focal_loss_ref(x, t, 0.25, 2.0, reduction), what=reduction)
    if device.type == "cpu":
        assert seen == [(cfg.max_programs,)] * 2 and -(-n // cfg.block) > cfg.max_programs
    else:  # the persistent grid: one wave of the device, fewer programs than tiles only past it
        assert len(seen) == 2 and all(1 <= g[0] <= -(-n // cfg.block) for g in seen)


def test_int64_indexing_specialization_runs(monkeypatch, poisoned, device):
    """The 64-bit index path (chosen above 2**31 - BLOCK elements) forced on a small tensor gives the same result."""
    monkeypatch.setattr(sf, "needs_int64", lambda n, block: True)
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    x = torch.linspace(-8, 8, 1001, device=device, requires_grad=True)
    t = (torch.arange(1001, device=device) % 5 == 0).float()
    for reduction in ("none", "mean"):
        loss = focal_triton.sigmoid_focal_loss(x, t, reduction=reduction)
        assert_close(loss, focal_loss_ref(x, t, 0.25, 2.0, reduction), what=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(grad).all()
    assert launch.needs_int64(2**31 - 1024, 1024) and not launch.needs_int64(2**31 - 1025, 1024)


class FakeLibcuda:
    """cuThreadExchangeStreamCaptureMode of a pretend driver: the thread's capture mode, exchanged."""

    def __init__(self):
        self.mode = 0  # CU_STREAM_CAPTURE_MODE_GLOBAL

    def cuThreadExchangeStreamCaptureMode(self, ref):
        self.mode, ref._obj.value = ref._obj.value, self.mode
        return 0


def _pretend_capture(monkeypatch, fail=False):
    lib = FakeLibcuda()
    loads = []

    class Compiled:
        n_regs, metadata = 64, type("M", (), {"shared": 0})

        def _init_handles(self):
            loads.append(lib.mode)
            if fail:
                raise RuntimeError("Triton Error [CUDA]: operation not permitted when stream is capturing")

    class FakeKernel:
        fn = type("F", (), {"__name__": "fake_capture_kernel"})

        def warmup(self, *args, grid, **kwargs):
            return Compiled()

    monkeypatch.setattr(launch, "_libcuda", lambda: lib, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(launch, "sm_resources", lambda index: H100)
    monkeypatch.setattr(launch, "_PERSISTENT_GRID", {})
    return lib, loads, FakeKernel()


def test_first_load_inside_a_capture_is_in_relaxed_capture_mode(monkeypatch):
    """A specialization met for the first time inside a CUDA-graph capture is loaded (Triton's _init_handles,
    cuModuleLoadData) with this thread's capture mode relaxed, then the mode is restored: for the kernels sized by
    max_programs and for the final sums (load_before_launch)."""
    lib, loads, kernel = _pretend_capture(monkeypatch)
    cfg = launch.ElementwiseConfig(1024, 4)
    dev = torch.device("cuda", 0)
    assert launch.max_programs(kernel, (torch.empty(8),), {"BLOCK": 1024}, cfg, dev) == 132 * 8
    launch.load_before_launch(kernel, (1,), (torch.empty(8),), {}, {"MEAN": True}, dev)
    assert loads == [launch._CAPTURE_MODE_RELAXED] * 2 and lib.mode == 0


def test_failed_load_inside_a_capture_says_what_to_do(monkeypatch):
    lib, _, kernel = _pretend_capture(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="run the captured step once before capturing"):
        launch.load_before_launch(kernel, (1,), (torch.empty(8),), {}, {}, torch.device("cuda", 0))
    assert lib.mode == 0


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs on CPU machines (tests/conftest.py)")
def test_interpreter_launches_from_four_threads_at_once(monkeypatch):
    """Triton's interpreter is not thread-safe: its launches are serialized (ops/backend.py), so threads calling at
    once get the results a single thread gets."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    levels, labels = make_levels(), make_labels()
    x, t = torch.randn(3, 700), (torch.rand(3, 700) > 0.9).float()

    def work():
        leaves = leaves_of(levels)
        loss = focal_triton.multilevel_focal_loss(leaves, labels, 3)
        grads = torch.autograd.grad(loss, leaves)
        xl = x.clone().requires_grad_(True)
        dense = focal_triton.sigmoid_focal_loss(xl, t, reduction="sum")
        (gx,) = torch.autograd.grad(dense, xl)
        return [loss, *grads, dense, gx]

    expected = work()
    results, errors = [None] * 4, []
    barrier = threading.Barrier(4)

    def run(i):
        try:
            barrier.wait()
            results[i] = work()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for r in results:
        assert all(torch.equal(a, b) for a, b in zip(r, expected))
