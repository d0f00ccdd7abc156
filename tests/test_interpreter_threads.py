"""Triton's interpreter is not thread-safe: focal_triton serializes its launches (focal_triton/ops/backend.py), so
threads calling at once get the results a single thread gets."""
import threading

import pytest
import torch
from conftest import HAS_CUDA
from test_multilevel_focal_loss import leaves_of, make_labels, make_levels

import focal_triton


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs on CPU machines (tests/conftest.py)")
def test_four_threads_at_once(monkeypatch):
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    levels, labels = make_levels(), make_labels()
    x, t = torch.randn(3, 700), (torch.rand(3, 700) > 0.9).float()

    def work():
        leaves = leaves_of(levels)
        loss = focal_triton.multilevel_focal_loss(leaves, labels, 3)
        grads = torch.autograd.grad(loss, leaves)
        xl = x.clone().requires_grad_(True)
        dense = focal_triton.sigmoid_focal_loss(xl, t, reduction="sum")
        (gx,) = torch.autograd.grad(dense, xl)
        return [loss, *grads, dense, gx]

    expected = work()
    results, errors = [None] * 4, []
    barrier = threading.Barrier(4)

    def run(i):
        try:
            barrier.wait()
            results[i] = work()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for r in results:
        assert all(torch.equal(a, b) for a, b in zip(r, expected))
