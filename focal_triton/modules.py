"""``nn.Module`` wrappers over the functional API."""
import torch
from torch import nn

from .functional import (focal_loss, multilevel_focal_loss, quality_focal_loss, segmented_focal_loss,
                         sigmoid_focal_loss, sigmoid_focal_loss_star, varifocal_loss)
from .validation import (check_alpha, check_bool, check_class_index_options, check_gamma, check_int, check_qfl_beta,
                         check_reduction, check_star_beta, check_star_gamma, check_vfl_alpha)


class SigmoidFocalLoss(nn.Module):
    """Module form of :func:`focal_triton.sigmoid_focal_loss`, with the same defaults (alpha 0.25, gamma 2,
    reduction "none"); the arguments are checked when the module is built. ``forward(inputs, targets)``."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.gamma = check_gamma(gamma)
        self.reduction = check_reduction(reduction)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class FocalLossStar(nn.Module):
    """Module form of :func:`focal_triton.sigmoid_focal_loss_star` (FL*), with its (fvcore's) defaults.
    ``forward(inputs, targets)``."""

    def __init__(self, alpha: float = -1, gamma: float = 1.0, beta: float = 0.0, reduction: str = "none"):
        super().__init__()
        self.alpha, self.gamma, self.beta = check_alpha(alpha), check_star_gamma(gamma), check_star_beta(beta)
        self.reduction = check_reduction(reduction)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss_star(inputs, targets, self.alpha, self.gamma, self.beta, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, reduction={self.reduction!r}"


class QualityFocalLoss(nn.Module):
    """Module form of :func:`focal_triton.quality_focal_loss` (dense soft targets). ``forward(inputs, targets)``.
    For labels and per-anchor scores use ``FocalLoss(loss="qfl")`` / ``MultiLevelFocalLoss(A, loss="qfl")``."""

    def __init__(self, beta: float = 2.0, reduction: str = "none"):
        super().__init__()
        self.beta = check_qfl_beta(beta)
        self.reduction = check_reduction(reduction)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return quality_focal_loss(inputs, targets, self.beta, self.reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, reduction={self.reduction!r}"


class VarifocalLoss(nn.Module):
    """Module form of :func:`focal_triton.varifocal_loss` (dense IoU-aware targets). ``forward(inputs, targets)``.
    For labels and per-anchor scores use ``FocalLoss(loss="vfl")`` / ``MultiLevelFocalLoss(A, loss="vfl")``."""

    def __init__(self, alpha: float = 0.75, gamma: float = 2.0, iou_weighted: bool = True, reduction: str = "none"):
        super().__init__()
        self.alpha, self.gamma = check_vfl_alpha(alpha), check_gamma(gamma)
        self.iou_weighted = check_bool("iou_weighted", iou_weighted)
        self.reduction = check_reduction(reduction)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return varifocal_loss(inputs, targets, self.alpha, self.gamma, self.iou_weighted, self.reduction)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, gamma={self.gamma}, iou_weighted={self.iou_weighted}, "
                f"reduction={self.reduction!r}")


class FocalLoss(nn.Module):
    """Module form of :func:`focal_triton.focal_loss` (logits (..., C), integer labels (...)), for any ``loss`` of
    the family ("fl", "fl_star", "qfl", "vfl", "bce", "vfl_rtdetr", "mal", "ia_bce"; options a loss does not take
    stay None, the others default to the loss's own defaults). A per-class alpha (or class_weights) tensor is kept
    as a buffer, so it follows the module's ``.to(device)``. Labels are checked at every call unless
    ``check_labels=False``. ``forward(logits, labels, weights=None, normalizer=None, scores=None)`` (scores for the
    scored losses)."""

    def __init__(self, alpha=None, gamma=None, label_smoothing: float = 0.0, background: int = -1,
                 ignore_index=-2, reduction: str = "sum", check_labels: bool = True, loss: str = "fl", beta=None,
                 iou_weighted=None, class_weights=None, detach_weight=None):
        super().__init__()
        # Checked now with the calls' own checks (what needs the logits, a per-class alpha's length, at the call);
        # kept as given, so that the loss's defaults apply.
        check_class_index_options(loss, alpha, gamma, beta, iou_weighted, label_smoothing, background, ignore_index,
                                  reduction, check_labels, class_weights=class_weights, detach_weight=detach_weight)
        for name, value in (("alpha", alpha), ("class_weights", class_weights)):
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value.detach().clone())
            else:
                setattr(self, name, value)
        self.gamma, self.beta, self.iou_weighted, self.loss = gamma, beta, iou_weighted, loss
        self.detach_weight = detach_weight
        self.label_smoothing = float(label_smoothing)
        self.background, self.ignore_index = background, ignore_index
        self.reduction = reduction
        self.check_labels = check_labels

    def _options(self) -> dict:
        return dict(alpha=self.alpha, gamma=self.gamma, label_smoothing=self.label_smoothing,
                    background=self.background, ignore_index=self.ignore_index, reduction=self.reduction,
                    check_labels=self.check_labels, loss=self.loss, beta=self.beta, iou_weighted=self.iou_weighted,
                    class_weights=self.class_weights, detach_weight=self.detach_weight)

    def forward(self, logits, labels, weights=None, normalizer=None, scores=None):
        return focal_loss(logits, labels, weights=weights, normalizer=normalizer, scores=scores, **self._options())

    def __prepare_scriptable__(self):
        # torch.jit.script calls this (also on submodules) before compiling: refuse with the way out.
        function = "multilevel_focal_loss" if isinstance(self, MultiLevelFocalLoss) else "focal_loss"
        raise RuntimeError(
            f"focal_triton.{type(self).__name__} cannot be scripted: its forward takes a normalizer that is a number "
            f"or a tensor, which TorchScript must know when it compiles the call. In scripted code call "
            f"focal_triton.{function}(...) with this module's options (it compiles to the registered op "
            f"focal_triton::api_{function}); the dense modules (SigmoidFocalLoss, ...) script as they are")

    def extra_repr(self) -> str:
        alpha = "per-class tensor" if isinstance(self.alpha, torch.Tensor) else self.alpha
        options = "".join(f", {k}={v}" for k, v in (("beta", self.beta), ("iou_weighted", self.iou_weighted),
                                                     ("detach_weight", self.detach_weight)) if v is not None)
        if isinstance(self.class_weights, torch.Tensor):
            options += ", class_weights=per-class tensor"
        return (f"loss={self.loss!r}, alpha={alpha}, gamma={self.gamma}{options}, "
                f"label_smoothing={self.label_smoothing}, background={self.background}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")


class MultiLevelFocalLoss(FocalLoss):
    """Module form of :func:`focal_triton.multilevel_focal_loss`: ``forward(level_logits, labels, weights=None,
    normalizer=None, scores=None)`` with the head's per-level outputs (N, A*C, H_l, W_l)."""

    def __init__(self, num_anchors: int, alpha=None, gamma=None, label_smoothing: float = 0.0,
                 background: int = -1, ignore_index=-2, reduction: str = "sum", check_labels: bool = True,
                 loss: str = "fl", beta=None, iou_weighted=None, class_weights=None, detach_weight=None):
        super().__init__(alpha, gamma, label_smoothing, background, ignore_index, reduction, check_labels, loss, beta,
                         iou_weighted, class_weights, detach_weight)
        self.num_anchors = check_int("num_anchors", num_anchors, 1)

    def forward(self, level_logits, labels, weights=None, normalizer=None, scores=None):
        return multilevel_focal_loss(level_logits, labels, self.num_anchors, weights=weights, normalizer=normalizer,
                                     scores=scores, **self._options())

    def extra_repr(self) -> str:
        return f"num_anchors={self.num_anchors}, " + super().extra_repr()


class SegmentedFocalLoss(nn.Module):
    """Module form of :func:`focal_triton.segmented_focal_loss`: the options are checked when the module is built
    (a per-class alpha tensor kept as a buffer); ``forward(segments)`` returns ``SegmentLosses(total,
    per_segment)``."""

    def __init__(self, num_anchors: int = 1, alpha=None, gamma=None, label_smoothing: float = 0.0,
                 background: int = -1, ignore_index=-2, check_labels: bool = True, loss: str = "fl", beta=None,
                 iou_weighted=None, class_weights=None, detach_weight=None):
        super().__init__()
        check_class_index_options(loss, alpha, gamma, beta, iou_weighted, label_smoothing, background, ignore_index,
                                  "sum", check_labels, class_weights=class_weights, detach_weight=detach_weight)
        self.num_anchors = check_int("num_anchors", num_anchors, 1)
        if isinstance(alpha, torch.Tensor):
            self.register_buffer("alpha", alpha.detach().clone())
        else:
            self.alpha = alpha
        if isinstance(class_weights, torch.Tensor):
            self.register_buffer("class_weights", class_weights.detach().clone())
        else:
            self.class_weights = None
        self.options = dict(gamma=gamma, label_smoothing=float(label_smoothing), background=background,
                            ignore_index=ignore_index, check_labels=check_labels, loss=loss, beta=beta,
                            iou_weighted=iou_weighted, detach_weight=detach_weight)

    def forward(self, segments):
        return segmented_focal_loss(segments, num_anchors=self.num_anchors, alpha=self.alpha,
                                    class_weights=self.class_weights, **self.options)

    def extra_repr(self) -> str:
        alpha = "per-class tensor" if isinstance(self.alpha, torch.Tensor) else self.alpha
        return f"num_anchors={self.num_anchors}, alpha={alpha}, " + ", ".join(f"{k}={v!r}" for k, v in
                                                                            self.options.items())
