"""The kernel specializations that real calls make Triton's JIT compile, found (and compiled) without a GPU.

A stand-in active driver, whose `get_current_target()` is `GPUTarget("cuda", arch, 32)`, makes every launch of the
library compile exactly what a CUDA launch would: the public functions run on CPU tensors, the launchers take the
compiled path's configs and grids (`kernels.launch.STANDIN`), and each `kernel[grid](...)` becomes
`kernel.warmup(...)`: the JIT specializes on the real arguments (dtypes, 16-byte alignment of the tensors, integers
equal to 1 or divisible by 16 where not `do_not_specialize`d, i64 above 2**31 - 1) and compiles to a cubin, or, with
`compile=False`, only records what it would compile. Nothing runs, nothing is computed: the outputs are whatever
`torch.empty` holds. Needs a process where TRITON_INTERPRET is not set (interpreted kernels cannot be compiled).

    with standin(90) as rec:             # sm_90; rec.specializations: one record per distinct compile
        focal_triton.sigmoid_focal_loss(x, t, reduction="mean")

    python -m focal_triton.jit_check --cases tests/call_classes.py --json out.json   # every case, sm_80 and sm_90

Used by tests/test_jit_check.py (the suite's check that every call class of the suite compiles for both
architectures) and by bench/gpu_check.py (its dry run lists the specializations of its smoke set; on the GPU box its
first step compiles them in parallel into Triton's cache).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import re
import sys
import time
import traceback

import torch

ARCHS = (80, 90)
# An H100 SXM's SMs, for the persistent grids of the stand-in GPU (only the number of programs depends on it).
STANDIN_SM = dict(count=132, regs_per_sm=65536, threads_per_sm=2048, shared_per_sm=233472)


class StandInDriver:
    """The parts of Triton's active driver that `JITFunction.warmup` uses, for a GPU that is not there. The current
    device is the architecture number, so each architecture keeps its own JIT cache."""

    def __init__(self, arch: int):
        from triton.backends.nvidia.driver import CudaLauncher

        self.arch = arch
        self.launcher_cls = CudaLauncher

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True


class Recorder:
    """The distinct specializations met under a stand-in, as plain dicts (kernel, arch, signature, constexprs,
    aligned pointers, num_warps, num_stages), in order of first use, with the call that met each first."""

    def __init__(self):
        self.specializations = []
        self._seen = set()
        self.current_call = ""

    def hook(self, arch, compile_: bool):
        def on_compile(key, repr, fn, compile, is_manual_warmup, already_compiled):
            names = fn.jit_function.arg_names
            constexprs = {names[path[0]]: _plain(v) for path, v in compile["constants"].items() if len(path) == 1}
            attrs = compile["configs"][0] if compile["configs"] else {}
            aligned = sorted(names[path[0]] for path, a in attrs.items()
                             if len(path) == 1 and any(x[0] == "tt.divisibility" and x[1] == 16 for x in a))
            declared = {p.name for p in fn.jit_function.params if p.is_constexpr}
            rec = dict(kernel=fn.name, arch=arch, signature={k: v for k, v in compile["signature"].items()},
                       constexprs=constexprs, aligned=aligned, num_warps=compile["num_warps"],
                       num_stages=compile["num_stages"],
                       # arguments the JIT turned into constants (an integer equal to 1 not do_not_specialize'd)
                       specialized=sorted(k for k, v in compile["signature"].items()
                                          if v == "constexpr" and k not in declared))
            ident = json.dumps(rec, sort_keys=True)
            if ident not in self._seen:
                self._seen.add(ident)
                self.specializations.append(dict(rec, first_call=self.current_call))
            return not compile_  # True: skip the compile

        return on_compile


def _plain(v):
    """A constexpr value as JSON-able text or number (tl.float32 -> "fp32")."""
    if isinstance(v, (bool, int, float)) or v is None:
        return v
    return str(v)


@contextlib.contextmanager
def standin(arch: int, compile: bool = True, recorder: Recorder = None):
    """Within: launches of focal_triton's kernels on CPU tensors are compiled for sm_<arch> (or, compile=False,
    only recorded), never run. Yields the Recorder."""
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from .ops import backend as dispatch
    from .kernels import launch

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rec = recorder or Recorder()
    saved = (driver._active, JITFunction.run, triton.knobs.runtime.jit_cache_hook, dispatch.interpreter_enabled,
             launch.STANDIN.sm)
    real_run = JITFunction.run

    def warmup_only(self, *args, grid, warmup, **kwargs):
        return real_run(self, *args, grid=grid, warmup=True, **kwargs)

    driver.set_active(StandInDriver(arch))
    JITFunction.run = warmup_only
    triton.knobs.runtime.jit_cache_hook = rec.hook(arch, compile)
    dispatch.interpreter_enabled = lambda: True  # the kernels "run here": CPU tensors take the Triton path
    launch.STANDIN.sm = launch.SMResources(**STANDIN_SM)
    try:
        yield rec
    finally:
        (driver._active, JITFunction.run, triton.knobs.runtime.jit_cache_hook, dispatch.interpreter_enabled,
         launch.STANDIN.sm) = saved


def load_cases(path: str):
    """The CALLS of a call-class module (tests/call_classes.py): objects with .name and .run(device)."""
    spec = importlib.util.spec_from_file_location("call_classes", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec.loader.exec_module(module)
    return module


def run_cases(calls, archs=ARCHS, compile=True, log=None):
    """Run every call under a stand-in for each arch. Returns {"specializations": [...], "errors": [...],
    "seconds": {arch: s}}: errors name the call, the arch and the exception (a compile error of the JIT)."""
    rec = Recorder()
    errors, seconds = [], {}
    for arch in archs:
        start = time.perf_counter()
        with standin(arch, compile, rec):
            for call in calls:
                rec.current_call = call.name
                try:
                    call.run(torch.device("cpu"))
                except Exception as e:  # noqa: BLE001 - reported per call, so one failure does not hide the others
                    msg = "".join(traceback.format_exception_only(type(e), e)).strip()
                    errors.append(dict(call=call.name, arch=arch, error=msg[-4000:]))
                    if log:
                        print(f"sm_{arch} {call.name}: ERROR {msg.splitlines()[-1][:300]}", file=log, flush=True)
                else:
                    if log:
                        print(f"sm_{arch} {call.name}: ok", file=log, flush=True)
        seconds[arch] = round(time.perf_counter() - start, 2)
    return dict(specializations=rec.specializations, errors=errors, seconds=seconds, calls=[c.name for c in calls])


def num_stages_ptx(kernel_call, arch=90, stages=(1, 2, None)):
    """PTX of one launch (`kernel_call(options)` launches it with those extra options) compiled for sm_<arch> with
    each num_stages (None: Triton's default), with the kernel's name and the debug information stripped; for the
    check that num_stages changes nothing in these kernels."""
    out = {}
    with standin(arch, True):
        for s in stages:
            compiled = kernel_call({} if s is None else {"num_stages": s})
            out[str(s)] = re.sub(r"\b\w+_kernel\w*", "K", _code(compiled.asm["ptx"]))
    return out


def _code(ptx: str) -> str:
    """The PTX without its debug information (file paths and line numbers: a kernel compiled from another checkout
    of the same source comes from Triton's cache with that checkout's paths)."""
    ptx = ptx.split(".section\t.debug")[0].split(".section .debug")[0]
    return "\n".join(line for line in ptx.splitlines() if not line.lstrip().startswith((".file", ".loc")))


def aot_records():
    """The ahead-of-time report's enumeration (focal_triton.aot.specializations) as records like Recorder's."""
    from . import aot

    return [dict(kernel=spec.kernel.__name__, signature=dict(spec.signature),
                 constexprs={k: _plain(v) for k, v in spec.constexprs.items()}) for spec in aot.specializations()]


def _group(param: str) -> str:
    """The per-level parameters of a kernel as one group: x0..x7 -> x, g0_..g7_ -> g_."""
    return re.sub(r"\d+(_?)$", r"\1", param)


def _pointers(rec):
    return {_group(k): v for k, v in rec["signature"].items() if v.startswith("*")}


def families(records, reference=None):
    """The specialization families of `records`: for each kernel, with `primary` the dtype of its first pointer
    parameter (the logits, or the partial sums of a final sum):
        (kernel, primary)                                  every logits dtype
        (kernel, primary, NAME=value)                      every compile-time switch, per logits dtype
        (kernel, primary, param:dtype)                     every pointer dtype that does not follow from the
                                                           logits dtype in `reference` (targets, losses under
                                                           autocast, labels, normalizers), per logits dtype
    `reference` (default: records) decides which pointer parameters vary on their own."""
    reference = records if reference is None else reference
    follows = {}  # (kernel, param) -> {primary: set of dtypes} over the reference
    for rec in reference:
        ptrs = _pointers(rec)
        primary = next(iter(ptrs.values()))
        for param, dtype in ptrs.items():
            follows.setdefault((rec["kernel"], param), {}).setdefault(primary, set()).add(dtype)
    independent = {key for key, by_primary in follows.items() if any(len(d) > 1 for d in by_primary.values())}
    out = set()
    for rec in records:
        kernel = rec["kernel"]
        ptrs = _pointers(rec)
        primary = next(iter(ptrs.values()))
        out.add((kernel, primary))
        out.update((kernel, primary, f"{k}={v}") for k, v in rec["constexprs"].items()
                   if rec["signature"].get(k) == "constexpr")
        out.update((kernel, primary, f"{p}:{d}") for p, d in ptrs.items() if (kernel, p) in independent)
    return out


def smoke_coverage(smoke_records):
    """(families of the ahead-of-time enumeration, those the smoke records miss)."""
    ref = aot_records()
    want = families(ref)
    return want, sorted(want - families(smoke_records, ref))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", required=True, help="a module defining CALLS (e.g. tests/call_classes.py)")
    parser.add_argument("--set", default="ALL", help="the list of that module to run (default ALL)")
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)))
    parser.add_argument("--no-compile", action="store_true", help="record the specializations, compile nothing")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    module = load_cases(args.cases)
    calls = getattr(module, args.set)
    result = run_cases(calls, [int(a) for a in args.archs.split(",")], not args.no_compile, log=sys.stdout)
    if hasattr(module, "num_stages_cases") and not args.no_compile:
        result["num_stages_ptx_identical"] = {
            name: len(set(num_stages_ptx(fn).values())) == 1 for name, fn in module.num_stages_cases()}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{len(result['specializations'])} specializations, {len(result['errors'])} errors, "
          f"seconds per arch {result['seconds']}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
