"""Train a small RetinaNet on synthetic shapes twice from the same seed, with torchvision's classification loss and
with focal_triton's (one call on the head's per-level outputs); plot both loss curves, some detections, and the
loss distribution of the trained detector (the paper's Figure 4, from focal_triton's loss statistics).

    python examples/train_synthetic.py [--steps 300] [--dtype float64] [--out examples/results]

Nothing is downloaded: the images (rectangles, ellipses and triangles of random colours on noise) are generated,
and the model (torchvision's RetinaNet with its GroupNorm head on a small GroupNorm CNN + FPN, 1M parameters) starts
from random weights. On 2 CPU cores 300 steps of batch 8 take about 10 minutes per run in float64.

The runs train in float64 by default, so the two curves coincide to ~1e-9: in float32, rounding differences between
any two implementations of the same sum grow through from-scratch training until the runs part ways. `--dtype
float32` shows that, with a control run (the stock loss with its gradients scaled by 1 + 1e-7).
"""
import argparse
import copy
import math
import time
from pathlib import Path

from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork

import focal_triton
from focal_triton.integrations.torchvision import use_focal_triton

CLASSES = ("rectangle", "ellipse", "triangle")
SIZE = 128
WIDTH = 64  # FPN and head channels


def make_image(g: torch.Generator):
    """One image with 1 to 3 shapes: (image (3, SIZE, SIZE) in [0, 1], boxes (n, 4) xyxy, labels (n,))."""
    image = torch.rand(3, SIZE, SIZE, generator=g) * 0.3
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    boxes, labels = [], []
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        w, h = (torch.randint(16, 48, (2,), generator=g)).tolist()
        x0, y0 = int(torch.randint(0, SIZE - w, (1,), generator=g)), int(torch.randint(0, SIZE - h, (1,), generator=g))
        kind = int(torch.randint(0, len(CLASSES), (1,), generator=g))
        u, v = (xx - x0) / w, (yy - y0) / h  # in [0, 1] inside the box
        inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
        if kind == 1:
            inside &= (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
        elif kind == 2:
            inside &= (v >= 1 - 2 * u) & (v >= 2 * u - 1)
        colour = 0.4 + 0.6 * torch.rand(3, 1, 1, generator=g)
        image = torch.where(inside, colour, image)
        boxes.append([x0, y0, x0 + w, y0 + h])
        labels.append(kind)
    return image, torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels)


def make_batch(g: torch.Generator, batch: int):
    images, targets = [], []
    for _ in range(batch):
        image, boxes, labels = make_image(g)
        images.append(image)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def _stage(cin, cout):
    """Two 3x3 convs (the first with stride 2), GroupNorm and ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True))


class SmallBackbone(nn.Module):
    """A small GroupNorm CNN with an FPN: P3, P4, P5 (strides 8, 16, 32) of WIDTH channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_stage(3, 32), _stage(32, 48))           # stride 4
        self.c3, self.c4, self.c5 = _stage(48, 64), _stage(64, 96), _stage(96, 128)
        self.fpn = FeaturePyramidNetwork([64, 96, 128], WIDTH)
        self.out_channels = WIDTH

    def forward(self, x):
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        return self.fpn(OrderedDict([("p3", c3), ("p4", c4), ("p5", c5)]))


def make_model(seed: int = 0):
    """RetinaNet (torchvision's class, its GroupNorm head) on SmallBackbone: 3 levels x 9 anchors x 3 classes."""
    torch.manual_seed(seed)
    sizes = tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in (16, 32, 64))
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    head = RetinaNetHead(WIDTH, anchors.num_anchors_per_location()[0], len(CLASSES),
                         norm_layer=partial(nn.GroupNorm, 16))
    return RetinaNet(SmallBackbone(), num_classes=len(CLASSES), anchor_generator=anchors, head=head,
                     min_size=SIZE, max_size=SIZE)


def train(model, steps: int, batch: int, seed: int = 1, lr: float = 0.01, warmup: int = 50, perturb: float = 0.0,
          dtype=torch.float32):
    """SGD with a linear warm-up and the same data order for every run; returns the per-step losses.

    A stable schedule matters for comparing two runs: where training is chaotic (loss spikes), float32 rounding
    differences between any two implementations grow until the runs part ways. `perturb` scales the gradients by
    1 + perturb (a control run: how far a difference of that size alone carries)."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    model.train()
    history = {"classification": [], "bbox_regression": []}
    for step in range(steps):
        images, targets = make_batch(g, batch)
        losses = model([image.to(dtype) for image in images], targets)
        optimizer.zero_grad()
        (sum(losses.values()) * (1.0 + perturb)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        schedule.step()
        for key in history:
            history[key].append(losses[key].detach().item())
        if (step + 1) % 25 == 0:
            print(f"  step {step + 1}/{steps}: classification loss {history['classification'][-1]:.5f}", flush=True)
    return history


def plot_curves(histories, path: Path, dtype: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ("classification", "bbox_regression")):
        for (name, hist), style in zip(histories.items(), ("-", "--", ":")):
            ax.plot(hist[key], style, label=name, linewidth=1.2)
        ax.set_title(f"{key} loss ({dtype})")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_distribution(model, path: Path, dtype, seed: int = 321, batch: int = 8):
    """The paper's Figure 4 for the trained detector: its loss statistics on fresh images for several gamma (the
    statistics come from the same kernel pass as the loss: use_focal_triton(..., collect_stats=True))."""
    g = torch.Generator().manual_seed(seed)
    images, targets = make_batch(g, batch)
    images = [image.to(dtype) for image in images]
    stats = {}
    model.train()  # the losses (and their matching) run in training mode; no gradient, nothing is updated
    with torch.no_grad():
        for gamma in (0.0, 0.5, 1.0, 2.0):
            use_focal_triton(model, gamma=gamma, collect_stats=True)
            model(images, targets)
            stats[gamma] = model.focal_triton.stats
    use_focal_triton(model)  # back to the training options
    print(f"loss statistics of the trained detector on {batch} fresh images (gamma = 2):")
    print(stats[2.0].summary())
    focal_triton.plot_loss_distribution(stats, path, title="trained synthetic-shapes RetinaNet: cumulative "
                                                            "normalized loss (Lin et al. 2017, Figure 4)")


def plot_detections(model, path: Path, seed: int = 123, count: int = 4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(seed)
    images, targets = make_batch(g, count)
    model.eval()
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        detections = model([image.to(dtype) for image in images])
    fig, axes = plt.subplots(1, count, figsize=(3 * count, 3.2))
    for ax, image, target, det in zip(axes, images, targets, detections):
        ax.imshow(image.permute(1, 2, 0).numpy())
        for box in target["boxes"]:
            x0, y0, x1, y1 = box.tolist()
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", linestyle=":"))
        keep = det["scores"] > 0.3
        for box, label, score in zip(det["boxes"][keep], det["labels"][keep], det["scores"][keep]):
            x0, y0, x1, y1 = box.tolist()
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red"))
            ax.text(x0, y0, f"{CLASSES[label]} {score:.2f}", color="red", fontsize=7, va="bottom")
        ax.axis("off")
    fig.suptitle("focal_triton-trained detector: detections (red, score > 0.3) and ground truth (white)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--control", action="store_true",
                        help="add a control run: the stock loss with gradients perturbed by 1e-7 relative")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    stock = make_model().to(dtype)
    # The paper's prior init, as torchvision's head already does (again after the cast, for the exact float64 value).
    focal_triton.init_prior_bias_(stock.head.classification_head.cls_logits)
    control = copy.deepcopy(stock)
    ours = use_focal_triton(copy.deepcopy(stock))
    histories, times = {}, {}
    runs = (("torchvision loss", stock, 0.0), ("focal_triton loss", ours, 0.0),
            ("torchvision loss, gradients x (1 + 1e-7) (control)", control, 1e-7))
    for name, model, perturb in runs if args.control else runs[:2]:
        start = time.perf_counter()
        histories[name] = train(model, args.steps, args.batch, perturb=perturb, dtype=dtype)
        times[name] = time.perf_counter() - start
        print(f"{name}: {args.steps} steps in {times[name]:.1f} s, final classification loss "
              f"{histories[name]['classification'][-1]:.5f}")
    a, b = (h["classification"] for h in list(histories.values())[:2])
    gap = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
    print(f"largest relative gap between the two classification-loss curves: {gap:.2e}")
    plot_curves(histories, args.out / "train_synthetic_loss.png", args.dtype)
    plot_detections(ours, args.out / "train_synthetic_detections.png")
    plot_loss_distribution(ours, args.out / "train_synthetic_loss_distribution.png", dtype)
    print(f"plots written to {args.out}")
    if not math.isfinite(gap):
        raise SystemExit("the loss curves are not finite")


if __name__ == "__main__":
    main()
