"""A short correctness and speed demo beside the benchmark suite (bench/run.py): compute a focal loss and its
gradient on a RetinaNet-like batch and print them, with the implementation that ran and a side-by-side timing ratio against torchvision's eager code:
first the dense form (torchvision.ops.sigmoid_focal_loss), then the detector form (the head's per-level outputs
and the assigner's labels, against RetinaNetClassificationHead.compute_loss with its permute, cat and one-hot).

    python bench/demo.py [--size small|coco]
"""
import argparse
import time

import torch

import focal_triton
from focal_triton.ops.backend import select_backend


def retinanet_like(batch: int, h: int, w: int, device, dtype, seed: int = 0):
    """Concatenated classification logits (N, sum_l H_l W_l A, C) of a 5-level FPN (strides 8..128), A = 9, C = 80,
    with one-hot targets for about 0.2% positive anchors."""
    g = torch.Generator().manual_seed(seed)
    anchors = sum(-(-h // s) * -(-w // s) for s in (8, 16, 32, 64, 128)) * 9
    logits = (torch.randn(batch, anchors, 80, generator=g) * 2 - 4.6).to(device=device, dtype=dtype)
    targets = torch.zeros(batch, anchors, 80)
    pos = torch.rand(batch, anchors, generator=g) < 0.002
    targets[pos, torch.randint(0, 80, (int(pos.sum()),), generator=g)] = 1.0
    return logits, targets.to(device=device, dtype=dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, repeats: int, device: torch.device) -> float:
    """Best wall time of fn() over `repeats` calls after one warm-up; on CUDA each timed call starts and ends with a
    synchronize, so the time is that of the work, not of queueing it."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "coco"], default="small",
                        help="small: 1 image of 256x320; coco: 1 image of 800x1333")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h, w = (256, 320) if args.size == "small" else (800, 1333)
    logits, targets = retinanet_like(1, h, w, device, torch.float32)
    num_pos = targets.sum().clamp(min=1)
    print(f"device {device}, implementation {select_backend(device)!r}, torch {torch.__version__}")
    print(f"logits {tuple(logits.shape)} = {logits.numel():,} elements, {int(targets.sum())} positives")

    x = logits.clone().requires_grad_(True)
    loss = focal_triton.sigmoid_focal_loss(x, targets, alpha=0.25, gamma=2.0, reduction="sum") / num_pos
    loss.backward()
    print(f"loss = {loss.item():.6f}   |grad| = {x.grad.norm().item():.6f}   "
          f"grad range [{x.grad.min().item():.3e}, {x.grad.max().item():.3e}]")

    try:
        from torchvision.ops import sigmoid_focal_loss as tv_loss
    except ImportError:
        return
    xr = logits.clone().requires_grad_(True)
    ref = tv_loss(xr, targets, alpha=0.25, gamma=2.0, reduction="sum") / num_pos
    ref.backward()
    print(f"torchvision: loss = {ref.item():.6f}   max |grad difference| = "
          f"{(xr.grad - x.grad).abs().max().item():.3e}")

    def step(fn):
        def run():
            xi = logits.detach().requires_grad_(True)
            fn(xi, targets, alpha=0.25, gamma=2.0, reduction="sum").backward()
        return run

    ours = _time(step(focal_triton.sigmoid_focal_loss), 3, device)
    theirs = _time(step(tv_loss), 3, device)
    print(f"forward + backward, best of 3: focal_triton {ours * 1e3:.1f} ms, torchvision {theirs * 1e3:.1f} ms "
          f"(ratio {theirs / ours:.2f}x, measured side by side in this run)")
    detector_head(h, w, device)


def detector_head(h: int, w: int, device, num_anchors: int = 9, num_classes: int = 80):
    """RetinaNet's classification loss from the head's per-level outputs: focal_triton.multilevel_focal_loss vs
    torchvision's RetinaNetClassificationHead.compute_loss (which needs the concatenated logits)."""
    from torchvision.models.detection.retinanet import RetinaNetClassificationHead

    g = torch.Generator().manual_seed(1)
    sizes = [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64, 128)]
    levels = [(torch.randn(1, num_anchors * num_classes, a, b, generator=g) * 2 - 4.6).to(device) for a, b in sizes]
    m = num_anchors * sum(a * b for a, b in sizes)
    matched = torch.full((m,), -1)
    matched[torch.randperm(m, generator=g)[: m // 500]] = torch.randint(0, 10, (m // 500,), generator=g)
    matched[torch.randperm(m, generator=g)[: m // 50]] = -2  # between thresholds
    gt = {"labels": torch.randint(0, num_classes, (10,), generator=g).to(device)}
    matched = matched.to(device)
    labels = torch.where(matched >= 0, gt["labels"][matched.clamp(min=0)], matched)[None]
    head = RetinaNetClassificationHead(8, num_anchors, num_classes)
    print(f"detector head: {len(levels)} levels, {m:,} anchors, {m * num_classes:,} logits, "
          f"{int((matched >= 0).sum())} positives, {int((matched == -2).sum())} ignored")

    def ours():
        xs = [x.detach().requires_grad_(True) for x in levels]
        norm = (labels >= 0).sum(dim=1).clamp(min=1)
        loss = focal_triton.multilevel_focal_loss(xs, labels, num_anchors, normalizer=norm)
        loss.backward()
        return loss, xs

    def theirs():
        xs = [x.detach().requires_grad_(True) for x in levels]
        flat = torch.cat([x.view(1, num_anchors, num_classes, *x.shape[2:]).permute(0, 3, 4, 1, 2)
                          .reshape(1, -1, num_classes) for x in xs], dim=1)
        loss = head.compute_loss([gt], {"cls_logits": flat}, [matched])
        loss.backward()
        return loss, xs

    (l1, g1), (l2, g2) = ours(), theirs()
    diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(g1, g2))
    print(f"multilevel loss = {l1.item():.6f}   torchvision compute_loss = {l2.item():.6f}   "
          f"max |grad difference| = {diff:.3e}")
    t_ours, t_theirs = _time(ours, 3, device), _time(theirs, 3, device)
    print(f"detector loss forward + backward, best of 3: focal_triton {t_ours * 1e3:.1f} ms, torchvision "
          f"{t_theirs * 1e3:.1f} ms (ratio {t_theirs / t_ours:.2f}x, measured side by side in this run)")


if __name__ == "__main__":
    main()
