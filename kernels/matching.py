"""Focal matching cost of the Hungarian matchers of DETR-style detectors: one kernel, no reduction, no gradient.

    cost[q, g] = alpha (1 - p)**gamma (-log p) - (1 - alpha) p**gamma (-log(1 - p)),   p = sigmoid(x[q, labels[g]])

(the cost of RT-DETR, D-FINE, DEIM, Deformable / Conditional / DAB-DETR in Hugging Face transformers, there written
with log(p + 1e-8)). With a = |x|, r = sigmoid(a), er = sigmoid(-a), L = log(1 + exp(-a)) (math.py):
    -log p, -log(1 - p) = L, L + a   for x >= 0   (L + a, L for x < 0)
    p, 1 - p            = r, er      for x >= 0   (er, r for x < 0)
so with near = er**gamma L (the term whose log is L) and far = r**gamma (L + a),
    cost = c_far far + c_near near,   (c_far, c_near) = (-(1 - alpha), alpha) for x >= 0, (alpha, -(1 - alpha)) else,
no log of a rounded probability and no cancellation inside a term: finite for every finite logit; at x = +-inf far
is inf and the cost its limit (-inf or +inf; 0 * inf is taken as 0 where the coefficient is 0, alpha = 1 or 0).
Powers: GAMMA >= 0 an integer gamma by multiplication (math.modulation), else the runtime gamma as
exp2(-gamma log2(e) softplus) of the softplus above (r**gamma = exp(-gamma L), er**gamma = exp(-gamma (L + a))).

Layout. logits (N, C) with strides (stride_q, stride_c) (any 2-D view whose in-tile offsets fit in int32, read in
place; another is copied once), labels (G,) int32 / int64, cost (N, G) contiguous in the compute dtype (float32;
float64 for float64 logits). A tile is [BLOCK_Q queries, BLOCK_G targets]: the tile's labels are loaded once per
program, each output gathers its one logit x[q * stride_q + labels[g] * stride_c] (the (N, C) probabilities are
never formed). A label outside [0, C) (possible only with check_labels=False) reads class 0 and gives a NaN
column.

Grid (n_gt, P): program (gt, p) owns target tile gt and walks the query tiles p, p + P, ... (P from the persistent
grid of launch.max_programs, split over the target tiles). No reduction: the result does not depend on the grid.
Bytes by design per output: 4 (8) written; each logit read once per target of its class (from L1 / L2 after the
first), each label once per program. One config (BLOCK_Q x BLOCK_G, 4 warps), not tuned: the op is a small share
of a matcher's time (its linear_sum_assignment runs on the host).
"""
import torch
import triton
import triton.language as tl

from ..losses import INT32_MAX, compute_dtype
from .launch import ElementwiseConfig, compiled_path, device_guard, max_programs
from .math import _LOG2E, fast_math, log1p_exp, logistic_of_abs, modulation, power_constexpr, triton_compute_dtype

# Compiled path: 32 x 64 outputs per tile over 4 warps (16 per thread; float64 16 x 64, 8 per thread: at 16 ptxas
# spilled), checked without spills by the ahead-of-time report; interpreter: small tiles and 2 query programs per
# target tile, so that small test matrices take several tiles, loop iterations and masks.
GPU_NUM_WARPS = 4
INTERPRETER_TILE = (8, 16)
INTERPRETER_PROGRAMS = 2


def gpu_tile(x_dtype) -> tuple:
    """(BLOCK_Q, BLOCK_G) of the compiled path for logits of x_dtype."""
    return (16, 64) if x_dtype == torch.float64 else (32, 64)


@triton.jit
def _cost_tile(x_ptrs, out_ptrs, mask, col_ok, c_pos, c_neg, gamma,
               GAMMA: tl.constexpr, FAST: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Cost of one [BLOCK_Q, BLOCK_G] tile: x_ptrs the gathered logits, out_ptrs the costs, mask the outputs that
    exist, col_ok whether each target's label is valid (an invalid one points at class 0 and gives NaN)."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    a = tl.abs(x)
    e, r, er = logistic_of_abs(a, FAST)
    L = log1p_exp(e, r, er, FAST)
    La = L + a
    m_far, _ = modulation(r, L * -_LOG2E, r * er, gamma, GAMMA)      # r**gamma
    m_near, _ = modulation(er, La * -_LOG2E, r * er, gamma, GAMMA)   # er**gamma
    nonneg = x >= 0
    c_far = tl.where(nonneg, -c_neg, c_pos)
    c_near = tl.where(nonneg, c_pos, -c_neg)
    far = tl.where(c_far == 0.0, 0.0, c_far * (m_far * La))  # 0 * inf -> 0 at x = +-inf with alpha = 1 or 0
    cost = tl.where(col_ok[None, :], far + c_near * (m_near * L), float("nan"))
    tl.store(out_ptrs, cost.to(out_ptrs.dtype.element_ty), mask=mask)


# No integer argument is specialized by the JIT: G (the targets of a batch) changes every step, N and C with the
# model, and each new combination of sizes equal to 1 or divisible by 16 would compile a kernel of its own.
@triton.jit(do_not_specialize=["N", "G", "C", "stride_q", "stride_c"])
def focal_matching_cost_kernel(x_ptr, labels_ptr, out_ptr, N, G, C, stride_q, stride_c, c_pos, c_neg, gamma,
                               GAMMA: tl.constexpr, FAST: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                               BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr):
    """cost[q, g] for the target tile program_id(0) and the query tiles program_id(1) + k num_programs(1).

    The offsets inside a tile, i stride_q + labels[j] stride_c for the logits and i G + j for the cost, are the
    same for every query tile: computed once per program in int32 (the launcher keeps them below 2**31); each tile
    moves two 64-bit base pointers by a scalar, so an output's addresses cost one IMAD.WIDE each."""
    gt = tl.program_id(0)
    p = tl.program_id(1)
    nprog = tl.num_programs(1)
    i = tl.arange(0, BLOCK_Q)
    g_offs = gt * BLOCK_G + tl.arange(0, BLOCK_G)
    in_g = g_offs < G
    label = tl.load(labels_ptr + g_offs, mask=in_g, other=-1)
    col_ok = (label >= 0) & (label < C)
    x_offs = i[:, None] * stride_q + (tl.where(col_ok, label, 0).to(tl.int32) * stride_c)[None, :]
    out_offs = i[:, None] * G + g_offs[None, :]
    row0 = p * BLOCK_Q
    while row0 < N:  # tile loop: matching
        mask = (i < N - row0)[:, None] & in_g[None, :]
        _cost_tile(x_ptr + row0.to(tl.int64) * stride_q + x_offs, out_ptr + row0.to(tl.int64) * G + out_offs, mask,
                   col_ok, c_pos, c_neg, gamma, GAMMA, FAST, COMPUTE_DTYPE)
        row0 += nprog * BLOCK_Q


# ---------------------------------------------------------------------------------------------------------------
# Host side: the constexprs of one launch (shared with the ahead-of-time check) and the launcher.

def kernel_constexprs(x_dtype, power: int, tile, gpu: bool = None) -> dict:
    return dict(GAMMA=power, FAST=fast_math(x_dtype, gpu), COMPUTE_DTYPE=triton_compute_dtype(x_dtype),
                BLOCK_Q=tile[0], BLOCK_G=tile[1])


def forward(x: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """(N, G) cost of logits x (N, C), any strides, and labels (G,) (N, G > 0), in the compute dtype."""
    n, c = x.shape
    g = labels.shape[0]
    compiled = compiled_path(x.device)
    tile = gpu_tile(x.dtype) if compiled else INTERPRETER_TILE
    if tile[0] * x.stride(0) + c * x.stride(1) > INT32_MAX:
        x = x.contiguous()  # in-tile offsets in int32 (validation bounds C and G so that this suffices)
    num_warps = GPU_NUM_WARPS if compiled else 1
    constexprs = kernel_constexprs(x.dtype, power_constexpr(gamma), tile)
    out = torch.empty((n, g), dtype=compute_dtype(x.dtype), device=x.device)
    args = (x, labels, out, n, g, c, x.stride(0), x.stride(1), alpha, 1.0 - alpha, gamma)
    n_gt, n_qt = triton.cdiv(g, tile[1]), triton.cdiv(n, tile[0])
    with device_guard(x.device):
        if compiled:
            total = max_programs(focal_matching_cost_kernel, args, constexprs, ElementwiseConfig(0, num_warps),
                                 x.device)
        else:
            total = INTERPRETER_PROGRAMS * n_gt
        grid = (n_gt, max(1, min(n_qt, total // n_gt)))
        focal_matching_cost_kernel[grid](*args, num_warps=num_warps, **constexprs)
    return out
