"""Bad input gets an exception that names the argument, raised before any kernel runs."""
import pytest
import torch

import focal_triton
from focal_triton.cpu import dense as cpu_dense
from focal_triton.kernels import dense as kernels_dense


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Any attempt to run an implementation fails the test: validation must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("an implementation ran before the input was rejected")

    for module in (kernels_dense, cpu_dense):
        monkeypatch.setattr(module, "forward", forbidden)
        monkeypatch.setattr(module, "backward", forbidden)


def call(x=None, t=None, **kw):
    x = torch.zeros(4, 3) if x is None else x
    t = torch.zeros(4, 3) if t is None else t
    return focal_triton.sigmoid_focal_loss(x, t, **kw)


@pytest.mark.parametrize("reduction", ["avg", "MEAN", None, ""])
def test_unknown_reduction_matches_torchvision(reduction):
    with pytest.raises(ValueError, match="Invalid Value for arg 'reduction'"):
        call(reduction=reduction)


@pytest.mark.parametrize("alpha", [-0.5, 1.5, 2, -2, float("nan"), float("inf")])
def test_alpha_out_of_range_matches_torchvision(alpha):
    with pytest.raises(ValueError, match="Invalid alpha value"):
        call(alpha=alpha)
    tv = pytest.importorskip("torchvision.ops")
    if alpha == alpha:  # torchvision's own check, for the same values
        with pytest.raises(ValueError, match="Invalid alpha value"):
            tv.sigmoid_focal_loss(torch.zeros(4, 3), torch.zeros(4, 3), alpha=alpha)


@pytest.mark.parametrize("gamma", [-0.1, -2, float("nan"), float("inf")])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        call(gamma=gamma)


@pytest.mark.parametrize("name", ["alpha", "gamma"])
def test_parameters_must_be_numbers(name):
    with pytest.raises(TypeError, match=name):
        call(**{name: torch.tensor(0.5)})
    with pytest.raises(TypeError, match=name):
        call(**{name: "0.5"})


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"targets must have the shape of inputs \(4, 3\), got \(3, 4\)"):
        call(t=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="targets must have the shape"):
        call(t=torch.zeros(1, 3))  # no broadcasting, as in torchvision


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_non_floating(dtype):
    with pytest.raises(TypeError, match="inputs must be float16, bfloat16, float32 or float64"):
        call(x=torch.zeros(4, 3, dtype=dtype))
    with pytest.raises(TypeError, match="targets must be a floating-point tensor"):
        call(t=torch.zeros(4, 3, dtype=dtype))


def test_not_tensors():
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        focal_triton.sigmoid_focal_loss([0.0, 1.0], torch.zeros(2))
    with pytest.raises(TypeError, match="targets must be a torch.Tensor"):
        focal_triton.sigmoid_focal_loss(torch.zeros(2), [0.0, 1.0])


def test_different_devices():
    with pytest.raises(ValueError, match=r"targets must be on the device of inputs \(cpu\), got meta"):
        call(t=torch.zeros(4, 3, device="meta"))


def test_targets_requiring_grad():
    with pytest.raises(ValueError, match=r"targets requires grad.*targets.detach\(\)"):
        call(t=torch.zeros(4, 3, requires_grad=True))
    with torch.no_grad():  # fine when no graph is recorded
        with pytest.raises(AssertionError, match="an implementation ran"):
            call(t=torch.zeros(4, 3, requires_grad=True))


def test_module_checks_at_construction():
    with pytest.raises(ValueError, match="Invalid alpha value"):
        focal_triton.SigmoidFocalLoss(alpha=3)
    with pytest.raises(ValueError, match="gamma"):
        focal_triton.SigmoidFocalLoss(gamma=-1)
    with pytest.raises(ValueError, match="reduction"):
        focal_triton.SigmoidFocalLoss(reduction="avg")


@pytest.mark.parametrize("name, value", [("alpha", True), ("gamma", False), ("alpha", "0.25"), ("gamma", None)])
def test_one_rule_for_numbers(name, value):
    """A number argument takes a Python int or float: not a bool, a string or None, in the function and when a
    module is built."""
    with pytest.raises(TypeError, match=f"{name} must be a Python number"):
        call(**{name: value})
    with pytest.raises(TypeError, match=f"{name} must be a Python number"):
        focal_triton.SigmoidFocalLoss(**{name: value})
