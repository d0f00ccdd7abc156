"""The smoke set of `make gpu-check` (tests/call_classes.py SMOKE): every kernel specialization family, each call
against the independent float64 references. On a CUDA GPU it compiles and runs every family once (step b of
bench/gpu_check.py); here it runs the same calls under the interpreter, so the set itself is checked before a GPU
sees it."""
import pytest
from call_classes import SMOKE
from conftest import DEVICE


@pytest.mark.parametrize("call", SMOKE, ids=[c.name for c in SMOKE])
def test_smoke_call(call, monkeypatch):
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    call.check(DEVICE)
