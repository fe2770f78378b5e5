"""Binary losses on logits, elementwise: BCE-with-logits (with ``weight`` and ``pos_weight``) and the sigmoid focal
loss of RetinaNet (torchvision's ``sigmoid_focal_loss``), forward and gradient in one pass.

With ``ls(u) = log sigmoid(u) = min(u, 0) - log1p(exp(-|u|))`` and ``s = sigmoid(x)``, the formulas are torch's own
expressions (``binary_cross_entropy_with_logits`` and its two backward functions), so NaN and infinite inputs give
torch's NaNs and infinities, not those of an equivalent rearrangement:

    BCE:    loss = w ((1 - t) x - l ls(x)),                 l = (pos_weight - 1) t + 1
            dx   = w ((pos_weight t + 1 - t) s - pos_weight t)           (s - t without pos_weight)
            dt   = w (ls(-x) - pos_weight ls(x))                        (-x without pos_weight)

    focal:  ce = (1 - t) x - ls(x),  q = 1 - p_t = s (1 - t) + (1 - s) t,  M = q ** gamma,
            alpha_t = alpha t + (1 - alpha)(1 - t)  (1 when alpha < 0),   loss = alpha_t ce M
            dx = alpha_t M ((s - t) + gamma ce r (1 - 2t)),            r = s (1 - s) / q  in [0, 1]
            dt = alpha_t M (-x + gamma (ce / q) (1 - 2s)) + (2 alpha - 1) ce M

``dM/dx = gamma q ** (gamma - 1) s (1 - s) (1 - 2t)`` is written ``gamma M r (1 - 2t)``: since q >= min(s, 1 - s),
``r <= 1``, and the gradient stays finite for ``0 < gamma < 1`` where the naive power is inf at saturation. ``q``
sums the two sigmoids instead of subtracting ``p_t`` from 1, which keeps it accurate (and nonzero) where ``p_t``
rounds to 1.

Layouts (``kernels.pointwise``'s module docstring): ``input``, ``target``, ``weight``, ``pos_weight`` and a
per-element ``grad_scale`` are read through (row, column) strides of their broadcast to the input's shape, so a
per-class ``pos_weight``, an expanded (stride-0) weight or a transposed target are read in place, never past their
storage; outputs are contiguous.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import join_f64, log1p, math_dtype, split_f64, to_element_type
from ._launch import custom_launcher
from .configs import BINARY_BLOCK, BINARY_NUM_WARPS, BINARY_NUM_WARPS_FP64
from .operands import flat_offsets, launch_strides, load_operand, walkable


@triton.jit
def _binary_kernel(
    # pointers
    input_ptr, target_ptr, weight_ptr, pos_weight_ptr, grad_scale_ptr,
    loss_ptr, partial_ptr, grad_input_ptr, grad_target_ptr,
    # shapes
    numel, n_cols,
    # strides: (row, column) of each operand's broadcast view
    stride_input_r, stride_input_c, stride_target_r, stride_target_c, stride_weight_r, stride_weight_c,
    stride_pos_weight_r, stride_pos_weight_c, stride_scale_r, stride_scale_c,
    # constants
    gamma_hi, gamma_lo, alpha_hi, alpha_lo,
    BLOCK: tl.constexpr, FOCAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
    STRIDED: tl.constexpr, ONE_WEIGHT: tl.constexpr, ONE_POS_WEIGHT: tl.constexpr, ONE_SCALE: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    COMPUTE_INPUT_GRAD: tl.constexpr, COMPUTE_TARGET_GRAD: tl.constexpr, DTYPE: tl.constexpr,
):
    """Loss per element (``WRITE_LOSS``) or one partial sum per program (``WRITE_PARTIAL``), and the gradients
    times ``grad_scale`` (one element, or one per element). ``ONE_*``: that operand is one element, loaded once."""
    offs, mask, rows, cols = flat_offsets(numel, n_cols, BLOCK, STRIDED)
    x = load_operand(input_ptr, offs, rows, cols, mask, stride_input_r, stride_input_c, STRIDED, DTYPE)
    t = load_operand(target_ptr, offs, rows, cols, mask, stride_target_r, stride_target_c, STRIDED, DTYPE)
    e = tl.exp(-tl.abs(x))
    tail = log1p(e)  # log(1 + exp(-|x|))
    log_sig = tl.minimum(x, 0.0) - tail  # log sigmoid(x)
    sig = tl.where(x >= 0.0, 1.0, e) / (1.0 + e)  # sigmoid(x), without overflow
    if FOCAL:
        gamma = join_f64(gamma_hi, gamma_lo, DTYPE)
        alpha = join_f64(alpha_hi, alpha_lo, DTYPE)
        sig_neg = tl.where(x >= 0.0, e, 1.0) / (1.0 + e)  # sigmoid(-x) = 1 - s, without cancellation
        ce = (1.0 - t) * x - log_sig
        q = sig * (1.0 - t) + sig_neg * t
        positive = q > 0.0
        q_safe = tl.where(positive, q, 1.0)
        # q ** gamma; at q = 0 its limit (1 when gamma is 0), and NaN for a NaN q, as torch's pow
        m = tl.where(positive, tl.exp2(gamma * tl.log2(q_safe)), tl.where(gamma == 0.0, 1.0, q * 0.0))
        if alpha >= 0:
            alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
        else:
            alpha_t = tl.zeros([BLOCK], DTYPE) + 1.0
        loss = alpha_t * ce * m
        # The focal terms are 0 when gamma is (torch's pow backward returns zeros for a zero exponent, so a NaN or
        # infinite ce does not reach the gradients through them). Products are kept apart where torch's autograd
        # keeps them apart, so an infinite ce meets a zero sigmoid as inf * 0 = NaN there too.
        focal_x = tl.where(gamma == 0.0, 0.0, gamma * ce * tl.where(positive, sig * sig_neg / q_safe, 0.0))
        focal_t = tl.where(gamma == 0.0, 0.0, gamma * tl.where(positive, ce / q_safe, 0.0))
        dx = alpha_t * m * ((sig - t) + focal_x * (1.0 - 2.0 * t))
        dt = alpha_t * m * (-x + (focal_t * sig_neg - focal_t * sig))
        if alpha >= 0:
            ce_m = ce * m
            dt += alpha * ce_m - (1.0 - alpha) * ce_m
    else:
        if HAS_POS_WEIGHT:
            pw = load_operand(pos_weight_ptr, offs, rows, cols, mask, stride_pos_weight_r, stride_pos_weight_c,
                              STRIDED, DTYPE, ONE_POS_WEIGHT)
            loss = (1.0 - t) * x - log_sig * ((pw - 1.0) * t + 1.0)
            dx = (pw * t + 1.0 - t) * sig - pw * t
            dt = (tl.minimum(-x, 0.0) - tail) - log_sig * pw  # log sigmoid(-x) - pos_weight log sigmoid(x)
        else:
            loss = (1.0 - t) * x - log_sig
            dx = sig - t
            dt = -x
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
    if COMPUTE_INPUT_GRAD or COMPUTE_TARGET_GRAD:
        scale = load_operand(grad_scale_ptr, offs, rows, cols, mask, stride_scale_r, stride_scale_c, STRIDED, DTYPE,
                             ONE_SCALE)
        if COMPUTE_INPUT_GRAD:
            tl.store(grad_input_ptr + offs, to_element_type(dx * scale, grad_input_ptr), mask=mask)
        if COMPUTE_TARGET_GRAD:
            tl.store(grad_target_ptr + offs, to_element_type(dt * scale, grad_target_ptr), mask=mask)


def num_programs(numel):
    """The grid of ``_binary_kernel``, and so the length of its ``partial`` buffer."""
    return triton.cdiv(numel, BINARY_BLOCK)


@custom_launcher("binary_forward", mutates_args=("loss", "partial", "grad_input", "grad_target"))
def binary_forward(
    input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], pos_weight: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor], loss: Optional[torch.Tensor], partial: Optional[torch.Tensor],
    grad_input: Optional[torch.Tensor], grad_target: Optional[torch.Tensor], *, focal: bool, gamma: float,
    alpha: float,
) -> None:
    """Launch ``_binary_kernel`` over ``input``'s shape. ``target`` has that shape; ``weight``, ``pos_weight`` (BCE
    only) and ``grad_scale`` (one element or one per element) broadcast to it; every operand is read through its
    strides, or copied first where ``kernels.operands.operand_strides`` finds none. ``loss`` (per element) or
    ``partial`` (``num_programs(numel)`` sums in the compute dtype, fp64 when an operand is fp64) may be None; so
    may ``grad_input`` / ``grad_target`` (contiguous), which receive the gradients times ``grad_scale``.
    ``alpha < 0`` turns the focal loss's alpha weighting off."""
    shape = input.shape
    operands = [walkable(t, shape) for t in (input, target, weight, pos_weight, grad_scale)]
    strided, strides, ones = launch_strides(operands, shape)
    dtype = math_dtype(input, target, weight, pos_weight)
    _binary_kernel[(num_programs(shape.numel()),)](
        *operands,
        loss, partial, grad_input, grad_target,
        shape.numel(), shape[-1] if len(shape) else 1,
        *(stride for pair in strides for stride in pair),
        *split_f64(gamma), *split_f64(alpha),
        BLOCK=BINARY_BLOCK, FOCAL=focal, HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None,
        STRIDED=strided, ONE_WEIGHT=ones[2], ONE_POS_WEIGHT=ones[3], ONE_SCALE=ones[4],
        WRITE_LOSS=loss is not None, WRITE_PARTIAL=partial is not None,
        COMPUTE_INPUT_GRAD=grad_input is not None, COMPUTE_TARGET_GRAD=grad_target is not None,
        DTYPE=dtype, num_warps=BINARY_NUM_WARPS_FP64 if dtype == tl.float64 else BINARY_NUM_WARPS,
    )


def compile_variants():
    """Call the launcher on small CPU tensors (for ``bench/compile_report.py``, which records the launches instead of
    running them) in the combinations the host produces: each form of ``weight`` and ``pos_weight`` (absent, one
    element, full, per column: strided) in the fused and ``'none'`` modes, and in the backward (per-element
    ``grad_output``) and recompute (a reduced loss's second backward) modes for the usual ones; the focal loss in
    every mode, with and without the target's gradient; each dtype."""
    shape = (8, 16)
    # absent, one element, full (contiguous), per column (strided: a per-class pos_weight)
    broadcasts = (None, torch.ones(1), torch.ones(shape), torch.ones(16))

    def launch(dtype, *, focal=False, weight=None, pos_weight=None, mode="fused", target_grad=False):
        x = torch.zeros(shape, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        scale = torch.ones(shape if mode == "backward" else (), dtype=acc)  # "recompute": a reduced loss's
        loss = torch.zeros(shape, dtype=dtype) if mode == "none" else None
        partial = torch.zeros(num_programs(x.numel()), dtype=acc) if mode == "fused" else None
        grad = torch.zeros_like(x) if mode != "none" else None
        grad_target = torch.zeros_like(x) if target_grad else None
        binary_forward(x, x, weight, pos_weight, scale, loss, partial, grad, grad_target, focal=focal,
                       gamma=2.0, alpha=0.25)

    for weight in broadcasts:
        for pos_weight in broadcasts:
            for mode in ("fused", "none"):
                launch(torch.bfloat16, weight=weight, pos_weight=pos_weight, mode=mode)
    for weight, pos_weight in ((None, None), (broadcasts[2], broadcasts[3]), (None, broadcasts[1])):
        for mode in ("backward", "recompute"):
            launch(torch.bfloat16, weight=weight, pos_weight=pos_weight, mode=mode, target_grad=True)
    for mode in ("fused", "none", "backward", "recompute"):
        for target_grad in (False, True):
            if mode == "none" and target_grad:
                continue
            launch(torch.bfloat16, focal=True, mode=mode, target_grad=target_grad)
    for dtype in (torch.float16, torch.float32, torch.float64):
        launch(dtype)
        launch(dtype, focal=True)
        launch(dtype, pos_weight=broadcasts[3], mode="backward", target_grad=True)
