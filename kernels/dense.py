"""Sigmoid focal loss on a dense flat range of elements: forward (elementwise or reduced) and backward kernels.

Layout: logits, targets, loss and gradient are read and written as one flat range of `n` elements in storage
order; the caller guarantees that all of them share the same dense strides. Bytes per element moved by design:
forward "none": read x, read t, write loss; forward sum/mean: read x, read t (plus 4-8 bytes per program);
backward: read x, read t, write dx (plus the upstream gradient when it is not a scalar).
"""
import torch
import triton
import triton.language as tl

from ..losses import FL, LossSpec
from . import tuning
from .launch import PARTIAL_SUM_BLOCK, config_for, device_guard, load_before_launch, needs_int64, persistent_grid
from .math import fast_math, family_loss_and_grad, power_key, short_log, spec_power, triton_compute_dtype
from .tuning import DENSE_CANDIDATES, make_key


@triton.jit
def _tile_offsets(tile, BLOCK: tl.constexpr, INT64: tl.constexpr):
    if INT64:
        tile = tl.cast(tile, tl.int64)
    return tile * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _load_tile(ptr, tile, n, MASKED: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INT64: tl.constexpr,
               BLOCK: tl.constexpr, WORDS: tl.constexpr = False):
    """Elements tile * BLOCK .. + BLOCK, in COMPUTE_DTYPE. Full tiles load
    without a mask, so the compiler emits 128-bit loads for any n; only the tail is masked. With WORDS (the launcher
    checked that bf16 inputs are 4-byte aligned), bf16 full tiles are read as int32 words of two elements and
    unpacked by bit operations (the compiler's bf16 -> float32 path moves each half through a 16-bit register
    first: twice the instructions)."""
    if MASKED:
        offs = _tile_offsets(tile, BLOCK, INT64)
        return tl.load(ptr + offs, mask=offs < n, other=0.0).to(COMPUTE_DTYPE)
    elif WORDS and (ptr.dtype.element_ty == tl.bfloat16):
        w = tl.load(ptr.to(tl.pointer_type(tl.int32)) + _tile_offsets(tile, BLOCK // 2, INT64))
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
        return tl.reshape(tl.join(lo, hi), [BLOCK]).to(COMPUTE_DTYPE)
    else:
        return tl.load(ptr + _tile_offsets(tile, BLOCK, INT64)).to(COMPUTE_DTYPE)


@triton.jit
def _store_tile(ptr, tile, n, value, MASKED: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    offs = _tile_offsets(tile, BLOCK, INT64)
    value = value.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, value, mask=offs < n)
    else:
        tl.store(ptr + offs, value)


@triton.jit
def _tile_loss_and_grad(x_ptr, t_ptr, tile, n, c0, c1, gamma, beta, MASKED: tl.constexpr,
                        LOSS_KIND: tl.constexpr, GAMMA: tl.constexpr, FAST: tl.constexpr,
                        COMPUTE_DTYPE: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
                        WORDS: tl.constexpr, SHORT: tl.constexpr = False, UNWEIGHTED: tl.constexpr = False):
    """Read one tile of logits and targets (each once) and return (loss, dloss/dx, target) in COMPUTE_DTYPE; the
    target is t for FL / FL*, the soft score y for QFL and q for VFL."""
    x = _load_tile(x_ptr, tile, n, MASKED, COMPUTE_DTYPE, INT64, BLOCK, WORDS)
    t = _load_tile(t_ptr, tile, n, MASKED, COMPUTE_DTYPE, INT64, BLOCK, WORDS)
    loss, grad = family_loss_and_grad(x, t, t, c0, c1, gamma, beta, LOSS_KIND, GAMMA, FAST, SHORT, UNWEIGHTED)
    return loss, grad, t


@triton.jit
def _fwd_tile(x_ptr, t_ptr, out_ptr, n, tile, acc0, acc1, c0, c1, gamma, beta,
              MASKED: tl.constexpr, REDUCE: tl.constexpr, LOSS_KIND: tl.constexpr, GAMMA: tl.constexpr,
              FAST: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
              WORDS: tl.constexpr):
    """REDUCE: FL adds its unweighted loss m ce times (1 - t) to acc0 and times t to acc1 (the sum is
    c0 acc0 + c1 acc1: alpha_t = c0 (1 - t) + c1 t taken out of the sum); the other kinds add their loss to acc0."""
    weight_sums = REDUCE and (LOSS_KIND == 0)
    loss, _, t = _tile_loss_and_grad(x_ptr, t_ptr, tile, n, c0, c1, gamma, beta, MASKED, LOSS_KIND, GAMMA, FAST,
                                     COMPUTE_DTYPE, INT64, BLOCK, WORDS, False, weight_sums)
    if REDUCE:
        if MASKED:
            loss = tl.where(_tile_offsets(tile, BLOCK, INT64) < n, loss, 0.0)
        if weight_sums:
            acc0 += loss * (1.0 - t)
            acc1 += loss * t
        else:
            acc0 += loss
    else:
        _store_tile(out_ptr, tile, n, loss, MASKED, INT64, BLOCK)
    return acc0, acc1


# Integer arguments are not specialized by the JIT (an argument equal to 1 would become a Python int constant,
# on which `n.to(...)` does not compile; multiples of 16 would compile a variant of their own): the JIT compiles
# what the ahead-of-time report checks, with n as i32 (i64 above 2**31 - 1).
@triton.jit(do_not_specialize=["n"])
def sigmoid_focal_fwd_kernel(
    x_ptr, t_ptr, out_ptr, n, c0, c1, gamma, beta,
    REDUCE: tl.constexpr, LOSS_KIND: tl.constexpr, GAMMA: tl.constexpr, FAST: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr, WORDS: tl.constexpr,
):
    """Persistent grid-stride loop over the full tiles of BLOCK elements, then the masked tail tile (if any) on
    program num_full % nprog. (Loops are while loops: triton 3.6's interpreter cannot take tensor range() bounds.)

    REDUCE = False: out[i] = FL(x[i], t[i]) in out's dtype. REDUCE = True: out[pid] = sum of FL over the tiles of
    program pid, in loop order (a fixed assignment of tiles to programs: the partial sums never depend on timing);
    for FL as c0 sum((1 - t) u**gamma ce) + c1 sum(t u**gamma ce) (see _fwd_tile).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if INT64:
        pid = pid.to(tl.int64)
    num_full = n // BLOCK
    acc0 = tl.zeros([BLOCK], COMPUTE_DTYPE)
    acc1 = tl.zeros([BLOCK], COMPUTE_DTYPE)
    tile = pid
    # (tile + 1) * BLOCK <= n is tile < num_full with nothing kept across the loop: n is a kernel argument.
    while (tile + 1) * BLOCK <= n:  # tile loop: flat full
        acc0, acc1 = _fwd_tile(x_ptr, t_ptr, out_ptr, n, tile, acc0, acc1, c0, c1, gamma, beta,
                        False, REDUCE, LOSS_KIND, GAMMA, FAST, COMPUTE_DTYPE, INT64, BLOCK, WORDS)
        tile += nprog
    if (num_full * BLOCK < n) & (pid == num_full % nprog):
        acc0, acc1 = _fwd_tile(x_ptr, t_ptr, out_ptr, n, num_full, acc0, acc1, c0, c1, gamma, beta,
                        True, REDUCE, LOSS_KIND, GAMMA, FAST, COMPUTE_DTYPE, INT64, BLOCK, WORDS)
    if REDUCE:
        total = tl.sum(acc0, axis=0)
        if LOSS_KIND == 0:
            total = c0 * total + c1 * tl.sum(acc1, axis=0)
        tl.store(out_ptr + pid, total)


@triton.jit(do_not_specialize=["num_partials", "n"])
def sum_partials_kernel(partials_ptr, out_ptr, num_partials, n, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """One program: out = sum(partials) (divided by n for MEAN), in a fixed order, cast to out's dtype."""
    acc = tl.zeros([BLOCK], partials_ptr.dtype.element_ty)
    start = 0
    while start < num_partials:
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offs, mask=offs < num_partials, other=0.0)
        start += BLOCK
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total / n.to(partials_ptr.dtype.element_ty)
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


@triton.jit
def _bwd_tile(x_ptr, t_ptr, grad_out_ptr, grad_in_ptr, n, tile, g0, c0, c1, gamma, beta,
              MASKED: tl.constexpr, GRAD_SCALAR: tl.constexpr, LOSS_KIND: tl.constexpr, GAMMA: tl.constexpr,
              FAST: tl.constexpr, SHORT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INT64: tl.constexpr,
              BLOCK: tl.constexpr, WORDS: tl.constexpr):
    _, dfl, _ = _tile_loss_and_grad(x_ptr, t_ptr, tile, n, c0, c1, gamma, beta, MASKED, LOSS_KIND, GAMMA, FAST,
                                    COMPUTE_DTYPE, INT64, BLOCK, WORDS, SHORT)
    if GRAD_SCALAR:
        if (LOSS_KIND == 0) and FAST:
            grad = dfl  # the caller folded g0 into c0 and c1 (FL's gradient is linear in alpha_t)
        else:
            grad = g0 * dfl
    else:
        grad = _load_tile(grad_out_ptr, tile, n, MASKED, COMPUTE_DTYPE, INT64, BLOCK) * dfl
    _store_tile(grad_in_ptr, tile, n, grad, MASKED, INT64, BLOCK)


@triton.jit(do_not_specialize=["n"])
def sigmoid_focal_bwd_kernel(
    x_ptr, t_ptr, grad_out_ptr, grad_in_ptr, n, c0, c1, gamma, beta,
    GRAD_SCALAR: tl.constexpr, MEAN: tl.constexpr, LOSS_KIND: tl.constexpr, GAMMA: tl.constexpr,
    FAST: tl.constexpr, SHORT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr,
    WORDS: tl.constexpr,
):
    """dx[i] = g * dFL/dx(x[i], t[i]), g = grad_out[0] (GRAD_SCALAR; divided by n for MEAN) or grad_out[i].

    Same tile loop as the forward. The loss is recomputed from x and t (the forward saved nothing of input size);
    the upstream scalar is read on the device, never on the host.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if INT64:
        pid = pid.to(tl.int64)
    g0 = 1.0
    if GRAD_SCALAR:
        g0 = tl.load(grad_out_ptr).to(COMPUTE_DTYPE)
        if MEAN:
            g0 = g0 / n.to(COMPUTE_DTYPE)
    if GRAD_SCALAR and (LOSS_KIND == 0) and FAST:
        # float32 compute: g0 folded into alpha_t's two weights (float64 keeps c1 - c0 exact: see math.py)
        c0 = g0 * c0
        c1 = g0 * c1
    num_full = n // BLOCK
    tile = pid
    while (tile + 1) * BLOCK <= n:  # tile loop: flat full
        _bwd_tile(x_ptr, t_ptr, grad_out_ptr, grad_in_ptr, n, tile, g0, c0, c1, gamma, beta,
                  False, GRAD_SCALAR, LOSS_KIND, GAMMA, FAST, SHORT, COMPUTE_DTYPE, INT64, BLOCK, WORDS)
        tile += nprog
    if (num_full * BLOCK < n) & (pid == num_full % nprog):
        _bwd_tile(x_ptr, t_ptr, grad_out_ptr, grad_in_ptr, n, num_full, g0, c0, c1, gamma, beta,
                  True, GRAD_SCALAR, LOSS_KIND, GAMMA, FAST, SHORT, COMPUTE_DTYPE, INT64, BLOCK, WORDS)


# ---------------------------------------------------------------------------------------------------------------
# Host side: the constexprs and the tuning key of one launch (shared with the ahead-of-time check, which compiles
# exactly what the library launches), and the launchers.

def forward_constexprs(x_dtype, reduce: bool, power: int, int64: bool, block: int, loss_kind: int = FL,
                       words: bool = True, gpu: bool = None) -> dict:
    """words: `words_aligned` of the launch (True for the ahead-of-time check, which compiles aligned pointers);
    gpu: `fast_math`'s (True for the ahead-of-time check)."""
    return dict(REDUCE=reduce, LOSS_KIND=loss_kind, GAMMA=power, FAST=fast_math(x_dtype, gpu),
                COMPUTE_DTYPE=triton_compute_dtype(x_dtype), INT64=int64, BLOCK=block, WORDS=words)


def backward_constexprs(x_dtype, grad_scalar: bool, mean: bool, power: int, int64: bool, block: int,
                        loss_kind: int = FL, words: bool = True, gpu: bool = None) -> dict:
    return dict(GRAD_SCALAR=grad_scalar, MEAN=mean, LOSS_KIND=loss_kind, GAMMA=power, FAST=fast_math(x_dtype, gpu),
                SHORT=short_log(x_dtype, True), COMPUTE_DTYPE=triton_compute_dtype(x_dtype), INT64=int64,
                BLOCK=block, WORDS=words)


def words_aligned(*tensors) -> bool:
    """WORDS: whether the bf16 ones of the kernel's inputs start on a 4-byte boundary, so that full tiles (BLOCK
    even) can read them as int32 words of two elements; an odd-element view (x[1:]) takes the compiler's 16-bit
    path instead."""
    return all(v.data_ptr() % 4 == 0 for v in tensors if v.dtype == torch.bfloat16)


def tuning_key(launcher: str, x: torch.Tensor, t: torch.Tensor, spec: LossSpec, mode: str) -> str:
    """The tuning key of a dense launch (tuning.py): size bucket, dtypes, mode (the reduction, or the upstream
    gradient's kind), the loss kind beyond FL and the exponent specialization (GAMMA)."""
    suffix = f" kind={int(spec.kind)}" if spec.kind != FL else ""
    return make_key(launcher, x.numel(), 0, 0, x.dtype, f"{mode} t={t.dtype}{suffix}{power_key(spec_power(spec))}")


def forward(x: torch.Tensor, t: torch.Tensor, spec: LossSpec, reduction: str, out_dtype: torch.dtype = None):
    """Loss of dense x, t (same strides, n > 0) for `spec` (losses.LossSpec; its smoothing is 0 here):
    elementwise in x's layout for "none", else a 0-d tensor; in out_dtype (x's dtype by default; float32 under
    autocast). One fused kernel, plus for sum/mean one single-program kernel over the per-program partial sums;
    on CUDA under the tuned config of `tuning_key` (tuning.py)."""
    return tuning.run_tuned(x.device, lambda: tuning_key("sigmoid_focal_fwd", x, t, spec, reduction),
                            DENSE_CANDIDATES, lambda config: _forward(x, t, spec, reduction, out_dtype, config))


def _forward(x, t, spec, reduction, out_dtype, config):
    n = x.numel()
    cfg = config_for(x.device, x.element_size(), config)
    reduce = reduction != "none"
    constexprs = forward_constexprs(x.dtype, reduce, spec_power(spec), needs_int64(n, cfg.block), cfg.block,
                                    spec.kind, words_aligned(x, t))
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # For a reduction, an empty stand-in for the partial sums sizes the grid (only its type and alignment matter),
    # then the real buffer gets one float per program.
    out_dtype = out_dtype or x.dtype
    out = torch.empty(0, dtype=acc_dtype, device=x.device) if reduce else torch.empty_like(x, dtype=out_dtype)
    args = [x, t, out, n, spec.c0, spec.c1, spec.gamma, spec.beta]
    with device_guard(x.device):
        grid = persistent_grid(sigmoid_focal_fwd_kernel, args, constexprs, cfg, n, x.device)
        if reduce:
            args[2] = torch.empty(grid, dtype=acc_dtype, device=x.device)
        sigmoid_focal_fwd_kernel[(grid,)](*args, **cfg.options(), **constexprs)
        if not reduce:
            return args[2]
        result = torch.empty((), dtype=out_dtype, device=x.device)
        final = dict(MEAN=reduction == "mean", BLOCK=PARTIAL_SUM_BLOCK)
        load_before_launch(sum_partials_kernel, (1,), (args[2], result, grid, n), {}, final, x.device)
        sum_partials_kernel[(1,)](args[2], result, grid, n, **final)
    return result


def backward(grad_out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, spec: LossSpec,
             reduction: str) -> torch.Tensor:
    """Gradient w.r.t. x in x's layout and dtype. grad_out (in the loss's dtype, which may be float32 for 16-bit
    x): 0-d (mean/sum, or an expanded scalar for "none", passed as its one element) or dense with x's strides."""
    mode = "scalar" if grad_out.dim() == 0 else "tensor"
    return tuning.run_tuned(x.device, lambda: tuning_key("sigmoid_focal_bwd", x, t, spec, mode), DENSE_CANDIDATES,
                            lambda config: _backward(grad_out, x, t, spec, reduction, config))


def _backward(grad_out, x, t, spec, reduction, config):
    n = x.numel()
    cfg = config_for(x.device, x.element_size(), config)
    grad_in = torch.empty_like(x)
    constexprs = backward_constexprs(x.dtype, grad_out.dim() == 0, reduction == "mean", spec_power(spec),
                                     needs_int64(n, cfg.block), cfg.block, spec.kind, words_aligned(x, t))
    args = (x, t, grad_out, grad_in, n, spec.c0, spec.c1, spec.gamma, spec.beta)
    with device_guard(x.device):
        grid = persistent_grid(sigmoid_focal_bwd_kernel, args, constexprs, cfg, n, x.device)
        sigmoid_focal_bwd_kernel[(grid,)](*args, **cfg.options(), **constexprs)
    return grad_in
