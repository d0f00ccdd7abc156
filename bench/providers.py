"""The implementations compared: each maps (levels, labels, A) to torchvision RetinaNet's classification loss
(sum over each image's non-ignored anchors / the image's positives, averaged over images).

- focal_triton: `multilevel_focal_loss` on the head's outputs as they are.
- torchvision eager: what a detector does around `torchvision.ops.sigmoid_focal_loss`: permute and cat the levels
  into (N, M, C), one-hot the labels, the loss of every element, masked sums per image (vectorized over images,
  which is faster than torchvision's per-image loop).
- torch.compile: `torch.compile` of that same function (its compile time is reported separately).
- apex: `apex.contrib.focal_loss.focal_loss` on the concatenated logits, when apex is installed.
"""
import time

import torch

import focal_triton


def focal_triton_loss(levels, labels, num_anchors):
    """With the defaults a user passes: check_labels=True (one host sync), the per-image normalizer a tensor."""
    num_fg = (labels >= 0).sum(1).clamp(min=1)
    return focal_triton.multilevel_focal_loss(levels, labels, num_anchors, normalizer=num_fg)


def _concat(levels, num_anchors):
    n = levels[0].shape[0]
    c = levels[0].shape[1] // num_anchors
    return torch.cat([x.view(n, num_anchors, c, x.shape[2], x.shape[3]).permute(0, 3, 4, 1, 2).reshape(n, -1, c)
                      for x in levels], dim=1)


def torchvision_loss(levels, labels, num_anchors):
    from torchvision.ops import sigmoid_focal_loss

    x = _concat(levels, num_anchors)
    fg = labels >= 0
    target = torch.nn.functional.one_hot(labels.clamp(min=0), x.shape[-1]).to(x.dtype) * fg[..., None]
    loss = sigmoid_focal_loss(x, target, alpha=0.25, gamma=2.0, reduction="none")
    per_image = (loss.sum(-1) * (labels != -2)).sum(1) / fg.sum(1).clamp(min=1)
    return per_image.mean()


def apex_loss(levels, labels, num_anchors):  # pragma: no cover - apex is not installed here
    from apex.contrib.focal_loss import focal_loss

    x = _concat(levels, num_anchors)
    num_fg = (labels >= 0).sum().clamp(min=1).float()
    return focal_loss.FocalLoss.apply(x, labels, num_fg, x.shape[-1], 0.25, 2.0, 0.0) / labels.shape[0]


def apex_available() -> bool:
    try:
        from apex.contrib.focal_loss import focal_loss  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not available
        return False
    return True


class Provider:
    def __init__(self, name: str, fn, compile_: bool = False):
        self.name = name
        self.fn = fn
        self.compile = compile_
        self._compiled = {}
        self.compile_seconds = {}

    def prepare(self, case_key, levels, labels, num_anchors, backward: bool):
        """The callable to time (compiled on first use per case, the compile time recorded)."""
        fn = self.fn
        if self.compile:
            if case_key not in self._compiled:
                torch._dynamo.reset()
                compiled = torch.compile(self.fn, dynamic=False)
                start = time.perf_counter()
                out = compiled(levels, labels, num_anchors)
                if backward:
                    out.backward()
                self.compile_seconds[case_key] = time.perf_counter() - start
                self._compiled[case_key] = compiled
            fn = self._compiled[case_key]

        def run():
            out = fn(levels, labels, num_anchors)
            if backward:
                for x in levels:
                    x.grad = None
                out.backward()
            return out

        return run


def providers(include_compile: bool = True):
    ps = [Provider("focal_triton", focal_triton_loss), Provider("torchvision eager", torchvision_loss)]
    if include_compile:
        ps.append(Provider("torch.compile", torchvision_loss, compile_=True))
    if apex_available():  # pragma: no cover
        ps.append(Provider("apex", apex_loss))
    return ps
