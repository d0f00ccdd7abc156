"""Tests that only make sense on a CUDA device (compiled kernels at scale). Skipped elsewhere, with the reason."""
import math

import pytest
import torch
from reference import assert_close, focal_grad_ref, focal_loss_ref

import focal_triton

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_large_odd_sized_matches_reference(dtype, reduction):
    """3M + 37 elements: many persistent-loop iterations per program and a masked tail, compiled."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 3_000_037
    x = (torch.randn(n, device="cuda", generator=g) * 4).to(dtype).requires_grad_(True)
    t = (torch.rand(n, device="cuda", generator=g) < 0.01).to(dtype)
    loss = focal_triton.sigmoid_focal_loss(x, t, reduction=reduction)
    assert_close(loss, focal_loss_ref(x, t, 0.25, 2.0, reduction), what="loss")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert_close(grad, focal_grad_ref(x, t, 0.25, 2.0, reduction), what="grad")
    again = focal_triton.sigmoid_focal_loss(x, t, reduction=reduction)
    assert torch.equal(loss, again)


def test_no_host_sync(monkeypatch, tmp_path):
    """With tuning on, as users have it: after one warm-up call of each reduction (which tunes its keys, and the
    tuning synchronizes), forward and backward read nothing on the host."""
    monkeypatch.setenv("FOCAL_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("FOCAL_TRITON_CACHE_DIR", str(tmp_path))
    x = torch.randn(1 << 20, device="cuda", requires_grad=True)
    t = (torch.rand(1 << 20, device="cuda") < 0.01).float()
    for reduction in ("sum", "mean"):  # compile, tune and size the grid of every key first
        focal_triton.sigmoid_focal_loss(x, t, reduction=reduction).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        focal_triton.sigmoid_focal_loss(x, t, reduction="sum").backward()
        focal_triton.sigmoid_focal_loss(x, t, reduction="mean").backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tuning_times_on_the_tensors_device(monkeypatch, tmp_path):
    """Tensors on cuda:1 while cuda:0 is current: every candidate is timed with cuda:1 current (do_bench records
    its events on the current device's stream), and the tuned result is right."""
    from focal_triton.kernels import tuning

    monkeypatch.setenv("FOCAL_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("FOCAL_TRITON_CACHE_DIR", str(tmp_path))
    devices = []

    def timer(fn):
        devices.append(torch.cuda.current_device())
        return tuning._do_bench(fn)

    old = tuning.set_timer(timer)
    try:
        with torch.cuda.device(0):
            x = torch.randn(1 << 22, device="cuda:1", requires_grad=True)
            t = (torch.rand(1 << 22, device="cuda:1") < 0.01).float()
            loss = focal_triton.sigmoid_focal_loss(x, t, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
    finally:
        tuning.set_timer(old)
    assert devices and set(devices) == {1}
    assert_close(loss, focal_loss_ref(x, t, 0.25, 2.0, "sum"), what="loss")
    assert_close(grad, focal_grad_ref(x, t, 0.25, 2.0, "sum"), what="grad")


# A fresh process: the loss stage is warmed up once (so that torch's own kernels and allocations are ready, as
# torch.cuda.graph requires), then captured with options that make every focal_triton kernel a new specialization
# (fractional gamma, "mean", a per-image normalizer), met for the first time inside the capture, with tuning on (the
# untuned keys take the heuristic there). The replay must give the eager result.
CAPTURE_FIRST = r"""
import torch, focal_triton
from focal_triton.kernels import multilevel as mf, sigmoid_focal as sf

g = torch.Generator(device="cuda").manual_seed(0)
levels = [torch.randn(2, 9 * 80, h, w, device="cuda", generator=g).requires_grad_(True) for h, w in ((32, 40), (16, 20))]
labels = torch.full((2, 9 * (32 * 40 + 16 * 20)), -1, device="cuda")
labels[:, ::97] = 3
x = torch.randn(10007, device="cuda", generator=g).requires_grad_(True)
t = (torch.rand(10007, device="cuda", generator=g) < 0.1).float()

def step(warm):
    norm = (labels >= 0).sum(1).clamp(min=1)
    gamma = 2.0 if warm else 1.5
    loss = focal_triton.multilevel_focal_loss(levels, labels, 9, gamma=gamma, normalizer=norm.sum() if warm else norm,
                                              check_labels=False)
    dense = focal_triton.sigmoid_focal_loss(x, t, gamma=gamma, reduction="sum" if warm else "mean")
    (loss + dense).backward()
    return loss, dense

def loaded():
    return sum(len(c[0]) for k in (mf.multilevel_focal_kernel, mf.normalize_partials_kernel,
               sf.sigmoid_focal_fwd_kernel, sf.sum_partials_kernel, sf.sigmoid_focal_bwd_kernel)
               for c in k.device_caches.values())

side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    step(True)
torch.cuda.current_stream().wait_stream(side)
torch.cuda.synchronize()
for a in levels + [x]:
    a.grad = None
before = loaded()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    static = step(False)
met_in_capture = loaded() - before
graph.replay()
torch.cuda.synchronize()
grads = [a.grad.clone() for a in levels + [x]]
for a in levels + [x]:
    a.grad = None
ref = step(False)  # eager: now tuned where the capture took the heuristic, so sums may differ in the last bits
torch.testing.assert_close(static[0], ref[0], rtol=1e-5, atol=0)
torch.testing.assert_close(static[1], ref[1], rtol=1e-5, atol=0)
assert all(torch.equal(g, a.grad) for g, a in zip(grads, levels + [x]))  # elementwise: the same bits
print("specializations met in the capture:", met_in_capture)
"""


def test_first_launch_inside_cuda_graph_capture(tmp_path):
    """Kernel specializations met for the first time inside a CUDA-graph capture (global capture mode) are
    compiled and loaded there (launch.capture_permits_loading), and the captured loss stage replays right."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, FOCAL_TRITON_AUTOTUNE="1", FOCAL_TRITON_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", CAPTURE_FIRST], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    met = int(r.stdout.split("specializations met in the capture:")[1])
    assert met >= 6  # forward, final sum and backward of both forms: the sized and the final-sum launch paths


def test_more_than_2_31_elements():
    """64-bit indexing: values placed past element 2**31 are read, and their loss and gradient written, in place."""
    n = 2**31 + 2**20 + 3
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    t = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    far = torch.tensor([2**31 - 1, 2**31, 2**31 + 12345, n - 1], device="cuda")
    x[far] = torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.bfloat16, device="cuda")
    t[far] = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.bfloat16, device="cuda")
    x.requires_grad_(True)
    loss = focal_triton.sigmoid_focal_loss(x, t)
    assert_close(loss[far], focal_loss_ref(x[far], t[far], 0.25, 2.0), what="far loss")
    zero_loss = 0.75 * 0.25 * math.log(2.0)  # x = 0, t = 0
    assert torch.allclose(loss[:8].float(), torch.full((8,), zero_loss, device="cuda"), rtol=2**-7)
    total = focal_triton.sigmoid_focal_loss(x, t, reduction="sum")
    expected = (n - 4) * zero_loss + focal_loss_ref(x[far], t[far], 0.25, 2.0).sum().item()
    assert abs(total.float().item() - expected) / expected < 1e-2
    del loss
    (grad,) = torch.autograd.grad(total, x)
    assert_close(grad[far], focal_grad_ref(x[far], t[far], 0.25, 2.0), what="far grad")


def _coco_head(batch, dtype, channels_last, num_anchors=9, num_classes=80, h=800, w=1344, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    sizes = [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64, 128)]
    levels = []
    for i, (a, b) in enumerate(sizes):
        x = (torch.randn(batch, num_anchors * num_classes, a, b, device="cuda", generator=g) * 2 - 4).to(dtype)
        levels.append(x.to(memory_format=torch.channels_last) if channels_last or i % 2 else x)
    m = num_anchors * sum(a * b for a, b in sizes)
    labels = torch.randint(-2, num_classes, (batch, m), device="cuda", generator=g)
    labels[torch.rand(batch, m, device="cuda", generator=g) < 0.9] = -1
    return levels, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_multilevel_coco_image_matches_reference(dtype, channels_last):
    """A COCO-sized RetinaNet head (2 images, 800x1344, 5 levels, A = 9, C = 80), compiled, against the naive
    reference: loss with a per-image normalizer, gradient of every level, and bitwise repeatability."""
    from reference_multilevel import multilevel_value_and_grads

    levels, labels = _coco_head(2, dtype, channels_last)
    norm = (labels >= 0).sum(1).clamp(min=1)
    xs = [x.detach().requires_grad_(True) for x in levels]
    loss = focal_triton.multilevel_focal_loss(xs, labels, 9, normalizer=norm)
    grads = torch.autograd.grad(loss, xs)
    ref, ref_grads = multilevel_value_and_grads(levels, labels, 9, normalizer=norm)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=0)
    for g_, r, x in zip(grads, ref_grads, levels):
        assert g_.stride() == x.stride()
        assert_close(g_, r, what="level grad")
    assert torch.equal(loss, focal_triton.multilevel_focal_loss(xs, labels, 9, normalizer=norm))


def test_multilevel_no_host_sync():
    levels, labels = _coco_head(2, torch.bfloat16, False, h=256, w=320)
    xs = [x.detach().requires_grad_(True) for x in levels]
    norm = (labels >= 0).sum(1).clamp(min=1)
    kw = dict(normalizer=norm, check_labels=False)
    focal_triton.multilevel_focal_loss(xs, labels, 9, **kw).backward()  # compile and size the grid first
    torch.cuda.set_sync_debug_mode("error")
    try:
        focal_triton.multilevel_focal_loss(xs, labels, 9, **kw).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_multilevel_cuda_graph_capture_and_replay():
    """The loss stage (normalizer, forward, backward) captured in a CUDA graph: a replay on new labels in the same
    buffer equals the eager result, loss and gradients."""
    levels, labels = _coco_head(2, torch.bfloat16, False, h=256, w=320)
    levels = [x.detach().requires_grad_(True) for x in levels]
    static_labels = labels.clone()

    def step():
        norm = (static_labels >= 0).sum(1).clamp(min=1)
        loss = focal_triton.multilevel_focal_loss(levels, static_labels, 9, normalizer=norm, check_labels=False)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    for x in levels:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    new_labels = torch.roll(labels, 7, dims=1)
    static_labels.copy_(new_labels)
    for x in levels:
        x.grad.zero_()
    graph.replay()
    xs = [x.detach().requires_grad_(True) for x in levels]
    ref = focal_triton.multilevel_focal_loss(xs, new_labels, 9, normalizer=(new_labels >= 0).sum(1).clamp(min=1))
    ref.backward()
    assert torch.equal(static_loss, ref)
    assert all(torch.equal(x.grad, r.grad) for x, r in zip(levels, xs))


def test_autocast_cuda_no_upcast_copy():
    """On CUDA under autocast(float16): float32 loss from the float16 logits, float16 gradients."""
    levels, labels = _coco_head(2, torch.float16, True, h=128, w=160)
    xs = [x.detach().requires_grad_(True) for x in levels]
    with torch.autocast("cuda", dtype=torch.float16):
        loss = focal_triton.multilevel_focal_loss(xs, labels, 9, normalizer=(labels >= 0).sum(1).clamp(min=1))
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(x.grad.dtype == torch.float16 for x in xs)
