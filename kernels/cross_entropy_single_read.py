"""Single-read fused cross-entropy forward + gradient: each row of logits is read from memory once.

Derivations, byte and FLOP counts, design choices:
``docs/kernels/cross_entropy_single_read.md``.
"""

import os
from typing import List, Optional

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from ._common import join_f64, math_dtype, split_f64
from ._launch import custom_launcher, num_sms
from .cross_entropy_rows import (
    ROW_STATE,
    dlogits_from_coefs,
    load_logits,
    row_loss_and_coefs,
    smoothing_coef,
    store_row_state,
)

# Below this class count the two-pass kernel's multi-row tiles are kept (the same bound as its one-row-per-program
# schedule in configs.cross_entropy_config).
SINGLE_READ_MIN_CLASSES = 2048

# One record per (row, chunk): (m_k, s_k, B_k, A_k, t_k), stored field-major per row, partials[row, field, chunk],
# so that the merge loads each field as one contiguous vector.
NUM_FIELDS = 5

MODES = ("ticket", "twophase")


def single_read_applies(logits, target):
    """Whether this kernel covers the problem's layout: 2-D ``logits`` (rows, classes) with class stride 1 and at
    least SINGLE_READ_MIN_CLASSES classes, class-index ``target``. The host also requires the fused path (reduction
    'mean' or 'sum', gradient of the logits only)."""
    return (logits.dim() == 2 and logits.stride(1) == 1 and logits.shape[1] >= SINGLE_READ_MIN_CLASSES
            and not target.is_floating_point())


# TODO(lead): move to configs.py next to cross_entropy_config once a GPU sweep has measured it.
CONFIG_ENV = "FUSEDLOSS_CE_SINGLE_READ_CONFIG"


def single_read_config(n_classes, dtype, has_softcap):
    """[CHUNK, num_warps] of ``_ce_single_read_kernel``: each program holds at most CHUNK classes of a row.

    The chunk stays in registers across the exchange, so the config is sized by registers per thread, not by the
    vocabulary: <= 128 registers at 8 warps, i.e. at least two programs per SM, so that one loads while another
    reduces or waits. ``bench/compile_report.py`` (Triton 3.9, sm_80 / sm_90, no spills in any variant):
    - 8192 classes on 8 warps (32 elements per thread: four 16-byte loads and stores in bf16/fp16, eight in fp32):
      103-114 registers without a soft-cap, with label smoothing, weights and alpha or not;
    - a soft-cap (its tanh: an exp and an IEEE division per element) takes ptxas to 175-180 registers at 32
      elements per thread (one program per SM), so soft-capped variants hold 16 (4096 on 8 warps): 98-103;
    - fp64 (8-byte elements, fp64 math) holds 8 per thread (2048 on 8 warps): 76-80, 128 with every extra.
    Vocabularies below CHUNK take one power-of-two chunk on the same warps. Not measured on a GPU yet.

    ``FUSEDLOSS_CE_SINGLE_READ_CONFIG="CHUNK,NUM_WARPS"`` overrides it (for a sweep).
    """
    override = os.environ.get(CONFIG_ENV)
    if override:
        chunk, num_warps = map(int, override.split(","))
    elif dtype == torch.float64:
        chunk, num_warps = 2048, 8
    else:
        chunk, num_warps = (4096, 8) if has_softcap else (8192, 8)
    return [min(chunk, max(triton.next_power_of_2(n_classes), 16)), num_warps]


def _chunking(n_classes, chunk):
    """(num_chunks, chunk_size): the fewest chunks of at most ``chunk`` classes, of equal width rounded up to a
    multiple of 16 classes, so that every program gets the same work (256000 classes: 32 chunks of 8000, not 31 of
    8192 and one of 2048), and every chunk starts at a multiple of 16 elements (16-byte vector loads). Every chunk
    is non-empty: (num_chunks - 1) * chunk_size <= (num_chunks - 1) * chunk < n_classes."""
    num_chunks = triton.cdiv(n_classes, chunk)
    return num_chunks, triton.cdiv(triton.cdiv(n_classes, num_chunks), 16) * 16


@triton.jit
def _add2(a0, a1, b0, b1):
    """Combine function of a two-operand sum (``tl.reduce``)."""
    return a0 + b0, a1 + b1


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    """Combine function of a four-operand sum (``tl.reduce``)."""
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _chunk_tile(logits_rows, target_rows, weight_ptr, col_start, chunk_size, n_classes, stride_weight,
                ignore_index, eps, softcap,
                CHUNK: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, DTYPE: tl.constexpr):
    """Load a [1, CHUNK] chunk of a row once and reduce it: its record (m_k, s_k, B_k, A_k, t_k) and what the
    gradient needs from it later (e_c, the cap's derivative, a_c, the target lane), kept in registers. The sums
    are one multi-operand reduction: one trip through shared memory (and its barriers) instead of one per sum."""
    cols = col_start + tl.arange(0, CHUNK)
    # Two comparisons against multiples of 16 (chunk_size always; n_classes when it is one, as LLM vocabularies are,
    # and Triton specializes such integer arguments): the mask is then provably constant over each 16-byte vector,
    # which a min() of the two bounds would hide from the alignment analysis.
    col_mask = (cols < col_start + chunk_size) & (cols < n_classes)
    mask = col_mask[None, :]
    y = tl.load(target_rows).to(tl.int64)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < n_classes)
    # The target's lane in this chunk, found in 64 bits (2**32 + 5 is not class 5), then compared per element in
    # 32 bits; -1 (no lane) when the target is not in this chunk.
    y_local = y - col_start
    y_local = tl.where(in_range & (y_local >= 0) & (y_local < chunk_size), y_local, -1).to(tl.int32)
    is_target = tl.arange(0, CHUNK)[None, :] == y_local[:, None]

    x, dcap = load_logits(logits_rows, cols, mask, 1, softcap, HAS_SOFTCAP, DTYPE)
    m_k = tl.max(x, axis=1)
    shift = tl.where(m_k > float("-inf"), m_k, 0.0)  # a chunk of -inf logits: e = 0, not exp(-inf + inf) = NaN
    e = tl.exp(x - shift[:, None])
    x_t = tl.where(is_target, x, 0.0)
    if HAS_SMOOTHING:
        a = smoothing_coef(target_rows, weight_ptr, cols, mask, col_mask, eps, n_classes, 0, 0, stride_weight,
                            False, HAS_WEIGHT, DTYPE)
        s_k, t_k, b_k, a_k = tl.reduce((e, x_t, a, tl.where(mask, a * (x - shift[:, None]), 0.0)), 1, _add4)
    else:
        a = e  # unused without smoothing
        s_k, t_k = tl.reduce((e, x_t), 1, _add2)
        b_k = tl.zeros_like(s_k)
        a_k = tl.zeros_like(s_k)
    return cols, mask, y, valid, in_range, is_target, e, dcap, a, m_k, s_k, b_k, a_k, t_k


@triton.jit
def _publish(record_ptr, stride_field, m_k, s_k, b_k, a_k, t_k):
    """Store this chunk's record, partials[row, :, chunk]."""
    tl.store(record_ptr + 0 * stride_field, m_k)
    tl.store(record_ptr + 1 * stride_field, s_k)
    tl.store(record_ptr + 2 * stride_field, b_k)
    tl.store(record_ptr + 3 * stride_field, a_k)
    tl.store(record_ptr + 4 * stride_field, t_k)


@triton.jit
def _arrive_and_wait(arrivals_ptr, num_chunks):
    """Count this program in its row's arrivals and return once all ``num_chunks`` have arrived (the ordering
    argument is in docs/kernels/cross_entropy_single_read.md: barrier, acq_rel increment, acquire polls, barrier)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < num_chunks:
        arrived = tl.atomic_add(arrivals_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _merge_partials(row_partials, stride_field, num_chunks, MAX_CHUNKS: tl.constexpr,
                    HAS_SMOOTHING: tl.constexpr):
    """The row's (m, log_s, x_y, B, A) from its ``num_chunks`` records: one MAX_CHUNKS-wide load per field (from L2:
    other programs wrote them) and fixed-shape reductions, so every program of the row gets the same bits."""
    k = tl.arange(0, MAX_CHUNKS)[None, :]
    kmask = k < num_chunks
    ptrs = row_partials[:, None] + k
    m_k = tl.load(ptrs + 0 * stride_field, mask=kmask, other=float("-inf"), cache_modifier=".cg")
    s_k = tl.load(ptrs + 1 * stride_field, mask=kmask, other=0.0, cache_modifier=".cg")
    t_k = tl.load(ptrs + 4 * stride_field, mask=kmask, other=0.0, cache_modifier=".cg")
    m = tl.max(m_k, axis=1)
    shift = tl.where(m > float("-inf"), m, 0.0)
    s_k = s_k * tl.exp(m_k - shift[:, None])  # a -inf chunk has s_k = 0: adds 0
    # t_k: one chunk holds the target logit, the others add 0
    if HAS_SMOOTHING:
        b_k = tl.load(ptrs + 2 * stride_field, mask=kmask, other=0.0, cache_modifier=".cg")
        a_k = tl.load(ptrs + 3 * stride_field, mask=kmask, other=0.0, cache_modifier=".cg")
        # A_k is relative to m_k; a chunk of -inf logits kept it relative to 0 (it is then -inf, or 0 with B_k = 0)
        a_k = tl.where(m_k > float("-inf"), a_k + b_k * (m_k - shift[:, None]), a_k)
        s, x_y, coef_sum, coef_dot = tl.reduce((s_k, t_k, b_k, a_k), 1, _add4)
    else:
        s, x_y = tl.reduce((s_k, t_k), 1, _add2)
        coef_sum = tl.zeros_like(m)
        coef_dot = tl.zeros_like(m)
    return m, tl.log(s), x_y, coef_sum, coef_dot


@triton.jit
def _ce_single_read_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, alpha_ptr, grad_scale_ptr,
    loss_ptr, state_ptr, grad_ptr, partials_ptr, counters_ptr,
    # shapes
    n_rows, n_classes, chunk_size, num_chunks,
    # strides (in elements)
    stride_logits_row, stride_target, stride_weight, stride_alpha, stride_grad_row,
    stride_partials_row, stride_partials_field,
    # constants
    ignore_index,
    eps_hi, eps_lo, gamma_hi, gamma_lo, alpha_hi, alpha_lo, z_hi, z_lo, cap_hi, cap_lo,
    CHUNK: tl.constexpr, MAX_CHUNKS: tl.constexpr, MODE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALPHA: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Program (row, chunk) of the single-read schedule (docs/kernels/cross_entropy_single_read.md). MODE "ticket":
    publish, wait for the row's other chunks, write the gradient; "publish" / "finish": the two launches of the
    two-phase form.
    ``counters`` holds the per-row arrival counts, then the ticket (ticket mode only; zero before the launch)."""
    eps = join_f64(eps_hi, eps_lo, DTYPE)
    gamma = join_f64(gamma_hi, gamma_lo, DTYPE)
    alpha_scalar = join_f64(alpha_hi, alpha_lo, DTYPE)
    z = join_f64(z_hi, z_lo, DTYPE)
    softcap = join_f64(cap_hi, cap_lo, DTYPE)

    if MODE == "ticket":
        pid = tl.atomic_add(counters_ptr + n_rows, 1, sem="relaxed", scope="gpu")
    else:
        pid = tl.program_id(0)
    row = pid // num_chunks
    chunk = pid % num_chunks
    rows = (row + tl.arange(0, 1)).to(tl.int64)  # the [BLOCK_R = 1] row vector the cross_entropy helpers take
    row_partials = partials_ptr + rows * stride_partials_row

    cols, mask, y, valid, in_range, is_target, e, dcap, a, m_k, s_k, b_k, a_k, t_k = _chunk_tile(
        logits_ptr + rows * stride_logits_row, target_ptr + rows * stride_target, weight_ptr,
        chunk * chunk_size, chunk_size, n_classes, stride_weight, ignore_index, eps, softcap,
        CHUNK, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, DTYPE)

    if MODE != "finish":
        _publish(row_partials + chunk, stride_partials_field, m_k, s_k, b_k, a_k, t_k)
    if MODE == "ticket":
        _arrive_and_wait(counters_ptr + row, num_chunks)
    if MODE != "publish":
        m, log_s, x_y, coef_sum, coef_dot = _merge_partials(row_partials, stride_partials_field, num_chunks,
                                                            MAX_CHUNKS, HAS_SMOOTHING)
        gather = valid & in_range
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y * stride_weight, mask=gather, other=0.0).to(DTYPE)
        else:
            w_y = tl.zeros_like(m) + 1.0
        if HAS_ALPHA:
            alpha = tl.load(alpha_ptr + y * stride_alpha, mask=gather, other=0.0).to(DTYPE)
        else:
            alpha = tl.zeros_like(m) + alpha_scalar
        loss, k1, kf, ky, k3 = row_loss_and_coefs(m, log_s, x_y, coef_sum, coef_dot, w_y, alpha, valid, in_range,
                                                   eps, gamma, z, n_classes, HAS_SMOOTHING)
        first = tl.zeros_like(rows) + chunk == 0  # a [1] mask: the interpreter cannot broadcast a 0-d bool
        tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=first)
        store_row_state(state_ptr, rows, first, m, log_s, k1, kf, ky, k3)

        scale = tl.load(grad_scale_ptr).to(DTYPE)
        # p_c = exp((x_c - m) - log_s) = e_c exp((m_k - m) - log_s). With m_k rather than the shift, a chunk of
        # -inf logits gets exp(-inf) = 0 here, so p = 0 * 0 there even when the row max is very negative.
        p = e * tl.exp((m_k - m) - log_s)[:, None]
        g = dlogits_from_coefs(p, is_target, k1 * scale, kf * scale, ky * scale)
        if HAS_SMOOTHING:
            g -= a * (k3 * scale)[:, None]
        if HAS_SOFTCAP:
            g *= dcap
        g_ptrs = grad_ptr + rows[:, None] * stride_grad_row + cols[None, :]
        tl.store(g_ptrs, g.to(grad_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launcher: derives every constexpr flag from the arguments and writes into caller-allocated outputs.


@custom_launcher("cross_entropy_single_read", mutates_args=("loss", "row_state", "grad"))
def cross_entropy_single_read(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
    grad_scale: torch.Tensor, loss: torch.Tensor, row_state: torch.Tensor, grad: torch.Tensor,
    *, ignore_index: int, label_smoothing: float, focal_gamma: float, focal_alpha: float, z_loss: float,
    softcap: Optional[float], mode: Optional[str] = None, config: Optional[List[int]] = None,
) -> None:
    """Per-row loss and row state, and the gradient times ``grad_scale``, with each row of ``logits`` read once.

    The outputs of ``kernels.cross_entropy.cross_entropy_forward`` with ``grad`` given (its fused path), for the
    layouts ``single_read_applies`` accepts; the same keyword arguments.

    Args:
        logits: (rows, classes), fp16 / bf16 / fp32 / fp64, class stride 1, any row stride.
        target: (rows,) int64 (or uint8) class indices, any stride.
        weight: None or (classes,) class weights, any stride.
        alpha: None or (classes,) focal alpha per class, any stride (else ``focal_alpha`` is the scalar).
        grad_scale: 0-d tensor of the compute dtype (fp32; fp64 for fp64 logits): the gradient's factor, e.g.
            1 / (the mean's denominator), read on the device.
        loss: (rows,) of the compute dtype, written.
        row_state: (rows, ROW_STATE) contiguous, of the compute dtype: (m, log s, K1, Kf, Ky, K3) per row, written
            (lse = m + log s).
        grad: logits' shape and dtype, class stride 1; may be ``logits`` itself (``inplace_backward``).
        mode: "ticket" (one launch, programs wait for their row's other chunks; compiled kernels only, at most
            one chunk per SM) or "twophase" (two launches, no waiting); None: "ticket" where it may run, else
            "twophase".
        config: [CHUNK, num_warps] instead of ``single_read_config`` (tests: small chunks in the interpreter).
    """
    if logits.dim() != 2 or logits.stride(1) != 1 or target.is_floating_point():
        raise ValueError(f"the single-read kernel takes 2-D logits with class stride 1 and class-index targets, "
                         f"got logits of shape {tuple(logits.shape)}, strides {logits.stride()}, target "
                         f"{target.dtype}")
    if grad.shape != logits.shape or grad.stride(1) != 1:
        raise ValueError(f"grad must have the logits' shape {tuple(logits.shape)} and class stride 1, got "
                         f"{tuple(grad.shape)} with strides {grad.stride()}")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if mode == "ticket" and INTERPRETED:
        raise ValueError("mode='ticket' cannot run in Triton's interpreter: it runs programs one at a time, so a "
                         "program waiting for its row's other chunks would wait forever; use mode='twophase'")
    n_rows, n_classes = logits.shape
    chunk, num_warps = config or single_read_config(n_classes, logits.dtype, softcap is not None)
    num_chunks, chunk_size = _chunking(n_classes, chunk)
    # Forward progress of the ticket mode needs a row's num_chunks programs resident at once
    # (docs/kernels/cross_entropy_single_read.md): guaranteed up to one program per SM.
    ticket_safe = num_chunks <= num_sms(logits.device)
    if mode == "ticket" and not ticket_safe:
        raise ValueError(f"mode='ticket' needs at most one chunk per SM, got {num_chunks} chunks of {chunk} classes "
                         f"on {num_sms(logits.device)} SMs; use mode='twophase' or a wider chunk")
    if mode is None:
        mode = "ticket" if ticket_safe and not INTERPRETED else "twophase"
    if n_rows == 0:
        return
    grid = (n_rows * num_chunks,)
    # The workspace, one record per program of the grid.
    partials = torch.empty((n_rows, NUM_FIELDS, num_chunks), dtype=loss.dtype, device=logits.device)
    # Per-row arrival counters, then the ticket: zeroed by one memset (no host sync: capturable in a CUDA graph).
    counters = torch.zeros(n_rows + 1, dtype=torch.int32, device=logits.device) if mode == "ticket" else None
    for launch_mode in ("ticket",) if mode == "ticket" else ("publish", "finish"):
        _ce_single_read_kernel[grid](
            logits, target, weight, alpha, grad_scale,
            loss, row_state, grad, partials, counters,
            n_rows, n_classes, chunk_size, num_chunks,
            logits.stride(0), target.stride(0), 0 if weight is None else weight.stride(0),
            0 if alpha is None else alpha.stride(0), grad.stride(0), partials.stride(0), partials.stride(1),
            ignore_index,
            *split_f64(label_smoothing), *split_f64(focal_gamma), *split_f64(focal_alpha), *split_f64(z_loss),
            *split_f64(softcap or 0.0),
            CHUNK=chunk, MAX_CHUNKS=triton.next_power_of_2(num_chunks), MODE=launch_mode,
            HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0.0, HAS_SOFTCAP=softcap is not None,
            HAS_ALPHA=alpha is not None, DTYPE=math_dtype(logits),
            num_warps=num_warps,
        )


def compile_variants():
    """The launches ``bench/compile_report.py`` compiles (recorded, not run): in bf16 at the three LLM vocabularies,
    no extra, label smoothing + focal + z-loss, and those with soft-cap, class weights and per-class alpha, in the
    ticket mode and both launches of the two-phase mode; at V = 128256 the weights without the cap and the cap
    alone (the two register-heavy extras apart); fp16 / fp32 / fp64 with no extra and with every extra; one chunk
    (V below CHUNK); a row stride that is not a multiple of 16 elements (scalar loads)."""
    ls_focal_z = dict(label_smoothing=0.1, focal_gamma=2.0, z_loss=1e-4)
    extras = {
        "plain": {},
        "ls+focal+z": ls_focal_z,
        "ls+focal+z+weight+alpha": dict(ls_focal_z, per_class=True),
        "softcap": dict(softcap=30.0),
        "everything": dict(ls_focal_z, softcap=30.0, per_class=True),
    }

    def launch(dtype, n_classes, extra, mode):
        rows = 4
        logits = torch.zeros(rows, n_classes, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        opts = {**dict(label_smoothing=0.0, focal_gamma=0.0, z_loss=0.0, softcap=None), **extras[extra]}
        per_class = torch.ones(n_classes) if opts.pop("per_class", False) else None  # class weights and alpha
        cross_entropy_single_read(
            logits, torch.zeros(rows, dtype=torch.long), per_class, per_class, torch.ones((), dtype=acc),
            torch.zeros(rows, dtype=acc), torch.zeros(rows, ROW_STATE, dtype=acc), torch.zeros_like(logits),
            ignore_index=-100, focal_alpha=1.0, mode=mode, **opts)

    for n_classes in (32000, 128256, 256000):
        for extra in ("plain", "ls+focal+z", "everything"):
            for mode in MODES:
                launch(torch.bfloat16, n_classes, extra, mode)
    for extra in ("ls+focal+z+weight+alpha", "softcap"):
        launch(torch.bfloat16, 128256, extra, "ticket")
    for dtype in (torch.float16, torch.float32, torch.float64):
        for extra in ("plain", "everything"):
            launch(dtype, 128256, extra, "ticket")
    launch(torch.bfloat16, 4096, "plain", "ticket")
    launch(torch.bfloat16, 50257, "plain", "ticket")
