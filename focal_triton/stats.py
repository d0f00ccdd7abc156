"""Loss statistics of a class-index focal loss, from the per-anchor losses its forward pass writes on request.

Per anchor m, L_m = sum over classes of its (weighted) focal loss, before the normalizer; ignored anchors have
L_m = 0. An anchor is positive when 0 <= label < C, ignored when label == ignore_index, negative otherwise (the
background, or an unknown label when labels are not checked). `LossStatistics` holds, as device tensors (nothing
is read on the host until you ask):

    per level l:   num_positive, num_negative, num_ignored (int64), loss_positive, loss_negative (sums of L_m)
    histograms:    fixed bins of L_m (BIN_EDGES: 0, then 10**-12 ... 10**4 in tenths of a decade, then inf):
                   count_positive / count_negative (anchors per bin) and loss_positive_bins / loss_negative_bins
                   (their summed L_m per bin). NaN and +inf losses are counted per level but not binned;
                   losses below 0 (negative weights) are not binned either.

`plot_loss_distribution` draws the paper's Figure 4 from them (Lin et al. 2017): sort the anchors by loss, normalize
the loss to sum to 1, and plot the cumulative loss against the fraction of anchors, for positives and negatives and
for several gamma. Within a bin the anchors have the same loss up to a factor 10**0.1, so the curve is drawn through
the bin boundaries (exact there) and is linear in between.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from .losses import level_columns

_DECADES = (-12, 4)
_STEPS_PER_DECADE = 10


def bin_edges(device=None, dtype=torch.float64) -> torch.Tensor:
    """The fixed histogram edges: 0, 10**-12, 10**-11.9, ..., 10**4, inf (bin i is [edge i, edge i + 1))."""
    lo, hi = _DECADES
    powers = torch.arange(lo * _STEPS_PER_DECADE, hi * _STEPS_PER_DECADE + 1, dtype=dtype, device=device)
    inner = torch.pow(torch.tensor(10.0, dtype=dtype, device=device), powers / _STEPS_PER_DECADE)
    return torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), float("inf"))])


@dataclass
class LossStatistics:
    """Statistics of one loss evaluation (see the module docstring). Tensors live on the loss's device."""

    num_positive: torch.Tensor   # (L,) int64
    num_negative: torch.Tensor   # (L,) int64
    num_ignored: torch.Tensor    # (L,) int64
    loss_positive: torch.Tensor  # (L,) sum of the positives' L_m, float32 (float64 for float64 logits)
    loss_negative: torch.Tensor  # (L,)
    bin_edges: torch.Tensor      # (B + 1,) float64
    count_positive: torch.Tensor  # (B,) int64
    count_negative: torch.Tensor  # (B,) int64
    loss_positive_bins: torch.Tensor  # (B,) float64
    loss_negative_bins: torch.Tensor  # (B,) float64
    gamma: float
    alpha: Optional[float]
    loss: str = "fl"             # the loss kind: "fl", "fl_star", "qfl" or "vfl" (gamma, alpha: its options)

    def summary(self) -> str:
        """A per-level table (reads the statistics to the host)."""
        rows = [f"{'level':>5} {'positives':>10} {'negatives':>10} {'ignored':>8} {'loss(pos)':>12} {'loss(neg)':>12}"]
        for i, vals in enumerate(zip(self.num_positive.tolist(), self.num_negative.tolist(),
                                     self.num_ignored.tolist(), self.loss_positive.tolist(),
                                     self.loss_negative.tolist())):
            rows.append(f"{i:>5} {vals[0]:>10} {vals[1]:>10} {vals[2]:>8} {vals[3]:>12.5g} {vals[4]:>12.5g}")
        return "\n".join(rows)

    def cumulative(self, positives: bool):
        """(fraction of anchors, cumulative normalized loss) at the bin edges, both starting at 0 and ending at 1
        (float64, on the host): the curve of the paper's Figure 4."""
        counts = (self.count_positive if positives else self.count_negative).double().cpu()
        losses = (self.loss_positive_bins if positives else self.loss_negative_bins).double().cpu()
        zero = torch.zeros(1, dtype=torch.float64)
        x = torch.cat([zero, counts.cumsum(0)]) / counts.sum().clamp(min=1)
        y = torch.cat([zero, losses.cumsum(0)]) / losses.sum().clamp(min=torch.finfo(torch.float64).tiny)
        return x, y


def _binned(values: torch.Tensor, select: torch.Tensor, edges: torch.Tensor):
    """(count per bin, summed value per bin) of values[select] in float64 with no host read: unselected and NaN
    values become +inf, which sorts last and is below no edge (the last edge is inf itself)."""
    v = values.double()
    v = torch.where(select & ~torch.isnan(v), v, v.new_full((), float("inf"))).flatten()
    v, _ = torch.sort(v)
    below = torch.searchsorted(v, edges.to(v.device), side="left")  # the number of values < edge j
    cum = torch.cat([v.new_zeros(1), torch.where(torch.isinf(v), 0.0, v).cumsum(0)])
    return below.diff(), cum[below].diff()


@torch.no_grad()
def loss_statistics(per_anchor: torch.Tensor, labels: torch.Tensor, levels: Sequence[torch.Tensor],
                    num_anchors: int, num_classes: int, ignore_index: Optional[int], gamma: float, alpha,
                    loss: str = "fl") -> LossStatistics:
    """Statistics from the (N, M) per-anchor losses of a forward pass over `levels` and its (N, M) labels (level
    l's anchors: `losses.level_columns`)."""
    per_anchor = per_anchor.detach()
    positive = (labels >= 0) & (labels < num_classes)
    ignored = labels == ignore_index if ignore_index is not None else torch.zeros_like(positive)
    negative = ~positive & ~ignored
    counts = {"pos": [], "neg": [], "ign": [], "lpos": [], "lneg": []}
    for sl in level_columns(levels, num_anchors):
        values, pos, neg = per_anchor[:, sl], positive[:, sl], negative[:, sl]
        counts["pos"].append(pos.sum())
        counts["neg"].append(neg.sum())
        counts["ign"].append(ignored[:, sl].sum())
        counts["lpos"].append(torch.where(pos, values, 0.0).sum())
        counts["lneg"].append(torch.where(neg, values, 0.0).sum())
    edges = bin_edges(per_anchor.device)
    count_pos, loss_pos = _binned(per_anchor, positive, edges)
    count_neg, loss_neg = _binned(per_anchor, negative, edges)
    return LossStatistics(
        torch.stack(counts["pos"]), torch.stack(counts["neg"]), torch.stack(counts["ign"]),
        torch.stack(counts["lpos"]), torch.stack(counts["lneg"]), edges, count_pos, count_neg, loss_pos, loss_neg,
        float(gamma), None if isinstance(alpha, torch.Tensor) else float(alpha), loss)


def plot_loss_distribution(stats_by_gamma: Dict[float, LossStatistics], path=None, title: str = None):
    """The paper's Figure 4 for your model: cumulative normalized loss of positives (left) and negatives (right)
    against the fraction of anchors sorted by loss, one curve per gamma. Saves to `path` (PNG) when given and
    returns the matplotlib figure. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, positives, name in ((axes[0], True, "foreground"), (axes[1], False, "background")):
        for gamma, st in sorted(stats_by_gamma.items()):
            x, y = st.cumulative(positives)
            ax.plot(x.numpy(), y.numpy(), label=f"γ = {gamma:g}")
        ax.set_xlabel(f"fraction of {name} anchors (sorted by loss)")
        ax.set_ylabel("cumulative normalized loss")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title("positive anchors" if positives else "negative anchors")
        ax.legend(loc="upper left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
