"""Per-token log-probabilities and entropies, host side: ``log_probs`` (from logits) and ``linear_log_probs`` (from
hidden states and the LM head, on the LM-head engine of ``fusedloss._lm_head``: the logits exist one token chunk
at a time). What RL post-training (GRPO, PPO, DPO) needs from the policy: ``log p(y_t)`` of the sampled tokens
under a sampling temperature and the entropy of each token's distribution, both differentiable.

Definition (``_rows``), per token with ``z = softcap(logits) / T``: ``log_softmax(z)[y]`` and
``-sum_c p_c log p_c``; 0 for both on ignored tokens (``target == ignore_index``), which get no gradient.
Backends: Triton (compiled or interpreted), the row kernels of ``kernels/log_probs.py``; torch, the same steps in
torch ops in the compute dtype (fp32, fp64 for fp64 inputs).
"""

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _alloc, _checks, _distributed, _dtensor, _family, _lm_head
from .._backend import backend, runs_definition

# LM-head chunks: at most this many bytes of one chunk's logits (the input's dtype) at a time
LOG_PROBS_CHUNK_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class LogProbsOptions:
    """Everything but the tensors (see ``linear_log_probs``)."""

    ignore_index: int = -100
    softcap: Optional[float] = None
    return_entropy: bool = False
    shift: bool = False
    chunk_rows: Optional[int] = None  # tests: tokens per LM-head chunk
    class_offset: int = 0  # vocabulary parallelism: this rank's first class
    process_group: Optional[object] = dataclasses.field(default=None, compare=False)


def log_probs(logits, target, *, temperature=1.0, ignore_index=-100, softcap=None, return_entropy=False):
    """``log_softmax(softcap(logits) / temperature)`` at the target class, per token, and optionally the entropy of
    each token's distribution, in one read of the logits (two in the backward); the fused replacement of
    ``selective_log_softmax`` + ``entropy_from_logits``.

    Args:
        logits: ``(..., V)``, float16, bfloat16, float32 or float64, any strides.
        target: class indices ``(...)`` (the logits' leading shape), int64 or int32, in ``[0, V)`` or
            ``ignore_index`` (out of range: IndexError on the CPU backends, a NaN log-prob on GPU).
        temperature: a number ``> 0``, or a tensor of ``target``'s shape (one temperature per token; it gets no
            gradient).
        ignore_index: tokens whose target equals it give 0 (log-prob and entropy) and no gradient.
        softcap: ``None`` or a finite ``c > 0``: logits become ``c * tanh(logits / c)`` before the temperature.
        return_entropy: also return the entropy.

    Returns:
        ``logprobs`` of ``target``'s shape in fp32 (fp64 for fp64 logits), or ``(logprobs, entropy)``; both
        differentiable with respect to ``logits``.
    """
    if _dtensor.has_dtensor(logits, target, temperature):
        def call(logits, target, temperature):
            return log_probs(logits, target, temperature=temperature_value if temperature is None else temperature,
                             ignore_index=ignore_index, softcap=softcap, return_entropy=return_entropy)

        temperature_value = temperature
        return _dtensor.dispatch(activations={"logits": logits}, weights={},
                                 targets={"target": target, "temperature": _tensor_or_none(temperature)},
                                 replicated={}, reduction=None, process_group=None, call=call, vocab_parallel=False)
    _checks.check_tensor("logits", logits, floating=True)
    if logits.dim() == 0:
        raise ValueError("logits must have at least 1 dimension (..., V), got a 0-d tensor")
    opts, inv_t = _options(logits, target, tuple(logits.shape[:-1]), temperature, ignore_index, softcap,
                           return_entropy, False, None, n_classes=logits.shape[-1])
    rows2d = logits.reshape(math.prod(logits.shape[:-1]), logits.shape[-1])
    y = target.reshape(-1)
    # the definition where the kernels do not run: torch.func transforms, meta / fake tensors, torch.compile (its
    # graph then holds the torch ops), the torch backend, empty inputs
    if (runs_definition(logits) or torch.compiler.is_compiling() or backend(logits.device) == "torch"
            or rows2d.numel() == 0):
        lp, ent = _rows(opts, rows2d.to(_family.compute_dtype(logits)), y, inv_t)
    else:
        lp, ent = _LogProbs.apply(opts, rows2d, y, inv_t)[:2]
    return _outputs(opts, lp, ent, target.shape)


def linear_log_probs(input, linear_weight, target, *, linear_bias=None, temperature=1.0, ignore_index=-100,
                     shift=False, softcap=None, return_entropy=False, process_group=None):
    """``log_probs`` of the logits ``input @ linear_weight.T + linear_bias``, without the logits: token chunks of
    at most 1 GiB of logits exist at a time (``fusedloss._lm_head``: 2 N H V FLOPs forward, 4 N H V backward; the
    backward recomputes each chunk's logits, 2 N H V more, since its row gradients are only known then).

    Args:
        input: hidden states ``(..., H)``; float16, bfloat16, float32 or float64.
        linear_weight: ``(V, H)``, the LM head, of ``input``'s dtype and device (cast to the autocast dtype under
            ``torch.autocast``, as ``F.linear`` would be).
        target: the sampled tokens ``(...)`` (``input``'s leading shape), int64 or int32.
        linear_bias: optional ``(V,)``.
        temperature, ignore_index, softcap, return_entropy: as ``log_probs``.
        shift: causal LM: ``input[..., t, :]`` gives the log-prob of ``target[..., t + 1]``; the last position of
            each sequence gives 0.
        process_group: vocabulary parallelism as ``linear_cross_entropy``'s: ``linear_weight`` and ``linear_bias``
            are this rank's contiguous slice of the classes (rank order), ``target`` global token ids; every rank
            returns the whole result and the single-process gradients of its slice (and the whole input gradient).
            Computed in torch ops from the shard's logits (a 1 / W slice): one all-gather of 4 numbers per token,
            and an all-reduce of the input gradient in the backward.

    DTensor arguments as ``linear_cross_entropy`` takes them (``fusedloss._dtensor``): per-token results, so
    token-sharded activations need no reduction.

    Returns:
        ``logprobs`` of ``target``'s shape in fp32 (fp64 for fp64 inputs), or ``(logprobs, entropy)``;
        differentiable with respect to ``input``, ``linear_weight`` and ``linear_bias``, with any mix of gradients
        into the two. No host sync.
    """
    if _dtensor.has_dtensor(input, linear_weight, target, linear_bias, temperature):
        def call(input, linear_weight, target, linear_bias, temperature, process_group=None):
            return linear_log_probs(input, linear_weight, target, linear_bias=linear_bias,
                                    temperature=temperature_value if temperature is None else temperature,
                                    ignore_index=ignore_index, shift=shift, softcap=softcap,
                                    return_entropy=return_entropy, process_group=process_group)

        temperature_value = temperature
        return _dtensor.dispatch(activations={"input": input},
                                 weights={"linear_weight": linear_weight, "linear_bias": linear_bias},
                                 targets={"target": target, "temperature": _tensor_or_none(temperature)},
                                 replicated={}, reduction=None, process_group=process_group, call=call, shift=shift)
    _checks.check_tensor("input", input, floating=True)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (..., H), got a 0-d tensor")
    if _checks.autocast_enabled(input.device):
        dtype = torch.get_autocast_dtype(input.device.type)
        input, linear_weight = input.to(dtype), linear_weight.to(dtype)
        linear_bias = None if linear_bias is None else linear_bias.to(dtype)
    _checks.check_tensor("linear_weight", linear_weight, floating=True, dims=(2,), device=input.device)
    if linear_weight.shape[1] != input.shape[-1]:
        raise _checks.ArgumentError(f"linear_weight must have shape (V, {input.shape[-1]}) for input of shape "
                                    f"{tuple(input.shape)}, got {tuple(linear_weight.shape)}")
    if linear_bias is not None:
        _checks.check_tensor("linear_bias", linear_bias, floating=True, dims=(1,), device=input.device)
        if linear_bias.shape[0] != linear_weight.shape[0]:
            raise _checks.ArgumentError(f"linear_bias must have shape ({linear_weight.shape[0]},), got "
                                        f"{tuple(linear_bias.shape)}")
    if linear_weight.dtype != input.dtype or (linear_bias is not None and linear_bias.dtype != input.dtype):
        raise TypeError(f"linear_weight and linear_bias must have input's dtype {input.dtype}")
    opts, inv_t = _options(input, target, tuple(input.shape[:-1]), temperature, ignore_index, softcap,
                           return_entropy, shift, process_group, n_classes=linear_weight.shape[0])
    x2d = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])
    y = target.to(torch.int64)
    if opts.shift:
        y = torch.cat([y[..., 1:], torch.full_like(y[..., :1], opts.ignore_index)], dim=-1)
    y = y.reshape(-1)
    with _checks.autocast_off(input.device):  # the math at its own precision (inputs cast above)
        if process_group is not None or runs_definition(input) or torch.compiler.is_compiling():
            lp, ent = _linear_definition(opts, x2d, linear_weight, linear_bias, y, inv_t)
        else:
            lp, ent = _LinearLogProbs.apply(opts, x2d, linear_weight, linear_bias, y, inv_t)[:2]
    return _outputs(opts, lp, ent, target.shape)


def _tensor_or_none(value):
    return value if isinstance(value, torch.Tensor) and value.dim() > 0 else None


def _options(like, target, lead, temperature, ignore_index, softcap, return_entropy, shift, process_group,
             n_classes=None):
    """(LogProbsOptions, inverse temperature: a 0-d or (rows,) tensor of the compute dtype)."""
    _checks.check_tensor("target", target, floating=False, device=like.device)
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 (or int32) token ids, got {target.dtype}")
    if tuple(target.shape) != lead:
        raise _checks.ArgumentError(f"target must have the leading shape {lead}, got {tuple(target.shape)}")
    shift = _checks.check_bool("shift", shift)
    if shift and len(lead) < 1:
        raise ValueError("shift needs a sequence dimension: input (..., T, H)")
    dtype = _family.compute_dtype(like)
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        _checks.check_tensor("temperature", temperature, floating=True, device=like.device)
        if tuple(temperature.shape) != lead:
            raise _checks.ArgumentError(f"a temperature tensor must have target's shape {lead}, got "
                                        f"{tuple(temperature.shape)}")
        if temperature.requires_grad and torch.is_grad_enabled():
            raise ValueError("temperature cannot require grad: the log-probs are differentiated with respect to the "
                             "logits (or input, weight and bias) only")
        inv_t = 1.0 / temperature.reshape(-1).to(dtype)
    else:
        value = _checks.check_number("temperature", temperature, low=0.0, low_open=True, finite=True)
        inv_t = torch.full((), 1.0 / value, dtype=dtype, device=like.device)
    class_offset = 0
    if process_group is not None:
        n_classes, class_offset, _ = _distributed.shard_classes(
            _distributed.check_group(process_group), n_classes, like.device, rows=math.prod(lead),
            input_dtype=like.dtype)
    if not target.is_floating_point() and target.device.type == "cpu" and n_classes is not None:
        _checks.check_class_range(target[..., 1:] if shift else target, n_classes, ignore_index)
    opts = LogProbsOptions(
        ignore_index=_checks.check_int("ignore_index", ignore_index),
        softcap=None if softcap is None else _checks.check_number("softcap", softcap, low=0.0, low_open=True,
                                                                   finite=True),
        return_entropy=_checks.check_bool("return_entropy", return_entropy),
        shift=shift,
        class_offset=class_offset,
        process_group=process_group,
    )
    return opts, inv_t


def _outputs(opts, lp, ent, shape):
    lp = lp.reshape(shape)
    return (lp, ent.reshape(shape)) if opts.return_entropy else lp


# ---------------------------------------------------------------------------------------------------------------
# The definition, in torch ops (the torch backend of log_probs, the higher-order gradients of every path)


def _scaled(opts, logits, inv_t):
    z = logits
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    return z * (inv_t if inv_t.dim() == 0 else inv_t[:, None])


def _rows(opts, logits, y, inv_t):
    """(log p_y, entropy) per row of the (rows, V) ``logits`` in their dtype; 0 on ignored rows."""
    log_p = torch.log_softmax(_scaled(opts, logits, inv_t), dim=-1)
    valid = y != opts.ignore_index
    lp = log_p.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
    p = log_p.exp()
    entropy = -torch.where(p > 0, p * log_p, 0.0).sum(dim=-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, entropy, 0.0)


def _linear_definition(opts, x2d, weight, bias, y, inv_t):
    """``linear_log_probs`` in torch ops with the logits materialized (a vocabulary shard's under a group)."""
    dtype = _family.compute_dtype(x2d)
    if opts.process_group is None:
        logits = F.linear(x2d.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        return _rows(opts, logits, y, inv_t)
    return _sharded_rows(opts, x2d, weight, bias, y, inv_t)


def _sharded_rows(opts, x2d, weight, bias, y, inv_t):
    """(log p_y, entropy) when ``weight`` holds this rank's slice of the classes: per row this shard's (m, s, A, z_y)
    (A = sum_c exp(z_c - m) (z_c - m); z_y where the shard holds the target), gathered from every rank and merged,
    each rank differentiating through its own shard (``_distributed.gather_shards``), the input's gradient summed
    over the ranks (``copy_to_group``)."""
    dtype = _family.compute_dtype(x2d)
    group = opts.process_group
    x2d = _distributed.copy_to_group(x2d.to(dtype), group)
    z = _scaled(opts, F.linear(x2d, weight.to(dtype), None if bias is None else bias.to(dtype)), inv_t)
    n_cols = z.shape[1]
    m = z.detach().amax(dim=1)
    shift = torch.where(m > float("-inf"), m, 0.0)
    e = torch.exp(z - shift[:, None])
    s = e.sum(dim=1)
    a = torch.where(e > 0, e * (z - shift[:, None]), 0.0).sum(dim=1)
    valid = y != opts.ignore_index
    local = y - opts.class_offset
    owned = valid & (local >= 0) & (local < n_cols)
    z_y = torch.where(owned, z.gather(1, torch.where(owned, local, 0).unsqueeze(1)).squeeze(1), 0.0)
    stats = _distributed.gather_shards(torch.stack([m, s, a, z_y], dim=-1), group)  # (world, rows, 4)
    m_r, s_r, a_r, zy_r = stats.unbind(-1)
    m_all = m_r.amax(dim=0)
    base = torch.where(m_all > float("-inf"), m_all, 0.0)
    scale = torch.where(m_r > float("-inf"), torch.exp(m_r - base), 0.0)
    s_all = (s_r * scale).sum(dim=0)
    a_all = (torch.where(m_r > float("-inf"), a_r + s_r * (m_r - base), 0.0) * scale).sum(dim=0)
    log_s = torch.log(s_all)
    lp = (zy_r.sum(dim=0) - base) - log_s
    entropy = log_s - a_all / s_all
    return torch.where(valid, lp, 0.0), torch.where(valid, entropy, 0.0)


def _row_grads(grad_outputs, rows, dtype):
    """The per-row gradients of the log-probs and the entropies (None where none arrived)."""
    return [None if g is None else g.reshape(rows).to(dtype).contiguous() for g in grad_outputs[:2]]


# ---------------------------------------------------------------------------------------------------------------
# Triton backend (compiled or interpreted) of log_probs


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(opts, logits, y, inv_t):
        from ..kernels.log_probs import LOG_PROB_STATE, log_probs_forward

        rows = logits.shape[0]
        dtype = _family.compute_dtype(logits)
        lp = _alloc.empty(rows, dtype=dtype, device=logits.device)
        ent = _alloc.empty(rows, dtype=dtype, device=logits.device)
        state = _alloc.empty((rows, LOG_PROB_STATE), dtype=dtype, device=logits.device)
        log_probs_forward(logits, y, inv_t.expand(rows), lp, ent, state, ignore_index=opts.ignore_index,
                          softcap=opts.softcap)
        return lp, ent, state

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, logits, y, inv_t = inputs
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, y, inv_t, output[2])
        ctx.opts = opts

    @staticmethod
    def backward(ctx, *grad_outputs):
        from ..kernels.log_probs import log_probs_backward

        logits, y, inv_t, state = ctx.saved_tensors
        opts = ctx.opts
        if grad_outputs[0] is None and grad_outputs[1] is None:
            return None, None, None, None
        if torch.is_grad_enabled():  # higher order: through the definition, on the saved input itself
            outs = _rows(opts, logits.to(state.dtype), y, inv_t)
            pairs = [(o, g) for o, g in zip(outs, grad_outputs[:2]) if g is not None]
            (grad,) = torch.autograd.grad([o for o, _ in pairs], [logits], [g for _, g in pairs], create_graph=True)
            return None, grad, None, None
        g, h = _row_grads(grad_outputs, logits.shape[0], state.dtype)
        grad = _alloc.empty(tuple(logits.shape), dtype=logits.dtype, device=logits.device)
        log_probs_backward(logits, y, inv_t.expand(logits.shape[0]), state, g, h, grad,
                           ignore_index=opts.ignore_index, softcap=opts.softcap)
        return None, grad, None, None


# ---------------------------------------------------------------------------------------------------------------
# linear_log_probs on the LM-head engine: the Triton row kernels, or their torch-ops equivalent (torch backend)


def _shift_in_place(opts, logits, inv_t, m=None):
    """``logits`` (the engine's chunk buffer, compute dtype) overwritten by ``z - m`` with ``z = softcap(x) / T``;
    returns (m, the cap's derivative or None). ``m``: the rows' max, computed here when not given."""
    dcap = None
    if opts.softcap is not None:
        t = logits.div_(opts.softcap).tanh_()
        dcap = 1.0 - t * t
        t.mul_(opts.softcap)
    logits.mul_(inv_t if inv_t.dim() == 0 else inv_t[:, None])
    if m is None:
        m = logits.amax(dim=1)
    logits.sub_(torch.where(m > float("-inf"), m, 0.0)[:, None])
    return m, dcap


def _torch_row_forward(opts, logits, y, inv_t, lp, ent, state):
    """The forward row kernel in torch ops (the torch backend), the math of ``kernels/log_probs.py`` over the chunk
    buffer in place: per-row log-probs, entropies and (m, log s, H)."""
    m, _ = _shift_in_place(opts, logits, inv_t)
    e = logits.exp()
    s = e.sum(dim=1)
    a = torch.where(e > 0, e * logits, 0.0).sum(dim=1)
    log_s = s.log()
    valid = y != opts.ignore_index
    z_y = logits.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
    lp.copy_(torch.where(valid, z_y - log_s, 0.0))
    entropy = log_s - a / s
    ent.copy_(torch.where(valid, entropy, 0.0))
    state[:, 0], state[:, 1], state[:, 2] = m, log_s, entropy


def _torch_row_backward(opts, logits, y, inv_t, state, g, h, grad):
    """The backward row kernel in torch ops, in place over the chunk buffer (``grad`` is ``logits``):
    ``dz_c = g ([c == y] - p_c) - h p_c (log p_c + H)``, times ``1 / T`` and the cap's derivative."""
    m, log_s, entropy = state.unbind(1)
    _, dcap = _shift_in_place(opts, logits, inv_t, m)
    valid = y != opts.ignore_index
    g = torch.zeros_like(log_s) if g is None else torch.where(valid, g, 0.0)
    h = torch.zeros_like(log_s) if h is None else torch.where(valid, h, 0.0)
    log_p = logits.sub_(log_s[:, None])
    p = log_p.exp()
    dz = log_p.add_(entropy[:, None]).mul_(h[:, None]).add_(g[:, None]).mul_(p).neg_()
    dz.masked_fill_(p == 0, 0.0)  # a -inf logit: p log p is 0, not 0 * -inf
    dz.scatter_add_(1, torch.where(valid, y, 0).unsqueeze(1), g.unsqueeze(1))
    dz.mul_(inv_t if inv_t.dim() == 0 else inv_t[:, None])
    if dcap is not None:
        dz.mul_(dcap)
    if dz is not grad:
        grad.copy_(dz)


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(opts, x2d, weight, bias, y, inv_t):
        on_torch = backend(x2d.device) == "torch"
        dtype = _family.compute_dtype(x2d)
        xs, w, b = _engine_operands(x2d, weight, bias, on_torch)
        rows = x2d.shape[0]
        lp = _alloc.empty(rows, dtype=dtype, device=x2d.device)
        ent = _alloc.empty(rows, dtype=dtype, device=x2d.device)
        state = _alloc.empty((rows, 3), dtype=dtype, device=x2d.device)
        inv_rows = inv_t.expand(rows)

        def row_kernel(logits, start, stop):
            args = (logits, y[start:stop], inv_rows[start:stop], lp[start:stop], ent[start:stop], state[start:stop])
            if on_torch:
                _torch_row_forward(opts, *args)
            else:
                from ..kernels.log_probs import log_probs_forward

                log_probs_forward(*args, ignore_index=opts.ignore_index, softcap=opts.softcap)

        _lm_head.sweep(xs, w, b, _step(opts, xs, w), row_kernel, needs=(False, False, False), acc_dtype=dtype,
                       bias_dtype=dtype)
        return lp, ent, state

    @staticmethod
    def setup_context(ctx, inputs, output):
        opts, x2d, weight, bias, y, inv_t = inputs
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x2d, weight, bias, y, inv_t, output[2])
        ctx.opts = opts

    @staticmethod
    def backward(ctx, *grad_outputs):
        x2d, weight, bias, y, inv_t, state = ctx.saved_tensors
        opts, needs = ctx.opts, ctx.needs_input_grad[1:4]
        if grad_outputs[0] is None and grad_outputs[1] is None:
            return (None,) * 6
        if torch.is_grad_enabled():  # higher order: through the definition, on the saved inputs themselves
            outs = _linear_definition(opts, x2d, weight, bias, y, inv_t)
            pairs = [(o, g) for o, g in zip(outs, grad_outputs[:2]) if g is not None]
            wanted = [t for t, need in zip((x2d, weight, bias), needs) if need]
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True))
            return None, *(next(grads) if need else None for need in needs), None, None
        with _checks.autocast_off(x2d.device):
            return _linear_backward(opts, needs, x2d, weight, bias, y, inv_t, state, grad_outputs)


def _linear_backward(opts, needs, x2d, weight, bias, y, inv_t, state, grad_outputs):
    """``_LinearLogProbs``'s backward: the engine's sweep once more, the row kernel writing G from the saved state."""
    on_torch = backend(x2d.device) == "torch"
    dtype = state.dtype
    xs, w, b = _engine_operands(x2d, weight, bias, on_torch)
    g, h = _row_grads(grad_outputs, x2d.shape[0], dtype)
    inv_rows = inv_t.expand(x2d.shape[0])

    def row_kernel(logits, start, stop):
        args = (logits, y[start:stop], inv_rows[start:stop], state[start:stop],
                None if g is None else g[start:stop], None if h is None else h[start:stop], logits)
        if on_torch:
            _torch_row_backward(opts, *args)
        else:
            from ..kernels.log_probs import log_probs_backward

            log_probs_backward(*args, ignore_index=opts.ignore_index, softcap=opts.softcap)

    dx, dw, db = _lm_head.sweep(xs, w, b, _step(opts, xs, w), row_kernel, needs=tuple(needs),
                                acc_dtype=dtype, bias_dtype=dtype)
    return (None, None if dx is None else dx.to(x2d.dtype), None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype), None, None)


def _engine_operands(x2d, weight, bias, on_torch):
    """The engine's operands: as given on the Triton backends (the chunk's logits in the input's dtype, as eager's),
    in the compute dtype on the torch backend (its definition's precision)."""
    if not on_torch:
        return x2d, weight, bias
    dtype = _family.compute_dtype(x2d)
    return x2d.detach().to(dtype), weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)


def _step(opts, x2d, weight):
    return opts.chunk_rows or _lm_head.chunk_rows(weight.shape[0], x2d.dtype.itemsize, LOG_PROBS_CHUNK_BYTES)
