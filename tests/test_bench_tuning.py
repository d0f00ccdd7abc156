"""The autotuning cache (focal_triton.kernels.tuning) without a GPU: a fake timing function, temporary cache dirs."""
import json
import os
import stat
import warnings

import pytest
import torch
from test_multilevel_focal_loss import check_multilevel, make_labels, make_levels

import focal_triton
from focal_triton.kernels import tuning

CANDIDATES = [dict(BLOCK=512, num_warps=4, num_stages=1), dict(BLOCK=1024, num_warps=4, num_stages=2),
              dict(BLOCK=2048, num_warps=8, num_stages=1)]


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

    best, _ = tuning.tune(CANDIDATES, run, lambda fn: (fn(), 1.0)[1])
    assert best == CANDIDATES[0]                    # equal times: the first
    best, times = tuning.tune(CANDIDATES, run, fake_timer([2.0, 1.5]))
    assert best == CANDIDATES[1] and set(times) == {0, 1}
    assert tuning.tune(CANDIDATES, lambda cfg: 1 / 0, fake_timer([1.0] * 3)) == (None, {})


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


def test_choose_tunes_once_then_reads_the_cache(monkeypatch, tmp_path):
    """choose() on a (pretend) CUDA device: tunes with the timer on the first call, then reads the cache."""
    monkeypatch.setattr("focal_triton.kernels.launch.interpreter_enabled", lambda: False)
    cache = tuning.TuneCache(str(tmp_path / "t.json"), "GPU")
    timer = fake_timer([3.0, 1.0, 2.0])
    old = tuning.set_timer(timer)
    seen = []
    try:
        dev = torch.device("cuda", 0)
        run = lambda: seen.append(tuning.forced())  # noqa: E731 - the launcher sees the candidate being timed
        assert tuning.choose(dev, "k", CANDIDATES, run, cache) == CANDIDATES[1]
        assert seen == CANDIDATES and len(timer.calls) == 3
        assert tuning.choose(dev, "k", CANDIDATES, run, cache) == CANDIDATES[1]
        assert len(timer.calls) == 3                   # cached: no timing
        monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")   # the switch: heuristic config
        assert tuning.choose(dev, "k", CANDIDATES, run, cache) is None
    finally:
        tuning.set_timer(old)
    assert tuning.choose(torch.device("cpu"), "k", CANDIDATES, run, cache) is None


def test_interpreter_never_tunes(monkeypatch, tmp_path):
    """The interpreter path (this machine): launches run with their fixed configs; the timer is never called."""
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    timer = fake_timer([])
    old = tuning.set_timer(timer)
    try:
        x = torch.randn(300, requires_grad=True)
        focal_triton.sigmoid_focal_loss(x, (torch.rand(300) < 0.1).float(), reduction="sum").backward()
    finally:
        tuning.set_timer(old)
    assert timer.calls == [] and os.listdir(tmp_path) == []


@pytest.mark.parametrize("cfg", [c for c in tuning.MULTILEVEL_CANDIDATES if c["num_stages"] == 1 and
                                 c["num_warps"] == 4])
def test_every_multilevel_tile_candidate_is_correct(monkeypatch, cfg):
    """Each candidate tile shape, forced on the interpreter, gives the reference's values and gradients."""
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    with tuning.use(cfg):
        check_multilevel(make_levels(layout="mix", c=20), make_labels(c=20))


def test_tune_command_without_cuda_exits_0(capsys):
    from focal_triton import tune

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
