"""perplexity / perplexity_from_loss against exp of torch's cross-entropy in fp64, in every tier."""

import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_close, randn
from fusedloss.losses.perplexity import perplexity, perplexity_from_loss


def ignored_positions(gen, shape, fraction=0.2):
    target = torch.randint(0, 50, shape, generator=gen)
    target[torch.rand(shape, generator=gen) < fraction] = -100
    target.view(-1)[0] = -100
    return target


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_perplexity(tier, gen, dtype):
    logits = randn(gen, 3, 7, 50, dtype=dtype, scale=2.0)
    target = ignored_positions(gen, (3, 7))
    x = logits.to(tier.device).requires_grad_(True)
    out = perplexity(x, target.to(tier.device))
    x64 = logits.double().requires_grad_(True)
    ref = torch.exp(F.cross_entropy(x64.reshape(-1, 50), target.reshape(-1)))
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == ()
    # bf16: each token's loss is rounded to bf16 once (relative 2^-9) before the fp32 sum; exp(mean) then carries
    # the mean's absolute error, ~loss * 2^-9 / sqrt(tokens), within bf16's 2e-2.
    assert_close(out, ref, dtype, "perplexity")
    (g,) = torch.autograd.grad(out, x)
    (r,) = torch.autograd.grad(ref, x64)
    assert_close(g, r, dtype, "d logits")


def test_perplexity_per_sequence(tier, gen):
    logits = randn(gen, 4, 9, 50, scale=2.0)
    target = ignored_positions(gen, (4, 9))
    target[2] = -100  # a sequence without scored tokens: 0 / 0
    out = perplexity(logits.to(tier.device), target.to(tier.device), per_sequence=True)
    token = F.cross_entropy(logits.double().transpose(1, 2), target, reduction="none")
    ref = torch.exp(token.sum(1) / (target != -100).sum(1))
    assert out.shape == (4,) and torch.isnan(out[2]).item()
    assert_close(out, ref, torch.float32)


def test_perplexity_from_loss(tier, gen):
    assert math.isclose(perplexity_from_loss(2.0).item(), math.exp(2.0), rel_tol=1e-15)
    losses = (torch.rand(5, generator=gen) * 3).to(tier.device)
    assert_close(perplexity_from_loss(losses), torch.exp(losses.double().cpu()), torch.float32)
    tokens = [10, 1, 200, 7, 30]
    expected = math.exp(sum(loss * n for loss, n in zip(losses.tolist(), tokens)) / sum(tokens))
    assert math.isclose(perplexity_from_loss(losses, tokens).item(), expected, rel_tol=1e-6)
    # Averaging per-batch perplexities instead overstates it (Jensen): the helper must not do that.
    assert perplexity_from_loss(losses, [1] * 5).item() < torch.exp(losses).mean().item()


BAD = [
    ("logits", TypeError, lambda: perplexity(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))),
    ("target", TypeError, lambda: perplexity(torch.zeros(2, 3), torch.zeros(2))),
    ("target", ValueError, lambda: perplexity(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))),
    ("per_sequence", ValueError,
     lambda: perplexity(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), per_sequence=True)),
    ("loss", TypeError, lambda: perplexity_from_loss("2.0")),
    ("loss", TypeError, lambda: perplexity_from_loss(torch.tensor([2]))),
    ("num_tokens", ValueError, lambda: perplexity_from_loss(torch.ones(3), [1, 2])),
    ("num_tokens", TypeError, lambda: perplexity_from_loss(torch.ones(2), torch.ones(2, dtype=torch.bool))),
]


@pytest.mark.parametrize("name,error,call", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(tier, name, error, call):
    if tier.device.type != "cpu":
        pytest.skip("the bad-input table builds CPU tensors; the checks are device-independent")
    with pytest.raises(error, match=name):
        call()


def test_exports(tier):
    assert fusedloss.perplexity is perplexity and fusedloss.perplexity_from_loss is perplexity_from_loss
