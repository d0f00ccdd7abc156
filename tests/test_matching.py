"""focal_matching_cost (focal_triton/functional.py, ops/matching.py, kernels/matching.py, cpu/matching.py): the
focal class cost of DETR-style Hungarian matchers, on both backends (the Triton kernel, interpreted on CPU; the
torch path), against the float64 reference of tests/reference_matching.py and the formula of transformers'
matchers (RTDetrHungarianMatcher, src/transformers/loss/loss_rt_detr.py; DeformableDetrHungarianMatcher,
loss_deformable_detr.py), transcribed there."""
import math

import pytest
import torch
from reference_matching import (assert_matching_close, grounding_dino_class_cost, matching_cost_ref,
                                matching_terms_ref, transformers_matching_cost)

import focal_triton

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
N, C, G = 37, 11, 21  # not multiples of the interpreter's 8 x 16 tiles: masked rows and columns


def _logits(shape, dtype, device, seed=0, scale=6.0):
    """Normal logits (std 6: probabilities from ~0 to ~1) with ~1/7 of them saturated at +-25 (exact in every
    dtype)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    flat = x.view(-1)
    flat[3::14] = 25.0
    flat[10::14] = -25.0
    return x.to(dtype).to(device)


def _labels(g, c, device, dtype=torch.int64, seed=1):
    return torch.randint(0, c, (g,), generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


# (alpha, gamma): the matchers' defaults, the compiled-in integer exponents 0 and 3, fractional ones below and above
# 1, an integer beyond the compiled-in ones (runtime path), and the one-sided alphas.
OPTIONS = [(0.25, 2.0), (0.25, 0.0), (0.5, 3.0), (0.25, 0.5), (0.75, 1.5), (0.25, 5.0), (0.0, 2.0), (1.0, 2.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha, gamma", OPTIONS)
def test_matches_float64_reference(backend, device, dtype, alpha, gamma):
    x = _logits((N, C), dtype, device)
    labels = _labels(G, C, device, torch.int32 if gamma == 3.0 else torch.int64)
    cost = focal_triton.focal_matching_cost(x, labels, alpha, gamma)
    assert cost.shape == (N, G) and cost.is_contiguous() and not cost.requires_grad
    assert_matching_close(cost, x, labels, alpha, gamma, f"{backend} {dtype} alpha={alpha} gamma={gamma}")


def test_leading_dims_and_strided_views_are_read_in_place(backend, device):
    """(B, Q, C) logits flatten to (B*Q, C); a class-strided slice, a transposed (C, N) buffer and an expanded row
    give the same cost as their contiguous copies."""
    x = _logits((3, 5, 2 * C), torch.float32, device)
    labels = _labels(G, C, device)
    for view in (x[..., :C], x[..., ::2], x.flatten(0, 1)[:, :C].t().contiguous().t(), x[:1, :1, :C].expand(3, 5, C)):
        cost = focal_triton.focal_matching_cost(view, labels)
        assert cost.shape == (15, G)
        assert torch.equal(cost, focal_triton.focal_matching_cost(view.contiguous(), labels))
        assert_matching_close(cost, view, labels, 0.25, 2.0, "view")


def test_views_whose_tile_offsets_pass_int32_are_copied(device, monkeypatch):
    """The kernel's in-tile offsets are int32: a view whose offsets would pass 2**31 (here: the limit lowered to make
    a small transposed view one) is copied once and gives the same cost."""
    from focal_triton.kernels import matching as kernel

    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    view = _logits((C, 40), torch.float32, device).t()
    labels = _labels(G, C, device)
    expected = focal_triton.focal_matching_cost(view, labels)
    copies = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(kernel, "INT32_MAX", 100)
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: copies.append(t.shape) or real(t, *a, **k))
    assert torch.equal(focal_triton.focal_matching_cost(view, labels), expected)
    assert (40, C) in copies


def test_transformers_formula_where_it_is_accurate(backend, device):
    """For moderate logits (|x| <= 5: p in [0.0067, 0.9933]) the matchers' own formula, run in float32 as they run
    it, equals ours up to its 1e-8 (<= 1e-8 / p in each log) and float32's rounding of 1 - p near 1 (an error of
    ~4e-6 in that log at x = 5): within 1e-5."""
    x = (torch.rand(64, C, generator=torch.Generator().manual_seed(3)) * 10 - 5).to(device)
    labels = _labels(G, C, device)
    ours = focal_triton.focal_matching_cost(x, labels)
    stock = transformers_matching_cost(x, labels, 0.25, 2.0)
    assert stock.dtype == torch.float32
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-5)
    # In float64 the stock formula differs from the exact cost only by its 1e-8: at most 1e-8 / 0.0067 ~ 1.5e-6.
    torch.testing.assert_close(transformers_matching_cost(x.double(), labels, 0.25, 2.0),
                               matching_cost_ref(x, labels, 0.25, 2.0), rtol=0, atol=2e-6)


def test_grounding_dino_cost_through_all_classes(backend, device):
    """Grounding DINO's cost mixes the classes through label maps: the cost against every class, times the maps."""
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(40, C, generator=g) * 10 - 5).to(device)
    label_maps = torch.rand(G, C, generator=g).to(device)
    label_maps = label_maps / label_maps.sum(-1, keepdim=True)
    ours = focal_triton.focal_matching_cost(x, torch.arange(C, device=device)) @ label_maps.t()
    torch.testing.assert_close(ours, grounding_dino_class_cost(x, label_maps), rtol=0, atol=1e-5)


def test_transformers_formula_fails_for_16_bit_logits_where_ours_does_not(backend, device):
    """Where the matchers' formula is wrong: in bf16, p rounds to 1 from x ~ 6, -log(1 - p + 1e-8) stops at
    -log(1e-8) and the cost at -(1 - alpha) log(1e8) = -13.8 however large x (off by up to 61 at x = 100 here); in
    fp16 1e-8 rounds to 0, so the cost is -inf once p rounds to 1 (x > ~8.3) and +inf once p rounds to 0
    (x < ~-17). Ours is finite and matches float64 for the same logits."""
    labels = torch.zeros(1, dtype=torch.int64, device=device)
    xb = torch.tensor([7.0, 10.0, 20.0, 50.0, 100.0], dtype=torch.bfloat16, device=device)[:, None]
    stock = transformers_matching_cost(xb, labels, 0.25, 2.0).double()
    exact = matching_cost_ref(xb, labels, 0.25, 2.0)
    assert torch.allclose(stock, torch.full_like(stock, -0.75 * math.log(1e8)), atol=0.07)  # one bf16 ulp
    assert (stock - exact).abs().max() > 60
    ours = focal_triton.focal_matching_cost(xb, labels)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    assert_matching_close(ours, xb, labels, 0.25, 2.0, "bf16")
    xh = torch.tensor([-30.0, -18.0, 9.0, 20.0, 1000.0, 65504.0], dtype=torch.float16, device=device)[:, None]
    stock = transformers_matching_cost(xh, labels, 0.25, 2.0)
    assert not torch.isfinite(stock).any()
    ours = focal_triton.focal_matching_cost(xh, labels)
    assert torch.isfinite(ours).all()
    assert_matching_close(ours, xh, labels, 0.25, 2.0, "fp16")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.0, 0.5), (1.0, 0.0)])
def test_saturated_logits_up_to_the_dtype_max(backend, device, dtype, alpha, gamma):
    """|x| up to the largest finite value of the dtype: finite, and the reference's value (for x -> +inf the cost
    falls like -(1 - alpha) x, for x -> -inf it grows like alpha |x|)."""
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, -big, big / 3, -big / 7, 1e4, -1e4, 88.0, -104.0]], dtype=dtype, device=device)
    labels = torch.arange(8, device=device)
    cost = focal_triton.focal_matching_cost(x, labels, alpha, gamma)
    assert torch.isfinite(cost).all(), cost
    assert_matching_close(cost, x, labels, alpha, gamma, f"{dtype}")


@pytest.mark.parametrize("alpha", [0.25, 0.0, 1.0])
@pytest.mark.parametrize("gamma", [2.0, 0.0, 0.5, 1.5])
def test_infinite_logits_give_the_limits(backend, device, alpha, gamma):
    """x = +inf: (1 - p)**gamma (-log p) -> 0 and p**gamma (-log(1 - p)) -> inf, so the cost -> -inf, or 0 for
    alpha = 1 (no negative term). x = -inf: +inf, or 0 for alpha = 0 (no positive term)."""
    for dtype in DTYPES:
        x = torch.tensor([[float("inf"), float("-inf"), 1.0]], dtype=dtype, device=device)
        cost = focal_triton.focal_matching_cost(x, torch.tensor([0, 1, 2], device=device), alpha, gamma)
        plus = 0.0 if alpha == 1.0 else float("-inf")
        minus = 0.0 if alpha == 0.0 else float("inf")
        assert cost[0, :2].tolist() == [plus, minus], (dtype, cost)
        assert math.isfinite(cost[0, 2].item())


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.0, 0.0), (1.0, 1.5)])
def test_nan_propagates(backend, device, alpha, gamma):
    """A NaN logit gives NaN in every cost that reads it, and nowhere else."""
    x = _logits((9, C), torch.float32, device)
    x[2, 4] = float("nan")
    labels = torch.tensor([4, 0, 4, 7], device=device)
    cost = focal_triton.focal_matching_cost(x, labels, alpha, gamma)
    expected_nan = torch.zeros_like(cost, dtype=torch.bool)
    expected_nan[2, 0] = expected_nan[2, 2] = True
    assert torch.equal(cost.isnan(), expected_nan)


def test_empty_inputs(backend, device):
    for x, labels, shape in ((torch.zeros(0, C), _labels(G, C, "cpu"), (0, G)),
                             (torch.zeros(4, C), torch.zeros(0, dtype=torch.int64), (4, 0)),
                             (torch.zeros(2, 0, C, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.int32), (0, 0))):
        cost = focal_triton.focal_matching_cost(x.to(device), labels.to(device))
        assert cost.shape == shape and cost.dtype == torch.float32


def test_every_output_is_written(backend, device, poisoned):
    """torch.empty hands out NaN-filled memory here: an output element the implementation never writes fails."""
    for dtype in (torch.bfloat16, torch.float64):
        x = _logits((N, C), dtype, device)
        labels = _labels(G, C, device)
        cost = focal_triton.focal_matching_cost(x, labels)
        assert not cost.isnan().any()
        assert_matching_close(cost, x, labels, 0.25, 2.0, f"poisoned {dtype}")


def test_cpu_path_never_forms_class_probabilities():
    """The torch path gathers each chunk's (rows, G) logits: no tensor as large as the (N, C) logits is created
    (RT-DETR's 16 x 300 queries, 80 classes, 12 targets: the cost is 1/7 of the logits' size)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from focal_triton.cpu import matching as cpu_matching

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0]
                      if isinstance(t, torch.Tensor)}
            for o in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs:  # views: no copy
                    Largest.largest = max(Largest.largest, o.numel())
            return out

    x = _logits((4800, 80), torch.bfloat16, "cpu")
    labels = _labels(12, 80, "cpu")
    with Largest():
        cost = cpu_matching.forward(x, labels, 0.25, 2.0)
    assert Largest.largest == cost.numel() == 4800 * 12


def test_deterministic(backend, device):
    x = _logits((N, C), torch.bfloat16, device)
    labels = _labels(G, C, device)
    first = focal_triton.focal_matching_cost(x, labels, 0.25, 1.5)
    assert torch.equal(first, focal_triton.focal_matching_cost(x, labels, 0.25, 1.5))


def test_no_gradient(backend, device):
    """The cost is never differentiated: logits that require grad (grad mode on) are read detached, without an
    error; the result does not require grad."""
    x = _logits((N, C), torch.float32, device).requires_grad_(True)
    cost = focal_triton.focal_matching_cost(x, _labels(G, C, device))
    assert not cost.requires_grad and cost.grad_fn is None


def test_unchecked_labels_out_of_range_give_nan_columns(backend, device):
    """check_labels=False (for CUDA-graph capture) reads nothing out of range: such a target's column is NaN."""
    x = _logits((N, C), torch.float32, device)
    labels = torch.tensor([3, -1, C, 0], device=device)
    cost = focal_triton.focal_matching_cost(x, labels, check_labels=False)
    assert cost[:, 1:3].isnan().all() and not cost[:, [0, 3]].isnan().any()
    assert_matching_close(cost[:, [0, 3]], x, labels[[0, 3]], 0.25, 2.0, "valid columns")


def _bad_calls(device):
    x = torch.zeros(4, C, device=device)
    lab = torch.zeros(3, dtype=torch.int64, device=device)
    return [
        ((x.numpy(), lab), {}, TypeError, "logits must be a torch.Tensor"),
        ((torch.zeros((), device=device), lab), {}, ValueError, r"logits must have shape \(\.\.\., C\)"),
        ((torch.zeros(4, 0, device=device), lab), {}, ValueError, "C >= 1"),
        ((x.long(), lab), {}, TypeError, "logits must be float16"),
        ((x, lab.float()), {}, TypeError, "labels must be int32 or int64"),
        ((x, [0, 1]), {}, TypeError, "labels must be a torch.Tensor"),
        ((x, lab[None]), {}, ValueError, r"labels must have shape \(G,\)"),
        ((x, lab.to("meta")), {}, ValueError, "labels must be on the logits' device"),
        ((x, lab + C), {}, ValueError, rf"labels must be class indices in \[0, {C}\).*got {C} at index 0"),
        ((x, torch.tensor([0, -1], device=device)), {}, ValueError, "got -1 at index 1"),
        ((x, lab, 1.5), {}, ValueError, r"alpha of the matching cost must be in \[0, 1\], got 1.5"),
        ((x, lab, -1), {}, ValueError, "alpha of the matching cost"),
        ((x, lab, torch.tensor(0.25)), {}, TypeError, "alpha must be a Python number"),
        ((x, lab, 0.25, -1.0), {}, ValueError, "gamma must be a finite number >= 0"),
        ((x, lab, 0.25, float("nan")), {}, ValueError, "gamma must be a finite number >= 0"),
        ((x, lab), dict(check_labels=1), TypeError, "check_labels must be a bool"),
    ]


@pytest.mark.parametrize("case", range(16))
def test_bad_input_is_named_before_anything_runs(device, monkeypatch, case):
    from focal_triton.ops import backend as dispatch

    def never(*args, **kwargs):
        raise AssertionError("an implementation was reached")

    monkeypatch.setattr(dispatch, "implementation", never)
    args, kwargs, error, message = _bad_calls(device)[case]
    with pytest.raises(error, match=message):
        focal_triton.focal_matching_cost(*args, **kwargs)


def test_torch_compile_fullgraph(backend, device):
    """A matcher's cost stage compiled whole (no graph break), with the label check as a device-side assertion:
    the same numbers as eager, and a bad label fails when the graph runs."""
    torch._dynamo.reset()

    def stage(logits, labels, boxes, target_boxes):
        class_cost = focal_triton.focal_matching_cost(logits, labels)
        return 2.0 * class_cost + 5.0 * torch.cdist(boxes, target_boxes, p=1)

    compiled = torch.compile(stage, fullgraph=True, backend="aot_eager")
    x = _logits((2, 15, C), torch.bfloat16, device)
    labels = _labels(G, C, device)
    boxes, target_boxes = torch.rand(30, 4, device=device), torch.rand(G, 4, device=device)
    torch.testing.assert_close(compiled(x, labels, boxes, target_boxes), stage(x, labels, boxes, target_boxes),
                               rtol=0, atol=0)
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match="labels must be class indices"):
            compiled(x, labels + C, boxes, target_boxes)
    torch._dynamo.reset()


def test_torchscript(backend, device):
    """A scripted matcher stage calls the same op (focal_triton::api_focal_matching_cost, focal_triton/torchscript.py)
    with the same numbers and the eager errors."""
    @torch.jit.script
    def stage(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return focal_triton.focal_matching_cost(logits, labels, 0.25, gamma=1.5, check_labels=True)

    x = _logits((N, C), torch.bfloat16, device)
    labels = _labels(G, C, device)
    assert torch.equal(stage(x, labels), focal_triton.focal_matching_cost(x, labels, 0.25, 1.5))
    with pytest.raises(Exception, match="labels must be class indices"):
        stage(x, labels + C)


def test_opcheck(backend, device):
    """torch.library.opcheck: the registered op's schema, fake implementation and dispatch agree."""
    x = _logits((N, C), torch.float32, device)
    labels = _labels(G, C, device)
    torch.library.opcheck(torch.ops.focal_triton.focal_matching_cost.default, (x, labels, 0.25, 2.0),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_terms_reference_is_the_definition():
    """The reference's two terms at a few logits by hand: p = sigmoid(x), pos = alpha (1 - p)**2 (-log p),
    neg = (1 - alpha) p**2 (-log(1 - p))."""
    for x in (-3.0, 0.0, 0.7, 4.0):
        p = 1 / (1 + math.exp(-x))
        pos, neg = matching_terms_ref(torch.tensor([[x]], dtype=torch.float64), torch.tensor([0]), 0.25, 2.0)
        assert pos.item() == pytest.approx(0.25 * (1 - p) ** 2 * -math.log(p), rel=1e-12)
        assert neg.item() == pytest.approx(0.75 * p ** 2 * -math.log(1 - p), rel=1e-12)
