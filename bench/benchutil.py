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
