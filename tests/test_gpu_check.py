"""`make gpu-check` (bench/gpu_check.py) without a GPU: one line and exit 0 without CUDA or without torch; the dry run
lists the steps, the smoke set's specializations and the estimated time, and its smoke set covers every
specialization family of the ahead-of-time enumeration (focal_triton/aot.py); the report helpers and the steps that
run on CPU (the import layout, the prep worker, the pytest step) do what the GPU run needs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def test_without_cuda_says_so_in_one_line_and_exits_0():
    r = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=_env(CUDA_VISIBLE_DEVICES=""))
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and "no CUDA device here" in r.stdout
    assert not (ROOT / "gpu-report").exists() or (ROOT / "gpu-report").is_dir()


def test_without_torch_says_so_in_one_line_and_exits_0():
    # -S -I: no site-packages, so no torch
    r = subprocess.run([sys.executable, "-S", "-I", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and "no torch" in r.stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    r = subprocess.run(["make", "-s", "gpu-check", f"ARGS=--dry-run --report {out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=_env())
    return r, json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None


def test_dry_run_lists_steps_specializations_and_time(dry_run):
    r, summary = dry_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for key in ("prep", "a", "b", "c", "d", "e"):
        assert f"  [{key}] " in r.stdout
    assert "estimated total" in r.stdout and "smoke set:" in r.stdout
    specs = summary["smoke_specializations"]
    assert {s["kernel"] for s in specs} == {"sigmoid_focal_fwd_kernel", "sum_partials_kernel",
                                            "sigmoid_focal_bwd_kernel", "multilevel_focal_kernel",
                                            "normalize_partials_kernel",
                                            "focal_matching_cost_kernel"}
    assert r.stdout.count(" <- ") == len(specs)
    assert summary["estimated_total_s"] > 0 and summary["prep_specializations"] >= len(specs)


def test_smoke_set_covers_every_specialization_family(dry_run):
    """Derived from the enumeration the ahead-of-time report compiles: every value of every compile-time switch,
    per logits dtype, and every pointer dtype that does not follow from the logits' (targets, autocast losses,
    labels, normalizers) appears in a specialization the smoke set makes the JIT compile. A new switch or value in
    the kernels and in focal_triton/aot.py without a smoke call that reaches it fails here."""
    _, summary = dry_run
    cov = summary["coverage"]
    assert cov["errors"] == [] and cov["missing"] == []
    assert cov["families"] > 200


def test_families_follow_the_enumeration():
    """A switch value the enumeration gains is a family the smoke records then miss."""
    from focal_triton import jit_check

    rec = dict(kernel="k", signature={"x_ptr": "*bf16", "t_ptr": "*bf16", "n": "i32", "MODE": "constexpr"},
               constexprs={"MODE": 0})
    more = [rec, dict(rec, constexprs={"MODE": 1}), dict(rec, signature=dict(rec["signature"], t_ptr="*fp32"))]
    fams = jit_check.families(more)
    assert fams == {("k", "*bf16"), ("k", "*bf16", "MODE=0"), ("k", "*bf16", "MODE=1"),
                    ("k", "*bf16", "t_ptr:*bf16"), ("k", "*bf16", "t_ptr:*fp32")}
    assert fams - jit_check.families([rec], more) == {("k", "*bf16", "MODE=1"), ("k", "*bf16", "t_ptr:*fp32")}


def test_import_tree_lays_out_the_package_as_installed(tmp_path):
    """The repository imported without installing it: focal_triton from this checkout, kernels/ as
    focal_triton.kernels, from any working directory."""
    tree = gpu_check.import_tree()
    try:
        code = "import focal_triton, focal_triton.kernels as k; print(focal_triton.__file__); print(k.__file__)"
        r = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=120,
                           env=_env(PYTHONPATH=tree))
        assert r.returncode == 0, r.stderr
        pkg, kernels = r.stdout.split()
        assert pkg.startswith(tree) and os.path.realpath(kernels) == str(ROOT / "kernels" / "__init__.py")
    finally:
        import shutil

        shutil.rmtree(tree)


def test_prep_worker_compiles_its_share(tmp_path):
    """One prep worker (of 60: a small share) compiles its calls for sm_90 with the stand-in driver."""
    out = tmp_path / "prep.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--child", "prep", "--out", str(out), "--part", "0/60",
                        "--arch", "90", "--steps", "a,e"], capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["specializations"]


def test_pytest_step_reports_pass_fail_and_failures(tmp_path):
    (tmp_path / "test_probe.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2, 'no'\n")
    log = gpu_check.Log(str(tmp_path / "log"))
    ctx = dict(log=log, env=_env(), tmp=str(tmp_path), tree=str(tmp_path))
    status, note, failures = gpu_check.pytest_step([str(tmp_path / "test_probe.py")], ctx, 120, "probe.xml")
    assert status == "FAIL" and note == "1 passed, 1 failed, 0 skipped"
    assert len(failures) == 1 and "test_probe" in failures[0]["name"] and failures[0]["name"].endswith("::test_bad")
    assert "no" in failures[0]["message"]
    status, note, _ = gpu_check.pytest_step([str(tmp_path / "test_probe.py"), "-k", "ok"], ctx, 120, "probe2.xml")
    assert status == "PASS"
    status, note, _ = gpu_check.pytest_step([str(tmp_path / "test_probe.py"), "-k", "nothing"], ctx, 120, "p3.xml")
    assert status == "FAIL"                          # no test ran is not a pass


def test_summary_files(tmp_path):
    record = dict(verdict="FAIL", date="2026-12-01T00:00:00+00:00", budget_s=420, total_s=400.0,
                  environment=dict(gpu="NVIDIA H200", capability="9.0", sms=132, memory_gib=139.8, driver="580",
                                   cuda_runtime="13.0", torch="2.11.0", triton="3.6.0", torchvision="0.26.0",
                                   python="3.12"),
                  steps=[dict(key="a", title="gpu tests", status="PASS", seconds=50.0, note="10 passed", failures=[]),
                         dict(key="b", title="smoke", status="FAIL", seconds=20.0, note="1 failed",
                              failures=[dict(name="test_cuda_smoke::x", message="mismatch")])],
                  benchmark=dict(rows=[dict(case="retinanet b16", provider="focal_triton", ms=1.0, gb_per_s=3000.0,
                                            roofline_fraction=0.7, speedup_vs_eager=30.0, speedup_vs_compile=3.1)],
                                 bandwidth_gb_s=4300.0, tuned={"k": {"BLOCK_HW": 64}}))
    gpu_check.write_summary(str(tmp_path), record)
    assert json.loads((tmp_path / "summary.json").read_text())["verdict"] == "FAIL"
    md = (tmp_path / "summary.md").read_text()
    assert "# gpu-check: FAIL" in md and "NVIDIA H200 (sm_90" in md and "| b | FAIL |" in md
    assert "test_cuda_smoke::x" in md and "retinanet b16" in md and "4300 GB/s" in md


def test_budget_skips_optional_steps_with_a_note():
    """The estimates and limits: the core steps a-c fit inside the default budget with room for the optional ones."""
    plan = {s.key: s for s in gpu_check.steps(200, 12)}
    assert [k for k, s in plan.items() if s.optional] == ["prep", "d", "e"]
    core = sum(plan[k].estimate for k in "abc")
    assert core < 0.5 * 420 and sum(s.estimate for s in plan.values()) <= 420
