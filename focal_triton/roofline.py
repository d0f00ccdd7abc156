"""Per-logit cost of the kernels' tile loops, counted in their sm_80 / sm_90 SASS, and the bound it predicts.

Counting (`tile_loops`): `nvdisasm -c -gi` of the cubin (the triton wheel's), with source lines and inlining chains.
A tile loop is an innermost loop (a backward branch and its target) whose body holds global loads; each is named by
the `# tile loop: <name>` comment on the source line of its backward branch or of the call it is inlined from. Its cost is the longest path from the
loop header to the backward branch through the body (forward edges only: an inner loop counts once), every SASS
instruction on it counted once (predicated ones issue too), divided by the logits each thread handles per
iteration (the tile's elements / threads). Per-level and per-program set-up lie outside the loop and are not counted.

Model (`bound`, the numbers in `GPUS`): one pass over n logits takes
    max(bytes / bandwidth,  instructions x n / issue rate,  MUFU x n / MUFU rate)
    issue rate = SMs x 4 warp-instructions per clock x 32 lanes x clock,   MUFU rate = SMs x 16 lanes x clock,
bytes being what the pass must move (each logit read once, its gradient written once, each anchor's label read
once). It ignores latency, occupancy, the L2 and the edge tiles' idle lanes: a floor for each resource, not a
prediction of overlap. The edge (masked) loops weigh in by the share of tiles they take (`loop_weights`).
"""
import collections
import importlib.util
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from . import aot

# GPU models (SXM parts) and the SASS they run: SMs, SM clock (GHz) and HBM bandwidth (TB/s, the data-sheet
# peak). The A100 runs the sm_80 code, the H100 and H200 the sm_90 code.
GPUS = {
    "A100": dict(arch="sm_80", sms=108, ghz=1.41, tbs=2.04),
    "H100": dict(arch="sm_90", sms=132, ghz=1.83, tbs=3.35),
    "H200": dict(arch="sm_90", sms=132, ghz=1.83, tbs=4.8),
}
ISSUE_PER_SM_CLOCK = 4 * 32  # 4 schedulers, one warp-instruction each per clock, 32 lanes
MUFU_PER_SM_CLOCK = 16       # quarter-rate special-function unit (EX2, RSQ, RCP, LG2, ...; I2F / F2I share it)

# RetinaNet on COCO-sized images (800 x 1333, strides 8 to 128): positions per level, A = 9 anchors, C = 80.
RETINANET_HW = (100 * 167, 50 * 84, 25 * 42, 13 * 21, 7 * 11)
RETINANET_A, RETINANET_C = 9, 80
RETINANET_BATCH = 16

_INSTR_RE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL_RE = re.compile(r"^(\.L_x_\d+):")
_LINE_RE = re.compile(r'//## File "([^"]+)", line (\d+)')
_PLACE_RE = re.compile(r'"([^"]+)", line (\d+)')
_TARGET_RE = re.compile(r"`\((\.L_x_\d+)\)")
_TAG_RE = re.compile(r"#\s*tile loop:\s*(.+?)\s*$")


def disassemble(cubin: bytes) -> str:
    """SASS of a cubin with source lines and their inlining chains (`nvdisasm -c -gi`)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([aot._tool("nvdisasm"), "-c", "-gi", f.name], capture_output=True, text=True,
                              check=True).stdout


def _opcode(text: str):
    body = re.sub(r"^@!?U?P\w+\s+", "", text)
    return body.split()[0], body != text


def _parse(sass: str):
    instrs, labels, line, pending = [], {}, None, []
    for raw in sass.splitlines():
        if _LINE_RE.search(raw):  # the instruction's source line, then the lines it is inlined at (outwards)
            line = tuple((f, int(n)) for f, n in _PLACE_RE.findall(raw))
            continue
        m = _LABEL_RE.match(raw.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR_RE.match(raw)
        if m:
            for p in pending:
                labels[p] = len(instrs)
            pending = []
            instrs.append((int(m.group(1), 16), m.group(2), line))
    return instrs, labels


def _successors(instrs, labels):
    succ = []
    for i, (_, text, _) in enumerate(instrs):
        op, predicated = _opcode(text)
        base = op.split(".")[0]
        if base in ("BRA", "JMP"):
            m = _TARGET_RE.search(text)
            s = [labels[m.group(1)]] if m else []
            if predicated or re.search(r"\bBRA\s+!?U?P\d", text):
                s.append(i + 1)
        elif base in ("EXIT", "RET", "BRX", "JMX"):
            s = [i + 1] if predicated else []
        else:
            s = [i + 1]
        succ.append([x for x in s if x < len(instrs)])
    return succ


def access_kind(op: str):
    """('load' | 'store', bits) of a global access opcode (LDG.E.128 -> ('load', 128)), else None."""
    parts = op.split(".")
    if parts[0] not in ("LDG", "STG"):
        return None
    bits = 32
    for p in parts[1:]:
        if p in ("128", "64"):
            bits = int(p)
        elif p in ("U16", "S16"):
            bits = 16
        elif p in ("U8", "S8"):
            bits = 8
    return ("load" if parts[0] == "LDG" else "store"), bits


_TAG_CACHE = {}
_KERNELS_DIR = importlib.util.find_spec("focal_triton.kernels").submodule_search_locations[0]


def _source_tag(where):
    """(tag, line) of the first place of an inlining chain whose source line carries a `# tile loop: <name>`
    comment (the loop's own line, or the call that inlined it), or None."""
    for path, lineno in where or ():
        if path not in _TAG_CACHE:
            # Debug info names the file the kernel was first compiled from: another checkout's when Triton's cache
            # holds the same kernel (its key is the source text); where that file is gone, read this package's.
            local = os.path.join(_KERNELS_DIR, os.path.basename(path))
            try:
                with open(path if os.path.exists(path) else local) as f:
                    _TAG_CACHE[path] = f.read().splitlines()
            except OSError:
                _TAG_CACHE[path] = []
        lines = _TAG_CACHE[path]
        m = _TAG_RE.search(lines[lineno - 1]) if 0 < lineno <= len(lines) else None
        if m:
            return m.group(1), lineno
    return None


def tile_loops(sass: str) -> list:
    """The tile loops of one kernel's SASS: [{"loop": tag, "line", "instructions", "mufu": {kind: n},
    "loads" / "stores": {bits: n}, "conversions": n}], each along the longest path header -> backward branch."""
    instrs, labels = _parse(sass)
    succ = _successors(instrs, labels)
    loops = [(t, i) for i, ss in enumerate(succ) for t in ss if t <= i]

    def has_load(lo, hi):
        return any(_opcode(instrs[k][1])[0].startswith("LDG") for k in range(lo, hi + 1))

    with_loads = [(h, b) for h, b in loops if has_load(h, b)]
    innermost = [(h, b) for h, b in with_loads
                 if not any((h2, b2) != (h, b) and h <= h2 and b2 <= b for h2, b2 in with_loads)]
    out = []
    for h, b in sorted(innermost):
        dist, prev = {h: 1}, {h: None}
        for k in range(h, b):
            if k not in dist:
                continue
            for s in succ[k]:
                if k < s <= b and dist[k] + 1 > dist.get(s, 0):
                    dist[s], prev[s] = dist[k] + 1, k
        path, k = [], b
        while k is not None:
            path.append(k)
            k = prev[k]
        mufu, loads, stores, conversions = collections.Counter(), collections.Counter(), collections.Counter(), 0
        for k in path:
            op, _ = _opcode(instrs[k][1])
            if op.startswith("MUFU."):
                mufu[op.split(".")[1]] += 1
            elif op.startswith(("I2F", "F2I", "F2F")) and not op.startswith("F2FP"):
                conversions += 1
            acc = access_kind(op)
            if acc:
                (loads if acc[0] == "load" else stores)[acc[1]] += 1
        tag = _source_tag(instrs[b][2])
        if tag is None:
            tag = next((t for t in (_source_tag(instrs[k][2]) for k in range(h, b + 1)) if t), None)
        line = tag[1] if tag else (instrs[b][2][0][1] if instrs[b][2] else None)
        out.append({"loop": tag[0] if tag else f"line {line}", "line": line, "instructions": dist[b],
                    "mufu": dict(mufu), "loads": dict(loads), "stores": dict(stores), "conversions": conversions,
                    "header": f"{instrs[h][0]:#x}", "latch": f"{instrs[b][0]:#x}"})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The set of specializations the per-logit report covers, and the report itself.

@dataclass
class Case:
    """One compiled specialization of the per-logit report and what it stands for."""

    name: str
    spec: object          # focal_triton.aot.Specialization
    kernel: str           # "multilevel" | "dense" | "matching"
    dtype: str            # "bf16" | "fp32"
    mode: str             # "fwd sum" | "bwd scalar" | "cost"
    loss: str             # "FL gamma=2", ...
    logits_per_thread: int


def _dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def per_logit_cases() -> list:
    """RetinaNet's head (C = 80, A = 9, int64 labels, class-aligned) in bf16 and fp32, FL gamma = 2 and 1.5, forward
    sum and backward with a scalar upstream gradient (both layouts in one kernel), QFL / VFL / RT-DETR's VFL forward,
    YOLO's BCE forward and backward, the dense kernels (forward sum, backward scalar) and the matching cost (gamma 2
    and 1.5; per output) on the same dtypes: the launch configs of the heuristic (no tuning)."""
    from .kernels import launch
    from .kernels import multilevel as mf
    from .kernels.math import spec_power
    from .losses import BCE, FL, QFL, VFL, VFL_RTDETR, encode

    cases = []
    for dt in ("bf16", "fp32"):
        x_dtype = _dtype(dt)
        tile = mf.gpu_tile(x_dtype.itemsize)
        per_thread = tile[0] * tile[1] // (mf.gpu_num_warps(x_dtype.itemsize) * 32)
        losses = [("FL gamma=2", FL, 2.0, 0.0), ("FL gamma=1.5", FL, 1.5, 0.0)]
        if dt == "bf16":
            losses += [("QFL beta=2", QFL, 2.0, 2.0), ("VFL gamma=2", VFL, 2.0, 0.0), ("BCE", BCE, 0.0, 0.0),
                       ("VFL-RTDETR gamma=2", VFL_RTDETR, 2.0, 0.0)]
        for loss, kind, gamma, beta in losses:
            power = spec_power(encode(kind, gamma=gamma, beta=beta))
            modes = [("fwd sum", mf.MODE_SUM)] + ([("bwd scalar", mf.MODE_GRAD_SCALAR)] if kind in (FL, BCE) else [])
            for mode, m in modes:
                spec = aot.multilevel_spec(x_dtype, "i64", m, power, True, tile, kind)
                name = f"multilevel_{mode.replace(' ', '_')}_{dt}_{loss.split()[0].lower()}_" \
                       f"{'g' + str(power) if power >= 0 else 'gfrac'}"
                cases.append(Case(name, spec, "multilevel", dt, mode, loss, per_thread))
        cfg = launch.gpu_configs_for(x_dtype.itemsize)[0]
        per_thread = cfg.block // (cfg.num_warps * 32)
        dense_losses = [("FL gamma=2", FL, 2.0, 0.0)] + ([("FL gamma=1.5", FL, 1.5, 0.0)] if dt == "bf16" else [])
        for loss, kind, gamma, beta in dense_losses:
            power = spec_power(encode(kind, gamma=gamma, beta=beta))
            for mode in ("fwd sum", "bwd scalar"):
                if mode == "fwd sum":
                    spec = aot.dense_forward_spec(x_dtype, x_dtype, True, "fp32", power, cfg, kind, archs=(90,))
                else:
                    spec = aot.dense_backward_spec(x_dtype, x_dtype, "sum", dt, power, cfg, kind, archs=(90,))
                name = f"dense_{mode.replace(' ', '_')}_{dt}_fl_{'g' + str(power) if power >= 0 else 'gfrac'}"
                cases.append(Case(name, spec, "dense", dt, mode, loss, per_thread))
        # The matching cost of DETR matchers (int64 labels): "logits" per thread are its outputs per thread.
        for loss, gamma in (("focal gamma=2", 2.0), ("focal gamma=1.5", 1.5)):
            power = spec_power(encode(FL, gamma=gamma))
            spec = aot.matching_spec(x_dtype, "i64", power, archs=(90,))
            cases.append(Case(f"matching_cost_{dt}_{'g' + str(power) if power >= 0 else 'gfrac'}", spec, "matching",
                              dt, "cost", loss, spec.elements_per_thread))
    return cases


def _layout(kernel: str, loop: str) -> str:
    if kernel == "dense":
        return "flat"
    if kernel == "matching":
        return "gather"
    return "channels_last" if loop.startswith("channels_last") else "NCHW"


def case_rows(case: Case, arch: int, sass: str, resources: dict) -> list:
    """One row per tile loop of a compiled case: per-logit instructions, MUFU by kind, accesses by width."""
    rows = []
    n = case.logits_per_thread
    for lp in tile_loops(sass):
        mufu_total = sum(lp["mufu"].values())
        rows.append({
            "case": case.name, "kernel": case.kernel, "arch": f"sm_{arch}", "dtype": case.dtype,
            "layout": _layout(case.kernel, lp["loop"]), "loop": lp["loop"], "mode": case.mode, "loss": case.loss,
            "logits_per_thread_per_iteration": n, "instructions_per_iteration": lp["instructions"],
            "instructions_per_logit": round(lp["instructions"] / n, 2),
            "mufu_per_logit": round(mufu_total / n, 3),
            "mufu_per_logit_by_kind": {k: round(v / n, 3) for k, v in sorted(lp["mufu"].items())},
            "conversions_per_logit": round(lp["conversions"] / n, 3),
            "loads_by_bits": {str(k): v for k, v in sorted(lp["loads"].items())},
            "stores_by_bits": {str(k): v for k, v in sorted(lp["stores"].items())},
            "registers": resources["regs"], "spills": resources["spill_instructions"],
            "source_line": lp["line"],
        })
    return rows


def pass_bytes_per_logit(kernel: str, dtype: str, mode: str, label_bytes: int = 8,
                         num_classes: int = RETINANET_C) -> float:
    """Bytes a pass must move per logit: the logit once (its gradient once more in the backward), each anchor's
    label once (the dense kernels read a target per logit instead)."""
    itemsize = 2 if dtype in ("bf16", "fp16") else 4
    per_anchor = label_bytes / num_classes if kernel == "multilevel" else itemsize
    return itemsize * (2 if mode.startswith("bwd") else 1) + per_anchor


def bound(instructions_per_logit: float, mufu_per_logit: float, bytes_per_logit: float, gpu: str) -> dict:
    """Seconds per logit of each resource on `gpu` and the one that binds (see the module docstring)."""
    g = GPUS[gpu]
    clock = g["ghz"] * 1e9
    times = {"memory": bytes_per_logit / (g["tbs"] * 1e12),
             "issue": instructions_per_logit / (g["sms"] * ISSUE_PER_SM_CLOCK * clock),
             "mufu": mufu_per_logit / (g["sms"] * MUFU_PER_SM_CLOCK * clock)}
    return {"seconds_per_logit": times, "bound": max(times, key=times.get)}


def loop_weights(tile_hw: int, loops, hws=RETINANET_HW) -> dict:
    """Share of the logits that each tile loop of a layout takes, for levels of hws positions and tiles of tile_hw
    positions: full tiles ("quads" / "pairs" / "halves": the NCHW loops of bf16 that take the levels of hw a multiple
    of 4 / the other even ones / the odd ones, where the layout has them; "full" the others) and edge tiles (masked:
    the last, partial position tile of each level)."""
    shares = dict.fromkeys(loops, 0.0)
    for hw in hws:
        full = (hw // tile_hw) * tile_hw
        if "quads" in loops and hw % 4 == 0:
            shares["quads"] += full
        elif "pairs" in loops and hw % 2 == 0:
            shares["pairs"] += full
        elif "halves" in loops:
            shares["halves"] += full
        else:
            shares["full"] += full
        shares["edge"] += -(-hw // tile_hw) * tile_hw - full
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items()}


def modeled_times(rows: list, gpu: str = "H100") -> dict:
    """Modeled RetinaNet batch-16 time (ms) per (dtype, layout, loss, mode) from the rows of the multi-level cases
    for `gpu`'s arch: each tile loop's cost weighted by its share of the logits (loop_weights), then the binding
    resource (bound); and the memory floor of the same pass. Labeled a model: see the module docstring."""
    n = RETINANET_BATCH * sum(RETINANET_HW) * RETINANET_A * RETINANET_C
    groups = collections.defaultdict(dict)
    for r in rows:
        if r["kernel"] != "multilevel" or "error" in r:
            continue
        groups[(r["dtype"], r["layout"], r["loss"], r["mode"], r["arch"])][r["loop"].split()[-1]] = r
    out = {}
    for (dtype, layout, loss, mode, arch), loops in groups.items():
        if not ({"full", "halves"} & set(loops) and "edge" in loops) or arch != GPUS[gpu]["arch"]:
            continue
        tile_hw = 64  # the heuristic tiles of bf16 and fp32 (kernels/multilevel.py gpu_tile)
        w = loop_weights(tile_hw, loops)
        ins = sum(w[k] * loops[k]["instructions_per_logit"] for k in w)
        mufu = sum(w[k] * loops[k]["mufu_per_logit"] for k in w)
        b = bound(ins, mufu, pass_bytes_per_logit("multilevel", dtype, mode), gpu)
        t = b["seconds_per_logit"]
        out[f"{dtype} {layout} {loss} {mode}"] = {
            "ms": round(max(t.values()) * n * 1e3, 3), "memory_floor_ms": round(t["memory"] * n * 1e3, 3),
            "bound": b["bound"], "instructions_per_logit": round(ins, 2), "mufu_per_logit": round(mufu, 3)}
    return out


def fwd_bwd_summary(modeled: dict) -> dict:
    """Forward sum + backward scalar per (dtype, layout, loss): modeled ms, memory floor ms, their ratio."""
    out = {}
    for key, fwd in modeled.items():
        if not key.endswith(" fwd sum"):
            continue
        bwd = modeled.get(key[:-len("fwd sum")] + "bwd scalar")
        if bwd is None:
            continue
        total, floor = fwd["ms"] + bwd["ms"], fwd["memory_floor_ms"] + bwd["memory_floor_ms"]
        out[key[:-len(" fwd sum")]] = {"ms": round(total, 3), "memory_floor_ms": round(floor, 3),
                                             "ratio": round(total / floor, 2),
                                             "bounds": f"{fwd['bound']} / {bwd['bound']}"}
    return out


def compile_case(args):
    """(rows, cubin, sass) of one (case index, arch): compiles, disassembles and counts (a pool worker)."""

    index, arch = args
    case = per_logit_cases()[index]
    try:
        compiled = aot.compile_cubin(case.spec, arch)
        cubin = compiled.asm["cubin"]
        sass = disassemble(cubin)
        resources = aot.cubin_resources(cubin)
        return case_rows(case, arch, sass, resources), cubin, sass
    except Exception as e:  # noqa: BLE001 - reported per case
        return [{"case": case.name, "arch": f"sm_{arch}", "error": f"{type(e).__name__}: {e}"}], None, None


def report(archs=(90,), workers: int = 1, sass_dir: str = None) -> list:
    """Rows of every per-logit case for each arch; with sass_dir, also DIR/<name>_sm<arch>.cubin, .sass and
    DIR/index.json (one entry per tile loop)."""
    tasks = [(i, arch) for i in range(len(per_logit_cases())) for arch in archs]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(compile_case, tasks)
    else:
        results = [compile_case(t) for t in tasks]
    rows = [r for res in results for r in res[0]]
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
        index = []
        for (i, arch), (case_rows_, cubin, sass) in zip(tasks, results):
            if cubin is None:
                continue
            case = per_logit_cases()[i]
            stem = f"{case.name}_sm{arch}"
            with open(os.path.join(sass_dir, stem + ".cubin"), "wb") as f:
                f.write(cubin)
            with open(os.path.join(sass_dir, stem + ".sass"), "w") as f:
                f.write(sass)
            for r in case_rows_:
                index.append({"file": stem + ".cubin", "sass": stem + ".sass", "kernel": case.spec.kernel.__name__,
                              "arch": r["arch"], "dtype": r["dtype"], "layout": r["layout"], "loop": r["loop"],
                              "mode": r["mode"], "loss": r["loss"],
                              "logits_per_thread_per_iteration": r["logits_per_thread_per_iteration"],
                              "instructions_per_logit": r["instructions_per_logit"],
                              "mufu_per_logit": r["mufu_per_logit"], "source_line": r["source_line"]})
        with open(os.path.join(sass_dir, "index.json"), "w") as f:
            json.dump(index, f, indent=1)
    return rows


def format_rows(rows: list) -> str:
    head = (f"{'kernel':10s} {'arch':5s} {'dtype':5s} {'layout':13s} {'tiles':5s} {'mode':10s} {'loss':13s} "
            f"{'instr/logit':>11s} {'MUFU/logit':>10s} {'MUFU by kind':22s} {'loads (bits: n)':18s} "
            f"{'stores':10s} {'regs':>4s} {'spills':>6s}")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']} {r['arch']}: ERROR {r['error'][:100]}")
            continue
        kinds = " ".join(f"{k} {v:g}" for k, v in r["mufu_per_logit_by_kind"].items())
        loads = " ".join(f"{k}:{v}" for k, v in r["loads_by_bits"].items())
        stores = " ".join(f"{k}:{v}" for k, v in r["stores_by_bits"].items())
        lines.append(f"{r['kernel']:10s} {r['arch']:5s} {r['dtype']:5s} {r['layout']:13s} {r['loop'].split()[-1]:5s} "
                     f"{r['mode']:10s} {r['loss']:13s} {r['instructions_per_logit']:11.2f} "
                     f"{r['mufu_per_logit']:10.3f} {kinds:22s} {loads:18s} {stores:10s} {r['registers']:4d} "
                     f"{r['spills']:6d}")
    return "\n".join(lines)


def format_model(rows: list) -> str:
    lines = ["Per pass over RetinaNet's levels (800 x 1333, A = 9, C = 80; sm_90): the tile loops' counts weighted by "
             "their share of the logits (loop_weights)"]
    for key, v in sorted(modeled_times(rows, "H100").items()):
        lines.append(f"  {key}: {v['instructions_per_logit']:.2f} instructions, {v['mufu_per_logit']:.2f} MUFU per "
                     f"logit")
    lines.append("Modeled RetinaNet batch 16 (800 x 1333, A = 9, C = 80), per pass: max(memory, issue, MUFU) (a model, "
                 "not a measurement; see focal_triton/roofline.py)")
    archs = {r["arch"] for r in rows}
    for gpu in (g for g in GPUS if GPUS[g]["arch"] in archs):
        summary = fwd_bwd_summary(modeled_times(rows, gpu))
        for key, v in sorted(summary.items()):
            lines.append(f"  {gpu} {key}: fwd + bwd {v['ms']:.3f} ms, memory floor {v['memory_floor_ms']:.3f} ms, "
                         f"ratio {v['ratio']:.2f} (bound fwd / bwd: {v['bounds']})")
    return "\n".join(lines)
