"""`make bench` (bench/demo.py until the benchmark suite lands) computes a loss and gradient and prints them."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_matches_torchvision():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "demo.py")], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    ours = next(line for line in lines if line.startswith("loss = "))
    theirs = next(line for line in lines if line.startswith("torchvision: loss = "))
    # the same loss to float32 rounding (two float32 sums of 1.2M terms and a division: ours rounds a float64 sum
    # once, torchvision accumulates in float32; they may differ in the last bit or two)
    assert abs(float(ours.split()[2]) - float(theirs.split()[3])) <= 2.4e-7 * abs(float(theirs.split()[3]))
    assert float(theirs.split()[-1]) < 1e-6  # max |grad difference|
    assert any(line.startswith("forward + backward") for line in lines)
    ml = next(line for line in lines if line.startswith("multilevel loss = ")).split()
    # the detector form gives torchvision's RetinaNet head's loss (to float32 rounding of a sum of 1.2M terms)
    assert abs(float(ml[3]) - float(ml[7])) <= 1e-6 * abs(float(ml[7]))
    assert float(ml[-1]) < 1e-6
    assert any(line.startswith("detector loss forward + backward") for line in lines)


def test_demo_timing_synchronizes_cuda(monkeypatch):
    """On CUDA each timed call is bracketed by synchronizes (kernels run asynchronously: without them the demo would
    time the launches only). The clock is read only after the work is synchronized."""
    sys.path.insert(0, str(ROOT / "bench"))
    import demo
    import torch

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(demo.time, "perf_counter", lambda: events.append("clock") or float(len(events)))
    demo._time(lambda: events.append("work"), 2, torch.device("cuda", 0))
    assert events == ["work"] + ["sync", "clock", "work", "sync", "clock"] * 2
    events.clear()
    demo._time(lambda: events.append("work"), 1, torch.device("cpu"))
    assert events == ["work", "clock", "work", "clock"]
