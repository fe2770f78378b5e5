"""Knowledge-distillation KL on logits (Hinton et al. 2015), fused: per row, the student and teacher logits are read
once for the loss (online log-sum-exps of both) and once more, in reverse block order, for the gradients.

With temperature ``T``, ``s = student / T``, ``t = teacher / T``, ``q = softmax(s)``, ``p = softmax(t)``::

    loss = T^2 KL(p || q) = T^2 sum_c p_c (log p_c - log q_c)
         = T^2 (W / Z_t - (lse_t - lse_s)),    W = sum_c exp(t_c - m_t) (t_c - s_c),  Z_t = sum_c exp(t_c - m_t)

``W`` is carried through the vocabulary blocks like ``Z_t``: rescaled by ``exp(m_old - m_new)`` when the running
teacher max moves, so a row needs no logits buffer at any vocabulary size. Terms with ``p_c = 0`` are 0 (the
``0 log 0`` convention, also where the student's logit is ``-inf``); a student ``-inf`` where the teacher has mass
makes the row's loss ``inf``; a NaN or ``+inf`` logit makes the row NaN (a NaN ``p_c`` counts as mass, and
``exp(inf - inf)`` is NaN), as torch's ``log_softmax`` composition gives it.

Gradients (``dq_k/ds_c = q_k ([k = c] - q_c)``, ``ds/dstudent = 1 / T``)::

    dloss/dstudent_c = T (q_c - p_c)
    dloss/dteacher_c = T p_c (log p_c - log q_c - KL)      (the derivative of p . (log p - log q) through p)

Bytes per row in the fused mode: read both rows twice (the second read mostly from L2 for the last blocks),
write the student gradient (and the teacher's when it requires grad); no per-row temporaries beyond three
scalars. Rows whose ``target`` (any integer dtype, compared in int64) equals ``ignore_index`` are not read:
loss 0 and zero gradient.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import join_f64, math_dtype, online_logsumexp_update, split_f64, to_element_type
from ._launch import custom_launcher
from .configs import distillation_config


@triton.jit
def _valid_rows(target_ptr, rows, row_mask, stride_target, ignore_index, HAS_TARGET: tl.constexpr):
    if HAS_TARGET:
        target = tl.load(target_ptr + rows * stride_target, mask=row_mask, other=ignore_index)
        return row_mask & (target.to(tl.int64) != ignore_index)
    return row_mask


@triton.jit
def _load_scaled(row_ptrs, cols, mask, inv_temp, DTYPE: tl.constexpr):
    """A [BLOCK_R, BLOCK_V] tile of logits / T in the compute dtype, from each row's first-class pointer; 0 on
    padded lanes, so that differences there stay finite (the log-sum-exp pass masks them to -inf itself)."""
    return tl.load(row_ptrs[:, None] + cols[None, :], mask=mask, other=0.0).to(DTYPE) * inv_temp


@triton.jit
def _distillation_grad_pass(
    student_rows, teacher_rows, grad_student_ptr, grad_teacher_ptr, grad_student_base, grad_teacher_base,
    row_mask, lse_student, lse_teacher, kl, coef, inv_temp, n_classes,
    BLOCK_V: tl.constexpr, COMPUTE_STUDENT_GRAD: tl.constexpr, COMPUTE_TEACHER_GRAD: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """The gradients of a [BLOCK_R] group of rows (``*_rows``: pointers to each row's first logit;
    ``grad_*_base``: each row's offset in the gradient), ``coef`` (= grad_scale * T, 0 on ignored rows) times the
    formulas of the module docstring. Blocks go last-to-first: the ones pass 1 read last are still in L2."""
    num_blocks = tl.cdiv(n_classes, BLOCK_V)
    for i in range(0, num_blocks):
        cols = (num_blocks - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < n_classes)[None, :]
        log_q = _load_scaled(student_rows, cols, mask, inv_temp, DTYPE) - lse_student[:, None]
        log_p = _load_scaled(teacher_rows, cols, mask, inv_temp, DTYPE) - lse_teacher[:, None]
        p = tl.exp(log_p)
        if COMPUTE_STUDENT_GRAD:
            g = coef[:, None] * (tl.exp(log_q) - p)
            tl.store(grad_student_ptr + grad_student_base[:, None] + cols[None, :],
                     to_element_type(g, grad_student_ptr), mask=mask)
        if COMPUTE_TEACHER_GRAD:
            mass = p != 0.0  # as in pass 1: 0 where p_c = 0, without forming -inf - -inf; NaN counts
            log_ratio = tl.where(mass, log_p, 0.0) - tl.where(mass, log_q, 0.0)
            g = coef[:, None] * tl.where(mass, p * (log_ratio - kl[:, None]), 0.0)
            tl.store(grad_teacher_ptr + grad_teacher_base[:, None] + cols[None, :],
                     to_element_type(g, grad_teacher_ptr), mask=mask)


@triton.jit
def _distillation_fwd_kernel(
    # pointers
    student_ptr, teacher_ptr, target_ptr, grad_scale_ptr,
    loss_ptr, stats_ptr, grad_student_ptr, grad_teacher_ptr,
    # shapes
    n_rows, n_classes,
    # strides (in elements; the class stride is 1)
    stride_student_row, stride_teacher_row, stride_grad_student_row, stride_grad_teacher_row, stride_target,
    # constants
    ignore_index, temp_hi, temp_lo,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, HAS_TARGET: tl.constexpr, STORE_STATS: tl.constexpr,
    COMPUTE_STUDENT_GRAD: tl.constexpr, COMPUTE_TEACHER_GRAD: tl.constexpr, DTYPE: tl.constexpr,
):
    """Per-row ``T^2 KL`` (0 on ignored rows); with ``STORE_STATS`` the row's (lse_student, lse_teacher, KL) for
    ``_distillation_bwd_kernel``; with ``COMPUTE_*_GRAD`` the gradients times the 0-d ``grad_scale``."""
    temp = join_f64(temp_hi, temp_lo, DTYPE)
    inv_temp = 1.0 / temp
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    valid = _valid_rows(target_ptr, rows, row_mask, stride_target, ignore_index, HAS_TARGET)
    student_rows = student_ptr + rows * stride_student_row
    teacher_rows = teacher_ptr + rows * stride_teacher_row

    m_student = tl.full([BLOCK_R], float("-inf"), DTYPE)
    z_student = tl.zeros([BLOCK_R], DTYPE)
    m_teacher = tl.full([BLOCK_R], float("-inf"), DTYPE)
    z_teacher = tl.zeros([BLOCK_R], DTYPE)
    cross = tl.zeros([BLOCK_R], DTYPE)  # W: sum_c exp(t_c - m_teacher) (t_c - s_c)
    for start in range(0, n_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = valid[:, None] & (cols < n_classes)[None, :]
        s = _load_scaled(student_rows, cols, mask, inv_temp, DTYPE)
        t = _load_scaled(teacher_rows, cols, mask, inv_temp, DTYPE)
        m_student, z_student, _ = online_logsumexp_update(m_student, z_student, tl.where(mask, s, float("-inf")), 1)
        m_old = m_teacher
        t_masked = tl.where(mask, t, float("-inf"))
        m_teacher, z_teacher, shift = online_logsumexp_update(m_teacher, z_teacher, t_masked, 1)
        e = tl.exp(t_masked - shift[:, None])
        # Where the teacher has no mass (padding, or a -inf logit) the term is 0, without forming -inf - -inf; a NaN
        # counts as mass, so that it reaches the loss.
        mass = e != 0.0
        cross = cross * tl.exp(m_old - shift) + tl.sum(e * (tl.where(mass, t, 0.0) - tl.where(mass, s, 0.0)), axis=1)
    # Ignored rows read nothing (their masks are all false): give them finite stats, loss 0.
    lse_student = tl.where(valid, m_student + tl.log(tl.where(valid, z_student, 1.0)), 0.0)
    lse_teacher = tl.where(valid, m_teacher + tl.log(tl.where(valid, z_teacher, 1.0)), 0.0)
    kl = tl.where(valid, cross / tl.where(valid, z_teacher, 1.0) - (lse_teacher - lse_student), 0.0)
    tl.store(loss_ptr + rows, (temp * temp * kl).to(loss_ptr.dtype.element_ty), mask=row_mask)
    if STORE_STATS:
        tl.store(stats_ptr + rows * 3 + 0, lse_student, mask=row_mask)
        tl.store(stats_ptr + rows * 3 + 1, lse_teacher, mask=row_mask)
        tl.store(stats_ptr + rows * 3 + 2, kl, mask=row_mask)
    if COMPUTE_STUDENT_GRAD or COMPUTE_TEACHER_GRAD:
        coef = tl.where(valid, tl.load(grad_scale_ptr).to(DTYPE) * temp, 0.0)
        _distillation_grad_pass(
            student_rows, teacher_rows, grad_student_ptr, grad_teacher_ptr,
            rows * stride_grad_student_row, rows * stride_grad_teacher_row,
            row_mask, lse_student, lse_teacher, kl, coef, inv_temp, n_classes,
            BLOCK_V, COMPUTE_STUDENT_GRAD, COMPUTE_TEACHER_GRAD, DTYPE,
        )


@triton.jit
def _distillation_bwd_kernel(
    # pointers
    student_ptr, teacher_ptr, target_ptr, stats_ptr, grad_scale_ptr,
    grad_student_ptr, grad_teacher_ptr,
    # shapes
    n_rows, n_classes,
    # strides (in elements; the class stride is 1)
    stride_student_row, stride_teacher_row, stride_grad_student_row, stride_grad_teacher_row, stride_target,
    # constants
    ignore_index, temp_hi, temp_lo,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, HAS_TARGET: tl.constexpr,
    COMPUTE_STUDENT_GRAD: tl.constexpr, COMPUTE_TEACHER_GRAD: tl.constexpr, DTYPE: tl.constexpr,
):
    """The gradients from the forward's per-row stats, times the per-row ``grad_scale`` (``reduction='none'``)."""
    temp = join_f64(temp_hi, temp_lo, DTYPE)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    valid = _valid_rows(target_ptr, rows, row_mask, stride_target, ignore_index, HAS_TARGET)
    lse_student = tl.load(stats_ptr + rows * 3 + 0, mask=row_mask, other=0.0)
    lse_teacher = tl.load(stats_ptr + rows * 3 + 1, mask=row_mask, other=0.0)
    kl = tl.load(stats_ptr + rows * 3 + 2, mask=row_mask, other=0.0)
    scale = tl.load(grad_scale_ptr + rows, mask=row_mask, other=0.0).to(DTYPE)
    _distillation_grad_pass(
        student_ptr + rows * stride_student_row, teacher_ptr + rows * stride_teacher_row,
        grad_student_ptr, grad_teacher_ptr, rows * stride_grad_student_row, rows * stride_grad_teacher_row,
        row_mask, lse_student, lse_teacher, kl, tl.where(valid, scale * temp, 0.0), 1.0 / temp, n_classes,
        BLOCK_V, COMPUTE_STUDENT_GRAD, COMPUTE_TEACHER_GRAD, DTYPE,
    )


# ---------------------------------------------------------------------------------------------------------------
# Launchers: derive every constexpr flag from the arguments, and write into caller-allocated outputs.


def _common_args(student, teacher, target, grad_student, grad_teacher):
    """(grid, shapes + strides, constexprs, num_warps) shared by both kernels, for (rows, V) tensors with
    class stride 1 and a (rows,) target or None."""
    n_rows, n_classes = student.shape
    wide = student if student.dtype.itemsize >= teacher.dtype.itemsize else teacher
    block_r, block_v, num_warps = distillation_config(n_classes, wide.dtype)
    grid = (triton.cdiv(n_rows, block_r),)
    args = (n_rows, n_classes, student.stride(0), teacher.stride(0),
            0 if grad_student is None else grad_student.stride(0),
            0 if grad_teacher is None else grad_teacher.stride(0),
            0 if target is None else target.stride(0))
    flags = {"BLOCK_R": block_r, "BLOCK_V": block_v, "HAS_TARGET": target is not None,
             "COMPUTE_STUDENT_GRAD": grad_student is not None, "COMPUTE_TEACHER_GRAD": grad_teacher is not None,
             "DTYPE": math_dtype(wide)}
    return grid, args, flags, num_warps


@custom_launcher("distillation_forward", mutates_args=("loss", "stats", "grad_student", "grad_teacher"))
def distillation_forward(
    student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor],
    loss: torch.Tensor, stats: Optional[torch.Tensor], grad_student: Optional[torch.Tensor],
    grad_teacher: Optional[torch.Tensor], *, temperature: float, ignore_index: int,
) -> None:
    """Launch ``_distillation_fwd_kernel`` on (rows, V) logits with class stride 1 (any row stride, 0 included)
    and a (rows,) target of any integer dtype and stride, or None: per-row ``loss`` (rows,), optional ``stats``
    (rows, 3) in the compute dtype, and the gradients (contiguous (rows, V), or None) times the 0-d
    ``grad_scale``."""
    grid, args, flags, num_warps = _common_args(student, teacher, target, grad_student, grad_teacher)
    _distillation_fwd_kernel[grid](
        student, teacher, target, grad_scale,
        loss, stats, grad_student, grad_teacher,
        *args, ignore_index, *split_f64(temperature),
        STORE_STATS=stats is not None, **flags,
        num_warps=num_warps,
    )


@custom_launcher("distillation_backward", mutates_args=("grad_student", "grad_teacher"))
def distillation_backward(
    student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor], stats: torch.Tensor,
    grad_scale: torch.Tensor, grad_student: Optional[torch.Tensor], grad_teacher: Optional[torch.Tensor], *,
    temperature: float, ignore_index: int,
) -> None:
    """Launch ``_distillation_bwd_kernel``: the gradients times the contiguous per-row ``grad_scale`` (rows,)."""
    grid, args, flags, num_warps = _common_args(student, teacher, target, grad_student, grad_teacher)
    _distillation_bwd_kernel[grid](
        student, teacher, target, stats, grad_scale,
        grad_student, grad_teacher,
        *args, ignore_index, *split_f64(temperature),
        **flags,
        num_warps=num_warps,
    )


def compile_variants():
    """Call the launchers once per constexpr combination the host produces, on small CPU tensors (for
    ``bench/compile_report.py``, which records the launches instead of running them): the loss alone (no
    gradient wanted), the fused forward (gradients and the row stats for a later recompute), the forward of
    ``'none'`` (stats only) and the backward from the stats."""

    def launch(dtype, n_classes, *, target=True, mode="fused", grads=(True, False), teacher_dtype=None):
        student = torch.zeros(4, n_classes, dtype=dtype)
        teacher = torch.zeros(4, n_classes, dtype=teacher_dtype or dtype)
        acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
        labels = torch.zeros(4, dtype=torch.long) if target else None
        rows = torch.zeros(4, dtype=acc)
        stats = torch.zeros(4, 3, dtype=acc) if mode != "loss" else None
        grad_student = torch.zeros_like(student) if grads[0] else None
        grad_teacher = torch.zeros_like(teacher) if grads[1] else None
        fused = mode == "fused"
        distillation_forward(student, teacher, labels, torch.ones((), dtype=acc) if fused else None, rows, stats,
                             grad_student if fused else None, grad_teacher if fused else None,
                             temperature=2.0, ignore_index=-100)
        if mode == "stats":
            distillation_backward(student, teacher, labels, stats, rows, grad_student, grad_teacher,
                                  temperature=2.0, ignore_index=-100)

    for target in (False, True):
        for mode in ("fused", "stats", "loss"):
            for grads in ((True, False), (True, True), (False, True)):
                if mode == "loss" and grads != (True, False):
                    continue
                launch(torch.bfloat16, 262144, target=target, mode=mode, grads=grads)
    launch(torch.bfloat16, 262144, teacher_dtype=torch.float32)
    for dtype in (torch.float16, torch.float32, torch.float64):
        launch(dtype, 262144)
    launch(torch.bfloat16, 10)
    launch(torch.bfloat16, 10, mode="stats")
