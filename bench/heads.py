"""Benchmark cases of today's YOLO and DETR heads: the losses they compute, as their libraries write them, against
one `segmented_focal_loss` launch.

- YOLOv8 / YOLO11 at 640x640 (ultralytics `v8DetectionLoss`): the head's class-major `(B, C, A)` scores
  (A = 8400 anchor points, C = 80 COCO or 365 Objects365), labels and soft scores of the task-aligned assigner.
  ultralytics' path, written out (ultralytics is not installed): `permute(0, 2, 1).contiguous()`, a one-hot
  target built by scatter and scaled by the soft score (the assigner's `target_scores`, `(B, A, C)`), BCE with
  logits summed, divided by `max(target_scores.sum(), 1)` (as a clamp on the device: no host sync in the
  baseline either); and torch.compile of that function. focal_triton: one segment, the scores read in place
  (permuted view), `loss="bce"` with the soft scores, no `(B, A, C)` tensor built.
- RT-DETR (B = 16, Q = 300, C = 80): 6 decoder layers stacked `(L, B, DN + Q, C)` with DN = 200 denoising
  queries split off along the query axis, plus the encoder's `(B, Q, C)`: 13 varifocal calls per step, each with
  its own labels, IoU scores and normalizer (`num_boxes`; `num_boxes * dn_num_group` for denoising). Eager:
  Hugging Face transformers' `loss_labels_vfl` per call (one-hot target, IoU-scaled, weight
  `alpha * sigmoid(x).detach()**gamma * (1 - t) + score`, BCE with that weight), 13 times. focal_triton: one
  `segmented_focal_loss` launch over the 13 views, `loss="vfl_rtdetr"` (the same formula, weight detached).
"""
import torch
import torch.nn.functional as F

import focal_triton
from focal_triton import Segment


class HeadCase:
    def __init__(self, family, batch, num_classes, dtype="float32", mode="fwd+bwd", anchors=8400, queries=300,
                 denoising=200, layers=6):
        self.family, self.batch, self.num_classes, self.dtype, self.mode = family, batch, num_classes, dtype, mode
        self.anchors, self.queries, self.denoising, self.layers = anchors, queries, denoising, layers

    @property
    def numel(self) -> int:
        if self.family == "yolov8":
            return self.batch * self.anchors * self.num_classes
        return self.batch * self.num_classes * (self.layers * (self.denoising + self.queries) + self.queries)

    @property
    def name(self) -> str:
        shape = f"A{self.anchors}" if self.family == "yolov8" else \
            f"L{self.layers}+enc Q{self.queries} DN{self.denoising}"
        return f"{self.family} b{self.batch} {shape} C{self.num_classes} {self.dtype} {self.mode}"

    def inputs(self, device, requires_grad: bool, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        dtype = getattr(torch, self.dtype)
        B, C = self.batch, self.num_classes

        def labels_and_iou(m, positives):
            positives = min(positives, m)
            lab = torch.full((B, m), -1)
            for b in range(B):
                idx = torch.randperm(m, generator=g)[:positives]
                lab[b, idx] = torch.randint(0, C, (positives,), generator=g)
            return lab.to(device), torch.rand(B, m, generator=g).to(device)

        if self.family == "yolov8":
            scores = (torch.randn(B, C, self.anchors, generator=g) * 2 - 4.6).to(dtype).to(device)
            scores.requires_grad_(requires_grad)
            labels, soft = labels_and_iou(self.anchors, 10 * 20)  # ~20 objects, ~10 anchor points each
            return dict(scores=scores, labels=labels, soft=soft)
        L, Q, DN = self.layers, self.queries, self.denoising
        dec = (torch.randn(L, B, DN + Q, C, generator=g) * 2 - 4.6).to(dtype).to(device).requires_grad_(requires_grad)
        enc = (torch.randn(B, Q, C, generator=g) * 2 - 4.6).to(dtype).to(device).requires_grad_(requires_grad)
        matched = [labels_and_iou(Q, 20) for _ in range(L + 1)]        # one Hungarian match per layer + encoder
        dn = [labels_and_iou(DN, 40) for _ in range(L)]                  # 2 groups x 20 boxes
        num_boxes = torch.tensor(float(20 * B), device=device)
        return dict(dec=dec, enc=enc, matched=matched, dn=dn, num_boxes=num_boxes, dn_groups=2)

    def leaves(self, inputs):
        return [inputs["scores"]] if self.family == "yolov8" else [inputs["dec"], inputs["enc"]]


# --- YOLOv8 ------------------------------------------------------------------------------------------------------

def ultralytics_bce(inputs):
    """v8DetectionLoss's classification term, its code path written out."""
    scores, labels, soft = inputs["scores"], inputs["labels"], inputs["soft"]
    pred = scores.permute(0, 2, 1).contiguous()                              # (B, A, C)
    onehot = torch.zeros(pred.shape, dtype=torch.int64, device=pred.device)  # the assigner's target_labels one-hot
    onehot.scatter_(2, labels.clamp(min=0).unsqueeze(-1), 1)
    target_scores = onehot * (labels >= 0).unsqueeze(-1) * soft.unsqueeze(-1)
    target_scores_sum = target_scores.sum().clamp(min=1)
    bce = F.binary_cross_entropy_with_logits(pred, target_scores.to(pred.dtype), reduction="none")
    return bce.sum() / target_scores_sum


def focal_triton_yolo(inputs):
    scores, labels, soft = inputs["scores"], inputs["labels"], inputs["soft"]
    target_scores_sum = torch.where(labels >= 0, soft, 0).sum().clamp(min=1)
    out = focal_triton.segmented_focal_loss([Segment(scores.permute(0, 2, 1), labels, scores=soft,
                                                     normalizer=target_scores_sum)], loss="bce",
                                            check_labels=False)
    return out.total


# --- RT-DETR -----------------------------------------------------------------------------------------------------

def _rtdetr_calls(inputs):
    """(logits view, labels, IoU, normalizer) of the 13 calls: decoder layers, encoder, denoising of each layer."""
    dec, enc, DN = inputs["dec"], inputs["enc"], inputs["dn"][0][0].shape[1]
    calls = [(dec[i, :, DN:], *inputs["matched"][i], inputs["num_boxes"]) for i in range(dec.shape[0])]
    calls.append((enc, *inputs["matched"][-1], inputs["num_boxes"]))
    calls += [(dec[i, :, :DN], *inputs["dn"][i], inputs["num_boxes"] * inputs["dn_groups"])
              for i in range(dec.shape[0])]
    return calls


def transformers_vfl(logits, labels, iou, num_boxes, alpha=0.75, gamma=2.0):
    """Hugging Face transformers' RT-DETR `loss_labels_vfl` (its arithmetic, on a matched label tensor)."""
    num_classes = logits.shape[-1]
    target = F.one_hot(torch.where(labels >= 0, labels, num_classes), num_classes + 1)[..., :-1]
    target_score = iou.unsqueeze(-1).to(logits.dtype) * target
    pred_score = logits.sigmoid().detach()
    weight = alpha * pred_score.pow(gamma) * (1 - target) + target_score
    loss = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
    return loss.mean(1).sum() * logits.shape[1] / num_boxes


def eager_rtdetr(inputs):
    return sum(transformers_vfl(*call) for call in _rtdetr_calls(inputs))


def focal_triton_rtdetr(inputs):
    segments = [Segment(x, lab, scores=iou, normalizer=z) for x, lab, iou, z in _rtdetr_calls(inputs)]
    return focal_triton.segmented_focal_loss(segments, loss="vfl_rtdetr", alpha=0.75, gamma=2.0,
                                             check_labels=False).total


PROVIDERS = {"yolov8": [("focal_triton", focal_triton_yolo, False), ("ultralytics eager", ultralytics_bce, False),
                        ("torch.compile", ultralytics_bce, True)],
             "rtdetr": [("focal_triton", focal_triton_rtdetr, False), ("13 eager calls", eager_rtdetr, False)]}
BASELINE = {"yolov8": "ultralytics eager", "rtdetr": "13 eager calls"}


def cases(device: torch.device, quick: bool = False):
    if quick:
        return [HeadCase("yolov8", 1, 80, anchors=840), HeadCase("rtdetr", 1, 80, queries=30, denoising=20)]
    cases_ = [HeadCase("yolov8", 16, 80), HeadCase("rtdetr", 16, 80)]
    # Objects365: 49 M logits; on a CPU at 4 images (the eager baseline takes seconds per step there)
    cases_.append(HeadCase("yolov8", 16 if device.type == "cuda" else 4, 365))
    if device.type == "cuda":
        cases_.append(HeadCase("rtdetr", 16, 80, dtype="bfloat16"))
        cases_.append(HeadCase("yolov8", 16, 80, dtype="bfloat16"))
    return cases_


CPU_NOTE = "CPU: YOLOv8 Objects365 at batch 4 (16 on a GPU), no bf16 cases"


def run(device, measure, quick: bool = False, compile_: bool = True, only: str = ""):
    """Rows (one per case and provider): ms, speedup over the library's eager code, peak extra bytes, loss."""
    rows = []
    for case in [c for c in cases(device, quick) if only in c.name]:
        inputs = case.inputs(device, requires_grad=True)
        leaves = case.leaves(inputs)
        ready = []
        for name, fn, compiled in PROVIDERS[case.family]:
            if compiled and not compile_:
                continue
            f = torch.compile(fn, dynamic=False) if compiled else fn

            def step(f=f):
                for x in leaves:
                    x.grad = None
                out = f(inputs)
                out.backward()
                return out
            loss = float(step().detach())
            ready.append((name, step, loss, compiled))
        times = measure.times_ms([s for _, s, _, _ in ready], device, case.numel)
        base = dict(zip([n for n, *_ in ready], times)).get(BASELINE[case.family])
        for (name, step, loss, compiled), ms in zip(ready, times):
            for x in leaves:
                x.grad = None
            peak = None if (compiled and device.type == "cpu") else measure.peak_extra_bytes(step, device)
            rows.append(dict(case=case.name, family=case.family, batch=case.batch, num_classes=case.num_classes,
                             dtype=case.dtype, mode=case.mode, logits=case.numel, provider=name, ms=ms,
                             speedup_vs_library=round(base / ms, 3) if base else "", peak_extra_bytes=peak,
                             peak_extra_per_logit_bytes=None if peak is None else peak / case.numel, loss=loss))
        for x in leaves:
            x.grad = None
    return rows


def table(rows) -> str:
    head = f"{'case':52s} {'provider':18s} {'ms':>10s} {'vs library':>10s} {'peak extra':>11s} {'B/logit':>8s} " \
           f"{'loss':>10s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        sp = f"{r['speedup_vs_library']:.2f}x" if r["speedup_vs_library"] != "" else ""
        peak = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.1f} MiB"
        per = "-" if r["peak_extra_per_logit_bytes"] is None else f"{r['peak_extra_per_logit_bytes']:.2f}"
        lines.append(f"{r['case'][:52]:52s} {r['provider']:18s} {r['ms']:10.2f} {sp:>10s} {peak:>11s} {per:>8s} "
                     f"{r['loss']:10.4f}")
    return "\n".join(lines)
