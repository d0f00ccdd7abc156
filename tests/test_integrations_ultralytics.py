"""focal_triton.integrations.ultralytics against the real ultralytics (the version pyproject's `integrations` extra
pins): YOLOv8n, YOLO11n and YOLO26n (end-to-end head) built from ultralytics' own yaml configs with random weights,
synthetic images and boxes in ultralytics' batch format, nothing downloaded (offline settings below). The switched
loss gives ultralytics' losses and every parameter gradient; evaluation is unchanged; focal_triton really runs.
Also the identity the switch rests on (class-index QFL with exponent 0 is BCE with the soft target on the labelled
class), and RT-DETR (rtdetr-l.yaml): its classification terms are focal_triton's "vfl_rtdetr" (detach_weight=False),
"fl" and "bce" (not "vfl": why, below), with every loss entry and gradient of a training step ultralytics'."""
import contextlib
import copy
import os
import random
import tempfile
import warnings

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import focal_triton


@contextlib.contextmanager
def _process_state_kept():
    """ultralytics changes process-wide state when imported (torch.save wrapped, print options, warnings filters,
    environment variables such as OMP_NUM_THREADS) and when it trains (deterministic algorithms, seeds, torch
    threads): the rest of the suite gets its own back."""
    environ, filters, save = dict(os.environ), list(warnings.filters), torch.save
    printing = {k: getattr(torch._tensor_str.PRINT_OPTS, k) for k in
                ("precision", "threshold", "edgeitems", "linewidth", "sci_mode")}
    numpy_printing = numpy.get_printoptions()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    fill, cudnn_deterministic = torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.deterministic
    rng, threads = (torch.get_rng_state(), numpy.random.get_state(), random.getstate()), torch.get_num_threads()
    try:
        yield
    finally:
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
        warnings.filters[:] = filters
        torch.save = save
        for key, value in printing.items():
            setattr(torch._tensor_str.PRINT_OPTS, key, value)
        numpy.set_printoptions(**numpy_printing)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.set_rng_state(rng[0])
        numpy.random.set_state(rng[1])
        random.setstate(rng[2])
        torch.set_num_threads(threads)


# Before ultralytics is imported: no network (none here: nothing may wait on it), no pip auto-installs, quiet, and
# its settings file in a directory of this session instead of the user's config.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="focal_triton_test_yolo_"))
with _process_state_kept():
    try:
        import ultralytics
    except ImportError:
        ultralytics = None
    if ultralytics is not None:
        from ultralytics.cfg import get_cfg
        from ultralytics.models.utils.loss import RTDETRDetectionLoss
        from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel, SegmentationModel
        from ultralytics.utils.loss import E2ELoss, FocalLoss, VarifocalLoss

        import focal_triton.integrations.ultralytics as integration
        from focal_triton.integrations.ultralytics import (FocalTritonDetectionLoss, FocalTritonRTDETRLoss,
                                                           use_focal_triton)

needs_ultralytics = pytest.mark.skipif(
    ultralytics is None, reason="ultralytics is not installed (pip install -e '.[integrations]'; make test does)")

CONFIGS = ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"]  # yolo26n: E2ELoss, two v8DetectionLoss branches


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (a small YOLO's ops gain nothing from more, and on a shared machine two threads made each
    step 10-100x slower); afterwards the process state as it was (_process_state_kept)."""
    with _process_state_kept():
        torch.set_num_threads(1)
        yield


@pytest.fixture
def torch_path(monkeypatch):
    """The pure-torch CPU path (the Triton interpreter is too slow for a whole YOLO head; `backend` covers it on a
    small one)."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "torch")


def _model(cfg, nc=80, zero_cls_bias=False, seed=0):
    """A model from ultralytics' yaml with random weights. zero_cls_bias: the classification convs' biases 0 instead
    of ultralytics' prior (logits of order 1 instead of near -11: where torch's float32 BCE, the stock loss, is
    accurate to float32 rounding; see test_switched_loss_trains_like_stock)."""
    torch.manual_seed(seed)
    model = DetectionModel(cfg, nc=nc, verbose=False)
    model.args = get_cfg()  # ultralytics' default hyperparameters (box 7.5, cls 0.5, dfl 1.5), as the trainer sets
    if zero_cls_bias:
        head = model.model[-1]
        with torch.no_grad():
            for branch in [*head.cv3, *(getattr(head, "one2one_cv3", None) or [])]:
                branch[-1].bias.zero_()
    return model.train()


def _batch(size=128, nc=80, boxes=(3, 0, 2), seed=1):
    """ultralytics' training batch: images (B, 3, S, S) in [0, 1]; per box its image index, class and normalized
    xywh. The second image has no box."""
    g = torch.Generator().manual_seed(seed)
    n = sum(boxes)
    xy = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
    wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
    return {"img": torch.rand(len(boxes), 3, size, size, generator=g),
            "batch_idx": torch.cat([torch.full((k,), float(i)) for i, k in enumerate(boxes)]),
            "cls": torch.randint(0, nc, (n, 1), generator=g).float(),
            "bboxes": torch.cat([xy, wh], 1)}


def _params(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _loss_and_grads(criterion, preds, batch, params):
    loss, items = criterion(preds, batch)
    grads = torch.autograd.grad(loss.sum(), [p for _, p in params], retain_graph=True, allow_unused=True)
    return loss.detach(), items, dict((name, g) for (name, _), g in zip(params, grads) if g is not None)


def _assert_grads_equal(grads, ref):
    assert grads.keys() == ref.keys() and len(grads) > 100
    largest = max(g.abs().max().item() for g in ref.values())
    for name in grads:
        # The torchvision integration's criterion (1e-4 of each tensor's scale: float32 rounding through batch norm
        # in train mode), plus 1e-7 of the largest gradient for tensors whose gradient is 0 up to rounding (a batch
        # norm's bias feeding another batch norm, in YOLO11's attention block: ~1e-8 of noise in both losses).
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref[name], rtol=0, atol=1e-4 * scale + 1e-7 * largest, msg=name)


def _capture_assignments(criterion):
    """Record what the criterion's (ultralytics') assigner returns, call by call."""
    calls, assign = [], criterion.assigner.forward

    def spy(*args, **kwargs):
        out = assign(*args, **kwargs)
        calls.append(out)
        return out

    criterion.assigner.forward = spy
    return calls


def _reference_cls_loss(criterion, preds, captured):
    """ultralytics' classification loss item in float64 from the scores and each branch's recorded assignment:
    BCE(scores, target_scores) summed over target_scores_sum, times the cls gain and the batch size (and E2ELoss's
    branch weights)."""
    gains = [criterion.o2m, criterion.o2o] if isinstance(criterion, E2ELoss) else [1.0]
    total = 0.0
    for branch, branch_preds, calls, gain in zip(_branches(criterion), _branch_preds(criterion, preds), captured,
                                                 gains):
        assert len(calls) == 1
        scores, target_scores = branch_preds["scores"].detach().double(), calls[0][2].double()
        bce = F.binary_cross_entropy_with_logits(scores.permute(0, 2, 1), target_scores, reduction="sum")
        total += gain * bce / target_scores.sum().clamp(min=1) * branch.hyp.cls * scores.shape[0]
    return total


def _assert_cls_loss(loss, stock, reference):
    """The classification loss within 1e-6 of float64 BCE, and never farther from it than ultralytics' (up to
    1e-7): where torch's float32 BCE is accurate that makes it equal to the stock value within ~1e-6."""
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=0)
    assert abs(loss.item() - reference.item()) <= abs(stock.item() - reference.item()) + 1e-7 * reference.item()


def _branches(criterion):
    return [criterion.one2many, criterion.one2one] if isinstance(criterion, E2ELoss) else [criterion]


def _branch_preds(criterion, preds):
    return [preds["one2many"], preds["one2one"]] if isinstance(criterion, E2ELoss) else [preds]


# --- the identity: QFL with exponent 0 is YOLO's BCE ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_qfl_beta0_is_bce_with_the_soft_target_on_the_label(backend, dtype):
    """focal_loss(loss="qfl", beta=0) per element: BCE-with-logits against score on the labelled class and 0 on the
    others (background: 0 everywhere), also for saturated logits; the same numbers from a class-major (B, C, A)
    tensor read as one NCHW level (B, C, A, 1) with num_anchors = 1, the integration's call. Reference: torch's
    float64 BCE on a dense target built here."""
    g = torch.Generator().manual_seed(0)
    n, m, c = 2, 37, 5
    x = torch.randn(n, m, c, generator=g, dtype=torch.float64) * 4
    x[0, :3] = torch.tensor([40.0, -40.0, 0.0], dtype=torch.float64).view(3, 1)  # saturated both ways, and 0
    labels = torch.randint(-1, c, (n, m), generator=g)
    scores = torch.rand(n, m, generator=g, dtype=torch.float64)
    scores[0, :3] = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    target = F.one_hot(labels.clamp(min=0), c).double() * (labels >= 0).unsqueeze(-1) * scores.unsqueeze(-1)
    expected = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    x = x.to(dtype).requires_grad_()
    expected_grad = (torch.sigmoid(x.detach().double()) - target) / 3.0
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-7)

    kwargs = dict(loss="qfl", beta=0.0, scores=scores.to(dtype))
    per_element = focal_triton.focal_loss(x, labels, reduction="none", **kwargs)
    torch.testing.assert_close(per_element.double(), expected, **tol)
    total = focal_triton.focal_loss(x, labels, normalizer=3.0, **kwargs)
    torch.testing.assert_close(total.double(), expected.sum() / 3.0, **tol)
    total.backward()
    torch.testing.assert_close(x.grad.double(), expected_grad, **tol)

    class_major = x.detach().permute(0, 2, 1).contiguous().requires_grad_()  # (B, C, A), as YOLO's head
    total = focal_triton.multilevel_focal_loss([class_major.unsqueeze(-1)], labels, 1, normalizer=3.0, **kwargs)
    torch.testing.assert_close(total.double(), expected.sum() / 3.0, **tol)
    total.backward()
    assert class_major.grad.is_contiguous()
    torch.testing.assert_close(class_major.grad.double(), expected_grad.permute(0, 2, 1), **tol)


# --- the YOLO detection loss ---------------------------------------------------------------------------------------

@needs_ultralytics
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("init", ["ultralytics", "zero_cls_bias"])
def test_switched_loss_trains_like_stock(torch_path, cfg, init):
    """One training step on the same forward: box and DFL losses identical (ultralytics' own code on the same
    assignment), the classification loss within 1e-6 of float64 BCE, every parameter gradient equal to rounding.

    init="ultralytics": the head's prior bias (cls logits near -11). There torch's float32 BCE-with-logits loses
    digits (log(1 + exp(-|x|)) without log1p: up to ~4e-3 relative per negative), so the stock loss is off float64
    by up to ~1e-5 relative and focal_triton is the closer one; the test checks it is never farther.
    init="zero_cls_bias" (logits of order 1, where torch's float32 BCE is accurate): equal to stock within 1e-5."""
    model = _model(cfg, zero_cls_bias=init == "zero_cls_bias")
    batch = _batch()
    preds = model(batch["img"])
    stock = model.init_criterion()
    switched = use_focal_triton(model.init_criterion())
    assert all(type(b) is FocalTritonDetectionLoss for b in _branches(switched))
    captured = [_capture_assignments(b) for b in _branches(switched)]
    params = _params(model)

    ref_loss, ref_items, ref_grads = _loss_and_grads(stock, preds, batch, params)
    loss, items, grads = _loss_and_grads(switched, preds, batch, params)

    assert items.keys() == ref_items.keys()
    assert loss[0] == ref_loss[0] and loss[2] == ref_loss[2]  # box, dfl: bitwise
    _assert_cls_loss(loss[1], ref_loss[1], _reference_cls_loss(switched, preds, captured))
    if init == "zero_cls_bias":
        torch.testing.assert_close(loss[1], ref_loss[1], rtol=1e-5, atol=0)
    _assert_grads_equal(grads, ref_grads)


def _assert_small_step_like_stock(nc, boxes=(3, 0, 2), class_weights=None):
    """One training step of a small YOLOv8n (64x64 images, nc classes, classification biases 0): box and DFL
    losses bitwise, classification within 1e-5 of ultralytics' (its float32 BCE is accurate there), gradients."""
    model = _model("yolov8n.yaml", nc=nc, zero_cls_bias=True)
    model.class_weights = class_weights
    batch = _batch(size=64, nc=nc, boxes=boxes)
    preds = model(batch["img"])
    params = _params(model)
    ref_loss, _, ref_grads = _loss_and_grads(model.init_criterion(), preds, batch, params)
    loss, _, grads = _loss_and_grads(use_focal_triton(model.init_criterion()), preds, batch, params)
    assert loss[0] == ref_loss[0] and loss[2] == ref_loss[2]
    torch.testing.assert_close(loss[1], ref_loss[1], rtol=1e-5, atol=0)
    _assert_grads_equal(grads, ref_grads)


@needs_ultralytics
def test_switched_loss_numbers_with_the_triton_kernels(backend):
    """The same check on a small case (64x64, 3 classes) on both implementations: the Triton kernels (interpreted
    on CPU) and the torch path."""
    _assert_small_step_like_stock(nc=3)


@needs_ultralytics
@pytest.mark.parametrize("boxes", [(0, 0), (1, 0)], ids=["no_boxes", "one_box"])
def test_batches_with_few_boxes(torch_path, boxes):
    """No box in the batch (the assigner's early return: float labels, all background) and a single box."""
    _assert_small_step_like_stock(nc=4, boxes=boxes)


@needs_ultralytics
@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo26n.yaml"])
def test_eval_unchanged(torch_path, cfg):
    """Predictions of a switched model are bitwise the stock model's, and the validation-time loss (eval-mode
    outputs: an (inference, raw) tuple) is ultralytics' (classification: as in test_switched_loss_trains_like_stock;
    at ultralytics' prior bias and fresh batch-norm statistics the logits all lie near -10, where the stock float32
    loss is off float64 by ~6e-4 relative on this batch (YOLOv8n), focal_triton's by < 1e-6)."""
    stock = _model(cfg).eval()
    switched = copy.deepcopy(stock)
    use_focal_triton(switched)
    assert isinstance(switched.criterion, (FocalTritonDetectionLoss, E2ELoss))
    captured = [_capture_assignments(b) for b in _branches(switched.criterion)]
    batch = _batch()
    with torch.no_grad():
        ref, out = stock(batch["img"]), switched(batch["img"])
        assert torch.equal(ref[0], out[0])
        ref_loss, _ = stock.loss(batch, ref)
        loss, _ = switched.loss(batch, out)
    assert loss[0] == ref_loss[0] and loss[2] == ref_loss[2]
    _assert_cls_loss(loss[1], ref_loss[1], _reference_cls_loss(switched.criterion, out[1], captured))


@needs_ultralytics
@pytest.mark.parametrize("mode", ["autocast", "bfloat16_model"])
def test_bfloat16_numerics(torch_path, mode):
    """bfloat16 logits at ultralytics' prior bias (near -11). Under autocast, ultralytics rounds the soft targets to
    bfloat16 (target_scores.to(dtype)) and its loss is off float64 (of the same bfloat16 logits) by ~4e-4 relative;
    with a bfloat16 model (no autocast) its BCE runs in bfloat16, where 1 + exp(x) rounds to 1 for x < -5.5: every
    negative's loss is 0 and the classification loss drops by ~12 % on this batch. focal_triton computes in float32
    with float32 targets: within 1e-6 of float64 in both, finite gradients."""
    model = _model("yolov8n.yaml")
    batch = _batch()
    if mode == "bfloat16_model":
        model, batch = model.to(torch.bfloat16), {**batch, "img": batch["img"].to(torch.bfloat16)}
    switched, stock = use_focal_triton(model.init_criterion()), model.init_criterion()
    captured = [_capture_assignments(switched)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        preds = model(batch["img"])
        assert preds["scores"].dtype == torch.bfloat16
        loss, _ = switched(preds, batch)
        ref_loss, _ = stock(preds, batch)
    reference = _reference_cls_loss(switched, preds, captured)
    _assert_cls_loss(loss[1], ref_loss[1], reference)
    stock_error = abs(ref_loss[1].item() / reference.item() - 1)
    assert stock_error > (0.05 if mode == "bfloat16_model" else 1e-5)
    loss.sum().backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


class _CopiesOf(TorchDispatchMode):
    """Records the aten ops that copy the storage of given tensors into a new one (clone, which contiguous calls,
    dtype or layout conversions, copy_ from them). It sees the ops outside focal_triton's registered op (a
    dispatch mode is not re-entered inside the op it handles); focal_triton reads an NCHW-contiguous level in
    place (its layout tests)."""

    COPYING = {"aten::clone", "aten::_to_copy", "aten::copy_", "aten::contiguous"}

    def __init__(self, tensors):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in tensors}
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in self.COPYING:
            sources = args[1:2] if func._schema.name == "aten::copy_" else args[:1]
            if any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.storages for a in sources):
                self.copies.append(func._schema.name)
        return func(*args, **kwargs)


@needs_ultralytics
@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo26n.yaml"])
def test_focal_triton_runs_and_the_logits_are_not_copied(torch_path, monkeypatch, cfg):
    """Spies on what runs: one focal_triton call per v8DetectionLoss branch and step, ultralytics' BCE never
    called, and no op copies the head's scores (ultralytics' permute(0, 2, 1).contiguous() does: checked too, so
    the spy can see a copy)."""
    calls = []
    real = integration.multilevel_focal_loss
    monkeypatch.setattr(integration, "multilevel_focal_loss", lambda *a, **k: calls.append(a[0][0].shape) or
                        real(*a, **k))
    model = _model(cfg)
    batch = _batch()
    preds = model(batch["img"])
    stock, switched = model.init_criterion(), use_focal_triton(model.init_criterion())
    for branch in _branches(switched):
        branch.bce = None  # ultralytics' BCEWithLogitsLoss: calling it would fail
    scores = [p["scores"] for p in _branch_preds(switched, preds)]

    with _CopiesOf(scores) as spy:
        loss = switched(preds, batch)[0]
    assert len(calls) == len(scores)
    assert calls == [s.unsqueeze(-1).shape for s in scores]
    assert spy.copies == []
    with _CopiesOf(scores) as spy:
        stock(preds, batch)
    assert "aten::clone" in spy.copies
    loss.sum().backward()
    assert len(calls) == len(scores)


@needs_ultralytics
def test_class_weights(torch_path, monkeypatch):
    """Per-class weights (model.class_weights, float64 as the trainer computes them from cls_pw) weight every term of
    their class, as ultralytics' bce_loss *= class_weights: one focal_triton call with class_weights."""
    calls = []
    real = integration.multilevel_focal_loss
    monkeypatch.setattr(integration, "multilevel_focal_loss", lambda *a, **k: calls.append(k["class_weights"]) or
                        real(*a, **k))
    weights = torch.tensor([0.5, 1.0, 1.5, 1.0], dtype=torch.float64)
    _assert_small_step_like_stock(nc=4, class_weights=weights)
    assert len(calls) == 1 and torch.equal(calls[0], weights.float())


# --- the one call ------------------------------------------------------------------------------------------------

@needs_ultralytics
def test_use_focal_triton_on_models_losses_and_trainers():
    model = _model("yolov8n.yaml")
    assert getattr(model, "criterion", None) is None  # ultralytics creates it on the first loss call
    assert use_focal_triton(model) is model and type(model.criterion) is FocalTritonDetectionLoss
    criterion = model.criterion
    use_focal_triton(model)
    assert model.criterion is criterion  # again: harmless

    e2e = _model("yolo26n.yaml").init_criterion()
    assert use_focal_triton(e2e) is e2e
    assert type(e2e.one2many) is type(e2e.one2one) is FocalTritonDetectionLoss
    assert (e2e.one2many.assigner.topk, e2e.one2one.assigner.topk) == (10, 7)  # state kept

    yolo = ultralytics.YOLO("yolov8n.yaml")
    assert use_focal_triton(yolo) is yolo and use_focal_triton(yolo) is yolo
    assert yolo.callbacks["on_train_start"].count(integration._on_train_start) == 1

    class Trainer:  # what the callback reads of ultralytics' trainer
        model = _model("yolo11n.yaml")

    integration._on_train_start(Trainer)
    assert type(Trainer.model.criterion) is FocalTritonDetectionLoss


@needs_ultralytics
def test_tested_version_is_the_pinned_one(monkeypatch):
    """The extra pins the version the switch restates; another one warns."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    pinned = pyproject["project"]["optional-dependencies"]["integrations"]
    assert f"ultralytics=={integration.TESTED_VERSION}" in pinned
    monkeypatch.setattr(ultralytics, "__version__", "9.0.0")
    with pytest.warns(UserWarning, match="tested with ultralytics 8.4.190, this is 9.0.0"):
        use_focal_triton(_model("yolov8n.yaml").init_criterion())


@needs_ultralytics
def test_other_losses_are_refused_before_anything_changes():
    seg = SegmentationModel("yolov8n-seg.yaml", verbose=False)
    seg.args = get_cfg()
    with pytest.raises(TypeError, match="v8SegmentationLoss"):
        use_focal_triton(seg)
    assert getattr(seg, "criterion", None) is None
    model = DetectionModel("yolov8n.yaml", verbose=False)  # no hyperparameters yet: no criterion can be made
    with pytest.raises(ValueError, match="model.args"):
        use_focal_triton(model)
    with pytest.raises(TypeError, match="criterion"):
        use_focal_triton(torch.nn.BCEWithLogitsLoss())


@needs_ultralytics
def test_yolo_train_uses_focal_triton(torch_path, monkeypatch, tmp_path):
    """`YOLO(...).train()` after the one call: ultralytics' own trainer (dataset on disk, dataloader, optimizer,
    checkpoint) runs one epoch on two synthetic 64x64 images with focal_triton computing the classification loss;
    the checkpoint does not refer to focal_triton (ultralytics strips the criterion before saving)."""
    data = _synthetic_dataset(tmp_path)
    calls = []
    real = integration.multilevel_focal_loss
    monkeypatch.setattr(integration, "multilevel_focal_loss", lambda *a, **k: calls.append(1) or real(*a, **k))

    deterministic = torch.are_deterministic_algorithms_enabled()
    with _process_state_kept():
        yolo = use_focal_triton(ultralytics.YOLO("yolov8n.yaml"))
        yolo.train(data=str(data), epochs=1, imgsz=64, batch=2, device="cpu", workers=0, plots=False, val=False,
                   amp=False, project=str(tmp_path / "runs"), name="train", exist_ok=True, verbose=False)
    assert torch.are_deterministic_algorithms_enabled() == deterministic  # given back; torch.save is torch's again
    assert torch.save.__module__ == "torch.serialization"
    assert type(yolo.trainer.model.criterion) is FocalTritonDetectionLoss
    assert len(calls) == 1  # one batch of two images
    _assert_checkpoint_is_stock(tmp_path / "runs" / "train" / "weights" / "last.pt")


def _synthetic_dataset(tmp_path):
    """Two 64x64 images with two boxes each, as an ultralytics dataset on disk; returns its data.yaml."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / split / f"{i}.jpg")
            (tmp_path / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.4 0.4\n1 0.3 0.3 0.2 0.2\n")
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames:\n  0: a\n  1: b\n")
    return data


def _assert_checkpoint_is_stock(path):
    """No object of the checkpoint's pickles is of a focal_triton class (their text may name focal_triton: ultralytics
    stores the git commit message of the working directory)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as checkpoint:
        pickles = [checkpoint.read(name) for name in checkpoint.namelist() if name.endswith(".pkl")]
    classes = []
    for data in pickles:
        strings = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":  # "module name"
                classes.append(arg)
            elif op.name == "STACK_GLOBAL":  # module and name: the last two strings pushed
                classes.append(" ".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    assert any(c.startswith("ultralytics.nn.tasks ") for c in classes)  # the spy sees the model's class
    assert not [c for c in classes if "focal_triton" in c or "FocalTriton" in c]


# --- RT-DETR ---------------------------------------------------------------------------------------------------------

@needs_ultralytics
def test_rtdetr_varifocal_loss_is_not_focal_tritons_vfl(torch_path):
    """Why the switch uses "vfl_rtdetr", not "vfl": ultralytics' RT-DETR classification loss
    (DETRLoss._get_loss_class, use_vfl: VarifocalLoss(gamma=1.5, alpha=0.25), .mean(1).sum() / (num_gts / nq) =
    sum / num_gts) against focal_triton's "vfl" with the same options: equal while every matched query's IoU is > 0 (the gradient of ultralytics' undetached weight
    alpha * p**gamma included), different once a matched query has IoU 0: ultralytics' weight there is
    gt_score * label = 0, focal_triton's "vfl" (mmdet's) takes it as a negative, alpha p**gamma BCE(x, 0). The
    no-ground-truth branch's FocalLoss(1.5, 0.25) is focal_triton's "fl"."""
    g = torch.Generator().manual_seed(0)
    bs, nq, nc = 2, 30, 6
    criterion = RTDETRDetectionLoss(nc=nc, use_vfl=True)
    assert isinstance(criterion.vfl, VarifocalLoss) and isinstance(criterion.fl, FocalLoss)
    assert (criterion.vfl.gamma, criterion.vfl.alpha) == (1.5, 0.25)
    x = torch.randn(bs, nq, nc, generator=g) * 3
    labels = torch.full((bs, nq), nc)
    labels[0, :3], labels[1, :2] = torch.tensor([0, 4, 5]), torch.tensor([2, 2])
    num_gts = 5
    iou = torch.rand(bs, nq, generator=g) * 0.9 + 0.05

    def ultralytics_loss(iou):
        logits = x.clone().requires_grad_()
        loss = criterion._get_loss_class(logits, labels, iou, num_gts)["loss_class"]
        return loss, torch.autograd.grad(loss, logits)[0]

    def focal_triton_loss(iou):
        logits = x.clone().requires_grad_()
        loss = focal_triton.focal_loss(logits, labels, background=nc, loss="vfl", alpha=0.25, gamma=1.5,
                                       scores=iou, normalizer=float(num_gts))
        return loss, torch.autograd.grad(loss, logits)[0]

    for got, want in zip(focal_triton_loss(iou), ultralytics_loss(iou)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    iou[0, 1] = 0.0  # a matched query whose box does not overlap its ground truth (bbox_iou is 0 there)
    (loss, grad), (ref, ref_grad) = focal_triton_loss(iou), ultralytics_loss(iou)
    p = torch.sigmoid(x[0, 1, 4])
    extra = 0.25 * p ** 1.5 * F.softplus(x[0, 1, 4]) / num_gts  # focal_triton's negative term at (query, label)
    torch.testing.assert_close(loss - ref, extra, rtol=1e-4, atol=1e-7)
    assert ref_grad[0, 1, 4] == 0 and grad[0, 1, 4] != 0

    empty = torch.full((bs, nq), nc)  # no ground truth: DETRLoss falls back to FocalLoss, normalizer 1
    ref = criterion._get_loss_class(x, empty, torch.zeros(bs, nq), 0)["loss_class"]
    loss = focal_triton.focal_loss(x, empty, background=nc, alpha=0.25, gamma=1.5)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)


def _rtdetr_class_inputs(nc=6, seed=0):
    """One decoder layer's classification inputs as DETRLoss._get_loss ends up with them: (B, Q, C) logits, (B, Q)
    labels (nc: unmatched), (B, Q) IoUs of the matched boxes (one of them 0: no overlap), the number of matches."""
    g = torch.Generator().manual_seed(seed)
    bs, nq = 2, 30
    x = torch.randn(bs, nq, nc, generator=g) * 3
    labels = torch.full((bs, nq), nc)
    labels[0, :3], labels[1, :2] = torch.tensor([0, 4, 5]), torch.tensor([2, 2])
    iou = torch.zeros(bs, nq)
    iou[labels < nc] = torch.rand(5, generator=g) * 0.9 + 0.05
    iou[0, 1] = 0.0
    return x, labels, iou, 5


def _class_loss_and_grad(criterion, x, labels, iou, num_gts):
    logits = x.clone().requires_grad_()
    out = criterion._get_loss_class(logits, labels, iou, num_gts, postfix="_dn")
    assert list(out) == ["loss_class_dn"]
    return out["loss_class_dn"], torch.autograd.grad(out["loss_class_dn"], logits)[0]


RTDETR_CASES = {  # ultralytics' branch of _get_loss_class -> the focal_triton kind that replaces it
    "vfl": (dict(use_vfl=True), 5, "vfl_rtdetr"),
    "vfl_gamma2_alpha075": (dict(use_vfl=True, gamma=2.0, alpha=0.75), 5, "vfl_rtdetr"),
    "no_ground_truth": (dict(use_vfl=True), 0, "fl"),  # VarifocalLoss needs num_gts > 0: FocalLoss
    "fl": (dict(use_vfl=False), 5, "fl"),
    "fl_alpha0": (dict(use_vfl=False, alpha=0.0), 5, "fl"),  # FocalLoss skips its alpha factor
    "bce": (dict(use_fl=False, use_vfl=True), 5, "bce"),  # no FocalLoss: BCE on the IoU targets, .mean(1).sum()
}


@needs_ultralytics
@pytest.mark.parametrize("case", list(RTDETR_CASES))
def test_rtdetr_class_loss_is_ultralytics(backend, monkeypatch, case):
    """Each branch of ultralytics' DETRLoss._get_loss_class (gains 1 and 2) against the switched one on the same
    inputs, with a matched query of IoU 0: value within 1e-5 relative, gradient to rounding, one focal_triton call
    of the kind named in RTDETR_CASES and neither VarifocalLoss nor FocalLoss called. Both implementations."""
    options, num_gts, kind = RTDETR_CASES[case]
    calls = []
    real = integration.focal_loss
    monkeypatch.setattr(integration, "focal_loss", lambda *a, **k: calls.append(k) or real(*a, **k))
    x, labels, iou, _ = _rtdetr_class_inputs()
    if num_gts == 0:
        labels, iou = torch.full_like(labels, 6), torch.zeros_like(iou)
    for gain in (1.0, 2.0):
        stock = RTDETRDetectionLoss(nc=6, loss_gain={"class": gain, "bbox": 5, "giou": 2}, **options)
        switched = use_focal_triton(copy.deepcopy(stock))
        assert type(switched) is FocalTritonRTDETRLoss
        for part in (switched.vfl, switched.fl):
            if part is not None:
                part.forward = None  # calling ultralytics' VarifocalLoss / FocalLoss would fail
        (loss, grad), (ref, ref_grad) = (_class_loss_and_grad(c, x, labels, iou, num_gts) for c in (switched, stock))
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6 * ref_grad.abs().max().item())
        assert ref_grad[0, 1, 4] == 0 or kind != "vfl_rtdetr"  # the IoU-0 match: no loss, no gradient at its class
    assert [k["loss"] for k in calls] == [kind, kind]
    assert all(k["background"] == 6 and k["check_labels"] is False for k in calls)


@needs_ultralytics
def test_rtdetr_focal_alpha_per_class_runs_ultralytics_code(torch_path, monkeypatch):
    """A FocalLoss with a per-class alpha tensor (ultralytics applies it to every class once any entry is > 0) is
    no focal_triton kind: that call is ultralytics' own, unchanged."""
    calls = []
    monkeypatch.setattr(integration, "focal_loss", lambda *a, **k: calls.append(1))
    x, labels, iou, num_gts = _rtdetr_class_inputs()
    stock = RTDETRDetectionLoss(nc=6, use_vfl=False)
    stock.fl.alpha = torch.tensor([0.25, 0.0, 0.5, 0.25, 0.75, 1.0])
    switched = use_focal_triton(copy.deepcopy(stock))
    (loss, grad), (ref, ref_grad) = (_class_loss_and_grad(c, x, labels, iou, num_gts) for c in (switched, stock))
    assert calls == [] and torch.equal(loss, ref) and torch.equal(grad, ref_grad)


def _rtdetr_model(nc=4):
    torch.manual_seed(0)
    model = RTDETRDetectionModel("rtdetr-l.yaml", nc=nc, verbose=False)
    model.nc = nc  # the trainer's set_model_attributes; RTDETRDetectionModel.init_criterion reads it
    return model.train()


def _rtdetr_targets(batch):
    """RTDETRDetectionModel.loss's targets (what its decoder's denoising reads)."""
    bs = batch["img"].shape[0]
    return {"cls": batch["cls"].long().view(-1), "bboxes": batch["bboxes"], "batch_idx": batch["batch_idx"].long(),
            "gt_groups": [int((batch["batch_idx"] == i).sum()) for i in range(bs)]}


def _rtdetr_loss_and_grads(model, criterion, batch, preds, params):
    """RTDETRDetectionModel.loss with the given criterion on precomputed predictions: every entry of the
    criterion's loss dict and the gradients of ultralytics' total (their sum)."""
    entries, forward = {}, criterion.forward
    criterion.forward = lambda *a, **k: entries.update(forward(*a, **k)) or entries
    model.criterion = criterion
    loss, _ = model.loss(batch, preds)
    grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
    grads = dict((name, g) for (name, _), g in zip(params, grads) if g is not None)
    return {k: v.detach() for k, v in entries.items()}, grads


@needs_ultralytics
@pytest.mark.parametrize("boxes", [(3, 0, 2), (0, 0, 0)], ids=["boxes", "no_boxes"])
def test_rtdetr_switched_loss_trains_like_stock(torch_path, monkeypatch, boxes):
    """rtdetr-l.yaml (random weights, 4 classes, 64x64 synthetic images, one forward with its denoising queries
    drawn once): every entry of RTDETRDetectionLoss's dict equal (box and GIoU bitwise, the classification ones
    within 1e-5 relative), every parameter gradient equal to rounding; focal_triton called once per decoder layer
    and denoising layer (7 + 6: VarifocalLoss's "vfl_rtdetr"; no boxes: 7 "fl", no denoising queries), ultralytics'
    VarifocalLoss and FocalLoss never."""
    calls = []
    real = integration.focal_loss
    monkeypatch.setattr(integration, "focal_loss", lambda *a, **k: calls.append(k["loss"]) or real(*a, **k))
    model = _rtdetr_model()
    batch = _batch(size=64, nc=4, boxes=boxes)
    preds = model.predict(batch["img"], batch=_rtdetr_targets(batch))
    assert (preds[-1] is None) == (sum(boxes) == 0)  # the denoising groups exist where there are boxes
    stock = model.init_criterion()
    switched = use_focal_triton(model.init_criterion())
    assert type(switched) is FocalTritonRTDETRLoss
    switched.vfl.forward = switched.fl.forward = None  # calling ultralytics' VarifocalLoss / FocalLoss would fail
    params = _params(model)

    ref, ref_grads = _rtdetr_loss_and_grads(model, stock, batch, preds, params)
    got, grads = _rtdetr_loss_and_grads(model, switched, batch, preds, params)

    assert calls == (["vfl_rtdetr"] * 13 if sum(boxes) else ["fl"] * 7)
    assert got.keys() == ref.keys() and len(ref) == 12
    for key in ref:
        if key.startswith("loss_class") and ref[key] != 0:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=0, msg=key)
        else:
            assert torch.equal(got[key], ref[key]), key
    _assert_grads_equal(grads, ref_grads)


@needs_ultralytics
def test_use_focal_triton_on_rtdetr():
    """The RTDETR model (a callback), an RTDETRDetectionModel (its criterion created; model.nc required) and an
    RTDETRDetectionLoss (in place, state kept; again: harmless)."""
    criterion = RTDETRDetectionLoss(nc=5, use_vfl=True, gamma=2.0)
    assert use_focal_triton(criterion) is criterion and type(criterion) is FocalTritonRTDETRLoss
    assert use_focal_triton(criterion) is criterion and (criterion.nc, criterion.vfl.gamma) == (5, 2.0)
    model = _rtdetr_model(nc=3)
    assert use_focal_triton(model) is model and type(model.criterion) is FocalTritonRTDETRLoss
    assert model.criterion.nc == 3
    bare = RTDETRDetectionModel("rtdetr-l.yaml", nc=3, verbose=False)
    with pytest.raises(ValueError, match="model.nc"):
        use_focal_triton(bare)
    assert getattr(bare, "criterion", None) is None
    rtdetr = ultralytics.RTDETR("rtdetr-l.yaml")
    assert use_focal_triton(rtdetr) is rtdetr
    assert rtdetr.callbacks["on_train_start"].count(integration._on_train_start) == 1


@needs_ultralytics
def test_rtdetr_train_uses_focal_triton(torch_path, monkeypatch, tmp_path):
    """`RTDETR("rtdetr-l.yaml").train()` after the one call: ultralytics' RT-DETR trainer runs one step on two
    synthetic 64x64 images with focal_triton computing all 13 classification terms (7 layers + 6 denoising layers);
    the checkpoint does not refer to focal_triton."""
    data = _synthetic_dataset(tmp_path)
    calls = []
    real = integration.focal_loss
    monkeypatch.setattr(integration, "focal_loss", lambda *a, **k: calls.append(k["loss"]) or real(*a, **k))
    with _process_state_kept():
        model = use_focal_triton(ultralytics.RTDETR("rtdetr-l.yaml"))
        model.train(data=str(data), epochs=1, imgsz=64, batch=2, device="cpu", workers=0, plots=False, val=False,
                    amp=False, project=str(tmp_path / "runs"), name="train", exist_ok=True, verbose=False)
    assert type(model.trainer.model.criterion) is FocalTritonRTDETRLoss
    assert calls == ["vfl_rtdetr"] * 13
    _assert_checkpoint_is_stock(tmp_path / "runs" / "train" / "weights" / "last.pt")
