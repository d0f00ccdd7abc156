"""The JIT's own specializations of every call class of the suite, compiled for sm_80 and sm_90 without a GPU.

A child process (`python -m focal_triton.jit_check`, started by conftest.py when the tests are collected, without
TRITON_INTERPRET) runs every call class of tests/call_classes.py (ALL: the smoke set of `make gpu-check`, the edge
classes of sizes and integer arguments equal to 1, 16-divisible and odd sizes, misaligned views, and the shapes of
tests/test_gpu.py) on CPU tensors under a stand-in driver whose target is sm_80, then sm_90: each launch is compiled
through `JITFunction.warmup` with the real arguments, exactly as a CUDA launch would specialize it. The ahead-of-time
report (tests/test_aot.py) compiles a fixed enumeration; this compiles what calls make the JIT compile.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import child_result

ROOT = Path(__file__).resolve().parents[1]


def start_report():
    """Start the stand-in compile check in a child process; returns (process, path of its JSON result, start time).
    Called by conftest.py at collection time."""
    out = Path(tempfile.mkdtemp(prefix="focal_triton_jit_")) / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "focal_triton.jit_check", "--cases",
                                 str(ROOT / "tests" / "call_classes.py"), "--json", str(out)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, out, time.time()


@pytest.fixture(scope="module")
def result(request):
    proc, out, started = getattr(request.config, "focal_triton_jit", None) or start_report()
    data = child_result(proc, out, 1200, "stand-in compile check")
    print(f"stand-in compile check: {len(data['specializations'])} specializations, compile seconds per arch "
          f"{data['seconds']}, finished {time.time() - started:.0f} s after it started")
    return data


def test_every_call_class_compiles_for_sm80_and_sm90(result):
    """No call class of the suite fails to compile for either architecture (e.g. "mean" of one element: n == 1
    used to become a Python int inside the kernel, and `n.to(...)` did not compile)."""
    errors = [f"sm_{e['arch']} {e['call']}: {e['error'][-600:]}" for e in result["errors"]]
    assert not errors, "\n".join(errors[:10])
    by_arch = {}
    for r in result["specializations"]:
        by_arch.setdefault(r["arch"], set()).add(json.dumps({k: r[k] for k in ("kernel", "signature", "constexprs",
                                                                                "aligned", "num_warps")}, sort_keys=True))
    assert set(by_arch) == {80, 90} and by_arch[80] == by_arch[90]
    kernels = {json.loads(r)["kernel"] for r in by_arch[90]}
    assert kernels == {"sigmoid_focal_fwd_kernel", "sum_partials_kernel", "sigmoid_focal_bwd_kernel",
                       "multilevel_focal_kernel", "normalize_partials_kernel", "focal_matching_cost_kernel"}


def test_one_element_calls_are_compiled(result):
    """The call classes reach the integer arguments equal to 1 (one element, one partial sum, one image, one anchor,
    one class, 1x1 levels) and a misaligned view (a pointer the JIT does not see as 16-byte aligned)."""
    assert {"dense fp32 mean, one element", "edge dense fp32 sum, one element",
            "edge multilevel fp32 one image one anchor one class 1x1"} <= set(result["calls"])
    assert any(r["kernel"] == "sigmoid_focal_fwd_kernel" and "x_ptr" not in r["aligned"]
               for r in result["specializations"])


def test_no_integer_argument_becomes_a_constant(result):
    """Every integer argument is compiled as i32 / i64, never as a constant (what the JIT makes of an argument equal
    to 1 unless it is do_not_specialize'd): the JIT compiles what the ahead-of-time report checks, and a size of 1
    cannot meet code no other size runs."""
    specialized = [(r["kernel"], r["specialized"], r["first_call"]) for r in result["specializations"]
                   if r["specialized"]]
    assert not specialized, specialized[:10]


def test_num_stages_changes_nothing(result):
    """The kernels' loops are while loops, which Triton does not pipeline: num_stages 1, 2 and the default compile to
    the same PTX (so tuning.py does not tune it)."""
    assert result["num_stages_ptx_identical"] == {"sigmoid_focal_fwd_kernel": True, "multilevel_focal_kernel": True}
