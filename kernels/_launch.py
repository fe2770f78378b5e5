"""Host-side helpers shared by the launchers of every kernel module."""

import functools
import threading
import warnings

import torch

from . import INTERPRETED

# Triton's interpreter patches triton.language's functions for the duration of a launch, and numpy's error state and
# Python's warning filters are process-wide too: one interpreted launch at a time (concurrent forwards from threads
# raised "Did you forget to add @triton.jit?"). Reentrant: a launcher may launch another.
INTERPRETER_LOCK = threading.RLock()


def custom_launcher(name, mutates_args):
    """Register a launcher as the custom op ``fusedloss::<name>`` (it writes into the caller's buffers named in
    ``mutates_args`` and returns nothing, so it needs no fake implementation), and return a function that calls
    the op while ``torch.compile`` traces, where it makes the launch one opaque node instead of a graph break, and
    the launcher itself otherwise: eagerly the dispatcher would only add tens of microseconds per launch. The
    launcher's annotations are the op's schema."""

    def register(launcher):
        body = _interpreted(launcher) if INTERPRETED else launcher
        op = torch.library.custom_op(f"fusedloss::{name}", mutates_args=mutates_args)(body)

        @functools.wraps(launcher)
        def launch(*args, **kwargs):
            return (op if torch.compiler.is_compiling() else body)(*args, **kwargs)

        launch.op = op
        return launch

    return register


def _interpreted(launcher):
    """``launcher`` under ``INTERPRETER_LOCK``, with numpy's floating-point warnings off: Triton's interpreter
    evaluates the masked-out lanes of a tile too (log(0), inf - inf, ...), which the kernels discard with
    ``tl.where``, and numpy would warn about each of them (through ``errstate``, and as RuntimeWarnings such as
    "All-NaN slice encountered" from the reductions of a NaN row, whose NaN is the result the kernels want)."""
    import numpy

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        with INTERPRETER_LOCK, numpy.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return launcher(*args, **kwargs)

    return run


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device):
    """Streaming multiprocessors of ``device``: the CUDA device's count, ``configs.DEFAULT_NUM_SMS`` elsewhere."""
    from .configs import DEFAULT_NUM_SMS

    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_NUM_SMS
