"""The detectron2 snippet of docs/integrations.md gives the classification loss of detectron2's RetinaNet.losses()
(re-stated here from its code: detectron2 is not installed): cat of the per-level (N, HWA, K) logits, one-hot of
the valid labels without the background column, sigmoid focal loss (torchvision's, the same formula as fvcore's),
sum / normalizer."""
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

import focal_triton

K, N, A = 7, 2, 3


def detectron2_loss_cls(pred_logits, gt_labels, normalizer, alpha=0.25, gamma=2.0):
    gt_labels = torch.stack(gt_labels)
    valid_mask = gt_labels >= 0
    gt_labels_target = F.one_hot(gt_labels[valid_mask], num_classes=K + 1)[:, :-1]
    return sigmoid_focal_loss(torch.cat(pred_logits, dim=1)[valid_mask], gt_labels_target.to(pred_logits[0].dtype),
                              alpha=alpha, gamma=gamma, reduction="sum") / normalizer


def readme_snippet(pred_logits, gt_labels, normalizer):
    levels = [x.view(N, -1, 1, K).permute(0, 3, 1, 2) for x in pred_logits]
    return focal_triton.multilevel_focal_loss(levels, torch.stack(gt_labels), num_anchors=1, alpha=0.25, gamma=2.0,
                                              background=K, ignore_index=-1, normalizer=normalizer)


def test_readme_detectron2_snippet_matches(backend, device):
    g = torch.Generator().manual_seed(0)
    sizes = [(4, 5), (2, 3)]
    pred = [(torch.randn(N, A * h * w, K, generator=g) * 3).to(device) for h, w in sizes]
    m = A * sum(h * w for h, w in sizes)
    gt = [torch.randint(-1, K + 1, (m,), generator=g).to(device) for _ in range(N)]
    xs, refs = [p.clone().requires_grad_(True) for p in pred], [p.clone().requires_grad_(True) for p in pred]
    loss, ref = readme_snippet(xs, gt, 9.0), detectron2_loss_cls(refs, gt, 9.0)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    grads, ref_grads = torch.autograd.grad(loss, xs), torch.autograd.grad(ref, refs)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
