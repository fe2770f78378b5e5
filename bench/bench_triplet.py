"""Triplet losses: fused triplet_margin_loss and tiled batch-hard mining vs eager PyTorch and torch.compile.

triplet_margin_loss, per (N rows, D features) triplet of s-byte tensors:
    forward            bytes = 3 N D s (anchor, positive, negative read once) + 4 N (fp32 per-row losses)
    forward + backward bytes = 6 N D s (the three inputs read once, their three gradients written once) + 4 N
The fused kernel reads the inputs twice (the gradient pass re-reads them in reverse block order, mostly from
L2), so its fraction of the copy bandwidth by this count is its efficiency against the one-read ideal.

batch_hard_triplet_loss, per (B rows, d features): mining is a Gram product, FLOPs = 2 B^2 d (recorded with the
bf16 matmul rate as the ceiling); the loss and its gradient then move O(B d) bytes. Eager builds the B x B
distance matrix (torch.cdist) and masks it: memory O(B^2), which the peak-memory column shows.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from benchutil import provider_fn, skip_if_oom, timed_step
from fusedloss.losses.triplet import batch_hard_triplet_loss, triplet_margin_loss

def eager_batch_hard(x, labels, margin=0.3):
    """Batch-hard mining as usually written: the full distance matrix, masked max / min per row."""
    d = torch.cdist(x.float(), x.float())
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=x.device)
    d_pos = d.masked_fill(~positive, -math.inf).amax(1)
    d_neg = d.masked_fill(same, math.inf).amin(1)
    return torch.clamp_min(margin + d_pos - d_neg, 0.0).mean()


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["fusedloss", "eager", "torch.compile"])
@pytest.mark.parametrize("swap", [False, True])
def test_triplet_margin_loss(run_bench, device, quick, provider, swap, mode):
    if provider == "torch.compile" and device.type == "cpu":
        pytest.skip("torch.compile is benchmarked on GPU only")
    fn = provider_fn(provider, lambda a, p, n: triplet_margin_loss(a, p, n, swap=swap),
                     lambda a, p, n: F.triplet_margin_loss(a, p, n, swap=swap), key=("triplet", swap))
    n, d = (4096, 128) if quick else (1 << 20, 256)  # 1M triplets of 256 bf16 features: 1.5 GiB read
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = [skip_if_oom(lambda: torch.randn(n, d, device=device, dtype=dtype, generator=gen)) for _ in range(3)]
    step = timed_step(fn, inputs, mode, differentiable=inputs)
    skip_if_oom(step)
    bytes_moved = (3 if mode == "fwd" else 6) * n * d * inputs[0].element_size() + 4 * n
    run_bench(step, bytes=bytes_moved, rounds=10 if device.type == "cuda" else 5, warmup_rounds=2,
              family="triplet_margin", provider=provider, config="swap" if swap else "p=2", mode=mode,
              shape=f"{n}x{d}", dtype=str(dtype).replace("torch.", ""), backend=fusedloss.backend(device))


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["fusedloss", "eager", "torch.compile"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_batch_hard(run_bench, device, quick, provider, size, mode):
    if provider == "torch.compile" and device.type == "cpu":
        pytest.skip("torch.compile is benchmarked on GPU only")
    sizes = {"small": (512, 128), "large": (2048, 128)} if quick else {"small": (8192, 512), "large": (65536, 256)}
    b, d = sizes[size]
    fn = provider_fn(provider, batch_hard_triplet_loss, eager_batch_hard, key="batch_hard")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    x = skip_if_oom(lambda: torch.randn(b, d, device=device, dtype=dtype, generator=gen))
    labels = torch.randint(0, max(b // 4, 2), (b,), device=device, generator=gen)  # P x K batches, K ~ 4
    step = timed_step(fn, [x, labels], mode, differentiable=[x])
    skip_if_oom(step)
    run_bench(step, flops=2 * b * b * d, rounds=10 if device.type == "cuda" else 3, warmup_rounds=1,
              family="batch_hard_triplet", provider=provider, config="hinge", mode=mode, shape=f"{b}x{d}",
              dtype=str(dtype).replace("torch.", ""), backend=fusedloss.backend(device))
