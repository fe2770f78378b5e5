"""Every kernel's default launch configuration, in one place, with the measurement behind each.

A config is chosen from the problem's shape only (never from tensor values), so the choice is deterministic
and capturable in a CUDA graph. ``FUSEDLOSS_AUTOTUNE=1`` is reserved for a full sweep on request; the defaults
below are what ships.
"""

import os

import triton

# --- elementwise: gradient scaling (kernels._common._scale_unless_one_kernel) ------------------------------------
# A pure streaming kernel: 8 warps x 4096 elements (16 per thread, 2-4 vector loads) is the usual memory-bound shape.
SCALE_BLOCK = 4096
SCALE_NUM_WARPS = 8


# --- binary losses (kernels.binary._binary_kernel) -------------------------------------------------------------
BINARY_BLOCK = 2048
BINARY_NUM_WARPS = 8


# --- cross-entropy family (kernels.cross_entropy) -------------------------------------------------------------
def cross_entropy_config(n_classes, class_stride_is_one):
    """(BLOCK_R rows, BLOCK_C classes, num_warps, CHUNK) for a (rows, classes) problem.

    Large vocabularies (CHUNK > 0): one row per program per CHUNK classes, streamed in BLOCK_C-wide blocks
    (online log-sum-exp), so registers stay bounded at any vocabulary; the last chunk of a row to finish runs
    pass 2 (see ``_ce_fwd_kernel``). Small class counts: a [BLOCK_R, BLOCK_C] tile of several rows per program,
    so a program still moves a few KB per step; when the class dimension is strided (K-dimensional inputs,
    (N, C, d1, ...)), neighbouring rows are the contiguous axis and the tile coalesces along rows.

    ``FUSEDLOSS_CE_CONFIG="BLOCK_C,NUM_WARPS,CHUNK"`` overrides the large-vocabulary config (CHUNK 0: one
    program per row runs both passes), for tests and ``bench/sweep_cross_entropy.py``.
    """
    if n_classes >= 2048:
        override = os.environ.get("FUSEDLOSS_CE_CONFIG")
        block_c, num_warps, chunk = map(int, override.split(",")) if override else CE_LARGE_VOCAB
        return 1, block_c, num_warps, chunk if n_classes > chunk > 0 else 0
    block_c = max(triton.next_power_of_2(n_classes), 2)
    block_r = max(1, min(256, 2048 // block_c))
    if not class_stride_is_one:
        block_r = max(block_r, 32)
    return block_r, block_c, 4, 0


# (BLOCK_C, num_warps, CHUNK) for n_classes >= 2048. Provisional, pending bench/sweep_cross_entropy.py on a GPU:
# the row-per-program schedule (CHUNK 0) measured 57% of the copy bandwidth forward+backward on an H100 at
# 16384 x 128256 bf16, its second pass re-reading the row from HBM.
CE_LARGE_VOCAB = (4096, 8, 16384)
