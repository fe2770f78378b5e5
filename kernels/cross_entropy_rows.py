"""The cross-entropy row math the cross-entropy family's kernels share (``cross_entropy``, its single-read
schedule, ``linear_cross_entropy``): a row's loss and its gradient from a few per-row statistics.

Per row, with ``x`` the (soft-capped) logits, ``m = max_c x_c``, ``s = sum_c exp(x_c - m)``, ``a_c`` the smoothing /
soft-target coefficients, ``B = sum_c a_c`` and ``A = sum_c a_c (x_c - m)``:

    log p_y = (x_y - m) - log s                    never lse - x_y: at |x| ~ 1e8 in fp32, lse = m + log s rounds
    p_c     = exp((x_c - m) - log s)               to m and both the loss and p would lose log s entirely
    smooth  = sum_c a_c (lse - x_c) = B log s - A
    ce      = -(1 - eps) w_y log p_y + eps / C * smooth      class-index target
    ce      = smooth,  a_c = ((1 - eps) t_c + eps / C) w_c    probability target
    loss    = alpha_y (1 - p_y) ** gamma * ce + z * lse ** 2

and the gradient with respect to ``x_c`` collapses to four per-row coefficients:

    dloss/dx_c = p_c * (K1 + [c != y] * Kf) - a_c * K3 - [c == y] * Ky

    K1 = alpha F ((1 - eps) w_y + eps / C * B) + 2 z lse,     F = (1 - p_y) ** gamma
    Kf = alpha ce gamma p_y F / (1 - p_y)                     focal term, c != y
    Ky = alpha F (1 - eps) w_y + alpha ce gamma p_y F         one-hot term (focal part exact at c == y)
    K3 = alpha F eps / C                                      (1 for probability targets)

The focal derivative ``gamma (1 - p_y) ** (gamma - 1) p_y (p_c - [c == y])`` is written as ``F * p_c / (1 - p_y)``
for c != y, where ``p_c <= 1 - p_y`` keeps the ratio in [0, 1], and as the exact ``-gamma p_y F`` at c == y: both
stay finite for ``0 < gamma < 1`` at saturated predictions, where the naive ``(1 - p_y) ** (gamma - 1)`` is inf.
``1 - p_y`` is ``-expm1(log p_y)``, accurate when p_y is close to 1; ``ce * p_y`` is taken as 0 where ``p_y = 0``
(its limit; a ``-inf`` target logit would otherwise give ``inf * 0``), and the focal terms as 0 when ``gamma = 0``.
"""

import triton
import triton.language as tl

from ._common import expm1, pow_nonneg, soft_cap

# Columns of the per-row state the forward stores: the row max, log of the shifted sum-exp, and K1, Kf, Ky, K3.
ROW_STATE = 6


@triton.jit
def load_logits(row_ptrs, cols, mask, stride_class, softcap, HAS_SOFTCAP: tl.constexpr, DTYPE: tl.constexpr):
    """A [rows, classes] tile of logits in the compute dtype, soft-capped, padded lanes set to -inf after the cap;
    and the cap's derivative (the tile itself without a cap, unused then)."""
    x = tl.load(row_ptrs[:, None] + cols[None, :] * stride_class, mask=mask, other=0.0).to(DTYPE)
    dcap = x
    if HAS_SOFTCAP:
        x, dcap = soft_cap(x, softcap)
    return tl.where(mask, x, float("-inf")), dcap


@triton.jit
def smoothing_coef(target_rows, weight_ptr, cols, mask, col_mask, eps, n_classes, class_offset, stride_target_class,
                   stride_weight, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, DTYPE: tl.constexpr):
    """a_c for a [rows, classes] tile: the weight of class c in the smoothed / soft-target term. ``cols`` are
    this shard's columns, class ``cols + class_offset`` of ``n_classes`` in all (``cross_entropy._ce_fwd_kernel``)."""
    if PROB_TARGET:
        t = tl.load(target_rows[:, None] + cols[None, :] * stride_target_class, mask=mask, other=0.0).to(DTYPE)
        a = (1.0 - eps) * t + eps / n_classes
    else:
        a = tl.zeros(mask.shape, DTYPE) + 1.0
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + (cols + class_offset).to(tl.int64) * stride_weight, mask=col_mask, other=0.0)
        a = a * w.to(DTYPE)[None, :]
    return tl.where(mask, a, 0.0)


@triton.jit
def row_loss_and_coefs(m, log_s, x_y, coef_sum, coef_dot, w_y, alpha, valid, in_range, eps, gamma, z, n_classes,
                       HAS_SMOOTHING: tl.constexpr):
    """Per-row loss and gradient coefficients (K1, Kf, Ky, K3) of a class-index target (module docstring), from
    the row max ``m``, ``log_s``, the target logit, ``coef_sum = B`` and ``coef_dot = A``. Ignored rows give 0
    everywhere; an out-of-range class index gives a NaN loss and K1 instead of an out-of-bounds read."""
    log_p_y = (x_y - m) - log_s
    lse = m + log_s
    ce = (1.0 - eps) * w_y * (-log_p_y)
    if HAS_SMOOTHING:
        ce += eps / n_classes * (coef_sum * log_s - coef_dot)
    p_y = tl.exp(log_p_y)
    one_minus_p_y = -expm1(log_p_y)
    focal = pow_nonneg(one_minus_p_y, gamma)
    loss = alpha * focal * ce + z * lse * lse
    k1 = alpha * focal * (1.0 - eps) * w_y + 2.0 * z * lse
    if HAS_SMOOTHING:
        k1 += alpha * focal * eps / n_classes * coef_sum
    focal_term = tl.where(gamma == 0.0, 0.0, tl.where(p_y > 0.0, alpha * ce * gamma * p_y * focal, 0.0))
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
def store_row_state(state_ptr, rows, row_mask, m, log_s, k1, kf, ky, k3):
    """The per-row (m, log s, K1, Kf, Ky, K3) into a (rows, ROW_STATE) buffer."""
    offs = rows.to(tl.int64) * 6
    tl.store(state_ptr + offs + 0, m, mask=row_mask)
    tl.store(state_ptr + offs + 1, log_s, mask=row_mask)
    tl.store(state_ptr + offs + 2, k1, mask=row_mask)
    tl.store(state_ptr + offs + 3, kf, mask=row_mask)
    tl.store(state_ptr + offs + 4, ky, mask=row_mask)
    tl.store(state_ptr + offs + 5, k3, mask=row_mask)


@triton.jit
def load_row_state(state_ptr, rows, row_mask, scale, DTYPE: tl.constexpr):
    """(m, log s, K1, Kf, Ky, K3) of ``rows``, the coefficients times the per-row ``scale``. A zero coefficient
    stays zero whatever the scale: an ignored row's gradient is 0 even under a NaN or inf ``grad_output``, as
    torch's (it never multiplies that row's zeros)."""
    offs = rows.to(tl.int64) * 6
    m = tl.load(state_ptr + offs + 0, mask=row_mask, other=0.0).to(DTYPE)
    log_s = tl.load(state_ptr + offs + 1, mask=row_mask, other=0.0).to(DTYPE)
    k1 = tl.load(state_ptr + offs + 2, mask=row_mask, other=0.0).to(DTYPE)
    kf = tl.load(state_ptr + offs + 3, mask=row_mask, other=0.0).to(DTYPE)
    ky = tl.load(state_ptr + offs + 4, mask=row_mask, other=0.0).to(DTYPE)
    k3 = tl.load(state_ptr + offs + 5, mask=row_mask, other=0.0).to(DTYPE)
    k1 = tl.where(k1 == 0.0, 0.0, k1 * scale)
    kf = tl.where(kf == 0.0, 0.0, kf * scale)
    ky = tl.where(ky == 0.0, 0.0, ky * scale)
    k3 = tl.where(k3 == 0.0, 0.0, k3 * scale)
    return m, log_s, k1, kf, ky, k3


@triton.jit
def dlogits_from_coefs(p, is_target, k1, kf, ky):
    """p_c (K1 + [c != y] Kf) - [c == y] Ky for a [rows, classes] tile, from per-row coefficient vectors: dloss/dx_c
    but for the smoothing term ``- a_c K3`` and the soft-cap factor, which the caller applies (a_c is 1 here, a
    tile of class weights or soft targets in the cross-entropy kernel)."""
    return p * (k1[:, None] + tl.where(is_target, 0.0, kf[:, None])) - tl.where(is_target, ky[:, None], 0.0)


def one_stride_walk(sizes, strides):
    """The stride that walks dims ``sizes`` in row-major order as one flat dim, or None when there is none (each
    dim's stride must be the next one's times its size; size-1 dims are free). 0 for no elements to walk."""
    dims = [(size, stride) for size, stride in zip(sizes, strides) if size != 1]
    if not dims:
        return 0
    expected = dims[-1][1]
    for size, stride in reversed(dims):
        if stride != expected:
            return None
        expected = stride * size
    return dims[-1][1]
