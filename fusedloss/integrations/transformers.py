"""Hugging Face transformers: a causal LM that computes its training loss with ``fusedloss.linear_cross_entropy``.

``patch_causal_lm(model)`` rebinds, on that instance (never on the class), ``model.forward``, the output
embedding's ``forward`` and ``model.loss_function``, once. A forward with ``labels`` then runs the model's own
forward with a capture active for the calling thread (thread-local state, which ``torch.compile`` traces; nothing
is swapped per call, so concurrent forwards in threads and compiled forwards see the same objects):

- the output embedding (``model.get_output_embeddings()``, an ``nn.Linear``) records the hidden states it receives,
  ``(batch, seq, hidden)``, and returns an empty ``(batch, seq, 0)`` tensor instead of the ``(batch, seq, vocab)``
  logits, so whatever the forward does with the logits afterwards (Gemma 2's soft-cap) costs nothing;
- ``model.loss_function`` (transformers' ``ForCausalLMLoss`` for every causal LM) computes the fused loss of those
  hidden states against the head's weight and bias, called exactly as the forward calls its own loss, so the
  keyword arguments that reach the loss (``num_items_in_batch``, ``shift_labels``, ``ignore_index``) are the ones
  the model's loss would see, and whatever the forward adds to the loss afterwards (a mixture-of-experts router's
  auxiliary loss) is still added.

Without a capture (a forward without labels, or the head called from elsewhere) both stand-ins are the originals.

Everything else (decoder, cache, ``output_hidden_states``, the output class) is the model's own code, which is why
the decoder needs no locating: this works for any decoder-only model whose forward computes ``logits =
get_output_embeddings()(hidden_states)``, optionally soft-caps them by ``config.final_logit_softcapping``, and
passes them to ``self.loss_function``. Models that change the logits in other ways are refused by name (see
``_LOGIT_TRANSFORMS``); a forward that does not call the head and the loss function once each raises.
"""

import dataclasses
import inspect
import threading
import types

import torch

try:
    import transformers
    from transformers.loss.loss_utils import ForCausalLMLoss
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fusedloss.integrations.transformers needs transformers: "
                      "pip install 'fusedloss[transformers]'") from e

from .. import linear_cross_entropy

__all__ = ["for_causal_lm_loss", "patch_causal_lm", "unpatch_causal_lm"]

_PATCH_ATTR = "_fusedloss_patch"
_HEAD_FORWARD_ATTR = "_fusedloss_head_forward"  # on the head: its instance-level forward before the patch, if any

# The labelled forward in progress on this thread (a _Capture), or None.
_active = threading.local()

# linear_cross_entropy's arguments that the integration sets itself, from the forward's arguments (ignore_index,
# the shift, the reduction that num_items_in_batch implies) or the model's config (softcap). The others pass through.
_OWNED_OPTIONS = ("ignore_index", "reduction", "softcap", "shift", "return_lse")

# Config attributes of families whose forward transforms the logits after the output embedding, or adds a loss term
# computed from the logits, in a way the fused loss does not reproduce; refused unless they hold the identity.
_LOGIT_TRANSFORMS = {
    "logit_scale": (1.0, "Cohere multiplies the logits by it"),
    "logits_scaling": (1.0, "Granite divides the logits by it"),
    "output_multiplier": (1.0, "the logits are multiplied by it"),
    "output_logit_soft_cap": (None, "xLSTM soft-caps the logits with it"),
    "z_loss_coefficient": (0.0, "Bamba adds a z-loss computed from the logits"),
}


@dataclasses.dataclass
class _Patch:
    """What ``patch_causal_lm`` keeps on the model: the options for ``linear_cross_entropy``, the forward bound on
    the instance before (``None``: the class's), and where ``labels`` sits among the forward's positional
    arguments."""

    loss_options: dict
    instance_forward: object
    labels_position: int


def patch_causal_lm(model, **loss_options):
    """Make ``model(..., labels=labels)`` compute its loss without the ``(tokens, vocab)`` logits.

    Patches this instance only: ``model.forward`` is rebound; the class, other instances, the parameters and the
    state dict are untouched. A forward with ``labels`` returns ``loss`` and ``logits=None``; the loss has the
    semantics of the model's own (transformers' ``ForCausalLMLoss``): position ``t`` predicts ``labels[:, t + 1]``,
    ``-100`` (or the forward's ``ignore_index``) is ignored, ``shift_labels`` replaces the shifted ``labels``,
    ``num_items_in_batch`` turns the mean into ``sum / num_items_in_batch`` (the Trainer's gradient accumulation),
    ``config.final_logit_softcapping`` (Gemma 2) soft-caps the logits, and the loss is fp32. A tied output embedding
    is the input embedding's tensor, so its gradient accumulates both uses as unpatched. Under ``torch.autocast``
    the hidden states, weight and bias are cast to the autocast dtype, as ``F.linear`` would cast them. Without
    ``labels`` the forward is the model's own, logits included. ``transformers.Trainer`` trains a patched model
    unchanged; leave ``TrainingArguments.label_smoothing_factor`` at 0 (the Trainer would smooth the absent
    logits) and pass ``label_smoothing`` here instead.

    Args:
        model: a decoder-only ``transformers.PreTrainedModel`` with labels (``LlamaForCausalLM``,
            ``GPT2LMHeadModel``, ...): its ``get_output_embeddings()`` is an ``nn.Linear`` ``(vocab, hidden)``, with
            or without bias, of the hidden states' dtype.
        **loss_options: keyword arguments of ``fusedloss.linear_cross_entropy`` other than those the model
            determines (``ignore_index``, ``reduction``, ``softcap``, ``shift``, ``return_lse``):
            ``label_smoothing``, ``z_loss``, ``focal_gamma``, ``input_precision``. Their values are checked at the
            first forward with labels.

    Returns:
        ``model``, patched in place. Patching a patched model replaces its options; ``unpatch_causal_lm`` undoes it.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``, its forward takes no ``labels``, its output embedding is
            not an ``nn.Linear``, or an option is not one of the above.
        ValueError: an encoder-decoder model, a loss function other than ``ForCausalLMLoss``, or a config that
            transforms the logits in a way the fused loss does not reproduce (Cohere's ``logit_scale``, Granite's
            ``logits_scaling``, ...).
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    _output_linear(model)
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; only decoder-only causal LMs can be patched")
    _check_loss_function(model)
    text_config = model.config.get_text_config(decoder=True)
    for attr, (identity, what) in _LOGIT_TRANSFORMS.items():
        value = getattr(text_config, attr, identity)
        if value != identity:
            raise ValueError(f"cannot patch {name}: config.{attr}={value!r} ({what}), which the fused loss does not "
                             "reproduce")
    allowed = [p for p, v in inspect.signature(linear_cross_entropy).parameters.items()
               if v.kind is inspect.Parameter.KEYWORD_ONLY and p not in _OWNED_OPTIONS]
    for key in loss_options:
        if key in _OWNED_OPTIONS:
            raise TypeError(f"loss option {key!r} is set by the model (forward arguments and config), not by "
                            "patch_causal_lm")
        if key not in allowed:
            raise TypeError(f"unknown loss option {key!r}; linear_cross_entropy takes {', '.join(allowed)}")
    signature = inspect.signature(model.forward)  # a patched forward carries the original's signature
    params = list(signature.parameters.values())
    names = [p.name for p in params]
    if "labels" not in names:
        raise TypeError(f"cannot patch {name}: its forward takes no labels argument")

    if _PATCH_ATTR in model.__dict__:  # only once every check passed: a refused re-patch keeps the old one
        unpatch_causal_lm(model)
    model.__dict__[_PATCH_ATTR] = _Patch(dict(loss_options), model.__dict__.get("forward"), names.index("labels"))
    # The stand-ins are bound methods, not closures over model: copy.deepcopy rebinds them to the copy.
    head = _output_linear(model)
    if "forward" in head.__dict__:
        head.__dict__[_HEAD_FORWARD_ATTR] = head.__dict__["forward"]
    head.forward = types.MethodType(_head_forward, head)
    model.loss_function = types.MethodType(_loss_function, model)  # transformers' setter: an instance attribute

    def forward(self, *args, **kwargs):
        return _fused_forward(self, *args, **kwargs)

    # The original signature (Trainer keeps the dataset columns it names, and passes num_items_in_batch because it
    # has **kwargs); a MethodType's signature drops this leading self.
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_param, *params])
    forward.__doc__ = f"{name}.forward; with labels, the loss is fusedloss.linear_cross_entropy's and logits is None."
    model.forward = types.MethodType(forward, model)
    return model


def unpatch_causal_lm(model):
    """Undo ``patch_causal_lm``: the instance's forward becomes what it was before. Returns ``model``.

    Raises:
        ValueError: ``model`` is not patched.
    """
    patch = model.__dict__.get(_PATCH_ATTR)
    if patch is None:
        raise ValueError(f"{type(model).__name__} is not patched by patch_causal_lm")
    del model.__dict__[_PATCH_ATTR]
    del model.forward
    if patch.instance_forward is not None:
        model.forward = patch.instance_forward
    del model._loss_function
    head = _output_linear(model)
    del head.forward
    if _HEAD_FORWARD_ATTR in head.__dict__:
        head.forward = head.__dict__.pop(_HEAD_FORWARD_ATTR)
    return model


def _output_linear(model):
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"cannot patch {type(model).__name__}: its output embedding (get_output_embeddings()) must be "
                        f"an nn.Linear, got {type(head).__name__}")
    return head


def _check_loss_function(model):
    loss_function = model.loss_function
    if getattr(loss_function, "__func__", None) is _loss_function and loss_function.__self__ is model:
        return  # this model's stand-in (a re-patch)
    if loss_function is not ForCausalLMLoss:
        raise ValueError(f"cannot patch {type(model).__name__}: its loss function is "
                         f"{getattr(loss_function, '__name__', loss_function)!r}, not ForCausalLMLoss")


def _fused_forward(model, *args, **kwargs):
    patch = model.__dict__[_PATCH_ATTR]
    # (the class's forward called with model, not a MethodType built here, which Dynamo cannot trace)
    original = patch.instance_forward or (lambda *a, **k: type(model).forward(model, *a, **k))
    if len(args) > patch.labels_position:
        labels = args[patch.labels_position]
    else:
        labels = kwargs.get("labels")
    if labels is None:
        return original(*args, **kwargs)

    _check_loss_function(model)  # a loss function set after patching would be silently bypassed otherwise
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    capture = _Capture(model, patch.loss_options)
    outer = getattr(_active, "capture", None)
    _active.capture = capture
    try:
        out = original(*args, return_dict=True, **kwargs)
    finally:
        _active.capture = outer
    if capture.loss_calls != 1:
        raise RuntimeError(f"{type(model).__name__}'s forward called model.loss_function {capture.loss_calls} times "
                           "with labels (once expected); it cannot be patched")
    if not isinstance(out, transformers.utils.ModelOutput):
        raise TypeError(f"{type(model).__name__}'s forward returned {type(out).__name__}, not a ModelOutput")
    # Rebuilt without the placeholder logits: a ModelOutput keeps a field's stale mapping entry when it is set to
    # None, and refuses deletion.
    out = type(out)(**{k: v for k, v in out.items() if k != "logits"})
    return out if return_dict else out.to_tuple()


def _head_forward(head, hidden):
    """The output embedding's forward: the capture's placeholder during a labelled forward of its model, the head's
    own forward otherwise."""
    capture = getattr(_active, "capture", None)
    if capture is not None and capture.head is head:
        return capture.head_forward(hidden)
    own = head.__dict__.get(_HEAD_FORWARD_ATTR)
    return own(hidden) if own is not None else type(head).forward(head, hidden)


def _loss_function(model, logits, labels, vocab_size, **kwargs):
    """The model's loss function: the fused loss during a labelled forward of this model, ForCausalLMLoss
    otherwise (a caller with real logits)."""
    capture = getattr(_active, "capture", None)
    if capture is not None and capture.model is model:
        return capture.loss_function(logits, labels, vocab_size, **kwargs)
    return ForCausalLMLoss(logits, labels, vocab_size, **kwargs)


class _Capture:
    """One labelled forward: the head's stand-in forward records the hidden states; the loss function's stand-in
    computes the fused loss from them."""

    def __init__(self, model, loss_options):
        self.model = model
        self.head = _output_linear(model)
        self.loss_options = loss_options
        self.softcap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
        self.hidden = None
        self.loss_calls = 0

    def head_forward(self, hidden):
        """(..., H) -> (..., 0): the logits' leading shape and dtype, no storage."""
        if self.hidden is not None:
            raise RuntimeError(f"{type(self.model).__name__}'s forward calls its output embedding more than once; "
                               "it cannot be patched")
        self.hidden = hidden
        return hidden.new_empty((*hidden.shape[:-1], 0))

    def loss_function(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        """ForCausalLMLoss's signature and semantics (its other keyword arguments, the forward's, are unused by it
        too); ``logits`` is the head's placeholder after whatever the forward applied to it."""
        self.loss_calls += 1
        name = type(self.model).__name__
        if self.hidden is None or logits.shape[-1] != 0:
            raise RuntimeError(f"{name}'s forward computed the logits without calling its output embedding; it "
                               "cannot be patched")
        weight, bias = self.head.weight, self.head.bias
        if weight.shape[0] != vocab_size:
            raise ValueError(f"cannot patch {name}: its loss takes {vocab_size} classes but the output embedding has "
                             f"{weight.shape[0]}")
        # On the head's device, where a model split across devices (accelerate's hook on the head, which the
        # stand-in replaces) would have moved them.
        hidden = self.hidden.to(weight.device)
        target = labels if shift_labels is None else shift_labels
        target = target.to(weight.device)
        if tuple(target.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"{'labels' if shift_labels is None else 'shift_labels'} of shape {tuple(target.shape)} "
                             f"do not match the positions the head received {tuple(hidden.shape[:-1])} (a "
                             "logits_to_keep that drops positions cannot be combined with labels)")
        return _causal_lm_loss(hidden, weight, target, bias, num_items_in_batch, ignore_index, shift_labels is None,
                               self.softcap, self.loss_options)


def for_causal_lm_loss(hidden_states, lm_head_weight, labels, hidden_size=None, num_items_in_batch=None,
                       ignore_index=-100, shift_labels=None, final_logit_softcapping=None, *, lm_head_bias=None,
                       **kwargs):
    """The causal-LM loss from the last hidden states and the LM head, with the keyword arguments of the kernel
    hub's ``ForCausalLMLoss`` replacements (the form Liger-Kernel registers there): transformers'
    ``ForCausalLMLoss(logits, labels, ...)`` of ``logits = hidden_states @ lm_head_weight.T (+ lm_head_bias)``,
    soft-capped by ``final_logit_softcapping``, without the logits. ``labels`` are shifted by one position unless
    ``shift_labels`` are given; ``num_items_in_batch`` turns the mean into a sum divided by it (gradient
    accumulation). ``hidden_size`` and the forward's other keyword arguments are accepted and unused, as
    ``ForCausalLMLoss`` ignores them. Returns the fp32 loss."""
    target = labels if shift_labels is None else shift_labels
    if tuple(target.shape) != tuple(hidden_states.shape[:-1]):
        raise ValueError(f"{'labels' if shift_labels is None else 'shift_labels'} of shape {tuple(target.shape)} do "
                         f"not match hidden_states {tuple(hidden_states.shape)}")
    return _causal_lm_loss(hidden_states, lm_head_weight, target.to(lm_head_weight.device), lm_head_bias,
                           num_items_in_batch, ignore_index, shift_labels is None, final_logit_softcapping, {})


def _causal_lm_loss(hidden, weight, target, bias, num_items_in_batch, ignore_index, shift, softcap, loss_options):
    """ForCausalLMLoss's value from the hidden states: its fp32 mean (or sum / num_items_in_batch)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # What autocast would do to F.linear(hidden, weight, bias); the loss then runs at its own precision.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    # ForCausalLMLoss upcasts the logits, so its loss is fp32 for a 16-bit model too. Autocast at the inputs' own
    # 16-bit dtype casts nothing and makes linear_cross_entropy return its fp32 value, as torch's autocast policy
    # for cross-entropy does, instead of rounding it to 16 bits.
    low_precision = hidden.dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(device_type, dtype=hidden.dtype if low_precision else None, enabled=low_precision):
        loss = linear_cross_entropy(
            hidden, weight, target, linear_bias=bias, ignore_index=ignore_index,
            reduction="mean" if num_items_in_batch is None else "sum", softcap=softcap, shift=shift,
            **loss_options)
    loss = loss.float()  # an fp32 model's loss is fp32 already: a no-op there
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
