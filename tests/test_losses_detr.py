"""The class-index losses of the DETR and YOLO detectors ("bce", "vfl_rtdetr", "mal", "ia_bce") against float64
transcriptions of the libraries that define them (tests/reference_detr.py), on both backends: values, gradients
(with each library's detach), every logit dtype, the flat and multi-level forms, the hard numeric edges, gradcheck,
modules and bad input."""
import pytest
import torch
from conftest import DEVICE
from reference import assert_close
from reference_detr import REFERENCES, detr_bce, rtdetr_vfl, ultralytics_vfl

import focal_triton

C = 6
# (loss, reference key, options): default, integer and fractional exponents, the detach switch, edge alphas.
CASES = [
    ("bce", "bce", dict()),
    ("bce", "bce", dict(class_weights="random")),
    ("vfl_rtdetr", "vfl_rtdetr", dict()),
    ("vfl_rtdetr", "vfl_rtdetr_grad", dict(detach_weight=False, alpha=0.5, gamma=1.5)),
    ("mal", "mal", dict()),
    ("mal", "mal", dict(alpha=0.5, gamma=2.0)),
    ("ia_bce", "ia_bce", dict()),
    ("ia_bce", "ia_bce", dict(alpha=1.0, gamma=1.5)),
    ("ia_bce", "ia_bce", dict(alpha=0.0, gamma=0.5)),
]


def _ids(case):
    return f"{case[0]}-{'-'.join(f'{k}={v}' for k, v in case[2].items()) or 'default'}"


def make_queries(dtype, b=2, q=9, seed=0):
    """Decoder logits (B, Q, C) with some saturated at +-25, Hungarian-style labels (matched queries: a class;
    the others: C, the libraries' background) and IoUs in [0, 1] with exact 0s and 1s among them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, q, C, generator=g, dtype=torch.float64) * 3
    x.view(-1)[3::13] = 25.0
    x.view(-1)[8::13] = -25.0
    labels = torch.where(torch.rand(b, q, generator=g) < 0.4, torch.randint(0, C, (b, q), generator=g),
                         torch.full((b, q), C))
    ious = torch.rand(b, q, generator=g, dtype=torch.float64)
    ious.view(-1)[::5] = 1.0
    ious.view(-1)[2::7] = 0.0
    return x.to(dtype).to(DEVICE), labels.to(DEVICE), ious.to(DEVICE)


def _options(loss, params, dtype):
    params = dict(params)
    if params.get("class_weights") == "random":
        g = torch.Generator().manual_seed(3)
        params["class_weights"] = (torch.rand(C, generator=g, dtype=torch.float64) * 2).to(DEVICE)
    ref_params = {k: v for k, v in params.items() if k != "detach_weight"}
    return params, ref_params


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_values_and_gradients(backend, poisoned, case, dtype):
    """The flat form (B, Q, C) with the libraries' background = C and num_boxes as the normalizer: the sum, its
    gradient and the "none" loss against the library's formula in float64."""
    loss, ref_key, params = case
    x, labels, ious = make_queries(dtype)
    params, ref_params = _options(loss, params, dtype)
    leaf = x.detach().clone().requires_grad_(True)
    got = focal_triton.focal_loss(leaf, labels, loss=loss, scores=ious, background=C, normalizer=7.0, **params)
    (grad,) = torch.autograd.grad(got, leaf)
    ref_leaf = x.detach().double().requires_grad_(True)
    ref = REFERENCES[ref_key](ref_leaf, labels, ious, **ref_params).sum() / 7.0
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf)
    sum_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == sum_dtype and grad.dtype == dtype
    assert_close(got, ref, dtype=sum_dtype if dtype == torch.float64 else torch.bfloat16, what="sum")
    assert_close(grad, ref_grad, what="grad")
    none = focal_triton.focal_loss(x, labels, loss=loss, scores=ious, background=C, reduction="none", **params)
    assert none.shape == x.shape and none.dtype == dtype
    assert_close(none, REFERENCES[ref_key](x.double(), labels, ious, **ref_params), what="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("loss", ["bce", "vfl_rtdetr", "mal", "ia_bce"])
def test_other_dtypes(backend, poisoned, loss, dtype):
    x, labels, ious = make_queries(dtype, seed=1)
    leaf = x.detach().clone().requires_grad_(True)
    got = focal_triton.focal_loss(leaf, labels, loss=loss, scores=ious, background=C)
    (grad,) = torch.autograd.grad(got, leaf)
    ref_leaf = x.detach().double().requires_grad_(True)
    ref = REFERENCES[loss](ref_leaf, labels, ious).sum()
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf)
    assert_close(got, ref, dtype=torch.float32 if dtype == torch.float32 else dtype, what="sum")
    assert_close(grad, ref_grad, what="grad")


@pytest.mark.parametrize("loss", ["bce", "vfl_rtdetr", "mal", "ia_bce"])
def test_yolo_head_levels(backend, poisoned, loss):
    """The multi-level form on a YOLO-style head: per level (B, C, H, W) with one anchor per position, NCHW and
    channels_last, labels over all positions, a 0-d tensor normalizer (target_scores_sum stays on the device)."""
    g = torch.Generator().manual_seed(5)
    levels = [(torch.randn(2, C, h, w, generator=g) * 3).to(torch.bfloat16).to(DEVICE) for h, w in ((4, 3), (2, 3))]
    levels[1] = levels[1].contiguous(memory_format=torch.channels_last)
    m = 4 * 3 + 2 * 3
    labels = torch.where(torch.rand(2, m, generator=g) < 0.3, torch.randint(0, C, (2, m), generator=g),
                         torch.full((2, m), -1)).to(DEVICE)
    ious = torch.rand(2, m, generator=g).to(DEVICE)
    norm = torch.tensor(3.5, device=DEVICE)
    leaves = [lv.detach().clone().requires_grad_(True) for lv in levels]
    got = focal_triton.multilevel_focal_loss(leaves, labels, 1, loss=loss, scores=ious, normalizer=norm)
    grads = torch.autograd.grad(got, leaves)
    ref_leaves = [lv.detach().double().requires_grad_(True) for lv in levels]
    flat = torch.cat([lv.flatten(2).transpose(1, 2) for lv in ref_leaves], 1)  # (B, sum HW, C), positions row-major
    ref = REFERENCES[loss](flat, labels, ious).sum() / 3.5
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    assert_close(got, ref, dtype=torch.bfloat16, what="sum")
    for gr, r, lv in zip(grads, ref_grads, levels):
        assert gr.stride() == lv.stride()
        assert_close(gr, r, what="grad")


@pytest.mark.parametrize("loss,params", [("bce", dict(class_weights="random")),
                                         ("vfl_rtdetr", dict(detach_weight=False, gamma=1.5)),
                                         ("vfl_rtdetr", dict(detach_weight=False, gamma=0.5))])
def test_gradcheck_float64(backend, loss, params):
    """gradcheck where the gradient is the loss's derivative: BCE and the non-detached VFL. (transformers' VFL, MAL
    and IA-BCE detach part of their weight or target by design: test_values_and_gradients checks them against the
    libraries' own autograd, detach included.)"""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(1, 3, 3, generator=g, dtype=torch.float64) * 2).to(DEVICE).requires_grad_(True)
    labels = torch.tensor([[0, 3, 2]], device=DEVICE)
    ious = torch.tensor([[0.7, 0.3, 0.55]], dtype=torch.float64, device=DEVICE)
    params = {k: (torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64, device=DEVICE) if v == "random" else v)
              for k, v in params.items()}
    assert torch.autograd.gradcheck(lambda a: focal_triton.focal_loss(a, labels, loss=loss, scores=ious, background=3,
                                                                      **params), (x,), fast_mode=True)


def test_detach_switch_changes_only_the_negatives_gradient(backend):
    """vfl_rtdetr: detach_weight=True is transformers' RT-DETR loss, False ultralytics' VarifocalLoss; same values,
    gradients that differ by the weight's derivative on the negatives only."""
    x, labels, ious = make_queries(torch.float64, seed=4)
    out = {}
    for detach in (True, False):
        leaf = x.detach().clone().requires_grad_(True)
        loss = focal_triton.focal_loss(leaf, labels, loss="vfl_rtdetr", scores=ious, background=C,
                                       detach_weight=detach)
        out[detach] = (loss, torch.autograd.grad(loss, leaf)[0])
    assert_close(out[True][0], out[False][0], what="values")
    positive = torch.nn.functional.one_hot(labels.clamp_max(C), C + 1)[..., :C].bool()
    assert torch.equal(out[True][1][positive], out[False][1][positive])
    assert (out[True][1][~positive] != out[False][1][~positive]).float().mean() > 0.5
    for detach, ref_fn in ((True, rtdetr_vfl), (False, ultralytics_vfl)):
        ref_leaf = x.detach().double().requires_grad_(True)
        (ref_grad,) = torch.autograd.grad(ref_fn(ref_leaf, labels, ious).sum(), ref_leaf)
        assert_close(out[detach][1], ref_grad, what=f"detach_weight={detach}")


def test_bce_without_scores_is_transformers_loss_labels_bce(backend, poisoned):
    x, labels, _ = make_queries(torch.float32, seed=6)
    got = focal_triton.focal_loss(x, labels, loss="bce", background=C, reduction="none")
    assert_close(got, detr_bce(x, labels), what="bce, hard targets")


@pytest.mark.parametrize("loss", ["bce", "vfl_rtdetr", "mal", "ia_bce"])
def test_infinite_and_saturated_logits(backend, poisoned, loss):
    """Logits at +-inf and +-3e38 on the label's class and off it: the loss is the formula's limit and the gradient
    finite; finite logits match the reference."""
    inf = float("inf")
    x = torch.tensor([[[inf, -inf, 3e38], [-inf, inf, -3e38], [40.0, -40.0, 0.0], [-3e38, 3e38, inf]]],
                     device=DEVICE)
    labels = torch.tensor([[0, 1, 2, 3]], device=DEVICE)  # 3: background (C = 3)
    ious = torch.tensor([[0.6, 1.0, 0.0, 0.5]], device=DEVICE)
    leaf = x.clone().requires_grad_(True)
    none = focal_triton.focal_loss(leaf, labels, loss=loss, scores=ious, background=3, reduction="none")
    (grad,) = torch.autograd.grad(none.sum(), leaf)
    assert torch.isfinite(grad).all(), grad
    assert not torch.isnan(none).any(), none
    finite = x.abs() < 1e3
    ref = REFERENCES[loss](x.double().masked_fill(~finite, 0.0), labels, ious)
    assert_close(none[finite], ref[finite], what="finite logits")
    # Negatives at -inf / -3e38 cost 0, and so does +inf on the label's class with target 1 (IoU 1: every kind's
    # target is 1 there); +inf on the label's class with target 0.6 (< 1) and a negative at +inf cost +inf; a
    # negative at 3e38 costs its finite limit (weight times 3e38).
    assert none[0, 0, 1] == 0 and none[0, 1, 0] == 0 and none[0, 1, 2] == 0 and none[0, 1, 1] == 0
    assert torch.isinf(none[0, 0, 0]) and torch.isinf(none[0, 3, 2])
    assert torch.isfinite(none[0, 3, 1]) and none[0, 3, 1] > 1e37


@pytest.mark.parametrize("loss", ["bce", "vfl_rtdetr", "mal", "ia_bce"])
def test_nan_propagates(backend, poisoned, loss):
    x, labels, ious = make_queries(torch.float32, seed=8)
    x[0, 1, 2] = float("nan")
    leaf = x.clone().requires_grad_(True)
    none = focal_triton.focal_loss(leaf, labels, loss=loss, scores=ious, background=C, reduction="none")
    (grad,) = torch.autograd.grad(none.sum(), leaf)
    assert torch.isnan(none[0, 1, 2]) and torch.isnan(grad[0, 1, 2])
    assert torch.isnan(none).sum() == 1 and torch.isnan(grad).sum() == 1


@pytest.mark.parametrize("loss", ["vfl_rtdetr", "mal", "ia_bce"])
def test_fractional_gamma_below_one_keeps_finite_gradients(backend, loss):
    x = torch.tensor([[[-90.0, -30.0, 0.0, 30.0, 90.0]]], device=DEVICE)
    labels = torch.tensor([[1]], device=DEVICE)
    ious = torch.tensor([[0.4]], device=DEVICE)
    params = dict(gamma=0.5, **(dict(detach_weight=False) if loss == "vfl_rtdetr" else {}))
    leaf = x.clone().requires_grad_(True)
    got = focal_triton.focal_loss(leaf, labels, loss=loss, scores=ious, background=5, **params)
    (grad,) = torch.autograd.grad(got, leaf)
    assert torch.isfinite(grad).all(), grad
    key = "vfl_rtdetr_grad" if loss == "vfl_rtdetr" else loss
    ref_leaf = x.double().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(REFERENCES[key](ref_leaf, labels, ious, gamma=0.5).sum(), ref_leaf)
    assert_close(grad, torch.nan_to_num(ref_grad, nan=0.0), what="grad")


def test_ignored_queries_and_weights(backend):
    """ignore_index and per-query weights act on the new kinds as on the others: an ignored query adds nothing
    and gets a zero gradient (also with a NaN logit)."""
    x, labels, ious = make_queries(torch.float32, seed=9)
    labels = labels.clone()
    labels[0, :3] = -2
    x[0, 0, 0] = float("nan")
    w = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    leaf = x.clone().requires_grad_(True)
    got = focal_triton.focal_loss(leaf, labels, loss="ia_bce", scores=ious, weights=w, background=C)
    (grad,) = torch.autograd.grad(got, leaf)
    assert torch.equal(grad[0, :3], torch.zeros_like(grad[0, :3]))
    keep = labels != -2
    ref = (REFERENCES["ia_bce"](x.double().masked_fill(~keep[..., None], 0.0), labels, ious) * w.double()[..., None]
           )[keep].sum()
    assert_close(got, ref, dtype=torch.float32)


def test_deterministic(backend):
    x, labels, ious = make_queries(torch.bfloat16, seed=10)
    runs = [focal_triton.focal_loss(x, labels, loss="mal", scores=ious, background=C) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_modules(backend):
    x, labels, ious = make_queries(torch.float32, seed=11)
    weights = torch.linspace(0.5, 1.5, C, device=DEVICE)
    m = focal_triton.FocalLoss(loss="bce", class_weights=weights, background=C)
    assert torch.equal(m.class_weights, weights) and "class_weights" in dict(m.named_buffers())
    assert_close(m(x, labels, scores=ious),
                 focal_triton.focal_loss(x, labels, loss="bce", class_weights=weights, scores=ious, background=C))
    v = focal_triton.FocalLoss(loss="vfl_rtdetr", detach_weight=False, background=C)
    assert "detach_weight=False" in repr(v)
    assert_close(v(x, labels, scores=ious), REFERENCES["vfl_rtdetr_grad"](x, labels, ious).sum(), dtype=torch.float32)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(loss="mal", gamma=0.0), ValueError, "gamma of mal"),
    (dict(loss="ia_bce", alpha=1.5), ValueError, "alpha of ia_bce"),
    (dict(loss="vfl_rtdetr", alpha=-0.5), ValueError, "alpha of vfl_rtdetr"),
    (dict(loss="vfl_rtdetr", detach_weight="yes"), TypeError, "detach_weight"),
    (dict(loss="bce", class_weights=torch.ones(C + 1)), ValueError, "class_weights must have shape"),
    (dict(loss="bce", class_weights=[1.0] * C), TypeError, "class_weights"),
    (dict(loss="fl", class_weights=torch.ones(C)), ValueError, "takes no class_weights"),
    (dict(loss="mal", detach_weight=True), ValueError, "takes no detach_weight"),
    (dict(loss="bce", beta=1.0), ValueError, "takes no beta"),
])
def test_bad_options_name_the_argument(kwargs, error, message):
    x, labels, ious = make_queries(torch.float32)
    with pytest.raises(error, match=message):
        focal_triton.focal_loss(x, labels, scores=None if kwargs["loss"] == "fl" else ious, background=C, **kwargs)
    if "must have shape" not in message:  # a module learns C at its first call
        with pytest.raises(error, match=message):
            focal_triton.FocalLoss(background=C, **kwargs)


@pytest.mark.parametrize("loss", ["vfl_rtdetr", "mal", "ia_bce"])
def test_scores_are_required(loss):
    x, labels, _ = make_queries(torch.float32)
    with pytest.raises(ValueError, match=f"loss='{loss}' needs scores"):
        focal_triton.focal_loss(x, labels, loss=loss, background=C)

