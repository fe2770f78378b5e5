"""Pointwise losses: fused MSE / Huber / KL / Bradley-Terry vs eager PyTorch and torch.compile.

Work, per tensor of M elements of s bytes (input and target of one shape and dtype):
    forward            bytes = 2 M s (input and target read once) + one fp32 partial sum per 2048 elements
    forward + backward bytes = 3 M s (input and target read once, the input's gradient written once)
The fused kernel moves exactly that: the gradient is written by the forward launch and a plain backward() of a
mean/sum moves nothing. Eager's forward + backward reads input and target twice (forward, then backward) and
writes the gradient: 5 M s, plus the elementwise temporaries of the composite losses (kl_div, Bradley-Terry).
"""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from benchutil import provider_fn, skip_if_oom, timed_step
from fusedloss.losses.pointwise import bradley_terry_loss, huber_loss, kl_div, mse_loss


def eager_bradley_terry(chosen, rejected):
    """What TRL's reward trainer writes."""
    return -F.logsigmoid(chosen - rejected).mean()


LOSSES = {
    "mse": (lambda x, t: mse_loss(x, t), F.mse_loss),
    "huber": (lambda x, t: huber_loss(x, t, delta=0.5), lambda x, t: F.huber_loss(x, t, delta=0.5)),
    "kl_div": (lambda x, t: kl_div(x, t, reduction="batchmean", log_target=True),
               lambda x, t: F.kl_div(x, t, reduction="batchmean", log_target=True)),
    "bradley_terry": (bradley_terry_loss, eager_bradley_terry),
}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["fusedloss", "eager", "torch.compile"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_pointwise(run_bench, device, quick, loss, provider, mode):
    if provider == "torch.compile" and device.type == "cpu":
        pytest.skip("torch.compile is benchmarked on GPU only")
    fn = provider_fn(provider, *LOSSES[loss], key=loss)
    numel = (1 << 20) if quick else (1 << 28)  # 268M elements: 1 GiB of bf16 input + target
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    x = skip_if_oom(lambda: torch.randn(numel, device=device, dtype=dtype, generator=gen))
    t = skip_if_oom(lambda: torch.randn(numel, device=device, dtype=dtype, generator=gen))
    step = timed_step(fn, [x, t], mode, differentiable=[x])
    skip_if_oom(step)
    bytes_moved = (2 if mode == "fwd" else 3) * numel * x.element_size()
    run_bench(step, bytes=bytes_moved, rounds=10 if device.type == "cuda" else 5, warmup_rounds=2,
              family=loss, provider=provider, config="mean", mode=mode, shape=f"{numel}",
              dtype=str(dtype).replace("torch.", ""), backend=fusedloss.backend(device))
