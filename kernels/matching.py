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

Layout. logits (N, C) with strides (stride_q, stride_c) (any 2-D view, read in place), labels (G,) int32 / int64,
cost (N, G) contiguous in the compute dtype (float32; float64 for float64 logits). A tile is [BLOCK_Q queries,
BLOCK_G targets]: the tile's labels are loaded once per program, each output gathers its one logit
x[q * stride_q + labels[g] * stride_c] (the (N, C) probabilities are never formed). Offsets are 64-bit (row and
column parts computed once per row and per column). A label outside [0, C) (possible only with check_labels=False)
reads nothing and gives a NaN column.

Grid (n_gt, P): program (gt, p) owns target tile gt and walks the query tiles p, p + P, ... (P from the persistent
grid of launch.max_programs, split over the target tiles). No reduction: the result does not depend on the grid.
Bytes by design per output: 4 (8) written; each logit read once per target of its class (from L1 / L2 after the
first), each label once per program. One config (BLOCK_Q x BLOCK_G, 4 warps), not tuned: the op is a small share
of a matcher's time (its linear_sum_assignment runs on the host).
"""
import torch
import triton
import triton.language as tl

from ..losses import compute_dtype
from .launch import ElementwiseConfig, compiled_path, device_guard, max_programs
from .math import _LOG2E, fast_math, log1p_exp, logistic_of_abs, modulation, power_constexpr, triton_compute_dtype

# Compiled path: 32 x 64 outputs per tile over 4 warps (16 per thread, ptxas-checked without spills); interpreter:
# small tiles and a 2 x 2 grid at most, so that small test matrices take several tiles, loop iterations and masks.
GPU_TILE = (32, 64)
GPU_NUM_WARPS = 4
INTERPRETER_TILE = (8, 16)
INTERPRETER_PROGRAMS = 2


@triton.jit
def _cost_tile(x_ptr, out_ptr, rows, N, G, stride_q, col_off, g_offs, col_ok, c_pos, c_neg, gamma,
               GAMMA: tl.constexpr, FAST: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Cost of one [BLOCK_Q, BLOCK_G] tile: rows the query indices (int32), col_off the targets' column offsets in
    the logits (int64), col_ok their mask (in range and a valid label)."""
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + (rows64 * stride_q)[:, None] + col_off[None, :], mask=mask,
                other=float("nan")).to(COMPUTE_DTYPE)
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
    cost = far + c_near * (m_near * L)
    out_offs = (rows64 * G)[:, None] + g_offs[None, :]
    tl.store(out_ptr + out_offs, cost.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (g_offs < G)[None, :])


# No integer argument is specialized by the JIT: G (the targets of a batch) changes every step, N and C with the
# model, and each new combination of sizes equal to 1 or divisible by 16 would compile a kernel of its own.
@triton.jit(do_not_specialize=["N", "G", "C", "stride_q", "stride_c"])
def focal_matching_cost_kernel(x_ptr, labels_ptr, out_ptr, N, G, C, stride_q, stride_c, c_pos, c_neg, gamma,
                               GAMMA: tl.constexpr, FAST: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                               BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr):
    """cost[q, g] for the target tile program_id(0) and the query tiles program_id(1) + k num_programs(1)."""
    gt = tl.program_id(0)
    p = tl.program_id(1)
    nprog = tl.num_programs(1)
    g_offs = gt * BLOCK_G + tl.arange(0, BLOCK_G)
    in_g = g_offs < G
    label = tl.load(labels_ptr + g_offs, mask=in_g, other=-1)
    col_ok = in_g & (label >= 0) & (label < C)
    col_off = tl.where(col_ok, label, 0).to(tl.int64) * stride_c
    qt = p
    while qt * BLOCK_Q < N:  # tile loop: matching
        rows = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)
        _cost_tile(x_ptr, out_ptr, rows, N, G, stride_q, col_off, g_offs, col_ok, c_pos, c_neg, gamma,
                   GAMMA, FAST, COMPUTE_DTYPE)
        qt += nprog


# ---------------------------------------------------------------------------------------------------------------
# Host side: the constexprs of one launch (shared with the ahead-of-time check) and the launcher.

def kernel_constexprs(x_dtype, power: int, tile=GPU_TILE) -> dict:
    return dict(GAMMA=power, FAST=fast_math(x_dtype), COMPUTE_DTYPE=triton_compute_dtype(x_dtype),
                BLOCK_Q=tile[0], BLOCK_G=tile[1])


def forward(x: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """(N, G) cost of logits x (N, C), any strides, and labels (G,) (N, G > 0), in the compute dtype."""
    n, c = x.shape
    g = labels.shape[0]
    compiled = compiled_path(x.device)
    tile = GPU_TILE if compiled else INTERPRETER_TILE
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
