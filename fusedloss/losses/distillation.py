"""Distillation KL on logits, host side: ``kl_div_with_logits``, the temperature-scaled
``T^2 KL(softmax(teacher / T) || softmax(student / T))`` of Hinton et al. (2015), at LLM vocabulary sizes.

The torch backend is the definition (``_definition``: two ``log_softmax`` and the KL sum, under plain autograd,
with eager torch's ``(rows, V)`` temporaries). The Triton path reads each row of both logits tensors once for the
loss and once more for the gradients, without materializing a softmax, log-softmax or fp32 copy of the logits
(formulas in ``fusedloss.kernels.distillation``). For ``batchmean``/``sum`` the gradients are written by the
forward launch and the backward is a no-op when ``grad_output == 1``; for ``none`` (and a second backward) the
backward reads the logits once more, from three numbers per row the forward stored.
"""

import dataclasses

import torch
import torch.nn.functional as F

from .. import _alloc, _checks, _family

REDUCTIONS = ("none", "batchmean", "sum")


@dataclasses.dataclass(frozen=True)
class DistillationOptions:
    """Everything but the tensors of ``kl_div_with_logits`` (see it for each field)."""

    temperature: float = 1.0
    ignore_index: int = -100
    reduction: str = "batchmean"
    out_dtype: torch.dtype = torch.float32  # the logits' promoted dtype, or fp32 under autocast

    @property
    def row_reduction(self):
        """``reduction`` in ``_family``'s terms: ``batchmean`` is the mean over rows."""
        return "mean" if self.reduction == "batchmean" else self.reduction


def kl_div_with_logits(student_logits, teacher_logits, temperature=1.0, *, target=None, ignore_index=-100,
                       reduction="batchmean"):
    """Distillation loss ``T^2 * KL(softmax(teacher_logits / T) || softmax(student_logits / T))`` per row.

    The ``T^2`` factor keeps the gradient's magnitude independent of the temperature (Hinton et al. 2015). On
    finite logits the loss equals ``T**2 * torch.nn.functional.kl_div(log_softmax(student / T),
    log_softmax(teacher / T), log_target=True)`` over the non-ignored rows, without the (rows, V) intermediates.

    Args:
        student_logits: ``(..., V)``; float16, bfloat16, float32 or float64; any strides.
        teacher_logits: the student's shape, floating point (may differ in dtype, e.g. an fp32 teacher); any
            strides.
        temperature: a finite ``T > 0`` (Python, NumPy or 0-d tensor). ``T = inf`` is refused: every softmax is
            uniform there and ``T^2 KL`` is ``inf * 0`` (torch's composition returns NaN); its limit is a
            different loss, the squared distance between the centred logits divided by ``2 V``.
        target: optional tensor of shape ``(...)``, any integer dtype (compared in int64): rows where it equals
            ``ignore_index`` (padding, a prompt) are not read: loss 0, zero gradient, even for non-finite logits.
        ignore_index: see ``target``.
        reduction: ``'batchmean'`` (sum over rows divided by the number of non-ignored rows: the mean KL per
            token, where torch's ``batchmean`` divides by ``input.size(0)``; NaN when no row is kept, as
            cross-entropy, with a zero gradient) | ``'sum'`` | ``'none'`` (shape ``(...)``, 0 on ignored rows).
            torch's ``'mean'`` (divided by ``V`` too) is refused: it is never the intent here.

    Returns:
        The loss in the promoted dtype of the two logits (fp32 for 16-bit logits under ``torch.autocast``, whose
        fp32 list holds ``kl_div`` and, on CUDA, ``log_softmax``); the gradient of the student and, when it
        requires grad, of the teacher.

    Non-finite logits give what torch's composition above gives (value and gradients), except in one place: a
    class the teacher gives no mass (a ``-inf`` teacher logit, a masked vocabulary) contributes 0 (the KL's
    ``0 log 0 = 0``), where torch's composition forms ``0 * -inf = NaN``; the loss is then torch's composition on
    the unmasked classes. A NaN or ``+inf`` logit makes its row NaN; a ``-inf`` student logit where the teacher
    has mass makes the row's loss ``inf``, as in torch. Empty inputs give torch's answer (``batchmean`` over no
    rows is NaN; zero classes give 0).
    """
    opts = _options(student_logits, teacher_logits, temperature, target, ignore_index, reduction)
    return _family.dispatch(_Distillation, _definition, opts, student_logits, teacher_logits, target,
                            empty=student_logits.numel() == 0)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks: metadata only, on every backend, before any launch.


def _options(student, teacher, temperature, target, ignore_index, reduction):
    _checks.check_tensor("student_logits", student, floating=True)
    _checks.check_tensor("teacher_logits", teacher, floating=True, device=student.device)
    if student.dim() == 0:
        raise ValueError("student_logits must have at least 1 dimension (V,), got a 0-d tensor")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_logits must have the student's shape {tuple(student.shape)}, got "
                         f"{tuple(teacher.shape)}")
    if target is not None:
        _checks.check_tensor("target", target, floating=False, device=student.device)
        if target.shape != student.shape[:-1]:
            raise ValueError(f"target must have shape {tuple(student.shape[:-1])} (the logits' without V), "
                             f"got {tuple(target.shape)}")
    if reduction == "mean":
        raise ValueError("reduction='mean' would divide by the vocabulary size too; use 'batchmean' (the mean KL "
                         "per row), 'sum' or 'none'")
    _checks.check_reduction(reduction, REDUCTIONS)
    return DistillationOptions(
        temperature=_checks.check_number("temperature", temperature, low=0.0, low_open=True, finite=True),
        ignore_index=_checks.check_int("ignore_index", ignore_index),
        reduction=reduction,
        out_dtype=_checks.autocast_fp32(student.device, torch.promote_types(student.dtype, teacher.dtype)),
    )


def _denominator(target, n_rows, opts, dtype, device):
    """What ``batchmean`` divides by, as a 0-d device tensor (no host sync): the rows kept; None otherwise."""
    if opts.reduction != "batchmean":
        return None
    if target is None:
        return torch.full((), float(n_rows), dtype=dtype, device=device)
    return (target.to(torch.int64) != opts.ignore_index).sum().to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# The definition: the torch backend, and the higher-order gradients of the Triton backend.


def _definition(opts, student, teacher, target):
    """``kl_div_with_logits`` in torch ops, in fp32 (fp64 for fp64 logits): ``T^2 sum_c p_c (log p_c - log q_c)``
    with the terms where ``p_c == 0`` set to 0 (a double ``where``, so that their gradient is 0, not
    ``0 * NaN``). Ignored rows are replaced by zeros before the softmaxes: nothing of theirs reaches the loss or
    the gradient."""
    dtype = _family.compute_dtype(student, teacher)
    t = opts.temperature
    s, u = student.to(dtype) / t, teacher.to(dtype) / t
    if target is not None:
        kept = (target.to(torch.int64) != opts.ignore_index).unsqueeze(-1)
        s, u = torch.where(kept, s, 0.0), torch.where(kept, u, 0.0)
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(u, dim=-1)
    p = log_p.exp()
    mass = p != 0
    terms = torch.where(mass, p * (torch.where(mass, log_p, 0.0) - torch.where(mass, log_q, 0.0)), 0.0)
    rows = (t * t) * terms.sum(-1)
    n_rows = rows.numel()
    denominator = _denominator(target, n_rows, opts, dtype, rows.device)
    return _family.reduce(rows.reshape(-1), opts.row_reduction, denominator, rows.shape).to(opts.out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (compiled or interpreted)


def _needs_copy(logits):
    """Whether the (rows, V) form of ``logits`` has a class stride other than 1, which the kernels cannot walk."""
    return logits.reshape(-1, logits.shape[-1]).stride(-1) != 1


def _rows(logits, copy):
    """(rows, V) with class stride 1: a view (row stride 0 included), or a contiguous copy when ``copy``. The
    backward is told ``copy`` by the forward: a stride read while ``torch.compile`` traces a backward fails."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows.contiguous() if copy else rows


class _Distillation(_family.LossFunction):
    @staticmethod
    def forward(opts, needs, student_logits, teacher_logits, target):
        from ..kernels.distillation import distillation_forward

        student = _rows(student_logits, _needs_copy(student_logits))
        teacher = _rows(teacher_logits, _needs_copy(teacher_logits))
        flat_target = None if target is None else target.reshape(-1)
        n_rows = student.shape[0]
        device = student.device
        dtype = _family.compute_dtype(student, teacher)
        rows = _alloc.empty(n_rows, dtype=dtype, device=device)
        denominator = _denominator(flat_target, n_rows, opts, dtype, device)
        wanted = needs[:2]
        # (lse_student, lse_teacher, KL) per row, for a backward that reads the logits again: 'none', or a second
        # backward through a retained graph; 12 bytes a row against the V * 2 of a bf16 row
        stats = _alloc.empty((n_rows, 3), dtype=dtype, device=device) if any(wanted) else None
        grads, scale = [None, None], None
        if any(wanted) and opts.reduction != "none":
            scale = _family.fused_grad_scale(opts.row_reduction, denominator, dtype, device)
            grads = [_alloc.empty(t.shape, dtype=t.dtype, device=device) if want else None
                     for t, want in zip((student, teacher), wanted)]
        distillation_forward(student, teacher, flat_target, scale, rows, stats, *grads,
                             temperature=opts.temperature, ignore_index=opts.ignore_index)
        loss = _family.reduce(rows, opts.row_reduction, denominator, student_logits.shape[:-1]).to(opts.out_dtype)
        shapes = (student_logits.shape, teacher_logits.shape)
        return loss, *(None if g is None else g.view(shape) for g, shape in zip(grads, shapes)), stats, denominator

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, student, teacher, target = inputs
        _, grad_student, grad_teacher, stats, denominator = output
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        fused = None if grad_student is None and grad_teacher is None else [grad_student, grad_teacher, None]
        _family.save(ctx, opts, needs, (student, teacher, target), state=(stats, denominator), fused=fused)
        ctx.copies = (_needs_copy(student), _needs_copy(teacher))

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _recompute, _definition, grad_outputs)


def _recompute(ctx, inputs, state, grad_outputs):
    """The gradients from the saved logits and row stats: one more read of both logits, scaled per row."""
    from ..kernels.distillation import distillation_backward

    student_logits, teacher_logits, target = inputs
    stats, denominator = state
    opts = ctx.opts
    student, teacher = (_rows(t, copy) for t, copy in zip((student_logits, teacher_logits), ctx.copies))
    n_rows = student.shape[0]
    scale = _family.grad_scale(grad_outputs[0].to(stats.dtype), opts.row_reduction, denominator)
    grads = [_alloc.empty(t.shape, dtype=t.dtype, device=t.device) if need else None
             for t, need in zip((student, teacher), ctx.needs[:2])]
    distillation_backward(student, teacher, None if target is None else target.reshape(-1), stats,
                          scale.expand(n_rows).contiguous(), *grads, temperature=opts.temperature,
                          ignore_index=opts.ignore_index)
    shapes = (student_logits.shape, teacher_logits.shape)
    return (*(None if g is None else g.view(shape) for g, shape in zip(grads, shapes)), None)
