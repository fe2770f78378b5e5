"""Triplet losses, host side: ``triplet_margin_loss`` (a drop-in for torch's) and ``batch_hard_triplet_loss``
(batch-hard mining, Hermans et al. 2017).

``triplet_margin_loss``: the torch backend is torch's own ``triplet_margin_loss`` (``_triplet_definition``). The
Triton path computes the three distances, the hinge and, for ``mean``/``sum``, the three gradients in one launch
(formulas in ``fusedloss.kernels.triplet``), so a plain ``loss.backward()`` moves no bytes. Broadcast rows (a
``(1, D)`` positive) are read in place with row stride 0; a broadcast the kernel cannot walk with one row stride
(``(2, 1, D)`` against ``(1, 3, D)``) is materialized first.

``batch_hard_triplet_loss``: mining never holds the ``B x B`` distances on either backend: a tiled kernel on the
Triton path, row chunks of ``TORCH_MINING_CHUNK_BYTES`` on the torch path (peak memory beyond the inputs and the
gradient at B = 4096, d = 64, fp32: under a third of the B x B distance matrix alone,
``test_batch_hard_torch_backend_peak_memory``). The loss is then the definition on the selected pairs
(``_batch_hard_definition``), O(B d): in torch ops under plain autograd on the torch backend, in one kernel with
atomically accumulated gradients on the Triton path, or without atomics under
``torch.use_deterministic_algorithms(True)`` (``BatchHardOptions.deterministic``). While ``torch.compile`` traces,
the torch path's chunked mining is one registered custom op (``_family.opaque_op``): its Python loop over row
chunks would make Dynamo specialize on the batch size. ``_batch_hard_unchunked_definition`` is the
same loss in plain torch ops on the whole ``B x B`` matrix (no loop, no custom op, no writes into a buffer), for
the ``torch.func`` transforms.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F

from .. import _alloc, _checks, _family
from .._backend import matmul_backend, runs_definition

# The torch path of batch-hard mining holds (chunk, B) blocks of at most this many bytes (in the compute dtype) at
# a time; a chunk's scores, one key block and their bool masks peak at under 3 such blocks (measured at B = 4096).
TORCH_MINING_CHUNK_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class TripletOptions:
    """Everything but the tensors of ``triplet_margin_loss`` (see it for each field)."""

    margin: float = 1.0
    p: float = 2.0
    eps: float = 1e-6
    swap: bool = False
    reduction: str = "mean"
    shape: tuple = ()  # the broadcast shape of anchor, positive and negative, (..., D)
    out_dtype: torch.dtype = torch.float32  # the promoted dtype of the three, or fp32 under autocast


@dataclasses.dataclass(frozen=True)
class BatchHardOptions:
    """Everything but the tensors of ``batch_hard_triplet_loss`` (see it for each field)."""

    margin: float = 1.0
    soft_margin: bool = False
    reduction: str = "mean"
    out_dtype: torch.dtype = torch.float32  # the embeddings' dtype, or fp32 under autocast
    # torch.are_deterministic_algorithms_enabled() at the call: the Triton gradient without atomic adds (its forward
    # and every recompute), bitwise reproducible; the torch path is torch's ops, which read the flag themselves
    deterministic: bool = False


def triplet_margin_loss(anchor, positive, negative, margin=1.0, p=2.0, eps=1e-6, swap=False, size_average=None,
                        reduce=None, reduction="mean"):
    """Triplet margin loss ``max(margin + d(a, p) - d(a, n), 0)`` with ``d(x, y) = ||x - y + eps||_p`` over the
    last dimension; a drop-in for ``torch.nn.functional.triplet_margin_loss``.

    Args:
        anchor, positive, negative: ``(..., D)`` tensors of the same number of dimensions (usually ``(N, D)``
            or ``(D,)``), broadcastable to one shape; float16, bfloat16, float32 or float64, on one device; any
            strides (a broadcast row is read with stride 0, not copied).
        margin: ``> 0`` (finite or inf), as torch requires; Python, NumPy or 0-d tensor.
        p: the norm's exponent: any real number or ``+-inf``, as torch (``p = 0`` counts non-zeros and has no
            gradient).
        eps: added to each difference before the norm, as torch's ``pairwise_distance`` does.
        swap: use ``min(d(a, n), d(p, n))`` as the negative distance (Balntas et al. 2016).
        size_average, reduce: deprecated, mapped to ``reduction`` as torch does.
        reduction: ``'none'`` (shape ``(...)``, the broadcast shape without D) | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in the promoted dtype of the three inputs (fp32 for 16-bit inputs under ``torch.autocast``, whose
        fp32 list holds ``triplet_margin_loss``); gradients for each input that requires one, summed over its
        broadcast dimensions. NaN and inf inputs give torch's values and gradients; empty inputs give torch's
        answer (``mean`` of no rows is NaN). ``margin = NaN`` raises (torch would return NaN).
    """
    reduction = _checks.legacy_reduction(size_average, reduce, reduction)
    opts = _triplet_options(anchor, positive, negative, margin, p, eps, swap, reduction)
    return _family.dispatch(_Triplet, _triplet_definition, opts, anchor, positive, negative,
                            empty=math.prod(opts.shape) == 0)


def batch_hard_triplet_loss(embeddings, labels, margin=1.0, *, soft_margin=False, reduction="mean"):
    """Batch-hard triplet loss (Hermans, Beyer & Leibe 2017): each anchor against its farthest positive and its
    nearest negative in the batch, Euclidean distance.

    ``loss_i = max(margin + d(i, pos(i)) - d(i, neg(i)), 0)``, or ``softplus(d(i, pos(i)) - d(i, neg(i)))``
    with ``soft_margin`` (the paper's soft-margin variant; ``margin`` is then unused). ``pos(i)`` ranges over the
    other rows with the same label, ``neg(i)`` over the rows with another label.

    Anchors without a positive (a label seen once) or without a negative (a single label in the batch) are
    excluded: their loss is 0 under ``'none'``, they add nothing to ``'sum'``, and ``'mean'`` averages over the
    other anchors only (NaN when no anchor has both, like an all-ignored cross-entropy, with a zero gradient).

    Args:
        embeddings: ``(B, d)``, float16, bfloat16, float32 or float64; any strides.
        labels: ``(B,)`` class labels of any integer dtype (compared in int64), on the embeddings' device.
        margin: ``>= 0``; Python, NumPy or 0-d tensor.
        soft_margin: use ``softplus`` instead of the hinge.
        reduction: ``'none'`` (``(B,)``) | ``'mean'`` | ``'sum'``.

    Returns:
        The loss in the embeddings' dtype (fp32 for 16-bit embeddings under ``torch.autocast``), differentiable in
        ``embeddings`` through the selected pairs, O(B d) memory (the subgradient at distance 0 is 0). When
        several rows tie for the farthest positive or the nearest negative (identical rows), the first one gets
        the whole gradient, where the definition's ``amax`` / ``amin`` would split it. Mining costs O(B^2 d) time
        and O(B d) memory. On the Triton backends the gradient is accumulated with fp32 (fp64) atomic adds, so
        its last bits may differ from run to run, unless ``torch.use_deterministic_algorithms(True)`` is on at the
        call: then it is summed in a fixed order, without atomics (2 B d more memory), bitwise reproducible.

    Non-finite embeddings: the loss is the definition's (the full distance matrix, ``amax`` / ``amin`` over the
    candidates): a row holding a NaN makes the loss NaN for every anchor it is a candidate of (every valid
    anchor, since each other row is its positive or its negative candidate) and for itself; a row holding an
    infinity makes it inf for the anchors it is a positive of and NaN for itself. The gradient is that of the
    selected pairs: NaN reaches the rows of those pairs only, where the full matrix's ``amax`` backward would
    spread it to every row.
    """
    opts = _batch_hard_options(embeddings, labels, margin, soft_margin, reduction)
    if runs_definition(embeddings):  # (torch.func transforms, meta and fake tensors: no chunk loop)
        return _batch_hard_unchunked_definition(opts, embeddings, labels)
    if matmul_backend(embeddings.device, embeddings.dtype) == "torch" or embeddings.numel() == 0:
        return _batch_hard_definition(opts, embeddings, labels)
    needs = _family.needs_grad(embeddings, labels)
    return _BatchHard.apply(opts, needs, embeddings, labels)[0]


# ---------------------------------------------------------------------------------------------------------------
# Argument checks: metadata only, on every backend, before any launch.


def _triplet_options(anchor, positive, negative, margin, p, eps, swap, reduction):
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
    _checks.check_reduction(reduction)
    promoted = torch.promote_types(torch.promote_types(anchor.dtype, positive.dtype), negative.dtype)
    return TripletOptions(
        margin=_checks.check_number("margin", margin, low=0.0, low_open=True),
        p=_checks.check_number("p", p),
        eps=_checks.check_number("eps", eps),
        swap=_checks.check_bool("swap", swap),
        reduction=reduction,
        shape=tuple(shape),
        out_dtype=_checks.autocast_fp32(anchor.device, promoted),
    )


def _batch_hard_options(embeddings, labels, margin, soft_margin, reduction):
    _checks.check_tensor("embeddings", embeddings, floating=True, dims=(2,))
    _checks.check_tensor("labels", labels, floating=False, dims=(1,), device=embeddings.device)
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must have one entry per row of embeddings ({embeddings.shape[0]}), got shape "
                         f"{tuple(labels.shape)}")
    _checks.check_reduction(reduction)
    return BatchHardOptions(
        margin=_checks.check_number("margin", margin, low=0.0),
        soft_margin=_checks.check_bool("soft_margin", soft_margin),
        reduction=reduction,
        out_dtype=_checks.autocast_fp32(embeddings.device, embeddings.dtype),
        deterministic=torch.are_deterministic_algorithms_enabled(),
    )


# ---------------------------------------------------------------------------------------------------------------
# The definitions: the torch backends, and the higher-order gradients of the Triton backends.


def _triplet_definition(opts, anchor, positive, negative):
    """torch's ``triplet_margin_loss`` itself, on the inputs cast to the result dtype (the promotion torch does
    inside, or autocast's cast to fp32)."""
    a, p, n = (t.to(opts.out_dtype) for t in (anchor, positive, negative))
    return F.triplet_margin_loss(a, p, n, margin=opts.margin, p=opts.p, eps=opts.eps, swap=opts.swap,
                                 reduction=opts.reduction)


def _first_extreme(score, candidate, nan_col, largest):
    """Per row of a (rows, B) ``score`` block, the first column of the largest (``largest``) or smallest score among
    the ``candidate`` columns, a NaN candidate (``nan_col``) winning either; -1 for a row without candidates. The
    key block comes out of a ``torch.where`` over the scores and the candidates, so it is batched under
    ``torch.func.vmap`` whenever either is, before the in-place fill."""
    fill = -math.inf if largest else math.inf
    key = torch.where(candidate, score, fill).masked_fill_(nan_col & candidate, -fill)
    return torch.where(candidate.any(1), key.argmax(1) if largest else key.argmin(1), -1)


def _mine_rows(x, sq, y, rows):
    """(hardest positive, hardest negative) indices (int64, -1 where none) of the anchors ``x[rows]`` (a slice)
    among all B rows of ``x`` (compute dtype), with ``sq`` the rows' squared norms and ``y`` the int64 labels: the
    kernel's criterion and its ranking of non-finite rows (``docs/kernels/triplet.md``),
    ``||x_j||^2 - 2 x_i . x_j`` for finite anchors. Holds a few (rows, B) blocks."""
    big = torch.finfo(x.dtype).max
    nan_col, inf_col = torch.isnan(sq)[None, :], torch.isinf(sq)[None, :]
    anchors = torch.where(torch.isfinite(sq[rows])[:, None], x[rows], 0.0)  # a non-finite anchor is mined as zeros
    cols = torch.arange(x.shape[0], device=x.device)
    # the scores and one key block are the only blocks of the compute dtype alive at once (the clamp's input dies at
    # once: it is out of place because vmap has no batching rule for clamp_)
    score = torch.addmm(sq[None, :], anchors, x.T, alpha=-2.0).clamp(-big, big).masked_fill_(inf_col, big)
    same = y[rows, None] == y[None, :]
    positive = _first_extreme(score, same & (cols[rows, None] != cols[None, :]), nan_col, largest=True)
    return positive, _first_extreme(score, ~same, nan_col, largest=False)


def _mine_chunked_fake(x, labels):
    return x.new_empty(x.shape[0], dtype=torch.int64), x.new_empty(x.shape[0], dtype=torch.int64)


# one opaque node under torch.compile, which would otherwise unroll the loop and guard on the batch size (a
# recompile per size, and fullgraph=True fails past the recompile limit)
@_family.opaque_op("batch_hard_mine_chunked", _mine_chunked_fake)
@torch.no_grad()
def _mine_chunked(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_mine_rows`` over row chunks of ``TORCH_MINING_CHUNK_BYTES``, written into the two (B,) int64 results."""
    n_rows = x.shape[0]
    y, sq = labels.to(torch.int64), (x * x).sum(1)
    positive = torch.empty(n_rows, dtype=torch.int64, device=x.device)
    negative = torch.empty_like(positive)
    step = max(1, TORCH_MINING_CHUNK_BYTES // (max(1, n_rows) * x.element_size()))
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        positive[rows], negative[rows] = _mine_rows(x, sq, y, rows)
    return positive, negative


@torch.no_grad()
def _mine_whole(x, labels):
    """``_mine_rows`` on all B anchors at once: O(B^2) memory, but neither a loop nor writes into a result buffer
    (``torch.func.vmap`` refuses batched values written into an unbatched one)."""
    if x.shape[0] == 0:  # argmax needs a column
        return labels.new_empty(0, dtype=torch.int64), labels.new_empty(0, dtype=torch.int64)
    return _mine_rows(x, (x * x).sum(1), labels.to(torch.int64), slice(None))


def _selected_pairs_loss(opts, embeddings, labels, mine):
    """``batch_hard_triplet_loss`` in torch ops with the miner ``mine(x, labels)``: mine (no gradient), then the loss
    of the selected pairs under plain autograd, in fp32 (fp64 for fp64 embeddings) with autocast off, cast to the
    result dtype."""
    with _checks.autocast_off(embeddings.device):
        dtype = _family.compute_dtype(embeddings)
        x = embeddings.to(dtype)
        positive, negative = mine(x.detach(), labels)
        valid = (positive >= 0) & (negative >= 0)
        index = torch.arange(x.shape[0], device=x.device)
        # An excluded anchor's differences are zeros (its partner index is itself), cut off by a where so that
        # not even a NaN row's own gradient passes through them.
        diff_pos = torch.where(valid[:, None], x - x[torch.where(valid, positive, index)], 0.0)
        diff_neg = torch.where(valid[:, None], x - x[torch.where(valid, negative, index)], 0.0)
        z = torch.linalg.vector_norm(diff_pos, dim=1) - torch.linalg.vector_norm(diff_neg, dim=1)
        rows = F.softplus(z) if opts.soft_margin else torch.clamp_min(opts.margin + z, 0.0)
        rows = torch.where(valid, rows, 0.0)
        denominator = valid.sum().to(dtype) if opts.reduction == "mean" else None
        return _family.reduce(rows, opts.reduction, denominator, rows.shape).to(opts.out_dtype)


def _batch_hard_definition(opts, embeddings, labels):
    """``batch_hard_triplet_loss`` on the torch backend (and the higher-order gradients of the Triton one), mined
    in row chunks: memory O(B d) plus the chunks, never the ``B x B`` matrix."""
    return _selected_pairs_loss(opts, embeddings, labels, _mine_chunked)


def _batch_hard_unchunked_definition(opts, embeddings, labels):
    """``_batch_hard_definition`` mined on the whole ``B x B`` matrix in plain torch ops (O(B^2) memory): no Python
    loop, custom op or in-place write into a buffer, so that the ``torch.func`` transforms (``vmap``, ``grad``,
    ``jacrev``) run it. The same indices as the chunked mining (up to the last bits of the Gram scores, which
    only decide near-exact ties)."""
    return _selected_pairs_loss(opts, embeddings, labels, _mine_whole)


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (compiled or interpreted)


def _triplet_rows(t, shape):
    """``t`` broadcast to ``shape`` as (rows, D): a view (stride 0 along broadcast rows) where one row stride
    walks it, else a contiguous copy (``reshape``'s choice)."""
    return t.expand(shape).reshape(-1, shape[-1])


def _sum_to(grad, shape, like):
    """A (rows, D) gradient of the broadcast ``shape`` summed back to ``like``'s shape, as autograd does."""
    grad = grad.reshape(shape)
    return grad if grad.shape == like.shape else grad.sum_to_size(like.shape)


def _per_row(scale, n_rows):
    """A backward's scale as a contiguous (rows,) vector: a 0-d one expanded (one kernel variant for every
    recompute), a per-row one (``'none'``'s ``grad_output``, maybe expanded) made contiguous."""
    return scale.expand(n_rows).contiguous()


class _Triplet(_family.LossFunction):
    @staticmethod
    def forward(opts, needs, anchor, positive, negative):
        from ..kernels.triplet import triplet_forward

        shape, dim = opts.shape, opts.shape[-1]
        inputs = (anchor, positive, negative)
        views = [_triplet_rows(t, shape) for t in inputs]
        n_rows = views[0].shape[0]
        dtype = _family.compute_dtype(*inputs)
        rows = _alloc.empty(n_rows, dtype=dtype, device=anchor.device)
        denominator = torch.full((), float(n_rows), dtype=dtype, device=anchor.device)
        # p = 0 counts non-zeros: no gradient, as torch (whose norm_backward returns none for it)
        wanted = [need and opts.p != 0.0 for need in needs]
        fused = any(wanted) and opts.reduction != "none"
        grads, scale = [None, None, None], None
        if fused:
            scale = _family.fused_grad_scale(opts.reduction, denominator, dtype, anchor.device)
            grads = [_alloc.empty((n_rows, dim), dtype=t.dtype, device=t.device) if want else None
                     for t, want in zip(inputs, wanted)]
        triplet_forward(*views, scale, rows, *grads, margin=opts.margin, p=opts.p, eps=opts.eps, swap=opts.swap)
        loss = _family.reduce(rows, opts.reduction, denominator, shape[:-1]).to(opts.out_dtype)
        return loss, *(None if g is None else _sum_to(g, shape, t) for g, t in zip(grads, inputs)), denominator

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, anchor, positive, negative = inputs
        _, *grads, denominator = output
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        fused = grads if any(g is not None for g in grads) else None
        _family.save(ctx, opts, needs, (anchor, positive, negative), state=(denominator,), fused=fused)

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _triplet_recompute, _triplet_definition, grad_outputs)


def _triplet_recompute(ctx, inputs, state, grad_outputs):
    """The three gradients from the saved inputs: the forward kernel without the loss, scaled per row."""
    from ..kernels.triplet import triplet_forward

    (denominator,) = state
    opts, shape = ctx.opts, ctx.opts.shape
    views = [_triplet_rows(t, shape) for t in inputs]
    n_rows = views[0].shape[0]
    wanted = [need and opts.p != 0.0 for need in ctx.needs]
    if not any(wanted):
        return None, None, None
    scale = _family.grad_scale(grad_outputs[0].to(denominator.dtype), opts.reduction, denominator)
    grads = [_alloc.empty((n_rows, shape[-1]), dtype=t.dtype, device=t.device) if want else None
             for t, want in zip(inputs, wanted)]
    triplet_forward(*views, _per_row(scale, n_rows), None, *grads, margin=opts.margin, p=opts.p, eps=opts.eps,
                    swap=opts.swap)
    return tuple(None if g is None else _sum_to(g, shape, t) for g, t in zip(grads, inputs))


class _BatchHard(_family.LossFunction):
    @staticmethod
    def forward(opts, needs, embeddings, labels):
        from ..kernels.triplet import batch_hard_loss, batch_hard_mine

        n_rows, dim = embeddings.shape
        device = embeddings.device
        dtype = _family.compute_dtype(embeddings)
        positive = _alloc.empty(n_rows, dtype=torch.int32, device=device)
        negative = _alloc.empty(n_rows, dtype=torch.int32, device=device)
        batch_hard_mine(embeddings, labels, positive, negative)
        rows = _alloc.empty(n_rows, dtype=dtype, device=device)
        valid = (positive >= 0) & (negative >= 0)
        denominator = valid.sum().to(dtype) if opts.reduction == "mean" else None
        grad = scale = None
        if needs[0] and opts.reduction != "none":
            scale = _family.fused_grad_scale(opts.reduction, denominator, dtype, device)
            grad = _gradient_buffer(opts, (n_rows, dim), dtype, device)
        batch_hard_loss(embeddings, positive, negative, scale, rows, grad, margin=opts.margin,
                        soft_margin=opts.soft_margin, deterministic=opts.deterministic)
        loss = _family.reduce(rows, opts.reduction, denominator, (n_rows,)).to(opts.out_dtype)
        return loss, None if grad is None else grad.to(embeddings.dtype), positive, negative, denominator

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, embeddings, labels = inputs
        _, grad, positive, negative, denominator = output
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        _family.save(ctx, opts, needs, (embeddings, labels), state=(positive, negative, denominator),
                     fused=None if grad is None else [grad, None])

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _batch_hard_recompute, _batch_hard_definition, grad_outputs)


def _batch_hard_recompute(ctx, inputs, state, grad_outputs):
    """The embeddings' gradient from the saved embeddings and mined indices, scaled per row."""
    from ..kernels.triplet import batch_hard_loss

    embeddings, _ = inputs
    positive, negative, denominator = state
    opts = ctx.opts
    dtype = _family.compute_dtype(embeddings)
    scale = _family.grad_scale(grad_outputs[0].to(dtype), opts.reduction, denominator)
    grad = _gradient_buffer(opts, embeddings.shape, dtype, embeddings.device)
    batch_hard_loss(embeddings, positive, negative, _per_row(scale, embeddings.shape[0]), None, grad,
                    margin=opts.margin, soft_margin=opts.soft_margin, deterministic=opts.deterministic)
    return grad.to(embeddings.dtype), None


def _gradient_buffer(opts, shape, dtype, device):
    """The gradient buffer of ``batch_hard_loss``: zeros for the atomic adds, or, on the deterministic route, which
    writes every row, a poisonable empty buffer."""
    if opts.deterministic:
        return _alloc.empty(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)
