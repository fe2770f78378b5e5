"""Triplet losses, host side: ``triplet_margin_loss`` (a drop-in for torch's) and ``batch_hard_triplet_loss``
(batch-hard mining, Hermans et al. 2017).

The Triton path of ``triplet_margin_loss`` computes the three distances, the hinge and, when autograd needs
them, the three gradients in one launch (formulas in ``fusedloss.kernels.triplet``); for ``mean``/``sum`` the
backward is a no-op when ``grad_output == 1``. Broadcast rows (e.g. a ``(1, D)`` positive) are read with stride
0, not materialized. The torch path is torch's own ``triplet_margin_loss``, which this function mirrors.

``batch_hard_triplet_loss`` mines with a tiled kernel (never the ``B x B`` distance matrix) and differentiates
through the selected indices only; its torch path mines in row chunks, so it also stays O(B d + chunk B).
"""

import torch

from .. import _alloc, _checks, _grads
from .._backend import backend, matmul_backend

# Rows of the (chunk, B) score block the torch path of batch-hard mining holds at a time.
_TORCH_MINING_CHUNK = 1024


def triplet_margin_loss(anchor, positive, negative, margin=1.0, p=2.0, eps=1e-6, swap=False, size_average=None,
                        reduce=None, reduction="mean"):
    """Triplet margin loss ``max(margin + d(a, p) - d(a, n), 0)`` with ``d(x, y) = ||x - y + eps||_p`` over the
    last dimension; a drop-in for ``torch.nn.functional.triplet_margin_loss``.

    Args:
        anchor, positive, negative: ``(..., D)`` tensors of the same number of dimensions (usually ``(N, D)``
            or ``(D,)``), broadcastable to one shape; float16, bfloat16, float32 or float64, on one device.
        margin: ``> 0``.
        p: the norm's exponent: any real number or ``+-inf``, as torch (``p = 0`` counts non-zeros and has no
            gradient).
        eps: added to each difference before the norm, as torch's ``pairwise_distance`` does.
        swap: use ``min(d(a, n), d(p, n))`` as the negative distance (Balntas et al. 2016).
        size_average, reduce: deprecated, mapped to ``reduction`` as torch does.
        reduction: ``'none'`` (shape ``(...)``, the broadcast shape without D) | ``'mean'`` | ``'sum'``.
    Returns the loss in the promoted dtype of the three inputs; gradients for each input that requires one
    (summed over broadcast dimensions).
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    names = ("anchor", "positive", "negative")
    for name, t in zip(names, (anchor, positive, negative)):
        _checks.check_tensor(name, t, floating=True, device=None if name == "anchor" else anchor.device)
    if not anchor.dim() == positive.dim() == negative.dim():
        raise ValueError(f"anchor, positive and negative must have the same number of dimensions, got "
                         f"{anchor.dim()}, {positive.dim()} and {negative.dim()}")
    if anchor.dim() == 0:
        raise ValueError("anchor, positive and negative must have at least 1 dimension (D,), got 0-d tensors")
    try:
        shape = torch.broadcast_shapes(anchor.shape, positive.shape, negative.shape)
    except RuntimeError:
        raise ValueError(f"anchor {tuple(anchor.shape)}, positive {tuple(positive.shape)} and negative "
                         f"{tuple(negative.shape)} do not broadcast to one shape") from None
    margin = _checks.check_number("margin", margin, low=0.0, low_open=True)
    p = _checks.check_number("p", p)
    eps = _checks.check_number("eps", eps)
    if not isinstance(swap, bool):
        raise TypeError(f"swap must be a bool, got {type(swap).__name__}")
    _checks.check_reduction(reduction)
    opts = {"margin": margin, "p": p, "eps": eps, "swap": swap, "reduction": reduction, "shape": shape}
    if backend(anchor.device) == "torch" or shape.numel() == 0:
        return torch.nn.functional.triplet_margin_loss(anchor, positive, negative, margin=margin, p=p, eps=eps,
                                                       swap=swap, reduction=reduction)
    return _TripletTriton.apply(anchor, positive, negative, opts)


def batch_hard_triplet_loss(embeddings, labels, margin=1.0, *, soft_margin=False, reduction="mean"):
    """Batch-hard triplet loss (Hermans, Beyer & Leibe 2017): each anchor against its farthest positive and its
    nearest negative in the batch, Euclidean distance.

    ``loss_i = max(margin + d(i, pos(i)) - d(i, neg(i)), 0)``, or ``softplus(d(i, pos(i)) - d(i, neg(i)))``
    with ``soft_margin`` (the paper's soft-margin variant; ``margin`` is then unused). ``pos(i)`` ranges over the
    other rows with the same label, ``neg(i)`` over the rows with another label.

    Anchors without a positive (a label seen once) or without a negative (a single label in the batch) are
    excluded: their loss is 0 under ``'none'``, they add nothing to ``'sum'``, and ``'mean'`` averages over the
    other anchors only (NaN when no anchor has both, like an all-ignored cross-entropy).

    Args:
        embeddings: ``(B, d)``, float16, bfloat16, float32 or float64.
        labels: ``(B,)`` integer class labels, on the embeddings' device.
        margin: ``>= 0``.
        soft_margin: use ``softplus`` instead of the hinge.
        reduction: ``'none'`` (``(B,)``) | ``'mean'`` | ``'sum'``.
    Returns the loss in the embeddings' dtype, differentiable in ``embeddings`` (through the selected pairs,
    O(B d); the subgradient at distance 0 is 0). Mining costs O(B^2 d) time and O(B d) memory.
    """
    _checks.check_tensor("embeddings", embeddings, floating=True, dims=(2,))
    _checks.check_tensor("labels", labels, floating=False, dims=(1,), device=embeddings.device)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must have one entry per row of embeddings ({embeddings.shape[0]}), got shape "
                         f"{tuple(labels.shape)}")
    margin = _checks.check_number("margin", margin, low=0.0)
    if not isinstance(soft_margin, bool):
        raise TypeError(f"soft_margin must be a bool, got {type(soft_margin).__name__}")
    _checks.check_reduction(reduction)
    opts = {"margin": margin, "soft_margin": soft_margin, "reduction": reduction}
    if matmul_backend(embeddings.device, embeddings.dtype) == "torch" or embeddings.numel() == 0:
        return _batch_hard_torch(embeddings, labels, opts)
    return _BatchHardTriton.apply(embeddings, labels, opts)


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _reduce(rows, reduction, denominator):
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / denominator


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (compiled or interpreted)


class _TripletTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, positive, negative, opts):
        from ..kernels.triplet import triplet_forward

        shape = opts["shape"]
        dim = shape[-1]
        inputs = (anchor, positive, negative)
        # (rows, D) views: reshape copies only when the broadcast cannot be walked with one row stride.
        views = [t.expand(shape).reshape(-1, dim) for t in inputs]
        n_rows = views[0].shape[0]
        dtype = _compute_dtype(*inputs)
        out_dtype = torch.promote_types(torch.promote_types(anchor.dtype, positive.dtype), negative.dtype)
        reduction = opts["reduction"]
        kernel_opts = {k: opts[k] for k in ("margin", "p", "eps", "swap")}
        # p = 0 counts non-zeros: no gradient, as torch (whose norm_backward returns none for it).
        needs = [n and opts["p"] != 0.0 for n in ctx.needs_input_grad[:3]]
        rows = _alloc.empty(n_rows, dtype=dtype, device=anchor.device)
        ctx.opts, ctx.fused, ctx.needs = opts, reduction != "none", needs
        if reduction == "none":
            triplet_forward(*views, None, rows, None, None, None, **kernel_opts)
            if any(needs):
                ctx.save_for_backward(anchor, positive, negative)
            return rows.reshape(shape[:-1]).to(out_dtype)
        grad_scale = torch.full((), 1.0 / n_rows if reduction == "mean" else 1.0, dtype=dtype, device=anchor.device)
        grads = [_alloc.empty((n_rows, dim), dtype=t.dtype, device=t.device) if need else None
                 for t, need in zip(inputs, needs)]
        triplet_forward(*views, grad_scale, rows, *grads, **kernel_opts)
        ctx.grads = [None if g is None else _sum_to(g, shape, t) for g, t in zip(grads, inputs)]
        return _reduce(rows, reduction, n_rows).to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        from ..kernels.triplet import triplet_forward

        if ctx.fused:
            grads, ctx.grads = _grads.scale_fused_grads(ctx.grads, grad_output), None
            return (*grads, None)
        if not any(ctx.needs):
            return None, None, None, None
        opts = ctx.opts
        inputs = ctx.saved_tensors
        shape = opts["shape"]
        views = [t.expand(shape).reshape(-1, shape[-1]) for t in inputs]
        grads = [_alloc.empty(views[0].shape, dtype=t.dtype, device=t.device) if need else None
                 for t, need in zip(inputs, ctx.needs)]
        triplet_forward(*views, grad_output.reshape(-1).contiguous(), None, *grads,
                        **{k: opts[k] for k in ("margin", "p", "eps", "swap")})
        return (*(None if g is None else _sum_to(g, shape, t) for g, t in zip(grads, inputs)), None)


def _sum_to(grad, shape, like):
    """A (rows, D) gradient of the broadcast ``shape`` summed back to ``like``'s shape, as autograd does."""
    grad = grad.reshape(shape)
    return grad if grad.shape == like.shape else grad.sum_to_size(like.shape).contiguous()


class _BatchHardTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, labels, opts):
        from ..kernels.triplet import batch_hard_loss, batch_hard_mine

        n_rows, dim = embeddings.shape
        device = embeddings.device
        dtype = _compute_dtype(embeddings)
        hardest_positive = _alloc.empty(n_rows, dtype=torch.int32, device=device)
        hardest_negative = _alloc.empty(n_rows, dtype=torch.int32, device=device)
        batch_hard_mine(embeddings, labels, hardest_positive, hardest_negative)
        rows = _alloc.empty(n_rows, dtype=dtype, device=device)
        kernel_opts = {"margin": opts["margin"], "soft_margin": opts["soft_margin"]}
        reduction = opts["reduction"]
        ctx.fused = reduction != "none"
        if reduction == "none":
            batch_hard_loss(embeddings, hardest_positive, hardest_negative, None, rows, None, **kernel_opts)
            ctx.opts = kernel_opts
            ctx.save_for_backward(embeddings, hardest_positive, hardest_negative)
            return rows.to(embeddings.dtype)
        n_valid = ((hardest_positive >= 0) & (hardest_negative >= 0)).sum().to(dtype)
        denominator = n_valid if reduction == "mean" else torch.ones((), dtype=dtype, device=device)
        grad_scale = torch.where(denominator > 0, 1.0 / denominator, torch.zeros_like(denominator))
        # An accumulator, not an output: the kernel adds into it, so it starts at zero (never poisoned).
        grad = torch.zeros((n_rows, dim), dtype=dtype, device=device) if ctx.needs_input_grad[0] else None
        batch_hard_loss(embeddings, hardest_positive, hardest_negative, grad_scale, rows, grad, **kernel_opts)
        ctx.grads = [None if grad is None else grad.to(embeddings.dtype)]
        return _reduce(rows, reduction, denominator).to(embeddings.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        from ..kernels.triplet import batch_hard_loss

        if ctx.fused:
            (grad,), ctx.grads = _grads.scale_fused_grads(ctx.grads, grad_output), None
            return grad, None, None
        embeddings, hardest_positive, hardest_negative = ctx.saved_tensors
        grad = torch.zeros(embeddings.shape, dtype=_compute_dtype(embeddings), device=embeddings.device)
        batch_hard_loss(embeddings, hardest_positive, hardest_negative, grad_output.contiguous(), None, grad,
                        **ctx.opts)
        return grad.to(embeddings.dtype), None, None


# ---------------------------------------------------------------------------------------------------------------
# Torch backend: the same mining criterion in row chunks, then autograd through the selected pairs.


@torch.no_grad()
def _mine_torch(embeddings, labels):
    """(hardest positive, hardest negative) indices, -1 where none: the kernel's criterion
    ``||x_j||^2 - 2 x_i . x_j`` (the squared distance minus the row's constant ``||x_i||^2``), chunk by chunk."""
    x = embeddings.to(_compute_dtype(embeddings))
    n_rows = x.shape[0]
    col_sq = (x * x).sum(1)
    cols = torch.arange(n_rows, device=x.device)
    positive, negative = [], []
    for start in range(0, n_rows, _TORCH_MINING_CHUNK):
        block = slice(start, start + _TORCH_MINING_CHUNK)
        score = col_sq[None, :] - 2.0 * (x[block] @ x.T)
        same = labels[block, None] == labels[None, :]
        is_pos = same & (cols[block, None] != cols[None, :])
        pos_score = score.masked_fill(~is_pos, float("-inf"))
        neg_score = score.masked_fill(same, float("inf"))
        positive.append(torch.where(is_pos.any(1), pos_score.argmax(1), -1))
        negative.append(torch.where((~same).any(1), neg_score.argmin(1), -1))
    return torch.cat(positive), torch.cat(negative)


def _batch_hard_torch(embeddings, labels, opts):
    hardest_positive, hardest_negative = _mine_torch(embeddings, labels)
    valid = (hardest_positive >= 0) & (hardest_negative >= 0)
    rows = torch.arange(embeddings.shape[0], device=embeddings.device)
    x = embeddings.to(_compute_dtype(embeddings))
    # Invalid anchors are paired with themselves: distance 0, whose norm gradient torch defines as 0.
    d_pos = (x - x[torch.where(valid, hardest_positive, rows)]).norm(dim=1)
    d_neg = (x - x[torch.where(valid, hardest_negative, rows)]).norm(dim=1)
    if opts["soft_margin"]:
        loss = torch.nn.functional.softplus(d_pos - d_neg)
    else:
        loss = torch.clamp_min(opts["margin"] + d_pos - d_neg, 0.0)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return _reduce(loss, opts["reduction"], valid.sum()).to(embeddings.dtype)
