"""`make bench`: focal_triton against torchvision's eager focal loss (with the permute, cat and one-hot a detector
needs), torch.compile of that code, and apex when installed, on this machine's GPU, or on its CPU without one;
then the YOLOv8 and RT-DETR heads against their libraries' code paths (bench/heads.py).

    python bench/run.py [--quick] [--cases SUBSTRING] [--out DIR] [--no-compile] [--no-kernel-report] [--no-heads]

Writes DIR/bench-<device>.csv / .json, heads-<device>.csv and time-, speedup-, memory-roofline-<device>.png (DIR: bench/local/ by
default, untracked; `make bench-results` writes the committed bench/results/), prints the table and the goals
(README "Speed") with whether this run met them.
"""
import argparse
import datetime
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import cases as bench_cases  # noqa: E402
import heads  # noqa: E402
import measure  # noqa: E402
import providers as bench_providers  # noqa: E402
import report  # noqa: E402
from focal_triton.tune import Progress  # noqa: E402

GOALS_GPU = [
    ("fwd+bwd, RetinaNet batch 16, bf16: fraction of measured copy bandwidth for the bytes it must move", "roofline",
     0.85),
    ("fwd+bwd, RetinaNet batch 16, bf16: x faster than torchvision eager", "vs_eager", 30.0),
    ("fwd+bwd, RetinaNet batch 16, bf16: x faster than torch.compile", "vs_compile", 3.0),
    ("fwd+bwd, RetinaNet batch 16, bf16: peak extra memory / one gradient's size", "memory", 1.0),
]
GOALS_CPU = [
    ("fwd+bwd, RetinaNet one COCO image, fp32, CPU path: x faster than torch.compile", "vs_compile", 3.0),
    ("fwd+bwd, RetinaNet one COCO image, fp32, CPU path: x faster than torchvision eager", "vs_eager", 10.0),
]


def must_move_bytes(case) -> int:
    """Bytes the loss must move at least: each logit read once per pass, its gradient written once; the labels
    (int64) read once per pass."""
    itemsize = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    anchors = case.numel // case.num_classes
    passes = 1 if case.mode == "fwd" else 2
    return case.numel * itemsize * (1 if case.mode == "fwd" else 3) + anchors * 8 * passes


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    v = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "torchvision", "focal_triton"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            v[mod] = "not installed"
    return v


def chosen_configs(device) -> dict:
    if device.type == "cuda":
        from focal_triton.kernels import tuning

        if not tuning.autotune_enabled():
            return {"autotune": "off (FOCAL_TRITON_AUTOTUNE=0): heuristic configs"}
        cache = tuning.cache_for(device)
        return {"cache": cache.path, "configs": dict(cache.configs)}
    from focal_triton.cpu import math

    return {"cpu_path": f"focal_triton.cpu: chunks of {math.FAST_CHUNK} elements, {torch.get_num_threads()} torch "
                        f"threads"}


def run_case(case, provs, device, progress):
    """One row per provider: the case's inputs, each provider prepared (and compiled) first, then all of them
    timed (in turns on CPU: `measure.times_ms`), then each one's peak memory."""
    levels, labels = case.inputs(device, requires_grad=case.mode == "fwd+bwd")
    backward = case.mode == "fwd+bwd"
    key = (case.family, case.batch, case.image, case.dtype, case.mode)
    ready = []
    for p in provs:
        try:
            fn = p.prepare(key, levels, labels, case.num_anchors, backward)
            ready.append((p, fn, float(fn().detach())))
        except Exception as e:  # noqa: BLE001 - one failing provider (out of memory) must not end the run
            print(f"\n{p.name} failed on {case.name}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            progress.step(f"{p.name} failed")
    times = measure.times_ms([fn for _, fn, _ in ready], device, case.numel) if ready else []
    rows = []
    for (p, fn, loss), ms in zip(ready, times):
        # On CPU the peak is counted by a dispatch mode, under which a compiled graph does not run (it would
        # count the eager ops): not measured there.
        for x in levels:  # the gradients of the timed calls would count as memory that was there before
            x.grad = None
        peak = None if (p.compile and device.type == "cpu") else measure.peak_extra_bytes(fn, device)
        must = must_move_bytes(case)
        rows.append(dict(case=case.name, family=case.family, batch=case.batch, image=f"{case.image[0]}x{case.image[1]}",
                         num_anchors=case.num_anchors, num_classes=case.num_classes, dtype=case.dtype,
                         mode=case.mode, logits=case.numel, provider=p.name, ms=ms, must_move_bytes=must,
                         gb_per_s=must / (ms * 1e-3) / 1e9, peak_extra_bytes=peak,
                         peak_extra_per_logit_bytes=None if peak is None else peak / case.numel,
                         compile_s=round(p.compile_seconds.get(key, 0.0), 1) if p.compile else "", loss=loss,
                         threads=torch.get_num_threads() if device.type == "cpu" else ""))
        for x in levels:
            x.grad = None
        progress.step(f"{case.family} b{case.batch} {case.dtype} {case.mode} {p.name}")
    return rows


def check_goals(rows, device):
    goals = GOALS_GPU if device.type == "cuda" else GOALS_CPU
    want = dict(family="retinanet", dtype="bfloat16", batch=16) if device.type == "cuda" else \
        dict(family="retinanet", dtype="float32", batch=1)
    ours = next((r for r in rows if r["provider"] == "focal_triton" and r["mode"] == "fwd+bwd"
                 and all(r[k] == v for k, v in want.items())), None)
    results = []
    for text, kind, target in goals:
        measured = None
        if ours is not None:
            if kind == "roofline":
                measured = ours["roofline_fraction"]
            elif kind == "vs_eager":
                measured = ours["speedup_vs_eager"] or None
            elif kind == "vs_compile":
                measured = ours["speedup_vs_compile"] or None
            elif kind == "memory":
                itemsize = torch.empty((), dtype=getattr(torch, ours["dtype"])).element_size()
                measured = ours["peak_extra_bytes"] / (ours["logits"] * itemsize)
        if kind == "memory" and measured is not None:   # one gradient, plus up to 1 MiB of per-image scalars
            itemsize = torch.empty((), dtype=getattr(torch, ours["dtype"])).element_size()
            met = ours["peak_extra_bytes"] <= ours["logits"] * itemsize + 2**20
        else:
            met = None if measured is None else measured >= target
        results.append(dict(goal=text, target=target, measured=measured, met=met))
    return results


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET") == "1":  # interpreted kernels would be timed: use the CPU path instead
        os.environ.setdefault("FOCAL_TRITON_BACKEND", "torch")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few small cases (tests, smoke runs)")
    parser.add_argument("--cases", default="", help="only cases whose name contains this")
    parser.add_argument("--out", default=os.path.join(HERE, "local"),
                        help="where to write (default bench/local/, untracked; bench/results/ holds the committed "
                             "results: `make bench-results` refreshes them)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    parser.add_argument("--no-kernel-report", action="store_true")
    parser.add_argument("--no-heads", action="store_true", help="leave out the YOLO and RT-DETR cases (bench/heads.py)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = device_name(device)
    slug = report.device_slug(name.split(" (")[0])
    os.makedirs(args.out, exist_ok=True)
    case_list = [c for c in bench_cases.default_cases(device, args.quick) if args.cases in c.name]
    provs = bench_providers.providers(include_compile=not args.no_compile)
    started = time.perf_counter()
    print(f"device: {name}\nversions: {versions()}")
    if device.type == "cpu":
        print(f"note: {bench_cases.CPU_CAP_NOTE}")
    bandwidth = measure.copy_bandwidth(device)
    print(f"measured copy bandwidth: {bandwidth:.1f} GB/s (read + write)")
    rows = []
    with Progress(len(case_list) * len(provs), "bench") as bar:
        for case in case_list:
            rows += run_case(case, provs, device, bar)
    for r in rows:
        r["device"] = name
        r["roofline_fraction"] = r["gb_per_s"] / bandwidth
    report.add_speedups(rows)
    print(report.table(rows))
    compile_times = {r["case"]: r["compile_s"] for r in rows if r["provider"] == "torch.compile"}
    if compile_times:
        print("torch.compile compile time (first call, fwd+bwd where timed so), s: " +
              ", ".join(f"{k}: {v}" for k, v in compile_times.items()))
    head_rows = []
    if not args.no_heads:
        if device.type == "cpu":
            print(f"note: {heads.CPU_NOTE}")
        head_rows = heads.run(device, measure, quick=args.quick, compile_=not args.no_compile, only=args.cases)
        for r in head_rows:
            r["device"] = name
        print("YOLO and RT-DETR heads (bench/heads.py), fwd+bwd:")
        print(heads.table(head_rows))
    goals = check_goals(rows, device)
    print("goals:")
    for g in goals:
        status = "not measured" if g["met"] is None else ("MET" if g["met"] else "NOT MET")
        m = "-" if g["measured"] is None else f"{g['measured']:.3g}"
        print(f"  {g['goal']}: target {g['target']}, measured {m}: {status}")
    kernel = None
    if not args.no_kernel_report:
        sys.path.insert(0, HERE)
        import kernel_report

        try:
            kernel = kernel_report.report(compile_kernels=not args.quick)
            print(kernel_report.format_report(kernel))
        except Exception as e:  # noqa: BLE001 - ptxas missing etc.: the rest of the run stands
            print(f"kernel report failed: {type(e).__name__}: {e}", file=sys.stderr)
    record = dict(device=name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  versions=versions(), threads=torch.get_num_threads(), copy_bandwidth_gb_s=bandwidth,
                  chosen_configs=chosen_configs(device), cpu_note=bench_cases.CPU_CAP_NOTE if device.type == "cpu"
                  else "", goals=goals, rows=rows, head_rows=head_rows, kernel_report=kernel,
                  wall_s=round(time.perf_counter() - started, 1))
    csv_path = os.path.join(args.out, f"bench-{slug}.csv")
    json_path = os.path.join(args.out, f"bench-{slug}.json")
    report.write_csv(rows, csv_path)
    if head_rows:
        heads_path = os.path.join(args.out, f"heads-{slug}.csv")
        report.write_csv(head_rows, heads_path, columns=list(head_rows[0]))
    report.write_json(record, json_path)
    pngs = report.plot(rows, args.out, slug, name)
    print("wrote " + ", ".join(os.path.relpath(p) for p in [csv_path, json_path, *pngs] +
                               ([heads_path] if head_rows else [])))
    print(f"total {time.perf_counter() - started:.0f} s")
    return record


if __name__ == "__main__":
    main()
