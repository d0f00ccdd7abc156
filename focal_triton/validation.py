"""Argument checks and encoding: the layer between the public API (functions, modules) and the registered ops.

Each public call is checked here before anything is allocated or written (every message names the argument, what
was expected and what was given) and turned into one record in the ops' final encoding, computed once:
`DenseCall` for the dense op, `ClassIndexCall` for the class-index op (levels, labels, the loss as a
`losses.LossSpec`, the normalizer, the output dtype, whether a gradient will be needed). The modules run the same
checks when they are built.
"""
import contextlib
import numbers
from dataclasses import dataclass
from typing import List, Optional

import torch

from .layouts import base_box, disjoint, is_dense, overlapping, segment_view
from .losses import (INT32_MAX, LABEL_DTYPES, LOGIT_DTYPES, LOSS_DEFAULTS, LOSSES, MAX_LEVELS, MAX_SEGMENTS,
                     SCORED_LOSSES, LossKind, LossSpec, compute_dtype, encode)

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction) -> str:
    # The message is torchvision's, so code that matches on it keeps working.
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: 'none', 'mean', 'sum'"
        )
    return reduction


def _number(name: str, value) -> float:
    """A Python int or float (not a bool, not a tensor, not a string): the one rule for every number argument."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor (its value would have to be read on the host)")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number (int or float), got {type(value).__name__} {value!r}")
    return float(value)


def check_int(name: str, value, minimum=None) -> int:
    """A Python int (not a bool): the one rule for every integer argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _finite(v: float) -> bool:
    # Not math.isfinite: torch.compile traces this module, and comparisons of Python floats stay constants.
    return v == v and v not in (float("inf"), float("-inf"))


def check_alpha(alpha) -> float:
    alpha = _number("alpha", alpha)
    # torchvision's condition and message; NaN and +-inf fail it too.
    if not (0 <= alpha <= 1) and alpha != -1:
        raise ValueError(f"Invalid alpha value: {alpha}. alpha must be in the range [0,1] or -1 for ignore.")
    return alpha


def check_gamma(gamma) -> float:
    gamma = _number("gamma", gamma)
    if not (_finite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    return gamma


# --- the focal matching cost of Hungarian matchers ---------------------------------------------------------------

# Sizes of one cost matrix: queries, and targets and classes, whose offsets inside a kernel tile (32 rows) stay in
# int32.
MAX_MATCHING_QUERIES, MAX_MATCHING_COLUMNS = 2**30, 2**25


@dataclass(frozen=True)
class MatchingCall:
    """A focal_matching_cost call in the op's encoding: (N, C) detached logits (a view where the leading dims
    flatten without a copy), (G,) contiguous labels, alpha and gamma as floats."""

    logits: torch.Tensor
    labels: torch.Tensor
    alpha: float
    gamma: float


def check_class_logits(logits) -> None:
    """(..., C) logits of a supported dtype with C >= 1 classes (focal_loss, focal_matching_cost)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., C) with C >= 1 classes, got {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")


def matching_call(logits, labels, alpha, gamma, check_labels) -> MatchingCall:
    """Check focal_matching_cost's arguments (before anything runs) and encode them."""
    check_class_logits(logits)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int32 or int64 class indices, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (G,) (one class per target), got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels must be on the logits' device ({logits.device}), got {labels.device}")
    alpha = _number("alpha", alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha of the matching cost must be in [0, 1], got {alpha}")
    gamma = check_gamma(gamma)
    check_bool("check_labels", check_labels)
    num_classes = logits.shape[-1]
    x = logits.detach().reshape(-1, num_classes)
    for name, size, limit in (("logits.shape[:-1] (the queries)", x.shape[0], MAX_MATCHING_QUERIES),
                              ("labels (the targets)", labels.shape[0], MAX_MATCHING_COLUMNS),
                              ("logits.shape[-1] (the classes)", num_classes, MAX_MATCHING_COLUMNS)):
        if size > limit:
            raise ValueError(f"{name} must number at most {limit}, got {size}")
    if check_labels and labels.numel():
        _check_class_indices(labels, num_classes)
    return MatchingCall(x, labels.contiguous(), alpha, gamma)


def _check_class_indices(labels: torch.Tensor, num_classes: int) -> None:
    """Every label is a class in [0, num_classes). Reads one bool on the host (a sync); inside torch.compile a
    device-side assertion instead."""
    if labels.device.type == "meta":
        raise ValueError("check_labels=True reads the labels' values, which meta tensors do not have: pass "
                         "check_labels=False")
    ok = (labels >= 0) & (labels < num_classes)
    if torch.compiler.is_compiling():
        torch._assert_async(ok.all(), f"labels must be class indices in [0, {num_classes}) (check_labels)")
        return
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        raise ValueError(f"labels must be class indices in [0, {num_classes}) (num_classes = logits.shape[-1]); "
                         f"got {int(labels[i])} at index {i} (check_labels=False skips this check and its host "
                         f"sync; such a target's cost column is then NaN)")


# --- the loss family: FL, FL*, QFL, VFL ------------------------------------------------------------------------

def _finite_number(name: str, value, what: str, lower=None, strict: bool = False) -> float:
    """A finite Python number (> lower if strict, else >= lower); the message names the argument and its loss."""
    v = _number(name, value)
    if not (_finite(v) and (lower is None or (v > lower if strict else v >= lower))):
        bound = "" if lower is None else f" {'>' if strict else '>='} {lower:g}"
        raise ValueError(f"{name} {what} must be a finite number{bound}, got {v}")
    return v


def check_star_gamma(gamma) -> float:
    return _finite_number("gamma", gamma, "of FL* (the loss divides by it)", 0, strict=True)


def check_star_beta(beta) -> float:
    return _finite_number("beta", beta, "of FL*")


def check_qfl_beta(beta) -> float:
    return _finite_number("beta", beta, "of the quality focal loss", 0)


def check_vfl_alpha(alpha) -> float:
    return _finite_number("alpha", alpha, "of the varifocal loss (weight of the negatives)", 0)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_loss_options(loss, alpha, gamma, beta, iou_weighted, num_classes, device, class_weights=None,
                       detach_weight=None):
    """The class-index forms' loss kind and its options, defaults filled in (LOSS_DEFAULTS): returns
    (kind, alpha (number or per-class tensor: FL's, FL*'s alpha, BCE's class_weights), gamma, beta, iou_weighted)
    with the unused ones set to neutral values. An option the kind does not take must be left at None.
    num_classes / device None (a module being built): a per-class tensor's length and device are checked at the
    call."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}")
    given = dict(alpha=alpha, gamma=gamma, beta=beta, iou_weighted=iou_weighted, class_weights=class_weights,
                 detach_weight=detach_weight)
    defaults = LOSS_DEFAULTS[loss]
    unused = [k for k, v in given.items() if v is not None and k not in defaults]
    if unused:
        raise ValueError(f"loss={loss!r} takes no {unused[0]} (its options: {', '.join(defaults)})")
    opts = {k: defaults[k] if given[k] is None else given[k] for k in defaults}
    if loss == "bce":
        weights = opts["class_weights"]
        return LossKind.BCE, (-1.0 if weights is None else check_class_weights(weights, num_classes, device)), \
            0.0, 0.0, True
    if loss == "vfl_rtdetr":
        kind = LossKind.VFL_RTDETR if check_bool("detach_weight", opts["detach_weight"]) else LossKind.VFL_RTDETR_GRAD
        return (kind, _finite_number("alpha", opts["alpha"], "of vfl_rtdetr (weight of the negatives)", 0),
                check_gamma(opts["gamma"]), 0.0, True)
    if loss == "mal":
        return (LossKind.MAL, _finite_number("alpha", opts["alpha"], "of mal (weight of the negatives)", 0),
                _finite_number("gamma", opts["gamma"], "of mal (the target is score**gamma)", 0, strict=True), 0.0,
                True)
    if loss == "ia_bce":
        a = _finite_number("alpha", opts["alpha"], "of ia_bce (exponent of p in its target)", 0)
        if a > 1:
            raise ValueError(f"alpha of ia_bce (exponent of p in its target) must be in [0, 1], got {a}")
        return LossKind.IA_BCE, a, check_gamma(opts["gamma"]), 0.0, True
    if loss in ("fl", "fl_star"):
        alpha = check_class_alpha(opts["alpha"], num_classes, device)
        if loss == "fl":
            return LossKind.FL, alpha, check_gamma(opts["gamma"]), 0.0, True
        return LossKind.FL_STAR, alpha, check_star_gamma(opts["gamma"]), check_star_beta(opts["beta"]), True
    if loss == "qfl":
        return LossKind.QFL, -1.0, 0.0, check_qfl_beta(opts["beta"]), True
    return (LossKind.VFL, check_vfl_alpha(opts["alpha"]), check_gamma(opts["gamma"]), 0.0,
            check_bool("iou_weighted", opts["iou_weighted"]))


def check_scores(scores, loss: str, shape, device):
    """QFL, VFL and the DETR / YOLO losses take per-anchor target scores of the labels' shape (the IoU of each
    positive's box; optional for "bce": 1 without); FL / FL* none. Values are not read (no sync): they should lie
    in [0, 1]."""
    if loss not in SCORED_LOSSES:
        if scores is not None:
            raise ValueError(f"scores applies to loss={' / '.join(map(repr, SCORED_LOSSES))} only, not "
                             f"loss={loss!r}")
        return
    if scores is None and loss == "bce":
        return
    if scores is None:
        raise ValueError(f"loss={loss!r} needs scores: the (per-anchor) target score of each positive, e.g. its "
                         f"box's IoU, of the labels' shape {tuple(shape)}")
    _per_anchor_tensor("scores", scores, shape, device, "")


def check_logits_and_targets(inputs, targets, inputs_name: str = "inputs", targets_name: str = "targets") -> None:
    for name, t in ((inputs_name, inputs), (targets_name, targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if inputs.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{inputs_name} must be float16, bfloat16, float32 or float64, got {inputs.dtype}")
    if not targets.is_floating_point():
        raise TypeError(f"{targets_name} must be a floating-point tensor (0/1 or soft targets), got {targets.dtype}")
    if targets.shape != inputs.shape:
        raise ValueError(
            f"{targets_name} must have the shape of {inputs_name} {tuple(inputs.shape)}, got {tuple(targets.shape)}"
        )
    if targets.device != inputs.device:
        raise ValueError(
            f"{targets_name} must be on the device of {inputs_name} ({inputs.device}), got {targets.device}"
        )
    if targets.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{targets_name} requires grad, but focal_triton differentiates only w.r.t. {inputs_name}: "
            f"pass {targets_name}.detach()"
        )


# --- class-index (label) forms: focal_loss and multilevel_focal_loss --------------------------------------------


def check_class_index_reduction(reduction) -> str:
    if reduction not in ("sum", "none"):
        raise ValueError(
            f"reduction must be 'sum' (divided by the normalizer, if any) or 'none' for the class-index focal loss, "
            f"got {reduction!r} (for a mean, pass normalizer=<number of elements or of positives>)"
        )
    return reduction


def check_smoothing(label_smoothing) -> float:
    s = _number("label_smoothing", label_smoothing)
    if not (0.0 <= s < 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1), got {s}")
    return s


def check_label_values(background, ignore_index, num_classes=None):
    """background an int, ignore_index an int or None, both 32-bit, different, and not a class index (num_classes
    None: a module being built, the classes are checked at the call)."""
    for name, v in (("background", background), ("ignore_index", ignore_index)):
        if v is None and name == "ignore_index":
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int{' or None' if name == 'ignore_index' else ''}, got {v!r}")
        if not (-INT32_MAX - 1 <= v <= INT32_MAX):
            raise ValueError(f"{name} must fit in 32 bits, got {v}")
        if num_classes is not None and 0 <= v < num_classes:
            raise ValueError(f"{name} = {v} is a class index (num_classes = {num_classes}): use a value < 0 or >= "
                             f"num_classes")
    if ignore_index is not None and ignore_index == background:
        raise ValueError(f"ignore_index and background must differ, both are {background}")


def check_labels_tensor(labels, shape, device, what: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be int32 or int64 class indices, got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must have shape {tuple(shape)} ({what}), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the logits' device ({device}), got {labels.device}")


def check_label_range(labels, num_classes: int, background: int, ignore_index) -> None:
    """Every label is a class, the background value or the ignore value. Reads one bool on the host (a sync)."""
    if labels.device.type == "meta":
        raise ValueError("check_labels=True reads the labels' values, which meta tensors do not have: pass "
                         "check_labels=False")
    ok = ((labels >= 0) & (labels < num_classes)) | (labels == background)
    if ignore_index is not None:
        ok |= labels == ignore_index
    if torch.compiler.is_compiling():
        # Inside torch.compile: a device-side assertion (no graph break, no host sync). On CUDA a failure aborts
        # the process with this message, as a device assert does.
        torch._assert_async(ok.all(), f"labels must be a class in [0, {num_classes}), the background value "
                                      f"{background} or the ignore value {ignore_index} (check_labels)")
        return
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        allowed = f"a class in [0, {num_classes}), background = {background}"
        allowed += f" or ignore_index = {ignore_index}" if ignore_index is not None else " (no ignore_index)"
        raise ValueError(f"labels must be {allowed}; got {int(labels[tuple(bad)])} at index {tuple(bad)} "
                         f"(check_labels=False skips this check and its host sync)")


def _side_tensor(name: str, t: torch.Tensor, device) -> None:
    """A tensor beside the logits (weights, alpha, normalizer): on their device, and not asking for a gradient."""
    if t.device != device:
        raise ValueError(f"{name} must be on the logits' device ({device}), got {t.device}")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but focal_triton differentiates only w.r.t. the logits: "
                         f"pass {name}.detach()")


def _per_anchor_tensor(name: str, t, shape, device, or_none: str) -> None:
    """weights, scores: a float tensor of the labels' shape beside the logits."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{or_none}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have the labels' shape {tuple(shape)} (one {name[:-1]} per anchor), "
                         f"got {tuple(t.shape)}")
    _side_tensor(name, t, device)


def check_weights(weights, shape, device):
    if weights is not None:
        _per_anchor_tensor("weights", weights, shape, device, " or None")


def check_class_weights(weights, num_classes, device):
    """BCE's class_weights: a (C,) floating-point tensor weighting each class's terms (values are not read)."""
    c = "C" if num_classes is None else num_classes
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(f"class_weights must be a floating-point tensor of shape ({c},), got "
                        f"{getattr(weights, 'dtype', type(weights).__name__)}")
    if weights.dim() != 1 or (num_classes is not None and weights.shape[0] != num_classes):
        raise ValueError(f"class_weights must have shape (num_classes,) = ({c},), got {tuple(weights.shape)}")
    if device is not None:
        _side_tensor("class_weights", weights, device)
    return weights


def check_class_alpha(alpha, num_classes, device):
    """A number (as check_alpha) or a (C,) tensor of per-class weights in [0, 1] (values are not read: no sync).
    num_classes / device None: only what is known without the logits (a 1-D floating-point tensor)."""
    if not isinstance(alpha, torch.Tensor):
        return check_alpha(alpha)
    c = "num_classes" if num_classes is None else num_classes
    if not alpha.is_floating_point():
        raise TypeError(f"alpha must be a number or a floating-point tensor of shape ({c},), got {alpha.dtype}")
    if alpha.dim() != 1 or (num_classes is not None and alpha.shape[0] != num_classes):
        raise ValueError(f"alpha as a tensor must have shape (num_classes,) = ({c},), got {tuple(alpha.shape)}")
    if device is not None:
        _side_tensor("alpha", alpha, device)
    return alpha


def check_normalizer(normalizer, num_images: int, device, reduction: str):
    """None, a finite number > 0, a 0-d tensor or an (N,) tensor (per image). Tensor values are not read."""
    if normalizer is None:
        return None
    if reduction == "none":
        raise ValueError("normalizer applies to reduction='sum' only; with reduction='none' divide the returned "
                         "per-element losses yourself")
    if not isinstance(normalizer, torch.Tensor):
        value = _number("normalizer", normalizer) if not isinstance(normalizer, bool) else None
        if value is None or not (_finite(value) and value > 0):
            raise ValueError(f"normalizer must be a finite number > 0 or a tensor, got {normalizer!r}")
        return value
    if normalizer.dtype == torch.bool or normalizer.is_complex():
        raise TypeError(f"normalizer must be a real tensor, got {normalizer.dtype}")
    if not (normalizer.dim() == 0 or tuple(normalizer.shape) in ((num_images,), (1,))):
        raise ValueError(f"normalizer must be a number, a 0-d tensor or a per-image tensor of shape "
                         f"({num_images},), got shape {tuple(normalizer.shape)}")
    _side_tensor("normalizer", normalizer, device)
    return normalizer


def check_level_logits(level_logits, num_anchors):
    if isinstance(level_logits, torch.Tensor) or not isinstance(level_logits, (list, tuple)):
        raise TypeError(f"level_logits must be a list or tuple of per-level tensors (N, A*C, H, W), "
                        f"got {type(level_logits).__name__}")
    if not (1 <= len(level_logits) <= MAX_LEVELS):
        raise ValueError(f"level_logits must hold 1 to {MAX_LEVELS} levels, got {len(level_logits)}")
    check_int("num_anchors", num_anchors, 1)
    first = level_logits[0]
    for i, x in enumerate(level_logits):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"level_logits[{i}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"level_logits[{i}] must be 4-D (N, A*C, H, W), got shape {tuple(x.shape)}")
        if x.dtype not in LOGIT_DTYPES:
            raise TypeError(f"level_logits[{i}] must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if (x.dtype, x.device, x.shape[0], x.shape[1]) != (first.dtype, first.device, first.shape[0],
                                                             first.shape[1]):
            raise ValueError(
                f"level_logits must share dtype, device, N and channels: level_logits[{i}] is {x.dtype} on "
                f"{x.device} with shape {tuple(x.shape)}, level_logits[0] is {first.dtype} on {first.device} with "
                f"shape {tuple(first.shape)}")
        if x.shape[1] * x.shape[2] * x.shape[3] > INT32_MAX:
            raise ValueError(f"level_logits[{i}]: one image of a level must have < 2**31 logits, got "
                             f"{x.shape[1] * x.shape[2] * x.shape[3]}")
    if first.shape[1] == 0 or first.shape[1] % num_anchors:
        raise ValueError(f"the channels of level_logits ({first.shape[1]}) must be num_anchors ({num_anchors}) "
                         f"times the number of classes (>= 1)")


def check_class_index_options(loss, alpha, gamma, beta, iou_weighted, label_smoothing, background, ignore_index,
                              reduction, check_labels, return_stats=False, num_classes=None, device=None,
                              class_weights=None, detach_weight=None):
    """Every option of the class-index forms (focal_loss, multilevel_focal_loss and their modules), checked in one
    place: at each call, and when a module is built (num_classes / device None: what needs the logits, a
    per-class alpha's length and the label values' clash with a class index, waits for the call).
    Returns (kind, alpha, gamma, beta, iou_weighted, smoothing, reduction), defaults filled in."""
    kind, alpha, gamma, beta, iou_weighted = check_loss_options(loss, alpha, gamma, beta, iou_weighted, num_classes,
                                                                device, class_weights, detach_weight)
    smoothing = check_smoothing(label_smoothing)
    if smoothing and kind != 0:
        raise ValueError(f"label_smoothing applies to loss='fl' only, got {smoothing} with loss={loss!r}")
    check_label_values(background, ignore_index, num_classes)
    reduction = check_class_index_reduction(reduction)
    check_bool("check_labels", check_labels)
    check_bool("return_stats", return_stats)
    if return_stats and reduction != "sum":
        raise ValueError(f"return_stats=True needs reduction='sum', got reduction={reduction!r}")
    return kind, alpha, gamma, beta, iou_weighted, smoothing, reduction


# --- the records ------------------------------------------------------------------------------------------------

def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of an elementwise loss: the logits', or float32 for 16-bit logits under torch.autocast for their
    device (as autocast's own losses, binary_cross_entropy_with_logits and so torchvision's focal loss, do). The
    logits are read as they are, never upcast by a copy."""
    try:
        autocast = torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        autocast = False
    return torch.float32 if autocast and x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _requires_grad(tensors) -> bool:
    """Whether this call's loss will be differentiated: the caller's grad mode and the logits' requires_grad (the
    CPU path then computes the gradient in the forward's pass)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@dataclass(frozen=True)
class DenseCall:
    """A dense call (sigmoid_focal_loss and its relatives) in the dense op's encoding."""

    inputs: torch.Tensor
    targets: torch.Tensor
    spec: LossSpec
    reduction: str
    out_dtype: torch.dtype
    requires_grad: bool


def dense_call(kind, inputs, targets, reduction, alpha=-1.0, gamma=0.0, beta=0.0, iou_weighted=True) -> DenseCall:
    """Check a dense call of the loss `kind` (its own options only: FL alpha, gamma; FL* alpha, gamma, beta; QFL
    beta; VFL alpha, gamma, iou_weighted) and encode it."""
    check_logits_and_targets(inputs, targets)
    if kind == LossKind.FL:
        alpha, gamma = check_alpha(alpha), check_gamma(gamma)
    elif kind == LossKind.FL_STAR:
        alpha, gamma, beta = check_alpha(alpha), check_star_gamma(gamma), check_star_beta(beta)
    elif kind == LossKind.QFL:
        beta = check_qfl_beta(beta)
    else:
        alpha, gamma = check_vfl_alpha(alpha), check_gamma(gamma)
        iou_weighted = check_bool("iou_weighted", iou_weighted)
    reduction = check_reduction(reduction)
    return DenseCall(inputs, targets, encode(kind, alpha, gamma, beta, iou_weighted), reduction,
                     output_dtype(inputs), _requires_grad([inputs]))


@dataclass(frozen=True)
class ClassIndexCall:
    """A class-index call (multilevel_focal_loss, focal_loss) in the class-index op's encoding, plus what the
    loss statistics describe (the public loss name, gamma and alpha)."""

    levels: List[torch.Tensor]             # (N, A*C, H_l, W_l)
    labels: torch.Tensor                   # (N, M) contiguous int32 / int64
    weights: Optional[torch.Tensor]        # (N, M) contiguous, compute dtype
    scores: Optional[torch.Tensor]         # (N, M) contiguous, compute dtype, detached (QFL, VFL)
    alpha_per_class: Optional[torch.Tensor]  # (C,) contiguous, compute dtype, detached
    normalizer: Optional[torch.Tensor]     # 0-d or (N,), never read on the host; None: the number norm_value
    norm_value: float
    num_anchors: int
    num_classes: int
    spec: LossSpec
    ignore_index: Optional[int]
    reduction: str
    out_dtype: torch.dtype                 # of the "none" losses
    with_stats: bool
    requires_grad: bool
    loss_name: str
    gamma: float
    alpha: Optional[float]                 # None for a per-class alpha


_NORMALIZER_DTYPES = (torch.int64,)


def _normalizer_tensor(normalizer: torch.Tensor, num_images: int, dtype) -> torch.Tensor:
    """A normalizer tensor in its final form: 0-d or (N,), in the compute dtype (or int64), contiguous."""
    t = normalizer
    # A (1,) tensor for N != 1 images is one number. Compared as "not N" (not "== 1"): a per-image normalizer has
    # N's own symbolic size under torch.compile, so this needs no guard on N's value (no recompile per batch size).
    if t.dim() == 1 and not (t.shape[0] == num_images):
        t = t.reshape(())
    if t.dtype not in _NORMALIZER_DTYPES + (dtype,):
        t = t.to(dtype)
    return t.contiguous()


def class_index_call(levels, labels, num_anchors, num_images, num_classes, label_shape, label_what, alpha, gamma,
                     weights, label_smoothing, background, ignore_index, normalizer, reduction, check_labels, loss,
                     scores, beta, iou_weighted, return_stats, class_weights=None, detach_weight=None,
                     labels_checked=False) -> ClassIndexCall:
    """Check the options of a class-index call over `levels` (already checked) and encode it; labels, weights and
    scores have label_shape (label_what names it) unless labels_checked (the flat form checked them)."""
    first = levels[0]
    device = first.device
    if not labels_checked:
        check_labels_tensor(labels, label_shape, device, label_what)
        check_weights(weights, label_shape, device)
        check_scores(scores, loss, label_shape, device)
    kind, alpha, gamma, beta, iou_weighted, smoothing, reduction = check_class_index_options(
        loss, alpha, gamma, beta, iou_weighted, label_smoothing, background, ignore_index, reduction, check_labels,
        return_stats, num_classes, device, class_weights, detach_weight)
    normalizer = check_normalizer(normalizer, num_images, device, reduction)
    if check_labels and labels.numel():
        check_label_range(labels, num_classes, background, ignore_index)
    cdt = compute_dtype(first.dtype)
    per_class = isinstance(alpha, torch.Tensor)
    if scores is None and loss == "bce":  # hard targets: score 1 on the label's class
        scores = torch.ones(label_shape, dtype=cdt, device=device)
    norm_tensor, norm_value = None, 1.0
    if isinstance(normalizer, torch.Tensor):
        norm_tensor = _normalizer_tensor(normalizer, num_images, cdt)
    elif normalizer is not None:
        norm_value = float(normalizer)
    return ClassIndexCall(
        list(levels), labels.contiguous(), weights.to(cdt).contiguous() if weights is not None else None,
        scores.detach().to(cdt).contiguous() if scores is not None else None,
        alpha.detach().to(cdt).contiguous() if per_class else None, norm_tensor, norm_value, num_anchors,
        num_classes, encode(kind, -1.0 if per_class else alpha, gamma, beta, iou_weighted, smoothing),
        None if ignore_index is None else int(ignore_index), reduction, output_dtype(first), return_stats,
        _requires_grad(levels), loss, float(gamma), None if per_class else float(alpha))


def multilevel_call(level_logits, labels, num_anchors, options) -> ClassIndexCall:
    """multilevel_focal_loss's arguments (options: its keyword arguments) checked and encoded."""
    check_level_logits(level_logits, num_anchors)
    first = level_logits[0]
    num_images, num_classes = first.shape[0], first.shape[1] // num_anchors
    num_anchors_total = sum(x.shape[2] * x.shape[3] for x in level_logits) * num_anchors
    return class_index_call(list(level_logits), labels, num_anchors, num_images, num_classes,
                            (num_images, num_anchors_total), "N, sum of H*W*A over levels", **options)


def flat_call(logits, labels, options) -> ClassIndexCall:
    """focal_loss's arguments checked and encoded: the (..., C) logits as one channels_last level of one anchor
    per position, (N, C, M, 1) (a view, no copy); labels, weights and scores as (N, M)."""
    check_class_logits(logits)
    num_classes = logits.shape[-1]
    num_images = logits.shape[0] if logits.dim() >= 3 else 1
    rows = logits.numel() // num_classes // num_images if num_images else 0
    x = logits.contiguous()
    level = x.reshape(num_images, rows, 1, num_classes).permute(0, 3, 1, 2)
    if rows * num_classes > INT32_MAX:
        raise ValueError(f"logits: one image must have < 2**31 logits, got {rows * num_classes}")
    labels_shape = logits.shape[:-1]
    check_labels_tensor(labels, labels_shape, logits.device, "logits.shape[:-1]")
    check_weights(options["weights"], labels_shape, logits.device)
    check_scores(options["scores"], options["loss"], labels_shape, logits.device)
    per_anchor = {k: options[k].reshape(num_images, rows) if options[k] is not None else None
                  for k in ("weights", "scores")}
    return class_index_call([level], labels.reshape(num_images, rows), 1, num_images, num_classes,
                            (num_images, rows), None, **{**options, **per_anchor}, labels_checked=True)


# --- segments: segmented_focal_loss -----------------------------------------------------------------------------

SEGMENT_FIELDS = ("logits", "labels", "weights", "scores", "normalizer")


@contextlib.contextmanager
def _in_segment(i: int):
    """Errors of segment i's checks name it: "segments[i].labels must ..."."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise type(e)(f"segments[{i}].{e}") from None


def _segment_fields(i: int, segment) -> tuple:
    """(logits, labels, weights, scores, normalizer) of a Segment, a tuple in that order or a dict of those keys."""
    if isinstance(segment, dict):
        unknown = sorted(set(segment) - set(SEGMENT_FIELDS))
        if unknown or "logits" not in segment or "labels" not in segment:
            raise ValueError(f"segments[{i}] as a dict needs the keys 'logits' and 'labels' (optional: 'weights', "
                             f"'scores', 'normalizer'), got {sorted(segment)}")
        return tuple(segment.get(k) for k in SEGMENT_FIELDS)
    if isinstance(segment, tuple) and 2 <= len(segment) <= len(SEGMENT_FIELDS):
        return tuple(segment) + (None,) * (len(SEGMENT_FIELDS) - len(segment))
    raise TypeError(f"segments[{i}] must be a focal_triton.Segment (logits, labels, weights=None, scores=None, "
                    f"normalizer=None), a tuple of those or a dict, got {type(segment).__name__}")


def _segment_logits(x, num_anchors: int, first) -> torch.Tensor:
    """A segment's logits as the (N, A*C, H, W) view the op takes: (N, Q, C) -> (N, C, Q, 1) (one anchor per
    query or anchor point), (N, A*C, H, W) as given. Any strides but overlapping ones; no copy."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"logits must be 3-D (N, Q, C) or 4-D (N, A*C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() == 3 and num_anchors != 1:
        raise ValueError(f"logits of shape (N, Q, C) {tuple(x.shape)} have one anchor per row, but num_anchors = "
                         f"{num_anchors}: pass 4-D (N, A*C, H, W) logits")
    if overlapping(x):
        raise ValueError(f"logits must not overlap in memory (an expanded tensor, a stride of 0 along a dim of size "
                         f"> 1): got shape {tuple(x.shape)} with strides {tuple(x.stride())}; pass .contiguous()")
    view = segment_view(x)
    if view.shape[1] == 0 or view.shape[1] % num_anchors:
        raise ValueError(f"logits' channels ({view.shape[1]}) must be num_anchors ({num_anchors}) times the number "
                         f"of classes (>= 1)")
    if first is not None:
        f = first
        if (view.dtype, view.device, view.shape[0], view.shape[1]) != (f.dtype, f.device, f.shape[0], f.shape[1]):
            raise ValueError(f"logits must share dtype, device, N and classes with segments[0].logits: got "
                             f"{view.dtype} on {view.device} with {view.shape[0]} images and {view.shape[1]} "
                             f"channels, segments[0] has {f.dtype} on {f.device}, {f.shape[0]} images, {f.shape[1]} "
                             f"channels")
    span = 1 + sum((d - 1) * abs(st) for d, st in zip(view.shape[1:], view.stride()[1:]))
    if view.numel() and span > INT32_MAX:
        raise ValueError(f"logits: one image must span < 2**31 elements of storage, got {span}")
    return view


def _shared_columns(tensors, num_images: int):
    """(view, row stride) when the (N, M_s) tensors are consecutive column slices of one tensor (one storage, unit
    column stride, one row stride): the (N, sum M_s) view from the first one's first column, read in place; else
    None."""
    t0 = tensors[0]
    storage = t0.untyped_storage().data_ptr()
    offset, row = t0.storage_offset(), t0.stride(0)
    for t in tensors:
        if t.dtype != t0.dtype or t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset:
            return None
        if (t.shape[1] > 1 and t.stride(1) != 1) or (num_images > 1 and t.stride(0) != row):
            return None
        offset += t.shape[1]
    width = offset - t0.storage_offset()
    if num_images > 1 and width > row:
        return None
    row = row if num_images > 1 else max(width, 1)
    return t0.as_strided((num_images, width), (row, 1), t0.storage_offset()), row


def _segment_divisors(normalizers, num_images: int, dtype, device) -> torch.Tensor:
    """(S, N) divisors: loss_s = sum_n (sum over image n of segment s) / divisors[s, n]: Z (a number or 0-d tensor,
    1 without normalizer) or N Z_n (per image). Built on the device from the tensors; never read on the host."""
    rows = []
    for z in normalizers:
        if z is None or not isinstance(z, torch.Tensor):
            rows.append(torch.full((num_images,), 1.0 if z is None else float(z), dtype=dtype, device=device))
        elif z.numel() == 1 and not (z.dim() == 1 and z.shape[0] == num_images):
            rows.append(z.reshape(()).to(dtype).expand(num_images))
        else:
            rows.append(z.to(dtype) * num_images)
    return torch.stack(rows)


def _segment_sources(tensors, views):
    """(sources, geometry): the tensors the op differentiates and, per segment, (source index, N, K, H, W, sn, sk,
    sh, sw, storage offset) of its (N, A*C, H, W) view. Segments that are differentiable views of one dense base
    on disjoint storage ranges (the layers of a stacked decoder tensor, the denoising split) share it as their
    source: their gradients are written into the base's gradient in place, with no view-backward copies (autograd
    would materialize a base-sized gradient for each view). Any other segment is its own source."""
    groups = {}
    for i, t in enumerate(tensors):
        base = t._base
        if base is not None and t.requires_grad and t.grad_fn is not None and base.requires_grad and \
                is_dense(base) and not overlapping(base):
            groups.setdefault(id(base), (base, []))[1].append(i)
    index = [None] * len(tensors)
    sources = []
    for base, members in groups.values():
        boxes = [base_box(tensors[i], base) for i in members if tensors[i].numel()]
        if any(b is None for b in boxes) or any(not disjoint(a, b) for k, a in enumerate(boxes)
                                                for b in boxes[k + 1:]):
            continue  # not slices of the base, or two segments share logits: each keeps its own source
        sources.append(base)
        for i in members:
            index[i] = len(sources) - 1
    for i, t in enumerate(tensors):
        if index[i] is None:
            sources.append(t)
            index[i] = len(sources) - 1
    geometry = []
    for i, v in zip(index, views):
        geometry += [i, *v.shape, *v.stride(), v.storage_offset()]
    return sources, geometry


@dataclass(frozen=True)
class SegmentsCall:
    """A segmented_focal_loss call in the segments op's encoding."""

    logits: List[torch.Tensor]              # (N, A*C, H_s, W_s) views, any non-overlapping strides
    sources: List[torch.Tensor]             # what the op differentiates (`_segment_sources`)
    geometry: List[int]                     # per segment: source index, sizes, strides, storage offset
    labels: torch.Tensor                    # (N, >= M) int32 / int64, unit column stride, row stride label_row
    label_row: int
    weights: Optional[torch.Tensor]         # laid out like labels, compute dtype
    scores: Optional[torch.Tensor]          # laid out like labels, compute dtype, detached
    alpha_per_class: Optional[torch.Tensor]
    divisors: torch.Tensor                  # (S, N) compute dtype
    num_anchors: int
    spec: LossSpec
    ignore_index: Optional[int]


def segments_call(segments, num_anchors, options) -> SegmentsCall:
    """segmented_focal_loss's arguments checked (every message names the segment and the argument) and encoded."""
    if isinstance(segments, torch.Tensor) or not isinstance(segments, (list, tuple)) or (
            segments and isinstance(segments[0], torch.Tensor)):
        raise TypeError(f"segments must be a list or tuple of focal_triton.Segment, got {type(segments).__name__}")
    if not (1 <= len(segments) <= MAX_SEGMENTS):
        raise ValueError(f"segments must hold 1 to {MAX_SEGMENTS} segments, got {len(segments)}")
    num_anchors = check_int("num_anchors", num_anchors, 1)
    fields = [_segment_fields(i, s) for i, s in enumerate(segments)]
    logits = []
    for i, (x, *_rest) in enumerate(fields):
        with _in_segment(i):
            logits.append(_segment_logits(x, num_anchors, logits[0] if logits else None))
    first = logits[0]
    device, num_images, num_classes = first.device, first.shape[0], first.shape[1] // num_anchors
    loss = options["loss"]
    kind, alpha, gamma, beta, iou_weighted, smoothing, _ = check_class_index_options(
        loss, options["alpha"], options["gamma"], options["beta"], options["iou_weighted"],
        options["label_smoothing"], options["background"], options["ignore_index"], "sum", options["check_labels"],
        False, num_classes, device, options.get("class_weights"), options.get("detach_weight"))
    normalizers = []
    for i, ((_, labels, weights, scores, normalizer), x) in enumerate(zip(fields, logits)):
        shape = (num_images, x.shape[2] * x.shape[3] * num_anchors)
        with _in_segment(i):
            check_labels_tensor(labels, shape, device, "N, positions * num_anchors of the segment")
            check_weights(weights, shape, device)
            check_scores(scores, loss, shape, device)
            normalizers.append(check_normalizer(normalizer, num_images, device, "sum"))
    ignore_index = options["ignore_index"]
    cdt = compute_dtype(first.dtype)
    labels, label_row, weights, scores = _segment_columns([f[1] for f in fields], [f[2] for f in fields],
                                                          [f[3] for f in fields], num_images, cdt)
    if scores is None and loss == "bce":  # hard targets: score 1 on the label's class
        scores = torch.ones(labels.shape, dtype=cdt, device=device)
    if options["check_labels"] and labels.numel():
        try:
            check_label_range(labels, num_classes, options["background"], ignore_index)
        except ValueError:
            for i, f in enumerate(fields):
                with _in_segment(i):
                    check_label_range(f[1], num_classes, options["background"], ignore_index)
            raise
    per_class = isinstance(alpha, torch.Tensor)
    sources, geometry = _segment_sources([f[0] for f in fields], logits)
    return SegmentsCall(
        logits, sources, geometry, labels, label_row, weights, scores, alpha.detach().to(cdt).contiguous() if per_class else None,
        _segment_divisors(normalizers, num_images, cdt, device), num_anchors,
        encode(kind, -1.0 if per_class else alpha, gamma, beta, iou_weighted, smoothing),
        None if ignore_index is None else int(ignore_index))


def _segment_columns(labels, weights, scores, num_images: int, dtype):
    """The segments' labels, weights and scores as one label layout (N, >= M) with one row stride: in place where
    each is a run of consecutive column slices of one tensor with the same row stride (FPN levels of one label
    tensor), else concatenated (a copy 1/C the size of the logits; missing weights and "bce" scores as ones)."""
    has_weights, has_scores = any(w is not None for w in weights), any(s is not None for s in scores)
    groups = [labels] + ([weights] if has_weights else []) + ([scores] if has_scores else [])
    shared = [None if any(t is None or (g is not labels and t.dtype != dtype) for t in g)
              else _shared_columns(g, num_images) for g in groups]
    if all(s is not None for s in shared) and len({s[1] for s in shared}) == 1:
        out = [s[0] for s in shared]
        row = shared[0][1]
    else:
        lab_dtype = torch.int64 if any(t.dtype == torch.int64 for t in labels) else torch.int32
        out = [torch.cat([t.to(lab_dtype) for t in labels], dim=1)]
        if has_weights:
            out.append(torch.cat([w.to(dtype) if w is not None else torch.ones(l.shape, dtype=dtype, device=l.device)
                                  for w, l in zip(weights, labels)], dim=1))
        if has_scores:
            out.append(torch.cat([s.detach().to(dtype) if s is not None else
                                  torch.ones(l.shape, dtype=dtype, device=l.device) for s, l in zip(scores, labels)],
                                 dim=1))
        row = out[0].shape[1]
    out = iter(out)
    lab = next(out)
    w = next(out) if has_weights else None
    s = next(out).detach() if has_scores else None
    return lab, row, w, s
