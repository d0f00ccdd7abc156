"""GPU-free kernel report: what the kernels are on a GPU, from ahead-of-time compiles and byte counts.

- Each representative kernel specialization compiled for sm_80 and sm_90 (focal_triton/aot.py: triton.compile +
  the cuobjdump of the triton wheel): registers, spills, shared memory, width of its global loads and stores.
- The per-logit cost of the tile loops counted in their sm_90 SASS (focal_triton/roofline.py: instructions and
  MUFU per logit, accesses by width) and the RetinaNet batch-16 times it models on an H100 and H200 (a model).
- Bytes per logit each pass moves by design (modeled from the code, see docs/kernels.md), and the bytes per
  logit of the eager detector code counted from the ops it dispatches (a TorchDispatchMode adds the input and
  output bytes of every op, forward and backward: a lower bound of its traffic, caches ignored).
- The time those bytes predict at a measured copy bandwidth: H100 3.0 TB/s (measured copy), A100 1.7 TB/s
  (modeled: ~85 % of the A100-80GB's 2.04 TB/s peak, not measured here).

    python bench/kernel_report.py [--json out.json]
"""
import argparse
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BANDWIDTH_TBS = {"H100 (3.0 TB/s measured copy)": 3.0, "A100 (1.7 TB/s, modeled)": 1.7}

# (what, label prefix in focal_triton.aot.specializations(), passes of the fwd+bwd it stands for)
KERNELS = [
    ("dense forward sum, bf16", "fwd x=bf16 reduce=True t=bf16 pow=2 int64=False n=i32 block=1024"),
    ("dense backward (scalar upstream), bf16", "bwd x=bf16 grad=sum upstream=bf16 t=bf16 pow=2 int64=False n=i32 "
                                               "block=1024"),
    ("multi-level forward sum, bf16, C % 16 = 0", "multilevel x=bf16 labels=i64 mode=0 pow=2 class_aligned=True "
                                                  "tile=64x16 opts=i"),
    ("multi-level backward (scalar upstream), bf16, C % 16 = 0", "multilevel x=bf16 labels=i64 mode=2 pow=2 "
                                                                 "class_aligned=True tile=64x16 opts=i"),
    ("multi-level forward sum, fp32, C % 16 = 0", "multilevel x=fp32 labels=i64 mode=0 pow=2 class_aligned=True "
                                                  "tile=64x16 opts=i"),
    ("multi-level backward (scalar upstream), fp32, C % 16 = 0", "multilevel x=fp32 labels=i64 mode=2 pow=2 "
                                                                 "class_aligned=True tile=64x16 opts=i"),
]


def _find(label):
    from focal_triton import aot

    for i, s in enumerate(aot.specializations()):
        if s.label == label:
            return i, s
    raise LookupError(label)


def _compile(args):
    index, arch = args
    from focal_triton import aot

    spec = aot.specializations()[index]
    try:
        return aot.compile_specialization(spec, arch)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"arch": f"sm_{arch}", "error": f"{type(e).__name__}: {e}"}


def compile_facts(workers: int = 2, kernels=KERNELS):
    """One row per (kernel, arch): registers, spills, shared bytes, 128-bit global loads / stores in the PTX."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    tasks, names = [], []
    for what, prefix in kernels:
        i, spec = _find(prefix)
        for arch in spec.archs:
            tasks.append((i, arch))
            names.append((what, spec))
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            facts = pool.map(_compile, tasks)
    else:
        facts = [_compile(t) for t in tasks]
    rows = []
    for (what, spec), f in zip(names, facts):
        row = {"kernel": what, "arch": f["arch"]}
        if "error" in f:
            row["error"] = f["error"]
        else:
            row.update(registers=f["regs"], spills=f["spill_instructions"], shared_bytes=f["shared"],
                       ld_global=f["loads"], ld_global_128=f["loads_128"], st_global_128=f["stores_128"],
                       sass_ldg_128=f["sass_ldg_128"], sass_stg_128=f["sass_stg_128"])
        rows.append(row)
    return rows


def design_bytes_per_logit(itemsize: int, num_classes: int = 80, label_bytes: int = 8, class_tile: int = 16):
    """(forward, forward + backward) bytes per logit of the multi-level kernels by design: each pass reads the
    logit once, the backward writes its gradient once; each pass reads an anchor's label once per class tile."""
    labels = label_bytes * -(-num_classes // class_tile) / num_classes
    return itemsize + labels, 3 * itemsize + 2 * labels


class OpBytes(TorchDispatchMode):
    """Adds the bytes of every tensor input and output of every op dispatched (views count their whole view)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = 0
        for t in tree_flatten((args, kwargs or {}))[0] + tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > 1 and func.__name__ not in ("view", "_unsafe_view",
                                                                                        "permute", "expand",
                                                                                        "detach", "t", "alias"):
                seen += t.numel() * t.element_size()
        self.bytes += seen
        self.ops += 1
        return out


def eager_bytes_per_logit(dtype=torch.bfloat16, backward=True):
    """Bytes per logit the eager detector code (bench/providers.torchvision_loss) moves, counted from its ops on
    a small RetinaNet-shaped problem (2 images of 128x160, A = 9, C = 80)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cases import Case
    from providers import torchvision_loss

    case = Case("retinanet", 2, (128, 160), 9, 80, str(dtype).replace("torch.", ""), "fwd+bwd")
    levels, labels = case.inputs(torch.device("cpu"), requires_grad=True)
    with OpBytes() as counter:
        loss = torchvision_loss(levels, labels, 9)
        if backward:
            loss.backward()
    return counter.bytes / case.numel, counter.ops


def predicted_ms(bytes_total: float, tbs: float) -> float:
    return bytes_total / (tbs * 1e12) * 1e3


def report(compile_kernels: bool = True, workers: int = 2) -> dict:
    rows = compile_facts(workers) if compile_kernels else []
    loop_costs, model = [], {}
    if compile_kernels:
        from focal_triton import roofline

        loop_costs = roofline.report((90,), workers)
        model = {gpu: roofline.fwd_bwd_summary(roofline.modeled_times(loop_costs, gpu)) for gpu in ("H100", "H200")}
    fwd16, fb16 = design_bytes_per_logit(2)
    fwd32, fb32 = design_bytes_per_logit(4)
    eager16, ops16 = eager_bytes_per_logit(torch.bfloat16)
    eager32, ops32 = eager_bytes_per_logit(torch.float32)
    numel = 16 * 16_056_000  # RetinaNet, batch 16 of COCO images
    predictions = []
    for name, per_logit in (("focal_triton bf16 fwd+bwd", fb16), ("focal_triton fp32 fwd+bwd", fb32),
                            ("eager bf16 fwd+bwd", eager16), ("eager fp32 fwd+bwd", eager32)):
        predictions.append({"what": name, "bytes_per_logit": round(per_logit, 2),
                            **{gpu: round(predicted_ms(per_logit * numel, tbs), 2)
                               for gpu, tbs in BANDWIDTH_TBS.items()}})
    return {"kernels": rows, "per_logit": loop_costs, "modeled_fwd_bwd_ms_retinanet_b16": model,
            "design_bytes_per_logit": {"bf16 fwd": fwd16, "bf16 fwd+bwd": fb16, "fp32 fwd": fwd32,
                                       "fp32 fwd+bwd": fb32,
                                       "note": "logit bytes plus int64 labels read once per 16-class tile"},
            "eager_bytes_per_logit": {"bf16 fwd+bwd": round(eager16, 1), "fp32 fwd+bwd": round(eager32, 1),
                                      "ops": {"bf16": ops16, "fp32": ops32}},
            "predicted_ms_retinanet_b16": predictions, "bandwidth_tbs": BANDWIDTH_TBS}


def format_report(rep: dict) -> str:
    lines = ["GPU-free kernel report (ahead-of-time compiles; predicted times are modeled, not measured)"]
    if rep["kernels"]:
        lines.append(f"{'kernel':58s} {'arch':6s} {'regs':>4s} {'spills':>6s} {'shared':>6s} "
                     f"{'ld.global (128-bit)':>20s} {'st.global.128':>13s}")
        for r in rep["kernels"]:
            if "error" in r:
                lines.append(f"{r['kernel']:58s} {r['arch']:6s} ERROR {r['error'][:60]}")
                continue
            lines.append(f"{r['kernel']:58s} {r['arch']:6s} {r['registers']:4d} {r['spills']:6d} "
                         f"{r['shared_bytes']:6d} {r['ld_global']:>11d} ({r['ld_global_128']:d}) "
                         f"{r['st_global_128']:13d}")
    if rep.get("per_logit"):
        from focal_triton import roofline

        lines.append("Per-logit cost of the tile loops (sm_90 SASS; focal_triton/roofline.py):")
        lines.append(roofline.format_rows(rep["per_logit"]))
        lines.append(roofline.format_model(rep["per_logit"]))
    d, e = rep["design_bytes_per_logit"], rep["eager_bytes_per_logit"]
    lines.append(f"bytes per logit by design: bf16 fwd {d['bf16 fwd']:.2f}, fwd+bwd {d['bf16 fwd+bwd']:.2f}; "
                 f"fp32 fwd {d['fp32 fwd']:.2f}, fwd+bwd {d['fp32 fwd+bwd']:.2f} ({d['note']})")
    lines.append(f"bytes per logit of the eager detector code, counted from its ops: bf16 fwd+bwd "
                 f"{e['bf16 fwd+bwd']:.0f} ({e['ops']['bf16']} ops), fp32 fwd+bwd {e['fp32 fwd+bwd']:.0f}")
    gpus = list(rep["bandwidth_tbs"])
    lines.append(f"predicted fwd+bwd time, RetinaNet batch 16 (257M logits): " + "; ".join(
        f"{p['what']}: " + ", ".join(f"{g.split()[0]} {p[g]:.2f} ms" for g in gpus)
        for p in rep["predicted_ms_retinanet_b16"]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--no-compile", action="store_true", help="byte counts and predictions only")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    rep = report(not args.no_compile, args.workers)
    print(format_report(rep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
