"""The fast CPU path of the class-index loss (focal_triton/torch_path_fast.py): every element as a negative over
raw storage, then positives and ignored anchors fixed up by index. Checked against the float64 reference and the
general torch path, and checked to have run (not silently fallen back)."""
import pytest
import torch
from test_multilevel_focal_loss import HWS, SMALL, check_multilevel, leaves_of, make_labels, make_levels

import focal_triton
from focal_triton import torch_path_fast


@pytest.fixture
def fast(monkeypatch):
    """Force the torch path and record whether the fast path produced each result (None = fell back)."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")
    calls = []
    for name in ("forward_sum", "backward_scalar"):
        real = getattr(torch_path_fast, name)

        def spy(*a, _real=real, _name=name, **k):
            out = _real(*a, **k)
            calls.append((_name, out is not None))
            return out

        monkeypatch.setattr(torch_path_fast, name, spy)
    return calls


def general(levels, labels, monkeypatch, **kw):
    """Loss and gradients of the general torch path."""
    monkeypatch.setattr(torch_path_fast, "applicable", lambda *a: False)
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, 3, **kw)
    grads = torch.autograd.grad(loss, leaves)
    monkeypatch.undo()
    return loss, grads


@pytest.mark.parametrize("layout", ["nchw", "cl", "mix"])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 1.5, 3.0])
def test_matches_reference(fast, layout, gamma):
    check_multilevel(make_levels(HWS, layout=layout), make_labels(hws=HWS), gamma=gamma,
                     normalizer=torch.tensor([3.0, 5.0]))
    assert ("forward_sum", True) in fast and ("backward_scalar", True) in fast


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(fast, dtype):
    check_multilevel(make_levels(dtype=dtype, layout="mix"), make_labels(), label_smoothing=0.1)
    assert fast == [("forward_sum", True), ("backward_scalar", True)]


@pytest.mark.parametrize("convention", [dict(background=-1, ignore_index=-2), dict(background=5, ignore_index=-1),
                                        dict(background=5, ignore_index=None)])
def test_positives_and_ignored_fixups(fast, convention):
    labels = make_labels(p_pos=0.4, p_ign=0.3, convention={-2: "torchvision", -1: "detectron2", None: "mmdet"}[
        convention["ignore_index"]])
    check_multilevel(make_levels(layout="mix", scale=6.0), labels, alpha=0.3, label_smoothing=0.2, **convention)
    assert fast == [("forward_sum", True), ("backward_scalar", True)]


def test_ignored_anchors_with_inf_and_nan_logits_give_exact_zero(fast, monkeypatch):
    levels = make_levels(layout="mix")
    levels[0] = levels[0].contiguous()                    # NCHW: (N, A, C, HW) view of the storage
    labels = torch.full((2, sum(h * w for h, w in SMALL) * 3), -2)
    labels[0, 1] = 2                                      # image 0, position 0, anchor 1: a positive
    labels[0, 0] = -1                                     # image 0, position 0, anchor 0: background
    levels[0].view(2, 3, 5, 15)[:, :, :, 1:] = float("inf")  # every other anchor is ignored: inf and NaN logits
    levels[0].view(2, 3, 5, 15)[1] = float("nan")
    levels[1].fill_(float("-inf"))
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, 3, label_smoothing=0.1)
    loss.backward()
    assert fast == [("forward_sum", True), ("backward_scalar", True)]
    ref, ref_grads = general(levels, labels, monkeypatch, label_smoothing=0.1)
    assert torch.isfinite(loss) and loss > 0
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    for leaf, r in zip(leaves, ref_grads):
        torch.testing.assert_close(leaf.grad, r, rtol=1e-5, atol=1e-7)
    assert leaves[1].grad.abs().sum() == 0 and leaves[0].grad[1].abs().sum() == 0
    assert leaves[0].grad[0].view(3, 5, 15)[:2, :, 0].abs().sum() > 0


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 100.0])
def test_non_finite_negatives_fall_back_to_the_general_path(fast, monkeypatch, value):
    levels = make_levels(layout="mix")
    levels[1].view(-1)[3] = value
    labels = make_labels(p_pos=0.0, p_ign=0.0)            # element 3 is a negative
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, 3, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, leaves)
    ref, ref_grads = general(levels, labels, monkeypatch, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0, equal_nan=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, equal_nan=True)
    # inf, NaN, exp(100) = inf, and -inf with a smoothed target (-ts * x = inf) take the general path
    assert fast == [("forward_sum", False), ("backward_scalar", False)]


def test_weights_and_per_class_alpha_keep_the_general_path(fast):
    levels, labels = make_levels(), make_labels()
    check_multilevel(levels, labels, weights=torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)))
    check_multilevel(levels, labels, alpha=torch.tensor([0.125, 0.25, 0.5, 0.75, 0.875]))
    assert fast == []


def test_same_bits_for_any_worker_count(monkeypatch):
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")
    monkeypatch.setattr(torch_path_fast, "CHUNK", 64)   # many chunks, split over the workers
    levels, labels = make_levels(HWS, layout="mix"), make_labels(hws=HWS)
    results = []
    for workers in (1, 2, 3):
        monkeypatch.setattr(torch_path_fast, "WORKERS", workers)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
        leaves = leaves_of(levels)
        loss = focal_triton.multilevel_focal_loss(leaves, labels, 3)
        results.append((loss, torch.autograd.grad(loss, leaves)))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert all(torch.equal(g, r) for g, r in zip(grads, results[0][1]))


def test_forward_computes_the_gradient_the_backward_scales(fast, monkeypatch):
    """float32 logits that require grad: the forward keeps the gradient, the backward only scales it (no second
    pass over the logits); a second backward (retain_graph) recomputes; the same values either way."""
    levels, labels = make_levels(HWS, layout="mix"), make_labels(hws=HWS)
    passes = []
    real_map = torch_path_fast._map
    monkeypatch.setattr(torch_path_fast, "_map", lambda fn, tasks: passes.append(fn.__name__) or real_map(fn, tasks))
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, 3, normalizer=torch.tensor([3.0, 5.0]))
    assert len(torch_path_fast._STASH) == 1
    (g1,) = torch.autograd.grad(loss, leaves[0], retain_graph=True)
    assert passes == ["chunk_sum"] and not torch_path_fast._STASH
    (g2,) = torch.autograd.grad(loss * 1.0, leaves[0])
    assert passes == ["chunk_sum", "chunk_grad"]
    assert torch.equal(g1, g2)                            # the same bits from either pass
    ref_loss, ref_grads = general(levels, labels, monkeypatch, normalizer=torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(g1, ref_grads[0], rtol=1e-5, atol=1e-8)


def test_no_gradient_kept_without_requires_grad_and_freed_with_the_logits(fast):
    levels, labels = make_levels(), make_labels()
    focal_triton.multilevel_focal_loss(levels, labels, 3)
    assert not torch_path_fast._STASH
    leaves = leaves_of(levels)
    focal_triton.multilevel_focal_loss(leaves, labels, 3)
    assert len(torch_path_fast._STASH) == 1
    del leaves
    import gc

    gc.collect()
    assert not torch_path_fast._STASH


def test_in_place_change_between_forward_and_backward_is_caught(fast):
    """The kept gradient is keyed on the tensors' versions; autograd already refuses such a backward."""
    levels, labels = make_levels(), make_labels()
    leaves = leaves_of(levels)
    loss = focal_triton.multilevel_focal_loss(leaves, labels, 3)
    labels.neg_()
    key = torch_path_fast._key(leaves, labels, 0.25, 2.0, 0.0, -2, 3)
    assert key not in torch_path_fast._STASH
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, leaves)


def test_kept_gradient_belongs_to_its_normalizer_and_upstream(fast, monkeypatch):
    """The forward folds its normalizer into the kept gradient: a later forward on the same tensors with another
    normalizer replaces it, and the first loss's backward must then recompute with its own; an upstream gradient
    other than 1 scales the kept one."""
    levels, labels = make_levels(HWS, layout="mix"), make_labels(hws=HWS)
    leaves = leaves_of(levels)
    loss3 = focal_triton.multilevel_focal_loss(leaves, labels, 3, normalizer=3.0)
    loss5 = focal_triton.multilevel_focal_loss(leaves, labels, 3, normalizer=5.0)  # replaces the kept gradient
    (g3,) = torch.autograd.grad(loss3 * 2.5, leaves[0])
    (g5,) = torch.autograd.grad(loss5 * 2.5, leaves[0])
    _, ref3 = general(levels, labels, monkeypatch, normalizer=3.0)
    _, ref5 = general(levels, labels, monkeypatch, normalizer=5.0)
    torch.testing.assert_close(g3, 2.5 * ref3[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(g5, 2.5 * ref5[0], rtol=1e-5, atol=1e-8)
