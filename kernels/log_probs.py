"""Per-token log-probabilities and entropies of logits, row by row: the primitive of RL post-training (the log-prob
of the sampled token under the policy, and the entropy of its distribution), in two launches.

Per row, with ``x`` the logits, ``z = softcap(x) / T`` (T the row's sampling temperature), ``m = max_c z_c``,
``s = sum_c exp(z_c - m)`` and ``A = sum_c exp(z_c - m) (z_c - m)``:

    log p_y = (z_y - m) - log s
    H       = -sum_c p_c log p_c = log s - A / s          (E_p[z] - m = A / s)

and with ``g`` and ``h`` the gradients arriving at log p_y and at H:

    dz_c = g ([c == y] - p_c) - h p_c (log p_c + H)         (d H / d z_c = -p_c (z_c - E_p[z]))
    dx_c = dz_c / T * cap'(x_c)

The forward keeps (m, log s, H) per row; the backward reads each row once more. One program per BLOCK_R rows,
BLOCK_C classes at a time (the cross-entropy family's large-vocabulary config), so registers stay bounded at any
vocabulary. Ignored rows (``target == ignore_index``) give 0 and no gradient; their entropy is 0 too.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import join_f64, math_dtype, online_logsumexp_update, soft_cap, split_f64
from ._launch import custom_launcher
from .configs import cross_entropy_config
from .cross_entropy_rows import load_logits

# Columns of the per-row state the forward stores: m, log s, H.
LOG_PROB_STATE = 3


@triton.jit
def _scaled_logits(row_ptrs, cols, mask, stride_class, softcap, inv_t, HAS_SOFTCAP: tl.constexpr,
                   DTYPE: tl.constexpr):
    """``softcap(x) / T`` for a [rows, classes] tile (-inf in padded lanes), and the cap's derivative."""
    x, dcap = load_logits(row_ptrs, cols, mask, stride_class, softcap, HAS_SOFTCAP, DTYPE)
    return x * inv_t[:, None], dcap


@triton.jit
def _log_probs_fwd_kernel(
    logits_ptr, target_ptr, inv_t_ptr, logprob_ptr, entropy_ptr, state_ptr,
    n_rows, n_cols, stride_row, stride_class, stride_target, stride_inv_t,
    ignore_index, cap_hi, cap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DTYPE: tl.constexpr,
):
    softcap = join_f64(cap_hi, cap_lo, DTYPE)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    row_ptrs = logits_ptr + rows.to(tl.int64) * stride_row
    inv_t = tl.load(inv_t_ptr + rows * stride_inv_t, mask=row_mask, other=1.0).to(DTYPE)
    m = tl.full([BLOCK_R], float("-inf"), DTYPE)
    s = tl.zeros([BLOCK_R], DTYPE)
    a = tl.zeros([BLOCK_R], DTYPE)  # sum_c exp(z_c - m) (z_c - m), re-based when m moves
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        z, _ = _scaled_logits(row_ptrs, cols, mask, stride_class, softcap, inv_t, HAS_SOFTCAP, DTYPE)
        m_old, s_old = m, s
        m, s, shift = online_logsumexp_update(m, s, z, 1)
        # A relative to the new max: each old term gains (m_old - m) and is scaled by exp(m_old - m)
        rescale = tl.where(m_old > float("-inf"), tl.exp(m_old - shift), 0.0)
        a = tl.where(m_old > float("-inf"), (a + s_old * (m_old - shift)) * rescale, 0.0)
        e = tl.exp(z - shift[:, None])
        a += tl.sum(tl.where(mask & (e > 0), e * (z - shift[:, None]), 0.0), axis=1)  # a -inf logit adds 0
    y = tl.load(target_ptr + rows * stride_target, mask=row_mask, other=0).to(tl.int64)
    valid = row_mask & (y != ignore_index)
    # an out-of-range class (checked on the host on CPU only: a GPU check would sync) reads nothing and gives NaN
    in_range = (y >= 0) & (y < n_cols)
    z_y = tl.load(row_ptrs + tl.where(valid & in_range, y, 0) * stride_class, mask=valid & in_range,
                  other=float("nan")).to(DTYPE)
    if HAS_SOFTCAP:  # the same conversion and cap as the tiles, so that log p_y matches log p_c at c == y
        z_y, _ = soft_cap(z_y, softcap)
    z_y = z_y * inv_t
    log_s = tl.log(s)
    entropy = log_s - a / s
    logprob = tl.where(valid, (z_y - m) - log_s, 0.0)
    tl.store(logprob_ptr + rows, logprob.to(logprob_ptr.dtype.element_ty), mask=row_mask)
    tl.store(entropy_ptr + rows, tl.where(valid, entropy, 0.0).to(entropy_ptr.dtype.element_ty), mask=row_mask)
    offs = rows.to(tl.int64) * 3
    tl.store(state_ptr + offs + 0, m, mask=row_mask)
    tl.store(state_ptr + offs + 1, log_s, mask=row_mask)
    tl.store(state_ptr + offs + 2, entropy, mask=row_mask)


@triton.jit
def _log_probs_bwd_kernel(
    logits_ptr, target_ptr, inv_t_ptr, state_ptr, grad_logprob_ptr, grad_entropy_ptr, grad_ptr,
    n_rows, n_cols, stride_row, stride_class, stride_target, stride_inv_t, stride_grad_row, stride_grad_class,
    stride_g, stride_h, ignore_index, cap_hi, cap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G: tl.constexpr,
    HAS_H: tl.constexpr, DTYPE: tl.constexpr,
):
    softcap = join_f64(cap_hi, cap_lo, DTYPE)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    row_ptrs = logits_ptr + rows.to(tl.int64) * stride_row
    grad_rows = grad_ptr + rows.to(tl.int64) * stride_grad_row
    inv_t = tl.load(inv_t_ptr + rows * stride_inv_t, mask=row_mask, other=1.0).to(DTYPE)
    offs = rows.to(tl.int64) * 3
    m = tl.load(state_ptr + offs + 0, mask=row_mask, other=0.0)
    log_s = tl.load(state_ptr + offs + 1, mask=row_mask, other=0.0)
    entropy = tl.load(state_ptr + offs + 2, mask=row_mask, other=0.0)
    y = tl.load(target_ptr + rows * stride_target, mask=row_mask, other=0).to(tl.int64)
    valid = row_mask & (y != ignore_index)
    g = tl.zeros([BLOCK_R], DTYPE)
    h = tl.zeros([BLOCK_R], DTYPE)
    if HAS_G:
        g = tl.load(grad_logprob_ptr + rows * stride_g, mask=valid, other=0.0).to(DTYPE)
    if HAS_H:
        h = tl.load(grad_entropy_ptr + rows * stride_h, mask=valid, other=0.0).to(DTYPE)
    g = tl.where(valid, g, 0.0)
    h = tl.where(valid, h, 0.0)
    shift = tl.where(m > float("-inf"), m, 0.0)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        z, dcap = _scaled_logits(row_ptrs, cols, mask, stride_class, softcap, inv_t, HAS_SOFTCAP, DTYPE)
        log_p = (z - shift[:, None]) - log_s[:, None]
        p = tl.exp(log_p)
        dz = -g[:, None] * p
        if HAS_H:
            dz -= h[:, None] * tl.where(p > 0, p * (log_p + entropy[:, None]), 0.0)
        dz = tl.where(cols[None, :] == y[:, None], dz + g[:, None], dz)
        dx = dz * inv_t[:, None]
        if HAS_SOFTCAP:
            dx = dx * dcap
        tl.store(grad_rows[:, None] + cols[None, :] * stride_grad_class, dx.to(grad_ptr.dtype.element_ty),
                 mask=mask)


def _config(logits):
    block_r, block_c, num_warps = cross_entropy_config(logits.shape[0], logits.shape[1], logits.stride(1) == 1)
    return block_r, block_c, num_warps


@custom_launcher("log_probs_forward", mutates_args=("logprob", "entropy", "state"))
def log_probs_forward(
    logits: torch.Tensor, target: torch.Tensor, inv_temperature: torch.Tensor, logprob: torch.Tensor,
    entropy: torch.Tensor, state: torch.Tensor, *, ignore_index: int, softcap: Optional[float],
) -> None:
    """Launch ``_log_probs_fwd_kernel`` over (rows, classes) ``logits`` with any strides: per-row ``logprob`` and
    ``entropy`` (rows,) and ``state`` (rows, LOG_PROB_STATE) in the compute dtype. ``target`` (rows,) class indices
    (int64 or int32, any stride); ``inv_temperature`` (rows,) with any stride, 0 included (one temperature)."""
    block_r, block_c, num_warps = _config(logits)
    _log_probs_fwd_kernel[(triton.cdiv(logits.shape[0], block_r),)](
        logits, target, inv_temperature, logprob, entropy, state,
        logits.shape[0], logits.shape[1], logits.stride(0), logits.stride(1), target.stride(0),
        inv_temperature.stride(0), ignore_index, *split_f64(softcap or 0.0),
        BLOCK_R=block_r, BLOCK_C=block_c, HAS_SOFTCAP=softcap is not None, DTYPE=math_dtype(logits),
        num_warps=num_warps,
    )


@custom_launcher("log_probs_backward", mutates_args=("grad",))
def log_probs_backward(
    logits: torch.Tensor, target: torch.Tensor, inv_temperature: torch.Tensor, state: torch.Tensor,
    grad_logprob: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], grad: torch.Tensor, *,
    ignore_index: int, softcap: Optional[float],
) -> None:
    """Launch ``_log_probs_bwd_kernel``: ``grad`` (the logits' shape, any strides; may be ``logits`` itself) from
    the forward's ``state`` and the per-row gradients of the log-probs and the entropies (None: zero)."""
    block_r, block_c, num_warps = _config(logits)
    _log_probs_bwd_kernel[(triton.cdiv(logits.shape[0], block_r),)](
        logits, target, inv_temperature, state, grad_logprob, grad_entropy, grad,
        logits.shape[0], logits.shape[1], logits.stride(0), logits.stride(1), target.stride(0),
        inv_temperature.stride(0), grad.stride(0), grad.stride(1),
        0 if grad_logprob is None else grad_logprob.stride(0), 0 if grad_entropy is None else grad_entropy.stride(0),
        ignore_index, *split_f64(softcap or 0.0),
        BLOCK_R=block_r, BLOCK_C=block_c, HAS_SOFTCAP=softcap is not None, HAS_G=grad_logprob is not None,
        HAS_H=grad_entropy is not None, DTYPE=math_dtype(logits), num_warps=num_warps,
    )


def compile_variants():
    """Call the launchers on small CPU tensors, once per variant that matters (``bench/compile_report.py``): each
    dtype at an LLM vocabulary (one row per program, 4096-class blocks) and at a small one (a tile of rows), with
    and without the soft cap; the backward with the log-prob gradient, the entropy gradient and both."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for n_classes in (50000, 100):
            for softcap in (None, 30.0):
                logits = torch.zeros(4, n_classes, dtype=dtype)
                target = torch.zeros(4, dtype=torch.long)
                inv_t = torch.ones(4, dtype=acc)
                state = torch.zeros(4, LOG_PROB_STATE, dtype=acc)
                log_probs_forward(logits, target, inv_t, torch.zeros(4, dtype=acc), torch.zeros(4, dtype=acc), state,
                                  ignore_index=-100, softcap=softcap)
                for g, h in ((True, False), (False, True), (True, True)):
                    log_probs_backward(logits, target, inv_t, state, torch.ones(4, dtype=acc) if g else None,
                                       torch.ones(4, dtype=acc) if h else None, logits, ignore_index=-100,
                                       softcap=softcap)
