"""Bad input to focal_loss / multilevel_focal_loss and their modules: an exception of the right type whose message
names the offending argument."""
import pytest
import torch
from conftest import DEVICE

import focal_triton

N, A, C = 2, 3, 4
HWS = [(3, 2), (2, 2), (1, 1)]
M = sum(h * w for h, w in HWS) * A
TYPE_OR_VALUE = (TypeError, ValueError)


def levels(n=N, a=A, c=C, hws=HWS, dtype=torch.float32):
    return [torch.randn(n, a * c, h, w).to(dtype).to(DEVICE) for h, w in hws]


def labels(n=N, m=M, dtype=torch.int64):
    return (torch.arange(n * m).reshape(n, m) % (C + 2) - 2).to(dtype).to(DEVICE)  # -2, -1, 0..C-1: all valid


def ml(lv=None, lb=None, a=A, **kw):
    return focal_triton.multilevel_focal_loss(levels() if lv is None else lv, labels() if lb is None else lb, a, **kw)


def flat(x=None, lb=None, **kw):
    x = torch.randn(N, M, C).to(DEVICE) if x is None else x
    return focal_triton.focal_loss(x, labels() if lb is None else lb, **kw)


def test_valid_inputs_pass():
    ml()
    flat()
    ml(lb=labels(dtype=torch.int32))


# ---- labels --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool, torch.int16, torch.uint8])
def test_label_dtype(dtype):
    lb = labels().clamp(min=0).to(dtype)
    with pytest.raises(TYPE_OR_VALUE, match="labels"):
        ml(lb=lb)
    with pytest.raises(TYPE_OR_VALUE, match="labels"):
        flat(lb=lb)


@pytest.mark.parametrize("shape", [(N, M + 1), (N, M - 1), (N + 1, M), (N * M,), (N, M, 1), (1, M)])
def test_label_shape(shape):
    lb = torch.zeros(shape, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TYPE_OR_VALUE, match="labels"):
        ml(lb=lb)
    with pytest.raises(TYPE_OR_VALUE, match="labels"):
        flat(lb=lb)


@pytest.mark.parametrize("bad", [C, C + 7, -3, -100])
def test_label_values_checked(bad):
    lb = labels()
    lb[1, -1] = bad
    with pytest.raises(ValueError, match="labels"):
        ml(lb=lb)
    with pytest.raises(ValueError, match="labels"):
        flat(lb=lb)
    with pytest.raises(ValueError, match="labels"):
        focal_triton.MultiLevelFocalLoss(A)(levels(), lb)
    ml(lb=lb, check_labels=False)
    flat(lb=lb, check_labels=False)


def test_label_values_follow_the_convention():
    lb = labels().clamp(min=-1)
    lb[lb == -1] = C  # detectron2: background C, ignore -1
    ml(lb=lb, background=C, ignore_index=-1)
    with pytest.raises(ValueError, match="labels"):
        ml(lb=lb)  # C is not a torchvision label
    lb[0, 0] = -2
    with pytest.raises(ValueError, match="labels"):
        ml(lb=lb, background=C, ignore_index=-1)
    with pytest.raises(ValueError, match="labels"):
        ml(lb=labels(), ignore_index=None)  # -2 without an ignore value


# ---- level_logits / num_anchors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_anchors", [2, 5, 7])
def test_channels_not_divisible(num_anchors):
    lv = levels()  # 12 channels
    m = sum(h * w for h, w in HWS) * num_anchors
    with pytest.raises(TYPE_OR_VALUE, match="num_anchors|level_logits"):
        ml(lv=[torch.randn(N, 13, h, w).to(DEVICE) for h, w in HWS],
           lb=torch.zeros(N, m, dtype=torch.int64, device=DEVICE), a=num_anchors)
    if 12 % num_anchors:
        with pytest.raises(TYPE_OR_VALUE, match="num_anchors|level_logits"):
            ml(lv=lv, lb=torch.zeros(N, m, dtype=torch.int64, device=DEVICE), a=num_anchors)


def test_levels_disagree():
    lv = levels()
    with pytest.raises(TYPE_OR_VALUE, match="level_logits"):  # batch size
        ml(lv=[lv[0], torch.randn(N + 1, A * C, 2, 2).to(DEVICE), lv[2]])
    with pytest.raises(TYPE_OR_VALUE, match="level_logits"):  # dtype
        ml(lv=[lv[0], lv[1].double(), lv[2]])
    with pytest.raises(TYPE_OR_VALUE, match="level_logits"):  # dtype, 16-bit
        ml(lv=[lv[0].half(), lv[1].bfloat16(), lv[2].half()])
    with pytest.raises(TYPE_OR_VALUE, match="level_logits"):  # channels
        ml(lv=[lv[0], torch.randn(N, A * (C + 1), 2, 2).to(DEVICE), lv[2]])
    with pytest.raises(TYPE_OR_VALUE, match="level_logits"):  # device
        ml(lv=[lv[0], torch.zeros(N, A * C, 2, 2, device="meta"), lv[2]])


def test_level_count():
    with pytest.raises(TYPE_OR_VALUE, match="level_logits"):
        ml(lv=[], lb=torch.zeros(N, 0, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TYPE_OR_VALUE, match="level_logits"):
        ml(lv=[torch.randn(N, A * C, 1, 1).to(DEVICE) for _ in range(9)],
           lb=torch.zeros(N, 9 * A, dtype=torch.int64, device=DEVICE))
    ml(lv=[torch.randn(N, A * C, 1, 1).to(DEVICE) for _ in range(8)],
       lb=torch.zeros(N, 8 * A, dtype=torch.int64, device=DEVICE))


def test_level_rank_and_dtype():
    lv = levels()
    with pytest.raises(TYPE_OR_VALUE, match="level_logits"):
        ml(lv=[lv[0], lv[1].flatten(2), lv[2]])  # 3-D level
    with pytest.raises(TYPE_OR_VALUE, match="level_logits"):
        ml(lv=[x.long() for x in lv])
    with pytest.raises(TYPE_OR_VALUE, match="logits"):
        flat(x=torch.zeros(N, M, C, dtype=torch.int32, device=DEVICE))


# ---- weights, alpha, normalizer, scalars, reduction ----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(N, M + 1), (N, M, 1), (N * M,), (N, M, C)])
def test_weights_shape(shape):
    with pytest.raises(TYPE_OR_VALUE, match="weights"):
        ml(weights=torch.ones(shape, device=DEVICE))
    with pytest.raises(TYPE_OR_VALUE, match="weights"):
        flat(weights=torch.ones(shape, device=DEVICE))


@pytest.mark.parametrize("shape", [(C + 1,), (C - 1,), (1, C), (N, C), ()])
def test_alpha_tensor_shape(shape):
    with pytest.raises(TYPE_OR_VALUE, match="alpha"):
        ml(alpha=torch.full(shape, 0.25, device=DEVICE))
    with pytest.raises(TYPE_OR_VALUE, match="alpha"):
        flat(alpha=torch.full(shape, 0.25, device=DEVICE))


@pytest.mark.parametrize("alpha", [1.5, -0.5, 2, -2])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match="alpha"):
        ml(alpha=alpha)


@pytest.mark.parametrize("shape", [(N + 1,), (N, 1), (1, N), (N, N)])
def test_normalizer_shape(shape):
    with pytest.raises(TYPE_OR_VALUE, match="normalizer"):
        ml(normalizer=torch.ones(shape, device=DEVICE))
    with pytest.raises(TYPE_OR_VALUE, match="normalizer"):
        flat(normalizer=torch.ones(shape, device=DEVICE))


def test_normalizer_of_one_element_is_one_number():
    """A (1,) tensor (apex's num_positives_sum) is one normalizer for every image, not a per-image one."""
    lv = levels()
    x = torch.randn(N, M, C).to(DEVICE)
    assert torch.equal(ml(lv=lv, normalizer=torch.full((1,), 4.0, device=DEVICE)),
                       ml(lv=lv, normalizer=torch.tensor(4.0, device=DEVICE)))
    assert torch.equal(flat(x=x, normalizer=torch.full((1,), 4.0, device=DEVICE)), flat(x=x, normalizer=4.0))
    with pytest.raises(ValueError, match="normalizer"):
        ml(normalizer=torch.ones(2, 1, device=DEVICE))


@pytest.mark.parametrize("normalizer", [2.0, torch.tensor(2.0), torch.ones(N)])
def test_normalizer_needs_sum(normalizer):
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(DEVICE)
    with pytest.raises(ValueError, match="normalizer"):
        ml(normalizer=normalizer, reduction="none")
    with pytest.raises(ValueError, match="normalizer"):
        flat(normalizer=normalizer, reduction="none")


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan")])
def test_label_smoothing_range(s):
    with pytest.raises(ValueError, match="label_smoothing"):
        ml(label_smoothing=s)
    with pytest.raises(ValueError, match="label_smoothing"):
        flat(label_smoothing=s)


@pytest.mark.parametrize("gamma", [-0.5, -2, float("nan")])
def test_gamma_negative(gamma):
    with pytest.raises(ValueError, match="gamma"):
        ml(gamma=gamma)
    with pytest.raises(ValueError, match="gamma"):
        flat(gamma=gamma)


@pytest.mark.parametrize("reduction", ["mean", "MEAN", "avg", None, ""])
def test_reduction(reduction):
    with pytest.raises(ValueError, match="reduction"):
        ml(reduction=reduction)
    with pytest.raises(ValueError, match="reduction"):
        flat(reduction=reduction)


def test_modules_validate():
    with pytest.raises(ValueError, match="reduction"):
        focal_triton.FocalLoss(reduction="mean")(torch.randn(N, M, C).to(DEVICE), labels())
    with pytest.raises(ValueError, match="gamma"):
        focal_triton.MultiLevelFocalLoss(A, gamma=-1.0)(levels(), labels())
    with pytest.raises(ValueError, match="label_smoothing"):
        focal_triton.FocalLoss(label_smoothing=1.0)(torch.randn(N, M, C).to(DEVICE), labels())
    with pytest.raises(TYPE_OR_VALUE, match="normalizer"):
        focal_triton.MultiLevelFocalLoss(A)(levels(), labels(), normalizer=torch.ones(N + 1, device=DEVICE))
    with pytest.raises(TYPE_OR_VALUE, match="num_anchors|level_logits"):
        focal_triton.MultiLevelFocalLoss(5)(levels(), torch.zeros(N, sum(h * w for h, w in HWS) * 5,
                                                                  dtype=torch.int64, device=DEVICE))


# ---- errors at construction, one rule for bools and numbers ----------------------------------------------------

BAD_OPTIONS = [
    (dict(background=True), TypeError, "background"),
    (dict(background="-1"), TypeError, "background"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(ignore_index=-1, background=-1), ValueError, "ignore_index and background"),
    (dict(check_labels="yes"), TypeError, "check_labels"),
    (dict(check_labels=1), TypeError, "check_labels"),
    (dict(alpha=torch.full((2, 4), 0.25)), ValueError, "alpha"),
    (dict(alpha=torch.tensor([1, 0])), TypeError, "alpha"),
    (dict(alpha="0.25"), TypeError, "alpha must be a Python number"),
    (dict(alpha=True), TypeError, "alpha"),
    (dict(gamma=True), TypeError, "gamma"),
    (dict(gamma=-1.0), ValueError, "gamma"),
    (dict(label_smoothing=False), TypeError, "label_smoothing"),
    (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
    (dict(label_smoothing=0.1, loss="fl_star"), ValueError, "label_smoothing"),
    (dict(reduction="mean"), ValueError, "reduction"),
    (dict(loss="softmax"), ValueError, "loss"),
    (dict(loss="qfl", gamma=2.0), ValueError, "gamma"),
    (dict(loss="fl", iou_weighted=True), ValueError, "iou_weighted"),
    (dict(loss="vfl", iou_weighted=1), TypeError, "iou_weighted"),
    (dict(loss="fl_star", beta=True), TypeError, "beta"),
]


@pytest.mark.parametrize("options, error, match", BAD_OPTIONS)
def test_modules_reject_bad_options_when_built(options, error, match):
    """The modules check their options when built, with the messages of the functions' own checks."""
    for build in (lambda: focal_triton.FocalLoss(**options), lambda: focal_triton.MultiLevelFocalLoss(A, **options)):
        with pytest.raises(error, match=match):
            build()
    scores = dict(scores=torch.rand(N, M).to(DEVICE)) if options.get("loss") in ("qfl", "vfl") else {}
    with pytest.raises(error, match=match):   # the function says the same at the call
        flat(**options, **scores)


@pytest.mark.parametrize("num_anchors, error", [(0, ValueError), (-3, ValueError), ("3", TypeError),
                                                (3.0, TypeError), (True, TypeError)])
def test_num_anchors_checked_when_built(num_anchors, error):
    with pytest.raises(error, match="num_anchors"):
        focal_triton.MultiLevelFocalLoss(num_anchors)
    with pytest.raises(error, match="num_anchors"):
        ml(a=num_anchors)


def test_what_needs_the_logits_waits_for_the_call():
    """A per-class alpha's length and a background that clashes with a class are known only from the logits."""
    loss = focal_triton.FocalLoss(alpha=torch.full((7,), 0.25))
    with pytest.raises(ValueError, match=r"alpha as a tensor must have shape \(num_classes,\) = \(4,\)"):
        loss(torch.randn(N, M, C).to(DEVICE), labels())
    loss = focal_triton.FocalLoss(background=2)
    with pytest.raises(ValueError, match="background = 2 is a class index"):
        loss(torch.randn(N, M, C).to(DEVICE), labels())


def test_meta_tensors_with_check_labels_name_it():
    x = torch.randn(N, M, C, device="meta")
    lb = torch.zeros(N, M, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="check_labels"):
        focal_triton.focal_loss(x, lb)
    assert focal_triton.focal_loss(x, lb, check_labels=False).device.type == "meta"
