"""Distillation KL on logits: fused kl_div_with_logits vs eager PyTorch and torch.compile.

Work, per (N rows, V classes) with s-byte student and teacher logits (the teacher frozen, the usual case):
    forward            bytes = 2 N V s (student and teacher read once) + 4 N (fp32 per-row losses)
    forward + backward bytes = 3 N V s (both read once, the student's gradient written once) + 4 N
The fused kernel reads each row of both twice (the gradient pass re-reads them; at LLM vocabularies most of a row
is no longer in L2 by then), so its fraction of the copy bandwidth by this count is its efficiency against the
one-read ideal. Eager materializes log_softmax of both (two N x V tensors), the pointwise KL (a third) and the
backward's temporaries.

Sizes: ``--quick`` (CPU, fp32): 256 x 32000. GPU (bf16): 8192 x 32000, 8192 x 128256, 4096 x 256000.
"""

import pytest
import torch
import torch.nn.functional as F

from fusedloss import kl_div_with_logits

from benchutil import provider_fn, row, skip_if_oom

TEMPERATURE = 2.0


def eager_distillation(student, teacher):
    """The usual recipe: T^2 KL(softmax(teacher / T) || softmax(student / T)), batchmean, in the logits' dtype."""
    log_q = F.log_softmax(student / TEMPERATURE, dim=-1)
    log_p = F.log_softmax(teacher / TEMPERATURE, dim=-1)
    return TEMPERATURE**2 * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def shapes(quick):
    if quick:
        return {"medium": (256, 32000)}
    return {"small": (8192, 32000), "medium": (8192, 128256), "large": (4096, 256000)}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", ["fusedloss", "eager", "torch.compile"])
@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_distillation(run_bench, device, quick, provider, size, mode):
    sizes = shapes(quick)
    if size not in sizes:
        pytest.skip("no such size in --quick mode")
    n, v = sizes[size]
    fn = provider_fn(provider, lambda s, t: kl_div_with_logits(s, t, TEMPERATURE), eager_distillation,
                     key="distillation")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    student, teacher = skip_if_oom(lambda: [torch.randn(n, v, device=device, dtype=dtype, generator=gen)
                                            for _ in range(2)])
    run_bench(fn, [student, teacher], differentiable=[student] if mode == "fwd_bwd" else [],
              reference=eager_distillation, bytes=(2 if mode == "fwd" else 3) * n * v * student.element_size() + 4 * n,
              **row("distillation_kl", provider, mode, f"{n}x{v}", f"T={TEMPERATURE}", dtype))
