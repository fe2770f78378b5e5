"""``@triton.jit`` helpers shared by every kernel family, and the generic gradient-scaling kernel.

The elementary functions are written out here instead of taken from libdevice because the same code must run
under Triton's interpreter (which has no libdevice) and under every Triton release from 3.6 on, whose libdevice
import paths differ. Near 0, where ``exp(u) - 1`` and ``log(1 + v)`` cancel, they switch to a truncated Taylor
series; away from 0 the direct formula's relative error is at most a few ulps divided by the threshold.
"""

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from ._launch import INTERPRETER_LOCK, custom_launcher, num_sms


def _triton_version():
    return tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())


# tl.dot on fp64 operands: Triton 3.6 rejects it while building the IR (an assertion on the accumulator type; seen
# on an H100, 2026-11-26); 3.9 compiles it for sm_80 and sm_90 (bench/compile_report.py). Versions in between are
# untested, so the matmul-based families send fp64 inputs to their torch path there (``fp64_dot_supported``).
FP64_DOT_MIN_TRITON = (3, 9)


def fp64_dot_supported():
    """Whether this Triton can compile the fp64 ``tl.dot`` variants of the matmul-based kernels."""
    return _triton_version() >= FP64_DOT_MIN_TRITON


@functools.lru_cache(maxsize=None)
def interpreter_bf16_dot_exact():
    """Whether Triton's interpreter computes a bf16 ``tl.dot`` right: up to at least Triton 3.9 it multiplies the
    operands' bit patterns (upstream triton issue 11584), so the matmul families take their torch path for bf16
    there. Probed once on a 16 x 16 product, so a fixed interpreter is used again without a release to follow."""
    a = torch.arange(256, dtype=torch.float32).reshape(16, 16).remainder(7).sub(3).to(torch.bfloat16)
    out = torch.empty(16, 16, dtype=torch.float32)
    with INTERPRETER_LOCK:
        _bf16_dot_probe[(1,)](a, out)
    return torch.equal(out, a.float() @ a.float().T)


@triton.jit
def _bf16_dot_probe(a_ptr, out_ptr):
    offs = tl.arange(0, 16)
    a = tl.load(a_ptr + offs[:, None] * 16 + offs[None, :])
    tl.store(out_ptr + offs[:, None] * 16 + offs[None, :], tl.dot(a, tl.trans(a)))


def math_dtype(*tensors):
    """The precision the kernels compute in, as their ``DTYPE`` constexpr: fp64 when a tensor argument is fp64, fp32
    otherwise (16-bit inputs are widened on load). The host's ``fusedloss._family.compute_dtype`` in Triton's
    terms; ``None`` arguments (absent optional operands) are skipped."""
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


def split_f64(v):
    """A Python float as an fp32 (hi, lo) pair, rebuilt on the device by ``join_f64``: Triton passes Python floats
    as fp32, which would round e.g. label_smoothing=0.1 by 1.5e-8, too coarse for fp64 inputs."""
    v = float(v)
    if not math.isfinite(v) or abs(v) >= 3.4e38:
        return v, 0.0  # inf and nan pass as they are (v - v would be nan)
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, v - hi


@triton.jit
def join_f64(hi, lo, DTYPE: tl.constexpr):
    """The float ``split_f64`` split, in the compute dtype (exact to ~2^-48 relative in fp64)."""
    return (tl.zeros([], DTYPE) + hi) + lo


@triton.jit
def to_element_type(x, ptr):
    """``x`` converted to ``ptr``'s element type for a store; to bf16 through fp32, because Triton's interpreter
    converts fp64 to bf16 by truncating the bit pattern (an fp64 compute dtype meets a bf16 operand when dtypes
    are mixed). The extra rounding step changes nothing at bf16's precision."""
    if ptr.dtype.element_ty == tl.bfloat16:
        x = x.to(tl.float32)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def expm1(u):
    """exp(u) - 1 without cancellation. |u| < 0.1: Taylor to u^8 (truncation 0.1^8 / 9! ~ 3e-14, relative);
    elsewhere exp(u) - 1 loses at most log2(1 / 0.1) ~ 3.3 bits to cancellation."""
    series = u * (1.0 + u / 2.0 * (1.0 + u / 3.0 * (1.0 + u / 4.0 * (1.0 + u / 5.0 * (
        1.0 + u / 6.0 * (1.0 + u / 7.0 * (1.0 + u / 8.0)))))))
    return tl.where(tl.abs(u) < 0.1, series, tl.exp(u) - 1.0)


@triton.jit
def log1p(v):
    """log(1 + v) for v > -1 without cancellation: alternating Taylor series to v^10 for |v| < 0.1 (truncation
    0.1^10 / 11 ~ 1e-11, relative), log(1 + v) elsewhere."""
    series = v * (1.0 - v * (1.0 / 2.0 - v * (1.0 / 3.0 - v * (1.0 / 4.0 - v * (1.0 / 5.0 - v * (
        1.0 / 6.0 - v * (1.0 / 7.0 - v * (1.0 / 8.0 - v * (1.0 / 9.0 - v / 10.0)))))))))
    return tl.where(tl.abs(v) < 0.1, series, tl.log(1.0 + v))


@triton.jit
def soft_cap(x, cap):
    """Gemma 2's logit soft-capping, ``cap * tanh(x / cap)``, and its derivative ``1 - tanh^2`` for the chain
    rule. tanh(u) = 1 - 2 / (1 + exp(2u)) saturates to +-1 without overflow; its absolute error, ~1 ulp of 1,
    is an absolute error of ~cap ulps in the capped logit, far below what a softmax can resolve."""
    t = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * x / cap))
    return cap * t, 1.0 - t * t


@triton.jit
def pow_nonneg(base, exponent):
    """base ** exponent for base >= 0 and exponent >= 0, with 0 ** 0 == 1 (exp2(0 * log2(0)) would be NaN)."""
    positive = base > 0.0
    p = tl.exp2(exponent * tl.log2(tl.where(positive, base, 1.0)))
    return tl.where(positive, p, tl.where(exponent == 0.0, 1.0, 0.0))


@triton.jit
def online_logsumexp_update(m, s, x, AXIS: tl.constexpr):
    """Merge a tile ``x`` into the running (max, sum of exp(x - max)) pair along ``AXIS``: the streaming
    log-sum-exp of Milakov & Gimelshein (2018). Returns the new (m, s) and the shift used, m or 0 where m is
    still -inf, so a row whose values are all -inf so far keeps m = -inf and s = 0, never NaN."""
    m_new = tl.maximum(m, tl.max(x, axis=AXIS))
    shift = tl.where(m_new > float("-inf"), m_new, 0.0)
    s_new = s * tl.exp(m - shift) + tl.sum(tl.exp(x - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return m_new, s_new, shift


@triton.jit
def grouped_tile(pid, n_tiles_a, n_tiles_b, GROUP: tl.constexpr):
    """(tile_a, tile_b) of program ``pid`` with GROUP consecutive tiles along ``a`` scheduled next to each other
    for every ``b`` (the usual GEMM swizzle): programs that run at the same time share a few ``a`` tiles (kept in
    L2) while they stream the ``b`` operand."""
    per_group = GROUP * n_tiles_b
    first = (pid // per_group) * GROUP
    group_size = tl.minimum(n_tiles_a - first, GROUP)
    return first + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _scale_unless_one_kernel(
    grad_ptr, scale_ptr,
    numel,
    BLOCK: tl.constexpr, DTYPE: tl.constexpr,
):
    """grad *= scale, in place, for a scalar scale on the device, each program striding over the tensor. When
    scale == 1 (a plain ``loss.backward()``) every program returns after one scalar load: the gradient a fused
    forward wrote is already final and the backward moves no bytes, without a host sync to find that out."""
    scale = tl.load(scale_ptr).to(DTYPE)
    if scale != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, numel, step):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < numel
            g = tl.load(grad_ptr + offsets, mask=mask)
            tl.store(grad_ptr + offsets, (g.to(DTYPE) * scale).to(g.dtype), mask=mask)


@custom_launcher("scale_unless_one", mutates_args=("grad",))
def scale_unless_one(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """``grad`` (contiguous, any float dtype) times the 0-d device tensor ``scale``, in place."""
    from .configs import SCALE_BLOCK, SCALE_NUM_WARPS, SCALE_PROGRAMS_PER_SM

    numel = grad.numel()
    if numel:
        programs = min(triton.cdiv(numel, SCALE_BLOCK), SCALE_PROGRAMS_PER_SM * num_sms(grad.device))
        _scale_unless_one_kernel[(programs,)](grad, scale, numel, BLOCK=SCALE_BLOCK, DTYPE=math_dtype(grad),
                                              num_warps=SCALE_NUM_WARPS)


def compile_variants():
    """The scaling kernel for each gradient dtype (for ``bench/compile_report.py``)."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        scale_unless_one(torch.zeros(8, dtype=dtype), torch.ones((), dtype=dtype))
