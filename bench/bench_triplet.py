"""Triplet losses: fused triplet_margin_loss and tiled batch-hard mining vs eager PyTorch and torch.compile.

triplet_margin_loss, per (N rows, D features) triplet of s-byte tensors:
    forward            bytes = 3 N D s (anchor, positive, negative read once) + 4 N (fp32 per-row losses)
    forward + backward bytes = 6 N D s (the three inputs read once, their three gradients written once) + 4 N
The fused kernel reads the inputs twice (the gradient pass re-reads them in reverse block order, partly from L2),
so its fraction of the copy bandwidth by this count is its efficiency against the one-read ideal.

batch_hard_triplet_loss, per (B rows, d features): mining is a Gram product, FLOPs = 2 B^2 d (the bf16 matmul rate
is its ceiling); the loss and its gradient then move O(B d) bytes. Eager builds the B x B distance matrix
(torch.cdist) and masks it: memory O(B^2), which the peak-memory column shows.

Sizes: ``--quick`` (CPU, fp32): triplets 4096 x 128; batch-hard B x d = 512 x 128 and 2048 x 128. GPU (bf16):
triplets 2^20 x 256 (1.5 GiB read); batch-hard 8192 x 512 and 65536 x 256.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fusedloss import batch_hard_triplet_loss, triplet_margin_loss

from benchutil import at_least_fp32, provider_fn, row, skip_if_oom


def eager_batch_hard(x, labels, margin=1.0):
    """Batch-hard mining as usually written: the full distance matrix, masked max / min per row; the mean over the
    anchors that have both a positive and a negative (as fusedloss defines it)."""
    xf = at_least_fp32(x)
    d = torch.cdist(xf, xf)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=x.device)
    d_pos = d.masked_fill(~positive, -math.inf).amax(1)
    d_neg = d.masked_fill(same, math.inf).amin(1)
    valid = positive.any(1) & ~same.all(1)
    return torch.clamp_min(margin + d_pos - d_neg, 0.0)[valid].mean()


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["fusedloss", "eager", "torch.compile"])
@pytest.mark.parametrize("swap", [False, True])
def test_triplet_margin_loss(run_bench, device, quick, provider, swap, mode):
    eager = lambda a, p, n: F.triplet_margin_loss(a, p, n, swap=swap)
    fn = provider_fn(provider, lambda a, p, n: triplet_margin_loss(a, p, n, swap=swap), eager, key=("triplet", swap))
    n, d = (4096, 128) if quick else (1 << 20, 256)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = skip_if_oom(lambda: [torch.randn(n, d, device=device, dtype=dtype, generator=gen) for _ in range(3)])
    run_bench(fn, inputs, differentiable=inputs if mode == "fwd_bwd" else [], reference=eager,
              bytes=(3 if mode == "fwd" else 6) * n * d * inputs[0].element_size() + 4 * n,
              **row("triplet_margin", provider, mode, f"{n}x{d}", "swap" if swap else "p=2", dtype))


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["fusedloss", "eager", "torch.compile"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_batch_hard(run_bench, device, quick, provider, size, mode):
    fn = provider_fn(provider, batch_hard_triplet_loss, eager_batch_hard, key="batch_hard")
    b, d = ({"small": (512, 128), "large": (2048, 128)} if quick else
            {"small": (8192, 512), "large": (65536, 256)})[size]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    x = skip_if_oom(lambda: torch.randn(b, d, device=device, dtype=dtype, generator=gen))
    labels = torch.randint(0, max(b // 4, 2), (b,), device=device, generator=gen)  # P x K batches, K ~ 4
    run_bench(fn, [x, labels], differentiable=[x] if mode == "fwd_bwd" else [], reference=eager_batch_hard,
              flops=2 * b * b * d, **row("batch_hard_triplet", provider, mode, f"{b}x{d}", "hinge", dtype))
