"""perplexity / perplexity_from_loss against exp of torch's cross-entropy in fp64, in every tier."""

import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.losses.perplexity import perplexity, perplexity_from_loss

from conftest import Case, assert_close, randn


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
    ("ignore_index", TypeError, lambda: perplexity(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.5)),
    ("per_sequence", TypeError,
     lambda: perplexity(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), per_sequence="yes")),
    ("logits", ValueError, lambda: perplexity(torch.tensor(1.0), torch.tensor(1))),
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


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_targets_of_every_integer_dtype_compare_in_int64(tier, gen, dtype):
    """Token ids of any integer dtype: the int64 values they hold, so a uint8 token 156 is scored against
    ignore_index = -100 (which wraps to 156 in uint8), and counted in the mean."""
    logits = randn(gen, 2, 5, 300, scale=2.0)
    values = torch.tensor([[156, 3, 255, 7, 100], [0, 1, 2, 99, 42]])
    if dtype != torch.uint8:  # within every signed dtype
        values[0, 0], values[0, 2] = -100, 127
    target = values.to(dtype)
    out = perplexity(logits.to(tier.device), target.to(tier.device))
    ref = torch.exp(F.cross_entropy(logits.double().reshape(-1, 300), values.reshape(-1)))
    assert_close(out, ref, torch.float32)


def test_number_arguments_in_every_form(tier, gen):
    import numpy as np

    logits = randn(gen, 2, 4, 60, device=tier.device)
    target = ignored_positions(gen, (2, 4)).to(tier.device)
    expected = perplexity(logits, target, -100, per_sequence=True)
    for ignore in (np.int64(-100), torch.tensor(-100)):
        assert torch.equal(perplexity(logits, target, ignore, per_sequence=True), expected), ignore
    assert math.isclose(perplexity_from_loss(np.float32(1.5)).item(), math.exp(np.float32(1.5)), rel_tol=1e-7)
    tokens = np.array([3, 4])
    assert torch.equal(perplexity_from_loss(torch.tensor([1.0, 2.0]), tokens),
                       perplexity_from_loss(torch.tensor([1.0, 2.0]), [3, 4]))


@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7), (0, 3, 7)], ids=["no_tokens", "no_positions", "no_batch"])
def test_empty_inputs_are_nan_like_torch(tier, shape):
    """No scored token: exp of torch's mean cross-entropy over nothing, NaN (per sequence too), with a gradient of
    the logits' shape."""
    logits = torch.zeros(shape, device=tier.device, requires_grad=True)
    target = torch.zeros(shape[:-1], dtype=torch.long, device=tier.device)
    out = perplexity(logits, target)
    assert torch.isnan(out).item()
    assert torch.isnan(torch.exp(F.cross_entropy(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long))))
    (g,) = torch.autograd.grad(out, logits)
    assert g.shape == logits.shape
    if len(shape) == 3:
        per_sequence = perplexity(logits, target, per_sequence=True)
        assert per_sequence.shape == shape[:1] and torch.isnan(per_sequence).all()


@pytest.mark.parametrize("per_sequence", [False, True])
def test_no_scored_token_is_nan_with_a_zero_gradient(tier, gen, per_sequence):
    """Every position ignored (in one sequence, or in all): NaN, and the zero gradient of torch's all-ignored
    mean cross-entropy (``exp(F.cross_entropy(...))``), not the NaN of a 0 / 0 in the backward."""
    logits = randn(gen, 3, 4, 60)
    target = ignored_positions(gen, (3, 4))
    target[1] = -100
    if not per_sequence:
        target[:] = -100
    x = logits.to(tier.device).requires_grad_(True)
    out = perplexity(x, target.to(tier.device), per_sequence=per_sequence)
    x_ref = logits.double().requires_grad_(True)
    if per_sequence:
        ref = torch.stack([torch.exp(F.cross_entropy(x_ref[b], target[b])) for b in range(3)])
    else:
        ref = torch.exp(F.cross_entropy(x_ref.reshape(-1, 60), target.reshape(-1)))
    assert_close(out, ref, torch.float32)
    (g,) = torch.autograd.grad(out.sum(), x)
    (r,) = torch.autograd.grad(ref.sum(), x_ref)
    assert torch.equal(g[1].cpu() == 0, torch.ones(4, 60, dtype=torch.bool))
    assert_close(g, r, torch.float32, "d logits")


def test_autocast(tier, gen):
    """Under autocast the per-token losses come back in fp32 from cross_entropy: the result is fp32 either way."""
    logits = randn(gen, 3, 6, 64, dtype=torch.bfloat16, device=tier.device, requires_grad=True)
    target = ignored_positions(gen, (3, 6)).to(tier.device)
    with torch.autocast(tier.device.type, dtype=torch.bfloat16):
        out = perplexity(logits, target)
    assert out.dtype == torch.float32
    (g,) = torch.autograd.grad(out, logits)
    assert g.dtype == torch.bfloat16
    ref = torch.exp(F.cross_entropy(logits.detach().cpu().double().reshape(-1, 64), target.cpu().reshape(-1)))
    assert_close(out, ref, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Property test: random shapes and ignored fractions against exp of torch's cross-entropy in fp64

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(batch=st.integers(1, 4), length=st.integers(1, 9), vocab=st.integers(1, 80),
                  ignore=st.sampled_from([0.0, 0.3, 1.0]), per_sequence=st.booleans(), seed=st.integers(0, 2**16))
def test_property_against_torch(tier, batch, length, vocab, ignore, per_sequence, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = randn(gen, batch, length, vocab, scale=2.0)
    target = torch.randint(0, vocab, (batch, length), generator=gen)
    target[torch.rand(batch, length, generator=gen) < ignore] = -100
    x = logits.to(tier.device).requires_grad_(True)
    out = perplexity(x, target.to(tier.device), per_sequence=per_sequence)
    x64 = logits.double().requires_grad_(True)
    token = F.cross_entropy(x64.transpose(1, 2), target, reduction="none")
    scored = (target != -100).sum(1 if per_sequence else None)
    ref = torch.exp(token.sum(1 if per_sequence else None) / scored)
    assert_close(out, ref, torch.float32, "perplexity")
    grad_out = torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(out, x, grad_out.float().to(tier.device))
    (r,) = torch.autograd.grad(ref, x64, grad_out)
    assert_close(g, r, torch.float32, "d logits")


# ---------------------------------------------------------------------------------------------------------------
# The autograd / compile / layout contract (tests/test_contract.py)


def _perplexity_case(shape, **kw):
    def make(gen, dtype):
        return [randn(gen, *shape, dtype=dtype, scale=2.0), ignored_positions(gen, shape[:-1])], kw

    return make


def _loss_case(n, with_tokens):
    def make(gen, dtype):
        loss = (torch.rand(n, generator=gen, dtype=torch.float64) * 3).to(dtype)
        return [loss] + ([torch.randint(1, 50, (n,), generator=gen)] if with_tokens else []), {}

    return make


def _expand_loss(args, kw):
    return [args[0][:1].expand(args[0].shape)] + args[1:], kw


CONTRACT_CASES = [
    Case("perplexity", perplexity, _perplexity_case((3, 5, 60)), compile=True),
    Case("perplexity-per_sequence", perplexity, _perplexity_case((2, 6, 55), per_sequence=True)),
    Case("perplexity_from_loss-num_tokens", perplexity_from_loss, _loss_case(4, True), compile=True,
         stride0=_expand_loss),
    Case("perplexity_from_loss", perplexity_from_loss, _loss_case(3, False)),
]
