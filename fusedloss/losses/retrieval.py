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

Engines (``RetrievalOptions.engine``):

- ``"triton"`` (on the Triton backends with ``schedule="kernels"``, opt-in until a GPU has timed it against the
  torch bands: ``bench/bench_contrastive.py::test_retrieval``): ``fusedloss.kernels.retrieval``: per block of keys
  and shared negatives, the forward kernel's statistics (one exp per similarity: the kept negatives and the
  positives share the running max), and in the backward bands of ``W`` written by the band kernel in the
  features' dtype followed by the two band GEMMs of the contrastive losses (``W @ candidates``, ``W^T @
  queries``). The per-query negatives (``M x K``, O(M K d)) are merged in torch ops. Memory beyond the features
  and their gradients: one ``R x C`` band.
- ``"torch"``: the same statistics and bands in torch ops, ``_BAND_ELEMENTS`` candidates at a time (on a GPU
  cuBLAS GEMMs and elementwise passes over each band): the torch backend's, and the Triton backends' default
  (``schedule="bands"``).
- ``"definition"``: the logits materialized (torch.func transforms, meta and fake tensors, ``torch.compile``,
  higher-order gradients).

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

from .. import _alloc, _distributed, _family, _schedules

# The Triton backends' two engines (``schedule``; the first is the default): the bands in torch ops, or the kernels.
SCHEDULES = {"bands": "torch", "kernels": "triton"}
SCHEDULE_ENV = "FUSEDLOSS_RETRIEVAL_SCHEDULE"

# Torch engine: candidate similarities per band (fp32: 4 MiB, with a few such temporaries and masks alive at once).
_BAND_ELEMENTS = 1 << 20


@dataclasses.dataclass(frozen=True)
class RetrievalOptions:
    """Everything but the tensors; ``engine``: ``'triton'``, ``'torch'`` or ``'definition'`` (module docstring)."""

    reduction: str
    margin: Optional[float]
    out_dtype: torch.dtype
    engine: str = "torch"
    rank: int = 0
    world_size: int = 1
    process_group: Optional[object] = dataclasses.field(default=None, compare=False)
    dist_impl: str = "gather"


class _Block(NamedTuple):
    """One set of candidates of every query: ``keys`` (n, d) or None with their ``ids`` (or None), ``shared``
    negatives (S, d) or None, ``per_query`` negatives (M, K, d) or None; ``own``: the index in ``keys`` of query 0's
    own key when the block holds this rank's keys, else None."""

    keys: Optional[torch.Tensor]
    ids: Optional[torch.Tensor]
    shared: Optional[torch.Tensor]
    per_query: Optional[torch.Tensor]
    own: Optional[int]

    def width(self):
        return sum(0 if t is None else t.shape[-2] for t in (self.keys, self.shared, self.per_query))


def choose_engine(backend_engine, schedule):
    """The engine a call runs: the backend's (``contrastive._engine``: "triton", "torch" or "definition"), on the
    Triton backends the one ``schedule`` names (``SCHEDULES``, None: ``SCHEDULE_ENV``, unset: "bands")."""
    chosen = _schedules.resolve("schedule", schedule, SCHEDULES, SCHEDULE_ENV)
    return chosen if backend_engine == "triton" else backend_engine


def info_nce_retrieval(opts, q, k, shared, per_query, ids, scale):
    """The loss (reduced as ``opts.reduction`` says, in ``opts.out_dtype``) of normalized (or raw) features in
    their common dtype; ``scale`` the 0-d inverse temperature in the compute dtype."""
    if opts.engine == "definition":
        return _definition(opts, q, k, shared, per_query, ids, scale)
    return _RetrievalInfoNCE.apply(opts, _family.needs_grad(q, k, shared, per_query, ids, scale), q, k, shared,
                                   per_query, ids, scale)[0]


# ---------------------------------------------------------------------------------------------------------------
# The statistics every engine adds to, block by block


def _merge(m1, s1, m2, s2):
    top = torch.maximum(m1, m2)
    shift = torch.where(top > float("-inf"), top, 0.0)
    return top, s1 * torch.exp(m1 - shift) + s2 * torch.exp(m2 - shift)


def _log_sum(m, s):
    return torch.where(m > float("-inf"), m, 0.0) + torch.log(s)


class _Stats:
    """Per query over the blocks seen so far: (max, sum-exp) of the kept negatives and of the positives, the
    positives' similarity sum and count (module docstring); ``diag``: each query's ``sim(q_i, k_i)``, the margin's
    anchor, written by the engine from the block holding this rank's keys, which every pass visits first."""

    def __init__(self, n_rows, like):
        full = lambda v: torch.full((n_rows,), v, dtype=like.dtype, device=like.device)  # noqa: E731
        self.m_neg, self.s_neg, self.m_pos, self.s_pos = full(float("-inf")), full(0.0), full(float("-inf")), full(0.0)
        self.pos_sum, self.count, self.diag = full(0.0), full(0.0), full(float("nan"))

    def add(self, rows, m_neg, s_neg, m_pos, s_pos, pos_sum, count):
        self.m_neg[rows], self.s_neg[rows] = _merge(self.m_neg[rows], self.s_neg[rows], m_neg, s_neg)
        self.m_pos[rows], self.s_pos[rows] = _merge(self.m_pos[rows], self.s_pos[rows], m_pos, s_pos)
        self.pos_sum[rows] += pos_sum
        self.count[rows] += count

    def finish(self, scale):
        """(per-query losses, row state (lse, diag, count) for the backward)."""
        lse_neg, lse_pos = _log_sum(self.m_neg, self.s_neg), _log_sum(self.m_pos, self.s_pos)
        losses = _family.softplus(lse_neg - lse_pos) + (lse_pos - scale * self.pos_sum / self.count)
        return losses, torch.stack([torch.logaddexp(lse_neg, lse_pos), self.diag, self.count], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Torch engine: one band of queries against one block, in the compute dtype


def _band(q, start, stop, block, query_ids, diag, margin):
    """(c, positive, kept) of queries ``start:stop`` against ``block`` (compute dtype): the similarities (R, C),
    the positives, the kept non-positives. The margin's anchor ``diag`` (the rows' ``sim(q_i, k_i)``) is written
    from this band's own product where the block holds this rank's keys, so that a candidate equal to the
    positive (a duplicate key) compares equal to it, as in the definition's one matmul; other blocks read it."""
    qb = q[start:stop]
    parts = []
    if block.keys is not None:
        parts.append(qb @ block.keys.T)
    if block.shared is not None:
        parts.append(qb @ block.shared.T)
    if block.per_query is not None:
        parts.append(torch.bmm(block.per_query[start:stop], qb[:, :, None])[:, :, 0])
    c = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    if block.own is not None and block.keys is not None:
        local = torch.arange(stop - start, device=c.device)
        diag[start:stop] = c[local, block.own + start + local]
    positive = torch.zeros(c.shape, dtype=torch.bool, device=c.device)
    if block.keys is not None and query_ids is not None:
        positive[:, :block.keys.shape[0]] = query_ids[start:stop, None] == block.ids[None, :]
    elif block.own is not None:
        local = torch.arange(stop - start, device=c.device)
        positive[local, block.own + start + local] = True
    kept = ~positive
    if margin is not None:
        kept &= ~(c > (diag[start:stop] - margin)[:, None])
    return c, positive, kept


def _max_and_sum(x, mask):
    """(max, sum of exp(x - max)) over ``mask`` along rows; an empty row gives (-inf, 0)."""
    x = x.masked_fill(~mask, float("-inf"))
    m = x.amax(1)
    return m, torch.exp(x - torch.where(m > float("-inf"), m, 0.0)[:, None]).sum(1)


def _in_compute_dtype(block, cd):
    return block._replace(**{name: getattr(block, name).to(cd) for name in ("keys", "shared", "per_query")
                             if getattr(block, name) is not None})


class _TorchEngine:
    @staticmethod
    def stats(opts, q, block, query_ids, stats, scale):
        block = _in_compute_dtype(block, scale.dtype)
        q = q.to(scale.dtype)
        for start, stop in _family.row_bands(q.shape[0], block.width(), _BAND_ELEMENTS):
            c, positive, kept = _band(q, start, stop, block, query_ids, stats.diag, opts.margin)
            x = c * scale
            stats.add(slice(start, stop), *_max_and_sum(x, kept), *_max_and_sum(x, positive),
                      torch.where(positive, c, 0.0).sum(1), positive.sum(1))

    @staticmethod
    def grads(opts, q, block, query_ids, scale, row_state, a, need):
        """This block's share of the gradients: (dq, d keys, d shared, d per-query, d scale), each None unless
        asked (``need``: q, keys, shared, per-query, scale), in the compute dtype, unscaled by ``scale`` (the
        caller multiplies once)."""
        block = _in_compute_dtype(block, scale.dtype)
        q = q.to(scale.dtype)
        n_keys = 0 if block.keys is None else block.keys.shape[0]
        n_shared = 0 if block.shared is None else block.shared.shape[0]
        dq = torch.zeros_like(q) if need[0] else None
        dkeys = torch.zeros_like(block.keys) if need[1] and block.keys is not None else None
        dshared = torch.zeros_like(block.shared) if need[2] and block.shared is not None else None
        dper_query = torch.zeros_like(block.per_query) if need[3] and block.per_query is not None else None
        dscale = torch.zeros((), dtype=q.dtype, device=q.device) if need[4] else None
        diag = row_state[:, 1].clone()  # (the own block's bands write theirs again: the same products)
        for start, stop in _family.row_bands(q.shape[0], block.width(), _BAND_ELEMENTS):
            rows = slice(start, stop)
            c, positive, kept = _band(q, start, stop, block, query_ids, diag, opts.margin)
            lse, count = row_state[rows, 0, None], row_state[rows, 2, None]
            x = c * scale
            w = torch.where(kept, torch.exp(x - lse), 0.0)
            w = torch.where(positive, torch.expm1(x - lse + torch.log(count)) / count, w) * a[rows, None]
            if dscale is not None:
                dscale += (w * c).sum()
            w_keys, w_shared, w_own = w[:, :n_keys], w[:, n_keys:n_keys + n_shared], w[:, n_keys + n_shared:]
            qb = q[rows]
            if dq is not None:
                dq[rows] = w_keys @ block.keys if n_keys else 0.0
                if n_shared:
                    dq[rows] += w_shared @ block.shared
                if block.per_query is not None:
                    dq[rows] += torch.bmm(w_own[:, None, :], block.per_query[rows])[:, 0]
            if dkeys is not None:
                dkeys.addmm_(w_keys.T, qb)
            if dshared is not None:
                dshared.addmm_(w_shared.T, qb)
            if dper_query is not None:
                dper_query[rows] = w_own[:, :, None] * qb[:, None, :]
        return dq, dkeys, dshared, dper_query, dscale


# ---------------------------------------------------------------------------------------------------------------
# Triton engine: the kernels on the block's keys and shared negatives, the per-query negatives in torch ops


def _candidates(block):
    """(candidates (C, d): the keys then the shared negatives, one tensor for the kernels; their ids; the index of
    query 0's own key or None)."""
    parts = [t for t in (block.keys, block.shared) if t is not None]
    cand = parts[0] if len(parts) == 1 else torch.cat(parts)
    ids = None
    if block.ids is not None:  # contiguous (the kernels read ids at unit stride); past the keys never read
        ids = block.ids.contiguous() if block.shared is None else \
            torch.cat([block.ids, block.ids.new_zeros(block.shared.shape[0])])
    return cand, ids, block.own


class _TritonEngine:
    @staticmethod
    def stats(opts, q, block, query_ids, stats, scale):
        from ..kernels.retrieval import ROW_STATS, retrieval_forward

        if block.keys is not None or block.shared is not None:  # first: the kernel writes the margin's anchor
            cand, ids, own = _candidates(block)
            out = _alloc.empty((q.shape[0], ROW_STATS), dtype=scale.dtype, device=q.device)
            retrieval_forward(q, cand, scale, None if ids is None else query_ids.contiguous(), ids,
                              None if opts.margin is None else stats.diag, out, n_keys=0 if block.keys is None else
                              block.keys.shape[0], pos_offset=own, margin=opts.margin)
            m, s_neg, s_pos, pos_sum, count = out.unbind(1)
            stats.add(slice(None), m, s_neg, m, s_pos, pos_sum, count)
        if block.per_query is not None:
            _TorchEngine.stats(opts, q, _Block(None, None, None, block.per_query, None), query_ids, stats, scale)

    @staticmethod
    def grads(opts, q, block, query_ids, scale, row_state, a, need):
        from ..kernels.contrastive import band_matmul, band_rows
        from ..kernels.retrieval import dlogits_column_tiles, retrieval_dlogits

        dq, _, _, dper_query, dscale = _TorchEngine.grads(
            opts, q, _Block(None, None, None, block.per_query, None), query_ids, scale, row_state, a,
            (need[0], False, False, need[3], need[4])) if block.per_query is not None else (None,) * 5
        if block.keys is None and block.shared is None:
            return dq, None, None, dper_query, dscale
        cand, ids, own = _candidates(block)
        n_rows, n_cols, n_keys = q.shape[0], cand.shape[0], 0 if block.keys is None else block.keys.shape[0]
        need_cand = need[1] or need[2]
        # W is stored times 1 / max |a| (|W| <= 1 then), so that fp16 bands stay clear of subnormals
        band_scale = 1.0 / a.abs().amax().clamp(min=torch.finfo(a.dtype).tiny)  # (finite for a subnormal top)
        r = band_rows(n_rows, n_cols, q.dtype)
        band = _alloc.empty((r, n_cols), dtype=q.dtype, device=q.device)
        wc = _alloc.empty((r, dlogits_column_tiles(n_cols, q.dtype)), dtype=scale.dtype, device=q.device)
        dq_cand = _alloc.empty((n_rows, q.shape[1]), dtype=scale.dtype, device=q.device) if need[0] else None
        dcand = _alloc.empty((n_cols, q.shape[1]), dtype=scale.dtype, device=q.device) if need_cand else None
        state = row_state.contiguous()
        wc_sum = torch.zeros((), dtype=scale.dtype, device=q.device)
        for start in range(0, n_rows, r):
            stop = min(n_rows, start + r)
            w = band[:stop - start]
            retrieval_dlogits(q, cand, scale, band_scale, None if ids is None else query_ids.contiguous(), ids,
                              state, a, w, wc[:stop - start], row_start=start, n_keys=n_keys, pos_offset=own,
                              margin=opts.margin)
            wc_sum += wc[:stop - start].sum()
            if dq_cand is not None:
                band_matmul(w, cand, dq_cand[start:stop], accumulate=False, cublas=False)
            if dcand is not None:
                band_matmul(w.t(), q[start:stop], dcand, accumulate=start > 0, cublas=False)
        unscale = 1.0 / band_scale
        if dq_cand is not None:
            dq_cand.mul_(unscale)
            dq = dq_cand if dq is None else dq.add_(dq_cand)
        if need[4]:
            dscale = wc_sum if dscale is None else dscale + wc_sum
        dkeys = dshared = None
        if dcand is not None:
            dcand.mul_(unscale)
            dkeys = dcand[:n_keys] if need[1] and block.keys is not None else None
            dshared = dcand[n_keys:] if need[2] and block.shared is not None else None
        return dq, dkeys, dshared, dper_query, dscale


_ENGINES = {"triton": _TritonEngine, "torch": _TorchEngine}


# ---------------------------------------------------------------------------------------------------------------
# The autograd Function: one block (one process, or the gathered keys) or a ring of blocks


def _travelling(k, ids, shared):
    """This rank's block as it travels: keys, then ids and shared negatives where given."""
    return tuple(t for t in (k, ids, shared) if t is not None)


def _arrived(parts, has_ids, has_shared, per_query, own):
    parts = list(parts)
    keys = parts.pop(0)
    ids = parts.pop(0) if has_ids else None
    return _Block(keys, ids, parts.pop(0) if has_shared else None, per_query if own is not None else None, own)


def _gathered_block(opts, k, ids, shared, per_query):
    if opts.process_group is None:
        return _Block(k, ids, shared, per_query, 0)
    group = opts.process_group
    return _Block(_distributed.all_gather(k, group).flatten(0, 1),
                  None if ids is None else _distributed.all_gather(ids, group).flatten(),
                  None if shared is None else _distributed.all_gather(shared, group).flatten(0, 1),
                  per_query, opts.rank * k.shape[0])


class _RetrievalInfoNCE(_family.LossFunction):
    """Inputs: ``q`` (M, d), ``k`` (N, d), ``shared`` (S, d) or None, ``per_query`` (M, K, d) or None (the features
    as the loss sees them), ``ids`` (N,) or None, ``scale`` 0-d in the compute dtype. State: the rows' (lse, diag,
    count) and, for the gather across ranks, the gathered keys, ids and shared negatives."""

    @staticmethod
    def forward(opts, needs, q, k, shared, per_query, ids, scale):
        engine = _ENGINES[opts.engine]
        query_ids = None if ids is None else ids[:q.shape[0]]
        stats = _Stats(q.shape[0], scale)
        gathered = (None, None, None)
        if opts.dist_impl == "ring":
            def visit(source, parts):
                own = 0 if source == opts.rank else None
                engine.stats(opts, q, _arrived(parts, ids is not None, shared is not None, per_query, own),
                             query_ids, stats, scale)

            _distributed.ring_pass(_travelling(k, ids, shared), visit, opts.process_group)
        else:
            block = _gathered_block(opts, k, ids, shared, per_query)
            if opts.process_group is not None:
                gathered = (block.keys, block.ids, block.shared)
            engine.stats(opts, q, block, query_ids, stats, scale)
        losses, row_state = stats.finish(scale)
        n_rows = torch.full((), float(q.shape[0]), dtype=scale.dtype, device=q.device)
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


def _recompute(ctx, inputs, state, grad_outputs):
    opts, engine = ctx.opts, _ENGINES[ctx.opts.engine]
    q, k, shared, per_query, ids, scale = inputs
    row_state, *gathered = state
    cd = scale.dtype
    query_ids = None if ids is None else ids[:q.shape[0]]
    n_rows = torch.full((), float(q.shape[0]), dtype=cd, device=q.device)
    a = _family.grad_scale(grad_outputs[0].to(cd), opts.reduction, n_rows).expand(q.shape[0])
    need_q, need_k, need_shared, need_pq, _, need_scale = ctx.needs
    need = (need_q, need_k, need_shared, need_pq, need_scale)
    own = {}  # the sums over blocks of this rank's own gradients: queries', per-query negatives', the scale's

    def add(grads):
        for name, g in zip(("q", "per_query", "scale"), (grads[0], grads[3], grads[4])):
            if g is not None:
                own[name] = g if name not in own else own[name].add_(g)

    if opts.dist_impl == "ring":
        def visit(source, parts):
            block = _arrived(parts, ids is not None, shared is not None, per_query,
                             0 if source == opts.rank else None)
            grads = engine.grads(opts, q, block, query_ids, scale, row_state, a, need)
            add(grads)
            return tuple(g for g in grads[1:3] if g is not None) or None

        carried = tuple(torch.empty(t.shape, dtype=cd, device=t.device)
                        for t, wanted in ((k, need_k), (shared, need_shared)) if wanted and t is not None)
        carried = iter(_distributed.ring_pass(_travelling(k, ids, shared), visit, opts.process_group,
                                              carried or None) or ())
        dk = next(carried) if need_k else None
        dshared = next(carried) if need_shared and shared is not None else None
    else:
        if opts.process_group is None:
            block = _gathered_block(opts, k, ids, shared, per_query)
        else:
            block = _Block(*gathered, per_query, opts.rank * k.shape[0])
        grads = engine.grads(opts, q, block, query_ids, scale, row_state, a, need)
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

