"""Contrastive losses (NT-Xent, CLIP, InfoNCE, SigLIP): similarity + loss tile by tile, never the N x N matrix.

Derivations, byte and FLOP counts, design choices:
``docs/kernels/contrastive.md``.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from ._common import expm1, grouped_tile, log1p, math_dtype
from ._gemm import abt_tile, dot_precision, matmul
from ._launch import custom_launcher, num_sms

# Per-row statistics the forward writes: softmax (max and sum-exp of the negatives, their moment, the positive's dot
# product); sigmoid (the row's loss, sum of u, sum of u * C). Column statistics per program: (max, sum-exp, moment).
SOFTMAX_ROW_STATS = 4
SIGMOID_ROW_STATS = 3
COL_STATS = 3

# The fixed-shift schedule's constants (docs/kernels/contrastive.md): the largest term is 2^HEADROOM; a line whose
# terms sum to less than 2^FLOOR_LOG2 is recomputed exactly; beyond MAX_SCALE the exact kernels compute everything.
FIXED_SHIFT_HEADROOM = tl.constexpr(64.0)
FIXED_SHIFT_FLOOR_LOG2 = tl.constexpr(-71.0)
FIXED_SHIFT_FLOOR = tl.constexpr(2.0**-71)
FIXED_SHIFT_MAX_SCALE = tl.constexpr(1024.0)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _online_moment_update(m, s, t, x, c, AXIS: tl.constexpr):
    """``kernels._common.online_logsumexp_update`` with a first moment: merge the tile ``x`` into the running
    (max, sum of exp(x - max), sum of exp(x - max) * c) along ``AXIS``, with one exp per element. A line whose values
    are all -inf so far keeps m = -inf and s = t = 0."""
    m_new = tl.maximum(m, tl.max(x, axis=AXIS))
    shift = tl.where(m_new > float("-inf"), m_new, 0.0)
    decay = tl.exp(m - shift)
    p = tl.exp(x - tl.expand_dims(shift, AXIS))
    return m_new, s * decay + tl.sum(p, axis=AXIS), t * decay + tl.sum(p * c, axis=AXIS)


@triton.jit
def _fixed_shift(scale):
    """(c1, c0) of the fixed-shift schedule: a term is ``exp2(C c1 - c0) = exp(s C - c0 ln 2)``. Out of range
    (``|s| > FIXED_SHIFT_MAX_SCALE`` or NaN) c1 = 0 and c0 = +inf: every term is 0, every line is flagged, and
    every criterion ``log2(sum) - c0 >= FLOOR`` of the backward fails, so the exact kernels take over."""
    live = tl.abs(scale) <= FIXED_SHIFT_MAX_SCALE
    c1 = tl.where(live, scale * LOG2E, 0.0)
    c0 = tl.where(live, tl.abs(scale) * LOG2E - FIXED_SHIFT_HEADROOM, float("inf"))
    return c1, c0


@triton.jit
def _sigmoid_terms(z, is_pos):
    """SigLIP's per-pair loss ``softplus(-l z)`` and its derivative ``u = -l sigmoid(-l z)`` (l = 1 at positives,
    -1 elsewhere) from one ``exp(-|l z|)``: finite for every finite or infinite z."""
    lz = tl.where(is_pos, z, -z)
    e = tl.exp(-tl.abs(lz))
    loss = tl.maximum(-lz, 0.0) + log1p(e)
    sig = tl.where(lz >= 0.0, e, 1.0) / (1.0 + e)  # sigmoid(-lz)
    return loss, tl.where(is_pos, -sig, sig)


@triton.jit
def _fixed_shift_tile(c, c1, c0, shift, s, t, pos_dot, rows, cols, row_mask, col_mask, pos, pos_lo, pos_hi, row_start,
                      col_start, ws_ptr, ws_base, stride_ws_stat, tile, t_begin, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, SELF_MASK: tl.constexpr, COL_STATS: tl.constexpr):
    """Fold one [BLOCK_M, BLOCK_N] tile of raw dot products ``c`` into the fixed-shift sums: the rows' (s, t,
    pos_dot) returned, the columns' (s, t) added to this program's workspace slice (``ws_ptr + ws_base``), with the
    shift as their m. One exp2 per element. The edge mask is applied to every tile (one select): applied only in
    the edge tiles, behind a scalar branch, it cost the 128 x 128 CLIP variant 118 spilled registers on sm_80."""
    e = tl.where(row_mask[:, None] & col_mask[None, :], tl.exp2(c * c1 - c0), 0.0)
    if SELF_MASK:
        if (col_start < row_start + BLOCK_M) & (col_start + BLOCK_N > row_start):
            e = tl.where(rows[:, None] == cols[None, :], 0.0, e)
    if (col_start <= pos_hi) & (col_start + BLOCK_N > pos_lo):
        is_pos = cols[None, :] == pos[:, None]
        pos_dot += tl.sum(tl.where(is_pos, c, 0.0), axis=1)
        e = tl.where(is_pos, 0.0, e)
    ec = e * c
    s += tl.sum(e, axis=1)
    t += tl.sum(ec, axis=1)
    if COL_STATS:
        carry = col_mask & (cols * 0 + tile > t_begin)  # (a vector mask: see the exact branch)
        ws = ws_ptr + ws_base + cols
        cs = tl.load(ws + stride_ws_stat, mask=carry, other=0.0) + tl.sum(e, axis=0)
        ct = tl.load(ws + 2 * stride_ws_stat, mask=carry, other=0.0) + tl.sum(ec, axis=0)
        tl.store(ws, tl.zeros([BLOCK_N], cs.dtype) + shift, mask=col_mask)
        tl.store(ws + stride_ws_stat, cs, mask=col_mask)
        tl.store(ws + 2 * stride_ws_stat, ct, mask=col_mask)
    return s, t, pos_dot


@triton.jit
def _contrastive_fwd_kernel(
    # pointers
    q_ptr, k_ptr, scale_ptr, bias_ptr, row_ptr, ws_ptr,
    # shapes
    n_rows, n_cols, dim, tiles_per_program, pos_offset, pos_modulus,
    # strides (in elements)
    stride_qm, stride_qd, stride_km, stride_kd, stride_row, stride_row_stat, stride_ws_program, stride_ws_stat,
    # constants
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_CHUNK: tl.constexpr,
    SELF_MASK: tl.constexpr, COL_STATS: tl.constexpr, SIGMOID: tl.constexpr, SCHEDULE: tl.constexpr,
    PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """Per row the statistics of the module docstring into ``row`` (n_rows x SOFTMAX_ROW_STATS or
    SIGMOID_ROW_STATS, strides ``stride_row`` / ``stride_row_stat``); with COL_STATS this program's column
    (max, sum-exp, moment) over its band of rows, in slice ``program_id`` of the workspace.

    SCHEDULE (softmax): ``"exact"`` online (max, sum-exp, moment); ``"fixed_shift"`` sums of ``exp2(C c1 - c0)``
    with the max fixed at the shift; ``"fallback"`` the online statistics of the row tiles that hold a row whose
    stored sum is below 2^FIXED_SHIFT_FLOOR_LOG2 (the others return after that one load; rows only)."""
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr).to(DTYPE)
    if SCHEDULE == "fixed_shift":
        c1, c0 = _fixed_shift(scale)
        shift = tl.where(c0 < float("inf"), c0 * LN2, 0.0)  # m: finite, one value for every line and program
    num_tiles = tl.cdiv(n_rows, BLOCK_M)
    t_begin = pid * tiles_per_program
    t_end = tl.minimum(t_begin + tiles_per_program, num_tiles)
    ws_base = pid.to(tl.int64) * stride_ws_program
    for tile in range(t_begin, t_end):
        row_start = tile * BLOCK_M
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        out = row_ptr + rows.to(tl.int64) * stride_row
        todo = True
        if SCHEDULE == "fallback":
            sums = tl.load(out + stride_row_stat, mask=row_mask, other=1.0)
            todo = tl.max((sums < FIXED_SHIFT_FLOOR).to(tl.int32), axis=0) > 0  # a NaN sum is not flagged
        if todo:
            q_offs = rows.to(tl.int64) * stride_qm
            pos = (rows + pos_offset) % pos_modulus  # indices < 2^31; only offsets need 64 bits
            pos_lo = tl.min(tl.where(row_mask, pos, pos_modulus), axis=0)
            pos_hi = tl.max(tl.where(row_mask, pos, -1), axis=0)
            if ONE_D_CHUNK:
                d_mask = tl.arange(0, BLOCK_D) < dim
                q_tile = tl.load(q_ptr + q_offs[:, None] + tl.arange(0, BLOCK_D)[None, :].to(tl.int64) * stride_qd,
                                 mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            if SIGMOID:
                r_loss = tl.zeros([BLOCK_M], DTYPE)
                r_u = tl.zeros([BLOCK_M], DTYPE)
                r_uc = tl.zeros([BLOCK_M], DTYPE)
                bias = tl.load(bias_ptr).to(DTYPE)
            else:
                if SCHEDULE == "fixed_shift":
                    m = tl.zeros([BLOCK_M], DTYPE) + shift
                else:
                    m = tl.full([BLOCK_M], float("-inf"), DTYPE)
                s = tl.zeros([BLOCK_M], DTYPE)
                t = tl.zeros([BLOCK_M], DTYPE)
                pos_dot = tl.zeros([BLOCK_M], DTYPE)
            for col_start in range(0, n_cols, BLOCK_N):
                cols = col_start + tl.arange(0, BLOCK_N)
                col_mask = cols < n_cols
                k_offs = cols.to(tl.int64) * stride_km
                if ONE_D_CHUNK:
                    kt = tl.load(k_ptr + k_offs[None, :] + tl.arange(0, BLOCK_D)[:, None].to(tl.int64) * stride_kd,
                                 mask=col_mask[None, :] & d_mask[:, None], other=0.0)
                    c = tl.dot(q_tile, kt, tl.zeros([BLOCK_M, BLOCK_N], DTYPE), input_precision=PRECISION)
                else:
                    c = abt_tile(q_ptr, k_ptr, q_offs, k_offs, row_mask, col_mask, dim, stride_qd, stride_kd,
                                 BLOCK_M, BLOCK_N, BLOCK_D, False, PRECISION, DTYPE)
                if SIGMOID:
                    loss, u = _sigmoid_terms(c * scale + bias, cols[None, :] == pos[:, None])
                    loss = tl.where(col_mask[None, :], loss, 0.0)
                    u = tl.where(col_mask[None, :], u, 0.0)
                    r_loss += tl.sum(loss, axis=1)
                    r_u += tl.sum(u, axis=1)
                    r_uc += tl.sum(u * c, axis=1)
                elif SCHEDULE == "fixed_shift":
                    s, t, pos_dot = _fixed_shift_tile(
                        c, c1, c0, shift, s, t, pos_dot, rows, cols, row_mask, col_mask, pos, pos_lo, pos_hi,
                        row_start, col_start, ws_ptr, ws_base, stride_ws_stat, tile, t_begin, BLOCK_M, BLOCK_N,
                        SELF_MASK, COL_STATS)
                else:
                    x = tl.where(col_mask[None, :], c * scale, float("-inf"))
                    if SELF_MASK:
                        if (col_start < row_start + BLOCK_M) & (col_start + BLOCK_N > row_start):
                            x = tl.where(rows[:, None] == cols[None, :], float("-inf"), x)
                    if (col_start <= pos_hi) & (col_start + BLOCK_N > pos_lo):
                        is_pos = cols[None, :] == pos[:, None]
                        pos_dot += tl.sum(tl.where(is_pos, c, 0.0), axis=1)
                        x = tl.where(is_pos, float("-inf"), x)
                    m, s, t = _online_moment_update(m, s, t, x, c, 1)
                    if COL_STATS:
                        # The band's first tile starts the partials; later tiles merge into what this program
                        # stored. (A vector compare: Triton's interpreter rejects a scalar operand in a load mask.)
                        carry = col_mask & (cols * 0 + tile > t_begin)
                        ws = ws_ptr + ws_base + cols
                        cm = tl.load(ws, mask=carry, other=float("-inf"))
                        cs = tl.load(ws + stride_ws_stat, mask=carry, other=0.0)
                        ct = tl.load(ws + 2 * stride_ws_stat, mask=carry, other=0.0)
                        cm, cs, ct = _online_moment_update(cm, cs, ct,
                                                           tl.where(row_mask[:, None], x, float("-inf")), c, 0)
                        tl.store(ws, cm, mask=col_mask)
                        tl.store(ws + stride_ws_stat, cs, mask=col_mask)
                        tl.store(ws + 2 * stride_ws_stat, ct, mask=col_mask)
            if COL_STATS:
                # The next row tile reads the workspace entries stored above, possibly from other threads: a CTA
                # barrier makes those global stores visible (bar.sync orders memory within the CTA).
                tl.debug_barrier()
            if SIGMOID:
                tl.store(out, r_loss, mask=row_mask)
                tl.store(out + stride_row_stat, r_u, mask=row_mask)
                tl.store(out + 2 * stride_row_stat, r_uc, mask=row_mask)
            else:
                tl.store(out, m, mask=row_mask)
                tl.store(out + stride_row_stat, s, mask=row_mask)
                tl.store(out + 2 * stride_row_stat, t, mask=row_mask)
                tl.store(out + 3 * stride_row_stat, pos_dot, mask=row_mask)


@triton.jit
def _exact_weights(x, a, lse, b, lsec, COL_TERM: tl.constexpr):
    """``a_i P_ij (+ b_j Pc_ij)`` from the logits ``x``, two exps per element with a column term."""
    w = a[:, None] * tl.exp(x - lse[:, None])
    if COL_TERM:
        w += b[None, :] * tl.exp(x - lsec[None, :])
    return w


@triton.jit
def band_tile(q_ptr, k_ptr, n_cols, dim, row_start, band_rows, stride_qm, stride_qd, stride_km, stride_kd,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
              PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """This program's tile of a backward band (grouped, GEMM-style): (band-local rows, their mask, rows, columns,
    their mask, the tile's row and column indices, the similarity tile ``Q[rows] K[cols]^T``)."""
    num_m = tl.cdiv(band_rows, BLOCK_M)
    num_n = tl.cdiv(n_cols, BLOCK_N)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, num_n, GROUP_M)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = local < band_rows
    rows = row_start + local
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    c = abt_tile(q_ptr, k_ptr, rows.to(tl.int64) * stride_qm, cols.to(tl.int64) * stride_km, row_mask, col_mask,
                 dim, stride_qd, stride_kd, BLOCK_M, BLOCK_N, BLOCK_D, False, PRECISION, DTYPE)
    return local, row_mask, rows, cols, col_mask, pid_m, pid_n, c


@triton.jit
def _contrastive_dlogits_kernel(
    # pointers
    q_ptr, k_ptr, scale_ptr, bias_ptr, band_scale_ptr, row_ptr, row_coef_ptr, col_ptr, col_coef_ptr, w_ptr,
    # shapes
    n_cols, dim, row_start, band_rows, pos_offset, pos_modulus,
    # strides (in elements)
    stride_qm, stride_qd, stride_km, stride_kd, stride_row, stride_row_coef, stride_col, stride_col_coef, stride_w,
    # constants
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    SELF_MASK: tl.constexpr, COL_TERM: tl.constexpr, SIGMOID: tl.constexpr, SCHEDULE: tl.constexpr,
    PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """``band_scale * W`` (docs/kernels/contrastive.md) for rows ``row_start .. row_start + band_rows`` and every
    column, into the band buffer ``w`` (band_rows, n_cols) in its dtype. ``row`` / ``col``: the finished (lse, loss,
    dloss/ds, negatives' lse) of each row / column (softmax); ``row_coef`` / ``col_coef``: the weights ``a`` /
    ``b``, any stride (0 for one weight). SCHEDULE ``"fixed_shift"``: one exp per element in the tiles whose rows
    and columns all meet the fixed shift's criterion, the exact epilogue in the others."""
    local, row_mask, rows, cols, col_mask, pid_m, pid_n, c = band_tile(
        q_ptr, k_ptr, n_cols, dim, row_start, band_rows, stride_qm, stride_qd, stride_km, stride_kd, BLOCK_M, BLOCK_N,
        BLOCK_D, GROUP_M, PRECISION, DTYPE)
    scale = tl.load(scale_ptr).to(DTYPE)
    a = tl.load(row_coef_ptr + rows.to(tl.int64) * stride_row_coef, mask=row_mask, other=0.0).to(DTYPE)
    pos = (rows + pos_offset) % pos_modulus  # indices < 2^31; only offsets need 64 bits
    col_start = pid_n * BLOCK_N
    if SIGMOID:
        _, u = _sigmoid_terms(c * scale + tl.load(bias_ptr).to(DTYPE), cols[None, :] == pos[:, None])
        w = a[:, None] * u
    else:
        state = row_ptr + rows.to(tl.int64) * stride_row
        lse = tl.load(state, mask=row_mask, other=0.0)
        loss = tl.load(state + 1, mask=row_mask, other=0.0)
        pos_w = (a * expm1(-loss))[:, None]
        if COL_TERM:
            col_state = col_ptr + cols.to(tl.int64) * stride_col
            lsec = tl.load(col_state, mask=col_mask, other=0.0)
            lossc = tl.load(col_state + 1, mask=col_mask, other=0.0)
            b = tl.load(col_coef_ptr + cols.to(tl.int64) * stride_col_coef, mask=col_mask, other=0.0).to(DTYPE)
            pos_w = pos_w + (b * expm1(-lossc))[None, :]
        else:
            b = None
            lsec = None
        if SCHEDULE == "fixed_shift":
            c1, c0 = _fixed_shift(scale)
            # the forward's criterion: the negatives' sum in the fixed domain, log2(sum) = n log2 e - c0, >= FLOOR
            ok = (tl.load(state + 3, mask=row_mask, other=0.0) * LOG2E - c0 >= FIXED_SHIFT_FLOOR_LOG2) | ~row_mask
            fixed = tl.min(ok.to(tl.int32), axis=0) > 0
            if COL_TERM:
                ok_c = (tl.load(col_state + 3, mask=col_mask, other=0.0) * LOG2E - c0 >= FIXED_SHIFT_FLOOR_LOG2) \
                    | ~col_mask
                fixed = fixed & (tl.min(ok_c.to(tl.int32), axis=0) > 0)
            if fixed:
                # P_ij = exp2(C c1 - c0) exp2(c0 - lse_i log2 e): per-line factors are finite (lse >= n >= m - 49)
                weight = a * tl.exp2(c0 - lse * LOG2E)
                if COL_TERM:
                    w = tl.exp2(c * c1 - c0) * (weight[:, None] + (b * tl.exp2(c0 - lsec * LOG2E))[None, :])
                else:
                    w = tl.exp2(c * c1 - c0) * weight[:, None]
            else:
                w = _exact_weights(c * scale, a, lse, b, lsec, COL_TERM)
        else:
            w = _exact_weights(c * scale, a, lse, b, lsec, COL_TERM)
        if (col_start <= tl.max(tl.where(row_mask, pos, -1), axis=0)) & \
                (col_start + BLOCK_N > tl.min(tl.where(row_mask, pos, pos_modulus), axis=0)):
            w = tl.where(cols[None, :] == pos[:, None], pos_w, w)
        if SELF_MASK:
            first = row_start + pid_m * BLOCK_M
            if (col_start < first + BLOCK_M) & (col_start + BLOCK_N > first):
                w = tl.where(rows[:, None] == cols[None, :], 0.0, w)
    w = w * tl.load(band_scale_ptr).to(DTYPE)
    w_offs = local.to(tl.int64)[:, None] * stride_w + cols[None, :]
    tl.store(w_ptr + w_offs, w.to(w_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Launchers: registered custom ops (``_launch.custom_launcher``) writing into caller-allocated buffers; every
# constexpr flag and config is derived from the arguments' shapes and dtypes.


def forward_programs(n_rows, dim, dtype, device, schedule):
    """(programs, tiles_per_program) of the forward launch with column statistics: bands of consecutive row tiles
    over ~CONTRASTIVE_FWD_PROGRAMS_PER_SM programs per SM. ``programs`` is the first dimension of the column
    workspace (the caller allocates it from this)."""
    block_m = configs.contrastive_fwd_config(dim, dtype.itemsize, True, False, schedule)[0]
    num_tiles = max(triton.cdiv(n_rows, block_m), 1)
    programs = configs.CONTRASTIVE_FWD_PROGRAMS or configs.CONTRASTIVE_FWD_PROGRAMS_PER_SM * num_sms(device)
    tiles_per_program = triton.cdiv(num_tiles, programs)
    return triton.cdiv(num_tiles, tiles_per_program), tiles_per_program


def band_rows(n_rows, n_cols, dtype):
    """Rows per backward band (the band buffer is band_rows x n_cols in the features' dtype)."""
    return min(max(n_rows, 1), configs.contrastive_band_rows(n_cols, dtype.itemsize))


@custom_launcher("contrastive_forward", mutates_args=("row_stats", "col_stats"))
def contrastive_forward(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], row_stats: torch.Tensor,
    col_stats: Optional[torch.Tensor], *, pos_offset: int, pos_modulus: int, self_mask: bool, sigmoid: bool,
    schedule: str,
) -> None:
    """Launch ``_contrastive_fwd_kernel``. ``q`` (M, d) and ``k`` (N, d) of one dtype, any strides; ``scale`` and
    ``bias`` (sigmoid only) 0-d; ``row_stats`` (M, SOFTMAX_ROW_STATS or SIGMOID_ROW_STATS) fp32 (fp64 for fp64
    features), any strides; ``col_stats`` None or the (programs, COL_STATS, N) workspace of ``forward_programs``
    (unit column stride). ``schedule``: ``"exact"``; ``"fixed_shift"`` (softmax: the fixed-shift statistics, which
    the caller completes with ``"fallback"`` launches; sigmoid: that schedule's tiles); ``"fallback"`` (softmax,
    without ``col_stats``: recompute, in place, the row tiles holding a row that ``"fixed_shift"`` flagged)."""
    n_rows, dim = q.shape
    n_cols = k.shape[0]
    col = col_stats is not None
    assert schedule in ("exact", "fixed_shift") or not (col or sigmoid)
    block_m, block_n, block_d, num_warps, num_stages = configs.contrastive_fwd_config(dim, q.dtype.itemsize, col,
                                                                                      sigmoid, schedule)
    if col:
        programs, tiles_per_program = forward_programs(n_rows, dim, q.dtype, q.device, schedule)
        assert col_stats.shape == (programs, COL_STATS, n_cols) and col_stats.stride(2) == 1
    else:
        programs, tiles_per_program = max(triton.cdiv(n_rows, block_m), 1), 1
    _contrastive_fwd_kernel[(programs,)](
        q, k, scale, bias, row_stats, col_stats,
        n_rows, n_cols, dim, tiles_per_program, pos_offset, pos_modulus,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), row_stats.stride(0), row_stats.stride(1),
        col_stats.stride(0) if col else 0, col_stats.stride(1) if col else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, ONE_D_CHUNK=dim <= block_d,
        SELF_MASK=self_mask, COL_STATS=col, SIGMOID=sigmoid, SCHEDULE="exact" if sigmoid else schedule,
        PRECISION=dot_precision(q.dtype), DTYPE=math_dtype(q),
        num_warps=num_warps, num_stages=num_stages,
    )


@custom_launcher("contrastive_dlogits", mutates_args=("w",))
def contrastive_dlogits(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], band_scale: torch.Tensor,
    row_state: Optional[torch.Tensor], row_coef: torch.Tensor, col_state: Optional[torch.Tensor],
    col_coef: Optional[torch.Tensor], w: torch.Tensor, *, row_start: int, pos_offset: int, pos_modulus: int,
    self_mask: bool, sigmoid: bool, schedule: str,
) -> None:
    """Launch ``_contrastive_dlogits_kernel`` for rows ``row_start .. row_start + w.shape[0]`` of ``q`` into the
    band ``w`` (rows, N), unit column stride. Softmax: ``row_state`` (M, 4) and ``col_state`` (N, 4) hold (lse,
    loss, dloss/ds, negatives' lse) (unit column stride; ``col_state`` None without a column term); sigmoid:
    ``bias`` 0-d. ``row_coef`` (M,) and ``col_coef`` (N,) any stride. ``schedule``: ``"exact"`` or
    ``"fixed_shift"`` (softmax: the one-exp epilogue where the statistics allow it)."""
    rows, n_cols = w.shape
    dim = q.shape[1]
    assert w.stride(1) == 1 and row_start + rows <= q.shape[0]
    col_term = col_state is not None
    block_m, block_n, block_d, group_m, num_warps, num_stages = configs.contrastive_dlogits_config(q.dtype.itemsize)
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(n_cols, block_n),)
    _contrastive_dlogits_kernel[grid](
        q, k, scale, bias, band_scale, row_state, row_coef, col_state, col_coef, w,
        n_cols, dim, row_start, rows, pos_offset, pos_modulus,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), row_state.stride(0) if row_state is not None else 0,
        row_coef.stride(0), col_state.stride(0) if col_term else 0, col_coef.stride(0) if col_term else 0,
        w.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, GROUP_M=group_m,
        SELF_MASK=self_mask, COL_TERM=col_term, SIGMOID=sigmoid, SCHEDULE="exact" if sigmoid else schedule,
        PRECISION=dot_precision(q.dtype), DTYPE=math_dtype(q),
        num_warps=num_warps, num_stages=num_stages,
    )


def band_matmul(a, b, out, *, accumulate, cublas):
    """``out (+)= a @ b`` for the band GEMMs: ``a`` the band or its transpose, ``b`` features, ``out`` fp32 (fp64
    for fp64 features). ``cublas``: ``torch.mm`` / ``torch.addmm`` (for 16-bit operands the ``out_dtype=float32``
    overloads, CUDA only: cuBLAS accumulates in fp32 and writes fp32; on the CPU, where they do not exist, the
    operands are converted first); otherwise ``kernels._gemm.matmul`` with this family's tile. Neither takes a
    scale: the caller multiplies the results by ``scale / band_scale`` on the device."""
    if not cublas:
        matmul(a, b, out, out if accumulate else None, tile=list(configs.contrastive_matmul_config(a.dtype.itemsize)))
        return
    if a.dtype != out.dtype and a.device.type != "cuda":
        a, b = a.to(out.dtype), b.to(out.dtype)
    mixed = {"out_dtype": out.dtype} if a.dtype != out.dtype else {}
    if accumulate:
        torch.addmm(out, a, b, **mixed, out=out)
    else:
        torch.mm(a, b, **mixed, out=out)


def compile_variants():
    """Call the launchers once per constexpr combination they can produce, on small CPU tensors (for
    ``bench/compile_report.py``, which records the launches instead of running them). The fixed-shift schedule
    runs for 16-bit and fp32 features only (fp64 takes the exact one)."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        schedules = ("exact",) if dtype == torch.float64 else configs.CONTRASTIVE_SCHEDULES
        for dim in ((128, 768) if dtype.itemsize == 2 else (768,)):
            n = 256
            q, k = torch.zeros(n, dim, dtype=dtype), torch.zeros(n, dim, dtype=dtype)
            scale = torch.ones((), dtype=acc)
            vec = torch.zeros(n, dtype=acc)
            state = torch.zeros(n, SOFTMAX_ROW_STATS, dtype=acc)
            for schedule in schedules:
                # NT-Xent (self mask, rows only), InfoNCE (rows only), CLIP (column statistics), SigLIP (sigmoid)
                for self_mask, col_stats, sigmoid in ((True, False, False), (False, False, False),
                                                      (False, True, False), (False, False, True)):
                    ws = None
                    if col_stats:
                        programs = forward_programs(n, dim, dtype, q.device, schedule)[0]
                        ws = torch.zeros(programs, COL_STATS, n, dtype=acc)
                    contrastive_forward(q, k, scale, scale if sigmoid else None, state, ws, pos_offset=0,
                                        pos_modulus=n, self_mask=self_mask, sigmoid=sigmoid, schedule=schedule)
                    if schedule == "fixed_shift" and not sigmoid:  # its fallback (CLIP's columns: the same launch)
                        contrastive_forward(q, k, scale, None, state, None, pos_offset=0, pos_modulus=n,
                                            self_mask=self_mask, sigmoid=False, schedule="fallback")
                w = torch.zeros(n, n, dtype=dtype)
                # NT-Xent (self mask + transposed term), InfoNCE (row term), CLIP (row + column terms), SigLIP
                for self_mask, col_term, sigmoid in ((True, True, False), (False, False, False), (False, True, False),
                                                     (False, False, True)):
                    if sigmoid and schedule != "exact":
                        continue  # the sigmoid band kernel has one schedule
                    contrastive_dlogits(q, k, scale, scale if sigmoid else None, scale, None if sigmoid else state,
                                        vec, state if col_term else None, vec if col_term else None, w, row_start=0,
                                        pos_offset=0, pos_modulus=n, self_mask=self_mask, sigmoid=sigmoid,
                                        schedule=schedule)
        w = torch.zeros(256, 256, dtype=dtype)
        c = torch.zeros(256, 768, dtype=acc)
        band_matmul(w, torch.zeros(256, 768, dtype=dtype), c, accumulate=False, cublas=False)
        band_matmul(w.t(), torch.zeros(256, 768, dtype=dtype), c, accumulate=True, cublas=False)
