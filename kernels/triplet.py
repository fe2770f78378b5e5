"""Triplet losses: torch's ``triplet_margin_loss`` (p-norm distances, eps, swap) fused with its gradient, and
batch-hard triplet mining (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss") by a tiled
pairwise-distance kernel that never holds the ``B x B`` matrix.

Triplet margin loss, per row (torch's ``pairwise_distance`` adds ``eps`` to the difference)::

    d(x, y) = || x - y + eps ||_p,     loss = max(margin + d(a, p) - d_neg, 0)
    d_neg   = d(a, n), or min(d(a, n), d(p, n)) with ``swap`` (Balntas et al. 2016)

Gradient of ``||v||_p`` (torch's ``norm_backward``, including its conventions at 0)::

    p = 2         v / ||v||                         (0 where ||v|| = 0)
    p = 1         sign(v)
    p = +-inf     sign(v) [|v_k| = ||v||] / #{k : |v_k| = ||v||}     (ties share the gradient)
    p = 0         none (a count of non-zeros)
    other p       sign(v) |v|^(p - 1) ||v||^(1 - p)  (0 where v_k = 0, and where ||v|| = 0)

``clamp_min`` passes the gradient where ``margin + d_pos - d_neg >= 0`` and ``min`` splits it in half on a tie,
as torch's autograd does. A row reads anchor, positive and negative once for the distances and once more (in
reverse block order, so the blocks read last are still in L2) to write the three gradients.

Batch-hard mining, per anchor ``i`` of a batch ``x`` (B, d) with labels ``y``::

    pos(i) = argmax_{j != i, y_j = y_i} ||x_i - x_j||,   neg(i) = argmin_{y_j != y_i} ||x_i - x_j||

``_batch_hard_mine_kernel`` walks the columns in ``BLOCK_N`` tiles; each tile's Gram block ``x_i . x_j`` is a
``tl.dot`` over ``BLOCK_K`` slices of d, and only the per-row running max / argmax and min / argmin survive a
tile: memory O(B d), time O(B^2 d) on tensor cores. The score is ``||x_j||^2 - 2 x_i . x_j``, which is
``||x_i - x_j||^2`` minus ``||x_i||^2``, a constant per row that does not change its argmax / argmin, so it is
never computed (and there is no ``sqrt`` or clamp at 0 to get wrong: the Gram form only ranks candidates).

``_batch_hard_loss_kernel`` then recomputes the two selected distances exactly from differences, O(B d): the
Gram form loses ``||x||^2 * ulp`` to cancellation, which matters exactly where the gradient ``(x_i - x_j) / d``
is largest. With ``z = d(i, pos) - d(i, neg)``, ``loss = max(margin + z, 0)`` (``softplus(z)`` with
``soft_margin``) and::

    dloss/dx_i   = c (x_i - x_pos) / d_pos - c (x_i - x_neg) / d_neg,    c = dloss/dz
    dloss/dx_pos = -c (x_i - x_pos) / d_pos,      dloss/dx_neg = c (x_i - x_neg) / d_neg

(a term is 0 where its distance is 0: the subgradient of ``||v||`` at ``v = 0``, as torch's ``norm_backward``).
Several anchors may select the same row, so the three terms are accumulated with atomic adds into an fp32
(fp64) buffer: the gradient is O(B d) but its summation order, and so its last bits, vary between runs.
An anchor without a positive or without a negative gets index -1, loss 0 and no gradient. Ties (identical
rows) go to the lowest index, so the whole gradient follows one of them.
"""

import triton
import triton.language as tl

from ._common import join_f64, log1p, split_f64, to_element_type
from .configs import batch_hard_loss_config, batch_hard_mine_config, triplet_config


def norm_kind(p):
    """The ``NORM`` constexpr for a p-norm exponent (any real number or +-inf, as torch accepts): the special
    cases get exact formulas ("max" is p = +inf, "min" p = -inf), every other p the "general" power form."""
    special = {1.0: "one", 2.0: "two", float("inf"): "max", float("-inf"): "min", 0.0: "zero"}
    return special.get(float(p), "general")


@triton.jit
def _pow(base, exponent):
    """base ** exponent for base >= 0 (0 and inf included) and exponent != 0, elementwise."""
    positive = base > 0.0
    power = tl.exp2(exponent * tl.log2(tl.where(positive, base, 1.0)))
    return tl.where(positive, power, tl.where(exponent > 0.0, 0.0, float("inf")))


@triton.jit
def _norm_init(BLOCK_R: tl.constexpr, NORM: tl.constexpr, DTYPE: tl.constexpr):
    """Running per-row (accumulator, count of extremal entries) before the first tile."""
    if NORM == "max":
        acc = tl.full([BLOCK_R], -1.0, DTYPE)  # below any |v|
    elif NORM == "min":
        acc = tl.full([BLOCK_R], float("inf"), DTYPE)
    else:
        acc = tl.zeros([BLOCK_R], DTYPE)
    return acc, tl.zeros([BLOCK_R], DTYPE)


@triton.jit
def _norm_update(acc, count, v, mask, p, NORM: tl.constexpr):
    """Merge a [BLOCK_R, BLOCK_D] tile of differences into the running (accumulator, count) of each row: the
    sum of |v|^p (sum of v^2, of |v|, of [v != 0]), or the max / min of |v| and how many entries attain it."""
    a = tl.abs(v)
    if NORM == "max" or NORM == "min":
        if NORM == "max":
            a = tl.where(mask, a, -1.0)
            tile = tl.max(a, axis=1)
            replaces = tile > acc
        else:
            a = tl.where(mask, a, float("inf"))
            tile = tl.min(a, axis=1)
            replaces = tile < acc
        tile_count = tl.sum(tl.where(mask & (a == tile[:, None]), 1.0, 0.0), axis=1)
        count = tl.where(replaces, tile_count, tl.where(tile == acc, count + tile_count, count))
        acc = tl.where(replaces, tile, acc)
    elif NORM == "two":
        acc += tl.sum(tl.where(mask, v * v, 0.0), axis=1)
    elif NORM == "one":
        acc += tl.sum(tl.where(mask, a, 0.0), axis=1)
    elif NORM == "zero":
        acc += tl.sum(tl.where(mask & (v != 0.0), 1.0, 0.0), axis=1)
    else:  # padded lanes: base 1 (no inf for p < 0 to discard), then weight 0
        acc += tl.sum(_pow(tl.where(mask, a, 1.0), p) * mask.to(a.dtype), axis=1)
    return acc, count


@triton.jit
def _norm_finish(acc, row_mask, p, NORM: tl.constexpr):
    """The norm of each row from its accumulator; 0 on padded rows, so that nothing downstream subtracts
    infinities there (p < 0 and p = -inf give inf on an all-padding row)."""
    if NORM == "two":
        norm = tl.sqrt(acc)
    elif NORM == "general":
        norm = _pow(acc, 1.0 / p)
    else:
        norm = acc
    return tl.where(row_mask, norm, 0.0)


@triton.jit
def _norm_grad_factor(norm, count, p, NORM: tl.constexpr):
    """Per-row factor f with d||v||/dv = f * _norm_grad_direction(v) (module docstring)."""
    if NORM == "two":
        return tl.where(norm > 0.0, 1.0 / tl.where(norm > 0.0, norm, 1.0), 0.0)
    elif NORM == "max" or NORM == "min":
        return 1.0 / tl.maximum(count, 1.0)  # count >= 1 on real rows; padded rows have 0
    elif NORM == "general":
        return tl.where(norm > 0.0, _pow(norm, 1.0 - p), 0.0)
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
        return _sign(v) * _pow(tl.abs(v), p - 1.0)  # sign(0) = 0 also covers torch's mask at v = 0 for p < 1
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

    acc_ap, count_ap = _norm_init(BLOCK_R, NORM, DTYPE)
    acc_an, count_an = _norm_init(BLOCK_R, NORM, DTYPE)
    acc_pn, count_pn = _norm_init(BLOCK_R, NORM, DTYPE)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < dim)[None, :]
        a, pos, neg = _load_triplet_tile(anchor_ptr, positive_ptr, negative_ptr, anchor_base, positive_base,
                                         negative_base, cols, mask, stride_anchor_col, stride_positive_col,
                                         stride_negative_col, DTYPE)
        acc_ap, count_ap = _norm_update(acc_ap, count_ap, a - pos + eps, mask, p, NORM)
        acc_an, count_an = _norm_update(acc_an, count_an, a - neg + eps, mask, p, NORM)
        if SWAP:
            acc_pn, count_pn = _norm_update(acc_pn, count_pn, pos - neg + eps, mask, p, NORM)
    d_ap = _norm_finish(acc_ap, row_mask, p, NORM)
    d_an = _norm_finish(acc_an, row_mask, p, NORM)
    if SWAP:
        d_pn = _norm_finish(acc_pn, row_mask, p, NORM)
        d_neg = tl.minimum(d_an, d_pn)
        share_an = tl.where(d_an < d_pn, 1.0, tl.where(d_an == d_pn, 0.5, 0.0))
    else:
        d_neg = d_an
        share_an = tl.zeros([BLOCK_R], DTYPE) + 1.0
    hinge = margin + d_ap - d_neg
    if WRITE_LOSS:
        tl.store(loss_ptr + rows, tl.maximum(hinge, 0.0).to(loss_ptr.dtype.element_ty), mask=row_mask)

    if COMPUTE_GRAD:
        if SCALE_PER_ROW:
            scale = tl.load(grad_scale_ptr + rows, mask=row_mask, other=0.0).to(DTYPE)
        else:
            scale = tl.load(grad_scale_ptr).to(DTYPE)
        active = tl.where(hinge >= 0.0, scale, 0.0)
        # dloss/dv for each difference v, as (per-row coefficient) * (direction of the tile).
        coef_ap = active * _norm_grad_factor(d_ap, count_ap, p, NORM)
        coef_an = -active * share_an * _norm_grad_factor(d_an, count_an, p, NORM)
        if SWAP:
            coef_pn = -active * (1.0 - share_an) * _norm_grad_factor(d_pn, count_pn, p, NORM)
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
):
    """For BLOCK_M anchors: the index of the farthest positive and of the nearest negative (-1 when none),
    over column tiles of BLOCK_N candidates (module docstring)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    row_offs = rows.to(tl.int64) * stride_row
    row_labels = tl.load(labels_ptr + rows.to(tl.int64) * stride_label, mask=row_mask)
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
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(embeddings_ptr + col_offs[:, None] + k_offs[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            gram = tl.dot(a, tl.trans(b), gram, input_precision="ieee")
            b_acc = b.to(ACC_DTYPE)
            col_sq += tl.sum(b_acc * b_acc, axis=1)
        score = col_sq[None, :] - 2.0 * gram  # ||x_i - x_j||^2 - ||x_i||^2
        col_labels = tl.load(labels_ptr + cols.to(tl.int64) * stride_label, mask=col_mask)
        same = row_labels[:, None] == col_labels[None, :]
        is_pos = same & col_mask[None, :] & (rows[:, None] != cols[None, :])
        is_neg = (row_labels[:, None] != col_labels[None, :]) & col_mask[None, :]
        # Per tile: the extreme score and its first column (a row without candidates here gets -inf / +inf, which
        # never wins); a later tile replaces the running choice only when strictly better.
        tile_max, tile_argmax = tl.max(tl.where(is_pos, score, float("-inf")), axis=1, return_indices=True)
        better = tile_max > best_pos
        best_pos = tl.where(better, tile_max, best_pos)
        best_pos_idx = tl.where(better, col_start + tile_argmax, best_pos_idx)
        tile_min, tile_argmin = tl.min(tl.where(is_neg, score, float("inf")), axis=1, return_indices=True)
        better = tile_min < best_neg
        best_neg = tl.where(better, tile_min, best_neg)
        best_neg_idx = tl.where(better, col_start + tile_argmin, best_neg_idx)
    tl.store(hardest_positive_ptr + rows, best_pos_idx, mask=row_mask)
    tl.store(hardest_negative_ptr + rows, best_neg_idx, mask=row_mask)


@triton.jit
def _batch_hard_loss_kernel(
    # pointers
    embeddings_ptr, hardest_positive_ptr, hardest_negative_ptr, grad_scale_ptr,
    loss_ptr, grad_ptr,
    # shapes
    n_rows, dim,
    # strides (in elements; grad is contiguous)
    stride_row, stride_col,
    # constants
    margin_hi, margin_lo,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SOFT_MARGIN: tl.constexpr, WRITE_LOSS: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr, COMPUTE_GRAD: tl.constexpr, DTYPE: tl.constexpr,
):
    """Per-anchor loss from the mined indices (``WRITE_LOSS``), and its gradient times ``grad_scale`` (scalar,
    or per row with ``SCALE_PER_ROW``) atomically added into the zeroed (rows, dim) ``grad`` (compute dtype)."""
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
    if SOFT_MARGIN:  # softplus(z), and its derivative sigmoid(z), without overflow
        e = tl.exp(-tl.abs(z))
        loss = tl.maximum(z, 0.0) + log1p(e)
        dloss_dz = tl.where(z >= 0.0, 1.0, e) / (1.0 + e)
    else:  # clamp_min passes the gradient at 0, as torch's does
        loss = tl.maximum(margin + z, 0.0)
        dloss_dz = tl.where(margin + z >= 0.0, 1.0, 0.0)
    if WRITE_LOSS:
        tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0).to(loss_ptr.dtype.element_ty), mask=row_mask)

    if COMPUTE_GRAD:
        if SCALE_PER_ROW:
            scale = tl.load(grad_scale_ptr + rows, mask=row_mask, other=0.0).to(DTYPE)
        else:
            scale = tl.load(grad_scale_ptr).to(DTYPE)
        coef = tl.where(valid, scale * dloss_dz, 0.0)
        coef_pos = tl.where(d_pos > 0.0, coef / tl.where(d_pos > 0.0, d_pos, 1.0), 0.0)
        coef_neg = tl.where(d_neg > 0.0, coef / tl.where(d_neg > 0.0, d_neg, 1.0), 0.0)
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
            tl.atomic_add(grad_ptr + rows[:, None] * dim + grad_cols, g_pos - g_neg, mask=mask, sem="relaxed")
            tl.atomic_add(grad_ptr + pos[:, None] * dim + grad_cols, -g_pos, mask=mask, sem="relaxed")
            tl.atomic_add(grad_ptr + neg[:, None] * dim + grad_cols, g_neg, mask=mask, sem="relaxed")


# ---------------------------------------------------------------------------------------------------------------
# Launchers: derive every constexpr flag from the arguments, and write into caller-allocated outputs.


def _dtype_of(*tensors):
    return tl.float64 if any(t.dtype.itemsize == 8 for t in tensors) else tl.float32


def triplet_forward(anchor, positive, negative, grad_scale, loss, grad_anchor, grad_positive, grad_negative, *,
                    margin, p, eps, swap):
    """Launch ``_triplet_kernel`` on (rows, dim) views (any strides; stride 0 for a broadcast row). ``loss``
    (rows,) in the compute dtype may be None; each gradient buffer, contiguous (rows, dim), may be None;
    ``grad_scale`` is 0-d or (rows,)."""
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
        COMPUTE_NEGATIVE_GRAD=grad_negative is not None, DTYPE=_dtype_of(anchor, positive, negative),
        num_warps=num_warps,
    )


def batch_hard_mine(embeddings, labels, hardest_positive, hardest_negative):
    """Launch ``_batch_hard_mine_kernel``: (B, d) embeddings (any strides), (B,) integer labels, into the (B,)
    int32 index buffers."""
    n_rows, dim = embeddings.shape
    block_m, block_n, block_k, num_warps, num_stages = batch_hard_mine_config(embeddings.dtype)
    _batch_hard_mine_kernel[(triton.cdiv(n_rows, block_m),)](
        embeddings, labels, hardest_positive, hardest_negative,
        n_rows, dim,
        *embeddings.stride(), labels.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ACC_DTYPE=_dtype_of(embeddings),
        num_warps=num_warps, num_stages=num_stages,
    )


def batch_hard_loss(embeddings, hardest_positive, hardest_negative, grad_scale, loss, grad, *, margin,
                    soft_margin):
    """Launch ``_batch_hard_loss_kernel``: per-anchor ``loss`` (B,) in the compute dtype (may be None) and the
    gradient added into the zeroed contiguous (B, d) ``grad`` of the compute dtype (may be None), times
    ``grad_scale`` (0-d or (B,))."""
    n_rows, dim = embeddings.shape
    block_r, block_d, num_warps = batch_hard_loss_config(dim, embeddings.dtype)
    _batch_hard_loss_kernel[(triton.cdiv(n_rows, block_r),)](
        embeddings, hardest_positive, hardest_negative, grad_scale,
        loss, grad,
        n_rows, dim,
        *embeddings.stride(),
        *split_f64(margin),
        BLOCK_R=block_r, BLOCK_D=block_d, SOFT_MARGIN=bool(soft_margin), WRITE_LOSS=loss is not None,
        SCALE_PER_ROW=grad_scale is not None and grad_scale.dim() > 0, COMPUTE_GRAD=grad is not None,
        DTYPE=_dtype_of(embeddings),
        num_warps=num_warps,
    )


def compile_variants():
    """Call the launchers once per constexpr combination the host produces, on small CPU tensors (for
    ``bench/compile_report.py``, which records the launches instead of running them)."""
    import torch

    def triplet(dtype, p=2.0, swap=False, mode="fused", grads=(True, True, True), dim=128):
        x = torch.zeros(8, dim, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        scale = torch.ones(8 if mode == "backward" else (), dtype=acc)
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
        batch_hard_mine(x, torch.zeros(64, dtype=torch.long), index, index)
        for soft_margin in (False, True):
            for mode in ("fused", "none", "backward"):
                if dtype != torch.bfloat16 and (soft_margin or mode != "fused"):
                    continue
                scale = torch.ones(64 if mode == "backward" else (), dtype=acc)
                loss = torch.zeros(64, dtype=acc) if mode != "backward" else None
                grad = torch.zeros(64, 128, dtype=acc) if mode != "none" else None
                batch_hard_loss(x, index, index, scale, loss, grad, margin=1.0, soft_margin=soft_margin)
