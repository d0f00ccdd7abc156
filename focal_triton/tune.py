"""Pre-tune the kernels for the shapes of common detectors on this GPU, so that training starts tuned.

    python -m focal_triton.tune                 # RetinaNet and FCOS on COCO sizes, batch 1..16, bf16/fp16/fp32
    python -m focal_triton.tune --dry-run       # list the shapes it would tune (works without a GPU)

Each shape runs the loss forward ("sum") and backward once; the first launch of each new tuning key times every
candidate config (see focal_triton/kernels/tuning.py) and stores the fastest in the per-GPU JSON cache, which later
processes read. Prints the chosen configs. Without CUDA there is nothing to tune: it says so and exits 0.
"""
import argparse
import sys
import time

import torch

COCO_IMAGE = (800, 1333)
FPN_STRIDES = (8, 16, 32, 64, 128)
DETECTORS = {"retinanet": dict(num_anchors=9, num_classes=80), "fcos": dict(num_anchors=1, num_classes=80)}


def level_sizes(image_hw=COCO_IMAGE, strides=FPN_STRIDES):
    """(H_l, W_l) of the FPN levels P3..P7 of an image (ceil division, as the convolutions give)."""
    h, w = image_hw
    return [(-(-h // s), -(-w // s)) for s in strides]


def detector_shapes(detectors=("retinanet", "fcos"), batches=(1, 2, 4, 8, 16), dtypes=("bfloat16", "float16",
                    "float32"), image_hw=COCO_IMAGE):
    """The (name, batch, A, C, level sizes, dtype) the tuner runs."""
    return [dict(detector=d, batch=b, dtype=dt, image=image_hw, levels=level_sizes(image_hw), **DETECTORS[d])
            for d in detectors for b in batches for dt in dtypes]


class Progress:
    """A plain text progress bar on stderr (no dependency): `with Progress(total, "tuning") as bar: bar.step(label)`."""

    def __init__(self, total: int, title: str = "", stream=None, width: int = 30):
        self.total, self.title, self.width, self.done = max(1, total), title, width, 0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def step(self, label: str = ""):
        self.done += 1
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        self.stream.write(f"\r{self.title} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                          f"{elapsed:5.0f}s elapsed, ~{eta:4.0f}s left  {label[:40]:<40}")
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.write("\n")
        self.stream.flush()


def make_inputs(shape, device, requires_grad=True, seed=0):
    """Per-level NCHW logits (what a conv head gives; channels_last heads are keyed, and tuned, separately) and
    torchvision-style labels: ~0.2% positive anchors, ~1% ignored, the rest background."""
    g = torch.Generator().manual_seed(seed)
    n, a, c = shape["batch"], shape["num_anchors"], shape["num_classes"]
    dtype = getattr(torch, shape["dtype"])
    levels = []
    for h, w in shape["levels"]:
        x = (torch.randn(n, a * c, h, w, generator=g) * 2 - 4.6).to(device=device, dtype=dtype)
        levels.append(x.requires_grad_(requires_grad))
    m = a * sum(h * w for h, w in shape["levels"])
    u = torch.rand(n, m, generator=g)
    labels = torch.where(u < 0.002, torch.randint(0, c, (n, m), generator=g),
                         torch.where(u < 0.012, torch.full((n, m), -2), torch.full((n, m), -1)))
    return levels, labels.to(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the shapes, tune nothing")
    parser.add_argument("--detectors", default="retinanet,fcos")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    args = parser.parse_args(argv)
    shapes = detector_shapes(args.detectors.split(","), [int(b) for b in args.batches.split(",")],
                             args.dtypes.split(","))
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("focal_triton.tune: no CUDA device here, nothing to tune (the CPU path has no launch configs). "
                  "Shapes it would tune on a GPU:")
        for s in shapes:
            logits = s["batch"] * s["num_anchors"] * s["num_classes"] * sum(h * w for h, w in s["levels"])
            print(f"  {s['detector']:9s} batch {s['batch']:2d} {s['dtype']:8s} {s['image'][0]}x{s['image'][1]} "
                  f"A={s['num_anchors']} C={s['num_classes']} levels {s['levels']} ({logits:,} logits)")
        return 0

    import triton

    import focal_triton
    from focal_triton.kernels import tuning

    if not tuning.autotune_enabled():
        print(f"{tuning.AUTOTUNE_ENV}=0: tuning is off, nothing to do")
        return 0
    device = torch.device("cuda")
    cache = tuning.cache_for(device)
    before = set(cache.configs)
    with Progress(len(shapes), "tuning") as bar:
        for s in shapes:
            levels, labels = make_inputs(s, device)
            num_fg = (labels >= 0).sum(1).clamp(min=1)
            loss = focal_triton.multilevel_focal_loss(levels, labels, s["num_anchors"], normalizer=num_fg,
                                                      check_labels=False)
            loss.backward()
            torch.cuda.synchronize()
            del levels, labels, loss
            bar.step(f"{s['detector']} b{s['batch']} {s['dtype']}")
    print(f"device {torch.cuda.get_device_name(device)}, triton {triton.__version__}, cache {cache.path}"
          f"{'' if cache.persistent else ' (not writable: kept in memory only)'}")
    for key in sorted(cache.configs):
        print(f"  {'new ' if key not in before else '    '}{key}: {cache.configs[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
