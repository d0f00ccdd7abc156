"""Memory-layout helpers: the kernels walk a flat range in storage order, so all operands must share dense strides."""
import torch


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill exactly numel consecutive storage slots (any dim order, no gaps, no overlap)."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every dim of size > 1 (size-1 dims may carry any stride)."""
    return a.shape == b.shape and all(
        sa == sb for s, sa, sb in zip(a.shape, a.stride(), b.stride()) if s != 1
    )


def like(reference: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t itself when it already has reference's dense layout, else one copy of t in that layout."""
    if same_layout(reference, t):
        return t
    return torch.empty_like(reference, dtype=t.dtype).copy_(t)


def dense_operands(inputs: torch.Tensor, targets: torch.Tensor):
    """(x, t) holding the same values as (inputs, targets), dense and with identical strides.

    Dense inputs are used in place whatever their dim order (NCHW, channels_last, a permuted view); a non-dense
    one (a strided slice, an expanded tensor) is copied once into the contiguous layout. targets follow x's layout,
    copied only when their strides differ.
    """
    x = inputs if is_dense(inputs) else inputs.contiguous()
    return x, like(x, targets)


def is_broadcast_scalar(t: torch.Tensor) -> bool:
    """True when every element of t aliases one storage slot (e.g. the ones that loss.sum() sends backward)."""
    return t.numel() > 0 and all(st == 0 for s, st in zip(t.shape, t.stride()) if s != 1)


def flat(t: torch.Tensor) -> torch.Tensor:
    """1-D view of a dense tensor in storage order."""
    return t.as_strided((t.numel(),), (1,))


def anchor_view(level: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """(N, A*C, H, W) -> (N, H*W, A, C) view of the same storage (NCHW or channels_last)."""
    return level.unflatten(1, (num_anchors, level.shape[1] // num_anchors)).flatten(3).permute(0, 3, 1, 2)
