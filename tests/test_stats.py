"""Loss statistics (`return_stats=True`) against per-anchor losses of the float64 reference, on both backends:
per-level counts and sums, the fixed-bin histograms, the cumulative curve of Figure 4, and the plotting helper."""
import matplotlib.image
import numpy
import pytest
import torch
from conftest import DEVICE
from reference_multilevel import flatten_levels, focal_loss_ref
from helpers import A, C, N, SMALL, encode, make_categories, make_levels

import focal_triton
from focal_triton.stats import bin_edges, plot_loss_distribution

M = sum(h * w for h, w in SMALL) * A


def _reference(levels, labels, **kw):
    """(N, M) float64 per-anchor losses: the reference's per-element loss summed over classes."""
    return focal_loss_ref(flatten_levels(levels, A), labels, reduction="none", **kw).sum(-1)


def _expected(per_anchor, labels, ignore_index=-2):
    pos = (labels >= 0) & (labels < C)
    ign = labels == ignore_index
    neg = ~pos & ~ign
    counts, sums, start = [], [], 0
    for h, w in SMALL:
        sl = slice(start, start + h * w * A)
        counts.append([int(pos[:, sl].sum()), int(neg[:, sl].sum()), int(ign[:, sl].sum())])
        sums.append([float(per_anchor[:, sl][pos[:, sl]].sum()), float(per_anchor[:, sl][neg[:, sl]].sum())])
        start += h * w * A
    return pos, neg, counts, sums


def _histogram(values):
    """Count and sum per bin, one value at a time (bin i holds edge_i <= v < edge_i+1)."""
    edges = bin_edges().tolist()
    count, total = [0] * (len(edges) - 1), [0.0] * (len(edges) - 1)
    for v in values.tolist():
        i = max(j for j in range(len(edges) - 1) if edges[j] <= v)
        count[i] += 1
        total[i] += v
    return count, total


@pytest.mark.parametrize("layout", ["nchw", "mix"])
@pytest.mark.parametrize("options", [{}, {"weights": True, "alpha": "per-class", "label_smoothing": 0.1, "gamma": 1.5}])
def test_statistics_match_the_reference(backend, poisoned, layout, options):
    levels = make_levels(SMALL, torch.float64, layout)
    kind, cls = make_categories((N, M))
    labels = encode(kind, cls)
    kw = dict(options)
    if kw.pop("weights", False):
        kw["weights"] = torch.rand((N, M), dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    if kw.get("alpha") == "per-class":
        kw["alpha"] = torch.tensor([0.125, 0.25, 0.5, 0.75, 0.875], dtype=torch.float64, device=DEVICE)
    loss, st = focal_triton.multilevel_focal_loss(levels, labels, A, return_stats=True, normalizer=7.0, **kw)
    assert loss.item() == pytest.approx(focal_triton.multilevel_focal_loss(levels, labels, A, normalizer=7.0,
                                                                           **kw).item(), rel=1e-14)
    ref = _reference(levels, labels, **kw)
    pos, neg, counts, sums = _expected(ref, labels)
    got_counts = torch.stack([st.num_positive, st.num_negative, st.num_ignored], 1).tolist()
    assert got_counts == counts
    torch.testing.assert_close(torch.stack([st.loss_positive, st.loss_negative], 1).cpu(),
                               torch.tensor(sums, dtype=torch.float64), rtol=1e-12, atol=0)
    for sel, count, total in ((pos, st.count_positive, st.loss_positive_bins),
                              (neg, st.count_negative, st.loss_negative_bins)):
        want_count, want_total = _histogram(ref[sel])
        assert count.tolist() == want_count
        torch.testing.assert_close(total.cpu(), torch.tensor(want_total, dtype=torch.float64), rtol=1e-12, atol=0)
    assert st.gamma == kw.get("gamma", 2.0)


def test_statistics_of_the_concatenated_form(backend):
    """focal_loss (..., C) is one level with one anchor per row."""
    x = torch.randn(N, 11, C, dtype=torch.float64, device=DEVICE) * 4
    labels = torch.tensor([[0, 1, -1, -2, 4, -1, -1, 2, -2, -1, 3]] * N, device=DEVICE)
    loss, st = focal_triton.focal_loss(x, labels, return_stats=True)
    ref = focal_loss_ref(x, labels, reduction="none").sum(-1)
    assert st.num_positive.tolist() == [10] and st.num_negative.tolist() == [8] and st.num_ignored.tolist() == [4]
    assert st.loss_negative.item() == pytest.approx(ref[labels == -1].sum().item(), rel=1e-13)
    assert loss.item() == pytest.approx(ref.sum().item(), rel=1e-13)


def test_infinite_and_nan_losses_are_counted_not_binned(backend):
    levels = make_levels(SMALL, torch.float32)
    labels = torch.full((N, M), -1, device=DEVICE)
    labels[0, 0] = 0
    levels[0][0, 1, 0, 0] = float("inf")    # class 1 of a positive anchor of class 0: infinite loss
    levels[0][1, 0, 0, 0] = float("nan")    # a negative anchor with a NaN logit
    loss, st = focal_triton.multilevel_focal_loss(levels, labels, A, return_stats=True)
    assert torch.isnan(loss)
    assert st.num_positive.sum().item() == 1 and st.count_positive.sum().item() == 0
    assert st.count_negative.sum().item() == N * M - 2  # the NaN anchor is not binned
    assert torch.isfinite(st.loss_negative_bins).all()


def test_cumulative_curve_and_plot(backend, tmp_path):
    levels = make_levels(SMALL, torch.float64)
    kind, cls = make_categories((N, M), p_pos=0.4)
    labels = encode(kind, cls)
    stats = {}
    for gamma in (0.0, 2.0):
        _, stats[gamma] = focal_triton.multilevel_focal_loss(levels, labels, A, gamma=gamma, return_stats=True)
        ref = _reference(levels, labels, gamma=gamma)
        for positives, sel in ((True, (labels >= 0) & (labels < C)), (False, labels == -1)):
            x, y = stats[gamma].cumulative(positives)
            assert x[0] == 0 and y[0] == 0 and x[-1].item() == pytest.approx(1) and y[-1].item() == pytest.approx(1)
            assert (x.diff() >= 0).all() and (y.diff() >= 0).all()
            # At the edge below which a quarter of the anchors lie, the curve is exact.
            vals = ref[sel].sort().values
            k = len(vals) // 4
            edge = bin_edges()[int(torch.searchsorted(bin_edges(), vals[k]))]
            i = int(torch.searchsorted(bin_edges(), edge))
            below = vals[vals < edge]
            assert x[i].item() == pytest.approx(len(below) / len(vals))
            assert y[i].item() == pytest.approx((below.sum() / vals.sum()).item())
    # gamma focuses the loss on the hard negatives: the easiest 90 % of negatives carry less of it.
    assert numpy.interp(0.9, *stats[2.0].cumulative(False)) < numpy.interp(0.9, *stats[0.0].cumulative(False))
    path = tmp_path / "figure4.png"
    plot_loss_distribution(stats, path, title="test")
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_statistics_need_sum():
    levels = make_levels(SMALL, torch.float32)
    labels = torch.full((N, M), -1, device=DEVICE)
    with pytest.raises(ValueError, match="return_stats"):
        focal_triton.multilevel_focal_loss(levels, labels, A, reduction="none", return_stats=True)
    with pytest.raises(TypeError, match="return_stats"):
        focal_triton.multilevel_focal_loss(levels, labels, A, return_stats=1)


def test_gradient_with_statistics(backend):
    """The loss returned with statistics is the same differentiable loss."""
    levels = [x.requires_grad_(True) for x in make_levels(SMALL, torch.float64)]
    labels = encode(*make_categories((N, M)))
    loss, _ = focal_triton.multilevel_focal_loss(levels, labels, A, return_stats=True)
    grads = torch.autograd.grad(loss, levels)
    want = torch.autograd.grad(focal_triton.multilevel_focal_loss(levels, labels, A), levels)
    for g, w in zip(grads, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("loss", ["qfl", "vfl", "fl_star"])
def test_statistics_of_the_variants(backend, loss):
    """The per-anchor losses of the statistics are those of the loss kind asked for: they add up to its sum."""
    levels = make_levels(SMALL, torch.float64)
    labels = encode(*make_categories((N, M)))
    kw = {"scores": torch.rand((N, M), dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(DEVICE)} \
        if loss in ("qfl", "vfl") else {}
    total, st = focal_triton.multilevel_focal_loss(levels, labels, A, loss=loss, return_stats=True, **kw)
    assert st.loss == loss
    assert total.item() == pytest.approx((st.loss_positive.sum() + st.loss_negative.sum()).item(), rel=1e-12)
    assert total.item() == pytest.approx(
        (st.loss_positive_bins.sum() + st.loss_negative_bins.sum()).item(), rel=1e-12)
    assert total.item() != pytest.approx(focal_triton.multilevel_focal_loss(levels, labels, A).item(), rel=1e-3)
