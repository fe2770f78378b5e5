"""Linear + cross-entropy, host side: ``linear_cross_entropy``, the value of
``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` (with the cross-entropy family's extras and an
optional causal shift) without ever holding the ``(tokens, vocab)`` logits.

Backends:
- Triton (compiled or interpreted): the kernels of ``fusedloss.kernels.linear_cross_entropy`` (algorithm, FLOP and
  byte counts, the schedules and the workspace bound in ``docs/kernels/linear_cross_entropy.md``). The forward keeps
  the per-row state of the cross-entropy kernels (O(tokens)); the backward recomputes the logits chunk by chunk of
  the vocabulary.
  ``accumulate_in_input_dtype=True`` instead forms the gradient in the forward, token chunk by token chunk, from
  logits in the input's dtype, with dW summed over the chunks in the weight's dtype (``_fast_forward``).
- torch: the definition (``_definition``: ``F.linear``, then the cross-entropy definition), on chunks of tokens so
  that at most ``TORCH_CHUNK_BYTES`` of logits exist at a time. For 'mean' and 'sum' the forward differentiates
  each chunk right away (three matmuls per chunk, as eager) and the backward only scales the gradients; 'none'
  and a gradient through the returned lse recompute the chunks in the backward. Peak memory beyond inputs and
  gradients at 8192 x 256 x 50000 (fp32) with every extra: under 5% of the 1.5 GiB of eager's logits alone
  (``test_torch_backend_peak_memory``).
"""

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _alloc, _checks, _distributed, _family, _schedules
from .._backend import matmul_backend, runs_definition
from . import cross_entropy as ce

# torch backend: the logits of at most this many bytes (in the compute dtype) exist at once. Differentiating the
# definition of a chunk with every extra (softcap, smoothing, focal, z-loss) keeps ~5 chunk-sized temporaries alive.
TORCH_CHUNK_BYTES = 8 << 20

_PRECISIONS = ("ieee", "tf32", "tf32x3")


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropySchedule:
    """How the Triton backends run the loss: four features, each measurable on its own
    (``bench/phases_linear_cross_entropy.py``; their byte counts in ``fusedloss.kernels.linear_cross_entropy``).
    ``SCHEDULES`` names two: ``"pointer"`` (none, the default) and ``"tma"`` (all four, opt-in until a GPU run has
    measured them)."""

    # the logit kernels and the dX GEMM read X and W through tensor descriptors on a persistent grid (sm_90, 16-bit
    # operands with a contiguous hidden dimension; pointer loads elsewhere)
    tma_loads: bool = False
    # dW = G^T X by cuBLAS, the mean's scale folded into G (bf16, fp32, fp64; fp16 and an fp32 precision override
    # keep the Triton GEMM); it runs over every token, so ignored tokens' G rows are written as zeros
    cublas_dw: bool = False
    # bf16 dX summed over the vocabulary chunks in a compensated bf16 pair (the dX output and a bf16 low half)
    # instead of an fp32 buffer, with a 32 MiB G chunk instead of 64: the workspace under 5% of the bf16 logits
    compensated_dx: bool = False
    # token tiles whose every row is ignored (padding, prompts) skipped by the logit kernels and the GEMMs
    skip_ignored: bool = False


# schedule name -> its features (fusedloss._schedules.resolve); the first is the default
SCHEDULES = {"pointer": LinearCrossEntropySchedule(),
             "tma": LinearCrossEntropySchedule(tma_loads=True, cublas_dw=True, compensated_dx=True, skip_ignored=True)}
SCHEDULE_ENV = "FUSEDLOSS_LCE_SCHEDULE"


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyOptions:
    """Everything but the tensors (see ``linear_cross_entropy`` for each field)."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    focal_gamma: float = 0.0
    shift: bool = False
    return_lse: bool = False
    input_precision: Optional[str] = None
    accumulate_in_input_dtype: bool = False
    schedule: LinearCrossEntropySchedule = LinearCrossEntropySchedule()
    out_dtype: torch.dtype = torch.float32
    # vocabulary parallelism: the weight holds classes class_offset .. of n_classes, split over process_group in
    # slices of shard_widths classes (rank order)
    n_classes: int = 0
    class_offset: int = 0
    shard_widths: tuple = ()
    process_group: Optional[object] = dataclasses.field(default=None, compare=False)

    def row_options(self, dtype):
        """The per-row cross-entropy of the logits (reduction 'none', in ``dtype``)."""
        return ce.CrossEntropyOptions(ignore_index=self.ignore_index, reduction="none",
                                      label_smoothing=self.label_smoothing, focal_gamma=self.focal_gamma,
                                      z_loss=self.z_loss, softcap=self.softcap, out_dtype=dtype,
                                      n_classes=self.n_classes, class_offset=self.class_offset,
                                      process_group=self.process_group)


def linear_cross_entropy(input, weight, target, bias=None, *, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, focal_gamma=0.0, z_loss=0.0, softcap=None, shift=False,
                         return_lse=False, input_precision=None, accumulate_in_input_dtype=False,
                         process_group=None, schedule=None):
    """Cross-entropy of the logits ``input @ weight.T + bias`` against class indices, without the logits.

    Equals ``F.cross_entropy(F.linear(input, weight, bias).reshape(-1, V), target.reshape(-1), ...)`` (reshaped
    back for ``reduction='none'``), with the extras of ``fusedloss.cross_entropy``, and gradients for ``input``,
    ``weight`` and ``bias``. Peak memory beyond inputs and gradients is O(tokens) plus a bounded workspace (the
    bound is in ``docs/kernels/linear_cross_entropy.md``), never ``tokens x vocab``.

    Args:
        input: hidden states ``(..., H)``; float16, bfloat16, float32 or float64; any strides.
        weight: ``(V, H)``, the classifier (an LM head's ``lm_head.weight``), of ``input``'s dtype and device
            (under ``torch.autocast`` both are cast to the autocast dtype first, as ``F.linear`` would be).
        target: class indices ``(...)`` (``input``'s leading shape), int64 or int32, in ``[0, V)`` or equal to
            ``ignore_index``; any strides.
        bias: optional ``(V,)``, of ``input``'s dtype; any stride.
        ignore_index: rows whose target equals it contribute neither loss nor gradient, and are left out of the
            ``mean`` denominator.
        reduction: ``'mean'`` (over non-ignored rows; NaN when every row is ignored, as torch), ``'sum'`` or
            ``'none'`` (the loss per row, of ``target``'s shape).
        label_smoothing: in ``[0, 1]``, PyTorch's convention.
        z_loss: coefficient ``>= 0`` of ``z_loss * logsumexp(logits) ** 2``, added per non-ignored row.
        softcap: ``None`` or a finite ``c > 0``: logits become ``c * tanh(logits / c)`` (after the bias) first.
        focal_gamma: ``>= 0``; each row's cross-entropy is multiplied by ``(1 - p_t) ** focal_gamma``.
        shift: causal LM: ``input[..., t, :]`` predicts ``target[..., t + 1]`` (the last dimension of ``target``
            is the sequence). Nothing is copied: the kernels offset their target reads; the last position of
            each sequence is ignored (its ``'none'`` loss is 0). ``input`` needs at least 2 dimensions.
        return_lse: also return the per-row log-sum-exp of the (capped) logits, ``(...)``, in fp32 (fp64 for
            fp64 inputs), differentiable: ``z_loss`` and the perplexity can be logged from it without a second
            pass.
        input_precision: fp32 inputs only: ``None`` (default) follows torch's fp32 matmul policy, as
            ``F.linear`` does (IEEE fp32 products unless TF32 is allowed, by
            ``torch.set_float32_matmul_precision('high')`` or ``torch.backends.cuda.matmul.fp32_precision =
            'tf32'``); ``'ieee'``, ``'tf32'`` or ``'tf32x3'`` (tensor cores, Triton's meaning) override it.
            16-bit inputs always run on the tensor cores with fp32 accumulation; fp64 runs in fp64.
        process_group: vocabulary (tensor) parallelism: with a ``torch.distributed`` group of W ranks, ``weight``
            and ``bias`` are this rank's slice of the classes, the r-th of W contiguous slices in rank order, of
            any widths (the LM head of a tensor-parallel model; the offsets agreed with one all-gather of a few
            integers per call, read on the host), ``input`` and ``target`` (global class indices) are the same on
            every rank. Every rank returns the loss (and lse) of the whole problem; ``weight`` and ``bias`` get their
            slice of the single-process gradient and ``input`` the whole single-process gradient (summed over the
            ranks inside, so no collective is needed around the call). Communication: one all-gather of 4 numbers
            per row in the forward (each rank sends ``16 N`` bytes, 32 for fp64, N the rows) and one all-reduce
            of the ``N x H`` input gradient in the compute dtype in the backward (``4 N H`` bytes per rank before
            the collective's own factor, about ``2 (W - 1) / W`` for a ring). Every rank must call it.
        accumulate_in_input_dtype: trade exactness for speed, with Liger-Kernel's semantics (its default
            ``accum_dtype``): the forward computes the logits of a chunk of tokens in the input's dtype (cuBLAS),
            their cross-entropy and gradient in place, then ``dX`` of the chunk and ``dW += G^T X`` summed over the
            chunks in the weight's dtype, so the backward only scales (6 N H V FLOPs instead of 8 N H V, with
            ``configs.LCE_FAST_CHUNK_BYTES`` of logits at a time). The loss comes from logits rounded to the
            input's dtype and dW from bf16 partial sums: for bf16 inputs a relative error of a few 1e-3 against
            fp64 (tests/test_linear_cross_entropy.py measures it), against ~1e-3 for the exact default (the
            final rounding to bf16). Applies to 'mean' and 'sum' with a gradient to form; otherwise, and on the
            torch backend (which computes in fp32 anyway), the result is the exact one. fp32 matmuls follow
            torch's policy here (``input_precision`` does not apply). Not with ``process_group``.
        schedule: how the Triton backends run it: ``"pointer"``, ``"tma"`` or a ``LinearCrossEntropySchedule``
            (its features one by one); None takes ``FUSEDLOSS_LCE_SCHEDULE``, unset ``"pointer"``. The same loss
            and gradients (up to the order of fp32 sums) either way; ignored by the torch backend.

    Returns:
        The loss in ``input``'s dtype (as torch would return it; fp32 under autocast), or ``(loss, lse)`` with
        ``return_lse``.

    CPU backends raise ``IndexError`` on an out-of-range class index; on GPU that row's loss is NaN.
    """
    opts = _options(input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                    focal_gamma, shift, return_lse, input_precision, process_group, accumulate_in_input_dtype,
                    schedule)
    if _checks.autocast_enabled(input.device):
        # F.linear runs in the autocast dtype under autocast; cast here, differentiably, so that the gradients of
        # fp32 parameters come back in fp32, as autocast's own casts give
        dtype = torch.get_autocast_dtype(input.device.type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        raise TypeError(f"weight and bias must have input's dtype {input.dtype} (outside torch.autocast), got "
                        f"{weight.dtype}" + ("" if bias is None else f" and {bias.dtype}"))
    if target.device.type == "cpu":
        _checks.check_class_range(target[..., 1:] if shift else target, opts.n_classes, opts.ignore_index)
    needs = _family.needs_grad(input, weight, bias, target)
    traced = runs_definition(input)
    if not traced and matmul_backend(input.device, input.dtype) != "torch" and input.numel() > 0:
        loss, lse = _LinearCrossEntropy.apply(opts, needs, input, weight, bias, target)[:2]
    elif traced or torch.compiler.is_compiling() or process_group is not None:
        # the chunked torch engine differentiates chunk by chunk with torch.autograd.grad, which Dynamo and
        # torch.func do not trace: they get the definition itself (its logits materialized, as eager torch's are);
        # so does a vocabulary-parallel call, whose shard's logits are a 1 / W slice
        loss, lse = _definition(opts, input, weight, bias, target)
    else:
        loss, lse = _LinearCrossEntropyTorch.apply(opts, needs, input, weight, bias, target)[:2]
    return (loss, lse) if return_lse else loss


# ---------------------------------------------------------------------------------------------------------------
# Argument checks


def _options(input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, focal_gamma,
             shift, return_lse, input_precision, process_group=None, accumulate_in_input_dtype=False, schedule=None):
    _checks.check_tensor("input", input, floating=True)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (..., H), got a 0-d tensor")
    _checks.check_tensor("weight", weight, floating=True, dims=(2,), device=input.device)
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(f"weight must have shape (V, {input.shape[-1]}) for input of shape {tuple(input.shape)}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (class), got shape (0, H)")
    _checks.check_tensor("target", target, floating=False, device=input.device)
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 (or int32) class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have input's leading shape {tuple(input.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    if bias is not None:
        _checks.check_tensor("bias", bias, floating=True, dims=(1,), device=input.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _checks.check_reduction(reduction)
    shift = _checks.check_bool("shift", shift)
    return_lse = _checks.check_bool("return_lse", return_lse)
    accumulate_in_input_dtype = _checks.check_bool("accumulate_in_input_dtype", accumulate_in_input_dtype)
    if shift and input.dim() < 2:
        raise ValueError(f"shift needs a sequence dimension: input must be (..., T, H), got {tuple(input.shape)}")
    if input_precision is not None and not isinstance(input_precision, str):
        raise TypeError(f"input_precision must be None or a str, got {type(input_precision).__name__}")
    if input_precision is not None and input_precision not in _PRECISIONS:
        raise ValueError(f"input_precision must be one of {', '.join(map(repr, _PRECISIONS))}, "
                         f"got {input_precision!r}")
    n_classes, class_offset, shard_widths = weight.shape[0], 0, ()
    if process_group is not None:
        if accumulate_in_input_dtype:
            raise ValueError("accumulate_in_input_dtype=True forms the gradient per token chunk from the whole "
                             "vocabulary's logits: it does not combine with process_group (a shard of the classes)")
        n_classes, class_offset, shard_widths = _distributed.shard_classes(
            _distributed.check_group(process_group), n_classes, input.device, rows=input.numel() // input.shape[-1],
            hidden_size=input.shape[-1], input_dtype=input.dtype, weight_dtype=weight.dtype, bias=bias is not None)
    return LinearCrossEntropyOptions(
        ignore_index=_checks.check_int("ignore_index", ignore_index),
        reduction=reduction,
        label_smoothing=_checks.check_number("label_smoothing", label_smoothing, low=0.0, high=1.0),
        z_loss=_checks.check_number("z_loss", z_loss, low=0.0, finite=True),
        softcap=None if softcap is None else _checks.check_number("softcap", softcap, low=0.0, low_open=True,
                                                                   finite=True),
        focal_gamma=_checks.check_number("focal_gamma", focal_gamma, low=0.0, finite=True),
        shift=shift,
        return_lse=return_lse,
        input_precision=input_precision,
        accumulate_in_input_dtype=accumulate_in_input_dtype,
        schedule=_schedules.resolve("schedule", schedule, SCHEDULES, SCHEDULE_ENV),
        out_dtype=_checks.autocast_fp32(input.device, input.dtype),
        n_classes=n_classes,
        class_offset=class_offset,
        shard_widths=shard_widths,
        process_group=process_group,
    )


# ---------------------------------------------------------------------------------------------------------------
# The definition, and what both backends share


def _config(opts, x2d, weight):
    """The kernels' launch configuration for this problem under ``opts.schedule``."""
    from ..kernels.linear_cross_entropy import config_for

    s = opts.schedule
    return config_for(x2d, weight, tma_loads=s.tma_loads, compact_workspace=s.compensated_dx,
                      skip_ignored=s.skip_ignored)


def _as_rows(input):
    """``input`` as (rows, H): the rows counted from the leading shape, so that H = 0 keeps them (``reshape(-1, 0)``
    is ambiguous)."""
    return input.reshape(math.prod(input.shape[:-1]), input.shape[-1])


def _shifted_target(target, opts):
    """The class each row predicts, flat (rows,), as int64: ``target[..., t + 1]`` with ``shift`` (the last
    position of each sequence ignored), a copy only here and in the torch backend's chunks."""
    y = target.to(torch.int64)
    if opts.shift:
        y = torch.cat([y[..., 1:], torch.full_like(y[..., :1], opts.ignore_index)], dim=-1)
    return y.reshape(-1)


def _rows_and_lse(opts, x2d, weight, bias, y):
    """Per-row losses and log-sum-exps of ``x2d @ weight.T + bias`` in the compute dtype (torch ops)."""
    dtype = _family.compute_dtype(x2d)
    if opts.process_group is not None:  # a shard of the classes; the input's gradient is summed over the ranks
        x2d = _distributed.copy_to_group(x2d, opts.process_group)
    logits = F.linear(x2d.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if opts.process_group is not None:
        return ce.sharded_rows_and_lse(opts.row_options(dtype), logits, y, None, None)
    rows = ce.definition(opts.row_options(dtype), logits, y, None, None)
    if opts.softcap is not None:
        logits = opts.softcap * torch.tanh(logits / opts.softcap)
    return rows, torch.logsumexp(logits, dim=-1)


def _denominator(target, opts, dtype):
    """The ``mean``'s denominator as a 0-d device tensor (no host sync): the rows whose (shifted) target is not
    ignored."""
    t = target[..., 1:] if opts.shift else target
    return (t.to(torch.int64) != opts.ignore_index).sum().to(dtype)


def _definition(opts, input, weight, bias, target):
    """``(loss, lse)`` in torch ops, the logits materialized: the higher-order gradients of both backends."""
    dtype = _family.compute_dtype(input)
    rows, lse = _rows_and_lse(opts, _as_rows(input), weight, bias, _shifted_target(target, opts))
    denominator = _denominator(target, opts, dtype) if opts.reduction == "mean" else None
    lead = tuple(input.shape[:-1])
    return _family.reduce(rows, opts.reduction, denominator, lead).to(opts.out_dtype), lse.reshape(lead)


def _row_and_lse_scales(grad_outputs, opts, denominator, dtype, device):
    """(row_scale, dlse) of a backward: dloss/drow (0-d or per row, zeros when the loss got no gradient) and
    dloss/dlse per row (None when the returned lse got none)."""
    grad_loss, grad_lse = grad_outputs[0], grad_outputs[1]
    if grad_loss is None:
        row_scale = torch.zeros((), dtype=dtype, device=device)
    else:
        row_scale = _family.grad_scale(grad_loss.to(dtype), opts.reduction, denominator)
    return row_scale, None if grad_lse is None else grad_lse.reshape(-1).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (compiled or interpreted)


def _kernel_inputs(input, target):
    """(rows, H) input and a target the kernels can walk, without copies where the strides allow."""
    from ..kernels.linear_cross_entropy import target_layout

    return _as_rows(input), (target if target_layout(target) is not None else target.contiguous())


class _LinearCrossEntropy(_family.LossFunction):
    @staticmethod
    def forward(opts, needs, input, weight, bias, target):
        from ..kernels.cross_entropy_rows import ROW_STATE
        from ..kernels.linear_cross_entropy import linear_cross_entropy_combine, linear_cross_entropy_forward

        x2d, target_k = _kernel_inputs(input, target)
        n_rows = x2d.shape[0]
        dtype = _family.compute_dtype(input)
        rows = _alloc.empty(n_rows, dtype=dtype, device=input.device)
        row_state = _alloc.empty((n_rows, ROW_STATE), dtype=dtype, device=input.device)
        denominator = _denominator(target, opts, dtype) if opts.reduction == "mean" else None
        kw = dict(ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing, focal_gamma=opts.focal_gamma,
                  z_loss=opts.z_loss, shift=opts.shift)
        fused = opts.accumulate_in_input_dtype and opts.reduction != "none" and any(needs[:3])
        if fused:
            scale = _family.fused_grad_scale(opts.reduction, denominator, dtype, input.device)
            grads = _fast_forward(opts, needs, x2d, weight, bias, _shifted_target(target, opts), rows, row_state,
                                  scale)
        elif opts.process_group is None:
            # token tiles without a target are skipped (skip_ignored) unless their lse is returned
            skip = opts.schedule.skip_ignored and not opts.return_lse
            linear_cross_entropy_forward(x2d, weight, bias, target_k, rows, row_state, softcap=opts.softcap,
                                         input_precision=opts.input_precision, skip_ignored=skip,
                                         tma_loads=opts.schedule.tma_loads, **kw)
        else:  # this shard's statistics (m, s, A, x_y), every shard's merged in torch ops
            partial = _alloc.empty((4, n_rows), dtype=dtype, device=input.device)
            linear_cross_entropy_forward(x2d, weight, bias, target_k, rows, partial, softcap=opts.softcap,
                                         input_precision=opts.input_precision, class_offset=opts.class_offset,
                                         partial=True, tma_loads=opts.schedule.tma_loads, **kw)
            # merged as cross-entropy merges its shards: (m, s, B, A, x_y) with B the shard's width, since the
            # shards may differ in width (the kernel's own split merge assumes equal splits)
            m, s, a, x_y = _distributed.all_gather(partial, opts.process_group).unbind(1)
            width = torch.tensor(opts.shard_widths, dtype=dtype, device=input.device)[:, None].expand_as(m)
            merged = ce.merge_partial_stats(torch.stack([m, s, width, a, x_y], dim=-1))
            linear_cross_entropy_combine(merged[:, [0, 1, 3, 4]].T.contiguous(), target_k, rows, row_state,
                                         n_classes=opts.n_classes, split_width=opts.n_classes, **kw)
        lead = tuple(input.shape[:-1])
        loss = _family.reduce(rows, opts.reduction, denominator, lead).to(opts.out_dtype)
        lse = (row_state[:, 0] + row_state[:, 1]).reshape(lead)
        if not fused:  # no None outputs: Dynamo's speculation of the backward calls .contiguous() on each
            return loss, lse, row_state, denominator
        dx, dw, db = grads
        return (loss, lse, row_state, denominator, None if dx is None else dx.view(input.shape), dw,
                None if db is None else db.to(bias.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, input, weight, bias, target = inputs
        ctx.mark_non_differentiable(*(t for t in output[2:] if t is not None))
        fused = [*output[4:], None] if len(output) > 4 else None
        _family.save(ctx, opts, needs, (input, weight, bias, target), state=output[2:4], fused=fused,
                     differentiable=2)

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _recompute, _definition, grad_outputs)


def _fast_forward(opts, needs, x2d, weight, bias, y, rows, row_state, scale):
    """``accumulate_in_input_dtype=True``: Liger-Kernel's schedule. Per chunk of ``fast_rows`` tokens: the chunk's
    logits in the input dtype (cuBLAS, 2 n H V FLOPs), ``kernels.cross_entropy``'s fused kernel over them (per-row
    loss and state, the gradient written over the logits, times ``scale``: one read and one write of n V s bytes),
    dX of the chunk = G @ W (K = V, complete) and dW (+)= G^T X_chunk (in the weight's dtype: the lossy sum), db
    summed in the compute dtype. 6 N H V FLOPs in all; each chunk also reads and writes dW (2 V H s bytes). fp16
    keeps G unscaled (p / N would flush to zero) and scales dX and dW at the end. Returns (dX, dW, db), None where
    not needed."""
    from ..kernels.cross_entropy import cross_entropy_forward

    need_x, need_w, need_b = needs[:3]
    n_rows = x2d.shape[0]
    n_classes = weight.shape[0]
    device = x2d.device
    step = _config(opts, x2d, weight)["fast_rows"]
    dx = _alloc.empty(tuple(x2d.shape), dtype=x2d.dtype, device=device) if need_x else None
    dw = _alloc.empty(tuple(weight.shape), dtype=weight.dtype, device=device) if need_w else None
    db = torch.zeros(n_classes, dtype=rows.dtype, device=device) if need_b else None
    fold = x2d.dtype != torch.float16
    logits_buffer = _alloc.empty(min(step, n_rows) * n_classes, dtype=x2d.dtype, device=device)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        x_chunk = x2d[start:stop]
        logits = logits_buffer[: (stop - start) * n_classes].view(stop - start, n_classes)
        if bias is None:
            torch.mm(x_chunk, weight.t(), out=logits)
        else:
            torch.addmm(bias, x_chunk, weight.t(), out=logits)
        cross_entropy_forward(logits, y[start:stop], None, None, scale if fold else torch.ones_like(scale),
                              rows[start:stop], row_state[start:stop], logits, ignore_index=opts.ignore_index,
                              label_smoothing=opts.label_smoothing, focal_gamma=opts.focal_gamma, focal_alpha=1.0,
                              z_loss=opts.z_loss, softcap=opts.softcap)
        if need_x:
            torch.mm(logits, weight, out=dx[start:stop])
        if need_w:
            if start == 0:
                torch.mm(logits.t(), x_chunk, out=dw)
            else:
                dw.addmm_(logits.t(), x_chunk)
        if need_b:
            db += logits.sum(dim=0, dtype=db.dtype)
    if not fold:
        for g in (dx, dw, db):
            if g is not None:
                g.mul_(scale.to(g.dtype))
    return dx, dw, db


def _fast_recompute(ctx, inputs, denominator, grad_loss):
    """A second backward of ``accumulate_in_input_dtype=True`` (the fused gradient was handed out): the forward's
    computation again, then the same in-place scaling by ``grad_output``, so that it gives the first backward's
    gradient to the bit (gradcheck's reentrancy test), not the exact mode's."""
    from ..kernels.cross_entropy_rows import ROW_STATE

    input, weight, bias, target = inputs
    x2d = _as_rows(input)
    dtype = _family.compute_dtype(input)
    scale = _family.fused_grad_scale(ctx.opts.reduction, denominator, dtype, input.device)
    rows = torch.empty(x2d.shape[0], dtype=dtype, device=input.device)
    row_state = torch.empty((x2d.shape[0], ROW_STATE), dtype=dtype, device=input.device)
    dx, dw, db = _fast_forward(ctx.opts, ctx.needs, x2d, weight, bias, _shifted_target(target, ctx.opts), rows,
                               row_state, scale)
    grads = (None if dx is None else dx.view(input.shape), dw, None if db is None else db.to(bias.dtype))
    return (*(None if g is None else _family.scale_unless_one(g, grad_loss) for g in grads), None)


def _live_tiles(target, opts, n_rows, tile_rows):
    """(tile_order, n_live): the token tiles of ``tile_rows`` rows that hold a target (the kernels' ``_live_tile``
    rule) first, each group in ascending order, as int32, and how many there are, a 0-d int32 device tensor. O(N)
    torch ops on the device, no host sync."""
    valid = _shifted_target(target, opts) != opts.ignore_index
    tiles = -(-n_rows // tile_rows)
    padded = torch.zeros(tiles * tile_rows, dtype=torch.bool, device=valid.device)
    padded[:n_rows] = valid
    live = padded.view(tiles, tile_rows).any(dim=1)
    return torch.argsort((~live).to(torch.uint8), stable=True).to(torch.int32), live.sum(dtype=torch.int32)


def _recompute(ctx, inputs, state, grad_outputs):
    """dX, dW, db by vocabulary chunks: recompute each chunk's logits and G, then two GEMMs
    (docs/kernels/linear_cross_entropy.md, which describes the two schedules this follows)."""
    from ..kernels._gemm import dot_precision, matmul
    from ..kernels.linear_cross_entropy import gemm_tile, linear_cross_entropy_dlogits

    input, weight, bias, target = inputs
    row_state, denominator = state
    opts = ctx.opts
    need_x, need_w, need_b = ctx.needs[:3]
    if opts.accumulate_in_input_dtype and opts.reduction != "none" and grad_outputs[1] is None:
        return _fast_recompute(ctx, inputs, denominator, grad_outputs[0])
    x2d, target_k = _kernel_inputs(input, target)
    n_rows, n_hidden = x2d.shape
    n_classes = weight.shape[0]
    dtype, device = row_state.dtype, input.device
    schedule = opts.schedule
    cfg = _config(opts, x2d, weight)
    sharded = opts.process_group is not None
    row_scale, dlse = _row_and_lse_scales(grad_outputs, opts, denominator, dtype, device)
    # G holds the coefficient form times the per-row scale. A scalar scale ('mean', 'sum') goes to the GEMM
    # epilogues with the Triton dW and for fp16, so that G keeps its magnitude (fp16 would flush p / N to zero);
    # with cublas_dw bf16, fp32 and fp64 take it in G, so that cuBLAS can run dW without a host-side alpha. With a
    # gradient into the lse, which must not be scaled by it, the scalar goes into the rows.
    fold = schedule.cublas_dw and x2d.dtype != torch.float16
    gemm_scale = None
    if row_scale.dim() == 0 and dlse is None and not fold:
        row_scale, gemm_scale = torch.ones((), dtype=dtype, device=device), row_scale
    dw_on_cublas = fold and dot_precision(x2d.dtype, opts.input_precision) == dot_precision(x2d.dtype)
    # Token tiles without a target are skipped (no gradient into the lse, which every row has).
    skip = schedule.skip_ignored and dlse is None
    tile_rows = cfg["dlogits"]["BLOCK_N"]
    live = dict(zip(("tile_order", "n_live"), _live_tiles(target, opts, n_rows, tile_rows))) if skip else {}
    gemm_kw = dict(programs=cfg["programs"], input_precision=opts.input_precision)
    chunk = cfg["chunk"]
    n_chunks = -(-n_classes // chunk)
    kw = dict(ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing, softcap=opts.softcap,
              shift=opts.shift, input_precision=opts.input_precision, class_offset=opts.class_offset,
              skip_ignored=skip, zero_skipped=skip and need_w and dw_on_cublas, tma_loads=schedule.tma_loads)
    dx = _alloc.empty((n_rows, n_hidden), dtype=x2d.dtype, device=device) if need_x else None
    dw = _alloc.empty(tuple(weight.shape), dtype=weight.dtype, device=device) if need_w else None
    db = _alloc.empty(n_classes, dtype=dtype, device=device) if need_b else None
    # dX sums over the vocabulary chunks in the compute dtype: in dx itself when that is its dtype; for bf16 under
    # compensated_dx in a compensated pair (dx the high half, dx_lo the low); else in a buffer of the compute dtype
    # whose last chunk writes dx. A shard's sum is summed over the ranks in the compute dtype before the scale and the
    # cast. See the docs/kernels/linear_cross_entropy.md for the traffic.
    dx_acc, dx_lo = dx, None
    if need_x and (n_chunks > 1 or sharded) and x2d.dtype != dtype:
        if schedule.compensated_dx and x2d.dtype == torch.bfloat16 and not sharded:
            dx_lo = _alloc.empty((n_rows, n_hidden), dtype=torch.bfloat16, device=device)
        else:
            dx_acc = _alloc.empty((n_rows, n_hidden), dtype=dtype, device=device)
    # One workspace for every chunk: G (rows of ``pitch`` elements, a multiple of 16 bytes for tensor
    # descriptors), and the per-row-tile column sums of G for db.
    pitch = -(-min(chunk, n_classes) // 8) * 8
    workspace = _alloc.empty(n_rows * pitch, dtype=x2d.dtype, device=device).view(n_rows, pitch)
    n_tiles = -(-n_rows // tile_rows)
    bias_parts = _alloc.empty(n_tiles * min(chunk, n_classes), dtype=dtype, device=device) if need_b else None
    for index, col_start in enumerate(range(0, n_classes, chunk)):
        width = min(chunk, n_classes - col_start)
        first, last = index == 0, index == n_chunks - 1
        g = workspace[:, :width]
        part = bias_parts[: n_tiles * width].view(n_tiles, width) if need_b else None
        linear_cross_entropy_dlogits(x2d, weight, bias, target_k, row_state, row_scale, dlse, g, part, col_start,
                                     **kw)
        if need_b:
            torch.sum(part, dim=0, out=db[col_start:col_start + width])
        if need_w:  # dW rows of this chunk, complete (K = all tokens): written once
            if dw_on_cublas:
                torch.mm(g.t(), x2d, out=dw[col_start:col_start + width])
            else:
                matmul(g.t(), x2d, dw[col_start:col_start + width], scale=gemm_scale, tile=gemm_tile(cfg, "gemm_dw"),
                       sparse="k" if skip else "", tile_rows=tile_rows, **live, **gemm_kw)
        if need_x:  # the chunks' sums stay unscaled in dx_acc (and dx_lo); the last one is scaled into dx
            final = last and not sharded
            out = dx if final else dx_acc
            matmul(g, weight[col_start:col_start + width], out, acc=None if first else dx_acc,
                   lo_in=None if first else dx_lo, lo_out=None if last else dx_lo,
                   scale=gemm_scale if final else None, tile=gemm_tile(cfg, "gemm_dx"),
                   sparse="m" if skip else "", tile_rows=tile_rows, zero_skipped=first or out is not dx_acc,
                   **live, **gemm_kw)
    if need_x and sharded:
        dx = _distributed.all_reduce_(dx_acc, opts.process_group)
        dx = (dx if gemm_scale is None else dx.mul_(gemm_scale)).to(x2d.dtype)
    grad_bias = None
    if need_b:
        grad_bias = (db if gemm_scale is None else db * gemm_scale).to(bias.dtype)
    return (dx.view(input.shape) if need_x else None), dw, grad_bias, None


# ---------------------------------------------------------------------------------------------------------------
# Torch backend: the definition on chunks of tokens. A chunk's logits cover the whole vocabulary, so when the
# gradient's scale is one number ('mean', 'sum') the forward differentiates each chunk right away and the backward
# only scales; with 'none' (a scale per row, known in backward) or a gradient through the returned lse, the
# backward recomputes the chunks.


def _chunks(n_rows, n_classes, dtype):
    step = max(1, TORCH_CHUNK_BYTES // (max(1, n_classes) * torch.finfo(dtype).bits // 8))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _chunk_grads(opts, needs, x2d, weight, bias, y, rows, grad_rows, grad_lse, grads):
    """Differentiate the definition on rows ``rows`` with output gradients ``grad_rows`` (and ``grad_lse``), and
    add the results into ``grads`` (dX rows written, dW and db accumulated, all in the compute dtype)."""
    dtype = _family.compute_dtype(x2d)
    with torch.enable_grad():
        leaves = [t.detach().to(dtype).requires_grad_(need) if t is not None else None
                  for t, need in zip((x2d[rows], weight, bias), needs)]
        out_rows, out_lse = _rows_and_lse(opts, leaves[0], leaves[1], leaves[2], y[rows])
        outputs, output_grads = [out_rows], [grad_rows.expand(out_rows.shape)]
        if grad_lse is not None:
            outputs.append(out_lse)
            output_grads.append(grad_lse[rows])
        wanted = [leaf for leaf, need in zip(leaves, needs) if need]
        chunk = iter(torch.autograd.grad(outputs, wanted, output_grads))
    for index, need in enumerate(needs):
        if not need:
            continue
        g = next(chunk)
        if index == 0:
            grads[0][rows] = g
        else:
            grads[index].add_(g)


def _new_grads(opts, needs, x2d, weight, bias, dtype):
    device = x2d.device
    return [torch.empty(x2d.shape, dtype=dtype, device=device) if needs[0] else None,
            torch.zeros(weight.shape, dtype=dtype, device=device) if needs[1] else None,
            torch.zeros(weight.shape[0], dtype=dtype, device=device) if needs[2] else None]


def _as_param_grads(grads, input, weight, bias):
    like = (input, weight, bias)
    return [None if g is None else g.to(t.dtype).reshape(t.shape) for g, t in zip(grads, like)]


class _LinearCrossEntropyTorch(_family.LossFunction):
    @staticmethod
    def forward(opts, needs, input, weight, bias, target):
        dtype = _family.compute_dtype(input)
        x2d = _as_rows(input)
        y = _shifted_target(target, opts)
        n_rows = x2d.shape[0]
        rows = torch.empty(n_rows, dtype=dtype, device=input.device)
        lse = torch.empty(n_rows, dtype=dtype, device=input.device)
        denominator = _denominator(target, opts, dtype) if opts.reduction == "mean" else None
        need = tuple(needs[:3])
        fused = any(need) and opts.reduction != "none"
        grads = _new_grads(opts, need, x2d, weight, bias, dtype) if fused else None
        scale = _family.fused_grad_scale(opts.reduction, denominator, dtype, input.device) if fused else None
        for chunk in _chunks(n_rows, weight.shape[0], dtype):
            with torch.no_grad():
                rows[chunk], lse[chunk] = _rows_and_lse(opts, x2d[chunk], weight, bias, y[chunk])
            if fused:
                _chunk_grads(opts, need, x2d, weight, bias, y, chunk, scale, None, grads)
        lead = tuple(input.shape[:-1])
        loss = _family.reduce(rows, opts.reduction, denominator, lead).to(opts.out_dtype)
        fused_grads = _as_param_grads(grads, input, weight, bias) if fused else (None, None, None)
        return loss, lse.reshape(lead), *fused_grads, denominator

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, input, weight, bias, target = inputs
        _, _, dx, dw, db, denominator = output
        ctx.mark_non_differentiable(*(t for t in output[2:] if t is not None))
        fused = [dx, dw, db, None] if any(t is not None for t in (dx, dw, db)) else None
        _family.save(ctx, opts, needs, (input, weight, bias, target), state=(denominator,), fused=fused,
                     differentiable=2)

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _torch_recompute, _definition, grad_outputs)


def _torch_recompute(ctx, inputs, state, grad_outputs):
    input, weight, bias, target = inputs
    (denominator,) = state
    opts, needs = ctx.opts, tuple(ctx.needs[:3])
    dtype = _family.compute_dtype(input)
    x2d = _as_rows(input)
    y = _shifted_target(target, opts)
    row_scale, dlse = _row_and_lse_scales(grad_outputs, opts, denominator, dtype, input.device)
    grads = _new_grads(opts, needs, x2d, weight, bias, dtype)
    for chunk in _chunks(x2d.shape[0], weight.shape[0], dtype):
        _chunk_grads(opts, needs, x2d, weight, bias, y, chunk, row_scale if row_scale.dim() == 0 else row_scale[chunk],
                     dlse, grads)
    return (*_as_param_grads(grads, input, weight, bias), None)
