"""Cross-entropy family, host side: ``cross_entropy`` (a drop-in for ``torch.nn.functional.cross_entropy`` with
focal weighting, z-loss and soft-capping on top) and ``focal_loss``.

The math, and the four per-row gradient coefficients both backends share, is derived in the docstring of
``fusedloss.kernels.cross_entropy``. Memory: the Triton path holds the logits' gradient in the logits' dtype
(or in the logits themselves with ``inplace_backward=True``) and O(rows) fp32 vectors, never an N x C fp32 buffer.
"""

import torch

from .. import _alloc, _checks, _grads
from .._backend import backend

_PARAMS = ("ignore_index", "label_smoothing", "focal_gamma", "focal_alpha", "z_loss", "softcap")


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, focal_gamma=0.0, focal_alpha=None, z_loss=0.0,
                  softcap=None, inplace_backward=False):
    """Softmax cross-entropy between logits and class indices or class probabilities, fused in one kernel.

    A drop-in for ``torch.nn.functional.cross_entropy`` (same positional order, same deprecated
    ``size_average`` / ``reduce``), with composable extras.

    Args:
        input: logits, ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; float16, bfloat16, float32 or float64.
        target: class indices (int64 or uint8), ``()``, ``(N,)`` or ``(N, d1, ..., dk)``, in ``[0, C)`` or equal
            to ``ignore_index``; or class probabilities of the input's shape (floating point).
        weight: optional ``(C,)`` rescaling weight per class, as in torch.
        ignore_index: class index whose rows contribute neither loss nor gradient (class-index targets only).
        reduction: ``'none'`` (loss of the target's shape), ``'mean'`` (sum over rows divided by the sum of the
            target classes' weights over non-ignored rows, or by the number of rows for probability targets, as
            in torch; NaN when every row is ignored) or ``'sum'``.
        label_smoothing: in ``[0, 1]``, PyTorch's convention (with weights and ``ignore_index`` as torch does).
        focal_gamma: focusing exponent; each row's (smoothed, weighted) cross-entropy is multiplied by
            ``(1 - p_t) ** focal_gamma``, ``p_t`` the softmax probability of the target class (after the cap).
            Class-index targets only. Gradients stay finite for ``0 < focal_gamma < 1`` at saturated predictions.
        focal_alpha: ``None``, a number multiplying the focal term, or a ``(C,)`` tensor indexed by the target
            class. It does not enter the ``mean`` denominator.
        z_loss: coefficient of PaLM's ``z_loss * logsumexp(x) ** 2``, added to each non-ignored row's loss
            before the reduction.
        softcap: ``None`` or ``c > 0``: logits become ``c * tanh(x / c)`` before everything else (Gemma 2).
        inplace_backward: write the gradient over ``input`` to save its memory (fused ``mean``/``sum`` path on
            the Triton backends). ``input`` then holds the gradient after the call; its version counter is bumped,
            so autograd raises instead of silently using the overwritten values if anything else saved it.

    Returns:
        The loss, in the dtype torch would return (the input's; the promoted one for probability targets).
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    opts = _check_args(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, focal_alpha,
                       z_loss, softcap)
    alpha = focal_alpha if isinstance(focal_alpha, torch.Tensor) else None
    opts["focal_alpha"] = 1.0 if (focal_alpha is None or alpha is not None) else float(focal_alpha)
    opts["reduction"] = reduction
    opts["inplace_backward"] = bool(inplace_backward)

    which = backend(input.device)
    prob_target = target.is_floating_point()
    if which != "torch" and not prob_target and target.device.type == "cpu":
        _check_class_range(target, input.shape[1] if input.dim() > 1 else input.shape[0], ignore_index)
    # Empty inputs and gradients torch propagates that the kernels do not produce (the class weights, for
    # probability targets) run the torch path.
    if which == "torch" or input.numel() == 0 or (weight is not None and weight.requires_grad):
        if which == "torch" and not prob_target:
            _check_class_range(target, input.shape[1] if input.dim() > 1 else input.shape[0], ignore_index)
        return _cross_entropy_torch(input, target, weight, alpha, opts)
    return _CrossEntropyTriton.apply(input, target, weight, alpha, opts)


def focal_loss(input, target, gamma=2.0, alpha=None, weight=None, ignore_index=-100, reduction="mean",
               label_smoothing=0.0):
    """The seed's focal loss, ``alpha * (1 - p_t) ** gamma * CE``, on the cross-entropy kernel.

    ``p_t`` is the target class's softmax probability (``exp(-CE)`` without smoothing, as in the seed). ``alpha``
    is ``None``, a number multiplying the loss, or a ``(C,)`` tensor indexed by the target class. Shapes, dtypes
    and the other arguments are those of ``cross_entropy``; class-index targets only.
    """
    return cross_entropy(input, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, focal_gamma=gamma, focal_alpha=alpha)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks


def _check_args(input, target, weight, ignore_index, reduction, label_smoothing, focal_gamma, focal_alpha,
                z_loss, softcap):
    _checks.check_tensor("input", input, floating=True)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (C,), got a 0-d tensor")
    _checks.check_tensor("target", target, device=input.device)
    _checks.check_reduction(reduction)
    n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    if target.is_floating_point():
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
        expected = () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"target must have shape {expected} for input of shape {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if weight is not None:
        _checks.check_tensor("weight", weight, floating=True, dims=(1,), device=input.device)
        if weight.shape[0] != n_classes:
            raise ValueError(f"weight must have one entry per class ({n_classes}), got shape {tuple(weight.shape)}")
        if weight.requires_grad and not target.is_floating_point():
            raise ValueError("weight cannot require grad with class-index targets: torch's cross_entropy is not "
                             "differentiable in weight there")
    if isinstance(focal_alpha, torch.Tensor):
        _checks.check_tensor("focal_alpha", focal_alpha, floating=True, dims=(1,), device=input.device)
        if focal_alpha.shape[0] != n_classes:
            raise ValueError(f"focal_alpha must have one entry per class ({n_classes}), got shape "
                             f"{tuple(focal_alpha.shape)}")
        if focal_alpha.requires_grad:
            raise ValueError("focal_alpha cannot require grad")
    elif focal_alpha is not None:
        _checks.check_number("focal_alpha", focal_alpha)
    return {
        "ignore_index": ignore_index,
        "label_smoothing": _checks.check_number("label_smoothing", label_smoothing, low=0.0, high=1.0),
        "focal_gamma": _checks.check_number("focal_gamma", focal_gamma, low=0.0),
        "z_loss": _checks.check_number("z_loss", z_loss, low=0.0),
        "softcap": None if softcap is None else _checks.check_number("softcap", softcap, low=0.0, low_open=True),
    }


def _check_class_range(target, n_classes, ignore_index):
    """CPU backends: an out-of-range class index raises IndexError, as torch does (a host read is free here)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad].flatten()[0])} is out of bounds.")


# ---------------------------------------------------------------------------------------------------------------
# Shared by both backends


def _compute_dtype(input, target):
    return torch.float64 if torch.float64 in (input.dtype, target.dtype) else torch.float32


def _out_dtype(input, target):
    return torch.promote_types(input.dtype, target.dtype) if target.is_floating_point() else input.dtype


def _mean_denominator(input, target, weight, ignore_index, dtype):
    """What ``mean`` divides by, as a 0-d device tensor (no host sync): the sum of the target classes' weights
    over non-ignored rows, or the number of rows for probability targets."""
    if target.is_floating_point():
        n_classes = target.shape[1] if target.dim() > 1 else target.shape[0]
        return torch.full((), float(target.numel() // max(n_classes, 1)), dtype=dtype, device=input.device)
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    n_classes = weight.shape[0]
    return (weight.to(dtype)[target.clamp(0, n_classes - 1).long()] * valid).sum()


def _reduce(rows, target, reduction, denom, input, out_dtype):
    """rows (flat, compute dtype) -> the loss torch would return."""
    if reduction == "none":
        shape = target.shape if not target.is_floating_point() else (
            () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:]))
        return rows.reshape(shape).to(out_dtype)
    total = rows.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    # An all-ignored mean is NaN, as in torch, but its gradient is 0 (torch's too), not 0 * inf.
    return (total * _inverse_or_zero(denom) + torch.where(denom == 0, float("nan"), 0.0)).to(out_dtype)


def _inverse_or_zero(denom):
    """1 / denom, or 0 where denom == 0 (every row ignored), as a 0-d tensor, without a host sync."""
    return torch.where(denom == 0, torch.zeros_like(denom), 1.0 / denom)


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (compiled or interpreted)


class _CrossEntropyTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, alpha, opts):
        from ..kernels.cross_entropy import class_layout, cross_entropy_forward

        if class_layout(input) is None:
            input = input.contiguous()
        prob_target = target.is_floating_point()
        if prob_target and class_layout(target) is None:
            target = target.contiguous()
        flat_target = target if prob_target else target.reshape(-1)
        dtype = _compute_dtype(input, target)
        n_rows = class_layout(input)[0]
        reduction = opts["reduction"]
        need_input_grad = ctx.needs_input_grad[0]
        need_target_grad = prob_target and ctx.needs_input_grad[1]
        # Fused: the gradient is written by the forward launch, already divided by the mean's denominator;
        # the backward only rescales when grad_output != 1. Otherwise the forward stores per-row coefficients
        # and the backward reads the logits once more.
        fused = need_input_grad and not need_target_grad and reduction != "none"

        denom = _mean_denominator(input, target, weight, opts["ignore_index"], dtype) if reduction == "mean" else None
        rows = _alloc.empty(n_rows, dtype=dtype, device=input.device)
        lse = _alloc.empty(n_rows, dtype=dtype, device=input.device)
        coefs = grad = grad_scale = None
        if fused:
            grad = input if opts["inplace_backward"] else _alloc.empty_like(input)
            grad_scale = torch.ones((), dtype=dtype, device=input.device) if denom is None else _inverse_or_zero(denom)
        elif need_input_grad or need_target_grad:
            coefs = _alloc.empty((n_rows, 4), dtype=dtype, device=input.device)
        cross_entropy_forward(
            input, flat_target, weight, alpha, grad_scale, rows, lse, coefs, grad,
            **{k: opts[k] for k in _PARAMS},
        )
        out_dtype = _out_dtype(input, target)
        if fused and opts["inplace_backward"]:
            torch.autograd.graph.increment_version(input)
        ctx.fused = fused
        ctx.opts = opts
        ctx.denom = denom
        ctx.out_dtype = out_dtype
        if fused:
            ctx.grad = grad
        elif coefs is not None:
            # Kept on ctx rather than save_for_backward: with inplace_backward the caller's tensor is ours to
            # overwrite, and the version check is done by increment_version above.
            ctx.tensors = (input, flat_target, weight, lse, coefs)
        return _reduce(rows, target, reduction, denom, input, out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        from ..kernels.cross_entropy import cross_entropy_backward

        if ctx.fused:
            (grad,) = _grads.scale_fused_grads([ctx.grad], grad_output)
            ctx.grad = None
            return grad, None, None, None, None
        input, target, weight, lse, coefs = ctx.tensors
        opts = ctx.opts
        if opts["reduction"] == "none":
            grad_scale = grad_output.reshape(-1).to(lse.dtype)
        elif opts["reduction"] == "mean":
            grad_scale = grad_output.to(lse.dtype) * _inverse_or_zero(ctx.denom)
        else:
            grad_scale = grad_output.to(lse.dtype)
        grad = grad_target = None
        if ctx.needs_input_grad[0]:
            grad = input if opts["inplace_backward"] else _alloc.empty_like(input)
        if ctx.needs_input_grad[1] and target.is_floating_point():
            grad_target = _alloc.empty_like(target)
        cross_entropy_backward(input, target, weight, lse, coefs, grad_scale, grad, grad_target,
                               label_smoothing=opts["label_smoothing"], softcap=opts["softcap"])
        if grad is not None and opts["inplace_backward"]:
            torch.autograd.graph.increment_version(input)
        return grad, grad_target, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Torch backend: the same per-row formulas and coefficients as the kernels, in plain PyTorch.


def _as_rows(t):
    """(C,) / (N, C) / (N, C, d1, ..., dk) -> (rows, C), rows in the order (n, d1, ..., dk)."""
    return t.unsqueeze(0) if t.dim() == 1 else t.movedim(1, -1).reshape(-1, t.shape[1])


def _from_rows(rows_c, like):
    if like.dim() == 1:
        return rows_c.reshape(like.shape)
    return rows_c.reshape((like.shape[0],) + tuple(like.shape[2:]) + (like.shape[1],)).movedim(-1, 1)


def _cross_entropy_torch(input, target, weight, alpha, opts):
    dtype = _compute_dtype(input, target)
    reduction = opts["reduction"]
    denom = _mean_denominator(input, target, weight, opts["ignore_index"], dtype) if reduction == "mean" else None
    rows = _CrossEntropyTorch.apply(input, target, weight, alpha, opts)
    return _reduce(rows, target, reduction, denom, input, _out_dtype(input, target))


def _capped_rows(input, dtype, cap):
    """(rows, C) logits in the compute dtype after the soft cap, and the cap's derivative (None without cap)."""
    x = _as_rows(input).to(dtype)
    if cap is None:
        return x, None
    t = torch.tanh(x / cap)
    return cap * t, 1.0 - t * t


def _torch_rows(input, target, weight, alpha, opts):
    """Per-row loss, lse, coefficients (K1, Kf, Ky, K3), a_c (rows, C) and the target one-hot (None for
    probability targets), with the kernels' formulas."""
    dtype = _compute_dtype(input, target)
    eps, gamma, z = opts["label_smoothing"], opts["focal_gamma"], opts["z_loss"]
    x, _ = _capped_rows(input, dtype, opts["softcap"])
    n_rows, n_classes = x.shape
    lse = torch.logsumexp(x, dim=1)
    w = None if weight is None else weight.to(dtype)
    if target.is_floating_point():
        a = (1.0 - eps) * _as_rows(target).to(dtype) + eps / n_classes
        if w is not None:
            a = a * w
        ce = (a * (lse[:, None] - x)).sum(1)
        zero = torch.zeros_like(lse)
        return ce + z * lse * lse, lse, (a.sum(1) + 2 * z * lse, zero, zero, zero + 1.0), a, None
    y = target.reshape(-1).long()
    valid = y != opts["ignore_index"]
    in_range = (y >= 0) & (y < n_classes)
    y_safe = torch.where(valid & in_range, y, torch.zeros_like(y))
    one_hot = torch.nn.functional.one_hot(y_safe, n_classes).to(torch.bool) & (valid & in_range)[:, None]
    w_y = torch.ones_like(lse) if w is None else w[y_safe]
    a = torch.ones(n_classes, dtype=dtype, device=x.device) if w is None else w
    alpha_y = alpha.to(dtype)[y_safe] if alpha is not None else torch.full_like(lse, opts["focal_alpha"])
    log_p_y = x.gather(1, y_safe[:, None]).squeeze(1) - lse
    ce = (1.0 - eps) * w_y * (-log_p_y)
    if eps > 0.0:
        ce = ce + eps / n_classes * (a * (lse[:, None] - x)).sum(1)
    p_y = log_p_y.exp()
    one_minus_p_y = -torch.expm1(log_p_y)
    focal = torch.where(one_minus_p_y > 0, one_minus_p_y.clamp_min(0) ** gamma,
                        torch.full_like(lse, 1.0 if gamma == 0.0 else 0.0))
    loss = alpha_y * focal * ce + z * lse * lse
    k1 = alpha_y * focal * ((1.0 - eps) * w_y + eps / n_classes * a.sum()) + 2 * z * lse
    focal_term = alpha_y * ce * gamma * p_y * focal
    kf = focal_term * torch.where(one_minus_p_y > 0, 1.0 / one_minus_p_y, torch.zeros_like(lse))
    ky = alpha_y * focal * (1.0 - eps) * w_y + focal_term
    k3 = alpha_y * focal * eps / n_classes
    nan = torch.full_like(lse, float("nan"))
    zero = torch.zeros_like(lse)
    loss = torch.where(valid, torch.where(in_range, loss, nan), zero)
    k1 = torch.where(valid, torch.where(in_range, k1, nan), zero)
    kf, ky, k3 = (torch.where(valid, k, zero) for k in (kf, ky, k3))
    return loss, lse, (k1, kf, ky, k3), a.expand(n_rows, n_classes), one_hot


class _CrossEntropyTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, alpha, opts):
        loss, lse, coefs, a, one_hot = _torch_rows(input, target, weight, alpha, opts)
        ctx.save_for_backward(input, target, weight)
        ctx.state = (lse, coefs, a, one_hot, opts)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        input, target, weight = ctx.saved_tensors
        lse, (k1, kf, ky, k3), a, one_hot, opts = ctx.state
        eps = opts["label_smoothing"]
        x, dcap = _capped_rows(input, lse.dtype, opts["softcap"])
        log_p = x - lse[:, None]
        scale = grad_rows.to(lse.dtype)[:, None]
        grad = grad_target = grad_weight = None
        if ctx.needs_input_grad[0]:
            p = log_p.exp()
            if one_hot is None:
                g = p * k1[:, None] - a * k3[:, None]
            else:
                g = p * torch.where(one_hot, k1[:, None], (k1 + kf)[:, None]) - a * k3[:, None]
                g = g - torch.where(one_hot, ky[:, None], torch.zeros_like(g))
            if dcap is not None:
                g = g * dcap
            grad = _from_rows(g * scale, input).to(input.dtype)
        if target.is_floating_point():
            # ce = sum_c a_c (lse - x_c) with a_c = ((1 - eps) t_c + eps / C) w_c
            if ctx.needs_input_grad[1]:
                w = 1.0 if weight is None else weight.to(lse.dtype)
                grad_target = _from_rows(-(1.0 - eps) * w * log_p * scale, target).to(target.dtype)
            if ctx.needs_input_grad[2]:
                t_smooth = (1.0 - eps) * _as_rows(target).to(lse.dtype) + eps / x.shape[1]
                grad_weight = (-t_smooth * log_p * scale).sum(0).to(weight.dtype)
        return grad, grad_target, grad_weight, None, None
