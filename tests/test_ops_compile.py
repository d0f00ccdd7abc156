"""PyTorch 2: torch.compile(fullgraph=True) of loss stages that call focal_triton (no graph break, no recompile across
batch and image sizes), and no host sync on the hot path (the ops run on fake tensors, which hold no values)."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import focal_triton

A, C = 3, 5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _compiled(fn):
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, fullgraph=True, backend=counter, dynamic=True), counter


def assert_one_graph(frames_after_first_call, counter):
    """fullgraph=True already fails on any graph break; here: one captured graph, and no compile after the first
    call. (The first call may run the backend twice: dynamo restarts its analysis once to specialize Python float
    arguments such as alpha and gamma, which it had made symbolic under dynamic=True.)"""
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert counter.frame_count == frames_after_first_call


def _head(n, sizes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = [(torch.randn(n, A * C, h, w, generator=g) * 3).to(device) for h, w in sizes]
    levels[-1] = levels[-1].to(memory_format=torch.channels_last)
    m = A * sum(h * w for h, w in sizes)
    matched = torch.randint(-2, 13, (n, m), generator=g).to(device)  # gt index, -1 background, -2 ignored
    gt_labels = torch.randint(0, C, (n, 13), generator=g).to(device)
    return levels, matched, gt_labels


def retinanet_loss_stage(levels, matched, gt_labels):
    """torchvision RetinaNet's classification loss, written for focal_triton: labels from the matcher, per-image
    normalizer, one call on the per-level outputs."""
    labels = torch.where(matched >= 0, gt_labels.gather(1, matched.clamp(min=0)), matched)
    num_fg = (matched >= 0).sum(dim=1).clamp(min=1)
    return focal_triton.multilevel_focal_loss(levels, labels, A, normalizer=num_fg)


def _value_and_grads(fn, levels, *args):
    xs = [x.detach().requires_grad_(True) for x in levels]
    loss = fn(xs, *args)
    return loss, torch.autograd.grad(loss, xs)


def _run_over_sizes(compiled, counter, sizes, device) -> list:
    """The compiled loss stage against the eager one on each (batch, level sizes): values and gradients equal;
    returns the compiled frame count after each call."""
    frames = []
    for n, hws in sizes:
        levels, matched, gt = _head(n, hws, device, seed=n)
        loss, grads = _value_and_grads(compiled, levels, matched, gt)
        ref, ref_grads = _value_and_grads(retinanet_loss_stage, levels, matched, gt)
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)
        frames.append(counter.frame_count)
    return frames


def test_loss_stage_compiles_fullgraph_across_batch_and_image_sizes(backend, device):
    compiled, counter = _compiled(retinanet_loss_stage)
    # Sizes all different within a call: torch.compile gives equal sizes one symbol ("duck sizing"), and a later
    # call where they differ would then recompile for reasons of the test, not of focal_triton.
    frames = _run_over_sizes(compiled, counter, ((2, [(6, 7), (4, 9)]), (3, [(8, 5), (2, 11)]),
                                                 (4, [(7, 6), (3, 10)])), device)
    assert_one_graph(frames[0], counter)  # one graph for every batch and image size


def test_loss_stage_compiles_once_over_six_sizes_with_a_one_pixel_level(backend, device):
    """docs/pytorch2.md's recipe for sizes that change every step: with torch.compile's sizes 0 and 1 left
    unspecialized and no duck sizing (equal sizes at the first call, here the batch and a level's width, not assumed
    equal later), one compile serves six batch and image sizes, a 1-pixel level among them, both ways (1 -> 2 -> 1)."""
    import torch.fx.experimental._config as fx_config

    compiled, counter = _compiled(retinanet_loss_stage)
    sizes = ((2, [(6, 7), (3, 2)]), (3, [(8, 5), (1, 1)]), (4, [(1, 1), (3, 2)]), (2, [(4, 4), (2, 2)]),
             (1, [(7, 2), (1, 3)]), (5, [(2, 9), (1, 1)]))
    with fx_config.patch(backed_size_oblivious=True, use_duck_shape=False):
        frames = _run_over_sizes(compiled, counter, sizes, device)
    assert_one_graph(frames[0], counter)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dense_compiles_fullgraph_dynamic(backend, device, reduction):
    def loss_fn(x, t):
        return focal_triton.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction=reduction).sum()

    compiled, counter = _compiled(loss_fn)
    g = torch.Generator().manual_seed(0)
    frames = []
    for shape in ((5, 7), (9, 3), (17, 4)):
        x = torch.randn(shape, generator=g).to(device).requires_grad_(True)
        t = (torch.rand(shape, generator=g) < 0.3).float().to(device)
        loss = compiled(x, t)
        (grad,) = torch.autograd.grad(loss, x)
        (ref_grad,) = torch.autograd.grad(loss_fn(x, t), x)
        torch.testing.assert_close(loss, loss_fn(x, t), rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)
        frames.append(counter.frame_count)
    assert_one_graph(frames[0], counter)


def test_flat_form_and_module_compile_fullgraph(backend, device):
    criterion = focal_triton.FocalLoss(background=C, ignore_index=-1)

    def detectron2_style(logits, labels):
        num_pos = ((labels >= 0) & (labels < C)).sum().clamp(min=1)
        return criterion(logits, labels, normalizer=num_pos)

    compiled, counter = _compiled(detectron2_style)
    g = torch.Generator().manual_seed(1)
    frames = []
    for n, m in ((2, 30), (3, 41)):
        logits = torch.randn(n, m, C, generator=g).to(device).requires_grad_(True)
        labels = torch.randint(-1, C + 1, (n, m), generator=g).to(device)
        torch.testing.assert_close(compiled(logits, labels), detectron2_style(logits, labels), rtol=1e-6, atol=0)
        frames.append(counter.frame_count)
    assert_one_graph(frames[0], counter)


def test_label_check_inside_compile_is_a_device_assert(backend, device):
    """check_labels=True inside torch.compile: no graph break; a bad label fails the assertion when the graph runs
    (on CPU at once; on CUDA as a device-side assert)."""
    compiled, _ = _compiled(lambda levels, labels: focal_triton.multilevel_focal_loss(levels, labels, A))
    levels, matched, _ = _head(2, [(3, 2)], device)
    labels = matched.clamp(max=C - 1)
    compiled(levels, labels)  # valid labels: -2, -1, 0..C-1
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match="labels must be"):
            compiled(levels, labels + C)


# ---- no host sync: fake tensors hold no values, so any read of a value on the host raises ---------------------------

def _fake_head(n=2, sizes=((6, 5), (3, 3))):
    levels = [torch.randn(n, A * C, h, w, requires_grad=True) for h, w in sizes]
    labels = torch.randint(-2, C, (n, A * sum(h * w for h, w in sizes)))
    return levels, labels


def test_multilevel_forward_backward_without_host_sync():
    with FakeTensorMode():
        levels, labels = _fake_head()
        for normalizer in ((labels >= 0).sum(1).clamp(min=1), (labels >= 0).sum().clamp(min=1), 7.0,
                           focal_triton.global_normalizer((labels >= 0).sum())):
            loss = focal_triton.multilevel_focal_loss(levels, labels, A, normalizer=normalizer, check_labels=False,
                                                      weights=torch.rand(labels.shape), alpha=torch.rand(C),
                                                      label_smoothing=0.1)
            grads = torch.autograd.grad(loss, levels)
            assert loss.shape == () and [g.shape for g in grads] == [x.shape for x in levels]
        outs = focal_triton.multilevel_focal_loss(levels, labels, A, reduction="none", check_labels=False)
        torch.autograd.grad([o.sum() for o in outs], levels)
        flat = torch.randn(2, 40, C, requires_grad=True)
        focal_triton.focal_loss(flat, labels[:, :40], check_labels=False).backward()


def test_dense_forward_backward_without_host_sync():
    with FakeTensorMode():
        x = torch.randn(4, 100, 80, requires_grad=True)
        t = torch.rand(4, 100, 80)
        for reduction in ("none", "mean", "sum"):
            loss = focal_triton.sigmoid_focal_loss(x, t, reduction=reduction)
            torch.autograd.grad(loss.sum(), x)


def test_label_check_is_the_one_host_sync():
    """The test above can fail: the default label check reads one value on the host, which fake tensors refuse."""
    with FakeTensorMode():
        levels, labels = _fake_head()
        with pytest.raises(Exception, match="local_scalar_dense|[Dd]ata.dependent"):
            focal_triton.multilevel_focal_loss(levels, labels, A)


def test_meta_tensors():
    """The registered fake implementations serve meta tensors too: shapes, dtypes and layouts without computing."""
    levels, labels = _fake_head()
    levels = [x.detach().to("meta").requires_grad_(True) for x in levels]
    levels[1] = levels[1].detach().to(memory_format=torch.channels_last).requires_grad_(True)
    labels = labels.to("meta")
    loss = focal_triton.multilevel_focal_loss(levels, labels, A, check_labels=False)
    assert loss.device.type == "meta" and loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, levels)
    assert grads[1].is_contiguous(memory_format=torch.channels_last)
    outs = focal_triton.multilevel_focal_loss(levels, labels, A, reduction="none", check_labels=False)
    assert [o.shape for o in outs] == [x.shape for x in levels]


def test_first_call_inside_compile_in_a_fresh_process():
    """A process whose first focal_triton call is traced by torch.compile (the CPU path, each form, with a
    gradient): nothing of focal_triton is first imported under the trace's fake-tensor mode, where a module-level
    tensor would be created fake and poison later real calls."""
    import os
    import subprocess
    import sys

    code = """
import torch, focal_triton
def stage(levels, labels, x, t):
    a = focal_triton.multilevel_focal_loss(levels, labels, 3, normalizer=(labels >= 0).sum(1).clamp(min=1))
    return a + focal_triton.sigmoid_focal_loss(x, t, reduction="sum")
levels = [torch.randn(2, 3 * 5, h, w, requires_grad=True) for h, w in ((6, 7), (3, 4))]
labels = torch.randint(-2, 5, (2, 3 * (42 + 12)))
x = torch.randn(4, 30, requires_grad=True)
t = (torch.rand(4, 30) < 0.2).float()
loss = torch.compile(stage, fullgraph=True, backend="aot_eager")(levels, labels, x, t)
loss.backward()
ref = stage(levels, labels, x, t)
torch.testing.assert_close(loss, ref)
print("ok", loss.item())
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FOCAL_TRITON_BACKEND"] = "torch"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
