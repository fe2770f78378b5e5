"""Backend choice, per call, from the tensors' device and the environment.

- ``"triton"``: CUDA (and ROCm) tensors run the compiled kernels.
- ``"triton-interpret"``: with ``TRITON_INTERPRET=1`` set before ``fusedloss`` is imported, the same kernels run
  in Triton's interpreter on CPU tensors (this is how CI tests the kernels without a GPU).
- ``"torch"``: CPU tensors otherwise, or any tensor with ``FUSEDLOSS_BACKEND=torch``: plain PyTorch with the same
  semantics.
"""

import importlib.util
import os

import torch

_NEEDS_NUMPY = ("TRITON_INTERPRET=1 asks for Triton's interpreter, which needs numpy: "
                "pip install numpy (or fusedloss[test])")


def _interpreter_requested():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_kernels():
    """(the ``fusedloss.kernels`` package, None), or (None, why the Triton backends are unavailable). Only a
    missing triton is a normal state (it is a Linux-only dependency): an interpreter requested without numpy, or
    kernels missing from a source tree, is an error the caller should see."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        if getattr(error, "name", None) == "numpy" and _interpreter_requested():
            raise ImportError(_NEEDS_NUMPY) from error
        return None, "triton is not installed (a Linux-only dependency of fusedloss)"
    # (checked before the import: a missing submodule of a package being initialized surfaces as "cannot import
    # name 'kernels' from partially initialized module", which reads like a circular import)
    if importlib.util.find_spec(f"{__package__}.kernels") is None:
        raise ImportError("fusedloss.kernels is missing: the kernels live in the repository's kernels/ folder and are "
                          "installed as fusedloss.kernels; install the package (pip install -e .) instead of importing "
                          "it from the source tree")
    try:
        from . import kernels
    except ModuleNotFoundError as error:
        if error.name == "numpy" and _interpreter_requested():
            raise ImportError(_NEEDS_NUMPY) from error
        raise
    _check_same_tree(kernels)
    return kernels, None


def _check_same_tree(kernels):
    """The kernels must come from the host's own tree: ``fusedloss/kernels`` (a wheel) or ``kernels/`` beside
    ``fusedloss/`` (a checkout, an editable install). A host imported from one checkout (``PYTHONPATH``) and kernels
    mapped by another checkout's editable install would otherwise run together and compute wrong losses."""
    host = os.path.dirname(os.path.abspath(__file__))
    found = os.path.dirname(os.path.abspath(kernels.__file__))
    if found not in (os.path.join(host, "kernels"), os.path.join(os.path.dirname(host), "kernels")):
        raise ImportError(f"fusedloss's host code comes from {host} but its kernels from {found}, another tree (an "
                          "editable install of one checkout and another on the path?): import both from one tree")


_kernels, _unavailable = _load_kernels()


def backend(device):
    """The backend that runs a loss whose tensors live on ``device`` (a ``torch.device`` or a string)."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    forced = os.environ.get("FUSEDLOSS_BACKEND", "")
    if forced not in ("", "auto", "torch"):
        raise ValueError(f"FUSEDLOSS_BACKEND must be 'torch' or 'auto', got {forced!r}")
    if forced == "torch":
        return "torch"
    if _kernels is None:
        if device.type == "cpu":
            return "torch"
        raise RuntimeError(f"tensors on {device} need the Triton kernels, but {_unavailable}")
    if _kernels.INTERPRETED:
        return "triton-interpret"
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        return "torch"
    raise ValueError(f"fusedloss has no backend for tensors on {device}")


def matmul_backend(device, dtype):
    """``backend(device)`` for the families built on ``tl.dot`` (linear cross-entropy, contrastive, batch-hard
    mining), or ``"torch"`` where this Triton's ``tl.dot`` is not exact for ``dtype``: fp64 where it cannot compile
    it, bf16 in an interpreter that multiplies bf16 bit patterns (upstream triton issue 11584: losses of 1e9)."""
    which = backend(device)
    if which == "torch" or dtype not in (torch.float64, torch.bfloat16):
        return which
    from .kernels._common import fp64_dot_supported, interpreter_bf16_dot_exact

    if dtype == torch.float64 and not fp64_dot_supported():
        return "torch"
    if dtype == torch.bfloat16 and which == "triton-interpret" and not interpreter_bf16_dot_exact():
        return "torch"
    return which


def runs_definition(t):
    """Whether a call on ``t`` must run its loss's definition in torch ops, whatever the backend: ``t`` is a meta
    tensor or a fake one outside ``torch.compile`` (shape propagation, as for meta-initialized FSDP: the definition
    gives torch's shapes and dtypes), or a ``torch.func`` transform is active (``vmap``, ``jvp``, ``jacrev``,
    ``hessian``, ``grad``: they transform torch ops, and kernels would need a rule of their own for each). Under
    ``torch.compile`` the kernels are custom ops with fake implementations, so they stay."""
    if torch.compiler.is_compiling():
        return False
    if t.is_meta or torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    # a plain tensor is not fake: the type test first, since is_fake's walk costs microseconds per call (a tenth of a
    # small loss's call on the torch backend; bench/cpu_overhead.py)
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)
