"""Binary losses on logits: fused BCE-with-logits and sigmoid focal loss vs eager PyTorch and torch.compile.

Work, per tensor of M elements of s bytes (targets in the input's dtype):
    forward            bytes = 2 M s (input and target read once) + partial sums (negligible)
    forward + backward bytes = 3 M s (input and target read once, input gradient written once)
The fused kernel moves exactly that: the gradient is written by the forward launch and a plain backward() of a
mean/sum moves nothing.

Sizes: ``--quick`` (CPU, fp32): M = 2^20. GPU (bf16): M = 2^28 (1 GiB of input + target).
"""

import pytest
import torch
import torch.nn.functional as F

import fusedloss

from benchutil import provider_fn, row, skip_if_oom


def eager_sigmoid_focal(x, t, alpha=0.25, gamma=2.0):
    """torchvision.ops.sigmoid_focal_loss, as written there, with reduction='mean'."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * ((1 - p_t) ** gamma)
    return ((alpha * t + (1 - alpha) * (1 - t)) * loss).mean()


# loss -> (fusedloss, eager)
LOSSES = {
    "bce": (fusedloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
    "sigmoid_focal": (lambda x, t: fusedloss.sigmoid_focal_loss(x, t, reduction="mean"), eager_sigmoid_focal),
}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["fusedloss", "eager", "torch.compile"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_binary(run_bench, device, quick, loss, provider, mode):
    fn = provider_fn(provider, *LOSSES[loss], key=loss)
    numel = (1 << 20) if quick else (1 << 28)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    x = skip_if_oom(lambda: torch.randn(numel, device=device, dtype=dtype, generator=gen))
    t = skip_if_oom(lambda: (torch.rand(numel, device=device, generator=gen) > 0.9).to(dtype))
    run_bench(fn, [x, t], differentiable=[x] if mode == "fwd_bwd" else [], reference=LOSSES[loss][1],
              bytes=(2 if mode == "fwd" else 3) * numel * x.element_size(),
              **row(loss, provider, mode, f"{numel}", "mean", dtype))
