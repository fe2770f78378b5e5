"""Contrastive losses, host side: ``nt_xent`` (SimCLR), ``clip_loss`` (symmetric CLIP), ``info_nce`` (one
direction) and ``siglip_loss`` (SigLIP's pairwise sigmoid loss), tiled so that the ``N x N`` logits never exist at
once; ``clip_loss`` and ``siglip_loss`` also across ranks.

The math (each softmax loss written through its negatives, the statistics the forward keeps, the gradient) and the
kernels are in ``docs/kernels/contrastive.md``. Paths:

- Triton backends: ``_Contrastive`` on the kernels: the forward kernel's statistics, the backward's band kernel and
  GEMMs. Memory beyond the O(N d) features and gradients: one ``R x N`` band. Under ``torch.compile`` each pass
  (statistics, gradients) is one registered custom op (``_family.opaque_op``): its launch arithmetic and band loop
  run on concrete sizes when the graph runs, so the traced graph keeps the batch size symbolic (one graph for every
  N).
- torch backend: ``_Contrastive`` on the same statistics and bands in torch ops (``_TorchEngine``), a band of
  ``_TORCH_BAND_ELEMENTS`` logits at a time, since memory is the point of these losses. Under ``torch.compile`` it
  is the definition (``_definition``, the logits materialized, as eager's are): one graph instead of one copy of
  the band loop per band.
- Higher-order gradients (``create_graph=True``, ``torch.func``), on every backend: the definition's.

The features are L2-normalized before the ``autograd.Function`` by ``F.normalize`` itself (in fp32, fp64 for fp64
inputs; eps = 1e-12), so its gradient is eager's; under ``torch.autocast`` the normalized features are then cast
to the autocast dtype, as eager's matmul would cast them, and the loss is fp32.

Across ranks (``process_group``), every rank passes ``n`` rows (the same ``n`` everywhere) and the text features
are all-gathered (one collective; the gradient of the gathered copy is reduce-scattered back in the backward):

- ``clip_loss``: rank ``r``'s images are scored against every text with positives at ``r n + i``; each rank's
  rows give every column's (max, sum-exp, moment) over its rows, and those are all-reduced, so every column's
  log-sum-exp over the global batch is known without scoring the texts against the gathered images a second time
  (the work per rank is its ``n x W n`` share of the global logits, once). Rank ``r`` returns

      loss_r = (mean_i CE(s img_i . txt_all^T, r n + i) + mean_i CE(s txt_i . img_all^T, r n + i)) / 2,

  open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``, with open_clip's gradients on each rank: the
  features get ``d(sum_s g_s loss_s) / d(its features)`` (``g_s`` rank ``s``'s grad_output, all-gathered in the
  backward), ``logit_scale`` gets ``d(g_r loss_r) / ds``. ``mean_r loss_r`` is the single-process loss of the global
  batch, so DDP's gradient averaging gives exactly its parameter gradients.
- ``siglip_loss``: rank ``r``'s images against every text: ``loss_r = sum_{i, j} softplus(-l_ij z_ij) / n`` with
  positives at ``r n + i``, open_clip's ``SigLipLoss(rank, world_size)`` (its neighbour exchange visits the same
  blocks), and open_clip's gradients: texts get ``d(sum_s g_s loss_s) / d(texts)``, everything else
  ``d(g_r loss_r)``.

``dist_impl`` chooses how the text features travel. ``"gather"`` (above): one all-gather of the features and one
reduce-scatter of their fp32 gradient, one kernel launch over all ``W n`` columns; its price is memory, the gathered
features (W n d, the features' dtype) and their fp32 gradient (4 W n d bytes). ``"ring"`` (``_ring_stats``,
``_ring_grads`` on ``_distributed.ring_pass``): each rank's text block visits every rank, one hop per step, the
next block's transfer overlapping the engine's work on the block in hand; the rows' statistics merge block by
block, CLIP's column statistics and each block's fp32 gradient travel home with the block (both directions in one
pass). The same (W - 1) n d bytes on the wire per rank, W launches, two blocks and two accumulators alive: memory
independent of the world size.
"""

import dataclasses
from typing import List, Optional

import torch
import torch.nn.functional as F

from .. import _alloc, _checks, _distributed, _family, _schedules
from .._backend import matmul_backend, runs_definition

# Torch engine: logits per band (fp32: 4 MiB, with ~4 such temporaries alive at once): at N = 8192 that is 128 rows
# per band, a peak under a tenth of the 256 MiB fp32 logits.
_TORCH_BAND_ELEMENTS = 1 << 20


# The Triton engine's two switches (fusedloss._schedules.resolve; the first of each is the default), each opt-in
# until a GPU run has measured it: the forward's softmax statistics, "exact" (an online max: with column statistics
# two exps per element) or "fixed_shift" (normalized features: one exp per element, the exact kernels for the rows
# and columns its bound does not cover; fusedloss.kernels.contrastive); and the backward's two band GEMMs, "triton"
# (fusedloss.kernels._gemm) or "cublas" (torch.mm / addmm with an fp32 output).
SCHEDULES = {"exact": "exact", "fixed_shift": "fixed_shift"}
GEMMS = {"triton": "triton", "cublas": "cublas"}
SCHEDULE_ENV, GEMM_ENV = "FUSEDLOSS_CONTRASTIVE_SCHEDULE", "FUSEDLOSS_CONTRASTIVE_GEMM"


@dataclasses.dataclass(frozen=True)
class ContrastiveOptions:
    """Everything but the tensors. ``kind``: ``'nt_xent'``, ``'info_nce'``, ``'clip'`` or ``'siglip'``;
    ``engine``: ``'triton'`` (the kernels), ``'torch'`` (the same bands in torch ops) or ``'definition'``;
    ``rank`` / ``world_size`` those of ``process_group`` (0 / 1 without one); ``normalized``: the features are unit
    vectors (every kind but ``info_nce(normalize=False)``), which the fixed-shift schedule needs; ``schedule`` and
    ``gemm``: the Triton engine's (``SCHEDULES``, ``GEMMS``), resolved once per call (``_run``), so that the
    backward runs the forward's."""

    kind: str
    reduction: str = "mean"
    normalized: bool = True
    schedule: str = "exact"
    gemm: str = "triton"
    out_dtype: torch.dtype = torch.float32
    engine: str = "torch"
    rank: int = 0
    world_size: int = 1
    process_group: Optional[object] = dataclasses.field(default=None, compare=False)
    dist_impl: str = "gather"


def nt_xent(features, temperature=0.07, *, schedule=None, gemm=None):
    """NT-Xent (SimCLR): ``F.cross_entropy`` over the cosine similarities of ``features`` divided by
    ``temperature``, self-similarity excluded, row ``i``'s positive at ``(i + N) mod 2N``.

    Args:
        features: ``(2N, d)``, two views of N samples (rows ``i`` and ``i + N`` are positives); float16, bfloat16,
            float32 or float64; any strides.
        temperature: a positive number (``inf`` gives eager's limit: every logit 0, the loss ``log(2N - 1)``, zero
            gradients), or a 0-d (or one-element) floating tensor on the features' device, which then receives a
            gradient.
        schedule, gemm: the Triton backends' switches (``SCHEDULES``: ``"exact"`` or ``"fixed_shift"``; ``GEMMS``:
            ``"triton"`` or ``"cublas"``); None takes ``FUSEDLOSS_CONTRASTIVE_SCHEDULE`` / ``_GEMM``, unset the first.

    Returns:
        The mean loss, a 0-d tensor of the features' dtype (fp32 under ``torch.autocast``).
    """
    _checks.check_tensor("features", features, floating=True, dims=(2,))
    rows, dim = features.shape
    if rows < 2 or rows % 2:
        raise ValueError(f"features must have an even number (2N >= 2) of rows, two views per sample, got {rows}")
    if dim == 0:
        raise ValueError("features must have at least one column (d >= 1)")
    (x,), out_dtype = _features((("features", features),), normalize=True)
    with _checks.autocast_off(x.device):
        scale = _inverse_temperature(temperature, x)
        return _run(ContrastiveOptions("nt_xent", out_dtype=out_dtype, engine=_engine(x)), x, None, scale, None,
                    schedule, gemm)


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, process_group=None,
              dist_impl="gather", schedule=None, gemm=None):
    """Symmetric CLIP loss, ``(CE(logits, arange) + CE(logits.T, arange)) / 2`` with
    ``logits = logit_scale * normalize(image) @ normalize(text).T (+ logit_bias)``: open_clip's ``ClipLoss``.

    Args:
        image_features, text_features: ``(N, d)`` each (rows ``i`` are the positive pairs), float16, bfloat16,
            float32 or float64, one dtype (under ``torch.autocast`` any two: both are cast to the autocast dtype),
            any strides. L2-normalized here: for features a model already normalized the loss is unchanged, and
            their gradient is open_clip's projected onto the unit sphere's tangent space, ``g - x <x, g>``; the
            model's own normalization applies that projection again on the way back, so its parameters' gradients
            are open_clip's.
        logit_scale: the multiplier, a 0-d (or one-element) floating tensor that receives a gradient (open_clip's
            models return ``logit_scale.exp()``), or a finite number.
        logit_bias: ``None``, a number or a 0-d / one-element tensor. A constant added to every logit cancels in
            both softmaxes, so it changes neither the loss nor any gradient and its own gradient is exactly 0 (a
            NaN or infinite bias makes the loss NaN, as eager's). For a model trained with a bias, ``siglip_loss``
            is the loss whose value depends on it.
        process_group: a ``torch.distributed`` group: every rank passes its own ``n`` rows (the same ``n`` on every
            rank) and gets open_clip's ``local_loss=True, gather_with_grad=True`` loss and gradients for its rows
            (module docstring); DDP's averaging then gives the global batch's gradients. Communication: the text
            features are all-gathered and 3 numbers per column all-reduced in the forward; the texts' gradient is
            reduce-scattered (fp32) in the backward. Every rank must call it and backpropagate it.
        dist_impl: how the text features travel across ranks: ``"gather"`` (above) or ``"ring"``: each rank's block
            of texts visits every rank in turn, the next one's send / receive overlapping the block in hand, and
            carries its columns' statistics (forward) and its gradient (backward) home with it; memory per rank
            independent of the world size (two blocks, where the gather holds all of them and their fp32 gradient),
            the same bytes on the wire, W steps instead of one collective. Same loss and gradients (module
            docstring). The ring runs the ``"exact"`` schedule, and first checks that every rank passes the same
            shapes and asks for the texts' gradient alike (one all-gather of a few integers: a host sync on a GPU
            group; a disagreement would hang the ring). Under ``torch.compile`` the definition runs, whose
            features are gathered. Ignored without ``process_group``.
        schedule, gemm: the Triton backends' switches (``SCHEDULES``: ``"exact"`` or ``"fixed_shift"``; ``GEMMS``:
            ``"triton"`` or ``"cublas"``); None takes ``FUSEDLOSS_CONTRASTIVE_SCHEDULE`` / ``_GEMM``, unset the first.

    Returns:
        A 0-d tensor of the features' dtype (fp32 under ``torch.autocast``).
    """
    x, y, scale, out_dtype = _image_text(image_features, text_features, logit_scale)
    bias = None if logit_bias is None else _scalar_tensor("logit_bias", logit_bias, x)
    with _checks.autocast_off(x.device):
        loss = _run(_group_options("clip", process_group, dist_impl, out_dtype, x), x, y, scale, None, schedule,
                    gemm)
    if isinstance(logit_bias, torch.Tensor):  # the bias's exact gradient, 0, and eager's NaN for a non-finite one
        loss = loss + 0.0 * bias.to(loss.dtype)
    return loss


def info_nce(query, key, temperature=0.07, *, negatives=None, positive_ids=None, false_negative_margin=None,
             normalize=True, reduction="mean", process_group=None, dist_impl="gather", schedule=None, gemm=None):
    """InfoNCE in one direction: row ``i`` of ``query`` against every row of ``key`` (and ``negatives``), its
    positive at key ``i`` (or every key sharing its ``positive_ids``).

    ``loss_i = -sum_{j in P_i} log softmax(<q_i, candidates> / t)_j / |P_i|``, with ``q``, ``k`` and the negatives
    L2-normalized when ``normalize`` (cosines) and ``P_i`` query ``i``'s positives; without options
    ``logsumexp_j(<q_i, k_j> / t) - <q_i, k_i> / t``. Tiled: the logits are never materialized
    (``fusedloss.losses.retrieval`` for the options).

    Args:
        query: ``(M, d)``, float16, bfloat16, float32 or float64; any strides.
        key: ``(N, d)``, ``N >= M``, the query's dtype (under ``torch.autocast`` any: both are cast to the autocast
            dtype) and device; keys ``M..N-1`` are extra negatives (a MoCo-style queue appended after the
            positives). A key without ``requires_grad`` costs no gradient product.
        temperature: a positive number (``inf``: every logit 0), or a 0-d (or one-element) floating tensor, which
            then receives a gradient.
        negatives: None; ``(S, d)`` negatives shared by every query (candidates after the keys, in order: sentence
            transformers' MultipleNegativesRankingLoss); or ``(M, K, d)``, query ``i``'s own K hard negatives.
            The query's dtype and device.
        positive_ids: None, or an ``(N,)`` integer tensor, one id per key (query ``i``'s is ``positive_ids[i]``):
            query ``i``'s target is uniform over every key with its id (cross-entropy with that soft target, the
            supervised-contrastive ``L_out``). Negatives are never positives.
        false_negative_margin: None, or a number ``m``: a candidate that is not one of query ``i``'s positives
            leaves its softmax when its similarity exceeds ``sim(q_i, k_i) - m`` (GISTEmbed's absolute margin,
            the model as its own guide; cosines when ``normalize``, else dot products). No gradient flows through
            that choice.
        normalize: L2-normalize query, key and negative rows first (cosine similarity), with ``F.normalize``'s
            gradient.
        reduction: ``'mean'`` (over the M rows), ``'sum'`` or ``'none'`` (the ``(M,)`` per-row losses).
        process_group: a ``torch.distributed`` group: every rank passes the same M, N (and S, K), and the keys,
            their ids and the shared negatives of every rank are candidates of every query (rank order; query
            ``i``'s positive is its own rank's key ``i``). Rank ``r`` returns its queries' loss; keys and negatives
            get the gradient of ``sum_s g_s loss_s`` (``g_s`` rank ``s``'s grad_output), the rest that of ``g_r
            loss_r`` (open_clip's gather_with_grad convention). Every rank must call it and backpropagate it;
            each call first checks that the ranks agree on the shapes, the options and which inputs need a
            gradient (one all-gather of a few integers: a host sync on a GPU group).
        dist_impl: ``"gather"`` (all-gather the keys and shared negatives, reduce-scatter their gradient) or
            ``"ring"`` (each rank's block passed around the group: memory per rank independent of the world
            size; ``clip_loss``). Ignored without ``process_group``, and under ``torch.compile``, where the
            definition runs (its keys gathered).
        schedule, gemm: the Triton backends' switches. The plain call (and shared negatives alone):
            ``SCHEDULES`` ``"exact"`` or ``"fixed_shift"``, ``GEMMS`` ``"triton"`` or ``"cublas"``, None taking
            ``FUSEDLOSS_CONTRASTIVE_SCHEDULE`` / ``_GEMM``, unset the first. With a retrieval option:
            ``retrieval.SCHEDULES`` ``"bands"`` (torch ops, cuBLAS band GEMMs: the default until a GPU has timed
            the kernels) or ``"kernels"`` (``kernels/retrieval.py``), None taking
            ``FUSEDLOSS_RETRIEVAL_SCHEDULE``; ``gemm`` unused there.

    Returns:
        The loss in the query's dtype (fp32 under ``torch.autocast``).
    """
    _checks.check_tensor("query", query, floating=True, dims=(2,))
    _checks.check_tensor("key", key, floating=True, dims=(2,), device=query.device)
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"key must have query's feature size {query.shape[1]}, got shape {tuple(key.shape)}")
    if query.shape[0] == 0 or query.shape[1] == 0:
        raise ValueError(f"query must have at least one row and one column, got {tuple(query.shape)}")
    if key.shape[0] < query.shape[0]:
        raise ValueError(f"key must have at least as many rows as query ({query.shape[0]}): row i's positive is "
                         f"key i; got {key.shape[0]}")
    normalize = _checks.check_bool("normalize", normalize)
    _checks.check_reduction(reduction)
    _check_retrieval_options(query, key, negatives, positive_ids, false_negative_margin)
    dist_impl = check_dist_impl(dist_impl)
    named = (("query", query), ("key", key)) + (() if negatives is None else (("negatives", negatives),))
    (x, y, *neg), out_dtype = _features(named, normalize=normalize)
    neg = neg[0] if neg else None
    plain = positive_ids is None and false_negative_margin is None and process_group is None
    with _checks.autocast_off(x.device):
        scale = _inverse_temperature(temperature, x)
        if plain and (neg is None or neg.dim() == 2):
            # shared negatives are more key columns to the kernels (after the queue: candidates in the same order)
            opts = ContrastiveOptions("info_nce", reduction=reduction, normalized=normalize, out_dtype=out_dtype,
                                      engine=_engine(x))
            return _run(opts, x, y if neg is None else torch.cat([y, neg]), scale, None, schedule, gemm)
        from .retrieval import RetrievalOptions, choose_engine, info_nce_retrieval

        # (under torch.compile the definition, whose logits are materialized: the band loop is not traced)
        engine = "definition" if torch.compiler.is_compiling() else choose_engine(_engine(x), schedule)
        opts = RetrievalOptions(reduction, None if false_negative_margin is None else float(false_negative_margin),
                                out_dtype, engine)
        shared, per_query = (neg, None) if neg is None or neg.dim() == 2 else (None, neg)
        if process_group is not None:
            rank, world = _distributed.rank_and_size(_distributed.check_group(process_group))
            opts = dataclasses.replace(opts, rank=rank, world_size=world, process_group=process_group,
                                       dist_impl=dist_impl)
            if engine != "definition":
                needs = _family.needs_grad(y, shared)
                _distributed.agree(process_group, x.device, query_rows=x.shape[0], key_rows=y.shape[0],
                                   dim=x.shape[1], dtype=x.dtype, shared_negatives=0 if shared is None else len(shared),
                                   per_query_negatives=0 if per_query is None else per_query.shape[1],
                                   positive_ids=positive_ids is not None, margin=false_negative_margin is not None,
                                   key_grad=needs[0], negatives_grad=needs[1])
        ids = None if positive_ids is None else positive_ids.to(torch.int64)  # (every backend's collectives take it)
        return info_nce_retrieval(opts, x, y, shared, per_query, ids, scale)


def _check_retrieval_options(query, key, negatives, positive_ids, margin):
    if negatives is not None:
        _checks.check_tensor("negatives", negatives, floating=True, dims=(2, 3), device=query.device, like="query")
        if negatives.shape[-1] != query.shape[1] or 0 in negatives.shape or \
                (negatives.dim() == 3 and negatives.shape[0] != query.shape[0]):
            raise ValueError(f"negatives must be (S, {query.shape[1]}) shared or ({query.shape[0]}, K, "
                             f"{query.shape[1]}) per query, S, K >= 1; got {tuple(negatives.shape)}")
    if positive_ids is not None:
        _checks.check_tensor("positive_ids", positive_ids, floating=False, dims=(1,), device=query.device,
                             like="query")
        if positive_ids.shape[0] != key.shape[0]:
            raise ValueError(f"positive_ids must have one id per key row ({key.shape[0]}), got shape "
                             f"{tuple(positive_ids.shape)}")
    if margin is not None:
        _checks.check_number("false_negative_margin", margin, finite=True)


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, process_group=None,
                dist_impl="gather", schedule=None, gemm=None):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023), open_clip's ``SigLipLoss``:
    ``-sum_ij logsigmoid(l_ij (logit_scale <x_i, y_j> + logit_bias)) / N`` with ``l = 2 I - 1`` (+1 for the pairs
    ``i == j``, -1 for every other), ``x`` and ``y`` the L2-normalized features, never forming the ``N x N`` logits.

    Args:
        image_features, text_features: ``(N, d)`` each (rows ``i`` are the positive pairs), float16, bfloat16,
            float32 or float64, one dtype (under ``torch.autocast`` any two), any strides. L2-normalized here,
            with the same consequence for already normalized features as in ``clip_loss``: the parameters'
            gradients are open_clip's.
        logit_scale: a 0-d (or one-element) floating tensor that receives a gradient (open_clip's SigLIP models
            return ``logit_scale.exp()``), or a finite number.
        logit_bias: a 0-d (or one-element) floating tensor that receives a gradient, a number, or ``None`` (no
            bias).
        process_group: a ``torch.distributed`` group: every rank passes its own ``n`` rows (the same ``n`` on every
            rank) and gets what open_clip's ``SigLipLoss(rank=r, world_size=W)`` gives on that rank: its images
            against the texts of every rank, ``/ n``, and its gradients (texts: the sum over every rank's loss).
            The text features are all-gathered in the forward (module docstring: why not a ring) and their
            gradient reduce-scattered (fp32) in the backward. Every rank must call it and backpropagate it.
        dist_impl: ``"gather"`` (above) or ``"ring"`` (open_clip's neighbour exchange, memory independent of the
            world size), as in ``clip_loss``.
        schedule, gemm: the Triton backends' switches (``SCHEDULES``: ``"exact"`` or ``"fixed_shift"``; ``GEMMS``:
            ``"triton"`` or ``"cublas"``); None takes ``FUSEDLOSS_CONTRASTIVE_SCHEDULE`` / ``_GEMM``, unset the first.

    Returns:
        A 0-d tensor of the features' dtype (fp32 under ``torch.autocast``).
    """
    x, y, scale, out_dtype = _image_text(image_features, text_features, logit_scale)
    bias = (torch.zeros((), dtype=scale.dtype, device=x.device) if logit_bias is None
            else _scalar_tensor("logit_bias", logit_bias, x))
    with _checks.autocast_off(x.device):
        return _run(_group_options("siglip", process_group, dist_impl, out_dtype, x), x, y, scale, bias, schedule,
                    gemm)


# ---------------------------------------------------------------------------------------------------------------
# Loss and gradients without an autograd graph: cached-embedding training (GradCache)


def clip_loss_and_grads(image_features, text_features, logit_scale, logit_bias=None, *, process_group=None,
                        dist_impl="gather", schedule=None, gemm=None):
    """``clip_loss`` and its gradients, ``(loss, d_image_features, d_text_features, d_logit_scale[, d_logit_bias])``,
    detached: for GradCache loops, which embed a large batch in chunks without a graph, take the loss's gradients
    with respect to the cached embeddings here, then backpropagate each chunk's gradient through its re-embedded
    chunk. Arguments as ``clip_loss``'s; a number for ``logit_scale`` / ``logit_bias`` gets None. The same kernels
    (one forward, one backward pass); the gradients are those ``clip_loss(...).backward()`` would leave."""
    tensors = (image_features, text_features, logit_scale) + (() if logit_bias is None else (logit_bias,))
    return _loss_and_grads(lambda *t: clip_loss(*t, process_group=process_group, dist_impl=dist_impl,
                                                schedule=schedule, gemm=gemm), tensors)


def siglip_loss_and_grads(image_features, text_features, logit_scale, logit_bias, *, process_group=None,
                          dist_impl="gather", schedule=None, gemm=None):
    """``siglip_loss`` and its gradients, ``(loss, d_image_features, d_text_features, d_logit_scale,
    d_logit_bias)``, detached, as ``clip_loss_and_grads`` (a None or number ``logit_bias`` gets None)."""
    return _loss_and_grads(lambda *t: siglip_loss(*t, process_group=process_group, dist_impl=dist_impl,
                                                  schedule=schedule, gemm=gemm),
                           (image_features, text_features, logit_scale, logit_bias))


def info_nce_and_grads(query, key, temperature=0.07, *, negatives=None, positive_ids=None,
                       false_negative_margin=None, normalize=True, reduction="mean", process_group=None,
                       dist_impl="gather", schedule=None, gemm=None):
    """``info_nce`` and its gradients, ``(loss, d_query, d_key, d_temperature)`` or with ``negatives``
    ``(loss, d_query, d_key, d_negatives, d_temperature)``, detached, as ``clip_loss_and_grads`` (``reduction``
    'mean' or 'sum': a scalar loss; a number ``temperature`` gets None)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' (one loss to differentiate), got {reduction!r}")
    options = dict(positive_ids=positive_ids, false_negative_margin=false_negative_margin, normalize=normalize,
                   reduction=reduction, process_group=process_group, dist_impl=dist_impl, schedule=schedule,
                   gemm=gemm)
    if negatives is None:
        return _loss_and_grads(lambda q, k, t: info_nce(q, k, t, **options), (query, key, temperature))
    return _loss_and_grads(lambda q, k, n, t: info_nce(q, k, t, negatives=n, **options),
                           (query, key, negatives, temperature))


def _loss_and_grads(loss_fn, values):
    """(loss, one gradient per value) of ``loss_fn(*values)``, the tensors taken as fresh leaves (no graph reaches
    back into the caller's), every result detached; None for the values that are not floating tensors."""
    leaves = [v.detach().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for v in values]
    wanted = [v for v in leaves if isinstance(v, torch.Tensor) and v.requires_grad]
    with torch.enable_grad():
        loss = loss_fn(*leaves)
        grads = iter(torch.autograd.grad(loss, wanted))
    return (loss.detach(), *(next(grads) if any(v is w for w in wanted) else None for v in leaves))


# ---------------------------------------------------------------------------------------------------------------
# Arguments: checks (metadata only), the features as the Function sees them, the options


def _image_text(image_features, text_features, logit_scale):
    """(image, text) as the Function sees them (``_features``), the 0-d scale and the loss's dtype."""
    _checks.check_tensor("image_features", image_features, floating=True, dims=(2,))
    _checks.check_tensor("text_features", text_features, floating=True, dims=(2,), device=image_features.device)
    if text_features.shape != image_features.shape:
        raise ValueError(f"text_features must have image_features' shape {tuple(image_features.shape)}, got "
                         f"{tuple(text_features.shape)}")
    if image_features.shape[0] == 0 or image_features.shape[1] == 0:
        raise ValueError(f"image_features must have at least one row and one column, got "
                         f"{tuple(image_features.shape)}")
    (x, y), out_dtype = _features((("image_features", image_features), ("text_features", text_features)), True)
    return x, y, _scalar_tensor("logit_scale", logit_scale, x, finite=True), out_dtype


def _features(named, normalize):
    """The features as the loss sees them, and the loss's dtype. Outside autocast they share the first one's dtype
    (TypeError naming the other otherwise); under ``torch.autocast`` every non-fp64 one is cast to the autocast
    dtype, as eager's matmul casts its operands, differentiably. Normalized with ``F.normalize`` in the compute
    dtype first (eager normalizes before its matmul casts)."""
    (first, x0), device = named[0], named[0][1].device
    autocast = _checks.autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device.type) if autocast and x0.dtype != torch.float64 else x0.dtype
    for name, t in named[1:]:
        if (dtype if autocast and t.dtype != torch.float64 else t.dtype) != dtype:
            where = " (under torch.autocast: fp64 is not cast, so both or neither must be fp64)" if autocast else ""
            raise TypeError(f"{name} must have {first}'s dtype {x0.dtype}{where}, got {t.dtype}")
    with _checks.autocast_off(device):
        out = [F.normalize(t.to(_family.compute_dtype(t)), dim=-1).to(dtype) if normalize else t.to(dtype)
               for _, t in named]
    return out, _checks.autocast_fp32(device, dtype)


def _scalar_tensor(name, value, like, finite=False):
    """A number or a 0-d / one-element floating tensor on ``like``'s device, as a 0-d tensor of the compute dtype
    (differentiable: a tensor keeps its graph; its value is never read, so no host sync)."""
    dtype = _family.compute_dtype(like)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        _checks.check_tensor(name, value, floating=True, device=like.device)
        if value.numel() != 1:
            raise ValueError(f"{name} must be a 0-d or one-element tensor, got shape {tuple(value.shape)}")
        return value.reshape(()).to(dtype)
    return torch.full((), _checks.check_number(name, value, finite=finite), dtype=dtype, device=like.device)


def _inverse_temperature(temperature, like):
    if isinstance(temperature, torch.Tensor) and temperature.is_floating_point():
        return 1.0 / _scalar_tensor("temperature", temperature, like)
    t = _checks.check_number("temperature", temperature, low=0.0, low_open=True)
    # (1 / inf is 0, eager's limit; no branch on the value, which torch.compile may hold as a symbolic float)
    return torch.full((), 1.0 / t, dtype=_family.compute_dtype(like), device=like.device)


def _engine(x):
    """"triton" (the kernels), "torch" (the chunked bands), or "definition": the plain torch ops, for torch.func
    transforms, meta and fake tensors (``runs_definition``), and while ``torch.compile`` traces the torch path."""
    if runs_definition(x):
        return "definition"
    if matmul_backend(x.device, x.dtype) != "torch":
        return "triton"
    return "definition" if torch.compiler.is_compiling() else "torch"


DIST_IMPLS = ("gather", "ring")


def check_dist_impl(dist_impl):
    if dist_impl not in DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {', '.join(map(repr, DIST_IMPLS))}, got {dist_impl!r}")
    return dist_impl


def _group_options(kind, process_group, dist_impl, out_dtype, x):
    rank, world = 0, 1
    dist_impl = check_dist_impl(dist_impl)
    if process_group is None:
        dist_impl = "gather"  # one block: nothing travels
    else:
        rank, world = _distributed.rank_and_size(_distributed.check_group(process_group))
    return ContrastiveOptions(kind, out_dtype=out_dtype, engine=_engine(x), rank=rank, world_size=world,
                              process_group=process_group, dist_impl=dist_impl)


def check_open_clip_ranks(process_group, rank=None, world_size=None):
    """open_clip's ``rank`` / ``world_size`` constructor arguments (``fusedloss.nn.ClipLoss``, ``SigLipLoss``)
    against ``process_group``, through which fusedloss communicates: None takes the group's, a value must be the
    group's; without a group the process is rank 0 of 1 (open_clip's defaults). Returns (rank, world_size);
    ValueError naming the argument otherwise."""
    group_rank, group_size = 0, 1
    if process_group is not None:
        group_rank, group_size = _distributed.rank_and_size(_distributed.check_group(process_group))
    if world_size is not None:
        world_size = _checks.check_int("world_size", world_size)
        if world_size > 1 and process_group is None:
            raise ValueError(f"world_size={world_size} needs process_group: fusedloss communicates through the "
                             f"torch.distributed group given as process_group= (e.g. torch.distributed.group.WORLD), "
                             f"and without one computes a single process's loss")
        if world_size != group_size:
            raise ValueError(f"world_size={world_size} is not process_group's size {group_size}")
    if rank is not None and _checks.check_int("rank", rank) != group_rank:
        where = "this process's rank in process_group" if process_group is not None else \
            "the only rank without process_group"
        raise ValueError(f"rank={rank} is not {group_rank}, {where}")
    return group_rank, group_size


def _run(opts, x, y, scale, bias, schedule, gemm):
    schedule = _schedules.resolve("schedule", schedule, SCHEDULES, SCHEDULE_ENV)
    gemm = _schedules.resolve("gemm", gemm, GEMMS, GEMM_ENV)
    if opts.engine == "definition":
        return _definition(opts, x, y, scale, bias)
    needs = _family.needs_grad(x, y, scale, bias)
    if opts.dist_impl == "ring":  # (a rank carrying a gradient accumulator that its neighbour does not would hang)
        _distributed.agree(opts.process_group, x.device, rows=x.shape[0], dim=x.shape[1], dtype=x.dtype,
                           text_features_grad=needs[1])
    if opts.engine == "triton":
        # The fixed shift needs unit vectors (not info_nce(normalize=False)); fp64 features take the exact kernels,
        # and so does the ring, whose blocks without positives the fixed shift's column fallback does not know.
        if not opts.normalized or x.dtype == torch.float64 or opts.dist_impl == "ring":
            schedule = "exact"
        opts = dataclasses.replace(opts, schedule=schedule, gemm=gemm)
    return _Contrastive.apply(opts, needs, x, y, scale, bias)[0]


# The ``rank`` of a ring step's block of another rank's columns (``_block_options``): no positive among them.
_FOREIGN_BLOCK = -1


def _positives(kind, rank, n_rows):
    """(offset, modulus, self_mask): row ``i``'s positive is column ``(i + offset) mod modulus``. For a block of
    another rank's ``n_rows`` columns (``rank == _FOREIGN_BLOCK``) every row's positive is column ``n_rows + i``,
    past the block: none is in it (``offset >= n_cols``: the engines' test)."""
    if kind == "nt_xent":
        return n_rows // 2, n_rows, True
    if rank == _FOREIGN_BLOCK:
        return n_rows, 2 * n_rows, False
    offset = rank * n_rows
    return offset, offset + n_rows, False


# ---------------------------------------------------------------------------------------------------------------
# The definition: the torch backend under torch.compile, and the higher-order gradients of every path


def _definition(opts, x, y, scale, bias):
    """The loss in torch ops, the logits materialized. Each softmax loss is written through its negatives
    (``softplus(logsumexp_{j != pos} S_ij - S_i,pos)``, the cross-entropy; docs/kernels/contrastive.md), whose autograd
    gradient keeps its accuracy at a small loss where ``F.cross_entropy``'s ``softmax - 1`` cancels. Across ranks
    the collectives are differentiable (functional collectives); there the per-rank split of
    ``logit_scale``'s gradient is that of the objective ``sum_r loss_r`` (the sum over ranks is open_clip's; the
    other paths give each rank open_clip's own)."""
    q = x.to(scale.dtype)
    k = q if opts.kind == "nt_xent" else y.to(scale.dtype)
    if opts.process_group is not None:
        k = _distributed.gather_with_grad(k, opts.process_group)
    c = q @ k.T
    n_rows, n_cols = c.shape
    offset, modulus, self_mask = _positives(opts.kind, opts.rank, n_rows)
    pos = (torch.arange(n_rows, device=c.device) + offset) % modulus
    is_pos = torch.arange(n_cols, device=c.device)[None, :] == pos[:, None]
    if opts.kind == "siglip":
        z = scale * c + bias
        return (-F.logsigmoid(torch.where(is_pos, z, -z)).sum() / n_rows).to(opts.out_dtype)
    logits = scale * c
    excluded = is_pos | (torch.eye(n_rows, n_cols, dtype=torch.bool, device=c.device) if self_mask else False)
    negatives = logits.masked_fill(excluded, float("-inf"))
    positive = logits.gather(1, pos[:, None]).squeeze(1)
    rows = _family.softplus(torch.logsumexp(negatives, dim=1) - positive)
    if opts.kind != "clip":
        denominator = torch.full((), float(n_rows), dtype=rows.dtype, device=rows.device)
        return _family.reduce(rows, opts.reduction, denominator, (n_rows,)).to(opts.out_dtype)
    if opts.process_group is None:
        col_negatives = torch.logsumexp(negatives, dim=0)
    else:  # every rank's column sums over its rows, summed over the ranks (the max without a gradient: it cancels)
        top = _all_reduce_max(negatives.detach().amax(0), opts.process_group)
        shift = torch.where(top > float("-inf"), top, 0.0)
        sums = _distributed.gather_with_grad(torch.exp(negatives - shift).sum(0)[None], opts.process_group).sum(0)
        col_negatives = (shift + torch.log(sums))[offset:offset + n_rows]
    cols = _family.softplus(col_negatives - positive)
    return ((rows.mean() + cols.mean()) / 2).to(opts.out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Statistics shared by both engines (docs/kernels/contrastive.md)


def _finish(m, s, t, pos_dot, scale):
    """(lse, loss, dloss/ds, negatives' lse), stacked as (L, 4), from the negatives' (max, sum-exp, moment) and the
    positive's dot product of L rows (or columns). The fourth column tells the fixed-shift backward where its bound
    holds (docs/kernels/contrastive.md)."""
    negatives = torch.where(m > float("-inf"), m, 0.0) + torch.log(s)
    positive = scale * pos_dot
    gap = negatives - positive
    dscale = torch.where(s > 0, torch.sigmoid(gap) * (t / s - pos_dot), 0.0)
    return torch.stack([torch.logaddexp(negatives, positive), _family.softplus(gap), dscale, negatives], dim=1)


def _rebase(m, s, t, top):
    """(s, t) of partials with maximum ``m`` re-based to the common maximum ``top`` (-inf stays 0)."""
    decay = torch.exp(m - torch.where(top > float("-inf"), top, 0.0))
    return s * decay, t * decay


def _merge_partials(parts):
    """(P, 3, N) partial (max, sum-exp, moment) of P programs or bands -> (3, N) over all of them."""
    m, s, t = parts.unbind(1)
    top = m.amax(0)
    s, t = _rebase(m, s, t, top)
    return torch.stack([top, s.sum(0), t.sum(0)])


def _all_reduce_max(t, group):
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def _all_reduce_partials(cols, group):
    """(3, N) column statistics over this rank's rows -> over every rank's: the max, then the re-based sums."""
    top = _all_reduce_max(cols[0], group)
    sums = _distributed.all_reduce_(torch.stack(_rebase(*cols, top)), group)
    return torch.cat([top[None], sums])


# ---------------------------------------------------------------------------------------------------------------
# The autograd Function of the Triton and torch engines


class _Contrastive(_family.LossFunction):
    """Inputs: ``x`` (M, d) the row features (normalized as the loss sees them), ``y`` (N, d) the column features
    (None for NT-Xent), ``scale`` and ``bias`` (SigLIP) 0-d in the compute dtype. State: the rows' (lse, loss,
    dloss/ds, negatives' lse) (softmax) or (loss, sum u, sum u C) (sigmoid), the columns' four (CLIP), and the
    gathered column features across ranks."""

    @staticmethod
    def forward(opts, needs, x, y, scale, bias):
        k, gathered = (x if opts.kind == "nt_xent" else y), None
        if opts.dist_impl == "ring":
            rows, cols = _ring_stats(opts, x, y, scale, bias)
        else:
            if opts.process_group is not None:
                k = gathered = _distributed.all_gather(y, opts.process_group).flatten(0, 1)
            rows, cols = _ENGINES[opts.engine].stats(opts, x, k, scale, bias)
        n_rows = x.shape[0]
        if opts.kind == "siglip":
            return (rows[:, 0].sum() / n_rows).to(opts.out_dtype), rows, None, gathered
        row_state = _finish(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], scale)
        losses = row_state[:, 1]
        if opts.kind == "nt_xent":
            return losses.mean().to(opts.out_dtype), row_state, None, gathered
        if opts.kind == "info_nce":
            denominator = torch.full((), float(n_rows), dtype=losses.dtype, device=losses.device)
            return _family.reduce(losses, opts.reduction, denominator, (n_rows,)).to(opts.out_dtype), row_state, \
                None, gathered
        pos_dot = rows[:, 3]
        if opts.process_group is not None and opts.dist_impl == "gather":
            cols = _all_reduce_partials(cols, opts.process_group)
            pos_dot = _distributed.all_gather(pos_dot, opts.process_group).flatten()
        col_state = _finish(*cols, pos_dot, scale)  # the ring's: this rank's own columns only
        offset = opts.rank * n_rows if opts.dist_impl == "gather" else 0
        loss = (losses.mean() + col_state[offset:offset + n_rows, 1].mean()) / 2
        return loss.to(opts.out_dtype), row_state, col_state, gathered

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, needs, x, y, scale, bias = inputs
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        _family.save(ctx, opts, needs, (x, y, scale, bias), state=output[1:])

    @staticmethod
    def backward(ctx, *grad_outputs):
        return _family.backward(ctx, _recompute, _definition, grad_outputs)


def _weights(opts, grad, n_rows):
    """(a, b): the per-row and per-column weights of the logit gradient (docs/kernels/contrastive.md); b None without a
    column term. Broadcast (stride-0) vectors where one number serves every row."""
    if opts.kind == "info_nce":
        a = grad.reshape(-1) if opts.reduction == "none" else (grad / n_rows if opts.reduction == "mean" else grad)
        return a.expand(n_rows), None
    if opts.kind != "clip":
        a = (grad / n_rows).expand(n_rows)
        return a, (a if opts.kind == "nt_xent" else None)
    a = (grad / (2 * n_rows)).expand(n_rows)
    if opts.process_group is None or opts.dist_impl == "ring":  # (the ring's columns carry their owner's b)
        return a, a
    every = _distributed.all_gather(grad.reshape(1), opts.process_group).reshape(-1)  # each rank's grad_output
    return a, (every / (2 * n_rows)).repeat_interleave(n_rows)


def _recompute(ctx, inputs, state, grad_outputs):
    """The gradients from the saved inputs and statistics: the band pass for the features, the statistics alone
    for the scale and the bias."""
    opts = ctx.opts
    x, y, scale, bias = inputs
    row_state, col_state, gathered = state
    if opts.kind == "nt_xent":  # the transposed term: the rows' statistics read along columns
        col_state = row_state
    need_x, need_y, need_scale, need_bias = ctx.needs
    n_rows = x.shape[0]
    a, b = _weights(opts, grad_outputs[0].to(scale.dtype), n_rows)
    k = x if opts.kind == "nt_xent" else (gathered if gathered is not None else y)
    need_k = need_y and opts.kind != "nt_xent"
    dx = dk = grad_scale = grad_bias = None
    if opts.dist_impl == "ring" and (need_x or need_k):
        dx, dk = _ring_grads(opts, x, y, scale, bias, row_state, col_state, a, b, need_x, need_k)
    elif need_x or need_k:
        dx, dk = _ENGINES[opts.engine].grads(opts, x, k, scale, bias, row_state, col_state, a, b, need_x, need_k)
        if dk is not None and opts.process_group is not None:
            dk = _distributed.reduce_scatter(dk, opts.process_group)
    if need_scale:
        grad_scale = (a * row_state[:, 2]).sum()
        if opts.kind == "clip":  # this rank's columns' own term
            first = opts.rank * n_rows if opts.dist_impl == "gather" else 0
            own = slice(first, first + n_rows)
            grad_scale = grad_scale + (b[own] * col_state[own, 2]).sum()
        grad_scale = grad_scale.to(scale.dtype)
    if need_bias:
        grad_bias = (a * row_state[:, 1]).sum().to(bias.dtype)
    return (None if dx is None else dx.to(x.dtype), None if dk is None else dk.to(y.dtype), grad_scale, grad_bias)


# ---------------------------------------------------------------------------------------------------------------
# The ring across ranks (``dist_impl="ring"``): each rank's column block visits every rank
# (``_distributed.ring_pass``); the engines run on one block at a time.


def _block_options(opts, own):
    """The options an engine runs one ring block with: this rank's own columns hold its rows' positives at the
    same index; another rank's hold none (``_FOREIGN_BLOCK``)."""
    return dataclasses.replace(opts, rank=0 if own else _FOREIGN_BLOCK)


def _merge_rows(kind, held, part):
    """The rows' statistics over two column blocks: SigLIP's sums add; the softmax's (max, sum-exp, moment) merge
    and the positive's dot product (from the own block, 0 in the others) adds."""
    if kind == "siglip":
        return held + part
    merged = _merge_partials(torch.stack([held[:, :3].t(), part[:, :3].t()])).t()
    return torch.cat([merged, (held[:, 3] + part[:, 3])[:, None]], dim=1)


def _ring_stats(opts, x, y, scale, bias):
    """(rows, cols) as the gather path's, by a ring: the rows' statistics merged block by block; for CLIP each text
    block carries its columns' partials over the rows it met and arrives home with them over every rank's rows
    (both directions in one pass), ``cols`` then this rank's own columns only."""
    engine, held = _ENGINES[opts.engine], None

    def visit(source, block):
        nonlocal held
        rows, cols = engine.stats(_block_options(opts, source == opts.rank), x, block[0], scale, bias)
        held = rows if held is None else _merge_rows(opts.kind, held, rows)
        return None if cols is None else (cols,)

    carried = None
    if opts.kind == "clip":
        carried = (torch.empty((3, y.shape[0]), dtype=scale.dtype, device=y.device),)
    cols = _distributed.ring_pass((y,), visit, opts.process_group, carried,
                                  combine=lambda arrived, part: _merge_partials(torch.stack([arrived, part])))
    return held, (None if cols is None else cols[0])


def _ring_grads(opts, x, y, scale, bias, row_state, col_state, a, b, need_x, need_k):
    """(dx, dk) as the gather path's, by a ring: each text block travels with what its owner knows of its columns
    (CLIP: their statistics and weights ``b``) and with the sum of its gradient over the ranks it has visited, which
    arrives home complete. Every rank must ask for the texts' gradient alike (``need_k``): the ring carries it."""
    engine, dx = _ENGINES[opts.engine], None
    block = (y,) if opts.kind != "clip" else (y, col_state.contiguous(), b.contiguous())

    def visit(source, block):
        nonlocal dx
        cols, weights = (block[1], block[2]) if opts.kind == "clip" else (None, None)
        dq, dk = engine.grads(_block_options(opts, source == opts.rank), x, block[0], scale, bias, row_state, cols,
                              a, weights, need_x, need_k)
        if dq is not None:
            dx = dq if dx is None else dx.add_(dq)
        return None if dk is None else (dk,)

    carried = (torch.empty(y.shape, dtype=scale.dtype, device=y.device),) if need_k else None
    dk = _distributed.ring_pass(block, visit, opts.process_group, carried)
    return dx, (None if dk is None else dk[0])


# ---------------------------------------------------------------------------------------------------------------
# Engines: ``stats(opts, q, k, scale, bias) -> (rows, cols)``: the forward's per-row statistics (M, 4) softmax /
# (M, 3) sigmoid and, for CLIP, the columns' (3, N) (max, sum-exp, moment) over these rows;
# ``grads(opts, q, k, scale, bias, row_state, col_state, a, b, need_q, need_k) -> (dq, dk)`` with respect to the
# (normalized) features, in the compute dtype.


def _triton_stats_fake(q, k, scale, bias, *, kind, schedule, rank):
    from ..kernels.contrastive import COL_STATS, SIGMOID_ROW_STATS, SOFTMAX_ROW_STATS

    rows = q.new_empty((q.shape[0], SIGMOID_ROW_STATS if kind == "siglip" else SOFTMAX_ROW_STATS), dtype=scale.dtype)
    return [rows, q.new_empty((COL_STATS, k.shape[0]), dtype=scale.dtype)] if kind == "clip" else [rows]


@_family.opaque_op("contrastive_stats", _triton_stats_fake)
def _triton_stats(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], *, kind: str,
                  schedule: str, rank: int) -> List[torch.Tensor]:
    """``_TritonEngine.stats``: [rows] or, for CLIP, [rows, cols] (contiguous, as the fake says)."""
    from ..kernels.contrastive import (
        COL_STATS,
        SIGMOID_ROW_STATS,
        SOFTMAX_ROW_STATS,
        contrastive_forward,
        forward_programs,
    )

    sigmoid = kind == "siglip"
    n_rows, dim = q.shape
    n_cols = k.shape[0]
    offset, modulus, self_mask = _positives(kind, rank, n_rows)
    rows = _alloc.empty((n_rows, SIGMOID_ROW_STATS if sigmoid else SOFTMAX_ROW_STATS), dtype=scale.dtype,
                        device=q.device)
    ws = None
    if kind == "clip":
        programs = forward_programs(n_rows, dim, q.dtype, q.device, schedule)[0]
        ws = _alloc.empty((programs, COL_STATS, n_cols), dtype=scale.dtype, device=q.device)
    contrastive_forward(q, k, scale, bias if sigmoid else None, rows, ws, pos_offset=offset, pos_modulus=modulus,
                        self_mask=self_mask, sigmoid=sigmoid, schedule=schedule)
    fixed = schedule == "fixed_shift" and not sigmoid
    if fixed:  # the rows whose negatives the fixed shift could not hold, exactly (docs/kernels/contrastive.md)
        contrastive_forward(q, k, scale, None, rows, None, pos_offset=offset, pos_modulus=modulus,
                            self_mask=self_mask, sigmoid=False, schedule="fallback")
    if ws is None:
        return [rows]
    cols = _merge_partials(ws)
    if fixed:
        # The columns' likewise: the transposed problem (rows K, columns Q), whose row j has its positive at
        # column j - offset when that is one of this rank's rows, written over the merged (m, s, t) in an
        # (N, 4) layout (the fourth column, that problem's positive dot product, is not used).
        stats = torch.cat([cols, torch.zeros_like(cols[:1])]).t().contiguous()
        contrastive_forward(k, q, scale, None, stats, None, pos_offset=n_cols - offset, pos_modulus=n_cols,
                            self_mask=False, sigmoid=False, schedule="fallback")
        cols = stats[:, :COL_STATS].t().contiguous()
    return [rows, cols]


def _triton_grads_fake(q, k, scale, bias, row_state, col_state, a, b, *, kind, schedule, gemm, rank, need_q,
                       need_k):
    return [t.new_empty(t.shape, dtype=scale.dtype) for t, need in ((q, need_q), (k, need_k)) if need]


@_family.opaque_op("contrastive_grads", _triton_grads_fake)
def _triton_grads(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                  row_state: Optional[torch.Tensor], col_state: Optional[torch.Tensor], a: torch.Tensor,
                  b: Optional[torch.Tensor], *, kind: str, schedule: str, gemm: str, rank: int, need_q: bool,
                  need_k: bool) -> List[torch.Tensor]:
    """``_TritonEngine.grads``: [dq] and / or [dk], those asked for, in that order."""
    from ..kernels.contrastive import band_matmul, band_rows, contrastive_dlogits

    sigmoid = kind == "siglip"
    n_rows, dim = q.shape
    n_cols = k.shape[0]
    offset, modulus, self_mask = _positives(kind, rank, n_rows)
    # W is stored times 1 / max |weight| (|W| <= 2 then), so that fp16 bands stay clear of subnormals.
    top = a.abs().amax() if b is None else torch.maximum(a.abs().amax(), b.abs().amax())
    band_scale = 1.0 / top.clamp(min=torch.finfo(top.dtype).tiny)  # (finite for a subnormal or zero top)
    r = band_rows(n_rows, n_cols, q.dtype)
    band = _alloc.empty((r, n_cols), dtype=q.dtype, device=q.device)
    cublas = gemm == "cublas"
    dq = _alloc.empty((n_rows, dim), dtype=scale.dtype, device=q.device) if need_q else None
    dk = _alloc.empty((n_cols, dim), dtype=scale.dtype, device=q.device) if need_k else None
    for start in range(0, n_rows, r):
        stop = min(n_rows, start + r)
        w = band[:stop - start]
        contrastive_dlogits(q, k, scale, bias if sigmoid else None, band_scale, None if sigmoid else row_state, a,
                            None if sigmoid else col_state, b, w, row_start=start, pos_offset=offset,
                            pos_modulus=modulus, self_mask=self_mask, sigmoid=sigmoid, schedule=schedule)
        if need_q:
            band_matmul(w, k, dq[start:stop], accumulate=False, cublas=cublas)
        if need_k:
            band_matmul(w.t(), q[start:stop], dk, accumulate=start > 0, cublas=cublas)
    factor = scale / band_scale
    return [g.mul_(factor) for g in (dq, dk) if g is not None]


class _TritonEngine:
    """The kernels, each pass one custom op under ``torch.compile`` (``_family.opaque_op``)."""

    @staticmethod
    def stats(opts, q, k, scale, bias):
        out = _triton_stats(q, k, scale, bias, kind=opts.kind, schedule=opts.schedule, rank=opts.rank)
        return out[0], (out[1] if opts.kind == "clip" else None)

    @staticmethod
    def grads(opts, q, k, scale, bias, row_state, col_state, a, b, need_q, need_k):
        out = iter(_triton_grads(q, k, scale, bias, row_state, col_state, a, b, kind=opts.kind,
                                 schedule=opts.schedule, gemm=opts.gemm, rank=opts.rank, need_q=need_q,
                                 need_k=need_k))
        return (next(out) if need_q else None), (next(out) if need_k else None)


class _TorchEngine:
    """The same statistics and bands in torch ops, in the compute dtype (fp32 / fp64)."""

    @staticmethod
    def _sigmoid_logits(c, scale, bias, local, pos):
        """SigLIP's ``z = s C + b`` of a band with its positives set to -inf, where the negatives' terms
        ``softplus(z)`` and ``u = sigmoid(z)`` (docs/kernels/contrastive.md, l = -1) are 0, and z at the positives
        (None for a block without them, ``pos`` None): the positives' terms are then added per row, with no (R, N)
        label mask or select alive besides ``z``."""
        z = c * scale + bias
        if pos is None:
            return z, None
        z_pos = z[local, pos]
        z[local, pos] = float("-inf")
        return z, z_pos

    @staticmethod
    def _moments(x, c, dim):
        m = x.amax(dim)
        p = torch.exp(x - torch.where(m > float("-inf"), m, 0.0).unsqueeze(dim))
        return m, p.sum(dim), (p * c).sum(dim)

    @staticmethod
    def _positive_columns(offset, modulus, n_cols, start, stop, device):
        """(local, pos): the band's rows and their positives' columns, pos None for a block without them."""
        local = torch.arange(stop - start, device=device)
        return local, ((local + start + offset) % modulus if offset < n_cols else None)

    @classmethod
    def stats(cls, opts, q, k, scale, bias):
        n_rows, n_cols = q.shape[0], k.shape[0]
        offset, modulus, self_mask = _positives(opts.kind, opts.rank, n_rows)
        kc = k.to(scale.dtype)
        rows = torch.empty((n_rows, 3 if opts.kind == "siglip" else 4), dtype=scale.dtype, device=q.device)
        cols = None
        for start, stop in _family.row_bands(n_rows, n_cols, _TORCH_BAND_ELEMENTS):
            c = q[start:stop].to(scale.dtype) @ kc.T
            local, pos = cls._positive_columns(offset, modulus, n_cols, start, stop, c.device)
            if opts.kind == "siglip":  # (loss, sum u, sum u C): the negatives' sums plus the positive's terms
                z, z_pos = cls._sigmoid_logits(c, scale, bias, local, pos)
                loss, u_sum, uc_sum = _family.softplus(z).sum(1), 0.0, 0.0
                if pos is not None:
                    u_pos = -torch.sigmoid(-z_pos)
                    loss, u_sum, uc_sum = loss + _family.softplus(-z_pos), u_pos, u_pos * c[local, pos]
                u = z.sigmoid_()
                rows[start:stop] = torch.stack([loss, u.sum(1) + u_sum, c.mul_(u).sum(1) + uc_sum], dim=1)
                continue
            x = c * scale
            if pos is not None:
                x[local, pos] = float("-inf")
            if self_mask:
                x[local, local + start] = float("-inf")
            rows[start:stop, :3] = torch.stack(cls._moments(x, c, 1), dim=1)
            rows[start:stop, 3] = c[local, pos] if pos is not None else 0.0
            if opts.kind == "clip":
                band = torch.stack(cls._moments(x, c, 0))
                cols = band if cols is None else _merge_partials(torch.stack([cols, band]))
        return rows, cols

    @classmethod
    def grads(cls, opts, q, k, scale, bias, row_state, col_state, a, b, need_q, need_k):
        n_rows, n_cols = q.shape[0], k.shape[0]
        offset, modulus, self_mask = _positives(opts.kind, opts.rank, n_rows)
        kc = k.to(scale.dtype)
        dq = torch.empty((n_rows, kc.shape[1]), dtype=scale.dtype, device=q.device) if need_q else None
        dk = torch.zeros((n_cols, kc.shape[1]), dtype=scale.dtype, device=q.device) if need_k else None
        for start, stop in _family.row_bands(n_rows, n_cols, _TORCH_BAND_ELEMENTS):
            qc = q[start:stop].to(scale.dtype)
            c = qc @ kc.T
            local, pos = cls._positive_columns(offset, modulus, n_cols, start, stop, c.device)
            rows_a = a[start:stop]
            if opts.kind == "siglip":  # W = a u, in place
                z, z_pos = cls._sigmoid_logits(c, scale, bias, local, pos)
                w = z.sigmoid_()
                if pos is not None:
                    w[local, pos] = -torch.sigmoid(-z_pos)
                w.mul_(rows_a[:, None])
            else:
                x = c * scale
                lse, loss = row_state[start:stop, 0], row_state[start:stop, 1]
                w = torch.exp(x - lse[:, None]) * rows_a[:, None]
                pos_w = rows_a * torch.expm1(-loss)
                if col_state is not None:
                    w += torch.exp(x - col_state[:, 0]) * b
                if pos is not None:
                    if col_state is not None:
                        pos_w = pos_w + b[pos] * torch.expm1(-col_state[pos, 1])
                    w[local, pos] = pos_w
                if self_mask:
                    w[local, local + start] = 0.0
            if need_q:
                torch.matmul(w, kc, out=dq[start:stop])
            if need_k:
                dk.addmm_(w.T, qc)
        return (None if dq is None else dq.mul_(scale)), (None if dk is None else dk.mul_(scale))


_ENGINES = {"triton": _TritonEngine, "torch": _TorchEngine}
