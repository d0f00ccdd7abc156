"""focal_triton.integrations.mmdet.FocalLoss gives mmdet's FocalLoss numbers. mmdet is not installed here (it needs
mmcv and mmengine): its semantics are re-stated below, in float64, from mmdet 3.x's
mmdet/models/losses/focal_loss.py (FocalLoss.forward: a target with pred's number of dims goes to
py_sigmoid_focal_loss, class labels are one-hot encoded with C + 1 columns and the background column dropped;
py_sigmoid_focal_loss's weight reshaping) and mmdet/models/losses/utils.py (weight_reduce_loss)."""
import pytest
import torch
import torch.nn.functional as F

from focal_triton.integrations.mmdet import FocalLoss, register

EPS = torch.finfo(torch.float32).eps
P, C = 37, 6


def mmdet_py_sigmoid_focal_loss(pred, target, weight=None, gamma=2.0, alpha=0.25, reduction="mean",
                                avg_factor=None):
    """mmdet's py_sigmoid_focal_loss then weight_reduce_loss, transcribed (float64)."""
    pred = pred.double()
    target = target.double()  # mmdet: target.type_as(pred)
    p = pred.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    if weight is not None:
        weight = weight.double()
        if weight.shape != loss.shape:
            if weight.size(0) == loss.size(0):
                weight = weight.view(-1, 1)
            else:
                assert weight.numel() == loss.numel()
                weight = weight.view(loss.size(0), -1)
        assert weight.ndim == loss.ndim
        loss = loss * weight
    if avg_factor is None:
        return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    if reduction == "mean":
        return loss.sum() / (avg_factor + EPS)
    assert reduction == "none"
    return loss


def mmdet_reference(pred, labels, weight=None, gamma=2.0, alpha=0.25, reduction="mean", avg_factor=None,
                    loss_weight=1.0):
    """mmdet: one-hot of labels with C + 1 columns, the background column dropped; the focal term; then
    weight_reduce_loss (weight per prior broadcast over classes; mean = sum / (avg_factor + eps) with avg_factor)."""
    pred = pred.double()
    target = F.one_hot(labels, num_classes=pred.shape[1] + 1)[:, :pred.shape[1]].double()
    p = pred.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * \
        (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    if weight is not None:
        weight = weight.double()
        loss = loss * (weight.view(-1, 1) if weight.numel() == loss.shape[0] else weight.view(loss.shape))
    if avg_factor is None:
        loss = {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    elif reduction == "mean":
        loss = loss.sum() / (avg_factor + EPS)
    return loss_weight * loss


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = (torch.randn(P, C, generator=g) * 3).requires_grad_(True)
    labels = torch.randint(0, C + 1, (P,), generator=g)  # C = background
    return pred, labels, torch.rand(P, generator=g)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_mmdet(backend, reduction, weighted):
    pred, labels, w = _inputs()
    weight = w if weighted else None
    loss = FocalLoss(loss_weight=2.0, reduction=reduction)(pred, labels, weight)
    ref = mmdet_reference(pred, labels, weight, reduction=reduction, loss_weight=2.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    (ref_grad,) = torch.autograd.grad(ref.sum(), pred)
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("avg_factor", [7.0, "tensor"])
def test_avg_factor_and_reduction_override(backend, avg_factor):
    pred, labels, w = _inputs(1)
    avg = torch.tensor(7.0) if avg_factor == "tensor" else avg_factor
    criterion = FocalLoss(gamma=1.5, alpha=0.4, reduction="sum")
    loss = criterion(pred, labels, w, avg_factor=avg, reduction_override="mean")
    ref = mmdet_reference(pred, labels, w, gamma=1.5, alpha=0.4, reduction="mean", avg_factor=7.0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="avg_factor"):
        criterion(pred, labels, avg_factor=avg)


@pytest.mark.parametrize("shape", ["per_class", "flat", "column"])
def test_weight_shapes(backend, shape):
    """A weight per prior and class (FSAF), also flattened, and a (num_priors, 1) column."""
    pred, labels, _ = _inputs(2)
    g = torch.Generator().manual_seed(3)
    weight = {"per_class": torch.rand(P, C, generator=g), "flat": torch.rand(P * C, generator=g),
              "column": torch.rand(P, 1, generator=g)}[shape]
    loss = FocalLoss()(pred, labels, weight, avg_factor=5.0)
    torch.testing.assert_close(loss.double(), mmdet_reference(pred, labels, weight, avg_factor=5.0), rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(ValueError, match="weight"):
        FocalLoss()(pred, labels, torch.rand(P + 1))


def test_mmdet_arguments():
    with pytest.raises(ValueError, match="use_sigmoid"):
        FocalLoss(use_sigmoid=False)
    with pytest.raises(ValueError, match="activated"):
        FocalLoss(activated=True)
    with pytest.raises(ValueError, match="reduction"):
        FocalLoss()(torch.randn(3, C), torch.zeros(3, dtype=torch.long), reduction_override="max")


def test_register_needs_mmdet():
    try:
        import mmdet  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError):
            register()
    else:
        assert register() is FocalLoss


# --- targets of pred's shape (one-hot or soft): mmdet 3.x's `pred.dim() == target.dim()` branch --------------------

def _dense_targets(kind, labels):
    g = torch.Generator().manual_seed(4)
    onehot = F.one_hot(labels, num_classes=C + 1)[:, :C]  # int64, as mmdet's own one-hot
    return {"onehot_int": onehot, "onehot_float": onehot.float(), "soft": torch.rand(P, C, generator=g)}[kind]


@pytest.mark.parametrize("kind", ["onehot_int", "onehot_float", "soft"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weight_shape", [None, "per_prior", "column", "per_class", "flat"])
def test_tensor_targets_match_mmdet(backend, kind, reduction, weight_shape):
    pred, labels, w = _inputs(5)
    target = _dense_targets(kind, labels)
    g = torch.Generator().manual_seed(6)
    weight = {None: None, "per_prior": w, "column": w.view(P, 1), "per_class": torch.rand(P, C, generator=g),
              "flat": torch.rand(P * C, generator=g)}[weight_shape]
    criterion = FocalLoss(gamma=1.5, alpha=0.3, loss_weight=0.5, reduction=reduction)
    loss = criterion(pred, target, weight)
    ref = 0.5 * mmdet_py_sigmoid_focal_loss(pred, target, weight, gamma=1.5, alpha=0.3, reduction=reduction)
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    (ref_grad,) = torch.autograd.grad(ref.sum(), pred)
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("avg_factor", [7.0, "tensor", 0.0])
def test_tensor_targets_avg_factor_and_override(backend, weighted, avg_factor):
    pred, labels, w = _inputs(7)
    target = _dense_targets("soft", labels)
    avg = torch.tensor(7.0) if avg_factor == "tensor" else avg_factor
    weight = w if weighted else None
    criterion = FocalLoss(reduction="sum", loss_weight=2.0)
    loss = criterion(pred, target, weight, avg_factor=avg, reduction_override="mean")
    ref = 2.0 * mmdet_py_sigmoid_focal_loss(pred, target, weight, reduction="mean",
                                            avg_factor=7.0 if avg_factor == "tensor" else avg_factor)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    none = criterion(pred, target, weight, avg_factor=avg, reduction_override="none")  # mmdet: avg_factor unused
    torch.testing.assert_close(none.double(), 2.0 * mmdet_py_sigmoid_focal_loss(pred, target, weight,
                                                                                reduction="none"),
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="avg_factor"):
        criterion(pred, target, avg_factor=avg)


def test_onehot_target_equals_labels(backend):
    """The two forms of the same targets give the same loss (fused class-index path vs dense path)."""
    pred, labels, w = _inputs(8)
    criterion = FocalLoss()
    for weight in (None, w):
        torch.testing.assert_close(criterion(pred, _dense_targets("onehot_int", labels), weight),
                                   criterion(pred, labels, weight), rtol=1e-5, atol=1e-7)


def test_tensor_target_errors():
    pred, labels, _ = _inputs(9)
    with pytest.raises(ValueError, match=r"target must have pred's shape \(37, 6\).*got \(37, 5\)"):
        FocalLoss()(pred, torch.zeros(P, C - 1))
    with pytest.raises(ValueError, match="weight must have shape"):
        FocalLoss()(pred, torch.zeros(P, C), torch.rand(P + 1))
