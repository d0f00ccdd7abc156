"""Ahead-of-time compilation of the kernels' specializations for sm_80 and sm_90, without a GPU.

Runs `python -m focal_triton.aot` in a child process without TRITON_INTERPRET (interpreted kernels cannot be
compiled), started by conftest.py when the tests are collected: in the default suite its representative subset
(`aot.representative`, under two minutes), with FOCAL_TRITON_AOT=full (`make aot`, which CI runs after
`make test`) the whole matrix. It checks the facts of each compiled kernel: it
compiles, spills nothing, moves its tiles with 128-bit global loads and stores, indexes with 64 bits exactly where it
must, and uses the transcendentals it promises; and the per-logit cost of the tile loops, counted in their sm_90
SASS, against its budget (a regression fails here).
"""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import child_result

from focal_triton import roofline
from focal_triton.aot import DETR_KIND_POWERS

ARCHS = {"sm_80", "sm_90"}


def full_matrix() -> bool:
    """FOCAL_TRITON_AOT=full (`make aot`): the whole matrix; otherwise the representative subset."""
    return os.environ.get("FOCAL_TRITON_AOT") == "full"


def start_report():
    """Start `python -m focal_triton.aot` in a child process without TRITON_INTERPRET (interpreted kernels cannot be
    compiled); returns (process, path of its JSON facts). Called by conftest.py at collection time."""
    out = Path(tempfile.mkdtemp(prefix="focal_triton_aot_")) / "facts.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subset = [] if full_matrix() else ["--subset"]
    # Output to a file, not a pipe: nobody reads a pipe until the end, and a full one would stall the child.
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "focal_triton.aot", "--json", str(out), "--workers", "2",
                                 *subset], stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, out


@pytest.fixture(scope="module")
def report(request):
    proc, out = getattr(request.config, "focal_triton_aot", None) or start_report()
    return child_result(proc, out, 1800, "compile report")


@pytest.fixture(scope="module")
def facts(report):
    assert report["subset"] == (not full_matrix())
    return report["specializations"]


@pytest.fixture(scope="module")
def per_logit(report):
    return report["per_logit"]


DENSE = {"sigmoid_focal_fwd_kernel", "sigmoid_focal_bwd_kernel"}
MULTILEVEL = "multilevel_focal_kernel"
FINAL_SUMS = {"sum_partials_kernel", "normalize_partials_kernel"}
MATCHING = "focal_matching_cost_kernel"


def elementwise(facts):
    """The loss kernels (not the final sums, not the matching cost's gather: test_matching_kernel)."""
    return [f for f in facts if f["kernel"] not in FINAL_SUMS | {MATCHING}]


def dense(facts):
    return [f for f in facts if f["kernel"] in DENSE]


def multilevel(facts):
    return [f for f in facts if f["kernel"] == MULTILEVEL]


def loss_kind(f) -> int:
    return int(f["constexprs"].get("LOSS_KIND", "0"))


def test_every_specialization_compiles_for_its_archs(facts):
    """Every specialization compiles, for the architectures it lists; the subset holds every kernel on every logit
    dtype, the relatives of FL (FL*, QFL, VFL) in both kernels, every mode of the multi-level kernel, and compiled-in
    and runtime exponents."""
    errors = [f"{f['arch']} {f['label']}: {f['error']}" for f in facts if "error" in f]
    assert not errors, "\n".join(errors[:20])
    by_label = {}
    for f in facts:
        by_label.setdefault(f["label"], set()).add(f["arch"])
    assert all(by_label[f["label"]] == set(f["archs"]) for f in facts)
    kernels = {f["kernel"] for f in facts}
    assert kernels == DENSE | FINAL_SUMS | {MULTILEVEL, MATCHING}
    for kernel in DENSE | {MULTILEVEL, MATCHING}:
        dtypes = {f["label"].split()[1] for f in facts if f["kernel"] == kernel}
        assert dtypes == {"x=fp32", "x=fp16", "x=bf16", "x=fp64"}, kernel
    # (the DETR / YOLO kinds 4 .. 8: class-index only)
    assert {(f["kernel"], loss_kind(f)) for f in elementwise(facts)} == {
        (k, kind) for k in DENSE for kind in range(4)} | {(MULTILEVEL, kind) for kind in range(9)}
    assert {f["constexprs"]["MODE"] for f in multilevel(facts)} == set("0123")
    assert {"2", "-1"} <= {f["constexprs"]["GAMMA"] for f in multilevel(facts)}
    assert {a for f in facts for a in f["archs"]} == ARCHS


@pytest.mark.skipif(not full_matrix(), reason="the whole matrix: make aot (FOCAL_TRITON_AOT=full)")
def test_the_matrix_covers_every_launch(facts):
    """The dense kernels and final sums for sm_80 and sm_90, the multi-level kernel for sm_90 and (a subset: bf16 /
    fp32 logits, int64 labels) for sm_80. The relatives of FL (FL*, QFL, VFL) for sm_90, bf16 and fp32 logits, with
    every mode of the multi-level kernel."""
    # float32 losses of 16-bit logits (autocast) are compiled for sm_90 only, every other dense one for both.
    autocast = [f for f in facts if re.search(r"x=(fp16|bf16).*(out|upstream|loss)=fp32", f["label"])]
    assert autocast and all(f["archs"] == ["sm_90"] for f in autocast)
    variants = [f for f in facts if loss_kind(f)]
    assert all(f["archs"] == ["sm_90"] and "loss_kind=" in f["label"] for f in variants)
    assert {(f["kernel"], loss_kind(f), f["constexprs"]["GAMMA"]) for f in variants} == {
        (k, kind, g) for k in DENSE | {MULTILEVEL} for kind in (1, 2, 3)
        for g in (("0",) if kind == 1 else ("2", "-1"))} | {
        (MULTILEVEL, kind, str(g)) for kind, powers in DETR_KIND_POWERS.items() for g in powers}
    # Every compiled-in exponent (0 .. 4) and the runtime one, in both kernels; every option of the multi-level
    # kernel on and off.
    assert {f["constexprs"]["GAMMA"] for f in dense(facts)} == {"0", "1", "2", "3", "4", "-1"}
    assert {f["constexprs"]["GAMMA"] for f in multilevel(facts)} == {"0", "1", "2", "3", "4", "-1"}
    for option in ("HAS_IGNORE", "HAS_WEIGHT", "HAS_ALPHA", "SMOOTH"):
        assert {f["constexprs"][option] for f in multilevel(facts)} == {"True", "False"}, option
    assert {(loss_kind(f), f["constexprs"]["MODE"]) for f in multilevel(variants)} == {
        (kind, m) for kind in (1, 2, 3, *DETR_KIND_POWERS) for m in "0123"}
    # The compiled-in exponents beyond 2 (0, 1, 3, 4) are compiled once each, for sm_90.
    other_powers = [f for f in dense(facts) if f["constexprs"]["GAMMA"] in ("0", "1", "3", "4") and not loss_kind(f)]
    assert other_powers and all(f["archs"] == ["sm_90"] for f in other_powers)
    assert all(set(f["archs"]) == ARCHS for f in facts if f["kernel"] not in (MULTILEVEL, MATCHING)
               and f not in autocast and f not in variants and f not in other_powers)
    assert all("sm_90" in f["archs"] for f in multilevel(facts))
    assert {a for f in multilevel(facts) for a in f["archs"]} == ARCHS
    modes = {(f["constexprs"]["MODE"], f["constexprs"]["CLASS_ALIGNED"]) for f in multilevel(facts)}
    assert modes == {(m, a) for m in "0123" for a in ("True", "False")}


def test_no_spills(facts):
    """The dense kernels and the final sums: no local-memory traffic (STL/LDL in SASS), no stack frame, no local
    memory. (cuobjdump's LOCAL alone misses spills: a 4-byte ptxas spill showed as STACK 8, LOCAL 0 in an earlier
    version of these kernels.)"""
    bad = [f"{f['arch']} {f['label']}: {f['spill_instructions']} STL/LDL, stack {f['stack']} B, local {f['local']} B"
           for f in facts if f["kernel"] != MULTILEVEL and (f["spill_instructions"] or f["stack"] or f["local"])]
    assert not bad, "\n".join(bad)


def test_no_spills_in_multilevel_tile_loop(facts):
    """The multi-level kernel: no local-memory access inside its tile loop (loop depth 2, inside the loop over
    levels) or deeper. ptxas parks a few values of the outer loop over levels (the next level's offsets, the
    program id) in local memory, stored and loaded once per level, not per tile; that is allowed here and
    reported by `make aot`."""
    bad = [f"{f['arch']} {f['label']}: local accesses at loop depths {f['spill_loop_depths']}"
           for f in multilevel(facts) if any(d >= f["tile_loop_depth"] for d in f["spill_loop_depths"])]
    assert not bad, "\n".join(bad)
    assert all(f["tile_loop_depth"] == 2 and f["local"] == 0 for f in multilevel(facts))


def test_tiles_move_with_128_bit_accesses(facts):
    """With 16-byte aligned tensors (what torch allocates) every full tile's logits, targets, upstream gradient and
    output move in 128-bit global accesses (SASS LDG.E.128 / STG.E.128, PTX v4.b32 / v2.b64), for any n: only the
    tail tile is masked."""
    bad = []
    for f in elementwise(facts):
        if f["sass_ldg_128"] * 16 < f["vector_load_bytes"] or f["loads_128"] * 16 < f["vector_load_bytes"]:
            bad.append(f"{f['arch']} {f['label']}: {f['sass_ldg_128']} LDG.128 for {f['vector_load_bytes']} B")
        if f["sass_stg_128"] * 16 < f["vector_store_bytes"] or f["stores_128"] * 16 < f["vector_store_bytes"]:
            bad.append(f"{f['arch']} {f['label']}: {f['sass_stg_128']} STG.128 for {f['vector_store_bytes']} B")
    assert not bad, "\n".join(bad[:20])
    assert all(f["vector_load_bytes"] >= 16 for f in dense(facts))
    # The multi-level kernel's channels_last tiles of a class-aligned head (C % 16 == 0, e.g. COCO's 80) are rows
    # of contiguous classes: 128-bit too. (NCHW tiles run along hw, whose alignment is not known: narrower.)
    assert all(f["vector_load_bytes"] >= 16 for f in multilevel(facts) if f["constexprs"]["CLASS_ALIGNED"] == "True")


def test_64_bit_indexing_where_needed(facts):
    """The INT64 specializations (chosen above 2**31 - BLOCK elements) run the tile loop and its offsets in i64;
    the others in i32."""
    for f in dense(facts):
        expected = ["i64"] if f["constexprs"]["INT64"] == "True" else ["i32"]
        assert f["tile_loop_index"] == expected, f["label"]
    assert any(f["constexprs"]["INT64"] == "True" and "n=i64" in f["label"] for f in dense(facts))


def test_transcendentals_per_element(facts):
    """Transcendental ops per logit of each tile body (TTIR ops weighted by their tensor's elements; dense: the
    loop's and the masked tail's body; multi-level: 4 or 2, see tile_bodies). float32 math: one exp2 (e = exp(-|x|))
    and one rcp.approx (the sigmoid's reciprocal, inline PTX) per logit and no log (log(1 + e) is a polynomial); a
    runtime exponent adds one exp2, and one log2 where u is not a sigmoid (FL with soft targets, QFL; the class-index FL
    and VFL take log(u) from the softplus they have). float64 math (gradcheck): libdevice's exp and log instead,
    the same exponent rule. FL* has no exponent; its backward needs no log."""
    for f in elementwise(facts):
        fast, runtime_power = f["constexprs"]["FAST"] == "2", f["constexprs"]["GAMMA"] == "-1"
        kind, ml = loss_kind(f), f["kernel"] == MULTILEVEL
        backward = f["kernel"] == "sigmoid_focal_bwd_kernel" or f["constexprs"].get("MODE") in ("2", "3")
        expected = {"exp2": 1.0, "rcp": 1.0} if fast else {"exp": 1.0, "log": 1.0}
        if kind == 1 and backward and not fast:
            del expected["log"]
        if runtime_power:
            expected["exp2"] = expected.get("exp2", 0.0) + 1.0
            if not ((ml and kind == 0) or kind in (3, 5, 6, 7, 8)):
                expected["log2"] = 1.0
        if ml and kind == 8:  # IA-BCE's p**alpha on the label's class: one exp2 per logit (log2 p from softplus)
            expected["exp2"] += 1.0
        if ml and (kind == 8 or (kind == 7 and runtime_power)):
            # the score's power (IA-BCE score**(1 - alpha), MAL score**gamma): a log2 and an exp2 once per row
            row = 1.0 / int(f["constexprs"]["BLOCK_C"])
            expected = {k: round(v, 3) for k, v in {**expected, "exp2": expected["exp2"] + row, "log2": row}.items()}
        got = {k: v for k, v in f["ttir_math_per_logit"].items() if k != "absf"}
        assert got == expected, (f["label"], f["ttir_math_per_logit"])


def test_matching_kernel(facts):
    """The focal matching cost kernel (kernels/matching.py): every logit dtype with int64 labels and gamma = 2 and
    the runtime exponent, and with int32 labels and gamma = 2 (sm_80 too for bf16 / fp32 logits; the whole matrix
    only), gamma = 0 once; no spills. Transcendentals per output: float32 one exp2 (e = exp(-|x|)) and one
    rcp.approx (the sigmoid), no log (log(1 + e) is a polynomial); float64 libdevice's exp and log; the runtime
    exponent two exp2 more (r**gamma and er**gamma from the softplus it has, no log2). Every output gathers its
    logit once."""
    rows = [f for f in facts if f["kernel"] == MATCHING]
    assert {f["label"].split()[1] for f in rows} == {"x=fp32", "x=fp16", "x=bf16", "x=fp64"}
    assert {f["constexprs"]["GAMMA"] for f in rows} >= {"2", "-1"}
    if full_matrix():
        assert {(f["label"].split()[1], f["label"].split()[2], f["constexprs"]["GAMMA"]) for f in rows} >= {
            (x, lab, g) for x in ("x=fp32", "x=fp16", "x=bf16", "x=fp64")
            for lab, g in (("labels=i64", "2"), ("labels=i64", "-1"), ("labels=i32", "2"))}
        assert {f["label"].split()[1] for f in rows if "sm_80" in f["archs"]} == {"x=bf16", "x=fp32"}
    for f in rows:
        fast, runtime_power = f["constexprs"]["FAST"] == "2", f["constexprs"]["GAMMA"] == "-1"
        expected = {"exp2": 1.0, "rcp": 1.0} if fast else {"exp": 1.0, "log": 1.0}
        if runtime_power:
            expected["exp2"] = expected.get("exp2", 0.0) + 2.0
        got = {k: v for k, v in f["ttir_math_per_logit"].items() if k != "absf"}
        assert got == expected, (f["label"], f["ttir_math_per_logit"])
        assert f["stack"] == 0 and f["local"] == 0 and f["spill_instructions"] == 0, f["label"]


def test_multilevel_one_access_per_logit(facts):
    """From the PTX, following each global access's address back to the kernel parameters: every tile body of the
    multi-level kernel loads each logit of its tile once (bytes = bodies x the tile's bytes per thread); the
    forward "none" and the backward store each loss / gradient element once and the backward with per-level
    upstream gradients loads each of those once (the compiler may merge the stores of two bodies into one), the
    reducing forward stores nothing of logit size; no access mixes two tensors' addresses."""
    for f in multilevel(facts):
        tb, bodies, mode, acc = f["tile_access_bytes"], f["tile_bodies"], f["constexprs"]["MODE"], f["param_bytes"]
        assert acc.get("load:x") == bodies * tb["x"], (f["arch"], f["label"], acc)
        for key, used in (("store:o", mode != "0"), ("load:g", mode == "3")):
            got, unit = acc.get(key, 0), tb[key[-1]]
            if used:
                assert got % unit == 0 and unit <= got <= bodies * unit, (f["arch"], f["label"], key, acc)
            else:
                assert got == 0, (f["arch"], f["label"], key, acc)
        assert "mixed" not in acc, (f["arch"], f["label"], acc)
        # Loss statistics: per-anchor row sums stored only by the forward that asks for them.
        assert (acc.get("store:s", 0) > 0) == (f["constexprs"]["STATS"] == "True"), (f["arch"], f["label"], acc)


# Per-logit budgets of the tile loops (sm_90 SASS, focal_triton/roofline.py): instructions per logit along the
# longest path through the loop body, and MUFU per logit. The numbers are what the loops measure now (the larger of
# triton 3.8 and 3.6, whose ptxas schedules a few loops differently); a loop that grows by more than 2 % (or takes
# one more MUFU) fails here, and an improvement should lower its number.
BUDGET = {
    # (kernel, logits, tile loop, mode, loss): (instructions, MUFU) per logit
    ('multilevel', 'bf16', 'channels_last full', 'fwd sum', 'FL gamma=2'): (25.81, 2.0),
    ('multilevel', 'bf16', 'channels_last edge', 'fwd sum', 'FL gamma=2'): (28.44, 2.0),
    ('multilevel', 'bf16', 'NCHW full halves', 'fwd sum', 'FL gamma=2'): (32.12, 2.0),
    ('multilevel', 'bf16', 'NCHW full pairs', 'fwd sum', 'FL gamma=2'): (27.38, 2.0),
    ('multilevel', 'bf16', 'NCHW full quads', 'fwd sum', 'FL gamma=2'): (26.62, 2.0),
    ('multilevel', 'bf16', 'NCHW edge', 'fwd sum', 'FL gamma=2'): (31.44, 2.0),
    ('multilevel', 'bf16', 'channels_last full', 'bwd scalar', 'FL gamma=2'): (26.38, 2.0),
    ('multilevel', 'bf16', 'channels_last edge', 'bwd scalar', 'FL gamma=2'): (28.38, 2.0),
    ('multilevel', 'bf16', 'NCHW full pairs', 'bwd scalar', 'FL gamma=2'): (29.81, 2.0),
    ('multilevel', 'bf16', 'NCHW full halves', 'bwd scalar', 'FL gamma=2'): (33.81, 2.0),
    ('multilevel', 'bf16', 'NCHW full quads', 'bwd scalar', 'FL gamma=2'): (27.94, 2.0),
    ('multilevel', 'bf16', 'NCHW edge', 'bwd scalar', 'FL gamma=2'): (37.0, 2.0),
    ('multilevel', 'bf16', 'channels_last full', 'fwd sum', 'FL gamma=1.5'): (27.81, 3.0),
    ('multilevel', 'bf16', 'channels_last edge', 'fwd sum', 'FL gamma=1.5'): (30.31, 3.0),
    ('multilevel', 'bf16', 'NCHW full halves', 'fwd sum', 'FL gamma=1.5'): (32.94, 3.0),
    ('multilevel', 'bf16', 'NCHW full pairs', 'fwd sum', 'FL gamma=1.5'): (29.5, 3.0),
    ('multilevel', 'bf16', 'NCHW full quads', 'fwd sum', 'FL gamma=1.5'): (28.75, 3.0),
    ('multilevel', 'bf16', 'NCHW edge', 'fwd sum', 'FL gamma=1.5'): (33.06, 3.0),
    ('multilevel', 'bf16', 'channels_last full', 'bwd scalar', 'FL gamma=1.5'): (29.38, 3.0),
    ('multilevel', 'bf16', 'channels_last edge', 'bwd scalar', 'FL gamma=1.5'): (31.38, 3.0),
    ('multilevel', 'bf16', 'NCHW full pairs', 'bwd scalar', 'FL gamma=1.5'): (32.81, 3.0),
    ('multilevel', 'bf16', 'NCHW full halves', 'bwd scalar', 'FL gamma=1.5'): (36.75, 3.0),
    ('multilevel', 'bf16', 'NCHW full quads', 'bwd scalar', 'FL gamma=1.5'): (30.94, 3.0),
    ('multilevel', 'bf16', 'NCHW edge', 'bwd scalar', 'FL gamma=1.5'): (39.94, 3.0),
    ('multilevel', 'bf16', 'channels_last full', 'fwd sum', 'QFL beta=2'): (31.88, 2.0),
    ('multilevel', 'bf16', 'channels_last edge', 'fwd sum', 'QFL beta=2'): (35.19, 2.0),
    ('multilevel', 'bf16', 'NCHW full halves', 'fwd sum', 'QFL beta=2'): (39.19, 2.0),
    ('multilevel', 'bf16', 'NCHW full pairs', 'fwd sum', 'QFL beta=2'): (34.75, 2.0),
    ('multilevel', 'bf16', 'NCHW full quads', 'fwd sum', 'QFL beta=2'): (33.62, 2.0),
    ('multilevel', 'bf16', 'NCHW edge', 'fwd sum', 'QFL beta=2'): (38.19, 2.0),
    ('multilevel', 'bf16', 'channels_last full', 'fwd sum', 'VFL gamma=2'): (29.88, 2.0),
    ('multilevel', 'bf16', 'channels_last edge', 'fwd sum', 'VFL gamma=2'): (33.56, 2.0),
    ('multilevel', 'bf16', 'NCHW full halves', 'fwd sum', 'VFL gamma=2'): (37.06, 2.0),
    ('multilevel', 'bf16', 'NCHW full pairs', 'fwd sum', 'VFL gamma=2'): (32.62, 2.0),
    ('multilevel', 'bf16', 'NCHW full quads', 'fwd sum', 'VFL gamma=2'): (31.75, 2.0),
    ('multilevel', 'bf16', 'NCHW edge', 'fwd sum', 'VFL gamma=2'): (36.12, 2.0),
    # the YOLO and RT-DETR kinds (BCE forward and backward; transformers' VFL forward)
    ('multilevel', 'bf16', 'channels_last full', 'fwd sum', 'BCE'): (23.88, 2.0),
    ('multilevel', 'bf16', 'channels_last edge', 'fwd sum', 'BCE'): (27.06, 2.0),
    ('multilevel', 'bf16', 'NCHW full halves', 'fwd sum', 'BCE'): (31.38, 2.0),
    ('multilevel', 'bf16', 'NCHW full pairs', 'fwd sum', 'BCE'): (26.38, 2.0),
    ('multilevel', 'bf16', 'NCHW full quads', 'fwd sum', 'BCE'): (25.62, 2.0),
    ('multilevel', 'bf16', 'NCHW edge', 'fwd sum', 'BCE'): (29.69, 2.0),
    ('multilevel', 'bf16', 'channels_last full', 'bwd scalar', 'BCE'): (17.62, 2.0),
    ('multilevel', 'bf16', 'channels_last edge', 'bwd scalar', 'BCE'): (19.69, 2.0),
    ('multilevel', 'bf16', 'NCHW full pairs', 'bwd scalar', 'BCE'): (22.25, 2.0),
    ('multilevel', 'bf16', 'NCHW full halves', 'bwd scalar', 'BCE'): (26.25, 2.0),
    ('multilevel', 'bf16', 'NCHW full quads', 'bwd scalar', 'BCE'): (20.06, 2.0),
    ('multilevel', 'bf16', 'NCHW edge', 'bwd scalar', 'BCE'): (25.44, 2.0),
    ('multilevel', 'bf16', 'channels_last full', 'fwd sum', 'VFL-RTDETR gamma=2'): (28.88, 2.0),
    ('multilevel', 'bf16', 'channels_last edge', 'fwd sum', 'VFL-RTDETR gamma=2'): (32.31, 2.0),
    ('multilevel', 'bf16', 'NCHW full halves', 'fwd sum', 'VFL-RTDETR gamma=2'): (36.19, 2.0),
    ('multilevel', 'bf16', 'NCHW full pairs', 'fwd sum', 'VFL-RTDETR gamma=2'): (31.62, 2.0),
    ('multilevel', 'bf16', 'NCHW full quads', 'fwd sum', 'VFL-RTDETR gamma=2'): (30.75, 2.0),
    ('multilevel', 'bf16', 'NCHW edge', 'fwd sum', 'VFL-RTDETR gamma=2'): (36.94, 2.0),
    ('dense', 'bf16', 'flat full', 'fwd sum', 'FL gamma=2'): (27.62, 2.0),
    ('dense', 'bf16', 'flat full', 'bwd scalar', 'FL gamma=2'): (34.38, 2.0),
    ('dense', 'bf16', 'flat full', 'fwd sum', 'FL gamma=1.5'): (56.75, 3.0),
    ('dense', 'bf16', 'flat full', 'bwd scalar', 'FL gamma=1.5'): (75.0, 4.0),
    # the focal matching cost, per output (measured with triton 3.8 only)
    ('matching', 'bf16', 'matching', 'cost', 'focal gamma=2'): (38.38, 2.0),
    ('matching', 'bf16', 'matching', 'cost', 'focal gamma=1.5'): (42.31, 4.0),
    ('multilevel', 'fp32', 'channels_last full', 'fwd sum', 'FL gamma=2'): (28.38, 2.0),
    ('multilevel', 'fp32', 'channels_last edge', 'fwd sum', 'FL gamma=2'): (30.0, 2.0),
    ('multilevel', 'fp32', 'NCHW full', 'fwd sum', 'FL gamma=2'): (30.62, 2.0),
    ('multilevel', 'fp32', 'NCHW edge', 'fwd sum', 'FL gamma=2'): (30.62, 2.0),
    ('multilevel', 'fp32', 'channels_last full', 'bwd scalar', 'FL gamma=2'): (33.5, 2.0),
    ('multilevel', 'fp32', 'channels_last edge', 'bwd scalar', 'FL gamma=2'): (37.0, 2.0),
    ('multilevel', 'fp32', 'NCHW full', 'bwd scalar', 'FL gamma=2'): (37.62, 2.0),
    ('multilevel', 'fp32', 'NCHW edge', 'bwd scalar', 'FL gamma=2'): (39.25, 2.0),
    ('multilevel', 'fp32', 'channels_last full', 'fwd sum', 'FL gamma=1.5'): (30.38, 3.0),
    ('multilevel', 'fp32', 'channels_last edge', 'fwd sum', 'FL gamma=1.5'): (32.0, 3.0),
    ('multilevel', 'fp32', 'NCHW full', 'fwd sum', 'FL gamma=1.5'): (32.75, 3.0),
    ('multilevel', 'fp32', 'NCHW edge', 'fwd sum', 'FL gamma=1.5'): (32.62, 3.0),
    ('multilevel', 'fp32', 'channels_last full', 'bwd scalar', 'FL gamma=1.5'): (37.12, 3.0),
    ('multilevel', 'fp32', 'channels_last edge', 'bwd scalar', 'FL gamma=1.5'): (39.62, 3.0),
    ('multilevel', 'fp32', 'NCHW full', 'bwd scalar', 'FL gamma=1.5'): (40.62, 3.0),
    ('multilevel', 'fp32', 'NCHW edge', 'bwd scalar', 'FL gamma=1.5'): (42.75, 3.0),
    ('dense', 'fp32', 'flat full', 'fwd sum', 'FL gamma=2'): (27.25, 2.0),
    ('dense', 'fp32', 'flat full', 'bwd scalar', 'FL gamma=2'): (35.25, 2.0),
    ('matching', 'fp32', 'matching', 'cost', 'focal gamma=2'): (35.81, 2.0),
    ('matching', 'fp32', 'matching', 'cost', 'focal gamma=1.5'): (40.12, 4.0),
}
# Issue 13's goal for the RetinaNet case (bf16, FL gamma = 2, torchvision's ignore value, C = 80, int64 labels):
# at most 30 instructions and 3 MUFU per logit. Met, with triton 3.8 and 3.6, by the full-tile loops below: both
# layouts forward and backward (NCHW: the 64-bit quads of levels whose h*w is a multiple of 4, 92.6 % of RetinaNet's
# logits, and the 32-bit pairs of the other even levels, 4.6 %), the dense forwards; and by each pass as a whole
# (test_per_pass_goal). Not by the NCHW backward's 16-bit halves of odd-h*w levels (1.4 % of the logits: 31.1, 33.8
# with triton 3.6) nor the dense backward (32.9, 34.4 with 3.6; soft targets: the target's load, 1 - t, the own-side
# select and exact alpha_t per logit; the dense kernels also move the targets' bytes, which makes them memory-bound by
# the model): docs/kernels.md says why.
GOAL = {"instructions_per_logit": 30.0, "mufu_per_logit": 3.0}
GOAL_MET = [("multilevel", "bf16", "channels_last full", "fwd sum", "FL gamma=2"),
            ("multilevel", "bf16", "channels_last full", "bwd scalar", "FL gamma=2"),
            ("multilevel", "bf16", "NCHW full quads", "fwd sum", "FL gamma=2"),
            ("multilevel", "bf16", "NCHW full quads", "bwd scalar", "FL gamma=2"),
            ("multilevel", "bf16", "NCHW full pairs", "fwd sum", "FL gamma=2"),
            ("multilevel", "bf16", "NCHW full pairs", "bwd scalar", "FL gamma=2"),
            ("dense", "bf16", "flat full", "fwd sum", "FL gamma=2"),
            ("dense", "fp32", "flat full", "fwd sum", "FL gamma=2")]


def _row_key(r):
    return r["kernel"], r["dtype"], r["loop"], r["mode"], r["loss"]


def test_per_logit_report_is_complete(per_logit):
    """The report covers RetinaNet bf16 and fp32, FL gamma 2 and fractional, both layouts (full, pair and edge
    tiles), forward sum and backward scalar, QFL / VFL forward, the dense kernels and the matching cost; nothing
    failed or spilled."""
    assert not [r for r in per_logit if "error" in r]
    assert {_row_key(r) for r in per_logit} == set(BUDGET)
    assert all(r["spills"] == 0 for r in per_logit)
    assert all(r["arch"] == "sm_90" and r["logits_per_thread_per_iteration"] > 0 for r in per_logit)


def test_per_logit_goal_retinanet_bf16(per_logit):
    """Issue 13's goal where it is met: at most 30 instructions and 3 MUFU per logit."""
    rows = {_row_key(r): r for r in per_logit}
    for key in GOAL_MET:
        assert rows[key]["instructions_per_logit"] <= GOAL["instructions_per_logit"], rows[key]
        assert rows[key]["mufu_per_logit"] <= GOAL["mufu_per_logit"], rows[key]


def test_per_pass_goal(per_logit):
    """Issue 13's goal per pass: the RetinaNet bf16 FL gamma = 2 forward sum and backward scalar, both layouts, at
    most 30 instructions and 3 MUFU per logit over RetinaNet's levels (each tile loop weighted by its share of the
    logits, roofline.loop_weights: the edge and odd-h*w loops weigh in by what they take)."""
    passes = roofline.modeled_times(per_logit, "H100")
    for layout in ("channels_last", "NCHW"):
        for mode in ("fwd sum", "bwd scalar"):
            v = passes[f"bf16 {layout} FL gamma=2 {mode}"]
            assert v["instructions_per_logit"] <= GOAL["instructions_per_logit"], (layout, mode, v)
            assert v["mufu_per_logit"] <= GOAL["mufu_per_logit"], (layout, mode, v)


def test_per_logit_budgets(per_logit):
    """No tile loop of the report costs more than its budget (BUDGET, + 2 % for instructions)."""
    over = []
    for r in per_logit:
        instructions, mufu = BUDGET[_row_key(r)]
        if r["instructions_per_logit"] > instructions * 1.02:
            over.append(f"{_row_key(r)}: {r['instructions_per_logit']} instructions > {instructions}")
        if r["mufu_per_logit"] > mufu + 1e-9:
            over.append(f"{_row_key(r)}: {r['mufu_per_logit']} MUFU > {mufu}")
    assert not over, "\n".join(over)


def test_design_bytes_are_what_the_tile_loops_move(per_logit):
    """bench/kernel_report.py's bytes per logit by design (bf16 logits, int64 labels, C = 80: each pass reads the
    logit once, the backward writes its gradient once, one label per 16-class row) equal the bytes the global
    accesses of the channels_last full-tile loops move per logit, counted in their SASS (a thread owns one row)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import kernel_report

    rows = {r["mode"]: r for r in per_logit if (r["kernel"], r["dtype"], r["loop"], r["loss"]) ==
            ("multilevel", "bf16", "channels_last full", "FL gamma=2")}

    def moved(r):
        bits = sum(int(b) * n for accesses in (r["loads_by_bits"], r["stores_by_bits"]) for b, n in accesses.items())
        return bits / 8 / r["logits_per_thread_per_iteration"]

    fwd, fwd_bwd = kernel_report.design_bytes_per_logit(2)
    assert moved(rows["fwd sum"]) == fwd
    assert moved(rows["fwd sum"]) + moved(rows["bwd scalar"]) == fwd_bwd
