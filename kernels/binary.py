"""Binary losses on logits, elementwise: BCE-with-logits (with ``weight`` and ``pos_weight``) and the sigmoid focal
loss of RetinaNet (torchvision's ``sigmoid_focal_loss``), forward and gradient in one pass.

With ``sp(u) = log(1 + exp(u))`` (computed as ``max(u, 0) + log1p(exp(-|u|))``), ``s = sigmoid(x)``:

    BCE:    loss = w * ((1 - t) x + l * sp(-x)),  l = 1 + (pos_weight - 1) t
            dx   = w * ((1 - t) - l * sigmoid(-x)),    dt = w * (-x + (pos_weight - 1) sp(-x))

    focal:  ce = sp(x) - t x,  q = 1 - p_t = s (1 - t) + (1 - s) t,  M = q ** gamma,
            alpha_t = alpha t + (1 - alpha)(1 - t)  (1 when alpha < 0),   loss = alpha_t ce M
            dx = alpha_t M ((s - t) + gamma ce r (1 - 2t)),            r = s (1 - s) / q  in [0, 1]
            dt = alpha_t M (-x + gamma (ce / q) (1 - 2s)) + (2 alpha - 1) ce M

``dM/dx = gamma q ** (gamma - 1) s (1 - s) (1 - 2t)`` is written ``gamma M r (1 - 2t)``: since q >= min(s, 1 - s),
``r <= 1``, and the gradient stays finite for ``0 < gamma < 1`` where the naive power is inf at saturation.

Broadcast ``weight`` / ``pos_weight`` arrive in one of four modes (``BCAST_*``): absent, a scalar, a vector along
the last dimension (index ``offset % length``, the usual per-class ``pos_weight``), or a full tensor of the input's
shape; the host materializes any other broadcast.
"""

import triton
import triton.language as tl

from ._common import join_f64, log1p, split_f64
from .configs import BINARY_BLOCK, BINARY_NUM_WARPS

BCAST_NONE, BCAST_SCALAR, BCAST_LAST, BCAST_FULL = 0, 1, 2, 3


@triton.jit
def _load_broadcast(ptr, offs, mask, length, MODE: tl.constexpr, DTYPE: tl.constexpr):
    if MODE == 1:
        return tl.load(ptr).to(DTYPE)
    elif MODE == 2:
        return tl.load(ptr + offs % length, mask=mask, other=0.0).to(DTYPE)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(DTYPE)


@triton.jit
def _binary_kernel(
    # pointers
    input_ptr, target_ptr, weight_ptr, pos_weight_ptr, grad_scale_ptr,
    loss_ptr, partial_ptr, grad_ptr, grad_target_ptr,
    # shapes
    numel, weight_len, pos_weight_len,
    # constants
    gamma_hi, gamma_lo, alpha_hi, alpha_lo,
    BLOCK: tl.constexpr, FOCAL: tl.constexpr, WEIGHT_MODE: tl.constexpr, POS_WEIGHT_MODE: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_PARTIAL: tl.constexpr, SCALE_PER_ELEMENT: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, COMPUTE_TARGET_GRAD: tl.constexpr, DTYPE: tl.constexpr,
):
    """Loss per element (``WRITE_LOSS``) or one partial sum per program (``WRITE_PARTIAL``), and the gradients
    times ``grad_scale`` (a scalar, or one value per element with ``SCALE_PER_ELEMENT``)."""
    gamma = join_f64(gamma_hi, gamma_lo, DTYPE)
    alpha = join_f64(alpha_hi, alpha_lo, DTYPE)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(input_ptr + offs, mask=mask, other=0.0).to(DTYPE)
    t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(DTYPE)
    e = tl.exp(-tl.abs(x))
    sp_tail = log1p(e)  # log(1 + exp(-|x|))
    sig_neg = tl.where(x >= 0.0, e, 1.0) / (1.0 + e)  # sigmoid(-x) = 1 - s, without cancellation
    sig = tl.where(x >= 0.0, 1.0, e) / (1.0 + e)  # s = sigmoid(x)
    if FOCAL:
        ce = tl.maximum(x, 0.0) - x * t + sp_tail
        q = sig * (1.0 - t) + sig_neg * t
        positive = q > 0.0
        q_safe = tl.where(positive, q, 1.0)
        m = tl.where(positive, tl.exp2(gamma * tl.log2(q_safe)), tl.where(gamma == 0.0, 1.0, 0.0))
        if alpha >= 0:
            alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
        else:
            alpha_t = tl.zeros([BLOCK], DTYPE) + 1.0
        loss = alpha_t * ce * m
        dx = alpha_t * m * ((sig - t) + gamma * ce * tl.where(positive, sig * sig_neg / q_safe, 0.0) * (1.0 - 2.0 * t))
        dt = alpha_t * m * (-x + gamma * tl.where(positive, ce / q_safe, 0.0) * (sig_neg - sig))
        if alpha >= 0:
            dt += (2.0 * alpha - 1.0) * ce * m
    else:
        sp_neg = tl.maximum(-x, 0.0) + sp_tail  # sp(-x)
        if POS_WEIGHT_MODE != 0:
            pw = _load_broadcast(pos_weight_ptr, offs, mask, pos_weight_len, POS_WEIGHT_MODE, DTYPE)
            log_weight = 1.0 + (pw - 1.0) * t
            dt = -x + (pw - 1.0) * sp_neg
        else:
            log_weight = tl.zeros([BLOCK], DTYPE) + 1.0
            dt = -x
        loss = (1.0 - t) * x + log_weight * sp_neg
        dx = (1.0 - t) - log_weight * sig_neg
        if WEIGHT_MODE != 0:
            w = _load_broadcast(weight_ptr, offs, mask, weight_len, WEIGHT_MODE, DTYPE)
            loss *= w
            dx *= w
            dt *= w
    if WRITE_LOSS:
        tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)
    if WRITE_PARTIAL:
        tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, loss, 0.0), axis=0))
    if COMPUTE_GRAD or COMPUTE_TARGET_GRAD:
        if SCALE_PER_ELEMENT:
            scale = tl.load(grad_scale_ptr + offs, mask=mask, other=0.0).to(DTYPE)
        else:
            scale = tl.load(grad_scale_ptr).to(DTYPE)
        if COMPUTE_GRAD:
            tl.store(grad_ptr + offs, (dx * scale).to(grad_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_TARGET_GRAD:
            tl.store(grad_target_ptr + offs, (dt * scale).to(grad_target_ptr.dtype.element_ty), mask=mask)


def broadcast_mode(t, shape):
    """(mode, length) for a ``weight`` / ``pos_weight`` tensor broadcast to ``shape``, or None when it needs to
    be materialized (``t.expand(shape).contiguous()``) first."""
    if t is None:
        return BCAST_NONE, 0
    if t.numel() == 1:
        return BCAST_SCALAR, 1
    squeezed = t.reshape(t.shape[-1:]) if all(d == 1 for d in t.shape[:-1]) else None
    if squeezed is not None and len(shape) >= 1 and t.shape[-1] == shape[-1] and t.stride(-1) == 1:
        return BCAST_LAST, t.shape[-1]
    if tuple(t.shape) == tuple(shape) and t.is_contiguous():
        return BCAST_FULL, t.numel()
    return None


def binary_forward(input, target, weight, pos_weight, grad_scale, loss, partial, grad, grad_target, *,
                   focal, gamma=0.0, alpha=-1.0):
    """Launch ``_binary_kernel`` over contiguous ``input`` / ``target`` of one shape. ``loss`` (per element) or
    ``partial`` (``num_programs(numel)`` fp32 sums) may be None; so may ``grad`` / ``grad_target``, which
    receive the gradients times ``grad_scale`` (0-d, or the input's shape)."""
    numel = input.numel()
    weight_mode, weight_len = broadcast_mode(weight, input.shape)
    pos_weight_mode, pos_weight_len = broadcast_mode(pos_weight, input.shape)
    dtype = tl.float64 if input.dtype.itemsize == 8 or target.dtype.itemsize == 8 else tl.float32
    _binary_kernel[(num_programs(numel),)](
        input, target, weight, pos_weight, grad_scale,
        loss, partial, grad, grad_target,
        numel, weight_len, pos_weight_len,
        *split_f64(gamma), *split_f64(alpha),
        BLOCK=BINARY_BLOCK, FOCAL=focal, WEIGHT_MODE=weight_mode, POS_WEIGHT_MODE=pos_weight_mode,
        WRITE_LOSS=loss is not None, WRITE_PARTIAL=partial is not None,
        SCALE_PER_ELEMENT=grad_scale is not None and grad_scale.dim() > 0,
        COMPUTE_GRAD=grad is not None, COMPUTE_TARGET_GRAD=grad_target is not None, DTYPE=dtype,
        num_warps=BINARY_NUM_WARPS,
    )


def num_programs(numel):
    """The grid of ``_binary_kernel``, and so the length of its ``partial`` buffer."""
    return triton.cdiv(numel, BINARY_BLOCK)


def compile_variants():
    """Call the launcher once per constexpr combination it can produce, on small CPU tensors (for
    ``bench/compile_report.py``, which records the launches instead of running them)."""
    import torch

    shape = (8, 16)
    broadcasts = {BCAST_NONE: None, BCAST_SCALAR: torch.ones(1), BCAST_LAST: torch.ones(16),
                  BCAST_FULL: torch.ones(shape)}

    def launch(dtype, *, focal=False, weight=None, pos_weight=None, mode="fused", target_grad=False):
        x = torch.zeros(shape, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        scale = torch.ones(shape if mode == "backward" else (), dtype=acc)
        loss = torch.zeros(shape, dtype=dtype) if mode == "none" else None
        partial = torch.zeros(num_programs(x.numel()), dtype=acc) if mode == "fused" else None
        grad = torch.zeros_like(x) if mode in ("fused", "backward") else None
        grad_target = torch.zeros_like(x) if target_grad else None
        binary_forward(x, x, weight, pos_weight, scale, loss, partial, grad, grad_target, focal=focal,
                       gamma=2.0, alpha=0.25)

    for weight in broadcasts.values():
        for pos_weight in broadcasts.values():
            launch(torch.bfloat16, weight=weight, pos_weight=pos_weight)
    for focal in (False, True):
        for mode in ("fused", "none", "backward"):
            for target_grad in (False, True):
                if mode == "none" and target_grad:
                    continue
                launch(torch.bfloat16, focal=focal, mode=mode, target_grad=target_grad)
    for dtype in (torch.float16, torch.float32, torch.float64):
        launch(dtype)
        launch(dtype, focal=True)
