"""The autotuning cache (focal_triton.kernels.tuning) without a GPU: a fake timing function, temporary cache dirs."""
import json
import os
import stat
import warnings

import pytest
import torch
from conftest import HAS_CUDA, SUITE_TURNED_TUNING_OFF
from helpers import check_multilevel, make_labels, make_levels

import focal_triton
from focal_triton.kernels import tuning

# On a GPU these run on the CUDA launch path: `make gpu-check` runs them with the gpu tests.
pytestmark = pytest.mark.cuda_path

CANDIDATES = [dict(BLOCK=512, num_warps=4), dict(BLOCK=1024, num_warps=4), dict(BLOCK=2048, num_warps=8)]


def fake_timer(times):
    """A timer that runs the function once and returns the next of `times` (ms); records the calls."""
    calls = []

    def timer(fn):
        fn()
        calls.append(1)
        return times[len(calls) - 1]

    timer.calls = calls
    return timer


def test_size_bucket_and_key():
    assert [tuning.size_bucket(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]
    k1 = tuning.make_key("multilevel", 16_056_000, 80, 0b10101, torch.bfloat16, "sum")
    k2 = tuning.make_key("multilevel", 16_700_000, 80, 0b10101, torch.bfloat16, "sum")  # same bucket
    assert k1 == k2 == "multilevel|n16777216|C80|L21|bfloat16|sum"
    assert k1 != tuning.make_key("multilevel", 16_056_000, 91, 0b10101, torch.bfloat16, "sum")
    assert k1 != tuning.make_key("multilevel", 16_056_000, 80, 0, torch.bfloat16, "sum")
    assert k1 != tuning.make_key("multilevel", 16_056_000, 80, 0b10101, torch.float32, "sum")


def test_cache_path_names_gpu_and_triton(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    p = tuning.cache_path("NVIDIA H100 80GB HBM3", "3.8.0")
    assert p == str(tmp_path / "tune-NVIDIA_H100_80GB_HBM3-triton3.8.0.json")
    monkeypatch.delenv(tuning.CACHE_DIR_ENV)
    assert tuning.cache_path("x", "1").startswith(os.path.expanduser("~/.cache/focal_triton/"))


def test_tune_picks_fastest_and_skips_failures():
    def run(cfg):
        if cfg["BLOCK"] == 2048:
            raise RuntimeError("out of resources")

    best, _, failures = tuning.tune(CANDIDATES, run, lambda fn: (fn(), 1.0)[1])
    assert best == CANDIDATES[0]                    # equal times: the first
    assert list(failures) == [2] and "out of resources" in failures[2]
    best, times, _ = tuning.tune(CANDIDATES, run, fake_timer([2.0, 1.5]))
    assert best == CANDIDATES[1] and set(times) == {0, 1}
    best, times, failures = tuning.tune(CANDIDATES, lambda cfg: 1 / 0, fake_timer([1.0] * 3))
    assert (best, times) == (None, {}) and set(failures) == {0, 1, 2} and "ZeroDivisionError" in failures[0]


def test_roundtrip_second_process_starts_tuned(tmp_path):
    path = str(tmp_path / "sub" / "tune-GPU-triton3.8.0.json")
    cache = tuning.TuneCache(path, "GPU")
    cache.put("k", CANDIDATES[2])
    data = json.loads(open(path).read())           # plain JSON
    assert data["configs"]["k"] == CANDIDATES[2] and data["device"] == "GPU"
    assert not [f for f in os.listdir(tmp_path / "sub") if f.startswith(".tune-")]  # no temporary file left
    again = tuning.TuneCache(path, "GPU")
    assert again.get("k") == CANDIDATES[2]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"format": 99, "configs": {}}),
                                     json.dumps({"format": 1, "configs": {"k": {"BLOCK": "big"}}})])
def test_corrupt_file_warns_and_retunes(tmp_path, content):
    path = tmp_path / "tune.json"
    path.write_text(content)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cache = tuning.TuneCache(str(path), "GPU")
    assert cache.get("k") is None
    assert len(w) <= 1
    cache.put("k", CANDIDATES[0])                   # overwritten with a good file
    assert tuning.TuneCache(str(path)).get("k") == CANDIDATES[0]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_dir_keeps_configs_in_memory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        _unwritable(str(d / "tune.json"))
    finally:
        d.chmod(stat.S_IRWXU)


def test_unwritable_path_keeps_configs_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    _unwritable(str(blocker / "tune.json"))          # a directory that is a file: works as root too


def _unwritable(path):
    cache = tuning.TuneCache(path, "GPU")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cache.put("a", CANDIDATES[0])
        cache.put("b", CANDIDATES[1])
    assert len(w) == 1 and "kept in memory" in str(w[0].message)
    assert cache.get("a") == CANDIDATES[0] and cache.get("b") == CANDIDATES[1]


class FakeCudaDevice:
    """Stands in for torch.cuda.device on a machine without CUDA: records which device is current."""

    current = None

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        self.previous, FakeCudaDevice.current = FakeCudaDevice.current, self.device

    def __exit__(self, *exc):
        FakeCudaDevice.current = self.previous


@pytest.fixture
def pretend_cuda(monkeypatch, tmp_path):
    """choose() on a pretend CUDA device of a CPU machine: tuning on, no interpreter, a fake device guard; yields a
    fresh cache."""
    monkeypatch.setattr("focal_triton.kernels.launch.interpreter_enabled", lambda: False)
    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no capture check without a driver
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    yield tuning.TuneCache(str(tmp_path / "t.json"), "GPU")


def test_choose_tunes_once_then_reads_the_cache(pretend_cuda, monkeypatch):
    """choose() on a (pretend) CUDA device: tunes with the timer on the first call (the heuristic config {} first,
    then the candidates), then reads the cache."""
    cache = pretend_cuda
    timer = fake_timer([3.0, 3.0, 1.0, 2.0])
    old = tuning.set_timer(timer)
    seen = []
    try:
        dev = torch.device("cuda", 0)
        run = lambda config: seen.append(config)  # noqa: E731 - the launcher is handed the candidate being timed
        assert tuning.choose(dev, "k", CANDIDATES, run, cache) == CANDIDATES[1]
        assert seen == [tuning.HEURISTIC] + CANDIDATES and len(timer.calls) == 4
        assert tuning.choose(dev, "k", CANDIDATES, run, cache) == CANDIDATES[1]
        assert len(timer.calls) == 4                   # cached: no timing
        monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")   # the switch: heuristic config
        assert tuning.choose(dev, "k", CANDIDATES, run, cache) is None
    finally:
        tuning.set_timer(old)
    assert tuning.choose(torch.device("cpu"), "k", CANDIDATES, run, cache) is None


def test_heuristic_wins_is_cached_as_empty_config(pretend_cuda):
    cache = pretend_cuda
    old = tuning.set_timer(fake_timer([1.0, 2.0, 3.0, 4.0]))
    try:
        assert tuning.choose(torch.device("cuda", 0), "k", CANDIDATES, lambda config: None, cache) == {}
    finally:
        tuning.set_timer(old)
    assert json.loads(open(cache.path).read())["configs"] == {"k": {}}


def test_timing_runs_on_the_tensors_device(pretend_cuda):
    """do_bench records its events on the current device's stream: each candidate is timed with the tensors'
    device current (cuda:1 here), not whatever device was current before."""
    devices = []

    def timer(fn):
        devices.append(FakeCudaDevice.current)
        fn()
        return 1.0

    old = tuning.set_timer(timer)
    try:
        tuning.choose(torch.device("cuda", 1), "k", CANDIDATES, lambda config: None, pretend_cuda)
    finally:
        tuning.set_timer(old)
    assert devices == [torch.device("cuda", 1)] * (len(CANDIDATES) + 1)


def test_failed_tuning_is_remembered_not_retried(pretend_cuda):
    """Every candidate failing (compile errors): warned once, the heuristic, and no second sweep on the next call."""
    calls = []

    def run(config):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    old = tuning.set_timer(fake_timer([1.0] * 100))
    dev = torch.device("cuda", 0)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert tuning.choose(dev, "k", CANDIDATES, run, pretend_cuda) is None
            assert tuning.choose(dev, "k", CANDIDATES, run, pretend_cuda) is None
    finally:
        tuning.set_timer(old)
    assert len(calls) == len(CANDIDATES) + 1          # one sweep only
    assert len(w) == 1 and "PassManager::run failed" in str(w[0].message)
    assert "k" in pretend_cuda.failed and pretend_cuda.get("k") is None
    assert not os.path.exists(pretend_cuda.path)      # nothing written: a later process tries again


def test_out_of_memory_stops_the_sweep(pretend_cuda):
    calls = []

    def timer(fn):
        calls.append(1)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 244.00 MiB")

    old = tuning.set_timer(timer)
    try:
        with pytest.warns(RuntimeWarning, match="out of memory"):
            assert tuning.choose(torch.device("cuda", 0), "k", CANDIDATES, lambda config: None, pretend_cuda) is None
    finally:
        tuning.set_timer(old)
    assert len(calls) == 1 and "k" in pretend_cuda.failed


def test_cuda_fault_is_raised_not_swallowed(pretend_cuda):
    def run(config):
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

    old = tuning.set_timer(fake_timer([1.0] * 10))
    try:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            tuning.choose(torch.device("cuda", 0), "k", CANDIDATES, run, pretend_cuda)
    finally:
        tuning.set_timer(old)


@pytest.mark.parametrize("candidates", [tuning.DENSE_CANDIDATES, tuning.MULTILEVEL_CANDIDATES])
def test_candidates_are_distinct_kernels(candidates):
    """No two candidates compile the same kernel: num_stages is not tuned (the loops are while loops, which Triton
    does not pipeline; tests/test_jit_check.py checks that num_stages leaves the PTX unchanged), and the heuristic
    config is the empty config tried first, not a candidate."""
    assert all("num_stages" not in c for c in candidates)
    assert len({tuple(sorted(c.items())) for c in candidates}) == len(candidates)
    assert tuning.HEURISTIC == {} and tuning.HEURISTIC not in candidates


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter path runs on CPU only")
def test_interpreter_never_tunes(monkeypatch, tmp_path):
    """The interpreter path (this machine): launches run with their fixed configs; the timer is never called."""
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    timer = fake_timer([])
    old = tuning.set_timer(timer)
    try:
        x = torch.randn(300, requires_grad=True)
        focal_triton.sigmoid_focal_loss(x, (torch.rand(300) < 0.1).float(), reduction="sum").backward()
    finally:
        tuning.set_timer(old)
    assert timer.calls == [] and os.listdir(tmp_path) == []


def test_the_suite_never_writes_the_users_tuning_cache():
    """conftest.py: tuning off unless a test turns it on, and its cache in a directory of this session."""
    assert os.environ[tuning.AUTOTUNE_ENV] == "0" or not SUITE_TURNED_TUNING_OFF  # unless set before pytest ran
    cache_dir = os.environ[tuning.CACHE_DIR_ENV]
    assert os.path.basename(cache_dir).startswith("focal_triton_test_tune_")
    assert not tuning.cache_path("GPU", "3.8.0").startswith(os.path.expanduser("~/.cache"))


@pytest.mark.parametrize("cfg", [c for c in tuning.MULTILEVEL_CANDIDATES if c["num_warps"] == 4])
def test_every_multilevel_tile_candidate_is_correct(monkeypatch, cfg):
    """Each candidate tile shape, forced (on the interpreter here, compiled on a GPU), gives the reference's values
    and gradients."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    with tuning.use(cfg):
        check_multilevel(make_levels(layout="mix", c=20), make_labels(c=20))


def test_tune_command_without_cuda_exits_0(capsys, monkeypatch):
    """Without CUDA (made so here, also on a GPU machine) the command tunes nothing, says so and exits 0."""
    from focal_triton import tune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tune.main(["--batches", "1,16"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out and out.count("retinanet") == 6 and out.count("fcos") == 6
    assert "(16,056,000 logits)" in out          # RetinaNet, one COCO image
    assert tune.main(["--dry-run", "--detectors", "fcos", "--batches", "2", "--dtypes", "bfloat16"]) == 0
    assert capsys.readouterr().out.count("fcos") == 1


def test_progress_bar(capsys):
    from focal_triton.tune import Progress

    with Progress(3, "work") as bar:
        for i in range(3):
            bar.step(f"item {i}")
    err = capsys.readouterr().err
    assert "3/3" in err and "[" + "#" * 30 + "]" in err
