"""Packaging: kernels/ installs as focal_triton.kernels (never as a top-level `kernels`), from a wheel and editable."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, focal_triton, focal_triton.kernels as k\n"
    "spec = importlib.util.find_spec('kernels')\n"
    "print(focal_triton.__file__); print(k.__file__); print(spec.origin if spec else None)\n"
    "import torch; print(focal_triton.sigmoid_focal_loss(torch.zeros(3), torch.ones(3), reduction='sum').item())\n"
)


def _probe(cwd, extra_path=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = str(extra_path)
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                        "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = out.glob("focal_triton-*.whl")
    return path


def test_wheel_contains_kernels_as_subpackage(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    kernel_files = {Path(n).name for n in names if n.startswith("focal_triton/kernels/")}
    assert {"__init__.py", "dense.py", "multilevel.py", "math.py", "launch.py", "tuning.py"} <= kernel_files
    assert {"focal_triton/integrations/__init__.py", "focal_triton/integrations/torchvision.py"} <= set(names)
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"focal_triton"}, f"unexpected top-level entries: {top_level}"


def test_wheel_install_imports_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pkg, kernels, top_kernels, value = _probe(elsewhere, site)
    assert pkg.startswith(str(site)) and kernels.startswith(str(site / "focal_triton" / "kernels"))
    assert not (site / "kernels").exists()
    assert top_kernels == "None" or not top_kernels.startswith(str(site))
    assert float(value) > 0


def test_editable_install_imports_from_another_directory(tmp_path):
    pkg, kernels, top_kernels, value = _probe(tmp_path)
    assert pkg == str(ROOT / "focal_triton" / "__init__.py")
    assert kernels == str(ROOT / "kernels" / "__init__.py")
    assert top_kernels == "None" or not top_kernels.startswith(str(ROOT))
    assert float(value) > 0


NO_TRITON = '''
import importlib.abc, sys

class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton' (blocked by the test)")
        return None

sys.meta_path.insert(0, _NoTriton())
import torch
import focal_triton
from focal_triton.integrations.mmdet import FocalLoss as MMDetFocalLoss

g = torch.Generator().manual_seed(0)
x = torch.randn(4, 30, 5, generator=g, requires_grad=True)
t = (torch.rand(4, 30, 5, generator=g) < 0.2).float()
for fn in (focal_triton.sigmoid_focal_loss, focal_triton.sigmoid_focal_loss_star, focal_triton.quality_focal_loss,
           focal_triton.varifocal_loss):
    fn(x, t, reduction="sum").backward()
labels = torch.randint(-2, 5, (4, 30), generator=g)
focal_triton.focal_loss(x, labels, normalizer=torch.tensor(3.0)).backward()
focal_triton.FocalLoss(loss="vfl")(x, labels, scores=torch.rand(4, 30, generator=g)).backward()
levels = [torch.randn(2, 3 * 5, 4, 3, generator=g, requires_grad=True), torch.randn(2, 15, 2, 2, generator=g,
                                                                                  requires_grad=True)]
ml_labels = torch.randint(-2, 5, (2, 3 * 16), generator=g)
loss, stats = focal_triton.multilevel_focal_loss(levels, ml_labels, 3, return_stats=True)
loss.backward()
MMDetFocalLoss()(x.detach().reshape(-1, 5), labels.clamp(min=-1).reshape(-1).where(labels.reshape(-1) >= 0, 5))
assert "triton" not in sys.modules, "triton was imported"
print("ok", float(loss), int(stats.num_positive.sum()))
'''


def test_cpu_path_without_triton():
    """The package imports and every op runs on CPU tensors when triton cannot be imported (a laptop: triton has
    no macOS or Windows wheels): nothing on the CPU path imports it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FOCAL_TRITON_BACKEND")}
    r = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ok")


def test_triton_is_a_linux_only_dependency():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "triton>=3.6; platform_system == 'Linux'" in deps
