"""Perplexity helpers: ``exp`` of a language model's mean token cross-entropy (the seed's ``PPL = e^L``).

``perplexity`` runs ``fusedloss.cross_entropy`` for the per-token losses (no second cross-entropy here);
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
        target: ``(...)`` int64 token ids, already aligned with ``logits`` (shifted by one), ``ignore_index``
            where a position is not scored (padding, prompt).
        ignore_index: see ``target``.
        per_sequence: ``False``: one perplexity over every scored token. ``True``: ``logits`` is ``(B, T, V)``
            and the result ``(B,)`` holds each sequence's perplexity (NaN for a sequence without scored tokens).
    Returns fp32 (fp64 for fp64 logits): the per-token losses are summed in that precision, so bf16 logits do
    not round the mean loss to bf16 before the exponential magnifies the error. Differentiable in ``logits``.
    """
    _checks.check_tensor("logits", logits, floating=True)
    _checks.check_tensor("target", target, floating=False, device=logits.device)
    if logits.dim() == 0 or target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have the shape of logits without the last (vocabulary) dimension, got "
                         f"logits {tuple(logits.shape)} and target {tuple(target.shape)}")
    if per_sequence and logits.dim() != 3:
        raise ValueError(f"per_sequence needs (B, T, V) logits, got shape {tuple(logits.shape)}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    token_loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                               reduction="none").to(dtype).reshape(target.shape)
    scored = (target != ignore_index).to(dtype)
    if per_sequence:
        return torch.exp(token_loss.sum(1) / scored.sum(1))
    return torch.exp(token_loss.sum() / scored.sum())


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
    return torch.exp((loss * tokens).sum() / tokens.sum())
