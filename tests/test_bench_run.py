"""The benchmark suite itself (bench/), on tiny sizes: the run writes its table, CSV, JSON and plots, and the
pieces (cases, providers, byte counts, goals) say what they should."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import cases  # noqa: E402
import kernel_report  # noqa: E402
import providers  # noqa: E402
import report  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`bench/run.py --quick` on the CPU path, also on a GPU machine (CUDA hidden from the child): these tests check
    the CPU run's files, notes and goals; bench/gpu_check.py step e runs the GPU benchmark."""
    out = tmp_path_factory.mktemp("results")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--no-compile",
                        "--no-kernel-report", "--out", str(out)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout, r.stderr


def test_run_writes_table_csv_json_and_plots(quick_run):
    out, stdout, stderr = quick_run
    files = sorted(os.listdir(out))
    slug = files[0].split("-", 1)[1].rsplit(".", 1)[0]          # bench-<device>.csv
    assert slug.startswith("cpu-")                               # the device is in every file name
    assert {f"bench-{slug}.csv", f"bench-{slug}.json", f"time-{slug}.png", f"speedup-{slug}.png",
            f"memory-roofline-{slug}.png"} <= set(files)
    for png in (f for f in files if f.endswith(".png")):
        import matplotlib.image

        img = matplotlib.image.imread(out / png)
        assert img.shape[0] > 100 and img.shape[1] > 100
    assert "focal_triton" in stdout and "torchvision eager" in stdout and "goals:" in stdout
    assert "note: CPU: a capped case list" in stdout
    assert "bench [" in stderr and "2/" in stderr                # the progress bar


def test_csv_columns_and_rows(quick_run):
    out, _, _ = quick_run
    path = next(out.glob("bench-*.csv"))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == report.CSV_COLUMNS
    assert {r["provider"] for r in rows} == {"focal_triton", "torchvision eager"}
    for r in rows:
        assert float(r["ms"]) > 0 and int(r["logits"]) > 0 and float(r["peak_extra_bytes"]) >= 0
        assert float(r["speedup_vs_eager"]) > 0
    by_case = {}
    for r in rows:
        by_case.setdefault((r["image"], r["mode"]), {})[r["provider"]] = float(r["loss"])
    for losses in by_case.values():                              # every provider computes the same loss
        assert losses["focal_triton"] == pytest.approx(losses["torchvision eager"], rel=1e-4)


def test_json_records_device_versions_configs_goals(quick_run):
    out, _, _ = quick_run
    rec = json.loads(next(out.glob("bench-*.json")).read_text())
    assert rec["device"].startswith("CPU") and rec["versions"]["torch"] == torch.__version__
    assert "cpu_path" in rec["chosen_configs"] and rec["copy_bandwidth_gb_s"] > 0
    assert [g["target"] for g in rec["goals"]] == [3.0, 10.0]    # CPU goals; not measured on --quick cases
    assert all(g["met"] is None for g in rec["goals"])


def test_cases():
    coco = cases.Case("retinanet", 1, cases.COCO_IMAGE, 9, 80, "float32", "fwd+bwd")
    assert coco.numel == cases.ONE_COCO_IMAGE == 16_056_000
    assert cases.Case("fcos", 16, cases.COCO_IMAGE, 1, 80, "bfloat16", "fwd").numel == 16 * 16_056_000 // 9
    for total in cases.SWEEP_TOTALS:
        b, image = cases.sweep_image(total)
        n = cases.Case("sweep", b, image, 9, 80, "float32", "fwd").numel
        assert 0.8 * total < n < 1.25 * total
    full = cases.all_cases()
    assert len([c for c in full if c.family == "retinanet"]) == 5 * 3 * 2      # batches x dtypes x modes
    levels, labels = cases.Case("sweep", 2, (40, 48), 9, 80, "bfloat16", "fwd").inputs(torch.device("cpu"), False)
    assert [lv.shape[2:] for lv in levels] == [(5, 6), (3, 3), (2, 2), (1, 1), (1, 1)]   # P3..P7 of 40x48
    assert levels[0].dtype == torch.bfloat16 and labels.shape == (2, 9 * (30 + 9 + 4 + 1 + 1))


def test_providers_agree_on_a_tiny_case(monkeypatch):
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")
    case = cases.Case("sweep", 2, (40, 48), 9, 80, "float32", "fwd+bwd")
    levels, labels = case.inputs(torch.device("cpu"), True)
    ours = providers.focal_triton_loss(levels, labels, 9)
    g_ours = torch.autograd.grad(ours, levels)
    theirs = providers.torchvision_loss(levels, labels, 9)
    g_theirs = torch.autograd.grad(theirs, levels)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_kernel_report_bytes_and_predictions():
    # design_bytes_per_logit against the compiled tile loops' accesses: tests/test_aot.py.
    eager, ops = kernel_report.eager_bytes_per_logit(torch.bfloat16)
    assert eager > 100 and ops > 20                               # the eager code moves dozens of times more
    assert kernel_report.predicted_ms(3e12, 3.0) == pytest.approx(1000.0)
    rep = kernel_report.report(compile_kernels=False)
    text = kernel_report.format_report(rep)
    assert "H100" in text and "A100" in text and "modeled" in text


def test_goals_are_checked():
    sys.path.insert(0, str(ROOT / "bench"))
    import run

    rows = [dict(case="c", provider=p, family="retinanet", dtype="float32", batch=1, mode="fwd+bwd", ms=ms,
                 logits=10, peak_extra_bytes=0, gb_per_s=1.0, roofline_fraction=0.5)
            for p, ms in (("focal_triton", 10.0), ("torchvision eager", 150.0), ("torch.compile", 20.0))]
    report.add_speedups(rows)
    goals = run.check_goals(rows, torch.device("cpu"))
    assert [(g["measured"], g["met"]) for g in goals] == [(2.0, False), (15.0, True)]


def test_gpu_goals_are_checked_from_rows():
    import run

    grad_bytes = 16 * 16_056_000 * 2
    rows = [dict(case="c", provider=p, family="retinanet", dtype="bfloat16", batch=16, mode="fwd+bwd", ms=ms,
                 logits=16 * 16_056_000, peak_extra_bytes=grad_bytes + 1000, gb_per_s=1.0, roofline_fraction=0.9)
            for p, ms in (("focal_triton", 1.0), ("torchvision eager", 40.0), ("torch.compile", 2.5))]
    report.add_speedups(rows)
    goals = run.check_goals(rows, torch.device("cuda"))
    assert [g["met"] for g in goals] == [True, True, False, True]


def test_heads_rows_compare_the_same_loss(quick_run):
    """The YOLOv8 and RT-DETR cases (bench/heads.py): each provider of a case computes the same loss (the library's
    code path and one segmented launch), and focal_triton's peak extra memory is the gradient's."""
    out, stdout, _ = quick_run
    assert "YOLO and RT-DETR heads" in stdout
    with open(next(out.glob("heads-*.csv"))) as f:
        rows = list(csv.DictReader(f))
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    assert {c.split()[0] for c in by_case} == {"yolov8", "rtdetr"}
    for case, provs in by_case.items():
        ours = provs.pop("focal_triton")
        for r in provs.values():
            assert float(ours["loss"]) == pytest.approx(float(r["loss"]), rel=1e-4), case
        # float32 logits: the gradients (4 bytes per logit), plus per-anchor scalars
        assert float(ours["peak_extra_per_logit_bytes"]) <= 4.5, case
