"""Helpers shared by the tests: inputs of a detector head's levels and labels, the check of a multi-level call
against the float64 reference, and a watcher of logit-sized copies. (The float64 references themselves are
reference*.py, written independently of focal_triton.)"""
import json
import subprocess

import pytest
import torch
from conftest import DEVICE
from reference import TOL, assert_close
from reference_multilevel import multilevel_value_and_grads
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import focal_triton

N, A, C = 2, 3, 5
# RetinaNet-like pyramid scaled way down, with an odd-sized level last: 80 positions, 240 anchors, 1200 logits/image.
HWS = [(8, 6), (4, 3), (2, 2), (1, 1), (5, 3)]
# The interpreter's cost is ~0.1 s per (level, image) program: most tests run on two odd-sized levels.
SMALL = [(5, 3), (1, 2)]
M = sum(h * w for h, w in SMALL) * A
M_FULL = sum(h * w for h, w in HWS) * A
CL = torch.channels_last

CONVENTIONS = {
    "torchvision": dict(background=-1, ignore_index=-2),
    "detectron2": dict(background=C, ignore_index=-1),
    "mmdet": dict(background=C, ignore_index=None),
    "apex": dict(background=-1, ignore_index=-2),
}
# The result of "sum" is float32 for 16/32-bit logits: a float32 sum of ~1e3 terms computed in float32.
SUM_TOL = dict(rtol=1e-5, atol=1e-7)
# Per-class alpha, exactly representable in float32 (so float64 math sees the same values whatever it converts).
ALPHA_C = [0.125, 0.25, 0.5, 0.75, 0.875]


def make_levels(hws=SMALL, dtype=torch.float32, layout="nchw", n=N, a=A, c=C, seed=0, scale=3.0):
    """Per-level logits (n, a*c, h, w): normal values with ~1/7 of them saturated at +-25, in the given layout
    ("nchw", "cl" or "mix": alternate, starting with channels_last)."""
    g = torch.Generator().manual_seed(seed)
    levels = []
    for i, (h, w) in enumerate(hws):
        x = torch.randn((n, a * c, h, w), generator=g, dtype=torch.float64) * scale
        flat = x.view(-1)
        flat[3::14] = 25.0
        flat[10::14] = -25.0
        x = x.to(dtype).to(DEVICE)
        if layout == "cl" or (layout == "mix" and i % 2 == 0):
            x = x.contiguous(memory_format=CL)
        levels.append(x)
    return levels


def make_categories(shape, seed=1, p_pos=0.25, p_ign=0.15, c=C):
    """(kind, cls): kind 0 = background, 1 = positive, 2 = ignored; cls the positive's class."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g)
    kind = torch.where(u < p_pos, 1, torch.where(u < p_pos + p_ign, 2, 0))
    cls = torch.randint(0, c, shape, generator=g)
    return kind.to(DEVICE), cls.to(DEVICE)


def encode(kind, cls, background=-1, ignore_index=-2, dtype=torch.int64):
    """Labels in a convention: positives their class, background `background`, ignored `ignore_index`
    (ignored anchors become background when the convention has no ignore value)."""
    ign = background if ignore_index is None else ignore_index
    labels = torch.where(kind == 1, cls, torch.where(kind == 2, torch.full_like(cls, ign),
                                                     torch.full_like(cls, background)))
    return labels.to(dtype)


def make_labels(n=N, hws=SMALL, seed=1, dtype=torch.int64, convention="torchvision", **kw):
    kind, cls = make_categories((n, sum(h * w for h, w in hws) * A), seed, **kw)
    return encode(kind, cls, **CONVENTIONS[convention], dtype=dtype)


def leaves_of(levels):
    return [x.detach().clone().requires_grad_(True) for x in levels]  # clone keeps the memory format


def is_layout(t, like):
    if like.is_contiguous():
        return t.is_contiguous()
    return t.is_contiguous(memory_format=CL)


def check_multilevel(levels, labels, grad_outputs=None, a=A, **kw):
    """Value and gradient of multilevel_focal_loss vs the reference; returns (loss, grads)."""
    reduction = kw.get("reduction", "sum")
    dtype = levels[0].dtype
    leaves = leaves_of(levels)
    out = focal_triton.multilevel_focal_loss(leaves, labels, a, **kw)
    ref, _ = multilevel_value_and_grads(levels, labels, a, **kw)
    if reduction == "none":
        assert isinstance(out, (list, tuple)) and len(out) == len(levels)
        if grad_outputs is None:
            g = torch.Generator().manual_seed(7)
            grad_outputs = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
                            .contiguous(memory_format=CL if not x.is_contiguous() else torch.contiguous_format)
                            for x in levels]
        for i, (o, r, x) in enumerate(zip(out, ref, levels)):
            assert o.shape == x.shape and o.dtype == dtype and o.device == x.device, f"level {i}"
            assert is_layout(o, x), f"level {i}: 'none' loss not in the level's memory format, strides {o.stride()}"
            assert_close(o, r, dtype, what=f"loss level {i}")
        outs = list(out)
    else:
        assert out.shape == () and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        tol = TOL[torch.float64] if dtype == torch.float64 else SUM_TOL
        torch.testing.assert_close(out.double(), ref, **tol)
        if grad_outputs is None:
            grad_outputs = [torch.tensor(0.75, dtype=out.dtype, device=DEVICE)]
        outs = [out]
    _, ref_grads = multilevel_value_and_grads(levels, labels, a, grad_outputs=grad_outputs, **kw)
    grads = torch.autograd.grad(outs, leaves, grad_outputs)
    for i, (gr, r, x) in enumerate(zip(grads, ref_grads, levels)):
        assert gr.shape == x.shape and gr.dtype == dtype, f"level {i}"
        assert is_layout(gr, x), f"level {i}: gradient not in the level's memory format, strides {gr.stride()}"
        assert_close(gr, r, dtype, what=f"grad level {i}")
    return out, grads


class LogitCopies(TorchDispatchMode):
    """Records the ops called outside focal_triton's own ops that produce a tensor as large as the logits (an upcast
    copy or a concatenation of the levels would be one). The ops inside a registered op are not seen: a mode is off
    while it handles an op."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (list, tuple)) else [out]
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0]
                  if isinstance(t, torch.Tensor)}
        if not str(func).startswith("focal_triton.") and any(  # views of an input (detach, alias) are no copy
                isinstance(o, torch.Tensor) and o.numel() >= self.numel and o.untyped_storage().data_ptr() not in inputs
                for o in outs):
            self.seen.append(str(func))
        return out


def child_result(proc, out, timeout_s: int, what: str) -> dict:
    """The JSON result a child process of the suite (the compile report, the stand-in check) writes to `out`:
    waits for it at most timeout_s, and fails with the end of its log when it ran too long or wrote nothing."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the {what} ran past {timeout_s // 60} minutes")
    if not out.exists():
        pytest.fail(f"the {what} did not run:\n{out.with_suffix('.log').read_text()[-6000:]}")
    return json.loads(out.read_text())
