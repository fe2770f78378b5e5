"""Cross-entropy family, host side: ``cross_entropy`` (a drop-in for ``torch.nn.functional.cross_entropy`` with
focal weighting, z-loss and soft-capping on top) and ``focal_loss``.

The math, and the four per-row gradient coefficients the kernels use, are derived in the docstring of
``fusedloss.kernels.cross_entropy_rows``; ``definition`` below states the loss in torch ops (the torch backend, and
the higher-order gradients of the kernels). Memory on the Triton path: the logits' gradient in the logits' dtype
(or in the logits themselves with ``inplace_backward=True``) and O(rows) fp32 vectors, never an N x C fp32 buffer.
"""

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _alloc, _checks, _distributed, _dtensor, _family, _schedules
from .._backend import backend, runs_definition
from . import token_metrics


@dataclasses.dataclass(frozen=True)
class CrossEntropyOptions:
    """Everything but the tensors: what both backends compute (see ``cross_entropy`` for each field)."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    focal_gamma: float = 0.0
    focal_alpha: float = 1.0  # the scalar multiplier; a per-class alpha travels as a tensor
    z_loss: float = 0.0
    softcap: Optional[float] = None
    inplace_backward: bool = False
    # the Triton forward's schedule (SCHEDULES): "two_pass" reads each row twice (statistics, then the gradient);
    # "single_read" once, for the fused path of layouts it covers (opt-in until a GPU run has measured it)
    schedule: str = "two_pass"
    out_dtype: torch.dtype = torch.float32  # what torch returns: input's dtype, promoted, or fp32 under autocast
    # vocabulary parallelism: the input holds classes class_offset .. of n_classes, split over process_group
    n_classes: int = 0
    class_offset: int = 0
    process_group: Optional[object] = dataclasses.field(default=None, compare=False)

    @property
    def has_extras(self):
        return self.focal_gamma != 0.0 or self.focal_alpha != 1.0 or self.z_loss != 0.0 or self.softcap is not None


# schedule name -> itself (fusedloss._schedules.resolve); the first is the default
SCHEDULES = {"two_pass": "two_pass", "single_read": "single_read"}
SCHEDULE_ENV = "FUSEDLOSS_CE_SCHEDULE"


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, focal_gamma=0.0, focal_alpha=None, z_loss=0.0,
                  softcap=None, inplace_backward=False, process_group=None, schedule=None, return_token_accuracy=False,
                  return_entropy=False):
    """Softmax cross-entropy between logits and class indices or class probabilities, fused in one kernel.

    A drop-in for ``torch.nn.functional.cross_entropy`` (same positional order, same deprecated
    ``size_average`` / ``reduce``, same result dtype, fp32 under ``torch.autocast`` as torch's autocast policy
    gives), with composable extras.

    Args:
        input: logits, ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; float16, bfloat16, float32 or float64;
            any strides.
        target: class indices (int64 or uint8, as torch accepts; compared in int64), ``()``, ``(N,)`` or
            ``(N, d1, ..., dk)``, in ``[0, C)`` or equal to ``ignore_index``; or class probabilities of the
            input's shape (floating point, differentiable).
        weight: optional ``(C,)`` rescaling weight per class, as in torch (differentiable for probability targets).
        ignore_index: class index whose rows contribute neither loss nor gradient (class-index targets only).
        reduction: ``'none'`` (loss of the target's shape), ``'mean'`` (sum over rows divided by the sum of the
            target classes' weights over non-ignored rows, or by the number of rows for probability targets, as
            in torch; NaN when every row is ignored, with a zero gradient) or ``'sum'``.
        label_smoothing: in ``[0, 1]``, PyTorch's convention (with weights and ``ignore_index`` as torch does).
        focal_gamma: focusing exponent ``>= 0``; each row's (smoothed, weighted) cross-entropy is multiplied by
            ``(1 - p_t) ** focal_gamma``, ``p_t`` the softmax probability of the target class (after the cap).
            Class-index targets only. Gradients stay finite for ``0 < focal_gamma < 1`` at saturated predictions.
        focal_alpha: ``None``, a number multiplying each row's loss, or a ``(C,)`` tensor indexed by the target
            class. It does not enter the ``mean`` denominator.
        z_loss: coefficient ``>= 0`` of PaLM's ``z_loss * logsumexp(x) ** 2``, added to each non-ignored row's
            loss before the reduction.
        softcap: ``None`` or a finite ``c > 0``: logits become ``c * tanh(x / c)`` before everything else
            (Gemma 2). (An infinite cap is no cap: pass ``None``.)
        inplace_backward: write the gradient over ``input`` to save its memory (fused ``mean``/``sum`` path on
            the Triton backends; ignored on the torch backend and under ``torch.compile``). ``input`` then holds
            the gradient after the call; its version counter is bumped, so autograd raises instead of silently
            using the overwritten values if anything else saved it. The graph can then be backpropagated through
            once: ``retain_graph`` and higher-order gradients need the logits.
        process_group: vocabulary (tensor) parallelism, Megatron's and flash-attention's convention: with a
            ``torch.distributed`` group of W ranks, ``input`` is this rank's slice of the classes, the r-th of W
            contiguous slices in rank order, of any widths (``C`` = the sum of the ranks' ``input.shape[1]``, agreed
            with one all-gather of a few integers per call, read on the host); ``target`` holds global class
            indices, ``weight`` and a per-class ``focal_alpha`` all ``C`` entries, a probability ``target`` this
            rank's slice. Every rank returns the loss of the whole problem, and the gradient of its slice is that
            slice of the single-process gradient. Communication: one all-gather of 5 numbers per row in the
            forward (each rank sends ``20 N`` bytes, 40 for fp64 inputs, N the rows), none in the backward; the
            logits are never gathered. Every rank must call it.
        schedule: the Triton backends' forward, ``"two_pass"`` (each row read twice) or ``"single_read"`` (each
            row read once and its gradient written from registers: 2-D logits of at least 2048 classes with class
            indices, ``mean``/``sum`` with the logits' gradient only; other calls run ``"two_pass"``); None takes
            ``FUSEDLOSS_CE_SCHEDULE``, unset ``"two_pass"``. The same loss and gradient either way.
        return_token_accuracy, return_entropy: also return the per-token accuracy (class indices) and entropy
            (``fusedloss.losses.token_metrics``: detached, 0 on ignored tokens; one more read of the logits each,
            the entropy by a row kernel on the Triton backends). Not with ``process_group``.

    Returns:
        The loss, in the dtype torch would return (the input's; the promoted one for probability targets; fp32
        under autocast); with a metric asked for, a ``LossWithMetrics`` holding it and the metrics.

    DTensor arguments (``fusedloss._dtensor``): replicated logits, logits sharded on the class dimension
    (``Shard(1)``, what ``loss_parallel()`` takes: the vocabulary-parallel path over the mesh's group, no
    ``loss_parallel()`` needed) or on the rows (``Shard(0)``, with ``reduction='none'``); the results and gradients
    are DTensors on the same mesh. Other placements raise a ValueError naming them.

    Out-of-range class indices raise ``IndexError`` on the CPU backends (outside ``torch.compile``) and give the
    row a NaN loss and gradient on GPU, where checking would need a host sync.
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    if _dtensor.has_dtensor(input, target, weight, focal_alpha):
        def call(input, target, weight, alpha, process_group=None):
            return cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=label_smoothing, focal_gamma=focal_gamma,
                                 focal_alpha=focal_alpha if alpha is None else alpha, z_loss=z_loss, softcap=softcap,
                                 inplace_backward=inplace_backward, process_group=process_group, schedule=schedule,
                                 return_token_accuracy=return_token_accuracy, return_entropy=return_entropy)

        alpha = focal_alpha if isinstance(focal_alpha, torch.Tensor) else None
        return _dtensor.dispatch(activations={"input": input}, weights={}, targets={"target": target},
                                 replicated={"weight": weight, "alpha": alpha}, reduction=reduction,
                                 process_group=process_group, call=call, logits=True)
    metrics = token_metrics.check(return_token_accuracy, return_entropy,
                                  isinstance(target, torch.Tensor) and target.is_floating_point())
    if metrics and process_group is not None:
        raise ValueError("return_token_accuracy and return_entropy need the whole vocabulary: not with process_group")
    loss = _cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, focal_gamma, focal_alpha,
                          z_loss, softcap, inplace_backward, process_group, schedule, metrics)
    if not metrics:
        return loss
    rows_view = (input.unsqueeze(0) if input.dim() == 1 else input).detach()
    y = target.unsqueeze(0) if input.dim() == 1 else target
    rows = rows_view.numel() // rows_view.shape[1] if rows_view.shape[1] else y.numel()
    accuracy, entropy = token_metrics.buffers(metrics, rows, _family.compute_dtype(input), input.device)
    token_metrics.of_logits(rows_view, y.detach(), ignore_index, softcap, accuracy, entropy,
                            kernels=not runs_definition(input) and backend(input.device) != "torch")
    shape = _row_shape(input)
    return token_metrics.LossWithMetrics(loss, None if accuracy is None else accuracy.reshape(shape),
                                         None if entropy is None else entropy.reshape(shape))


def _cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, focal_gamma, focal_alpha, z_loss,
                   softcap, inplace_backward, process_group, schedule, metrics):
    """``cross_entropy``'s loss."""
    if metrics and inplace_backward:
        raise ValueError("inplace_backward=True overwrites the logits that the token metrics read")
    opts, alpha = _options(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma,
                           focal_alpha, z_loss, softcap, inplace_backward, process_group, schedule)
    traced = runs_definition(input)
    if traced and target.dtype == torch.uint8:
        target = target.long()  # the decompositions torch.func runs (scatter, gather) index with int64 only
    on_torch = traced or backend(input.device) == "torch"
    # (on the torch backend F.cross_entropy raises IndexError itself, but not across the shards of a group)
    if not target.is_floating_point() and target.device.type == "cpu" and not (on_torch and process_group is None):
        _checks.check_class_range(target, opts.n_classes, ignore_index)
    # The torch backend is the definition itself; so are inputs the kernels do not cover: empty ones, and a
    # differentiable class weight (probability targets), whose gradient the kernels do not produce.
    if on_torch:
        return definition(opts, input, target, weight, alpha)
    needs = _family.needs_grad(input, target, weight, alpha)
    if input.numel() == 0 or needs[2]:
        return definition(opts, input, target, weight, alpha)
    return _CrossEntropy.apply(opts, needs, input, target, weight, alpha)[0]


def focal_loss(input, target, gamma=2.0, alpha=None, weight=None, ignore_index=-100, reduction="mean",
               label_smoothing=0.0):
    """The focal loss of Lin et al. (2017) for softmax classifiers, ``alpha * (1 - p_t) ** gamma * CE``, on the
    cross-entropy kernel.

    ``p_t`` is the target class's softmax probability (``exp(-CE)`` without smoothing). ``alpha`` is ``None``, a
    number multiplying the loss, or a ``(C,)`` tensor indexed by the target class. Shapes, dtypes and the other
    arguments are those of ``cross_entropy``; class-index targets only.
    """
    return cross_entropy(input, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, focal_gamma=gamma, focal_alpha=alpha)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks: metadata only, on every backend, before any launch.


def _n_classes(input):
    return input.shape[1] if input.dim() > 1 else input.shape[0]


def _options(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, focal_alpha, z_loss,
             softcap, inplace_backward, process_group=None, schedule=None):
    """(CrossEntropyOptions, per-class alpha tensor or None), or ValueError / TypeError naming the argument."""
    _checks.check_tensor("input", input, floating=True)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (C,), got a 0-d tensor")
    _checks.check_tensor("target", target, device=input.device)
    _checks.check_reduction(reduction)
    n_classes, class_offset = _n_classes(input), 0
    if process_group is not None:
        n_classes, class_offset, _ = _distributed.shard_classes(
            _distributed.check_group(process_group), n_classes, input.device, rows=input.numel() // max(n_classes, 1),
            dimensions=input.dim(), input_dtype=input.dtype, target_dtype=target.dtype)
    prob_target = target.is_floating_point()
    ignore_index = _checks.check_int("ignore_index", ignore_index)
    if prob_target:
        _checks.check_tensor("target", target, floating=True)
        if target.shape != input.shape:
            raise ValueError(f"target holds class probabilities, so its shape must equal input's "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
        if ignore_index != -100:
            raise ValueError("ignore_index is not supported for class-probability (floating point) targets")
        if focal_gamma != 0.0 or focal_alpha is not None:
            raise ValueError("focal_gamma and focal_alpha need class-index targets (p_t is the target class's "
                             "probability)")
    else:
        _checks.check_tensor("target", target, floating=False)
        if target.dtype not in (torch.int64, torch.uint8):
            raise TypeError(f"target must be int64 (or uint8) class indices, as torch requires, got {target.dtype}")
        expected = _row_shape(input)
        if tuple(target.shape) != expected:
            raise ValueError(f"target must have shape {expected} for input of shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
    if weight is not None:
        _checks.check_tensor("weight", weight, floating=True, dims=(1,), device=input.device)
        if weight.shape[0] != n_classes:
            raise ValueError(f"weight must have one entry per class ({n_classes}), got shape {tuple(weight.shape)}")
        if weight.requires_grad and not prob_target and torch.is_grad_enabled():
            raise ValueError("weight cannot require grad with class-index targets: torch's cross_entropy is not "
                             "differentiable in weight there")
    alpha_tensor = None
    alpha_scalar = 1.0
    if isinstance(focal_alpha, torch.Tensor) and focal_alpha.dim() == 1:
        _checks.check_tensor("focal_alpha", focal_alpha, floating=True, dims=(1,), device=input.device)
        if focal_alpha.shape[0] != n_classes:
            raise ValueError(f"focal_alpha must have one entry per class ({n_classes}), got shape "
                             f"{tuple(focal_alpha.shape)}")
        if focal_alpha.requires_grad and torch.is_grad_enabled():
            raise ValueError("focal_alpha cannot require grad")
        alpha_tensor = focal_alpha
    elif focal_alpha is not None:
        alpha_scalar = _checks.check_number("focal_alpha", focal_alpha)
    softcap = None if softcap is None else _checks.check_number("softcap", softcap, low=0.0, low_open=True,
                                                                finite=True)
    opts = CrossEntropyOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=_checks.check_number("label_smoothing", label_smoothing, low=0.0, high=1.0),
        focal_gamma=_checks.check_number("focal_gamma", focal_gamma, low=0.0, finite=True),
        focal_alpha=alpha_scalar,
        z_loss=_checks.check_number("z_loss", z_loss, low=0.0, finite=True),
        softcap=softcap,
        inplace_backward=_checks.check_bool("inplace_backward", inplace_backward),
        schedule=_schedules.resolve("schedule", schedule, SCHEDULES, SCHEDULE_ENV),
        out_dtype=_checks.autocast_fp32(input.device, _out_dtype(input, target)),
        n_classes=n_classes,
        class_offset=class_offset,
        process_group=process_group,
    )
    return opts, alpha_tensor


def _row_shape(input):
    """The shape of ``reduction='none'``'s result: the input's without the class dimension."""
    return () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])


def _out_dtype(input, target):
    return torch.promote_types(input.dtype, target.dtype) if target.is_floating_point() else input.dtype


# ---------------------------------------------------------------------------------------------------------------
# The definition: the torch backend, and the higher-order gradients of the Triton backends.


def definition(opts, input, target, weight, alpha):
    """``cross_entropy`` in torch ops. Without extras it is ATen's fused kernel, the one ``F.cross_entropy`` calls;
    the extras are composed on top, in fp32 (fp64 for fp64 inputs)."""
    if opts.process_group is not None:
        rows, _ = sharded_rows_and_lse(opts, input, target, weight, alpha)
        dtype = rows.dtype
        denominator = mean_denominator(target, weight, opts, dtype) if opts.reduction == "mean" else None
        return _family.reduce(rows.reshape(-1), opts.reduction, denominator, rows.shape).to(opts.out_dtype)
    if not opts.has_extras and alpha is None:  # ATen's function, the one F.cross_entropy calls
        out = torch._C._nn.cross_entropy_loss(input, target, weight, _family.REDUCTION_ENUM[opts.reduction],
                                              opts.ignore_index, opts.label_smoothing)
        return _family.cast(out, opts.out_dtype)
    dtype = _family.compute_dtype(input, target)
    class_dim = 0 if input.dim() == 1 else 1
    x = input.to(dtype)
    if opts.softcap is not None:
        x = opts.softcap * torch.tanh(x / opts.softcap)
    w = None if weight is None else weight.to(dtype)
    lse = torch.logsumexp(x, dim=class_dim)
    if target.is_floating_point():
        rows = F.cross_entropy(x, target.to(dtype), weight=w, reduction="none",
                               label_smoothing=opts.label_smoothing) + opts.z_loss * lse * lse
        denominator = torch.tensor(float(rows.numel()), dtype=dtype, device=x.device)
        return _family.reduce(rows.reshape(-1), opts.reduction, denominator, rows.shape).to(opts.out_dtype)
    y = target.to(torch.int64)
    valid = y != opts.ignore_index
    y_safe = torch.where(valid, y, 0)
    rows = F.cross_entropy(x, y, weight=w, ignore_index=opts.ignore_index, reduction="none",
                           label_smoothing=opts.label_smoothing)
    if opts.focal_gamma != 0.0:
        log_p_y = torch.log_softmax(x, dim=class_dim).gather(class_dim, y_safe.unsqueeze(class_dim))
        one_minus = -torch.expm1(log_p_y.squeeze(class_dim))
        # (1 - p)^gamma through a where on both sides: at p == 1 exactly the weight is 0 and so is its gradient,
        # instead of pow's gamma * 0^(gamma - 1) = inf times 0
        positive = one_minus > 0
        rows = rows * torch.where(positive, torch.where(positive, one_minus, 1.0) ** opts.focal_gamma, 0.0)
    rows = rows * (opts.focal_alpha if alpha is None else alpha.to(dtype)[y_safe])
    rows = torch.where(valid, rows + opts.z_loss * lse * lse, 0.0)
    denominator = mean_denominator(target, weight, opts, dtype) if opts.reduction == "mean" else None
    return _family.reduce(rows.reshape(-1), opts.reduction, denominator, rows.shape).to(opts.out_dtype)


def merge_partial_stats(stats):
    """(shards, rows, 5) partial statistics (m, s, B, A, x_y) of each shard of the classes -> (rows, 5) over all
    classes: the log-sum-exp merge, A re-based to the common max (a shard whose max is -inf has s = 0 and keeps
    its A)."""
    m_r, s_r, b_r, a_r, x_y = stats.unbind(-1)
    m = m_r.amax(0)
    shift = torch.where(m > float("-inf"), m, 0.0)
    s = (s_r * torch.exp(m_r - shift)).sum(0)
    a = torch.where(m_r > float("-inf"), a_r + b_r * (m_r - shift), a_r).sum(0)
    return torch.stack([m, s, b_r.sum(0), a, x_y.sum(0)], dim=-1)


def sharded_rows_and_lse(opts, input, target, weight, alpha):
    """Per-row losses (the target's shape) and log-sum-exps when ``input`` is this rank's shard of the classes
    (``opts.process_group``), in torch ops: each shard's (m, s, B, A, x_y) per row, gathered from every rank and
    merged (``_distributed.gather_shards``: each rank differentiates only through its own shard), then the
    definition of the module docstring of ``fusedloss.kernels.cross_entropy_rows`` on the merged statistics."""
    dtype = _family.compute_dtype(input, target)
    x = input.to(dtype)
    x = x.unsqueeze(0) if x.dim() == 1 else x.movedim(1, -1)  # (..., classes of this shard)
    if opts.softcap is not None:
        x = opts.softcap * torch.tanh(x / opts.softcap)
    n_cols = x.shape[-1]
    eps, n_classes = opts.label_smoothing, opts.n_classes
    w = None if weight is None else weight.to(dtype)
    shard_w = None if w is None else w[opts.class_offset:opts.class_offset + n_cols]
    m = x.detach().amax(-1)
    shift = torch.where(m > float("-inf"), m, 0.0)
    shifted = x - shift.unsqueeze(-1)
    s = torch.exp(shifted).sum(-1)
    if target.is_floating_point():
        t = target.to(dtype)
        t = t.unsqueeze(0) if t.dim() == 1 else t.movedim(1, -1)
        a = (1.0 - eps) * t + eps / n_classes
    else:
        a = torch.ones_like(x)
    if shard_w is not None:
        a = a * shard_w
    coef_sum = a.sum(-1)
    coef_dot = (a * shifted).sum(-1)
    x_y = torch.zeros_like(m)
    if not target.is_floating_point():
        y = target.to(torch.int64).reshape(m.shape)
        local = y - opts.class_offset
        owned = (y != opts.ignore_index) & (local >= 0) & (local < n_cols)
        x_y = torch.where(owned, x.gather(-1, torch.where(owned, local, 0).unsqueeze(-1)).squeeze(-1), 0.0)
    stats = torch.stack([m, s, coef_sum, coef_dot, x_y], dim=-1).reshape(-1, 5)
    merged = merge_partial_stats(_distributed.gather_shards(stats, opts.process_group))
    m, s, coef_sum, coef_dot, x_y = merged.unbind(-1)
    log_s = torch.log(s)
    lse = m + log_s
    smooth = coef_sum * log_s - coef_dot  # sum_c a_c (lse - x_c)
    shape = _row_shape(input)
    if target.is_floating_point():
        return (smooth + opts.z_loss * lse * lse).reshape(shape), lse.reshape(shape)
    y = target.to(torch.int64).reshape(-1)
    valid = y != opts.ignore_index
    y_safe = torch.where(valid, y, 0)
    w_y = torch.ones_like(m) if w is None else w[y_safe]
    log_p_y = (x_y - m) - log_s
    rows = (1.0 - eps) * w_y * (-log_p_y)
    if eps > 0.0:
        rows = rows + eps / n_classes * smooth
    if opts.focal_gamma != 0.0:
        one_minus = -torch.expm1(log_p_y)
        positive = one_minus > 0
        rows = rows * torch.where(positive, torch.where(positive, one_minus, 1.0) ** opts.focal_gamma, 0.0)
    rows = rows * (opts.focal_alpha if alpha is None else alpha.to(dtype)[y_safe])
    rows = torch.where(valid, rows + opts.z_loss * lse * lse, 0.0)
    return rows.reshape(shape), lse.reshape(shape)


def mean_denominator(target, weight, opts, dtype):
    """What ``mean`` divides by, as a 0-d device tensor (no host sync): the sum of the target classes' weights
    over non-ignored rows (an ignored row contributes 0 even if its clamped class has an inf weight), or the
    number of rows for probability targets."""
    if target.is_floating_point():
        n_rows = target.numel() // max(target.shape[1] if target.dim() > 1 else target.shape[0], 1)
        return torch.full((), float(n_rows), dtype=dtype, device=target.device)
    y = target.to(torch.int64)
    valid = y != opts.ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    y_safe = torch.where(valid & (y >= 0) & (y < weight.shape[0]), y, 0)
    return torch.where(valid, weight.to(dtype)[y_safe], 0.0).sum()


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (compiled or interpreted)


def _needs_copy(input, target):
    """Whether ``input`` and ``target`` need a contiguous copy: layouts the kernels cannot walk with one stride."""
    from ..kernels.cross_entropy import class_layout, index_layout

    walkable = class_layout(target) if target.is_floating_point() else index_layout(target)
    return class_layout(input) is None, walkable is None


def _layouts(input, target, copies=None):
    """``input`` and ``target`` in layouts the kernels walk: themselves, or contiguous copies (``copies``: the
    decision ``_needs_copy`` made earlier)."""
    copy_input, copy_target = copies or _needs_copy(input, target)
    return (input.contiguous() if copy_input else input), (target.contiguous() if copy_target else target)


def _forward_launcher(opts, logits, target, fused):
    """The launcher of ``opts.schedule``'s forward (one per schedule), or the two-pass one where the single-read
    schedule does not apply (a group's shards, a gradient not fused into the forward, a layout it does not
    cover). Both write the same row state, so the backward is the same."""
    from ..kernels import cross_entropy as two_pass
    from ..kernels import cross_entropy_single_read as single_read

    launchers = {"two_pass": two_pass.cross_entropy_forward, "single_read": single_read.cross_entropy_single_read}
    applies = opts.schedule == "two_pass" or (fused and opts.process_group is None
                                              and single_read.single_read_applies(logits, target))
    return launchers[opts.schedule if applies else "two_pass"]


def _inplace(opts):
    return opts.inplace_backward and not torch.compiler.is_compiling()


class _CrossEntropy(_family.LossFunction):
    @staticmethod
    def forward(opts, needs, input, target, weight, alpha):
        from ..kernels.cross_entropy import (
            PARTIAL_STATE,
            ROW_STATE,
            cross_entropy_backward,
            cross_entropy_finish,
            cross_entropy_forward,
        )

        logits, target = _layouts(input, target)
        dtype = _family.compute_dtype(input, target)
        n_rows = logits.numel() // _n_classes(logits)
        # Fused: the forward writes the gradient, already divided by the mean's denominator, and the backward
        # only rescales it. Not when the target needs a gradient too, nor for 'none' (a per-row grad_output).
        fused = needs[0] and not needs[1] and opts.reduction != "none"
        denominator = mean_denominator(target, weight, opts, dtype) if opts.reduction == "mean" else None
        rows = _alloc.empty(n_rows, dtype=dtype, device=input.device)
        row_state = _alloc.empty((n_rows, ROW_STATE), dtype=dtype, device=input.device)
        grad = grad_scale = None
        if fused:
            grad = logits if _inplace(opts) and logits is input else _alloc.empty_like(logits)
            grad_scale = _family.fused_grad_scale(opts.reduction, denominator, dtype, input.device)
        kw = dict(ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing, focal_gamma=opts.focal_gamma,
                  focal_alpha=opts.focal_alpha, z_loss=opts.z_loss)
        if opts.process_group is None:
            _forward_launcher(opts, logits, target, grad is not None)(
                logits, target, weight, alpha, grad_scale, rows, row_state, grad, softcap=opts.softcap, **kw)
        else:  # this rank's statistics, everyone's merged, then the loss; the gradient needs a second read
            stats = _alloc.empty((n_rows, PARTIAL_STATE), dtype=dtype, device=input.device)
            cross_entropy_forward(logits, target, weight, alpha, None, rows, stats, None, softcap=opts.softcap,
                                  n_classes=opts.n_classes, class_offset=opts.class_offset, partial=True, **kw)
            merged = merge_partial_stats(_distributed.all_gather(stats, opts.process_group))
            cross_entropy_finish(merged, target, weight, alpha, rows, row_state, n_classes=opts.n_classes, **kw)
            if grad is not None:
                cross_entropy_backward(logits, target, weight, row_state, grad_scale, grad, None,
                                       label_smoothing=opts.label_smoothing, softcap=opts.softcap,
                                       n_classes=opts.n_classes, class_offset=opts.class_offset)
        if grad is input:
            torch.autograd.graph.increment_version(input)
            grad = None  # the input itself (setup_context knows): an output may not be an input
        loss = _family.reduce(rows, opts.reduction, denominator, _row_shape(input)).to(opts.out_dtype)
        return loss, grad, row_state, denominator

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, input, target, weight, alpha = inputs
        _, grad, row_state, denominator = output
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        in_place = grad is None and needs[0] and not needs[1] and opts.reduction != "none" and _inplace(opts)
        fused = [input if in_place else grad, None, None, None] if (grad is not None or in_place) else None
        # the layouts the backward will walk, decided here: a compiled backward cannot read the saved strides
        ctx.copy_input, ctx.copy_target = _needs_copy(input, target)
        _family.save(ctx, opts, needs, (input, target, weight, alpha), state=(row_state, denominator), fused=fused,
                     keep_inputs=not in_place)

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _recompute, definition, grad_outputs)


def _recompute(ctx, inputs, state, grad_outputs):
    """The gradients from the saved logits and row state: one more pass over the logits, scaled per row."""
    from ..kernels.cross_entropy import cross_entropy_backward

    input, target, weight, _ = inputs
    row_state, denominator = state
    opts, needs = ctx.opts, ctx.needs
    logits, target_view = _layouts(input, target, (ctx.copy_input, ctx.copy_target))
    scale = _family.grad_scale(grad_outputs[0].to(row_state.dtype), opts.reduction, denominator)
    grad = _alloc.empty_like(logits) if needs[0] else None
    grad_target = _alloc.empty_like(target_view) if needs[1] and target.is_floating_point() else None
    cross_entropy_backward(logits, target_view, weight, row_state, scale.contiguous(), grad, grad_target,
                           label_smoothing=opts.label_smoothing, softcap=opts.softcap, n_classes=opts.n_classes,
                           class_offset=opts.class_offset)
    return grad, grad_target, None, None
