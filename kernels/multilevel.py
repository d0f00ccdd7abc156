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
logit. Per image, the tiles of level l are numbered from ts_l on in (position tile, a, class tile) order for both
layouts. The tiles of every position tile but the last, partial one are full (in a class-aligned head,
CLASS_ALIGNED: C % 16 == 0, where the class tiles are full too): a prefix of the level's tiles, run by an unmasked
loop; the rest by a masked one. Full channels_last tiles are rows of 16 aligned classes that load in 128-bit
accesses; NCHW tiles run along hw, whose alignment is unknown to the compiler: 16-bit accesses, for bf16 64-bit ones
where hw is a multiple of 4 (four positions) and 32-bit ones where it is even (two positions per word), each a
branch at run time (sizes stay unspecialized). bf16 logits are read as int32 words of two and unpacked by bit
operations.

Grid: P = floor(resident programs / N) programs per image (one wave), program (n, p) = pid n * P + p takes the tiles
p, p + P, ... of image n over all levels (a loop over levels picks each level's pointers and sizes once with a chain
of scalar selects, nothing is read from a device table, then walks the program's tiles of that level, carrying the
tile's (position tile, anchor, class tile) coordinates forward by P with additions: no division per tile). A
program's partial sum therefore belongs to one image: the final one-program kernel adds each image's P partials in
order, applies the normalizer (per image or global) and adds the images in order. Deterministic for a given
(device, N), no atomics.

Per element, with t = (label == c), keep = (label != ignore or no ignore value), w = weight of the anchor (1 without):
    loss = keep ? w * alpha_t(c) * (1 - p_t)**gamma * BCE(x, t (1 - s) + s / 2) : 0     (math.py, smoothing s)
and for the other kinds of LOSS_KIND (math.family_loss_and_grad, math.detr_loss_and_grad) keep ? w * loss_kind(x,
t) : 0, where for QFL, VFL and the DETR / YOLO kinds (4 .. 8) t = score of the anchor (an (N, M) tensor like the
weights, one load per row) on its label's class, else 0.
Bytes moved by design per logit: forward reads it once; backward reads it once and writes its gradient once.
"""
import struct

import torch
import triton
import triton.language as tl

from ..layouts import LAYOUT_CL, LAYOUT_GENERIC, out_image_stride, segment_layout
from ..losses import FL, MAX_SEGMENTS, LossSpec
from . import tuning
from .launch import PARTIAL_SUM_BLOCK, ElementwiseConfig, compiled_path, device_guard, load_before_launch, max_programs
from .math import (detr_loss_and_grad, fast_math, family_loss_and_grad, focal_binary_loss_and_grad, power_key,
                   row_target, short_log, spec_power, triton_compute_dtype)
from .tuning import MULTILEVEL_CANDIDATES, make_key, options_of
# Slots of one launch: segments (FPN levels, decoder layers), each with its own pointers, sizes and strides.
MAX_LEVELS = MAX_SEGMENTS
# No integer argument is specialized by the JIT (on divisibility by 16 or equality to 1): sizes change with every
# image size in multi-scale training, and each new combination would compile a new kernel. What the compiler needs
# to know for wide loads, whether C (and so K = A * C) is a multiple of 16, is the CLASS_ALIGNED constexpr.
_INT_ARGS = [f"{field}{i}" for field in ("hw", "sn", "on", "sk", "sp", "sh", "wd") for i in range(MAX_SEGMENTS)] + \
    [f"ts{i}" for i in range(1, MAX_SEGMENTS)] + ["tiles_per_image", "label_row", "num_levels", "cl_mask",
                                                  "generic_mask", "N", "P", "A", "C", "grad_stride", "scale_stride",
                                                  "ignore_index"]


@triton.jit
def _pick(lvl, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15):
    """v_lvl for a runtime segment index lvl in [0, 16): a chain of scalar selects."""
    r = tl.where(lvl == 1, v1, v0)
    r = tl.where(lvl == 2, v2, r)
    r = tl.where(lvl == 3, v3, r)
    r = tl.where(lvl == 4, v4, r)
    r = tl.where(lvl == 5, v5, r)
    r = tl.where(lvl == 6, v6, r)
    r = tl.where(lvl == 7, v7, r)
    r = tl.where(lvl == 8, v8, r)
    r = tl.where(lvl == 9, v9, r)
    r = tl.where(lvl == 10, v10, r)
    r = tl.where(lvl == 11, v11, r)
    r = tl.where(lvl == 12, v12, r)
    r = tl.where(lvl == 13, v13, r)
    r = tl.where(lvl == 14, v14, r)
    r = tl.where(lvl == 15, v15, r)
    return r


@triton.jit
def _advance(ht, a, ct, d_ht, d_a, d_ct, A, n_ct):
    """(position tile, anchor, class tile) of the tile P tiles further on, P = (d_ht A + d_a) n_ct + d_ct with
    d_a < A, d_ct < n_ct: additions and carries, no division."""
    ct += d_ct
    carry = ct >= n_ct
    ct = tl.where(carry, ct - n_ct, ct)
    a += d_a + carry.to(tl.int32)
    carry = a >= A
    a = tl.where(carry, a - A, a)
    ht += d_ht + carry.to(tl.int32)
    return ht, a, ct


@triton.jit
def _class_in_tile(label, c_start, BLOCK_C: tl.constexpr):
    """label - c_start as int32 where the label is one of the tile's BLOCK_C classes, else -1 (once per row, so the
    per-logit test is one 32-bit compare also for int64 labels)."""
    rel = label - c_start
    return tl.where((rel >= 0) & (rel < BLOCK_C), rel, -1).to(tl.int32)


@triton.jit
def _unpack_bf16_pairs(v, abs_lo, abs_hi):
    """Two bf16 logits per int32 word v (the lower one first): (x, |x|, x >= 0) of each, by bit operations (the
    compiler's own bf16 -> float32 path unpacks the halves into 16-bit registers first: twice the instructions).
    |x| is the word's bits and abs_lo (of v << 16) / abs_hi: 0x7FFFFFFF / 0x7FFF0000, or 0 to read a half as 0."""
    v_lo = v << 16
    x_lo = v_lo.to(tl.float32, bitcast=True)
    x_hi = (v & -65536).to(tl.float32, bitcast=True)
    a_lo = (v_lo & abs_lo).to(tl.float32, bitcast=True)
    a_hi = (v & abs_hi).to(tl.float32, bitcast=True)
    return x_lo, a_lo, v_lo >= 0, x_hi, a_hi, v >= 0


@triton.jit
def _terms(x, a, nonneg, rel, cols, c_start, C, score, alpha_ptr, g0, lc0, lc1, gc0, gc1, gamma, beta,
           half_smoothing, LOSS_KIND: tl.constexpr, GAMMA: tl.constexpr, HAS_ALPHA: tl.constexpr,
           SMOOTH: tl.constexpr, FAST: tl.constexpr, SHORT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """(loss, dloss/dx) of the logits x (a = |x|, nonneg = x >= 0) of the tile columns `cols` (class c_start +
    cols), rel the row's label class within the tile (-1: none). For FL the factors alpha_t (loss: lc1 on the
    label's class, lc0 elsewhere; gradient: gc1 / gc0, with g0 and the sign of dz/dx folded in) cost one select per
    logit."""
    hit = rel[:, None] == cols[None, :]
    if HAS_ALPHA:
        alpha_c = tl.load(alpha_ptr + c_start + cols, mask=(c_start + cols) < C, other=0.0).to(COMPUTE_DTYPE)
        if LOSS_KIND == 4:  # BCE's class weights weight both sides
            lc0v = alpha_c[None, :]
        else:
            lc0v = (1.0 - alpha_c)[None, :]
        lc1v = alpha_c[None, :]
        gc0v = lc0v * g0
        gc1v = lc1v * -g0
    else:
        lc0v = lc0
        lc1v = lc1
        gc0v = gc0
        gc1v = gc1
    if LOSS_KIND == 0:
        loss, grad = focal_binary_loss_and_grad(a, nonneg, hit, lc0v, lc1v, gc0v, gc1v, gamma, half_smoothing, GAMMA,
                                                SMOOTH, FAST, SHORT)
    elif LOSS_KIND >= 4:
        # The DETR / YOLO kinds: the anchor's score, transformed once per row, on its label's class.
        s = row_target(score, gamma, beta, LOSS_KIND, GAMMA)[:, None]
        loss, grad = detr_loss_and_grad(x, hit, s, lc0v, lc1v, gamma, beta, LOSS_KIND, GAMMA, FAST)
        grad = grad * g0
    else:
        if LOSS_KIND >= 2:
            # QFL / VFL: the anchor's score on its label's class, 0 elsewhere.
            t = tl.where(hit, score[:, None], 0.0)
            ts = t
        else:
            t = hit.to(COMPUTE_DTYPE)
            ts = t * (1.0 - 2.0 * half_smoothing) + half_smoothing
        # alpha_t = lc0 (1 - t) + lc1 t (FL*; VFL's positives' weight); QFL takes none.
        loss, grad = family_loss_and_grad(x, t, ts, lc0v, lc1v, gamma, beta, LOSS_KIND, GAMMA, FAST)
        grad = grad * g0
    return loss, grad


@triton.jit
def _finish(loss, grad, w, keep, mask, HAS_WEIGHT: tl.constexpr, HAS_IGNORE: tl.constexpr, MASKED: tl.constexpr,
            MODE: tl.constexpr, STATS: tl.constexpr):
    """The anchor's weight and ignore flag applied; for the statistics the masked lanes zeroed too (the plain
    forward sum applies both in `_accumulate`)."""
    if HAS_WEIGHT:
        loss = loss * w[:, None]
        grad = grad * w[:, None]
    if HAS_IGNORE:
        if (MODE != 0) or STATS:
            loss = tl.where(keep[:, None], loss, 0.0)
        grad = tl.where(keep[:, None], grad, 0.0)
    if STATS:
        if MASKED:
            loss = tl.where(mask, loss, 0.0)
    return loss, grad


@triton.jit
def _accumulate(acc, loss, keep, mask, HAS_IGNORE: tl.constexpr, MASKED: tl.constexpr):
    """acc + loss where the anchor is kept and the lane inside the level (a select of the sum, so that the add
    fuses with the loss's last product; an ignored NaN logit adds nothing)."""
    if HAS_IGNORE:
        if MASKED:
            return tl.where(keep[:, None] & mask, acc + loss, acc)
        return tl.where(keep[:, None], acc + loss, acc)
    if MASKED:
        return tl.where(mask, acc + loss, acc)
    return acc + loss


@triton.jit
def _pair_part(x_ptr, o_ptr, g_ptr, part, lanes, sp, rel, keep, row_mask, c_start, C, w, score, alpha_ptr, g0, lc0,
               lc1, gc0, gc1, gamma, beta, half_smoothing, MODE: tl.constexpr, STATS: tl.constexpr,
               MASKED: tl.constexpr, ZEROED: tl.constexpr, SELECT: tl.constexpr, LOSS_KIND: tl.constexpr,
               GAMMA: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr, SMOOTH: tl.constexpr,
               FAST: tl.constexpr, SHORT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, BLOCK_HW: tl.constexpr,
               PART_C: tl.constexpr):
    """Classes PART_C part .. PART_C (part + 1) - 1 of a bf16 channels_last tile (x_ptr etc. at the tile's first
    element): PART_C / 2 int32 words per row, one 128-bit load for PART_C = 8 (one row per thread, like its label),
    the even and odd classes computed apart; stores the loss (MODE 1) or gradient (MODE 2, 3) joined again, returns
    the (even, odd) losses. ZEROED: an ignored anchor's words are set to 0 (its factors are 0): a NaN there still
    gives 0."""
    quad = tl.arange(0, PART_C // 2)
    # Word offsets: the position stride sp and the tile's base are even (CLASS_ALIGNED), so each word holds classes
    # 2i and 2i + 1.
    w_offs = lanes[:, None] * (sp // 2) + (part * (PART_C // 2) + quad)[None, :]
    w_mask = row_mask[:, None] & ((c_start + part * PART_C + 2 * quad) < C)[None, :]
    if MASKED:
        v = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + w_offs, mask=w_mask, other=0)
    else:
        v = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + w_offs)
    if ZEROED:
        v = tl.where(keep[:, None], v, 0)
    x0, a0, nn0, x1, a1, nn1 = _unpack_bf16_pairs(v, 0x7FFFFFFF, 0x7FFF0000)
    loss0, grad0 = _terms(x0, a0, nn0, rel, part * PART_C + 2 * quad, c_start, C, score, alpha_ptr, g0, lc0, lc1,
                          gc0, gc1, gamma, beta, half_smoothing, LOSS_KIND, GAMMA, HAS_ALPHA, SMOOTH, FAST, SHORT,
                          COMPUTE_DTYPE)
    loss1, grad1 = _terms(x1, a1, nn1, rel, part * PART_C + 2 * quad + 1, c_start, C, score, alpha_ptr, g0, lc0, lc1,
                          gc0, gc1, gamma, beta, half_smoothing, LOSS_KIND, GAMMA, HAS_ALPHA, SMOOTH, FAST, SHORT,
                          COMPUTE_DTYPE)
    loss0, grad0 = _finish(loss0, grad0, w, keep, w_mask, HAS_WEIGHT, SELECT, MASKED, MODE, STATS)
    loss1, grad1 = _finish(loss1, grad1, w, keep, w_mask, HAS_WEIGHT, SELECT, MASKED, MODE, STATS)
    if MODE != 0:
        if MODE == 1:
            value = tl.reshape(tl.join(loss0, loss1), [BLOCK_HW, PART_C])
        else:
            value = tl.reshape(tl.join(grad0, grad1), [BLOCK_HW, PART_C])
        part_cols = part * PART_C + tl.arange(0, PART_C)
        offs = lanes[:, None] * sp + part_cols[None, :]
        mask = row_mask[:, None] & ((c_start + part_cols) < C)[None, :]
        if MODE == 3:
            if MASKED:
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            else:
                g = tl.load(g_ptr + offs).to(COMPUTE_DTYPE)
            value = g * value
        _store(o_ptr, offs, mask, value, MASKED)
    return loss0, loss1


@triton.jit
def _nchw_pair_tile(x_ptr, o_ptr, g_ptr, lab_ptr, w_ptr, s_ptr, alpha_ptr, stats_ptr, sk, A, C, a, row0, c_start, ct,
                    anchor_base, acc, g0, lc0, lc1, gc0, gc1, gamma, beta, half_smoothing, ignore_index,
                    MODE: tl.constexpr, STATS: tl.constexpr, LOSS_KIND: tl.constexpr, GAMMA: tl.constexpr,
                    HAS_IGNORE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr,
                    SMOOTH: tl.constexpr, FAST: tl.constexpr, SHORT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, HALVES: tl.constexpr = False):
    """A full NCHW tile of bf16 logits in a segment of even class stride sk (`_tile`'s MODEs): each class row read
    as int32 words of two positions (positions row0 + 2i and row0 + 2i + 1: the lower and upper half; 64-bit
    accesses of two words where the caller tells the compiler that sk is a multiple of 4), each half with its own
    labels, computed apart (both added to acc) and joined again for the store (32- / 64-bit stores).
    HALVES (odd sk: every other class row starts at an odd element, no word is aligned): the same tile with each
    pair of positions read and written as two 16-bit halves at one address (+0 / +2 bytes), so that one address
    serves two positions and the per-row ignore and label work stays the pairs'.
    The tile's labels are read once, one per position (a [BLOCK_HW] vector: one per thread), turned into one int32
    code (the label's class in the tile, -1: none, -2: ignored) and handed to the tile's layout by the compiler
    (through shared memory: 4 instructions per thread) instead of each thread reading the labels of its positions.
    With a scalar alpha an ignored anchor's halves are read as |x| = 0 (the mask that takes |x| from the word's
    bits) and its factors set to 0, as in `_pair_part` (a NaN logit there still gives 0)."""
    i = tl.arange(0, BLOCK_HW // 2)
    cols = tl.arange(0, BLOCK_C)
    lab_tile = lab_ptr + (anchor_base + row0 * A)
    lane_lo = (2 * i) * A
    label = tl.load(lab_tile + tl.arange(0, BLOCK_HW) * A)
    code = _class_in_tile(label, c_start, BLOCK_C)
    if HAS_IGNORE:
        code = tl.where(label != ignore_index, code, -2)
    rel_lo, rel_hi = tl.split(tl.reshape(code, [BLOCK_HW // 2, 2]))
    keep_lo = rel_lo != -2
    keep_hi = rel_hi != -2
    w_lo = 1.0
    w_hi = 1.0
    if HAS_WEIGHT:
        w_lo = tl.load(w_ptr + (anchor_base + row0 * A) + lane_lo).to(COMPUTE_DTYPE)
        w_hi = tl.load(w_ptr + (anchor_base + row0 * A) + lane_lo + A).to(COMPUTE_DTYPE)
    score_lo = 0.0
    score_hi = 0.0
    if LOSS_KIND >= 2:
        score_lo = tl.load(s_ptr + (anchor_base + row0 * A) + lane_lo).to(COMPUTE_DTYPE)
        score_hi = tl.load(s_ptr + (anchor_base + row0 * A) + lane_lo + A).to(COMPUTE_DTYPE)
    base = (a * C + c_start) * sk + row0  # even where sk is (row0 is)
    if HALVES:
        # [classes, positions / 2] offsets, turned after the load: the compiler then lays the positions along the
        # threads as it does the words' (their offsets' only contiguity), and the rows' work stays per thread.
        h_offs = cols[:, None] * sk + 2 * i[None, :]
        h_lo = tl.trans(tl.load(x_ptr.to(tl.pointer_type(tl.uint16)) + base + h_offs)).to(tl.int32)
        h_hi = tl.trans(tl.load(x_ptr.to(tl.pointer_type(tl.uint16)) + base + h_offs + 1)).to(tl.int32)
        v = (h_hi << 16) | h_lo
    else:
        v = tl.load((x_ptr + base).to(tl.pointer_type(tl.int32)) + (cols[None, :] * (sk // 2) + i[:, None]))
    ZEROED: tl.constexpr = HAS_IGNORE and (not HAS_ALPHA) and (LOSS_KIND == 0)
    SELECT: tl.constexpr = HAS_IGNORE and not ZEROED
    lc0_lo, lc1_lo, gc0_lo, gc1_lo = lc0, lc1, gc0, gc1
    lc0_hi, lc1_hi, gc0_hi, gc1_hi = lc0, lc1, gc0, gc1
    abs_lo = 0x7FFFFFFF
    abs_hi = 0x7FFF0000
    if ZEROED:
        abs_lo = tl.where(keep_lo, 0x7FFFFFFF, 0)[:, None]
        abs_hi = tl.where(keep_hi, 0x7FFF0000, 0)[:, None]
        zero = tl.zeros([BLOCK_HW // 2], COMPUTE_DTYPE)
        lc0_lo, lc1_lo = tl.where(keep_lo, lc0, zero)[:, None], tl.where(keep_lo, lc1, zero)[:, None]
        gc0_lo, gc1_lo = tl.where(keep_lo, gc0, zero)[:, None], tl.where(keep_lo, gc1, zero)[:, None]
        lc0_hi, lc1_hi = tl.where(keep_hi, lc0, zero)[:, None], tl.where(keep_hi, lc1, zero)[:, None]
        gc0_hi, gc1_hi = tl.where(keep_hi, gc0, zero)[:, None], tl.where(keep_hi, gc1, zero)[:, None]
    x_lo, a_lo, nn_lo, x_hi, a_hi, nn_hi = _unpack_bf16_pairs(v, abs_lo, abs_hi)
    loss_lo, grad_lo = _terms(x_lo, a_lo, nn_lo, rel_lo, cols, c_start, C, score_lo, alpha_ptr, g0, lc0_lo, lc1_lo,
                              gc0_lo, gc1_lo, gamma, beta, half_smoothing, LOSS_KIND, GAMMA, HAS_ALPHA, SMOOTH, FAST,
                              SHORT, COMPUTE_DTYPE)
    loss_hi, grad_hi = _terms(x_hi, a_hi, nn_hi, rel_hi, cols, c_start, C, score_hi, alpha_ptr, g0, lc0_hi, lc1_hi,
                              gc0_hi, gc1_hi, gamma, beta, half_smoothing, LOSS_KIND, GAMMA, HAS_ALPHA, SMOOTH, FAST,
                              SHORT, COMPUTE_DTYPE)
    loss_lo, grad_lo = _finish(loss_lo, grad_lo, w_lo, keep_lo, None, HAS_WEIGHT, SELECT, False, MODE, STATS)
    loss_hi, grad_hi = _finish(loss_hi, grad_hi, w_hi, keep_hi, None, HAS_WEIGHT, SELECT, False, MODE, STATS)
    if MODE == 0:
        acc = _accumulate(acc, loss_lo, keep_lo, None, SELECT, False)
        acc = _accumulate(acc, loss_hi, keep_hi, None, SELECT, False)
        if STATS:
            slot = (anchor_base + row0 * A + lane_lo) * tl.cdiv(C, BLOCK_C) + ct
            tl.store(stats_ptr + slot, tl.sum(loss_lo, axis=1))
            tl.store(stats_ptr + slot + A * tl.cdiv(C, BLOCK_C), tl.sum(loss_hi, axis=1))
    else:
        if MODE == 1:
            lo, hi = loss_lo, loss_hi
        else:
            lo, hi = grad_lo, grad_hi
        if HALVES:  # each half at its own position, in the layout of the loads
            if MODE == 3:
                lo = lo * tl.trans(tl.load(g_ptr + base + h_offs)).to(COMPUTE_DTYPE)
                hi = hi * tl.trans(tl.load(g_ptr + base + h_offs + 1)).to(COMPUTE_DTYPE)
            tl.store(o_ptr + base + h_offs, tl.trans(lo).to(o_ptr.dtype.element_ty))
            tl.store(o_ptr + base + h_offs + 1, tl.trans(hi).to(o_ptr.dtype.element_ty))
        else:
            # Element (i, c, k) of a [positions / 2, classes, 2] tensor is position row0 + 2i + k of class c.
            offs = cols[None, :, None] * sk + 2 * i[:, None, None] + tl.arange(0, 2)[None, None, :]
            if MODE == 3:
                g_lo, g_hi = tl.split(tl.load(g_ptr + base + offs).to(COMPUTE_DTYPE))
                lo, hi = lo * g_lo, hi * g_hi
            # Stored as [classes, positions]: the join of (lo, hi) turned so that its layout is the store's (each
            # thread its words' positions in order: two bf16 per float32 pair packed by one conversion, no
            # reordering).
            value = tl.reshape(tl.permute(tl.join(lo, hi), (1, 0, 2)), [BLOCK_C, BLOCK_HW])
            tl.store(o_ptr + base + (cols[:, None] * sk + tl.arange(0, BLOCK_HW)[None, :]),
                     value.to(o_ptr.dtype.element_ty))
    return acc


@triton.jit
def _tile(x_ptr, o_ptr, g_ptr, lab_ptr, w_ptr, s_ptr, alpha_ptr, stats_ptr, hw, sk, sp, sh, wd, A, C, a, row0,
          c_start, ct, anchor_base, acc0, acc1, acc2, acc3, g0, lc0, lc1, gc0, gc1, gamma, beta, half_smoothing,
          ignore_index, MODE: tl.constexpr, STATS: tl.constexpr, MASKED: tl.constexpr, CHANNELS_LAST: tl.constexpr,
          GENERIC: tl.constexpr, PAIRS: tl.constexpr, LOSS_KIND: tl.constexpr, GAMMA: tl.constexpr,
          HAS_IGNORE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr, SMOOTH: tl.constexpr,
          FAST: tl.constexpr, SHORT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, BLOCK_HW: tl.constexpr,
          BLOCK_C: tl.constexpr):
    """One tile (x_ptr, o_ptr, g_ptr: its image's block of the segment) of one of the kernel's MODEs:
    0 forward, acc += loss;  1 forward, o = loss;  2 backward, o = g0 * dFL/dx;  3 backward, o = g * dFL/dx.
    The loss and gradient are multiplied by the anchor's weight and zeroed where the anchor is ignored.
    PAIRS (bf16 channels_last rows of a class-aligned head, BLOCK_C <= 16): the tile is read in parts of at most 8
    classes, each as int32 words of two logits (`_pair_part`); its even and odd classes are computed apart (all
    added to acc0) and joined again for the store. acc1 .. acc3 are passed through.
    There, with a scalar alpha, an ignored anchor's words are set to 0 and its factors to 0 (a select per word and
    per row instead of one per logit: a NaN logit of an ignored anchor still gives 0).
    STATS (MODE 0): also store the tile's row sums, stats[anchor * n_ct + ct] (the anchor's loss over the tile's
    classes; n_ct = ceil(C / BLOCK_C))."""
    # Scalar bases of the tile (its first row and class) plus per-lane offsets that do not change from tile to tile
    # (the compiler keeps those in registers: one address instruction per access).
    lanes = tl.arange(0, BLOCK_HW)
    cols = tl.arange(0, BLOCK_C)
    row_mask = (row0 + lanes) < hw
    lab_tile = lab_ptr + (anchor_base + row0 * A)
    lane_anchor = lanes * A
    if MASKED:
        label = tl.load(lab_tile + lane_anchor, mask=row_mask, other=-1)
    else:
        label = tl.load(lab_tile + lane_anchor)
    rel = _class_in_tile(label, c_start, BLOCK_C)
    keep = label != ignore_index
    w = 1.0
    if HAS_WEIGHT:
        if MASKED:
            w = tl.load(w_ptr + (anchor_base + row0 * A) + lane_anchor, mask=row_mask, other=0.0).to(COMPUTE_DTYPE)
        else:
            w = tl.load(w_ptr + (anchor_base + row0 * A) + lane_anchor).to(COMPUTE_DTYPE)
    score = 0.0
    if LOSS_KIND >= 2:
        if MASKED:
            score = tl.load(s_ptr + (anchor_base + row0 * A) + lane_anchor, mask=row_mask,
                            other=0.0).to(COMPUTE_DTYPE)
        else:
            score = tl.load(s_ptr + (anchor_base + row0 * A) + lane_anchor).to(COMPUTE_DTYPE)
    # Element (position p, channel k) of the image block: p sp + k (CHANNELS_LAST: sk = 1), k sk + p (positions
    # contiguous: sp = 1), or (GENERIC) (p // W) sh + (p % W) sp + k sk.
    if GENERIC:
        pos = row0 + lanes
        h = pos // wd
        base = (a * C + c_start) * sk
        offs = (h * sh + (pos - h * wd) * sp)[:, None] + cols[None, :] * sk
    elif CHANNELS_LAST:
        base = row0 * sp + a * C + c_start
        offs = lanes[:, None] * sp + cols[None, :]
    else:
        base = (a * C + c_start) * sk + row0
        offs = cols[None, :] * sk + lanes[:, None]
    mask = row_mask[:, None] & ((c_start + cols) < C)[None, :]
    x_ptr += base
    o_ptr += base
    g_ptr += base
    if PAIRS:
        ZEROED: tl.constexpr = HAS_IGNORE and (not HAS_ALPHA) and (LOSS_KIND == 0)
        SELECT: tl.constexpr = HAS_IGNORE and not ZEROED
        if ZEROED:
            zero = tl.zeros([BLOCK_HW], COMPUTE_DTYPE)
            lc0 = tl.where(keep, lc0, zero)[:, None]
            lc1 = tl.where(keep, lc1, zero)[:, None]
            gc0 = tl.where(keep, gc0, zero)[:, None]
            gc1 = tl.where(keep, gc1, zero)[:, None]
        PART_C: tl.constexpr = 8 if BLOCK_C > 8 else BLOCK_C
        l0, l1 = _pair_part(x_ptr, o_ptr, g_ptr, 0, lanes, sp, rel, keep, row_mask, c_start, C, w, score, alpha_ptr,
                            g0, lc0, lc1, gc0, gc1, gamma, beta, half_smoothing, MODE, STATS, MASKED, ZEROED, SELECT,
                            LOSS_KIND, GAMMA, HAS_WEIGHT, HAS_ALPHA, SMOOTH, FAST, SHORT, COMPUTE_DTYPE, BLOCK_HW,
                            PART_C)
        l2 = tl.zeros_like(l0)
        l3 = tl.zeros_like(l1)
        if BLOCK_C > PART_C:
            l2, l3 = _pair_part(x_ptr, o_ptr, g_ptr, 1, lanes, sp, rel, keep, row_mask, c_start, C, w, score,
                                alpha_ptr, g0, lc0, lc1, gc0, gc1, gamma, beta, half_smoothing, MODE, STATS, MASKED,
                                ZEROED, SELECT, LOSS_KIND, GAMMA, HAS_WEIGHT, HAS_ALPHA, SMOOTH, FAST, SHORT,
                                COMPUTE_DTYPE, BLOCK_HW, PART_C)
        if MODE == 0:
            quad = tl.arange(0, PART_C // 2)
            m0 = row_mask[:, None] & ((c_start + 2 * quad) < C)[None, :]
            m1 = row_mask[:, None] & ((c_start + PART_C + 2 * quad) < C)[None, :]
            # One accumulator for the four quarters (same shape): registers, not instructions (the adds chain).
            acc0 = _accumulate(acc0, l0, keep, m0, SELECT, MASKED)
            acc0 = _accumulate(acc0, l1, keep, m0, SELECT, MASKED)
            if BLOCK_C > PART_C:
                acc0 = _accumulate(acc0, l2, keep, m1, SELECT, MASKED)
                acc0 = _accumulate(acc0, l3, keep, m1, SELECT, MASKED)
            if STATS:
                slot = (anchor_base + row0 * A + lane_anchor) * tl.cdiv(C, BLOCK_C) + ct
                row_sum = tl.sum(l0, axis=1) + tl.sum(l1, axis=1) + tl.sum(l2, axis=1) + tl.sum(l3, axis=1)
                tl.store(stats_ptr + slot, row_sum, mask=row_mask)
    else:
        if MASKED:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        else:
            x = tl.load(x_ptr + offs).to(COMPUTE_DTYPE)
        loss, grad = _terms(x, tl.abs(x), x >= 0, rel, cols, c_start, C, score, alpha_ptr, g0, lc0, lc1, gc0, gc1,
                            gamma, beta, half_smoothing, LOSS_KIND, GAMMA, HAS_ALPHA, SMOOTH, FAST, SHORT,
                            COMPUTE_DTYPE)
        loss, grad = _finish(loss, grad, w, keep, mask, HAS_WEIGHT, HAS_IGNORE, MASKED, MODE, STATS)
        if MODE == 0:
            acc0 = _accumulate(acc0, loss, keep, mask, HAS_IGNORE, MASKED)
            if STATS:
                slot = (anchor_base + row0 * A + lane_anchor) * tl.cdiv(C, BLOCK_C) + ct
                tl.store(stats_ptr + slot, tl.sum(loss, axis=1), mask=row_mask)
        elif MODE == 1:
            _store(o_ptr, offs, mask, loss, MASKED)
        elif MODE == 2:
            _store(o_ptr, offs, mask, grad, MASKED)
        else:
            if MASKED:
                g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            else:
                g = tl.load(g_ptr + offs).to(COMPUTE_DTYPE)
            _store(o_ptr, offs, mask, g * grad, MASKED)
    return acc0, acc1, acc2, acc3


@triton.jit
def _store(ptr, offs, mask, value, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))


@triton.jit
def _tile_step(j, P, ht, a, ct, d_ht, d_a, d_ct, n_ct, acc0, acc1, acc2, acc3, xp, op, gp, lab_ptr, w_ptr, s_ptr,
               alpha_ptr, stats_ptr, hw, sk, sp, sh, wd, A, C, anchor_level, g0, lc0, lc1, gc0, gc1, gamma, beta,
               half_smoothing, ignore_index, MODE: tl.constexpr, STATS: tl.constexpr, MASKED: tl.constexpr,
               CHANNELS_LAST: tl.constexpr, GENERIC: tl.constexpr, PAIRS: tl.constexpr, ROW_PAIRS: tl.constexpr,
               LOSS_KIND: tl.constexpr,
               GAMMA: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr,
               SMOOTH: tl.constexpr, FAST: tl.constexpr, SHORT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
               BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile j of one segment, of one kind (masked or not, layout, pairs), added to the accumulators; returns the
    program's next tile (j + P), its coordinates and the accumulators (ROW_PAIRS: 1 the NCHW pair tile in words, 2
    in halves). (The tile loops are in the kernel, each on its own source line, by which the per-logit report names
    them: focal_triton/roofline.py.) The tile reads the labels
    (weights, scores, statistics) from pointers at the segment's first anchor of the image (anchor_level), with the
    in-segment anchor index in int32 (one wide multiply-add per address instead of 64-bit index arithmetic)."""
    if ROW_PAIRS:
        acc0 = _nchw_pair_tile(xp, op, gp, lab_ptr + anchor_level, w_ptr + anchor_level, s_ptr + anchor_level,
                               alpha_ptr, stats_ptr + anchor_level * n_ct, sk, A, C, a, ht * BLOCK_HW,
                               ct * BLOCK_C, ct, a, acc0, g0, lc0, lc1, gc0, gc1, gamma, beta,
                               half_smoothing, ignore_index, MODE, STATS, LOSS_KIND, GAMMA, HAS_IGNORE, HAS_WEIGHT,
                               HAS_ALPHA, SMOOTH, FAST, SHORT, COMPUTE_DTYPE, BLOCK_HW, BLOCK_C, ROW_PAIRS == 2)
    else:
        acc0, acc1, acc2, acc3 = _tile(
            xp, op, gp, lab_ptr + anchor_level, w_ptr + anchor_level, s_ptr + anchor_level, alpha_ptr,
            stats_ptr + anchor_level * n_ct, hw, sk, sp, sh, wd, A, C, a, ht * BLOCK_HW, ct * BLOCK_C, ct, a, acc0,
            acc1, acc2, acc3, g0, lc0, lc1, gc0, gc1, gamma, beta,
            half_smoothing, ignore_index, MODE, STATS, MASKED, CHANNELS_LAST, GENERIC, PAIRS, LOSS_KIND, GAMMA,
            HAS_IGNORE, HAS_WEIGHT,
            HAS_ALPHA, SMOOTH, FAST, SHORT, COMPUTE_DTYPE, BLOCK_HW, BLOCK_C)
    ht, a, ct = _advance(ht, a, ct, d_ht, d_a, d_ct, A, n_ct)
    return j + P, ht, a, ct, acc0, acc1, acc2, acc3


@triton.jit(do_not_specialize=_INT_ARGS)
def multilevel_focal_kernel(
    # logits of each segment (unused slots repeat x0)
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
    # loss ("none") or gradient of each segment
    o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15,
    # upstream gradients (MODE 3)
    g0_, g1_, g2_, g3_, g4_, g5_, g6_, g7_, g8_, g9_, g10_, g11_, g12_, g13_, g14_, g15_,
    # positions of each segment (H * W)
    hw0, hw1, hw2, hw3, hw4, hw5, hw6, hw7, hw8, hw9, hw10, hw11, hw12, hw13, hw14, hw15,
    # first per-image tile of each segment (segment 0 starts at 0)
    ts1, ts2, ts3, ts4, ts5, ts6, ts7, ts8, ts9, ts10, ts11, ts12, ts13, ts14, ts15,
    # image stride of each segment's logits
    sn0, sn1, sn2, sn3, sn4, sn5, sn6, sn7, sn8, sn9, sn10, sn11, sn12, sn13, sn14, sn15,
    # image stride of its loss / gradient / upstream gradient
    on0, on1, on2, on3, on4, on5, on6, on7, on8, on9, on10, on11, on12, on13, on14, on15,
    # channel stride
    sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7, sk8, sk9, sk10, sk11, sk12, sk13, sk14, sk15,
    # position stride (GENERIC: of the W axis)
    sp0, sp1, sp2, sp3, sp4, sp5, sp6, sp7, sp8, sp9, sp10, sp11, sp12, sp13, sp14, sp15,
    # GENERIC: stride of the H axis
    sh0, sh1, sh2, sh3, sh4, sh5, sh6, sh7, sh8, sh9, sh10, sh11, sh12, sh13, sh14, sh15,
    # GENERIC: W
    wd0, wd1, wd2, wd3, wd4, wd5, wd6, wd7, wd8, wd9, wd10, wd11, wd12, wd13, wd14, wd15,
    lab_ptr, w_ptr, s_ptr, alpha_ptr, partials_ptr, grad_scalar_ptr, scale_ptr, stats_ptr,
    tiles_per_image, label_row, num_levels, cl_mask, generic_mask, N, P, A, C, grad_stride, scale_stride,
    c0, c1, gamma, beta, smoothing, ignore_index,
    MODE: tl.constexpr, LOSS_KIND: tl.constexpr, GAMMA: tl.constexpr, HAS_IGNORE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_ALPHA: tl.constexpr, SMOOTH: tl.constexpr, CLASS_ALIGNED: tl.constexpr,
    FAST: tl.constexpr, SHORT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr, STATS: tl.constexpr, HAS_GENERIC: tl.constexpr,
):
    """Forward (MODE 0: one partial sum per (segment, image, program) into partials[(s N + n) P + p]; MODE 1:
    elementwise loss) or backward (MODE 2: the upstream scalar grad_scalar[s grad_stride] times
    scale[s scale_stride + n]; MODE 3: per-segment upstream gradients) over every segment. The backward recomputes
    everything from the logits and labels (the forward saves nothing of logit size).
    STATS (MODE 0 only): per-(anchor, class tile) loss sums into stats (N * label_row * ceil(C / BLOCK_C),), the
    by-product from which `focal_triton.stats` builds loss statistics.

    Options are compile-time (GAMMA: an integer gamma or -1; HAS_IGNORE, HAS_WEIGHT, HAS_ALPHA: a per-class alpha
    tensor; SMOOTH: label smoothing != 0; HAS_GENERIC: some segment takes the generic gather), so the common case
    carries none of their loads and selects. FAST: float32 math in math.py's short forms; SHORT: the backward of
    16-bit logits, whose gradient is rounded to 16 bits, takes the short log1p. Per segment, each layout has its
    own tile loops: the full tiles (a prefix of the segment's tiles in (position tile, anchor, class tile) order,
    unmasked) and then the edge tiles (masked); the generic gather has one, masked."""
    if CLASS_ALIGNED:
        C = (C // 16) * 16  # == C; tells the compiler that class rows are 16-element aligned
    pid = tl.program_id(0)
    n = pid // P
    j = pid % P
    program = j
    n_ct = tl.cdiv(C, BLOCK_C)
    # P = (d_ht A + d_a) n_ct + d_ct: the step of a program's tile coordinates (divisions once per program).
    d_ct = P % n_ct
    d_a = (P // n_ct) % A
    d_ht = P // (n_ct * A)
    # One accumulator per layout: the two layouts' tiles live in different register layouts, and adding one to the
    # other in the loop would move every tile through shared memory (once per segment is fine). channels_last bf16
    # tiles of a class-aligned head are read in pairs (even and odd classes: two half-width accumulators).
    PAIRS: tl.constexpr = CLASS_ALIGNED and (x0.dtype.element_ty == tl.bfloat16) and (BLOCK_C <= 16)
    CL_WIDTH: tl.constexpr = (4 if BLOCK_C > 8 else BLOCK_C // 2) if PAIRS else BLOCK_C
    acc = tl.zeros([BLOCK_HW, BLOCK_C], COMPUTE_DTYPE)
    unused = tl.zeros([BLOCK_HW, BLOCK_C], COMPUTE_DTYPE)  # never added to: acc1 .. acc3 of the NCHW tiles
    acc_cl0 = tl.zeros([BLOCK_HW, CL_WIDTH], COMPUTE_DTYPE)
    acc_cl1 = tl.zeros([BLOCK_HW, CL_WIDTH], COMPUTE_DTYPE)
    acc_cl2 = tl.zeros([BLOCK_HW, CL_WIDTH], COMPUTE_DTYPE)
    acc_cl3 = tl.zeros([BLOCK_HW, CL_WIDTH], COMPUTE_DTYPE)
    # NCHW bf16 full tiles of a class-aligned head are read in pairs of positions (two half-height accumulators):
    # as words where the class stride is even, as two halves at one address where it is odd.
    ROW_PAIRS: tl.constexpr = CLASS_ALIGNED and (x0.dtype.element_ty == tl.bfloat16)
    acc_np = tl.zeros([BLOCK_HW // 2 if ROW_PAIRS else 1, BLOCK_C], COMPUTE_DTYPE)
    # FL's per-side factors: alpha_t(0) = c0 off the label's class, alpha_t(1) = c1 on it; the gradient's carry
    # g0 (per segment) and, on the label's class, the sign of dz/dx = -1.
    # (Scalars as COMPUTE_DTYPE values: a select of two Python floats would be float32 in the interpreter.)
    lc0 = tl.full([], c0, COMPUTE_DTYPE)
    lc1 = tl.full([], c1, COMPUTE_DTYPE)
    half_smoothing = 0.5 * tl.full([], smoothing, COMPUTE_DTYPE)
    label_base = n.to(tl.int64) * label_row
    mb = 0  # label columns of the segments before this one
    lvl = 0
    while lvl < num_levels:
        if MODE == 2:
            g0 = tl.load(grad_scalar_ptr + lvl * grad_stride).to(COMPUTE_DTYPE) * \
                tl.load(scale_ptr + lvl * scale_stride + n).to(COMPUTE_DTYPE)
        else:
            g0 = 1.0
        gc0 = lc0 * g0
        gc1 = lc1 * -g0
        # This segment's pointers, sizes and strides, picked once per segment; tile numbers run on across segments.
        hw = _pick(lvl, hw0, hw1, hw2, hw3, hw4, hw5, hw6, hw7, hw8, hw9, hw10, hw11, hw12, hw13, hw14, hw15)
        start = _pick(lvl, 0, ts1, ts2, ts3, ts4, ts5, ts6, ts7, ts8, ts9, ts10, ts11, ts12, ts13, ts14, ts15)
        end = _pick(lvl, ts1, ts2, ts3, ts4, ts5, ts6, ts7, ts8, ts9, ts10, ts11, ts12, ts13, ts14, ts15,
                    tiles_per_image)
        sn = _pick(lvl, sn0, sn1, sn2, sn3, sn4, sn5, sn6, sn7, sn8, sn9, sn10, sn11, sn12, sn13, sn14, sn15)
        on = _pick(lvl, on0, on1, on2, on3, on4, on5, on6, on7, on8, on9, on10, on11, on12, on13, on14, on15)
        sk = _pick(lvl, sk0, sk1, sk2, sk3, sk4, sk5, sk6, sk7, sk8, sk9, sk10, sk11, sk12, sk13, sk14, sk15)
        sp = _pick(lvl, sp0, sp1, sp2, sp3, sp4, sp5, sp6, sp7, sp8, sp9, sp10, sp11, sp12, sp13, sp14, sp15)
        xb = _pick(lvl, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
        ob = _pick(lvl, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15)
        gb = _pick(lvl, g0_, g1_, g2_, g3_, g4_, g5_, g6_, g7_, g8_, g9_, g10_, g11_, g12_, g13_, g14_, g15_)
        channels_last = ((cl_mask >> lvl) & 1) != 0
        generic = (((generic_mask >> lvl) & 1) != 0) if HAS_GENERIC else False
        # The program's first tile of the segment in (position tile, anchor, class tile) coordinates, and the end of
        # the full tiles: every position tile but the last partial one, where the class tiles are full too.
        local = j - start
        ct = local % n_ct
        a = (local // n_ct) % A
        ht = local // (n_ct * A)
        full_end = start
        if CLASS_ALIGNED:
            if C % BLOCK_C == 0:
                full_end = start + (hw // BLOCK_HW) * A * n_ct
        anchor_level = label_base + mb
        if generic:
            sh = _pick(lvl, sh0, sh1, sh2, sh3, sh4, sh5, sh6, sh7, sh8, sh9, sh10, sh11, sh12, sh13, sh14, sh15)
            wd = _pick(lvl, wd0, wd1, wd2, wd3, wd4, wd5, wd6, wd7, wd8, wd9, wd10, wd11, wd12, wd13, wd14, wd15)
            xp = xb + n.to(tl.int64) * sn
            op = ob + n.to(tl.int64) * on
            gp = gb + n.to(tl.int64) * on
            while j < end:  # tile loop: generic
                j, ht, a, ct, acc, _u1, _u2, _u3 = _tile_step(
                    j, P, ht, a, ct, d_ht, d_a, d_ct, n_ct, acc, unused, unused, unused, xp, op, gp, lab_ptr, w_ptr,
                    s_ptr, alpha_ptr, stats_ptr, hw, sk, sp, sh, wd, A, C, anchor_level, g0, lc0, lc1, gc0, gc1, gamma,
                    beta, half_smoothing, ignore_index, MODE, STATS, True, False, True, False, False, LOSS_KIND, GAMMA,
                    HAS_IGNORE, HAS_WEIGHT, HAS_ALPHA, SMOOTH, FAST, SHORT, COMPUTE_DTYPE, BLOCK_HW, BLOCK_C)
        elif channels_last:
            if CLASS_ALIGNED:  # the host checked: sn, on and sp are multiples of 16 here; tell the compiler
                sn = (sn // 16) * 16
                on = (on // 16) * 16
                sp = (sp // 16) * 16
            xp = xb + n.to(tl.int64) * sn  # first element of this image in the segment
            op = ob + n.to(tl.int64) * on
            gp = gb + n.to(tl.int64) * on
            if CLASS_ALIGNED:  # (otherwise no tile is full: the loop is not compiled)
                while j < full_end:  # tile loop: channels_last full
                    j, ht, a, ct, acc_cl0, acc_cl1, acc_cl2, acc_cl3 = _tile_step(
                        j, P, ht, a, ct, d_ht, d_a, d_ct, n_ct, acc_cl0, acc_cl1, acc_cl2, acc_cl3, xp, op, gp,
                        lab_ptr, w_ptr, s_ptr, alpha_ptr, stats_ptr, hw, sk, sp, sp, hw, A, C, anchor_level, g0, lc0,
                        lc1, gc0, gc1, gamma, beta, half_smoothing, ignore_index, MODE, STATS, False, True, False,
                        PAIRS, False, LOSS_KIND, GAMMA, HAS_IGNORE, HAS_WEIGHT, HAS_ALPHA, SMOOTH, FAST, SHORT,
                        COMPUTE_DTYPE, BLOCK_HW, BLOCK_C)
            while j < end:  # tile loop: channels_last edge
                j, ht, a, ct, acc_cl0, acc_cl1, acc_cl2, acc_cl3 = _tile_step(
                    j, P, ht, a, ct, d_ht, d_a, d_ct, n_ct, acc_cl0, acc_cl1, acc_cl2, acc_cl3, xp, op, gp, lab_ptr,
                    w_ptr, s_ptr, alpha_ptr, stats_ptr, hw, sk, sp, sp, hw, A, C, anchor_level, g0, lc0, lc1, gc0,
                    gc1, gamma, beta, half_smoothing, ignore_index, MODE, STATS, True, True, False, PAIRS, False,
                    LOSS_KIND, GAMMA, HAS_IGNORE, HAS_WEIGHT, HAS_ALPHA, SMOOTH, FAST, SHORT, COMPUTE_DTYPE, BLOCK_HW,
                    BLOCK_C)
        else:
            if CLASS_ALIGNED:  # the host checked: sn and on are multiples of 16 here
                sn = (sn // 16) * 16
                on = (on // 16) * 16
            xp = xb + n.to(tl.int64) * sn
            op = ob + n.to(tl.int64) * on
            gp = gb + n.to(tl.int64) * on
            # NCHW rows run along the positions, whose alignment is unknown (sizes are not specialized): narrow
            # loads; for bf16 64-bit ones (four positions) where the class stride is a multiple of 4, 32-bit ones
            # (two positions) where it is even, two 16-bit ones at one address where it is odd (the pair tile's
            # halves); the scalar full loop is the other dtypes'.
            if ROW_PAIRS:
                if sk % 4 == 0:
                    # (names not of the form sk<i>: those are the segments' arguments, read again by _pick)
                    sk_quads = (sk // 4) * 4  # == sk; tells the compiler that class rows start at 8-byte boundaries
                    while j < full_end:  # tile loop: NCHW full quads
                        j, ht, a, ct, acc_np, _u1, _u2, _u3 = _tile_step(
                            j, P, ht, a, ct, d_ht, d_a, d_ct, n_ct, acc_np, unused, unused, unused, xp, op, gp,
                            lab_ptr, w_ptr, s_ptr, alpha_ptr, stats_ptr, hw, sk_quads, sp, sp, hw, A, C, anchor_level,
                            g0, lc0, lc1, gc0, gc1, gamma, beta, half_smoothing, ignore_index, MODE, STATS, False,
                            False, False, False, True, LOSS_KIND, GAMMA, HAS_IGNORE, HAS_WEIGHT, HAS_ALPHA, SMOOTH,
                            FAST, SHORT, COMPUTE_DTYPE, BLOCK_HW, BLOCK_C)
                elif sk % 2 == 0:
                    sk_pairs = (sk // 2) * 2  # == sk; tells the compiler that class rows start at even elements
                    while j < full_end:  # tile loop: NCHW full pairs
                        j, ht, a, ct, acc_np, _u1, _u2, _u3 = _tile_step(
                            j, P, ht, a, ct, d_ht, d_a, d_ct, n_ct, acc_np, unused, unused, unused, xp, op, gp,
                            lab_ptr, w_ptr, s_ptr, alpha_ptr, stats_ptr, hw, sk_pairs, sp, sp, hw, A, C, anchor_level,
                            g0, lc0, lc1, gc0, gc1, gamma, beta, half_smoothing, ignore_index, MODE, STATS, False,
                            False, False, False, True, LOSS_KIND, GAMMA, HAS_IGNORE, HAS_WEIGHT, HAS_ALPHA, SMOOTH,
                            FAST, SHORT, COMPUTE_DTYPE, BLOCK_HW, BLOCK_C)
                else:
                    while j < full_end:  # tile loop: NCHW full halves
                        j, ht, a, ct, acc_np, _u1, _u2, _u3 = _tile_step(
                            j, P, ht, a, ct, d_ht, d_a, d_ct, n_ct, acc_np, unused, unused, unused, xp, op, gp,
                            lab_ptr, w_ptr, s_ptr, alpha_ptr, stats_ptr, hw, sk, sp, sp, hw, A, C, anchor_level,
                            g0, lc0, lc1, gc0, gc1, gamma, beta, half_smoothing, ignore_index, MODE, STATS, False,
                            False, False, False, 2, LOSS_KIND, GAMMA, HAS_IGNORE, HAS_WEIGHT, HAS_ALPHA, SMOOTH,
                            FAST, SHORT, COMPUTE_DTYPE, BLOCK_HW, BLOCK_C)
            if CLASS_ALIGNED and not ROW_PAIRS:
                while j < full_end:  # tile loop: NCHW full
                    j, ht, a, ct, acc, _u1, _u2, _u3 = _tile_step(
                        j, P, ht, a, ct, d_ht, d_a, d_ct, n_ct, acc, unused, unused, unused, xp, op, gp, lab_ptr,
                        w_ptr, s_ptr, alpha_ptr, stats_ptr, hw, sk, sp, sp, hw, A, C, anchor_level, g0, lc0, lc1, gc0,
                        gc1, gamma, beta, half_smoothing, ignore_index, MODE, STATS, False, False, False, False, False,
                        LOSS_KIND, GAMMA, HAS_IGNORE, HAS_WEIGHT, HAS_ALPHA, SMOOTH, FAST, SHORT, COMPUTE_DTYPE,
                        BLOCK_HW, BLOCK_C)
            while j < end:  # tile loop: NCHW edge
                j, ht, a, ct, acc, _u1, _u2, _u3 = _tile_step(
                    j, P, ht, a, ct, d_ht, d_a, d_ct, n_ct, acc, unused, unused, unused, xp, op, gp, lab_ptr, w_ptr,
                    s_ptr, alpha_ptr, stats_ptr, hw, sk, sp, sp, hw, A, C, anchor_level, g0, lc0, lc1, gc0, gc1, gamma,
                    beta, half_smoothing, ignore_index, MODE, STATS, True, False, False, False, False, LOSS_KIND,
                    GAMMA, HAS_IGNORE, HAS_WEIGHT, HAS_ALPHA, SMOOTH, FAST, SHORT, COMPUTE_DTYPE, BLOCK_HW, BLOCK_C)
        if MODE == 0:
            # The segment's partial sum of this (image, program); the accumulators start again from 0.
            total = tl.sum(tl.sum(acc, axis=1), axis=0) + \
                tl.sum(tl.sum(acc_cl0 + acc_cl1 + acc_cl2 + acc_cl3, axis=1), axis=0)
            total += tl.sum(tl.sum(acc_np, axis=1), axis=0)
            tl.store(partials_ptr + (lvl * N + n) * P + program, total)
            acc = tl.zeros([BLOCK_HW, BLOCK_C], COMPUTE_DTYPE)
            acc_cl0 = tl.zeros([BLOCK_HW, CL_WIDTH], COMPUTE_DTYPE)
            acc_cl1 = tl.zeros([BLOCK_HW, CL_WIDTH], COMPUTE_DTYPE)
            acc_cl2 = tl.zeros([BLOCK_HW, CL_WIDTH], COMPUTE_DTYPE)
            acc_cl3 = tl.zeros([BLOCK_HW, CL_WIDTH], COMPUTE_DTYPE)
            acc_np = tl.zeros([BLOCK_HW // 2 if ROW_PAIRS else 1, BLOCK_C], COMPUTE_DTYPE)
        mb += hw * A
        lvl += 1


@triton.jit(do_not_specialize=["S", "N", "P"])
def normalize_partials_kernel(partials_ptr, norm_ptr, scale_ptr, segment_ptr, out_ptr, S, N, P, norm_hi, norm_lo,
                              NORM_MODE: tl.constexpr, BLOCK: tl.constexpr):
    """One program. S_sn = sum of the P partials of segment s, image n (in order); scale_sn = 1 / v (NORM_MODE 0: a
    host number v = norm_hi + norm_lo, split in two float32 scalars so that float64 keeps 48 bits of it; 1 without
    normalizer), 1 / norm[0] (1: a 0-d tensor), 1 / (N norm[n]) (2: per image) or 1 / norm[s N + n] (3: one divisor
    per segment and image, the segments' own normalizers);
    segment[s] = sum_n S_sn scale_sn in image order, out = sum_s segment[s] in segment order, and scale[n] (modes
    0-2, shared by the segments) or scale[s N + n] (3) for the backward."""
    acc_dtype = partials_ptr.dtype.element_ty
    if NORM_MODE != 0:
        # The tensor normalizers' scales first, BLOCK at a time (float64's division is a call: here few values
        # are live across it, so nothing spills), read back by the sums after a barrier.
        count = S * N if NORM_MODE == 3 else N
        start = 0
        while start < count:
            offs = start + tl.arange(0, BLOCK)
            m = offs < count
            if NORM_MODE == 1:
                v = tl.load(norm_ptr + offs * 0, mask=m, other=1).to(acc_dtype)
            elif NORM_MODE == 2:
                v = tl.load(norm_ptr + offs, mask=m, other=1).to(acc_dtype) * N.to(acc_dtype)
            else:
                v = tl.load(norm_ptr + offs, mask=m, other=1).to(acc_dtype)
            tl.store(scale_ptr + offs, 1.0 / v, mask=m)
            start += BLOCK
        tl.debug_barrier()
    total = tl.sum(tl.zeros([BLOCK], acc_dtype), axis=0)
    s = 0
    while s < S:
        seg_total = tl.sum(tl.zeros([BLOCK], acc_dtype), axis=0)
        n = 0
        while n < N:
            acc = tl.zeros([BLOCK], acc_dtype)
            start = 0
            while start < P:
                offs = start + tl.arange(0, BLOCK)
                acc += tl.load(partials_ptr + (s * N + n) * P + offs, mask=offs < P, other=0.0)
                start += BLOCK
            if NORM_MODE == 0:
                scale = 1.0 / (tl.full([], norm_hi, acc_dtype) + tl.full([], norm_lo, acc_dtype))
                tl.store(scale_ptr + n, scale)
            elif NORM_MODE == 3:
                scale = tl.load(scale_ptr + s * N + n)
            else:
                scale = tl.load(scale_ptr + n)
            seg_total += tl.sum(acc, axis=0) * scale
            n += 1
        tl.store(segment_ptr + s, seg_total.to(segment_ptr.dtype.element_ty))
        total += seg_total
        s += 1
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------------------------
# Host side.

MODE_SUM, MODE_NONE, MODE_GRAD_SCALAR, MODE_GRAD_TENSOR = 0, 1, 2, 3
# Interpreter tiles: small, so test tensors take several position and class tiles per anchor, with masked edges.
INTERPRETER_TILE = (32, 4)
INTERPRETER_PROGRAMS_PER_IMAGE = 2
# Classes per tile on a GPU: 16 (COCO's 80 is five full tiles; 91 wastes 5 % of a tile's lanes on masked classes).
GPU_BLOCK_C = 16
# Positions per tile and warps on a GPU: 64 x 16 tiles; 16-bit logits of a class-aligned head with 2 warps (16
# logits, 32 bytes per thread: one row of 16 classes per thread in channels_last), float32 and the other 16-bit heads
# with 4 warps (8 logits; without the pair reads 16 logits per thread leave ptxas short of registers), float64 with
# 4 warps and 32 x 16 (4 logits). Wider rows per thread spread a tile's fixed work (its label, coordinates and
# addresses) over more logits; a row per thread keeps the label in the layout of the logits (no shuffle).
GPU_BLOCK_HW = 64


def gpu_num_warps(itemsize: int, class_aligned: bool = True) -> int:
    return 2 if (itemsize == 2 and class_aligned) else 4


def gpu_tile(itemsize: int):
    """(BLOCK_HW, BLOCK_C) on a GPU (see GPU_BLOCK_HW)."""
    return (GPU_BLOCK_HW // 2 if itemsize == 8 else GPU_BLOCK_HW), GPU_BLOCK_C


def tile_for(device: torch.device, itemsize: int, config: dict = None):
    """(BLOCK_HW, BLOCK_C) of a launch: the tuned config's where it holds one, else the heuristic."""
    if config and "BLOCK_HW" in config:
        return config["BLOCK_HW"], config["BLOCK_C"]
    return gpu_tile(itemsize) if compiled_path(device) else INTERPRETER_TILE


# Registers per thread of the bf16 kernels of class-aligned heads (those with the NCHW pair tiles), for every config:
# ptxas's own choice for them is 128, where the backward spills and the pair loops take 2 to 3 instructions per logit
# more (triton 3.6 and 3.8); with this budget (6 two-warp programs per SM, what these kernels took before it) ptxas
# schedules them without spills (docs/kernels.md).
PAIR_TILE_MAX_REGISTERS = 168


def max_registers(x_dtype, class_aligned: bool):
    """The maxnreg launch option of a compiled launch (None: ptxas's choice)."""
    return PAIR_TILE_MAX_REGISTERS if (x_dtype == torch.bfloat16 and class_aligned) else None


def launch_options(device: torch.device, itemsize: int, class_aligned: bool = True, config: dict = None,
                   x_dtype=None) -> dict:
    """num_warps (and num_stages where an older tuning file chose them) of a launch; maxnreg (max_registers) where
    it is compiled."""
    if config and "BLOCK_HW" in config:
        options = options_of(config)
    else:
        options = dict(num_warps=gpu_num_warps(itemsize, class_aligned) if compiled_path(device) else 1)
    budget = max_registers(x_dtype, class_aligned) if compiled_path(device) else None
    return options if budget is None else dict(options, maxnreg=budget)


def option_constexprs(weights, alpha_per_class, spec: LossSpec, ignore_index) -> dict:
    """The options compiled into a launch: an ignore value, per-anchor weights, a per-class alpha tensor, label
    smoothing. At most 16 combinations; the common case (none) carries none of their loads and selects."""
    return dict(HAS_IGNORE=ignore_index is not None, HAS_WEIGHT=weights is not None,
                HAS_ALPHA=alpha_per_class is not None, SMOOTH=float(spec.smoothing) != 0.0)


def tuning_key(mode: str, levels, num_anchors: int, spec: LossSpec, options: dict) -> str:
    """The tuning key of a launch (tuning.py): size bucket, C, channels_last mask, dtype, mode, and what changes
    the compiled kernel beyond them: the loss kind, the exponent specialization (GAMMA) and the compiled-in options
    (`option_constexprs`)."""
    x = levels[0]
    layouts = [segment_layout(lv) for lv in levels]
    cl_mask = sum(1 << i for i, lay in enumerate(layouts) if lay.kind == LAYOUT_CL)
    cl_mask |= sum(1 << (16 + i) for i, lay in enumerate(layouts) if lay.kind == LAYOUT_GENERIC)
    tag = "".join(flag for flag, on in zip("iwas", options.values()) if on)
    mode = mode if spec.kind == FL else f"{mode} kind={int(spec.kind)}"
    mode += power_key(spec_power(spec)) + (f" opts={tag}" if tag else "")
    return make_key("multilevel", sum(lv.numel() for lv in levels), x.shape[1] // num_anchors, cl_mask, x.dtype,
                    mode)


def kernel_constexprs(x_dtype, mode: int, power: int, class_aligned: bool, tile, loss_kind: int = FL,
                      stats: bool = False, has_ignore: bool = False, has_weight: bool = False,
                      has_alpha: bool = False, smooth: bool = False, has_generic: bool = False,
                      gpu: bool = None) -> dict:
    """gpu: `fast_math`'s (True for the ahead-of-time check)."""
    return dict(MODE=mode, LOSS_KIND=loss_kind, GAMMA=power, HAS_IGNORE=has_ignore, HAS_WEIGHT=has_weight,
                HAS_ALPHA=has_alpha, SMOOTH=smooth, CLASS_ALIGNED=class_aligned, FAST=fast_math(x_dtype, gpu),
                SHORT=short_log(x_dtype, mode >= MODE_GRAD_SCALAR, loss_kind == FL and not smooth),
                COMPUTE_DTYPE=triton_compute_dtype(x_dtype),
                BLOCK_HW=tile[0], BLOCK_C=tile[1], STATS=stats, HAS_GENERIC=has_generic)


class Plan:
    """Host-side integers of one call (from shapes, strides and addresses only: nothing is read from the device)."""

    def __init__(self, levels, num_anchors: int, device: torch.device, itemsize: int, config: dict = None,
                 outs=()):
        self.N, self.K = levels[0].shape[0], levels[0].shape[1]
        self.A = num_anchors
        self.C = self.K // num_anchors
        self.config = config
        self.tile = tile_for(device, itemsize, config)
        self.hw = [x.shape[2] * x.shape[3] for x in levels]
        self.layouts = [segment_layout(x) for x in levels]
        self.cl_mask = sum(1 << i for i, lay in enumerate(self.layouts) if lay.kind == LAYOUT_CL)
        self.generic_mask = sum(1 << i for i, lay in enumerate(self.layouts) if lay.kind == LAYOUT_GENERIC)
        self.out_strides = [o.stride(0) for o in outs] if outs else [out_image_stride(x) for x in levels]
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
        self.itemsize = itemsize
        self.dtype = levels[0].dtype
        self.class_aligned = self._class_aligned(levels, outs)

    def _class_aligned(self, levels, outs) -> bool:
        """CLASS_ALIGNED: C % 16 == 0 and, in every segment but the generic ones, the image strides (and for
        channels_last the position stride) multiples of 16 and the logits (and outputs) 16-byte aligned: the
        kernel then tells the compiler so, for full tiles and wide loads."""
        if self.C % 16:
            return False
        for i, (lay, x) in enumerate(zip(self.layouts, levels)):
            if lay.kind == LAYOUT_GENERIC:
                continue
            if lay.sn % 16 or self.out_strides[i] % 16 or (lay.kind == LAYOUT_CL and lay.sp % 16):
                return False
            if any(t.data_ptr() % 16 for t in [x] + ([outs[i]] if outs else [])):
                return False
        return True

    def options(self) -> dict:
        return launch_options(self.device, self.itemsize, self.class_aligned, self.config, self.dtype)

    def level_args(self, tensors, fill):
        return list(tensors) + [fill] * (MAX_LEVELS - len(tensors))

    def layout_args(self) -> list:
        """sn, on, sk, sp, sh, wd of every slot (the kernel's argument groups of those names)."""
        lays = self.layouts
        return [*self.level_args([lay.sn for lay in lays], 0), *self.level_args(self.out_strides, 0),
                *self.level_args([lay.sk for lay in lays], 0), *self.level_args([lay.sp for lay in lays], 0),
                *self.level_args([lay.sh for lay in lays], 0), *self.level_args([lay.wd for lay in lays], 1)]

    def programs_per_image(self, args, constexprs) -> int:
        if not compiled_path(self.device):
            cap = INTERPRETER_PROGRAMS_PER_IMAGE
        else:
            opts = self.options()
            cfg = ElementwiseConfig(self.tile[0] * self.tile[1], opts["num_warps"], num_stages=opts.get("num_stages"),
                                    maxnreg=opts.get("maxnreg"))
            # No integer argument is specialized, so their values do not change the compiled kernel: zeros keep
            # the occupancy cache to one entry per (dtype, constexprs) instead of one per combination of sizes.
            args = [0 if isinstance(a, int) and not isinstance(a, bool) else a for a in args]
            # Exactly one wave: floor, so that no program waits for a second round (at least one per image).
            cap = max(1, max_programs(multilevel_focal_kernel, args, constexprs, cfg, self.device) // self.N)
        return max(1, min(self.tiles_per_image, cap))


def _round_to_float32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _launch(mode, levels, outs, grads, labels, weights, scores, alpha_per_class, spec: LossSpec, ignore_index,
            num_anchors, config, partials_dtype=torch.float32, grad_scalar=None, scale=None, with_stats=False,
            label_row=None, per_segment=False):
    """Launch multilevel_focal_kernel once over every segment; returns (plan, programs per image, partials, stats)
    with partials (S, N, P) (MODE_SUM) and stats the (N, M) per-anchor losses when with_stats (MODE_SUM only), else
    None. label_row: the labels' row stride (default M, the segments' anchors); per_segment: grad_scalar (S,) and
    scale (S, N) hold one row per segment (else one shared by all)."""
    x = levels[0]
    plan = Plan(levels, num_anchors, x.device, x.element_size(), config, outs)
    options = option_constexprs(weights, alpha_per_class, spec, ignore_index)
    constexprs = kernel_constexprs(x.dtype, mode, spec_power(spec), plan.class_aligned, plan.tile, spec.kind,
                                   with_stats, options["HAS_IGNORE"], options["HAS_WEIGHT"], options["HAS_ALPHA"],
                                   options["SMOOTH"], plan.generic_mask != 0)
    dummy = torch.empty(1, dtype=torch.float32, device=x.device)
    class_tiles = -(-plan.C // plan.tile[1])
    stats = (torch.empty(plan.N * plan.num_anchors_total * class_tiles, dtype=partials_dtype, device=x.device)
             if with_stats else dummy)
    label_row = plan.num_anchors_total if label_row is None else label_row
    ints = [plan.tiles_per_image, label_row, plan.num_levels, plan.cl_mask, plan.generic_mask, plan.N]
    # A per-class alpha is read in the kernel (HAS_ALPHA; spec's c0, c1 are then not read).
    scalars = [spec.c0, spec.c1, spec.gamma, spec.beta, float(spec.smoothing),
               0 if ignore_index is None else int(ignore_index)]
    strides = [1, plan.N] if per_segment else [0, 0]

    def args(partials, P):
        return [*plan.level_args(levels, x), *plan.level_args(outs, outs[0] if outs else x),
                *plan.level_args(grads, grads[0] if grads else x), *plan.level_args(plan.hw, 0), *plan.starts,
                *plan.layout_args(), labels, weights if weights is not None else dummy,
                scores if scores is not None else dummy, alpha_per_class if alpha_per_class is not None else dummy,
                partials, grad_scalar if grad_scalar is not None else dummy, scale if scale is not None else dummy,
                stats, *ints, P, plan.A, plan.C, *strides, *scalars]

    with device_guard(x.device):
        # Only the types and alignment of the arguments size the grid: an empty stand-in for the partial sums.
        P = plan.programs_per_image(args(torch.empty(0, dtype=partials_dtype, device=x.device), 1), constexprs)
        partials = torch.empty(plan.num_levels * plan.N * P if mode == MODE_SUM else 0, dtype=partials_dtype,
                               device=x.device)
        multilevel_focal_kernel[(plan.N * P,)](*args(partials, P), **plan.options(), **constexprs)
    # Each anchor's loss: its class tiles' row sums, added in class order (deterministic).
    per_anchor = stats.view(plan.N, plan.num_anchors_total, class_tiles).sum(-1) if with_stats else None
    return plan, P, partials, per_anchor


def _tuned(mode_name, levels, num_anchors, spec, weights, alpha_per_class, ignore_index, launch):
    options = option_constexprs(weights, alpha_per_class, spec, ignore_index)
    return tuning.run_tuned(levels[0].device, lambda: tuning_key(mode_name, levels, num_anchors, spec, options),
                            MULTILEVEL_CANDIDATES, launch)


def forward(levels, labels, weights, scores, alpha_per_class, spec: LossSpec, ignore_index, num_anchors, reduction,
            normalizer=None, norm_value=1.0, out_dtype=None, with_stats=False):
    """levels: NCHW-contiguous or channels_last (N, A*C, H, W) tensors, N * tiles > 0; labels (N, M) int32/int64
    contiguous; weights and scores (QFL / VFL) None or (N, M) contiguous in the compute dtype; alpha_per_class None
    or (C,) in the compute dtype; spec the loss (losses.LossSpec); ignore_index None or an int; normalizer None (the
    number norm_value), a 0-d tensor or an (N,) per-image tensor.

    "none": a list of per-level losses in each level's layout, in out_dtype (default: the levels' dtype; float32
    under autocast). "sum": (loss, scale), loss 0-d in the accumulation dtype (float32, float64 for float64 logits)
    and scale (N,) the per-image factor the normalizer gave (needed by the backward); with_stats adds a third
    output, the (N, M) per-anchor losses (weighted, 0 for ignored anchors, not normalized) in the accumulation
    dtype, from the same pass. On CUDA under the tuned config of `tuning_key`."""
    return _tuned(reduction, levels, num_anchors, spec, weights, alpha_per_class, ignore_index,
                  lambda config: _forward(levels, labels, weights, scores, alpha_per_class, spec, ignore_index,
                                          num_anchors, reduction, normalizer, norm_value, out_dtype, with_stats,
                                          config))


def _forward(levels, labels, weights, scores, alpha_per_class, spec, ignore_index, num_anchors, reduction,
             normalizer, norm_value, out_dtype, with_stats, config):
    x = levels[0]
    operands = (labels, weights, scores, alpha_per_class, spec, ignore_index, num_anchors, config)
    if reduction == "none":
        outs = [torch.empty_like(lv, dtype=out_dtype or lv.dtype) for lv in levels]
        _launch(MODE_NONE, levels, outs, [], *operands)
        return outs
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    plan, P, partials, per_anchor = _launch(MODE_SUM, levels, [], [], *operands, partials_dtype=acc_dtype,
                                            with_stats=with_stats)
    norm_mode = 0 if normalizer is None else (1 if normalizer.dim() == 0 else 2)
    total, _, scale = _normalize(partials, plan, P, normalizer, norm_mode, norm_value, acc_dtype)
    return (total, scale, per_anchor) if with_stats else (total, scale)


def _normalize(partials, plan, P, norm, norm_mode, norm_value, acc_dtype):
    """(total, per-segment losses (S,), scale) from the (S, N, P) partials: normalize_partials_kernel; scale (N,)
    for a shared normalizer (norm_mode 0-2), (S, N) for per-segment divisors (3)."""
    device = partials.device
    total = torch.empty((), dtype=acc_dtype, device=device)
    per_segment = torch.empty(plan.num_levels, dtype=acc_dtype, device=device)
    scale = torch.empty((plan.num_levels, plan.N) if norm_mode == 3 else (plan.N,), dtype=acc_dtype, device=device)
    norm_ptr = norm if norm is not None else torch.empty(1, dtype=torch.float32, device=device)
    with device_guard(device):
        hi = _round_to_float32(norm_value)
        final_args = (partials, norm_ptr, scale, per_segment, total, plan.num_levels, plan.N, P, hi,
                      float(norm_value) - hi)
        final = dict(NORM_MODE=norm_mode, BLOCK=PARTIAL_SUM_BLOCK)
        load_before_launch(normalize_partials_kernel, (1,), final_args, {}, final, device)
        normalize_partials_kernel[(1,)](*final_args, **final)
    return total, per_segment, scale


def backward(grads, levels, labels, weights, scores, alpha_per_class, spec: LossSpec, ignore_index, num_anchors,
             scale=None):
    """Gradients w.r.t. each level, in the level's layout and dtype. grads: one 0-d upstream gradient of the "sum"
    loss (then `scale` is the forward's per-image factor), or per-level upstream gradients laid out like the levels
    ("none")."""
    mode_name = "grad_scalar" if scale is not None else "grad_tensor"
    return _tuned(mode_name, levels, num_anchors, spec, weights, alpha_per_class, ignore_index,
                  lambda config: _backward(grads, levels, labels, weights, scores, alpha_per_class, spec,
                                           ignore_index, num_anchors, scale, config))


def _backward(grads, levels, labels, weights, scores, alpha_per_class, spec, ignore_index, num_anchors, scale,
              config):
    outs = [torch.empty_like(lv) for lv in levels]
    operands = (labels, weights, scores, alpha_per_class, spec, ignore_index, num_anchors, config)
    if scale is not None:
        _launch(MODE_GRAD_SCALAR, levels, outs, [], *operands, grad_scalar=grads[0], scale=scale)
    else:
        _launch(MODE_GRAD_TENSOR, levels, outs, grads, *operands)
    return outs


# --- segments: each its own view, labels (columns of one label tensor), normalizer ------------------------------

def segments_forward(levels, labels, label_row, weights, scores, alpha_per_class, spec: LossSpec, ignore_index,
                     num_anchors, divisors):
    """levels: (N, A*C, H_s, W_s) views of any non-overlapping strides (kernel layouts: `segment_layout`); labels
    (N, >= M) with row stride label_row, segment s owning the A H_s W_s columns after those of the segments before
    it; weights / scores None or laid out like the labels, in the compute dtype; divisors (S, N) in the compute
    dtype: segment s's loss is sum_n (sum of image n) / divisors[s, n].
    Returns (total 0-d, per-segment losses (S,), scale (S, N) = 1 / divisors for the backward)."""
    return _tuned("sum segments", levels, num_anchors, spec, weights, alpha_per_class, ignore_index,
                  lambda config: _segments_forward(levels, labels, label_row, weights, scores, alpha_per_class,
                                                   spec, ignore_index, num_anchors, divisors, config))


def _segments_forward(levels, labels, label_row, weights, scores, alpha_per_class, spec, ignore_index, num_anchors,
                      divisors, config):
    acc_dtype = torch.float64 if levels[0].dtype == torch.float64 else torch.float32
    plan, P, partials, _ = _launch(MODE_SUM, levels, [], [], labels, weights, scores, alpha_per_class, spec,
                                   ignore_index, num_anchors, config, partials_dtype=acc_dtype, label_row=label_row)
    return _normalize(partials, plan, P, divisors, 3, 1.0, acc_dtype)


def segments_backward(grad_per_segment, levels, outs, labels, label_row, weights, scores, alpha_per_class,
                      spec: LossSpec, ignore_index, num_anchors, scale):
    """Writes the gradients of sum_s grad_per_segment[s] * loss_s w.r.t. each segment's logits into outs (one
    tensor per segment, of its logits' shape: views into its source's gradient, the logits' own strides, or
    `layouts.out_strides`). scale: the forward's (S, N)."""
    _tuned("grad_scalar segments", levels, num_anchors, spec, weights, alpha_per_class, ignore_index,
           lambda config: _launch(MODE_GRAD_SCALAR, levels, outs, [], labels, weights, scores, alpha_per_class,
                                  spec, ignore_index, num_anchors, config, grad_scalar=grad_per_segment,
                                  scale=scale, label_row=label_row, per_segment=True))
