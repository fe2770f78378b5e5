"""Pointwise losses, host side: drop-ins for ``torch.nn.functional``'s ``mse_loss``, ``l1_loss``, ``huber_loss``,
``smooth_l1_loss`` and ``kl_div``, and the Bradley-Terry reward loss ``bradley_terry_loss``.

One elementwise kernel (``fusedloss.kernels.pointwise``, formulas there) computes the loss and, when autograd
needs them, the gradients of every differentiable operand in the same pass: for ``mean``/``sum`` the forward
reads each operand once and writes the final gradients (already divided by the mean's denominator), and the
backward only rescales them, with no pass when ``grad_output == 1``; for ``none`` the backward recomputes them with
the per-element ``grad_output``.

Broadcasting follows torch: the operands broadcast to one shape (with torch's warning for the regression losses
when ``target``'s size differs from ``input``'s). The kernel reads each operand through the strides of its
broadcast view (a per-column target, an expanded margin: no copy); only operands whose dimensions do not merge
into a (row, column) stride pair are copied. The gradient of a broadcast operand is summed back to its shape, as
autograd does.
"""

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F

from .. import _alloc, _checks, _family

KL_REDUCTIONS = ("none", "batchmean", "sum", "mean")
# The ATen function of each regression loss (the ones torch.nn.functional calls), with its extra argument.
_ATEN = {"mse": torch._C._nn.mse_loss, "l1": torch._C._nn.l1_loss, "huber": torch._C._nn.huber_loss,
         "smooth_l1": torch._C._nn.smooth_l1_loss}


@dataclasses.dataclass(frozen=True)
class PointwiseOptions:
    """Everything but the tensors: what both backends compute."""

    loss: str  # the formula, one of kernels.pointwise.LOSSES
    reduction: str = "mean"  # of the elementwise loss: 'none', 'mean' or 'sum'
    delta: float = 1.0  # huber's delta, smooth_l1's beta
    margin: float = 0.0  # Bradley-Terry's margin when it is a number (a margin tensor travels as a tensor)
    weight_mean: bool = False  # reduction 'mean' divides by weight.sum() (mse, l1 with a weight, as torch)
    batch: int = 1  # the result is then divided by this (kl_div's 'batchmean': input.size(0))
    shape: tuple = ()  # the operands' broadcast shape: the shape of 'none''s result
    out_dtype: torch.dtype = torch.float32  # what torch returns, fp32 under autocast


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Mean squared error ``w * (input - target) ** 2``; a drop-in for ``torch.nn.functional.mse_loss``.

    Args:
        input: any shape and strides; float16, bfloat16, float32 or float64.
        target: broadcastable with ``input`` (torch warns when the sizes differ); floating point, integer or bool.
        size_average, reduce: deprecated, mapped to ``reduction`` as torch does.
        reduction: ``'none'`` (the broadcast shape) | ``'mean'`` | ``'sum'``.
        weight: optional tensor of ``input``'s size; ``'mean'`` then divides by ``weight.sum()``, as torch does.

    Returns the loss in the promoted dtype of input, target (and weight), fp32 under ``torch.autocast`` for 16-bit
    inputs (also with a weight, where torch's own composite keeps the 16-bit dtype on CPU); gradients for every
    floating operand that requires them. NaN and infinite inputs give torch's values and gradients.
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    return _run(*_regression("mse", input, target, weight, reduction, weight_mean=True))


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Mean absolute error ``w * |input - target|``; a drop-in for ``torch.nn.functional.l1_loss``.

    Shapes, dtypes and arguments as ``mse_loss`` (``'mean'`` with ``weight`` divides by ``weight.sum()``). The
    gradient is 0 at ``input == target`` and where the difference is NaN, as torch's. A bool ``target`` raises
    ``TypeError``, as torch refuses it.
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    return _run(*_regression("l1", input, target, weight, reduction, weight_mean=True))


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """Huber loss: ``(input - target) ** 2 / 2`` where ``|input - target| < delta``, ``delta * (|d| - delta / 2)``
    elsewhere; a drop-in for ``torch.nn.functional.huber_loss``.

    Shapes as ``mse_loss``; ``delta > 0`` (``inf`` gives half the MSE). As in torch the loss has ``input``'s
    dtype (promoted with ``weight``'s), and ``'mean'`` with ``weight`` is ``(w * loss).mean()``, not divided by
    ``weight.sum()``. The gradient at a NaN difference is NaN, as torch's. (torch's own backward fails when input
    and target dtypes differ; this one does not.)
    """
    delta = _checks.check_number("delta", delta, low=0.0, low_open=True)
    return _run(*_regression("huber", input, target, weight, reduction, weight_mean=False, delta=delta))


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """Smooth L1: ``0.5 * d ** 2 / beta`` where ``|d| < beta``, ``|d| - beta / 2`` elsewhere (``d = input -
    target``); a drop-in for ``torch.nn.functional.smooth_l1_loss``. ``beta = 0`` is the L1 loss, as in torch.

    Shapes and dtypes as ``mse_loss``; ``beta >= 0``. The gradient at a NaN difference is NaN, as torch's.
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    beta = _checks.check_number("beta", beta, low=0.0)
    return _run(*_regression("smooth_l1" if beta > 0.0 else "l1", input, target, None, reduction,
                             weight_mean=False, delta=beta))


def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """Pointwise KL divergence ``target * (log target - input)`` with ``input`` in log space; a drop-in for
    ``torch.nn.functional.kl_div``.

    Args:
        input: log-probabilities, any shape and strides; float16, bfloat16, float32 or float64.
        target: broadcastable with ``input`` (no warning, as torch); probabilities, or log-probabilities with
            ``log_target=True``. Floating point.
        reduction: ``'none'`` | ``'batchmean'`` (sum divided by ``input.size(0)``; the KL divergence of rows) |
            ``'sum'`` | ``'mean'`` (sum divided by the number of elements; warns as torch does).
        size_average, reduce: deprecated; override ``reduction`` as in torch (including torch's extra division
            by ``input.size(0)`` when ``reduction='batchmean'`` is also given).
        log_target: whether ``target`` is given as log-probabilities.

    Returns the loss in the promoted dtype of input and target (fp32 under ``torch.autocast``). As in torch,
    elements with ``target == 0`` contribute 0, ``target < 0`` gives NaN, and the gradient of ``target`` is NaN
    where ``target <= 0`` or ``target = inf``.
    """
    if size_average is not None or reduce is not None:
        base = _checks.legacy_reduction(size_average, reduce, reduction)
    else:
        _checks.check_reduction(reduction, KL_REDUCTIONS)
        if reduction == "mean":
            warnings.warn("reduction: 'mean' divides the total loss by both the batch size and the support size."
                          "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
                          "'mean' will be changed to behave the same as 'batchmean' in the next major release.",
                          UserWarning, stacklevel=2)
        base = "sum" if reduction == "batchmean" else reduction
    _checks.check_tensor("input", input, floating=True)
    _checks.check_tensor("target", target, floating=True, device=input.device)
    log_target = _checks.check_bool("log_target", log_target)
    # torch divides by input.size(0) whenever reduction='batchmean' was passed, on top of a legacy reduction.
    batch = input.shape[0] if reduction == "batchmean" and input.dim() != 0 else 1
    opts = PointwiseOptions(
        loss="kl_log_target" if log_target else "kl", reduction=base, batch=batch,
        shape=_broadcast_shape(input.shape, target, "target"),
        out_dtype=_checks.autocast_fp32(input.device, torch.promote_types(input.dtype, target.dtype)))
    return _run(opts, input, target, None, None)


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, reduction="mean"):
    """The Bradley-Terry reward-model loss ``-log sigmoid(chosen_rewards - rejected_rewards - margin)``.

    The RLHF reward loss, with TRL's optional margin: the probability that the chosen response is preferred is
    ``sigmoid(r_chosen - r_rejected)``; a margin asks for a larger gap.

    Args:
        chosen_rewards: rewards of the preferred responses, any shape (usually ``(N,)`` or ``(N, 1)``) and strides;
            float16, bfloat16, float32 or float64.
        rejected_rewards: broadcastable with ``chosen_rewards``, floating point.
        margin: None (0), a number, or a floating tensor broadcastable with the rewards (one margin per pair;
            differentiable).
        reduction: ``'none'`` (the broadcast shape) | ``'mean'`` | ``'sum'``.

    Returns the loss in the promoted dtype of the rewards (and margin), computed in fp32 (fp64 for fp64 inputs);
    ``torch.autocast`` leaves it in that dtype, as it does torch's ``logsigmoid``. Gradients for both rewards and
    a margin tensor that requires grad.
    """
    _checks.check_tensor("chosen_rewards", chosen_rewards, floating=True)
    _checks.check_tensor("rejected_rewards", rejected_rewards, floating=True, device=chosen_rewards.device)
    _checks.check_reduction(reduction)
    shape = _broadcast_shape(chosen_rewards.shape, rejected_rewards, "rejected_rewards")
    out_dtype = torch.promote_types(chosen_rewards.dtype, rejected_rewards.dtype)
    margin_value = 0.0
    if isinstance(margin, torch.Tensor):
        _checks.check_tensor("margin", margin, floating=True, device=chosen_rewards.device)
        shape = _broadcast_shape(shape, margin, "margin")
        out_dtype = torch.promote_types(out_dtype, margin.dtype)
    elif margin is not None:
        margin_value = _checks.check_number("margin", margin, finite=True)
        margin = None
    opts = PointwiseOptions(loss="bradley_terry", reduction=reduction, margin=margin_value, shape=shape,
                            out_dtype=out_dtype)
    return _run(opts, chosen_rewards, rejected_rewards, None, margin)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks: metadata only, on every backend, before any launch.


def _regression(loss, input, target, weight, reduction, *, weight_mean, delta=1.0):
    """(options, input, target, weight, None) of the regression losses (``loss``: 'mse', 'l1', 'huber',
    'smooth_l1'), or ValueError / TypeError naming the argument. ``weight_mean``: ``'mean'`` with a weight divides
    by ``weight.sum()`` (mse, l1) rather than by the number of elements (huber), as in torch."""
    _checks.check_tensor("input", input, floating=True)
    _checks.check_tensor("target", target, device=input.device)
    if target.is_complex() or (loss == "l1" and target.dtype == torch.bool):
        raise TypeError(f"target must be a real floating point or integer tensor, got {target.dtype}")
    _checks.check_reduction(reduction)
    if target.shape != input.shape:
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                      "This will likely lead to incorrect results due to broadcasting. "
                      "Please ensure they have the same size.", UserWarning, stacklevel=3)
    # torch's huber keeps input's dtype (its kernel writes into an input-typed output); the others promote.
    out_dtype = input.dtype if loss == "huber" else torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        _checks.check_tensor("weight", weight, floating=True, device=input.device)
        if weight.shape != input.shape:
            raise ValueError(f"weight must have input's size {tuple(input.shape)} (Weights and input must have the "
                             f"same size), got {tuple(weight.shape)}")
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
    opts = PointwiseOptions(loss=loss, reduction=reduction, delta=delta,
                            weight_mean=weight_mean and weight is not None and reduction == "mean",
                            shape=_broadcast_shape(input.shape, target, "target"),
                            out_dtype=_checks.autocast_fp32(input.device, out_dtype))
    return opts, input, target, weight, None


def _broadcast_shape(shape, t, name):
    """torch's broadcast of ``shape`` with tensor ``t``'s, or ValueError naming ``t``. (Equal shapes, the usual
    case, skip ``torch.broadcast_shapes``, which costs more than a small loss itself.)"""
    if t.shape == shape:
        return shape
    try:
        return torch.broadcast_shapes(shape, t.shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast with shape {tuple(shape)}") from None


def _run(opts, input, target, weight, margin):
    return _family.dispatch(_Pointwise, _definition, opts, input, target, weight, margin,
                            empty=math.prod(opts.shape) == 0)


# ---------------------------------------------------------------------------------------------------------------
# The definition: the torch backend, and the higher-order gradients of the Triton backends.


def _definition(opts, input, target, weight, margin):
    """The loss in torch ops: ATen's own loss functions (those ``torch.nn.functional`` calls) for the regression
    losses and ``kl_div``, a weight composed on top as torch composes it; ``-logsigmoid`` in fp32 (fp64 for fp64
    inputs) for Bradley-Terry."""
    if opts.loss == "bradley_terry":
        dtype = _family.compute_dtype(input, target, margin)
        u = input.to(dtype) - target.to(dtype) - (opts.margin if margin is None else margin.to(dtype))
        rows = -F.logsigmoid(u)
        out = rows.mean() if opts.reduction == "mean" else rows.sum() if opts.reduction == "sum" else rows
        return _family.cast(out, opts.out_dtype)
    if opts.loss in ("kl", "kl_log_target"):
        out = torch.kl_div(input, target, _family.REDUCTION_ENUM[opts.reduction],
                           log_target=opts.loss == "kl_log_target")
        return _family.cast(out / opts.batch if opts.batch != 1 else out, opts.out_dtype)
    if input.shape != target.shape:
        input, target = torch.broadcast_tensors(input, target)
    if opts.loss == "huber" and input.dtype != target.dtype:
        # ATen's huber backward needs one dtype: compute in the promoted one, as its forward does
        dtype = torch.promote_types(input.dtype, target.dtype)
        input, target = input.to(dtype), target.to(dtype)
    args = (opts.delta,) if opts.loss in ("huber", "smooth_l1") else ()
    if weight is None:
        out = _ATEN[opts.loss](input, target, _family.REDUCTION_ENUM[opts.reduction], *args)
        return _family.cast(out, opts.out_dtype)
    rows = _ATEN[opts.loss](input, target, _family.REDUCTION_ENUM["none"], *args) * weight
    if opts.reduction == "sum":
        rows = rows.sum()
    elif opts.reduction == "mean":
        rows = rows.sum() / weight.sum() if opts.weight_mean else rows.mean()
    return _family.cast(rows, opts.out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (compiled or interpreted)


def _denominator(opts, weight, dtype, device):
    """What the reduced loss is divided by, as a 0-d device tensor (``weight.sum()`` needs no host sync), or None
    when nothing is: ``weight.sum()`` or the number of elements (times ``batch``) for ``'mean'``, ``batch``
    otherwise. A zero denominator gives torch's inf / NaN."""
    if opts.weight_mean:
        return weight.sum(dtype=dtype)
    count = (math.prod(opts.shape) if opts.reduction == "mean" else 1) * opts.batch
    return None if count == 1 else torch.full((), float(count), dtype=dtype, device=device)


def _grad_buffers(opts, needs, tensors, dtype):
    """One gradient buffer of the broadcast shape per operand that needs one: in the operand's dtype, or in the
    compute dtype when the gradient is summed back to a smaller operand afterwards (``_sum_to``)."""
    return [_alloc.empty(opts.shape, dtype=t.dtype if t.shape == opts.shape else dtype, device=t.device)
            if need else None for t, need in zip(tensors, needs)]


def _sum_to(grad, like):
    """A gradient of the broadcast shape summed back to ``like``'s shape and dtype, as autograd does for
    broadcasts."""
    if grad is None or grad.shape == like.shape:
        return grad
    return grad.sum_to_size(like.shape).to(like.dtype)


def _launch_args(opts):
    return dict(kind=opts.loss, delta=opts.delta, margin_value=opts.margin)


class _Pointwise(_family.LossFunction):
    @staticmethod
    def forward(opts, needs, input, target, weight, margin):
        from ..kernels.pointwise import num_programs, pointwise_forward

        tensors = (input, target, weight, margin)
        dtype = _family.compute_dtype(*tensors)
        denominator = _denominator(opts, weight, dtype, input.device)
        if opts.reduction == "none":
            loss = _alloc.empty(opts.shape, dtype=opts.out_dtype, device=input.device)
            pointwise_forward(*tensors, None, loss, None, None, None, None, None, **_launch_args(opts))
            if denominator is not None:  # a legacy reduction of kl_div with reduction='batchmean'
                loss = (loss / denominator).to(opts.out_dtype)
            return loss, None, None, None, None, denominator, None
        # Fused: the forward writes the gradients, already divided by the denominator.
        partial = _alloc.empty(num_programs(math.prod(opts.shape)), dtype=dtype, device=input.device)
        grads = _grad_buffers(opts, needs, tensors, dtype)
        scale = None
        if any(needs):
            scale = torch.ones((), dtype=dtype, device=input.device) if denominator is None else 1.0 / denominator
        pointwise_forward(*tensors, scale, None, partial, *grads, **_launch_args(opts))
        total = partial.sum()
        loss = total if denominator is None else total / denominator
        grads = [_sum_to(g, t) for g, t in zip(grads, tensors)]
        # a weight's gradient in a weight-sum mean needs the loss (below); an output of its own, not the result
        mean = loss.clone() if needs[2] and opts.weight_mean else None
        if grads[2] is not None and opts.weight_mean:
            # d/dw_i [sum_j w_j e_j / sum_j w_j] = (e_i - loss) / sum_j w_j: the kernel wrote e_i / sum_j w_j
            grads[2] -= (loss * scale).to(grads[2].dtype)
        return loss.to(opts.out_dtype), *grads, denominator, mean

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, *tensors = inputs
        grads, state = output[1:5], output[5:]
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        fused = list(grads) if opts.reduction != "none" and any(needs) else None
        _family.save(ctx, opts, needs, tensors, state=state, fused=fused)

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _recompute, _definition, grad_outputs)


def _recompute(ctx, inputs, state, grad_outputs):
    """The gradients from the saved inputs: the forward kernel once more, times ``grad_output`` (per element for
    ``'none'``) divided by the denominator."""
    from ..kernels.pointwise import pointwise_forward

    opts, needs = ctx.opts, ctx.needs
    denominator, loss = state
    dtype = _family.compute_dtype(*inputs)
    scale = grad_outputs[0] if denominator is None else grad_outputs[0].to(dtype) / denominator
    grads = _grad_buffers(opts, needs, inputs, dtype)
    pointwise_forward(*inputs, scale, None, None, *grads, **_launch_args(opts))
    grads = [_sum_to(g, t) for g, t in zip(grads, inputs)]
    if grads[2] is not None and opts.weight_mean:
        grads[2] -= (loss * scale).to(grads[2].dtype)
    return grads
