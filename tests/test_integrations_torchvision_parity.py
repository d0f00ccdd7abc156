"""Parity with torchvision's RetinaNet classification loss: RetinaNetClassificationHead.compute_loss on the
concatenated (N, HWA, K) logits vs focal_triton.multilevel_focal_loss on the per-level (N, A*K, H, W) head outputs,
with torchvision's per-image normalization by max(1, num_foreground). Random weights, no download."""
import pytest
import torch
from conftest import DEVICE
from helpers import LogitCopies
from reference_multilevel import flatten_levels, multilevel_value_and_grads

import focal_triton

retinanet = pytest.importorskip("torchvision.models.detection.retinanet")

IN_CH, A, K = 8, 3, 5
HWS = [(6, 5), (3, 3), (2, 1)]
M = sum(h * w for h, w in HWS) * A


def make_head(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    head = retinanet.RetinaNetClassificationHead(IN_CH, A, K)
    # torchvision's init gives every logit ~ -4.6 (prior 0.01); spread them so positives and negatives of every
    # confidence occur, as during training
    torch.nn.init.normal_(head.cls_logits.weight, std=0.3)
    return head.to(dtype).to(DEVICE)


def make_features(n, dtype=torch.float32, channels_last=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn((n, IN_CH, h, w), generator=g, dtype=torch.float64).to(dtype).to(DEVICE) for h, w in HWS]
    if channels_last:
        feats = [f.contiguous(memory_format=torch.channels_last) for f in feats]
    return feats


def level_logits(head, feats):
    """The per-level cls logits exactly as head.forward computes them before its permute + cat."""
    return [head.cls_logits(head.conv(f)) for f in feats]


def head_cat(levels):
    """head.forward's permute + reshape + cat, verbatim."""
    out = []
    for cls_logits in levels:
        n, _, h, w = cls_logits.shape
        cls_logits = cls_logits.view(n, -1, K, h, w)
        cls_logits = cls_logits.permute(0, 3, 4, 1, 2)
        cls_logits = cls_logits.reshape(n, -1, K)
        out.append(cls_logits)
    return torch.cat(out, dim=1)


def make_matches(seed=2):
    """Four images: several ground truths; ground truths but no anchor matched to one; no ground truth at all; one
    ground truth matched everywhere it can be."""
    g = torch.Generator().manual_seed(seed)
    num_gt = [4, 2, 0, 1]
    targets, matched = [], []
    for i, ng in enumerate(num_gt):
        labels = torch.randint(0, K, (ng,), generator=g)
        if i in (1, 2):
            m = torch.randint(-2, 0, (M,), generator=g)
        else:
            m = torch.randint(-2, ng, (M,), generator=g)
        targets.append({"labels": labels.to(DEVICE)})
        matched.append(m.to(DEVICE))
    return targets, matched


def to_labels(targets, matched):
    out = []
    for t, m in zip(targets, matched):
        gt = t["labels"]
        cls = gt[m.clamp(min=0)] if gt.numel() else torch.zeros_like(m)
        out.append(torch.where(m >= 0, cls, m))
    return torch.stack(out)


def num_fg(matched):
    return torch.stack([(m >= 0).sum() for m in matched]).clamp(min=1)


def ours(levels, labels, matched):
    return focal_triton.multilevel_focal_loss(levels, labels, A, normalizer=num_fg(matched), background=-1,
                                              ignore_index=-2)


def theirs(head, levels, targets, matched):
    return head.compute_loss(targets, {"cls_logits": head_cat(levels)}, matched)


def test_reference_matches_torchvision_head():
    """The float64 reference (no focal_triton) is torchvision's loss, which pins down the anchor order."""
    head = make_head(torch.float64)
    targets, matched = make_matches()
    with torch.no_grad():
        levels = level_logits(head, make_features(4, torch.float64))
    labels = to_labels(targets, matched)
    assert (labels == -2).any() and (labels == -1).any() and (labels >= 0).any()
    ref, ref_grads = multilevel_value_and_grads(levels, labels, A, normalizer=num_fg(matched))
    leaves = [x.clone().requires_grad_(True) for x in levels]
    tv = theirs(head, leaves, targets, matched)
    torch.testing.assert_close(ref, tv, rtol=1e-12, atol=0)
    for r, g in zip(ref_grads, torch.autograd.grad(tv, leaves)):
        torch.testing.assert_close(r, g, rtol=1e-10, atol=1e-16)
    assert torch.equal(flatten_levels(levels, A), head_cat(levels))


@pytest.mark.parametrize("channels_last", [False, True])
def test_loss_and_level_grads_float32(backend, poisoned, monkeypatch, channels_last):
    head = make_head()
    targets, matched = make_matches()
    feats = make_features(4, channels_last=channels_last)
    with torch.no_grad():
        levels = level_logits(head, feats)
    if channels_last:
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x in levels)
    labels = to_labels(targets, matched)

    mine = [x.clone().requires_grad_(True) for x in levels]  # the level tensors themselves
    # No op outside focal_triton's makes a tensor the size of the largest level (a cat of the levels, a permuted
    # copy or a one-hot target would); the labels' ops are per anchor, C times smaller.
    largest = max(x.numel() for x in levels)
    assert labels.numel() < largest
    with LogitCopies(largest) as watch:
        loss = ours(mine, labels, matched)
        grads = torch.autograd.grad(loss, mine)
    assert watch.seen == [], f"level-sized ops outside focal_triton's: {watch.seen}"
    assert loss.dtype == torch.float32 and loss.shape == ()
    for g, x in zip(grads, levels):
        assert g.shape == x.shape and g.dtype == torch.float32
        if channels_last:
            assert g.is_contiguous(memory_format=torch.channels_last)

    tv_leaves = [x.clone().requires_grad_(True) for x in levels]
    tv = theirs(head, tv_leaves, targets, matched)
    tv_grads = torch.autograd.grad(tv, tv_leaves)
    # torchvision in float32, same inputs: the value to float32 summation error
    torch.testing.assert_close(loss, tv, rtol=1e-5, atol=0)
    # torchvision's eager float32 gradient carries its own cancellation error (1 - p_t near 1), up to ~2e-5 of the
    # largest gradient on small elements; the float64 torchvision loss of the same float32 logits is exact, and ours
    # must be within float32 rounding of it element-wise
    tv64_leaves = [x.double().requires_grad_(True) for x in levels]
    tv64 = head.compute_loss(targets, {"cls_logits": head_cat(tv64_leaves)}, matched)
    tv64_grads = torch.autograd.grad(tv64, tv64_leaves)
    torch.testing.assert_close(loss.double(), tv64, rtol=1e-5, atol=0)
    for g, g32, g64 in zip(grads, tv_grads, tv64_grads):
        scale = float(g64.abs().max())
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-7 * scale)
        torch.testing.assert_close(g, g32, rtol=1e-5, atol=1e-5 * scale)


def test_head_parameter_grads(backend):
    """The whole head: features -> conv tower -> cls_logits -> loss, gradient w.r.t. every head parameter."""
    targets, matched = make_matches(seed=5)
    labels = to_labels(targets, matched)
    feats = make_features(4, seed=6)

    head = make_head(seed=3)
    loss = ours(level_logits(head, feats), labels, matched)
    grads = torch.autograd.grad(loss, list(head.parameters()))

    head_tv = make_head(seed=3)
    tv = head_tv.compute_loss(targets, {"cls_logits": head_tv(feats)}, matched)  # torchvision's own forward
    tv_grads = torch.autograd.grad(tv, list(head_tv.parameters()))

    torch.testing.assert_close(loss, tv, rtol=1e-5, atol=0)
    for (name, _), g, gt in zip(head.named_parameters(), grads, tv_grads):
        # parameter gradients are sums of many per-logit terms of both signs: compare to the largest one's scale
        torch.testing.assert_close(g, gt, rtol=1e-5, atol=2e-5 * float(gt.abs().max()), msg=lambda m: f"{name}: {m}")


def test_parity_float64(backend):
    """In float64 both are exact up to rounding: value and level gradients agree to ~1e-12."""
    head = make_head(torch.float64, seed=7)
    targets, matched = make_matches(seed=8)
    with torch.no_grad():
        levels = level_logits(head, make_features(4, torch.float64, channels_last=True, seed=9))
    labels = to_labels(targets, matched)
    mine = [x.clone().requires_grad_(True) for x in levels]
    loss = ours(mine, labels.int(), matched)
    assert loss.dtype == torch.float64
    tv_leaves = [x.clone().requires_grad_(True) for x in levels]
    tv = theirs(head, tv_leaves, targets, matched)
    torch.testing.assert_close(loss, tv, rtol=1e-10, atol=0)
    for g, gt in zip(torch.autograd.grad(loss, mine), torch.autograd.grad(tv, tv_leaves)):
        torch.testing.assert_close(g, gt, rtol=1e-9, atol=1e-15)
