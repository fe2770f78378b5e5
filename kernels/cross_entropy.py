"""Cross-entropy family kernels: softmax cross-entropy with label smoothing, focal weighting, z-loss and logit
soft-capping, for class-index and class-probability targets.

Every problem is seen as ``rows x classes``: row ``r`` of an ``(N, C, d1, ..., dk)`` input is
``(r // inner, :, r % inner)`` with ``inner = d1 * ... * dk``, so K-dimensional inputs need no transpose copy.

The row math (the loss and the four gradient coefficients K1, Kf, Ky, K3 of each row, and their derivation) is
``cross_entropy_rows``'s.

Two launch modes share one pass-2 helper:
- fused (``COMPUTE_GRAD``): one launch reads each row in pass 1 (online max / sum-exp / B / A), then again in
  pass 2 to write the gradient, already scaled by the reduction's ``1 / denominator`` on the device; the backward
  is then free when ``grad_output == 1``. At LLM vocabularies pass 2 reads the row from HBM again: 3 bytes moved
  per 2 counted (``bench/NOTES.md``; the single-read schedule in ``cross_entropy_single_read`` removes it).
- two launches: the forward stores the row state ``(m, log s, K1, Kf, Ky, K3)`` (always: a second backward through
  a retained graph needs it too); ``_ce_bwd_kernel`` reads the logits once more and scales by a per-row
  ``grad_output`` (``reduction='none'``) or writes the gradient of probability targets as well.
"""

import itertools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import join_f64, math_dtype, online_logsumexp_update, soft_cap, split_f64
from ._launch import custom_launcher
from .configs import cross_entropy_config
from .cross_entropy_rows import (
    ROW_STATE,
    dlogits_from_coefs,
    load_logits,
    load_row_state,
    one_stride_walk,
    row_loss_and_coefs,
    smoothing_coef,
    store_row_state,
)

# Columns of a shard's partial statistics (vocabulary-parallel): max, shifted sum-exp, B, A, target logit.
PARTIAL_STATE = 5


@triton.jit
def _row_offsets(rows, inner, stride_outer, stride_inner):
    """Element offset of each row's first class, in 64 bits (rows * stride passes 2^31 at LLM sizes)."""
    rows = rows.to(tl.int64)
    return (rows // inner) * stride_outer + (rows % inner) * stride_inner


@triton.jit
def _ce_grad_pass(
    logits_rows, target_rows, weight_ptr, grad_rows, grad_target_rows,
    row_mask, y, m, log_s, k1, kf, ky, k3, target_grad_scale,
    n_cols, n_classes, class_offset, stride_logits_class, stride_target_class, stride_weight, stride_grad_class,
    stride_grad_target_class, eps, softcap,
    BLOCK_C: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_COEF: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_INPUT_GRAD: tl.constexpr, COMPUTE_TARGET_GRAD: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Pass 2 over a group of rows: dloss/dlogits from the per-row coefficients and, for probability targets,
    dloss/dtarget_c = -(1 - eps) * w_c * log p_c. Blocks are visited last-to-first so that the ones pass 1 read
    most recently are read first, while they may still be in L2."""
    num_blocks = tl.cdiv(n_cols, BLOCK_C)
    for i in range(0, num_blocks):
        cols = (num_blocks - 1 - i) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        x, dcap = load_logits(logits_rows, cols, mask, stride_logits_class, softcap, HAS_SOFTCAP, DTYPE)
        log_p = (x - m[:, None]) - log_s[:, None]
        if COMPUTE_INPUT_GRAD:
            g = dlogits_from_coefs(tl.exp(log_p), (cols + class_offset)[None, :] == y[:, None], k1, kf, ky)
            if HAS_COEF:
                a = smoothing_coef(target_rows, weight_ptr, cols, mask, col_mask, eps, n_classes, class_offset,
                                    stride_target_class, stride_weight, PROB_TARGET, HAS_WEIGHT, DTYPE)
                g -= a * k3[:, None]
            if HAS_SOFTCAP:
                g *= dcap
            g_ptrs = grad_rows[:, None] + cols[None, :] * stride_grad_class
            tl.store(g_ptrs, g.to(g_ptrs.dtype.element_ty), mask=mask)
        if COMPUTE_TARGET_GRAD:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + (cols + class_offset).to(tl.int64) * stride_weight, mask=col_mask, other=0.0)
                log_p *= w.to(DTYPE)[None, :]
            gt = tl.where(mask, -target_grad_scale[:, None] * log_p, 0.0)
            gt_ptrs = grad_target_rows[:, None] + cols[None, :] * stride_grad_target_class
            tl.store(gt_ptrs, gt.to(gt_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _ce_row_stats(
    logits_rows, target_rows, weight_ptr, row_mask, n_cols, n_classes, class_offset, stride_logits_class,
    stride_target_class, stride_weight, eps, softcap,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_COEF: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DTYPE: tl.constexpr,
):
    """Pass 1 over a group of rows: (m, s, B, A), block by block with the online log-sum-exp (one exp per logit).
    A is kept relative to the running max and re-based when it moves, so ``B log s - A`` never subtracts two large
    numbers."""
    m = tl.full([BLOCK_R], float("-inf"), DTYPE)
    s = tl.zeros([BLOCK_R], DTYPE)
    coef_sum = tl.zeros([BLOCK_R], DTYPE)
    coef_dot = tl.zeros([BLOCK_R], DTYPE)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_mask = cols < n_cols
        mask = row_mask[:, None] & col_mask[None, :]
        x, _ = load_logits(logits_rows, cols, mask, stride_logits_class, softcap, HAS_SOFTCAP, DTYPE)
        m_old = m
        m, s, shift = online_logsumexp_update(m, s, x, 1)
        if HAS_COEF:
            a = smoothing_coef(target_rows, weight_ptr, cols, mask, col_mask, eps, n_classes, class_offset,
                                stride_target_class, stride_weight, PROB_TARGET, HAS_WEIGHT, DTYPE)
            coef_dot = tl.where(m_old > float("-inf"), coef_dot + coef_sum * (m_old - shift), coef_dot)
            coef_dot += tl.sum(tl.where(mask, a * (x - shift[:, None]), 0.0), axis=1)
            coef_sum += tl.sum(a, axis=1)
    return m, s, coef_sum, coef_dot


@triton.jit
def _finish_rows(m, log_s, coef_sum, coef_dot, x_y, y, row_mask, weight_ptr, alpha_ptr, stride_weight, stride_alpha,
                 ignore_index, eps, gamma, alpha_scalar, z, n_classes,
                 BLOCK_R: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 HAS_SMOOTHING: tl.constexpr, HAS_ALPHA: tl.constexpr, DTYPE: tl.constexpr):
    """(loss, K1, Kf, Ky, K3) of a group of rows from their statistics over all classes (module docstring); the
    class weight and alpha of the target are read here, by its (global) class index."""
    if PROB_TARGET:
        lse = m + log_s
        loss = tl.where(row_mask, coef_sum * log_s - coef_dot + z * lse * lse, 0.0)
        k1 = coef_sum + 2.0 * z * lse
        kf = tl.zeros([BLOCK_R], DTYPE)
        ky = tl.zeros([BLOCK_R], DTYPE)
        k3 = tl.zeros([BLOCK_R], DTYPE) + 1.0
    else:
        valid = row_mask & (y != ignore_index)
        in_range = (y >= 0) & (y < n_classes)
        gather = valid & in_range
        y_safe = tl.where(gather, y, 0)
        w_y = tl.zeros([BLOCK_R], DTYPE) + 1.0
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y_safe * stride_weight, mask=gather, other=0.0).to(DTYPE)
        alpha = tl.zeros([BLOCK_R], DTYPE) + alpha_scalar
        if HAS_ALPHA:
            alpha = tl.load(alpha_ptr + y_safe * stride_alpha, mask=gather, other=0.0).to(DTYPE)
        loss, k1, kf, ky, k3 = row_loss_and_coefs(m, log_s, x_y, coef_sum, coef_dot, w_y, alpha, valid, in_range,
                                                   eps, gamma, z, n_classes, HAS_SMOOTHING)
    return loss, k1, kf, ky, k3


@triton.jit
def _ce_fwd_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, alpha_ptr, grad_scale_ptr, loss_ptr, state_ptr, grad_ptr,
    # shapes
    n_rows, n_cols, n_classes, class_offset, inner,
    # strides (in elements)
    stride_logits_outer, stride_logits_inner, stride_logits_class,
    stride_target_outer, stride_target_inner, stride_target_class,
    stride_grad_outer, stride_grad_inner, stride_grad_class, stride_weight, stride_alpha,
    # constants
    ignore_index, eps_hi, eps_lo, gamma_hi, gamma_lo, alpha_hi, alpha_lo, z_hi, z_lo, cap_hi, cap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALPHA: tl.constexpr, COMPUTE_GRAD: tl.constexpr, PARTIAL: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Per-row loss and state (m, log s, K1, Kf, Ky, K3); with COMPUTE_GRAD the gradient times ``grad_scale`` in
    the same launch. Class-index targets are read as (rows,) with stride ``stride_target_inner`` and compared in
    int64 (a uint8 target never wraps against ``ignore_index``).

    The logits hold ``n_cols`` classes, classes ``class_offset ..`` of ``n_classes`` (all of them on one GPU; one
    shard of them across the ranks of a vocabulary-parallel group). With PARTIAL the kernel stops at this shard's
    statistics, (m, s, B, A, x_y) per row into ``state`` (rows, PARTIAL_STATE), x_y 0 unless the shard holds the
    target; the ranks then merge them and ``_ce_finish_kernel`` finishes."""
    eps = join_f64(eps_hi, eps_lo, DTYPE)
    gamma = join_f64(gamma_hi, gamma_lo, DTYPE)
    alpha_scalar = join_f64(alpha_hi, alpha_lo, DTYPE)
    z = join_f64(z_hi, z_lo, DTYPE)
    softcap = join_f64(cap_hi, cap_lo, DTYPE)
    HAS_COEF: tl.constexpr = PROB_TARGET or HAS_SMOOTHING

    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    logits_rows = logits_ptr + _row_offsets(rows, inner, stride_logits_outer, stride_logits_inner)
    target_rows = target_ptr + _row_offsets(rows, inner, stride_target_outer, stride_target_inner)
    m, s, coef_sum, coef_dot = _ce_row_stats(
        logits_rows, target_rows, weight_ptr, row_mask, n_cols, n_classes, class_offset, stride_logits_class,
        stride_target_class, stride_weight, eps, softcap, BLOCK_R, BLOCK_C, PROB_TARGET, HAS_WEIGHT, HAS_COEF,
        HAS_SOFTCAP, DTYPE)
    y = tl.full([BLOCK_R], -1, tl.int64)
    x_y = tl.zeros([BLOCK_R], DTYPE)
    if not PROB_TARGET:
        y = tl.load(target_rows, mask=row_mask, other=0).to(tl.int64)
        # the target logit where this shard holds it, with the same conversion and cap as the tiles (so that
        # log p_y matches log p_c at c == y)
        local = y - class_offset
        owned = row_mask & (y != ignore_index) & (local >= 0) & (local < n_cols)
        x_y = tl.load(logits_rows + tl.where(owned, local, 0) * stride_logits_class, mask=owned, other=0.0)
        x_y = x_y.to(DTYPE)
        if HAS_SOFTCAP:
            x_y, _ = soft_cap(x_y, softcap)
        x_y = tl.where(owned, x_y, 0.0)
    if PARTIAL:
        offs = rows.to(tl.int64) * 5
        tl.store(state_ptr + offs + 0, m, mask=row_mask)
        tl.store(state_ptr + offs + 1, s, mask=row_mask)
        tl.store(state_ptr + offs + 2, coef_sum, mask=row_mask)
        tl.store(state_ptr + offs + 3, coef_dot, mask=row_mask)
        tl.store(state_ptr + offs + 4, x_y, mask=row_mask)
    else:
        log_s = tl.log(s)
        loss, k1, kf, ky, k3 = _finish_rows(
            m, log_s, coef_sum, coef_dot, x_y, y, row_mask, weight_ptr, alpha_ptr, stride_weight, stride_alpha,
            ignore_index, eps, gamma, alpha_scalar, z, n_classes,
            BLOCK_R, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_ALPHA, DTYPE)
        tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)
        store_row_state(state_ptr, rows, row_mask, m, log_s, k1, kf, ky, k3)
        if COMPUTE_GRAD:
            scale = tl.load(grad_scale_ptr).to(DTYPE)
            grad_rows = grad_ptr + _row_offsets(rows, inner, stride_grad_outer, stride_grad_inner)
            _ce_grad_pass(
                logits_rows, target_rows, weight_ptr, grad_rows, grad_rows,
                row_mask, y, m, log_s, k1 * scale, kf * scale, ky * scale, k3 * scale, scale,
                n_cols, n_classes, class_offset, stride_logits_class, stride_target_class, stride_weight,
                stride_grad_class, 0, eps, softcap,
                BLOCK_C, PROB_TARGET, HAS_WEIGHT, HAS_COEF, HAS_SOFTCAP, True, False, DTYPE,
            )


@triton.jit
def _ce_finish_kernel(
    # pointers
    stats_ptr, target_ptr, weight_ptr, alpha_ptr, loss_ptr, state_ptr,
    # shapes
    n_rows, n_classes, inner,
    # strides (in elements)
    stride_target_outer, stride_target_inner, stride_weight, stride_alpha,
    # constants
    ignore_index, eps_hi, eps_lo, gamma_hi, gamma_lo, alpha_hi, alpha_lo, z_hi, z_lo,
    BLOCK_R: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ALPHA: tl.constexpr, DTYPE: tl.constexpr,
):
    """The per-row loss and state from statistics merged over every shard of the classes, (m, s, B, A, x_y) per
    row: what ``_ce_fwd_kernel`` does after its pass 1 on one GPU."""
    eps = join_f64(eps_hi, eps_lo, DTYPE)
    gamma = join_f64(gamma_hi, gamma_lo, DTYPE)
    alpha_scalar = join_f64(alpha_hi, alpha_lo, DTYPE)
    z = join_f64(z_hi, z_lo, DTYPE)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    offs = rows.to(tl.int64) * 5
    m = tl.load(stats_ptr + offs + 0, mask=row_mask, other=0.0).to(DTYPE)
    log_s = tl.log(tl.load(stats_ptr + offs + 1, mask=row_mask, other=1.0).to(DTYPE))
    coef_sum = tl.load(stats_ptr + offs + 2, mask=row_mask, other=0.0).to(DTYPE)
    coef_dot = tl.load(stats_ptr + offs + 3, mask=row_mask, other=0.0).to(DTYPE)
    x_y = tl.load(stats_ptr + offs + 4, mask=row_mask, other=0.0).to(DTYPE)
    y = tl.full([BLOCK_R], -1, tl.int64)
    if not PROB_TARGET:
        y = tl.load(target_ptr + _row_offsets(rows, inner, stride_target_outer, stride_target_inner), mask=row_mask,
                    other=0).to(tl.int64)
    loss, k1, kf, ky, k3 = _finish_rows(
        m, log_s, coef_sum, coef_dot, x_y, y, row_mask, weight_ptr, alpha_ptr, stride_weight, stride_alpha,
        ignore_index, eps, gamma, alpha_scalar, z, n_classes,
        BLOCK_R, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_ALPHA, DTYPE)
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)
    store_row_state(state_ptr, rows, row_mask, m, log_s, k1, kf, ky, k3)


@triton.jit
def _ce_bwd_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, state_ptr, grad_scale_ptr, grad_ptr, grad_target_ptr,
    # shapes
    n_rows, n_cols, n_classes, class_offset, inner,
    # strides (in elements; stride_grad_scale is 0 for a scalar grad_output)
    stride_logits_outer, stride_logits_inner, stride_logits_class,
    stride_target_outer, stride_target_inner, stride_target_class,
    stride_grad_outer, stride_grad_inner, stride_grad_class,
    stride_grad_target_outer, stride_grad_target_inner, stride_grad_target_class,
    stride_weight, stride_grad_scale,
    # constants
    eps_hi, eps_lo, cap_hi, cap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_INPUT_GRAD: tl.constexpr, COMPUTE_TARGET_GRAD: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Gradient of the logits (and of probability targets) from the forward's row state, scaled per row by
    ``grad_scale`` (``grad_output``, divided by the denominator for ``mean``). Shapes as ``_ce_fwd_kernel``'s:
    the row state is the same on every shard of the classes, so each writes its shard's gradient alone."""
    eps = join_f64(eps_hi, eps_lo, DTYPE)
    softcap = join_f64(cap_hi, cap_lo, DTYPE)
    HAS_COEF: tl.constexpr = PROB_TARGET or HAS_SMOOTHING

    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    logits_rows = logits_ptr + _row_offsets(rows, inner, stride_logits_outer, stride_logits_inner)
    target_rows = target_ptr + _row_offsets(rows, inner, stride_target_outer, stride_target_inner)
    if PROB_TARGET:
        y = tl.full([BLOCK_R], -1, tl.int64)
    else:
        y = tl.load(target_rows, mask=row_mask, other=0).to(tl.int64)
    scale = tl.load(grad_scale_ptr + rows.to(tl.int64) * stride_grad_scale, mask=row_mask, other=0.0).to(DTYPE)
    m, log_s, k1, kf, ky, k3 = load_row_state(state_ptr, rows, row_mask, scale, DTYPE)
    grad_rows = logits_rows  # placeholders, never stored through unless their flag is set
    grad_target_rows = target_rows
    if COMPUTE_INPUT_GRAD:
        grad_rows = grad_ptr + _row_offsets(rows, inner, stride_grad_outer, stride_grad_inner)
    if COMPUTE_TARGET_GRAD:
        grad_target_rows = grad_target_ptr + _row_offsets(rows, inner, stride_grad_target_outer,
                                                          stride_grad_target_inner)
    _ce_grad_pass(
        logits_rows, target_rows, weight_ptr, grad_rows, grad_target_rows,
        row_mask, y, m, log_s, k1, kf, ky, k3, (1.0 - eps) * scale,
        n_cols, n_classes, class_offset, stride_logits_class, stride_target_class, stride_weight, stride_grad_class,
        stride_grad_target_class, eps, softcap,
        BLOCK_C, PROB_TARGET, HAS_WEIGHT, HAS_COEF, HAS_SOFTCAP, COMPUTE_INPUT_GRAD, COMPUTE_TARGET_GRAD, DTYPE,
    )


# ---------------------------------------------------------------------------------------------------------------
# Launchers: derive every constexpr flag from the arguments, and write into caller-allocated outputs.


def class_layout(t):
    """(rows, inner, (stride_outer, stride_inner, stride_class)) for a (C,), (N, C) or (N, C, d1, ..., dk)
    tensor, or None when d1..dk cannot be walked with one stride (the caller then makes it contiguous)."""
    if t.dim() == 1:
        return 1, 1, (0, 0, t.stride(0))
    inner_stride = one_stride_walk(t.shape[2:], t.stride()[2:])
    if inner_stride is None:
        return None
    inner = math.prod(t.shape[2:])
    return t.shape[0] * inner, inner, (t.stride(0), inner_stride, t.stride(1))


def index_layout(target):
    """(stride_outer, stride_inner, 0) walking a class-index target of shape (), (N,) or (N, d1, ..., dk) in the
    logits' row order, or None when d1..dk cannot be walked with one stride (the caller then makes it
    contiguous). A column of a table (``labels[:, 0]``) or an expanded target is read in place."""
    if target.dim() == 0:
        return 0, 0, 0
    inner_stride = one_stride_walk(target.shape[1:], target.stride()[1:])
    return None if inner_stride is None else (target.stride(0), inner_stride, 0)


def _target_layout(target):
    return class_layout(target)[2] if target.is_floating_point() else index_layout(target)


def _layout_and_config(logits):
    n_rows, inner, strides = class_layout(logits)
    n_classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    return n_rows, inner, strides, n_classes, cross_entropy_config(n_rows, n_classes, strides[2] == 1)


@custom_launcher("cross_entropy_forward", mutates_args=("loss", "row_state", "grad"))
def cross_entropy_forward(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor], loss: torch.Tensor, row_state: torch.Tensor, grad: Optional[torch.Tensor],
    *, ignore_index: int, label_smoothing: float, focal_gamma: float, focal_alpha: float, z_loss: float,
    softcap: Optional[float], n_classes: Optional[int] = None, class_offset: int = 0, partial: bool = False,
) -> None:
    """Launch ``_ce_fwd_kernel``: per-row ``loss`` (rows,) and ``row_state`` (rows, ROW_STATE), fp32 (fp64 for fp64
    inputs); the gradient into ``grad`` (logits' shape; may be ``logits`` itself) times the 0-d ``grad_scale``
    when ``grad`` is not None. ``logits`` must have a ``class_layout``; ``target`` an ``index_layout`` (class
    indices: the logits' shape without C) or a ``class_layout`` (probabilities: the logits' shape). ``weight`` and
    ``alpha`` (C,) with any stride, 0 included.

    A shard of the classes (vocabulary parallelism): the logits hold classes ``class_offset ..`` of
    ``n_classes``; ``weight`` and ``alpha`` cover all ``n_classes``, a probability target only the shard. With
    ``partial`` the launch writes only the shard's statistics into ``row_state`` (rows, PARTIAL_STATE); ``loss``
    and ``grad`` are untouched (``cross_entropy_finish`` then takes the merged statistics)."""
    n_rows, inner, logit_strides, n_cols, (block_r, block_c, num_warps) = _layout_and_config(logits)
    prob_target = target.is_floating_point()
    _ce_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        logits, target, weight, alpha, grad_scale, loss, row_state, grad,
        n_rows, n_cols, n_cols if n_classes is None else n_classes, class_offset, inner,
        *logit_strides, *_target_layout(target), *(class_layout(grad)[2] if grad is not None else (0, 0, 0)),
        weight.stride(0) if weight is not None else 0, alpha.stride(0) if alpha is not None else 0,
        ignore_index, *split_f64(label_smoothing), *split_f64(focal_gamma), *split_f64(focal_alpha),
        *split_f64(z_loss), *split_f64(softcap or 0.0),
        BLOCK_R=block_r, BLOCK_C=block_c,
        PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0 and not prob_target,
        HAS_SOFTCAP=softcap is not None, HAS_ALPHA=alpha is not None, COMPUTE_GRAD=grad is not None and not partial,
        PARTIAL=partial, DTYPE=math_dtype(logits, target),
        num_warps=num_warps,
    )


@custom_launcher("cross_entropy_finish", mutates_args=("loss", "row_state"))
def cross_entropy_finish(
    stats: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
    loss: torch.Tensor, row_state: torch.Tensor, *, n_classes: int, ignore_index: int, label_smoothing: float,
    focal_gamma: float, focal_alpha: float, z_loss: float,
) -> None:
    """Launch ``_ce_finish_kernel``: per-row ``loss`` and ``row_state`` from ``stats`` (rows, PARTIAL_STATE), the
    shards' partial statistics merged; ``target`` as for the forward (probability targets only set the mode: their
    terms are in the statistics already)."""
    n_rows = stats.shape[0]
    prob_target = target.is_floating_point()
    target_outer, target_inner = (0, 0) if prob_target else _target_layout(target)[:2]
    inner = 1 if prob_target or target.dim() < 2 else math.prod(target.shape[1:])
    block_r = 128
    _ce_finish_kernel[(triton.cdiv(n_rows, block_r),)](
        stats, target, weight, alpha, loss, row_state,
        n_rows, n_classes, inner,
        target_outer, target_inner, weight.stride(0) if weight is not None else 0,
        alpha.stride(0) if alpha is not None else 0,
        ignore_index, *split_f64(label_smoothing), *split_f64(focal_gamma), *split_f64(focal_alpha),
        *split_f64(z_loss),
        BLOCK_R=block_r, PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0 and not prob_target, HAS_ALPHA=alpha is not None,
        DTYPE=math_dtype(stats), num_warps=4,
    )


@custom_launcher("cross_entropy_backward", mutates_args=("grad", "grad_target"))
def cross_entropy_backward(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], row_state: torch.Tensor,
    grad_scale: torch.Tensor, grad: Optional[torch.Tensor], grad_target: Optional[torch.Tensor], *,
    label_smoothing: float, softcap: Optional[float], n_classes: Optional[int] = None, class_offset: int = 0,
) -> None:
    """Launch ``_ce_bwd_kernel``: ``grad`` (logits' shape) and/or ``grad_target`` (probability targets) from the
    forward's ``row_state``, times ``grad_scale`` (0-d, or one value per row). Layouts and shards as the
    forward's."""
    n_rows, inner, logit_strides, n_cols, (block_r, block_c, num_warps) = _layout_and_config(logits)
    prob_target = target.is_floating_point()
    _ce_bwd_kernel[(triton.cdiv(n_rows, block_r),)](
        logits, target, weight, row_state, grad_scale, grad, grad_target,
        n_rows, n_cols, n_cols if n_classes is None else n_classes, class_offset, inner,
        *logit_strides, *_target_layout(target),
        *(class_layout(grad)[2] if grad is not None else (0, 0, 0)),
        *(class_layout(grad_target)[2] if grad_target is not None else (0, 0, 0)),
        weight.stride(0) if weight is not None else 0, 0 if grad_scale.dim() == 0 else grad_scale.stride(0),
        *split_f64(label_smoothing), *split_f64(softcap or 0.0),
        BLOCK_R=block_r, BLOCK_C=block_c,
        PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0 and not prob_target,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_INPUT_GRAD=grad is not None, COMPUTE_TARGET_GRAD=grad_target is not None,
        DTYPE=math_dtype(logits, target),
        num_warps=num_warps,
    )


def compile_variants():
    """Call the launchers on small CPU tensors, once per variant that matters (for ``bench/compile_report.py``,
    which records the launches instead of running them): at an LLM vocabulary (one row per program, 4096-class
    blocks) no extra, each extra alone and every extra together, fused and two-launch; probability targets; each
    dtype; a small class count (a tile of rows) and a K-dimensional input (class stride not 1); a shard's partial
    statistics and the finish kernel (vocabulary parallelism). Each flag changes the code the others see only
    through register pressure, which the all-together variant bounds."""

    def launch(dtype, n_classes, *, prob=False, weight=False, smoothing=False, softcap=False, alpha=False,
               fused=True, strided=False, partial=False):
        shape = (4, n_classes, 3) if strided else (4, n_classes)
        logits = torch.zeros(shape, dtype=dtype)
        target = torch.zeros(shape, dtype=dtype) if prob else torch.zeros(shape[:1] + shape[2:], dtype=torch.long)
        w = torch.ones(n_classes, dtype=torch.float32) if weight else None
        a = torch.ones(n_classes, dtype=torch.float32) if alpha else None
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        rows = logits.numel() // n_classes
        state = torch.zeros(rows, PARTIAL_STATE if partial else ROW_STATE, dtype=acc)
        vec = torch.zeros(rows, dtype=acc)
        kw = dict(ignore_index=-100, label_smoothing=0.1 if smoothing else 0.0, focal_gamma=2.0, focal_alpha=1.0,
                  z_loss=1e-4)
        cap = 30.0 if softcap else None
        cross_entropy_forward(logits, target, w, a, torch.ones((), dtype=acc), vec, state,
                              torch.zeros_like(logits) if fused else None, softcap=cap, partial=partial, **kw)
        if partial:
            cross_entropy_finish(state, target, w, a, vec, torch.zeros(rows, ROW_STATE, dtype=acc),
                                 n_classes=n_classes, **kw)
        elif not fused:
            for input_grad, target_grad in ((True, False), (False, True), (True, True)):
                if target_grad and not prob:
                    continue
                cross_entropy_backward(logits, target, w, state, vec, torch.zeros_like(logits) if input_grad else None,
                                       torch.zeros_like(target) if target_grad else None,
                                       label_smoothing=kw["label_smoothing"], softcap=cap)

    llm_vocab = 128256
    extras = ("weight", "smoothing", "softcap", "alpha")
    for chosen in [()] + [(extra,) for extra in extras] + [extras]:
        for fused in (True, False):
            launch(torch.bfloat16, llm_vocab, fused=fused, **{extra: True for extra in chosen})
    for weight_and_cap, fused in itertools.product((False, True), repeat=2):
        launch(torch.bfloat16, llm_vocab, prob=True, weight=weight_and_cap, softcap=weight_and_cap, fused=fused)
    for dtype in (torch.float16, torch.float32, torch.float64):
        launch(dtype, llm_vocab, fused=False)
        launch(dtype, llm_vocab, smoothing=True, softcap=True, weight=True, alpha=True)
    for strided, fused in itertools.product((False, True), repeat=2):
        launch(torch.bfloat16, 10, strided=strided, fused=fused)
        launch(torch.bfloat16, 10, strided=strided, fused=fused, smoothing=True, weight=True, softcap=True)
    launch(torch.bfloat16, llm_vocab, partial=True, smoothing=True, weight=True, alpha=True, softcap=True)
    launch(torch.bfloat16, llm_vocab, partial=True, prob=True)
