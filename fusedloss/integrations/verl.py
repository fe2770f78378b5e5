"""verl: its fused LM-head kernel's signature and conventions, on ``fusedloss.linear_log_probs``.

verl's actors call ``linear_cross_entropy(hidden, weight, labels, temperature, reduction="none",
dist_process_group=None) -> (logprobs, entropy)`` (``verl.utils.kernel.linear_cross_entropy``): the log-probability
of each label (a log-probability, so <= 0: minus the cross-entropy) and the entropy of each token's distribution
at ``temperature``, both fp32 and flattened to ``(num_tokens,)``, both differentiable with respect to ``hidden`` and
``weight``; under ``dist_process_group`` the weight is this rank's slice of the vocabulary. ``linear_cross_entropy``
below is that function, so ``verl.utils.kernel.linear_cross_entropy = fusedloss.integrations.verl.linear_cross_entropy``
(or the import in an actor) swaps the implementation. verl's labels are real token ids everywhere (padding is masked
by the response mask afterwards), so no index is ignored here.
"""

from ..losses.log_probs import linear_log_probs

__all__ = ["linear_cross_entropy"]


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """``(logprobs, entropy)`` per token, fp32, ``(num_tokens,)``: verl's fused kernel's contract (module docstring).
    ``hidden`` ``(..., H)``, ``weight`` ``(V, H)`` (``lm_head.weight``), ``labels`` ``hidden``'s leading shape.
    Only ``reduction="none"``, the one verl's actors use."""
    if reduction != "none":
        raise ValueError(f"reduction must be 'none' (per-token log-probs, as verl's actors use them), got "
                         f"{reduction!r}")
    # no token is ignored: -1 is never a token id; negative labels would be out of range for verl too
    logprobs, entropy = linear_log_probs(hidden, weight, labels, temperature=temperature, ignore_index=-1,
                                         return_entropy=True, process_group=dist_process_group)
    return logprobs.reshape(-1), entropy.reshape(-1)
