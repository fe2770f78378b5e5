"""Every kernel's default launch configuration, in one place, with the measurement behind each.

A config is chosen from the problem's shape only (never from tensor values), so the choice is deterministic
and capturable in a CUDA graph. Sweeps over these live in ``bench/`` (``sweep_cross_entropy.py``); the defaults
below are what ships.
"""

import os

import triton

# --- elementwise: gradient scaling (kernels._common._scale_unless_one_kernel) ------------------------------------
# A pure streaming kernel: 8 warps x 4096 elements (16 per thread, 2-4 vector loads) is the usual memory-bound shape.
# A persistent grid of at most SCALE_PROGRAMS_PER_SM programs per SM strides over the tensor, so that a backward
# with grad_output == 1, where every program returns after one scalar load, launches a few hundred programs
# instead of numel / 4096 (513K at 16384 x 128256).
SCALE_BLOCK = 4096
SCALE_NUM_WARPS = 8
SCALE_PROGRAMS_PER_SM = 4
# SM count assumed off-GPU (the interpreter, the compile report): an H100 SXM's, so both see a GPU's launch shapes.
DEFAULT_NUM_SMS = 132


# --- binary losses (kernels.binary._binary_kernel) -------------------------------------------------------------
BINARY_BLOCK = 2048
BINARY_NUM_WARPS = 8
# fp64 math holds twice the registers per element: 16 warps (4 elements per thread) keep the fp64 focal loss and
# strided variants of both elementwise kernels out of local memory (bench/compile_report.py, sm_80 / sm_90).
BINARY_NUM_WARPS_FP64 = 16


# --- cross-entropy family (kernels.cross_entropy) -------------------------------------------------------------
def cross_entropy_config(n_rows, n_classes, class_stride_is_one):
    """(BLOCK_R rows, BLOCK_C classes, num_warps) for a (rows, classes) problem.

    Large vocabularies: one row per program, streamed in BLOCK_C-wide blocks (online log-sum-exp), so registers
    stay bounded at any vocabulary. Small class counts: a [BLOCK_R, BLOCK_C] tile of several rows per program, so a
    program still moves a few KB per step (2048 elements on 8 warps: on 4 warps the variants with weights,
    smoothing and the cap spilled on sm_80); when the class dimension is strided (K-dimensional inputs,
    (N, C, d1, ...)), neighbouring rows are the contiguous axis and the tile coalesces along rows.

    ``FUSEDLOSS_CE_CONFIG="BLOCK_C,NUM_WARPS"`` overrides the large-vocabulary config, for
    ``bench/sweep_cross_entropy.py``.
    """
    if n_classes >= 2048:
        override = os.environ.get("FUSEDLOSS_CE_CONFIG")
        block_c, num_warps = map(int, override.split(",")[:2]) if override else CE_LARGE_VOCAB
        return 1, block_c, num_warps
    block_c = max(triton.next_power_of_2(n_classes), 2)
    block_r = max(1, min(256, 2048 // block_c))
    if not class_stride_is_one:
        block_r = max(block_r, 32)
    return block_r, block_c, 8


# (BLOCK_C, num_warps) for n_classes >= 2048, one program per row: the sweep's winner (bench/NOTES.md, "Where the
# default configs come from").
CE_LARGE_VOCAB = (4096, 8)


# --- pointwise losses, triplet losses, distillation KL (kernels.pointwise, kernels.triplet, kernels.distillation) -
# Chosen from the compile report (registers, no spills on sm_80 / sm_90, HGMMA on sm_90 for the bf16 tl.dot), not
# swept (bench/NOTES.md has what they measured).

# Streaming elementwise kernel, the same shape as BINARY_*: 8 warps x 2048 elements (8 per thread).
POINTWISE_BLOCK = 2048
POINTWISE_NUM_WARPS = 8
POINTWISE_NUM_WARPS_FP64 = 16  # as BINARY_NUM_WARPS_FP64


def _is_fp64(dtype):
    return getattr(dtype, "itemsize", 4) == 8


def triplet_config(dim, dtype):
    """(BLOCK_R rows, BLOCK_D features, num_warps) of ``_triplet_kernel``: a tile of 2048 elements per input
    (1024 in fp64), rows x features, at most 512 features wide (longer rows loop). 87-128 registers in fp32, 4 warps."""
    elements = 1024 if _is_fp64(dtype) else 2048
    block_d = min(triton.next_power_of_2(max(dim, 1)), 512)
    return max(1, min(64, elements // block_d)), block_d, 4


def batch_hard_mine_config(dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of ``_batch_hard_mine_kernel``. The epilogue keeps several
    [BLOCK_M, BLOCK_N] tiles live (scores, masks), so 64 x 64 takes 8 warps: 100-128 registers. bf16/fp16: BLOCK_K
    64 (HGMMA on sm_90); fp32 (tl.dot with input_precision="ieee", FMA): BLOCK_K 16, since 32 needs 244-255
    registers on sm_80; fp64: 32 x 32 x 16, 96 registers."""
    if _is_fp64(dtype):
        return 32, 32, 16, 4, 2
    if dtype.itemsize == 4:
        return 64, 64, 16, 8, 2
    return 64, 64, 64, 8, 3


def batch_hard_loss_config(dim, dtype):
    """(BLOCK_R, BLOCK_D, num_warps) of ``_batch_hard_loss_kernel``: half of ``triplet_config``'s tile, because the
    gradient pass holds three 64-bit address tiles for its atomic adds (159 registers at 2048 elements on sm_80)."""
    elements = 512 if _is_fp64(dtype) else 1024
    block_d = min(triton.next_power_of_2(max(dim, 1)), 256)
    return max(1, elements // block_d), block_d, 4


def distillation_config(n_classes, dtype):
    """(BLOCK_R rows, BLOCK_V classes, num_warps) of the distillation kernels. Large vocabularies: one row per
    program in 4096-wide blocks (2048 in fp64), 8 warps, 64-80 registers for two logit tiles. Small ones: up to 16
    rows of the padded class count (more rows multiply the per-row state: 64 rows of 16 classes need 168
    registers on sm_80)."""
    if n_classes >= 2048:
        return 1, 2048 if _is_fp64(dtype) else 4096, 8
    block_v = max(triton.next_power_of_2(n_classes), 2)
    return max(1, min(16, 1024 // block_v)), block_v, 4


# --- contrastive losses: NT-Xent, CLIP, InfoNCE, SigLIP (kernels.contrastive) -----------------------------------
# Chosen from tile arithmetic for sm_90 and checked with bench/compile_report.py (HGMMA in every 16-bit variant on
# sm_90, no LDL/STL), not swept; fp32 (IEEE, FMA pipes) and fp64 configs are sized for correctness, not speed. The
# forward holds a [BLOCK_M, BLOCK_N] fp32 logits tile plus per-row state; the band (dlogits) kernel and the band
# GEMMs are plain GEMM tiles, 128 x 128 x 64 with 3 stages for 16-bit (8 warps, two warpgroups of wgmma m64).
# The host's two switches (fusedloss.losses.contrastive.SCHEDULES, GEMMS), opt-in until a GPU measures them, are
# the values the kernels are compiled for: schedule "exact" (online max, column statistics, two exps per element) or
# "fixed_shift" (one exp per element, docs/kernels/contrastive.md); gemm "triton" (kernels._gemm.matmul) or
# "cublas" (torch.mm / addmm, fp32 output). Their register and instruction counts and measurements: bench/NOTES.md.
CONTRASTIVE_SCHEDULES = ("exact", "fixed_shift")
CONTRASTIVE_GEMMS = ("triton", "cublas")
CONTRASTIVE_FWD_PROGRAMS_PER_SM = 2  # symmetric CLIP: programs ~ 2 x SMs, each a band of consecutive row tiles
CONTRASTIVE_BAND_BYTES = 1 << 29  # backward band buffer target: 512 MiB (4096 rows at N = 65536 in bf16)
CONTRASTIVE_BAND_MIN_ROWS = 1024  # never fewer rows per band: the fp32 column-gradient update is 8 N d bytes per band
# Tests only: the number of forward programs with column statistics (None: CONTRASTIVE_FWD_PROGRAMS_PER_SM per SM),
# so that small problems in the interpreter run programs of several row tiles.
CONTRASTIVE_FWD_PROGRAMS = None


def contrastive_fwd_config(dim, itemsize, col_stats, sigmoid, schedule):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) of the forward. For d <= 128 (SimCLR heads) BLOCK_D
    covers d and the row tile stays on chip for the whole column sweep (128 x 128 tiles spill there, on both
    schedules). Otherwise d streams in chunks and the row tile is re-read from L2 for every column tile: 128 x 128
    tiles double the flops per byte of 128 x 64 ((128 + 128) d bytes for 2 * 128 * 128 d flops), but with a heavy
    epilogue, the exact schedule's column statistics or the sigmoid loss's terms, they spill (255 registers and
    LDL/STL on sm_80 and sm_90), so those variants keep BLOCK_N = 64. The fixed-shift epilogue (one exp2, two sums per
    direction) fits 128 x 128 with column statistics when d streams in 32-wide chunks (246-255 registers, none
    spilled; 64-wide chunks spill 4 registers on sm_90), with 4 stages (64 KB of shared memory at one CTA per SM).
    The sigmoid epilogue does not fit 128 x 128 on either schedule (37-182 LDL/STL at 8 warps, 65-118 at 16).
    ``"fallback"`` launches are exact ones without column statistics."""
    if schedule == "fallback":
        schedule, col_stats = "exact", False
    if itemsize == 2:
        if dim <= 128:
            return 128, 64, max(16, triton.next_power_of_2(dim)), 8, 3
        if schedule == "fixed_shift" and not sigmoid:
            return 128, 128, 32, 8, 4
        return 128, 64 if col_stats or sigmoid else 128, 64, 8, 3
    if itemsize == 4:  # IEEE fp32 products run on the FMA pipes: smaller tiles, fewer registers. With the fixed
        # shift, 64 x 32 x 16 on 2-3 stages lets ptxas settle on 128 registers and spill 2-4 (sm_80 or sm_90).
        return (64, 64, 16, 4, 2) if schedule == "fixed_shift" and not sigmoid else (64, 32, 16, 4, 2)
    return 32, 32, 16, 4, 1


def retrieval_fwd_config(itemsize, ids):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) of the retrieval forward (kernels.retrieval; ``ids``:
    positives by id, an int64 compare per element). Checked with bench/compile_report.py (no spills on sm_80 /
    sm_90), not timed; the tiles that spilled are listed in docs/kernels/retrieval.md."""
    if itemsize == 2:
        return (128, 32, 32, 8, 3) if ids else (128, 64, 32, 8, 3)
    if itemsize == 4:
        return 64, 32, 32, 4, 2
    return 32, 32, 16, 4, 1


def retrieval_dlogits_config(itemsize):
    """(BLOCK_M, BLOCK_N, BLOCK_D, GROUP_M, num_warps, num_stages) of the retrieval band kernel: the contrastive
    band kernel's with the forward's BLOCK_D, so that each similarity is the same sum of products in both passes
    (the margin's removals then agree between the forward and the backward at a tie)."""
    block_m, block_n, _, group_m, num_warps, num_stages = contrastive_dlogits_config(itemsize)
    return block_m, block_n, retrieval_fwd_config(itemsize, False)[2], group_m, num_warps, num_stages


def contrastive_dlogits_config(itemsize):
    """(BLOCK_M, BLOCK_N, BLOCK_D, GROUP_M, num_warps, num_stages) of the backward band kernel."""
    if itemsize == 2:
        return 128, 128, 64, 8, 8, 3
    if itemsize == 4:
        return 64, 64, 32, 8, 4, 2
    return 32, 32, 16, 8, 4, 1


def contrastive_matmul_config(itemsize):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) of the band GEMMs (fp32 output). 128 x 256
    tiles spill in the accumulating variant (the fp32 C tile it starts from), so 128 x 128."""
    if itemsize == 2:
        return 128, 128, 64, 8, 8, 3
    if itemsize == 4:  # FMA pipes: BLOCK_K = 32 spills the accumulating variant on sm_80, 2 stages the plain one on
        return 64, 64, 16, 8, 4, 3  # sm_90 (compile report of kernels._gemm's matmul)
    return 32, 32, 16, 8, 4, 1


def contrastive_band_rows(n_cols, itemsize):
    """Rows per backward band: CONTRASTIVE_BAND_BYTES of logits gradient, at least CONTRASTIVE_BAND_MIN_ROWS, a
    multiple of 128 (whole GEMM tiles)."""
    rows = max(CONTRASTIVE_BAND_BYTES // max(n_cols * itemsize, 1), CONTRASTIVE_BAND_MIN_ROWS)
    return max(128, rows - rows % 128)


# --- linear + cross-entropy (kernels.linear_cross_entropy) -----------------------------------------------------
# "pointer" loads (the default): the usual Ampere/Hopper GEMM tiles for each dtype, checked with
# bench/compile_report.py (HGMMA on sm_90 for 16-bit inputs; no spills on sm_80/sm_90), not swept (bench/NOTES.md:
# what they measured; bench/phases_linear_cross_entropy.py times each schedule feature). The byte budgets bound the
# workspace stated in docs/kernels/linear_cross_entropy.md.
LCE_WORKSPACE_BYTES = 64 << 20  # the G chunk (rows x chunk x itemsize) stays under this
# compact workspace (the compensated dX sum): 32 MiB of G chunk + the 2 N H bytes of the sum's low half = 4.8% of
# the bf16 logits at N = 8192, H = 4096, V = 128256 (the target is < 5%); the dX sum then moves 4 / w = 2e-3 bytes
# per GEMM FLOP.
LCE_COMPACT_WORKSPACE_BYTES = 32 << 20
# tensor-descriptor loads: persistent programs per SM. The 128 x 128 tile kernels hold 150-230 registers x 256
# threads: one CTA per SM.
LCE_TMA_PROGRAMS_PER_SM = 1
LCE_MAX_PARTIAL_BYTES = 16 << 20  # forward: the per-split partials (16 bytes x rows x splits, fp32)
LCE_COMBINE_BLOCK_R = 64
LCE_COMBINE_NUM_WARPS = 4
# chunked schedule: one logits chunk (tokens x the whole vocabulary, in the input's dtype) of at most this many
# bytes. Each chunk also reads and writes the fp32 dW accumulator (8 V H bytes): at 770 TFLOP/s and 3 TB/s that
# costs 8 V H / 3e12 s against 6 n H V / 770e12 s of GEMMs, 340 / n of the GEMM time for n tokens per chunk, so
# chunks of ~4096 tokens keep it near 8%: 1 GiB is 4186 tokens at V = 128256 in bf16 (half the logits at N = 8192).
LCE_CHUNK_BYTES = 1 << 30
# Tests only: a dict merged over the chosen config (e.g. 16-wide tiles, 3 splits, a 32-column chunk) so that
# small problems in the interpreter cross several tiles, splits and chunks. None in normal use.
LCE_OVERRIDE = None


def linear_cross_entropy_config(n_rows, n_hidden, n_classes, itemsize, num_sms, *, tma_loads=False,
                                compact_workspace=False, skip_ignored=False):
    """Launch configuration of kernels.linear_cross_entropy for a (rows x hidden) @ (hidden x classes) problem
    under the schedule's features (``fusedloss.losses.linear_cross_entropy.LinearCrossEntropySchedule``): ``fwd``
    and ``dlogits`` (logit tiles BLOCK_N x BLOCK_V stepping BLOCK_H along
    H), ``gemm_dw`` and ``gemm_dx`` (the backward's two GEMMs), ``n_splits`` (the forward's vocabulary splits),
    ``chunk`` (the backward's vocabulary chunk), ``programs`` (the persistent grid of ``tma_loads``, else 0) and
    and, for tests only, ``chunk_rows`` (the chunked schedule's tokens per chunk, else from LCE_CHUNK_BYTES).

    16-bit inputs, on the tensor cores (wgmma on sm_90, mma.sync on sm_80), pointer loads:
    - fwd: 128 x 128 logit tiles, 64 along H, 8 warps (two warpgroups of m64n128 wgmma), 3 stages (96 KB of
      shared memory); at 16 warps it spills;
    - dlogits: the same tile on 16 warps: its epilogue (p, the one-hot test, the cap's derivative, the cast and
      the column sums) needs more registers per element than the forward's, and at 8 warps it spills on sm_80;
      16 warps halve the elements per thread (<= 128 registers, no spills on either arch);
    - gemm_dw: 128 x 256 x 64, 8 warps, 3 stages (144 KB, within an A100's 164 KB);
    - gemm_dx: 128 x 128 x 64, 8 warps, 4 stages (128 KB): it starts from the loaded fp32 accumulator, which a
      128 x 256 tile cannot hold without spilling.
    ``tma_loads`` (sm_90, 16-bit only; compile report: UTMALDG and HGMMA, no spills): tensor descriptors take the 64-bit
    address tiles off the registers, so both logit kernels run on 8 warps: fwd 128 x 128 x 64, 3 stages, 174-212
    registers; dlogits 128 x 64 x 64, 4 stages (96 KB), 160-194 registers: at 128 x 128 its epilogue reaches 255
    registers and spills 8 bytes in the bias variants with 3 stages (none with 2 stages, which leaves one TMA load
    in flight per MMA step), and at 16 warps the 128-register cap spills the variant with every extra. GEMMs as
    with pointer loads: gemm_dx 126-158 registers, gemm_dw 214, no spills. The tile shapes are the first to sweep on a
    GPU (bench/phases_linear_cross_entropy.py).
    fp32 runs FMA (``ieee``) or tf32 on 64 x 64 x 16 tiles, fp64 on 32 x 32 x 16.
    Splits: enough (token tile, split) items for ~8 waves on ``num_sms`` SMs, so the last wave's tail costs
    little, bounded by LCE_MAX_PARTIAL_BYTES. Chunk: the widest multiple of the tiles with rows x chunk x itemsize
    within the workspace budget (``compact_workspace``: the compensated dX sum's; at least one tile wide).
    ``skip_ignored`` needs gemm_dx's BLOCK_M equal to dlogits' BLOCK_N and gemm_dw's BLOCK_K to divide it (one tile
    list serves all).
    """
    tma = tma_loads
    if itemsize == 2:
        tile = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, num_warps=8, num_stages=3)
        if tma:
            dlogits = dict(tile, BLOCK_V=64, num_stages=4)
        else:  # skipping ignored tiles with pointer loads: 128 x 128 spills on sm_80 with every extra (compile report)
            dlogits = dict(tile, num_warps=16, BLOCK_V=64 if skip_ignored else 128)
        cfg = dict(fwd=tile, dlogits=dlogits,
                   gemm_dw=dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
                   gemm_dx=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4))
    elif itemsize == 4:
        tile = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=16, GROUP_N=8, num_warps=4, num_stages=3)
        gemm = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=3)
        cfg = dict(fwd=tile, dlogits=tile, gemm_dw=gemm, gemm_dx=gemm)
    else:
        tile = dict(BLOCK_N=32, BLOCK_V=32, BLOCK_H=16, GROUP_N=8, num_warps=4, num_stages=2)
        gemm = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
        cfg = dict(fwd=tile, dlogits=tile, gemm_dw=gemm, gemm_dx=gemm)
    cfg.update(programs=LCE_TMA_PROGRAMS_PER_SM * num_sms if tma else 0)
    for key, value in (LCE_OVERRIDE or {}).items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    tile_rows = cfg["dlogits"]["BLOCK_N"]
    if skip_ignored and (cfg["gemm_dx"]["BLOCK_M"] != tile_rows or tile_rows % cfg["gemm_dw"]["BLOCK_K"]):
        raise ValueError(f"skipping ignored token tiles needs gemm_dx BLOCK_M == dlogits BLOCK_N and gemm_dw BLOCK_K "
                         f"dividing it, got {cfg['gemm_dx']['BLOCK_M']}, {tile_rows}, {cfg['gemm_dw']['BLOCK_K']}")
    rows = max(n_rows, 1)
    n_tiles = triton.cdiv(rows, cfg["fwd"]["BLOCK_N"])
    v_tiles = triton.cdiv(n_classes, cfg["fwd"]["BLOCK_V"])
    max_splits = max(1, LCE_MAX_PARTIAL_BYTES // (16 * rows))
    cfg.setdefault("n_splits", max(1, min(v_tiles, max_splits, triton.cdiv(8 * num_sms, n_tiles))))
    unit = max(cfg["dlogits"]["BLOCK_V"], cfg["gemm_dw"]["BLOCK_M"])
    budget = LCE_COMPACT_WORKSPACE_BYTES if compact_workspace else LCE_WORKSPACE_BYTES
    chunk = max(unit, budget // (rows * itemsize) // unit * unit)
    cfg.setdefault("chunk", min(chunk, triton.cdiv(n_classes, unit) * unit))
    return cfg
