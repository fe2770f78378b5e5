"""Binary losses on logits, host side: ``binary_cross_entropy_with_logits`` (a drop-in for torch's) and
``sigmoid_focal_loss`` (a drop-in for ``torchvision.ops.sigmoid_focal_loss``).

One elementwise kernel (``fusedloss.kernels.binary``, formulas there) computes the loss and, when autograd needs
them, the gradients of input and target in the same pass: for ``mean``/``sum`` the forward writes the final
gradients (already divided by the mean's denominator) and the backward only rescales them, with no pass when
``grad_output == 1``; for ``none`` the backward recomputes them with the per-element ``grad_output``. ``weight``
and ``pos_weight`` are read through their broadcast strides (a per-class vector, an expanded tensor), never copied.
"""

import dataclasses

import torch

from .. import _alloc, _checks, _family


@dataclasses.dataclass(frozen=True)
class BinaryOptions:
    """Everything but the tensors: what both backends compute."""

    reduction: str = "mean"
    focal: bool = False  # sigmoid_focal_loss; binary_cross_entropy_with_logits otherwise
    gamma: float = 2.0
    alpha: float = 0.25  # < 0: no alpha weighting
    out_dtype: torch.dtype = torch.float32  # what torch (torchvision) returns, fp32 under autocast


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    """Binary cross-entropy on logits, ``-w [pos_weight * t * log s(x) + (1 - t) log(1 - s(x))]``; a drop-in for
    ``torch.nn.functional.binary_cross_entropy_with_logits``.

    Args:
        input: logits of any shape and strides; float16, bfloat16, float32 or float64.
        target: ``input``'s shape, floating point (probabilities, usually 0 or 1); differentiable.
        weight: optional tensor broadcastable to ``input``'s shape (e.g. ``(C,)``, ``(N, 1)``, or expanded), any
            strides; not differentiable, as in torch.
        size_average, reduce: deprecated, mapped to ``reduction`` as torch does.
        reduction: ``'none'`` (``input``'s shape) | ``'mean'`` (over all elements) | ``'sum'``.
        pos_weight: optional tensor broadcastable to ``input``'s shape, usually ``(C,)`` for the last dimension;
            not differentiable, as in torch.

    Returns the loss in ``target``'s dtype, as torch (fp32 under ``torch.autocast``); gradients for ``input`` and
    ``target`` in their dtypes. NaN and infinite logits or targets give torch's values and gradients.
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    _check_pair(input, target)
    _checks.check_reduction(reduction)
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None:
            _check_broadcast(name, t, input)
    opts = BinaryOptions(reduction=reduction, focal=False,
                         out_dtype=_checks.autocast_fp32(input.device, target.dtype))
    return _run(opts, input, target, weight, pos_weight)


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """RetinaNet's focal loss on logits, ``alpha_t (1 - p_t) ** gamma * BCE(inputs, targets)``; a drop-in for
    torchvision's ``sigmoid_focal_loss`` (same arguments and defaults).

    Args:
        inputs: logits of any shape and strides; float16, bfloat16, float32 or float64.
        targets: ``inputs``' shape, floating point (0 or 1 for the classic loss; soft targets are allowed);
            differentiable.
        alpha: weight of the positive class (``alpha_t = alpha t + (1 - alpha)(1 - t)``); negative for none.
        gamma: focusing exponent ``>= 0``.
        reduction: ``'none'`` (default, as torchvision) | ``'mean'`` | ``'sum'``.

    Returns the loss in the promoted dtype of ``inputs`` and ``targets`` (fp32 under ``torch.autocast``), computed
    in fp32 (fp64 for fp64 inputs). One deliberate difference from torchvision: where ``1 - p_t`` is 0 (a
    saturated, correct prediction), torchvision's gradient for ``0 < gamma < 1`` is NaN (``inf * 0`` in the power's
    derivative); here it is the limit, finite. ``1 - p_t`` is also summed from the two sigmoids instead of being
    subtracted from 1, so it stays accurate (and nonzero) where ``p_t`` rounds to 1.
    """
    _check_pair(inputs, targets)
    _checks.check_reduction(reduction)
    opts = BinaryOptions(
        reduction=reduction, focal=True,
        gamma=_checks.check_number("gamma", gamma, low=0.0, finite=True),
        alpha=_checks.check_number("alpha", alpha, finite=True),
        out_dtype=_checks.autocast_fp32(inputs.device, torch.promote_types(inputs.dtype, targets.dtype)),
    )
    return _run(opts, inputs, targets, None, None)


def _check_pair(input, target):
    _checks.check_tensor("input", input, floating=True)
    _checks.check_tensor("target", target, floating=True, device=input.device)
    if target.shape != input.shape:
        raise ValueError(f"Target size ({tuple(target.shape)}) must be the same as input size ({tuple(input.shape)})")


def _check_broadcast(name, t, input):
    """``weight`` / ``pos_weight``: floating, on input's device, broadcastable to input's shape (torch multiplies
    the loss by it in place), and without ``requires_grad`` (torch refuses to differentiate it)."""
    _checks.check_tensor(name, t, floating=True, device=input.device)
    # (the broadcast rule written out: torch.broadcast_shapes costs more than a small loss itself)
    broadcasts = t.dim() <= input.dim() and all(a in (1, b) for a, b in zip(reversed(t.shape), reversed(input.shape)))
    if not broadcasts:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to input's {tuple(input.shape)}")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} cannot require grad: torch's binary_cross_entropy_with_logits is not "
                         f"differentiable in {name}")


def _run(opts, input, target, weight, pos_weight):
    return _family.dispatch(_Binary, _definition, opts, input, target, weight, pos_weight, empty=input.numel() == 0)


# ---------------------------------------------------------------------------------------------------------------
# The definition: the torch backend, and the higher-order gradients of the Triton backends.


def _definition(opts, input, target, weight, pos_weight):
    """BCE: ATen's ``binary_cross_entropy_with_logits`` itself. Focal: torchvision's formula in fp32 (fp64 for fp64
    inputs) on top of ATen's BCE, with ``1 - p_t`` summed from the two sigmoids and the power kept out of autograd
    where ``1 - p_t == 0`` (``fusedloss.kernels.binary``'s docstring)."""
    if not opts.focal:
        return torch.binary_cross_entropy_with_logits(input, target, weight, pos_weight,
                                                      _family.REDUCTION_ENUM[opts.reduction])
    dtype = _family.compute_dtype(input, target)
    x, t = input.to(dtype), target.to(dtype)
    ce = torch.binary_cross_entropy_with_logits(x, t, reduction=_family.REDUCTION_ENUM["none"])
    q = torch.sigmoid(x) * (1 - t) + torch.sigmoid(-x) * t
    positive = q > 0
    # q * 0 where q == 0: the limit 0 of q ** gamma, with a zero derivative that still passes a NaN ce on (as
    # torchvision's gradient does) but not pow's inf * 0
    rows = ce * torch.where(positive, torch.where(positive, q, 1.0) ** opts.gamma, q * 0.0 if opts.gamma else 1.0)
    if opts.alpha >= 0:
        rows = (opts.alpha * t + (1 - opts.alpha) * (1 - t)) * rows
    if opts.reduction == "mean":
        rows = rows.mean()
    elif opts.reduction == "sum":
        rows = rows.sum()
    return rows.to(opts.out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (compiled or interpreted)


def _launch_args(opts):
    return dict(focal=opts.focal, gamma=opts.gamma, alpha=opts.alpha)


class _Binary(_family.LossFunction):
    @staticmethod
    def forward(opts, needs, input, target, weight, pos_weight):
        from ..kernels.binary import binary_forward, num_programs

        shape = input.shape
        dtype = _family.compute_dtype(input, target, weight, pos_weight)
        if opts.reduction == "none":
            loss = _alloc.empty(shape, dtype=opts.out_dtype, device=input.device)
            binary_forward(input, target, weight, pos_weight, None, loss, None, None, None, **_launch_args(opts))
            return loss, None, None, None
        # Fused: the forward writes the gradients, already divided by the mean's denominator.
        denominator = torch.full((), float(input.numel()), dtype=dtype, device=input.device)
        partial = _alloc.empty(num_programs(input.numel()), dtype=dtype, device=input.device)
        grad_input = _alloc.empty(shape, dtype=input.dtype, device=input.device) if needs[0] else None
        grad_target = _alloc.empty(shape, dtype=target.dtype, device=input.device) if needs[1] else None
        scale = _family.fused_grad_scale(opts.reduction, denominator, dtype, input.device) if any(needs) else None
        binary_forward(input, target, weight, pos_weight, scale, None, partial, grad_input, grad_target,
                       **_launch_args(opts))
        loss = _family.reduce(partial, opts.reduction, denominator).to(opts.out_dtype)
        return loss, grad_input, grad_target, denominator

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, *tensors = inputs
        _, grad_input, grad_target, denominator = output
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        fused = [grad_input, grad_target, None, None] if opts.reduction != "none" and any(needs) else None
        _family.save(ctx, opts, needs, tensors, state=(denominator,), fused=fused)

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _recompute, _definition, grad_outputs)


def _recompute(ctx, inputs, state, grad_outputs):
    """The gradients from the saved inputs: the forward kernel once more, times ``grad_output`` (per element for
    ``'none'``)."""
    from ..kernels.binary import binary_forward

    opts, needs = ctx.opts, ctx.needs
    input, target, weight, pos_weight = inputs
    (denominator,) = state
    shape = input.shape
    scale = grad_outputs[0]
    if opts.reduction != "none":
        scale = _family.grad_scale(scale.to(denominator.dtype), opts.reduction, denominator)
    grad_input = _alloc.empty(shape, dtype=input.dtype, device=input.device) if needs[0] else None
    grad_target = _alloc.empty(shape, dtype=target.dtype, device=input.device) if needs[1] else None
    binary_forward(input, target, weight, pos_weight, scale, None, None, grad_input, grad_target,
                   **_launch_args(opts))
    return grad_input, grad_target, None, None
