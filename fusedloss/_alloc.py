"""Output allocation for the Triton backends.

``FUSEDLOSS_POISON=1`` fills every buffer a kernel is about to write with NaN (or the dtype's max for integers),
so a test fails on any element a kernel forgot to write instead of reading leftover memory that happens to be
right. The tests turn it on; it costs one fill per buffer, so it is off by default.
"""

import os

import torch


def _poisoned(t):
    if os.environ.get("FUSEDLOSS_POISON", "0") in ("", "0"):
        return t
    return t.fill_(float("nan") if t.is_floating_point() else torch.iinfo(t.dtype).max)


def empty(shape, *, dtype, device):
    return _poisoned(torch.empty(shape, dtype=dtype, device=device))


def empty_like(t):
    """Contiguous, of ``t``'s shape, dtype and device."""
    return _poisoned(torch.empty(t.shape, dtype=t.dtype, device=t.device))
