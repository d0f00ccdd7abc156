"""The CPU path of the focal matching cost (pure torch): kernels/matching.py's contract.

    cost[q, g] = alpha (1 - p)**gamma (-log p) - (1 - alpha) p**gamma (-log(1 - p)),   p = sigmoid(x[q, labels[g]])

with -log p = -logsigmoid(x) and -log(1 - p) = -logsigmoid(-x) (no log of a rounded probability) and the powers
sigmoid(-+x)**gamma, in the compute dtype (float32; float64 for float64 logits), over chunks of about CHUNK
outputs: each chunk gathers its (rows, G) logits (never the (N, C) probabilities). A term whose coefficient is 0
(alpha = 0 or 1) is left out, which gives the formula's limit at x = +-inf instead of 0 * inf; a label outside
[0, C) gives a NaN column.
"""
import torch
import torch.nn.functional as F

from ..losses import compute_dtype

# Outputs per chunk: its ~6 intermediates of 256 KiB (float32) stay in L2.
CHUNK = 1 << 16


@torch.no_grad()
def forward(x: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """(N, G) cost of logits x (N, C) and labels (G,) (N, G > 0)."""
    n, c = x.shape
    g = labels.shape[0]
    cdt = compute_dtype(x.dtype)
    out = torch.empty((n, g), dtype=cdt, device=x.device)
    valid = (labels >= 0) & (labels < c)
    columns = torch.where(valid, labels, torch.zeros_like(labels))
    rows_per_chunk = max(1, CHUNK // g)
    for start in range(0, n, rows_per_chunk):
        xs = x[start:start + rows_per_chunk].index_select(1, columns).to(cdt)
        cost = torch.zeros_like(xs)
        if alpha != 0.0:  # alpha (1 - p)**gamma (-log p)
            pos = F.logsigmoid(xs).neg_()
            if gamma != 0.0:
                pos.mul_(torch.sigmoid(-xs).pow_(gamma))
            cost.add_(pos, alpha=alpha)
        if alpha != 1.0:  # (1 - alpha) p**gamma (-log(1 - p))
            neg = F.logsigmoid(-xs).neg_()
            if gamma != 0.0:
                neg.mul_(torch.sigmoid(xs).pow_(gamma))
            cost.sub_(neg, alpha=1.0 - alpha)
        out[start:start + rows_per_chunk] = cost
    return out.masked_fill_(~valid, float("nan"))  # no host sync: a CUDA tensor may take this path
