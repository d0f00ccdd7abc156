"""focal_triton: fused Triton kernels for the focal loss of dense object detectors.

Public API: `sigmoid_focal_loss` (a drop-in for torchvision.ops.sigmoid_focal_loss) and `SigmoidFocalLoss` (dense
targets); `multilevel_focal_loss` / `MultiLevelFocalLoss` (a head's per-level outputs with the assigner's integer
labels, one launch) and `focal_loss` / `FocalLoss` (the same for concatenated (..., C) logits); with
`return_stats=True` they also return `LossStatistics` (counts, loss sums, histograms) for `plot_loss_distribution`.
The relatives of FL: `sigmoid_focal_loss_star` / `FocalLossStar` (FL*), `quality_focal_loss` / `QualityFocalLoss`
(QFL, GFL) and `varifocal_loss` / `VarifocalLoss` (VFL, VarifocalNet) on dense targets, and
`loss="fl_star" | "qfl" | "vfl"` of the class-index forms. `segmented_focal_loss` / `SegmentedFocalLoss`: many
head outputs (`Segment`: DETR decoder layers, YOLO heads, FPN levels) of any strides in one launch.
`focal_matching_cost`: the focal classification cost of DETR-style Hungarian matchers, (N, C) logits and G target
labels to an (N, G) cost.
Layers (imports run one way): functional / modules -> validation -> ops (registered ops: backend choice, autograd,
fake shapes) -> kernels (Triton) | cpu (pure torch); kernels and cpu share only `losses` and `layouts` (docs/design.md).
"""
from .distributed import global_normalizer
from .functional import (Segment, SegmentLosses, focal_loss, focal_matching_cost, multilevel_focal_loss,
                         quality_focal_loss, segmented_focal_loss, sigmoid_focal_loss, sigmoid_focal_loss_star,
                         varifocal_loss)
from .modules import (FocalLoss, FocalLossStar, MultiLevelFocalLoss, QualityFocalLoss, SegmentedFocalLoss,
                      SigmoidFocalLoss, VarifocalLoss)
from .prior import init_prior_bias_
from .stats import LossStatistics, plot_loss_distribution
from . import torchscript  # noqa: F401  (registers the public functions' ops for TorchScript)

__version__ = "0.1.0"
__all__ = ["sigmoid_focal_loss", "SigmoidFocalLoss", "focal_loss", "FocalLoss", "multilevel_focal_loss",
           "MultiLevelFocalLoss", "segmented_focal_loss", "SegmentedFocalLoss", "Segment", "SegmentLosses",
           "sigmoid_focal_loss_star", "FocalLossStar", "quality_focal_loss", "QualityFocalLoss",
           "varifocal_loss", "VarifocalLoss", "global_normalizer", "init_prior_bias_", "LossStatistics",
           "plot_loss_distribution", "focal_matching_cost", "__version__"]
