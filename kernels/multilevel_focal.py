"""Class-index focal loss over all FPN levels of a detector head in one launch, read in the head's native layout.

Layout. Level l holds the logits of N images as (N, K, H_l, W_l), K = A * C (A anchors, C classes, channel
k = a * C + c), either NCHW-contiguous or channels_last; `cl_mask` bit l says which. With HW_l = H_l * W_l, image n of
level l is one dense block of K * HW_l elements starting at n * K * HW_l, in which element (hw, k) sits at
    k * HW_l + hw   (NCHW: contiguous along hw)      or      hw * K + k   (channels_last: contiguous along k).
Labels are (N, M) with M = sum_l HW_l * A; anchor (hw, a) of level l is label column mb_l + hw * A + a, where
mb_l = A * sum_{k<l} HW_k (torchvision's and detectron2's anchor order). Weights, when given, are (N, M) and
per-class alphas (C,), both in the compute dtype.

Tiles. A tile is [BLOCK_HW positions, BLOCK_C classes] of one anchor a of one image: one label (and weight) per row,
shared by the BLOCK_C classes of the row, so labels and weights cost one load per anchor per class tile, not per
logit. Per image, the tiles of level l are numbered from ts_l on: for NCHW in (a, class tile, position tile) order
(consecutive tiles walk along hw, the contiguous axis), for channels_last in (position tile, a, class tile) order
(consecutive tiles complete rows of K). In a class-aligned head (CLASS_ALIGNED: C % 16 == 0) the channels_last tiles
that lie inside the level are unmasked, rows of 16 aligned classes that load in 128-bit accesses; edge tiles and
NCHW tiles (rows along hw, whose alignment is unknown) are masked.

Grid: P programs per image, program (n, p) = pid n * P + p takes the tiles p, p + P, ... of image n over all levels
(a loop over levels picks each level's pointers and sizes once with a chain of scalar selects, nothing is read from a
device table, then walks the program's tiles of that level). A program's partial sum therefore belongs to one
image: the final one-program kernel adds each image's P partials in order, applies the normalizer (per image or
global) and adds the images in order. Deterministic for a given (device, N), no atomics.

Per element, with t = (label == c), keep = (label != ignore or no ignore value), w = weight of the anchor (1 without):
    loss = keep ? w * alpha_t(c) * (1 - p_t)**gamma * BCE(x, t (1 - s) + s / 2) : 0     (focal_math, smoothing s)
and for the other kinds of LOSS_KIND (focal_math.family_loss_and_grad) keep ? w * loss_kind(x, t) : 0, where for QFL
and VFL t = score of the anchor (an (N, M) tensor like the weights, one load per row) on its label's class, else 0.
Bytes moved by design per logit: forward reads it once; backward reads it once and writes its gradient once.
"""
import struct

import torch
import triton
import triton.language as tl

from .focal_math import family_loss_and_grad
from .launch import PARTIAL_SUM_BLOCK, compiled_path, device_guard, load_before_launch, max_programs
from .sigmoid_focal import FL, LossSpec, compute_dtype, kernel_scalars
from .tuning import MULTILEVEL_CANDIDATES, forced, make_key, options_of, tuned

MAX_LEVELS = 8
# No integer argument is specialized by the JIT (on divisibility by 16 or equality to 1): sizes change with every
# image size in multi-scale training, and each new combination would compile a new kernel. What the compiler needs
# to know for wide loads, whether C (and so K = A * C) is a multiple of 16, is the CLASS_ALIGNED constexpr.
_INT_ARGS = ["hw0", "hw1", "hw2", "hw3", "hw4", "hw5", "hw6", "hw7", "ts1", "ts2", "ts3", "ts4", "ts5", "ts6",
             "ts7", "tiles_per_image", "num_anchors_total", "num_levels", "cl_mask", "P", "A", "C", "gamma_int",
             "ignore_index", "has_ignore", "has_weight", "has_alpha"]


@triton.jit
def _pick(lvl, v0, v1, v2, v3, v4, v5, v6, v7):
    """v_lvl for a runtime level index lvl in [0, 8): a chain of scalar selects."""
    r = tl.where(lvl == 1, v1, v0)
    r = tl.where(lvl == 2, v2, r)
    r = tl.where(lvl == 3, v3, r)
    r = tl.where(lvl == 4, v4, r)
    r = tl.where(lvl == 5, v5, r)
    r = tl.where(lvl == 6, v6, r)
    r = tl.where(lvl == 7, v7, r)
    return r


@triton.jit
def _tile_place(local, hw, A, C, CHANNELS_LAST: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """(a, first position, first class) of tile number `local` of one image in one level (see the module doc)."""
    n_ct = tl.cdiv(C, BLOCK_C)
    if CHANNELS_LAST:
        ct = local % n_ct
        r = local // n_ct
        a = r % A
        ht = r // A
    else:
        n_ht = tl.cdiv(hw, BLOCK_HW)
        ht = local % n_ht
        r = local // n_ht
        ct = r % n_ct
        a = r // n_ct
    return a, ht * BLOCK_HW, ct * BLOCK_C


@triton.jit
def _tile_terms(x_ptr, lab_ptr, w_ptr, s_ptr, alpha_ptr, hw, K, A, C, a, row0, c_start, anchor_base,
                c0, c1, gamma, gamma_int, beta, smoothing, ignore_index, has_ignore, has_weight, has_alpha,
                MASKED: tl.constexpr, CHANNELS_LAST: tl.constexpr, LOSS_KIND: tl.constexpr, INT_GAMMA: tl.constexpr,
                COMPUTE_DTYPE: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Load one tile (x_ptr: its image's block) and return (offsets, mask, keep-and-weight factor, FL, dFL/dx).

    The loss and gradient are already multiplied by the anchor's weight and zeroed where the anchor is ignored."""
    rows = row0 + tl.arange(0, BLOCK_HW)
    cls = c_start + tl.arange(0, BLOCK_C)
    k = a * C + cls
    if CHANNELS_LAST:
        offs = rows[:, None] * K + k[None, :]
    else:
        offs = k[None, :] * hw + rows[:, None]
    row_mask = rows < hw
    col_mask = cls < C
    mask = row_mask[:, None] & col_mask[None, :]
    anchor = anchor_base + rows * A
    if MASKED:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        label = tl.load(lab_ptr + anchor, mask=row_mask, other=-1)
    else:
        x = tl.load(x_ptr + offs).to(COMPUTE_DTYPE)
        label = tl.load(lab_ptr + anchor)
    keep = (label != ignore_index) | (has_ignore == 0)
    w = tl.load(w_ptr + anchor, mask=row_mask & (has_weight != 0), other=1.0).to(COMPUTE_DTYPE)
    alpha_c = tl.load(alpha_ptr + cls, mask=col_mask & (has_alpha != 0), other=0.0).to(COMPUTE_DTYPE)
    c0v = tl.where(has_alpha != 0, 1.0 - alpha_c, c0)
    c1v = tl.where(has_alpha != 0, 2.0 * alpha_c - 1.0, c1)
    hit = label[:, None] == cls[None, :]
    if LOSS_KIND >= 2:
        # QFL / VFL: the anchor's score (one load per row, like its label) on its label's class, 0 elsewhere.
        if MASKED:
            score = tl.load(s_ptr + anchor, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)
        else:
            score = tl.load(s_ptr + anchor).to(COMPUTE_DTYPE)
        t = tl.where(hit, score[:, None], 0.0)
        ts = t
    else:
        t = hit.to(COMPUTE_DTYPE)
        ts = t * (1.0 - smoothing) + 0.5 * smoothing
    loss, grad = family_loss_and_grad(x, t, ts, c0v[None, :], c1v[None, :], gamma, gamma_int, beta, LOSS_KIND,
                                      INT_GAMMA)
    take = keep[:, None]
    if MASKED:
        take = take & mask
    loss = tl.where(take, loss * w[:, None], 0.0)
    grad = tl.where(take, grad * w[:, None], 0.0)
    return offs, mask, loss, grad


@triton.jit
def _store(ptr, offs, mask, value, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))


@triton.jit
def _tile(x_ptr, o_ptr, g_ptr, lab_ptr, w_ptr, s_ptr, alpha_ptr, stats_ptr, hw, K, A, C, a, row0, c_start,
          anchor_base, acc, g0, c0, c1, gamma, gamma_int, beta, smoothing, ignore_index, has_ignore, has_weight,
          has_alpha, MODE: tl.constexpr, STATS: tl.constexpr, MASKED: tl.constexpr, CHANNELS_LAST: tl.constexpr,
          LOSS_KIND: tl.constexpr, INT_GAMMA: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, BLOCK_HW: tl.constexpr,
          BLOCK_C: tl.constexpr):
    """One tile of one of the kernel's MODEs:
    0 forward, acc += loss;  1 forward, o = loss;  2 backward, o = g0 * dFL/dx;  3 backward, o = g * dFL/dx.
    STATS (MODE 0): also store the tile's row sums, stats[anchor * n_ct + class tile] (the anchor's loss over the
    tile's classes; n_ct = ceil(C / BLOCK_C))."""
    offs, mask, loss, grad = _tile_terms(
        x_ptr, lab_ptr, w_ptr, s_ptr, alpha_ptr, hw, K, A, C, a, row0, c_start, anchor_base, c0, c1, gamma,
        gamma_int, beta, smoothing, ignore_index, has_ignore, has_weight, has_alpha, MASKED, CHANNELS_LAST, LOSS_KIND,
        INT_GAMMA, COMPUTE_DTYPE, BLOCK_HW, BLOCK_C)
    if MODE == 0:
        acc += loss
        if STATS:
            rows = row0 + tl.arange(0, BLOCK_HW)
            slot = (anchor_base + rows * A) * tl.cdiv(C, BLOCK_C) + c_start // BLOCK_C
            tl.store(stats_ptr + slot, tl.sum(loss, axis=1), mask=rows < hw)
    elif MODE == 1:
        _store(o_ptr, offs, mask, loss, MASKED)
    elif MODE == 2:
        _store(o_ptr, offs, mask, g0 * grad, MASKED)
    else:
        if MASKED:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        else:
            g = tl.load(g_ptr + offs).to(COMPUTE_DTYPE)
        _store(o_ptr, offs, mask, g * grad, MASKED)
    return acc


@triton.jit(do_not_specialize=_INT_ARGS)
def multilevel_focal_kernel(
    x0, x1, x2, x3, x4, x5, x6, x7,          # logits of each level (unused levels repeat x0)
    o0, o1, o2, o3, o4, o5, o6, o7,          # loss ("none") or gradient of each level, in the level's layout
    g0_, g1_, g2_, g3_, g4_, g5_, g6_, g7_,  # upstream gradient of each level (MODE 3)
    hw0, hw1, hw2, hw3, hw4, hw5, hw6, hw7,  # H_l * W_l
    ts1, ts2, ts3, ts4, ts5, ts6, ts7,       # first per-image tile of each level (level 0 starts at 0)
    lab_ptr, w_ptr, s_ptr, alpha_ptr, partials_ptr, grad_scalar_ptr, scale_ptr, stats_ptr,
    tiles_per_image, num_anchors_total, num_levels, cl_mask, P, A, C,
    c0, c1, gamma, gamma_int, beta, smoothing, ignore_index, has_ignore, has_weight, has_alpha,
    MODE: tl.constexpr, LOSS_KIND: tl.constexpr, INT_GAMMA: tl.constexpr, CLASS_ALIGNED: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, STATS: tl.constexpr,
):
    """Forward (MODE 0: partial sums into partials[pid]; MODE 1: elementwise loss) or backward (MODE 2: the
    upstream scalar grad_scalar[0] times scale[n]; MODE 3: per-level upstream gradients) over every level. The
    backward recomputes everything from the logits and labels (the forward saves nothing of logit size).
    STATS (MODE 0 only): per-(anchor, class tile) loss sums into stats (N * M * ceil(C / BLOCK_C),), the
    by-product from which `focal_triton.stats` builds loss statistics."""
    if CLASS_ALIGNED:
        C = (C // 16) * 16  # == C; tells the compiler that rows of K = A * C are 16-element aligned
    K = A * C
    pid = tl.program_id(0)
    n = pid // P
    j = pid % P
    # One accumulator per layout: the two layouts' tiles live in different register layouts, and adding one to the
    # other in the loop would move every tile through shared memory (once, at the end, is fine).
    acc = tl.zeros([BLOCK_HW, BLOCK_C], COMPUTE_DTYPE)
    acc_cl = tl.zeros([BLOCK_HW, BLOCK_C], COMPUTE_DTYPE)
    g0 = 1.0
    if MODE == 2:
        g0 = tl.load(grad_scalar_ptr).to(COMPUTE_DTYPE) * tl.load(scale_ptr + n).to(COMPUTE_DTYPE)
    label_row = n.to(tl.int64) * num_anchors_total
    mb = 0  # anchors of the levels before this one
    lvl = 0
    while lvl < num_levels:
        # This level's pointers and sizes, picked once per level; tile numbers run on across levels.
        hw = _pick(lvl, hw0, hw1, hw2, hw3, hw4, hw5, hw6, hw7)
        start = _pick(lvl, 0, ts1, ts2, ts3, ts4, ts5, ts6, ts7)
        end = _pick(lvl, ts1, ts2, ts3, ts4, ts5, ts6, ts7, tiles_per_image)
        image = n.to(tl.int64) * K * hw  # first element of this image in the level
        xp = _pick(lvl, x0, x1, x2, x3, x4, x5, x6, x7) + image
        op = _pick(lvl, o0, o1, o2, o3, o4, o5, o6, o7) + image
        gp = _pick(lvl, g0_, g1_, g2_, g3_, g4_, g5_, g6_, g7_) + image
        channels_last = ((cl_mask >> lvl) & 1) != 0
        while j < end:
            local = j - start
            if channels_last:
                a, row0, c_start = _tile_place(local, hw, A, C, True, BLOCK_HW, BLOCK_C)
            else:
                a, row0, c_start = _tile_place(local, hw, A, C, False, BLOCK_HW, BLOCK_C)
            anchor_base = label_row + mb + a
            if channels_last:
                # Unmasked tiles pay off only where their rows are aligned runs of classes (wide loads).
                masked = True
                if CLASS_ALIGNED:
                    masked = (row0 + BLOCK_HW > hw) | (c_start + BLOCK_C > C)
                if masked:
                    acc_cl = _tile(xp, op, gp, lab_ptr, w_ptr, s_ptr, alpha_ptr, stats_ptr, hw, K, A, C, a, row0,
                                   c_start, anchor_base, acc_cl, g0, c0, c1, gamma, gamma_int, beta, smoothing,
                                   ignore_index, has_ignore, has_weight, has_alpha, MODE, STATS, True, True,
                                   LOSS_KIND, INT_GAMMA, COMPUTE_DTYPE, BLOCK_HW, BLOCK_C)
                else:
                    acc_cl = _tile(xp, op, gp, lab_ptr, w_ptr, s_ptr, alpha_ptr, stats_ptr, hw, K, A, C, a, row0,
                                   c_start, anchor_base, acc_cl, g0, c0, c1, gamma, gamma_int, beta, smoothing,
                                   ignore_index, has_ignore, has_weight, has_alpha, MODE, STATS, False, True,
                                   LOSS_KIND, INT_GAMMA, COMPUTE_DTYPE, BLOCK_HW, BLOCK_C)
            else:
                # NCHW rows run along hw, whose alignment is unknown (hw is not specialized): always masked.
                acc = _tile(xp, op, gp, lab_ptr, w_ptr, s_ptr, alpha_ptr, stats_ptr, hw, K, A, C, a, row0, c_start,
                            anchor_base, acc, g0, c0, c1, gamma, gamma_int, beta, smoothing, ignore_index, has_ignore,
                            has_weight, has_alpha, MODE, STATS, True, False, LOSS_KIND, INT_GAMMA, COMPUTE_DTYPE,
                            BLOCK_HW,
                            BLOCK_C)
            j += P
        mb += hw * A
        lvl += 1
    if MODE == 0:
        tl.store(partials_ptr + pid, tl.sum(tl.sum(acc + acc_cl, axis=1), axis=0))


@triton.jit(do_not_specialize=["N", "P"])
def normalize_partials_kernel(partials_ptr, norm_ptr, scale_ptr, out_ptr, N, P, norm_hi, norm_lo,
                              NORM_MODE: tl.constexpr, BLOCK: tl.constexpr):
    """One program. S_n = sum of image n's P partials (in order); scale_n = 1 / v (NORM_MODE 0: a host number v
    = norm_hi + norm_lo, split in two float32 scalars so that float64 keeps 48 bits of it; 1 without normalizer),
    1 / norm[0] (1: a 0-d tensor) or 1 / (N norm[n]) (2: per image);
    out = sum_n S_n scale_n in image order, and scale[n] = scale_n for the backward."""
    acc_dtype = partials_ptr.dtype.element_ty
    total = tl.sum(tl.zeros([BLOCK], acc_dtype), axis=0)
    n = 0
    while n < N:
        acc = tl.zeros([BLOCK], acc_dtype)
        start = 0
        while start < P:
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(partials_ptr + n * P + offs, mask=offs < P, other=0.0)
            start += BLOCK
        if NORM_MODE == 0:
            scale = 1.0 / (tl.full([], norm_hi, acc_dtype) + tl.full([], norm_lo, acc_dtype))
        elif NORM_MODE == 1:
            scale = 1.0 / tl.load(norm_ptr).to(acc_dtype)
        else:
            scale = 1.0 / (tl.load(norm_ptr + n).to(acc_dtype) * N.to(acc_dtype))
        tl.store(scale_ptr + n, scale)
        total += tl.sum(acc, axis=0) * scale
        n += 1
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------------------
# Host side.

MODE_SUM, MODE_NONE, MODE_GRAD_SCALAR, MODE_GRAD_TENSOR = 0, 1, 2, 3
# Interpreter tiles: small, so test tensors take several position and class tiles per anchor, with masked edges.
INTERPRETER_TILE = (32, 4)
INTERPRETER_PROGRAMS_PER_IMAGE = 2
GPU_NUM_WARPS = 4
# Classes per tile on a GPU: 16 (COCO's 80 is five full tiles; 91 wastes 5 % of a tile's lanes on masked classes).
GPU_BLOCK_C = 16


def gpu_tile(itemsize: int):
    """(BLOCK_HW, BLOCK_C) on a GPU: 16 bytes of logits per thread (as the dense kernels), 4 warps."""
    elements = GPU_NUM_WARPS * 32 * 16 // itemsize
    return elements // GPU_BLOCK_C, GPU_BLOCK_C


def tile_for(device: torch.device, itemsize: int):
    cfg = forced()  # the tuned config of this launch (tuning.py), where tuning chose one
    if cfg is not None and "BLOCK_HW" in cfg:
        return cfg["BLOCK_HW"], cfg["BLOCK_C"]
    return gpu_tile(itemsize) if compiled_path(device) else INTERPRETER_TILE


def launch_options(device: torch.device) -> dict:
    """num_warps (and num_stages where tuning chose them) of a launch."""
    cfg = forced()
    if cfg is not None and "BLOCK_HW" in cfg:
        return options_of(cfg)
    return dict(num_warps=GPU_NUM_WARPS if compiled_path(device) else 1)


def _tuning_key(mode: str, levels, num_anchors: int, loss=None) -> str:
    x = levels[0]
    cl_mask = sum(1 << i for i, lv in enumerate(levels) if not lv.is_contiguous())
    kind = loss.kind if loss is not None else FL
    return make_key("multilevel", sum(lv.numel() for lv in levels), x.shape[1] // num_anchors, cl_mask, x.dtype,
                    mode if kind == FL else f"{mode} kind={kind}")


def kernel_constexprs(x_dtype, mode: int, int_gamma: bool, class_aligned: bool, tile, loss_kind: int = FL,
                      stats: bool = False) -> dict:
    return dict(MODE=mode, LOSS_KIND=loss_kind, INT_GAMMA=int_gamma, CLASS_ALIGNED=class_aligned,
                COMPUTE_DTYPE=compute_dtype(x_dtype), BLOCK_HW=tile[0], BLOCK_C=tile[1], STATS=stats)


class Plan:
    """Host-side integers of one call (from shapes only: nothing is read from the device)."""

    def __init__(self, levels, num_anchors: int, device: torch.device, itemsize: int):
        self.N, self.K = levels[0].shape[0], levels[0].shape[1]
        self.A = num_anchors
        self.C = self.K // num_anchors
        self.tile = tile_for(device, itemsize)
        self.hw = [x.shape[2] * x.shape[3] for x in levels]
        self.cl_mask = sum(1 << i for i, x in enumerate(levels) if not x.is_contiguous())
        n_ct = -(-self.C // self.tile[1])
        starts, total = [], 0
        for hw in self.hw:
            starts.append(total)
            total += self.A * n_ct * -(-hw // self.tile[0])
        self.tiles_per_image = total
        self.starts = starts[1:] + [total] * (MAX_LEVELS - len(levels))
        self.num_anchors_total = sum(self.hw) * self.A
        self.num_levels = len(levels)
        self.device = device

    def level_args(self, tensors, fill):
        return list(tensors) + [fill] * (MAX_LEVELS - len(tensors))

    def programs_per_image(self, args, constexprs) -> int:
        if not compiled_path(self.device):
            cap = INTERPRETER_PROGRAMS_PER_IMAGE
        else:
            from .launch import ElementwiseConfig

            opts = launch_options(self.device)
            cfg = ElementwiseConfig(self.tile[0] * self.tile[1], opts["num_warps"], num_stages=opts.get("num_stages"))
            # No integer argument is specialized, so their values do not change the compiled kernel: zeros keep
            # the occupancy cache to one entry per (dtype, constexprs) instead of one per combination of sizes.
            args = [0 if isinstance(a, int) and not isinstance(a, bool) else a for a in args]
            cap = max(1, -(-max_programs(multilevel_focal_kernel, args, constexprs, cfg, self.device) // self.N))
        return max(1, min(self.tiles_per_image, cap))


def _round_to_float32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _scalar_args(plan: Plan, alpha, gamma, smoothing, ignore_index, has_weight, loss):
    # A per-class alpha is read in the kernel (has_alpha); a number becomes alpha_t = c0 + c1 t (kernel_scalars).
    has_alpha = int(isinstance(alpha, torch.Tensor))
    c0, c1, gamma_f, gamma_i, beta_f, int_gamma = kernel_scalars(loss.kind, 0.0 if has_alpha else alpha, gamma,
                                                                 loss.beta, loss.iou_weighted)
    if has_alpha:
        c0, c1 = 1.0, 0.0
    ints = [plan.tiles_per_image, plan.num_anchors_total, plan.num_levels, plan.cl_mask]
    scalars = [c0, c1, gamma_f, gamma_i, beta_f, float(smoothing), 0 if ignore_index is None else int(ignore_index),
               int(ignore_index is not None), int(has_weight), has_alpha]
    return ints, scalars, int_gamma


def _launch(mode, levels, outs, grads, labels, weights, alpha, gamma, smoothing, ignore_index, num_anchors,
            partials_dtype=torch.float32, grad_scalar=None, scale=None, loss=LossSpec(), with_stats=False):
    """Launch multilevel_focal_kernel once over every level; returns (plan, programs per image, partials, stats)
    with stats the (N, M) per-anchor losses when with_stats (MODE_SUM only), else None."""
    x = levels[0]
    plan = Plan(levels, num_anchors, x.device, x.element_size())
    ints, scalars, int_gamma = _scalar_args(plan, alpha, gamma, smoothing, ignore_index, weights is not None, loss)
    constexprs = kernel_constexprs(x.dtype, mode, int_gamma, plan.C % 16 == 0, plan.tile, loss.kind, with_stats)
    dummy = torch.empty(1, dtype=torch.float32, device=x.device)
    class_tiles = -(-plan.C // plan.tile[1])
    stats = (torch.empty(plan.N * plan.num_anchors_total * class_tiles, dtype=partials_dtype, device=x.device)
             if with_stats else dummy)

    def args(partials, P):
        return [*plan.level_args(levels, x), *plan.level_args(outs, outs[0] if outs else x),
                *plan.level_args(grads, grads[0] if grads else x), *plan.level_args(plan.hw, 0), *plan.starts,
                labels, weights if weights is not None else dummy, loss.scores if loss.scores is not None else dummy,
                alpha if isinstance(alpha, torch.Tensor) else dummy, partials,
                grad_scalar if grad_scalar is not None else dummy, scale if scale is not None else dummy, stats,
                *ints, P, plan.A, plan.C, *scalars]

    with device_guard(x.device):
        # Only the types and alignment of the arguments size the grid: an empty stand-in for the partial sums.
        P = plan.programs_per_image(args(torch.empty(0, dtype=partials_dtype, device=x.device), 1), constexprs)
        partials = torch.empty(plan.N * P if mode == MODE_SUM else 0, dtype=partials_dtype, device=x.device)
        multilevel_focal_kernel[(plan.N * P,)](*args(partials, P), **launch_options(x.device), **constexprs)
    # Each anchor's loss: its class tiles' row sums, added in class order (deterministic).
    per_anchor = stats.view(plan.N, plan.num_anchors_total, class_tiles).sum(-1) if with_stats else None
    return plan, P, partials, per_anchor


@tuned("multilevel_fwd", lambda levels, labels, weights, alpha, gamma, smoothing, ignore_index, num_anchors,
       reduction, *a, **k: _tuning_key(reduction, levels, num_anchors, k.get("loss")), MULTILEVEL_CANDIDATES)
def multilevel_focal_forward(levels, labels, weights, alpha, gamma, smoothing, ignore_index, num_anchors,
                             reduction, norm_mode=0, normalizer=None, norm_value=1.0, out_dtype=None, loss=LossSpec(),
                             with_stats=False):
    """levels: NCHW-contiguous or channels_last (N, A*C, H, W) tensors, N * tiles > 0; labels (N, M) int32/int64
    contiguous; weights None or (N, M) float32 contiguous; alpha a number or a (C,) float32 tensor; loss the kind
    of loss (a LossSpec; FL by default).

    "none": a list of per-level losses in each level's layout, in out_dtype (default: the levels' dtype; float32
    under autocast). "sum": (loss, scale), loss 0-d in the
    accumulation dtype (float32, float64 for float64 logits) and scale (N,) the per-image factor the normalizer
    gave (needed by the backward); with_stats adds a third output, the (N, M) per-anchor losses (weighted, 0 for
    ignored anchors, not normalized) in the accumulation dtype, from the same pass."""
    x = levels[0]
    if reduction == "none":
        outs = [torch.empty_like(lv, dtype=out_dtype or lv.dtype) for lv in levels]
        _launch(MODE_NONE, levels, outs, [], labels, weights, alpha, gamma, smoothing, ignore_index, num_anchors,
                loss=loss)
        return outs
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    plan, P, partials, per_anchor = _launch(MODE_SUM, levels, [], [], labels, weights, alpha, gamma, smoothing,
                                            ignore_index, num_anchors, partials_dtype=acc_dtype, loss=loss,
                                            with_stats=with_stats)
    total = torch.empty((), dtype=acc_dtype, device=x.device)
    scale = torch.empty(plan.N, dtype=acc_dtype, device=x.device)
    norm_ptr = normalizer if normalizer is not None else torch.empty(1, dtype=torch.float32, device=x.device)
    with device_guard(x.device):
        hi = _round_to_float32(norm_value)
        final_args = (partials, norm_ptr, scale, total, plan.N, P, hi, float(norm_value) - hi)
        final = dict(NORM_MODE=norm_mode, BLOCK=PARTIAL_SUM_BLOCK)
        load_before_launch(normalize_partials_kernel, (1,), final_args, {}, final, x.device)
        normalize_partials_kernel[(1,)](*final_args, **final)
    return (total, scale, per_anchor) if with_stats else (total, scale)


@tuned("multilevel_bwd", lambda grads, levels, labels, weights, alpha, gamma, smoothing, ignore_index, num_anchors,
       scale=None, loss=None: _tuning_key("grad_scalar" if scale is not None else "grad_tensor", levels, num_anchors,
                                          loss), MULTILEVEL_CANDIDATES)
def multilevel_focal_backward(grads, levels, labels, weights, alpha, gamma, smoothing, ignore_index, num_anchors,
                              scale=None, loss=LossSpec()):
    """Gradients w.r.t. each level, in the level's layout and dtype. grads: one 0-d upstream gradient of the "sum"
    loss (then `scale` is the forward's per-image factor), or per-level upstream gradients laid out like the levels
    ("none")."""
    outs = [torch.empty_like(lv) for lv in levels]
    if scale is not None:
        _launch(MODE_GRAD_SCALAR, levels, outs, [], labels, weights, alpha, gamma, smoothing, ignore_index,
                num_anchors, grad_scalar=grads[0], scale=scale, loss=loss)
    else:
        _launch(MODE_GRAD_TENSOR, levels, outs, grads, labels, weights, alpha, gamma, smoothing, ignore_index,
                num_anchors, loss=loss)
    return outs
