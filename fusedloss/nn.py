"""``torch.nn.Module`` wrappers of the functional API, with torch's constructor arguments plus the extras.

Tensors given to a constructor (``weight``, ``pos_weight``, a per-class ``focal_alpha``) are registered as buffers,
as torch's losses do, so they follow ``.to(device)`` and the state dict.
"""

import math

import torch

from . import _checks
from .losses.binary import binary_cross_entropy_with_logits, sigmoid_focal_loss
from .losses.contrastive import check_dist_impl, check_open_clip_ranks, clip_loss, info_nce, nt_xent, siglip_loss
from .losses.cross_entropy import cross_entropy
from .losses.distillation import kl_div_with_logits
from .losses.linear_cross_entropy import linear_cross_entropy
from .losses.pointwise import bradley_terry_loss, huber_loss, kl_div, l1_loss, mse_loss, smooth_l1_loss
from .losses.triplet import batch_hard_triplet_loss, triplet_margin_loss


class _Loss(torch.nn.Module):
    """The base of fusedloss's modules: what they share beyond ``nn.Module``."""

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: the forward calls Triton launchers and Python-level argument checks,
        # which TorchScript cannot compile, and its own error would point deep inside them
        raise RuntimeError(f"fusedloss.nn.{type(self).__name__} cannot be compiled by torch.jit.script (its forward "
                           "runs Triton kernels and Python argument checks); use torch.compile, which traces it, or "
                           "script the rest of the model and call the loss outside it")


class CrossEntropyLoss(_Loss):
    """``fusedloss.cross_entropy`` as a module; see it for shapes, dtypes and the extras."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, focal_gamma=0.0, focal_alpha=None, z_loss=0.0, softcap=None,
                 inplace_backward=False, process_group=None):
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
        self.process_group = process_group

    def forward(self, input, target):
        alpha = self.focal_alpha if self.focal_alpha is not None else self.focal_alpha_scalar
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             focal_gamma=self.focal_gamma, focal_alpha=alpha, z_loss=self.z_loss,
                             softcap=self.softcap, inplace_backward=self.inplace_backward,
                             process_group=self.process_group)


class FocalLoss(CrossEntropyLoss):
    """``fusedloss.focal_loss`` as a module: ``alpha * (1 - p_t) ** gamma * CE``."""

    def __init__(self, gamma=2.0, alpha=None, weight=None, ignore_index=-100, reduction="mean",
                 label_smoothing=0.0):
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, focal_gamma=gamma, focal_alpha=alpha)


class BCEWithLogitsLoss(_Loss):
    """``fusedloss.binary_cross_entropy_with_logits`` as a module, with torch's constructor."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean", pos_weight=None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = _checks.legacy_reduction(size_average, reduce, reduction)

    def forward(self, input, target):
        return binary_cross_entropy_with_logits(input, target, weight=self.weight, reduction=self.reduction,
                                                pos_weight=self.pos_weight)


class SigmoidFocalLoss(_Loss):
    """``fusedloss.sigmoid_focal_loss`` as a module (torchvision's defaults: alpha 0.25, gamma 2, 'none')."""

    def __init__(self, alpha=0.25, gamma=2.0, reduction="none"):
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction

    def forward(self, inputs, targets):
        return sigmoid_focal_loss(inputs, targets, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction)


class NTXentLoss(_Loss):
    """``fusedloss.nt_xent`` as a module: SimCLR's NT-Xent over ``(2N, d)`` features, rows ``i`` and ``i + N`` the
    positive pairs, self-similarity excluded."""

    def __init__(self, temperature=0.07):
        super().__init__()
        self.temperature = temperature

    def forward(self, features):
        return nt_xent(features, self.temperature)


class ClipLoss(_Loss):
    """``fusedloss.clip_loss`` as a module, called as open_clip calls its ``ClipLoss``:
    ``loss(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``, with the scale (already
    exponentiated) and the bias coming from the model, so that ``losses = loss(**model_out, output_dict=True)`` in
    open_clip's training loop runs unchanged. ``output_dict=True`` returns ``{"contrastive_loss": loss}``.

    The features are L2-normalized inside: for the normalized features open_clip's models return the loss is
    unchanged and their gradient is open_clip's minus its radial part (``g - x <x, g>``), which the model's own
    normalization removes anyway, so every parameter's gradient is open_clip's. ``process_group``: open_clip's
    ``local_loss=True, gather_with_grad=True`` across the group's ranks (see ``fusedloss.clip_loss``), the text
    features all-gathered or, with ``dist_impl="ring"`` (keyword only; not an open_clip argument), passed around a
    ring (memory per rank independent of the world size).

    open_clip's constructor arguments, in its order, honoured or refused by name (ValueError / TypeError):

    - ``cache_labels``: a speed hint of open_clip's (it keeps its label tensors); accepted and ignored, since no
      labels are built here.
    - ``rank`` / ``world_size``: must be ``process_group``'s (None: the group's; without a group 0 and 1, open_clip's
      defaults). ``world_size > 1`` without ``process_group`` raises: fusedloss communicates through that group.
    - ``local_loss`` / ``gather_with_grad``: across ranks this loss is open_clip's ``True, True`` result (None takes
      it). ``local_loss=False`` (every rank the global batch's loss; DDP's averaged gradients would be the same, the
      loss value is not) and ``gather_with_grad=False`` (no gradient through the gathered features: different
      gradients) raise with a group of more than one rank; in a single process every value gives the same loss.
    - ``use_horovod=True`` raises: fusedloss communicates through ``torch.distributed`` only."""

    def __init__(self, local_loss=None, gather_with_grad=None, cache_labels=False, rank=None, world_size=None,
                 use_horovod=False, *, process_group=None, dist_impl="gather"):
        super().__init__()
        for name, value in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad)):
            if value is not None:
                _checks.check_bool(name, value)
        _checks.check_bool("cache_labels", cache_labels)
        if _checks.check_bool("use_horovod", use_horovod):
            raise ValueError("use_horovod=True: fusedloss communicates through torch.distributed only; pass the "
                             "group as process_group=")
        self.rank, self.world_size = check_open_clip_ranks(process_group, rank, world_size)
        if self.world_size > 1 and local_loss is False:
            raise ValueError("local_loss=False: across ranks fusedloss computes open_clip's local_loss=True loss "
                             "(each rank's rows against the gathered batch; their mean over the ranks is the global "
                             "batch's loss, and DDP's averaged gradients are local_loss=False's); pass local_loss=True")
        if self.world_size > 1 and gather_with_grad is False:
            raise ValueError("gather_with_grad=False: across ranks fusedloss gives open_clip's gather_with_grad=True "
                             "gradients (every rank's loss differentiated through the gathered features); pass "
                             "gather_with_grad=True")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.process_group = process_group
        self.dist_impl = check_dist_impl(dist_impl)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias, process_group=self.process_group,
                         dist_impl=self.dist_impl)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(_Loss):
    """``fusedloss.siglip_loss`` as a module, called as open_clip calls its ``SigLipLoss``:
    ``loss(image_features, text_features, logit_scale, logit_bias, output_dict=False)``, so that
    ``losses = loss(**model_out, output_dict=True)`` runs unchanged; ``output_dict=True`` returns
    ``{"contrastive_loss": loss}``.

    The features are L2-normalized inside, as in ``ClipLoss``: every parameter's gradient is open_clip's.
    ``process_group``: what open_clip's ``SigLipLoss(rank=r, world_size=W)`` gives on each rank (see
    ``fusedloss.siglip_loss``).

    open_clip's constructor arguments, in its order: ``cache_labels`` (a speed hint of open_clip's) is accepted and
    ignored; ``rank`` / ``world_size`` as in ``ClipLoss`` (the group's); ``dist_impl``, open_clip's choice of
    exchange across ranks (None, which is ``'bidir'``, ``'shift'``, ``'reduce'`` or ``'gather'``): every one gives
    the same loss and gradients; open_clip's neighbour exchanges (``'bidir'``, ``'shift'``) run fusedloss's ring
    (``siglip_loss(dist_impl="ring")``: memory per rank independent of the world size, as theirs), its
    all-gathering ones (``'reduce'``, ``'gather'``) fusedloss's gather."""

    DIST_IMPLS = {"bidir": "ring", "shift": "ring", "reduce": "gather", "gather": "gather"}

    def __init__(self, cache_labels=False, rank=None, world_size=None, dist_impl=None, *, process_group=None):
        super().__init__()
        _checks.check_bool("cache_labels", cache_labels)
        if dist_impl is not None and dist_impl not in self.DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of {', '.join(map(repr, self.DIST_IMPLS))}, "
                             f"got {dist_impl!r}")
        self.rank, self.world_size = check_open_clip_ranks(process_group, rank, world_size)
        self.cache_labels, self.dist_impl = cache_labels, dist_impl or "bidir"
        self.process_group = process_group

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, process_group=self.process_group,
                           dist_impl=self.DIST_IMPLS[self.dist_impl])
        return {"contrastive_loss": loss} if output_dict else loss


class InfoNCELoss(_Loss):
    """``fusedloss.info_nce`` as a module: query row ``i`` against every key (and ``negatives``), its positive at
    key ``i`` or every key sharing its ``positive_ids``; the options as ``info_nce``'s."""

    def __init__(self, temperature=0.07, *, false_negative_margin=None, normalize=True, reduction="mean",
                 process_group=None, dist_impl="gather"):
        super().__init__()
        self.temperature, self.normalize, self.reduction = temperature, normalize, reduction
        self.false_negative_margin, self.process_group = false_negative_margin, process_group
        self.dist_impl = check_dist_impl(dist_impl)

    def forward(self, query, key, negatives=None, positive_ids=None):
        return info_nce(query, key, self.temperature, negatives=negatives, positive_ids=positive_ids,
                        false_negative_margin=self.false_negative_margin, normalize=self.normalize,
                        reduction=self.reduction, process_group=self.process_group, dist_impl=self.dist_impl)


class LinearCrossEntropyLoss(_Loss):
    """``fusedloss.linear_cross_entropy`` as a module, with ``torch.nn.LinearCrossEntropyLoss``'s constructor: given
    ``in_features`` and ``num_classes`` it owns the classifier, ``self.linear`` (an ``nn.Linear`` to
    ``num_classes * prod(out_features)`` outputs, with ``bias``, ``device``, ``dtype``), and ``forward(input,
    target)`` computes the loss of its logits without them. Without them it holds no parameter and ``forward(input,
    linear_weight, target, linear_bias=None)`` takes the classifier of the model, e.g. ``lm_head.weight``. The class
    ``weight`` is a buffer; the extras of ``linear_cross_entropy`` are keywords of the constructor."""

    def __init__(self, in_features=None, num_classes=None, *, out_features=(), bias=False, device=None, dtype=None,
                 reduction="mean", weight=None, ignore_index=None, label_smoothing=0.0, options=None, focal_gamma=0.0,
                 z_loss=0.0, softcap=None, shift=False, return_lse=False, input_precision=None,
                 accumulate_in_input_dtype=False, process_group=None, schedule=None):
        super().__init__()
        if (in_features is None) != (num_classes is None):
            raise TypeError("LinearCrossEntropyLoss takes both in_features and num_classes (it owns the "
                            "classifier), or neither (forward takes it)")
        self.num_classes, self.out_features = num_classes, tuple(out_features)
        self.linear = None
        if in_features is not None:
            outputs = num_classes * math.prod(self.out_features)
            self.linear = torch.nn.Linear(in_features, outputs, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.options = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                            options=options, focal_gamma=focal_gamma, z_loss=z_loss, softcap=softcap, shift=shift,
                            return_lse=return_lse, input_precision=input_precision,
                            accumulate_in_input_dtype=accumulate_in_input_dtype, process_group=process_group,
                            schedule=schedule)

    def forward(self, input, *args, linear_bias=None):
        if self.linear is None:
            return linear_cross_entropy(input, *args, linear_bias=linear_bias, weight=self.weight, **self.options)
        (target,) = args
        shape = (self.num_classes, *self.out_features)
        bias = None if self.linear.bias is None else self.linear.bias.reshape(shape)
        return linear_cross_entropy(input, self.linear.weight.reshape(*shape, self.linear.in_features), target,
                                    linear_bias=bias, weight=self.weight, **self.options)


class MSELoss(_Loss):
    """``fusedloss.mse_loss`` as a module, with torch's constructor; ``weight`` (optional, the input's size, as
    ``F.mse_loss`` takes it) is registered as a buffer."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", *, weight=None):
        super().__init__()
        self.reduction = _checks.legacy_reduction(size_average, reduce, reduction)
        self.register_buffer("weight", weight)

    def forward(self, input, target):
        return mse_loss(input, target, reduction=self.reduction, weight=self.weight)


class L1Loss(MSELoss):
    """``fusedloss.l1_loss`` as a module, with torch's constructor (and ``MSELoss``'s optional ``weight``)."""

    def forward(self, input, target):
        return l1_loss(input, target, reduction=self.reduction, weight=self.weight)


class HuberLoss(_Loss):
    """``fusedloss.huber_loss`` as a module, with torch's constructor; optional ``weight`` buffer."""

    def __init__(self, reduction="mean", delta=1.0, *, weight=None):
        super().__init__()
        self.reduction, self.delta = reduction, delta
        self.register_buffer("weight", weight)

    def forward(self, input, target):
        return huber_loss(input, target, reduction=self.reduction, delta=self.delta, weight=self.weight)


class SmoothL1Loss(_Loss):
    """``fusedloss.smooth_l1_loss`` as a module, with torch's constructor."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", beta=1.0):
        super().__init__()
        self.reduction = _checks.legacy_reduction(size_average, reduce, reduction)
        self.beta = beta

    def forward(self, input, target):
        return smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class KLDivLoss(_Loss):
    """``fusedloss.kl_div`` as a module, with torch's constructor (``'mean'`` warns at each call, as torch's)."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", log_target=False):
        super().__init__()
        self.reduction = _checks.legacy_reduction(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input, target):
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


class BradleyTerryLoss(_Loss):
    """``fusedloss.bradley_terry_loss`` as a module: a fixed ``margin`` (None or a number) here, or a per-pair
    margin tensor given to ``forward``."""

    def __init__(self, margin=None, reduction="mean"):
        super().__init__()
        self.margin, self.reduction = margin, reduction

    def forward(self, chosen_rewards, rejected_rewards, margin=None):
        return bradley_terry_loss(chosen_rewards, rejected_rewards, self.margin if margin is None else margin,
                                  reduction=self.reduction)


class TripletMarginLoss(_Loss):
    """``fusedloss.triplet_margin_loss`` as a module, with torch's constructor."""

    def __init__(self, margin=1.0, p=2.0, eps=1e-6, swap=False, size_average=None, reduce=None, reduction="mean"):
        super().__init__()
        self.margin, self.p, self.eps, self.swap = margin, p, eps, swap
        self.reduction = _checks.legacy_reduction(size_average, reduce, reduction)

    def forward(self, anchor, positive, negative):
        return triplet_margin_loss(anchor, positive, negative, margin=self.margin, p=self.p, eps=self.eps,
                                   swap=self.swap, reduction=self.reduction)


class BatchHardTripletLoss(_Loss):
    """``fusedloss.batch_hard_triplet_loss`` as a module: ``forward(embeddings (B, d), labels (B,))``."""

    def __init__(self, margin=1.0, *, soft_margin=False, reduction="mean"):
        super().__init__()
        self.margin, self.soft_margin, self.reduction = margin, soft_margin, reduction

    def forward(self, embeddings, labels):
        return batch_hard_triplet_loss(embeddings, labels, self.margin, soft_margin=self.soft_margin,
                                       reduction=self.reduction)


class DistillationKLDivLoss(_Loss):
    """``fusedloss.kl_div_with_logits`` as a module: ``forward(student_logits, teacher_logits, target=None)``,
    ``target`` masking rows equal to ``ignore_index``."""

    def __init__(self, temperature=1.0, *, ignore_index=-100, reduction="batchmean"):
        super().__init__()
        self.temperature, self.ignore_index, self.reduction = temperature, ignore_index, reduction

    def forward(self, student_logits, teacher_logits, target=None):
        return kl_div_with_logits(student_logits, teacher_logits, self.temperature, target=target,
                                  ignore_index=self.ignore_index, reduction=self.reduction)


__all__ = sorted(name for name, obj in list(globals().items())
                 if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj.__module__ == __name__
                 and not name.startswith("_"))
