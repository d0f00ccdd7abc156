"""Definitions shared by every layer, plain Python and torch (no Triton): the loss kinds with their defaults, the
dtypes and size limits, a loss's scalars in the encoding both implementations take (`LossSpec`), and the geometry
of a detector head's levels and labels.

The family, per element with logit x, target t, p = sigmoid(x), BCE target t_s (label smoothing s: t (1 - s) + s/2):

    FL   alpha_t (1 - p_t)**gamma BCE(x, t_s)         p_t = p t + (1 - p)(1 - t),  alpha_t = c0 (1 - t) + c1 t
    FL*  alpha_t softplus(-(gamma x_t + beta)) / gamma   x_t = x (2t - 1)
    QFL  |t - p|**gamma BCE(x, t)                      (the paper's exponent beta, in gamma)
    VFL  w_t BCE(x, t) where t > 0, beta p**gamma BCE(x, 0) where t <= 0   (w_t = c0 (1 - t) + c1 t; alpha of the
         negatives in beta)

The class-index kinds of the DETR and YOLO detectors (hit = the label's class; s = the anchor's score, e.g. the
IoU of its matched box; p_d: p detached, no gradient through it):

    BCE         w_c BCE(x, hit ? s : 0)                 (YOLO's BCE on the task-aligned soft target; w_c per class)
    VFL_RTDETR  hit ? s BCE(x, s) : alpha p_d**gamma BCE(x, 0)   (transformers' / D-FINE's RT-DETR VFL)
    VFL_RTDETR_GRAD  the same with p**gamma not detached        (ultralytics' VarifocalLoss)
    MAL         hit ? BCE(x, s**gamma) : alpha p_d**gamma BCE(x, 0)   (DEIMv2's matching-aware loss)
    IA_BCE      hit ? BCE(x, t_ia) : p**gamma BCE(x, 0),  t_ia = max(p_d**alpha s**(1 - alpha), 0.01)  (LW-DETR,
                RF-DETR; its negatives' weight p**gamma not detached)

alpha_t is encoded by its values at the two ends, c0 = alpha_t(0) and c1 = alpha_t(1), so that both are exact in
float32 (an encoding c0 + c1 t with c1 = 2 alpha - 1 rounds c0 + c1 = alpha to an absolute error of ~6e-8: a large
relative error for a small alpha).

Level geometry: level l of a head is (N, A*C, H_l, W_l), channel a*C + c = class c of anchor a; its anchors are
label columns mb_l + (h W_l + w) A + a of the (N, M) labels, mb_l = A sum_{k<l} H_k W_k (torchvision's and
detectron2's anchor order).
"""
import enum
from typing import List, NamedTuple

import torch


class LossKind(enum.IntEnum):
    """The loss of the family (the LOSS_KIND constexpr of the kernels, the `kind` of the CPU path)."""

    FL = 0
    FL_STAR = 1
    QFL = 2
    VFL = 3
    BCE = 4
    VFL_RTDETR = 5
    VFL_RTDETR_GRAD = 6
    MAL = 7
    IA_BCE = 8


FL, FL_STAR, QFL, VFL = LossKind.FL, LossKind.FL_STAR, LossKind.QFL, LossKind.VFL
BCE, VFL_RTDETR, VFL_RTDETR_GRAD, MAL, IA_BCE = (LossKind.BCE, LossKind.VFL_RTDETR, LossKind.VFL_RTDETR_GRAD,
                                                 LossKind.MAL, LossKind.IA_BCE)

# Class-index forms: loss name -> kind, and each kind's options with their defaults ("vfl_rtdetr" is
# VFL_RTDETR or VFL_RTDETR_GRAD by its detach_weight).
LOSSES = {"fl": FL, "fl_star": FL_STAR, "qfl": QFL, "vfl": VFL, "bce": BCE, "vfl_rtdetr": VFL_RTDETR, "mal": MAL,
          "ia_bce": IA_BCE}
LOSS_DEFAULTS = {
    "fl": dict(alpha=0.25, gamma=2.0),
    "fl_star": dict(alpha=-1.0, gamma=1.0, beta=0.0),  # fvcore's sigmoid_focal_loss_star
    "qfl": dict(beta=2.0),  # Li et al. 2020, mmdet
    "vfl": dict(alpha=0.75, gamma=2.0, iou_weighted=True),  # Zhang et al. 2021, mmdet
    "bce": dict(class_weights=None),  # ultralytics v8DetectionLoss (BCEWithLogitsLoss on target_scores)
    "vfl_rtdetr": dict(alpha=0.75, gamma=2.0, detach_weight=True),  # transformers RTDetrConfig focal_loss_alpha/gamma
    "mal": dict(alpha=1.0, gamma=1.5),  # DEIM: mal_alpha None (1), gamma 1.5
    "ia_bce": dict(alpha=0.25, gamma=2.0),  # LW-DETR / RF-DETR: focal_alpha 0.25, gamma 2
}
# The losses whose target is the anchor's score on its label's class (they take `scores`): all but FL and FL*.
SCORED_LOSSES = tuple(name for name, kind in LOSSES.items() if kind not in (FL, FL_STAR))

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int32, torch.int64)
MAX_LEVELS = 8                  # levels of one multilevel_focal_loss call
MAX_SEGMENTS = 16               # segments (levels, decoder layers) of one launch of the class-index kernel
INT32_MAX = 2**31 - 1           # one image of a level holds fewer logits; label values fit in 32 bits


def compute_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """float64 logits are computed in float64 (gradcheck); every other dtype in float32."""
    return torch.float64 if x_dtype == torch.float64 else torch.float32


class LossSpec(NamedTuple):
    """A loss of the family in the implementations' encoding, computed once (`encode`): alpha_t = c0 (1 - t) + c1 t
    (FL, FL*; VFL: its positives' weight, w_q = c0 (1 - q) + c1 q; the DETR kinds: the positives' weight w = c0
    (1 - s) + c1 s, s for VFL_RTDETR, 1 for MAL and IA_BCE; BCE: its weight 1), the exponent gamma (FL, VFL and the
    DETR kinds; QFL's beta), beta (FL*'s shift; VFL's, VFL_RTDETR's and MAL's alpha of the negatives; IA_BCE's
    exponent alpha), label smoothing (FL). A per-class alpha (BCE: the class weights) travels as its own (C,)
    tensor; c0 and c1 are then 1 and 1 (and not read)."""

    kind: int = FL
    c0: float = 0.75
    c1: float = 0.25
    gamma: float = 2.0
    beta: float = 0.0
    smoothing: float = 0.0


def alpha_coefficients(alpha: float):
    """(c0, c1) = (alpha_t(0), alpha_t(1)) of alpha_t = alpha t + (1 - alpha)(1 - t) for alpha >= 0, and of
    alpha_t = 1 for alpha = -1 (no weighting)."""
    if alpha < 0:
        return 1.0, 1.0
    return 1.0 - alpha, float(alpha)


def encode(kind, alpha=-1.0, gamma=2.0, beta=0.0, iou_weighted=True, smoothing=0.0) -> LossSpec:
    """The LossSpec of a kind's public options (alpha a number; a per-class alpha: pass -1 and the tensor
    beside)."""
    kind = LossKind(kind)
    if kind == BCE:
        return LossSpec(kind, 1.0, 1.0, 0.0, 0.0, 0.0)
    if kind in (VFL_RTDETR, VFL_RTDETR_GRAD):
        return LossSpec(kind, 0.0, 1.0, float(gamma), float(alpha), 0.0)
    if kind in (MAL, IA_BCE):
        return LossSpec(kind, 1.0, 1.0, float(gamma), float(alpha), 0.0)
    if kind == QFL:
        return LossSpec(kind, 1.0, 1.0, float(beta), 0.0, 0.0)
    if kind == VFL:
        c0, c1 = (0.0, 1.0) if iou_weighted else (1.0, 1.0)
        return LossSpec(kind, c0, c1, float(gamma), float(alpha), 0.0)
    c0, c1 = alpha_coefficients(alpha)
    return LossSpec(kind, c0, c1, float(gamma), float(beta) if kind == FL_STAR else 0.0, float(smoothing))


# --- geometry of a head's levels and labels ---------------------------------------------------------------------

def anchor_view(level: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """(N, A*C, H, W) -> (N, H*W, A, C) view of the same storage (NCHW or channels_last)."""
    return level.unflatten(1, (num_anchors, level.shape[1] // num_anchors)).flatten(3).permute(0, 3, 1, 2)


def flat(t: torch.Tensor) -> torch.Tensor:
    """1-D view of a dense tensor in storage order."""
    return t.as_strided((t.numel(),), (1,))


def level_columns(levels, num_anchors: int) -> List[slice]:
    """The label columns of each level: level l owns A H_l W_l columns, after those of the levels before it."""
    out, start = [], 0
    for level in levels:
        size = level.shape[2] * level.shape[3] * num_anchors
        out.append(slice(start, start + size))
        start += size
    return out


def per_level(t: torch.Tensor, levels, num_anchors: int) -> list:
    """An (N, M) per-anchor tensor (labels, weights, scores, statistics) as one (N, H_l W_l, A) view per level."""
    return [t[:, cols].view(t.shape[0], level.shape[2] * level.shape[3], num_anchors)
            for level, cols in zip(levels, level_columns(levels, num_anchors))]
