"""Triplet losses: torch's ``triplet_margin_loss`` (p-norm distances, eps, swap) fused with its gradient, and
batch-hard triplet mining (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss") by a tiled
pairwise-distance kernel that never holds the ``B x B`` matrix.

Derivations, byte and FLOP counts, design choices:
``docs/kernels/triplet.md``.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import join_f64, log1p, math_dtype, split_f64, to_element_type
from ._gemm import dot_precision
from ._launch import custom_launcher
from .configs import batch_hard_loss_config, batch_hard_mine_config, triplet_config


def norm_kind(p):
    """The ``NORM`` constexpr for a p-norm exponent (any real number or +-inf, as torch accepts): the special
    cases get exact formulas ("max" is p = +inf, "min" p = -inf), every other p the "general" power form."""
    special = {1.0: "one", 2.0: "two", float("inf"): "max", float("-inf"): "min", 0.0: "zero"}
    return special.get(float(p), "general")


@triton.jit
def _pow(base, exponent):
    """base ** exponent for base >= 0 (0 and inf included, NaN gives NaN) and exponent != 0, elementwise."""
    positive = base > 0.0
    power = tl.exp2(exponent * tl.log2(tl.where(positive, base, 1.0)))
    at_zero = tl.where(exponent > 0.0, 0.0, float("inf"))
    return tl.where(positive, power, tl.where(base == 0.0, at_zero, base))


@triton.jit
def _norm_init(BLOCK_R: tl.constexpr, NORM: tl.constexpr, DTYPE: tl.constexpr):
    """Running per-row (accumulator, count of extremal entries, count of NaN entries) before the first tile."""
    if NORM == "max":
        acc = tl.full([BLOCK_R], -1.0, DTYPE)  # below any |v|
    elif NORM == "min":
        acc = tl.full([BLOCK_R], float("inf"), DTYPE)
    else:
        acc = tl.zeros([BLOCK_R], DTYPE)
    return acc, tl.zeros([BLOCK_R], DTYPE), tl.zeros([BLOCK_R], DTYPE)


@triton.jit
def _norm_update(acc, count, nans, v, mask, p, NORM: tl.constexpr):
    """Merge a [BLOCK_R, BLOCK_D] tile of differences into the running (accumulator, count, NaN count) of each
    row: the sum of |v|^p (sum of v^2, of |v|, of [v != 0]; NaN propagates through the sum), or the max / min of
    the non-NaN |v|, how many entries attain it and how many are NaN (the norm is then NaN: ``_norm_finish``)."""
    a = tl.abs(v)
    if NORM == "max" or NORM == "min":
        keep = mask & (v == v)
        nans += tl.sum(tl.where(mask & (v != v), 1.0, 0.0), axis=1)
        if NORM == "max":
            a = tl.where(keep, a, -1.0)
            tile = tl.max(a, axis=1)
            replaces = tile > acc
        else:
            a = tl.where(keep, a, float("inf"))
            tile = tl.min(a, axis=1)
            replaces = tile < acc
        tile_count = tl.sum(tl.where(keep & (a == tile[:, None]), 1.0, 0.0), axis=1)
        count = tl.where(replaces, tile_count, tl.where(tile == acc, count + tile_count, count))
        acc = tl.where(replaces, tile, acc)
    elif NORM == "two":
        acc += tl.sum(tl.where(mask, v * v, 0.0), axis=1)
    elif NORM == "one":
        acc += tl.sum(tl.where(mask, a, 0.0), axis=1)
    elif NORM == "zero":
        acc += tl.sum(tl.where(mask & (v != 0.0), 1.0, 0.0), axis=1)
    else:  # padded lanes: base 1 (no inf for p < 0 to discard), then weight 0
        acc += tl.sum(tl.where(mask, _pow(tl.where(mask, a, 1.0), p), 0.0), axis=1)
    return acc, count, nans


@triton.jit
def _norm_finish(acc, nans, row_mask, p, NORM: tl.constexpr):
    """The norm of each row from its accumulators; 0 on padded rows, so that nothing downstream subtracts
    infinities there (p < 0 and p = -inf give inf on an all-padding row)."""
    if NORM == "two":
        norm = tl.sqrt(acc)
    elif NORM == "general":
        norm = _pow(acc, 1.0 / p)
    elif NORM == "max" or NORM == "min":
        norm = tl.where(nans > 0.0, float("nan"), acc)
    else:
        norm = acc
    return tl.where(row_mask, norm, 0.0)


@triton.jit
def _norm_grad_factor(norm, count, nans, p, NORM: tl.constexpr):
    """Per-row factor f with d||v||/dv = f * _norm_grad_direction(v) (docs/kernels/triplet.md), NaN and inf where
    torch's ``norm_backward`` forms them: ``1 / norm`` (p = 2) and ``norm^(1 - p)`` are NaN for a NaN norm and 0
    for an infinite one (p > 1); only an exact 0 is masked."""
    if NORM == "two":
        return tl.where(norm == 0.0, 0.0, 1.0 / norm)
    elif NORM == "max" or NORM == "min":
        # the entries at the extremum share the gradient; with NaN entries, they do (torch's mask is
        # |v| == norm or isnan(v)). At least 1 on real rows; padded rows have 0.
        return 1.0 / tl.maximum(tl.where(nans > 0.0, nans, count), 1.0)
    elif NORM == "general":
        return tl.where(norm == 0.0, 0.0, _pow(norm, 1.0 - p))
    else:
        return tl.zeros(norm.shape, norm.dtype) + 1.0


@triton.jit
def _sign(v):
    return tl.where(v > 0.0, 1.0, tl.where(v < 0.0, -1.0, 0.0)).to(v.dtype)


@triton.jit
def _norm_grad_direction(v, norm, p, NORM: tl.constexpr):
    if NORM == "two":
        return v
    elif NORM == "max" or NORM == "min":
        return tl.where(tl.abs(v) == norm[:, None], _sign(v), 0.0)
    elif NORM == "general":
        # torch masks v = 0 (where |v|^(p - 1) is inf for p < 1); sign(NaN) is 0 there too, times NaN
        return tl.where(v == 0.0, 0.0, _sign(v) * _pow(tl.abs(v), p - 1.0))
    else:
        return _sign(v)


@triton.jit
def _load_triplet_tile(anchor_ptr, positive_ptr, negative_ptr, anchor_base, positive_base, negative_base, cols, mask,
                       stride_anchor_col, stride_positive_col, stride_negative_col, DTYPE: tl.constexpr):
    """A [BLOCK_R, BLOCK_D] tile of each input in the compute dtype; 64-bit column offsets, since a transposed
    input's column stride is its row count."""
    cols = cols.to(tl.int64)[None, :]
    a = tl.load(anchor_ptr + anchor_base[:, None] + cols * stride_anchor_col, mask=mask).to(DTYPE)
    pos = tl.load(positive_ptr + positive_base[:, None] + cols * stride_positive_col, mask=mask).to(DTYPE)
    neg = tl.load(negative_ptr + negative_base[:, None] + cols * stride_negative_col, mask=mask).to(DTYPE)
    return a, pos, neg


@triton.jit
def _triplet_kernel(
    # pointers
    anchor_ptr, positive_ptr, negative_ptr, grad_scale_ptr,
    loss_ptr, grad_anchor_ptr, grad_positive_ptr, grad_negative_ptr,
    # shapes
    n_rows, dim,
    # strides (in elements; a broadcast row has stride 0)
    stride_anchor_row, stride_anchor_col, stride_positive_row, stride_positive_col,
    stride_negative_row, stride_negative_col,
    # constants
    margin_hi, margin_lo, eps_hi, eps_lo, p_hi, p_lo,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr, SWAP: tl.constexpr,
    WRITE_LOSS: tl.constexpr, SCALE_PER_ROW: tl.constexpr, COMPUTE_ANCHOR_GRAD: tl.constexpr,
    COMPUTE_POSITIVE_GRAD: tl.constexpr, COMPUTE_NEGATIVE_GRAD: tl.constexpr, DTYPE: tl.constexpr,
):
    """Per-row triplet loss (``WRITE_LOSS``, compute dtype) and the gradients of the requested inputs, times
    ``grad_scale`` (a scalar, or one value per row with ``SCALE_PER_ROW``), into contiguous (rows, dim)
    buffers."""
    margin = join_f64(margin_hi, margin_lo, DTYPE)
    eps = join_f64(eps_hi, eps_lo, DTYPE)
    p = join_f64(p_hi, p_lo, DTYPE)
    COMPUTE_GRAD: tl.constexpr = COMPUTE_ANCHOR_GRAD or COMPUTE_POSITIVE_GRAD or COMPUTE_NEGATIVE_GRAD

    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    anchor_base = rows * stride_anchor_row
    positive_base = rows * stride_positive_row
    negative_base = rows * stride_negative_row

    acc_ap, count_ap, nans_ap = _norm_init(BLOCK_R, NORM, DTYPE)
    acc_an, count_an, nans_an = _norm_init(BLOCK_R, NORM, DTYPE)
    acc_pn, count_pn, nans_pn = _norm_init(BLOCK_R, NORM, DTYPE)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < dim)[None, :]
        a, pos, neg = _load_triplet_tile(anchor_ptr, positive_ptr, negative_ptr, anchor_base, positive_base,
                                         negative_base, cols, mask, stride_anchor_col, stride_positive_col,
                                         stride_negative_col, DTYPE)
        acc_ap, count_ap, nans_ap = _norm_update(acc_ap, count_ap, nans_ap, a - pos + eps, mask, p, NORM)
        acc_an, count_an, nans_an = _norm_update(acc_an, count_an, nans_an, a - neg + eps, mask, p, NORM)
        if SWAP:
            acc_pn, count_pn, nans_pn = _norm_update(acc_pn, count_pn, nans_pn, pos - neg + eps, mask, p, NORM)
    d_ap = _norm_finish(acc_ap, nans_ap, row_mask, p, NORM)
    d_an = _norm_finish(acc_an, nans_an, row_mask, p, NORM)
    if SWAP:
        d_pn = _norm_finish(acc_pn, nans_pn, row_mask, p, NORM)
        # torch's minimum: NaN propagates; its backward halves the gradient on a tie and passes all of it to
        # each side that does not compare larger (both, when either is NaN)
        d_neg = tl.where((d_an < d_pn) | (d_an != d_an), d_an, d_pn)
        share_an = tl.where(d_an > d_pn, 0.0, tl.where(d_an == d_pn, 0.5, 1.0))
        share_pn = tl.where(d_an < d_pn, 0.0, tl.where(d_an == d_pn, 0.5, 1.0))
    else:
        d_neg = d_an
        share_an = tl.zeros([BLOCK_R], DTYPE) + 1.0
    hinge = margin + d_ap - d_neg
    if WRITE_LOSS:  # clamp_min(hinge, 0), NaN kept (tl.maximum drops it on GPUs)
        tl.store(loss_ptr + rows, tl.where(hinge < 0.0, 0.0, hinge).to(loss_ptr.dtype.element_ty), mask=row_mask)

    if COMPUTE_GRAD:
        if SCALE_PER_ROW:
            scale = tl.load(grad_scale_ptr + rows, mask=row_mask, other=0.0).to(DTYPE)
        else:
            scale = tl.load(grad_scale_ptr).to(DTYPE)
        active = tl.where(hinge >= 0.0, scale, 0.0)
        # dloss/dv for each difference v, as (per-row coefficient) * (direction of the tile).
        coef_ap = active * _norm_grad_factor(d_ap, count_ap, nans_ap, p, NORM)
        coef_an = -active * share_an * _norm_grad_factor(d_an, count_an, nans_an, p, NORM)
        if SWAP:
            coef_pn = -active * share_pn * _norm_grad_factor(d_pn, count_pn, nans_pn, p, NORM)
        grad_base = rows * dim
        num_blocks = tl.cdiv(dim, BLOCK_D)
        for i in range(0, num_blocks):
            cols = (num_blocks - 1 - i) * BLOCK_D + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols < dim)[None, :]
            a, pos, neg = _load_triplet_tile(anchor_ptr, positive_ptr, negative_ptr, anchor_base, positive_base,
                                             negative_base, cols, mask, stride_anchor_col, stride_positive_col,
                                             stride_negative_col, DTYPE)
            g_ap = coef_ap[:, None] * _norm_grad_direction(a - pos + eps, d_ap, p, NORM)
            g_an = coef_an[:, None] * _norm_grad_direction(a - neg + eps, d_an, p, NORM)
            grad_a = g_ap + g_an
            grad_p = -g_ap
            grad_n = -g_an
            if SWAP:
                g_pn = coef_pn[:, None] * _norm_grad_direction(pos - neg + eps, d_pn, p, NORM)
                grad_p += g_pn
                grad_n -= g_pn
            offs = grad_base[:, None] + cols[None, :]
            if COMPUTE_ANCHOR_GRAD:
                tl.store(grad_anchor_ptr + offs, to_element_type(grad_a, grad_anchor_ptr), mask=mask)
            if COMPUTE_POSITIVE_GRAD:
                tl.store(grad_positive_ptr + offs, to_element_type(grad_p, grad_positive_ptr), mask=mask)
            if COMPUTE_NEGATIVE_GRAD:
                tl.store(grad_negative_ptr + offs, to_element_type(grad_n, grad_negative_ptr), mask=mask)


@triton.jit
def _batch_hard_mine_kernel(
    # pointers
    embeddings_ptr, labels_ptr, hardest_positive_ptr, hardest_negative_ptr,
    # shapes
    n_rows, dim,
    # strides (in elements)
    stride_row, stride_col, stride_label,
    # constants
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """For BLOCK_M anchors: the index of the farthest positive and of the nearest negative (-1 when none),
    over column tiles of BLOCK_N candidates (docs/kernels/triplet.md). Labels of any integer dtype, compared in
    int64."""
    if ACC_DTYPE == tl.float64:
        big = 1.7976931348623157e308
    else:
        big = 3.4028234663852886e38
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    row_offs = rows.to(tl.int64) * stride_row
    row_labels = tl.load(labels_ptr + rows.to(tl.int64) * stride_label, mask=row_mask).to(tl.int64)
    # ||x_i||^2 only tells finite anchors from the rest (one more read of the anchor tile, d / BLOCK_N of the dots)
    row_sq = tl.zeros([BLOCK_M], ACC_DTYPE)
    for k_start in range(0, dim, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        a = tl.load(embeddings_ptr + row_offs[:, None] + ks.to(tl.int64)[None, :] * stride_col,
                    mask=row_mask[:, None] & (ks < dim)[None, :], other=0.0).to(ACC_DTYPE)
        row_sq += tl.sum(a * a, axis=1)
    # A non-finite anchor reads zeros instead (its loss is NaN whichever candidates it gets): its scores are then
    # the candidates' squared norms, finite and ranked like any other row's.
    anchor_mask = row_mask & (tl.abs(row_sq) < float("inf"))  # false for NaN too
    best_pos = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    best_neg = tl.full([BLOCK_M], float("inf"), ACC_DTYPE)
    best_pos_idx = tl.full([BLOCK_M], -1, tl.int32)
    best_neg_idx = tl.full([BLOCK_M], -1, tl.int32)
    for col_start in range(0, n_rows, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_mask = cols < n_rows
        col_offs = cols.to(tl.int64) * stride_row
        gram = tl.zeros([BLOCK_M, BLOCK_N], ACC_DTYPE)
        col_sq = tl.zeros([BLOCK_N], ACC_DTYPE)
        for k_start in range(0, dim, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_offs = ks.to(tl.int64) * stride_col
            k_mask = ks < dim
            a = tl.load(embeddings_ptr + row_offs[:, None] + k_offs[None, :],
                        mask=anchor_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(embeddings_ptr + col_offs[:, None] + k_offs[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            gram = tl.dot(a, tl.trans(b), gram, input_precision=PRECISION)
            b_acc = b.to(ACC_DTYPE)
            col_sq += tl.sum(b_acc * b_acc, axis=1)
        # ||x_i - x_j||^2 - ||x_i||^2, clamped so that an overflow stays apart from the no-candidate sentinels
        score = tl.minimum(tl.maximum(col_sq[None, :] - 2.0 * gram, -big), big)
        # Non-finite candidates (docs/kernels/triplet.md): a NaN one wins both extremes, an infinite one ranks at big
        # (the largest distance).
        nan_col = (col_sq != col_sq)[None, :]
        score = tl.where((col_sq == float("inf"))[None, :], big, score)
        key_pos = tl.where(nan_col, float("inf"), score)
        key_neg = tl.where(nan_col, float("-inf"), score)
        col_labels = tl.load(labels_ptr + cols.to(tl.int64) * stride_label, mask=col_mask).to(tl.int64)
        same = row_labels[:, None] == col_labels[None, :]
        is_pos = same & col_mask[None, :] & (rows[:, None] != cols[None, :])
        is_neg = (row_labels[:, None] != col_labels[None, :]) & col_mask[None, :]
        # Per tile: the extreme key and its first column (a row without candidates here gets -inf / +inf, which
        # never wins); a later tile replaces the running choice only when strictly better.
        tile_max, tile_argmax = tl.max(tl.where(is_pos, key_pos, float("-inf")), axis=1, return_indices=True)
        better = tile_max > best_pos
        best_pos = tl.where(better, tile_max, best_pos)
        best_pos_idx = tl.where(better, col_start + tile_argmax, best_pos_idx)
        tile_min, tile_argmin = tl.min(tl.where(is_neg, key_neg, float("inf")), axis=1, return_indices=True)
        better = tile_min < best_neg
        best_neg = tl.where(better, tile_min, best_neg)
        best_neg_idx = tl.where(better, col_start + tile_argmin, best_neg_idx)
    tl.store(hardest_positive_ptr + rows, best_pos_idx, mask=row_mask)
    tl.store(hardest_negative_ptr + rows, best_neg_idx, mask=row_mask)


@triton.jit
def _batch_hard_loss_kernel(
    # pointers
    embeddings_ptr, hardest_positive_ptr, hardest_negative_ptr, grad_scale_ptr,
    loss_ptr, grad_ptr, partner_grad_ptr,
    # shapes
    n_rows, dim,
    # strides (in elements; grad and partner_grad are contiguous)
    stride_row, stride_col,
    # constants
    margin_hi, margin_lo,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SOFT_MARGIN: tl.constexpr, WRITE_LOSS: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr, COMPUTE_GRAD: tl.constexpr, DETERMINISTIC: tl.constexpr, DTYPE: tl.constexpr,
):
    """Per-anchor loss from the mined indices (``WRITE_LOSS``), and its gradient times ``grad_scale`` (scalar,
    or per row with ``SCALE_PER_ROW``) atomically added into the zeroed (rows, dim) ``grad`` (compute dtype); with
    ``DETERMINISTIC``, the anchor terms written to ``grad`` and the positive / negative terms to rows ``i`` /
    ``rows + i`` of the (2 rows, dim) ``partner_grad``, every row of both (zeros for excluded anchors).
    NaN and inf propagate as in torch's ``clamp_min`` / ``softplus`` and ``norm_backward``."""
    margin = join_f64(margin_hi, margin_lo, DTYPE)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    pos = tl.load(hardest_positive_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    neg = tl.load(hardest_negative_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    valid = row_mask & (pos >= 0) & (neg >= 0)
    rows = rows.to(tl.int64)
    anchor_base = rows * stride_row
    pos_base = pos * stride_row
    neg_base = neg * stride_row

    sq_pos = tl.zeros([BLOCK_R], DTYPE)
    sq_neg = tl.zeros([BLOCK_R], DTYPE)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = valid[:, None] & (cols < dim)[None, :]
        col_offs = cols.to(tl.int64)[None, :] * stride_col
        a = tl.load(embeddings_ptr + anchor_base[:, None] + col_offs, mask=mask, other=0.0).to(DTYPE)
        diff_pos = a - tl.load(embeddings_ptr + pos_base[:, None] + col_offs, mask=mask, other=0.0).to(DTYPE)
        diff_neg = a - tl.load(embeddings_ptr + neg_base[:, None] + col_offs, mask=mask, other=0.0).to(DTYPE)
        sq_pos += tl.sum(diff_pos * diff_pos, axis=1)
        sq_neg += tl.sum(diff_neg * diff_neg, axis=1)
    d_pos = tl.sqrt(sq_pos)
    d_neg = tl.sqrt(sq_neg)
    z = d_pos - d_neg
    if SOFT_MARGIN:  # softplus(z), and its derivative sigmoid(z), without overflow (a NaN z reaches both via e)
        e = tl.exp(-tl.abs(z))
        loss = tl.maximum(z, 0.0) + log1p(e)
        dloss_dz = tl.where(z >= 0.0, 1.0, e) / (1.0 + e)
    else:  # clamp_min keeps NaN and passes the gradient at 0, as torch's does
        hinge = margin + z
        loss = tl.where(hinge < 0.0, 0.0, hinge)
        dloss_dz = tl.where(hinge >= 0.0, 1.0, 0.0)
    if WRITE_LOSS:
        tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0).to(loss_ptr.dtype.element_ty), mask=row_mask)

    if COMPUTE_GRAD:
        if SCALE_PER_ROW:
            scale = tl.load(grad_scale_ptr + rows, mask=row_mask, other=0.0).to(DTYPE)
        else:
            scale = tl.load(grad_scale_ptr).to(DTYPE)
        coef = tl.where(valid, scale * dloss_dz, 0.0)
        # torch's norm_backward: 0 at d = 0 only; coef / NaN is NaN and coef / inf is 0 (times an infinite
        # difference, NaN), as there
        coef_pos = tl.where(d_pos == 0.0, 0.0, coef / tl.where(d_pos == 0.0, 1.0, d_pos))
        coef_neg = tl.where(d_neg == 0.0, 0.0, coef / tl.where(d_neg == 0.0, 1.0, d_neg))
        num_blocks = tl.cdiv(dim, BLOCK_D)
        for i in range(0, num_blocks):
            cols = (num_blocks - 1 - i) * BLOCK_D + tl.arange(0, BLOCK_D)
            mask = valid[:, None] & (cols < dim)[None, :]
            col_offs = cols.to(tl.int64)[None, :] * stride_col
            a = tl.load(embeddings_ptr + anchor_base[:, None] + col_offs, mask=mask, other=0.0).to(DTYPE)
            g_pos = coef_pos[:, None] * (
                a - tl.load(embeddings_ptr + pos_base[:, None] + col_offs, mask=mask, other=0.0).to(DTYPE))
            g_neg = coef_neg[:, None] * (
                a - tl.load(embeddings_ptr + neg_base[:, None] + col_offs, mask=mask, other=0.0).to(DTYPE))
            grad_cols = cols.to(tl.int64)[None, :]
            if DETERMINISTIC:  # rows this program owns: plain stores (the loads' masked lanes give the zeros)
                own = row_mask[:, None] & (cols < dim)[None, :]
                tl.store(grad_ptr + rows[:, None] * dim + grad_cols, g_pos - g_neg, mask=own)
                tl.store(partner_grad_ptr + rows[:, None] * dim + grad_cols, -g_pos, mask=own)
                tl.store(partner_grad_ptr + (rows + n_rows)[:, None] * dim + grad_cols, g_neg, mask=own)
            else:
                tl.atomic_add(grad_ptr + rows[:, None] * dim + grad_cols, g_pos - g_neg, mask=mask, sem="relaxed")
                tl.atomic_add(grad_ptr + pos[:, None] * dim + grad_cols, -g_pos, mask=mask, sem="relaxed")
                tl.atomic_add(grad_ptr + neg[:, None] * dim + grad_cols, g_neg, mask=mask, sem="relaxed")


# ---------------------------------------------------------------------------------------------------------------
# Launchers: derive every constexpr flag from the arguments, and write into caller-allocated outputs.


@custom_launcher("triplet_forward", mutates_args=("loss", "grad_anchor", "grad_positive", "grad_negative"))
def triplet_forward(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, grad_scale: Optional[torch.Tensor],
    loss: Optional[torch.Tensor], grad_anchor: Optional[torch.Tensor], grad_positive: Optional[torch.Tensor],
    grad_negative: Optional[torch.Tensor], *, margin: float, p: float, eps: float, swap: bool,
) -> None:
    """Launch ``_triplet_kernel`` on (rows, dim) views (any strides; stride 0 for a broadcast row). ``loss``
    (rows,) in the compute dtype may be None; each gradient buffer, contiguous (rows, dim), may be None;
    ``grad_scale`` is 0-d or contiguous (rows,)."""
    n_rows, dim = anchor.shape
    wide = max((anchor, positive, negative), key=lambda t: t.dtype.itemsize)
    block_r, block_d, num_warps = triplet_config(dim, wide.dtype)
    _triplet_kernel[(triton.cdiv(n_rows, block_r),)](
        anchor, positive, negative, grad_scale,
        loss, grad_anchor, grad_positive, grad_negative,
        n_rows, dim,
        *anchor.stride(), *positive.stride(), *negative.stride(),
        *split_f64(margin), *split_f64(eps), *split_f64(p),
        BLOCK_R=block_r, BLOCK_D=block_d, NORM=norm_kind(p), SWAP=bool(swap),
        WRITE_LOSS=loss is not None, SCALE_PER_ROW=grad_scale is not None and grad_scale.dim() > 0,
        COMPUTE_ANCHOR_GRAD=grad_anchor is not None, COMPUTE_POSITIVE_GRAD=grad_positive is not None,
        COMPUTE_NEGATIVE_GRAD=grad_negative is not None, DTYPE=math_dtype(anchor, positive, negative),
        num_warps=num_warps,
    )


@custom_launcher("batch_hard_mine", mutates_args=("hardest_positive", "hardest_negative"))
def batch_hard_mine(
    embeddings: torch.Tensor, labels: torch.Tensor, hardest_positive: torch.Tensor, hardest_negative: torch.Tensor,
) -> None:
    """Launch ``_batch_hard_mine_kernel``: (B, d) embeddings (any strides), (B,) labels of any integer dtype (any
    stride), into the (B,) int32 index buffers."""
    n_rows, dim = embeddings.shape
    block_m, block_n, block_k, num_warps, num_stages = batch_hard_mine_config(embeddings.dtype)
    _batch_hard_mine_kernel[(triton.cdiv(n_rows, block_m),)](
        embeddings, labels, hardest_positive, hardest_negative,
        n_rows, dim,
        *embeddings.stride(), labels.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ACC_DTYPE=math_dtype(embeddings),
        PRECISION=dot_precision(embeddings.dtype), num_warps=num_warps, num_stages=num_stages,
    )


@custom_launcher("batch_hard_loss", mutates_args=("loss", "grad"))
def batch_hard_loss(
    embeddings: torch.Tensor, hardest_positive: torch.Tensor, hardest_negative: torch.Tensor,
    grad_scale: Optional[torch.Tensor], loss: Optional[torch.Tensor], grad: Optional[torch.Tensor], *,
    margin: float, soft_margin: bool, deterministic: bool,
) -> None:
    """Launch ``_batch_hard_loss_kernel``: per-anchor ``loss`` (B,) in the compute dtype (may be None) and the
    gradient, times ``grad_scale`` (0-d or contiguous (B,)), into the contiguous (B, d) ``grad`` of the compute
    dtype (may be None): added with atomics into a zeroed ``grad``, or, with ``deterministic``, written over any
    contents without atomics (a (2B, d) workspace, then ``index_add_``; module docstring)."""
    n_rows, dim = embeddings.shape
    block_r, block_d, num_warps = batch_hard_loss_config(dim, embeddings.dtype)
    deterministic = bool(deterministic) and grad is not None
    partner_grad = torch.empty((2 * n_rows, dim), dtype=grad.dtype, device=grad.device) if deterministic else None
    _batch_hard_loss_kernel[(triton.cdiv(n_rows, block_r),)](
        embeddings, hardest_positive, hardest_negative, grad_scale,
        loss, grad, partner_grad,
        n_rows, dim,
        *embeddings.stride(),
        *split_f64(margin),
        BLOCK_R=block_r, BLOCK_D=block_d, SOFT_MARGIN=bool(soft_margin), WRITE_LOSS=loss is not None,
        SCALE_PER_ROW=grad_scale is not None and grad_scale.dim() > 0, COMPUTE_GRAD=grad is not None,
        DETERMINISTIC=deterministic, DTYPE=math_dtype(embeddings),
        num_warps=num_warps,
    )
    if deterministic:
        # an excluded anchor's index is -1 and its terms are zeros: any row may take them, row 0 does
        partners = torch.cat((hardest_positive, hardest_negative)).clamp_min(0)
        grad.index_add_(0, partners, partner_grad)


def compile_variants():
    """Call the launchers once per constexpr combination the host produces, on small CPU tensors (for
    ``bench/compile_report.py``, which records the launches instead of running them)."""

    def triplet(dtype, p=2.0, swap=False, mode="fused", grads=(True, True, True), dim=128):
        x = torch.zeros(8, dim, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        scale = None if mode == "none" else torch.ones(8 if mode == "backward" else (), dtype=acc)
        loss = torch.zeros(8, dtype=acc) if mode != "backward" else None
        buffers = [torch.zeros_like(x) if g and mode != "none" else None for g in grads]
        triplet_forward(x, x, x, scale, loss, *buffers, margin=1.0, p=p, eps=1e-6, swap=swap)

    for p in (2.0, 1.0, float("inf"), float("-inf"), 3.0):
        for swap in (False, True):
            for mode in ("fused", "none", "backward"):
                triplet(torch.bfloat16, p=p, swap=swap, mode=mode)
    triplet(torch.bfloat16, p=0.0, mode="none")
    for grads in ((True, False, False), (False, True, False), (False, False, True)):
        triplet(torch.bfloat16, grads=grads)
    for dtype in (torch.float16, torch.float32, torch.float64):
        triplet(dtype)
    triplet(torch.bfloat16, dim=4096)

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        x = torch.zeros(64, 128, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        index = torch.zeros(64, dtype=torch.int32)
        for labels_dtype in (torch.int64, torch.int32, torch.uint8) if dtype == torch.bfloat16 else (torch.int64,):
            batch_hard_mine(x, torch.zeros(64, dtype=labels_dtype), index, index)
        for soft_margin in (False, True):
            for mode in ("fused", "none", "backward"):
                for deterministic in (False, True):
                    if dtype != torch.bfloat16 and (soft_margin or mode != "fused" or deterministic):
                        continue
                    if deterministic and mode == "none":  # no gradient: the flag is dropped
                        continue
                    scale = None if mode == "none" else torch.ones(64 if mode == "backward" else (), dtype=acc)
                    loss = torch.zeros(64, dtype=acc) if mode != "backward" else None
                    grad = torch.zeros(64, 128, dtype=acc) if mode != "none" else None
                    batch_hard_loss(x, index, index, scale, loss, grad, margin=1.0, soft_margin=soft_margin,
                                    deterministic=deterministic)
