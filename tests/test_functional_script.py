"""The public functions under torch.jit.script (focal_triton.torchscript): the properties torchvision's
TestFocalLoss.test_jit and detectron2's sigmoid_focal_loss_jit rely on, in our own tests. Scripted calls run the
same registered ops as eager calls, so values and gradients are compared bitwise."""
import inspect
import warnings

import pytest
import torch

import focal_triton
from focal_triton import functional as F

REDUCTIONS = ["none", "mean", "sum"]
# A scripted error arrives as torch.jit.Error (a RuntimeError) carrying the eager exception's type and message.
SCRIPT_ERROR = RuntimeError
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def script(fn):
    """torch.jit.script, without its deprecation warning (recent torch deprecates TorchScript; its users still run it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(fn)


def diverse_pair(dtype, seed):
    """Logits and targets of every kind, as torchvision's focal-loss tests draw them: saturated, small and random
    logits; targets 0, 1 and random in [0, 1] (soft)."""
    g = torch.Generator().manual_seed(seed)
    shape = (6, 5)
    logits = torch.cat([torch.randn(shape, generator=g) * 30, torch.randn(shape, generator=g) * 1e-3,
                        torch.randn(shape, generator=g) * 3])
    targets = torch.cat([torch.zeros(shape), torch.ones(shape), torch.rand(shape, generator=g)])
    perm = torch.randperm(logits.shape[0], generator=g)
    return logits[perm].to(dtype), targets[perm].to(dtype)


def loss_and_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss, grad


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha, gamma", [(-1.0, 0.0), (0.0, 2.0), (0.58, 1.5), (1.0, 2.0), (0.25, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scripted_sigmoid_focal_loss_equals_eager(backend, reduction, alpha, gamma, dtype):
    """torch.jit.script of the function itself (torchvision's test_jit), called with keywords."""
    scripted = script(focal_triton.sigmoid_focal_loss)
    x, t = diverse_pair(dtype, seed=int(gamma * 10 + alpha * 100))
    loss, grad = loss_and_grad(scripted, x, t, gamma=gamma, alpha=alpha, reduction=reduction)
    ref, ref_grad = loss_and_grad(focal_triton.sigmoid_focal_loss, x, t, gamma=gamma, alpha=alpha,
                                  reduction=reduction)
    assert loss.dtype == dtype and loss.shape == ref.shape
    assert_same(loss, ref)
    assert_same(grad, ref_grad)


def _dense_calls(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # ints where the signature says float, positional and keyword arguments: as eager code may write them
    return (focal_triton.sigmoid_focal_loss(x, t, 0.25, 2, "sum")
            + focal_triton.sigmoid_focal_loss(x, t, alpha=-1, gamma=0, reduction="mean")
            + focal_triton.sigmoid_focal_loss_star(x, t, gamma=2, beta=1, reduction="sum")
            + focal_triton.quality_focal_loss(x, t.clamp(0, 1), reduction="sum")
            + focal_triton.varifocal_loss(x, t, iou_weighted=False, reduction="mean"))


_user_dense = script(_dense_calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_family_in_a_scripted_function(backend, dtype):
    x, t = diverse_pair(dtype, seed=3)
    loss, grad = loss_and_grad(_user_dense, x, t)
    ref, ref_grad = loss_and_grad(_dense_calls, x, t)
    assert_same(loss, ref)
    assert_same(grad, ref_grad)


def test_fvcore_style_star_jit():
    """detectron2 / fvcore: sigmoid_focal_loss_star_jit = torch.jit.script(sigmoid_focal_loss_star)."""
    star_jit = script(focal_triton.sigmoid_focal_loss_star)
    x, t = diverse_pair(torch.float64, seed=4)
    loss, grad = loss_and_grad(star_jit, x, t, -1, 1, 0.5, "sum")
    ref, ref_grad = loss_and_grad(focal_triton.sigmoid_focal_loss_star, x, t, -1, 1, 0.5, "sum")
    assert_same(loss, ref)
    assert_same(grad, ref_grad)


# --- the class-index forms --------------------------------------------------------------------------------------

N, M, C = 2, 11, 4


def _labels(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-2, C, (N, M), generator=g)  # classes, background -1, ignored -2
    return labels, torch.rand(N, M, generator=g)


def _class_index_calls(x: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, scores: torch.Tensor,
                      alpha: torch.Tensor, normalizer: torch.Tensor) -> torch.Tensor:
    return (focal_triton.focal_loss(x, labels)
            + focal_triton.focal_loss(x, labels, alpha=alpha, gamma=1, weights=w, normalizer=normalizer)
            + focal_triton.focal_loss(x, labels, alpha=-1, gamma=0.5, label_smoothing=0.1, normalizer=7)
            + focal_triton.focal_loss(x, labels.clamp(min=-1), ignore_index=None, loss="fl_star", gamma=2)
            + focal_triton.focal_loss(x, labels, loss="qfl", scores=scores, normalizer=3.5)
            + focal_triton.focal_loss(x, labels, loss="vfl", scores=scores, iou_weighted=False)
            + focal_triton.focal_loss(x, labels, reduction="none").sum())


_user_class_index = script(_class_index_calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scripted_focal_loss_equals_eager(backend, dtype):
    """Every option of the class-index form, a per-class alpha and per-image normalizer included."""
    x = (torch.randn(N, M, C, generator=torch.Generator().manual_seed(5)) * 4).to(dtype)
    labels, w = _labels(6)
    args = (labels, w.to(dtype), w.to(dtype), torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=dtype),
            torch.tensor([3.0, 5.0], dtype=dtype))
    loss, grad = loss_and_grad(_user_class_index, x, *args)
    ref, ref_grad = loss_and_grad(_class_index_calls, x, *args)
    assert_same(loss, ref)
    assert_same(grad, ref_grad)


@script
def _user_multilevel(levels: list[torch.Tensor], labels: torch.Tensor, normalizer: torch.Tensor) -> torch.Tensor:
    return focal_triton.multilevel_focal_loss(levels, labels, 2, normalizer=normalizer, background=4)  # C


def test_scripted_multilevel_sum_equals_eager(backend):
    g = torch.Generator().manual_seed(7)
    levels = [torch.randn(N, 2 * C, 3, 2, generator=g, requires_grad=True),
              torch.randn(N, 2 * C, 1, 2, generator=g, requires_grad=True)]
    labels = torch.randint(-1, C + 1, (N, 16), generator=g)  # classes, background C
    labels[labels == -1] = -2  # ignored
    normalizer = torch.tensor([4.0, 2.0])
    loss = _user_multilevel(levels, labels, normalizer)
    grads = torch.autograd.grad(loss, levels)
    ref = focal_triton.multilevel_focal_loss(levels, labels, 2, normalizer=normalizer, background=4)  # C
    ref_grads = torch.autograd.grad(ref, levels)
    assert_same(loss, ref)
    for a, b in zip(grads, ref_grads):
        assert_same(a, b)


# --- errors, saving, modules, autocast --------------------------------------------------------------------------

def test_scripted_calls_raise_the_eager_messages():
    scripted = script(focal_triton.sigmoid_focal_loss)
    x, t = torch.zeros(4, 3), torch.zeros(4, 3)
    with pytest.raises(SCRIPT_ERROR, match="Invalid alpha value: 2.0"):
        scripted(x, t, alpha=2.0)
    with pytest.raises(SCRIPT_ERROR, match="gamma must be a finite number >= 0, got nan"):
        scripted(x, t, gamma=float("nan"))
    with pytest.raises(SCRIPT_ERROR, match="Invalid Value for arg 'reduction'"):
        scripted(x, t, reduction="avg")
    with pytest.raises(SCRIPT_ERROR, match=r"targets must have the shape of inputs \(4, 3\), got \(3, 4\)"):
        scripted(x, torch.zeros(3, 4))
    with pytest.raises(SCRIPT_ERROR, match="targets must be a floating-point tensor"):
        _user_dense(x, torch.zeros(4, 3, dtype=torch.long))

    labels, w = _labels(8)
    x = torch.zeros(N, M, C)
    with pytest.raises(SCRIPT_ERROR, match="labels must be a class in"):
        _user_class_index(x, labels.clamp(max=C) + 1, w, w, torch.full((C,), 0.25), torch.ones(N))
    with pytest.raises(SCRIPT_ERROR, match=r"alpha as a tensor must have shape \(num_classes,\) = \(4,\)"):
        _user_class_index(x, labels, w, w, torch.full((C + 1,), 0.25), torch.ones(N))


@script
def _with_stats(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return focal_triton.focal_loss(x, labels, return_stats=True)


@script
def _multilevel_none(levels: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    return focal_triton.multilevel_focal_loss(levels, labels, 1, reduction="none")


def test_what_torchscript_cannot_return_is_refused_clearly():
    labels, _ = _labels(9)
    with pytest.raises(SCRIPT_ERROR, match=r"return_stats=True\) is not available under TorchScript"):
        _with_stats(torch.zeros(N, M, C), labels)
    with pytest.raises(SCRIPT_ERROR, match=r"reduction='none'\) is not available under TorchScript"):
        _multilevel_none([torch.zeros(N, C, M, 1)], labels)


def test_saved_and_loaded(tmp_path):
    x, t = diverse_pair(torch.float64, seed=10)
    labels, w = _labels(11)
    xc = torch.randn(N, M, C, dtype=torch.float64)
    args = (labels, w.double(), w.double(), torch.full((C,), 0.3, dtype=torch.float64),
            torch.tensor([3.0, 5.0], dtype=torch.float64))
    for fn, inputs in ((_user_dense, (x, t)), (_user_class_index, (xc,) + args)):
        path = tmp_path / "fn.pt"
        torch.jit.save(fn, str(path))
        assert_same(torch.jit.load(str(path))(*inputs), fn(*inputs))


@pytest.mark.parametrize("module", [focal_triton.SigmoidFocalLoss(0.4, 1.0, "sum"), focal_triton.FocalLossStar(),
                                    focal_triton.QualityFocalLoss(reduction="mean"),
                                    focal_triton.VarifocalLoss(iou_weighted=False)])
def test_dense_modules_script(module):
    x, t = diverse_pair(torch.float64, seed=12)
    scripted = script(module)
    assert_same(scripted(x, t), module(x, t))


@pytest.mark.parametrize("module", [focal_triton.FocalLoss(), focal_triton.MultiLevelFocalLoss(9)])
def test_class_index_modules_refuse_with_the_way_out(module):
    name = type(module).__name__
    with pytest.raises(RuntimeError, match=f"focal_triton.{name} cannot be scripted.*call focal_triton"):
        script(torch.nn.Sequential(module))  # also as a submodule


def test_autocast_output_dtype_as_eager():
    """Under CPU autocast a scripted call returns float32 for 16-bit logits, as eager (the kernel reads the
    autocast state in Python; TorchScript's own is_autocast_cpu_enabled is not used)."""
    scripted = script(focal_triton.sigmoid_focal_loss)
    x, t = diverse_pair(torch.bfloat16, seed=13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, ref = scripted(x, t, reduction="sum"), focal_triton.sigmoid_focal_loss(x, t, reduction="sum")
    assert loss.dtype == ref.dtype == torch.float32
    assert_same(loss, ref)


@pytest.mark.parametrize("fn", [F.sigmoid_focal_loss, F.sigmoid_focal_loss_star, F.quality_focal_loss,
                                F.varifocal_loss, F.focal_loss, F.multilevel_focal_loss, F.focal_matching_cost])
def test_op_schema_is_the_signature(fn):
    """Each op takes the function's arguments, in its order, with its defaults (what TorchScript callers see)."""
    op = getattr(torch.ops.focal_triton, f"api_{fn.__name__}").default
    params = list(inspect.signature(fn).parameters.values())
    args = op._schema.arguments
    assert [a.name for a in args] == [p.name for p in params]
    for a, p in zip(args, params):
        assert a.kwarg_only == (p.kind == inspect.Parameter.KEYWORD_ONLY)
        if p.default is inspect.Parameter.empty:
            assert not a.has_default_value()
        else:
            assert a.default_value == p.default, a.name


def test_the_package_imports_without_torchs_builtin_table():
    """torch.jit._builtins._register_builtin is private: a torch without it still imports focal_triton and runs
    every eager call (only calls from scripted code lose their compile target)."""
    import os
    import subprocess
    import sys

    code = """
import sys, types, torch
import torch.jit._builtins as b
stub = types.ModuleType("torch.jit._builtins")
stub.__dict__.update({k: v for k, v in vars(b).items() if k != "_register_builtin"})
sys.modules["torch.jit._builtins"] = stub
import focal_triton
x = torch.randn(3, 4, requires_grad=True)
loss = focal_triton.sigmoid_focal_loss(x, (torch.rand(3, 4) < 0.3).float(), reduction="sum")
loss.backward()
print("ok", hasattr(torch.ops.focal_triton, "api_sigmoid_focal_loss"))
"""
    env = {**os.environ, "FOCAL_TRITON_BACKEND": "torch"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok True", r.stdout + r.stderr[-3000:]
