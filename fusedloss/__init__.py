"""fusedloss: fused Triton kernels for training losses, behind a PyTorch-style API.

Functional API (like ``torch.nn.functional``) here; modules in ``fusedloss.nn``; ``backend(device)`` tells which
implementation a call on that device runs.
"""

from ._backend import backend
from .losses.binary import binary_cross_entropy_with_logits, sigmoid_focal_loss
from .losses.contrastive import clip_loss, info_nce, nt_xent
from .losses.cross_entropy import cross_entropy, focal_loss
from . import nn

__all__ = [
    "backend",
    "binary_cross_entropy_with_logits",
    "clip_loss",
    "cross_entropy",
    "focal_loss",
    "info_nce",
    "nn",
    "nt_xent",
    "sigmoid_focal_loss",
]
__version__ = "0.1.0"
