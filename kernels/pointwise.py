"""Pointwise losses of two operands, forward and gradients in one elementwise pass: MSE, L1, Huber / SmoothL1,
the Bradley-Terry reward loss, and torch's pointwise ``kl_div``.

Why one family: each of these reads ``input`` and ``target`` once, computes a per-element loss ``e`` and its two
partial derivatives, and either stores ``e`` (``reduction='none'``) or one partial sum per program; the kernel
body differs only in the formula, selected by the ``LOSS`` constexpr. Bradley-Terry belongs here because it is
a function of a difference like the regression losses: with ``u = chosen - rejected - margin`` it is
``softplus(-u)``. A separate module for it would repeat the whole launch / partial-sum / fused-gradient
machinery for a three-line formula.

Losses of the difference ``u = x - t`` (minus ``margin`` for Bradley-Terry), with ``de/du``; then
``de/dx = de/du`` and ``de/dt = de/dmargin = -de/du``:

    "mse"            e = u^2                                     de/du = 2u
    "l1"             e = |u|                                     de/du = sign(u)    (0 at u = 0, as torch)
    "huber"          e = u^2 / 2 if |u| < delta else delta (|u| - delta / 2)
                                                                 de/du = clamp(u, -delta, delta)
    "bradley_terry"  e = softplus(-u) = -log sigmoid(u)          de/du = -sigmoid(-u)

all times ``loss_scale``, which is 1 except for SmoothL1(beta) = huber(delta=beta) / beta (torch's formula up
to rounding) and for the limits of an infinite threshold, huber(delta=inf) = mse / 2 and smooth_l1(beta=inf)
= 0, which the host sends as "mse" with scale 1/2 and 0 (an infinite delta would not survive ``split_f64``).

torch's ``kl_div`` (``x`` log-probabilities):

    "kl"             e = xlogy(t, t) - t x                       de/dx = -t,  de/dt = log t + 1 - x
    "kl_log_target"  e = exp(t) (t - x)                          de/dx = -exp(t),  de/dt = e + exp(t)

``de/dt`` of "kl" is NaN for ``t <= 0`` and ``e`` is NaN for ``t < 0``, exactly as torch's autograd of
``xlogy(t, t) - t * x`` gives (``0 / 0`` in xlogy's derivative at ``t = 0``).

An optional elementwise ``weight`` multiplies ``e`` and its derivatives; ``de_w/dw = e``. Bytes per element:
read input + target (+ weight), write the gradients that autograd needs; no per-element fp32 buffer for
``mean``/``sum`` (one partial sum per program of ``POINTWISE_BLOCK`` elements).
"""

import triton
import triton.language as tl

from ._common import join_f64, log1p, split_f64, to_element_type
from .configs import POINTWISE_BLOCK, POINTWISE_NUM_WARPS

# The ``LOSS`` constexpr: the formula of the module docstring that a launch compiles.
LOSSES = ("mse", "l1", "huber", "bradley_terry", "kl", "kl_log_target")


@triton.jit
def _difference_loss(u, delta, LOSS: tl.constexpr):
    """(e, de/du) of the losses that depend on the difference u only (module docstring)."""
    if LOSS == "mse":
        return u * u, 2.0 * u
    elif LOSS == "l1":
        return tl.abs(u), tl.where(u > 0.0, 1.0, tl.where(u < 0.0, -1.0, 0.0)).to(u.dtype)
    elif LOSS == "huber":
        a = tl.abs(u)
        loss = tl.where(a < delta, 0.5 * u * u, delta * (a - 0.5 * delta))
        return loss, tl.minimum(tl.maximum(u, -delta), delta)
    else:  # "bradley_terry": softplus(-u) = max(-u, 0) + log1p(exp(-|u|)), sigmoid(-u) without overflow
        e = tl.exp(-tl.abs(u))
        return tl.maximum(-u, 0.0) + log1p(e), -tl.where(u >= 0.0, e, 1.0) / (1.0 + e)


@triton.jit
def _pointwise_kernel(
    # pointers
    input_ptr, target_ptr, weight_ptr, margin_ptr, grad_scale_ptr,
    loss_ptr, partial_ptr, grad_input_ptr, grad_target_ptr, grad_weight_ptr, grad_margin_ptr,
    # shapes
    numel,
    # constants
    delta_hi, delta_lo, loss_scale_hi, loss_scale_lo, margin_hi, margin_lo,
    BLOCK: tl.constexpr, LOSS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_MARGIN_TENSOR: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, SCALE_PER_ELEMENT: tl.constexpr,
    COMPUTE_INPUT_GRAD: tl.constexpr, COMPUTE_TARGET_GRAD: tl.constexpr, COMPUTE_WEIGHT_GRAD: tl.constexpr,
    COMPUTE_MARGIN_GRAD: tl.constexpr, DTYPE: tl.constexpr,
):
    """Loss per element (``WRITE_LOSS``) or one partial sum per program (``WRITE_PARTIAL``), and the gradients
    autograd needs times ``grad_scale`` (a scalar, or one value per element with ``SCALE_PER_ELEMENT``). All
    operands are contiguous and of one shape (the host materializes broadcasts)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(input_ptr + offs, mask=mask, other=0.0).to(DTYPE)
    t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(DTYPE)
    if LOSS == "kl":
        positive = t > 0.0
        log_t = tl.log(tl.where(positive, t, 1.0))
        nan = float("nan")
        loss = tl.where(positive, t * log_t, tl.where(t == 0.0, 0.0, nan)) - t * x
        dx = -t
        dt = tl.where(positive, log_t + 1.0 - x, nan)
    elif LOSS == "kl_log_target":
        exp_t = tl.exp(t)
        loss = exp_t * (t - x)
        dx = -exp_t
        dt = loss + exp_t
    else:
        u = x - t
        if LOSS == "bradley_terry":
            if HAS_MARGIN_TENSOR:
                u -= tl.load(margin_ptr + offs, mask=mask, other=0.0).to(DTYPE)
            else:
                u -= join_f64(margin_hi, margin_lo, DTYPE)
        loss, dx = _difference_loss(u, join_f64(delta_hi, delta_lo, DTYPE), LOSS)
        loss_scale = join_f64(loss_scale_hi, loss_scale_lo, DTYPE)
        loss *= loss_scale
        dx *= loss_scale
        dt = -dx
    unweighted = loss
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(DTYPE)
        loss *= w
        dx *= w
        dt *= w
    if WRITE_LOSS:
        tl.store(loss_ptr + offs, to_element_type(loss, loss_ptr), mask=mask)
    if WRITE_PARTIAL:
        tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, loss, 0.0), axis=0))
    if COMPUTE_INPUT_GRAD or COMPUTE_TARGET_GRAD or COMPUTE_WEIGHT_GRAD or COMPUTE_MARGIN_GRAD:
        if SCALE_PER_ELEMENT:
            scale = tl.load(grad_scale_ptr + offs, mask=mask, other=0.0).to(DTYPE)
        else:
            scale = tl.load(grad_scale_ptr).to(DTYPE)
        if COMPUTE_INPUT_GRAD:
            tl.store(grad_input_ptr + offs, to_element_type(dx * scale, grad_input_ptr), mask=mask)
        if COMPUTE_TARGET_GRAD:
            tl.store(grad_target_ptr + offs, to_element_type(dt * scale, grad_target_ptr), mask=mask)
        if COMPUTE_WEIGHT_GRAD:
            tl.store(grad_weight_ptr + offs, to_element_type(unweighted * scale, grad_weight_ptr), mask=mask)
        if COMPUTE_MARGIN_GRAD:
            tl.store(grad_margin_ptr + offs, to_element_type(dt * scale, grad_margin_ptr), mask=mask)


def num_programs(numel):
    """The grid of ``_pointwise_kernel``, and so the length of its ``partial`` buffer."""
    return triton.cdiv(numel, POINTWISE_BLOCK)


def pointwise_forward(input, target, weight, margin, grad_scale, loss, partial, grad_input, grad_target,
                      grad_weight, grad_margin, *, kind, delta=1.0, loss_scale=1.0, margin_value=0.0):
    """Launch ``_pointwise_kernel`` over contiguous operands of one shape.

    ``kind`` is one of ``LOSSES``. ``weight`` (elementwise) and ``margin`` (Bradley-Terry, elementwise;
    ``margin_value`` is the scalar used when it is None) may be None. ``loss`` (per element, any float dtype) or
    ``partial`` (``num_programs(numel)`` sums in the compute dtype) may be None; so may each gradient buffer,
    which receives its gradient times ``grad_scale`` (0-d, or the operands' shape). The compute dtype is fp64
    when any operand is fp64, fp32 otherwise.
    """
    numel = input.numel()
    floats = [t for t in (input, target, weight, margin) if t is not None and t.is_floating_point()]
    dtype = tl.float64 if any(t.dtype.itemsize == 8 for t in floats) else tl.float32
    _pointwise_kernel[(num_programs(numel),)](
        input, target, weight, margin, grad_scale,
        loss, partial, grad_input, grad_target, grad_weight, grad_margin,
        numel,
        *split_f64(delta), *split_f64(loss_scale), *split_f64(margin_value),
        BLOCK=POINTWISE_BLOCK, LOSS=kind, HAS_WEIGHT=weight is not None,
        HAS_MARGIN_TENSOR=margin is not None,
        WRITE_LOSS=loss is not None, WRITE_PARTIAL=partial is not None,
        SCALE_PER_ELEMENT=grad_scale is not None and grad_scale.dim() > 0,
        COMPUTE_INPUT_GRAD=grad_input is not None, COMPUTE_TARGET_GRAD=grad_target is not None,
        COMPUTE_WEIGHT_GRAD=grad_weight is not None, COMPUTE_MARGIN_GRAD=grad_margin is not None,
        DTYPE=dtype,
        num_warps=POINTWISE_NUM_WARPS,
    )


def compile_variants():
    """Call the launcher once per constexpr combination the host produces, on small CPU tensors (for
    ``bench/compile_report.py``, which records the launches instead of running them): every loss in its fused
    (mean/sum), ``'none'`` and backward modes with all its gradients, each gradient alone or none, integer
    targets, and each dtype."""
    import torch

    shape = (8, 16)

    def launch(dtype, kind, *, mode="fused", grads=("input", "target"), weight=False, margin=False,
               target_dtype=None):
        x = torch.zeros(shape, dtype=dtype)
        t = torch.zeros(shape, dtype=target_dtype or dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        w = torch.ones(shape, dtype=dtype) if weight else None
        m = torch.zeros(shape, dtype=dtype) if margin else None
        scale = torch.ones(shape if mode == "backward" else (), dtype=acc)
        loss = torch.zeros(shape, dtype=dtype) if mode == "none" else None
        partial = torch.zeros(num_programs(x.numel()), dtype=acc) if mode == "fused" else None
        buffers = {name: (torch.zeros(shape, dtype=dtype) if name in grads and mode != "none" else None)
                   for name in ("input", "target", "weight", "margin")}
        pointwise_forward(x, t, w, m, scale, loss, partial, buffers["input"], buffers["target"], buffers["weight"],
                          buffers["margin"], kind=kind, delta=1.0, loss_scale=1.0)

    for kind in ("mse", "l1", "huber"):
        for weight in (False, True):
            grads = ("input", "target", "weight") if weight else ("input", "target")
            for mode in ("fused", "none", "backward"):
                launch(torch.bfloat16, kind, mode=mode, grads=grads, weight=weight)
    for margin in (False, True):
        grads = ("input", "target", "margin") if margin else ("input", "target")
        for mode in ("fused", "none", "backward"):
            launch(torch.bfloat16, "bradley_terry", mode=mode, grads=grads, margin=margin)
    for kind in ("kl", "kl_log_target"):
        for mode in ("fused", "none", "backward"):
            launch(torch.bfloat16, kind, mode=mode)
    for grads in ((), ("input",), ("target",)):
        launch(torch.bfloat16, "mse", grads=grads)
        launch(torch.bfloat16, "kl", grads=grads)
    launch(torch.bfloat16, "mse", grads=("input",), target_dtype=torch.long)  # integer targets
    for dtype in (torch.float16, torch.float32):
        launch(dtype, "mse")
    for kind in LOSSES:
        launch(torch.float64, kind)
