"""Binary losses on logits, host side: ``binary_cross_entropy_with_logits`` (a drop-in for torch's) and
``sigmoid_focal_loss`` (a drop-in for ``torchvision.ops.sigmoid_focal_loss``).

One elementwise kernel computes the loss and, when autograd needs them, the gradients of input and target in
the same pass (formulas in ``fusedloss.kernels.binary``). For ``mean`` / ``sum`` the gradient is final after the
forward when ``grad_output == 1``; for ``none`` the backward recomputes it with the per-element ``grad_output``.
"""

import torch

from .. import _alloc, _checks, _grads
from .._backend import backend


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    """Binary cross-entropy on logits, ``-w [pos_weight * t * log s(x) + (1 - t) log(1 - s(x))]``.

    Args:
        input: logits of any shape; float16, bfloat16, float32 or float64.
        target: same shape as ``input``, floating point (probabilities, usually 0 or 1).
        weight: optional tensor broadcastable to ``input`` (not differentiable, as in torch).
        reduction: ``'none'`` | ``'mean'`` (over all elements) | ``'sum'``.
        pos_weight: optional tensor broadcastable to ``input``, usually ``(C,)`` for the last dimension.
    Returns the loss in ``input``'s dtype (promoted with ``target``'s); gradients for ``input`` and ``target``.
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    _check_args(input, target, reduction)
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None:
            _checks.check_tensor(name, t, floating=True, device=input.device)
            try:
                broadcasts = torch.broadcast_shapes(t.shape, input.shape) == input.shape
            except RuntimeError:
                broadcasts = False
            if not broadcasts:
                raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to input's {tuple(input.shape)}")
            if t.requires_grad:
                raise ValueError(f"{name} cannot require grad: torch's binary_cross_entropy_with_logits is not "
                                 f"differentiable in {name}")
    opts = {"focal": False, "gamma": 0.0, "alpha": -1.0, "reduction": reduction}
    return _dispatch(input, target, weight, pos_weight, opts)


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """RetinaNet's focal loss on logits, ``alpha_t (1 - p_t) ** gamma * BCE(inputs, targets)``, as torchvision's
    ``sigmoid_focal_loss`` (same arguments and defaults; ``alpha < 0`` disables the alpha weighting).

    Args:
        inputs: logits of any shape; float16, bfloat16, float32 or float64.
        targets: same shape, floating point (0 or 1 for the classic loss; soft targets are allowed).
        alpha: weight of the positive class in ``[0, 1]``, or negative for none.
        gamma: focusing exponent, ``>= 0``; gradients stay finite for ``0 < gamma < 1`` at saturation.
        reduction: ``'none'`` (default, as torchvision) | ``'mean'`` | ``'sum'``.
    """
    _check_args(inputs, targets, reduction)
    opts = {
        "focal": True,
        "gamma": _checks.check_number("gamma", gamma, low=0.0),
        "alpha": _checks.check_number("alpha", alpha, high=1.0),
        "reduction": reduction,
    }
    return _dispatch(inputs, targets, None, None, opts)


def _check_args(input, target, reduction):
    _checks.check_tensor("input", input, floating=True)
    _checks.check_tensor("target", target, floating=True, device=input.device)
    if target.shape != input.shape:
        raise ValueError(f"Target size ({tuple(target.shape)}) must be the same as input size ({tuple(input.shape)})")
    _checks.check_reduction(reduction)


def _dispatch(input, target, weight, pos_weight, opts):
    out_dtype = torch.promote_types(input.dtype, target.dtype)
    if backend(input.device) == "torch" or input.numel() == 0:
        loss = _BinaryTorch.apply(input, target, weight, pos_weight, opts)
    else:
        loss = _BinaryTriton.apply(input, target, weight, pos_weight, opts)
    return loss.to(out_dtype)


def _compute_dtype(input, target):
    return torch.float64 if torch.float64 in (input.dtype, target.dtype) else torch.float32


class _BinaryTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, pos_weight, opts):
        from ..kernels.binary import binary_forward, broadcast_mode, num_programs

        input, target = input.contiguous(), target.contiguous()
        if broadcast_mode(weight, input.shape) is None:
            weight = weight.expand(input.shape).contiguous()
        if broadcast_mode(pos_weight, input.shape) is None:
            pos_weight = pos_weight.expand(input.shape).contiguous()
        dtype = _compute_dtype(input, target)
        out_dtype = torch.promote_types(input.dtype, target.dtype)
        reduction = opts["reduction"]
        need = ctx.needs_input_grad[:2]
        ctx.opts = opts
        ctx.fused = reduction != "none"
        if reduction == "none":
            loss = _alloc.empty(input.shape, dtype=out_dtype, device=input.device)
            binary_forward(input, target, weight, pos_weight, None, loss, None, None, None,
                           focal=opts["focal"], gamma=opts["gamma"], alpha=opts["alpha"])
            if any(need):
                ctx.tensors = (input, target, weight, pos_weight)
            return loss
        partial = _alloc.empty(num_programs(input.numel()), dtype=dtype, device=input.device)
        # mean: the fused gradient is already divided by numel; the backward multiplies by grad_output only
        # when it is not 1.
        grad_scale = torch.full((), 1.0 / input.numel() if reduction == "mean" else 1.0, dtype=dtype,
                                device=input.device)
        grad = _alloc.empty_like(input) if need[0] else None
        grad_target = _alloc.empty_like(target) if need[1] else None
        binary_forward(input, target, weight, pos_weight, grad_scale, None, partial, grad, grad_target,
                       focal=opts["focal"], gamma=opts["gamma"], alpha=opts["alpha"])
        ctx.grads = (grad, grad_target)
        total = partial.sum()
        return total / input.numel() if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        from ..kernels.binary import binary_forward

        if ctx.fused:
            grads = _grads.scale_fused_grads(ctx.grads, grad_output)
            ctx.grads = None
            return (*grads, None, None, None)
        input, target, weight, pos_weight = ctx.tensors
        grad = _alloc.empty_like(input) if ctx.needs_input_grad[0] else None
        grad_target = _alloc.empty_like(target) if ctx.needs_input_grad[1] else None
        opts = ctx.opts
        binary_forward(input, target, weight, pos_weight, grad_output.contiguous(), None, None, grad, grad_target,
                       focal=opts["focal"], gamma=opts["gamma"], alpha=opts["alpha"])
        return grad, grad_target, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Torch backend: the kernel's formulas, elementwise in PyTorch.


def _binary_terms(x, t, weight, pos_weight, opts):
    """(loss, dloss/dx, dloss/dt) elementwise, in x's dtype; see ``fusedloss.kernels.binary``."""
    e = torch.exp(-x.abs())
    sp_tail = torch.log1p(e)
    sig_neg = torch.where(x >= 0, e, torch.ones_like(e)) / (1 + e)
    sig = torch.where(x >= 0, torch.ones_like(e), e) / (1 + e)
    if opts["focal"]:
        gamma, alpha = opts["gamma"], opts["alpha"]
        ce = x.clamp_min(0) - x * t + sp_tail
        q = sig * (1 - t) + sig_neg * t
        positive = q > 0
        q_safe = torch.where(positive, q, torch.ones_like(q))
        m = torch.where(positive, q_safe ** gamma, torch.full_like(q, 1.0 if gamma == 0.0 else 0.0))
        alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(x)
        zero = torch.zeros_like(q)
        loss = alpha_t * ce * m
        dx = alpha_t * m * ((sig - t) + gamma * ce * torch.where(positive, sig * sig_neg / q_safe, zero) * (1 - 2 * t))
        dt = alpha_t * m * (-x + gamma * torch.where(positive, ce / q_safe, zero) * (sig_neg - sig))
        if alpha >= 0:
            dt = dt + (2 * alpha - 1) * ce * m
        return loss, dx, dt
    sp_neg = (-x).clamp_min(0) + sp_tail
    if pos_weight is not None:
        pw = pos_weight.to(x.dtype)
        log_weight = 1 + (pw - 1) * t
        dt = -x + (pw - 1) * sp_neg
    else:
        log_weight = torch.ones_like(x)
        dt = -x
    loss = (1 - t) * x + log_weight * sp_neg
    dx = (1 - t) - log_weight * sig_neg
    if weight is not None:
        w = weight.to(x.dtype)
        loss, dx, dt = loss * w, dx * w, dt * w
    return loss, dx, dt


class _BinaryTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, pos_weight, opts):
        dtype = _compute_dtype(input, target)
        loss, dx, dt = _binary_terms(input.to(dtype), target.to(dtype), weight, pos_weight, opts)
        ctx.grads = (dx.expand(input.shape), dt.expand(input.shape))
        ctx.dtypes = (input.dtype, target.dtype)
        reduction = opts["reduction"]
        ctx.reduction, ctx.numel = reduction, input.numel()
        if reduction == "none":
            return loss.expand(input.shape)
        return loss.sum() if reduction == "sum" else loss.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        scale = grad_output / ctx.numel if ctx.reduction == "mean" else grad_output
        dx, dt = ctx.grads
        return ((dx * scale).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None,
                (dt * scale).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None,
                None, None, None)
