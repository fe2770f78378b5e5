"""Retrieval InfoNCE, host side: ``info_nce`` with hard negatives, several positives per query, false-negative
removal, and the keys of every rank (all-gathered or passed around a ring), a band of queries at a time: the
``M x (N + S)`` logits never exist at once. ``fusedloss.info_nce`` routes here when any of those options is given.

The loss of query ``i`` (similarities: cosines of the normalized rows, or plain dot products):

- candidates: every key ``j`` (of every rank, in rank order), then the shared negatives (``(S, d)``, of every rank)
  or query ``i``'s own ``K`` negatives (``(M, K, d)``); logits ``x = sim / temperature``;
- positives ``P_i``: key ``i`` (this rank's), or every key whose id is query ``i``'s (``positive_ids``);
- removed (GISTEmbed's false-negative margin ``m``): a candidate outside ``P_i`` whose similarity exceeds
  ``sim(q_i, k_i) - m``;
- ``loss_i = -sum_{j in P_i} log softmax_i(x)_j / |P_i|`` over the kept candidates: cross-entropy with the uniform
  target over ``P_i`` (the supervised-contrastive ``L_out``).

The forward keeps, per query, a running (max, sum-exp) over the kept non-positives and another over the positives,
the positives' similarity sum and count, and the loss is

    loss_i = softplus(lse_neg - lse_pos) + (lse_pos - mean_{j in P_i} x_ij)

(the whole log-sum-exp is ``logaddexp(lse_neg, lse_pos)``): with one positive the second term is exactly 0 and the
first is the cross-entropy written through its negatives, as the other contrastive losses write it, which keeps
its relative accuracy where the loss is small. The backward recomputes each band: ``dL/dx_ij = a_i (p_ij - [j in
P_i] / |P_i|)`` with ``p = exp(x - lse)`` on the kept candidates and 0 on the removed ones, the positives' term
written ``expm1(x - lse + log |P_i|) / |P_i|`` (no cancellation where ``p`` is near its target). A removal mask is
piecewise constant: no gradient flows through it, as through eager's ``masked_fill``.

Bands: ``_BAND_ELEMENTS`` candidate similarities at a time (fp32 / fp64), in torch ops (cuBLAS on a GPU) on every
backend: there is no Triton kernel for these options yet (the plain call and shared negatives alone run the
contrastive kernels). Memory beyond the features and their gradients: one band and its masks.

Across ranks (``process_group``): every rank passes the same numbers of queries, keys and negatives. Rank ``r``
returns the loss of its queries; the keys and shared negatives get ``d(sum_s g_s loss_s)`` (``g_s`` rank ``s``'s
grad_output), everything else ``d(g_r loss_r)``, as ``siglip_loss``'s across ranks. ``dist_impl="gather"``
all-gathers the keys, their ids and the shared negatives (one block) and reduce-scatters their gradients;
``"ring"`` passes each rank's block around the group (``_distributed.ring_pass``), the block's gradient travelling
with it: memory per rank independent of the world size. Per-query negatives stay with their query.
"""

import dataclasses
from typing import NamedTuple, Optional

import torch

from .. import _distributed, _family

# Candidate similarities per band (fp32: 4 MiB, with a few such temporaries and masks alive at once).
_BAND_ELEMENTS = 1 << 20


@dataclasses.dataclass(frozen=True)
class RetrievalOptions:
    """Everything but the tensors. ``engine``: ``'bands'`` or ``'definition'`` (the logits materialized: torch.func
    transforms, meta and fake tensors, ``torch.compile``)."""

    reduction: str
    margin: Optional[float]
    out_dtype: torch.dtype
    engine: str = "bands"
    rank: int = 0
    world_size: int = 1
    process_group: Optional[object] = dataclasses.field(default=None, compare=False)
    dist_impl: str = "gather"


class _Block(NamedTuple):
    """One set of candidate keys: ``keys`` (n, d) and their ``ids`` (or None), the ``shared`` negatives (or None),
    in the compute dtype, and ``own``: the index of query 0's positive key in ``keys`` when this block holds this
    rank's keys (the per-query negatives join that block), else None."""

    keys: torch.Tensor
    ids: Optional[torch.Tensor]
    shared: Optional[torch.Tensor]
    own: Optional[int]


def info_nce_retrieval(opts, q, k, shared, per_query, ids, scale):
    """The loss (reduced as ``opts.reduction`` says, in ``opts.out_dtype``) of normalized (or raw) features in
    their common dtype; ``scale`` the 0-d inverse temperature in the compute dtype."""
    if opts.engine == "definition":
        return _definition(opts, q, k, shared, per_query, ids, scale)
    return _RetrievalInfoNCE.apply(opts, _family.needs_grad(q, k, shared, per_query, ids, scale), q, k, shared,
                                   per_query, ids, scale)[0]


# ---------------------------------------------------------------------------------------------------------------
# One band of queries against one block


def _bands(n_rows, n_cols):
    step = max(1, _BAND_ELEMENTS // max(n_cols, 1))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _band(q, per_query, start, stop, block, query_ids, diag, margin):
    """(c, positive, kept) of queries ``start:stop`` against ``block``: the similarities (R, C) in the compute
    dtype, the positives, the kept non-positives; and ``diag``, each row's ``sim(q_i, k_i)`` (read from this band
    in the own block, which every pass visits first; passed in for the others)."""
    qb = q[start:stop]
    parts = [qb @ block.keys.T]
    if block.shared is not None:
        parts.append(qb @ block.shared.T)
    if per_query is not None and block.own is not None:
        parts.append(torch.bmm(per_query[start:stop], qb[:, :, None])[:, :, 0])
    c = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    local = torch.arange(stop - start, device=c.device)
    if block.own is not None:
        diag = c[local, block.own + start + local]
    positive = torch.zeros(c.shape, dtype=torch.bool, device=c.device)
    n_keys = block.keys.shape[0]
    if query_ids is not None:
        positive[:, :n_keys] = query_ids[start:stop, None] == block.ids[None, :]
    elif block.own is not None:
        positive[local, block.own + start + local] = True
    kept = ~positive
    if margin is not None:
        kept &= ~(c > (diag - margin)[:, None])
    return c, positive, kept, diag


def _max_and_sum(x, mask):
    """(max, sum of exp(x - max)) over ``mask`` along rows; an empty row gives (-inf, 0)."""
    x = x.masked_fill(~mask, float("-inf"))
    m = x.amax(1)
    return m, torch.exp(x - torch.where(m > float("-inf"), m, 0.0)[:, None]).sum(1)


def _merge(m1, s1, m2, s2):
    top = torch.maximum(m1, m2)
    shift = torch.where(top > float("-inf"), top, 0.0)
    return top, s1 * torch.exp(m1 - shift) + s2 * torch.exp(m2 - shift)


def _log_sum(m, s):
    return torch.where(m > float("-inf"), m, 0.0) + torch.log(s)


class _Stats:
    """The forward's running per-query statistics over the blocks it has seen (module docstring)."""

    def __init__(self, n_rows, like):
        full = lambda v: torch.full((n_rows,), v, dtype=like.dtype, device=like.device)  # noqa: E731
        self.m_neg, self.s_neg, self.m_pos, self.s_pos = full(float("-inf")), full(0.0), full(float("-inf")), full(0.0)
        self.pos_sum, self.count, self.diag = full(0.0), full(0.0), full(float("nan"))

    def add(self, opts, q, per_query, block, query_ids, scale):
        for start, stop in _bands(q.shape[0], block.keys.shape[0] + _extra_columns(block, per_query)):
            rows = slice(start, stop)
            c, positive, kept, diag = _band(q, per_query, start, stop, block, query_ids, self.diag[rows],
                                            opts.margin)
            self.diag[rows] = diag
            x = c * scale
            self.m_neg[rows], self.s_neg[rows] = _merge(self.m_neg[rows], self.s_neg[rows], *_max_and_sum(x, kept))
            self.m_pos[rows], self.s_pos[rows] = _merge(self.m_pos[rows], self.s_pos[rows],
                                                        *_max_and_sum(x, positive))
            self.pos_sum[rows] += torch.where(positive, c, 0.0).sum(1)
            self.count[rows] += positive.sum(1)

    def finish(self, scale):
        """(per-query losses, row state (lse, diag, count) for the backward)."""
        lse_neg, lse_pos = _log_sum(self.m_neg, self.s_neg), _log_sum(self.m_pos, self.s_pos)
        losses = _family.softplus(lse_neg - lse_pos) + (lse_pos - scale * self.pos_sum / self.count)
        return losses, torch.stack([torch.logaddexp(lse_neg, lse_pos), self.diag, self.count], dim=1)


def _extra_columns(block, per_query):
    return (0 if block.shared is None else block.shared.shape[0]) + \
        (per_query.shape[1] if per_query is not None and block.own is not None else 0)


def _block_grads(opts, q, per_query, block, query_ids, scale, row_state, a, need):
    """This block's share of the gradients: (dq, d keys, d shared, d per-query, d scale), each None unless asked
    (``need``: q, keys, shared, per-query, scale), unscaled by ``scale`` (the caller multiplies once)."""
    n_rows, n_keys = q.shape[0], block.keys.shape[0]
    n_shared = 0 if block.shared is None else block.shared.shape[0]
    dq = torch.zeros_like(q) if need[0] else None
    dkeys = torch.zeros_like(block.keys) if need[1] else None
    dshared = torch.zeros_like(block.shared) if need[2] and block.shared is not None else None
    dper_query = torch.zeros_like(per_query) if need[3] and per_query is not None and block.own is not None else None
    dscale = torch.zeros((), dtype=q.dtype, device=q.device) if need[4] else None
    for start, stop in _bands(n_rows, n_keys + _extra_columns(block, per_query)):
        rows = slice(start, stop)
        c, positive, kept, _ = _band(q, per_query, start, stop, block, query_ids, row_state[rows, 1], opts.margin)
        lse, count = row_state[rows, 0, None], row_state[rows, 2, None]
        x = c * scale
        w = torch.where(kept, torch.exp(x - lse), 0.0)
        w = torch.where(positive, torch.expm1(x - lse + torch.log(count)) / count, w) * a[rows, None]
        if dscale is not None:
            dscale += (w * c).sum()
        w_keys, w_shared, w_own = w[:, :n_keys], w[:, n_keys:n_keys + n_shared], w[:, n_keys + n_shared:]
        qb = q[rows]
        if dq is not None:
            dq[rows] = w_keys @ block.keys
            if n_shared:
                dq[rows] += w_shared @ block.shared
            if w_own.shape[1]:
                dq[rows] += torch.bmm(w_own[:, None, :], per_query[rows])[:, 0]
        if dkeys is not None:
            dkeys.addmm_(w_keys.T, qb)
        if dshared is not None:
            dshared.addmm_(w_shared.T, qb)
        if dper_query is not None:
            dper_query[rows] = w_own[:, :, None] * qb[:, None, :]
    return dq, dkeys, dshared, dper_query, dscale


# ---------------------------------------------------------------------------------------------------------------
# The autograd Function: one block (one process, or the gathered keys) or a ring of blocks


def _weights(opts, grad, n_rows):
    if opts.reduction == "none":
        return grad.reshape(-1)
    return (grad / n_rows if opts.reduction == "mean" else grad).expand(n_rows)


def _travelling(k, ids, shared, cd):
    """This rank's block as it travels: keys, then ids and shared negatives where given."""
    return tuple(t for t in (k.to(cd), ids, None if shared is None else shared.to(cd)) if t is not None)


def _arrived(parts, has_ids, has_shared, own):
    parts = list(parts)
    keys = parts.pop(0)
    ids = parts.pop(0) if has_ids else None
    return _Block(keys, ids, parts.pop(0) if has_shared else None, own)


class _RetrievalInfoNCE(_family.LossFunction):
    """Inputs: ``q`` (M, d), ``k`` (N, d), ``shared`` (S, d) or None, ``per_query`` (M, K, d) or None (the features
    as the loss sees them), ``ids`` (N,) or None, ``scale`` 0-d in the compute dtype. State: the rows' (lse, diag,
    count) and, for the gather, the gathered keys, ids and shared negatives."""

    @staticmethod
    def forward(opts, needs, q, k, shared, per_query, ids, scale):
        cd = scale.dtype
        qc = q.to(cd)
        pq = None if per_query is None else per_query.to(cd)
        query_ids = None if ids is None else ids[:q.shape[0]]
        stats = _Stats(q.shape[0], scale)
        gathered = (None, None, None)
        if opts.dist_impl == "ring":
            _distributed.ring_pass(
                _travelling(k, ids, shared, cd),
                lambda source, parts: stats.add(opts, qc, pq, _arrived(parts, ids is not None, shared is not None,
                                                                        0 if source == opts.rank else None),
                                                query_ids, scale),
                opts.process_group)
        else:
            block = _gathered_block(opts, k, ids, shared, cd)
            gathered = (block.keys, block.ids, block.shared) if opts.process_group is not None else gathered
            stats.add(opts, qc, pq, block, query_ids, scale)
        losses, row_state = stats.finish(scale)
        n_rows = torch.full((), float(q.shape[0]), dtype=cd, device=q.device)
        loss = _family.reduce(losses, opts.reduction, n_rows, (q.shape[0],)).to(opts.out_dtype)
        return (loss, row_state) + gathered

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, *tensors = inputs
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        _family.save(ctx, opts, needs, tensors, state=output[1:])

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _recompute, _definition, grad_outputs)


def _gathered_block(opts, k, ids, shared, cd):
    if opts.process_group is None:
        return _Block(k.to(cd), ids, None if shared is None else shared.to(cd), 0)
    group = opts.process_group
    return _Block(_distributed.all_gather(k, group).flatten(0, 1).to(cd),
                  None if ids is None else _distributed.all_gather(ids, group).flatten(),
                  None if shared is None else _distributed.all_gather(shared, group).flatten(0, 1).to(cd),
                  opts.rank * k.shape[0])


def _recompute(ctx, inputs, state, grad_outputs):
    opts = ctx.opts
    q, k, shared, per_query, ids, scale = inputs
    row_state, *gathered = state
    cd = scale.dtype
    qc = q.to(cd)
    pq = None if per_query is None else per_query.to(cd)
    query_ids = None if ids is None else ids[:q.shape[0]]
    a = _weights(opts, grad_outputs[0].to(cd), q.shape[0])
    need_q, need_k, need_shared, need_pq, _, need_scale = ctx.needs
    need = (need_q, need_k, need_shared, need_pq, need_scale)
    own = {}  # this rank's own block's share: the per-query negatives' gradient, and the scale's

    def add(grads):
        for name, g in zip(("q", "per_query", "scale"), (grads[0], grads[3], grads[4])):
            if g is not None:
                own[name] = g if name not in own else own[name].add_(g)

    if opts.dist_impl == "ring":
        def visit(source, parts):
            grads = _block_grads(opts, qc, pq, _arrived(parts, ids is not None, shared is not None,
                                                        0 if source == opts.rank else None),
                                 query_ids, scale, row_state, a, need)
            add(grads)
            return tuple(g for g in grads[1:3] if g is not None) if need_k or need_shared else None

        carried = tuple(torch.empty(t.shape, dtype=cd, device=t.device)
                        for t, wanted in ((k, need_k), (shared, need_shared)) if wanted and t is not None)
        carried = _distributed.ring_pass(_travelling(k, ids, shared, cd), visit, opts.process_group,
                                         carried or None)
        carried = iter(carried or ())
        dk = next(carried) if need_k else None
        dshared = next(carried) if need_shared and shared is not None else None
    else:
        keys, key_ids, shared_all = gathered if opts.process_group is not None else (None, None, None)
        block = _gathered_block(opts, k, ids, shared, cd) if keys is None else \
            _Block(keys, key_ids, shared_all, opts.rank * k.shape[0])
        grads = _block_grads(opts, qc, pq, block, query_ids, scale, row_state, a, need)
        add(grads)
        dk, dshared = grads[1], grads[2]
        if opts.process_group is not None:
            dk = None if dk is None else _distributed.reduce_scatter(dk, opts.process_group)
            dshared = None if dshared is None else _distributed.reduce_scatter(dshared, opts.process_group)
    out = [own.get("q"), dk, dshared, own.get("per_query")]
    out = [None if g is None else (g * scale).to(t.dtype) for g, t in zip(out, (q, k, shared, per_query))]
    return (*out, None, None if "scale" not in own else own["scale"].to(scale.dtype))


# ---------------------------------------------------------------------------------------------------------------
# The definition: the logits materialized (torch.func, meta / fake tensors, compile, higher-order gradients)


def _definition(opts, q, k, shared, per_query, ids, scale):
    cd = scale.dtype
    q, keys = q.to(cd), k.to(cd)
    key_ids, shared_all, own = ids, None if shared is None else shared.to(cd), 0
    if opts.process_group is not None:
        keys = _distributed.gather_with_grad(keys, opts.process_group)
        key_ids = None if ids is None else _distributed.all_gather(ids, opts.process_group).flatten()
        shared_all = None if shared is None else _distributed.gather_with_grad(shared_all, opts.process_group)
        own = opts.rank * k.shape[0]
    n_rows, n_keys = q.shape[0], keys.shape[0]
    parts = [q @ keys.T]
    if shared_all is not None:
        parts.append(q @ shared_all.T)
    if per_query is not None:
        parts.append(torch.einsum("md,mkd->mk", q, per_query.to(cd)))
    c = torch.cat(parts, dim=1)
    local = torch.arange(n_rows, device=c.device)
    positive = torch.zeros(c.shape, dtype=torch.bool, device=c.device)
    if ids is not None:
        positive[:, :n_keys] = ids[:n_rows, None] == key_ids[None, :]
    else:
        positive[local, own + local] = True
    kept = torch.ones_like(positive)
    if opts.margin is not None:
        kept = positive | ~(c > c[local, own + local, None].detach() - opts.margin)
    log_p = torch.log_softmax((scale * c).masked_fill(~kept, float("-inf")), dim=1)
    losses = -torch.where(positive, log_p, 0.0).sum(1) / positive.sum(1)
    n = torch.full((), float(n_rows), dtype=cd, device=c.device)
    return _family.reduce(losses, opts.reduction, n, (n_rows,)).to(opts.out_dtype)

