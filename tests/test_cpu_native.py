"""The compiled negatives' pass (focal_triton/cpu/negatives.c through cpu/native.py) on its own: per element against
an independent float64 formula, at the numeric edges, with skipped elements, across thread counts and dtypes.
(tests/test_cpu.py runs the CPU path's behaviour with both forms of the pass.)"""
import platform
import shutil

import pytest
import torch

from focal_triton.cpu import native

pytestmark = pytest.mark.skipif(not native.built(), reason="focal_triton.cpu._negatives was not built")

GAMMAS = [0.0, 1.0, 2.0, 3.0, 4.0, 1.5, 0.5, 5.0]


def test_extension_is_built_where_a_compiler_is():
    """pip builds the optional extension wherever a C compiler is found (Linux x86-64 with gcc here): a build that
    broke must not pass for "no compiler"."""
    if platform.system() != "Linux" or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    assert native.built()


def reference(x, gamma, ts):
    """float64 loss m bce and gradient m (p - ts + gamma q bce) of a negative (t = 0), written from the definition:
    p = sigmoid(x), bce = -(ts log p + (1 - ts) log(1 - p)), m = p**gamma."""
    x = x.double()
    p, q = torch.sigmoid(x), torch.sigmoid(-x)
    bce = -(ts * torch.nn.functional.logsigmoid(x) + (1 - ts) * torch.nn.functional.logsigmoid(-x))
    m = p ** gamma
    return m * bce, m * (p - ts + gamma * q * bce)


def run(x, gamma, ts, factor=1.0, skip=None, chunk=None, grad=True):
    """(per-task sums, gradient) of the compiled pass over flat x in tasks of `chunk` elements (skip: sorted
    int64 element indices)."""
    n = x.numel()
    chunk = chunk or n
    g = torch.full_like(x, float("nan")) if grad else None   # poisoned: every element must be written
    tasks = []
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        sk = None
        if skip is not None:
            lo, hi = (int(v) for v in torch.searchsorted(skip, torch.tensor([start, end])))
            sk = (skip, lo, hi)
        tasks.append((x, g, start, end, sk, factor))
    return native.negatives(tasks, x.dtype, gamma, ts), g


def grid():
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(20000, generator=g) * 3 - 4, torch.linspace(-60, 60, 20001),
                      torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 17.0, -17.0, 88.0, -88.0, 300.0])])


@pytest.mark.parametrize("ts", [0.0, 0.05])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_matches_float64_per_element(gamma, ts):
    x = grid()
    sums, g = run(x, gamma, ts, factor=0.75, chunk=4099)
    loss, grad = reference(x, gamma, ts)
    assert abs(sums.sum().item() - loss.sum().item()) <= 2e-7 * loss.sum().item()
    # relative per element where the result is a normal float32 well above underflow (and not a cancellation of
    # p - ts around p = ts for gamma = 0)
    ref = 0.75 * grad
    # relative per element (gamma = 0 with smoothing: to max(p, ts), as p - ts cancels around p = ts) where the
    # result is a normal float32 well above underflow
    size = 0.75 * torch.sigmoid(x.double()).clamp_min(ts) if gamma == 0 and ts else ref.abs()
    ok = ref.abs() > 1e-30
    rel = ((g.double() - ref).abs() / size)[ok]
    assert rel.max() <= 2e-6, (rel.max(), x[ok][rel.argmax()])
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("gamma", [0.0, 2.0, 1.5])
def test_tiny_results_stay_accurate_down_to_float32_underflow(gamma):
    """Easy negatives down to x = -80 (gradients ~1e-35 and below): relative accuracy kept while the result is a
    normal float32, never a NaN or a negative."""
    x = torch.linspace(-80, -20, 6001)
    _, g = run(x, gamma, 0.0)
    _, ref = reference(x, gamma, 0.0)
    ok = ref.abs() > 1e-30
    assert (((g.double() - ref).abs() / ref.abs())[ok]).max() <= 2e-6
    assert (g >= 0).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("value, ts, finite", [(float("inf"), 0.0, False), (float("nan"), 0.0, False),
                                               (float("-inf"), 0.0, True), (float("-inf"), 0.05, False),
                                               (3e38, 0.0, True), (-3e38, 0.05, True)])
def test_non_finite_logits_make_their_task_non_finite(value, ts, finite):
    """+inf and NaN (and -inf with a smoothed target: -ts x = inf) give a non-finite task sum, which sends the
    caller to the general form; -inf without smoothing is the exact limit 0 with gradient 0, and the largest
    finite logits stay finite."""
    x = torch.tensor([1.0, -2.0, value, 0.5, -7.0])
    sums, g = run(x, 2.0, ts, chunk=2)
    assert [bool(torch.isfinite(v)) for v in sums] == [True, finite, True]
    if value == float("-inf") and not ts:
        assert sums[1].item() == pytest.approx(reference(x[3:4], 2.0, ts)[0].item(), rel=2e-7) and g[2].item() == 0
    if finite:
        assert torch.isfinite(g).all()


def test_skipped_elements_add_nothing_and_get_zero_gradient():
    x = grid()[:5000]
    skip = torch.tensor([0, 1, 2, 99, 100, 998, 999, 1000, 2500, 4999], dtype=torch.int64)
    for s in (skip, torch.arange(0, 5000, dtype=torch.int64)):             # some, and every element
        sums, g = run(x, 2.0, 0.0, skip=s, chunk=1000)
        keep = torch.ones(x.numel(), dtype=torch.bool)
        keep[s] = False
        loss, grad = reference(x, 2.0, 0.0)
        assert abs(sums.sum().item() - loss[keep].sum().item()) <= 2e-7 * max(loss[keep].sum().item(), 1e-30)
        assert (g[s] == 0).all() and torch.allclose(g[keep].double(), grad[keep], rtol=2e-6, atol=1e-30)


def test_thread_count_does_not_change_a_bit():
    x = grid()
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run(x, 1.5, 0.05, chunk=1024))
    finally:
        torch.set_num_threads(before)
    for sums, g in results[1:]:
        assert torch.equal(sums, results[0][0]) and torch.equal(g, results[0][1])


def test_bfloat16_gradient_is_the_float32_one_rounded_to_nearest_even():
    x = grid().bfloat16()
    sums_b, g_b = run(x, 2.0, 0.05, chunk=3000)
    sums_f, g_f = run(x.float(), 2.0, 0.05, chunk=3000)
    assert torch.equal(sums_b, sums_f) and g_b.dtype == torch.bfloat16
    assert torch.equal(g_b, g_f.bfloat16())


def test_loss_only_writes_no_gradient():
    x = grid()
    sums, _ = run(x, 2.0, 0.0, grad=False)
    assert sums.sum().item() == pytest.approx(reference(x, 2.0, 0.0)[0].sum().item(), rel=2e-7)


def test_turned_off_by_environment(monkeypatch):
    assert native.available(torch.float32) and native.available(torch.bfloat16)
    assert not native.available(torch.float16) and not native.available(torch.float64)
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert not native.available(torch.float32)


def test_mismatched_tasks_are_refused():
    x = torch.zeros(10)
    with pytest.raises(ValueError, match="do not match"):
        native.negatives([(x, None, 0, 11, None, 1.0)], torch.float32, 2.0, 0.0)
    with pytest.raises(ValueError, match="do not match"):
        native.negatives([(x, torch.zeros(10, dtype=torch.bfloat16), 0, 10, None, 1.0)], torch.float32, 2.0, 0.0)
    with pytest.raises(ValueError, match="int64"):
        native.negatives([(x, None, 0, 10, (torch.zeros(2, dtype=torch.int32), 0, 2), 1.0)], torch.float32, 2.0,
                         0.0)
