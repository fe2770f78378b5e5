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

    ``FUSEDLOSS_CE_CHUNK`` overrides CHUNK (0: one program per row, both passes; for measurements).
    """
    if n_classes >= 2048:
        chunk = int(os.environ.get("FUSEDLOSS_CE_CHUNK", CE_CHUNK))
        return 1, 4096, 8, chunk if n_classes > chunk > 0 else 0
    block_c = max(triton.next_power_of_2(n_classes), 2)
    block_r = max(1, min(256, 2048 // block_c))
    if not class_stride_is_one:
        block_r = max(block_r, 32)
    return block_r, block_c, 4, 0


# Classes per program in the split schedule (bf16: 32 KB read per program).
CE_CHUNK = 16384
