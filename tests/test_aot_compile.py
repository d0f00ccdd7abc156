"""Ahead-of-time compilation of every kernel specialization for sm_80 and sm_90, without a GPU.

Runs `python -m focal_triton.aot` in a child process without TRITON_INTERPRET (interpreted kernels cannot be
compiled), started by conftest.py when the tests are collected, and checks the facts of each compiled kernel: it
compiles, spills nothing, moves its tiles with 128-bit global loads and stores, indexes with 64 bits exactly where it
must, and uses the transcendentals it promises.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ARCHS = {"sm_80", "sm_90"}


def start_report():
    """Start `python -m focal_triton.aot` in a child process without TRITON_INTERPRET (interpreted kernels cannot be
    compiled); returns (process, path of its JSON facts). Called by conftest.py at collection time."""
    out = Path(tempfile.mkdtemp(prefix="focal_triton_aot_")) / "facts.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Output to a file, not a pipe: nobody reads a pipe until the end, and a full one would stall the child.
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "focal_triton.aot", "--json", str(out), "--workers", "2"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, out


@pytest.fixture(scope="module")
def facts(request):
    proc, out = getattr(request.config, "focal_triton_aot", None) or start_report()
    try:
        proc.wait(timeout=1500)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the compile report ran past 25 minutes")
    if not out.exists():
        pytest.fail(f"the compile report did not run:\n{out.with_suffix('.log').read_text()[-6000:]}")
    return json.loads(out.read_text())


DENSE = {"sigmoid_focal_fwd_kernel", "sigmoid_focal_bwd_kernel"}
MULTILEVEL = "multilevel_focal_kernel"
FINAL_SUMS = {"sum_partials_kernel", "normalize_partials_kernel"}


def elementwise(facts):
    return [f for f in facts if f["kernel"] not in FINAL_SUMS]


def dense(facts):
    return [f for f in facts if f["kernel"] in DENSE]


def multilevel(facts):
    return [f for f in facts if f["kernel"] == MULTILEVEL]


def loss_kind(f) -> int:
    return int(f["constexprs"].get("LOSS_KIND", "0"))


def test_every_specialization_compiles_for_its_archs(facts):
    """Every specialization compiles; the dense kernels and final sums for sm_80 and sm_90, the multi-level kernel
    for sm_90 and (a subset: bf16 / fp32 logits, int64 labels) for sm_80. The relatives of FL (FL*, QFL, VFL) for
    sm_90, bf16 and fp32 logits, with every mode of the multi-level kernel."""
    errors = [f"{f['arch']} {f['label']}: {f['error']}" for f in facts if "error" in f]
    assert not errors, "\n".join(errors[:20])
    by_label = {}
    for f in facts:
        by_label.setdefault(f["label"], set()).add(f["arch"])
    assert all(by_label[f["label"]] == set(f["archs"]) for f in facts)
    # float32 losses of 16-bit logits (autocast) are compiled for sm_90 only, every other dense one for both.
    autocast = [f for f in facts if re.search(r"x=(fp16|bf16).*(out|upstream|loss)=fp32", f["label"])]
    assert autocast and all(f["archs"] == ["sm_90"] for f in autocast)
    variants = [f for f in facts if loss_kind(f)]
    assert all(f["archs"] == ["sm_90"] and "loss_kind=" in f["label"] for f in variants)
    assert {(f["kernel"], loss_kind(f), f["constexprs"]["INT_GAMMA"]) for f in variants} == {
        (k, kind, ig) for k in DENSE | {MULTILEVEL} for kind in (1, 2, 3)
        for ig in (("True",) if kind == 1 else ("True", "False"))}
    assert {(loss_kind(f), f["constexprs"]["MODE"]) for f in multilevel(variants)} == {
        (kind, m) for kind in (1, 2, 3) for m in "0123"}
    assert all(set(f["archs"]) == ARCHS for f in facts
               if f["kernel"] != MULTILEVEL and f not in autocast and f not in variants)
    assert all("sm_90" in f["archs"] for f in multilevel(facts))
    assert {a for f in multilevel(facts) for a in f["archs"]} == ARCHS
    kernels = {f["kernel"] for f in facts}
    assert kernels == DENSE | FINAL_SUMS | {MULTILEVEL}
    for kernel in DENSE | {MULTILEVEL}:
        dtypes = {f["label"].split()[1] for f in facts if f["kernel"] == kernel}
        assert dtypes == {"x=fp32", "x=fp16", "x=bf16", "x=fp64"}, kernel
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
    """Per tile body (dense: the loop's and the masked tail's; multi-level: 2 or 3, see tile_bodies): integer gamma
    uses exactly one exp and one log (log1p) per element and no pow; fractional gamma adds one exp2 and one log2.
    The same for every loss kind (QFL's |y - sigma| is a select, not a third absf), except FL*'s gradient, which
    needs no log (sigmoid(-z) only)."""
    for f in elementwise(facts):
        b = f["tile_bodies"]
        expected = {"absf": b, "exp": b, "log": b}
        if f["constexprs"]["INT_GAMMA"] == "False":
            expected.update(exp2=b, log2=b)
        star_backward = loss_kind(f) == 1 and (f["kernel"] == "sigmoid_focal_bwd_kernel" or
                                               f["constexprs"].get("MODE") in ("2", "3"))
        if star_backward:
            del expected["log"]
        assert f["ttir_math"] == expected, f["label"]


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
