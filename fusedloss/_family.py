"""The host skeleton every loss family is built on (``docs/adding-a-loss.md`` walks one loss through it).

A call takes one of two paths, chosen by ``fusedloss.backend`` from the tensors' device:

- **torch**: the family's *definition*, the loss written in torch ops under ordinary autograd (ATen's fused
  kernels where they compute the same thing, e.g. ``F.cross_entropy``). Chunked through a ``LossFunction`` only
  where the point of the loss is memory (linear cross-entropy, the contrastive losses, batch-hard mining).
- **triton** / **triton-interpret**: the family's ``LossFunction`` subclass. Its forward allocates and runs the
  launchers of ``fusedloss.kernels`` (registered custom ops, so ``torch.compile`` sees one opaque call); the
  backward is ``backward`` below, shared by every family.

The backward contract, identical to a composition of torch ops:

- *Fused gradients.* Where the forward already wrote the gradient (``mean``/``sum``: the kernel reads each input
  once and writes the final gradient, divided by the mean's denominator), the first backward multiplies it by
  ``grad_output`` in place, with no pass at all when ``grad_output == 1`` (``scale_unless_one``), and hands it to
  autograd. The buffer is handed out once: a second backward through the same graph (``retain_graph=True``,
  ``torch.autograd.grad`` then ``backward()``, gradcheck) recomputes the gradient from the saved inputs, so it is
  never scaled twice and never aliased with a gradient the caller already holds. Under ``torch.compile`` the
  fused gradient is scaled out of place instead (a compiled backward may run twice on the same buffers).
- *Version check.* Inputs are saved with ``save_for_backward``; a path that reads them (the recompute) unpacks
  them, so an in-place edit between forward and backward raises as in torch. The fused path reads nothing: its
  gradient was computed from the inputs as they were at forward time, which is what torch's saved
  intermediates give too.
- *Higher order.* When the backward runs with grad mode on (``create_graph=True``, ``torch.func.grad``), the
  gradient is that of the family's definition, computed with ``create_graph=True`` from the saved inputs: the
  right higher-order gradient, at eager's memory cost, never a constant.
"""

import functools

import torch

from . import _alloc
from ._backend import backend, runs_definition

# torch's reduction enum (``torch.nn._reduction.get_enum``), the last argument of its ATen loss functions: the
# torch paths call those directly, as ``torch.nn.functional`` does
REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}


def compute_dtype(*tensors):
    """fp64 if any floating tensor is fp64, else fp32: the precision the kernels (and the torch paths) do math in."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def cast(t, dtype):
    """``t.to(dtype)`` without the call when it already has that dtype (a no-op ``to`` costs a microsecond, a
    tenth of a small loss's call on the torch backend)."""
    return t if t.dtype == dtype else t.to(dtype)


def inverse_or_zero(denominator):
    """``1 / denominator``, or 0 where it is 0 (every row ignored: torch's gradient is then 0), as a 0-d device
    tensor, without a host sync."""
    return torch.where(denominator == 0, torch.zeros_like(denominator), 1.0 / denominator)


def softplus(v):
    """log(1 + exp(v)) without F.softplus's linear cut-off above 20 (an fp64 error of 2e-9)."""
    return torch.logaddexp(v, v.new_zeros(()))  # (a broadcast 0-d zero: no second temporary of v's size)


def row_bands(n_rows, n_cols, elements):
    """(start, stop) of consecutive row bands of about ``elements`` entries of an ``n_rows x n_cols`` matrix (at
    least one row each): the torch engines' unit of work where the whole matrix would not fit."""
    step = max(1, elements // max(n_cols, 1))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def reduce(rows, reduction, denominator=None, shape=None):
    """Per-row losses (flat, compute dtype) -> the loss: ``'none'`` reshaped to ``shape``, ``'sum'``, or
    ``'mean'`` = sum / ``denominator`` (a 0-d tensor; NaN when it is 0, as torch's all-ignored mean)."""
    if reduction == "none":
        return rows.reshape(shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total * inverse_or_zero(denominator) + torch.where(denominator == 0, float("nan"), 0.0)


def grad_scale(grad_output, reduction, denominator=None):
    """What each row's gradient is multiplied by in a backward: ``grad_output`` per row (``'none'``, flat), or
    the 0-d ``grad_output`` (divided by the mean's ``denominator``, 0 when every row was ignored)."""
    if reduction == "none":
        return grad_output.reshape(-1)
    if reduction == "mean":
        return grad_output * inverse_or_zero(denominator)
    return grad_output


def fused_grad_scale(reduction, denominator, dtype, device):
    """The scale a fused forward writes its gradients with: ``1 / denominator`` for ``'mean'``, 1 for ``'sum'``."""
    if reduction == "mean":
        return inverse_or_zero(denominator.to(dtype))
    return torch.ones((), dtype=dtype, device=device)


class LossFunction(torch.autograd.Function):
    """Base of the loss families' ``autograd.Function``s (the Triton engines and the chunked torch engines).

    A subclass defines, as static methods (no ``ctx`` in forward: ``torch.func`` needs ``setup_context``):

    - ``forward(opts, needs, *inputs)``: ``opts`` the family's frozen options, ``needs`` one bool per tensor
      input (does it need a gradient; computed by ``needs_grad`` before the call), then the tensor inputs.
      Returns the differentiable outputs first, then whatever ``setup_context`` needs (fused gradients, state).
    - ``setup_context(ctx, inputs, output)``: calls ``save`` and marks the non-differentiable outputs.
    - ``backward(ctx, *grad_outputs)``: ``return backward(ctx, recompute, definition, grad_outputs)``, with the
      family's two functions (below).
    """


def dispatch(function, definition, opts, *tensors, empty=False):
    """A loss call on the path it takes: the family's ``definition(opts, *tensors)`` in torch ops on the torch
    backend, where ``runs_definition`` (torch.func transforms, meta and fake tensors) and for ``empty`` inputs
    (torch's NaN means and empty gradients); its ``LossFunction`` subclass ``function`` on the Triton backends. The
    first tensor decides (its device, its kind)."""
    first = tensors[0]
    if empty or runs_definition(first) or backend(first.device) == "torch":
        return definition(opts, *tensors)
    return function.apply(opts, needs_grad(*tensors), *tensors)[0]


def needs_grad(*tensors):
    """One bool per tensor (or None): will autograd ask for its gradient? Passed to ``LossFunction.forward``,
    which runs without ``ctx`` and so cannot read ``ctx.needs_input_grad``."""
    enabled = torch.is_grad_enabled()
    return tuple(bool(enabled and t is not None and t.requires_grad) for t in tensors)


def save(ctx, opts, needs, inputs, *, state=(), fused=None, keep_inputs=True, differentiable=1):
    """Record what every backward path needs.

    ``inputs``: the tensor inputs (None allowed), saved for the recompute and for higher-order gradients;
    ``keep_inputs=False`` when the forward overwrote one (``inplace_backward``): the only backward is then the
    fused one. ``state``: tensors the recompute reads (log-sum-exps, per-row coefficients). ``fused``: the
    gradients the forward wrote, one per input (None where not written), or None when nothing was fused.
    ``differentiable``: how many of the forward's outputs, first in its tuple, carry a gradient (the rest are
    state; under ``torch.compile`` their gradients arrive as zeros rather than None)."""
    ctx.set_materialize_grads(False)  # outputs without a gradient arrive as None, not as zeros
    ctx.save_for_backward(*(inputs if keep_inputs else (None,) * len(inputs)), *state)
    ctx.n_inputs = len(inputs)
    ctx.n_differentiable = differentiable
    ctx.kept_inputs = keep_inputs
    ctx.opts, ctx.needs = opts, needs
    ctx.fused = fused
    ctx.eager = not torch.compiler.is_compiling()


def backward(ctx, recompute, definition, grad_outputs):
    """The shared backward (module docstring). ``recompute(ctx, inputs, state, grad_outputs)`` returns one
    gradient per tensor input from the saved inputs and state; ``definition(opts, *inputs)`` returns the
    differentiable outputs in torch ops. Returns the gradients of ``forward``'s arguments (None for opts, needs)."""
    grad_outputs = grad_outputs[:ctx.n_differentiable]
    if all(g is None for g in grad_outputs):
        return (None,) * (2 + ctx.n_inputs)
    if torch.is_grad_enabled():
        return (None, None, *definition_grads(ctx, definition, grad_outputs))
    only_loss = all(g is None for g in grad_outputs[1:ctx.n_differentiable])
    if ctx.fused is not None and only_loss:
        fused = ctx.fused
        if ctx.eager:
            ctx.fused = None  # handed out once; a second backward recomputes
            return (None, None, *(None if g is None else scale_unless_one(g, grad_outputs[0]) for g in fused))
        return (None, None, *(None if g is None else g * grad_outputs[0].to(g.dtype) for g in fused))
    if not ctx.kept_inputs:
        raise RuntimeError("the forward ran with inplace_backward=True, which overwrote the input with its "
                           "gradient: the graph can be backpropagated through once (no retain_graph, no "
                           "gradient of the returned log-sum-exp)")
    saved = ctx.saved_tensors
    return (None, None, *recompute(ctx, saved[:ctx.n_inputs], saved[ctx.n_inputs:], grad_outputs))


def definition_grads(ctx, definition, grad_outputs):
    """The gradients of the saved inputs through ``definition`` (differentiable: higher-order gradients, and the
    outputs a family's recompute does not cover)."""
    if not ctx.kept_inputs:
        raise RuntimeError("higher-order gradients (create_graph=True, torch.func) need the input, which "
                           "inplace_backward=True overwrote with its gradient")
    inputs = ctx.saved_tensors[:ctx.n_inputs]
    with torch.enable_grad():
        outputs = definition(ctx.opts, *inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, g) for out, g in zip(outputs, grad_outputs) if g is not None]
        wanted = [t for t, need in zip(inputs, ctx.needs) if need]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True,
                                         allow_unused=True) if wanted and pairs else ())
    return [next(grads) if need else None for need in ctx.needs]


def scale_unless_one(grad, scale):
    """``grad`` times the 0-d ``scale``, in place; no pass when ``scale == 1`` (the kernel reads the scale on the
    device: no host sync). CPU tensors outside the interpreter read it on the host, where that is free."""
    if grad.numel() == 0:
        return grad
    if grad.device.type == "cpu" and not _interpreted():
        if float(scale) != 1.0:
            grad.mul_(scale.to(grad.dtype))
        return grad
    from .kernels._common import scale_unless_one as launch

    launch(grad, scale.contiguous())
    return grad


def _interpreted():
    return backend("cpu") == "triton-interpret"


def opaque_op(name, fake):
    """Register ``fn`` as the functional custom op ``fusedloss::<name>`` (fresh outputs, whose shapes ``fake``
    gives) and return a function that calls the op while ``torch.compile`` traces and ``fn`` itself otherwise (an
    eager call would only pay the dispatcher). Traced, ``fn``'s Python (launch arithmetic, the loop over bands) would
    specialize the graph to each batch size; as one opaque node its sizes stay symbolic and that Python runs on the
    concrete sizes when the graph runs."""

    def register(fn):
        op = torch.library.custom_op(f"fusedloss::{name}", mutates_args=())(fn)
        op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return (op if torch.compiler.is_compiling() else fn)(*args, **kwargs)

        return call

    return register


def empty(shape, *, dtype, device):
    """An output buffer for a kernel (poisoned with NaN under ``FUSEDLOSS_POISON=1``)."""
    return _alloc.empty(shape, dtype=dtype, device=device)
