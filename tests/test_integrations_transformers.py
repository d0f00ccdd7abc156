"""focal_triton.integrations.transformers against the real transformers package: a tiny RT-DETR and a tiny
Deformable DETR (ResNet backbones, random weights) switched to focal_triton train exactly like the stock models
(every loss and every parameter gradient) and infer exactly like them; the loss functions of RT-DETR, D-FINE,
DEIMv2, Deformable DETR and LW-DETR give their stock losses and logit gradients on synthetic outputs. Nothing is
downloaded."""
import copy
import io
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: it reads them then
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REASON = "needs transformers, scipy and pillow (pip install -e '.[integrations]')"
transformers = pytest.importorskip("transformers", reason=REASON)
pytest.importorskip("scipy", reason=REASON)
pytest.importorskip("PIL", reason=REASON)

from transformers import (  # noqa: E402
    DeformableDetrConfig,
    DeformableDetrForObjectDetection,
    DFineConfig,
    DFineForObjectDetection,
    Deimv2Config,
    Deimv2ForObjectDetection,
    LwDetrConfig,
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrResNetConfig,
    ResNetConfig,
)
from transformers.loss.loss_utils import LOSS_MAPPING  # noqa: E402

import focal_triton.integrations.transformers as integration  # noqa: E402
from focal_triton.integrations.transformers import FocalTritonLossFunction, use_focal_triton  # noqa: E402

NUM_LABELS = 5


def _tiny_rtdetr_family(config_class, model_class, **options):
    """RT-DETR, D-FINE or DEIMv2 at toy sizes, on RT-DETR's ResNet backbone (random weights)."""
    backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                  out_features=["stage2", "stage3", "stage4"])
    config = config_class(backbone_config=backbone, use_pretrained_backbone=False, encoder_hidden_dim=16,
                          encoder_in_channels=[16, 24, 32], encoder_ffn_dim=32, encoder_attention_heads=2,
                          d_model=16, decoder_in_channels=[16, 16, 16], decoder_ffn_dim=32, decoder_attention_heads=2,
                          decoder_layers=2, decoder_n_points=2, num_queries=20, num_denoising=8,
                          num_labels=NUM_LABELS, **options)
    torch.manual_seed(0)
    return model_class(config)


def _tiny_rtdetr():
    return _tiny_rtdetr_family(RTDetrConfig, RTDetrForObjectDetection, use_timm_backbone=False)


def _tiny_deformable_detr():
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                            out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                                  num_labels=NUM_LABELS, d_model=32, encoder_layers=1, decoder_layers=2,
                                  encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                                  decoder_attention_heads=2, num_queries=20, num_feature_levels=3,
                                  encoder_n_points=2, decoder_n_points=2, auxiliary_loss=True)
    torch.manual_seed(0)
    return DeformableDetrForObjectDetection(config)


# model -> (builder, the keys of its classification losses in loss_dict, focal_triton's loss). Main output, decoder
# layer, encoder proposals, 2 denoising layers (RT-DETR, D-FINE, DEIMv2); main output, decoder layer (Deformable).
RTDETR_KEYS = ["", "_aux_0", "_aux_1", "_dn_0", "_dn_1"]
MODELS = {"rt_detr": (_tiny_rtdetr, ["loss_vfl" + k for k in RTDETR_KEYS], "vfl_rtdetr"),
          "d_fine": (lambda: _tiny_rtdetr_family(DFineConfig, DFineForObjectDetection),
                     ["loss_vfl" + k for k in RTDETR_KEYS], "vfl_rtdetr"),
          "deimv2": (lambda: _tiny_rtdetr_family(Deimv2Config, Deimv2ForObjectDetection, mal_alpha=0.5),
                     ["loss_mal" + k for k in RTDETR_KEYS], "mal"),
          "deformable_detr": (_tiny_deformable_detr, ["loss_ce", "loss_ce_0"], "fl")}
# D-FINE and DEIMv2 train on the torch path (the Triton interpreter would add ~5 s each; their losses run on the
# kernels in test_loss_functions_match_stock); RT-DETR and Deformable DETR on the kernels.
TORCH_PATH = {"d_fine", "deimv2"}


def _images_and_labels():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g)
    labels = []
    for n in (3, 1):  # normalized (cx, cy, w, h), transformers' training format
        wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
        cxcy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
        labels.append({"class_labels": torch.randint(0, NUM_LABELS, (n,), generator=g),
                       "boxes": torch.cat([cxcy, wh], dim=1)})
    return images, labels


def _train_step(model, images, labels):
    model.train()
    model.zero_grad()
    torch.manual_seed(5)  # the denoising queries are drawn at random: the same ones for both models
    out = model(pixel_values=images, labels=copy.deepcopy(labels))
    out.loss.backward()
    return out.loss_dict, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(grads, ref_grads):
    """Every parameter gradient equal to rounding: within 1e-4 of its tensor's scale (the torchvision
    integration's criterion), plus float32 rounding of the model's largest gradient, 4 eps * max |grad|: the
    gradients that vanish in exact arithmetic (a bias in front of a normalization, a key bias of softmax
    attention) are rounding residue in both models (scales of 1e-16 .. 3e-8 in the RT-DETR, whose largest
    gradient is 1.8e3), not a tensor scale."""
    assert grads.keys() == ref_grads.keys()
    floor = 4 * torch.finfo(torch.float32).eps * max(g.abs().max().item() for g in ref_grads.values())
    for name in grads:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-4 * scale + floor, msg=name)


@pytest.fixture
def spy(monkeypatch):
    """Records the `loss=` of every focal_triton call the integration makes."""
    calls = []
    real = integration.focal_loss

    def focal_loss(*args, **kwargs):
        calls.append(kwargs["loss"])
        return real(*args, **kwargs)

    monkeypatch.setattr(integration, "focal_loss", focal_loss)
    return calls


@pytest.mark.parametrize("kind", list(MODELS))
def test_model_trains_like_the_stock_model(spy, monkeypatch, kind):
    build, cls_keys, loss_name = MODELS[kind]
    if kind in TORCH_PATH:
        monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")
    stock = build()
    patched = use_focal_triton(copy.deepcopy(stock))
    images, labels = _images_and_labels()
    ref_losses, ref_grads = _train_step(stock, images, labels)
    assert not spy
    losses, grads = _train_step(patched, images, labels)
    assert sorted(k for k in ref_losses if k.startswith(cls_keys[0])) == cls_keys
    assert spy == [loss_name] * len(cls_keys)  # one call per classification loss
    assert losses.keys() == ref_losses.keys()
    for key in losses:
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=1e-5, atol=0, msg=key)
    assert len(grads) > 50  # the backbone, encoder, decoder and heads
    assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("kind", ["rt_detr", "deformable_detr"])  # the switch is the same for every model
def test_model_inference_unchanged(kind):
    stock = MODELS[kind][0]().eval()
    patched = use_focal_triton(copy.deepcopy(stock)).eval()
    images, labels = _images_and_labels()
    with torch.no_grad():
        ref, out = stock(pixel_values=images), patched(pixel_values=images)
        assert ref.loss is None and out.loss is None
        assert torch.equal(ref.logits, out.logits) and torch.equal(ref.pred_boxes, out.pred_boxes)
        # an evaluation loss (labels in eval mode: no denoising queries) is the stock one too
        ref, out = stock(pixel_values=images, labels=labels), patched(pixel_values=images, labels=labels)
    assert ref.loss_dict.keys() == out.loss_dict.keys()
    for key in ref.loss_dict:
        torch.testing.assert_close(out.loss_dict[key], ref.loss_dict[key], rtol=1e-5, atol=0, msg=key)


def test_patched_model_pickles():
    patched = use_focal_triton(_tiny_rtdetr(), check_labels=False)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded.loss_function, FocalTritonLossFunction) and not loaded.loss_function.check_labels
    assert "_loss_function" not in _tiny_rtdetr().__dict__  # the stock model is untouched


# Each family's loss function on synthetic decoder outputs (no model): the config, and the extra outputs it takes.
def _synthetic_case(kind, g, batch=2, queries=12, high=30.0):
    def boxes(*shape):
        cxcy = 0.2 + 0.6 * torch.rand(*shape, 2, generator=g)
        return torch.cat([cxcy, 0.05 + 0.4 * torch.rand(*shape, 2, generator=g)], dim=-1)

    def logits(*shape):
        x = 3 * torch.randn(*shape, NUM_LABELS, generator=g)
        x.view(-1)[::17] = high  # saturated logits, both signs
        x.view(-1)[5::17] = -30.0
        return x

    extra = {}
    if kind == "rt_detr":
        config = RTDetrConfig(num_labels=NUM_LABELS, auxiliary_loss=False)
    elif kind == "d_fine":
        config = DFineConfig(num_labels=NUM_LABELS, auxiliary_loss=False)
    elif kind == "deimv2":
        config = Deimv2Config(num_labels=NUM_LABELS, auxiliary_loss=False, mal_alpha=0.5)
    elif kind == "deformable_detr":
        config = DeformableDetrConfig(num_labels=NUM_LABELS, use_timm_backbone=False, focal_alpha=0.3)
    else:  # lw_detr: two query groups, each matched to the targets, and the encoder's proposals
        config = LwDetrConfig(num_labels=NUM_LABELS, auxiliary_loss=False, group_detr=2)
        extra = {"enc_outputs_class": logits(batch, queries), "enc_outputs_coord": boxes(batch, queries)}
    return config, logits(batch, queries), boxes(batch, queries), extra


LOSS_TYPES = {"rt_detr": ("RTDetrForObjectDetection", "loss_vfl", "vfl_rtdetr"),
              "d_fine": ("DFineForObjectDetection", "loss_vfl", "vfl_rtdetr"),
              "deimv2": ("Deimv2ForObjectDetection", "loss_mal", "mal"),
              "deformable_detr": ("DeformableDetrForObjectDetection", "loss_ce", "fl"),
              "lw_detr": ("LwDetrForObjectDetection", "loss_ce", "ia_bce")}


@pytest.mark.parametrize("kind", list(LOSS_TYPES))
def test_loss_functions_match_stock(backend, spy, kind):
    """The stock loss function and the patched one on the same float32 outputs and targets: every loss equal, the
    classification loss's gradient with respect to the logits equal to rounding. LW-DETR's stock loss is compared
    in float64: in float32 it takes log(1 - sigmoid(x)), which loses digits as x grows (3e-4 of the loss with
    logits of 12 here, inf above 16.6: next test), where focal_triton's float32 value agrees with float64 to 1e-7.
    (Its largest logits stop at 12: at 30 even the float64 stock value is off by 2e-5, 1 - sigmoid(30) = 9e-14.)"""
    loss_type, cls_key, loss_name = LOSS_TYPES[kind]
    g = torch.Generator().manual_seed(2)
    config, logits, boxes, extra = _synthetic_case(kind, g, high=12.0 if kind == "lw_detr" else 30.0)
    _, labels = _images_and_labels()
    results = []
    stock_dtype = torch.float64 if kind == "lw_detr" else torch.float32
    for fn, dtype in ((LOSS_MAPPING[loss_type], stock_dtype), (FocalTritonLossFunction(loss_type), torch.float32)):
        x, b = logits.to(dtype).requires_grad_(True), boxes.to(dtype).requires_grad_(True)
        cast = {k: v.to(dtype) for k, v in extra.items()}
        _, loss_dict, _ = fn(logits=x, labels=copy.deepcopy(labels), device=x.device, pred_boxes=b, config=config,
                             **cast)
        grad_x, grad_b = torch.autograd.grad(loss_dict[cls_key], (x, b), allow_unused=True)
        results.append(({k: v.double() for k, v in loss_dict.items()}, grad_x.double(), grad_b))
    (ref, ref_gx, ref_gb), (out, gx, gb) = results
    assert spy and set(spy) == {loss_name}
    assert ref.keys() == out.keys() and cls_key in ref
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=0, msg=key)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6 * ref_gx.abs().max().item())
    # no gradient to the boxes from the classification loss in either (the IoU targets are detached)
    assert (gb is None or not gb.any()) and (ref_gb is None or not ref_gb.any())


def test_lw_detr_saturated_logits_finite_where_stock_is_not():
    """LW-DETR's stock IA-BCE takes prob.log() and (1 - prob).log(): in float32 sigmoid(20) rounds to 1 and a
    negative at x = 20 costs p**2 * -log(0) = inf; in float16 sigmoid(-20) underflows to 0 and a negative's
    0 * log(0) is NaN. focal_triton's loss is the formula's value: in float32 the stock loss evaluated in float64."""
    g = torch.Generator().manual_seed(2)
    config, logits, boxes, extra = _synthetic_case("lw_detr", g, high=20.0)  # logits of 20 among them
    _, labels = _images_and_labels()
    stock, ours = LOSS_MAPPING["LwDetrForObjectDetection"], FocalTritonLossFunction("LwDetrForObjectDetection")

    def loss_ce(fn, dtype):
        cast = {k: v.to(dtype) for k, v in extra.items()}
        return fn(logits=logits.to(dtype), labels=copy.deepcopy(labels), device=logits.device,
                  pred_boxes=boxes.to(dtype), config=config, **cast)[1]["loss_ce"]

    assert torch.isinf(loss_ce(stock, torch.float32))
    exact = loss_ce(stock, torch.float64)
    assert torch.isfinite(exact)
    torch.testing.assert_close(loss_ce(ours, torch.float32).double(), exact, rtol=1e-5, atol=0)
    logits[0, 0, :] = -20.0  # one very confident background query
    assert torch.isnan(loss_ce(stock, torch.float16))
    assert torch.isfinite(loss_ce(ours, torch.float16))


def test_bad_labels_and_options():
    model = _tiny_rtdetr()
    with pytest.raises(TypeError, match="check_labels"):
        use_focal_triton(model, check_labels=1)
    with pytest.raises(TypeError, match="transformers detector"):
        use_focal_triton(torch.nn.Linear(2, 2))
    assert "_loss_function" not in model.__dict__  # nothing half-patched
    images, labels = _images_and_labels()
    # A negative class label passes the matcher (it indexes the classes from the end) and reaches the loss; the
    # stock F.one_hot raises on CPU (a device assert on CUDA). A label >= num_labels fails in the matcher already.
    labels[0]["class_labels"][0] = -1
    model.eval()  # in training the denoising queries' label embedding rejects it first
    with pytest.raises(RuntimeError, match="non-negative"):
        model(pixel_values=images, labels=labels)
    use_focal_triton(model)
    with pytest.raises(ValueError, match="labels"):
        model(pixel_values=images, labels=labels)
    use_focal_triton(model, check_labels=False)  # no check, no host sync: the label counts as background
    assert torch.isfinite(model(pixel_values=images, labels=labels).loss)
