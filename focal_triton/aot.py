"""Ahead-of-time compilation of every kernel specialization the library can launch, for GPUs this machine may lack.

`triton.compile` builds TTIR, PTX and a cubin for sm_80 / sm_90 without a GPU or driver; the cubin's resource usage
comes from the `cuobjdump` that the triton wheel ships. This catches compile errors, register spills and narrow
loads that the interpreter cannot see. Must run in a process where TRITON_INTERPRET is not set (the interpreter
replaces the kernels by Python functions that cannot be compiled).

    python -m focal_triton.aot          # prints one line of facts per specialization and architecture
"""
import collections
import functools
import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch

from .validation import LOGIT_DTYPES

ARCHS = (80, 90)
TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass
class Specialization:
    """One compiled variant of a kernel: the argument types, the constexprs and the launch options."""

    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    label: str
    # Index of the pointer arguments that the JIT sees as 16-byte aligned (what torch's allocator gives).
    aligned: tuple = ()
    # Bytes one thread reads / writes per full tile that should move in 128-bit accesses (see _vector_bytes).
    vector_load_bytes: int = 0
    vector_store_bytes: int = 0
    elements_per_thread: int = 0


def _target_dtypes(x_dtype):
    """Targets in the logits' dtype, and float32 targets beside low-precision logits (a common mix)."""
    return (x_dtype,) if x_dtype == torch.float32 else (x_dtype, torch.float32)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _vector_bytes(per_thread: int, *dtypes) -> int:
    """Bytes per thread per tile of the operands that can move in 128-bit accesses (16 bytes or more per thread;
    e.g. the float32 targets beside float64 logits are 8 bytes per thread, at most one 64-bit load)."""
    return sum(b for b in (per_thread * _itemsize(d) for d in dtypes) if b >= 16)


# (INT64 constexpr, type the JIT gives n): below 2**31 - BLOCK the index math is 32-bit; from there up to 2**31 - 1 it
# is 64-bit while n still arrives as i32; above, n arrives as i64.
INDEX_CASES = ((False, "i32"), (True, "i32"), (True, "i64"))


@functools.lru_cache(maxsize=None)
def specializations():
    """Every (kernel, types, constexprs, config) the launchers in focal_triton.kernels can produce on a GPU."""
    from .kernels import launch
    from .kernels import sigmoid_focal as sf

    specs = []
    for x_dtype in LOGIT_DTYPES:
        xs = TORCH_TO_TRITON[x_dtype]
        acc = "fp64" if x_dtype == torch.float64 else "fp32"
        for cfg in launch.gpu_configs_for(_itemsize(x_dtype)):
            per_thread = cfg.block // (cfg.num_warps * 32)
            for t_dtype, int_gamma, (int64, n_type) in itertools.product(
                    _target_dtypes(x_dtype), (True, False), INDEX_CASES):
                ts = TORCH_TO_TRITON[t_dtype]
                tile_bytes = _vector_bytes(per_thread, x_dtype, t_dtype)
                scalars = {"n": n_type, "c0": "fp32", "c1": "fp32", "gamma": "fp32", "gamma_int": "i32"}
                tag = f"t={ts} int_gamma={int_gamma} int64={int64} n={n_type} block={cfg.block}"
                for reduce in (False, True):
                    ce = sf.forward_constexprs(x_dtype, reduce, int_gamma, int64, cfg.block)
                    sig = {"x_ptr": f"*{xs}", "t_ptr": f"*{ts}", "out_ptr": f"*{acc if reduce else xs}", **scalars,
                           **{k: "constexpr" for k in ce}}
                    specs.append(Specialization(
                        sf.sigmoid_focal_fwd_kernel, sig, ce, cfg.num_warps, f"fwd x={xs} reduce={reduce} {tag}",
                        aligned=(0, 1, 2), vector_load_bytes=tile_bytes, elements_per_thread=per_thread,
                        vector_store_bytes=0 if reduce else _vector_bytes(per_thread, x_dtype)))
                for grad_mode in ("tensor", "sum", "mean"):
                    ce = sf.backward_constexprs(x_dtype, grad_mode != "tensor", grad_mode == "mean", int_gamma,
                                                int64, cfg.block)
                    sig = {"x_ptr": f"*{xs}", "t_ptr": f"*{ts}", "grad_out_ptr": f"*{xs}", "grad_in_ptr": f"*{xs}",
                           **scalars, **{k: "constexpr" for k in ce}}
                    grad_bytes = _vector_bytes(per_thread, x_dtype)
                    specs.append(Specialization(
                        sf.sigmoid_focal_bwd_kernel, sig, ce, cfg.num_warps, f"bwd x={xs} grad={grad_mode} {tag}",
                        aligned=(0, 1, 2, 3),
                        vector_load_bytes=tile_bytes + (grad_bytes if grad_mode == "tensor" else 0),
                        vector_store_bytes=grad_bytes, elements_per_thread=per_thread))
        for mean, n_type in itertools.product((False, True), ("i32", "i64")):
            sig = {"partials_ptr": f"*{acc}", "out_ptr": f"*{xs}", "num_partials": "i32", "n": n_type,
                   "MEAN": "constexpr", "BLOCK": "constexpr"}
            specs.append(Specialization(
                sf.sum_partials_kernel, sig, {"MEAN": mean, "BLOCK": launch.PARTIAL_SUM_BLOCK}, 4,
                f"sum_partials partials={acc} out={xs} mean={mean} n={n_type}", aligned=(0,)))
    return specs


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
# 128-bit global accesses in PTX: four 32-bit or two 64-bit lanes.
_LD128_RE = re.compile(r"\bld\.global(?:\.[a-z]+)*\.(?:v4\.(?:b|f|u|s)32|v2\.(?:b|f|u|s)64)\b")
_ST128_RE = re.compile(r"\bst\.global(?:\.[a-z]+)*\.(?:v4\.(?:b|f|u|s)32|v2\.(?:b|f|u|s)64)\b")
_LD_RE = re.compile(r"\bld\.global\b")
_SASS_LOCAL_RE = re.compile(r"\b(?:STL|LDL)\b")
_MATH_RE = re.compile(r"= math\.(\w+) .*: tensor<")
_WHILE_RE = re.compile(r"scf\.while \(([^)]*)\) : \(([^)]*)\)")


def tile_index_types(ttir: str) -> list:
    """Integer types of the tile loop's index: the while-loop value that starts from the program id (the gamma
    power loop's counter starts from a constant, a reduction's accumulator is a tensor)."""
    types = set()
    for m in _WHILE_RE.finditer(ttir):
        inits = [arg.split(" = ")[1].strip() for arg in m.group(1).split(", ")]
        for init, ty in zip(inits, m.group(2).split(", ")):
            if re.fullmatch(r"%pid\w*", init):
                types.add(ty.strip())
    return sorted(types)


def _run_tool(name: str, *args: str) -> str:
    return subprocess.run([_tool(name), *args], capture_output=True, text=True, check=True).stdout


def compile_specialization(spec: Specialization, arch: int) -> dict:
    """Compile `spec` for sm_<arch> and return its facts: registers, stack, shared and local (spill) bytes, counts
    of global loads / stores and of the 128-bit ones, the loop induction type, and the PTX / TTIR text."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i in spec.aligned}
    src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = _run_tool("cuobjdump", "-res-usage", f.name)
        sass = _run_tool("cuobjdump", "-sass", f.name)
    m = _RES_RE.search(res)
    if m is None:
        raise RuntimeError(f"cannot read resource usage of {spec.label} from cuobjdump:\n{res}")
    reg, stack, shared, local = map(int, m.groups())
    ttir = compiled.asm["ttir"]
    return {
        "arch": f"sm_{arch}", "regs": reg, "stack": stack, "shared": shared, "local": local,
        # Spills are local-memory traffic in SASS (STL / LDL); cuobjdump's LOCAL stays 0 for them, STACK does not.
        "spill_instructions": len(_SASS_LOCAL_RE.findall(sass)),
        "loads": len(_LD_RE.findall(ptx)), "loads_128": len(_LD128_RE.findall(ptx)),
        "stores_128": len(_ST128_RE.findall(ptx)),
        "sass_ldg_128": sass.count("LDG.E.128"), "sass_stg_128": sass.count("STG.E.128"),
        # Elementwise math ops on whole tiles in TTIR: one tile body is the loop's, one the masked tail's.
        "ttir_math": dict(collections.Counter(_MATH_RE.findall(ttir))),
        "tile_loop_index": tile_index_types(ttir),
    }


def _compile_task(args):
    index, arch = args
    spec = specializations()[index]
    try:
        facts = compile_specialization(spec, arch)
    except Exception as e:  # reported per specialization, so one failure does not hide the others
        facts = {"arch": f"sm_{arch}", "error": f"{type(e).__name__}: {e}"}
    return {"label": spec.label, "kernel": spec.kernel.__name__, "constexprs": {k: str(v) for k, v in
            spec.constexprs.items()}, "vector_load_bytes": spec.vector_load_bytes,
            "vector_store_bytes": spec.vector_store_bytes, "elements_per_thread": spec.elements_per_thread, **facts}


def report(workers: int = 1, archs=ARCHS) -> list:
    """Facts of every specialization for every architecture (a list of dicts, one per pair)."""
    tasks = [(i, arch) for i in range(len(specializations())) for arch in archs]
    if workers <= 1:
        return [_compile_task(t) for t in tasks]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(_compile_task, tasks, chunksize=4)


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the facts to this file")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    rows = report(args.workers)
    for f in rows:
        if "error" in f:
            print(f"{f['arch']} {f['label']}: ERROR {f['error']}")
            continue
        print(f"{f['arch']} {f['label']}: regs={f['regs']} stack={f['stack']} "
              f"shared={f['shared']} ld.global={f['loads']} (128-bit {f['loads_128']}) "
              f"st.global.128={f['stores_128']} spills={f['spill_instructions']} math={f['ttir_math']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    if any("error" in f for f in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
