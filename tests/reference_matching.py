"""Float64 reference of the focal matching cost of DETR-style Hungarian matchers, written from its definition, and
the formula as the matchers write it, transcribed from Hugging Face transformers. Independent of focal_triton
(this module never imports it). Valid for finite logits; the tests state the limits at +-inf by hand.
"""
import torch
import torch.nn.functional as F


def _softplus(z):
    """log(1 + exp(z)) in float64 without overflow."""
    return z.clamp(min=0) + torch.log1p(torch.exp(-z.abs()))


def matching_terms_ref(logits, labels, alpha, gamma):
    """(pos, neg) of cost = pos - neg, in float64, for (N, C) logits and (G,) labels:
    pos = alpha (1 - p)**gamma (-log p), neg = (1 - alpha) p**gamma (-log(1 - p)), p = sigmoid(logits[q, labels[g]]),
    with -log p = softplus(-x), -log(1 - p) = softplus(x) and 1 - p = sigmoid(-x)."""
    x = logits.detach().double().reshape(-1, logits.shape[-1])[:, labels.long()]
    pos = alpha * torch.sigmoid(-x) ** gamma * _softplus(-x)
    neg = (1 - alpha) * torch.sigmoid(x) ** gamma * _softplus(x)
    return pos, neg


def matching_cost_ref(logits, labels, alpha, gamma):
    pos, neg = matching_terms_ref(logits, labels, alpha, gamma)
    return pos - neg


def transformers_matching_cost(logits, labels, alpha, gamma):
    """The class cost of transformers' RTDetrHungarianMatcher.forward (src/transformers/loss/loss_rt_detr.py, with
    use_focal_loss) and DeformableDetrHungarianMatcher.forward (loss_deformable_detr.py), transcribed: computed in
    the logits' dtype, with the 1e-8 inside the logs."""
    out_prob = F.sigmoid(logits.flatten(0, -2))
    out_prob = out_prob[:, labels]
    neg_cost_class = (1 - alpha) * (out_prob**gamma) * (-(1 - out_prob + 1e-8).log())
    pos_cost_class = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
    return pos_cost_class - neg_cost_class


def grounding_dino_class_cost(logits, label_maps, alpha=0.25, gamma=2.0):
    """The class cost of transformers' GroundingDinoHungarianMatcher.forward (src/transformers/loss/
    loss_grounding_dino.py), transcribed: the stock terms over all C classes, mixed by the targets' label maps
    (already concatenated and normalized there: rows summing to 1)."""
    out_prob = logits.flatten(0, -2).sigmoid()
    neg_cost_class = (1 - alpha) * (out_prob**gamma) * (-(1 - out_prob + 1e-8).log())
    pos_cost_class = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
    return (pos_cost_class - neg_cost_class) @ label_maps.t()


# A cost is a difference of two terms: its rounding error is relative to their size, not to the difference (which
# vanishes where the terms are equal). Tolerance of a result computed in float32 (any 16/32-bit logits) or float64.
MATCHING_TOL = {torch.float32: dict(rtol=2e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def assert_matching_close(actual, logits, labels, alpha, gamma, what=""):
    """actual (N, G) against the float64 reference: |actual - ref| <= rtol (|pos| + |neg|) + atol elementwise
    (rtol, atol of the compute dtype), NaN where the reference is NaN; lists the worst mismatches."""
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert actual.dtype == cdt, f"{what}: dtype {actual.dtype}, expected {cdt}"
    tol = MATCHING_TOL[cdt]
    pos, neg = matching_terms_ref(logits.cpu(), labels.cpu(), alpha, gamma)
    ref = pos - neg
    a = actual.detach().double().cpu()
    assert a.shape == ref.shape, f"{what}: shape {tuple(a.shape)} != {tuple(ref.shape)}"
    err = (a - ref).abs()
    bad = ~(err <= tol["rtol"] * (pos.abs() + neg.abs()) + tol["atol"])
    bad &= ~(a.isnan() & ref.isnan())
    if bad.any():
        idx = bad.nonzero()[:8].tolist()
        x = logits.detach().double().cpu().reshape(-1, logits.shape[-1])
        rows = "\n".join(f"  at {i} (logit {x[i[0], int(labels[i[1]])].item()!r}): got {a[tuple(i)].item()!r}, "
                         f"expected {ref[tuple(i)].item()!r}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements differ ({tol}):\n{rows}")
