"""The one GEMM module of the matmul-based families (linear cross-entropy, contrastive, batch-hard triplet): the
``tl.dot`` precision rule, the main loop of a logit tile, and a matmul kernel with the epilogues the families'
backward passes need.

Precision, stated once (``dot_precision``). 16-bit operands always run on the tensor cores with fp32 accumulation;
fp64 operands in fp64. fp32 operands follow torch's own fp32 matmul policy, so that a fused loss and the
``F.linear`` it replaces round the same way: IEEE fp32 products under torch's default (``'highest'``), TF32 tensor
cores once the user allows TF32 (``torch.set_float32_matmul_precision('high')`` or ``'medium'``, or
``torch.backends.cuda.matmul.fp32_precision = 'tf32'``). A family may let its caller override the rule for fp32
(``linear_cross_entropy(input_precision=...)``).

Operand loads, two forms selected by the ``TMA`` constexpr:
- pointer tensors (any strides, masks at the edges): every GPU and Triton's interpreter;
- tensor descriptors (``tl.make_tensor_descriptor``: on sm_90 the bulk tensor copy engine, ``UTMALDG`` in the
  SASS, one instruction per tile instead of a 64-bit address per element, which takes ~70 registers off a
  128 x 128 tile kernel; edges zero-filled by the hardware, so no masks). They need a 16-byte-aligned base, a
  contiguous last dimension and 16-byte-multiple leading strides (``tma_compatible``), and Triton >= 3.4
  (``tl.make_tensor_descriptor``; 3.6 on the GPU machines). The descriptor is built on the device, in 128 bytes of
  global scratch per program that Triton requests from ``triton.set_allocator`` (``use_tensor_descriptors``).
  Host-side ``triton.tools.tensor_descriptor.TensorDescriptor`` arguments would avoid the scratch, but were
  reported to give NaNs on H200 with Triton 3.6 where device-side descriptors did not (triton-lang/triton#9719),
  so they are not used.

With tensor descriptors the kernels also run a persistent grid: ``programs`` (a few per SM) walk the output tiles
in the GROUP_M-swizzled order, so that the tiles in flight at once share their A rows in L2 and the last wave's
tail is at most one tile per program.
"""

import functools
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ._common import grouped_tile, math_dtype
from ._launch import custom_launcher


def dot_precision(dtype, override=None):
    """``input_precision`` of ``tl.dot`` for operands of ``dtype``: the module's one rule. ``override`` (``'ieee'``,
    ``'tf32'``, ``'tf32x3'``, or None for torch's policy) applies to fp32 operands only; 16-bit and fp64 operands
    have no choice ("ieee" is passed, which Triton ignores for them)."""
    if dtype != torch.float32:
        return "ieee"
    if override is not None:
        return override
    return "tf32" if _torch_allows_tf32() else "ieee"


def _torch_allows_tf32():
    """Whether torch's own fp32 matmuls may use TF32. torch >= 2.9 keeps the setting per backend
    (``torch.backends.cuda.matmul.fp32_precision``, ``'none'`` deferring to the global ``torch.backends``'s); its
    legacy reader ``torch.get_float32_matmul_precision()`` raises once a program mixed the two APIs, so it is the
    fallback for older torch only."""
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is None:
        return torch.get_float32_matmul_precision() != "highest"
    if matmul == "none":
        matmul = getattr(torch.backends, "fp32_precision", "none")
    return matmul == "tf32"


def tma_compatible(*tensors):
    """Whether every 2-D tensor can be read through a tensor descriptor (``_storage_order``), is 16-bit (the
    tensor-core path: fp32 operands through descriptors feed FMA ``tl.dot`` tiles that spill at 64 x 64 on sm_90),
    lives on a Hopper or later GPU (the bulk tensor copy engine; before sm_90 Triton lowers descriptors to plain
    loads, which spill where the pointer kernels do not) or in the interpreter, and this Triton has device-side
    descriptors (3.4 on)."""
    return (hasattr(tl, "make_tensor_descriptor") and all(_storage_order(t) is not None for t in tensors)
            and all(t.element_size() == 2 and _has_tma(t.device) for t in tensors))


@functools.lru_cache(maxsize=None)
def _cuda_capability(index):
    return torch.cuda.get_device_capability(index)


def _has_tma(device):
    if device.type != "cuda":
        return True  # the interpreter, and the compile report's CPU stand-ins
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


def _storage_order(t):
    """For a 2-D tensor a descriptor can describe: whether it is stored transposed (dimension 0 contiguous), else
    None. A descriptor needs a 16-byte-aligned base, a contiguous dimension and the other stride a multiple of
    16 bytes."""
    if t.dim() != 2 or t.data_ptr() % 16:
        return None
    for transposed, (contiguous, lead) in enumerate(((t.stride(1), t.stride(0)), (t.stride(0), t.stride(1)))):
        if contiguous == 1 and (lead * t.element_size()) % 16 == 0:
            return bool(transposed)
    return None


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def use_tensor_descriptors(device):
    """Before launching a kernel that builds tensor descriptors on ``device``: make sure Triton has an allocator for
    their global scratch (``size`` = 128 bytes x programs). The allocator lives in a context variable, which a
    backward pass (autograd's device thread) does not inherit from the forward, so it is checked per launch;
    one the caller set is kept."""
    if device.type != "cuda":
        return  # the interpreter keeps descriptors on the host
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


@triton.jit
def abt_tile(a, b, a_index, b_index, a_mask, b_mask, n_k, stride_ak, stride_bk,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr,
             PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """``A[rows] @ B[cols]^T`` for one [BLOCK_M, BLOCK_N] tile: a logit or similarity tile, both operands K-major
    (hidden / feature dimension contiguous), accumulated over K in DTYPE (fp32, fp64 for fp64 operands).

    TMA: ``a`` / ``b`` are tensor descriptors with blocks [BLOCK_M, BLOCK_K] / [BLOCK_N, BLOCK_K] and ``a_index`` /
    ``b_index`` the tile's first row (scalars); masks and strides are unused (the descriptor zero-fills past its
    shape). Otherwise ``a`` / ``b`` are pointers, ``a_index`` / ``b_index`` the rows' 64-bit element offsets,
    ``a_mask`` / ``b_mask`` the valid rows. B is read as the K-major [BLOCK_K, BLOCK_N] operand straight from its
    row layout (a permuted view in shared memory for wgmma): no transpose in the loop."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], DTYPE)
    if TMA:
        for k in range(0, n_k, BLOCK_K):
            acc = tl.dot(a.load([a_index, k]), b.load([b_index, k]).T, acc, input_precision=PRECISION)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a + a_index[:, None] + offs_k[None, :] * stride_ak
        b_ptrs = b + b_index[None, :] + offs_k[:, None] * stride_bk
        for k in range(0, tl.cdiv(n_k, BLOCK_K)):
            k_mask = offs_k < n_k - k * BLOCK_K
            a_tile = tl.load(a_ptrs, mask=a_mask[:, None] & k_mask[None, :], other=0.0)
            b_tile = tl.load(b_ptrs, mask=k_mask[:, None] & b_mask[None, :], other=0.0)
            acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _matmul_tile(tile, a_src, b_src, out_ptr, acc_ptr, lo_in_ptr, lo_out_ptr, scale_ptr, tile_order_ptr, n_live,
                 M, N, K, num_m, num_n, stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
                 stride_accm, stride_accn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 SPARSE: tl.constexpr, TILE_ROWS: tl.constexpr, LOAD_ACC: tl.constexpr, LOAD_LO: tl.constexpr,
                 STORE_LO: tl.constexpr, HAS_SCALE: tl.constexpr, ZERO_SKIPPED: tl.constexpr, TMA: tl.constexpr,
                 A_TRANS: tl.constexpr, B_TRANS: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """One output tile of ``_matmul_kernel``: ``a_src`` / ``b_src`` are its tensor descriptors (TMA) or pointers."""
    offs_k = tl.arange(0, BLOCK_K)
    pos_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
    tile_m = pos_m
    if SPARSE == "m":
        tile_m = tl.load(tile_order_ptr + pos_m)
    m0 = tile_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    offs_m = m0.to(tl.int64) + tl.arange(0, BLOCK_M)
    offs_n = n0.to(tl.int64) + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    live_mask = mask  # the output elements whose A rows take part
    if SPARSE == "m":  # (a vector compare: Triton's interpreter rejects a scalar operand in a load mask)
        live_mask = mask & (tl.zeros([BLOCK_M], tl.int32) + pos_m < n_live)[:, None]
    if LOAD_ACC:
        acc = tl.load(acc_ptr + offs_m[:, None] * stride_accm + offs_n[None, :] * stride_accn,
                      mask=live_mask, other=0.0).to(DTYPE)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], DTYPE)
    out_offs = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if LOAD_LO:
        acc += tl.load(lo_in_ptr + out_offs, mask=live_mask, other=0.0).to(DTYPE)
    if not TMA:
        a_ptrs = a_src + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_src + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    steps = tl.cdiv(K, BLOCK_K)
    if SPARSE == "m":
        steps = tl.where(pos_m < n_live, steps, 0)
    elif SPARSE == "k":
        steps = n_live * (TILE_ROWS // BLOCK_K)
    for step in range(0, steps):
        if SPARSE == "k":
            k0 = tl.load(tile_order_ptr + step // (TILE_ROWS // BLOCK_K)) * TILE_ROWS \
                + (step % (TILE_ROWS // BLOCK_K)) * BLOCK_K
        else:
            k0 = step * BLOCK_K
        if TMA:
            if A_TRANS:
                a = a_src.load([k0, m0]).T
            else:
                a = a_src.load([m0, k0])
            if B_TRANS:
                b = b_src.load([n0, k0]).T
            else:
                b = b_src.load([k0, n0])
        else:
            k_mask = offs_k < K - k0
            k0 = k0.to(tl.int64)
            a = tl.load(a_ptrs + k0 * stride_ak, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs + k0 * stride_bk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr).to(DTYPE)
    hi = acc.to(out_ptr.dtype.element_ty)
    store_mask = live_mask
    if ZERO_SKIPPED:
        store_mask = mask
    tl.store(out_ptr + out_offs, hi, mask=store_mask)
    if STORE_LO:
        tl.store(lo_out_ptr + out_offs, (acc - hi.to(DTYPE)).to(lo_out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr, acc_ptr, lo_in_ptr, lo_out_ptr, scale_ptr, tile_order_ptr, n_live_ptr,
    # shapes
    M, N, K,
    # strides (in elements; lo_in and lo_out have out's)
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on, stride_accm, stride_accn,
    # constants
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPARSE: tl.constexpr, TILE_ROWS: tl.constexpr, LOAD_ACC: tl.constexpr, LOAD_LO: tl.constexpr,
    STORE_LO: tl.constexpr, HAS_SCALE: tl.constexpr, ZERO_SKIPPED: tl.constexpr, TMA: tl.constexpr,
    A_TRANS: tl.constexpr, B_TRANS: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr,
):
    """out = scale * (acc + lo_in + A @ B), accumulated in DTYPE, stored in out's dtype; with STORE_LO the rounding
    residue ``(acc - out)`` goes to ``lo_out`` (a compensated accumulator: out holds the high part). Each tile has
    one owner, so ``acc`` may alias ``out`` and ``lo_in`` ``lo_out`` (read, add, write by one program, no atomics);
    the loaded value is the K loop's initial accumulator, so it costs no registers beyond it.

    SPARSE ("m" or "k"): one dimension is made of TILE_ROWS-row tiles of which only the first ``n_live`` of
    ``tile_order`` take part (the rest are all zero in A, e.g. ignored tokens): "m" (BLOCK_M == TILE_ROWS) skips the
    output row tiles past ``n_live``, writing zeros there when ZERO_SKIPPED; "k" runs the K loop over the live
    tiles only (BLOCK_K divides TILE_ROWS). ``n_live`` is read on the device: no host sync.

    TMA: operands through tensor descriptors, A described in its storage order ((K, M) when A_TRANS, the G^T of a
    weight gradient), B likewise ((N, K) when B_TRANS), on a persistent grid. Otherwise any strides, one program
    per output tile."""
    a_src, b_src = a_ptr, b_ptr
    if TMA:
        if A_TRANS:
            a_src = tl.make_tensor_descriptor(a_ptr, shape=[K, M], strides=[stride_ak, 1],
                                              block_shape=[BLOCK_K, BLOCK_M])
        else:
            a_src = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                              block_shape=[BLOCK_M, BLOCK_K])
        if B_TRANS:
            b_src = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1],
                                              block_shape=[BLOCK_N, BLOCK_K])
        else:
            b_src = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1],
                                              block_shape=[BLOCK_K, BLOCK_N])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    n_live = 0
    if SPARSE != "":
        n_live = tl.load(n_live_ptr)
    if TMA:  # persistent: the tiles program_id + k * num_programs
        for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
            _matmul_tile(tile, a_src, b_src, out_ptr, acc_ptr, lo_in_ptr, lo_out_ptr, scale_ptr, tile_order_ptr,
                         n_live, M, N, K, num_m, num_n, stride_am, stride_ak, stride_bk, stride_bn, stride_om,
                         stride_on, stride_accm, stride_accn, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPARSE, TILE_ROWS,
                         LOAD_ACC, LOAD_LO, STORE_LO, HAS_SCALE, ZERO_SKIPPED, TMA, A_TRANS, B_TRANS, PRECISION,
                         DTYPE)
    else:  # one tile per program, no loop around it: with one, the pointer variants spill on sm_80 (compile report)
        _matmul_tile(tl.program_id(0), a_src, b_src, out_ptr, acc_ptr, lo_in_ptr, lo_out_ptr, scale_ptr,
                     tile_order_ptr, n_live, M, N, K, num_m, num_n, stride_am, stride_ak, stride_bk, stride_bn,
                     stride_om, stride_on, stride_accm, stride_accn, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPARSE,
                     TILE_ROWS, LOAD_ACC, LOAD_LO, STORE_LO, HAS_SCALE, ZERO_SKIPPED, TMA, A_TRANS, B_TRANS,
                     PRECISION, DTYPE)


@custom_launcher("matmul", mutates_args=("out", "lo_out"))
def matmul(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, acc: Optional[torch.Tensor] = None,
    lo_in: Optional[torch.Tensor] = None, lo_out: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None, tile_order: Optional[torch.Tensor] = None,
    n_live: Optional[torch.Tensor] = None, *, tile: List[int], sparse: str = "", tile_rows: int = 0,
    zero_skipped: bool = False, programs: int = 0, input_precision: Optional[str] = None,
) -> None:
    """``out = scale * (acc + lo_in + a @ b)`` (``_matmul_kernel``), ``lo_out`` = what rounding to out's dtype left.

    ``a`` (M, K), ``b`` (K, N) of one dtype with any strides (a transposed view is read in place); ``out`` (M, N) of
    any float dtype; ``acc`` None (zero) or (M, N) of any float dtype, possibly ``out`` itself; ``lo_in`` /
    ``lo_out`` None or (M, N) with out's strides, possibly the same tensor; ``scale`` None or a 0-d tensor.
    ``tile``: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). ``sparse`` "m" / "k" with ``tile_order``
    (int32, tiles of ``tile_rows`` rows, live ones first) and the 0-d int32 ``n_live``: see the kernel.
    ``programs`` > 0: tensor-descriptor loads on a persistent grid of at most that many programs (when the
    operands allow it, ``tma_compatible``); 0: pointer loads, one program per output tile. ``input_precision``:
    the fp32 override of ``dot_precision``."""
    M, K = a.shape
    N = b.shape[1]
    block_m, block_n, block_k, group_m, num_warps, num_stages = tile
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    tma = programs > 0 and tma_compatible(a, b)
    if tma:
        use_tensor_descriptors(a.device)
    acc_t = out if acc is None else acc
    _matmul_kernel[(min(tiles, programs) if tma else tiles,)](
        a, b, out, acc_t, lo_in, lo_out, scale, tile_order, n_live,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        acc_t.stride(0), acc_t.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, SPARSE=sparse, TILE_ROWS=tile_rows,
        LOAD_ACC=acc is not None, LOAD_LO=lo_in is not None, STORE_LO=lo_out is not None,
        HAS_SCALE=scale is not None, ZERO_SKIPPED=zero_skipped, TMA=tma,
        A_TRANS=tma and _storage_order(a), B_TRANS=tma and _storage_order(b),
        PRECISION=dot_precision(a.dtype, input_precision), DTYPE=math_dtype(a),
        num_warps=num_warps, num_stages=num_stages,
    )
