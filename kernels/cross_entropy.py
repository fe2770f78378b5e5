"""Cross-entropy family kernels: softmax cross-entropy with label smoothing, focal weighting, z-loss and logit
soft-capping, for class-index and class-probability targets.

Every problem is seen as ``rows x classes``: row ``r`` of an ``(N, C, d1, ..., dk)`` input is
``(r // inner, :, r % inner)`` with ``inner = d1 * ... * dk``, so K-dimensional inputs need no transpose copy.

Per row, with ``x`` the (soft-capped) logits, ``lse = logsumexp(x)``, ``a_c`` the smoothing / soft-target
coefficients and ``B = sum_c a_c``:

    ce     = (1 - eps) * w_y * (lse - x_y) + eps / C * (B * lse - sum_c a_c x_c)   class-index target
    ce     = B * lse - sum_c a_c x_c,  a_c = ((1 - eps) t_c + eps / C) * w_c        probability target
    loss   = alpha_y * (1 - p_y) ** gamma * ce + z * lse ** 2,      p_y = exp(x_y - lse)

and the gradient with respect to ``x_c`` collapses to four per-row coefficients (``p_c = exp(x_c - lse)``):

    dloss/dx_c = p_c * (K1 + [c != y] * Kf) - a_c * K3 - [c == y] * Ky

    K1 = alpha F ((1 - eps) w_y + eps / C * B) + 2 z lse,     F = (1 - p_y) ** gamma
    Kf = alpha ce gamma p_y F / (1 - p_y)                     focal term, c != y
    Ky = alpha F (1 - eps) w_y + alpha ce gamma p_y F         one-hot term (focal part exact at c == y)
    K3 = alpha F eps / C                                      (1 for probability targets)

The focal derivative ``gamma (1 - p_y) ** (gamma - 1) p_y (p_c - [c == y])`` is written as ``F * p_c / (1 - p_y)``
for c != y, where ``p_c <= 1 - p_y`` keeps the ratio in [0, 1], and as the exact ``-gamma p_y F`` at c == y: both
stay finite for ``0 < gamma < 1`` at saturated predictions, where the naive ``(1 - p_y) ** (gamma - 1)`` is inf.
``1 - p_y`` is ``-expm1(x_y - lse)``, accurate when p_y is close to 1.

Two launch modes share one pass-2 helper:
- fused (``COMPUTE_GRAD``): one launch reads each row in pass 1 (online max / sum-exp), then again in pass 2 to
  write the gradient, already scaled by the reduction's ``1 / denominator`` on the device; the backward is then
  a no-op when ``grad_output == 1``. Pass 2 visits the blocks in reverse, so its first reads are the blocks pass
  1 read last; at LLM vocabularies most of pass 2 still comes from HBM (3 bytes moved per 2 counted).
- two launches (``STORE_COEFS``): the forward stores ``lse`` and (K1, Kf, Ky, K3) per row; the backward kernel reads the
  logits once more and scales by a per-row ``grad_output`` (``reduction='none'``) or writes the gradient of
  probability targets as well.
"""

import torch
import triton
import triton.language as tl

from ._common import expm1, join_f64, pow_nonneg, soft_cap, split_f64
from .configs import cross_entropy_config


@triton.jit
def _row_offsets(rows, inner, stride_outer, stride_inner):
    """Element offset of each row's first class, in 64 bits (rows * stride passes 2^31 at LLM sizes)."""
    rows = rows.to(tl.int64)
    return (rows // inner) * stride_outer + (rows % inner) * stride_inner


@triton.jit
def _load_logits(logits_ptr, offs, mask, softcap, HAS_SOFTCAP: tl.constexpr, DTYPE: tl.constexpr):
    """Load a tile of logits in the compute dtype, soft-capped, padded lanes set to -inf after the cap."""
    x = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(DTYPE)
    dcap = x  # unused unless HAS_SOFTCAP
    if HAS_SOFTCAP:
        x, dcap = soft_cap(x, softcap)
    return tl.where(mask, x, float("-inf")), dcap


@triton.jit
def _smoothing_coef(target_ptr, weight_ptr, cols, t_offs, mask, eps, n_classes,
                    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, DTYPE: tl.constexpr):
    """a_c: the weight of class c in the smoothed / soft-target term (see the module docstring)."""
    if PROB_TARGET:
        t = tl.load(target_ptr + t_offs, mask=mask, other=0.0).to(DTYPE)
        a = (1.0 - eps) * t + eps / n_classes
    else:
        a = tl.zeros(cols.shape, DTYPE) + 1.0
    if HAS_WEIGHT:
        a = a * tl.load(weight_ptr + cols, mask=cols < n_classes, other=0.0).to(DTYPE)
    return tl.where(mask, a, 0.0)


@triton.jit
def _row_loss_and_coefs(lse, x_y, smooth, coef_sum, w_y, alpha, valid, in_range, eps, gamma, z, n_classes,
                        HAS_SMOOTHING: tl.constexpr):
    """Per-row loss and gradient coefficients (K1, Kf, Ky, K3) of a class-index target (derivation in
    the module docstring). ``smooth`` is sum_c a_c (lse - x_c), ``coef_sum`` sum_c a_c, ``w_y`` the target
    class's weight, ``alpha`` the focal multiplier. Ignored rows give 0 everywhere; an out-of-range class index
    gives a NaN loss and K1 instead of an out-of-bounds read."""
    log_p_y = x_y - lse
    ce = (1.0 - eps) * w_y * (-log_p_y)
    if HAS_SMOOTHING:
        ce += eps / n_classes * smooth
    p_y = tl.exp(log_p_y)
    one_minus_p_y = -expm1(log_p_y)
    focal = pow_nonneg(one_minus_p_y, gamma)
    loss = alpha * focal * ce + z * lse * lse
    k1 = alpha * focal * (1.0 - eps) * w_y + 2.0 * z * lse
    if HAS_SMOOTHING:
        k1 += alpha * focal * eps / n_classes * coef_sum
    focal_term = alpha * ce * gamma * p_y * focal
    kf = focal_term * tl.where(one_minus_p_y > 0.0, 1.0 / one_minus_p_y, 0.0)
    ky = alpha * focal * (1.0 - eps) * w_y + focal_term
    k3 = alpha * focal * eps / n_classes
    nan = float("nan")
    loss = tl.where(valid, tl.where(in_range, loss, nan), 0.0)
    k1 = tl.where(valid, tl.where(in_range, k1, nan), 0.0)
    kf = tl.where(valid, kf, 0.0)
    ky = tl.where(valid, ky, 0.0)
    k3 = tl.where(valid, k3, 0.0)
    return loss, k1, kf, ky, k3


@triton.jit
def _store_coefs(coef_ptr, rows, row_mask, k1, kf, ky, k3):
    """The per-row (K1, Kf, Ky, K3) into a (rows, 4) buffer, for a backward that reads the logits once more."""
    coef_offs = rows.to(tl.int64) * 4
    tl.store(coef_ptr + coef_offs + 0, k1, mask=row_mask)
    tl.store(coef_ptr + coef_offs + 1, kf, mask=row_mask)
    tl.store(coef_ptr + coef_offs + 2, ky, mask=row_mask)
    tl.store(coef_ptr + coef_offs + 3, k3, mask=row_mask)


@triton.jit
def _dlogits_from_coefs(p, is_target, k1, kf, ky):
    """p_c (K1 + [c != y] Kf) - [c == y] Ky for a [rows, classes] tile, from per-row coefficient vectors: dloss/dx_c
    but for the smoothing term ``- a_c K3`` and the soft-cap factor, which the caller applies (a_c is 1 here, a
    tile of class weights or soft targets in the cross-entropy kernel)."""
    return p * (k1[:, None] + tl.where(is_target, 0.0, kf[:, None])) - tl.where(is_target, ky[:, None], 0.0)


@triton.jit
def _ce_grad_pass(
    logits_ptr, target_ptr, weight_ptr, grad_ptr, grad_target_ptr,
    logits_base, target_base, grad_base,
    row_mask, y, lse, k1, kf, ky, k3, target_grad_scale,
    n_classes, stride_logits_class, stride_target_class, stride_grad_class, eps, softcap,
    BLOCK_C: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_COEF: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_INPUT_GRAD: tl.constexpr, COMPUTE_TARGET_GRAD: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Pass 2 over a [BLOCK_R] group of rows: dloss/dlogits from the per-row coefficients and, for probability
    targets, dloss/dtarget_c = -(1 - eps) * w_c * log p_c. Blocks are visited last-to-first so that the ones
    pass 1 read most recently are read first, while they are still in L2."""
    num_blocks = tl.cdiv(n_classes, BLOCK_C)
    for i in range(0, num_blocks):
        cols = (num_blocks - 1 - i) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < n_classes)[None, :]
        t_offs = target_base[:, None] + cols[None, :] * stride_target_class
        x, dcap = _load_logits(logits_ptr, logits_base[:, None] + cols[None, :] * stride_logits_class, mask,
                               softcap, HAS_SOFTCAP, DTYPE)
        if COMPUTE_INPUT_GRAD:
            p = tl.exp(x - lse[:, None])
            is_target = cols[None, :] == y[:, None]
            g = _dlogits_from_coefs(p, is_target, k1, kf, ky)
            if HAS_COEF:
                a = _smoothing_coef(target_ptr, weight_ptr, cols[None, :], t_offs, mask, eps, n_classes,
                                    PROB_TARGET, HAS_WEIGHT, DTYPE)
                g -= a * k3[:, None]
            if HAS_SOFTCAP:
                g *= dcap
            g_offs = grad_base[:, None] + cols[None, :] * stride_grad_class
            tl.store(grad_ptr + g_offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_TARGET_GRAD:
            log_p = x - lse[:, None]
            if HAS_WEIGHT:
                log_p *= tl.load(weight_ptr + cols, mask=cols < n_classes, other=0.0).to(DTYPE)[None, :]
            gt = tl.where(mask, -target_grad_scale[:, None] * log_p, 0.0)
            tl.store(grad_target_ptr + t_offs, gt.to(grad_target_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_stats(m, s, b, a, m2, s2, b2, a2):
    """Merge two partial row statistics: (max m, sum exp(x - m), B = sum a_c, A = sum a_c (x_c - m)). Each A is
    relative to its own max, shifted here to the merged one, so B * lse - sum a_c x_c = B (lse - m) - A never
    subtracts two large numbers. A side whose max is still -inf has seen no finite logit and holds s = 0."""
    m_new = tl.maximum(m, m2)
    ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    s_new = s * tl.exp(m - ref) + s2 * tl.exp(m2 - ref)
    a_new = tl.where(m > float("-inf"), a + b * (m - ref), a) + tl.where(m2 > float("-inf"), a2 + b2 * (m2 - ref), a2)
    return m_new, s_new, b + b2, a_new


@triton.jit
def _ce_row_stats(
    logits_ptr, target_ptr, weight_ptr, logits_base, target_base, row_mask, col_start, col_end,
    n_classes, stride_logits_class, stride_target_class, eps, softcap,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_COEF: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DTYPE: tl.constexpr,
):
    """Pass 1 over classes [col_start, col_end) of a [BLOCK_R] group of rows: the statistics ``_merge_stats``
    merges, block by block (one exp per logit)."""
    m = tl.full([BLOCK_R], float("-inf"), DTYPE)
    s = tl.zeros([BLOCK_R], DTYPE)
    b = tl.zeros([BLOCK_R], DTYPE)
    a = tl.zeros([BLOCK_R], DTYPE)
    for start in range(col_start, col_end, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < col_end)[None, :]
        x, _ = _load_logits(logits_ptr, logits_base[:, None] + cols[None, :] * stride_logits_class, mask,
                            softcap, HAS_SOFTCAP, DTYPE)
        block_max = tl.max(x, axis=1)
        ref = tl.where(block_max > float("-inf"), block_max, 0.0)
        block_sumexp = tl.sum(tl.exp(x - ref[:, None]), axis=1)
        if HAS_COEF:
            coef = _smoothing_coef(target_ptr, weight_ptr, cols[None, :],
                                   target_base[:, None] + cols[None, :] * stride_target_class, mask, eps,
                                   n_classes, PROB_TARGET, HAS_WEIGHT, DTYPE)
            block_b = tl.sum(coef, axis=1)
            block_a = tl.sum(tl.where(mask, coef * (x - ref[:, None]), 0.0), axis=1)
        else:
            block_b = tl.zeros([BLOCK_R], DTYPE)
            block_a = tl.zeros([BLOCK_R], DTYPE)
        m, s, b, a = _merge_stats(m, s, b, a, block_max, block_sumexp, block_b, block_a)
    return m, s, b, a


@triton.jit
def _ce_finish(
    logits_ptr, target_ptr, weight_ptr, alpha_ptr, grad_scale_ptr, loss_ptr, lse_ptr, coef_ptr, grad_ptr,
    rows, row_mask, logits_base, target_base, y, valid, in_range, m, s, coef_sum, coef_dot,
    n_classes, inner, stride_logits_class, stride_target_class,
    stride_grad_outer, stride_grad_inner, stride_grad_class,
    eps, gamma, alpha_scalar, z, softcap,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALPHA: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, STORE_COEFS: tl.constexpr, DTYPE: tl.constexpr,
):
    """From a row's merged statistics: its loss, lse, gradient coefficients (module docstring), and with
    COMPUTE_GRAD pass 2, the gradient times ``grad_scale``."""
    HAS_COEF: tl.constexpr = PROB_TARGET or HAS_SMOOTHING
    lse = m + tl.log(s)
    smooth = coef_sum * (lse - m) - coef_dot  # sum_c a_c (lse - x_c)
    if PROB_TARGET:
        ce = smooth
        loss = ce + z * lse * lse
        k1 = coef_sum + 2.0 * z * lse
        kf = tl.zeros([BLOCK_R], DTYPE)
        ky = tl.zeros([BLOCK_R], DTYPE)
        k3 = tl.zeros([BLOCK_R], DTYPE) + 1.0
    else:
        gather = valid & in_range
        x_y, _ = _load_logits(logits_ptr, logits_base + y * stride_logits_class, gather, softcap, HAS_SOFTCAP, DTYPE)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y, mask=gather, other=0.0).to(DTYPE)
        else:
            w_y = tl.zeros([BLOCK_R], DTYPE) + 1.0
        if HAS_ALPHA:
            alpha = tl.load(alpha_ptr + y, mask=gather, other=0.0).to(DTYPE)
        else:
            alpha = tl.zeros([BLOCK_R], DTYPE) + alpha_scalar
        loss, k1, kf, ky, k3 = _row_loss_and_coefs(lse, x_y, smooth, coef_sum, w_y, alpha, valid, in_range,
                                                   eps, gamma, z, n_classes, HAS_SMOOTHING)

    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)
    tl.store(lse_ptr + rows, lse.to(lse_ptr.dtype.element_ty), mask=row_mask)
    if STORE_COEFS:
        _store_coefs(coef_ptr, rows, row_mask, k1, kf, ky, k3)
    if COMPUTE_GRAD:
        scale = tl.load(grad_scale_ptr).to(DTYPE)
        grad_base = _row_offsets(rows, inner, stride_grad_outer, stride_grad_inner)
        _ce_grad_pass(
            logits_ptr, target_ptr, weight_ptr, grad_ptr, grad_ptr,
            logits_base, target_base, grad_base,
            row_mask, y, lse, k1 * scale, kf * scale, ky * scale, k3 * scale, scale,
            n_classes, stride_logits_class, stride_target_class, stride_grad_class, eps, softcap,
            BLOCK_C, PROB_TARGET, HAS_WEIGHT, HAS_COEF, HAS_SOFTCAP, True, False, DTYPE,
        )


@triton.jit
def _ce_fwd_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, alpha_ptr, grad_scale_ptr,
    loss_ptr, lse_ptr, coef_ptr, grad_ptr, partial_ptr, arrivals_ptr,
    # shapes
    n_rows, n_classes, inner, chunk_size, num_chunks,
    # strides (in elements)
    stride_logits_outer, stride_logits_inner, stride_logits_class,
    stride_target_outer, stride_target_inner, stride_target_class,
    stride_grad_outer, stride_grad_inner, stride_grad_class,
    # constants
    ignore_index,
    eps_hi, eps_lo, gamma_hi, gamma_lo, alpha_hi, alpha_lo, z_hi, z_lo, cap_hi, cap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALPHA: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, STORE_COEFS: tl.constexpr, DTYPE: tl.constexpr,
):
    """Per-row loss and log-sum-exp; with COMPUTE_GRAD the gradient (times ``grad_scale``) in the same launch,
    with STORE_COEFS the per-row gradient coefficients for ``_ce_bwd_kernel``.

    SPLIT (few rows of a large vocabulary, BLOCK_R == 1): program ``pid`` reads chunk ``pid % num_chunks`` of
    row ``pid // num_chunks`` once, publishes its partial statistics, and counts itself in ``arrivals[row]``; the
    last program of a row to arrive merges the partials and runs pass 2 over the whole row. This spreads a few
    rows over the whole GPU. It was designed to serve pass 2 from L2 as well, but at 16384 rows on an H100 it was
    no faster than one program per row (``configs.CE_LARGE_VOCAB``), so it runs only for few rows. No program
    waits on another, so the schedule cannot deadlock, and the interpreter (which runs programs one by one) runs
    it too.
    """
    eps = join_f64(eps_hi, eps_lo, DTYPE)
    gamma = join_f64(gamma_hi, gamma_lo, DTYPE)
    alpha = join_f64(alpha_hi, alpha_lo, DTYPE)
    z = join_f64(z_hi, z_lo, DTYPE)
    softcap = join_f64(cap_hi, cap_lo, DTYPE)
    HAS_COEF: tl.constexpr = PROB_TARGET or HAS_SMOOTHING

    if SPLIT:
        row = tl.program_id(0) // num_chunks
        chunk = tl.program_id(0) % num_chunks
        rows = row + tl.arange(0, BLOCK_R)
        col_start = chunk * chunk_size
        col_end = tl.minimum(col_start + chunk_size, n_classes)
    else:
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        col_start = 0
        col_end = n_classes
    row_mask = rows < n_rows
    logits_base = _row_offsets(rows, inner, stride_logits_outer, stride_logits_inner)
    target_base = _row_offsets(rows, inner, stride_target_outer, stride_target_inner)
    if PROB_TARGET:
        y = tl.full([BLOCK_R], -1, tl.int64)
        valid = row_mask
        in_range = row_mask
    else:
        y = tl.load(target_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        valid = row_mask & (y != ignore_index)
        in_range = (y >= 0) & (y < n_classes)

    m, s, coef_sum, coef_dot = _ce_row_stats(
        logits_ptr, target_ptr, weight_ptr, logits_base, target_base, row_mask, col_start, col_end,
        n_classes, stride_logits_class, stride_target_class, eps, softcap,
        BLOCK_R, BLOCK_C, PROB_TARGET, HAS_WEIGHT, HAS_COEF, HAS_SOFTCAP, DTYPE)

    if SPLIT:
        partial_offs = rows.to(tl.int64) * num_chunks * 4
        tl.store(partial_ptr + partial_offs + chunk * 4 + 0, m)
        tl.store(partial_ptr + partial_offs + chunk * 4 + 1, s)
        tl.store(partial_ptr + partial_offs + chunk * 4 + 2, coef_sum)
        tl.store(partial_ptr + partial_offs + chunk * 4 + 3, coef_dot)
        # Every thread's partial stores complete before the release; the acquire orders the last program's
        # reads of the other chunks' partials after their stores (which bypass L1 with .cg).
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + row, 1, sem="acq_rel")
        finisher = arrived == num_chunks - 1
        if finisher:
            tl.debug_barrier()
            m, s, coef_sum, coef_dot = _merge_partials(partial_ptr + partial_offs, num_chunks, BLOCK_R, DTYPE)
    else:
        finisher = True
    if finisher:
        _ce_finish(
            logits_ptr, target_ptr, weight_ptr, alpha_ptr, grad_scale_ptr, loss_ptr, lse_ptr, coef_ptr, grad_ptr,
            rows, row_mask, logits_base, target_base, y, valid, in_range, m, s, coef_sum, coef_dot,
            n_classes, inner, stride_logits_class, stride_target_class,
            stride_grad_outer, stride_grad_inner, stride_grad_class,
            eps, gamma, alpha, z, softcap,
            BLOCK_R, BLOCK_C, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, HAS_ALPHA,
            COMPUTE_GRAD, STORE_COEFS, DTYPE)


@triton.jit
def _merge_partials(row_partials_ptr, num_chunks, BLOCK_R: tl.constexpr, DTYPE: tl.constexpr):
    """Merge a row's per-chunk (max, sumexp, B, A), read past L1 (.cg): other programs wrote them."""
    m = tl.full([BLOCK_R], float("-inf"), DTYPE)
    s = tl.zeros([BLOCK_R], DTYPE)
    b = tl.zeros([BLOCK_R], DTYPE)
    a = tl.zeros([BLOCK_R], DTYPE)
    for k in range(0, num_chunks):
        m, s, b, a = _merge_stats(
            m, s, b, a,
            tl.load(row_partials_ptr + k * 4 + 0, cache_modifier=".cg"),
            tl.load(row_partials_ptr + k * 4 + 1, cache_modifier=".cg"),
            tl.load(row_partials_ptr + k * 4 + 2, cache_modifier=".cg"),
            tl.load(row_partials_ptr + k * 4 + 3, cache_modifier=".cg"))
    return m, s, b, a


@triton.jit
def _ce_bwd_kernel(
    # pointers
    logits_ptr, target_ptr, weight_ptr, lse_ptr, coef_ptr, grad_scale_ptr,
    grad_ptr, grad_target_ptr,
    # shapes
    n_rows, n_classes, inner,
    # strides (in elements; stride_grad_scale is 0 for a scalar grad_output)
    stride_logits_outer, stride_logits_inner, stride_logits_class,
    stride_target_outer, stride_target_inner, stride_target_class,
    stride_grad_outer, stride_grad_inner, stride_grad_class,
    stride_grad_scale,
    # constants
    eps_hi, eps_lo, cap_hi, cap_lo,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_INPUT_GRAD: tl.constexpr, COMPUTE_TARGET_GRAD: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """Gradient of the logits (and of probability targets) from the forward's per-row lse and coefficients,
    scaled per row by ``grad_scale`` (``grad_output``, divided by the denominator for ``mean``)."""
    eps = join_f64(eps_hi, eps_lo, DTYPE)
    softcap = join_f64(cap_hi, cap_lo, DTYPE)
    HAS_COEF: tl.constexpr = PROB_TARGET or HAS_SMOOTHING

    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    logits_base = _row_offsets(rows, inner, stride_logits_outer, stride_logits_inner)
    target_base = _row_offsets(rows, inner, stride_target_outer, stride_target_inner)
    grad_base = _row_offsets(rows, inner, stride_grad_outer, stride_grad_inner)
    if PROB_TARGET:
        y = tl.full([BLOCK_R], -1, tl.int64)
    else:
        y = tl.load(target_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    scale = tl.load(grad_scale_ptr + rows.to(tl.int64) * stride_grad_scale, mask=row_mask, other=0.0).to(DTYPE)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(DTYPE)
    coef_offs = rows.to(tl.int64) * 4
    k1 = tl.load(coef_ptr + coef_offs + 0, mask=row_mask, other=0.0) * scale
    kf = tl.load(coef_ptr + coef_offs + 1, mask=row_mask, other=0.0) * scale
    ky = tl.load(coef_ptr + coef_offs + 2, mask=row_mask, other=0.0) * scale
    k3 = tl.load(coef_ptr + coef_offs + 3, mask=row_mask, other=0.0) * scale
    _ce_grad_pass(
        logits_ptr, target_ptr, weight_ptr, grad_ptr, grad_target_ptr,
        logits_base, target_base, grad_base,
        row_mask, y, lse, k1, kf, ky, k3, (1.0 - eps) * scale,
        n_classes, stride_logits_class, stride_target_class, stride_grad_class, eps, softcap,
        BLOCK_C, PROB_TARGET, HAS_WEIGHT, HAS_COEF, HAS_SOFTCAP, COMPUTE_INPUT_GRAD, COMPUTE_TARGET_GRAD, DTYPE,
    )


# ---------------------------------------------------------------------------------------------------------------
# Launchers: derive every constexpr flag from the arguments, and write into caller-allocated outputs.


def class_layout(t):
    """(rows, inner, (stride_outer, stride_inner, stride_class)) for a (C,), (N, C) or (N, C, d1, ..., dk)
    tensor, or None when d1..dk cannot be walked with one stride (the caller then makes it contiguous)."""
    if t.dim() == 1:
        return 1, 1, (0, 0, t.stride(0))
    if t.dim() == 2:
        return t.shape[0], 1, (t.stride(0), 0, t.stride(1))
    spatial = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    inner = 1
    for size, _ in spatial:
        inner *= size
    # d1..dk walk with one stride when each dim's stride is the next one's times its size (size-1 dims are free).
    inner_stride = spatial[-1][1] if spatial else 0
    expected = inner_stride
    for size, stride in reversed(spatial):
        if stride != expected:
            return None
        expected = stride * size
    return t.shape[0] * inner, inner, (t.stride(0), inner_stride, t.stride(1))


def _dtype_of(*tensors):
    return tl.float64 if any(t is not None and t.dtype.is_floating_point and t.itemsize == 8
                             for t in tensors) else tl.float32


def cross_entropy_forward(logits, target, weight, alpha, grad_scale, loss, lse, coefs, grad, *,
                          ignore_index, label_smoothing, focal_gamma, focal_alpha, z_loss, softcap):
    """Launch ``_ce_fwd_kernel``: per-row ``loss`` and ``lse`` (fp32, or fp64 for fp64 inputs); ``coefs`` (rows, 4)
    when not None; the gradient into ``grad`` (logits' shape, may be ``logits`` itself) scaled by the 0-d
    ``grad_scale`` when ``grad`` is not None. ``logits`` must satisfy ``class_layout``; class-index targets are
    flat (rows,), probability targets have the logits' shape."""
    n_rows, inner, logit_strides = class_layout(logits)
    n_classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    prob_target = target.is_floating_point()
    target_strides = class_layout(target)[2] if prob_target else (0, 0, 0)
    grad_strides = class_layout(grad)[2] if grad is not None else (0, 0, 0)
    block_r, block_c, num_warps, chunk = cross_entropy_config(n_rows, n_classes, logit_strides[2] == 1)
    split = chunk > 0
    num_chunks = triton.cdiv(n_classes, chunk) if split else 1
    # The split schedule's workspace: (max, sumexp, B, A) per (row, chunk), and one arrival counter per row.
    partials = torch.empty((n_rows, num_chunks, 4), dtype=lse.dtype, device=logits.device) if split else None
    arrivals = torch.zeros(n_rows, dtype=torch.int32, device=logits.device) if split else None
    grid = (n_rows * num_chunks,) if split else (triton.cdiv(n_rows, block_r),)
    _ce_fwd_kernel[grid](
        logits, target, weight, alpha, grad_scale,
        loss, lse, coefs, grad, partials, arrivals,
        n_rows, n_classes, inner, chunk, num_chunks,
        *logit_strides, *target_strides, *grad_strides,
        ignore_index,
        *split_f64(label_smoothing), *split_f64(focal_gamma), *split_f64(focal_alpha), *split_f64(z_loss),
        *split_f64(softcap or 0.0),
        BLOCK_R=block_r, BLOCK_C=block_c, SPLIT=split,
        PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0 and not prob_target,
        HAS_SOFTCAP=softcap is not None, HAS_ALPHA=alpha is not None,
        COMPUTE_GRAD=grad is not None, STORE_COEFS=coefs is not None,
        DTYPE=_dtype_of(logits, target),
        num_warps=num_warps,
    )


def cross_entropy_backward(logits, target, weight, lse, coefs, grad_scale, grad, grad_target, *,
                           label_smoothing, softcap):
    """Launch ``_ce_bwd_kernel``: ``grad`` (logits' shape) and/or ``grad_target`` (probability targets) from the
    forward's ``lse`` and ``coefs``, times ``grad_scale`` (0-d, or one value per row)."""
    n_rows, inner, logit_strides = class_layout(logits)
    n_classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    prob_target = target.is_floating_point()
    target_strides = class_layout(target)[2] if prob_target else (0, 0, 0)
    grad_strides = class_layout(grad)[2] if grad is not None else (0, 0, 0)
    block_r, block_c, num_warps, _ = cross_entropy_config(n_rows, n_classes, logit_strides[2] == 1)
    grid = (triton.cdiv(n_rows, block_r),)
    _ce_bwd_kernel[grid](
        logits, target, weight, lse, coefs, grad_scale,
        grad, grad_target,
        n_rows, n_classes, inner,
        *logit_strides, *target_strides, *grad_strides,
        0 if grad_scale.dim() == 0 else grad_scale.stride(0),
        *split_f64(label_smoothing), *split_f64(softcap or 0.0),
        BLOCK_R=block_r, BLOCK_C=block_c,
        PROB_TARGET=prob_target, HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0 and not prob_target,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_INPUT_GRAD=grad is not None, COMPUTE_TARGET_GRAD=grad_target is not None,
        DTYPE=_dtype_of(logits, target),
        num_warps=num_warps,
    )


def compile_variants():
    """Call the launchers once per constexpr combination they can produce, on small CPU tensors (for
    ``bench/compile_report.py``, which records the launches instead of running them)."""
    import itertools

    import torch

    def launch(dtype, n_classes, *, prob=False, weight=False, smoothing=False, softcap=False, alpha=False,
               mode="fused", strided=False):
        shape = (4, n_classes, 3) if strided else (4, n_classes)
        logits = torch.zeros(shape, dtype=dtype)
        target = torch.zeros(shape, dtype=dtype) if prob else torch.zeros(shape[:1] + shape[2:], dtype=torch.long)
        w = torch.ones(n_classes, dtype=torch.float32) if weight else None
        a = torch.ones(n_classes, dtype=torch.float32) if alpha else None
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        rows = logits.numel() // n_classes
        vec = torch.zeros(rows, dtype=acc)
        coefs = torch.zeros(rows, 4, dtype=acc)
        cap = 30.0 if softcap else None
        eps = 0.1 if smoothing else 0.0
        cross_entropy_forward(
            logits, target.reshape(-1) if not prob else target, w, a, torch.ones((), dtype=acc), vec, vec,
            coefs if mode == "coefs" else None, torch.zeros_like(logits) if mode == "fused" else None,
            ignore_index=-100, label_smoothing=eps, focal_gamma=2.0, focal_alpha=1.0, z_loss=1e-4, softcap=cap)
        if mode == "coefs":
            for input_grad, target_grad in ((True, False), (False, True), (True, True)):
                if target_grad and not prob:
                    continue
                cross_entropy_backward(
                    logits, target.reshape(-1) if not prob else target, w, vec, coefs, vec,
                    torch.zeros_like(logits) if input_grad else None,
                    torch.zeros_like(target) if target_grad else None, label_smoothing=eps, softcap=cap)

    vocab = 20000  # above CE_SPLIT_CHUNK, and 4 rows: the split schedule
    flags = itertools.product((False, True), repeat=4)
    for (weight, smoothing, softcap, alpha), mode in itertools.product(flags, ("fused", "coefs", "none")):
        launch(torch.bfloat16, vocab, weight=weight, smoothing=smoothing, softcap=softcap, alpha=alpha, mode=mode)
    for (weight, softcap), mode in itertools.product(itertools.product((False, True), repeat=2),
                                                     ("fused", "coefs", "none")):
        launch(torch.bfloat16, vocab, prob=True, weight=weight, softcap=softcap, mode=mode)
    for dtype in (torch.float16, torch.float32, torch.float64):
        launch(dtype, vocab, mode="coefs")
    for strided in (False, True):
        launch(torch.bfloat16, 10, strided=strided, mode="coefs")
    for mode in ("fused", "coefs"):
        launch(torch.bfloat16, 4096, mode=mode)  # one program per row, below CE_SPLIT_CHUNK
