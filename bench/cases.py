"""Benchmark cases: detector heads on COCO images and a sweep of sizes, with their inputs.

A case is one detector-head loss problem: N images, FPN levels (H_l, W_l), A anchors per position, C classes,
the logits' dtype, and what is timed (forward only, or forward + backward). Inputs are the head's per-level NCHW
outputs (logits ~ N(-4.6, 2), the prior bias) and torchvision-style labels (~0.2% positive anchors, ~1% ignored).
"""
import math
from dataclasses import dataclass, field

import torch

from focal_triton.tune import COCO_IMAGE, level_sizes, make_inputs

ONE_COCO_IMAGE = 9 * 80 * sum(h * w for h, w in level_sizes(COCO_IMAGE))  # 16,056,000 RetinaNet logits
SWEEP_TOTALS = (1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8, 5e8)


@dataclass
class Case:
    family: str            # "retinanet", "fcos" or "sweep"
    batch: int
    image: tuple           # (H, W) of the input image
    num_anchors: int
    num_classes: int
    dtype: str             # "float32", "float16", "bfloat16"
    mode: str              # "fwd" or "fwd+bwd"
    levels: list = field(default=None)

    def __post_init__(self):
        if self.levels is None:
            self.levels = level_sizes(self.image)

    @property
    def numel(self) -> int:
        return self.batch * self.num_anchors * self.num_classes * sum(h * w for h, w in self.levels)

    @property
    def name(self) -> str:
        return (f"{self.family} b{self.batch} {self.image[0]}x{self.image[1]} A{self.num_anchors} "
                f"C{self.num_classes} {self.dtype} {self.mode}")

    def inputs(self, device, requires_grad: bool, seed: int = 0):
        shape = dict(batch=self.batch, num_anchors=self.num_anchors, num_classes=self.num_classes,
                     dtype=self.dtype, levels=self.levels)
        return make_inputs(shape, device, requires_grad=requires_grad, seed=seed)


def sweep_image(total: float):
    """(batch, image) of a RetinaNet head (A = 9, C = 80) with about `total` logits: one image scaled (aspect of
    COCO's 800x1333) up to one COCO image, then COCO images stacked in a batch."""
    if total <= ONE_COCO_IMAGE:
        s = math.sqrt(total / ONE_COCO_IMAGE)
        return 1, (max(8, round(COCO_IMAGE[0] * s)), max(8, round(COCO_IMAGE[1] * s)))
    return max(1, round(total / ONE_COCO_IMAGE)), COCO_IMAGE


def all_cases(batches=(1, 2, 4, 8, 16), dtypes=("bfloat16", "float16", "float32"), modes=("fwd", "fwd+bwd"),
              sweep=SWEEP_TOTALS, fcos=True):
    cases = []
    for mode in modes:
        for dtype in dtypes:
            cases += [Case("retinanet", b, COCO_IMAGE, 9, 80, dtype, mode) for b in batches]
            if fcos:
                cases += [Case("fcos", b, COCO_IMAGE, 1, 80, dtype, mode) for b in batches]
            for total in sweep:
                b, image = sweep_image(total)
                cases.append(Case("sweep", b, image, 9, 80, dtype, mode))
    return cases


def default_cases(device: torch.device, quick: bool = False):
    """The cases `make bench` runs: everything on a GPU; on a CPU a capped set (2 cores run the eager baseline
    at ~1 s per COCO image and torch.compile takes ~30 s per shape), said in the output."""
    if device.type == "cuda":
        if quick:
            return all_cases(batches=(1, 16), dtypes=("bfloat16",), sweep=(1e5, 1e7))
        return all_cases()
    if quick:
        return [Case("sweep", *sweep_image(1e5), 9, 80, "float32", "fwd+bwd"),
                Case("sweep", *sweep_image(3e5), 9, 80, "float32", "fwd")]
    cases = [Case("retinanet", 1, COCO_IMAGE, 9, 80, "float32", "fwd+bwd"),
             Case("retinanet", 1, COCO_IMAGE, 9, 80, "float32", "fwd"),
             Case("fcos", 1, COCO_IMAGE, 1, 80, "float32", "fwd+bwd"),
             Case("retinanet", 1, COCO_IMAGE, 9, 80, "bfloat16", "fwd+bwd")]
    for total in (1e5, 1e6, 3e6):
        cases.append(Case("sweep", *sweep_image(total), 9, 80, "float32", "fwd+bwd"))
    return cases


CPU_CAP_NOTE = ("CPU: a capped case list (RetinaNet and FCOS at one COCO image, a sweep up to one image, float32 "
                "and one bfloat16 case); the full list (batch 1..16, 1e5..5e8 logits, 3 dtypes) runs on a GPU")
