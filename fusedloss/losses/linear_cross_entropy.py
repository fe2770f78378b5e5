"""Linear + cross-entropy, host side: ``linear_cross_entropy``, the value of
``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` (with the cross-entropy family's extras and an
optional causal shift) without ever holding the ``(tokens, vocab)`` logits.

Backends:
- Triton (compiled or interpreted): the kernels of ``fusedloss.kernels.linear_cross_entropy`` (algorithm, FLOP and
  byte counts and the workspace bound in its docstring). The forward keeps per-row lse and gradient coefficients
  (O(tokens)); the backward recomputes the logits chunk by chunk of the vocabulary.
- torch: the same per-row math in plain PyTorch (``_torch_rows`` of the cross-entropy module), chunked over tokens
  so that at most ``TORCH_CHUNK_BYTES`` of logits exist at a time. A chunk's logits span the whole vocabulary, so
  for 'mean' and 'sum' the forward forms the gradient right away (three matmuls, as eager) and the backward only
  scales it; 'none' and gradients through the returned lse recompute the chunks in the backward. Peak memory
  beyond inputs and gradients at 8192 x 256 x 50000 (fp32): ~56 MiB, against 1.5 GiB for eager's logits alone
  (``test_torch_backend_peak_memory``).
"""

import torch

from .. import _alloc, _checks
from .._backend import matmul_backend
from .cross_entropy import _capped_rows, _check_class_range, _torch_rows

# torch backend: the logits of at most this many bytes (in the compute dtype) exist at once.
TORCH_CHUNK_BYTES = 16 << 20

_PRECISIONS = ("ieee", "tf32", "tf32x3")


def linear_cross_entropy(input, weight, target, bias=None, *, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, focal_gamma=0.0, shift=False,
                         return_lse=False, input_precision="ieee"):
    """Cross-entropy of the logits ``input @ weight.T + bias`` against class indices, without the logits.

    Equals ``F.cross_entropy(F.linear(input, weight, bias).reshape(-1, V), target.reshape(-1), ...)`` (reshaped
    back for ``reduction='none'``), with the extras of ``fusedloss.cross_entropy``, and gradients for ``input``,
    ``weight`` and ``bias``. Peak memory beyond inputs and gradients is O(tokens) plus a bounded workspace (the
    bound is in ``fusedloss.kernels.linear_cross_entropy``'s docstring), never ``tokens x vocab``.

    Args:
        input: hidden states ``(..., H)``; float16, bfloat16, float32 or float64.
        weight: ``(V, H)``, the classifier (an LM head's ``lm_head.weight``), of ``input``'s dtype and device.
        target: class indices ``(...)`` (``input``'s leading shape), int64 or int32, in ``[0, V)`` or equal to
            ``ignore_index``.
        bias: optional ``(V,)``, of ``input``'s dtype.
        ignore_index: rows whose target equals it contribute neither loss nor gradient, and are left out of the
            ``mean`` denominator.
        reduction: ``'mean'`` (over non-ignored rows; NaN when every row is ignored, as torch), ``'sum'`` or
            ``'none'`` (the loss per row, of ``target``'s shape).
        label_smoothing: in ``[0, 1]``, PyTorch's convention.
        z_loss: coefficient of ``z_loss * logsumexp(logits) ** 2``, added per non-ignored row.
        softcap: ``None`` or ``c > 0``: logits become ``c * tanh(logits / c)`` (after the bias) before the rest.
        focal_gamma: ``>= 0``; each row's cross-entropy is multiplied by ``(1 - p_t) ** focal_gamma``.
        shift: causal LM: ``input[..., t, :]`` predicts ``target[..., t + 1]`` (the last dimension of ``target``
            is the sequence). Nothing is copied: the kernels offset their target reads; the last position of
            each sequence is ignored (its ``'none'`` loss is 0). ``input`` needs at least 2 dimensions.
        return_lse: also return the per-row log-sum-exp of the (capped) logits, ``(...)``, in fp32 (fp64 for
            fp64 inputs), differentiable: ``z_loss`` and the perplexity can be logged from it without a second
            pass.
        input_precision: fp32 inputs only: ``'ieee'`` (default, full fp32 products), ``'tf32'`` or ``'tf32x3'``
            (tensor cores, Triton's meaning). 16-bit inputs always run on the tensor cores with fp32
            accumulation; fp64 runs in fp64.

    Returns:
        The loss in ``input``'s dtype (as torch would return it), or ``(loss, lse)`` with ``return_lse``.

    Inputs whose leading dimensions cannot be flattened without a copy are copied once (``reshape``); targets
    whose leading dimensions cannot be walked with one stride likewise. CPU backends raise ``IndexError`` on an
    out-of-range class index; on GPU that row's loss is NaN.
    """
    opts = _check_args(input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                       focal_gamma, shift, return_lse, input_precision)
    n_classes = weight.shape[0]
    which = matmul_backend(input.device, input.dtype)
    if target.device.type == "cpu":
        _check_class_range(target[..., 1:] if shift else target, n_classes, ignore_index)
    if which == "torch" or input.numel() == 0:
        fn = _LinearCrossEntropyTorch
    else:
        fn = _LinearCrossEntropyTriton
    loss, lse = fn.apply(input, weight, bias, target, opts)
    return (loss, lse) if return_lse else loss


# ---------------------------------------------------------------------------------------------------------------
# Argument checks


def _check_args(input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, focal_gamma,
                shift, return_lse, input_precision):
    _checks.check_tensor("input", input, floating=True)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (..., H), got a 0-d tensor")
    _checks.check_tensor("weight", weight, floating=True, dims=(2,), device=input.device)
    if weight.dtype != input.dtype:
        raise TypeError(f"weight must have input's dtype {input.dtype}, got {weight.dtype}")
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(f"weight must have shape (V, {input.shape[-1]}) for input of shape {tuple(input.shape)}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (class), got shape (0, H)")
    _checks.check_tensor("target", target, floating=False, device=input.device)
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 (or int32) class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have input's leading shape {tuple(input.shape[:-1])}, "
                         f"got {tuple(target.shape)}")
    if bias is not None:
        _checks.check_tensor("bias", bias, floating=True, dims=(1,), device=input.device)
        if bias.dtype != input.dtype:
            raise TypeError(f"bias must have input's dtype {input.dtype}, got {bias.dtype}")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _checks.check_reduction(reduction)
    for name, value in (("shift", shift), ("return_lse", return_lse)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if shift and input.dim() < 2:
        raise ValueError(f"shift needs a sequence dimension: input must be (..., T, H), got {tuple(input.shape)}")
    if not isinstance(input_precision, str):
        raise TypeError(f"input_precision must be a str, got {type(input_precision).__name__}")
    if input_precision not in _PRECISIONS:
        raise ValueError(f"input_precision must be one of {', '.join(map(repr, _PRECISIONS))}, "
                         f"got {input_precision!r}")
    return {
        "ignore_index": ignore_index,
        "reduction": reduction,
        "label_smoothing": _checks.check_number("label_smoothing", label_smoothing, low=0.0, high=1.0),
        "z_loss": _checks.check_number("z_loss", z_loss, low=0.0),
        "softcap": None if softcap is None else _checks.check_number("softcap", softcap, low=0.0, low_open=True),
        "focal_gamma": _checks.check_number("focal_gamma", focal_gamma, low=0.0),
        "focal_alpha": 1.0,
        "shift": shift,
        "input_precision": input_precision,
    }


# ---------------------------------------------------------------------------------------------------------------
# Shared by both backends


def _compute_dtype(input):
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _denominator(target, opts, dtype):
    """The ``mean``'s denominator as a 0-d device tensor (no host sync): the rows whose (shifted) target is not
    ignored."""
    t = target[..., 1:] if opts["shift"] else target
    return (t != opts["ignore_index"]).sum().to(dtype)


def _reduce(rows, opts, denom, lead_shape, out_dtype):
    reduction = opts["reduction"]
    if reduction == "none":
        return rows.reshape(lead_shape).to(out_dtype)
    total = rows.sum()
    return (total if reduction == "sum" else total / denom).to(out_dtype)


def _grad_scales(grad_loss, grad_lse, opts, denom, dtype, n_rows, device):
    """(row_scale, gemm_scale, dlse) for the backward: G = row_scale * (coefficient form) + dlse * p, and
    dX, dW, db = gemm_scale * (G @ W, G^T @ X, colsum G). ``row_scale`` is 0-d (shared by every row) or (rows,);
    the scalar factor of 'mean'/'sum' goes to the GEMM epilogues so that G keeps its magnitude in fp16; with a
    ``grad_lse`` it is folded into the rows instead (dlse must not be scaled by it)."""
    one = torch.ones((), dtype=dtype, device=device)
    if grad_loss is None:
        row_scale, gemm_scale = torch.zeros((), dtype=dtype, device=device), one
    elif opts["reduction"] == "none":
        row_scale, gemm_scale = grad_loss.reshape(-1).to(dtype), one
    else:
        gemm_scale = grad_loss.to(dtype)
        if opts["reduction"] == "mean":
            # all rows ignored: the loss is NaN (0 / 0) but every row's gradient is 0, as in torch
            gemm_scale = torch.where(denom == 0, torch.zeros_like(denom), gemm_scale / denom)
        row_scale = one
    dlse = None
    if grad_lse is not None:
        dlse = grad_lse.reshape(-1).to(dtype).contiguous()
        row_scale, gemm_scale = row_scale * gemm_scale, one
    return row_scale, gemm_scale, dlse


def _lead_shape(input):
    return tuple(input.shape[:-1])


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (compiled or interpreted)


class _LinearCrossEntropyTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, target, opts):
        from ..kernels import linear_cross_entropy as K

        ctx.set_materialize_grads(False)
        n_hidden = input.shape[-1]
        x2d = input.reshape(-1, n_hidden)  # a view unless the leading dims cannot be flattened
        layout = K.target_layout(target)
        if layout is None:
            target = target.contiguous()
            layout = K.target_layout(target)
        n_rows = x2d.shape[0]
        dtype = _compute_dtype(input)
        cfg = K.config_for(x2d, weight)
        n_split, _ = K.num_splits(cfg, weight.shape[0])
        need_grad = any(ctx.needs_input_grad[:3])

        part = _alloc.empty(4 * n_split * n_rows, dtype=dtype, device=input.device)
        rows = _alloc.empty(n_rows, dtype=dtype, device=input.device)
        lse = _alloc.empty(n_rows, dtype=dtype, device=input.device)
        coefs = _alloc.empty((n_rows, 4), dtype=dtype, device=input.device) if need_grad else None
        K.linear_cross_entropy_forward(
            x2d, weight, bias, target, layout, part, rows, lse, coefs, cfg,
            **{k: opts[k] for k in ("ignore_index", "label_smoothing", "focal_gamma", "z_loss", "softcap", "shift",
                                    "input_precision")})
        del part
        denom = _denominator(target, opts, dtype) if opts["reduction"] == "mean" else None
        ctx.save_for_backward(x2d, weight, bias, target, lse, coefs)
        ctx.opts, ctx.denom, ctx.layout, ctx.input_shape = opts, denom, layout, input.shape
        lead = _lead_shape(input)
        return _reduce(rows, opts, denom, lead, input.dtype), lse.view(lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_lse):
        from ..kernels import linear_cross_entropy as K

        x2d, weight, bias, target, lse, coefs = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        opts = ctx.opts
        n_rows, n_hidden = x2d.shape
        n_classes = weight.shape[0]
        dtype = lse.dtype
        device = x2d.device
        row_scale, gemm_scale, dlse = _grad_scales(grad_loss, grad_lse, opts, ctx.denom, dtype, n_rows, device)
        cfg = K.config_for(x2d, weight)
        chunk = cfg["chunk"]
        n_chunks = -(-n_classes // chunk)
        precision = opts["input_precision"]

        dx = _alloc.empty((n_rows, n_hidden), dtype=x2d.dtype, device=device) if need_x else None
        dw = _alloc.empty(tuple(weight.shape), dtype=weight.dtype, device=device) if need_w else None
        db = _alloc.empty(n_classes, dtype=dtype, device=device) if need_b else None
        # dX accumulates over the vocabulary chunks in the compute dtype: in dx itself when that is its dtype,
        # else in an fp32 buffer whose last chunk writes dx (see the kernels' docstring for the traffic).
        dx_acc = dx
        if need_x and n_chunks > 1 and x2d.dtype != dtype:
            dx_acc = _alloc.empty((n_rows, n_hidden), dtype=dtype, device=device)
        # One workspace for every chunk: G, and the per-row-tile column sums of G for db.
        workspace = _alloc.empty(n_rows * min(chunk, n_classes), dtype=x2d.dtype, device=device)
        n_tiles = -(-n_rows // cfg["dlogits"]["BLOCK_N"])
        one = torch.ones((), dtype=dtype, device=device)
        bias_parts = _alloc.empty(n_tiles * min(chunk, n_classes), dtype=dtype, device=device) if need_b else None
        for index, col_start in enumerate(range(0, n_classes, chunk)):
            width = min(chunk, n_classes - col_start)
            g = workspace[: n_rows * width].view(n_rows, width)
            part = bias_parts[: n_tiles * width].view(n_tiles, width) if need_b else None
            K.linear_cross_entropy_dlogits(
                x2d, weight, bias, target, ctx.layout, lse, coefs, row_scale, dlse, g, part, col_start, cfg,
                ignore_index=opts["ignore_index"], label_smoothing=opts["label_smoothing"],
                softcap=opts["softcap"], shift=opts["shift"], input_precision=precision)
            if need_b:
                torch.sum(part, dim=0, out=db[col_start:col_start + width])
            if need_w:  # dW rows of this chunk, complete (K = all tokens): written once
                K.matmul(g.t(), x2d, dw[col_start:col_start + width], gemm_scale, cfg["gemm_dw"],
                         input_precision=precision)
            if need_x:  # the chunks' sums stay unscaled in dx_acc; the last one is scaled into dx
                last = index == n_chunks - 1
                K.matmul(g, weight[col_start:col_start + width], dx if last else dx_acc,
                         gemm_scale if last else one, cfg["gemm_dx"], acc=None if index == 0 else dx_acc,
                         input_precision=precision)
        grad_bias = (db * gemm_scale).to(bias.dtype) if need_b else None
        grad_input = dx.view(ctx.input_shape) if need_x else None
        return grad_input, dw, grad_bias, None, None


# ---------------------------------------------------------------------------------------------------------------
# Torch backend: the cross-entropy module's per-row formulas on chunks of tokens. A chunk's logits cover the whole
# vocabulary, so when the gradient's scale is one number ('mean', 'sum') the forward forms G right away and
# accumulates dX, dW, db (three matmuls, as eager); the backward only scales them. With 'none' (a scale per row
# only known in backward) or a gradient through the returned lse, the backward recomputes the chunks' logits.


def _chunk_rows(n_rows, n_classes, dtype):
    per_row = max(1, n_classes) * torch.finfo(dtype).bits // 8
    return max(1, TORCH_CHUNK_BYTES // per_row)


def _chunk_target(target, start, stop, opts):
    """The classes rows [start, stop) predict (shifted by ``opts['shift']``), gathered through a (outer, T) view."""
    seq_len = target.shape[-1] if target.dim() else 1
    rows = torch.arange(start, stop, device=target.device)
    t = rows % seq_len + int(opts["shift"])
    live = t < seq_len
    y = target.reshape(-1, seq_len)[rows // seq_len, t.clamp(max=seq_len - 1)].long()
    return torch.where(live, y, torch.full_like(y, opts["ignore_index"]))


def _chunk_logits(x, weight_c, bias_c):
    return x @ weight_c.t() if bias_c is None else torch.addmm(bias_c, x, weight_c.t())


class _TorchGrads:
    """dX, dW, db in the compute dtype, accumulated chunk by chunk from G (dW and db over the token chunks)."""

    def __init__(self, x2d, weight, need, dtype):
        need_x, need_w, need_b = need
        device = x2d.device
        self.dx = torch.empty(x2d.shape, dtype=dtype, device=device) if need_x else None
        self.dw = torch.zeros(weight.shape, dtype=dtype, device=device) if need_w else None
        self.db = torch.zeros(weight.shape[0], dtype=dtype, device=device) if need_b else None

    def add(self, g, x, weight_c, start, stop):
        if self.dx is not None:
            torch.mm(g, weight_c, out=self.dx[start:stop])
        if self.dw is not None:
            self.dw.addmm_(g.t(), x)
        if self.db is not None:
            self.db += g.sum(0)

    def scaled(self, scale, x2d, weight, bias, input_shape):
        """The gradients times the 0-d ``scale``, in the parameters' dtypes."""
        out = []
        for grad, like, shape in ((self.dx, x2d, input_shape), (self.dw, weight, None), (self.db, bias, None)):
            out.append(None if grad is None else grad.mul_(scale).to(like.dtype).view(shape or like.shape))
        return out


def _torch_setup(x2d, weight, bias, dtype):
    weight_c = weight.to(dtype)
    return weight_c, None if bias is None else bias.to(dtype), _chunk_rows(x2d.shape[0], weight.shape[0], dtype)


class _LinearCrossEntropyTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, target, opts):
        ctx.set_materialize_grads(False)
        dtype = _compute_dtype(input)
        x2d = input.reshape(-1, input.shape[-1])
        n_rows = x2d.shape[0]
        need = tuple(ctx.needs_input_grad[:3])
        # G right away when its scale is one number: then no logits are recomputed
        fused = any(need) and opts["reduction"] != "none"
        weight_c, bias_c, step = _torch_setup(x2d, weight, bias, dtype)
        rows = torch.empty(n_rows, dtype=dtype, device=input.device)
        lse = torch.empty(n_rows, dtype=dtype, device=input.device)
        coefs = torch.empty((n_rows, 4), dtype=dtype, device=input.device)
        grads = _TorchGrads(x2d, weight, need, dtype) if fused else None
        one = torch.ones((), dtype=dtype, device=input.device)
        for start in range(0, n_rows, step):
            stop = min(start + step, n_rows)
            x = x2d[start:stop].to(dtype)
            logits = _chunk_logits(x, weight_c, bias_c)
            y = _chunk_target(target, start, stop, opts)
            loss, lse_c, ks, _, _ = _torch_rows(logits, y, None, None, opts)
            rows[start:stop], lse[start:stop] = loss, lse_c
            coefs[start:stop] = torch.stack(ks, dim=1)
            del loss, ks
            if fused:
                grads.add(_torch_dlogits(logits, y, lse_c, coefs[start:stop], one, None, opts), x, weight_c, start,
                          stop)
            del logits, lse_c
        denom = _denominator(target, opts, dtype) if opts["reduction"] == "mean" else None
        ctx.save_for_backward(x2d, weight, bias, target, lse, coefs)
        ctx.opts, ctx.denom, ctx.input_shape, ctx.grads = opts, denom, input.shape, grads
        lead = _lead_shape(input)
        return _reduce(rows, opts, denom, lead, input.dtype), lse.view(lead)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_lse):
        x2d, weight, bias, target, lse, coefs = ctx.saved_tensors
        opts, dtype = ctx.opts, lse.dtype
        n_rows = x2d.shape[0]
        need = tuple(ctx.needs_input_grad[:3])
        fused, ctx.grads = ctx.grads, None
        if fused is not None:
            # the forward's G had row scale 1: scale by grad_output (/ denominator) now; a gradient into the
            # returned lse is added by a recomputing pass with the loss's row scale set to 0
            _, scale, _ = _grad_scales(grad_loss, None, opts, ctx.denom, dtype, n_rows, x2d.device)
            if grad_loss is None:
                scale = torch.zeros((), dtype=dtype, device=x2d.device)
            if grad_lse is None:
                return (*fused.scaled(scale, x2d, weight, bias, ctx.input_shape), None, None)
            for grad in (fused.dx, fused.dw, fused.db):
                if grad is not None:
                    grad.mul_(scale)
            row_scale, gemm_scale, dlse = _grad_scales(None, grad_lse, opts, ctx.denom, dtype, n_rows, x2d.device)
            grads = fused
        else:
            row_scale, gemm_scale, dlse = _grad_scales(grad_loss, grad_lse, opts, ctx.denom, dtype, n_rows,
                                                       x2d.device)
            grads = _TorchGrads(x2d, weight, need, dtype)
        weight_c, bias_c, step = _torch_setup(x2d, weight, bias, dtype)
        for start in range(0, n_rows, step):
            stop = min(start + step, n_rows)
            x = x2d[start:stop].to(dtype)
            g = _torch_dlogits(_chunk_logits(x, weight_c, bias_c), _chunk_target(target, start, stop, opts),
                               lse[start:stop], coefs[start:stop],
                               row_scale if row_scale.dim() == 0 else row_scale[start:stop],
                               None if dlse is None else dlse[start:stop], opts)
            if fused is not None:  # add to the forward's gradients
                if grads.dx is not None:
                    grads.dx[start:stop] += g @ weight_c
                if grads.dw is not None:
                    grads.dw.addmm_(g.t(), x)
                if grads.db is not None:
                    grads.db += g.sum(0)
            else:
                grads.add(g, x, weight_c, start, stop)
            del g, x
        return (*grads.scaled(gemm_scale, x2d, weight, bias, ctx.input_shape), None, None)


def _torch_dlogits(logits, y, lse, coefs, row_scale, dlse, opts):
    """G = dloss/dlogits for a chunk of rows, in place over ``logits``: the coefficient form of the cross-entropy
    module, ``p_c (K1 + [c != y] Kf) - [c == y] Ky - K3``, times the row scale, plus ``dlse * p``, times the cap's
    derivative."""
    x, dcap = _capped_rows(logits, lse.dtype, opts["softcap"])
    k1, kf, ky, k3 = (coefs[:, i] * row_scale for i in range(4))
    if dlse is not None:
        k1 = k1 + dlse
    g = x.sub_(lse[:, None]).exp_()  # p, in place (x is logits itself without a cap)
    n_classes = g.shape[1]
    y_col = y.clamp(0, n_classes - 1)[:, None]
    hit = ((y >= 0) & (y < n_classes))[:, None]
    p_y = g.gather(1, y_col)
    g.mul_((k1 + kf)[:, None])
    # the target column: p_y K1 - Ky instead of p_y (K1 + Kf); ignored rows have Kf = Ky = 0
    g.scatter_add_(1, y_col, torch.where(hit, -p_y * kf[:, None] - ky[:, None], torch.zeros_like(p_y)))
    if opts["label_smoothing"] > 0.0:
        g.sub_(k3[:, None])
    if dcap is not None:
        g.mul_(dcap)
    return g
