"""The registered ops (torch.ops.focal_triton.*) pass torch.library.opcheck: schema, fake (meta) implementation,
autograd registration and AOT dispatch, on the same registration GPU users get."""
import pytest
import torch

import focal_triton  # noqa: F401  (registers the ops)
from focal_triton import validation as V
from focal_triton.losses import LossKind
from focal_triton.ops.dense import op_args

OPS = torch.ops.focal_triton


def _args(x, t, gamma, reduction, out_dtype=None, requires_grad=True):
    """The op's arguments of sigmoid_focal_loss(x, t, 0.25, gamma, reduction) (validation's record), with another
    out_dtype (what autocast asks for) or requires_grad where given."""
    args = list(op_args(V.dense_call(LossKind.FL, x, t, reduction, 0.25, gamma)))
    args[-2] = out_dtype or args[-2]
    args[-1] = requires_grad
    return tuple(args)


def _inputs(shape, device, channels_last=False):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(device)
    t = (torch.rand(shape, generator=g) < 0.3).float().to(device)
    if channels_last:
        x, t = x.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    return x.requires_grad_(True), t


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("gamma", [2.0, 0.5])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_forward(backend, device, reduction, channels_last, gamma, requires_grad):
    """requires_grad=True on the torch path: the forward also returns the gradient it computed."""
    x, t = _inputs((2, 3, 5, 7), device, channels_last)
    torch.library.opcheck(OPS.sigmoid_focal_loss.default, _args(x, t, gamma, reduction, requires_grad=requires_grad))


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_opcheck_forward_upcast(backend, device, reduction):
    """upcast (what autocast asks for): a float32 loss from bfloat16 logits, gradients back in bfloat16."""
    x, t = _inputs((4, 33), device)
    x, t = x.detach().to(torch.bfloat16).requires_grad_(True), t.to(torch.bfloat16)
    torch.library.opcheck(OPS.sigmoid_focal_loss.default, _args(x, t, 2.0, reduction, torch.float32))
    assert OPS.sigmoid_focal_loss.default(*_args(x, t, 2.0, reduction, torch.float32))[0].dtype == torch.float32


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_opcheck_backward(backend, device, reduction):
    x, t = _inputs((3, 50), device)
    grad = torch.randn(3, 50, device=device) if reduction == "none" else torch.tensor(1.5, device=device)
    s = V.dense_call(LossKind.FL, x, t, reduction, 0.25, 2.0).spec
    torch.library.opcheck(OPS.sigmoid_focal_loss_backward.default,
                          (grad, x.detach(), t, int(s.kind), s.c0, s.c1, s.gamma, s.beta, reduction))


def test_fake_tensor_shapes_and_layout():
    """The fake implementation predicts the real output's shape, dtype and strides (channels_last kept)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 12, 5, 7, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        t = torch.empty(2, 12, 5, 7, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        (out,) = OPS.sigmoid_focal_loss(*_args(x, t, 2.0, "none", requires_grad=False))
        assert out.shape == x.shape and out.dtype == torch.bfloat16 and out.stride() == x.stride()
        assert OPS.sigmoid_focal_loss(*_args(x, t, 2.0, "sum", requires_grad=False))[0].shape == ()
