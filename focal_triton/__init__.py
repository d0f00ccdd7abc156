"""focal_triton: fused Triton kernels for the focal loss of dense object detectors.

Public API: `sigmoid_focal_loss` (a drop-in for torchvision.ops.sigmoid_focal_loss) and `SigmoidFocalLoss`.
The Triton kernels are in `focal_triton.kernels`; `focal_triton.ops` registers them as torch.ops.focal_triton.*.
"""
from .functional import sigmoid_focal_loss
from .modules import SigmoidFocalLoss

__version__ = "0.1.0"
__all__ = ["sigmoid_focal_loss", "SigmoidFocalLoss", "__version__"]
