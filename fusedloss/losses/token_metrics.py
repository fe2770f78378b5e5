"""Token metrics a training loop logs beside the loss (SFT trainers log the token accuracy and the entropy every
step), computed from the logits the loss reads, so the logits need not come back into memory for them.

``cross_entropy`` and ``linear_cross_entropy`` take ``return_token_accuracy`` / ``return_entropy``; with either,
they return a ``LossWithMetrics``, whose fields are named, so a metric added later does not change a call's shape.
Per token (the loss's ``'none'`` shape): the accuracy ``argmax(logits) == target`` (ties broken as
``torch.argmax`` breaks them: the first maximal class; the soft cap is monotonic, so the raw logits' argmax), and
the entropy ``-sum_c p_c log p_c`` of the (soft-capped) logits' softmax; both 0 on ignored tokens, fp32 (fp64 for
fp64 logits), detached (an entropy bonus that needs a gradient is ``linear_log_probs(..., return_entropy=True)``).
"""

import dataclasses
from typing import Optional

import torch

from .. import _alloc, _checks


@dataclasses.dataclass(frozen=True)
class LossWithMetrics:
    """A loss and the token metrics asked for (None where not asked): ``loss``, ``token_accuracy`` and ``entropy``
    per token, and the per-token ``lse`` of ``linear_cross_entropy(return_lse=True)``."""

    loss: torch.Tensor
    token_accuracy: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None


def check(return_token_accuracy, return_entropy, prob_target):
    """The metrics asked for, as a tuple of names; ValueError for an accuracy of probability targets."""
    names = tuple(name for name, asked in (("token_accuracy", return_token_accuracy), ("entropy", return_entropy))
                  if _checks.check_bool(f"return_{name}", asked))
    if "token_accuracy" in names and prob_target:
        raise ValueError("return_token_accuracy needs class-index targets (an argmax to compare with)")
    return names


def buffers(names, rows, dtype, device):
    """(accuracy, entropy) per-row output buffers for the metrics in ``names`` (None for the others)."""
    return tuple(_alloc.empty(rows, dtype=dtype, device=device) if name in names else None
                 for name in ("token_accuracy", "entropy"))


def of_logits(logits, y, ignore_index, softcap, accuracy, entropy, kernels):
    """Write the metrics of ``logits`` (rows, C, *K dims) against class indices ``y`` (rows, *K dims) (or
    probabilities, for the entropy) into the flat per-row buffers ``accuracy`` and ``entropy`` (None: not asked).
    ``kernels``: the entropy by ``kernels/log_probs.py``'s forward kernel (one read of 2-D logits, no temporaries of
    their size); else torch ops in the compute dtype."""
    with torch.no_grad():
        index_target = not y.is_floating_point()
        valid = (y != ignore_index) if index_target else None
        if accuracy is not None:
            accuracy.copy_(((logits.argmax(dim=1) == y) & valid).reshape(-1))
        if entropy is None:
            return
        if kernels and logits.dim() == 2 and index_target:
            from ..kernels.log_probs import LOG_PROB_STATE, log_probs_forward

            rows = logits.shape[0]
            logprob = torch.empty(rows, dtype=entropy.dtype, device=logits.device)
            state = torch.empty((rows, LOG_PROB_STATE), dtype=entropy.dtype, device=logits.device)
            log_probs_forward(logits, y, torch.ones((), dtype=entropy.dtype, device=logits.device).expand(rows),
                              logprob, entropy, state, ignore_index=ignore_index, softcap=softcap)
            return
        z = logits.to(entropy.dtype)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        log_p = torch.log_softmax(z, dim=1)
        h = -torch.where(log_p > float("-inf"), log_p.exp() * log_p, 0.0).sum(dim=1)
        entropy.copy_((torch.where(valid, h, 0.0) if index_target else h).reshape(-1))
