"""fusedloss: fused Triton kernels for training losses, behind a PyTorch-style API.

Functional API (like ``torch.nn.functional``) here; modules in ``fusedloss.nn``; ``backend(device)`` tells which
implementation a call on that device runs.
"""

from . import nn
from ._backend import backend
from ._checks import ArgumentError
from .losses.binary import binary_cross_entropy_with_logits, sigmoid_focal_loss
from .losses.contrastive import (
    clip_loss,
    clip_loss_and_grads,
    info_nce,
    info_nce_and_grads,
    nt_xent,
    siglip_loss,
    siglip_loss_and_grads,
)
from .losses.cross_entropy import cross_entropy, focal_loss
from .losses.distillation import kl_div_with_logits
from .losses.linear_cross_entropy import LinearCrossEntropySchedule, linear_cross_entropy
from .losses.log_probs import linear_log_probs, log_probs
from .losses.perplexity import perplexity, perplexity_from_loss
from .losses.pointwise import bradley_terry_loss, huber_loss, kl_div, l1_loss, mse_loss, smooth_l1_loss
from .losses.token_metrics import LossWithMetrics
from .losses.triplet import batch_hard_triplet_loss, triplet_margin_loss

__all__ = [
    "ArgumentError",
    "LinearCrossEntropySchedule",
    "LossWithMetrics",
    "backend",
    "batch_hard_triplet_loss",
    "binary_cross_entropy_with_logits",
    "bradley_terry_loss",
    "clip_loss",
    "clip_loss_and_grads",
    "cross_entropy",
    "focal_loss",
    "huber_loss",
    "info_nce",
    "info_nce_and_grads",
    "kl_div",
    "kl_div_with_logits",
    "l1_loss",
    "linear_cross_entropy",
    "linear_log_probs",
    "log_probs",
    "mse_loss",
    "nn",
    "nt_xent",
    "perplexity",
    "perplexity_from_loss",
    "sigmoid_focal_loss",
    "siglip_loss",
    "siglip_loss_and_grads",
    "smooth_l1_loss",
    "triplet_margin_loss",
]
__version__ = "0.2.0"
