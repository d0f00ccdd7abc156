"""Error budget of the kernels' float32 formulas under the documented worst-case errors of the GPU's primitives.

The interpreter computes exact float32 (numpy), so the approximate instructions the compiled kernels use cannot be
observed there. This test runs the kernels' own source in the interpreter with the float32 formulas (FAST) in
float64 arithmetic, and perturbs the result of every primitive by its worst-case relative error (bounds below):

    ex2.approx.ftz.f32 (tl.exp2)     2**-22.5  PTX ISA, `ex2`: "maximum relative error 2^-22.5" for the fraction
                                               part (the integer part is an exact scaling); .ftz: results below
                                               2**-126 are flushed to 0, which is modeled too.
    rsqrt.approx.ftz.f32 (tl.rsqrt)  2**-22.9  PTX ISA, `rsqrt`: "maximum relative error 2^-22.9 over the full range"
                                               (not used by the float32 kernels now; listed for completeness).
    div.full.f32 (a / b in float32)  2**-22    PTX ISA, `div`: div.full.f32 has a "maximum ulp error of 2 across the
                                               full range of inputs" (2 ulp = 2**-22 relative).
    rcp.approx.ftz.f32 (inline PTX)  2**-23    PTX ISA, `rcp`: "maximum ulp error is 1": the sigmoid's 1 / (1 + e) on
                                               a GPU (math.py, FAST = 2). The interpreter runs FAST = 1, where that
                                               reciprocal is a division: it is perturbed by div.full's larger bound.
    libdevice log2f (tl.log2)        2**-23    CUDA Math API, log2f: maximum error 1 ulp.
    add, sub, mul, fma in float32    2**-24    IEEE 754 round to nearest: half an ulp (an FMA rounds once: counting
                                               its product and sum as one rounding, as here, is what the GPU does).
    conversions                      exact     bf16 / fp16 -> float32 widening is exact; the final rounding to the
                                               output dtype is the one of the result, in the suite's tolerance.

(The PTX ISA bounds are quoted from the PTX ISA reference, sections on ex2, rsqrt, rcp and div of the floating-point
instructions, as this project's authors know them; check them against the PTX ISA of the CUDA version in use.)

"Adversarially": each primitive's error enters the result linearly to first order, so per output element the worst
case is reached with every primitive's error of the sign of its sensitivity. The test measures each primitive
call's sensitivity (one run per call site with only that site perturbed), then runs with all sites at their worst
sign and at the opposite sign, and asserts that both runs stay within the suite's float32 tolerance of the
independent float64 references: relative 2e-5 per element for hard targets (easy negatives down to x = -20 and
saturated logits included; elements whose value underflows float32 must underflow, not grow), the suite's
rtol 2e-5 / atol 1e-6 for soft targets (whose gradient crosses 0 where p = t), and for gradients rounded to 16 bits
(the short log1p: degree 4, and bf16's degree 3 of the hard-target FL) 2**-11, below half an ulp of fp16 (and a
quarter of bf16's), so that the rounded result is within one ulp. The limits at
+-inf stay what they are and NaN still propagates.
"""
import numpy as np
import pytest
import torch
from reference import focal_grad_ref, focal_loss_ref
from reference_multilevel import multilevel_value_and_grads

from focal_triton.kernels import launch
from focal_triton.kernels import multilevel as mf
from focal_triton.kernels import dense as sf
from focal_triton.losses import FL, encode

pytestmark = pytest.mark.skipif(not launch.interpreter_enabled(),
                                reason="evaluates the kernels' formulas in Triton's interpreter (TRITON_INTERPRET=1)")

BOUNDS = {"exp2": 2.0**-22.5, "rsqrt": 2.0**-22.9, "div": 2.0**-22, "log2": 2.0**-23, "arith": 2.0**-24}
FLT_MIN = 2.0**-126
RTOL32 = 2e-5
RTOL16 = 2.0**-11


class Perturbation:
    """Counts the perturbed primitive calls of one launch (their order is the kernel's program order) and applies
    signs[i] * BOUNDS[kind] to call i's result (signs: None = no perturbation; an entry is a number or an array of
    the call's result shape)."""

    def __init__(self):
        self.signs = None
        self.calls = []

    def start(self, signs=None):
        self.signs, self.calls = signs, []

    def apply(self, kind, data):
        i = len(self.calls)
        self.calls.append((kind, np.shape(data)))
        if kind == "exp2":
            data = np.where(np.abs(data) < FLT_MIN, 0.0, data)  # ex2.approx.ftz flushes subnormal results
        if self.signs is None or data.dtype != np.float64:
            return data
        return data * (1.0 + self.signs[i] * BOUNDS[kind])


@pytest.fixture
def perturbation(monkeypatch):
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    p = Perturbation()

    def wrap(name, kind):
        original = getattr(InterpreterBuilder, name)

        def perturbed(self, *args):
            h = original(self, *args)
            return TensorHandle(p.apply(kind, h.data), h.dtype.scalar)

        monkeypatch.setattr(InterpreterBuilder, name, perturbed)

    for name, kind in (("create_exp2", "exp2"), ("create_rsqrt", "rsqrt"), ("create_fdiv", "div"),
                       ("create_precise_divf", "div"), ("create_log2", "log2"), ("create_fadd", "arith"),
                       ("create_fsub", "arith"), ("create_fmul", "arith"), ("create_fma", "arith")):
        wrap(name, kind)
    # The float32 formulas, evaluated in float64 (the inputs below are float32 values): FAST with float64 compute.
    monkeypatch.setattr(sf, "fast_math", lambda dtype, gpu=None: 1)
    monkeypatch.setattr(mf, "fast_math", lambda dtype, gpu=None: 1)
    return p


def extremes(run, p, to_tile):
    """(unperturbed, worst, opposite) outputs of run() (a float64 numpy array): sensitivities per call site, then
    every site at the sign of its sensitivity and at the opposite one. to_tile maps an output-shaped array to the
    shape of the kernel's per-element values (one tile covers every element)."""
    p.start()
    base = run()
    calls = list(p.calls)
    tile_shape = to_tile(base).shape
    signs = []
    for i, (_, shape) in enumerate(calls):
        one = [0.0] * len(calls)
        one[i] = 1.0
        p.start(one)
        with np.errstate(invalid="ignore"):  # inf - inf at the infinite logits: no sensitivity there
            delta = run() - base
        if tuple(shape) == tuple(tile_shape):
            signs.append(np.sign(np.nan_to_num(to_tile(delta))))
        else:  # a scalar or per-row value: one sign for all (both are tried below)
            signs.append(1.0)
    assert len(calls) > 10  # the formulas' primitives were reached
    p.start(signs)
    worst = run()
    p.start([-s for s in signs])
    opposite = run()
    p.start()
    return base, worst, opposite


def check(got, base, ref, finite, rtol, what):
    """Finite logits: per element against the reference (check_relative). Infinite and NaN logits: the limits of the
    unperturbed formula (0 and inf exactly, finite values to rtol) and NaN where it gives NaN."""
    check_relative(got[finite], ref[finite], rtol, what)
    check_relative(got[~finite], base[~finite], rtol, what + " (+-inf, NaN logits)")


def check_relative(got, ref, rtol, what):
    """Per element: NaN where the reference is NaN; the reference's infinities and zeros exactly; relative error
    <= rtol where |ref| is a normal float32; |got| < 2 * FLT_MIN where the reference underflows float32."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan), f"{what}: NaN pattern differs"
    special = ~nan & (np.isinf(ref) | (ref == 0))
    assert np.array_equal(got[special], ref[special]), f"{what}: limits differ"
    normal = ~nan & ~special & (np.abs(ref) >= FLT_MIN)
    rel = np.abs(got[normal] - ref[normal]) / np.abs(ref[normal])
    assert rel.size == 0 or rel.max() <= rtol, f"{what}: relative error {rel.max():.3g} > {rtol:.3g}"
    tiny = ~nan & ~special & ~normal
    assert np.all(np.abs(got[tiny]) < 2 * FLT_MIN), f"{what}: an underflowing value grew"


def logit_grid():
    """Logits from -20 to 20 (every step of 1/16 and a few irregular ones), saturated ones, +-inf, NaN."""
    x = np.concatenate([np.arange(-20, 20, 1 / 16), [1e-3, -1e-3, 0.37, -7.77, 13.3],
                        [25, -25, 30, -30, 50, -50, 88, -88, 100, -100, np.inf, -np.inf, np.nan]])
    return torch.tensor(x, dtype=torch.float32).double()


@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_dense_formula_hard_and_soft_targets(perturbation, monkeypatch, gamma):
    """Dense kernels (targets in [0, 1]): loss and gradient with hard targets to 2e-5 per element relative, with
    soft targets within the suite's float32 tolerance; the gradient rounded to 16 bits (short log1p) to 2**-11."""
    x = logit_grid()
    n = 1 << (2 * x.numel()).bit_length()  # one tile of n elements: hard targets 0 and 1, then soft ones
    xs = torch.cat([x, x, x.repeat(n // x.numel())])[:n]
    t = torch.full((n,), 0.3, dtype=torch.float64)
    t[: x.numel()], t[x.numel(): 2 * x.numel()] = 0.0, 1.0
    monkeypatch.setattr(launch, "INTERPRETER_CONFIG", launch.ElementwiseConfig(block=n, num_warps=1,
                                                                              max_programs=1))
    hard, finite = (t != 0.3).numpy(), torch.isfinite(xs).numpy()
    ref = focal_loss_ref(xs, t, 0.25, gamma).numpy()
    ref_grad = focal_grad_ref(xs, t, 0.25, gamma).numpy()
    flat = lambda a: a  # noqa: E731  (the dense tile is the flat range itself)
    spec = encode(FL, alpha=0.25, gamma=gamma)
    loss = lambda: sf.forward(xs, t, spec, "none").numpy()  # noqa: E731
    grad = lambda: sf.backward(torch.tensor(1.0, dtype=torch.float64), xs, t, spec, "sum").numpy()  # noqa: E731
    for what, run, r in (("loss", loss, ref), ("grad", grad, ref_grad)):
        base, *runs = extremes(run, perturbation, flat)
        for got in (base, *runs):
            check(got[hard], base[hard], r[hard], finite[hard], RTOL32, f"{what} gamma={gamma}")
            soft = ~hard & finite
            np.testing.assert_allclose(got[soft], r[soft], rtol=2e-5, atol=1e-6, err_msg=f"soft {what}")
    for short in (1,):  # the dense kernels' 16-bit gradients: degree 4 (soft targets; math.short_log)
        monkeypatch.setattr(sf, "short_log", lambda dtype, backward, hard=False: short if backward else 0)
        base, *runs = extremes(grad, perturbation, flat)
        for got in (base, *runs):
            check(got[hard], base[hard], ref_grad[hard], finite[hard], RTOL16, f"short={short} grad gamma={gamma}")


@pytest.mark.parametrize("gamma,smoothing", [(2.0, 0.0), (1.5, 0.0), (2.0, 0.1)])
def test_class_index_formula(perturbation, monkeypatch, gamma, smoothing):
    """The class-index kernel's hard-target form (z = +-x): loss and gradient (scalar upstream) to 2e-5 per
    element relative, the 16-bit gradient to 2**-11, ignored anchors 0 whatever their logits."""
    x = logit_grid()
    classes = 16
    hw = 1 << (-(-x.numel() // classes) - 1).bit_length()
    grid = torch.full((hw * classes,), -3.0, dtype=torch.float64)
    grid[: x.numel()] = x
    level = grid.view(1, classes, hw, 1).contiguous()  # NCHW: class c of position p at c * hw + p
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (1, hw), generator=g)
    labels[0, ::5] = -1  # background
    labels[0, 3::17] = -2  # ignored
    monkeypatch.setattr(mf, "INTERPRETER_TILE", (hw, classes))  # one tile: every element in one op
    monkeypatch.setattr(mf, "INTERPRETER_PROGRAMS_PER_IMAGE", 1)
    kw = dict(alpha=0.25, gamma=gamma, label_smoothing=smoothing)
    ref = multilevel_value_and_grads([level], labels, 1, reduction="none", **kw)[0][0].detach().numpy()
    ref_grad = multilevel_value_and_grads([level], labels, 1, **kw)[1][0].numpy()
    finite = torch.isfinite(level).numpy()
    to_tile = lambda a: a.reshape(classes, hw).T  # noqa: E731  (tile [positions, classes])
    spec = encode(FL, alpha=0.25, gamma=gamma, smoothing=smoothing)
    loss = lambda: mf.forward([level], labels, None, None, None, spec, -2, 1, "none")[0].numpy()  # noqa: E731
    one, scale = torch.tensor(1.0, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    grad = lambda: mf.backward([one], [level], labels, None, None, None, spec, -2, 1,  # noqa: E731
                               scale=scale)[0].numpy()
    for what, run, r in (("loss", loss, ref), ("grad", grad, ref_grad)):
        base, *runs = extremes(run, perturbation, to_tile)
        for got in (base, *runs):
            check(got, base, r, finite, RTOL32, f"{what} gamma={gamma} s={smoothing}")
    for short in ((1, 2) if smoothing == 0 else (1,)):  # degree 4; degree 3 for bf16 without smoothing (short_log)
        monkeypatch.setattr(mf, "short_log", lambda dtype, backward, hard=False: short if backward else 0)
        base, *runs = extremes(grad, perturbation, to_tile)
        for got in (base, *runs):
            check(got, base, ref_grad, finite, RTOL16, f"short={short} grad gamma={gamma} s={smoothing}")
