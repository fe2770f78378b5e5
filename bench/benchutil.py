"""Helpers for the benchmark files (imported by name: pytest puts bench/ on sys.path)."""

import pytest
import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def skip_if_oom(fn):
    """Run ``fn``; an out-of-memory error becomes a skip with that reason (a baseline that does not fit is a
    result, and the report shows it as such)."""
    try:
        return fn()
    except torch.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        pytest.skip(f"out of memory: {str(exc).splitlines()[0]}")


_compiled = {}


def provider_fn(provider, ours, eager, key):
    """The callable a provider times: ours, eager, or eager under torch.compile (compiled once per ``key``).
   """
    if provider == "fusedloss":
        return ours
    if provider == "eager":
        return eager
    return _compiled.setdefault(key, torch.compile(eager, dynamic=False))


def timed_step(fn, inputs, mode, differentiable):
    """The timed callable: ``fn(*inputs)`` under no_grad (``'fwd'``), or its backward from fresh gradients of
    ``differentiable`` (``'fwd_bwd'``)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(*inputs)
        return step
    for t in differentiable:
        t.requires_grad_(True)

    def step():
        for t in differentiable:
            t.grad = None
        fn(*inputs).backward()
    return step
