"""Perplexity helpers: ``exp`` of a language model's mean token cross-entropy (``PPL = e^L``, L the mean token loss).

``perplexity`` runs ``fusedloss.cross_entropy`` for the per-token losses (no second cross-entropy here, and its
autograd, compile and layout behaviour is cross-entropy's, composed with torch ops);
``perplexity_from_loss`` turns mean losses that were already computed into a perplexity, weighting several
batches by their token counts (the perplexity of the union is ``exp`` of the token-weighted mean loss, not the
mean of the perplexities, which Jensen's inequality puts above it).
"""

import torch

from .. import _checks
from .cross_entropy import cross_entropy


def perplexity(logits, target, ignore_index=-100, *, per_sequence=False):
    """``exp(mean token cross-entropy)`` of next-token logits.

    Args:
        logits: ``(..., V)``, vocabulary last (the language-model layout, e.g. ``(B, T, V)``); float16,
            bfloat16, float32 or float64.
        target: ``(...)`` token ids of any integer dtype (compared in int64), already aligned with ``logits``
            (shifted by one), ``ignore_index`` where a position is not scored (padding, prompt).
        ignore_index: see ``target``; Python, NumPy or 0-d tensor.
        per_sequence: ``False``: one perplexity over every scored token. ``True``: ``logits`` is ``(B, T, V)``
            and the result ``(B,)`` holds each sequence's perplexity (NaN for a sequence without scored tokens).
    Returns fp32 (fp64 for fp64 logits): the per-token losses are summed in that precision, so bf16 logits do
    not round the mean loss to bf16 before the exponential magnifies the error (each token's loss is rounded to
    the logits' dtype once, by ``cross_entropy``). Differentiable in ``logits``. NaN with no scored token (empty
    inputs included), as ``exp`` of torch's all-ignored mean cross-entropy.
    """
    _checks.check_tensor("logits", logits, floating=True)
    if logits.dim() == 0:
        raise ValueError("logits must have at least 1 dimension (..., V), got a 0-d tensor")
    _checks.check_tensor("target", target, floating=False, device=logits.device)
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have the shape of logits without the last (vocabulary) dimension, got "
                         f"logits {tuple(logits.shape)} and target {tuple(target.shape)}")
    ignore_index = _checks.check_int("ignore_index", ignore_index)
    if _checks.check_bool("per_sequence", per_sequence) and logits.dim() != 3:
        raise ValueError(f"per_sequence needs (B, T, V) logits, got shape {tuple(logits.shape)}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    target = target.to(torch.int64)  # cross_entropy takes int64 (or uint8); small dtypes must not wrap
    token_loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                               reduction="none").to(dtype).reshape(target.shape)
    scored = (target != ignore_index).to(dtype)
    dim = 1 if per_sequence else None
    return torch.exp(_mean_or_nan(token_loss.sum(dim), scored.sum(dim)))


def _mean_or_nan(total, count):
    """``total / count``, NaN where ``count`` is 0, with a zero gradient there (torch's all-ignored mean
    cross-entropy has one): both wheres, so that no ``0 / 0`` or ``NaN * 0`` reaches the backward."""
    has_tokens = count != 0
    return torch.where(has_tokens, total / torch.where(has_tokens, count, 1.0), float("nan"))


def perplexity_from_loss(loss, num_tokens=None):
    """``exp(loss)`` for a mean token cross-entropy; with ``num_tokens``, the perplexity of several batches.

    Args:
        loss: a Python number or a floating tensor of mean token losses (e.g. one per batch or per sequence).
        num_tokens: ``None``, or the number of tokens behind each mean loss (a tensor or sequence of the same
            length): the result is ``exp(sum(loss * num_tokens) / sum(num_tokens))``, the perplexity of all those
            tokens together. Without it a tensor of several losses gives one perplexity per loss.
    Returns a tensor (fp32; fp64 for fp64 losses and Python numbers), differentiable in ``loss``.
    """
    if isinstance(loss, torch.Tensor):
        _checks.check_tensor("loss", loss, floating=True)
    else:
        loss = torch.tensor(_checks.check_number("loss", loss), dtype=torch.float64)
    loss = loss.to(torch.float64 if loss.dtype == torch.float64 else torch.float32)
    if num_tokens is None:
        return torch.exp(loss)
    tokens = torch.as_tensor(num_tokens, device=loss.device)
    if tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"num_tokens must hold token counts, got {tokens.dtype}")
    if tokens.shape != loss.shape:
        raise ValueError(f"num_tokens must have loss's shape {tuple(loss.shape)}, got {tuple(tokens.shape)}")
    tokens = tokens.to(loss.dtype)
    return torch.exp(_mean_or_nan((loss * tokens).sum(), tokens.sum()))
