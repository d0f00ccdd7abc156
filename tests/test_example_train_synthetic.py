"""examples/train_synthetic.py runs (a short version): both runs train from the same seed, their loss curves
coincide, and the three plots (curves, detections, loss distribution) are written as PNG files that open."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_short_training_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU path, as a user runs it
    cmd = [sys.executable, str(ROOT / "examples" / "train_synthetic.py"), "--steps", "3", "--batch", "2",
           "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    gap = next(line for line in r.stdout.splitlines() if line.startswith("largest relative gap"))
    assert float(gap.split()[-1]) < 1e-9  # float64 runs
    assert "loss statistics of the trained detector" in r.stdout
    import matplotlib.image

    for name in ("train_synthetic_loss.png", "train_synthetic_detections.png",
                 "train_synthetic_loss_distribution.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
