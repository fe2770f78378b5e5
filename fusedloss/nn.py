"""``torch.nn.Module`` wrappers of the functional API, with torch's constructor arguments plus the extras.

Tensors given to a constructor (``weight``, ``pos_weight``, a per-class ``focal_alpha``) are registered as buffers,
as torch's losses do, so they follow ``.to(device)`` and the state dict.
"""

import math

import torch

from . import _checks
from .losses.binary import binary_cross_entropy_with_logits, sigmoid_focal_loss
from .losses.contrastive import clip_loss, info_nce, nt_xent
from .losses.cross_entropy import cross_entropy

class CrossEntropyLoss(torch.nn.Module):
    """``fusedloss.cross_entropy`` as a module; see it for shapes, dtypes and the extras."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, focal_gamma=0.0, focal_alpha=None, z_loss=0.0, softcap=None,
                 inplace_backward=False):
        super().__init__()
        self.register_buffer("weight", weight)
        alpha_tensor = isinstance(focal_alpha, torch.Tensor)
        self.register_buffer("focal_alpha", focal_alpha if alpha_tensor else None)
        self.focal_alpha_scalar = None if alpha_tensor else focal_alpha
        self.ignore_index = ignore_index
        self.reduction = _checks.legacy_reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input, target):
        alpha = self.focal_alpha if self.focal_alpha is not None else self.focal_alpha_scalar
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             focal_gamma=self.focal_gamma, focal_alpha=alpha, z_loss=self.z_loss,
                             softcap=self.softcap, inplace_backward=self.inplace_backward)


class FocalLoss(CrossEntropyLoss):
    """``fusedloss.focal_loss`` as a module: ``alpha * (1 - p_t) ** gamma * CE``."""

    def __init__(self, gamma=2.0, alpha=None, weight=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0):
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, focal_gamma=gamma, focal_alpha=alpha)


class BCEWithLogitsLoss(torch.nn.Module):
    """``fusedloss.binary_cross_entropy_with_logits`` as a module, with torch's constructor."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean", pos_weight=None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = _checks.legacy_reduction(size_average, reduce, reduction)

    def forward(self, input, target):
        return binary_cross_entropy_with_logits(input, target, weight=self.weight, reduction=self.reduction,
                                                pos_weight=self.pos_weight)


class SigmoidFocalLoss(torch.nn.Module):
    """``fusedloss.sigmoid_focal_loss`` as a module (torchvision's defaults: alpha 0.25, gamma 2, 'none')."""

    def __init__(self, alpha=0.25, gamma=2.0, reduction="none"):
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def forward(self, inputs, targets):
        return sigmoid_focal_loss(inputs, targets, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction)



class NTXentLoss(torch.nn.Module):
    """``fusedloss.nt_xent`` as a module: SimCLR's NT-Xent over ``(2N, d)`` features, rows ``i`` and ``i + N`` the
    positive pairs, self-similarity excluded."""

    def __init__(self, temperature=0.07):
        super().__init__()
        self.temperature = temperature

    def forward(self, features):
        return nt_xent(features, self.temperature)


class ClipLoss(torch.nn.Module):
    """``fusedloss.clip_loss`` as a module, with open_clip's learnable temperature: the parameter ``logit_scale``
    starts at ``log(1 / 0.07)`` and the loss uses ``logit_scale.exp()`` (open_clip also clamps the parameter to
    ``log(100)`` after each optimizer step; do that in the training loop). ``logit_bias`` (a number) adds a learnable
    bias for drop-in use with models that carry one: it cancels in the softmaxes, so its gradient is zero.
    ``process_group``: see ``fusedloss.clip_loss``."""

    def __init__(self, logit_scale=math.log(1 / 0.07), logit_bias=None, *, process_group=None):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(logit_scale)))
        self.logit_bias = None if logit_bias is None else torch.nn.Parameter(torch.tensor(float(logit_bias)))
        self.process_group = process_group

    def forward(self, image_features, text_features):
        return clip_loss(image_features, text_features, self.logit_scale.exp(), self.logit_bias,
                         process_group=self.process_group)


class InfoNCELoss(torch.nn.Module):
    """``fusedloss.info_nce`` as a module: query row ``i`` against every key, its positive at key ``i``."""

    def __init__(self, temperature=0.07, *, normalize=True, reduction="mean"):
        super().__init__()
        self.temperature, self.normalize, self.reduction = temperature, normalize, reduction

    def forward(self, query, key):
        return info_nce(query, key, self.temperature, normalize=self.normalize, reduction=self.reduction)


__all__ = sorted(name for name, obj in list(globals().items())
                 if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == __name__)
