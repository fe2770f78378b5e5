"""Linear + cross-entropy without the logits: ``loss = CE(X @ W^T + b, y)`` for X ``(N, H)``, W ``(V, H)``, with
the extras of the cross-entropy family (label smoothing, focal weighting, z-loss, soft-capping), never holding the
``(N, V)`` logits.

Derivations, byte and FLOP counts, design choices:
``docs/kernels/linear_cross_entropy.md``.
"""

import itertools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from ._common import grouped_tile, join_f64, math_dtype, online_logsumexp_update, soft_cap, split_f64
from ._gemm import abt_tile, dot_precision, matmul, tma_compatible, use_tensor_descriptors
from ._launch import custom_launcher, num_sms
from .cross_entropy_rows import (
    ROW_STATE,
    dlogits_from_coefs,
    load_row_state,
    one_stride_walk,
    row_loss_and_coefs,
    store_row_state,
)

# ---------------------------------------------------------------------------------------------------------------
# Row helpers of this family (the per-row epilogue and per-element gradient are kernels.cross_entropy's).

@triton.jit
def _target_of_rows(target_ptr, rows, row_mask, seq_len, shift, stride_target_outer, stride_target_seq,
                    ignore_index):
    """The class row ``r`` predicts, as int64: ``target[..., t + shift]`` with ``t = r % seq_len``, read through
    the target's own strides (no shifted copy); ``ignore_index`` past the end of a sequence and on masked rows."""
    rows = rows.to(tl.int64)
    t = rows % seq_len + shift
    live = row_mask & (t < seq_len)
    offs = (rows // seq_len) * stride_target_outer + t * stride_target_seq
    return tl.load(target_ptr + offs, mask=live, other=ignore_index).to(tl.int64)


@triton.jit
def _class_i32(y, n_classes):
    """The target class as int32 for comparing with a tile's column indices (an int64 compare would widen the
    whole [rows, classes] tile), -1 when out of [0, n_classes): ignored and out-of-range rows match no column."""
    return tl.where((y >= 0) & (y < n_classes), y, -1).to(tl.int32)


@triton.jit
def _live_tile(y, row_mask, ignore_index):
    """Whether a token tile takes part when ignored tokens are skipped: some row of it has a target. The host's
    live-tile list (``fusedloss.losses.linear_cross_entropy._live_tiles``) applies the same rule."""
    return tl.max((row_mask & (y != ignore_index)).to(tl.int32), axis=0) > 0


@triton.jit
def _operands(x_ptr, w_ptr, n_rows, n_hidden, n_classes, stride_xr, stride_wv,
              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, TMA: tl.constexpr):
    """What ``_logits_tile`` reads X and W through: tensor descriptors over the whole (N, H) and (V, H) (TMA:
    hidden dimension contiguous, ``tma_compatible``), or the pointers themselves."""
    if TMA:
        x_src = tl.make_tensor_descriptor(x_ptr, shape=[n_rows, n_hidden], strides=[stride_xr, 1],
                                          block_shape=[BLOCK_N, BLOCK_H])
        w_src = tl.make_tensor_descriptor(w_ptr, shape=[n_classes, n_hidden], strides=[stride_wv, 1],
                                          block_shape=[BLOCK_V, BLOCK_H])
    else:
        x_src, w_src = x_ptr, w_ptr
    return x_src, w_src


@triton.jit
def _logits_tile(x_src, w_src, bias_ptr, row0, col0, row_mask, col_mask, n_hidden,
                 stride_xr, stride_xh, stride_wv, stride_wh, stride_bias, softcap,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr,
                 DTYPE: tl.constexpr):
    """A [BLOCK_N, BLOCK_V] tile of logits ``X[rows] @ W[cols]^T + b[cols]`` (``abt_tile`` over H) for the rows
    ``row0 + arange(BLOCK_N)`` and columns ``col0 + arange(BLOCK_V)``, soft-capped, with padded columns set to
    -inf after the cap. The cap's derivative is
    not returned: ``1 - (x / cap) ** 2`` from the capped tile costs two multiplies where keeping it would cost a
    second [BLOCK_N, BLOCK_V] fp32 tile of registers (and spills at 128 x 128 on 8 warps)."""
    cols = col0 + tl.arange(0, BLOCK_V)
    if TMA:
        acc = abt_tile(x_src, w_src, row0, col0, row_mask, col_mask, n_hidden, stride_xh, stride_wh,
                       BLOCK_N, BLOCK_V, BLOCK_H, TMA, PRECISION, DTYPE)
    else:
        rows = row0 + tl.arange(0, BLOCK_N)
        acc = abt_tile(x_src, w_src, rows.to(tl.int64) * stride_xr, cols.to(tl.int64) * stride_wv, row_mask,
                       col_mask, n_hidden, stride_xh, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, TMA, PRECISION, DTYPE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols.to(tl.int64) * stride_bias, mask=col_mask, other=0.0).to(DTYPE)[None, :]
    if HAS_SOFTCAP:
        acc, _ = soft_cap(acc, softcap)
    return tl.where(col_mask[None, :], acc, float("-inf"))


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _fwd_item(item, x_src, w_src, bias_ptr, target_ptr, part_ptr,
              n_rows, n_hidden, n_classes, seq_len, n_tiles, n_splits, split_width, class_offset, plane,
              stride_xr, stride_xh, stride_wv, stride_wh, stride_bias, stride_target_outer, stride_target_seq,
              shift, ignore_index, softcap,
              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
              SKIP_IGNORED: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """One work item of ``_lce_fwd_kernel``."""
    tile_n, split = grouped_tile(item, n_tiles, n_splits, GROUP_N)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    y = _target_of_rows(target_ptr, rows, row_mask, seq_len, shift, stride_target_outer, stride_target_seq,
                        ignore_index)
    y_col = _class_i32(y - class_offset, n_classes)  # the target's column in this shard of the vocabulary

    m = tl.full([BLOCK_N], float("-inf"), DTYPE)
    s = tl.zeros([BLOCK_N], DTYPE)
    coef_dot = tl.zeros([BLOCK_N], DTYPE)
    x_y = tl.zeros([BLOCK_N], DTYPE)
    col_start = split * split_width
    col_end = tl.minimum(col_start + split_width, n_classes)
    if SKIP_IGNORED:
        col_end = tl.where(_live_tile(y, row_mask, ignore_index), col_end, col_start)
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_mask = cols < col_end
        x = _logits_tile(x_src, w_src, bias_ptr, tile_n * BLOCK_N, start, row_mask, col_mask, n_hidden,
                         stride_xr, stride_xh, stride_wv, stride_wh, stride_bias, softcap,
                         BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, TMA, PRECISION, DTYPE)
        m_old = m
        m, s, m_ref = online_logsumexp_update(m, s, x, 1)
        if HAS_SMOOTHING:
            # sum over the columns seen so far of (x_c - m_ref), re-based when the max moves (as in
            # _ce_fwd_kernel); the columns seen before this tile are start - col_start
            seen = (start - col_start).to(DTYPE)
            coef_dot = tl.where(m_old > float("-inf"), coef_dot + seen * (m_old - m_ref), coef_dot)
            coef_dot += tl.sum(tl.where(col_mask[None, :], x - m_ref[:, None], 0.0), axis=1)
        x_y += tl.sum(tl.where(cols[None, :] == y_col[:, None], x, 0.0), axis=1)

    offs = split.to(tl.int64) * n_rows + rows
    tl.store(part_ptr + offs, m, mask=row_mask)
    tl.store(part_ptr + plane + offs, s, mask=row_mask)
    tl.store(part_ptr + 2 * plane + offs, coef_dot, mask=row_mask)
    tl.store(part_ptr + 3 * plane + offs, x_y, mask=row_mask)


@triton.jit
def _lce_fwd_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, target_ptr, part_ptr,
    # shapes
    n_rows, n_hidden, n_classes, seq_len, n_splits, split_width, class_offset,
    # strides (in elements)
    stride_xr, stride_xh, stride_wv, stride_wh, stride_bias, stride_target_outer, stride_target_seq,
    # constants
    shift, ignore_index, cap_hi, cap_lo,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SKIP_IGNORED: tl.constexpr,
    TMA: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """Work item (token tile, vocabulary split): per row, the split's (max m, sum exp(x - m), sum (x_c - m), x_y),
    into ``part`` laid out (4, n_splits, n_rows) so every store is row-contiguous. x_y is 0 in the splits that do
    not hold the target; the smoothing sum is kept relative to the running max so that it does not cancel. TMA:
    a persistent grid, each program taking the items ``program_id + k * num_programs``; otherwise one item per
    program. SKIP_IGNORED: a tile without a target computes nothing and writes (-inf, 0, 0, 0), which
    the combine turns into loss 0 and zero coefficients (its lse is meaningless: the caller did not ask for it)."""
    softcap = join_f64(cap_hi, cap_lo, DTYPE)
    x_src, w_src = _operands(x_ptr, w_ptr, n_rows, n_hidden, n_classes, stride_xr, stride_wv, BLOCK_N, BLOCK_V,
                             BLOCK_H, TMA)
    n_tiles = tl.cdiv(n_rows, BLOCK_N)
    plane = (tl.zeros([], tl.int64) + n_splits) * n_rows  # n_splits may arrive as the constexpr 1
    if TMA:  # persistent: the items program_id + k * num_programs
        for item in range(tl.program_id(0), n_tiles * n_splits, tl.num_programs(0)):
            _fwd_item(item, x_src, w_src, bias_ptr, target_ptr, part_ptr,
                      n_rows, n_hidden, n_classes, seq_len, n_tiles, n_splits, split_width, class_offset, plane,
                      stride_xr, stride_xh, stride_wv, stride_wh, stride_bias, stride_target_outer, stride_target_seq,
                      shift, ignore_index, softcap, BLOCK_N, BLOCK_V, BLOCK_H, GROUP_N, HAS_BIAS, HAS_SOFTCAP,
                      HAS_SMOOTHING, SKIP_IGNORED, TMA, PRECISION, DTYPE)
    else:  # one item per program, no loop around it: with one, the pointer dlogits spills 48-96 B on sm_80
        _fwd_item(tl.program_id(0), x_src, w_src, bias_ptr, target_ptr, part_ptr,
                  n_rows, n_hidden, n_classes, seq_len, n_tiles, n_splits, split_width, class_offset, plane,
                  stride_xr, stride_xh, stride_wv, stride_wh, stride_bias, stride_target_outer, stride_target_seq,
                  shift, ignore_index, softcap, BLOCK_N, BLOCK_V, BLOCK_H, GROUP_N, HAS_BIAS, HAS_SOFTCAP,
                  HAS_SMOOTHING, SKIP_IGNORED, TMA, PRECISION, DTYPE)



@triton.jit
def _lce_combine_kernel(
    # pointers
    part_ptr, target_ptr, loss_ptr, state_ptr,
    # shapes
    n_rows, n_classes, seq_len, n_splits, split_width,
    # strides
    stride_target_outer, stride_target_seq,
    # constants
    shift, ignore_index, eps_hi, eps_lo, gamma_hi, gamma_lo, z_hi, z_lo,
    BLOCK_R: tl.constexpr, SPLITS: tl.constexpr, HAS_SMOOTHING: tl.constexpr, PARTIAL: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Merge the per-split partials of BLOCK_R rows; write the per-row loss and the row state (m, log s, K1, Kf,
    Ky, K3) of ``kernels.cross_entropy`` for the backward. With PARTIAL (one shard of a vocabulary-parallel group)
    write the merged partials instead, in the partial buffer's layout with one split: (4, rows), which the ranks
    exchange and merge again, as ``n_splits`` = ranks of ``split_width`` = the shard's classes each."""
    eps = join_f64(eps_hi, eps_lo, DTYPE)
    gamma = join_f64(gamma_hi, gamma_lo, DTYPE)
    z = join_f64(z_hi, z_lo, DTYPE)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    splits = tl.arange(0, SPLITS)
    mask = row_mask[:, None] & (splits < n_splits)[None, :]
    offs = splits.to(tl.int64)[None, :] * n_rows + rows[:, None]
    plane = (tl.zeros([], tl.int64) + n_splits) * n_rows  # n_splits may arrive as the constexpr 1

    m_i = tl.load(part_ptr + offs, mask=mask, other=float("-inf"))
    s_i = tl.load(part_ptr + plane + offs, mask=mask, other=0.0)
    m = tl.max(m_i, axis=1)
    m_ref = tl.where(m > float("-inf"), m, 0.0)
    s = tl.sum(s_i * tl.exp(m_i - m_ref[:, None]), axis=1)
    x_y = tl.sum(tl.load(part_ptr + 3 * plane + offs, mask=mask, other=0.0), axis=1)
    coef_dot = tl.zeros([BLOCK_R], DTYPE)
    if HAS_SMOOTHING:
        # A = sum_c (x_c - m) = sum_i [A_i + n_i (m_i - m)], n_i the columns of split i
        a_i = tl.load(part_ptr + 2 * plane + offs, mask=mask, other=0.0)
        n_i = tl.minimum(tl.maximum(n_classes - splits * split_width, 0), split_width).to(DTYPE)
        a_i = tl.where(mask & (m_i > float("-inf")), a_i + n_i[None, :] * (m_i - m_ref[:, None]), a_i)
        coef_dot = tl.sum(a_i, axis=1)

    if PARTIAL:
        tl.store(state_ptr + rows, m, mask=row_mask)
        tl.store(state_ptr + n_rows + rows, s, mask=row_mask)
        tl.store(state_ptr + 2 * n_rows + rows, coef_dot, mask=row_mask)
        tl.store(state_ptr + 3 * n_rows + rows, x_y, mask=row_mask)
    else:
        log_s = tl.log(s)
        y = _target_of_rows(target_ptr, rows, row_mask, seq_len, shift, stride_target_outer, stride_target_seq,
                            ignore_index)
        valid = row_mask & (y != ignore_index)
        in_range = (y >= 0) & (y < n_classes)
        one = tl.zeros([BLOCK_R], DTYPE) + 1.0
        loss, k1, kf, ky, k3 = row_loss_and_coefs(m, log_s, x_y, one * n_classes, coef_dot, one, one, valid,
                                                   in_range, eps, gamma, z, n_classes, HAS_SMOOTHING)
        tl.store(loss_ptr + rows, loss, mask=row_mask)
        store_row_state(state_ptr, rows, row_mask, m, log_s, k1, kf, ky, k3)



@triton.jit
def _dlogits_item(item, x_src, w_src, bias_ptr, target_ptr, state_ptr, row_scale_ptr, dlse_ptr, dlogits_ptr,
                  dbias_part_ptr, n_rows, n_hidden, n_classes, seq_len, col_start, chunk_width, class_offset,
                  n_tiles_n, n_tiles_v, stride_xr, stride_xh, stride_wv, stride_wh, stride_bias,
                  stride_target_outer, stride_target_seq, stride_row_scale, stride_dlogits,
                  shift, ignore_index, softcap,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                  HAS_DLSE: tl.constexpr, COMPUTE_DBIAS: tl.constexpr, SKIP_IGNORED: tl.constexpr,
                  ZERO_SKIPPED: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """One work item of ``_lce_dlogits_kernel``."""
    tile_n, tile_v = grouped_tile(item, n_tiles_n, n_tiles_v, GROUP_N)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = col_start + local
    row_mask = rows < n_rows
    col_mask = local < chunk_width
    n_k = n_hidden
    if SKIP_IGNORED:
        y = _target_of_rows(target_ptr, rows, row_mask, seq_len, shift, stride_target_outer, stride_target_seq,
                            ignore_index)
        live = _live_tile(y, row_mask, ignore_index)
        n_k = tl.where(live, n_hidden, 0)
    x = _logits_tile(x_src, w_src, bias_ptr, tile_n * BLOCK_N, col_start + tile_v * BLOCK_V, row_mask, col_mask,
                     n_k, stride_xr, stride_xh, stride_wv, stride_wh, stride_bias, softcap,
                     BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, TMA, PRECISION, DTYPE)
    # the row state, the targets and the masks after the K loop, where they hold no registers during it
    scale = tl.load(row_scale_ptr + rows.to(tl.int64) * stride_row_scale, mask=row_mask, other=0.0).to(DTYPE)
    m, log_s, k1, kf, ky, k3 = load_row_state(state_ptr, rows, row_mask, scale, DTYPE)
    if HAS_DLSE:
        k1 += tl.load(dlse_ptr + rows, mask=row_mask, other=0.0).to(DTYPE)  # d lse / d x_c = p_c
    if not SKIP_IGNORED:
        y = _target_of_rows(target_ptr, rows, row_mask, seq_len, shift, stride_target_outer, stride_target_seq,
                            ignore_index)
    p = tl.exp((x - m[:, None]) - log_s[:, None])
    g = dlogits_from_coefs(p, cols[None, :] == _class_i32(y - class_offset, n_classes)[:, None], k1, kf, ky)
    if HAS_SMOOTHING:
        g -= k3[:, None]
    if HAS_SOFTCAP:
        t = x * (1.0 / softcap)  # tanh of the uncapped logit; padded columns give -inf here, masked just below
        g *= 1.0 - t * t
    mask = row_mask[:, None] & col_mask[None, :]
    live_mask = mask  # the elements of G that are computed and stored
    if SKIP_IGNORED:
        live_mask = mask & (rows * 0 + live.to(tl.int32) > 0)[:, None]  # a vector: see _gemm's SPARSE "m"
    g = tl.where(live_mask, g, 0.0)
    row_ptrs = dlogits_ptr + rows.to(tl.int64) * stride_dlogits
    store_mask = live_mask
    if ZERO_SKIPPED:
        store_mask = mask
    tl.store(row_ptrs[:, None] + local[None, :], g.to(dlogits_ptr.dtype.element_ty), mask=store_mask)
    if COMPUTE_DBIAS:
        tl.store(dbias_part_ptr + tile_n.to(tl.int64) * chunk_width + local, tl.sum(g, axis=0), mask=col_mask)


@triton.jit
def _lce_dlogits_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, target_ptr, state_ptr, row_scale_ptr, dlse_ptr, dlogits_ptr, dbias_part_ptr,
    # shapes
    n_rows, n_hidden, n_classes, seq_len, col_start, chunk_width, class_offset,
    # strides (stride_row_scale is 0 for one scale shared by every row)
    stride_xr, stride_xh, stride_wv, stride_wh, stride_bias, stride_target_outer, stride_target_seq, stride_row_scale,
    stride_dlogits,
    # constants
    shift, ignore_index, cap_hi, cap_lo,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_DLSE: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr, SKIP_IGNORED: tl.constexpr, ZERO_SKIPPED: tl.constexpr, TMA: tl.constexpr,
    PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """G = dloss/dlogits for work items (token tile, vocabulary tile) of the chunk [col_start, col_start +
    chunk_width): the logits recomputed as in the forward, G from the per-row coefficients times the per-row
    scale (plus ``dlse * p`` when the returned lse is differentiated), stored (n_rows, chunk_width) with row
    stride ``stride_dlogits`` in the workspace's dtype; with COMPUTE_DBIAS the tile's fp32 column sums go to row
    ``tile_n`` of ``dbias_part``. Items are scheduled as in ``_lce_fwd_kernel``. SKIP_IGNORED: a tile without a
    target runs no K loop; its G rows are not written (the GEMMs skip them) unless ZERO_SKIPPED (a GEMM reads every
    row), its column sums are zeros."""
    softcap = join_f64(cap_hi, cap_lo, DTYPE)
    x_src, w_src = _operands(x_ptr, w_ptr, n_rows, n_hidden, n_classes, stride_xr, stride_wv, BLOCK_N, BLOCK_V,
                             BLOCK_H, TMA)
    n_tiles_n = tl.cdiv(n_rows, BLOCK_N)
    n_tiles_v = tl.cdiv(chunk_width, BLOCK_V)
    if TMA:  # persistent, as _lce_fwd_kernel
        for item in range(tl.program_id(0), n_tiles_n * n_tiles_v, tl.num_programs(0)):
            _dlogits_item(item, x_src, w_src, bias_ptr, target_ptr, state_ptr, row_scale_ptr, dlse_ptr, dlogits_ptr,
                          dbias_part_ptr, n_rows, n_hidden, n_classes, seq_len, col_start, chunk_width, class_offset,
                          n_tiles_n, n_tiles_v, stride_xr, stride_xh, stride_wv, stride_wh, stride_bias,
                          stride_target_outer, stride_target_seq, stride_row_scale, stride_dlogits,
                          shift, ignore_index, softcap, BLOCK_N, BLOCK_V, BLOCK_H, GROUP_N, HAS_BIAS, HAS_SOFTCAP,
                          HAS_SMOOTHING, HAS_DLSE, COMPUTE_DBIAS, SKIP_IGNORED, ZERO_SKIPPED, TMA, PRECISION, DTYPE)
    else:  # one item per program (see _lce_fwd_kernel)
        _dlogits_item(tl.program_id(0), x_src, w_src, bias_ptr, target_ptr, state_ptr, row_scale_ptr, dlse_ptr,
                      dlogits_ptr, dbias_part_ptr, n_rows, n_hidden, n_classes, seq_len, col_start, chunk_width,
                      class_offset, n_tiles_n, n_tiles_v, stride_xr, stride_xh, stride_wv, stride_wh, stride_bias,
                      stride_target_outer, stride_target_seq, stride_row_scale, stride_dlogits,
                      shift, ignore_index, softcap, BLOCK_N, BLOCK_V, BLOCK_H, GROUP_N, HAS_BIAS, HAS_SOFTCAP,
                      HAS_SMOOTHING, HAS_DLSE, COMPUTE_DBIAS, SKIP_IGNORED, ZERO_SKIPPED, TMA, PRECISION, DTYPE)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: derive every constexpr flag and config from the arguments' shapes, and write into caller-allocated
# buffers. Registered as custom ops (``_launch.custom_launcher``), so their arguments are what a schema can hold.


def target_layout(target):
    """(seq_len, stride_outer, stride_seq) addressing ``target`` (the input's leading shape) as (outer, seq_len),
    or None when its leading dims cannot be walked with one stride (the caller then makes it contiguous)."""
    if target.dim() == 0:
        return 1, 0, 0
    outer = one_stride_walk(target.shape[:-1], target.stride()[:-1])
    return None if outer is None else (target.shape[-1], outer, target.stride(-1))


def config_for(x2d, weight, *, tma_loads=False, compact_workspace=False, skip_ignored=False):
    """The launch configuration (``configs.linear_cross_entropy_config``) for this problem and device under the
    schedule's features."""
    return configs.linear_cross_entropy_config(x2d.shape[0], x2d.shape[1], weight.shape[0], x2d.dtype.itemsize,
                                               num_sms(x2d.device), tma_loads=tma_loads,
                                               compact_workspace=compact_workspace, skip_ignored=skip_ignored)


def gemm_tile(cfg, name):
    """The ``tile`` argument of ``kernels._gemm.matmul`` for the GEMM config ``name`` (``"gemm_dw"``,
    ``"gemm_dx"``) of ``cfg``."""
    g = cfg[name]
    return [g["BLOCK_M"], g["BLOCK_N"], g["BLOCK_K"], g["GROUP_M"], g["num_warps"], g["num_stages"]]


def num_splits(cfg, n_classes):
    """The forward's vocabulary splits for a config: (n_splits, split_width); the partial buffer holds
    4 * n_splits * rows values."""
    block_v = cfg["fwd"]["BLOCK_V"]
    split_width = triton.cdiv(triton.cdiv(n_classes, block_v), cfg["n_splits"]) * block_v
    return triton.cdiv(n_classes, split_width), split_width


def _grid(cfg, x2d, weight, items):
    """(programs, TMA) for a launch of ``items`` work items: with ``tma_loads`` (``cfg["programs"] > 0``) and X
    and W readable through descriptors (hidden dimension contiguous), a persistent grid of at most
    ``cfg["programs"]``; otherwise one program per item, pointer loads."""
    tma = (cfg["programs"] > 0 and x2d.stride(1) == 1 and weight.stride(1) == 1
           and tma_compatible(x2d, weight))
    if tma:
        use_tensor_descriptors(x2d.device)
        return min(items, cfg["programs"]), True
    return items, False


@custom_launcher("linear_cross_entropy_forward", mutates_args=("loss", "row_state"))
def linear_cross_entropy_forward(
    x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
    loss: torch.Tensor, row_state: torch.Tensor, *, ignore_index: int, label_smoothing: float, focal_gamma: float,
    z_loss: float, softcap: Optional[float], shift: bool, input_precision: Optional[str], class_offset: int = 0,
    partial: bool = False, skip_ignored: bool = False, tma_loads: bool = False,
) -> None:
    """Launch the forward: per-row ``loss`` (rows,) and the row state (rows, ROW_STATE) of
    ``kernels.cross_entropy`` (m, log s, K1, Kf, Ky, K3), in the compute dtype (fp32, fp64 for fp64 inputs).
    ``x2d`` (rows, H) and ``weight`` (V, H) with any strides, ``bias`` (V,) with any stride or None, ``target``
    with a ``target_layout``. The per-split partials (``4 * n_splits * rows`` values) are allocated here.
    ``input_precision``: the fp32 override of ``kernels._gemm.dot_precision``. ``skip_ignored``: token tiles
    without a target compute nothing (their rows' lse is then meaningless; only for a caller that does not
    return it). ``tma_loads``: tensor-descriptor loads on a persistent grid where the operands allow it.

    A shard of a vocabulary-parallel group: ``weight`` holds classes ``class_offset ..``; with ``partial`` the
    launch writes the shard's merged partials (m, s, A, x_y) into ``row_state`` as (4, rows) and no ``loss``;
    ``linear_cross_entropy_combine`` finishes from every shard's."""
    n_rows, n_hidden = x2d.shape
    n_classes = weight.shape[0]
    cfg = config_for(x2d, weight, tma_loads=tma_loads, skip_ignored=skip_ignored)
    n_split, split_width = num_splits(cfg, n_classes)
    seq_len, stride_target_outer, stride_target_seq = target_layout(target)
    part = torch.empty(4 * n_split * n_rows, dtype=loss.dtype, device=x2d.device)
    c = cfg["fwd"]
    programs, tma = _grid(cfg, x2d, weight, triton.cdiv(n_rows, c["BLOCK_N"]) * n_split)
    _lce_fwd_kernel[(programs,)](
        x2d, weight, bias, target, part,
        n_rows, n_hidden, n_classes, seq_len, n_split, split_width, class_offset,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
        stride_target_outer, stride_target_seq,
        int(shift), ignore_index, *split_f64(softcap or 0.0),
        BLOCK_N=c["BLOCK_N"], BLOCK_V=c["BLOCK_V"], BLOCK_H=c["BLOCK_H"], GROUP_N=c["GROUP_N"],
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0.0,
        SKIP_IGNORED=skip_ignored, TMA=tma, PRECISION=dot_precision(x2d.dtype, input_precision),
        DTYPE=math_dtype(x2d),
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )
    linear_cross_entropy_combine(part, target, loss, row_state, n_classes=n_classes, split_width=split_width,
                                 ignore_index=ignore_index, label_smoothing=label_smoothing, focal_gamma=focal_gamma,
                                 z_loss=z_loss, shift=shift, partial=partial)


@custom_launcher("linear_cross_entropy_combine", mutates_args=("loss", "row_state"))
def linear_cross_entropy_combine(
    part: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, row_state: torch.Tensor, *, n_classes: int,
    split_width: int, ignore_index: int, label_smoothing: float, focal_gamma: float, z_loss: float, shift: bool,
    partial: bool = False,
) -> None:
    """Launch ``_lce_combine_kernel`` on ``part`` (4, splits, rows) partials of ``split_width`` classes each (the
    last split may be narrower), ``n_classes`` in all: the forward's vocabulary splits, or the shards of a
    vocabulary-parallel group, each merged already (``split_width`` = the shard's classes)."""
    n_rows = loss.shape[0] if not partial else row_state.shape[-1]
    n_split = part.numel() // (4 * max(n_rows, 1))
    seq_len, stride_target_outer, stride_target_seq = target_layout(target)
    block_r = configs.LCE_COMBINE_BLOCK_R
    _lce_combine_kernel[(triton.cdiv(n_rows, block_r),)](
        part, target, loss, row_state,
        n_rows, n_classes, seq_len, n_split, split_width,
        stride_target_outer, stride_target_seq,
        int(shift), ignore_index, *split_f64(label_smoothing), *split_f64(focal_gamma), *split_f64(z_loss),
        BLOCK_R=block_r, SPLITS=max(triton.next_power_of_2(n_split), 2),
        HAS_SMOOTHING=label_smoothing > 0.0, PARTIAL=partial, DTYPE=math_dtype(part),
        num_warps=configs.LCE_COMBINE_NUM_WARPS,
    )


@custom_launcher("linear_cross_entropy_dlogits", mutates_args=("dlogits", "dbias_part"))
def linear_cross_entropy_dlogits(
    x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
    row_state: torch.Tensor, row_scale: torch.Tensor, dlse: Optional[torch.Tensor], dlogits: torch.Tensor,
    dbias_part: Optional[torch.Tensor], col_start: int, *, ignore_index: int, label_smoothing: float,
    softcap: Optional[float], shift: bool, input_precision: Optional[str], class_offset: int = 0,
    skip_ignored: bool = False, zero_skipped: bool = False, tma_loads: bool = False,
) -> None:
    """Launch ``_lce_dlogits_kernel`` for the vocabulary chunk [col_start, col_start + dlogits.shape[1]):
    ``dlogits`` (rows, width), column stride 1, any row stride, in the input's dtype. ``row_scale`` is (rows,) or
    a 0-d tensor (one scale for every row); ``dlse`` (rows,) or None; ``dbias_part`` (ceil(rows / BLOCK_N),
    width) fp32 or None; ``class_offset`` the first class of ``weight`` in a vocabulary-parallel group.
    ``skip_ignored``: token tiles without a target compute nothing and store nothing in ``dlogits`` (zeros with
    ``zero_skipped``). ``tma_loads`` as in ``linear_cross_entropy_forward``."""
    n_rows, n_hidden = x2d.shape
    width = dlogits.shape[1]
    seq_len, stride_target_outer, stride_target_seq = target_layout(target)
    cfg = config_for(x2d, weight, tma_loads=tma_loads, skip_ignored=skip_ignored)
    c = cfg["dlogits"]
    programs, tma = _grid(cfg, x2d, weight, triton.cdiv(n_rows, c["BLOCK_N"]) * triton.cdiv(width, c["BLOCK_V"]))
    _lce_dlogits_kernel[(programs,)](
        x2d, weight, bias, target, row_state, row_scale, dlse, dlogits, dbias_part,
        n_rows, n_hidden, weight.shape[0], seq_len, col_start, width, class_offset,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
        stride_target_outer, stride_target_seq, 0 if row_scale.dim() == 0 else row_scale.stride(0),
        dlogits.stride(0),
        int(shift), ignore_index, *split_f64(softcap or 0.0),
        BLOCK_N=c["BLOCK_N"], BLOCK_V=c["BLOCK_V"], BLOCK_H=c["BLOCK_H"], GROUP_N=c["GROUP_N"],
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_DLSE=dlse is not None, COMPUTE_DBIAS=dbias_part is not None, SKIP_IGNORED=skip_ignored,
        ZERO_SKIPPED=zero_skipped, TMA=tma, PRECISION=dot_precision(x2d.dtype, input_precision),
        DTYPE=math_dtype(x2d),
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )


def compile_variants():
    """Call the launchers once per constexpr combination they can produce, with pointer and tensor-descriptor
    loads, on small CPU tensors (for ``bench/compile_report.py``, which records the launches instead of running
    them). The tile config is the one each dtype gets at LLM sizes (it depends on the dtype and ``tma_loads`` only,
    not on the tiny shapes here). The GEMMs are launched as the backward (``fusedloss.losses.linear_cross_entropy``)
    does under the "pointer" and "tma" schedules."""

    def launch(dtype, tma_loads, *, bias=False, softcap=False, smoothing=False, dlse=False, bias_grad=None,
               skip=False, precision=None):
        rows, hidden, vocab = 8, 64, 256
        x = torch.zeros(rows, hidden, dtype=dtype)
        w = torch.zeros(vocab, hidden, dtype=dtype)
        b = torch.zeros(vocab, dtype=dtype) if bias else None
        t = torch.zeros(rows, dtype=torch.long)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        state = torch.zeros(rows, ROW_STATE, dtype=acc)
        opts = dict(ignore_index=-100, label_smoothing=0.1 if smoothing else 0.0, softcap=30.0 if softcap else None,
                    shift=True, input_precision=precision, skip_ignored=skip, tma_loads=tma_loads)
        linear_cross_entropy_forward(x, w, b, t, torch.zeros(rows, dtype=acc), state, focal_gamma=2.0, z_loss=1e-4,
                                     **opts)
        g = torch.zeros(rows, vocab, dtype=dtype)
        part = torch.zeros(1, vocab, dtype=acc) if (bias if bias_grad is None else bias_grad) else None
        for zero in (False, True) if skip else (False,):
            linear_cross_entropy_dlogits(x, w, b, t, state, torch.ones((), dtype=acc),
                                         torch.zeros(rows, dtype=acc) if dlse else None, g, part, 0,
                                         zero_skipped=zero, **opts)

    def gemms(dtype, tma_loads, precision=None):
        """The backward's GEMM launches (``_recompute``) for ``dtype``, with pointer or tensor-descriptor loads:
        without the other features, then with them (the live-tile list of skip_ignored, the scale folded into G of
        cublas_dw, the compensated dX sum)."""
        rows, hidden, vocab = 256, 256, 256
        x = torch.zeros(rows, hidden, dtype=dtype)
        w = torch.zeros(vocab, hidden, dtype=dtype)
        g = torch.zeros(rows, vocab, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        cfg = config_for(x, w, tma_loads=tma_loads, compact_workspace=tma_loads, skip_ignored=tma_loads)
        one = torch.ones((), dtype=acc)
        x32 = torch.zeros(rows, hidden, dtype=acc)
        dw_tile, dx_tile = gemm_tile(cfg, "gemm_dw"), gemm_tile(cfg, "gemm_dx")
        kw = dict(programs=cfg["programs"], input_precision=precision)
        matmul(g.t(), x, w, tile=dw_tile, scale=one, **kw)                               # dW = G^T X
        matmul(g, w, x, tile=dx_tile, scale=one, **kw)                                   # dX, one chunk
        matmul(g, w, x32, tile=dx_tile, **kw)                                            # dX, first chunk
        matmul(g, w, x32, tile=dx_tile, acc=x32, **kw)                                   # middle chunk
        matmul(g, w, x, tile=dx_tile, acc=x32, scale=one, **kw)                          # last chunk
        tile_rows = cfg["dlogits"]["BLOCK_N"]
        sparse = dict(tile_order=torch.zeros(rows // tile_rows, dtype=torch.int32),
                      n_live=torch.ones((), dtype=torch.int32), tile_rows=tile_rows, **kw)
        for live in (False, True):  # the live-tile list is used when rows are skipped (no gradient into the lse)
            skipped = sparse if live else kw
            m, k = ("m", "k") if live else ("", "")
            scale = one if dtype == torch.float16 else None  # the scalar is folded into G but for fp16
            # dW on Triton: fp16, an fp32 precision override, or every dtype without cublas_dw
            matmul(g.t(), x, w, tile=dw_tile, scale=scale, sparse=k, **skipped)
            if dtype == torch.bfloat16:  # compensated dX sum: first, middle, last chunk
                lo = torch.zeros(rows, hidden, dtype=torch.bfloat16)
                matmul(g, w, x, tile=dx_tile, lo_out=lo, sparse=m, zero_skipped=live, **skipped)
                matmul(g, w, x, tile=dx_tile, acc=x, lo_in=lo, lo_out=lo, sparse=m, **skipped)
                matmul(g, w, x, tile=dx_tile, acc=x, lo_in=lo, sparse=m, **skipped)
            elif dtype == torch.float16:  # fp32 sum, the scale in the last epilogue
                matmul(g, w, x32, tile=dx_tile, sparse=m, zero_skipped=live, **skipped)
                matmul(g, w, x32, tile=dx_tile, acc=x32, sparse=m, **skipped)
                matmul(g, w, x, tile=dx_tile, acc=x32, scale=scale, sparse=m, **skipped)
            else:  # dX sums in itself
                matmul(g, w, x, tile=dx_tile, sparse=m, zero_skipped=live, **skipped)
                matmul(g, w, x, tile=dx_tile, acc=x, sparse=m, **skipped)

    for tma_loads in (False, True):
        for bias, softcap, smoothing in itertools.product((False, True), repeat=3):
            for dlse in (False, True):
                launch(torch.bfloat16, tma_loads, bias=bias, softcap=softcap, smoothing=smoothing, dlse=dlse)
        launch(torch.bfloat16, tma_loads, bias=True, bias_grad=False)
        for dtype in (torch.float16, torch.float32, torch.float64):
            launch(dtype, tma_loads)
            launch(dtype, tma_loads, bias=True, softcap=True, smoothing=True, dlse=True)
        launch(torch.float32, tma_loads, precision="tf32")
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            gemms(dtype, tma_loads)
        gemms(torch.float32, tma_loads, precision="tf32")
        for dtype in (torch.bfloat16, torch.float16, torch.float32):  # skip_ignored
            launch(dtype, tma_loads, skip=True)
            launch(dtype, tma_loads, bias=True, softcap=True, smoothing=True, skip=True)
