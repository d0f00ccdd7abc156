"""`make gpu-check`: prove the kernels on a real GPU in one offline command, inside a time budget, with a report.

    python bench/gpu_check.py [--dry-run] [--budget 420] [--report gpu-report] [--steps prep,a,b,c,d,e]

Uses the Python it runs with (the one that holds torch with CUDA); creates no venv, installs nothing, needs no
network: the repository is imported from where it lies (a temporary directory of links lays it out as it installs,
kernels/ as focal_triton.kernels). Without CUDA, or without torch, it says so in one line and exits 0.

Steps, in order, each with its own time limit and a PASS / FAIL / SKIPPED line, continuing after a failure:
  prep  compile the specializations of steps a-e for this GPU in parallel worker processes into Triton's cache
        (a stand-in driver, focal_triton/jit_check.py: what each later launch compiles, it then finds compiled)
  a     the `gpu`- and `cuda_path`-marked tests
  b     the smoke set (tests/call_classes.py SMOKE) against the independent float64 references
  c     determinism, no host sync, CUDA-graph capture and replay, torch.compile(fullgraph=True) of the loss stage
  d     compute-sanitizer memcheck over a small multi-level forward + backward and a dense call
  e     autotuning of RetinaNet batch 16 bf16 (cache in a temporary directory), then a quick benchmark
The budget (default 420 s) is measured as the steps go: a step gets at most what is left, and the optional steps
(prep, d, e) are skipped with a note when what is left is below their estimate, so the run always ends with its
report: summary.json, summary.md, gpu-check.log and the benchmark plots in --report (default gpu-report/).
Exit status: 0 when no step failed. See docs/gpu-check.md.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "bench")
TESTS = os.path.join(ROOT, "tests")
RESERVE_S = 10        # kept back from the budget for writing the report
STARTUP_S = 8         # one child process: python, torch, CUDA context (estimated)
COMPILE_S = 1.5       # one kernel specialization, compiled on a GPU box's CPU (the "a second or two")


class Step:
    def __init__(self, key, title, limit, estimate, optional):
        self.key, self.title, self.limit, self.estimate, self.optional = key, title, limit, estimate, optional


def steps(prep_compiles=None, workers=8):
    """The steps with their time limits and estimates (seconds; estimates are modeled, see docs/gpu-check.md)."""
    prep = prep_compiles or 200
    return [
        Step("prep", f"compile the specializations of steps a-e in {workers} processes", 90,
             STARTUP_S + prep * COMPILE_S / workers, True),
        Step("a", "gpu- and cuda_path-marked tests", 180, STARTUP_S + 60, False),
        Step("b", "smoke set against the float64 references", 150, STARTUP_S + 20, False),
        Step("c", "determinism, no host sync, CUDA graph, torch.compile", 150, STARTUP_S + 60, False),
        Step("d", "compute-sanitizer memcheck", 150, 60, True),
        Step("e", "autotune RetinaNet b16 bf16, quick benchmark", 240, 150, True),
    ]


# ---- the import path: the repository as it installs, without installing it --------------------------------------

def import_tree() -> str:
    """A temporary directory holding focal_triton/ as links to the repository's files, with kernels/ linked in as
    focal_triton/kernels (the layout pyproject.toml installs). Put first on sys.path and PYTHONPATH, it makes this
    checkout the focal_triton every process imports (also where another copy is installed)."""
    tree = tempfile.mkdtemp(prefix="focal_triton_gpu_check_")
    pkg = os.path.join(tree, "focal_triton")
    os.mkdir(pkg)
    src = os.path.join(ROOT, "focal_triton")
    for name in os.listdir(src):
        if name != "__pycache__" and name != "kernels":
            os.symlink(os.path.join(src, name), os.path.join(pkg, name))
    os.symlink(os.path.join(ROOT, "kernels"), os.path.join(pkg, "kernels"))
    return tree


def use_tree(tree: str):
    sys.path.insert(0, tree)
    os.environ["PYTHONPATH"] = os.pathsep.join([tree] + [p for p in [os.environ.get("PYTHONPATH")] if p])


# ---- the report ---------------------------------------------------------------------------------------------------

class Log:
    """Prints to stdout and appends to the report's log file."""

    def __init__(self, path):
        self.path = path
        self.file = open(path, "w") if path else None

    def __call__(self, text=""):
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")
            self.file.flush()

    def raw(self, text):
        if self.file:
            self.file.write(text)
            self.file.flush()


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda, "cpus": os.cpu_count(), "host": platform.node()}
    for mod in ("triton", "torchvision", "matplotlib", "pytest", "hypothesis"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - missing or broken: reported as such
            info[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), driver=driver_version())
    info["compute_sanitizer"] = sanitizer_path()
    return info


def driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import ctypes

        v = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
        return f"CUDA driver API {v.value // 1000}.{v.value % 1000 // 10}"
    except OSError:
        return None


def sanitizer_path():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "bin", "compute-sanitizer")):
            return os.path.join(base, "bin", "compute-sanitizer")
    return None


def write_summary(report_dir, record):
    with open(os.path.join(report_dir, "summary.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    env = record["environment"]
    lines = [f"# gpu-check: {record['verdict']}", "",
             f"{env.get('gpu', 'no GPU')} (sm_{env.get('capability', '?').replace('.', '')}, {env.get('sms')} SMs, "
             f"{env.get('memory_gib')} GiB), driver {env.get('driver')}, CUDA {env.get('cuda_runtime')}, "
             f"torch {env.get('torch')}, triton {env.get('triton')}, torchvision {env.get('torchvision')}, "
             f"python {env.get('python')}", "",
             f"{record['date']}, total {record['total_s']:.0f} s of a {record['budget_s']:.0f} s budget.", "",
             "| step | status | seconds | what |", "| --- | --- | --- | --- |"]
    for s in record["steps"]:
        lines.append(f"| {s['key']} | {s['status']} | {s['seconds']:.1f} | {s['title']}: {s['note']} |")
    for s in record["steps"]:
        if s.get("failures"):
            lines += ["", f"## Failures of step {s['key']}", ""]
            lines += [f"- `{f['name']}`: {f['message'][:600]}" for f in s["failures"][:30]]
    bench = record.get("benchmark")
    if bench and bench.get("rows"):
        lines += ["", "## Benchmark (median ms, forward + backward)", "",
                  f"Measured copy bandwidth {bench['bandwidth_gb_s']:.0f} GB/s (read + write).", "",
                  "| case | provider | ms | GB/s | roofline fraction | x eager | x compile |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in bench["rows"]:
            lines.append(f"| {r['case']} | {r['provider']} | {r['ms']:.3f} | {r['gb_per_s']:.0f} | "
                         f"{r['roofline_fraction']:.2f} | {r.get('speedup_vs_eager') or '-'} | "
                         f"{r.get('speedup_vs_compile') or '-'} |")
        if bench.get("tuned"):
            lines += ["", f"Tuned configs: `{json.dumps(bench['tuned'])}`"]
    with open(os.path.join(report_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# ---- running steps ------------------------------------------------------------------------------------------------

def run_child(cmd, limit, log, env, cwd):
    """Run cmd with a time limit, its output into the log. Returns (returncode or None on timeout, output)."""
    log.raw(f"\n$ {' '.join(cmd)}\n")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1, limit))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        rc = None
    log.raw(out or "")
    log.raw(f"[exit {rc} after {time.perf_counter() - start:.1f} s]\n")
    return rc, out or ""


def junit_failures(path):
    """(counts, failures) of a pytest junit XML file."""
    if not os.path.exists(path):
        return {}, []
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                where = case.get("classname") or case.get("file") or ""
                failures.append(dict(name=f"{where}::{case.get('name')}",
                                     message=(el.get("message") or el.text or "")[:2000]))
    return counts, failures


def pytest_step(args, ctx, limit, xml_name):
    xml = os.path.join(ctx["tmp"], xml_name)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", ROOT, "-c",
           os.path.join(ROOT, "pyproject.toml"), f"--junitxml={xml}", "-o", "junit_family=xunit1", *args]
    rc, out = run_child(cmd, limit, ctx["log"], ctx["env"], ctx["tree"])
    counts, failures = junit_failures(xml)
    if counts:
        failed = counts["failures"] + counts["errors"]
        note = f"{counts['tests'] - failed - counts['skipped']} passed, {failed} failed, {counts['skipped']} skipped"
    else:
        note = (out.strip().splitlines() or ["no output"])[-1]
    if rc is None:
        return "FAIL", f"timed out after {limit:.0f} s ({note})", failures
    ok = rc == 0 and counts.get("tests", 0) > 0
    if rc == 0 and not counts.get("tests"):
        note = "no test ran"
    return ("PASS" if ok else "FAIL"), note, failures


def child_step(name, ctx, limit, extra=(), wrapper=()):
    """Run one of this script's --child parts in a fresh process; it writes JSON with 'checks' (name, ok, note)."""
    out_json = os.path.join(ctx["tmp"], f"{name}.json")
    deadline = time.time() + limit - 5
    cmd = [*wrapper, sys.executable, os.path.abspath(__file__), "--child", name, "--out", out_json,
           "--deadline", str(deadline), "--report", ctx["report"], *extra]
    rc, out = run_child(cmd, limit, ctx["log"], ctx["env"], ctx["tree"])
    result = {}
    if os.path.exists(out_json):
        with open(out_json) as f:
            result = json.load(f)
    checks = result.get("checks", [])
    failures = [dict(name=c["name"], message=c["note"]) for c in checks if not c["ok"]]
    if rc is None:
        failures.append(dict(name=name, message=f"timed out after {limit:.0f} s"))
    elif rc != 0 and not failures:
        failures.append(dict(name=name, message=f"exit status {rc}: {out.strip()[-1500:]}"))
    note = ", ".join(f"{c['name']} {'ok' if c['ok'] else 'FAILED'}" for c in checks) or "no check ran"
    return ("PASS" if not failures and checks else "FAIL"), note, failures, result, out


def step_prep(ctx, limit):
    workers = ctx["workers"]
    cmds = [[sys.executable, os.path.abspath(__file__), "--child", "prep", "--out",
             os.path.join(ctx["tmp"], f"prep-{i}.json"), "--part", f"{i}/{workers}", "--arch", str(ctx["arch"]),
             "--steps", ",".join(ctx["steps"])] for i in range(workers)]
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ctx["env"],
                              cwd=ctx["tree"], start_new_session=True) for c in cmds]
    outs, timed_out = [], False
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1, limit - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, 9)
            out, _ = p.communicate()
        outs.append(out or "")
        ctx["log"].raw(out or "")
    errors, compiled = [], 0
    for i in range(workers):
        path = os.path.join(ctx["tmp"], f"prep-{i}.json")
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            errors += r["errors"]
            compiled += len(r["specializations"])
    failures = [dict(name=f"sm_{e['arch']} {e['call']}", message=e["error"]) for e in errors]
    note = f"{compiled} specializations compiled by {workers} processes"
    if timed_out:
        note += f"; timed out after {limit:.0f} s (the steps after it compile what is left)"
    return ("FAIL" if failures else "PASS"), note, failures


def run_all(args, log):
    import torch

    started = time.perf_counter()
    report_dir = args.report
    tmp = tempfile.mkdtemp(prefix="focal_triton_gpu_check_run_")
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1", FOCAL_TRITON_AUTOTUNE="0",
               FOCAL_TRITON_CACHE_DIR=os.path.join(tmp, "tune"),
               TRITON_CACHE_DIR=args.triton_cache or os.path.join(tmp, "triton-cache"))
    env.pop("TRITON_INTERPRET", None)
    info = environment()
    cap = torch.cuda.get_device_capability(0)
    ctx = dict(log=log, env=env, tmp=tmp, tree=args.tree, report=report_dir, arch=cap[0] * 10 + cap[1],
               workers=args.workers, steps=args.steps.split(","))
    log(f"gpu-check: {info.get('gpu')} (sm_{ctx['arch']}, {info.get('sms')} SMs, {info.get('memory_gib')} GiB, "
        f"{info.get('gpus')} device(s)), driver {info.get('driver')}, CUDA runtime {info.get('cuda_runtime')}")
    log(f"gpu-check: torch {info['torch']}, triton {info['triton']}, torchvision {info['torchvision']}, python "
        f"{info['python']} ({sys.executable}), {info['cpus']} CPUs, compute-sanitizer "
        f"{info['compute_sanitizer'] or 'not found'}")
    log(f"gpu-check: budget {args.budget:.0f} s, report in {os.path.abspath(report_dir)}, Triton cache "
        f"{env['TRITON_CACHE_DIR']}")
    results, bench = [], None
    for step in steps(workers=args.workers):
        if step.key not in ctx["steps"]:
            continue
        left = args.budget - (time.perf_counter() - started) - RESERVE_S
        limit = min(step.limit, left)
        t0 = time.perf_counter()
        failures, status = [], "SKIPPED"
        if limit < 5 or (step.optional and left < step.estimate):
            note = f"budget: {max(left, 0):.0f} s left, the step needs about {step.estimate:.0f} s"
        elif step.key == "prep":
            status, note, failures = step_prep(ctx, limit)
        elif step.key == "a":
            status, note, failures = pytest_step(["-m", "gpu or cuda_path", TESTS], ctx, limit, "a.xml")
        elif step.key == "b":
            status, note, failures = pytest_step([os.path.join(TESTS, "test_cuda_smoke.py")], ctx, limit, "b.xml")
        elif step.key == "c":
            status, note, failures, _, _ = child_step("stage", ctx, limit)
        elif step.key == "d":
            if not info["compute_sanitizer"]:
                note = "compute-sanitizer is not on the PATH (nor in $CUDA_HOME/bin, /usr/local/cuda/bin)"
            else:
                sanitizer_env = dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
                status, note, failures, _, out = child_step(
                    "sanitize", dict(ctx, env=sanitizer_env), limit,
                    wrapper=(info["compute_sanitizer"], "--tool", "memcheck", "--error-exitcode", "97",
                             "--print-limit", "20"))
                summary = [line for line in out.splitlines() if "ERROR SUMMARY" in line]
                note += f"; {summary[-1].strip('= ').strip()}" if summary else ""
                if summary and "0 errors" not in summary[-1]:
                    status = "FAIL"
                    failures.append(dict(name="memcheck", message="\n".join(
                        line for line in out.splitlines() if "=========" in line)[:3000]))
        elif step.key == "e":
            status, note, failures, bench, _ = child_step("bench", dict(ctx, env=dict(env, FOCAL_TRITON_AUTOTUNE="1")),
                                                          limit)
        seconds = time.perf_counter() - t0
        results.append(dict(key=step.key, title=step.title, status=status, seconds=round(seconds, 1), note=note,
                            limit_s=round(limit, 1), failures=failures))
        log(f"[{step.key}] {status:7s} {seconds:6.1f} s  {step.title}: {note}")
        for f in failures[:10]:
            log(f"      {f['name']}: {f['message'].strip().splitlines()[-1][:200] if f['message'].strip() else ''}")
    check_steps = [r for r in results if r["key"] != "prep"]
    verdict = "FAIL" if any(r["status"] == "FAIL" for r in check_steps) else "PASS"
    total = time.perf_counter() - started
    record = dict(verdict=verdict, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  budget_s=args.budget, total_s=round(total, 1), environment=info, steps=results,
                  benchmark=bench, smoke_calls=len(smoke_calls()))
    write_summary(report_dir, record)
    log(f"gpu-check: {verdict} in {total:.0f} s (budget {args.budget:.0f} s); report: "
        f"{', '.join(sorted(os.listdir(report_dir)))} in {os.path.abspath(report_dir)}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if verdict == "PASS" else 1


def smoke_calls():
    sys.path.insert(0, TESTS)
    import call_classes

    return call_classes.SMOKE


# ---- the child parts (run in their own processes) --------------------------------------------------------------

class Checks:
    def __init__(self, out_path):
        self.out_path, self.checks, self.extra = out_path, [], {}

    @contextlib.contextmanager
    def check(self, name):
        start = time.perf_counter()
        try:
            note = []
            yield note
            self.checks.append(dict(name=name, ok=True, note="; ".join(note), seconds=time.perf_counter() - start))
            print(f"PASS {name} {time.perf_counter() - start:.1f} s {'; '.join(note)}", flush=True)
        except Exception as e:  # noqa: BLE001 - every check is reported, the next one runs
            import traceback

            msg = f"{type(e).__name__}: {e}"
            self.checks.append(dict(name=name, ok=False, note=msg[:3000], seconds=time.perf_counter() - start))
            print(f"FAIL {name}: {traceback.format_exc()}", flush=True)
        self.save()

    def save(self):
        with open(self.out_path, "w") as f:
            json.dump(dict(checks=self.checks, **self.extra), f, indent=1, default=str)


def prep_calls(steps_):
    """(call, forced tuning config or None) that the steps' launches compile: the call classes, and for the steps
    that tune, every candidate of their shapes (forced, as tuning launches them)."""
    sys.path.insert(0, TESTS)
    import torch
    from call_classes import ALL, Dense, Multilevel

    from focal_triton.kernels import tuning

    calls = [(c, None) for c in ALL]
    if "a" in steps_:  # tests/test_gpu.py::test_no_host_sync tunes the dense fp32 sum and mean
        for cfg in [tuning.HEURISTIC] + tuning.DENSE_CANDIDATES:
            calls += [(Dense(f"tuning dense fp32 {r}", torch.float32, (4097,), r), cfg) for r in ("sum", "mean")]
    if "e" in steps_:  # step e tunes RetinaNet: NCHW levels, C = 80, int64 labels and per-image normalizer
        for cfg in [tuning.HEURISTIC] + tuning.MULTILEVEL_CANDIDATES:
            calls += [(Multilevel(f"tuning retinanet {str(dt)[6:]}", dt, ((5, 6), (3, 3)), a=9, c=80,
                                  normalizer="per_image_int"), cfg) for dt in (torch.bfloat16, torch.float32)]
    return calls


def child_prep(args):
    import torch

    from focal_triton import jit_check
    from focal_triton.kernels import tuning

    index, count = map(int, args.part.split("/"))
    calls = prep_calls(args.steps.split(","))[index::count]
    rec, errors = jit_check.Recorder(), []
    with jit_check.standin(args.arch, True, rec):
        for call, cfg in calls:
            rec.current_call = call.name
            try:
                with (tuning.use(cfg) if cfg is not None else contextlib.nullcontext()):
                    call.run(torch.device("cpu"))
            except Exception as e:  # noqa: BLE001 - reported per call
                errors.append(dict(call=call.name, arch=args.arch, error=f"{type(e).__name__}: {e}"[:3000]))
    with open(args.out, "w") as f:
        json.dump(dict(specializations=rec.specializations, errors=errors), f)
    return 0


def _coco_like(dtype, batch=2, h=256, w=320, seed=0, channels_last=False):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    sizes = [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64, 128)]
    levels = []
    for i, (a, b) in enumerate(sizes):
        x = (torch.randn(batch, 9 * 80, a, b, device="cuda", generator=g) * 2 - 4).to(dtype)
        levels.append(x.to(memory_format=torch.channels_last) if channels_last or i % 2 else x)
    m = 9 * sum(a * b for a, b in sizes)
    labels = torch.randint(-2, 80, (batch, m), device="cuda", generator=g)
    labels[torch.rand(batch, m, device="cuda", generator=g) < 0.9] = -1
    return [x.requires_grad_(True) for x in levels], labels


def child_stage(args):
    """Step c: determinism, no host sync, CUDA-graph capture and replay, torch.compile(fullgraph=True)."""
    import torch

    import focal_triton

    ck = Checks(args.out)

    def loss_stage(levels, labels):
        norm = (labels >= 0).sum(1).clamp(min=1)
        return focal_triton.multilevel_focal_loss(levels, labels, 9, normalizer=norm, check_labels=False)

    def fwd_bwd(levels, labels):
        for x in levels:
            x.grad = None
        loss = loss_stage(levels, labels)
        loss.backward()
        return loss.detach().clone(), [x.grad.clone() for x in levels]

    with ck.check("determinism") as note:
        for dtype in (torch.bfloat16, torch.float32):
            levels, labels = _coco_like(dtype)
            a, b = fwd_bwd(levels, labels), fwd_bwd(levels, labels)
            assert torch.equal(a[0], b[0]), f"{dtype} loss {a[0].item()!r} then {b[0].item()!r}"
            assert all(torch.equal(x, y) for x, y in zip(a[1], b[1])), f"{dtype} gradients differ"
        x = torch.randn(3_000_037, device="cuda").half().requires_grad_(True)
        t = (torch.rand(3_000_037, device="cuda") < 0.01).half()
        runs = []
        for _ in range(2):
            x.grad = None
            loss = focal_triton.sigmoid_focal_loss(x, t, reduction="mean")
            loss.backward()
            runs.append((loss.clone(), x.grad.clone()))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), "dense fp16 mean"
        note.append("multi-level bf16 / fp32 and dense fp16: two runs bitwise equal")

    with ck.check("no host sync") as note:
        levels, labels = _coco_like(torch.bfloat16)
        x = torch.randn(1 << 20, device="cuda", requires_grad=True)
        t = (torch.rand(1 << 20, device="cuda") < 0.01).float()

        def both():
            loss_stage(levels, labels).backward()
            focal_triton.sigmoid_focal_loss(x, t, reduction="mean").backward()

        both()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            both()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        note.append("multi-level (check_labels=False) and dense forward + backward")

    with ck.check("CUDA graph capture and replay") as note:
        # docs/pytorch2.md's example as it stands (the loss stage in static buffers: warm-up, capture, new labels,
        # replay), then the same stage run eagerly on the new labels: the replay must give the same bits.
        with open(os.path.join(ROOT, "docs", "pytorch2.md")) as f:
            blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
        code = next(b for b in blocks if "torch.cuda.CUDAGraph" in b)
        ns = {}
        exec(compile(code, "docs/pytorch2.md (CUDA graph example)", "exec"), ns)
        torch.cuda.synchronize()
        replayed = ns["static_loss"].clone(), [x.grad.clone() for x in ns["levels"]]
        eager = fwd_bwd(ns["levels"], ns["labels"])
        assert torch.equal(replayed[0], eager[0]), f"replay {replayed[0].item()!r} != eager {eager[0].item()!r}"
        assert all(torch.equal(a, b) for a, b in zip(replayed[1], eager[1])), "replayed gradients differ"
        note.append(f"docs/pytorch2.md example: replay on new labels = eager (loss {eager[0].item():.6g})")

    with ck.check("torch.compile fullgraph") as note:
        compiled = torch.compile(loss_stage, fullgraph=True, dynamic=True)
        start = time.perf_counter()
        for batch, (h, w) in ((2, (256, 320)), (3, (192, 256))):
            levels, labels = _coco_like(torch.bfloat16, batch, h, w, seed=batch)
            out = compiled(levels, labels)
            out.backward()
            got = out.detach(), [x.grad.clone() for x in levels]
            ref = fwd_bwd(levels, labels)
            torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
            for a, b in zip(got[1], ref[1]):
                torch.testing.assert_close(a, b)  # bf16 tolerances: the same kernels, the upstream from inductor
        note.append(f"two shapes, dynamic=True, inductor, {time.perf_counter() - start:.0f} s with compiling")
    return 0 if all(c["ok"] for c in ck.checks) else 1


def child_sanitize(args):
    """Step d (under compute-sanitizer): one small multi-level forward + backward and one dense call."""
    import torch

    import focal_triton

    ck = Checks(args.out)
    with ck.check("memcheck multi-level and dense") as note:
        g = torch.Generator(device="cuda").manual_seed(0)
        levels = [torch.randn(2, 3 * 20, h, w, device="cuda", generator=g).to(torch.bfloat16) for h, w in
                  ((9, 7), (5, 4), (1, 1))]
        levels[0] = levels[0].contiguous(memory_format=torch.channels_last)
        levels = [x.requires_grad_(True) for x in levels]
        m = 3 * (63 + 20 + 1)
        labels = torch.randint(-2, 20, (2, m), device="cuda", generator=g)
        weights = torch.rand(2, m, device="cuda", generator=g)
        loss = focal_triton.multilevel_focal_loss(levels, labels, 3, weights=weights, normalizer=(labels >= 0).sum(1)
                                                  .clamp(min=1), check_labels=False)
        loss.backward()
        outs = focal_triton.multilevel_focal_loss(levels, labels, 3, reduction="none", gamma=1.5)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        x = torch.randn(10_007, device="cuda", generator=g).half().requires_grad_(True)
        t = (torch.rand(10_007, device="cuda", generator=g) < 0.1).half()
        focal_triton.sigmoid_focal_loss(x, t, reduction="mean").backward()
        torch.cuda.synchronize()
        note.append("finished")
    return 0 if all(c["ok"] for c in ck.checks) else 1


def child_bench(args):
    """Step e: tune RetinaNet b16 bf16 (tuning cache in a temporary directory), then the quick benchmark."""
    sys.path.insert(0, HERE)
    import torch

    import cases
    import measure
    import providers
    import report
    import run as bench_run
    from focal_triton.kernels import tuning
    from focal_triton.tune import Progress

    ck = Checks(args.out)
    device = torch.device("cuda")
    deadline = args.deadline

    with ck.check("autotune RetinaNet b16 bf16") as note:
        case = cases.Case("retinanet", 16, cases.COCO_IMAGE, 9, 80, "bfloat16", "fwd+bwd")
        levels, labels = case.inputs(device, requires_grad=True)
        cache = tuning.cache_for(device)
        before = set(cache.configs)
        start = time.perf_counter()
        loss = providers.focal_triton_loss(levels, labels, 9)
        loss.backward()
        torch.cuda.synchronize()
        tuned_s = time.perf_counter() - start
        grads = [x.grad.clone() for x in levels]
        new = {k: v for k, v in cache.configs.items() if k not in before}
        assert new, f"nothing was tuned (failed keys: {cache.failed})"
        os.environ[tuning.AUTOTUNE_ENV] = "0"  # the heuristic configs on the same inputs
        for x in levels:
            x.grad = None
        ref = providers.focal_triton_loss(levels, labels, 9)
        ref.backward()
        os.environ[tuning.AUTOTUNE_ENV] = "1"
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
        for a, b in zip(grads, levels):
            torch.testing.assert_close(a, b.grad, rtol=2**-7, atol=1e-7)
        ck.extra["tuned"] = new
        ck.extra["tuning_s"] = round(tuned_s, 1)
        note.append(f"{len(new)} keys tuned in {tuned_s:.1f} s: {new}; tuned = heuristic result")
        del levels, labels, grads

    with ck.check("benchmark") as note:
        bandwidth = measure.copy_bandwidth(device)
        try:
            import torchvision  # noqa: F401

            eager = True
        except ImportError:
            eager = False
        rows, skipped = [], []
        case_list = [cases.Case("retinanet", b, cases.COCO_IMAGE, 9, 80, dt, "fwd+bwd") for dt in ("bfloat16",
                     "float32") for b in (1, 16)]
        provs = providers.providers(include_compile=True)
        name = torch.cuda.get_device_name(device)
        with Progress(len(case_list) * len(provs), "bench") as bar:
            for case in case_list:
                use = []
                for p in provs:
                    left = deadline - time.time()
                    if p.name != "focal_triton" and not eager:
                        skipped.append(f"{p.name} (no torchvision)")
                    elif p.compile and left < 75:
                        skipped.append(f"{p.name} {case.name} (budget: {left:.0f} s left)")
                    elif left < 20:
                        skipped.append(f"{p.name} {case.name} (budget: {left:.0f} s left)")
                    else:
                        use.append(p)
                rows += bench_run.run_case(case, use, device, bar)
                torch.cuda.empty_cache()
        for r in rows:
            r["device"] = name
            r["roofline_fraction"] = r["gb_per_s"] / bandwidth
        report.add_speedups(rows)
        pngs = report.plot(rows, args.report, report.device_slug(name), name) if rows else []
        ck.extra.update(rows=rows, bandwidth_gb_s=bandwidth, skipped=skipped, goals=bench_run.check_goals(rows, device),
                        plots=[os.path.basename(p) for p in pngs])
        print(report.table(rows), flush=True)
        note.append(f"{len(rows)} rows, copy bandwidth {bandwidth:.0f} GB/s" + (f"; skipped {skipped}" if skipped
                                                                                 else ""))
    return 0 if all(c["ok"] for c in ck.checks) else 1


# ---- the dry run --------------------------------------------------------------------------------------------------

def dry_run(args, log):
    """List the steps, the specializations the smoke set compiles (recorded with a stand-in driver, nothing
    compiled) and the estimated time; write summary.json. Runs without a GPU."""
    try:
        import torch  # noqa: F401
    except ImportError:
        torch = None
    sys.path.insert(0, TESTS)
    specs, coverage = [], None
    if torch is not None:
        import call_classes

        from focal_triton import jit_check

        result = jit_check.run_cases(call_classes.SMOKE, archs=(90,), compile=False)
        specs = result["specializations"]
        want, missing = jit_check.smoke_coverage(specs)
        coverage = dict(families=len(want), missing=[list(m) for m in missing], errors=result["errors"])
        prep = jit_check.Recorder()
        from focal_triton.kernels import tuning

        with jit_check.standin(90, False, prep):
            for call, cfg in prep_calls(args.steps.split(",")):
                with (tuning.use(cfg) if cfg is not None else contextlib.nullcontext()):
                    call.run(torch.device("cpu"))
    plan = steps(len(prep.specializations) if torch is not None else None, args.workers)
    log("gpu-check --dry-run: the steps, in order (limits and estimates in seconds; estimates modeled, see "
        "docs/gpu-check.md)")
    for s in plan:
        log(f"  [{s.key}] {s.title}: limit {s.limit} s, estimated {s.estimate:.0f} s"
            f"{' (optional: skipped when the budget left is below it)' if s.optional else ''}")
    total = sum(s.estimate for s in plan)
    log(f"estimated total {total:.0f} s of a {args.budget:.0f} s budget, with {args.workers} prep processes "
        f"(--workers; the default is the CPUs less 2, at most 12: 12 on a 16-CPU GPU box)")
    if torch is None:
        log("no torch in this Python: the smoke set's specializations cannot be listed here")
    else:
        log(f"smoke set: {len(call_classes.SMOKE)} calls, {len(specs)} kernel specializations for sm_90 "
            f"(~{len(specs) * COMPILE_S:.0f} s of compiling at {COMPILE_S} s each, in the prep step's parallel "
            f"processes where it runs):")
        for r in specs:
            ptrs = {}
            for k, v in r["signature"].items():
                if v.startswith("*"):
                    ptrs.setdefault(jit_check._group(k), v[1:])
            text = " ".join([f"{k}={v}" for k, v in ptrs.items()] + [f"{k}={v}" for k, v in r["constexprs"].items()])
            log(f"  {r['kernel']} {text} num_warps={r['num_warps']}  <- {r['first_call']}")
        log(f"coverage of the ahead-of-time enumeration's specialization families: {coverage['families']} families, "
            f"{len(coverage['missing'])} missing{': ' + str(coverage['missing']) if coverage['missing'] else ''}")
    os.makedirs(args.report, exist_ok=True)
    with open(os.path.join(args.report, "summary.json"), "w") as f:
        json.dump(dict(dry_run=True, steps=[vars(s) for s in plan], estimated_total_s=total, budget_s=args.budget,
                       prep_specializations=len(prep.specializations) if torch is not None else None,
                       smoke_calls=[c.name for c in call_classes.SMOKE] if torch is not None else [],
                       smoke_specializations=specs, coverage=coverage), f, indent=1, default=str)
    return 1 if coverage and (coverage["missing"] or coverage["errors"]) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the steps, the smoke set's specializations "
                        "and the estimated time; runs without a GPU")
    parser.add_argument("--budget", type=float, default=420.0, help="total seconds (default 420)")
    parser.add_argument("--report", default="gpu-report", help="report folder (default gpu-report/)")
    parser.add_argument("--steps", default="prep,a,b,c,d,e", help="the steps to run (default all)")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                        help="processes of the prep step")
    parser.add_argument("--triton-cache", help="Triton's cache directory (default: a fresh temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--arch", type=int, default=90, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    interpreted = os.environ.pop("TRITON_INTERPRET", None) == "1"  # before triton is imported: the compiled path
    try:
        import torch
    except ImportError:
        if args.dry_run:
            return dry_run(args, Log(None))
        print(f"gpu-check: no torch in {sys.executable}: nothing to check here (run it with the Python that holds "
              "torch with CUDA: make gpu-check PYTHON=...)")
        return 0
    if args.child:
        return {"prep": child_prep, "stage": child_stage, "sanitize": child_sanitize, "bench": child_bench}[
            args.child](args)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}): nothing to check; "
              "`make gpu-check ARGS=--dry-run` lists what it would run")
        return 0
    args.tree = import_tree()
    use_tree(args.tree)
    try:
        os.makedirs(args.report, exist_ok=True)
        if args.dry_run:
            return dry_run(args, Log(None))
        for name in os.listdir(args.report):  # the report of this run only
            path = os.path.join(args.report, name)
            if os.path.isfile(path) and name.endswith((".json", ".md", ".log", ".png")):
                os.unlink(path)
        log = Log(os.path.join(args.report, "gpu-check.log"))
        if interpreted:
            log("gpu-check: TRITON_INTERPRET=1 was set; unset for this run (the kernels are compiled here)")
        return run_all(args, log)
    finally:
        shutil.rmtree(args.tree, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
