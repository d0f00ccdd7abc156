"""The relatives of the focal loss (FL*, Quality Focal Loss, Varifocal Loss): dense, class-index and multi-level forms
and their modules, on both backends, against the float64 references of reference_variants.py (the papers' formulas)
and against the published fvcore and mmdet implementations transcribed there."""
import math

import pytest
import torch
from conftest import DEVICE
from reference import TOL, assert_close
from reference_multilevel import flatten_levels, unflatten_levels
from reference_variants import (class_index_ref, focal_star_ref, fvcore_sigmoid_focal_loss_star,
                                mmdet_quality_focal_loss, mmdet_varifocal_loss, quality_focal_ref, reduce,
                                varifocal_ref)

import focal_triton
from focal_triton import quality_focal_loss, sigmoid_focal_loss_star, varifocal_loss
from focal_triton.losses import LossKind

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (name, public function, reference, parameter sets): integer and fractional exponents, beta of FL* != 0, both VFL
# weightings, alpha on and off.
KINDS = {
    "fl_star": (sigmoid_focal_loss_star, focal_star_ref,
                [dict(), dict(alpha=0.25, gamma=2.0, beta=1.0), dict(gamma=0.5, beta=-0.75)]),
    "qfl": (quality_focal_loss, quality_focal_ref, [dict(), dict(beta=1.5), dict(beta=0.5), dict(beta=0.0)]),
    "vfl": (varifocal_loss, varifocal_ref,
            [dict(), dict(alpha=0.5, gamma=1.5), dict(iou_weighted=False), dict(gamma=0.0)]),
}
CASES = [(kind, i) for kind, (_, _, params) in KINDS.items() for i in range(len(params))]


def _ids(case):
    kind, i = case
    return f"{kind}-{i}"


def make_dense(kind, shape=(3, 70), dtype=torch.float32, seed=0):
    """Logits with ~1/7 saturated at +-25 and targets for `kind`: 0/1 for FL*; for QFL and VFL soft scores with
    exact 0s and 1s among them (y = 0 is every negative, y = 1 a perfect box)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    x.view(-1)[3::14] = 25.0
    x.view(-1)[10::14] = -25.0
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    if kind == "fl_star":
        t = (u < 0.3).double()
    else:
        t = torch.where(u < 0.5, 0.0, torch.rand(shape, generator=g, dtype=torch.float64))
        t.view(-1)[5::9] = 1.0
    return x.to(dtype).to(DEVICE), t.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_dense_values_and_gradients(backend, poisoned, case, dtype):
    """Elementwise loss, sum and mean, and the gradient of the sum, against the float64 formula evaluated on the
    same (rounded) inputs, within one rounding of the output dtype."""
    kind, i = case
    fn, ref, params = KINDS[kind]
    kw = params[i]
    x, t = make_dense(kind, dtype=dtype, seed=i)
    expected = ref(x, t, **kw)
    assert_close(fn(x, t, **kw), expected, what=f"{kind} none")
    for reduction in ("sum", "mean"):
        got = fn(x, t, reduction=reduction, **kw)
        assert got.dtype == dtype and got.shape == ()
        # a 16-bit sum is rounded once from float32 math; the float32 sum of 210 terms carries ~1e-6 relative error
        assert_close(got, reduce(expected, reduction), dtype=dtype if dtype in (torch.float16, torch.bfloat16)
                     else torch.float64 if dtype == torch.float64 else torch.float32, what=f"{kind} {reduction}")
    leaf = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(leaf, t, reduction="sum", **kw), leaf)
    xd = x.detach().double().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(ref(xd, t, **kw).sum(), xd)
    assert grad.dtype == dtype
    assert_close(grad, grad_ref, what=f"{kind} grad")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_dense_gradcheck_float64(backend, case):
    """torch.autograd.gradcheck through the kernels (float64), the upstream gradient both a scalar ("sum") and a
    tensor ("none"); fast mode (random projections: a few interpreted launches, not one per element; the full
    Jacobian is compared with the reference's above). The points avoid y = sigmoid(x), where |y - sigma|^beta has
    no derivative for beta <= 1."""
    kind, i = case
    fn, _, params = KINDS[kind]
    x, t = make_dense(kind, shape=(2, 33), dtype=torch.float64, seed=10 + i)
    x = (x.clamp(-6, 6) + 0.01).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: fn(a, t, reduction="sum", **params[i]), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a: fn(a, t, **params[i]), (x,), fast_mode=True)


# ---- edge cases: y = 0, y = 1, saturated and infinite logits, NaN ---------------------------------------------------

INF = math.inf


@pytest.mark.parametrize("kind", ["fl_star", "qfl", "vfl"])
def test_limits_at_infinite_logits(backend, kind):
    """At x = +-inf the loss is the formula's limit (0 where the model is right, inf where it is wrong with
    certainty) and the gradient is finite; NaN logits give NaN."""
    fn, _, _ = KINDS[kind]
    x = torch.tensor([INF, -INF, INF, -INF, INF, -INF, 1e4, -1e4, float("nan")], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 1.0, 0.0, 1.0], dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    loss = fn(leaf, t)
    (grad,) = torch.autograd.grad(loss, leaf, torch.ones_like(loss))
    expected = {
        # FL* = softplus(-(x_t))/1: 0 when x_t -> +inf; inf when x_t -> -inf; x_t = 0 for t = 1/2: log 2.
        "fl_star": [0, 0, INF, INF, math.log(2), math.log(2), 0, 0],
        # QFL: right and certain 0; y = 1/2 keeps |y - sigma| = 1/2 and BCE -> inf.
        "qfl": [0, 0, INF, INF, INF, INF, 0, 0],
        # VFL: negative (q = 0) predicted 0 -> 0, predicted 1 -> inf; positive q = 1 at +inf -> 0.
        "vfl": [0, 0, INF, INF, INF, INF, 0, 0],
    }[kind]
    assert loss[:8].tolist() == expected
    assert torch.isfinite(grad[:8]).all(), grad
    assert loss[8].isnan() and grad[8].isnan()
    # a NaN target gives NaN too, never a silent number
    t_nan = torch.full((2,), float("nan"), dtype=torch.float64)
    leaf = torch.tensor([0.5, -2.0], dtype=torch.float64, requires_grad=True)
    loss = fn(leaf, t_nan)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    assert loss.isnan().all() and grad.isnan().all(), (loss, grad)


def test_qfl_gradient_at_y_equal_sigma_for_small_beta(backend):
    """0 < beta < 1: |y - sigma|^beta has an infinite slope at y = sigma; the kernels return 0 there (the
    subgradient of |.|), never NaN, and the value 0."""
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    y = torch.full((4,), 0.5, dtype=torch.float64)
    loss = quality_focal_loss(x, y, beta=0.5)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert loss.tolist() == [0.0] * 4 and grad.tolist() == [0.0] * 4


# ---- identities and the libraries users switch from ---------------------------------------------------------------

def test_identities_with_focal_loss(backend):
    """QFL on hard targets is FL without alpha (|y - sigma| = 1 - p_t); VFL on hard targets with gamma = 0 and
    alpha = 1 is the BCE; FL* at gamma = 1, beta = 0 is the BCE."""
    x, _ = make_dense("qfl", dtype=torch.float64)
    t = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) < 0.3).double()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    assert_close(quality_focal_loss(x, t, beta=2.0), focal_triton.sigmoid_focal_loss(x, t, alpha=-1, gamma=2.0))
    assert_close(varifocal_loss(x, t, alpha=1.0, gamma=0.0), bce)
    assert_close(sigmoid_focal_loss_star(x, t), bce)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("params", [dict(), dict(alpha=0.25, gamma=2.0), dict(alpha=0.75, gamma=0.5)])
def test_fl_star_matches_fvcore(backend, params, reduction):
    x, t = make_dense("fl_star", dtype=torch.float64)
    assert_close(sigmoid_focal_loss_star(x, t, reduction=reduction, **params),
                 fvcore_sigmoid_focal_loss_star(x, t, reduction=reduction, **params))


@pytest.mark.parametrize("iou_weighted", [True, False])
def test_vfl_matches_mmdet(backend, iou_weighted):
    """mmdet's varifocal_loss (VFNet's dense (M, C) IoU-aware targets): elementwise, "mean", and "mean" with
    avg_factor = our sum / (avg_factor + float32 eps), as mmdet's weight_reduce_loss divides."""
    x, q = make_dense("vfl", shape=(40, 7), dtype=torch.float64)
    kw = dict(alpha=0.75, gamma=2.0, iou_weighted=iou_weighted)
    assert_close(varifocal_loss(x, q, **kw), mmdet_varifocal_loss(x, q, reduction="none", **kw))
    assert_close(varifocal_loss(x, q, reduction="mean", **kw), mmdet_varifocal_loss(x, q, **kw))
    eps = torch.finfo(torch.float32).eps
    assert_close(varifocal_loss(x, q, reduction="sum", **kw) / (12 + eps),
                 mmdet_varifocal_loss(x, q, avg_factor=12, **kw))


def test_qfl_matches_mmdet(backend):
    """mmdet's quality_focal_loss (GFL's (label, score) targets, background = C, per-anchor weights summed over
    classes, avg_factor) is focal_loss(loss="qfl") with background=C, ignore_index=None, normalizer=avg_factor +
    float32 eps; its per-anchor "none" is our "none" summed over classes; the dense form on one-hot * score targets
    gives the same numbers."""
    m, c = 60, 7
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(m, c, generator=g, dtype=torch.float64) * 3).to(DEVICE)
    labels = torch.randint(0, c + 1, (m,), generator=g).to(DEVICE)  # c = background
    score = torch.rand(m, generator=g, dtype=torch.float64).to(DEVICE)
    weight = torch.rand(m, generator=g, dtype=torch.float64).to(DEVICE)
    eps = torch.finfo(torch.float32).eps
    ours = focal_triton.focal_loss(x, labels, loss="qfl", scores=score, weights=weight, background=c,
                                   ignore_index=None, normalizer=9 + eps)
    assert_close(ours, mmdet_quality_focal_loss(x, (labels, score), weight, avg_factor=9))
    none = focal_triton.focal_loss(x, labels, loss="qfl", scores=score, background=c, ignore_index=None,
                                   reduction="none")
    assert_close(none.sum(-1), mmdet_quality_focal_loss(x, (labels, score), reduction="none"))
    dense_target = torch.nn.functional.one_hot(labels, c + 1)[:, :c].double() * score[:, None]
    assert_close(quality_focal_loss(x, dense_target), none)


def test_vfl_class_index_matches_vfnet_targets(backend):
    """VFNet builds cls_iou_targets = 0 with the positive's class set to its IoU: focal_loss(loss="vfl", scores=iou)
    from the labels gives mmdet's numbers without building that (M, C) tensor."""
    m, c = 60, 7
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(m, c, generator=g, dtype=torch.float64) * 3).to(DEVICE)
    labels = torch.randint(0, c + 1, (m,), generator=g).to(DEVICE)
    iou = torch.rand(m, generator=g, dtype=torch.float64).clamp(min=1e-6).to(DEVICE)
    target = torch.nn.functional.one_hot(labels, c + 1)[:, :c].double() * iou[:, None]
    eps = torch.finfo(torch.float32).eps
    ours = focal_triton.focal_loss(x, labels, loss="vfl", scores=iou, background=c, ignore_index=None,
                                   normalizer=11 + eps)
    assert_close(ours, mmdet_varifocal_loss(x, target, avg_factor=11))


# ---- class-index and multi-level forms ----------------------------------------------------------------------------

N, A, C = 2, 3, 5
SIZES = [(5, 3), (1, 2)]
M = A * sum(h * w for h, w in SIZES)
ML_PARAMS = {"fl_star": dict(alpha=0.25, gamma=2.0, beta=0.5), "qfl": dict(beta=1.5), "vfl": dict(gamma=1.5)}


def make_head(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = []
    for i, (h, w) in enumerate(SIZES):
        x = torch.randn((N, A * C, h, w), generator=g, dtype=torch.float64) * 3
        x.view(-1)[3::14] = 25.0
        x = x.to(dtype).to(DEVICE)
        levels.append(x.contiguous(memory_format=torch.channels_last) if i == 1 else x)
    labels = torch.randint(-2, C, (N, M), generator=g).to(DEVICE)
    scores = torch.rand((N, M), generator=g, dtype=torch.float64)
    scores.view(-1)[::7] = 1.0
    scores.view(-1)[1::7] = 0.0
    weights = torch.rand((N, M), generator=g).to(DEVICE)
    return levels, labels, scores.to(DEVICE), weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
@pytest.mark.parametrize("kind", ["fl_star", "qfl", "vfl"])
def test_multilevel_values_and_gradients(backend, poisoned, kind, dtype):
    """One launch over the levels (NCHW and channels_last), with ignore, weights and a per-image normalizer: the
    sum, the per-level "none" losses and the gradients against the float64 reference on the concatenated head."""
    levels, labels, scores, weights = make_head(dtype)
    sc = scores if kind != "fl_star" else None
    norm = torch.tensor([3.0, 5.0], device=DEVICE)
    kw = dict(loss=kind, scores=sc, weights=weights, **ML_PARAMS[kind])
    leaves = [x.detach().clone().requires_grad_(True) for x in levels]
    loss = focal_triton.multilevel_focal_loss(leaves, labels, A, normalizer=norm, **kw)
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [x.detach().double().requires_grad_(True) for x in levels]
    ref = class_index_ref(kind, flatten_levels(ref_leaves, A), labels, sc, weights, normalizer=norm,
                          **ML_PARAMS[kind])
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    sum_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == sum_dtype
    assert_close(loss, ref, dtype=sum_dtype if dtype == torch.float64 else torch.bfloat16, what="sum")
    for g, r, x in zip(grads, ref_grads, levels):
        assert g.dtype == dtype and g.stride() == x.stride()
        assert_close(g, r, what="grad")
    outs = focal_triton.multilevel_focal_loss(levels, labels, A, reduction="none", **kw)
    ref_none = unflatten_levels(class_index_ref(kind, flatten_levels([x.double() for x in levels], A), labels, sc,
                                                weights, reduction="none", **ML_PARAMS[kind]),
                                [tuple(x.shape) for x in levels], A)
    for o, r, x in zip(outs, ref_none, levels):
        assert o.stride() == x.stride()
        assert_close(o, r, what="none")


def test_multilevel_gradcheck_float64(backend):
    """gradcheck through the multi-level kernel for QFL with fractional beta (one small level: the interpreter runs
    one forward per logit)."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(1, 2 * 3, 2, 2, generator=g, dtype=torch.float64) * 2).to(DEVICE).requires_grad_(True)
    labels = torch.tensor([[0, -1, 2, -2, 1, 1, -1, 2]], device=DEVICE)
    scores = torch.rand(1, 8, generator=g, dtype=torch.float64).to(DEVICE)
    for kind, params in (("qfl", dict(beta=1.5)), ("vfl", dict(gamma=0.5)), ("fl_star", dict(gamma=2.0, beta=0.5))):
        sc = scores if kind != "fl_star" else None
        assert torch.autograd.gradcheck(lambda a: focal_triton.multilevel_focal_loss(
            [a], labels, 2, loss=kind, scores=sc, normalizer=2.0, **params), (x,), fast_mode=True), kind


def test_flat_form_fl_star_per_class_alpha_and_none(backend, poisoned):
    """focal_loss (..., C) with FL*'s per-class alpha, detectron2's label convention and a 0-d tensor normalizer;
    and "none" in the logits' shape."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 13, C, generator=g) * 4).to(DEVICE)
    labels = torch.randint(-1, C + 1, (2, 13), generator=g).to(DEVICE)
    alpha = torch.tensor([0.125, 0.25, 0.5, 0.75, 0.875], device=DEVICE)
    kw = dict(alpha=alpha, gamma=2.0, beta=0.25)
    norm = torch.tensor(6.0, device=DEVICE)
    got = focal_triton.focal_loss(x, labels, loss="fl_star", background=C, ignore_index=-1, normalizer=norm, **kw)
    assert_close(got, class_index_ref("fl_star", x, labels, ignore_index=-1, normalizer=norm, **kw),
                 dtype=torch.float32)
    none = focal_triton.focal_loss(x, labels, loss="fl_star", background=C, ignore_index=-1, reduction="none", **kw)
    assert none.shape == x.shape
    assert_close(none, class_index_ref("fl_star", x, labels, ignore_index=-1, reduction="none", **kw))


def test_class_index_is_deterministic(backend):
    levels, labels, scores, weights = make_head(torch.float32)
    runs = [focal_triton.multilevel_focal_loss(levels, labels, A, loss="vfl", scores=scores, weights=weights)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_gfl_head_one_call(backend):
    """A GFL head's classification loss in one call: per-level outputs, labels with background = C, the IoU score
    of each positive, normalized by the number of positives; equal to mmdet's per-level QFL summed over levels
    (flattened (M, C) per level, avg_factor the same for each)."""
    levels, labels, scores, _ = make_head(torch.float64, seed=4)
    labels = torch.where(labels < 0, torch.full_like(labels, C), labels)
    num_pos = float((labels < C).sum())
    ours = focal_triton.multilevel_focal_loss(levels, labels, A, loss="qfl", scores=scores, background=C,
                                              ignore_index=None, normalizer=num_pos + torch.finfo(torch.float32).eps)
    flat = flatten_levels(levels, A).reshape(-1, C)
    assert_close(ours, mmdet_quality_focal_loss(flat, (labels.reshape(-1), scores.reshape(-1)), avg_factor=num_pos))


# ---- modules, registration, validation ----------------------------------------------------------------------------

def test_modules(backend):
    x, t = make_dense("qfl", dtype=torch.float32)
    assert torch.equal(focal_triton.QualityFocalLoss(beta=1.5, reduction="sum")(x, t),
                       quality_focal_loss(x, t, beta=1.5, reduction="sum"))
    assert torch.equal(focal_triton.VarifocalLoss(alpha=0.5, iou_weighted=False)(x, t),
                       varifocal_loss(x, t, alpha=0.5, iou_weighted=False))
    assert torch.equal(focal_triton.FocalLossStar(gamma=2.0, beta=1.0, reduction="mean")(x, (t > 0).float()),
                       sigmoid_focal_loss_star(x, (t > 0).float(), gamma=2.0, beta=1.0, reduction="mean"))
    levels, labels, scores, weights = make_head(torch.float32)
    crit = focal_triton.MultiLevelFocalLoss(A, loss="vfl", gamma=1.5)
    assert torch.equal(crit(levels, labels, weights=weights, scores=scores),
                       focal_triton.multilevel_focal_loss(levels, labels, A, loss="vfl", gamma=1.5, scores=scores,
                                                          weights=weights))
    flat = flatten_levels(levels, A)
    assert torch.equal(focal_triton.FocalLoss(loss="qfl")(flat, labels, scores=scores),
                       focal_triton.focal_loss(flat, labels, loss="qfl", scores=scores))
    assert "loss='qfl'" in repr(focal_triton.FocalLoss(loss="qfl"))


@pytest.mark.parametrize("kind", [LossKind.FL_STAR, LossKind.QFL, LossKind.VFL])
def test_opcheck_dense(backend, device, kind):
    """The registered dense ops with the new kinds: schema, fake implementation, autograd registration."""
    from focal_triton import validation as V
    from focal_triton.ops.dense import op_args

    x, t = make_dense("qfl", shape=(3, 20))
    x.requires_grad_(True)
    ops = torch.ops.focal_triton
    call = V.dense_call(kind, x, t, "none", 0.25, 1.5, 0.5)
    torch.library.opcheck(ops.sigmoid_focal_loss.default, op_args(call))
    s = V.dense_call(kind, x, t, "sum", 0.25, 1.5, 0.5, iou_weighted=False).spec
    torch.library.opcheck(ops.sigmoid_focal_loss_backward.default,
                          (torch.tensor(1.5), x.detach(), t, int(s.kind), s.c0, s.c1, s.gamma, s.beta, "sum"))


def test_opcheck_multilevel_with_scores(backend, device):
    """The multi-level ops with the scores input (QFL): forward "sum" and the backward of "none"."""
    import dataclasses

    from focal_triton import validation as V
    from focal_triton.ops.multilevel import (backward_op_args, multilevel_focal_loss_backward_op,
                                             multilevel_focal_loss_op, op_args)

    g = torch.Generator().manual_seed(1)
    levels = [torch.randn(2, 2 * 3, 2, 3, generator=g).to(device).requires_grad_(True)]
    labels = torch.randint(-2, 3, (2, 12), generator=g).to(device)
    scores = torch.rand(2, 12, generator=g).to(device)
    options = dict(alpha=None, gamma=None, weights=None, label_smoothing=0.0, background=-1, ignore_index=-2,
                   normalizer=2.0, reduction="sum", check_labels=False, loss="qfl", scores=scores, beta=1.5,
                   iou_weighted=None, return_stats=False)
    call = V.multilevel_call(levels, labels, 2, options)
    torch.library.opcheck(multilevel_focal_loss_op, op_args(call))
    torch.library.opcheck(multilevel_focal_loss_op, op_args(dataclasses.replace(call, with_stats=True)))  # stats
    none = V.multilevel_call(levels, labels, 2, dict(options, normalizer=None, reduction="none"))
    torch.library.opcheck(multilevel_focal_loss_backward_op,
                          backward_op_args(none, [torch.randn_like(lv) for lv in levels], None))


def test_compile_fullgraph_gfl_stage(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def stage(levels, labels, scores):
        num_pos = ((labels >= 0) & (labels < C)).sum().clamp(min=1)
        return focal_triton.multilevel_focal_loss(levels, labels, A, loss="qfl", scores=scores, background=C,
                                                  ignore_index=-1, normalizer=num_pos, check_labels=False)

    compiled = torch.compile(stage, fullgraph=True, backend=counter)
    levels, labels, scores, _ = make_head(torch.float32)
    labels = labels.clamp(min=-1)
    torch.testing.assert_close(compiled(levels, labels, scores), stage(levels, labels, scores), rtol=1e-6, atol=0)
    assert counter.frame_count >= 1
    torch._dynamo.reset()


def test_autocast_returns_float32_loss(backend):
    """Under torch.autocast the variants, like FL, return a float32 loss from bfloat16 logits (read as they are) and
    a bfloat16 gradient; the values are the float32-math ones, rounded once."""
    x, q = make_dense("vfl", dtype=torch.bfloat16)
    leaf = x.detach().clone().requires_grad_(True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = varifocal_loss(leaf, q.float())
        total = quality_focal_loss(leaf, q, reduction="sum")
    assert loss.dtype == torch.float32 and total.dtype == torch.float32
    assert_close(loss, varifocal_ref(x, q), dtype=torch.float32)
    (grad,) = torch.autograd.grad(total, leaf)
    assert grad.dtype == torch.bfloat16


def test_no_host_sync_on_fake_tensors():
    """Fake tensors hold no values: the new kinds' forward and backward (scores included) read nothing on the host."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        levels = [torch.randn(2, A * C, h, w, requires_grad=True) for h, w in SIZES]
        labels = torch.randint(-2, C, (2, M))
        for kind in ("fl_star", "qfl", "vfl"):
            scores = torch.rand(2, M) if kind != "fl_star" else None
            loss = focal_triton.multilevel_focal_loss(levels, labels, A, loss=kind, scores=scores, check_labels=False,
                                                      normalizer=(labels >= 0).sum(1).clamp(min=1))
            assert [g.shape for g in torch.autograd.grad(loss, levels)] == [x.shape for x in levels]
        x = torch.randn(4, 30, requires_grad=True)
        for fn in (sigmoid_focal_loss_star, quality_focal_loss, varifocal_loss):
            torch.autograd.grad(fn(x, torch.rand(4, 30), reduction="mean"), x)


@pytest.mark.parametrize("call, message", [
    (lambda x, lab, s: focal_triton.focal_loss(x, lab, loss="gfl"), "loss must be one of"),
    (lambda x, lab, s: focal_triton.focal_loss(x, lab, loss="qfl"), "needs scores"),
    (lambda x, lab, s: focal_triton.focal_loss(x, lab, scores=s), "scores applies to"),
    (lambda x, lab, s: focal_triton.focal_loss(x, lab, loss="qfl", scores=s[:, :-1]), "scores must have"),
    (lambda x, lab, s: focal_triton.focal_loss(x, lab, loss="qfl", scores=s, alpha=0.25), "takes no alpha"),
    (lambda x, lab, s: focal_triton.focal_loss(x, lab, loss="vfl", scores=s, beta=1.0), "takes no beta"),
    (lambda x, lab, s: focal_triton.focal_loss(x, lab, loss="fl", iou_weighted=False), "takes no iou_weighted"),
    (lambda x, lab, s: focal_triton.focal_loss(x, lab, loss="fl_star", gamma=0.0), "gamma of FL"),
    (lambda x, lab, s: focal_triton.focal_loss(x, lab, loss="qfl", scores=s, beta=-1.0), "beta of the quality"),
    (lambda x, lab, s: focal_triton.focal_loss(x, lab, loss="vfl", scores=s, alpha=-0.5), "alpha of the varifocal"),
    (lambda x, lab, s: focal_triton.focal_loss(x, lab, loss="vfl", scores=s, label_smoothing=0.1),
     "label_smoothing applies"),
    (lambda x, lab, s: sigmoid_focal_loss_star(x, x.detach().sigmoid(), gamma=-1.0), "gamma of FL"),
    (lambda x, lab, s: sigmoid_focal_loss_star(x, x.detach().sigmoid(), beta=math.inf), "beta of FL"),
    (lambda x, lab, s: quality_focal_loss(x, x.detach().sigmoid(), beta=math.nan), "beta of the quality"),
    (lambda x, lab, s: varifocal_loss(x, x.detach().sigmoid(), alpha=-1.0), "alpha of the varifocal"),
])
def test_bad_arguments_name_the_argument(call, message):
    x = torch.randn(2, 6, 4, device=DEVICE, requires_grad=True)
    labels = torch.randint(-1, 4, (2, 6), device=DEVICE)
    scores = torch.rand(2, 6, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        call(x, labels, scores)
    with pytest.raises(TypeError, match="iou_weighted must be a bool"):
        varifocal_loss(x, x.detach(), iou_weighted=1)
