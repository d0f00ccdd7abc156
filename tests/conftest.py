"""Test configuration: where the kernels run, the device, and poisoned allocations.

Without a CUDA device the Triton kernels are run by Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 must be
set before triton is first imported, which is why it happens here, at the top of the first module pytest loads.
With CUDA the same tests run the compiled kernels on the GPU, unchanged.
"""
import os
import tempfile

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU the suite checks the kernels with their heuristic configs and never writes the user's tuning cache: tuning
# is off unless a test turns it on (tests/test_kernels_tuning.py, tests/test_gpu.py), and any tuning file goes to a
# directory of this session. (Set either variable before running pytest to override.)
SUITE_TURNED_TUNING_OFF = "FOCAL_TRITON_AUTOTUNE" not in os.environ
os.environ.setdefault("FOCAL_TRITON_AUTOTUNE", "0")
os.environ.setdefault("FOCAL_TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="focal_triton_test_tune_"))

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# Value written into every fresh float allocation by the `poisoned` fixture: an element the kernels fail to write
# shows up as NaN and fails any comparison.
POISON = float("nan")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_path: exercises the CUDA launch path where there is a GPU (runs on "
                            "CPU too); `make gpu-check` runs these with the gpu tests")


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only the reports whose tests will run are started
def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device (this machine has none)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
    # The compile checks (minutes of ptxas) start now in child processes and their tests run last, so the rest of
    # the suite runs meanwhile: the stand-in driver's check of the JIT's own specializations (tests/
    # test_jit_check.py), then the ahead-of-time report (tests/test_aot.py).
    for name, attr in (("test_jit_check", "focal_triton_jit"), ("test_aot", "focal_triton_aot")):
        mine = [item for item in items if getattr(getattr(item, "module", None), "__name__", "") == name]
        if mine:
            items[:] = [item for item in items if item not in mine] + mine
            setattr(config, attr, mine[0].module.start_report())


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Run the test on the Triton kernels (compiled on CUDA, interpreted on CPU) and on the fused torch path."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", request.param)
    return request.param


@pytest.fixture
def poisoned(monkeypatch):
    """Make torch.empty / empty_like / empty_strided return float memory filled with NaN, so an output element (loss,
    partial sum or gradient) that the code under test never writes fails the test instead of passing by luck."""
    real_empty, real_empty_like, real_empty_strided = torch.empty, torch.empty_like, torch.empty_strided

    def _poison(t):
        if t.is_floating_point():
            t.fill_(POISON)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch, "empty_strided", lambda *a, **k: _poison(real_empty_strided(*a, **k)))
    yield


def pytest_sessionfinish(session, exitstatus):
    """Stop the background compile checks if the session ends before their tests ran (-x, Ctrl-C)."""
    for attr in ("focal_triton_jit", "focal_triton_aot"):
        report = getattr(session.config, attr, None)
        if report is not None and report[0].poll() is None:
            report[0].kill()
