"""Pointwise losses: fused MSE / Huber / KL / Bradley-Terry vs eager PyTorch and torch.compile.

Work, per tensor of M elements of s bytes (input and target of one shape and dtype):
    forward            bytes = 2 M s (input and target read once) + one fp32 partial sum per 2048 elements
    forward + backward bytes = 3 M s (input and target read once, the input's gradient written once)
The fused kernel moves exactly that: the gradient is written by the forward launch and a plain backward() of a
mean/sum moves nothing. Eager's forward + backward reads input and target twice (forward, then backward) and
writes the gradient: 5 M s, plus the elementwise temporaries of the composite losses (kl_div, Bradley-Terry).

Sizes: ``--quick`` (CPU, fp32): M = 2^20. GPU (bf16): M = 2^28 (1 GiB of input + target).
"""

import pytest
import torch
import torch.nn.functional as F

from fusedloss import bradley_terry_loss, huber_loss, kl_div, mse_loss

from benchutil import provider_fn, row, skip_if_oom


def eager_bradley_terry(chosen, rejected):
    """What TRL's reward trainer writes."""
    return -F.logsigmoid(chosen - rejected).mean()


# loss -> (fusedloss, eager)
LOSSES = {
    "mse": (mse_loss, F.mse_loss),
    "huber": (lambda x, t: huber_loss(x, t, delta=0.5), lambda x, t: F.huber_loss(x, t, delta=0.5)),
    "kl_div": (lambda x, t: kl_div(x, t, reduction="batchmean", log_target=True),
               lambda x, t: F.kl_div(x, t, reduction="batchmean", log_target=True)),
    "bradley_terry": (bradley_terry_loss, eager_bradley_terry),
}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["fusedloss", "eager", "torch.compile"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_pointwise(run_bench, device, quick, loss, provider, mode):
    fn = provider_fn(provider, *LOSSES[loss], key=loss)
    numel = (1 << 20) if quick else (1 << 28)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    x, t = skip_if_oom(lambda: [torch.randn(numel, device=device, dtype=dtype, generator=gen) for _ in range(2)])
    run_bench(fn, [x, t], differentiable=[x] if mode == "fwd_bwd" else [], reference=LOSSES[loss][1],
              bytes=(2 if mode == "fwd" else 3) * numel * x.element_size(),
              **row(loss, provider, mode, f"{numel}", "mean", dtype))
