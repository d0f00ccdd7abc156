"""focal_triton.global_normalizer under torch.distributed: the data-parallel training contract.

Without a process group, global_normalizer(t) is t as a float32 0-d tensor clamped at clamp_min. With one (gloo,
CPU, 2 processes started as subprocesses of this file), a tiny detector head wrapped in DistributedDataParallel,
each rank taking half of a global batch of 4 images, with

    loss = multilevel_focal_loss(levels, labels, A, normalizer=global_normalizer((labels >= 0).sum()))

gets, after DDP's gradient averaging, exactly the gradient of one process training on the whole batch with
normalizer = total positives, and the mean of the rank losses is that process's loss. A per-image normalizer
((N,) tensor) needs no all_reduce: DDP's average of the per-rank means of equal local batches is the mean over all
images. A negative control (each rank normalizing by its own positive count) must give a different gradient, so the
comparison is shown to be able to fail.

The ranks run on both backends (Triton kernels in the interpreter, and the pure-torch path) and pass their results
back through files; the single-process reference is computed by rank 0, in the same process and backend, before
it joins the process group.
"""
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import focal_triton

WORLD = 2
N_GLOBAL, N_LOCAL = 4, 2
A, C, FEAT = 3, 5, 4                      # anchors per position, classes, feature channels
HWS = [(6, 5), (3, 3)]                    # two FPN levels
LAYOUTS = [torch.contiguous_format, torch.channels_last]   # level 0 NCHW, level 1 channels_last
M = A * sum(h * w for h, w in HWS)        # anchors per image
# Probability of a positive anchor per image: rank 0's images have many more positives than rank 1's (so a rank's
# local count is far from the global mean), and image 2 has none (per-image normalizer clamped at 1).
POS_RATE = [0.25, 0.1, 0.0, 0.03]
TOL = dict(rtol=1e-5, atol=1e-7)
# Hang guard: a launch (2 ranks) that has not finished by then is killed and fails the test. Normal: a few seconds.
TIMEOUT_S = 180
# Loss variants each rank computes in one process group: "global" (global_normalizer of the local positive count),
# "per_image" (an (N_local,) normalizer), "local" (negative control: the local count, no all_reduce).
VARIANTS = ("global", "per_image", "local")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# 1. No process group: the identity (as float32, clamped).

@pytest.fixture
def no_process_group():
    assert not (dist.is_available() and dist.is_initialized()), "a process group is initialized in the test process"


@pytest.mark.parametrize("value, clamp_min, expected", [
    (torch.tensor(7), 1.0, 7.0),                                  # int64 0-d, what (labels >= 0).sum() returns
    (torch.tensor([7]), 1.0, 7.0),                                # int64 (1,)
    (torch.tensor(0), 1.0, 1.0),                                  # no positives: clamped
    (torch.tensor([0]), 1.0, 1.0),
    (torch.tensor(2.5), 1.0, 2.5),                                # float32 0-d
    (torch.tensor([2.5], dtype=torch.float64), 1.0, 2.5),         # float64 (1,)
    (torch.tensor(0.25), 1.0, 1.0),
    (torch.tensor(0.25, dtype=torch.float16), 0.0, 0.25),         # clamp_min below the value: untouched
    (torch.tensor(0, dtype=torch.int32), 0.5, 0.5),
    (7, 1.0, 7.0),                                                # Python numbers
    (0, 1.0, 1.0),
    (3.5, 1.0, 3.5),
    (0.0, 2.0, 2.0),
])
def test_identity_without_process_group(no_process_group, value, clamp_min, expected):
    before = value.clone() if isinstance(value, torch.Tensor) else None
    z = focal_triton.global_normalizer(value, clamp_min=clamp_min)
    assert isinstance(z, torch.Tensor)
    assert z.dtype == torch.float32 and z.shape == () and z.device == torch.device("cpu")
    assert not z.requires_grad
    assert z.item() == expected
    if before is not None:
        assert torch.equal(value, before) and value.dtype == before.dtype   # the input is left alone


def test_default_clamp_is_one(no_process_group):
    assert focal_triton.global_normalizer(torch.tensor(0)).item() == 1.0
    assert focal_triton.global_normalizer(0.5).item() == 1.0


def test_never_requires_grad(no_process_group):
    x = torch.tensor(3.0, requires_grad=True)
    z = focal_triton.global_normalizer(x * 2)
    assert not z.requires_grad and z.grad_fn is None and z.item() == 6.0
    z = focal_triton.global_normalizer(torch.tensor([0.5], requires_grad=True))
    assert not z.requires_grad and z.item() == 1.0


@pytest.mark.parametrize("shape", [(2,), (1, 2), (0,)])
def test_more_than_one_number_raises(no_process_group, shape):
    with pytest.raises(ValueError, match="local_count"):
        focal_triton.global_normalizer(torch.ones(shape, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------------
# 2. Two processes with DistributedDataParallel (the worker below runs as `python tests/test_distributed.py RANK DIR`).

class Head(torch.nn.Module):
    """A RetinaNet-like classification head shared over the levels: level l's output in layout LAYOUTS[l]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(FEAT, A * C, 3, padding=1)

    def forward(self, features):
        return [self.conv(f.contiguous(memory_format=fmt)).contiguous(memory_format=fmt)
                for f, fmt in zip(features, LAYOUTS)]


def make_head():
    torch.manual_seed(0)
    return Head()


def make_batch():
    """The global batch: per-level features (N_GLOBAL, FEAT, h, w) and labels (N_GLOBAL, M) in torchvision's
    convention (class in [0, C), -1 background, -2 ignored)."""
    g = torch.Generator().manual_seed(1234)
    features = [torch.randn(N_GLOBAL, FEAT, h, w, generator=g) for h, w in HWS]
    u = torch.rand(N_GLOBAL, M, generator=g)
    cls = torch.randint(0, C, (N_GLOBAL, M), generator=g)
    ignored = torch.rand(N_GLOBAL, M, generator=g) < 0.1
    labels = torch.where(ignored, -2, -1)
    labels = torch.where(u < torch.tensor(POS_RATE).unsqueeze(1), cls, labels)
    return features, labels


def loss_of(levels, labels, variant):
    """The loss a rank computes (and, with variant "global" or "per_image" on the whole batch without a process
    group, the single-process reference: there global_normalizer is the total positive count)."""
    if variant == "global":
        z = focal_triton.global_normalizer((labels >= 0).sum())
    elif variant == "per_image":
        z = (labels >= 0).sum(dim=1).clamp(min=1)
    elif variant == "local":
        z = (labels >= 0).sum().clamp(min=1)
    else:
        raise AssertionError(variant)
    return focal_triton.multilevel_focal_loss(levels, labels, A, normalizer=z), z


def _grads(module):
    return {name: p.grad.detach().clone() for name, p in module.named_parameters()}


def _worker(rank, out_dir):
    torch.set_num_threads(1)
    features, labels = make_batch()

    if rank == 0:
        # Single process, whole batch, no process group: normalizer = total positives (clamped at 1), or per image.
        assert not dist.is_initialized()
        ref = {}
        for variant in ("global", "per_image"):
            head = make_head()
            total = (labels >= 0).sum().clamp(min=1)
            z = total if variant == "global" else (labels >= 0).sum(dim=1).clamp(min=1)
            loss = focal_triton.multilevel_focal_loss(head(features), labels, A, normalizer=z)
            loss.backward()
            ref[variant] = dict(loss=loss.detach(), grads=_grads(head))
        torch.save(ref, out_dir / "reference.pt")

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_head())
        mine = slice(N_LOCAL * rank, N_LOCAL * (rank + 1))
        local_features = [f[mine] for f in features]
        local_labels = labels[mine]
        results = {}
        for variant in VARIANTS:
            model.zero_grad(set_to_none=True)
            levels = model(local_features)
            assert levels[0].is_contiguous() and levels[1].is_contiguous(memory_format=torch.channels_last)
            assert not levels[1].is_contiguous()
            count = (local_labels >= 0).sum()
            count_before = count.clone()
            loss, z = loss_of(levels, local_labels, variant)
            loss.backward()                                    # DDP all_reduces (averages) the parameter gradients
            assert torch.equal(count, count_before), "global_normalizer modified its input"
            results[variant] = dict(loss=loss.detach(), normalizer=z, grads=_grads(model.module))
        torch.save(dict(rank=rank, local_count=int((local_labels >= 0).sum()), results=results),
                   out_dir / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(tmp_path, backend):
    """Run the 2 ranks as subprocesses; fail with their stderr if one fails, kill both if they hang."""
    env = dict(os.environ)
    env.update(TRITON_INTERPRET="1",            # before the children import triton: Triton kernels run on CPU
               FOCAL_TRITON_BACKEND=backend, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p]))
    procs, logs = [], []
    for rank in range(WORLD):
        log = open(tmp_path / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(rank), str(tmp_path)],
                                      env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    failure = None
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                failure = "a rank failed"                   # the other one may be waiting in a collective
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {TIMEOUT_S} s"
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if failure is None and any(p.returncode != 0 for p in procs):
        failure = "a rank failed"
    if failure is not None:
        report = []
        for rank, (p, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            report.append(f"--- rank {rank} (exit code {p.returncode}) ---\n{log.read()[-6000:]}")
        for log in logs:
            log.close()
        pytest.fail(f"distributed run ({backend}): {failure}\n" + "\n".join(report), pytrace=False)
    for log in logs:
        log.close()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [r["rank"] for r in ranks] == list(range(WORLD))
    return torch.load(tmp_path / "reference.pt"), ranks


@pytest.fixture(scope="module", params=["triton", "torch"])
def distributed_run(request, tmp_path_factory):
    """One 2-process run per backend (all variants in one process group), shared by the tests below."""
    return _launch(tmp_path_factory.mktemp(f"ddp_{request.param}"), request.param)


def test_batch_is_meaningful():
    """The design the tests below rely on: positives on both ranks, in different numbers; an image without any."""
    _, labels = make_batch()
    per_image = (labels >= 0).sum(dim=1).tolist()
    per_rank = [sum(per_image[N_LOCAL * r:N_LOCAL * (r + 1)]) for r in range(WORLD)]
    assert per_image[2] == 0 and all(p > 0 for p in per_rank) and per_rank[0] >= 3 * per_rank[1]
    assert ((labels == -2).any(dim=1)).all() and ((labels == -1).any(dim=1)).all()


@pytest.mark.parametrize("variant", ["global", "per_image"])
def test_ddp_gradients_equal_single_process(distributed_run, variant):
    ref, ranks = distributed_run
    expected = ref[variant]["grads"]
    for r in ranks:
        got = r["results"][variant]["grads"]
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name].dtype == torch.float32
            torch.testing.assert_close(got[name], expected[name], **TOL,
                                       msg=lambda m: f"rank {r['rank']}, {variant}, grad of {name}: {m}")


@pytest.mark.parametrize("variant", ["global", "per_image"])
def test_mean_of_rank_losses_equals_single_process_loss(distributed_run, variant):
    ref, ranks = distributed_run
    losses = torch.stack([r["results"][variant]["loss"] for r in ranks])
    assert losses.dtype == torch.float32 and not torch.equal(losses[0], losses[1])
    torch.testing.assert_close(losses.mean(), ref[variant]["loss"], **TOL)


def test_global_normalizer_is_global_mean_count_on_every_rank(distributed_run):
    _, ranks = distributed_run
    _, labels = make_batch()
    total = int((labels >= 0).sum())
    assert all(r["local_count"] != total / WORLD for r in ranks)      # what makes the all_reduce necessary
    for r in ranks:
        z = r["results"]["global"]["normalizer"]
        assert z.dtype == torch.float32 and z.shape == () and not z.requires_grad
        assert z.item() == total / WORLD


def test_local_count_normalizer_gives_wrong_gradient(distributed_run):
    """Negative control: normalizing by each rank's own positive count (no all_reduce) does not reproduce the
    single-process gradient, so the comparison above can fail."""
    ref, ranks = distributed_run
    expected = ref["global"]["grads"]
    got = ranks[0]["results"]["local"]["grads"]
    for name in expected:
        with pytest.raises(AssertionError):
            torch.testing.assert_close(got[name], expected[name], **TOL)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), Path(sys.argv[2]))
