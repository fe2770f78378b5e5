"""Retrieval InfoNCE (``fusedloss.losses.retrieval``): each query's statistics over a block of candidates (keys,
then shared negatives) and the band of its logit gradient, tile by tile, with positives found by id or by index
and GISTEmbed's false-negative margin. The definition is derived in that module's docstring; the kernels' design,
byte and FLOP counts and configs in ``docs/kernels/retrieval.md``.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from ._common import expm1, math_dtype
from ._gemm import abt_tile, dot_precision
from ._launch import custom_launcher
from .contrastive import band_tile

# Per query and block the forward writes (max over the kept candidates, the kept negatives' sum of exp(x - max),
# the positives' sum, the positives' similarity sum, their count).
ROW_STATS = 5


@triton.jit
def _candidates(c, rows, cols, row_mask, col_mask, n_keys, pos_offset, row_ids, ids_ptr, diag, margin,
                IDS: tl.constexpr, HAS_POS: tl.constexpr, MARGIN: tl.constexpr):
    """(positive, kept) masks of a [BLOCK_M, BLOCK_N] similarity tile ``c``: a positive is a key (column below
    ``n_keys``) with the query's id (IDS) or the query's own key at ``row + pos_offset`` (HAS_POS); ``kept`` the
    other candidates left in the softmax: with MARGIN, those whose similarity is at most ``diag - margin``."""
    in_keys = cols < n_keys
    if IDS:
        col_ids = tl.load(ids_ptr + cols, mask=col_mask & in_keys, other=0)
        positive = (in_keys & col_mask)[None, :] & (col_ids[None, :] == row_ids[:, None])
    elif HAS_POS:
        positive = cols[None, :] == (rows + pos_offset)[:, None]
    else:
        positive = (cols < 0)[None, :] & (rows < 0)[:, None]  # (no positive in this block)
    positive = positive & row_mask[:, None]
    kept = col_mask[None, :] & ~positive
    if MARGIN:
        kept = kept & ~(c > (diag - margin)[:, None])
    return positive, kept


@triton.jit
def _retrieval_fwd_kernel(
    # pointers
    q_ptr, cand_ptr, scale_ptr, row_ids_ptr, ids_ptr, diag_ptr, out_ptr,
    # shapes and scalars
    n_rows, n_cols, n_keys, dim, pos_offset, margin,
    # strides (in elements)
    stride_qm, stride_qd, stride_cm, stride_cd, stride_out,
    # constants
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IDS: tl.constexpr, HAS_POS: tl.constexpr,
    MARGIN: tl.constexpr, DIAG: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """One row tile's ``ROW_STATS`` over every candidate of the block into ``out`` (n_rows x ROW_STATS, unit
    column stride). MARGIN: the anchor ``diag`` (each row's ``sim(q_i, k_i)``) is read from ``diag``, or with DIAG
    (the block holding this rank's keys, at ``pos_offset``) first taken from the column tiles holding the rows' own
    keys, on the main loop's tile grid, and written there: the same products as the candidates', so that a
    duplicate of the positive compares equal to it."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    q_offs = rows.to(tl.int64) * stride_qm
    scale = tl.load(scale_ptr).to(DTYPE)
    row_ids = None
    if IDS:
        row_ids = tl.load(row_ids_ptr + rows, mask=row_mask, other=0)
    diag = None
    if DIAG:
        diag = tl.zeros([BLOCK_M], DTYPE)
        own = rows + pos_offset
        first = tl.program_id(0) * BLOCK_M + pos_offset
        for col_start in range((first // BLOCK_N) * BLOCK_N, first + BLOCK_M, BLOCK_N):
            cols = col_start + tl.arange(0, BLOCK_N)
            col_mask = cols < n_cols
            c = abt_tile(q_ptr, cand_ptr, q_offs, cols.to(tl.int64) * stride_cm, row_mask, col_mask, dim, stride_qd,
                         stride_cd, BLOCK_M, BLOCK_N, BLOCK_D, False, PRECISION, DTYPE)
            diag += tl.sum(tl.where(cols[None, :] == own[:, None], c, 0.0), axis=1)
        tl.store(diag_ptr + rows, diag, mask=row_mask)
    elif MARGIN:
        diag = tl.load(diag_ptr + rows, mask=row_mask, other=0.0).to(DTYPE)
    m = tl.full([BLOCK_M], float("-inf"), DTYPE)
    s_neg = tl.zeros([BLOCK_M], DTYPE)
    s_pos = tl.zeros([BLOCK_M], DTYPE)
    pos_sum = tl.zeros([BLOCK_M], DTYPE)
    count = tl.zeros([BLOCK_M], DTYPE)
    for col_start in range(0, n_cols, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        c = abt_tile(q_ptr, cand_ptr, q_offs, cols.to(tl.int64) * stride_cm, row_mask, col_mask, dim, stride_qd,
                     stride_cd, BLOCK_M, BLOCK_N, BLOCK_D, False, PRECISION, DTYPE)
        positive, kept = _candidates(c, rows, cols, row_mask, col_mask, n_keys, pos_offset, row_ids, ids_ptr, diag,
                                     margin, IDS, HAS_POS, MARGIN)
        x = tl.where(kept | positive, c * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        decay = tl.exp(m - shift)
        e = tl.exp(x - shift[:, None])
        s_neg = s_neg * decay + tl.sum(tl.where(kept, e, 0.0), axis=1)
        s_pos = s_pos * decay + tl.sum(tl.where(positive, e, 0.0), axis=1)
        pos_sum += tl.sum(tl.where(positive, c, 0.0), axis=1)
        count += tl.sum(positive.to(DTYPE), axis=1)
        m = m_new
    out = out_ptr + rows.to(tl.int64) * stride_out
    tl.store(out, m, mask=row_mask)
    tl.store(out + 1, s_neg, mask=row_mask)
    tl.store(out + 2, s_pos, mask=row_mask)
    tl.store(out + 3, pos_sum, mask=row_mask)
    tl.store(out + 4, count, mask=row_mask)


@triton.jit
def _retrieval_dlogits_kernel(
    # pointers
    q_ptr, cand_ptr, scale_ptr, band_scale_ptr, row_ids_ptr, ids_ptr, state_ptr, coef_ptr, w_ptr, wc_ptr,
    # shapes and scalars
    n_cols, n_keys, dim, row_start, band_rows, pos_offset, margin,
    # strides (in elements)
    stride_qm, stride_qd, stride_cm, stride_cd, stride_state, stride_coef, stride_w, stride_wc,
    # constants
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    IDS: tl.constexpr, HAS_POS: tl.constexpr, MARGIN: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """``band_scale * W`` for rows ``row_start .. row_start + band_rows`` against every candidate, into the band
    ``w`` (band_rows, n_cols) in its dtype: ``W = a (p - [positive] / count)``, ``p = exp(x - lse)`` on the kept
    candidates, 0 on the removed, the positives' term ``expm1(x - lse + log count) / count``. ``state``: each
    row's (lse, diag, count); ``coef``: the weights ``a`` (any stride). ``wc`` (band_rows, column tiles): each
    tile's row sums of ``W * C`` (unscaled), whose total is the loss's derivative by the inverse temperature."""
    local, row_mask, rows, cols, col_mask, _, pid_n, c = band_tile(
        q_ptr, cand_ptr, n_cols, dim, row_start, band_rows, stride_qm, stride_qd, stride_cm, stride_cd, BLOCK_M,
        BLOCK_N, BLOCK_D, GROUP_M, PRECISION, DTYPE)
    scale = tl.load(scale_ptr).to(DTYPE)
    state = state_ptr + rows.to(tl.int64) * stride_state
    lse = tl.load(state, mask=row_mask, other=0.0)
    diag = tl.load(state + 1, mask=row_mask, other=0.0)
    count = tl.load(state + 2, mask=row_mask, other=1.0)
    a = tl.load(coef_ptr + rows.to(tl.int64) * stride_coef, mask=row_mask, other=0.0).to(DTYPE)
    row_ids = None
    if IDS:
        row_ids = tl.load(row_ids_ptr + rows, mask=row_mask, other=0)
    positive, kept = _candidates(c, rows, cols, row_mask, col_mask, n_keys, pos_offset, row_ids, ids_ptr, diag,
                                 margin, IDS, HAS_POS, MARGIN)
    x = c * scale
    w = tl.where(kept, tl.exp(x - lse[:, None]), 0.0)
    if IDS or HAS_POS:
        w = tl.where(positive, expm1(x - lse[:, None] + tl.log(count)[:, None]) / count[:, None], w)
    w = w * a[:, None]
    tl.store(wc_ptr + local.to(tl.int64) * stride_wc + pid_n, tl.sum(w * c, axis=1), mask=row_mask)
    w = w * tl.load(band_scale_ptr).to(DTYPE)
    tl.store(w_ptr + local.to(tl.int64)[:, None] * stride_w + cols[None, :], w.to(w_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Launchers: registered custom ops (``_launch.custom_launcher``) writing into caller-allocated buffers


@custom_launcher("retrieval_forward", mutates_args=("diag", "out"))
def retrieval_forward(q: torch.Tensor, cand: torch.Tensor, scale: torch.Tensor, row_ids: Optional[torch.Tensor],
                      ids: Optional[torch.Tensor], diag: Optional[torch.Tensor], out: torch.Tensor, *, n_keys: int,
                      pos_offset: Optional[int], margin: Optional[float]) -> None:
    """``_retrieval_fwd_kernel``: ``q`` (M, d) and ``cand`` (C, d) of one dtype, any strides; ``row_ids`` (M,) and
    ``ids`` (C,) int64 contiguous or None (positives by id); ``pos_offset``: column of query 0's own key, or None
    (this rank's keys are not in this block); ``diag`` (M,) or None (no margin, ``margin`` None), the margin's
    anchor, written here where the block holds this rank's keys and read otherwise; ``out``
    (M, ROW_STATS) of the compute dtype, unit column stride."""
    n_rows, dim = q.shape
    assert out.stride(1) == 1 and out.shape == (n_rows, ROW_STATS)
    block_m, block_n, block_d, num_warps, num_stages = configs.retrieval_fwd_config(q.dtype.itemsize, ids is not None)
    _retrieval_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        q, cand, scale, row_ids, ids, diag, out,
        n_rows, cand.shape[0], n_keys, dim, 0 if pos_offset is None else pos_offset,
        0.0 if margin is None else margin,
        q.stride(0), q.stride(1), cand.stride(0), cand.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IDS=ids is not None,
        HAS_POS=ids is None and pos_offset is not None, MARGIN=margin is not None,
        DIAG=margin is not None and pos_offset is not None,
        PRECISION=dot_precision(q.dtype), DTYPE=math_dtype(q), num_warps=num_warps, num_stages=num_stages,
    )


@custom_launcher("retrieval_dlogits", mutates_args=("w", "wc"))
def retrieval_dlogits(q: torch.Tensor, cand: torch.Tensor, scale: torch.Tensor, band_scale: torch.Tensor,
                      row_ids: Optional[torch.Tensor], ids: Optional[torch.Tensor], state: torch.Tensor,
                      coef: torch.Tensor, w: torch.Tensor, wc: torch.Tensor, *, row_start: int, n_keys: int,
                      pos_offset: Optional[int], margin: Optional[float]) -> None:
    """``_retrieval_dlogits_kernel`` for rows ``row_start .. row_start + w.shape[0]`` of ``q`` into the band ``w``
    (rows, C), unit column stride; ``state`` (M, 3) (lse, diag, count) unit column stride; ``coef`` (M,) any
    stride; ``wc`` (rows, ``dlogits_column_tiles(C, dtype)``) of the compute dtype. Other arguments as
    ``retrieval_forward``'s."""
    rows, n_cols = w.shape
    assert w.stride(1) == 1 and state.stride(1) == 1 and row_start + rows <= q.shape[0]
    block_m, block_n, block_d, group_m, num_warps, num_stages = configs.retrieval_dlogits_config(q.dtype.itemsize)
    assert wc.shape == (rows, triton.cdiv(n_cols, block_n))
    _retrieval_dlogits_kernel[(triton.cdiv(rows, block_m) * triton.cdiv(n_cols, block_n),)](
        q, cand, scale, band_scale, row_ids, ids, state, coef, w, wc,
        n_cols, n_keys, q.shape[1], row_start, rows, 0 if pos_offset is None else pos_offset,
        0.0 if margin is None else margin,
        q.stride(0), q.stride(1), cand.stride(0), cand.stride(1), state.stride(0), coef.stride(0), w.stride(0),
        wc.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, GROUP_M=group_m, IDS=ids is not None,
        HAS_POS=ids is None and pos_offset is not None, MARGIN=margin is not None,
        PRECISION=dot_precision(q.dtype), DTYPE=math_dtype(q), num_warps=num_warps, num_stages=num_stages,
    )


def dlogits_column_tiles(n_cols, dtype):
    """The second dimension of ``retrieval_dlogits``' ``wc``."""
    return triton.cdiv(n_cols, configs.retrieval_dlogits_config(dtype.itemsize)[1])


def compile_variants():
    """Call the launchers once per constexpr combination (positives by id, by index or none; with and without the
    margin) on small CPU tensors, for ``bench/compile_report.py``."""
    for dtype in (torch.bfloat16, torch.float32, torch.float64):  # (fp16 takes bf16's configs and code)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        n, dim = 256, 768
        q, cand = torch.zeros(n, dim, dtype=dtype), torch.zeros(n, dim, dtype=dtype)
        scale, vec = torch.ones((), dtype=acc), torch.zeros(n, dtype=acc)
        ids = torch.zeros(n, dtype=torch.int64)
        out, state = torch.zeros(n, ROW_STATS, dtype=acc), torch.zeros(n, 3, dtype=acc)
        w, wc = torch.zeros(n, n, dtype=dtype), torch.zeros(n, dlogits_column_tiles(n, dtype), dtype=acc)
        for by_id, pos_offset in ((True, 0), (False, 0), (False, None)):
            for margin in (None, 0.1):
                row_ids, col_ids = (ids, ids) if by_id else (None, None)
                retrieval_forward(q, cand, scale, row_ids, col_ids, vec if margin is not None else None, out,
                                  n_keys=n, pos_offset=pos_offset, margin=margin)
                retrieval_dlogits(q, cand, scale, scale, row_ids, col_ids, state, vec, w, wc, row_start=0, n_keys=n,
                                  pos_offset=pos_offset, margin=margin)
