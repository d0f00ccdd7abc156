"""focal_triton.integrations.torchvision: a torchvision RetinaNet / FCOS switched to focal_triton in place trains
exactly like the stock model (losses and every parameter gradient) and detects exactly like it in eval mode. Random
weights, synthetic images and boxes: nothing is downloaded."""
import copy

import pytest
import torch
from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn

import focal_triton
from focal_triton.integrations.torchvision import LevelLogits, use_focal_triton

NUM_CLASSES = 5
BUILDERS = {"retinanet": retinanet_resnet50_fpn, "fcos": fcos_resnet50_fpn}


def _model(kind):
    torch.manual_seed(0)
    # Small images (the transform resizes to 96..128) keep the heads small enough for the Triton interpreter.
    return BUILDERS[kind](weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=96, max_size=128)


def _batch(device, with_empty_image=True):
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=g).to(device) for _ in range(3)]
    targets = []
    for i in range(3):
        n = 0 if (with_empty_image and i == 2) else 3
        xy = torch.rand(n, 2, generator=g) * torch.tensor([80.0, 60.0])
        wh = 12 + torch.rand(n, 2, generator=g) * 30
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1).to(device),
                        "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g).to(device)})
    return images, targets


def _losses_and_grads(model, images, targets):
    model.train()
    model.zero_grad()
    losses = model(images, targets)
    sum(losses.values()).backward()
    return losses, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_patched_model_trains_like_the_stock_one(backend, device, kind):
    stock = _model(kind).to(device)
    patched = use_focal_triton(copy.deepcopy(stock))
    images, targets = _batch(device)
    ref_losses, ref_grads = _losses_and_grads(stock, images, targets)
    losses, grads = _losses_and_grads(patched, images, targets)
    assert losses.keys() == ref_losses.keys()
    for key in losses:
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=1e-5, atol=1e-7, msg=key)
    assert grads.keys() == ref_grads.keys() and len(grads) > 50
    for name in grads:
        # float32 through a ResNet-50 in train mode (batch norm couples every element): the loss gradients differ
        # from torchvision's by rounding (order of sums), which reaches 1e-5 of each tensor's scale in the backbone.
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_training_head_returns_the_levels_uncatenated(device, kind):
    model = use_focal_triton(_model(kind)).to(device).train()
    images, _ = _batch(device)
    image_list, _ = model.transform(images)
    features = list(model.backbone(image_list.tensors).values())
    levels = model.head.classification_head(features)
    assert isinstance(levels, LevelLogits) and len(levels) == len(features)
    for level, f in zip(levels, features):
        a = model.head.classification_head.num_anchors
        assert level.shape == (f.shape[0], a * NUM_CLASSES, f.shape[2], f.shape[3])


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_eval_detections_unchanged(device, kind):
    stock = _model(kind).to(device).eval()
    patched = use_focal_triton(copy.deepcopy(stock)).eval()
    images, _ = _batch(device)
    with torch.no_grad():
        ref, out = stock(images), patched(images)
    for r, o in zip(ref, out):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(r[key], o[key]), key


def test_rejects_other_models():
    with pytest.raises(TypeError, match="RetinaNet or FCOS"):
        use_focal_triton(torch.nn.Linear(2, 2))


def test_init_prior_bias():
    """The paper's initialization: the classification bias is -log((1 - pi) / pi), so sigmoid(bias) = pi."""
    conv = torch.nn.Conv2d(8, 9 * NUM_CLASSES, 3, padding=1)
    assert focal_triton.init_prior_bias_(conv) is conv
    torch.testing.assert_close(torch.sigmoid(conv.bias), torch.full_like(conv.bias, 0.01))
    bias = torch.zeros(7)
    focal_triton.init_prior_bias_(bias, prior=0.2)
    torch.testing.assert_close(bias, torch.full((7,), -torch.log(torch.tensor(4.0)).item()))
    with pytest.raises(ValueError, match="prior"):
        focal_triton.init_prior_bias_(conv, prior=1.0)
    with pytest.raises(ValueError, match="bias"):
        focal_triton.init_prior_bias_(torch.nn.Conv2d(2, 2, 1, bias=False))


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_collect_stats_and_options(monkeypatch, kind):
    """collect_stats keeps the statistics of the training forward's own loss pass; gamma is an option. (The torch
    path: the kernels' statistics are checked in test_stats.py, and a ResNet-50 head is slow on the interpreter.)"""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")
    model = use_focal_triton(_model(kind), collect_stats=True)
    images, targets = _batch(torch.device("cpu"))
    model.train()
    with torch.no_grad():
        loss = model(images, targets)["classification"]
    st = model.focal_triton.stats
    assert st.gamma == 2.0 and len(st.num_positive) == 5  # P3-P7
    total = (st.num_positive + st.num_negative + st.num_ignored).sum().item()
    a = model.head.classification_head.num_anchors
    image_list, _ = model.transform(images, copy.deepcopy(targets))
    features = list(model.backbone(image_list.tensors).values())
    assert total == len(images) * a * sum(f.shape[2] * f.shape[3] for f in features)
    assert st.num_positive.sum() > 0
    if kind == "fcos":  # one global normalizer: the number of foreground anchors
        assert st.num_ignored.sum() == 0
        summed = (st.loss_positive.sum() + st.loss_negative.sum()).item()
        assert loss.item() == pytest.approx(summed / st.num_positive.sum().item(), rel=1e-5)
    else:
        assert st.num_ignored.sum() > 0  # RetinaNet's between-thresholds anchors
    use_focal_triton(model, gamma=0.0, collect_stats=True)
    with torch.no_grad():
        loss0 = model(images, targets)["classification"]
    assert model.focal_triton.stats.gamma == 0.0 and loss0 > loss


@pytest.mark.parametrize("options, error, match", [
    (dict(gamma=-1.0), ValueError, "gamma"), (dict(alpha=5.0), ValueError, "alpha"),
    (dict(check_labels="no"), TypeError, "check_labels"), (dict(collect_stats=1), TypeError, "collect_stats"),
    (dict(gamma=True), TypeError, "gamma")])
def test_options_checked_when_patching(options, error, match):
    model = _model("retinanet")
    with pytest.raises(error, match=match):
        use_focal_triton(model, **options)
    assert not hasattr(model, "focal_triton")      # nothing half-patched


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
def test_patched_model_pickles(monkeypatch, kind):
    """torch.save(model) and load of a patched model: the loaded one trains like the patched one (losses and every
    gradient equal) and is still patched. (The torch path: a ResNet-50 is slow on the interpreter.)"""
    import io

    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")
    patched = use_focal_triton(_model(kind), gamma=1.5)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.focal_triton.gamma == 1.5
    images, targets = _batch(torch.device("cpu"))
    ref_losses, ref_grads = _losses_and_grads(patched, images, copy.deepcopy(targets))
    losses, grads = _losses_and_grads(loaded, images, copy.deepcopy(targets))
    assert losses.keys() == ref_losses.keys()
    for key in losses:
        assert torch.equal(losses[key], ref_losses[key]), key
    assert grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    image_list, _ = loaded.transform(images)
    features = list(loaded.backbone(image_list.tensors).values())
    assert isinstance(loaded.head.classification_head(features), LevelLogits)
