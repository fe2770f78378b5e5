"""Pointwise losses, host side: drop-ins for ``torch.nn.functional``'s ``mse_loss``, ``l1_loss``, ``huber_loss``,
``smooth_l1_loss`` and ``kl_div``, and the Bradley-Terry reward loss ``bradley_terry_loss``.

One elementwise kernel (``fusedloss.kernels.pointwise``, formulas there) computes the loss and, when autograd
needs them, the gradients of every differentiable operand in the same pass: for ``mean``/``sum`` the forward
reads each operand once and writes the final gradients (already divided by the mean's denominator), and the
backward is a no-op when ``grad_output == 1`` (``scale_unless_one``); for ``none`` the backward recomputes them
with the per-element ``grad_output``.

Broadcasting follows torch: the operands broadcast to one shape (with torch's warning for the regression losses
when ``target``'s size differs from ``input``'s). Only when shapes differ is the broadcast materialized
(``expand(...).contiguous()``), and each gradient is summed back to its operand's shape, as autograd does.
"""

import math
import warnings

import torch

from .. import _alloc, _checks, _grads
from .._backend import backend

KL_REDUCTIONS = ("none", "batchmean", "sum", "mean")


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Mean squared error ``w * (input - target) ** 2``; a drop-in for ``torch.nn.functional.mse_loss``.

    Args:
        input: any shape; float16, bfloat16, float32 or float64.
        target: broadcastable with ``input`` (torch warns when the sizes differ); floating point or integer.
        size_average, reduce: deprecated, mapped to ``reduction`` as torch does.
        reduction: ``'none'`` (the broadcast shape) | ``'mean'`` | ``'sum'``.
        weight: optional tensor of ``input``'s size; ``'mean'`` then divides by ``weight.sum()``, as torch does.
    Returns the loss in the promoted dtype of input, target (and weight); gradients for every floating operand
    that requires them.
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    return _regression("mse", input, target, weight, reduction, weighted_mean="weight_sum")


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Mean absolute error ``w * |input - target|``; a drop-in for ``torch.nn.functional.l1_loss``.

    Shapes, dtypes and arguments as ``mse_loss`` (``'mean'`` with ``weight`` divides by ``weight.sum()``). The
    gradient at ``input == target`` is 0, as torch's. A bool ``target`` raises ``TypeError``, as torch refuses it.
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    return _regression("l1", input, target, weight, reduction, weighted_mean="weight_sum")


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """Huber loss: ``(input - target) ** 2 / 2`` where ``|input - target| < delta``, ``delta * (|d| - delta / 2)``
    elsewhere; a drop-in for ``torch.nn.functional.huber_loss``.

    Shapes as ``mse_loss``; ``delta > 0`` (``inf`` gives half the MSE). As in torch the loss has ``input``'s
    dtype (promoted with ``weight``'s), and ``'mean'`` with ``weight`` is ``(w * loss).mean()``, not divided by
    ``weight.sum()``. (torch's own backward fails when input and target dtypes differ; this one does not.)
    """
    delta = _checks.check_number("delta", delta, low=0.0, low_open=True)
    if delta == math.inf:  # every |d| < delta: half the squared error
        return _regression("huber", input, target, weight, reduction, weighted_mean="numel", quadratic_scale=0.5)
    return _regression("huber", input, target, weight, reduction, weighted_mean="numel", delta=delta)


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """Smooth L1: ``0.5 * d ** 2 / beta`` where ``|d| < beta``, ``|d| - beta / 2`` elsewhere (``d = input -
    target``); a drop-in for ``torch.nn.functional.smooth_l1_loss``. ``beta = 0`` is the L1 loss, as in torch.

    Shapes and dtypes as ``mse_loss``; ``beta >= 0``.
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    beta = _checks.check_number("beta", beta, low=0.0)
    if beta == 0.0:
        return _regression("l1", input, target, None, reduction, weighted_mean="numel")
    if beta == math.inf:  # 0.5 d^2 / inf
        return _regression("smooth_l1", input, target, None, reduction, weighted_mean="numel", quadratic_scale=0.0)
    return _regression("smooth_l1", input, target, None, reduction, weighted_mean="numel", delta=beta,
                       loss_scale=1.0 / beta)


def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """Pointwise KL divergence ``target * (log target - input)`` with ``input`` in log space; a drop-in for
    ``torch.nn.functional.kl_div``.

    Args:
        input: log-probabilities, any shape; float16, bfloat16, float32 or float64.
        target: broadcastable with ``input`` (no warning, as torch); probabilities, or log-probabilities with
            ``log_target=True``. Floating point.
        reduction: ``'none'`` | ``'batchmean'`` (sum divided by ``input.size(0)``; the KL divergence of rows) |
            ``'sum'`` | ``'mean'`` (sum divided by the number of elements; warns as torch does).
        size_average, reduce: deprecated; override ``reduction`` as in torch (including torch's extra division
            by ``input.size(0)`` when ``reduction='batchmean'`` is also given).
        log_target: whether ``target`` is given as log-probabilities.
    Returns the loss in the promoted dtype of input and target. As in torch, elements with ``target == 0``
    contribute 0, ``target < 0`` gives NaN, and the gradient of ``target`` is NaN where ``target <= 0``.
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
        base = reduction
    _checks.check_tensor("input", input, floating=True)
    _checks.check_tensor("target", target, floating=True, device=input.device)
    shape = _broadcast_shape(input.shape, target, "target")
    # torch divides by input.size(0) whenever reduction='batchmean' was passed, on top of a legacy reduction.
    batch = input.shape[0] if reduction == "batchmean" and input.dim() != 0 else 1
    if base == "batchmean":
        base = "sum"
    spec = _spec("kl_log_target" if log_target else "kl", base, shape, torch.promote_types(input.dtype, target.dtype),
                 denominator=math.prod(shape) * batch if base == "mean" else batch)
    loss = _dispatch(spec, input, target, None, None)
    return loss / batch if base == "none" and batch != 1 else loss


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, reduction="mean"):
    """The Bradley-Terry reward-model loss ``-log sigmoid(chosen_rewards - rejected_rewards - margin)``.

    The RLHF reward loss of the seed, with TRL's optional margin: the probability that the chosen response is
    preferred is ``sigmoid(r_chosen - r_rejected)``; a margin asks for a larger gap.

    Args:
        chosen_rewards: rewards of the preferred responses, any shape (usually ``(N,)`` or ``(N, 1)``); float16,
            bfloat16, float32 or float64.
        rejected_rewards: broadcastable with ``chosen_rewards``, floating point.
        margin: None (0), a number, or a floating tensor broadcastable with the rewards (one margin per pair).
        reduction: ``'none'`` (the broadcast shape) | ``'mean'`` | ``'sum'``.
    Returns the loss in the promoted dtype of the rewards (and margin); gradients for both rewards and a margin
    tensor that requires grad.
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
        margin_value = _checks.check_number("margin", margin)
        margin = None
    spec = _spec("bradley_terry", reduction, shape, out_dtype, margin_value=margin_value,
                 denominator=math.prod(shape) if reduction == "mean" else 1)
    return _dispatch(spec, chosen_rewards, rejected_rewards, None, margin)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks and the spec both backends run from


def _regression(name, input, target, weight, reduction, *, weighted_mean, delta=1.0, loss_scale=1.0,
                quadratic_scale=None):
    """Checks shared by the four regression losses (``name``: 'mse', 'l1', 'huber', 'smooth_l1'), then the
    dispatch. ``weighted_mean`` is what ``'mean'`` divides by when a weight is given: ``'weight_sum'`` (mse, l1)
    or ``'numel'`` (huber), as in torch. ``quadratic_scale``: the loss is that times the squared error (the limit
    of an infinite threshold, which the kernel cannot receive as a split fp64 constant)."""
    if quadratic_scale is not None:
        kind, loss_scale = "mse", quadratic_scale
    else:
        kind = "huber" if name == "smooth_l1" else name
    _checks.check_tensor("input", input, floating=True)
    _checks.check_tensor("target", target, device=input.device)
    if target.is_complex() or (name == "l1" and target.dtype == torch.bool):
        raise TypeError(f"target must be a real floating point or integer tensor, got {target.dtype}")
    _checks.check_reduction(reduction)
    if target.shape != input.shape:
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                      "This will likely lead to incorrect results due to broadcasting. "
                      "Please ensure they have the same size.", UserWarning, stacklevel=3)
    shape = _broadcast_shape(input.shape, target, "target")
    # torch's huber keeps input's dtype (its kernel writes into an input-typed output); the others promote.
    out_dtype = input.dtype if name == "huber" else torch.promote_types(input.dtype, target.dtype)
    denominator = math.prod(shape)
    if weight is not None:
        _checks.check_tensor("weight", weight, floating=True, device=input.device)
        if weight.shape != input.shape:
            raise ValueError(f"weight must have input's size {tuple(input.shape)} (Weights and input must have the "
                             f"same size), got {tuple(weight.shape)}")
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
        if weighted_mean == "weight_sum":
            denominator = "weight_sum"
    spec = _spec(kind, reduction, shape, out_dtype, denominator=denominator if reduction == "mean" else 1,
                 delta=delta, loss_scale=loss_scale)
    return _dispatch(spec, input, target, weight, None)


def _broadcast_shape(shape, t, name):
    """torch's broadcast of ``shape`` with tensor ``t``'s, or ValueError naming ``t``."""
    try:
        return torch.broadcast_shapes(shape, t.shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast with shape {tuple(shape)}") from None


def _spec(kind, reduction, shape, out_dtype, *, denominator=1, delta=1.0, loss_scale=1.0, margin_value=0.0):
    """What both backends compute: ``denominator`` divides the ``'mean'``/``'sum'`` total (a number, or
    ``'weight_sum'``)."""
    return {"kind": kind, "reduction": reduction, "shape": torch.Size(shape), "out_dtype": out_dtype,
            "denominator": denominator, "params": {"delta": delta, "loss_scale": loss_scale,
                                                   "margin_value": margin_value}}


def _dispatch(spec, input, target, weight, margin):
    if backend(input.device) == "torch" or math.prod(spec["shape"]) == 0:
        return _PointwiseTorch.apply(input, target, weight, margin, spec)
    return _PointwiseTriton.apply(input, target, weight, margin, spec)


def _compute_dtype(*tensors):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _materialize(t, shape):
    """``t`` broadcast to ``shape``, contiguous: no copy when it already is."""
    if t is None or (t.shape == shape and t.is_contiguous()):
        return t
    return t.expand(shape).contiguous()


def _reduce_to(grad, like):
    """A gradient of the broadcast shape summed back to ``like``'s shape, as autograd does for broadcasts."""
    if grad is None or grad.shape == like.shape:
        return grad
    return grad.sum_to_size(like.shape).contiguous()


def _denominator(spec, weight, dtype, device):
    """The ``'mean'``/``batchmean`` denominator as a 0-d device tensor (``weight.sum()`` needs no host sync)."""
    if spec["denominator"] == "weight_sum":
        return weight.sum(dtype=dtype)
    return torch.full((), float(spec["denominator"]), dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (compiled or interpreted)


class _PointwiseTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, margin, spec):
        from ..kernels.pointwise import num_programs, pointwise_forward

        shape, params = spec["shape"], spec["params"]
        originals = (input, target, weight, margin)
        operands = [_materialize(t, shape) for t in originals]
        ctx.spec = spec
        ctx.fused = spec["reduction"] != "none"
        if not ctx.fused:
            loss = _alloc.empty(shape, dtype=spec["out_dtype"], device=input.device)
            pointwise_forward(*operands, None, loss, None, None, None, None, None, kind=spec["kind"], **params)
            if any(ctx.needs_input_grad[:4]):
                ctx.save_for_backward(input, target, weight, margin)
            return loss
        dtype = _compute_dtype(*operands)
        partial = _alloc.empty(num_programs(math.prod(shape)), dtype=dtype, device=input.device)
        denominator = _denominator(spec, weight, dtype, input.device)
        grad_scale = 1.0 / denominator
        grads = [_alloc.empty(shape, dtype=t.dtype, device=t.device) if need else None
                 for t, need in zip(originals, ctx.needs_input_grad[:4])]
        pointwise_forward(*operands, grad_scale, None, partial, *grads, kind=spec["kind"], **params)
        loss = partial.sum() / denominator
        grads = [_reduce_to(g, t) for g, t in zip(grads, originals)]
        if grads[2] is not None and spec["denominator"] == "weight_sum":
            # d/dw_i [sum_j w_j e_j / sum_j w_j] = (e_i - loss) / sum_j w_j: the kernel wrote e_i / sum w.
            grads[2] -= (loss * grad_scale).to(grads[2].dtype)
        ctx.grads = grads
        return loss.to(spec["out_dtype"])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        from ..kernels.pointwise import pointwise_forward

        if ctx.fused:
            grads, ctx.grads = _grads.scale_fused_grads(ctx.grads, grad_output), None
            return (*grads, None)
        spec = ctx.spec
        originals = ctx.saved_tensors
        operands = [_materialize(t, spec["shape"]) for t in originals]
        grads = [_alloc.empty(spec["shape"], dtype=t.dtype, device=t.device) if need else None
                 for t, need in zip(originals, ctx.needs_input_grad[:4])]
        pointwise_forward(*operands, grad_output.contiguous(), None, None, *grads, kind=spec["kind"],
                          **spec["params"])
        return (*(_reduce_to(g, t) for g, t in zip(grads, originals)), None)


# ---------------------------------------------------------------------------------------------------------------
# Torch backend: the kernel's formulas, elementwise in PyTorch.


def _pointwise_terms(spec, x, t, w, m):
    """(weighted loss, unweighted loss, de/dx, de/dt) elementwise in x's dtype; ``de/dmargin = de/dt``. The
    formulas of ``fusedloss.kernels.pointwise``."""
    kind, params = spec["kind"], spec["params"]
    if kind == "kl":
        positive = t > 0
        log_t = torch.log(torch.where(positive, t, torch.ones_like(t)))
        nan = torch.full_like(t, float("nan"))
        loss = torch.where(positive, t * log_t, torch.where(t == 0, torch.zeros_like(t), nan)) - t * x
        dx, dt = -t, torch.where(positive, log_t + 1 - x, nan)
    elif kind == "kl_log_target":
        exp_t = torch.exp(t)
        loss = exp_t * (t - x)
        dx, dt = -exp_t, loss + exp_t
    else:
        u = x - t - (params["margin_value"] if m is None else m)
        if kind == "mse":
            loss, du = u * u, 2 * u
        elif kind == "l1":
            loss, du = u.abs(), torch.sign(u)
        elif kind == "huber":
            delta = params["delta"]
            a = u.abs()
            loss, du = torch.where(a < delta, 0.5 * u * u, delta * (a - 0.5 * delta)), u.clamp(-delta, delta)
        else:  # bradley_terry
            loss, du = torch.nn.functional.softplus(-u), -torch.sigmoid(-u)
        loss, du = loss * params["loss_scale"], du * params["loss_scale"]
        dx, dt = du, -du
    if w is None:
        return loss, loss, dx, dt
    return loss * w, loss, dx * w, dt * w


class _PointwiseTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, margin, spec):
        dtype = _compute_dtype(input, target, weight, margin)
        operands = [None if t is None else t.to(dtype) for t in (input, target, weight, margin)]
        loss, _, _, _ = _pointwise_terms(spec, *operands)
        loss = loss.expand(spec["shape"])
        ctx.spec = spec
        ctx.save_for_backward(input, target, weight, margin)
        if spec["reduction"] == "none":
            return loss.to(spec["out_dtype"])
        ctx.denominator = _denominator(spec, operands[2], dtype, input.device)
        ctx.loss = loss.sum() / ctx.denominator
        return ctx.loss.to(spec["out_dtype"])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        spec = ctx.spec
        originals = ctx.saved_tensors
        dtype = _compute_dtype(*originals)
        operands = [None if t is None else t.to(dtype) for t in originals]
        _, unweighted, dx, dt = _pointwise_terms(spec, *operands)
        scale = grad_output.to(dtype)
        if spec["reduction"] != "none":
            scale = scale / ctx.denominator
        # de/dmargin = de/dt; de/dw = e (unweighted), minus loss / sum(w) for a weight-sum mean.
        grads = [None if not need else _reduce_to((g * scale).expand(spec["shape"]), t)
                 for g, t, need in zip((dx, dt, unweighted, dt), originals, ctx.needs_input_grad[:4])]
        if grads[2] is not None and spec["denominator"] == "weight_sum" and spec["reduction"] != "none":
            grads[2] = grads[2] - ctx.loss * scale
        return (*(None if g is None else g.to(t.dtype) for g, t in zip(grads, originals)), None)
