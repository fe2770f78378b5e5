"""Host-side argument checks: they read metadata only (shapes, dtypes, devices, argument values), run before
any launch on every backend, and raise ``ValueError`` / ``TypeError`` naming the argument."""

import numbers
import warnings

import torch

REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name, t, *, floating=None, dims=None, device=None):
    """``t`` is a tensor; optionally of a floating dtype (``floating=True``) or an integer one (``False``), with
    a number of dimensions in ``dims``, on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating is True and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if floating is False and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must hold integer class indices, got {t.dtype}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but input is on {device}")


def check_reduction(reduction, allowed=REDUCTIONS):
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")


def check_number(name, value, *, low=None, high=None, low_open=False):
    """A real Python number within [low, high] (or (low, high] with ``low_open``), returned as float."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
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
