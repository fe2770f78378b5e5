"""Backend choice, per call, from the tensors' device and the environment.

- ``"triton"``: CUDA (and ROCm) tensors run the compiled kernels.
- ``"triton-interpret"``: with ``TRITON_INTERPRET=1`` set before ``fusedloss`` is imported, the same kernels run
  in Triton's interpreter on CPU tensors (this is how CI tests the kernels without a GPU).
- ``"torch"``: CPU tensors otherwise, or any tensor with ``FUSEDLOSS_BACKEND=torch``: plain PyTorch with the same
  semantics.
"""

import os

import torch

try:
    import triton  # noqa: F401  (the kernels need it; probing here keeps the error out of every call)

    from . import kernels as _kernels
except ImportError:  # triton is a Linux-only dependency; elsewhere only the torch backend exists
    _kernels = None

BACKENDS = ("triton", "triton-interpret", "torch")


def backend(device):
    """The backend that runs a loss whose tensors live on ``device`` (a ``torch.device`` or a string)."""
    device = torch.device(device)
    forced = os.environ.get("FUSEDLOSS_BACKEND", "")
    if forced not in ("", "auto", "torch"):
        raise ValueError(f"FUSEDLOSS_BACKEND must be 'torch' or 'auto', got {forced!r}")
    if forced == "torch":
        return "torch"
    if _kernels is None:
        if device.type == "cpu":
            return "torch"
        raise RuntimeError(f"tensors on {device} need the Triton kernels, but triton is not installed")
    if _kernels.INTERPRETED:
        return "triton-interpret"
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        return "torch"
    raise ValueError(f"fusedloss has no backend for tensors on {device}")


def matmul_backend(device, dtype):
    """``backend(device)`` for the families built on ``tl.dot`` (linear cross-entropy, contrastive, batch-hard
    mining): fp64 takes the torch path where this Triton cannot compile an fp64 ``tl.dot``."""
    which = backend(device)
    if which != "torch" and dtype == torch.float64:
        from .kernels._common import fp64_dot_supported

        if not fp64_dot_supported():
            return "torch"
    return which
