"""Pointwise losses of two operands, forward and gradients in one elementwise pass: MSE, L1, Huber, SmoothL1, the
Bradley-Terry reward loss, and torch's pointwise ``kl_div``.

Why one family: each of these reads ``input`` and ``target`` once, computes a per-element loss ``e`` and its two
partial derivatives, and either stores ``e`` (``reduction='none'``) or one partial sum per program; the kernel
body differs only in the formula, selected by the ``LOSS`` constexpr. Bradley-Terry belongs here because it is
a function of a difference like the regression losses: with ``u = chosen - rejected - margin`` it is
``softplus(-u)``.

Losses of the difference ``u = x - t`` (minus ``margin`` for Bradley-Terry), with ``de/du``; then
``de/dx = de/du`` and ``de/dt = de/dmargin = -de/du``:

    "mse"            e = u^2                                       de/du = 2u
    "l1"             e = |u|                                       de/du = sign(u)   (0 at u = 0 and at NaN, as torch)
    "huber"          e = u^2 / 2 if |u| < delta else delta (|u| - delta / 2)
                                                                   de/du = -delta if u <= -delta, delta if u >= delta,
                                                                           u otherwise
    "smooth_l1"      e = u^2 / (2 beta) if |u| < beta else |u| - beta / 2      (delta carries beta)
                                                                   de/du = -1 if u <= -beta, 1 if u >= beta, u / beta
    "bradley_terry"  e = softplus(-u) = -log sigmoid(u)            de/du = -sigmoid(-u)

The piecewise derivatives are torch's own comparisons (``huber_loss_backward``, ``smooth_l1_loss_backward``), not a
clamp: a NaN difference falls through both tests to ``u`` (or ``u / beta``) and its gradient is NaN, as in torch,
where ``max``/``min`` would return the finite bound. ``delta = inf`` (Huber) and ``beta = inf`` (SmoothL1) reach
the formulas as they are (``split_f64`` passes infinities through), which gives torch's limits.

torch's ``kl_div`` (``x`` log-probabilities), its ``xlogy(t, t) - t x`` and ``exp(t) (t - x)`` under autograd:

    "kl"             e = xlogy(t, t) - t x                         de/dx = -t,  de/dt = log t + 1 - x  (t in (0, inf))
    "kl_log_target"  e = exp(t) (t - x)                            de/dx = -exp(t),  de/dt = e + exp(t)

``de/dt`` of "kl" is NaN for ``t <= 0``, ``t = inf`` and NaN ``t``, and ``e`` is NaN for ``t < 0``, exactly as
torch's autograd of ``xlogy(t, t) - t * x`` gives (``t / t`` in xlogy's derivative is ``0 / 0`` at ``t = 0`` and
``inf / inf`` at ``t = inf``).

An optional elementwise ``weight`` multiplies ``e`` and its derivatives; ``de_w/dw = e``. Bytes per element:
read the operands once, write the gradients that autograd needs; no per-element buffer for ``mean``/``sum`` (one
partial sum per program of ``POINTWISE_BLOCK`` elements).
Operand layouts: ``kernels.operands``.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import join_f64, log1p, math_dtype, split_f64, to_element_type
from ._launch import custom_launcher
from .configs import POINTWISE_BLOCK, POINTWISE_NUM_WARPS, POINTWISE_NUM_WARPS_FP64
from .operands import flat_offsets, launch_strides, load_operand, matrix_shape, walkable

# The ``LOSS`` constexpr: the formula of the module docstring that a launch compiles.
LOSSES = ("mse", "l1", "huber", "smooth_l1", "bradley_terry", "kl", "kl_log_target")


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
        return loss, tl.where(u <= -delta, -delta, tl.where(u >= delta, delta, u))
    elif LOSS == "smooth_l1":
        a = tl.abs(u)
        loss = tl.where(a < delta, 0.5 * u * u / delta, a - 0.5 * delta)
        return loss, tl.where(u <= -delta, -1.0, tl.where(u >= delta, 1.0, u / delta))
    else:  # "bradley_terry": softplus(-u) = max(-u, 0) + log1p(exp(-|u|)), sigmoid(-u) without overflow
        e = tl.exp(-tl.abs(u))
        return tl.maximum(-u, 0.0) + log1p(e), -tl.where(u >= 0.0, e, 1.0) / (1.0 + e)


@triton.jit
def _pointwise_kernel(
    # pointers
    input_ptr, target_ptr, weight_ptr, margin_ptr, grad_scale_ptr,
    loss_ptr, partial_ptr, grad_input_ptr, grad_target_ptr, grad_weight_ptr, grad_margin_ptr,
    # shapes
    numel, n_cols,
    # strides: (row, column) of each operand's broadcast view (module docstring)
    stride_input_r, stride_input_c, stride_target_r, stride_target_c, stride_weight_r, stride_weight_c,
    stride_margin_r, stride_margin_c, stride_scale_r, stride_scale_c,
    # constants
    delta_hi, delta_lo, margin_hi, margin_lo,
    BLOCK: tl.constexpr, LOSS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_MARGIN_TENSOR: tl.constexpr,
    STRIDED: tl.constexpr, ONE_WEIGHT: tl.constexpr, ONE_MARGIN: tl.constexpr, ONE_SCALE: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    COMPUTE_INPUT_GRAD: tl.constexpr, COMPUTE_TARGET_GRAD: tl.constexpr, COMPUTE_WEIGHT_GRAD: tl.constexpr,
    COMPUTE_MARGIN_GRAD: tl.constexpr, DTYPE: tl.constexpr,
):
    """Loss per element (``WRITE_LOSS``) or one partial sum per program (``WRITE_PARTIAL``), and the gradients
    autograd needs times ``grad_scale`` (an operand like the others: one element, or one per element). ``ONE_*``:
    that operand is one element, loaded once."""
    offs, mask, rows, cols = flat_offsets(numel, n_cols, BLOCK, STRIDED)
    x = load_operand(input_ptr, offs, rows, cols, mask, stride_input_r, stride_input_c, STRIDED, DTYPE)
    t = load_operand(target_ptr, offs, rows, cols, mask, stride_target_r, stride_target_c, STRIDED, DTYPE)
    if LOSS == "kl":
        positive = t > 0.0
        log_t = tl.log(tl.where(positive, t, 1.0))
        nan = float("nan")
        loss = tl.where(positive, t * log_t, tl.where(t == 0.0, 0.0, nan)) - t * x
        dx = -t
        dt = tl.where(positive & (t < float("inf")), log_t + 1.0 - x, nan)
    elif LOSS == "kl_log_target":
        exp_t = tl.exp(t)
        loss = exp_t * (t - x)
        dx = -exp_t
        dt = loss + exp_t
    else:
        u = x - t
        if LOSS == "bradley_terry":
            if HAS_MARGIN_TENSOR:
                u -= load_operand(margin_ptr, offs, rows, cols, mask, stride_margin_r, stride_margin_c, STRIDED,
                                  DTYPE, ONE_MARGIN)
            else:
                u -= join_f64(margin_hi, margin_lo, DTYPE)
        loss, dx = _difference_loss(u, join_f64(delta_hi, delta_lo, DTYPE), LOSS)
        dt = -dx
    unweighted = loss
    if HAS_WEIGHT:
        w = load_operand(weight_ptr, offs, rows, cols, mask, stride_weight_r, stride_weight_c, STRIDED, DTYPE,
                         ONE_WEIGHT)
        loss *= w
        dx *= w
        dt *= w
    if WRITE_LOSS:
        tl.store(loss_ptr + offs, to_element_type(loss, loss_ptr), mask=mask)
    if WRITE_PARTIAL:
        tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, loss, 0.0), axis=0))
    if COMPUTE_INPUT_GRAD or COMPUTE_TARGET_GRAD or COMPUTE_WEIGHT_GRAD or COMPUTE_MARGIN_GRAD:
        scale = load_operand(grad_scale_ptr, offs, rows, cols, mask, stride_scale_r, stride_scale_c, STRIDED, DTYPE,
                             ONE_SCALE)
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


@custom_launcher("pointwise_forward",
                 mutates_args=("loss", "partial", "grad_input", "grad_target", "grad_weight", "grad_margin"))
def pointwise_forward(
    input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], margin: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor], loss: Optional[torch.Tensor], partial: Optional[torch.Tensor],
    grad_input: Optional[torch.Tensor], grad_target: Optional[torch.Tensor], grad_weight: Optional[torch.Tensor],
    grad_margin: Optional[torch.Tensor], *, kind: str, delta: float, margin_value: float,
) -> None:
    """Launch ``_pointwise_kernel`` over the broadcast shape of the operands.

    ``kind`` is one of ``LOSSES``. ``weight`` (elementwise) and ``margin`` (Bradley-Terry, elementwise;
    ``margin_value`` is the number used when it is None) may be None. Every operand, ``grad_scale`` included (one
    element or one per element), is read through its strides, or copied first where ``operands.operand_strides`` finds
    none. ``loss`` (per element, any float dtype) or ``partial`` (``num_programs(numel)`` sums in the compute
    dtype) may be None; so may each gradient buffer, which receives its gradient (for the broadcast shape) times
    ``grad_scale``. All outputs are contiguous of the broadcast shape.
    """
    shapes = {t.shape for t in (input, target, weight, margin, grad_scale) if t is not None}
    shape = shapes.pop() if len(shapes) == 1 else torch.broadcast_shapes(*shapes)
    numel = shape.numel()
    operands = [walkable(t, shape) for t in (input, target, weight, margin, grad_scale)]
    strided, strides, ones = launch_strides(operands, shape)
    dtype = math_dtype(input, target, weight, margin)
    _pointwise_kernel[(num_programs(numel),)](
        *operands,
        loss, partial, grad_input, grad_target, grad_weight, grad_margin,
        numel, matrix_shape(shape)[1],
        *(stride for pair in strides for stride in pair),
        *split_f64(delta), *split_f64(margin_value),
        BLOCK=POINTWISE_BLOCK, LOSS=kind, HAS_WEIGHT=weight is not None, HAS_MARGIN_TENSOR=margin is not None,
        STRIDED=strided, ONE_WEIGHT=ones[2], ONE_MARGIN=ones[3], ONE_SCALE=ones[4],
        WRITE_LOSS=loss is not None, WRITE_PARTIAL=partial is not None,
        COMPUTE_INPUT_GRAD=grad_input is not None, COMPUTE_TARGET_GRAD=grad_target is not None,
        COMPUTE_WEIGHT_GRAD=grad_weight is not None, COMPUTE_MARGIN_GRAD=grad_margin is not None,
        DTYPE=dtype, num_warps=POINTWISE_NUM_WARPS_FP64 if dtype == tl.float64 else POINTWISE_NUM_WARPS,
    )


def compile_variants():
    """Call the launcher on small CPU tensors (for ``bench/compile_report.py``, which records the launches instead of
    running them) in the combinations the host produces: every loss in its fused (mean/sum), ``'none'`` and
    backward (per-element ``grad_output``) modes with all its gradients, contiguous; with strided operands in its
    fused mode and, for one loss of each formula group, the others; the recompute mode (a reduced loss's second
    backward); each gradient alone or none; a one-element margin; integer targets; each dtype (fp64 strided and
    contiguous for every loss: its variants hold the most registers)."""
    shape = (8, 16)

    def launch(dtype, kind, *, mode="fused", strided=False, target_dtype=None, grads=None):
        weight = kind in ("mse", "l1", "huber", "smooth_l1")
        margin = kind == "bradley_terry"
        grads = ("input", "target", "weight" if weight else "margin" if margin else "") if grads is None else grads
        x = torch.zeros(shape, dtype=dtype)
        t = torch.zeros(shape[-1] if strided else shape, dtype=target_dtype or dtype)  # a per-column target
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        w = torch.ones(shape, dtype=dtype) if weight else None
        m = torch.zeros(() if mode == "one_margin" else shape, dtype=dtype) if margin else None
        scale = torch.ones(shape if mode == "backward" else (), dtype=acc)  # "recompute": a reduced loss's
        loss = torch.zeros(shape, dtype=dtype) if mode == "none" else None
        partial = torch.zeros(num_programs(x.numel()), dtype=acc) if mode in ("fused", "one_margin") else None
        buffers = {name: (torch.zeros(shape, dtype=dtype) if name in grads and mode != "none" else None)
                   for name in ("input", "target", "weight", "margin")}
        pointwise_forward(x, t, w, m, scale, loss, partial, buffers["input"], buffers["target"], buffers["weight"],
                          buffers["margin"], kind=kind, delta=1.0, margin_value=0.0)

    for kind in LOSSES:
        for mode in ("fused", "none", "backward"):
            launch(torch.bfloat16, kind, mode=mode)
        launch(torch.bfloat16, kind, strided=True)
        launch(torch.float64, kind)
        launch(torch.float64, kind, strided=True)
    for kind in ("mse", "bradley_terry", "kl"):
        for mode in ("none", "backward", "recompute"):
            launch(torch.bfloat16, kind, mode=mode, strided=mode != "recompute")
    launch(torch.bfloat16, "bradley_terry", mode="one_margin")
    for grads in ((), ("input",), ("target",)):
        launch(torch.bfloat16, "mse", grads=grads)
        launch(torch.bfloat16, "kl", grads=grads)
    for target_dtype in (torch.int64, torch.uint8, torch.bool):  # integer targets, no target gradient
        launch(torch.bfloat16, "mse", grads=("input",), target_dtype=target_dtype)
    for dtype in (torch.float16, torch.float32):
        launch(dtype, "mse")
