"""Host-side argument checks: they read metadata only (shapes, dtypes, devices, argument values), run before
any launch on every backend, and raise ``ValueError`` / ``TypeError`` naming the argument. Numbers are accepted
in every form torch's own argument parser takes: Python and NumPy scalars, and 0-d tensors (bools: Python's)."""

import contextlib
import math
import numbers
import warnings

import torch

from ._backend import runs_definition

REDUCTIONS = ("none", "mean", "sum")


class ArgumentError(ValueError, RuntimeError):
    """A bad argument of a function whose torch counterpart raises RuntimeError for it: a ValueError, as every
    fusedloss argument check raises, that ``except RuntimeError`` written for torch also catches."""
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name, t, *, floating=None, dims=None, device=None, like="input"):
    """``t`` is a tensor; optionally of a floating dtype (``floating=True``) or an integer one (``False``), with
    a number of dimensions in ``dims``, on ``device`` (the device of the argument named ``like``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating is True and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if floating is False and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must hold integer class indices, got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but {like} is on {device}")


def check_reduction(reduction, allowed=REDUCTIONS):
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")


def _scalar(name, value, kind):
    """A 0-d tensor argument as a Python number (a host read, as torch's parser does for number arguments)."""
    if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be {kind} or a 0-d tensor holding one, got a tensor of shape "
                        f"{tuple(value.shape)} and dtype {value.dtype}")
    return value.item()


def check_number(name, value, *, low=None, high=None, low_open=False, finite=False):
    """A real number within [low, high] (or (low, high] with ``low_open``), finite if asked, returned as float."""
    # (exact float / int first: the numbers.Real ABC check costs a microsecond, a tenth of a small loss's call)
    if type(value) is not float and type(value) is not int:
        if isinstance(value, torch.Tensor):
            value = _scalar(name, value, "a number")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    # (comparisons, not math.isinf: under torch.compile(dynamic=True) a float argument may be a SymFloat, which
    # compares into a guard but has no math.isinf)
    if finite and (value == math.inf or value == -math.inf):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_int(name, value):
    """An integer (Python, NumPy or a 0-d integer tensor; not a bool), returned as int."""
    if type(value) is int:
        return value
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            raise TypeError(f"{name} must be an int, got a {value.dtype} tensor")
        value = _scalar(name, value, "an int")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_bool(name, value):
    """A Python bool, returned as is (torch's own parser refuses NumPy bools too)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def legacy_reduction(size_average, reduce, reduction):
    """torch's deprecated ``size_average`` / ``reduce`` pair, mapped to ``reduction`` as torch maps it."""
    if size_average is None and reduce is None:
        return reduction
    warnings.warn("size_average and reduce are deprecated, please use reduction='mean'/'sum'/'none' instead",
                  UserWarning, stacklevel=3)
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


def autocast_enabled(device):
    """``torch.is_autocast_enabled`` for ``device``'s type; False where autocast does not exist (meta tensors, whose
    shapes a definition propagates: torch raises there)."""
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def autocast_off(device):
    """A context with autocast off for ``device``'s type (a loss whose own math runs in fp32 / fp64, as in torch's
    fp32 autocast list); nothing to turn off where autocast does not exist."""
    return torch.autocast(device.type, enabled=False) if autocast_enabled(device) else contextlib.nullcontext()


def autocast_fp32(device, dtype):
    """The result dtype of a loss that torch's autocast runs in fp32 (cross-entropy, the softmax family): fp32
    for 16-bit inputs while autocast is on for ``device``, ``dtype`` otherwise."""
    if dtype in (torch.float16, torch.bfloat16) and autocast_enabled(device):
        return torch.float32
    return dtype


def check_class_range(target, n_classes, ignore_index):
    """CPU targets: an out-of-range class index raises IndexError, as torch does (a host read is free there).
    Skipped while ``torch.compile`` traces, where a read of a tensor's value would break the graph (the kernels
    then give that row a NaN loss, as on GPU), and where the call runs its definition (fake tensors, torch.func
    transforms: torch's own ops then report the index)."""
    if torch.compiler.is_compiling() or target.numel() == 0 or runs_definition(target):
        return
    y = target.to(torch.int64)
    bad = (y != ignore_index) & ((y < 0) | (y >= n_classes))
    if bool(bad.any()):
        raise IndexError(f"Target {int(y[bad].flatten()[0])} is out of bounds.")
