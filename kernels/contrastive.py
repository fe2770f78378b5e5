"""Contrastive losses (NT-Xent, CLIP, InfoNCE): similarity + cross-entropy tile by tile, never the N x N matrix.

Notation. ``Q`` (M, d) and ``K`` (N, d) are the (L2-normalized) row and column features, ``s`` the scale
(``1 / temperature`` or CLIP's ``logit_scale``), ``S = s Q K^T`` the logits, ``pos(i)`` the column holding row
``i``'s positive: ``i + offset`` (InfoNCE / CLIP; ``offset = rank * n_local`` across GPUs) or ``(i + M/2) mod M``
(NT-Xent, where Q = K and ``S_ii = -inf``). Per row ``lse_i = logsumexp_j S_ij`` and the loss is ``lse_i - S_i,pos(i)``;
the symmetric CLIP loss adds the column direction ``lsec_j = logsumexp_i S_ij`` with ``lsec_j - S_jj``.

Gradient. With per-row weights ``a_i`` (``grad_output / M`` for a mean) and per-column weights ``b_j`` (the column
term, zero without it), the gradient of the loss with respect to the logits is

    W_ij = a_i (P_ij - [j = pos(i)]) + b_j (Pc_ij - [j = pos(i)]),   P_ij = exp(S_ij - lse_i),
                                                                     Pc_ij = exp(S_ij - lsec_j)

(for CLIP column j's positive is row j, i.e. ``j = pos(i)``; for NT-Xent the column term is the transpose of the
row term, below, and ``pos`` is an involution). Then ``dQ = s W K``, ``dK = s W^T Q``, ``dL/ds = sum_ij W_ij S_ij / s =
sum_i <(W K)_i, Q_i>`` (from the ``W K`` product the row gradient needs anyway), and a logit bias has gradient
``sum_ij W_ij = 0``: every row of ``P`` and every column of ``Pc`` sums to one, so a constant added to all logits
cancels in both softmaxes. NT-Xent: Q = K, so ``dF = s (W + W^T) F`` with ``(W^T)_ij = W_ji = a_j (exp(S_ij - lse_j)
- [j = pos(i)])`` (S symmetric, pos an involution): the same formula with ``b = a`` and ``lsec = lse``, and one
product ``(W + W^T) F`` instead of two. The diagonal is masked to -inf, so ``W_ii = 0``.

Kernels and why this split.
- ``_contrastive_fwd_kernel``: flash-attention-style forward. A program owns a band of ``tiles_per_program``
  consecutive row tiles; for each it walks every column tile with ``tl.dot`` over ``d`` in ``BLOCK_D`` chunks (fp32
  accumulation), keeps the online (max, sum-exp) per row (``online_logsumexp_update`` along axis 1) and picks the
  positive logit out of the tile it falls in (the same rounding as the log-sum-exp it is subtracted from). With
  ``COL_STATS`` (the symmetric CLIP loss) the same tiles feed a column (max, sum-exp) along axis 0, merged into the
  program's own row of a ``(programs, N)`` workspace: read-modify-write by one program only, so no atomics, and the
  host merges the ``programs`` partials with a log-sum-exp. Workspace ``programs * N * 8`` bytes with ``programs ~ 2
  x SMs``: O(N), 2 GiB at N = 2^20 on an H100 (256 programs of 32 row tiles), instead of O(N^2 / BLOCK_M) (64 GiB)
  for one partial per row tile.
- Backward, in bands of ``R`` rows. ``d`` is 512-1280 for CLIP, so a flash-style backward that keeps the
  ``BLOCK_M x d`` fp32 gradient accumulator of its rows in registers does not fit (128 x 768 x 4 B = 384 KiB, more
  than an SM's register file); splitting ``d`` across programs recomputes ``S`` once per split, and keeping the
  accumulator in global memory (Inf-CL) makes the loop L2-bound (a read-modify-write of ``BLOCK_M x d`` fp32 per
  ``BLOCK_M x BLOCK_N`` tile: ~30 flop/byte). Instead ``_contrastive_dlogits_kernel`` recomputes ``S`` for ``R x N``
  (a GEMM tile over ``d`` with the whole gradient formula above as epilogue) and writes ``W`` in the features' dtype
  to an ``R x N`` band buffer; two GEMMs (``_matmul_kernel``, fp32 accumulation, tensor cores for 16-bit) then give
  ``W K`` (the band's row gradient, complete) and ``W^T Q_band``, added in fp32 to the column gradient. Per band:
  ``2 R N d`` (recompute) + ``2 R N d`` + ``2 R N d`` flops, all at GEMM tile shapes; the column accumulator moves
  ``8 N d`` bytes per band, ``8 N^2 d / R`` in all, against ``6 N^2 d`` flops: ``0.75 R`` flop/byte. The band is
  ``R N`` elements (``R = 4096`` rows, 512 MiB in bf16, at N = 65536; 1024 rows at N = 2^20), the rest O(N d).
  NT-Xent needs only the first GEMM (``(W + W^T) F``).

Totals, single process, fp32 accumulation everywhere: forward ``2 M N d`` flops, backward ``6 M N d`` (``4 M N d``
for NT-Xent), never more than ``R x N`` logits alive. Positives and the self mask are handled only in the tiles
that hold them (a scalar branch per tile). All offsets are 64-bit. fp32 inputs use ``input_precision="ieee"`` unless
the caller opted into TF32 (``torch.backends.cuda.matmul.allow_tf32``); fp64 inputs compute in fp64.
"""

import triton
import triton.language as tl

from ._common import grouped_tile, online_logsumexp_update
from .configs import (
    CONTRASTIVE_FWD_PROGRAMS_PER_SM,
    contrastive_band_rows,
    contrastive_dlogits_config,
    contrastive_fwd_config,
    contrastive_matmul_config,
)


@triton.jit
def _logits_tile(q_ptr, k_ptr, q_offs, k_offs, row_mask, col_mask, dim,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """``Q[rows] K[cols]^T`` for one [BLOCK_M, BLOCK_N] tile: a K-loop over ``d`` in BLOCK_D chunks, accumulated in
    ``DTYPE`` (fp32, or fp64 for fp64 features). ``q_offs`` / ``k_offs`` are the rows' 64-bit element offsets; K is
    loaded as its [BLOCK_D, BLOCK_N] transpose, d-contiguous, the K-major B operand the MMA wants."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], DTYPE)
    for d0 in range(0, dim, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < dim
        q = tl.load(q_ptr + q_offs[:, None] + dd[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        kt = tl.load(k_ptr + k_offs[None, :] + dd[:, None], mask=col_mask[None, :] & d_mask[:, None], other=0.0)
        acc = tl.dot(q, kt, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _contrastive_fwd_kernel(
    # pointers
    q_ptr, k_ptr, scale_ptr,
    lse_ptr, pos_ptr, col_max_ptr, col_sum_ptr,
    # shapes
    n_rows, n_cols, dim, tiles_per_program, pos_offset, pos_modulus,
    # strides (in elements; features are d-contiguous)
    stride_q, stride_k, stride_ws,
    # constants
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_CHUNK: tl.constexpr,
    SELF_MASK: tl.constexpr, COL_STATS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """Per row: ``lse`` and the positive logit; with COL_STATS, this program's column (max, sum-exp) partials over
    its band of rows, in row ``program_id`` of the workspace."""
    pid = tl.program_id(0)
    scale = tl.load(scale_ptr).to(DTYPE)
    num_tiles = tl.cdiv(n_rows, BLOCK_M)
    t_begin = pid * tiles_per_program
    t_end = tl.minimum(t_begin + tiles_per_program, num_tiles)
    ws_base = pid.to(tl.int64) * stride_ws
    for t in range(t_begin, t_end):
        row_start = t * BLOCK_M
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        q_offs = rows.to(tl.int64) * stride_q
        pos = (rows + pos_offset) % pos_modulus  # indices < 2^31; only offsets need 64 bits
        pos_lo = tl.min(tl.where(row_mask, pos, pos_modulus), axis=0)
        pos_hi = tl.max(tl.where(row_mask, pos, -1), axis=0)
        if ONE_D_CHUNK:
            # d <= BLOCK_D: the row tile is loaded once and stays on chip for the whole column sweep.
            d_mask = tl.arange(0, BLOCK_D) < dim
            q_tile = tl.load(q_ptr + q_offs[:, None] + tl.arange(0, BLOCK_D)[None, :],
                             mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), DTYPE)
        s = tl.zeros([BLOCK_M], DTYPE)
        pos_logit = tl.zeros([BLOCK_M], DTYPE)
        for col_start in range(0, n_cols, BLOCK_N):
            cols = col_start + tl.arange(0, BLOCK_N)
            col_mask = cols < n_cols
            k_offs = cols.to(tl.int64) * stride_k
            if ONE_D_CHUNK:
                kt = tl.load(k_ptr + k_offs[None, :] + tl.arange(0, BLOCK_D)[:, None],
                             mask=col_mask[None, :] & d_mask[:, None], other=0.0)
                acc = tl.dot(q_tile, kt, tl.zeros([BLOCK_M, BLOCK_N], DTYPE), input_precision=INPUT_PRECISION)
            else:
                acc = _logits_tile(q_ptr, k_ptr, q_offs, k_offs, row_mask, col_mask, dim,
                                   BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, DTYPE)
            x = acc * scale
            if SELF_MASK:
                if (col_start < row_start + BLOCK_M) & (col_start + BLOCK_N > row_start):
                    x = tl.where(rows[:, None] == cols[None, :], float("-inf"), x)
            if (col_start <= pos_hi) & (col_start + BLOCK_N > pos_lo):
                pos_logit += tl.sum(tl.where(cols[None, :] == pos[:, None], x, 0.0), axis=1)
            m, s, _ = online_logsumexp_update(m, s, tl.where(col_mask[None, :], x, float("-inf")), 1)
            if COL_STATS:
                # The band's first tile starts the partials; later tiles merge into what this program stored.
                # (A vector compare: Triton's interpreter rejects a scalar operand in a load mask.)
                carry = col_mask & (cols * 0 + t > t_begin)
                cm = tl.load(col_max_ptr + ws_base + cols, mask=carry, other=float("-inf"))
                cs = tl.load(col_sum_ptr + ws_base + cols, mask=carry, other=0.0)
                cm, cs, _ = online_logsumexp_update(cm, cs, tl.where(row_mask[:, None], x, float("-inf")), 0)
                tl.store(col_max_ptr + ws_base + cols, cm, mask=col_mask)
                tl.store(col_sum_ptr + ws_base + cols, cs, mask=col_mask)
        if COL_STATS:
            # The next row tile reads the workspace entries stored above, possibly from other threads: a CTA
            # barrier makes those global stores visible (bar.sync orders memory within the CTA).
            tl.debug_barrier()
        tl.store(lse_ptr + rows, (m + tl.log(s)).to(lse_ptr.dtype.element_ty), mask=row_mask)
        tl.store(pos_ptr + rows, pos_logit.to(pos_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _contrastive_dlogits_kernel(
    # pointers
    q_ptr, k_ptr, scale_ptr, band_scale_ptr, lse_ptr, row_coef_ptr, col_lse_ptr, col_coef_ptr,
    w_ptr,
    # shapes
    n_cols, dim, row_start, band_rows, pos_offset, pos_modulus,
    # strides (in elements)
    stride_q, stride_k, stride_w,
    # constants
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
    SELF_MASK: tl.constexpr, COL_TERM: tl.constexpr, INPUT_PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """``band_scale * W`` (module docstring) for rows ``row_start .. row_start + band_rows`` and every column, into
    the band buffer ``w`` (band_rows, n_cols) in its dtype. ``band_scale`` (1 / max |weight|) keeps fp16 bands out of
    the subnormal range when the weights are ~1 / N."""
    num_m = tl.cdiv(band_rows, BLOCK_M)
    num_n = tl.cdiv(n_cols, BLOCK_N)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, num_n, GROUP_M)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = local < band_rows
    rows = row_start + local
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols

    acc = _logits_tile(q_ptr, k_ptr, rows.to(tl.int64) * stride_q, cols.to(tl.int64) * stride_k, row_mask, col_mask,
                       dim, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, DTYPE)
    x = acc * tl.load(scale_ptr).to(DTYPE)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(DTYPE)
    a = tl.load(row_coef_ptr + rows, mask=row_mask, other=0.0).to(DTYPE)
    w = a[:, None] * tl.exp(x - lse[:, None])
    pos_coef = a[:, None]
    if COL_TERM:
        lsec = tl.load(col_lse_ptr + cols, mask=col_mask, other=0.0).to(DTYPE)
        b = tl.load(col_coef_ptr + cols, mask=col_mask, other=0.0).to(DTYPE)
        w += b[None, :] * tl.exp(x - lsec[None, :])
        pos_coef = a[:, None] + b[None, :]
    pos = (rows + pos_offset) % pos_modulus  # indices < 2^31; only offsets need 64 bits
    col_start = pid_n * BLOCK_N
    if (col_start <= tl.max(tl.where(row_mask, pos, -1), axis=0)) & \
            (col_start + BLOCK_N > tl.min(tl.where(row_mask, pos, pos_modulus), axis=0)):
        w = tl.where(cols[None, :] == pos[:, None], w - pos_coef, w)
    if SELF_MASK:
        if (col_start < row_start + pid_m * BLOCK_M + BLOCK_M) & (col_start + BLOCK_N > row_start + pid_m * BLOCK_M):
            w = tl.where(rows[:, None] == cols[None, :], 0.0, w)
    w = w * tl.load(band_scale_ptr).to(DTYPE)
    w_offs = local.to(tl.int64)[:, None] * stride_w + cols[None, :]
    tl.store(w_ptr + w_offs, w.to(w_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr,
    # shapes
    M, N, K,
    # strides (in elements)
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    # constants
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACCUMULATE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """``C (+)= A @ B`` with C in fp32 (fp64): the band GEMMs ``W K`` and ``W^T Q`` (A = the band, read transposed
    through its strides for the second). ACCUMULATE adds to C, so the column gradient sums the bands in fp32."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, num_n, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    a_offs = rm.to(tl.int64)[:, None] * stride_am
    b_offs = rn.to(tl.int64)[None, :] * stride_bn
    c_offs = rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:  # start from C rather than add it at the end: no second BLOCK_M x BLOCK_N fp32 tile live
        acc = tl.load(c_ptr + c_offs, mask=c_mask, other=0.0).to(DTYPE)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], DTYPE)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        a = tl.load(a_ptr + a_offs + rk.to(tl.int64)[None, :] * stride_ak, mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        b = tl.load(b_ptr + b_offs + rk.to(tl.int64)[:, None] * stride_bk, mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: derive every constexpr flag from the arguments, and write into caller-allocated outputs.


def _acc_dtype(t):
    return tl.float64 if t.dtype.itemsize == 8 else tl.float32


def _input_precision(t):
    """IEEE fp32 products unless the caller opted into TF32 the way torch's own matmuls do."""
    if t.dtype.itemsize == 4 and t.is_cuda:
        import torch

        if torch.backends.cuda.matmul.allow_tf32:
            return "tf32"
    return "ieee"


def _num_sms(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: a couple of programs, so that bands of several row tiles are exercised


def forward_schedule(n_rows, dim, dtype, device, col_stats):
    """(programs, tiles_per_program) of the forward launch: one row tile per program without column statistics;
    with them, bands of consecutive row tiles over ~CONTRASTIVE_FWD_PROGRAMS_PER_SM programs per SM, which is also
    the number of rows of the column workspace (the caller allocates it from this)."""
    block_m = contrastive_fwd_config(dim, dtype.itemsize, col_stats)[0]
    num_tiles = max(triton.cdiv(n_rows, block_m), 1)
    if not col_stats:
        return num_tiles, 1
    tiles_per_program = triton.cdiv(num_tiles, CONTRASTIVE_FWD_PROGRAMS_PER_SM * _num_sms(device))
    return triton.cdiv(num_tiles, tiles_per_program), tiles_per_program


def band_rows(n_rows, n_cols, dtype):
    """Rows per backward band (the band buffer is band_rows x n_cols in the features' dtype)."""
    return min(max(n_rows, 1), contrastive_band_rows(n_cols, dtype.itemsize))


def contrastive_forward(q, k, scale, lse, pos, col_max, col_sum, *, pos_offset, pos_modulus, self_mask):
    """Launch ``_contrastive_fwd_kernel``. ``q`` (M, d), ``k`` (N, d), d-contiguous, same dtype; ``scale`` 0-d;
    ``lse`` and ``pos`` (M,) fp32/fp64; ``col_max`` / ``col_sum`` (programs, N) from ``forward_schedule`` or None."""
    n_rows, dim = q.shape
    n_cols = k.shape[0]
    col_stats = col_max is not None
    block_m, block_n, block_d, num_warps, num_stages = contrastive_fwd_config(dim, q.dtype.itemsize, col_stats)
    programs, tiles_per_program = forward_schedule(n_rows, dim, q.dtype, q.device, col_stats)
    if col_stats:
        assert col_max.shape == (programs, n_cols) and col_sum.shape == col_max.shape and col_max.stride(1) == 1
    _contrastive_fwd_kernel[(programs,)](
        q, k, scale,
        lse, pos, col_max, col_sum,
        n_rows, n_cols, dim, tiles_per_program, pos_offset, pos_modulus,
        q.stride(0), k.stride(0), col_max.stride(0) if col_stats else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, ONE_D_CHUNK=dim <= block_d,
        SELF_MASK=self_mask, COL_STATS=col_stats, INPUT_PRECISION=_input_precision(q), DTYPE=_acc_dtype(lse),
        num_warps=num_warps, num_stages=num_stages,
    )


def contrastive_dlogits(q, k, scale, band_scale, lse, row_coef, col_lse, col_coef, w, *, row_start, pos_offset,
                        pos_modulus, self_mask):
    """Launch ``_contrastive_dlogits_kernel`` for rows ``row_start .. row_start + w.shape[0]`` of ``q`` into the
    band ``w`` (rows, N), row stride free, column stride 1. ``col_lse`` / ``col_coef`` (N,) or None."""
    rows, n_cols = w.shape
    dim = q.shape[1]
    assert w.stride(1) == 1 and row_start + rows <= q.shape[0]
    block_m, block_n, block_d, group_m, num_warps, num_stages = contrastive_dlogits_config(q.dtype.itemsize)
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(n_cols, block_n),)
    _contrastive_dlogits_kernel[grid](
        q, k, scale, band_scale, lse, row_coef, col_lse, col_coef,
        w,
        n_cols, dim, row_start, rows, pos_offset, pos_modulus,
        q.stride(0), k.stride(0), w.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, GROUP_M=group_m,
        SELF_MASK=self_mask, COL_TERM=col_lse is not None, INPUT_PRECISION=_input_precision(q),
        DTYPE=_acc_dtype(lse),
        num_warps=num_warps, num_stages=num_stages,
    )


def matmul(a, b, c, *, accumulate):
    """Launch ``_matmul_kernel``: ``c (+)= a @ b``; ``a`` (M, K) and ``b`` (K, N) of one dtype with any strides,
    ``c`` (M, N) fp32 (fp64 for fp64 operands)."""
    M, K = a.shape
    N = b.shape[1]
    block_m, block_n, block_k, group_m, num_warps, num_stages = contrastive_matmul_config(a.dtype.itemsize)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _matmul_kernel[grid](
        a, b, c,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        ACCUMULATE=accumulate, INPUT_PRECISION=_input_precision(a), DTYPE=_acc_dtype(c),
        num_warps=num_warps, num_stages=num_stages,
    )


def compile_variants():
    """Call the launchers once per constexpr combination they can produce, on small CPU tensors (for
    ``bench/compile_report.py``, which records the launches instead of running them)."""
    import torch

    def features(n, dim, dtype):
        return torch.zeros(n, dim, dtype=dtype)

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for dim in ((128, 768) if dtype.itemsize == 2 else (768,)):
            n = 256
            q, k = features(n, dim, dtype), features(n, dim, dtype)
            scale = torch.ones((), dtype=acc)
            vec = torch.zeros(n, dtype=acc)
            # NT-Xent (self mask, rows only), InfoNCE (rows only), CLIP (column statistics)
            for self_mask, col_stats in ((True, False), (False, False), (False, True)):
                ws = None
                if col_stats:
                    programs, _ = forward_schedule(n, dim, dtype, q.device, True)
                    ws = torch.zeros(programs, n, dtype=acc)
                contrastive_forward(q, k, scale, vec, vec, ws, ws, pos_offset=0, pos_modulus=n, self_mask=self_mask)
            w = torch.zeros(n, n, dtype=dtype)
            # NT-Xent (self mask + transposed term), InfoNCE (row term), CLIP (row + column terms)
            for self_mask, col_term in ((True, True), (False, False), (False, True)):
                contrastive_dlogits(q, k, scale, scale, vec, vec, vec if col_term else None,
                                    vec if col_term else None, w, row_start=0, pos_offset=0, pos_modulus=n,
                                    self_mask=self_mask)
        w = torch.zeros(256, 256, dtype=dtype)
        c = torch.zeros(256, 768, dtype=acc)
        matmul(w, features(256, 768, dtype), c, accumulate=False)
        matmul(w.t(), features(256, 768, dtype), c, accumulate=True)
