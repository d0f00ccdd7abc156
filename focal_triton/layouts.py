"""Memory layouts of the class-index op's segments: how the kernel walks a strided (N, K, H, W) view, and the
strides of the losses and gradients it writes. Plain torch (shared by the op layer, the kernels' host code and
the CPU path; imports no Triton)."""
from typing import NamedTuple

import torch

LAYOUT_NCHW, LAYOUT_CL, LAYOUT_GENERIC = 0, 1, 2


class SegmentLayout(NamedTuple):
    """How the kernel walks one segment, a (N, K, H, W) view with strides (sn, sk, sh, sw): element (n, k, p) of
    position p = h W + w at n sn + k sk + p sp where the positions collapse to one axis (sh = W sw, or H or W is 1;
    sp the stride of that axis), which is contiguous (LAYOUT_NCHW: sp = 1, rows along the positions) or whose
    channels are (LAYOUT_CL: sk = 1, rows along the channels, the wide loads); otherwise LAYOUT_GENERIC: element at
    n sn + k sk + (p // W) sh + (p % W) sw, a masked gather."""

    kind: int
    sn: int
    sk: int
    sp: int
    sh: int
    wd: int


def segment_layout(x: torch.Tensor) -> SegmentLayout:
    n, k, h, w = x.shape
    sn, sk, sh, sw = x.stride()
    collapsed = h == 1 or w == 1 or sh == w * sw
    sp = sw if w > 1 else sh
    if collapsed and (sp == 1 or h * w <= 1):
        kind = LAYOUT_NCHW
    elif collapsed and (sk == 1 or k == 1):
        kind = LAYOUT_CL
    else:
        kind = LAYOUT_GENERIC
    return SegmentLayout(kind, sn, sk, sp, sh, max(w, 1))


def out_image_stride(x: torch.Tensor) -> int:
    """The image stride of a segment's loss / gradient, whose other strides are the logits' own (out_strides)."""
    return out_strides(x)[0]


def out_strides(x: torch.Tensor) -> tuple:
    """Strides of a segment's elementwise loss or gradient: the logits' own where they are dense (NCHW,
    channels_last, a permuted tensor); for a view with gaps (a slice of a stacked (B, L, Q, C) tensor, a channel
    slice) the logits' strides within an image, images packed one after the other (the gaps of one image kept:
    at most as many elements again, `reads_in_place`)."""
    if is_dense(x):
        return tuple(x.stride())
    return (_image_span(x),) + tuple(x.stride()[1:])


def reads_in_place(x: torch.Tensor) -> bool:
    """Whether the kernel reads the (non-overlapping) view x without a copy: dense, or one image's span of storage
    at most twice its elements (otherwise the op reads a contiguous copy)."""
    inner = x.numel() // x.shape[0] if x.shape[0] else 0
    return is_dense(x) or _image_span(x) <= 2 * max(inner, 1)


def _image_span(x: torch.Tensor) -> int:
    if any(d == 0 for d in x.shape[1:]):
        return 0
    return 1 + sum((d - 1) * st for d, st in zip(x.shape[1:], x.stride()[1:]))


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill exactly numel consecutive storage slots (any dim order, no gaps, no overlap)."""
    expected = 1
    for size, stride in sorted(((d, st) for d, st in zip(t.shape, t.stride()) if d != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def empty_out(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialized loss / gradient for segment x, with out_strides(x)."""
    return torch.empty_strided(x.shape, out_strides(x), dtype=dtype or x.dtype, device=x.device)


def overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of t may share a storage slot (an expanded tensor: stride 0 along a dim of size > 1):
    False when, dims sorted by stride, each stride passes the span of the dims before it (sufficient)."""
    span = 0
    for size, stride in sorted(((d, st) for d, st in zip(t.shape, t.stride()) if d > 1), key=lambda p: p[1]):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def segment_view(t: torch.Tensor) -> torch.Tensor:
    """A segment's logits as the kernel's (N, K, H, W) view: (N, Q, C) -> (N, C, Q, 1); 4-D as it is."""
    return t.permute(0, 2, 1).unsqueeze(-1) if t.dim() == 3 else t


def base_box(view: torch.Tensor, base: torch.Tensor):
    """The box of `base`'s indices that `view` holds, per base dim [lo, hi), when view is a slice / select /
    permute (unit steps) of the dense base; None otherwise."""
    offset = view.storage_offset() - base.storage_offset()
    dims = sorted((d for d in range(base.dim()) if base.shape[d] > 1), key=lambda d: -base.stride(d))
    lo = [0] * base.dim()
    for d in dims:
        lo[d], offset = divmod(offset, base.stride(d))
    if offset:
        return None
    hi = [v + 1 for v in lo]
    used = set()
    for size, stride in zip(view.shape, view.stride()):
        if size == 1:
            continue
        match = [d for d in dims if base.stride(d) == stride and d not in used]
        if not match or lo[match[0]] + size > base.shape[match[0]]:
            return None
        used.add(match[0])
        hi[match[0]] = lo[match[0]] + size
    return lo, hi


def disjoint(a, b) -> bool:
    """Whether two boxes of base_box share no index."""
    return any(ha <= lb or hb <= la for la, ha, lb, hb in zip(a[0], a[1], b[0], b[1]))
