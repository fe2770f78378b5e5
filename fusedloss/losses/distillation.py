"""Distillation KL on logits, host side: ``kl_div_with_logits``, the temperature-scaled
``T^2 KL(softmax(teacher / T) || softmax(student / T))`` of Hinton et al. (2015), at LLM vocabulary sizes.

The Triton path reads each row of both logits tensors once for the loss and once more for the gradients, without
materializing a softmax, log-softmax or fp32 copy of the logits (formulas in ``fusedloss.kernels.distillation``).
For ``batchmean``/``sum`` the gradients are written by the forward launch and the backward is a no-op when
``grad_output == 1``; for ``none`` the forward stores three scalars per row and the backward reads the logits
once more. The torch path computes the same formulas in row chunks, so its temporaries stay at
``_TORCH_CHUNK_ELEMENTS`` fp32 values instead of several ``(rows, V)`` tensors.
"""

import torch

from .. import _alloc, _checks, _grads
from .._backend import backend

REDUCTIONS = ("none", "batchmean", "sum")
# About 64 MB of fp32 per temporary in the torch path.
_TORCH_CHUNK_ELEMENTS = 1 << 24


def kl_div_with_logits(student_logits, teacher_logits, temperature=1.0, *, target=None, ignore_index=-100,
                       reduction="batchmean"):
    """Distillation loss ``T^2 * KL(softmax(teacher_logits / T) || softmax(student_logits / T))`` per row.

    The ``T^2`` factor keeps the gradient's magnitude independent of the temperature (Hinton et al. 2015). The
    loss equals ``T**2 * torch.nn.functional.kl_div(log_softmax(student / T), log_softmax(teacher / T),
    log_target=True)`` over the non-ignored rows, without the (rows, V) intermediates.

    Args:
        student_logits: ``(..., V)``; float16, bfloat16, float32 or float64.
        teacher_logits: the student's shape, floating point (may differ in dtype, e.g. an fp32 teacher).
        temperature: ``T > 0``.
        target: optional integer tensor of shape ``(...)``: rows where it equals ``ignore_index`` (padding, a
            prompt) contribute neither loss nor gradient. Only compared with ``ignore_index``.
        ignore_index: see ``target``.
        reduction: ``'batchmean'`` (sum over rows divided by the number of non-ignored rows: the mean KL per
            token; NaN when every row is ignored, as cross-entropy) | ``'sum'`` | ``'none'`` (shape ``(...)``,
            0 on ignored rows). torch's ``'mean'`` (divided by ``V`` too) is refused: it is never the intent here.
    Returns the loss in the promoted dtype of the two logits; the gradient of the student and, when it requires
    grad, of the teacher.
    """
    _checks.check_tensor("student_logits", student_logits, floating=True)
    _checks.check_tensor("teacher_logits", teacher_logits, floating=True, device=student_logits.device)
    if student_logits.dim() == 0:
        raise ValueError("student_logits must have at least 1 dimension (V,), got a 0-d tensor")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have the student's shape {tuple(student_logits.shape)}, got "
                         f"{tuple(teacher_logits.shape)}")
    temperature = _checks.check_number("temperature", temperature, low=0.0, low_open=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if target is not None:
        _checks.check_tensor("target", target, floating=False, device=student_logits.device)
        if target.shape != student_logits.shape[:-1]:
            raise ValueError(f"target must have shape {tuple(student_logits.shape[:-1])} (the logits' without V), "
                             f"got {tuple(target.shape)}")
    if reduction == "mean":
        raise ValueError("reduction='mean' would divide by the vocabulary size too; use 'batchmean' (the mean KL "
                         "per row), 'sum' or 'none'")
    _checks.check_reduction(reduction, REDUCTIONS)
    opts = {"temperature": temperature, "ignore_index": ignore_index, "reduction": reduction,
            "shape": student_logits.shape}
    if backend(student_logits.device) == "torch" or student_logits.numel() == 0:
        return _DistillationTorch.apply(student_logits, teacher_logits, target, opts)
    return _DistillationTriton.apply(student_logits, teacher_logits, target, opts)


def _rows(logits):
    """(rows, V) with class stride 1: a view when the layout allows one, else a contiguous copy."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _denominator(target, n_rows, opts, dtype, device):
    """What ``batchmean`` divides by, as a 0-d device tensor (no host sync); 1 for ``sum``."""
    if opts["reduction"] != "batchmean":
        return torch.ones((), dtype=dtype, device=device)
    if target is None:
        return torch.full((), float(n_rows), dtype=dtype, device=device)
    return (target != opts["ignore_index"]).sum().to(dtype)


def _finish(rows, denominator, opts, out_dtype):
    if opts["reduction"] == "none":
        return rows.reshape(opts["shape"][:-1]).to(out_dtype)
    return (rows.sum() / denominator).to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (compiled or interpreted)


class _DistillationTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, target, opts):
        from ..kernels.distillation import distillation_forward

        student, teacher = _rows(student_logits), _rows(teacher_logits)
        flat_target = None if target is None else target.reshape(-1)
        n_rows = student.shape[0]
        device = student.device
        dtype = _compute_dtype(student, teacher)
        out_dtype = torch.promote_types(student.dtype, teacher.dtype)
        needs = ctx.needs_input_grad[:2]
        kernel_opts = {"temperature": opts["temperature"], "ignore_index": opts["ignore_index"]}
        rows = _alloc.empty(n_rows, dtype=dtype, device=device)
        denominator = _denominator(flat_target, n_rows, opts, dtype, device)
        ctx.fused = opts["reduction"] != "none"
        if not ctx.fused:
            stats = _alloc.empty((n_rows, 3), dtype=dtype, device=device) if any(needs) else None
            distillation_forward(student, teacher, flat_target, None, rows, stats, None, None, **kernel_opts)
            if stats is not None:
                ctx.kernel_opts = kernel_opts
                ctx.save_for_backward(student, teacher, flat_target, stats)
            return _finish(rows, denominator, opts, out_dtype)
        grad_scale = torch.where(denominator > 0, 1.0 / denominator, torch.zeros_like(denominator))
        grads = [_alloc.empty(t.shape, dtype=t.dtype, device=device) if need else None
                 for t, need in zip((student, teacher), needs)]
        distillation_forward(student, teacher, flat_target, grad_scale, rows, None, *grads, **kernel_opts)
        ctx.grads = [None if g is None else g.reshape(opts["shape"]) for g in grads]
        return _finish(rows, denominator, opts, out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        from ..kernels.distillation import distillation_backward

        if ctx.fused:
            grads, ctx.grads = _grads.scale_fused_grads(ctx.grads, grad_output), None
            return (*grads, None, None)
        student, teacher, target, stats = ctx.saved_tensors
        grads = [_alloc.empty(t.shape, dtype=t.dtype, device=t.device) if need else None
                 for t, need in zip((student, teacher), ctx.needs_input_grad[:2])]
        distillation_backward(student, teacher, target, stats, grad_output.reshape(-1).contiguous(), *grads,
                              **ctx.kernel_opts)
        shape = grad_output.shape + student.shape[-1:]
        return (*(None if g is None else g.reshape(shape) for g in grads), None, None)


# ---------------------------------------------------------------------------------------------------------------
# Torch backend: the kernel's per-row formulas, a chunk of rows at a time.


def _chunk_terms(student, teacher, valid, temperature, dtype):
    """Per-row KL and the (log q, log p, p) it came from, for a chunk of rows, in ``dtype``."""
    log_q = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.to(dtype) / temperature, dim=-1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    return torch.where(valid, kl, torch.zeros_like(kl)), log_q, log_p, p


def _chunk_grads(log_q, log_p, p, kl, coef, needs):
    """(dloss/dstudent, dloss/dteacher) of a chunk, ``coef`` = grad_scale * T per row (0 on ignored rows)."""
    coef = coef[:, None]
    grad_student = coef * (log_q.exp() - p) if needs[0] else None
    grad_teacher = coef * torch.where(p > 0, p * (log_p - log_q - kl[:, None]), torch.zeros_like(p)) \
        if needs[1] else None
    return grad_student, grad_teacher


def _chunks(n_rows, n_classes):
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(n_classes, 1))
    return [slice(start, start + step) for start in range(0, n_rows, step)]


class _DistillationTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, target, opts):
        student, teacher = _rows(student_logits), _rows(teacher_logits)
        n_rows, n_classes = student.shape
        dtype = _compute_dtype(student, teacher)
        valid = torch.ones(n_rows, dtype=torch.bool, device=student.device) if target is None else \
            target.reshape(-1) != opts["ignore_index"]
        temperature = opts["temperature"]
        denominator = _denominator(None if target is None else target.reshape(-1), n_rows, opts, dtype,
                                   student.device)
        ctx.fused = opts["reduction"] != "none"
        needs = ctx.needs_input_grad[:2]
        grad_scale = torch.where(denominator > 0, 1.0 / denominator, torch.zeros_like(denominator))
        kl_rows, grads = [], ([], [])
        for rows in _chunks(n_rows, n_classes):
            kl, log_q, log_p, p = _chunk_terms(student[rows], teacher[rows], valid[rows], temperature, dtype)
            kl_rows.append(kl)
            if ctx.fused and any(needs):
                coef = torch.where(valid[rows], grad_scale * temperature, torch.zeros_like(kl))
                for out, g, t in zip(grads, _chunk_grads(log_q, log_p, p, kl, coef, needs), (student, teacher)):
                    if g is not None:
                        out.append(g.to(t.dtype))
        kl = torch.cat(kl_rows)
        out_dtype = torch.promote_types(student.dtype, teacher.dtype)
        if ctx.fused:
            ctx.grads = [torch.cat(g).reshape(opts["shape"]) if g else None for g in grads]
        else:
            ctx.opts = opts
            ctx.save_for_backward(student, teacher, valid)
        return _finish(temperature * temperature * kl, denominator, opts, out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.fused:
            return (*(None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads), None, None)
        student, teacher, valid = ctx.saved_tensors
        temperature = ctx.opts["temperature"]
        dtype = _compute_dtype(student, teacher)
        scale = grad_output.reshape(-1).to(dtype)
        needs = ctx.needs_input_grad[:2]
        grads = ([], [])
        for rows in _chunks(*student.shape):
            kl, log_q, log_p, p = _chunk_terms(student[rows], teacher[rows], valid[rows], temperature, dtype)
            coef = torch.where(valid[rows], scale[rows] * temperature, torch.zeros_like(kl))
            for out, g, t in zip(grads, _chunk_grads(log_q, log_p, p, kl, coef, needs), (student, teacher)):
                if g is not None:
                    out.append(g.to(t.dtype))
        shape = ctx.opts["shape"]
        return (*(torch.cat(g).reshape(shape) if g else None for g in grads), None, None)
