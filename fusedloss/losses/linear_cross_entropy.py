"""Linear + cross-entropy, host side: ``linear_cross_entropy``, torch's ``F.linear_cross_entropy`` (the value of
``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``) with the cross-entropy family's extras
and an optional causal shift, without ever holding the ``(tokens, vocab)`` logits.

Two schedules on the Triton backends (``docs/kernels/linear_cross_entropy.md``: FLOP and byte counts, workspace):
- ``"chunked"`` (the default for 16-bit inputs on CUDA; every torch-only feature: class weights, probability targets,
  K-dimensional weights): token chunks whose logits exist in the input's dtype, as eager's do; the cross-entropy
  kernel runs over them in place and the gradients are formed in the forward (6 N H V FLOPs, ``_chunked_sweep``).
- ``"pointer"`` / ``"tma"``, the recompute schedule (the default elsewhere: fp32 logits, O(tokens) memory beyond a
  bounded workspace): the forward keeps the per-row state, the backward recomputes the logits chunk by chunk of the
  vocabulary (8 N H V FLOPs).
torch backend: the definition (``_definition``) on chunks of tokens so that at most ``TORCH_CHUNK_BYTES`` of logits
exist at a time. For 'mean' and 'sum' the forward differentiates each chunk right away and the backward only
scales the gradients; 'none' and a gradient through the returned lse recompute the chunks in the backward.
"""

import dataclasses
import inspect
import math
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _alloc, _checks, _distributed, _dtensor, _family, _lm_head, _schedules
from .._backend import matmul_backend, runs_definition
from . import cross_entropy as ce
from . import token_metrics

# torch backend: the logits of at most this many bytes (in the compute dtype) exist at once. Differentiating the
# definition of a chunk with every extra (softcap, smoothing, focal, z-loss) keeps ~5 chunk-sized temporaries alive.
TORCH_CHUNK_BYTES = 8 << 20

_PRECISIONS = ("ieee", "tf32", "tf32x3")


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropySchedule:
    """How the Triton backends run the loss. ``chunked``: the chunked schedule (module docstring), its logits chunk
    of ``workspace_bytes`` (None: ``configs.LCE_CHUNK_BYTES``). Otherwise the recompute schedule, with four features
    each measurable on its own (``bench/phases_linear_cross_entropy.py``; byte counts in
    ``docs/kernels/linear_cross_entropy.md``). ``SCHEDULES`` names three: ``"chunked"``, ``"pointer"`` (no
    feature) and ``"tma"`` (all four, opt-in until a GPU run has measured them)."""

    chunked: bool = False
    workspace_bytes: Optional[int] = None
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

    def __post_init__(self):
        if self.workspace_bytes is not None and (not isinstance(self.workspace_bytes, int)
                                                 or self.workspace_bytes <= 0):
            raise ValueError(f"workspace_bytes must be a positive int or None, got {self.workspace_bytes!r}")


# schedule name -> its features (fusedloss._schedules.resolve)
SCHEDULES = {"chunked": LinearCrossEntropySchedule(chunked=True),
             "pointer": LinearCrossEntropySchedule(),
             "tma": LinearCrossEntropySchedule(tma_loads=True, cublas_dw=True, compensated_dx=True,
                                               skip_ignored=True)}
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
    token_metrics: tuple = ()  # names of the metrics asked for (fusedloss.losses.token_metrics)
    input_precision: Optional[str] = None
    accumulate_in_input_dtype: bool = False
    schedule: LinearCrossEntropySchedule = LinearCrossEntropySchedule()
    chunk_rows: Optional[int] = None  # torch's LinearCrossEntropyOptions.batch_chunk_size
    out_features: tuple = ()  # K-dimensional losses: linear_weight is (C, *out_features, H)
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


_UNSET = object()


def linear_cross_entropy(input, linear_weight, target, *legacy_bias, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=None, label_smoothing=0.0, options=None, focal_gamma=0.0,
                         z_loss=0.0, softcap=None, shift=False, return_lse=False, input_precision=None,
                         accumulate_in_input_dtype=False, process_group=None, schedule=None,
                         return_token_accuracy=False, return_entropy=False, bias=_UNSET):
    """Cross-entropy of the logits ``input @ linear_weight.T + linear_bias``, without the logits: a drop-in for
    ``torch.nn.functional.linear_cross_entropy`` (same arguments, names and defaults; ``options`` accepted) with
    the extras of ``fusedloss.cross_entropy``.

    Equals ``F.cross_entropy(F.linear(input, linear_weight, linear_bias).reshape(logits_shape), target, ...)``,
    ``logits_shape = (*input.shape[:-1], C, *out_features)``, with gradients for ``input``, ``linear_weight``,
    ``linear_bias`` and a probability ``target``. Peak memory beyond inputs and gradients is a bounded workspace
    (``docs/kernels/linear_cross_entropy.md``), never ``tokens x vocab``.

    Args:
        input: hidden states ``(..., H)`` (torch: ``(H,)`` or ``(N, H)``; more leading dimensions are fusedloss's
            extension, for class-index targets); float16, bfloat16, float32 or float64; any strides.
        linear_weight: ``(C, H)``, the classifier (an LM head's ``lm_head.weight``), or ``(C, d1, ..., dK, H)`` for a
            K-dimensional loss (then ``input`` is ``(N, H)``); ``input``'s dtype and device (under
            ``torch.autocast`` both are cast to the autocast dtype first, as ``F.linear`` would be).
        target: class indices ``(...)`` (``input``'s leading shape, then ``d1, ..., dK``), int64 or int32, in
            ``[0, C)`` or equal to ``ignore_index``; or class probabilities of the logits' shape (floating point,
            differentiable). Any strides.
        linear_bias: optional ``(C, d1, ..., dK)``, of ``input``'s dtype; keyword only, as in torch.
        weight: optional ``(C,)`` rescaling weight per class, as ``F.cross_entropy``'s.
        reduction: ``'mean'`` (over non-ignored rows, weighted as torch; NaN when every row is ignored, as torch),
            ``'sum'`` or ``'none'`` (the loss per row, of the target's row shape).
        ignore_index: class index whose rows contribute neither loss nor gradient; None (the default) means -100
            for class indices and is the only value allowed with class probabilities, as in torch.
        label_smoothing: in ``[0, 1]``, PyTorch's convention.
        options: a ``torch.nn.LinearCrossEntropyOptions``: its ``batch_chunk_size`` sets the chunked schedule's
            tokens per chunk (the other fields choose torch's own algorithm and do not apply; fusedloss's knobs are
            ``schedule`` and the keywords below). None: fusedloss's defaults.
        focal_gamma: ``>= 0``; each row's cross-entropy is multiplied by ``(1 - p_t) ** focal_gamma``.
        z_loss: coefficient ``>= 0`` of ``z_loss * logsumexp(logits) ** 2``, added per non-ignored row.
        softcap: ``None`` or a finite ``c > 0``: logits become ``c * tanh(logits / c)`` (after the bias) first.
        shift: causal LM: ``input[..., t, :]`` predicts ``target[..., t + 1]`` (the last dimension of ``target``
            is the sequence). Nothing is copied on the recompute schedule: the kernels offset their target reads;
            the last position of each sequence is ignored (its ``'none'`` loss is 0). ``input`` needs at least 2
            dimensions; class indices and a 2-D ``linear_weight`` only.
        return_lse: also return the per-row log-sum-exp of the (capped) logits, the loss's row shape, in fp32
            (fp64 for fp64 inputs), differentiable (on the chunked schedule its gradient materializes the logits:
            use ``schedule="pointer"`` for a gradient through it).
        input_precision: fp32 inputs on the recompute schedule only: ``None`` (default) follows torch's fp32 matmul
            policy, as ``F.linear`` does; ``'ieee'``, ``'tf32'`` or ``'tf32x3'`` (tensor cores, Triton's meaning)
            override it. 16-bit inputs always run on the tensor cores with fp32 accumulation; fp64 in fp64.
        accumulate_in_input_dtype: the chunked schedule with dW summed over the token chunks in the weight's dtype
            (Liger-Kernel's default ``accum_dtype``) instead of fp32: no fp32 accumulator (4 V H bytes) for a
            relative error of a few 1e-3 on dW in bf16. Not with ``process_group``.
        process_group: vocabulary (tensor) parallelism: with a ``torch.distributed`` group of W ranks,
            ``linear_weight`` and ``linear_bias`` are this rank's slice of the classes, the r-th of W contiguous
            slices in rank order, of any widths (the offsets agreed with one all-gather of a few integers per
            call, read on the host), ``input`` and ``target`` (global class indices) are the same on every rank.
            Every rank returns the loss (and lse) of the whole problem; the weight and bias get their slice of the
            single-process gradient and ``input`` the whole single-process gradient (summed over the ranks
            inside). Communication: one all-gather of 4 numbers per row in the forward (``16 N`` bytes per rank,
            32 for fp64) and one all-reduce of the ``N x H`` input gradient in the compute dtype in the backward.
            Every rank must call it. Class-index targets, 2-D weights; runs the recompute schedule (the
            definition with a class ``weight``).
        schedule: how the Triton backends run it: ``"chunked"``, ``"pointer"``, ``"tma"`` or a
            ``LinearCrossEntropySchedule``; None takes ``FUSEDLOSS_LCE_SCHEDULE``, unset ``"chunked"`` for 16-bit
            inputs on CUDA or with ``options``, and ``"pointer"`` otherwise. Class weights, probability targets and
            K-dimensional weights always run the chunked schedule. Ignored by the torch backend.
        return_token_accuracy, return_entropy: also return the per-token accuracy and entropy of the logits
            (``fusedloss.losses.token_metrics``: detached, 0 on ignored tokens), computed from each token chunk's
            logits in the same sweep (the chunked schedule, which a call asking for them runs on the Triton
            backends; no extra matmul). Not with ``process_group``.
        bias: deprecated: the positional 4th argument (or ``bias=``) of fusedloss <= 0.2; use ``linear_bias=``.

    Returns:
        The loss in the dtype torch would return (``input``'s; the promoted one for probability targets; fp32
        under autocast), or ``(loss, lse)`` with ``return_lse``; with a metric asked for, a ``LossWithMetrics``
        holding the loss, the metrics and the lse (with ``return_lse``).

    DTensor arguments (``fusedloss._dtensor``): a replicated LM head (or FSDP2's unsharded one inside the model's
    forward) with replicated or token-sharded (``Shard(0)``, ``reduction='none'``) activations computes locally; a
    head sharded on the vocabulary (``Shard(0)``) with replicated activations runs the vocabulary-parallel path over
    the mesh's group; the results and gradients are DTensors on the same mesh. Other placements raise a ValueError
    naming them.

    CPU backends raise ``IndexError`` on an out-of-range class index; on GPU that row's loss is NaN. Bad shapes
    raise ``fusedloss.ArgumentError``, a ``ValueError`` that ``except RuntimeError`` (torch's type) also catches.
    """
    linear_bias = _legacy_bias(legacy_bias, bias, linear_bias)
    if _dtensor.has_dtensor(input, linear_weight, target, linear_bias, weight):
        def call(input, linear_weight, target, linear_bias, weight, process_group=None):
            return linear_cross_entropy(
                input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
                ignore_index=ignore_index, label_smoothing=label_smoothing, options=options, focal_gamma=focal_gamma,
                z_loss=z_loss, softcap=softcap, shift=shift, return_lse=return_lse, input_precision=input_precision,
                accumulate_in_input_dtype=accumulate_in_input_dtype, process_group=process_group, schedule=schedule,
                return_token_accuracy=return_token_accuracy, return_entropy=return_entropy)

        return _dtensor.dispatch(activations={"input": input},
                                 weights={"linear_weight": linear_weight, "linear_bias": linear_bias},
                                 targets={"target": target}, replicated={"weight": weight}, reduction=reduction,
                                 process_group=process_group, call=call, shift=shift)
    if _checks.autocast_enabled(getattr(input, "device", torch.device("cpu"))):
        # F.linear runs in the autocast dtype under autocast; cast here, differentiably, so that the gradients of
        # fp32 parameters come back in fp32, as autocast's own casts give
        dtype = torch.get_autocast_dtype(input.device.type)
        input, linear_weight = input.to(dtype), linear_weight.to(dtype)
        linear_bias = None if linear_bias is None else linear_bias.to(dtype)
    opts = _options(input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
                    options, z_loss, softcap, focal_gamma, shift, return_lse, input_precision, process_group,
                    accumulate_in_input_dtype, schedule, return_token_accuracy, return_entropy)
    unbatched = input.dim() == 1
    if unbatched:  # one row of torch's (H,) input: the loss of shape () for 'none', as torch's
        input, target = input.unsqueeze(0), target.unsqueeze(0)
    # the engines see a 2-D weight: (C, d1, ..., dK, H) -> (C d1 ... dK, H), a view, differentiable
    weight2d = linear_weight.reshape(math.prod(linear_weight.shape[:-1]), linear_weight.shape[-1])
    bias1d = None if linear_bias is None else linear_bias.reshape(-1)
    prob_target = target.is_floating_point()
    if not prob_target and target.device.type == "cpu":
        _checks.check_class_range(target[..., 1:] if shift else target, opts.n_classes, opts.ignore_index)
    needs = _family.needs_grad(input, weight2d, bias1d, target if prob_target else None, weight)
    with _checks.autocast_off(input.device):  # the engines' math runs at their own precision (inputs cast above)
        loss, lse, accuracy, entropy = _dispatch(opts, needs, input, weight2d, bias1d, target, weight)
    lead = _lead_shape(input, opts)
    accuracy, entropy = (None if m is None else m.reshape(lead) for m in (accuracy, entropy))
    if unbatched:
        loss = loss.squeeze(0) if opts.reduction == "none" else loss
        lse, accuracy, entropy = (None if t is None else t.squeeze(0) for t in (lse, accuracy, entropy))
    if opts.token_metrics:
        return token_metrics.LossWithMetrics(loss, accuracy, entropy, lse if return_lse else None)
    return (loss, lse) if return_lse else loss


# The signature users see (and inspect.signature reports): torch's, then the extras; the deprecated positional and
# keyword bias of fusedloss <= 0.2 stay accepted without being advertised.
linear_cross_entropy.__signature__ = inspect.signature(linear_cross_entropy).replace(parameters=[
    p for p in inspect.signature(linear_cross_entropy).parameters.values() if p.name not in ("legacy_bias", "bias")])


def _dispatch(opts, needs, input, weight, bias, target, class_weight):
    """(loss, lse, token accuracy, entropy) from the engine that serves the call (module docstring); the metrics
    flat per row, None where not asked for."""
    traced = runs_definition(input)
    torch_only = class_weight is not None or target.is_floating_point() or bool(opts.out_features)
    if (traced or torch.compiler.is_compiling() or needs[4] or input.numel() == 0
            or (opts.process_group is not None and torch_only)):
        # the chunked engines run torch.autograd.grad or Triton launches per chunk, which Dynamo and torch.func do
        # not trace: they get the definition itself (its logits materialized, as eager torch's are); so does a
        # class weight that needs a gradient (probability targets), which the kernels do not produce
        return (*_definition(opts, input, weight, bias, target, class_weight),
                *_definition_metrics(opts, input, weight, bias, target))
    if matmul_backend(input.device, input.dtype) == "torch":
        if opts.process_group is not None:  # a shard's logits are a 1 / W slice
            return (*_definition(opts, input, weight, bias, target, class_weight), None, None)
        return _LinearCrossEntropyTorch.apply(opts, needs, input, weight, bias, target, class_weight)[:4]
    if opts.schedule.chunked or torch_only or opts.accumulate_in_input_dtype or opts.token_metrics:
        return _LinearCrossEntropyChunked.apply(opts, needs, input, weight, bias, target, class_weight)[:4]
    return (*_LinearCrossEntropy.apply(opts, needs[:4], input, weight, bias, target)[:2], None, None)


def _definition_metrics(opts, input, weight, bias, target):
    """The token metrics (flat per row, None where not asked for) from the materialized logits."""
    if not opts.token_metrics:
        return None, None
    x2d = _as_rows(input).detach()
    dtype = _family.compute_dtype(input, target)
    with torch.no_grad():
        logits = F.linear(x2d.to(dtype), weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))
        logits = _class_view(logits, opts)
    rows = logits.numel() // max(logits.shape[1], 1)
    metrics = token_metrics.buffers(opts.token_metrics, rows, dtype, input.device)
    token_metrics.of_logits(logits, _token_targets(target, opts), opts.ignore_index, opts.softcap, *metrics,
                            kernels=False)
    return metrics


def _legacy_bias(legacy_bias, bias, linear_bias):
    """The bias of a call written for fusedloss <= 0.2 (4th positional argument, or ``bias=``), with a
    DeprecationWarning, or ``linear_bias``."""
    if len(legacy_bias) > 1:
        raise TypeError(f"linear_cross_entropy takes at most 4 positional arguments, got {3 + len(legacy_bias)}")
    if not legacy_bias and bias is _UNSET:
        return linear_bias
    old = legacy_bias[0] if legacy_bias else bias
    if not torch.compiler.is_compiling():  # (Dynamo cannot trace warnings.warn: fullgraph would fail)
        warnings.warn("linear_cross_entropy's positional bias argument (and bias=) is deprecated and will be removed "
                      "in the next release: pass linear_bias=, as torch's F.linear_cross_entropy takes it",
                      DeprecationWarning, stacklevel=3)
    if linear_bias is not None and old is not None:
        raise TypeError("linear_cross_entropy got both the deprecated bias and linear_bias")
    return old if old is not None else linear_bias


# ---------------------------------------------------------------------------------------------------------------
# Argument checks


def _fail(message):
    raise _checks.ArgumentError(message)


def _options(input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing, options, z_loss,
             softcap, focal_gamma, shift, return_lse, input_precision, process_group=None,
             accumulate_in_input_dtype=False, schedule=None, return_token_accuracy=False, return_entropy=False):
    _checks.check_tensor("input", input, floating=True)
    if input.dim() == 0:
        _fail("expected input with dimensionality at least 1 (..., in_features), got 0")
    _checks.check_tensor("linear_weight", weight, floating=True, device=input.device)
    if weight.dim() < 2:
        _fail(f"expected linear_weight with dimensionality at least 2, got {weight.dim()}")
    if weight.shape[-1] != input.shape[-1]:
        _fail(f"expected equal input and linear_weight last dimensions (in_features), got {input.shape[-1]} and "
              f"{weight.shape[-1]}, respectively")
    if weight.shape[0] == 0:
        _fail("linear_weight must have at least one row (class), got shape (0, ...)")
    out_features = tuple(weight.shape[1:-1])
    if out_features and input.dim() != 2:
        _fail(f"K-dimensional loss defined by linear_weight shape {tuple(weight.shape)} requires batched input, "
              f"(N, {input.shape[-1]}), got {'unbatched ' if input.dim() == 1 else ''}input with shape "
              f"{tuple(input.shape)}")
    if weight.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        raise TypeError(f"linear_weight and linear_bias must have input's dtype {input.dtype} (outside "
                        f"torch.autocast), got {weight.dtype}" + ("" if bias is None else f" and {bias.dtype}"))
    n_classes = weight.shape[0]
    if bias is not None:
        _checks.check_tensor("linear_bias", bias, floating=True, device=input.device)
        if tuple(bias.shape) != (n_classes, *out_features):
            _fail(f"expected linear_bias shape {(n_classes, *out_features)}, got {tuple(bias.shape)}")
    _checks.check_tensor("target", target, device=input.device)
    lead = tuple(input.shape[:-1])
    prob_target = target.is_floating_point()
    if prob_target:
        if tuple(target.shape) != (*lead, n_classes, *out_features):
            _fail(f"target holds class probabilities, so its shape must be the logits' "
                  f"{(*lead, n_classes, *out_features)}, got {tuple(target.shape)}")
        if ignore_index is not None:
            _fail("ignore_index cannot be specified when target contains probabilities")
        if focal_gamma != 0.0 or shift:
            _fail("focal_gamma and shift need class-index targets")
    else:
        _checks.check_tensor("target", target, floating=False)
        if target.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"target must be int64 (or int32) class indices, got {target.dtype}")
        if tuple(target.shape) != (*lead, *out_features):
            _fail(f"target must have shape {(*lead, *out_features)} (input's leading shape, then linear_weight's "
                  f"out_features) for class indices, or {(*lead, n_classes, *out_features)} for class "
                  f"probabilities, got {tuple(target.shape)}")
    if class_weight is not None:
        _checks.check_tensor("weight", class_weight, floating=True, dims=(1,), device=input.device)
        if class_weight.shape[0] != n_classes:
            _fail(f"weight must have one entry per class ({n_classes}), got shape {tuple(class_weight.shape)}")
        if class_weight.requires_grad and not prob_target and torch.is_grad_enabled():
            _fail("weight cannot require grad with class-index targets: torch's cross_entropy is not "
                  "differentiable in weight there")
    _checks.check_reduction(reduction)
    shift = _checks.check_bool("shift", shift)
    return_lse = _checks.check_bool("return_lse", return_lse)
    accumulate_in_input_dtype = _checks.check_bool("accumulate_in_input_dtype", accumulate_in_input_dtype)
    if shift and (input.dim() < 2 or out_features):
        _fail(f"shift needs a sequence dimension and a 2-D linear_weight: input (..., T, H), got input "
              f"{tuple(input.shape)} and linear_weight {tuple(weight.shape)}")
    if input_precision is not None and not isinstance(input_precision, str):
        raise TypeError(f"input_precision must be None or a str, got {type(input_precision).__name__}")
    if input_precision is not None and input_precision not in _PRECISIONS:
        raise ValueError(f"input_precision must be one of {', '.join(map(repr, _PRECISIONS))}, "
                         f"got {input_precision!r}")
    chunk_rows = _chunk_rows_option(options)
    metrics = token_metrics.check(return_token_accuracy, return_entropy, prob_target)
    if metrics and process_group is not None:
        raise ValueError("return_token_accuracy and return_entropy need the whole vocabulary: not with process_group")
    class_offset, shard_widths = 0, ()
    if process_group is not None:
        if accumulate_in_input_dtype:
            raise ValueError("accumulate_in_input_dtype=True forms the gradient per token chunk from the whole "
                             "vocabulary's logits: it does not combine with process_group (a shard of the classes)")
        if out_features or prob_target:
            raise ValueError("process_group takes class-index targets and a 2-D linear_weight (C, H)")
        n_classes, class_offset, shard_widths = _distributed.shard_classes(
            _distributed.check_group(process_group), n_classes, input.device, rows=input.numel() // input.shape[-1],
            hidden_size=input.shape[-1], input_dtype=input.dtype, weight_dtype=weight.dtype, bias=bias is not None)
    if ignore_index is None:
        ignore_index = -100
    out_dtype = torch.promote_types(input.dtype, target.dtype) if prob_target else input.dtype
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
        token_metrics=metrics,
        input_precision=input_precision,
        accumulate_in_input_dtype=accumulate_in_input_dtype,
        schedule=_schedule(schedule, input, options),
        chunk_rows=chunk_rows,
        out_features=out_features,
        out_dtype=_checks.autocast_fp32(input.device, out_dtype),
        n_classes=n_classes,
        class_offset=class_offset,
        shard_widths=shard_widths,
        process_group=process_group,
    )


def _schedule(value, input, options):
    """The call's schedule: the argument, else the environment's, else "chunked" for 16-bit inputs on CUDA (the
    logits chunk in the input's dtype is what eager computes there) or when torch's chunking ``options`` are given,
    and "pointer" otherwise."""
    if value is None and not os.environ.get(SCHEDULE_ENV):
        chunked = options is not None or (input.is_cuda and input.dtype in (torch.float16, torch.bfloat16))
        value = "chunked" if chunked else "pointer"
    return _schedules.resolve("schedule", value, SCHEDULES, SCHEDULE_ENV)


def _chunk_rows_option(options):
    """Tokens per chunk from a ``torch.nn.LinearCrossEntropyOptions`` (its ``batch_chunk_size``), or None."""
    if options is None:
        return None
    torch_options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if torch_options is None or not isinstance(options, torch_options):
        raise TypeError(f"options must be None or a torch.nn.LinearCrossEntropyOptions, got "
                        f"{type(options).__name__}")
    return options.batch_chunk_size


# ---------------------------------------------------------------------------------------------------------------
# The definition, and what the engines share


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


def _lead_shape(input, opts):
    """The shape of the per-row results (``'none'``'s loss, the lse): input's leading shape, then the K
    dimensions."""
    return (*input.shape[:-1], *opts.out_features)


def _shifted_target(target, opts):
    """The class each row predicts, flat (rows,), as int64: ``target[..., t + 1]`` with ``shift`` (the last
    position of each sequence ignored), a copy only here and in the torch backend's chunks."""
    y = target.to(torch.int64)
    if opts.shift:
        y = torch.cat([y[..., 1:], torch.full_like(y[..., :1], opts.ignore_index)], dim=-1)
    return y.reshape(-1)


def _token_targets(target, opts):
    """The target per token, first dimension the rows of ``_as_rows(input)``: class indices (rows,) (shifted) or
    (rows, *out_features), or probabilities (rows, C, *out_features)."""
    if target.is_floating_point():
        return target.reshape(-1, opts.n_classes, *opts.out_features)
    if opts.out_features:
        return target.to(torch.int64).reshape(-1, *opts.out_features)
    return _shifted_target(target, opts)


def _rows_and_lse(opts, x2d, weight, bias, y, class_weight=None):
    """Per-row losses and log-sum-exps of ``x2d @ weight.T + bias`` in the compute dtype (torch ops), of shape
    (rows, *out_features)."""
    dtype = _family.compute_dtype(x2d, y)
    if opts.process_group is not None:  # a shard of the classes; the input's gradient is summed over the ranks
        x2d = _distributed.copy_to_group(x2d, opts.process_group)
    logits = F.linear(x2d.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return _rows_and_lse_of_logits(opts, logits, y, class_weight)


def _rows_and_lse_of_logits(opts, logits, y, class_weight):
    """``_rows_and_lse`` from the (rows, C prod(out_features)) logits."""
    dtype = logits.dtype
    logits = _class_view(logits, opts)
    class_weight = None if class_weight is None else class_weight.to(dtype)
    if opts.process_group is not None:
        return ce.sharded_rows_and_lse(opts.row_options(dtype), logits, y, class_weight, None)
    rows = ce.definition(opts.row_options(dtype), logits, y, class_weight, None)
    if opts.softcap is not None:
        logits = opts.softcap * torch.tanh(logits / opts.softcap)
    return rows, torch.logsumexp(logits, dim=1)


def _class_view(logits, opts):
    """(rows, C prod(out_features)) logits as (rows, C, *out_features), the class dimension second."""
    per_class = math.prod(opts.out_features)
    return logits.view(logits.shape[0], logits.shape[1] // per_class, *opts.out_features)


def _denominator(y, class_weight, opts, dtype):
    """The ``mean``'s denominator as a 0-d device tensor (no host sync), from the per-token target: the weight of
    the rows whose target is not ignored, as torch's."""
    return ce.mean_denominator(y, class_weight, opts, dtype)


def _definition(opts, input, weight, bias, target, class_weight=None):
    """``(loss, lse)`` in torch ops, the logits materialized: the higher-order gradients of every engine."""
    dtype = _family.compute_dtype(input, target)
    y = _token_targets(target, opts)
    rows, lse = _rows_and_lse(opts, _as_rows(input), weight, bias, y, class_weight)
    denominator = _denominator(y, class_weight, opts, dtype) if opts.reduction == "mean" else None
    lead = _lead_shape(input, opts)
    return _family.reduce(rows.reshape(-1), opts.reduction, denominator, lead).to(opts.out_dtype), lse.reshape(lead)


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
        denominator = _denominator(_shifted_target(target, opts), None, opts, dtype) if opts.reduction == "mean" \
            else None
        kw = dict(ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing, focal_gamma=opts.focal_gamma,
                  z_loss=opts.z_loss, shift=opts.shift)
        if opts.process_group is None:
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
        return loss, lse, row_state, denominator

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, input, weight, bias, target = inputs
        ctx.mark_non_differentiable(*(t for t in output[2:] if t is not None))
        _family.save(ctx, opts, needs, (input, weight, bias, target), state=output[2:4], differentiable=2)

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _recompute, _definition, grad_outputs)


# ---------------------------------------------------------------------------------------------------------------
# The chunked schedule (Triton backends): token chunks whose logits exist in the input's dtype, as eager's do


def _chunk_rows(opts, x2d, weight):
    """Tokens per chunk: ``options.batch_chunk_size`` when given, else as many as fit ``workspace_bytes`` of logits
    (``configs.LCE_CHUNK_BYTES`` by default)."""
    if opts.chunk_rows:
        return opts.chunk_rows
    override = _config(opts, x2d, weight).get("chunk_rows")
    if override:
        return override
    from ..kernels.configs import LCE_CHUNK_BYTES

    return _lm_head.chunk_rows(weight.shape[0], x2d.dtype.itemsize, opts.schedule.workspace_bytes or LCE_CHUNK_BYTES)


def _chunked_sweep(opts, needs, x2d, weight, bias, y, class_weight, row_state, *, rows=None, scale,
                   metrics=(None, None)):
    """One sweep of the LM-head engine (``fusedloss._lm_head``) with the cross-entropy kernels as its row kernel, in
    place: with ``rows`` the forward kernel (per-row loss and state, the gradient times the 0-d ``scale``), else the
    backward kernel from ``row_state`` (times ``scale``, 0-d or per row, and a probability target's gradient). dW
    summed in the compute dtype (the weight's with ``accumulate_in_input_dtype``, Liger-Kernel's semantics).
    The forward fills the token ``metrics`` buffers (accuracy, entropy: None where not asked) from each chunk's
    logits before the kernel overwrites them. Returns (dX, dW, db, dtarget), None where not needed."""
    from ..kernels.cross_entropy import cross_entropy_backward, cross_entropy_forward

    need_t = needs[3]
    per_row = math.prod(opts.out_features)  # K-dimensional losses: rows of the kernels per token
    view_shape = (opts.n_classes, *opts.out_features)
    dtype = row_state.dtype
    dt = _alloc.empty(tuple(y.shape), dtype=y.dtype, device=x2d.device) if need_t else None
    # fp16 with an fp32 dW accumulator keeps G unscaled by a 0-d scale (p / N would flush to zero) and scales at the
    # end; a dW summed in fp16 (accumulate_in_input_dtype) would overflow unscaled, so it takes the scale in G, as
    # eager's fp16 gradient does
    post = scale if scale.dim() == 0 and x2d.dtype == torch.float16 and not opts.accumulate_in_input_dtype else None
    kernel_scale = torch.ones_like(scale) if post is not None else scale
    gradient = any(needs[:3])

    def row_kernel(logits, start, stop):
        view = logits.view(stop - start, *view_shape)
        r0, r1 = start * per_row, stop * per_row
        if rows is not None:
            if opts.token_metrics:
                token_metrics.of_logits(view, y[start:stop], opts.ignore_index, opts.softcap,
                                        *(None if m is None else m[r0:r1] for m in metrics), kernels=True)
            cross_entropy_forward(view, y[start:stop], class_weight, None, kernel_scale if gradient else None,
                                  rows[r0:r1], row_state[r0:r1], view if gradient else None,
                                  ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing,
                                  focal_gamma=opts.focal_gamma, focal_alpha=1.0, z_loss=opts.z_loss,
                                  softcap=opts.softcap)
        else:
            chunk_scale = kernel_scale if kernel_scale.dim() == 0 else kernel_scale[r0:r1]
            cross_entropy_backward(view, y[start:stop], class_weight, row_state[r0:r1], chunk_scale,
                                   view if gradient else None, dt[start:stop] if need_t else None,
                                   label_smoothing=opts.label_smoothing, softcap=opts.softcap)

    dx, dw, db = _lm_head.sweep(x2d, weight, bias, _chunk_rows(opts, x2d, weight), row_kernel, needs=needs[:3],
                                acc_dtype=weight.dtype if opts.accumulate_in_input_dtype else dtype,
                                bias_dtype=dtype, post_scale=post)
    if post is not None and dt is not None:
        dt.mul_(post.to(dt.dtype))
    return dx, dw, db, dt


def _live_tokens(opts, y):
    """``_lm_head.live_tokens`` where the sweep may leave tokens out: not for probability targets, K-dimensional
    losses or a returned lse (every token has one)."""
    if y.is_floating_point() or opts.out_features or opts.return_lse:
        return None
    return _lm_head.live_tokens(y, opts.ignore_index)


class _LinearCrossEntropyChunked(_family.LossFunction):
    @staticmethod
    def forward(opts, needs, input, weight, bias, target, class_weight):
        from ..kernels.cross_entropy_rows import ROW_STATE

        x2d = _as_rows(input)
        y = _token_targets(target, opts).contiguous()
        dtype = _family.compute_dtype(input, target)
        denominator = _denominator(y, class_weight, opts, dtype) if opts.reduction == "mean" else None
        live = _live_tokens(opts, y)
        xs, ys = _lm_head.take(x2d, live), _lm_head.take(y, live)
        n_rows = xs.shape[0] * math.prod(opts.out_features)
        rows = _alloc.empty(n_rows, dtype=dtype, device=input.device)
        row_state = _alloc.empty((n_rows, ROW_STATE), dtype=dtype, device=input.device)
        # the gradient is formed here when its scale is one number ('mean', 'sum') and the target needs none
        fused = opts.reduction != "none" and any(needs[:3]) and not needs[3]
        scale = _family.fused_grad_scale(opts.reduction, denominator, dtype, input.device) if fused else \
            torch.ones((), dtype=dtype, device=input.device)
        metrics = token_metrics.buffers(opts.token_metrics, n_rows, dtype, input.device)
        grads = _chunked_sweep(opts, needs if fused else (False,) * 4, xs, weight, bias, ys, class_weight,
                               row_state, rows=rows, scale=scale, metrics=metrics)
        lead = _lead_shape(input, opts)
        rows = _lm_head.spread(rows, live, x2d.shape[0])
        loss = _family.reduce(rows, opts.reduction, denominator, lead).to(opts.out_dtype)
        lse = _lm_head.spread(row_state[:, 0] + row_state[:, 1], live, x2d.shape[0]).reshape(lead)
        accuracy, entropy = (None if m is None else _lm_head.spread(m, live, x2d.shape[0]) for m in metrics)
        if not fused:
            return loss, lse, accuracy, entropy, row_state, denominator, live
        dx, dw, db, _ = grads
        return (loss, lse, accuracy, entropy, row_state, denominator, live,
                None if dx is None else _lm_head.spread(dx, live, x2d.shape[0]).view(input.shape),
                None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, input, weight, bias, target, class_weight = inputs
        ctx.mark_non_differentiable(*(t for t in output[2:] if t is not None))
        fused = [*output[7:], None, None] if len(output) > 7 else None
        _family.save(ctx, opts, needs, (input, weight, bias, target, class_weight), state=output[4:7], fused=fused,
                     differentiable=2)

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _chunked_recompute, _definition, grad_outputs)


def _chunked_recompute(ctx, inputs, state, grad_outputs):
    """The gradients from the saved inputs: the sweep once more, over the same live tokens. A 0-d loss scale (and
    no target gradient) reruns the forward's sweep, so that a second backward gives the first one's gradient to the
    bit (gradcheck's reentrancy test); 'none' and a probability target's gradient run the backward kernel, scaled
    per row. A gradient into the returned lse goes through the definition (the logits materialized): run the
    recompute schedule ("pointer") where that matters."""
    input, weight, bias, target, class_weight = inputs
    row_state, denominator, live = state
    opts, needs = ctx.opts, ctx.needs
    if grad_outputs[1] is not None:
        return _family.definition_grads(ctx, _definition, grad_outputs)
    x2d = _as_rows(input)
    xs, ys = _lm_head.take(x2d, live), _lm_head.take(_token_targets(target, opts).contiguous(), live)
    dtype = row_state.dtype
    grad_loss = grad_outputs[0].to(dtype)
    if opts.reduction != "none" and not needs[3]:
        scale = _family.fused_grad_scale(opts.reduction, denominator, dtype, input.device)
        rows = torch.empty(row_state.shape[0], dtype=dtype, device=input.device)
        grads = _chunked_sweep(opts, needs, xs, weight, bias, ys, class_weight, torch.empty_like(row_state),
                               rows=rows, scale=scale)[:3]
        grads = [None if g is None else _family.scale_unless_one(g, grad_loss) for g in grads]
        dt = None
    else:
        scale = _family.grad_scale(grad_loss, opts.reduction, denominator)
        *grads, dt = _chunked_sweep(opts, needs, xs, weight, bias, ys, class_weight, row_state,
                                    scale=_lm_head.take(scale.reshape(-1) if scale.dim() else scale, live))
    dx, dw, db = grads
    return (None if dx is None else _lm_head.spread(dx, live, x2d.shape[0]).view(input.shape),
            None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
            None if dt is None else dt.view(target.shape), None)


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


def _chunks(n_rows, n_classes, dtype, x2d, plain=False):
    """Token chunks whose logits (in the compute ``dtype``) take at most the larger of TORCH_CHUNK_BYTES and the
    input's own size in that dtype (torch's chunked path sizes its chunks by that aspect ratio too), four times that
    for ``plain`` chunks, whose gradient needs no temporaries of the chunk's size (autograd's need about four)."""
    itemsize = torch.finfo(dtype).bits // 8
    budget = max(TORCH_CHUNK_BYTES, x2d.numel() * itemsize) * (4 if plain else 1)
    step = max(1, budget // (max(1, n_classes) * itemsize))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _plain(opts, y, grad_lse, needs):
    """Whether a chunk's gradient has the closed form ``w_y (softmax - onehot)`` that ``_plain_chunk`` writes in
    place: class indices, 2-D weight, no extra but a class weight, no gradient into the lse."""
    return (not y.is_floating_point() and not opts.out_features and grad_lse is None and not needs[3]
            and opts.label_smoothing == 0.0 and opts.focal_gamma == 0.0 and opts.z_loss == 0.0
            and opts.softcap is None)


def _plain_chunk(opts, logits, y, class_weight, grad_rows):
    """(rows, lse) of a plain chunk, and its gradient written over ``logits``: ``G = c (p - onehot(y))`` with
    ``c = grad_rows * w_y`` (0 on ignored rows), in place (one chunk-sized buffer instead of autograd's four or
    five, so the chunks can be larger at the same peak memory)."""
    valid = y != opts.ignore_index
    y_safe = torch.where(valid, y, 0).unsqueeze(1)
    x_y = logits.gather(1, y_safe).squeeze(1)
    m = logits.amax(dim=1, keepdim=True)
    m = torch.where(m > float("-inf"), m, 0.0)  # a row of -inf: s = 0 and lse = -inf, as logsumexp gives
    p = logits.sub_(m).exp_()
    s = p.sum(dim=1, keepdim=True)
    lse = (m + s.log()).squeeze(1)
    w_y = torch.ones_like(lse) if class_weight is None else class_weight.to(lse.dtype)[y_safe.squeeze(1)]
    w_y = torch.where(valid, w_y, 0.0)
    rows = torch.where(valid, w_y * (lse - x_y), 0.0)
    coef = grad_rows * w_y
    p.mul_((coef.unsqueeze(1) / s))
    p.scatter_add_(1, y_safe, -coef.unsqueeze(1))
    return rows, lse


def _chunk_grads(opts, needs, x2d, weight, bias, y, class_weight, rows, grad_rows, grad_lse, grads,
                 metrics=(None, None)):
    """The gradients of tokens ``rows`` with output gradients ``grad_rows`` (and ``grad_lse``): the chunk's logits
    (compute dtype; ``weight`` and ``bias`` already in it), their gradient G (``_plain_chunk``'s closed form in
    place, else autograd through the cross-entropy alone), then dX = G W into ``grads[0]``'s rows, dW += G^T X and
    db += the column sums of G in place (no dW-sized temporary per chunk); a probability target's gradient into
    ``grads[3]``'s rows. Returns the rows' (loss, lse)."""
    x_chunk = x2d[rows].to(weight.dtype)
    with torch.no_grad():
        logits = F.linear(x_chunk, weight, bias)
    _chunk_metrics(opts, logits, y[rows], rows, metrics)
    if _plain(opts, y, grad_lse, needs):
        with torch.no_grad():
            out_rows, out_lse = _plain_chunk(opts, logits, y[rows], class_weight,
                                             grad_rows.expand(logits.shape[:1]))
        g, g_target = logits, None
    else:
        with torch.enable_grad():
            logits.requires_grad_()
            target = y[rows]
            if needs[3]:  # a probability target's gradient
                target = target.detach().to(weight.dtype).requires_grad_()
            out_rows, out_lse = _rows_and_lse_of_logits(opts, logits, target, class_weight)
            outputs, output_grads = [out_rows], [grad_rows.expand(out_rows.shape)]
            if grad_lse is not None:
                outputs.append(out_lse)
                output_grads.append(grad_lse[rows])
            g, *g_target = torch.autograd.grad(outputs, [logits, target] if needs[3] else [logits], output_grads)
    if needs[0]:
        torch.mm(g, weight, out=grads[0][rows])
    if needs[1]:
        grads[1].addmm_(g.t(), x_chunk)
    if needs[2]:
        grads[2] += g.sum(dim=0)
    if needs[3]:
        grads[3][rows] = g_target[0]
    return out_rows.detach(), out_lse.detach()


def _chunk_metrics(opts, logits, y, rows, metrics):
    """The token metrics of tokens ``rows`` from their logits (rows, C prod(out_features)), into ``metrics``."""
    if opts.token_metrics:
        per_row = math.prod(opts.out_features)
        token_metrics.of_logits(_class_view(logits, opts), y, opts.ignore_index,
                                opts.softcap, *(None if m is None else m[rows.start * per_row:rows.stop * per_row]
                                                for m in metrics), kernels=False)


def _new_grads(needs, x2d, weight, bias, y, dtype):
    device = x2d.device
    return [torch.empty(x2d.shape, dtype=dtype, device=device) if needs[0] else None,
            torch.zeros(weight.shape, dtype=dtype, device=device) if needs[1] else None,
            torch.zeros(weight.shape[0], dtype=dtype, device=device) if needs[2] else None,
            torch.empty(y.shape, dtype=dtype, device=device) if needs[3] else None]


def _in_compute_dtype(weight, bias, dtype):
    """The classifier in the compute dtype, converted once per call rather than once per chunk (for 16-bit
    weights a copy of 4 V H bytes, the size of the fp32 dW the chunks accumulate into)."""
    return weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)


def _as_param_grads(grads, input, weight, bias, target):
    like = (input, weight, bias, target)
    return [None if g is None else g.to(t.dtype).reshape(t.shape) for g, t in zip(grads, like)]


class _LinearCrossEntropyTorch(_family.LossFunction):
    @staticmethod
    def forward(opts, needs, input, weight, bias, target, class_weight):
        dtype = _family.compute_dtype(input, target)
        x2d = _as_rows(input)
        y = _token_targets(target, opts)
        n_rows = x2d.shape[0]
        per_token = (n_rows, *opts.out_features)
        rows = torch.empty(per_token, dtype=dtype, device=input.device)
        lse = torch.empty(per_token, dtype=dtype, device=input.device)
        denominator = _denominator(y, class_weight, opts, dtype) if opts.reduction == "mean" else None
        need = tuple(needs[:4])
        fused = any(need) and opts.reduction != "none"
        grads = _new_grads(need, x2d, weight, bias, y, dtype) if fused else None
        scale = _family.fused_grad_scale(opts.reduction, denominator, dtype, input.device) if fused else None
        weight_c, bias_c = _in_compute_dtype(weight, bias, dtype)
        metrics = token_metrics.buffers(opts.token_metrics, rows.numel(), dtype, input.device)
        for chunk in _chunks(n_rows, weight.shape[0], dtype, x2d, fused and _plain(opts, y, None, need)):
            if fused:  # the chunk's loss and its gradient from one evaluation: 6 N H V FLOPs in all
                rows[chunk], lse[chunk] = _chunk_grads(opts, need, x2d, weight_c, bias_c, y, class_weight, chunk,
                                                       scale, None, grads, metrics)
            else:
                with torch.no_grad():
                    logits = F.linear(x2d[chunk].to(dtype), weight_c, bias_c)
                    _chunk_metrics(opts, logits, y[chunk], chunk, metrics)
                    rows[chunk], lse[chunk] = _rows_and_lse_of_logits(opts, logits, y[chunk], class_weight)
        lead = _lead_shape(input, opts)
        loss = _family.reduce(rows.reshape(-1), opts.reduction, denominator, lead).to(opts.out_dtype)
        fused_grads = _as_param_grads(grads, input, weight, bias, target) if fused else (None,) * 4
        return loss, lse.reshape(lead), *metrics, *fused_grads, denominator

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, input, weight, bias, target, class_weight = inputs
        _, _, _, _, dx, dw, db, dt, denominator = output
        ctx.mark_non_differentiable(*(t for t in output[2:] if t is not None))
        fused = [dx, dw, db, dt, None] if any(t is not None for t in (dx, dw, db, dt)) else None
        _family.save(ctx, opts, needs, (input, weight, bias, target, class_weight), state=(denominator,),
                     fused=fused, differentiable=2)

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _torch_recompute, _definition, grad_outputs)


def _torch_recompute(ctx, inputs, state, grad_outputs):
    with _checks.autocast_off(inputs[0].device):
        return _torch_recompute_chunks(ctx, inputs, state, grad_outputs)


def _torch_recompute_chunks(ctx, inputs, state, grad_outputs):
    input, weight, bias, target, class_weight = inputs
    (denominator,) = state
    opts, needs = ctx.opts, tuple(ctx.needs[:4])
    dtype = _family.compute_dtype(input, target)
    x2d = _as_rows(input)
    y = _token_targets(target, opts)
    row_scale, dlse = _row_and_lse_scales(grad_outputs, opts, denominator, dtype, input.device)
    if row_scale.dim():
        row_scale = row_scale.reshape(x2d.shape[0], *opts.out_features)
    if dlse is not None:
        dlse = dlse.reshape(x2d.shape[0], *opts.out_features)
    grads = _new_grads(needs, x2d, weight, bias, y, dtype)
    weight_c, bias_c = _in_compute_dtype(weight, bias, dtype)
    for chunk in _chunks(x2d.shape[0], weight.shape[0], dtype, x2d, _plain(opts, y, dlse, needs)):
        _chunk_grads(opts, needs, x2d, weight_c, bias_c, y, class_weight, chunk,
                     row_scale if row_scale.dim() == 0 else row_scale[chunk], dlse, grads)
    return (*_as_param_grads(grads, input, weight, bias, target), None)
