"""Linear + cross-entropy without the logits: ``loss = CE(X @ W^T + b, y)`` for X ``(N, H)``, W ``(V, H)``, with
the extras of the cross-entropy family (label smoothing, focal weighting, z-loss, soft-capping), never holding the
``(N, V)`` logits.

The per-row math is that of ``kernels/cross_entropy.py`` (its docstring derives it): with ``x`` the soft-capped
logits of one row, ``lse = logsumexp(x)``, the loss and the four per-row gradient coefficients come from
(lse, x_y, sum_c (lse - x_c)) alone, and

    dloss/dx_c = p_c * (K1 + [c != y] * Kf) - K3 - [c == y] * Ky,          p_c = exp(x_c - lse)

(class weights are not supported here, so the smoothing coefficient a_c is 1). The chain rule through the cap
multiplies by ``1 - tanh^2``; through the linear layer, with ``G = dloss/dlogits``:

    dX = G @ W,    dW = G^T @ X,    db = column sums of G.

Forward (two launches, O(N) outputs)
    ``_lce_fwd_kernel``: a grid of (token tile x vocabulary split) programs; each computes (BLOCK_N x BLOCK_V)
    logit tiles with ``tl.dot`` over H (fp32 accumulation; fp64 for fp64 inputs), adds the bias, applies the
    cap, and folds the tile into a per-row online (max, sum-exp), the running smoothing sum
    ``sum_c (x_c - max)`` and the target logit. Each split writes those four numbers per row to a partial
    buffer; ``_lce_combine_kernel`` merges the splits (the log-sum-exp merge of Milakov & Gimelshein) and writes
    the per-row loss, lse and (K1, Kf, Ky, K3). Splitting the vocabulary keeps the GPU full when N is small
    (8192 tokens are only 64 tiles of 128), and the splits of one token tile are scheduled next to each other
    (a GROUP_N swizzle) so the X tiles stay in L2 while the W tiles stream: W is read from HBM about once per
    group of GROUP_N token tiles, V*H*s*ceil(N / (BLOCK_N*GROUP_N)) bytes (8.4 GB at N=8192, H=4096, V=128256,
    bf16) for 2*N*H*V FLOPs (8.6e12): 1e-3 B/FLOP, under a third of an H100's ridge point (3.35 TB/s / 990
    TFLOP/s = 3.4e-3 B/FLOP), so the forward is bound by the tensor cores, as the bare matmul is.

Backward (per vocabulary chunk of ``w`` columns: three launches, no atomics)
    1. ``_lce_dlogits_kernel`` recomputes the (N x w) logit tiles exactly as the forward did, forms G in
       registers from the saved lse and coefficients, and writes it in the input dtype to a workspace, plus the
       per-tile column sums of G (fp32) for db.
    2. ``_lce_matmul_kernel`` as dW[chunk] = G^T @ X: K = N, the whole token dimension, so every dW row is
       produced once, in fp32 registers, and written once in the weight's dtype.
    3. ``_lce_matmul_kernel`` as dX (+)= G @ W[chunk]: K = w; across chunks dX accumulates in an fp32 buffer
       that each GEMM program loads as its K loop's initial value and stores back (it owns the tile: no
       atomics); the last chunk applies the gradient's scale and writes the input dtype.
    G holds the coefficient form times the per-row scale (``grad_output`` for 'none'); the scalar of 'mean'
    and 'sum' (grad_output / denominator) is applied in the GEMM epilogues, so G keeps its magnitude (fp16
    does not flush p / N to zero).

    Why this decomposition. Recomputing the logits once is unavoidable (the softmax of a row needs its lse,
    which needs the whole vocabulary), so backward is 3 GEMMs of 2*N*H*V FLOPs and forward one: 8*N*H*V in all
    against 6*N*H*V for the bare matmuls of an eager linear layer (the floor for exact gradients without the
    logits is 4/3 of the bare matmuls). The alternatives cost more:
    - one fused kernel per (token tile, vocab tile) adding its G @ W and G^T @ X into dX and dW (Cut
      Cross-Entropy): (BLOCK_N + BLOCK_V) * H fp32 atomic adds per tile, i.e. N*V*H*(1/BLOCK_V + 1/BLOCK_N)
      ~ 67e9 atomics at N=8192, H=4096, V=128256, BLOCK=128: far more traffic than the GEMMs' own operands;
    - a dX kernel looping over the vocabulary with dX in registers: the (BLOCK_N x H) fp32 accumulator is 2 MB
      at H=4096, so H must be split and the logit tiles recomputed H/BLOCK_H times.
    The G round trip costs N*w*s bytes written and read twice per chunk (s = 2 for bf16), and the fp32 dX
    accumulator 8*N*H bytes per chunk; per chunk the three GEMMs do 6*N*H*w FLOPs, so the extra traffic is
    3*s/(6*H) + 8/(6*w) bytes/FLOP = 2.4e-4 + 3.3e-4 at H = w = 4096, bf16: a sixth of the H100's ridge point,
    on top of the GEMMs' own operand reads, so the backward stays bound by the tensor cores. A wider chunk
    (``LCE_WORKSPACE_BYTES``) trades workspace for less dX-accumulator traffic.

Workspace bound (bytes, beyond inputs, outputs and the gradients themselves), with s the input's itemsize,
``w = chunk`` from ``configs.linear_cross_entropy_config`` (``LCE_WORKSPACE_BYTES / (N * s)`` rounded to
the tile, so ``N * w * s <= max(LCE_WORKSPACE_BYTES, N * 256 * s)``), P the forward's vocabulary splits and
c the compute dtype's itemsize (4, or 8 for fp64):
    forward:  4*c*N*P (partials, P <= LCE_MAX_PARTIAL_BYTES / (16 N))  +  6*c*N (loss, lse, coefficients)
    backward: N*w*s (G chunk)  +  4*N*H (fp32 dX accumulator: only for 16-bit inputs with V > w)
              +  4*ceil(N / BLOCK_N)*w + 4*V (db partials and sum, only with a bias that needs grad)
At N=8192, H=4096, V=128256, bf16: 64 MiB + 128 MiB + ~2.5 MiB, against 2 GiB for the bf16 logits alone.

No host syncs: every size above comes from shapes; grad_output, the mean's denominator and the per-row scales
stay on the device. All offsets that scale with N, V or H are computed in 64 bits.
"""

import itertools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from ._common import grouped_tile, join_f64, online_logsumexp_update, soft_cap, split_f64
from ._launch import custom_launcher, num_sms
from .cross_entropy import (
    ROW_STATE,
    _dlogits_from_coefs,
    _load_row_state,
    _one_stride_walk,
    _row_loss_and_coefs,
    _store_row_state,
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
def _logits_tile(x_ptr, w_ptr, bias_ptr, rows, cols, row_mask, col_mask, n_hidden,
                 stride_xr, stride_xh, stride_wv, stride_wh, stride_bias, softcap,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                 DTYPE: tl.constexpr):
    """A [BLOCK_N, BLOCK_V] tile of logits ``X[rows] @ W[cols]^T + b[cols]``, accumulated over H in DTYPE (fp32,
    or fp64 for fp64 inputs) on the tensor cores for 16-bit inputs, soft-capped, with padded columns set to -inf
    after the cap. W is read as the K-major [BLOCK_H, BLOCK_V] operand straight from its (V, H) layout: no
    transpose in the loop. The cap's derivative is not returned: ``1 - (x / cap) ** 2`` from the capped tile
    costs two multiplies where keeping it would cost a second [BLOCK_N, BLOCK_V] fp32 tile of registers (and
    spills at 128 x 128 on 8 warps)."""
    offs_h = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xr + offs_h[None, :] * stride_xh
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wv + offs_h[:, None] * stride_wh
    acc = tl.zeros([BLOCK_N, BLOCK_V], DTYPE)
    for h in range(0, tl.cdiv(n_hidden, BLOCK_H)):
        h_mask = offs_h < n_hidden - h * BLOCK_H
        x = tl.load(x_ptrs, mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=h_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_H * stride_xh
        w_ptrs += BLOCK_H * stride_wh
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols.to(tl.int64) * stride_bias, mask=col_mask, other=0.0).to(DTYPE)[None, :]
    if HAS_SOFTCAP:
        acc, _ = soft_cap(acc, softcap)
    return tl.where(col_mask[None, :], acc, float("-inf"))


# ---------------------------------------------------------------------------------------------------------------
# Kernels


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
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """One (token tile, vocabulary split): per row, the split's (max m, sum exp(x - m), sum (x_c - m), x_y), into
    ``part`` laid out (4, n_splits, n_rows) so every store is row-contiguous. x_y is 0 in the splits that do not
    hold the target; the smoothing sum is kept relative to the running max so that it does not cancel."""
    softcap = join_f64(cap_hi, cap_lo, DTYPE)
    tile_n, split = grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), n_splits, GROUP_N)
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
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_mask = cols < col_end
        x = _logits_tile(x_ptr, w_ptr, bias_ptr, rows, cols, row_mask, col_mask, n_hidden,
                         stride_xr, stride_xh, stride_wv, stride_wh, stride_bias, softcap,
                         BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, PRECISION, DTYPE)
        m_old = m
        m, s, m_ref = online_logsumexp_update(m, s, x, 1)
        if HAS_SMOOTHING:
            # sum over the columns seen so far of (x_c - m_ref), re-based when the max moves (as in _ce_fwd_kernel);
            # the columns seen before this tile are start - col_start
            seen = (start - col_start).to(DTYPE)
            coef_dot = tl.where(m_old > float("-inf"), coef_dot + seen * (m_old - m_ref), coef_dot)
            coef_dot += tl.sum(tl.where(col_mask[None, :], x - m_ref[:, None], 0.0), axis=1)
        x_y += tl.sum(tl.where(cols[None, :] == y_col[:, None], x, 0.0), axis=1)

    offs = split.to(tl.int64) * n_rows + rows
    plane = (tl.zeros([], tl.int64) + n_splits) * n_rows  # n_splits may arrive as the constexpr 1
    tl.store(part_ptr + offs, m, mask=row_mask)
    tl.store(part_ptr + plane + offs, s, mask=row_mask)
    tl.store(part_ptr + 2 * plane + offs, coef_dot, mask=row_mask)
    tl.store(part_ptr + 3 * plane + offs, x_y, mask=row_mask)


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
        loss, k1, kf, ky, k3 = _row_loss_and_coefs(m, log_s, x_y, one * n_classes, coef_dot, one, one, valid,
                                                   in_range, eps, gamma, z, n_classes, HAS_SMOOTHING)
        tl.store(loss_ptr + rows, loss, mask=row_mask)
        _store_row_state(state_ptr, rows, row_mask, m, log_s, k1, kf, ky, k3)


@triton.jit
def _lce_dlogits_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, target_ptr, state_ptr, row_scale_ptr, dlse_ptr, dlogits_ptr, dbias_part_ptr,
    # shapes
    n_rows, n_hidden, n_classes, seq_len, col_start, chunk_width, class_offset,
    # strides (stride_row_scale is 0 for one scale shared by every row)
    stride_xr, stride_xh, stride_wv, stride_wh, stride_bias, stride_target_outer, stride_target_seq, stride_row_scale,
    # constants
    shift, ignore_index, cap_hi, cap_lo,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_DLSE: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """G = dloss/dlogits for one (token tile, vocabulary tile) of the chunk [col_start, col_start + chunk_width):
    the logits recomputed as in the forward, G from the per-row coefficients times the per-row scale (plus
    ``dlse * p`` when the returned lse is differentiated), stored (n_rows, chunk_width) in the workspace's dtype;
    with COMPUTE_DBIAS the tile's fp32 column sums go to row ``tile_n`` of ``dbias_part``."""
    softcap = join_f64(cap_hi, cap_lo, DTYPE)
    tile_n, tile_v = grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.cdiv(chunk_width, BLOCK_V),
                                   GROUP_N)
    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = col_start + local
    row_mask = rows < n_rows
    col_mask = local < chunk_width
    x = _logits_tile(x_ptr, w_ptr, bias_ptr, rows, cols, row_mask, col_mask, n_hidden,
                     stride_xr, stride_xh, stride_wv, stride_wh, stride_bias, softcap,
                     BLOCK_N, BLOCK_V, BLOCK_H, HAS_BIAS, HAS_SOFTCAP, PRECISION, DTYPE)

    scale = tl.load(row_scale_ptr + rows.to(tl.int64) * stride_row_scale, mask=row_mask, other=0.0).to(DTYPE)
    m, log_s, k1, kf, ky, k3 = _load_row_state(state_ptr, rows, row_mask, scale, DTYPE)
    if HAS_DLSE:
        k1 += tl.load(dlse_ptr + rows, mask=row_mask, other=0.0).to(DTYPE)  # d lse / d x_c = p_c
    y = _target_of_rows(target_ptr, rows, row_mask, seq_len, shift, stride_target_outer, stride_target_seq,
                        ignore_index)
    p = tl.exp((x - m[:, None]) - log_s[:, None])
    g = _dlogits_from_coefs(p, cols[None, :] == _class_i32(y - class_offset, n_classes)[:, None], k1, kf, ky)
    if HAS_SMOOTHING:
        g -= k3[:, None]
    if HAS_SOFTCAP:
        t = x * (1.0 / softcap)  # tanh of the uncapped logit; padded columns give -inf here, masked just below
        g *= 1.0 - t * t
    mask = row_mask[:, None] & col_mask[None, :]
    g = tl.where(mask, g, 0.0)
    row_ptrs = dlogits_ptr + rows.to(tl.int64) * chunk_width
    tl.store(row_ptrs[:, None] + local[None, :], g.to(dlogits_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_DBIAS:
        tl.store(dbias_part_ptr + tile_n.to(tl.int64) * chunk_width + local, tl.sum(g, axis=0), mask=col_mask)


@triton.jit
def _lce_matmul_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr, acc_ptr, scale_ptr,
    # shapes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on, stride_accm, stride_accn,
    # constants
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    LOAD_ACC: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """out = scale * (acc + A @ B) (acc only with LOAD_ACC), accumulated in DTYPE and stored in out's dtype. The
    loaded ``acc`` is the K loop's initial value, so it costs no registers beyond the accumulator. Each program
    owns one (BLOCK_M x BLOCK_N) output tile, so ``acc`` may alias ``out`` (the fp32 dX accumulator: read, add,
    write by one program, no atomics). Any strides: A is G (K-major) for dX and G^T (M-major) for dW."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    mask = m_mask[:, None] & n_mask[None, :]
    if LOAD_ACC:
        acc = tl.load(acc_ptr + offs_m[:, None] * stride_accm + offs_n[None, :] * stride_accn, mask=mask,
                      other=0.0).to(DTYPE)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc = acc * tl.load(scale_ptr).to(DTYPE)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: derive every constexpr flag and config from the arguments' shapes, and write into caller-allocated
# buffers. Registered as custom ops (``_launch.custom_launcher``), so their arguments are what a schema can hold.


def target_layout(target):
    """(seq_len, stride_outer, stride_seq) addressing ``target`` (the input's leading shape) as (outer, seq_len),
    or None when its leading dims cannot be walked with one stride (the caller then makes it contiguous)."""
    if target.dim() == 0:
        return 1, 0, 0
    outer = _one_stride_walk(target.shape[:-1], target.stride()[:-1])
    return None if outer is None else (target.shape[-1], outer, target.stride(-1))


def _compute_dtype(x):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _precision(x, input_precision):
    # Only fp32 operands have a choice; 16-bit operands always run on the tensor cores, fp64 on DMMA/FMA.
    return input_precision if x.dtype.itemsize == 4 else "ieee"


def config_for(x2d, weight):
    """The launch configuration (``configs.linear_cross_entropy_config``) for this problem and device."""
    return configs.linear_cross_entropy_config(x2d.shape[0], x2d.shape[1], weight.shape[0], x2d.dtype.itemsize,
                                               num_sms(x2d.device))


def num_splits(cfg, n_classes):
    """The forward's vocabulary splits for a config: (n_splits, split_width); the partial buffer holds
    4 * n_splits * rows values."""
    block_v = cfg["fwd"]["BLOCK_V"]
    split_width = triton.cdiv(triton.cdiv(n_classes, block_v), cfg["n_splits"]) * block_v
    return triton.cdiv(n_classes, split_width), split_width


@custom_launcher("linear_cross_entropy_forward", mutates_args=("loss", "row_state"))
def linear_cross_entropy_forward(
    x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
    loss: torch.Tensor, row_state: torch.Tensor, *, ignore_index: int, label_smoothing: float, focal_gamma: float,
    z_loss: float, softcap: Optional[float], shift: bool, input_precision: str, class_offset: int = 0,
    partial: bool = False,
) -> None:
    """Launch the forward: per-row ``loss`` (rows,) and the row state (rows, ROW_STATE) of
    ``kernels.cross_entropy`` (m, log s, K1, Kf, Ky, K3), in the compute dtype (fp32, fp64 for fp64 inputs).
    ``x2d`` (rows, H) and ``weight`` (V, H) with any strides, ``bias`` (V,) with any stride or None, ``target``
    with a ``target_layout``. The per-split partials (``4 * n_splits * rows`` values) are allocated here.

    A shard of a vocabulary-parallel group: ``weight`` holds classes ``class_offset ..``; with ``partial`` the
    launch writes the shard's merged partials (m, s, A, x_y) into ``row_state`` as (4, rows) and no ``loss``;
    ``linear_cross_entropy_combine`` finishes from every shard's."""
    n_rows, n_hidden = x2d.shape
    n_classes = weight.shape[0]
    cfg = config_for(x2d, weight)
    n_split, split_width = num_splits(cfg, n_classes)
    seq_len, stride_target_outer, stride_target_seq = target_layout(target)
    part = torch.empty(4 * n_split * n_rows, dtype=loss.dtype, device=x2d.device)
    c = cfg["fwd"]
    _lce_fwd_kernel[(triton.cdiv(n_rows, c["BLOCK_N"]) * n_split,)](
        x2d, weight, bias, target, part,
        n_rows, n_hidden, n_classes, seq_len, n_split, split_width, class_offset,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
        stride_target_outer, stride_target_seq,
        int(shift), ignore_index, *split_f64(softcap or 0.0),
        BLOCK_N=c["BLOCK_N"], BLOCK_V=c["BLOCK_V"], BLOCK_H=c["BLOCK_H"], GROUP_N=c["GROUP_N"],
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0.0,
        PRECISION=_precision(x2d, input_precision), DTYPE=_compute_dtype(x2d),
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
        HAS_SMOOTHING=label_smoothing > 0.0, PARTIAL=partial, DTYPE=_compute_dtype(part),
        num_warps=configs.LCE_COMBINE_NUM_WARPS,
    )


@custom_launcher("linear_cross_entropy_dlogits", mutates_args=("dlogits", "dbias_part"))
def linear_cross_entropy_dlogits(
    x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
    row_state: torch.Tensor, row_scale: torch.Tensor, dlse: Optional[torch.Tensor], dlogits: torch.Tensor,
    dbias_part: Optional[torch.Tensor], col_start: int, *, ignore_index: int, label_smoothing: float,
    softcap: Optional[float], shift: bool, input_precision: str, class_offset: int = 0,
) -> None:
    """Launch ``_lce_dlogits_kernel`` for the vocabulary chunk [col_start, col_start + dlogits.shape[1]):
    ``dlogits`` (rows, width) contiguous, in the input's dtype. ``row_scale`` is (rows,) or a 0-d tensor (one
    scale for every row); ``dlse`` (rows,) or None; ``dbias_part`` (ceil(rows / BLOCK_N), width) fp32 or None;
    ``class_offset`` the first class of ``weight`` in a vocabulary-parallel group."""
    n_rows, n_hidden = x2d.shape
    width = dlogits.shape[1]
    seq_len, stride_target_outer, stride_target_seq = target_layout(target)
    c = config_for(x2d, weight)["dlogits"]
    _lce_dlogits_kernel[(triton.cdiv(n_rows, c["BLOCK_N"]) * triton.cdiv(width, c["BLOCK_V"]),)](
        x2d, weight, bias, target, row_state, row_scale, dlse, dlogits, dbias_part,
        n_rows, n_hidden, weight.shape[0], seq_len, col_start, width, class_offset,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
        stride_target_outer, stride_target_seq, 0 if row_scale.dim() == 0 else row_scale.stride(0),
        int(shift), ignore_index, *split_f64(softcap or 0.0),
        BLOCK_N=c["BLOCK_N"], BLOCK_V=c["BLOCK_V"], BLOCK_H=c["BLOCK_H"], GROUP_N=c["GROUP_N"],
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_DLSE=dlse is not None, COMPUTE_DBIAS=dbias_part is not None,
        PRECISION=_precision(x2d, input_precision), DTYPE=_compute_dtype(x2d),
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )


@custom_launcher("linear_cross_entropy_matmul", mutates_args=("out",))
def matmul(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, acc: Optional[torch.Tensor], *,
    gemm: str, input_precision: str,
) -> None:
    """``out = scale * (acc + a @ b)`` for 2-D ``a`` (M, K) and ``b`` (K, N) with any strides (a transposed view
    is read in place), ``out`` (M, N) of any float dtype, ``scale`` a 0-d tensor, ``acc`` None (zero) or (M, N),
    which may be ``out`` itself. Accumulates in fp32 (fp64 for fp64 operands). ``gemm``: which GEMM config of
    ``configs.linear_cross_entropy_config``, ``"gemm_dw"`` or ``"gemm_dx"`` (it depends on the dtype only)."""
    M, K = a.shape
    N = b.shape[1]
    g = configs.linear_cross_entropy_config(1, 1, 1, a.dtype.itemsize, 1)[gemm]
    acc_t = out if acc is None else acc
    _lce_matmul_kernel[(triton.cdiv(M, g["BLOCK_M"]) * triton.cdiv(N, g["BLOCK_N"]),)](
        a, b, out, acc_t, scale,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        acc_t.stride(0), acc_t.stride(1),
        BLOCK_M=g["BLOCK_M"], BLOCK_N=g["BLOCK_N"], BLOCK_K=g["BLOCK_K"], GROUP_M=g["GROUP_M"],
        LOAD_ACC=acc is not None, PRECISION=_precision(a, input_precision), DTYPE=_compute_dtype(a),
        num_warps=g["num_warps"], num_stages=g["num_stages"],
    )


def compile_variants():
    """Call the launchers once per constexpr combination they can produce, on small CPU tensors (for
    ``bench/compile_report.py``, which records the launches instead of running them). The tile config is the
    one each dtype gets at LLM sizes (it depends on the dtype only, not on the tiny shapes here)."""

    def launch(dtype, *, bias=False, softcap=False, smoothing=False, dlse=False, bias_grad=None, gemms=False,
               precision="ieee"):
        rows, hidden, vocab = 8, 64, 256
        x = torch.zeros(rows, hidden, dtype=dtype)
        w = torch.zeros(vocab, hidden, dtype=dtype)
        b = torch.zeros(vocab, dtype=dtype) if bias else None
        t = torch.zeros(rows, dtype=torch.long)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        state = torch.zeros(rows, ROW_STATE, dtype=acc)
        opts = dict(ignore_index=-100, label_smoothing=0.1 if smoothing else 0.0, softcap=30.0 if softcap else None,
                    shift=True, input_precision=precision)
        linear_cross_entropy_forward(x, w, b, t, torch.zeros(rows, dtype=acc), state, focal_gamma=2.0, z_loss=1e-4,
                                     **opts)
        g = torch.zeros(rows, vocab, dtype=dtype)
        part = torch.zeros(1, vocab, dtype=acc) if (bias if bias_grad is None else bias_grad) else None
        linear_cross_entropy_dlogits(x, w, b, t, state, torch.ones((), dtype=acc),
                                     torch.zeros(rows, dtype=acc) if dlse else None, g, part, 0, **opts)
        if gemms:
            one = torch.ones((), dtype=acc)
            x32 = torch.zeros(rows, hidden, dtype=acc)
            for a, b_, out, acc_in, gemm in ((g.t(), x, w, None, "gemm_dw"),     # dW = G^T X
                                             (g, w, x, None, "gemm_dx"),         # dX, one chunk
                                             (g, w, x32, None, "gemm_dx"),       # dX, first chunk
                                             (g, w, x32, x32, "gemm_dx"),        # middle chunk
                                             (g, w, x, x32, "gemm_dx")):         # last chunk
                matmul(a, b_, out, one, acc_in, gemm=gemm, input_precision=precision)

    for bias, softcap, smoothing in itertools.product((False, True), repeat=3):
        for dlse in (False, True):
            launch(torch.bfloat16, bias=bias, softcap=softcap, smoothing=smoothing, dlse=dlse)
    launch(torch.bfloat16, bias=True, bias_grad=False)
    launch(torch.bfloat16, gemms=True)
    for dtype in (torch.float16, torch.float32, torch.float64):
        launch(dtype, gemms=True)
        launch(dtype, bias=True, softcap=True, smoothing=True, dlse=True)
    launch(torch.float32, gemms=True, precision="tf32")
