"""Contrastive losses, host side: ``nt_xent`` (SimCLR), ``clip_loss`` (symmetric CLIP, also across GPUs) and
``info_nce`` (one direction), tiled so that the ``N x N`` logits never exist at once.

The math, the gradient and the kernel split are derived in the docstring of ``fusedloss.kernels.contrastive``.
Both backends run the same algorithm:

- forward, per row band: logits ``s * Q_band K^T`` -> per-row log-sum-exp and positive logit, and (symmetric CLIP)
  per-column log-sum-exp partials merged across bands;
- backward, per row band: recompute the logits, form ``W = dloss/dlogits`` for the band, then ``W K`` (the band's
  row gradient) and ``W^T Q_band`` (added in fp32 to the column gradient); ``dloss/ds = sum_i <(W K)_i, Q_i>``.

The Triton backend fuses the logits, the log-sum-exp and the gradient formula into tiled kernels (the forward
holds one ``BLOCK_M x BLOCK_N`` tile per program); the torch backend runs the same bands with torch ops, a band of
``_TORCH_BAND_ELEMENTS`` logits at a time. Memory beyond the O(N d) features and gradients: one ``R x N`` band.

L2 normalization is applied here with its exact gradient (``F.normalize``'s, eps = 1e-12): the loss sees
``x_hat = x / max(|x|, eps)`` in the features' dtype, and the backward maps ``dx_hat`` (fp32) to
``dx = (dx_hat - x_hat <x_hat, dx_hat>) / |x|`` (``dx_hat / eps`` where ``|x| <= eps``), O(N d).

Across GPUs (``clip_loss(..., process_group=g)``): every rank passes ``n`` rows (the same ``n`` on every rank);
normalized features are all-gathered, rank ``r``'s images are scored against all ``W n`` texts and its texts against
all images, with positives at ``r n + i``, and the rank returns

    loss_r = (mean_i CE(s img_i . txt_all^T, r n + i) + mean_i CE(s txt_i . img_all^T, r n + i)) / 2,

which is open_clip's ``local_loss=True, gather_with_grad=True``. The backward sums every rank's gradient with
respect to the gathered features onto their owner (a reduce-scatter, in fp32), as ``torch.distributed.nn.all_gather``
does. Since ``mean_r loss_r`` is the single-process loss over the global batch ``L`` and each rank's gradient is
``d(sum_r loss_r) / d(its inputs)``, DDP's averaging (``1 / W``) yields exactly ``dL / d(parameters)``.
"""

import types

import torch

from .. import _alloc, _checks
from .._backend import matmul_backend

_EPS = 1e-12  # F.normalize's default
# Torch backend: logits per band (fp32: 16 MiB, with ~3 such temporaries alive in the backward).
_TORCH_BAND_ELEMENTS = 1 << 22


def nt_xent(features, temperature=0.07):
    """NT-Xent (SimCLR), exactly the seed's ``info_nce_loss``: ``F.cross_entropy`` over the cosine similarities of
    ``features`` divided by ``temperature``, self-similarity excluded, row ``i``'s positive at ``(i + N) mod 2N``.

    Args:
        features: ``(2N, d)``, two views of N samples (rows ``i`` and ``i + N`` are positives); float16, bfloat16,
            float32 or float64.
        temperature: a positive number, or a positive 0-d (or one-element) floating tensor on the features' device,
            which then receives a gradient.

    Returns:
        The mean loss, a 0-d tensor of the features' dtype.
    """
    _checks.check_tensor("features", features, floating=True, dims=(2,))
    rows, dim = features.shape
    if rows < 2 or rows % 2:
        raise ValueError(f"features must have an even number (2N >= 2) of rows, two views per sample, got {rows}")
    if dim == 0:
        raise ValueError("features must have at least one column (d >= 1)")
    cd = _compute_dtype(features)
    scale = _inverse_temperature(temperature, cd, features.device)
    spec = types.SimpleNamespace(kind="nt_xent", normalize=True, reduction="mean", group=None)
    return _Contrastive.apply(features, None, scale, None, spec)


def clip_loss(image_features, text_features, logit_scale, logit_bias=None, *, process_group=None):
    """Symmetric CLIP loss, ``(CE(logits, arange) + CE(logits.T, arange)) / 2`` with
    ``logits = logit_scale * normalize(image) @ normalize(text).T (+ logit_bias)``.

    Args:
        image_features, text_features: ``(N, d)`` each, same dtype (float16, bfloat16, float32, float64) and device;
            L2-normalized here (rows ``i`` are the positive pairs).
        logit_scale: the multiplier, a 0-d (or one-element) floating tensor that receives a gradient (open_clip
            passes ``logit_scale.exp()``), or a number.
        logit_bias: ``None``, a number or a 0-d / one-element tensor. A constant added to every logit cancels in
            both softmaxes, so it changes neither the loss nor any gradient, and its own gradient is exactly zero
            (it is accepted, and given that gradient, for drop-in use with models that carry one).
        process_group: a ``torch.distributed`` group: every rank passes its own ``n`` rows (the same ``n`` on every
            rank) and gets its share of the global-batch loss (module docstring); DDP's averaging then reproduces
            the single-process gradients. The features are all-gathered, so all ranks must call it.

    Returns:
        A 0-d tensor of the features' dtype.
    """
    _checks.check_tensor("image_features", image_features, floating=True, dims=(2,))
    _checks.check_tensor("text_features", text_features, floating=True, dims=(2,), device=image_features.device)
    if text_features.dtype != image_features.dtype:
        raise TypeError(f"text_features must have image_features' dtype {image_features.dtype}, "
                        f"got {text_features.dtype}")
    if text_features.shape != image_features.shape:
        raise ValueError(f"text_features must have image_features' shape {tuple(image_features.shape)}, "
                         f"got {tuple(text_features.shape)}")
    if image_features.shape[0] == 0 or image_features.shape[1] == 0:
        raise ValueError(f"image_features must have at least one row and one column, got "
                         f"{tuple(image_features.shape)}")
    cd = _compute_dtype(image_features)
    scale = _scalar_tensor("logit_scale", logit_scale, cd, image_features.device)
    bias = None
    if logit_bias is not None:
        _scalar_tensor("logit_bias", logit_bias, cd, image_features.device)  # checked, then cancels (docstring)
        bias = logit_bias if isinstance(logit_bias, torch.Tensor) else None
    kind = "clip"
    if process_group is not None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialized")
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got "
                            f"{type(process_group).__name__}")
        kind = "clip_dist"
    spec = types.SimpleNamespace(kind=kind, normalize=True, reduction="mean", group=process_group)
    return _Contrastive.apply(image_features, text_features, scale, bias, spec)


def info_nce(query, key, temperature=0.07, *, normalize=True, reduction="mean"):
    """InfoNCE in one direction: row ``i`` of ``query`` against every row of ``key``, its positive at key ``i``.

    ``loss_i = logsumexp_j(<q_i, k_j> / t) - <q_i, k_i> / t``, with ``q``, ``k`` L2-normalized when ``normalize``.

    Args:
        query: ``(M, d)``, float16, bfloat16, float32 or float64.
        key: ``(N, d)``, ``N >= M``, the query's dtype and device; keys ``M..N-1`` are extra negatives (a MoCo-style
            queue appended after the positives). A key without ``requires_grad`` costs no gradient product.
        temperature: a positive number, or a positive 0-d (or one-element) floating tensor, which then receives a
            gradient.
        normalize: L2-normalize query and key rows first (cosine similarity), with the exact gradient.
        reduction: ``'mean'`` (over the M rows), ``'sum'`` or ``'none'`` (the ``(M,)`` per-row losses).

    Returns:
        The loss in the query's dtype.
    """
    _checks.check_tensor("query", query, floating=True, dims=(2,))
    _checks.check_tensor("key", key, floating=True, dims=(2,), device=query.device)
    if key.dtype != query.dtype:
        raise TypeError(f"key must have query's dtype {query.dtype}, got {key.dtype}")
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"key must have query's feature size {query.shape[1]}, got shape {tuple(key.shape)}")
    if query.shape[0] == 0 or query.shape[1] == 0:
        raise ValueError(f"query must have at least one row and one column, got {tuple(query.shape)}")
    if key.shape[0] < query.shape[0]:
        raise ValueError(f"key must have at least as many rows as query ({query.shape[0]}): row i's positive is "
                         f"key i; got {key.shape[0]}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    _checks.check_reduction(reduction)
    cd = _compute_dtype(query)
    scale = _inverse_temperature(temperature, cd, query.device)
    spec = types.SimpleNamespace(kind="info_nce", normalize=normalize, reduction=reduction, group=None)
    return _Contrastive.apply(query, key, scale, None, spec)


# ---------------------------------------------------------------------------------------------------------------
# Argument helpers


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scalar_tensor(name, value, dtype, device):
    """A number or a 0-d / one-element floating tensor on ``device``, as a 0-d tensor of ``dtype`` (differentiable:
    a tensor that requires grad keeps its graph). No host sync: the value is never read."""
    if isinstance(value, torch.Tensor):
        _checks.check_tensor(name, value, floating=True, device=device)
        if value.numel() != 1:
            raise ValueError(f"{name} must be a 0-d or one-element tensor, got shape {tuple(value.shape)}")
        return value.reshape(()).to(dtype)
    return torch.full((), _checks.check_number(name, value), dtype=dtype, device=device)


def _inverse_temperature(temperature, dtype, device):
    if isinstance(temperature, torch.Tensor):
        return 1.0 / _scalar_tensor("temperature", temperature, dtype, device)
    t = _checks.check_number("temperature", temperature, low=0.0, low_open=True)
    return torch.full((), 1.0 / t, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------------
# L2 normalization with F.normalize's exact gradient


def _normalize(x, cd):
    """(x_hat in x's dtype, 1 / max(|x|, eps) in cd, |x| > eps)."""
    norm = torch.linalg.vector_norm(x, dim=1, dtype=cd)
    rnorm = 1.0 / norm.clamp_min(_EPS)
    # (contiguous: elementwise ops keep a transposed input's strides, and the kernels read d-contiguous rows)
    return (x.to(cd) * rnorm[:, None]).to(x.dtype).contiguous(), rnorm, norm > _EPS


def _normalize_backward(dx_hat, x_hat, rnorm, big):
    """In place on ``dx_hat`` (cd): (dx_hat - x_hat <x_hat, dx_hat>) * rnorm, without the projection where
    |x| <= eps (there x_hat = x / eps is linear in x)."""
    xh = x_hat.to(dx_hat.dtype)
    proj = torch.where(big, (dx_hat * xh).sum(1), torch.zeros_like(rnorm))
    dx_hat.sub_(xh * proj[:, None]).mul_(rnorm[:, None])
    return dx_hat


# ---------------------------------------------------------------------------------------------------------------
# Distributed helpers (all-gather / reduce-scatter into one contiguous tensor)


def _all_gather(x, group):
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x, group):
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The passes of each loss: which features are rows and columns, where the positives are, which terms the gradient
# has, and where its row / column parts go.


class _Pass(types.SimpleNamespace):
    """q (rows, d), k (cols, d); pos(i) = (i + pos_offset) mod pos_modulus; self_mask: S_ii = -inf;
    col_stats: column log-sum-exp (symmetric CLIP); symmetric: NT-Xent's (W + W^T) F;
    row_to / col_to: the gradient accumulators of the rows / columns (None: not needed)."""


def _passes(spec, x_hat, y_hat, group):
    m = x_hat.shape[0]
    if spec.kind == "nt_xent":
        return [_Pass(q=x_hat, k=x_hat, pos_offset=m // 2, pos_modulus=m, self_mask=True, col_stats=False,
                      symmetric=True, row_to="x", col_to=None)], None
    if spec.kind == "info_nce":
        return [_Pass(q=x_hat, k=y_hat, pos_offset=0, pos_modulus=m, self_mask=False, col_stats=False,
                      symmetric=False, row_to="x", col_to="y")], None
    if spec.kind == "clip":
        return [_Pass(q=x_hat, k=y_hat, pos_offset=0, pos_modulus=m, self_mask=False, col_stats=True,
                      symmetric=False, row_to="x", col_to="y")], None
    import torch.distributed as dist

    offset = dist.get_rank(group) * m
    x_all, y_all = _all_gather(x_hat, group), _all_gather(y_hat, group)
    return [
        _Pass(q=x_hat, k=y_all, pos_offset=offset, pos_modulus=offset + m, self_mask=False, col_stats=False,
              symmetric=False, row_to="x", col_to="y_all"),
        _Pass(q=y_hat, k=x_all, pos_offset=offset, pos_modulus=offset + m, self_mask=False, col_stats=False,
              symmetric=False, row_to="y", col_to="x_all"),
    ], (x_all, y_all)


class _Contrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, bias, spec):
        engine = _TritonEngine if matmul_backend(x.device, x.dtype) != "torch" else _TorchEngine
        cd = _compute_dtype(x)
        scale = scale.detach()
        if spec.normalize:
            x_hat, rx, bx = _normalize(x, cd)
            y_hat, ry, by = _normalize(y, cd) if y is not None else (None, None, None)
        else:
            x_hat, rx, bx = x.contiguous(), None, None
            y_hat, ry, by = (y.contiguous(), None, None) if y is not None else (None, None, None)
        passes, gathered = _passes(spec, x_hat, y_hat, spec.group)
        stats = [engine.forward(p, scale) for p in passes]

        if spec.kind == "clip":
            lse, pos, lsec = stats[0]
            loss = 0.5 * ((lse - pos).mean() + (lsec - pos).mean())
        elif spec.kind == "clip_dist":
            loss = 0.5 * sum((lse - pos).mean() for lse, pos, _ in stats)
        else:
            rows = stats[0][0] - stats[0][1]
            loss = rows if spec.reduction == "none" else rows.sum() if spec.reduction == "sum" else rows.mean()

        ctx.spec, ctx.engine, ctx.passes, ctx.stats = spec, engine, passes, stats
        ctx.norms = (rx, bx, ry, by)
        ctx.x_hat, ctx.y_hat = x_hat, y_hat
        ctx.scale = scale
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        del gathered  # kept alive through ctx.passes
        return loss.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        spec, engine, passes, stats = ctx.spec, ctx.engine, ctx.passes, ctx.stats
        x_hat, y_hat, scale = ctx.x_hat, ctx.y_hat, ctx.scale
        cd = scale.dtype
        need_x, need_y, need_scale, need_bias = ctx.needs_input_grad[:4]
        g = grad_out.to(cd)
        m = x_hat.shape[0]
        if spec.kind == "nt_xent":
            coefs = [((g / m).expand(m).contiguous(), True)]
        elif spec.kind == "info_nce":
            a = g if spec.reduction == "none" else (g if spec.reduction == "sum" else g / m).expand(m)
            coefs = [(a.contiguous(), False)]
        else:  # both CLIP directions weigh 1 / (2 n)
            coefs = [((g / (2 * m)).expand(m).contiguous(), spec.kind == "clip")] * len(passes)

        wanted = {"x": need_x, "y": need_y, "x_all": need_x, "y_all": need_y, None: False}
        if spec.kind == "clip_dist":  # the reduce-scatter needs every rank's columns, whatever this rank needs
            wanted["x_all"] = wanted["y_all"] = True
        acc = {}
        scale_grad = torch.zeros((), dtype=cd, device=scale.device)
        for p, (lse, _, lsec), (a, col_term) in zip(passes, stats, coefs):
            col_lse = (lse if p.symmetric else lsec) if col_term else None
            need_rows = wanted[p.row_to] or need_scale
            if not (need_rows or wanted[p.col_to]):
                continue
            rows_grad, cols_grad, sg = engine.backward(p, scale, lse, a, col_lse, a if col_term else None,
                                                       need_cols=wanted[p.col_to])
            scale_grad += (0.5 * sg) if p.symmetric else sg  # NT-Xent: sum (W + W^T) * S counts W twice
            for key, value in ((p.row_to, rows_grad), (p.col_to, cols_grad)):
                if value is not None and wanted[key]:
                    acc[key] = value if key not in acc else acc[key].add_(value)

        if spec.kind == "clip_dist":
            for local, gathered in (("x", "x_all"), ("y", "y_all")):
                part = _reduce_scatter(acc.pop(gathered), spec.group)
                acc[local] = part if local not in acc else acc[local].add_(part)

        rx, bx, ry, by = ctx.norms
        grads = []
        for key, hat, rnorm, big, need in (("x", x_hat, rx, bx, need_x), ("y", y_hat, ry, by, need_y)):
            if not need or key not in acc:
                grads.append(None)
                continue
            d = acc[key]
            if spec.normalize:
                d = _normalize_backward(d, hat, rnorm, big)
            grads.append(d.to(hat.dtype))
        grad_scale = scale_grad if need_scale else None
        grad_bias = torch.zeros(ctx.bias_meta[0], dtype=ctx.bias_meta[1], device=scale.device) if need_bias else None
        ctx.passes = ctx.stats = None
        return grads[0], grads[1], grad_scale, grad_bias, None


# ---------------------------------------------------------------------------------------------------------------
# Engines: the three primitives per backend. ``forward(pass, scale) -> (lse, pos, col_lse or None)``;
# ``backward(pass, scale, lse, a, col_lse, b, need_cols) -> (rows_grad, cols_grad or None, sum_i <(W K)_i, Q_i>)``
# with the row / column gradients with respect to the (normalized) features, in the compute dtype.


class _TritonEngine:
    @staticmethod
    def forward(p, scale):
        from ..kernels.contrastive import contrastive_forward, forward_schedule

        q, k = p.q, p.k
        cd = scale.dtype
        m, n = q.shape[0], k.shape[0]
        lse = _alloc.empty(m, dtype=cd, device=q.device)
        pos = _alloc.empty(m, dtype=cd, device=q.device)
        col_max = col_sum = col_lse = None
        if p.col_stats:
            programs, _ = forward_schedule(m, q.shape[1], q.dtype, q.device, True)
            col_max = _alloc.empty((programs, n), dtype=cd, device=q.device)
            col_sum = _alloc.empty((programs, n), dtype=cd, device=q.device)
        contrastive_forward(q, k, scale, lse, pos, col_max, col_sum, pos_offset=p.pos_offset,
                            pos_modulus=p.pos_modulus, self_mask=p.self_mask)
        if p.col_stats:
            # Merge the programs' partials: log sum_g s_g exp(m_g) (each m_g is finite: every program saw a row).
            top = col_max.amax(0)
            col_lse = top + torch.log((col_sum * torch.exp(col_max - top)).sum(0))
        return lse, pos, col_lse

    @staticmethod
    def backward(p, scale, lse, a, col_lse, b, need_cols):
        from ..kernels.contrastive import band_rows, contrastive_dlogits, matmul

        q, k = p.q, p.k
        cd = scale.dtype
        m, dim = q.shape
        n = k.shape[0]
        # W is stored times band_scale = 1 / max |weight| (|W| <= 2 then), so fp16 bands stay clear of subnormals.
        top = a.abs().amax() if b is None else torch.maximum(a.abs().amax(), b.abs().amax())
        band_scale = torch.where(top > 0, 1.0 / top, torch.ones_like(top))
        r = band_rows(m, n, q.dtype)
        band = _alloc.empty((r, n), dtype=q.dtype, device=q.device)
        rows_grad = _alloc.empty((m, dim), dtype=cd, device=q.device)
        cols_grad = _alloc.empty((n, dim), dtype=cd, device=q.device) if need_cols else None
        sg = torch.zeros((), dtype=cd, device=q.device)
        for start in range(0, m, r):
            rows = min(r, m - start)
            w = band[:rows]
            contrastive_dlogits(q, k, scale, band_scale, lse, a, col_lse, b, w, row_start=start,
                                pos_offset=p.pos_offset, pos_modulus=p.pos_modulus, self_mask=p.self_mask)
            out = rows_grad[start:start + rows]
            matmul(w, k, out, accumulate=False)
            sg += torch.linalg.vecdot(out, q[start:start + rows].to(cd), dim=1).sum()
            if need_cols:
                matmul(w.t(), q[start:start + rows], cols_grad, accumulate=start > 0)
        factor = scale / band_scale
        rows_grad.mul_(factor)
        if need_cols:
            cols_grad.mul_(factor)
        return rows_grad, cols_grad, sg / band_scale


class _TorchEngine:
    """The same bands in torch ops, in the compute dtype (fp32 / fp64)."""

    @staticmethod
    def _band(n_cols):
        return max(1, _TORCH_BAND_ELEMENTS // max(n_cols, 1))

    @staticmethod
    def _logits(p, kc, scale, start, stop):
        x = (p.q[start:stop].to(kc.dtype) @ kc.T) * scale
        if p.self_mask:
            idx = torch.arange(start, stop, device=x.device)
            x[idx - start, idx] = float("-inf")
        return x

    @staticmethod
    def _positives(p, start, stop, device):
        return (torch.arange(start, stop, device=device) + p.pos_offset) % p.pos_modulus

    @classmethod
    def forward(cls, p, scale):
        cd = scale.dtype
        kc = p.k.to(cd)
        m, n = p.q.shape[0], kc.shape[0]
        lse = torch.empty(m, dtype=cd, device=kc.device)
        pos = torch.empty(m, dtype=cd, device=kc.device)
        col_max = col_sum = None
        r = cls._band(n)
        for start in range(0, m, r):
            stop = min(m, start + r)
            x = cls._logits(p, kc, scale, start, stop)
            lse[start:stop] = torch.logsumexp(x, dim=1)
            pos[start:stop] = x.gather(1, cls._positives(p, start, stop, x.device)[:, None]).squeeze(1)
            if p.col_stats:
                band_max = x.amax(0)
                new_max = band_max if col_max is None else torch.maximum(col_max, band_max)
                band_sum = torch.exp(x - new_max).sum(0)
                col_sum = band_sum if col_sum is None else col_sum * torch.exp(col_max - new_max) + band_sum
                col_max = new_max
        col_lse = col_max + torch.log(col_sum) if p.col_stats else None
        return lse, pos, col_lse

    @classmethod
    def backward(cls, p, scale, lse, a, col_lse, b, need_cols):
        cd = scale.dtype
        kc = p.k.to(cd)
        m, n = p.q.shape[0], kc.shape[0]
        rows_grad = torch.empty((m, kc.shape[1]), dtype=cd, device=kc.device)
        cols_grad = torch.zeros((n, kc.shape[1]), dtype=cd, device=kc.device) if need_cols else None
        sg = torch.zeros((), dtype=cd, device=kc.device)
        r = cls._band(n)
        for start in range(0, m, r):
            stop = min(m, start + r)
            x = cls._logits(p, kc, scale, start, stop)
            w = torch.sub(x, lse[start:stop, None]).exp_().mul_(a[start:stop, None])
            pos_coef = a[start:stop]
            if col_lse is not None:
                w.add_(x.sub_(col_lse[None, :]).exp_().mul_(b[None, :]))
            del x
            pos = cls._positives(p, start, stop, kc.device)
            if col_lse is not None:
                pos_coef = pos_coef + b[pos]
            w.scatter_add_(1, pos[:, None], -pos_coef[:, None])
            qc = p.q[start:stop].to(cd)
            out = rows_grad[start:stop]
            torch.matmul(w, kc, out=out)
            sg += torch.linalg.vecdot(out, qc, dim=1).sum()
            if need_cols:
                cols_grad.addmm_(w.T, qc)
        rows_grad.mul_(scale)
        if need_cols:
            cols_grad.mul_(scale)
        return rows_grad, cols_grad, sg

