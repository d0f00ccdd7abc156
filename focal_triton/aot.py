"""Ahead-of-time compilation of the kernels' specializations, for GPUs this machine may lack.

`triton.compile` builds TTIR, PTX and a cubin for sm_80 / sm_90 without a GPU or driver; the cubin's resource usage
comes from the `cuobjdump` that the triton wheel ships. This catches compile errors, register spills and narrow
loads that the interpreter cannot see. Must run in a process where TRITON_INTERPRET is not set (the interpreter
replaces the kernels by Python functions that cannot be compiled).

    python -m focal_triton.aot          # one line of facts per specialization and architecture, then the
                                        # per-logit cost table and the modeled times (focal_triton/roofline.py)
    python -m focal_triton.aot --subset # the same for `representative()`, the default test suite's share
    python -m focal_triton.aot --per-logit --sass-dir DIR   # only the per-logit set, for sm_80 and sm_90: each
                                        # cubin as DIR/<name>_sm<arch>.cubin, its SASS beside it, DIR/index.json
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

from .losses import LOGIT_DTYPES

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
    # Tile bodies the kernel's loops compile (full and masked; times two layouts in the multi-level kernel).
    tile_bodies: int = 2
    # Multi-level kernel: parameter indices of the per-level logits ("x"), outputs ("o") and upstream gradients
    # ("g"), to attribute each global access of the PTX to the tensor it reads or writes.
    param_groups: dict = None
    tile_bytes: int = 0  # logit bytes one thread owns in one tile
    tile_access_bytes: dict = None  # the same for each parameter group (the loss may be float32 under autocast)
    archs: tuple = ARCHS  # the architectures the report compiles it for
    # Loop nesting depth of the tile loop (the multi-level kernel's tile loop runs inside its loop over levels).
    tile_loop_depth: int = 1
    maxnreg: int = None  # the launcher's register budget (kernels/multilevel.py max_registers); None: ptxas's own


_TRITON_TO_TORCH = {v: k for k, v in TORCH_TO_TRITON.items()}


def _loss_dtypes(x_dtype):
    """Dtypes of an elementwise loss (and so of its upstream gradient): the logits', and float32 for 16-bit logits
    under autocast."""
    xs = TORCH_TO_TRITON[x_dtype]
    return (xs, "fp32") if x_dtype in (torch.float16, torch.bfloat16) else (xs,)


def _loss_archs(x_type: str, loss_type: str, archs=ARCHS) -> tuple:
    """The float32 losses of 16-bit logits (autocast) differ from the plain ones only in one pointer's type: they
    are compiled for sm_90 only, which keeps the report's run time in check on 2 cores."""
    return archs if loss_type == x_type else (90,)


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
# The relatives of FL (LOSS_KIND 1 FL*, 2 QFL, 3 VFL) differ from FL only in the elementwise math: they are compiled
# for sm_90, bf16 and fp32 logits, the loss and targets in the logits' dtype, 32-bit indexing, and int64 labels in
# the multi-level kernel. FL* has no power: GAMMA = 0 only.
NEW_LOSS_KINDS = (1, 2, 3)
# The DETR / YOLO kinds of the multi-level kernel (BCE, VFL_RTDETR, VFL_RTDETR_GRAD, MAL, IA_BCE) with their
# exponent specializations (the defaults' and, where the gradient takes p q / u, the runtime one): every mode on bf16
# logits, the forward sum and scalar backward of class-aligned fp32 heads.
DETR_KIND_POWERS = {4: (0,), 5: (2,), 6: (2, -1), 7: (-1,), 8: (2,)}
NEW_KIND_DTYPES = (torch.bfloat16, torch.float32)
# The exponent specializations of the matrix: gamma = 2 (compiled in) and a fractional one (the runtime path);
# the other compiled-in integers (0, 1, 3, 4) are compiled once each for bf16 logits (sm_90).
MATRIX_POWERS = (2, -1)
OTHER_POWERS = (0, 1, 3, 4)


def _powers(loss_kind: int) -> tuple:
    return (0,) if loss_kind == 1 else MATRIX_POWERS


def dense_forward_spec(x_dtype, t_dtype, reduce: bool, loss_dtype: str, power: int, cfg, kind: int = 0,
                       int64: bool = False, n_type: str = "i32", archs=ARCHS) -> Specialization:
    """The dense forward kernel as its launcher compiles it (sigmoid_focal.forward_constexprs)."""
    from .kernels import dense as sf

    xs, ts = TORCH_TO_TRITON[x_dtype], TORCH_TO_TRITON[t_dtype]
    per_thread = cfg.block // (cfg.num_warps * 32)
    ce = sf.forward_constexprs(x_dtype, reduce, power, int64, cfg.block, kind, gpu=True)
    sig = {"x_ptr": f"*{xs}", "t_ptr": f"*{ts}", "out_ptr": f"*{loss_dtype}", **_dense_scalars(n_type),
           **{k: "constexpr" for k in ce}}
    return Specialization(
        sf.sigmoid_focal_fwd_kernel, sig, ce, cfg.num_warps,
        f"fwd x={xs} reduce={reduce}{'' if reduce else f' out={loss_dtype}'} "
        f"{_dense_tag(ts, power, int64, n_type, cfg, kind)}",
        aligned=(0, 1, 2), vector_load_bytes=_vector_bytes(per_thread, x_dtype, t_dtype),
        elements_per_thread=per_thread,
        vector_store_bytes=0 if reduce else _vector_bytes(per_thread, _TRITON_TO_TORCH[loss_dtype]),
        archs=archs if reduce else _loss_archs(xs, loss_dtype, archs))


def dense_backward_spec(x_dtype, t_dtype, grad_mode: str, loss_dtype: str, power: int, cfg, kind: int = 0,
                        int64: bool = False, n_type: str = "i32", archs=ARCHS) -> Specialization:
    """The dense backward kernel (grad_mode "tensor", "sum" or "mean") as its launcher compiles it."""
    from .kernels import dense as sf

    xs, ts = TORCH_TO_TRITON[x_dtype], TORCH_TO_TRITON[t_dtype]
    per_thread = cfg.block // (cfg.num_warps * 32)
    ce = sf.backward_constexprs(x_dtype, grad_mode != "tensor", grad_mode == "mean", power, int64, cfg.block, kind,
                              gpu=True)
    sig = {"x_ptr": f"*{xs}", "t_ptr": f"*{ts}", "grad_out_ptr": f"*{loss_dtype}", "grad_in_ptr": f"*{xs}",
           **_dense_scalars(n_type), **{k: "constexpr" for k in ce}}
    upstream_bytes = _vector_bytes(per_thread, _TRITON_TO_TORCH[loss_dtype])
    return Specialization(
        sf.sigmoid_focal_bwd_kernel, sig, ce, cfg.num_warps,
        f"bwd x={xs} grad={grad_mode} upstream={loss_dtype} {_dense_tag(ts, power, int64, n_type, cfg, kind)}",
        aligned=(0, 1, 2, 3),
        vector_load_bytes=(_vector_bytes(per_thread, x_dtype, t_dtype)
                           + (upstream_bytes if grad_mode == "tensor" else 0)),
        vector_store_bytes=_vector_bytes(per_thread, x_dtype), elements_per_thread=per_thread,
        archs=_loss_archs(xs, loss_dtype, archs))


def _dense_scalars(n_type: str) -> dict:
    return {"n": n_type, "c0": "fp32", "c1": "fp32", "gamma": "fp32", "beta": "fp32"}


def _dense_tag(ts, power, int64, n_type, cfg, kind) -> str:
    return f"t={ts} pow={power} int64={int64} n={n_type} block={cfg.block}" + (f" loss_kind={kind}" if kind else "")


@functools.lru_cache(maxsize=None)
def specializations():
    """The matrix of (kernel, types, constexprs, config) that the report compiles: every dtype, target dtype, mode,
    loss dtype and index width the dense launchers produce, for gamma = 2 and a fractional gamma; the other
    compiled-in exponents once each; then the multi-level kernel's (multilevel_specializations)."""
    from .kernels import launch
    from .kernels import dense as sf

    specs = []
    cases = [(x_dtype, 0, t_dtype, power, index, _loss_dtypes(x_dtype), ARCHS)
             for x_dtype in LOGIT_DTYPES
             for t_dtype, power, index in itertools.product(_target_dtypes(x_dtype), MATRIX_POWERS, INDEX_CASES)]
    cases += [(x_dtype, kind, x_dtype, power, INDEX_CASES[0], (TORCH_TO_TRITON[x_dtype],), (90,))
              for kind in NEW_LOSS_KINDS for x_dtype in NEW_KIND_DTYPES for power in _powers(kind)]
    for x_dtype, kind, t_dtype, power, (int64, n_type), loss_dtypes, archs in cases:
        acc = "fp64" if x_dtype == torch.float64 else "fp32"
        for cfg in launch.gpu_configs_for(_itemsize(x_dtype)):
            for reduce, loss_dtype in [(True, acc)] + [(False, d) for d in loss_dtypes]:
                specs.append(dense_forward_spec(x_dtype, t_dtype, reduce, loss_dtype, power, cfg, kind, int64,
                                                n_type, archs))
            for grad_mode, loss_dtype in itertools.product(("tensor", "sum", "mean"), loss_dtypes):
                specs.append(dense_backward_spec(x_dtype, t_dtype, grad_mode, loss_dtype, power, cfg, kind, int64,
                                                 n_type, archs))
    for x_dtype, power in itertools.product((torch.bfloat16,), OTHER_POWERS):
        cfg = launch.gpu_configs_for(_itemsize(x_dtype))[0]
        specs.append(dense_forward_spec(x_dtype, x_dtype, True, "fp32", power, cfg, archs=(90,)))
        specs.append(dense_backward_spec(x_dtype, x_dtype, "sum", TORCH_TO_TRITON[x_dtype], power, cfg, archs=(90,)))
    for x_dtype in LOGIT_DTYPES:
        xs = TORCH_TO_TRITON[x_dtype]
        acc = "fp64" if x_dtype == torch.float64 else "fp32"
        for mean, n_type in itertools.product((False, True), ("i32", "i64")):
            sig = {"partials_ptr": f"*{acc}", "out_ptr": f"*{xs}", "num_partials": "i32", "n": n_type,
                   "MEAN": "constexpr", "BLOCK": "constexpr"}
            specs.append(Specialization(
                sf.sum_partials_kernel, sig, {"MEAN": mean, "BLOCK": launch.PARTIAL_SUM_BLOCK}, 4,
                f"sum_partials partials={acc} out={xs} mean={mean} n={n_type}", aligned=(0,)))
    return specs + multilevel_specializations() + matching_specializations()


# Options of the multi-level kernel (HAS_IGNORE, HAS_WEIGHT, HAS_ALPHA, SMOOTH): the matrix compiles torchvision's
# RetinaNet case (an ignore value, nothing else), none, and all four together.
OPTION_SETS = ((True, False, False, False), (False, False, False, False), (True, True, True, True))


def multilevel_spec(x_dtype, lab: str, mode: int, power: int, aligned_c: bool, tile, kind: int = 0,
                    stats: bool = False, loss_dtype: str = None, options=OPTION_SETS[0],
                    archs=(90,), generic: bool = False) -> Specialization:
    """The multi-level kernel as multilevel._launch compiles it. Its integer arguments are never specialized
    by the JIT (do_not_specialize), so only dtypes and constexprs vary."""
    from .kernels import multilevel as mf

    levels = mf.MAX_LEVELS
    xs = TORCH_TO_TRITON[x_dtype]
    loss_dtype = loss_dtype or xs
    acc = "fp64" if x_dtype == torch.float64 else "fp32"
    num_warps = mf.gpu_num_warps(_itemsize(x_dtype), aligned_c)
    per_thread = tile[0] * tile[1] // (num_warps * 32)
    ce = mf.kernel_constexprs(x_dtype, mode, power, aligned_c, tile, kind, stats, *options, has_generic=generic,
                              gpu=True)
    ptr_types = {"x": xs, "o": loss_dtype if mode == mf.MODE_NONE else xs,
                 "g": loss_dtype if mode == mf.MODE_GRAD_TENSOR else xs}
    sig = {}
    for group in ("x", "o", "g"):
        sig.update({f"{group}{i}{'_' if group == 'g' else ''}": f"*{ptr_types[group]}" for i in range(levels)})
    sig.update({f"hw{i}": "i32" for i in range(levels)})
    sig.update({f"ts{i}": "i32" for i in range(1, levels)})
    sig.update({f"{field}{i}": "i32" for field in ("sn", "on", "sk", "sp", "sh", "wd") for i in range(levels)})
    sig.update(lab_ptr=f"*{lab}", w_ptr=f"*{acc}", s_ptr=f"*{acc}", alpha_ptr=f"*{acc}",
               partials_ptr=f"*{acc}", grad_scalar_ptr=f"*{acc}", scale_ptr=f"*{acc}", stats_ptr=f"*{acc}")
    sig.update({k: "i32" for k in ("tiles_per_image", "label_row", "num_levels", "cl_mask", "generic_mask", "N", "P",
                                   "A", "C", "grad_stride", "scale_stride")})
    sig.update(c0="fp32", c1="fp32", gamma="fp32", beta="fp32", smoothing="fp32", ignore_index="i32")
    sig.update({k: "constexpr" for k in ce})
    names = list(sig)
    pointers = tuple(i for i, k in enumerate(names) if sig[k].startswith("*"))
    groups = {g: tuple(range(j * levels, (j + 1) * levels)) for j, g in enumerate("xog")}
    groups["s"] = (names.index("stats_ptr"),)
    wide = 16 if aligned_c else 0  # only channels_last tiles of a class-aligned head are contiguous rows
    opts = "".join(flag for flag, on in zip("iwas", options) if on)
    return Specialization(
        mf.multilevel_focal_kernel, sig, ce, num_warps,
        f"multilevel x={xs} labels={lab} mode={mode} pow={power} class_aligned={aligned_c} "
        f"tile={tile[0]}x{tile[1]} opts={opts or '-'}{f' loss={loss_dtype}' if loss_dtype != xs else ''}"
        f"{f' loss_kind={kind}' if kind else ''}{' stats' if stats else ''}{' generic' if generic else ''}",
        aligned=pointers,
        vector_load_bytes=wide * (2 if mode == mf.MODE_GRAD_TENSOR else 1),
        vector_store_bytes=0 if mode == mf.MODE_SUM else wide, elements_per_thread=per_thread,
        tile_access_bytes={g: per_thread * _itemsize(_TRITON_TO_TORCH[t]) for g, t in ptr_types.items()},
        # masked NCHW and channels_last, and for a class-aligned head their unmasked full tiles (bf16: NCHW three
        # times, as quads and pairs of positions in words and as pairs in halves)
        # (and the generic gather's masked body where compiled)
        tile_bodies=((6 if x_dtype == torch.bfloat16 else 4) if aligned_c else 2) + int(generic), param_groups=groups,
        tile_bytes=per_thread * _itemsize(x_dtype),
        archs=archs, tile_loop_depth=2, maxnreg=mf.max_registers(x_dtype, aligned_c))


def multilevel_specializations():
    """The multi-level kernel's matrix: every logit dtype, int32 / int64 labels, mode (and float32 losses under
    autocast), gamma = 2 and fractional, class-aligned or not, with torchvision's options (an ignore value); the
    other option sets, exponents, loss kinds and statistics on bf16 / fp32 logits with int64 labels."""
    from .kernels import multilevel as mf

    specs = []
    for x_dtype in LOGIT_DTYPES:
        xs = TORCH_TO_TRITON[x_dtype]
        acc = "fp64" if x_dtype == torch.float64 else "fp32"
        tile = mf.gpu_tile(_itemsize(x_dtype))
        # MODE 1 writes, MODE 3 reads, an elementwise loss or its gradient: in the logits' dtype or, under
        # autocast, float32.
        mode_dtypes = [(m, xs) for m in range(4)] + [(m, "fp32") for m in (1, 3) if xs in ("fp16", "bf16")]
        for lab, power, aligned_c, (mode, loss_dtype) in itertools.product(("i32", "i64"), MATRIX_POWERS,
                                                                            (True, False), mode_dtypes):
            # sm_90 for all; sm_80 too for bf16 and fp32 logits with int64 labels and losses in the logits' dtype
            # (a representative subset that keeps the report's run time in check on 2 cores).
            archs = ARCHS if (lab == "i64" and x_dtype in NEW_KIND_DTYPES and loss_dtype == xs) else (90,)
            specs.append(multilevel_spec(x_dtype, lab, mode, power, aligned_c, tile, loss_dtype=loss_dtype,
                                         archs=archs))
        if x_dtype not in NEW_KIND_DTYPES:
            continue
        if x_dtype == torch.bfloat16:  # the other option sets and exponents: bf16 (the pair path) only
            for mode, aligned_c, options in itertools.product(range(4), (True, False), OPTION_SETS[1:]):
                specs.append(multilevel_spec(x_dtype, "i64", mode, 2, aligned_c, tile, options=options))
            for mode, power in itertools.product((mf.MODE_SUM, mf.MODE_GRAD_SCALAR), OTHER_POWERS):
                specs.append(multilevel_spec(x_dtype, "i64", mode, power, True, tile))
        for kind, aligned_c, mode in itertools.product(NEW_LOSS_KINDS, (True, False), range(4)):
            for power in _powers(kind):
                specs.append(multilevel_spec(x_dtype, "i64", mode, power, aligned_c, tile, kind))
        for kind, powers in DETR_KIND_POWERS.items():
            cases = (itertools.product((True, False), range(4)) if x_dtype == torch.bfloat16 else
                     ((True, mf.MODE_SUM), (True, mf.MODE_GRAD_SCALAR)))
            for (aligned_c, mode), power in itertools.product(cases, powers):
                specs.append(multilevel_spec(x_dtype, "i64", mode, power, aligned_c, tile, kind))
        # The forward with loss statistics (MODE 0, STATS) of FL.
        for power, aligned_c in itertools.product(MATRIX_POWERS, (True, False)):
            specs.append(multilevel_spec(x_dtype, "i64", mf.MODE_SUM, power, aligned_c, tile, stats=True))
        # The generic gather (HAS_GENERIC: a segment whose positions do not collapse to one axis), in the two modes
        # of segmented_focal_loss.
        for mode, aligned_c in itertools.product((mf.MODE_SUM, mf.MODE_GRAD_SCALAR), (True, False)):
            specs.append(multilevel_spec(x_dtype, "i64", mode, 2, aligned_c, tile, generic=True))
    for x_dtype in (torch.float32, torch.float64):  # one per accumulation dtype
        acc = "fp64" if x_dtype == torch.float64 else "fp32"
        # 0-2: one normalizer shared by the segments (multilevel_focal_loss); 3: per-segment divisors
        for norm_mode, norm_dtype in ((0, "fp32"), (1, acc), (1, "i64"), (2, acc), (2, "i64"), (3, acc)):
            sig = {"partials_ptr": f"*{acc}", "norm_ptr": f"*{norm_dtype}", "scale_ptr": f"*{acc}",
                   "segment_ptr": f"*{acc}", "out_ptr": f"*{acc}", "S": "i32", "N": "i32", "P": "i32",
                   "norm_hi": "fp32", "norm_lo": "fp32", "NORM_MODE": "constexpr", "BLOCK": "constexpr"}
            specs.append(Specialization(
                mf.normalize_partials_kernel, sig, {"NORM_MODE": norm_mode, "BLOCK": launch_partial_block()},
                4, f"normalize_partials acc={acc} norm_mode={norm_mode} normalizer={norm_dtype}",
                aligned=(0, 1, 2, 3, 4)))
    return specs


def matching_spec(x_dtype, lab: str, power: int, archs=ARCHS) -> Specialization:
    """The focal matching cost kernel as matching.forward compiles it (its integer arguments are never specialized
    by the JIT). Its logits are gathered (one 16- to 64-bit load per output) and its rows of G outputs have no
    known alignment: no 128-bit access is expected."""
    from .kernels import matching as mk

    xs = TORCH_TO_TRITON[x_dtype]
    tile = mk.gpu_tile(x_dtype)
    ce = mk.kernel_constexprs(x_dtype, power, tile, gpu=True)
    sig = {"x_ptr": f"*{xs}", "labels_ptr": f"*{lab}",
           "out_ptr": "*fp64" if x_dtype == torch.float64 else "*fp32",
           **{k: "i32" for k in ("N", "G", "C", "stride_q", "stride_c")},
           "c_pos": "fp32", "c_neg": "fp32", "gamma": "fp32", **{k: "constexpr" for k in ce}}
    return Specialization(mk.focal_matching_cost_kernel, sig, ce, mk.GPU_NUM_WARPS,
                          f"matching x={xs} labels={lab} pow={power}", aligned=(0, 1, 2),
                          elements_per_thread=tile[0] * tile[1] // (mk.GPU_NUM_WARPS * 32),
                          tile_bodies=1, archs=archs)


def matching_specializations():
    """The matching cost kernel's matrix: every logit dtype with int64 labels, gamma = 2 and the runtime exponent,
    for sm_90 (and sm_80 for bf16 / fp32 logits); int32 labels (one load per program differs) with gamma = 2 and
    gamma = 0 (bf16) once each, for sm_90."""
    specs = [matching_spec(x_dtype, "i64", power, ARCHS if x_dtype in NEW_KIND_DTYPES else (90,))
             for x_dtype in LOGIT_DTYPES for power in MATRIX_POWERS]
    specs += [matching_spec(x_dtype, "i32", 2, (90,)) for x_dtype in LOGIT_DTYPES]
    return specs + [matching_spec(torch.bfloat16, "i64", 0, (90,))]


def launch_partial_block() -> int:
    from .kernels.launch import PARTIAL_SUM_BLOCK

    return PARTIAL_SUM_BLOCK


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
_MATH_SHAPE_RE = re.compile(r"= math\.(\w+) [^\n]*?: tensor<((?:\d+x)+)(?:f32|f64|f16|bf16)")
# Inline PTX (math.py's rcp.approx), named by its opcode's first part ("rcp")
_ASM_SHAPE_RE = re.compile(r'= tt\.elementwise_inline_asm "(\w+)[^\n]*?-> tensor<((?:\d+x)+)(?:f32|f64|f16|bf16)')


def math_per_logit(ttir: str, tile_elements: int, bodies: int) -> dict:
    """Elementwise math ops of the TTIR (math.exp2, math.rsqrt, ...; inline PTX by its opcode, "rcp") per logit of
    one tile body: each op weighs its tensor's elements, the sum is divided by the tile's elements and the number of
    tile bodies."""
    out = collections.Counter()
    for name, shape in _MATH_SHAPE_RE.findall(ttir) + _ASM_SHAPE_RE.findall(ttir):
        elements = 1
        for d in shape.rstrip("x").split("x"):
            elements *= int(d)
        out[name] += elements
    return {k: round(v / (tile_elements * bodies), 3) for k, v in sorted(out.items())}
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


_PTX_BYTES = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "b32": 4, "u32": 4, "s32": 4,
              "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8}


def _access_bytes(type_suffix: str) -> int:
    parts = type_suffix.strip(".").split(".")
    lanes = int(parts[-2][1:]) if len(parts) >= 2 and re.fullmatch(r"v\d", parts[-2]) else 1
    return lanes * _PTX_BYTES[parts[-1]]


def ptx_param_accesses(ptx: str, groups: dict) -> dict:
    """Bytes per thread of the global loads and stores in `ptx` whose address derives from each group of kernel
    parameters (group name -> parameter indices), found by following every register's definitions back to the
    ld.param instructions. Returns {"load:<group>": bytes, "store:<group>": bytes, "mixed": count}, "mixed"
    counting accesses whose address derives from more than one group (there should be none)."""
    defs = collections.defaultdict(set)
    params = collections.defaultdict(set)
    for raw in ptx.splitlines():
        line = re.sub(r"^@!?%p\w+\s+", "", raw.strip())
        m = re.match(r"([a-z][\w.]*)\s+(.*);", line)
        if not m or m.group(1).startswith(("st.", "bra", "ret", "bar")):
            continue
        operands = [o.strip() for o in re.split(r",(?![^{]*})", m.group(2))]
        sources = " ".join(operands[1:])
        for dst in re.findall(r"%\w+", operands[0]):
            pm = re.search(r"_param_(\d+)", sources)
            if m.group(1).startswith("ld.param") and pm:
                params[dst].add(int(pm.group(1)))
            defs[dst].update(r for r in re.findall(r"%\w+", sources) if not r.startswith("%p"))

    def origin(reg):
        seen, stack, found = {reg}, [reg], set()
        while stack:
            r = stack.pop()
            found |= params.get(r, set())
            for s in defs.get(r, ()):
                if s not in seen:
                    seen.add(s)
                    stack.append(s)
        return found

    out = collections.Counter()
    for m in re.finditer(r"\b(ld|st)\.global((?:\.[\w:]+)*)\s+[^;]*?\[\s*(%\w+)", ptx):
        kind, suffix, addr = m.groups()
        # Keep the vector width and the type (e.g. "v4.b32"), drop cache and eviction qualifiers.
        suffix = ".".join(p for p in suffix.split(".") if p in _PTX_BYTES or re.fullmatch(r"v\d", p))
        hit = [g for g, idx in groups.items() if origin(addr) & set(idx)]
        if len(hit) > 1:
            out["mixed"] += 1
        for g in hit:
            out[f"{'load' if kind == 'ld' else 'store'}:{g}"] += _access_bytes(suffix)
    return dict(out)


_SASS_INSTR_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_SASS_BRA_RE = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def local_access_loop_depths(sass: str) -> list:
    """Loop nesting depth of every local-memory access (STL / LDL) in `sass`: the number of loops around it, a loop
    being the address range from a backward branch's target to the branch."""
    instructions = [(int(m.group(1), 16), m.group(2)) for m in _SASS_INSTR_RE.finditer(sass)]
    loops = []
    for addr, text in instructions:
        b = _SASS_BRA_RE.search(text)
        if b and int(b.group(1), 16) < addr:
            loops.append((int(b.group(1), 16), addr))
    return sorted(sum(lo <= addr <= hi for lo, hi in loops)
                  for addr, text in instructions if _SASS_LOCAL_RE.search(text))


def _run_tool(name: str, *args: str) -> str:
    return subprocess.run([_tool(name), *args], capture_output=True, text=True, check=True).stdout


def compile_cubin(spec: Specialization, arch: int):
    """triton.compile of `spec` for sm_<arch> (TTIR, PTX, cubin in .asm), with the pointer alignment torch gives."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i in spec.aligned}
    src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, **({"maxnreg": spec.maxnreg} if spec.maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def cubin_resources(cubin: bytes) -> dict:
    """Registers, stack, shared and local bytes (cuobjdump -res-usage), the SASS, and its STL / LDL count."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = _run_tool("cuobjdump", "-res-usage", f.name)
        sass = _run_tool("cuobjdump", "-sass", f.name)
    m = _RES_RE.search(res)
    if m is None:
        raise RuntimeError(f"cannot read resource usage from cuobjdump:\n{res}")
    reg, stack, shared, local = map(int, m.groups())
    return {"regs": reg, "stack": stack, "shared": shared, "local": local, "sass": sass,
            "spill_instructions": len(_SASS_LOCAL_RE.findall(sass))}


def compile_specialization(spec: Specialization, arch: int) -> dict:
    """Compile `spec` for sm_<arch> and return its facts: registers, stack, shared and local (spill) bytes, counts
    of global loads / stores and of the 128-bit ones, the loop induction type, and the PTX / TTIR text."""
    compiled = compile_cubin(spec, arch)
    ptx = compiled.asm["ptx"]
    res = cubin_resources(compiled.asm["cubin"])
    reg, stack, shared, local, sass = res["regs"], res["stack"], res["shared"], res["local"], res["sass"]
    ttir = compiled.asm["ttir"]
    return {
        "arch": f"sm_{arch}", "regs": reg, "stack": stack, "shared": shared, "local": local,
        # Spills are local-memory traffic in SASS (STL / LDL); cuobjdump's LOCAL stays 0 for them, STACK does not.
        "spill_instructions": len(_SASS_LOCAL_RE.findall(sass)),
        "spill_loop_depths": local_access_loop_depths(sass),
        "loads": len(_LD_RE.findall(ptx)), "loads_128": len(_LD128_RE.findall(ptx)),
        "stores_128": len(_ST128_RE.findall(ptx)),
        "sass_ldg_128": sass.count("LDG.E.128"), "sass_stg_128": sass.count("STG.E.128"),
        # Elementwise math ops on whole tiles in TTIR: one tile body is the loop's, one the masked tail's.
        "ttir_math": dict(collections.Counter(_MATH_RE.findall(ttir))),
        "ttir_math_per_logit": math_per_logit(ttir, spec.elements_per_thread * spec.num_warps * 32,
                                              spec.tile_bodies) if spec.elements_per_thread else {},
        "tile_loop_index": tile_index_types(ttir),
        "param_bytes": ptx_param_accesses(ptx, spec.param_groups) if spec.param_groups else {},
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
            "vector_store_bytes": spec.vector_store_bytes, "elements_per_thread": spec.elements_per_thread,
            "tile_bodies": spec.tile_bodies, "tile_bytes": spec.tile_bytes, "archs": [f"sm_{a}" for a in spec.archs],
            "tile_access_bytes": spec.tile_access_bytes or {},
            "tile_loop_depth": spec.tile_loop_depth,
            **facts}


def _family(spec) -> tuple:
    words = spec.label.split()
    return spec.kernel.fn.__name__, words[1], spec.constexprs.get("LOSS_KIND", 0)


# The rarer cases of the matrix, each a (constexpr, value) or a label word, of which the subset takes one each.
_RARE = (("INT64", True), "n=i64", ("CLASS_ALIGNED", False), ("MODE", 3), ("MODE", 2), ("MODE", 1), ("STATS", True),
         ("HAS_WEIGHT", True), ("GAMMA", -1), ("GAMMA", 0), ("GAMMA", 3), "out=fp32", "upstream=fp32",
         ("HAS_GENERIC", True), ("NORM_MODE", 3))


def representative() -> list:
    """Indices into specializations() of the default test suite's share (`make aot` compiles them all): the first
    specialization of each (kernel, logits' dtype, loss kind), and per kernel the first of each rarer case (_RARE:
    64-bit indexing and n, a head that is not class-aligned, each mode, statistics, the options, the runtime and
    other compiled-in exponents, float32 losses of 16-bit logits)."""
    specs = specializations()
    chosen, families = [], set()
    for i, spec in enumerate(specs):
        if _family(spec) not in families:
            families.add(_family(spec))
            chosen.append(i)
    for rare, kernel in itertools.product(_RARE, sorted({_family(spec)[0] for spec in specs})):
        hit = [i for i, spec in enumerate(specs) if _family(spec)[0] == kernel and
               (rare in spec.label.split() if isinstance(rare, str) else spec.constexprs.get(rare[0]) == rare[1])]
        if hit and not set(hit) & set(chosen):
            chosen.append(hit[0])
    return sorted(chosen)


def report(workers: int = 1, archs=ARCHS, subset: bool = False) -> list:
    """Facts of every specialization (or of the representative subset) for each of its architectures (a list of
    dicts, one per pair)."""
    indices = representative() if subset else range(len(specializations()))
    tasks = [(i, arch) for i in indices for arch in archs if arch in specializations()[i].archs]
    if workers <= 1:
        return [_compile_task(t) for t in tasks]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(_compile_task, tasks, chunksize=4)


def main(argv=None) -> None:
    import argparse
    import json

    from . import roofline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the facts to this file ({'specializations': [...], "
                                       "'per_logit': [...], 'model': {...}})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--subset", action="store_true",
                        help="compile only the representative subset of the matrix (the default test suite's)")
    parser.add_argument("--per-logit", action="store_true",
                        help="compile only the per-logit report's specializations (for sm_80 and sm_90)")
    parser.add_argument("--sass-dir", help="with --per-logit: write DIR/<name>.cubin, its SASS beside it, and "
                                           "DIR/index.json")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    if args.sass_dir and not args.per_logit:
        parser.error("--sass-dir goes with --per-logit")
    rows = []
    if not args.per_logit:
        rows = report(args.workers, subset=args.subset)
        for f in rows:
            if "error" in f:
                print(f"{f['arch']} {f['label']}: ERROR {f['error']}")
                continue
            print(f"{f['arch']} {f['label']}: regs={f['regs']} stack={f['stack']} "
                  f"shared={f['shared']} ld.global={f['loads']} (128-bit {f['loads_128']}) "
                  f"st.global.128={f['stores_128']} spills={f['spill_instructions']} "
                  f"(loop depths {f['spill_loop_depths']}) math={f['ttir_math']}"
                  + (f" ptx bytes/thread {f['param_bytes']}" if f["param_bytes"] else ""))
    # The per-logit cost of the tile loops, from SASS (focal_triton/roofline.py): sm_90 beside the full report,
    # sm_80 and sm_90 on its own.
    per_logit = roofline.report(ARCHS if args.per_logit else (90,), args.workers, args.sass_dir)
    print("\nPer-logit cost of the tile loops (SASS, longest path through the loop body / logits per thread):")
    print(roofline.format_rows(per_logit))
    print(roofline.format_model(per_logit))
    if args.json:
        model = {gpu: roofline.fwd_bwd_summary(roofline.modeled_times(per_logit, gpu)) for gpu in roofline.GPUS}
        with open(args.json, "w") as fh:
            json.dump({"specializations": rows, "per_logit": per_logit, "model": model, "subset": args.subset}, fh,
                      indent=1)
    if any("error" in f for f in rows + per_logit):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
