"""Ahead-of-time compilation of every kernel specialization for sm_80 and sm_90, without a GPU.

Runs `python -m focal_triton.aot` in a child process without TRITON_INTERPRET (interpreted kernels cannot be
compiled) and checks the facts of each compiled kernel: it compiles, spills nothing, moves its tiles with 128-bit
global loads and stores, indexes with 64 bits exactly where it must, and uses the transcendentals it promises.
"""
import json
import os
import subprocess
import sys

import pytest

ARCHS = {"sm_80", "sm_90"}


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "facts.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "focal_triton.aot", "--json", str(out), "--workers", "2"],
                       capture_output=True, text=True, env=env, timeout=1200)
    if not out.exists():
        pytest.fail(f"the compile report did not run:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def elementwise(facts):
    return [f for f in facts if f["kernel"] != "sum_partials_kernel"]


def test_every_specialization_compiles_for_both_archs(facts):
    errors = [f"{f['arch']} {f['label']}: {f['error']}" for f in facts if "error" in f]
    assert not errors, "\n".join(errors[:20])
    by_label = {}
    for f in facts:
        by_label.setdefault(f["label"], set()).add(f["arch"])
    assert all(archs == ARCHS for archs in by_label.values())
    kernels = {f["kernel"] for f in facts}
    assert kernels == {"sigmoid_focal_fwd_kernel", "sigmoid_focal_bwd_kernel", "sum_partials_kernel"}
    dtypes = {f["label"].split()[1] for f in facts if f["kernel"] == "sigmoid_focal_fwd_kernel"}
    assert dtypes == {"x=fp32", "x=fp16", "x=bf16", "x=fp64"}


def test_no_spills(facts):
    """No local-memory traffic (STL/LDL in SASS), no stack frame, no local memory. (cuobjdump's LOCAL alone misses
    spills: a 4-byte ptxas spill showed as STACK 8, LOCAL 0 in an earlier version of these kernels.)"""
    bad = [f"{f['arch']} {f['label']}: {f['spill_instructions']} STL/LDL, stack {f['stack']} B, local {f['local']} B"
           for f in facts if f["spill_instructions"] or f["stack"] or f["local"]]
    assert not bad, "\n".join(bad)


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
    assert all(f["vector_load_bytes"] >= 16 for f in elementwise(facts))


def test_64_bit_indexing_where_needed(facts):
    """The INT64 specializations (chosen above 2**31 - BLOCK elements) run the tile loop and its offsets in i64;
    the others in i32."""
    for f in elementwise(facts):
        expected = ["i64"] if f["constexprs"]["INT64"] == "True" else ["i32"]
        assert f["tile_loop_index"] == expected, f["label"]
    assert any(f["constexprs"]["INT64"] == "True" and "n=i64" in f["label"] for f in elementwise(facts))


def test_transcendentals_per_element(facts):
    """Per tile body (the loop's and the masked tail's, so x2): integer gamma uses exactly one exp and one log
    (log1p) per element and no pow; fractional gamma adds one exp2 and one log2 (the pow)."""
    for f in elementwise(facts):
        expected = {"absf": 2, "exp": 2, "log": 2}
        if f["constexprs"]["INT_GAMMA"] == "False":
            expected.update(exp2=2, log2=2)
        assert f["ttir_math"] == expected, f["label"]
