"""Naive float64 reference of the detector focal loss (labels, ignore, weights, per-class alpha, smoothing,
normalizers) and of its multi-level form, independent of focal_triton (this module never imports it).

It does what a framework does by hand: per level, view (N, A*C, H, W) as (N, A, C, H, W), permute to (N, H, W, A, C),
reshape to (N, H*W*A, C), cat the levels along dim 1, one-hot the labels, and apply the formula element-wise in float64
with autograd-able ops; gradients come from torch.autograd.grad through this graph.

Per (anchor, class) with hard target t and label smoothing s (apex's definition: smoothing only inside the BCE):
    p = sigmoid(x), p_t = p t + (1 - p)(1 - t), alpha_t = alpha t + (1 - alpha)(1 - t) (1 when alpha = -1),
    t_s = t (1 - s) + s / 2, FL = alpha_t (1 - p_t)^gamma BCE_with_logits(x, t_s).
"""
import torch
import torch.nn.functional as F


def flatten_levels(level_logits, num_anchors):
    """torchvision's head permute + cat: list of (N, A*C, H, W) -> (N, sum H*W*A, C)."""
    flat = []
    for x in level_logits:
        n, ac, h, w = x.shape
        c = ac // num_anchors
        flat.append(x.reshape(n, num_anchors, c, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * num_anchors, c))
    return torch.cat(flat, dim=1)


def unflatten_levels(flat, shapes, num_anchors):
    """Inverse of flatten_levels: (N, M, C) -> list of (N, A*C, H, W) (contiguous), one per level shape."""
    out, start = [], 0
    for (n, ac, h, w) in shapes:
        c = ac // num_anchors
        m = h * w * num_anchors
        chunk = flat[:, start:start + m]
        start += m
        out.append(chunk.reshape(n, h, w, num_anchors, c).permute(0, 3, 4, 1, 2).reshape(n, ac, h, w))
    assert start == flat.shape[1]
    return out


def anchor_mask_to_levels(mask, shapes, num_anchors):
    """A per-anchor (N, M) tensor broadcast over classes and laid out like the levels: list of (N, A*C, H, W)."""
    c = shapes[0][1] // num_anchors
    flat = mask.unsqueeze(-1).expand(*mask.shape, c)
    return unflatten_levels(flat, shapes, num_anchors)


def focal_loss_ref(logits, labels, alpha=0.25, gamma=2.0, weights=None, label_smoothing=0.0, background=-1,
                   ignore_index=-2, normalizer=None, reduction="sum", check_labels=True):
    """Flat form: logits (..., C), labels of logits.shape[:-1]. Returns a float64 0-d sum or the float64 per-element
    loss of logits' shape. Labels other than 0..C-1 and ignore_index count as background (the check_labels=False
    behaviour, whatever check_labels says). Images: logits.shape[0] when logits.dim() >= 3, else one image."""
    x = logits.double()
    c = x.shape[-1]
    labels = labels.long()
    assert labels.shape == x.shape[:-1]
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    positive = (labels >= 0) & (labels < c) & valid
    t = F.one_hot(torch.where(positive, labels, torch.zeros_like(labels)), c).double()
    t = t * positive.unsqueeze(-1).double()

    s = float(label_smoothing)
    t_s = t * (1 - s) + s / 2
    log_p, log_q = F.logsigmoid(x), F.logsigmoid(-x)
    bce = -(t_s * log_p + (1 - t_s) * log_q)
    one_minus_pt = torch.exp(log_p) * (1 - t) + torch.exp(log_q) * t
    loss = bce * one_minus_pt ** float(gamma)
    if isinstance(alpha, torch.Tensor):
        a = alpha.double().to(x.device)
        loss = (a * t + (1 - a) * (1 - t)) * loss
    elif alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    if weights is not None:
        loss = loss * weights.double().unsqueeze(-1)
    loss = torch.where(valid.unsqueeze(-1), loss, torch.zeros_like(loss))

    if reduction == "none":
        assert normalizer is None
        return loss
    assert reduction == "sum"
    if normalizer is None:
        return loss.sum()
    if not isinstance(normalizer, torch.Tensor):
        return loss.sum() / float(normalizer)
    norm = normalizer.double().to(x.device)
    if norm.dim() == 0:
        return loss.sum() / norm
    per_image = loss.sum(tuple(range(1, x.dim()))) if x.dim() >= 3 else loss.sum().reshape(1)
    assert norm.shape == per_image.shape
    if per_image.numel() == 0:
        return loss.sum()  # N = 0: 0
    return (per_image / norm).sum() / per_image.numel()


def multilevel_focal_loss_ref(level_logits, labels, num_anchors, **kwargs):
    """Multi-level form. "sum": float64 0-d; "none": list of float64 per-level losses in NCHW shape."""
    flat = flatten_levels([x.double() for x in level_logits], num_anchors)
    loss = focal_loss_ref(flat, labels, **kwargs)
    if kwargs.get("reduction", "sum") == "none":
        return unflatten_levels(loss, [tuple(x.shape) for x in level_logits], num_anchors)
    return loss


def multilevel_value_and_grads(level_logits, labels, num_anchors, grad_outputs=None, **kwargs):
    """(reference value(s), float64 gradients w.r.t. every level) for upstream gradients grad_outputs (ones/1)."""
    leaves = [x.detach().double().requires_grad_(True) for x in level_logits]
    out = multilevel_focal_loss_ref(leaves, labels, num_anchors, **kwargs)
    outs = list(out) if isinstance(out, list) else [out]
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(o) for o in outs]
    grad_outputs = [g.double() for g in grad_outputs]
    grads = torch.autograd.grad(outs, leaves, grad_outputs, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    return out, grads


def flat_value_and_grad(logits, labels, grad_output=None, **kwargs):
    leaf = logits.detach().double().requires_grad_(True)
    out = focal_loss_ref(leaf, labels, **kwargs)
    g = torch.ones_like(out) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(out, leaf, g, allow_unused=True)
    return out, torch.zeros_like(leaf) if grad is None else grad
