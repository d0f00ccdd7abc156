"""focal_triton.multilevel_focal_loss / focal_loss (and their modules) against the naive float64 reference of
reference_multilevel.py, on both backends: values, gradients, layouts, dtypes, label conventions, normalizers."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import (A, ALPHA_C, C, CONVENTIONS, HWS, M, N, SMALL, SUM_TOL, check_multilevel, encode, leaves_of,
                     make_categories, make_labels, make_levels)
from reference import assert_close
from reference_multilevel import (anchor_mask_to_levels, flat_value_and_grad, flatten_levels, focal_loss_ref,
                                  multilevel_value_and_grads, unflatten_levels)

import focal_triton

# ---------------------------------------------------------------------------------------------------------------------
# The reference itself (no focal_triton): torchvision.ops.sigmoid_focal_loss on the one-hot targets.

@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1, 0.5), (0.6, 0.0)])
def test_reference_matches_torchvision_ops(alpha, gamma):
    tv = pytest.importorskip("torchvision.ops")
    levels = make_levels(HWS, dtype=torch.float64)
    labels = make_labels(hws=HWS)
    flat = flatten_levels(levels, A)
    t = F.one_hot(labels.clamp(min=0), C).double() * (labels >= 0).unsqueeze(-1)
    keep = (labels != -2).unsqueeze(-1)
    expected = tv.sigmoid_focal_loss(flat, t, alpha, gamma, reduction="none") * keep
    got = focal_loss_ref(flat, labels, alpha=alpha, gamma=gamma, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    norm = torch.tensor([3.0, 8.0], dtype=torch.float64, device=DEVICE)
    got_sum = focal_loss_ref(flat, labels, alpha=alpha, gamma=gamma, normalizer=norm)
    torch.testing.assert_close(got_sum, (expected.sum((1, 2)) / norm).mean(), rtol=1e-12, atol=0)
    # the per-level "none" layout of the reference is the inverse of the torchvision permute
    back = unflatten_levels(flat, [tuple(x.shape) for x in levels], A)
    assert all(torch.equal(b, x) for b, x in zip(back, levels))


# ---------------------------------------------------------------------------------------------------------------------
# Layouts, dtypes, parameters

def test_full_pyramid_mixed_layouts(backend, poisoned):
    """Five levels, channels_last and NCHW alternating: "sum" with a per-image normalizer and "none" with random
    upstream gradients per level (each in its level's layout)."""
    levels = make_levels(HWS, layout="mix", seed=11)
    labels = make_labels(hws=HWS, seed=12)
    check_multilevel(levels, labels, normalizer=torch.tensor([5.0, 9.0], device=DEVICE))
    check_multilevel(levels, labels, reduction="none")


@pytest.mark.parametrize("layout,label_dtype", [("nchw", torch.int64), ("cl", torch.int32)])
def test_uniform_layouts(backend, poisoned, layout, label_dtype):
    """All levels in one layout; labels and weights given as non-contiguous (transposed) views."""
    levels = make_levels(layout=layout, seed=13)
    labels = make_labels(dtype=label_dtype, seed=14).t().contiguous().t()
    weights = torch.rand((M, N), generator=torch.Generator().manual_seed(15)).to(DEVICE).t()
    assert not labels.is_contiguous() and not weights.is_contiguous()
    check_multilevel(levels, labels, reduction="none", weights=weights)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, poisoned, dtype):
    """"sum" is float32 (float64) whatever the logits; "none" and the gradients are in the logits' dtype. The "none"
    case also carries weights, per-class alpha and label smoothing (exactly representable: float64 math sees the same
    values whether the scalars travel as float32 or float64)."""
    levels = make_levels(dtype=dtype, layout="mix", seed=21)
    labels = make_labels(seed=22, dtype=torch.int32 if dtype == torch.bfloat16 else torch.int64)
    check_multilevel(levels, labels, normalizer=torch.tensor([4, 11], device=DEVICE))
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand((N, M), generator=torch.Generator().manual_seed(23), dtype=wdtype).to(DEVICE) * 2
    check_multilevel(levels, labels, reduction="none", weights=w,
                     alpha=torch.tensor(ALPHA_C, dtype=wdtype, device=DEVICE), label_smoothing=0.125, gamma=1.5)


def test_float64_math_uses_float64_parameters(backend, poisoned):
    """float64 logits: the math is float64 throughout, so scalars that float32 cannot hold (0.3, 0.1, 1.3) must not
    be rounded to float32 on the way (that would cost ~1e-8 relative, far beyond float64's tolerance)."""
    levels = make_levels(hws=[(5, 3)], dtype=torch.float64, layout="cl", seed=24)
    labels = make_labels(hws=[(5, 3)], seed=25)
    check_multilevel(levels, labels, alpha=0.3, gamma=1.3, label_smoothing=0.1, normalizer=0.3)


@pytest.mark.parametrize("alpha,gamma,reduction", [(-1, 0.5, "none"), (0.75, 0.0, "sum"), ("per-class", 2.0, "none"),
                                                   ("per-class", 0.5, "sum"), (1.0, 3.0, "none"), (0.0, 1.0, "sum")])
def test_alpha_gamma(backend, poisoned, alpha, gamma, reduction):
    levels = make_levels(layout="mix", seed=31)
    labels = make_labels(seed=32)
    if alpha == "per-class":
        alpha = torch.tensor(ALPHA_C, device=DEVICE)
    kw = dict(normalizer=7.0) if reduction == "sum" else {}
    check_multilevel(levels, labels, alpha=alpha, gamma=gamma, reduction=reduction, **kw)


@pytest.mark.parametrize("case,reduction", [("weights", "sum"), ("smoothing", "none"), ("both", "sum")])
def test_weights_and_label_smoothing(backend, poisoned, case, reduction):
    levels = make_levels(layout="mix", seed=41)
    labels = make_labels(seed=42)
    kw = {}
    if case in ("weights", "both"):
        w = torch.rand((N, M), generator=torch.Generator().manual_seed(43)).to(DEVICE) * 2
        w[0, :7] = 0.0
        kw["weights"] = w
    if case in ("smoothing", "both"):
        kw["label_smoothing"] = 0.1
    if case == "both":
        kw.update(alpha=torch.tensor(ALPHA_C, device=DEVICE), gamma=0.5)
    if reduction == "sum":
        kw["normalizer"] = torch.tensor([3.0, 6.0], device=DEVICE)
    check_multilevel(levels, labels, reduction=reduction, **kw)


def test_label_smoothing_uses_hard_targets_for_modulation(backend):
    """apex's smoothing: with s > 0 the loss of a confidently right anchor stays ~0 (the modulation and alpha_t use
    the hard target); smoothing the target of the modulation too would give a loss of order s."""
    labels = torch.tensor([[0, 1, 2, -1]], device=DEVICE)
    x = torch.full((1, 4, C), -25.0, device=DEVICE)
    x[0, torch.arange(3, device=DEVICE), labels[0, :3]] = 25.0
    loss = focal_triton.focal_loss(x, labels, label_smoothing=0.2, reduction="none")
    assert_close(loss, focal_loss_ref(x, labels, label_smoothing=0.2, reduction="none"), what="loss")
    assert float(loss.sum()) < 1e-9


@pytest.mark.parametrize("normalizer", ["none", "int", "float", "0d-float", "0d-int64", "(N,)-float", "(N,)-int64"])
def test_normalizers(backend, poisoned, normalizer):
    levels = make_levels(hws=[(5, 3)], layout="cl", seed=51)
    labels = make_labels(hws=[(5, 3)], seed=52)
    norm = {"none": None, "int": 4, "float": 3.5, "0d-float": torch.tensor(6.25), "0d-int64": torch.tensor(13),
            "(N,)-float": torch.tensor([2.5, 17.0]), "(N,)-int64": torch.tensor([1, 23])}[normalizer]
    if isinstance(norm, torch.Tensor):
        norm = norm.to(DEVICE)
    loss, _ = check_multilevel(levels, labels, normalizer=norm)
    if normalizer == "(N,)-int64":  # the per-image mean of per-image sums, not the global sum over a global count
        wrong = focal_loss_ref(flatten_levels(levels, A), labels) / 24.0
        assert abs(float(loss.detach()) - float(wrong)) > 1e-3 * float(wrong)


def test_normalizer_counts_per_image(backend):
    """torchvision's normalization: (1/N) sum_n loss_n / max(1, num_fg_n), from labels."""
    levels = make_levels(layout="nchw", seed=53)
    labels = make_labels(seed=54)
    labels[1][labels[1] >= 0] = -1  # image 1 without foreground
    num_fg = (labels >= 0).sum(1).clamp(min=1)
    loss = focal_triton.multilevel_focal_loss(levels, labels, A, normalizer=num_fg)
    per_image = [focal_loss_ref(flatten_levels([x[i:i + 1] for x in levels], A), labels[i:i + 1]) for i in range(N)]
    expected = (per_image[0] / num_fg[0] + per_image[1] / num_fg[1]) / 2
    torch.testing.assert_close(loss.double(), expected, **SUM_TOL)


# ---------------------------------------------------------------------------------------------------------------------
# Label conventions and label checks

@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_label_conventions(backend, poisoned, convention):
    levels = make_levels(layout="mix", seed=61)
    kind, cls = make_categories((N, M), seed=62)
    conv = CONVENTIONS[convention]
    labels = encode(kind, cls, **conv)
    if convention == "mmdet":
        assert (labels == C).any() and labels.min() >= 0
    else:
        assert (labels == conv["ignore_index"]).any() and (labels == conv["background"]).any()
    check_multilevel(levels, labels, reduction="none", **conv)


@pytest.mark.parametrize("convention,bad", [("torchvision", C), ("torchvision", -3), ("detectron2", -2),
                                            ("detectron2", C + 1), ("mmdet", -1), ("apex", 100)])
def test_check_labels_rejects(backend, convention, bad):
    levels = make_levels(hws=[(2, 2)], seed=71)
    conv = CONVENTIONS[convention]
    labels = make_labels(hws=[(2, 2)], seed=72, convention=convention)
    labels[1, 4] = bad
    with pytest.raises(ValueError, match="labels"):
        focal_triton.multilevel_focal_loss(levels, labels, A, **conv)
    with pytest.raises(ValueError, match="labels"):
        focal_triton.focal_loss(flatten_levels(levels, A), labels, **conv)


@pytest.mark.parametrize("convention,bad", [("torchvision", C + 2), ("detectron2", -2)])
def test_check_labels_off(backend, poisoned, convention, bad):
    """check_labels=False: no error, and an unknown label is background."""
    levels = make_levels(hws=[(2, 2)], seed=73)
    conv = CONVENTIONS[convention]
    labels = make_labels(hws=[(2, 2)], seed=74, convention=convention)
    labels[1, 4] = bad
    labels[0, 0] = bad
    check_multilevel(levels, labels, check_labels=False, reduction="none", **conv)
    flat = flatten_levels(levels, A)
    as_bg = torch.where(labels == bad, conv["background"], labels)
    torch.testing.assert_close(focal_triton.focal_loss(flat, labels, check_labels=False, **conv).double(),
                               focal_loss_ref(flat, as_bg, **conv), **SUM_TOL)


def test_int64_labels_beyond_int32(backend):
    """int64 labels are compared as int64: 2**32 is no class 0 and -2**32 - 2 no ignore_index -2."""
    levels = make_levels(hws=[(2, 2)], seed=77)
    labels = make_labels(hws=[(2, 2)], seed=78)
    for big in (2**32, 2**32 + 1, -2**32 - 2):
        bad = labels.clone()
        bad[0, 1] = big
        with pytest.raises(ValueError, match="labels"):
            focal_triton.multilevel_focal_loss(levels, bad, A)
        as_bg = torch.where(bad == big, -1, bad)
        got = focal_triton.multilevel_focal_loss(levels, bad, A, check_labels=False)
        torch.testing.assert_close(got.double(), multilevel_value_and_grads(levels, as_bg, A)[0], **SUM_TOL)


def test_no_ignore_value(backend):
    """ignore_index=None: -2 is then an unknown label (rejected), and no anchor is ignored."""
    levels = make_levels(hws=[(2, 2)], seed=75)
    labels = make_labels(hws=[(2, 2)], seed=76)  # torchvision convention, contains -2
    assert (labels == -2).any()
    with pytest.raises(ValueError, match="labels"):
        focal_triton.multilevel_focal_loss(levels, labels, A, ignore_index=None)
    check_multilevel(levels, labels.clamp(min=-1), ignore_index=None)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd, determinism, ignored anchors

def _as_tuple(out):
    return tuple(out) if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradcheck_float64(backend, reduction):
    """Finite differences in float64 with weights, per-class alpha, smoothing and a per-image normalizer (full
    gradcheck on the torch path; the interpreted kernels get gradcheck's fast mode: a random projection)."""
    n, a, c = 2, 2, 3
    hws = [(2, 2), (1, 2)]
    m = sum(h * w for h, w in hws) * a
    levels = make_levels(hws, torch.float64, layout="mix", n=n, a=a, c=c, seed=81, scale=2.0)
    levels = [x.requires_grad_(True) for x in levels]
    g = torch.Generator().manual_seed(82)
    labels = torch.tensor([[0, -1, 2, -2, 1, -1, 0, -1, -1, 2, 1, -2],
                           [-2, 1, -1, 2, 0, -1, -1, 1, -2, -1, 2, 0]], device=DEVICE)
    assert labels.shape == (n, m)
    kw = dict(weights=torch.rand((n, m), generator=g, dtype=torch.float64).to(DEVICE) + 0.5,
              alpha=torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=DEVICE), gamma=1.5,
              label_smoothing=0.125, reduction=reduction)
    if reduction == "sum":
        kw["normalizer"] = torch.tensor([3.0, 2.0], dtype=torch.float64, device=DEVICE)

    def fn(*xs):
        return _as_tuple(focal_triton.multilevel_focal_loss(list(xs), labels, a, **kw))

    assert torch.autograd.gradcheck(fn, tuple(levels), eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(backend, dtype):
    levels = make_levels(dtype=dtype, layout="mix", seed=91)
    labels = make_labels(seed=92)
    kw = dict(normalizer=torch.tensor([3.0, 7.0], device=DEVICE), alpha=torch.tensor(ALPHA_C, device=DEVICE),
              label_smoothing=0.05)
    runs = []
    for _ in range(2):
        leaves = leaves_of(levels)
        loss = focal_triton.multilevel_focal_loss(leaves, labels, A, **kw)
        runs.append((loss, torch.autograd.grad(loss, leaves)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(x, y) for x, y in zip(runs[0][1], runs[1][1]))


def test_ignored_anchors_zero_loss_and_gradient(backend, poisoned):
    levels = make_levels(layout="mix", seed=101, scale=8.0)
    labels = make_labels(seed=102, p_ign=0.4)
    kw = dict(alpha=torch.tensor(ALPHA_C, device=DEVICE), gamma=0.5, label_smoothing=0.1,
              weights=torch.full((N, M), 3.0, device=DEVICE))
    ignored = anchor_mask_to_levels(labels == -2, [tuple(x.shape) for x in levels], A)
    _, grads = check_multilevel(levels, labels, normalizer=torch.tensor([2.0, 3.0], device=DEVICE), **kw)
    loss_none, grads_none = check_multilevel(levels, labels, reduction="none", **kw)
    for i, (mask, g1, g2, l) in enumerate(zip(ignored, grads, grads_none, loss_none)):
        assert mask.any() and not mask.all()
        assert torch.all(g1[mask] == 0) and torch.all(g2[mask] == 0), f"level {i}"
        assert torch.all(l[mask] == 0), f"level {i}"


def test_all_ignored(backend, poisoned):
    levels = make_levels(hws=[(2, 3)], seed=103)
    labels = torch.full((N, 6 * A), -2, device=DEVICE)
    loss, grads = check_multilevel(levels, labels, normalizer=torch.tensor([1.0, 1.0], device=DEVICE))
    assert float(loss.detach()) == 0.0 and all(torch.all(g == 0) for g in grads)


# ---------------------------------------------------------------------------------------------------------------------
# The flat form, the modules, "none" vs "sum", empty inputs

@pytest.mark.parametrize("dims", [2, 3, 4])
def test_focal_loss_flat(backend, poisoned, dims):
    g = torch.Generator().manual_seed(111)
    shape = {2: (37, 7), 3: (2, 41, 7), 4: (2, 5, 3, 7)}[dims]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).float().to(DEVICE)
    x.view(-1)[::9] = -25.0
    kind, cls = make_categories(shape[:-1], seed=112, c=7)
    labels = encode(kind, cls)
    n_img = 1 if dims == 2 else shape[0]
    w = torch.rand(shape[:-1], generator=g).to(DEVICE)
    alpha = torch.tensor([0.125, 0.25, 0.5, 0.75, 0.875, 1.0, 0.0], device=DEVICE)
    for kw in (dict(normalizer=torch.arange(2.0, 2.0 + n_img, device=DEVICE)),
               dict(weights=w, alpha=alpha, gamma=0.5, label_smoothing=0.1, normalizer=3.0),
               dict(reduction="none", weights=w, alpha=alpha)):
        xi = x.clone().requires_grad_(True)
        out = focal_triton.focal_loss(xi, labels, **kw)
        grad_out = torch.randn(out.shape, generator=g).to(out.dtype).to(DEVICE)
        ref, ref_grad = flat_value_and_grad(x, labels, grad_out, **kw)
        if kw.get("reduction") == "none":
            assert out.shape == x.shape and out.dtype == x.dtype
            assert_close(out, ref, what=f"loss {kw}")
        else:
            assert out.shape == () and out.dtype == torch.float32
            torch.testing.assert_close(out.double(), ref, **SUM_TOL)
        (grad,) = torch.autograd.grad(out, xi, grad_out)
        assert grad.shape == x.shape and grad.dtype == x.dtype
        assert_close(grad, ref_grad, what=f"grad {kw}")


def test_focal_loss_2d_is_one_image(backend):
    x = make_levels(hws=[(3, 4)], n=1, seed=113)[0]
    flat = flatten_levels([x], A)  # (1, 36, C)
    labels = make_labels(n=1, hws=[(3, 4)], seed=114)
    a = focal_triton.focal_loss(flat[0], labels[0], normalizer=torch.tensor([4.0], device=DEVICE))
    b = focal_triton.focal_loss(flat, labels, normalizer=torch.tensor([4.0], device=DEVICE))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.double(), focal_loss_ref(flat, labels) / 4, **SUM_TOL)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_flat_equals_single_level(backend, poisoned, reduction):
    level = make_levels(hws=[(6, 5)], seed=121)[0]
    labels = make_labels(hws=[(6, 5)], seed=122)
    kw = dict(weights=torch.rand((N, 90), generator=torch.Generator().manual_seed(123)).to(DEVICE),
              alpha=torch.tensor(ALPHA_C, device=DEVICE), reduction=reduction)
    if reduction == "sum":
        kw["normalizer"] = torch.tensor([2.0, 5.0], device=DEVICE)
    lv = level.clone().requires_grad_(True)
    flat = flatten_levels([level], A).contiguous().requires_grad_(True)
    ml = focal_triton.multilevel_focal_loss([lv], labels, A, **kw)
    fl = focal_triton.focal_loss(flat, labels, **kw)
    if reduction == "none":
        torch.testing.assert_close(flatten_levels(ml, A), fl, rtol=2e-6, atol=1e-30)
        g = torch.randn(fl.shape, generator=torch.Generator().manual_seed(124)).to(DEVICE)
        (g_fl,) = torch.autograd.grad(fl, flat, g)
        (g_ml,) = torch.autograd.grad(ml, [lv], unflatten_levels(g, [tuple(level.shape)], A))
    else:
        torch.testing.assert_close(ml, fl, **SUM_TOL)
        (g_fl,) = torch.autograd.grad(fl, flat)
        (g_ml,) = torch.autograd.grad(ml, [lv])
    torch.testing.assert_close(flatten_levels([g_ml], A), g_fl, rtol=2e-6, atol=1e-30)
    ref = focal_loss_ref(flat, labels, **kw)
    if reduction == "none":
        assert_close(fl, ref, what="flat loss")
    else:
        torch.testing.assert_close(fl.double(), ref, **SUM_TOL)


def test_modules_match_functions(backend):
    levels = make_levels(layout="mix", seed=131)
    labels = make_labels(convention="detectron2", seed=132)
    w = torch.rand((N, M), generator=torch.Generator().manual_seed(133)).to(DEVICE)
    norm = torch.tensor([2.0, 9.0], device=DEVICE)
    kw = dict(alpha=0.5, gamma=1.0, label_smoothing=0.1, background=C, ignore_index=-1)
    module = focal_triton.MultiLevelFocalLoss(A, **kw)
    assert isinstance(module, torch.nn.Module)
    torch.testing.assert_close(module(levels, labels, w, norm),
                               focal_triton.multilevel_focal_loss(levels, labels, A, weights=w, normalizer=norm, **kw),
                               rtol=0, atol=0)
    flat = flatten_levels(levels, A)
    fmodule = focal_triton.FocalLoss(reduction="none", **kw)
    assert isinstance(fmodule, torch.nn.Module)
    torch.testing.assert_close(fmodule(flat, labels, weights=w),
                               focal_triton.focal_loss(flat, labels, weights=w, reduction="none", **kw),
                               rtol=0, atol=0)
    torch.testing.assert_close(focal_triton.FocalLoss(**kw)(flat, labels, normalizer=norm),
                               focal_triton.focal_loss(flat, labels, normalizer=norm, **kw), rtol=0, atol=0)
    # the modules' defaults are the functions'
    tv_labels = make_labels(seed=134)
    torch.testing.assert_close(focal_triton.FocalLoss()(flat, tv_labels), focal_triton.focal_loss(flat, tv_labels),
                               rtol=0, atol=0)
    one = [x[:, :, :1, :1].contiguous() for x in levels]
    one_labels = tv_labels[:, :A * len(one)]
    torch.testing.assert_close(focal_triton.MultiLevelFocalLoss(A)(one, one_labels),
                               focal_triton.multilevel_focal_loss(one, one_labels, A), rtol=0, atol=0)
    with pytest.raises(ValueError, match="labels"):
        module(levels, make_labels(seed=132))  # -2 is not a detectron2 label


def test_none_summed_equals_sum(backend, poisoned):
    levels = make_levels(layout="mix", seed=141)
    labels = make_labels(seed=142)
    kw = dict(alpha=torch.tensor(ALPHA_C, device=DEVICE),
              weights=torch.rand((N, M), generator=torch.Generator().manual_seed(143)).to(DEVICE))
    none = focal_triton.multilevel_focal_loss(levels, labels, A, reduction="none", **kw)
    total = focal_triton.multilevel_focal_loss(levels, labels, A, **kw)
    torch.testing.assert_close(sum(x.double().sum() for x in none), total.double(), **SUM_TOL)
    flat = flatten_levels(levels, A)
    torch.testing.assert_close(focal_triton.focal_loss(flat, labels, reduction="none", **kw).double().sum(),
                               focal_triton.focal_loss(flat, labels, **kw).double(), **SUM_TOL)


@pytest.mark.parametrize("case", ["N=0", "all levels empty", "one empty level"])
def test_empty(backend, poisoned, case):
    hws = {"N=0": SMALL, "all levels empty": [(0, 3), (2, 0)], "one empty level": [(2, 3), (0, 4), (1, 1)]}[case]
    n = 0 if case == "N=0" else N
    levels = make_levels(hws=hws, n=n, layout="mix", seed=151)
    labels = make_labels(n=n, hws=hws, seed=152)
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, A)
    assert loss.shape == () and loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    ref, ref_grads = multilevel_value_and_grads(levels, labels, A)
    if case != "one empty level":
        assert float(loss.detach()) == 0.0
        for g, x in zip(grads, levels):
            assert g is not None and g.shape == x.shape and g.dtype == x.dtype and torch.all(g == 0)
    else:
        torch.testing.assert_close(loss.double(), ref, **SUM_TOL)
        for g, r, x in zip(grads, ref_grads, levels):
            assert g is not None and g.shape == x.shape
            assert_close(g, r, what="grad")
    none = focal_triton.multilevel_focal_loss(levels, labels, A, reduction="none")
    assert [tuple(x.shape) for x in none] == [tuple(x.shape) for x in levels]
    for o, r in zip(none, multilevel_value_and_grads(levels, labels, A, reduction="none")[0]):
        assert_close(o, r, what="none")
    if case == "N=0":  # the flat form with no image
        flat = flatten_levels(levels, A)
        assert float(focal_triton.focal_loss(flat, labels)) == 0.0
        assert float(focal_triton.focal_loss(flat, labels, normalizer=2.0)) == 0.0


def test_empty_with_per_image_normalizer(backend, poisoned):
    """N = 0 with a (0,) normalizer: "sum" gives 0 (not the NaN of a mean over no image)."""
    levels = make_levels(n=0, seed=153)
    labels = torch.zeros((0, M), dtype=torch.int64, device=DEVICE)
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, A, normalizer=torch.zeros(0, device=DEVICE))
    assert float(loss.detach()) == 0.0
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    assert all(g is not None and g.shape == x.shape and not g.isnan().any() for g, x in zip(grads, levels))
    empty2d = torch.zeros((0, C), device=DEVICE)
    assert float(focal_triton.focal_loss(empty2d, torch.zeros(0, dtype=torch.int64, device=DEVICE),
                                         normalizer=torch.tensor([1.0], device=DEVICE))) == 0.0
