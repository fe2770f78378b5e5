"""``log_probs`` and ``linear_log_probs`` against fp64 references, in every tier: the per-token log-probability of the
target and the entropy of the token distribution, under a temperature (a number or one per token), a soft cap,
ignored tokens and a causal shift, with gradients arriving at either output or both; the post-training frameworks'
own eager definitions (verl's and TRL's, written out below); and a GRPO-style training loop on a tiny model that
must follow the eager one step for step.

The linear variant runs the LM-head engine on 16-token chunks (``chunk_rows``), so that the small problems here
cross several chunks.
"""

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.losses import log_probs as host

from conftest import Case, assert_close, randn, readme_example

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def reference(logits, target, *, temperature=1.0, ignore_index=-100, softcap=None):
    """(log p_y, entropy) in fp64 from the logits, 0 on ignored tokens."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
    z = z / (t.unsqueeze(-1) if isinstance(t, torch.Tensor) else t)
    log_p = torch.log_softmax(z, dim=-1)
    valid = target != ignore_index
    lp = log_p.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, entropy, 0.0)


# verl (verl/utils/torch_functional.py: logprobs_from_logits_naive, entropy_from_logits) and TRL
# (trl/trainer/utils.py: selective_log_softmax, entropy_from_logits), as they define them
def verl_logprobs(logits, labels):
    return torch.gather(F.log_softmax(logits, dim=-1), -1, labels.unsqueeze(-1)).squeeze(-1)


def verl_entropy(logits):
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


def trl_selective_log_softmax(logits, index):
    return torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _inputs(gen, tier, dtype, lead=(3, 13), vocab=300, ignore=True, scale=3.0):
    logits = randn(gen, *lead, vocab, dtype=dtype, device=tier.device, scale=scale, requires_grad=True)
    target = torch.randint(0, vocab, lead, generator=gen)
    if ignore:
        target[torch.rand(lead, generator=gen) < 0.2] = -100
    return logits, target.to(tier.device)


def _temperature(kind, gen, lead, device):
    if kind == "tensor":
        return (torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5).to(device)
    return 0.7 if kind == "number" else 1.0


def _check(out, expected, leaves, gen, dtype, grads_into):
    """Values, then the gradients of ``leaves`` for random gradients arriving at the outputs ``grads_into``."""
    outs = out if isinstance(out, tuple) else (out,)
    for got, want, name in zip(outs, expected, ("logprobs", "entropy")):
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        assert_close(got, want, dtype, name)
    chosen = [i for i in grads_into if i < len(outs)]
    gos = [torch.randn(outs[i].shape, generator=gen, dtype=torch.float64).to(outs[i].device) for i in chosen]
    got = torch.autograd.grad([outs[i] for i in chosen], leaves, [g.to(outs[i].dtype) for g, i in zip(gos, chosen)])
    want = torch.autograd.grad([expected[i] for i in chosen], leaves, gos)
    for g, w, index in zip(got, want, range(len(leaves))):
        assert_close(g, w, dtype, f"gradient {index} (gradients into outputs {chosen})")


@pytest.mark.parametrize("grads_into", [(0,), (1,), (0, 1)], ids=["logprob", "entropy", "both"])
@pytest.mark.parametrize("temperature", ["one", "number", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_log_probs(tier, gen, dtype, temperature, grads_into):
    logits, target = _inputs(gen, tier, dtype)
    t = _temperature(temperature, gen, target.shape, tier.device)
    out = fusedloss.log_probs(logits, target, temperature=t, return_entropy=True)
    _check(out, reference(logits, target, temperature=t), [logits], gen, dtype, grads_into)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_log_probs_softcap_and_large_vocabulary(tier, gen, softcap):
    """A vocabulary of several column blocks (5000 > 4096), logits large enough for the cap to matter."""
    logits, target = _inputs(gen, tier, torch.float32, lead=(6,), vocab=5000, scale=8.0)
    out = fusedloss.log_probs(logits, target, softcap=softcap, return_entropy=True)
    _check(out, reference(logits, target, softcap=softcap), [logits], gen, torch.float32, (0, 1))


def test_log_probs_match_verl_and_trl(tier, gen):
    """The frameworks' own definitions on the same logits (temperature applied by the caller, as they do)."""
    logits, target = _inputs(gen, tier, torch.float32, ignore=False)
    lp, ent = fusedloss.log_probs(logits, target, temperature=0.8, return_entropy=True)
    scaled = logits.double() / 0.8
    assert_close(lp, verl_logprobs(scaled, target), torch.float32, "verl logprobs")
    assert_close(lp, trl_selective_log_softmax(scaled, target), torch.float32, "TRL selective_log_softmax")
    assert_close(ent, verl_entropy(scaled), torch.float32, "verl / TRL entropy")


@pytest.fixture
def chunked(monkeypatch):
    """16-token chunks of the LM-head engine."""
    real = host._options

    def options(*args, **kwargs):
        opts, inv_t = real(*args, **kwargs)
        return dataclasses.replace(opts, chunk_rows=16), inv_t

    monkeypatch.setattr(host, "_options", options)


@pytest.mark.parametrize("grads_into", [(0,), (1,), (0, 1)], ids=["logprob", "entropy", "both"])
@pytest.mark.parametrize("case", ["plain", "bias-shift-softcap-temperature_tensor", "temperature_number"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_log_probs(tier, gen, chunked, dtype, case, grads_into):
    lead, hidden, vocab = (3, 13), 24, 300
    x = randn(gen, *lead, hidden, dtype=dtype, device=tier.device, requires_grad=True)
    w = randn(gen, vocab, hidden, dtype=dtype, device=tier.device, scale=2 / hidden ** 0.5, requires_grad=True)
    b = randn(gen, vocab, dtype=dtype, device=tier.device, requires_grad=True) if "bias" in case else None
    target = torch.randint(0, vocab, lead, generator=gen)
    target[torch.rand(lead, generator=gen) < 0.2] = -100
    target = target.to(tier.device)
    shift = "shift" in case
    softcap = 4.0 if "softcap" in case else None
    temperature = _temperature("tensor" if "tensor" in case else "number" if "number" in case else "one", gen, lead,
                               tier.device)
    out = fusedloss.linear_log_probs(x, w, target, linear_bias=b, temperature=temperature, shift=shift,
                                     softcap=softcap, return_entropy=True)
    logits = F.linear(x.double(), w.double(), None if b is None else b.double())
    y = torch.cat([target[..., 1:], torch.full_like(target[..., :1], -100)], dim=-1) if shift else target
    expected = reference(logits, y, temperature=temperature, softcap=softcap)
    _check(out, expected, [t for t in (x, w, b) if t is not None], gen, dtype, grads_into)


def test_linear_log_probs_without_entropy_and_all_ignored(tier, gen, chunked):
    x = randn(gen, 20, 8, dtype=torch.float64, device=tier.device, requires_grad=True)
    w = randn(gen, 50, 8, dtype=torch.float64, device=tier.device, requires_grad=True)
    target = torch.full((20,), -100, device=tier.device)
    lp = fusedloss.linear_log_probs(x, w, target)
    assert torch.all(lp == 0)
    gx, gw = torch.autograd.grad(lp.sum(), (x, w))
    assert torch.all(gx == 0) and torch.all(gw == 0)


def test_bad_arguments(tier):
    x, w, t = torch.randn(4, 8, device=tier.device), torch.randn(10, 8, device=tier.device), \
        torch.zeros(4, dtype=torch.long, device=tier.device)
    with pytest.raises(ValueError, match="temperature"):
        fusedloss.linear_log_probs(x, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        fusedloss.log_probs(torch.randn(4, 10, device=tier.device), t, temperature=torch.ones(3, device=tier.device))
    with pytest.raises(ValueError, match="linear_weight"):
        fusedloss.linear_log_probs(x, torch.randn(10, 7, device=tier.device), t)
    with pytest.raises(TypeError, match="target"):
        fusedloss.log_probs(torch.randn(4, 10, device=tier.device), t.float())
    with pytest.raises(ValueError, match="target"):
        fusedloss.log_probs(torch.randn(4, 10, device=tier.device), t[:3])
    if tier.name != "cuda":  # out-of-range class indices: torch's IndexError on the CPU backends
        with pytest.raises(IndexError):
            fusedloss.log_probs(torch.randn(3, 10), torch.tensor([1, 12, 3]))


class _TinyPolicy(torch.nn.Module):
    def __init__(self, vocab, hidden, gen):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 0.5)
        self.mix = torch.nn.Parameter(torch.randn(hidden, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5)
        self.head = torch.nn.Parameter(torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5)

    def hidden(self, tokens):
        return torch.tanh(self.embed[tokens] @ self.mix)


def test_grpo_training_follows_eager(tier, gen):
    """Five GRPO-style steps of a tiny policy: the README's loss on ``linear_log_probs`` (shift, temperature,
    entropy bonus, prompt tokens ignored) and the eager log_softmax / gather / entropy give the same losses and
    parameters at every step."""
    vocab, hidden, temperature = 40, 16, 0.9
    tokens = torch.randint(0, vocab, (4, 12), generator=gen).to(tier.device)
    labels = tokens.clone()
    labels[:, :5] = -100  # the prompt
    advantages = torch.randn(4, 1, generator=gen, dtype=torch.float64).expand(4, 11).to(tier.device)
    models = [_TinyPolicy(vocab, hidden, torch.Generator().manual_seed(7)).to(tier.device) for _ in range(2)]
    mask = (labels[:, 1:] != -100).double()
    y = labels[:, 1:]

    def eager_logprobs(model):
        log_p = torch.log_softmax((model.hidden(tokens) @ model.head.T)[:, :-1] / temperature, dim=-1)
        lp = log_p.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (y != -100)
        return lp, -(log_p.exp() * log_p).sum(-1) * (y != -100)

    with torch.no_grad():
        old_logprobs = eager_logprobs(models[1])[0]
    example = readme_example("grpo")
    for step in range(5):
        fused, eager = models
        fused.zero_grad()
        namespace = dict(fusedloss=fusedloss, torch=torch, hidden=fused.hidden(tokens),
                         lm_head=types.SimpleNamespace(weight=fused.head), labels=labels, temperature=temperature,
                         old_logprobs=old_logprobs, advantages=advantages)
        exec(example, namespace)  # computes the loss and calls backward
        eager.zero_grad()
        lp, ent = eager_logprobs(eager)
        ratio = torch.exp(lp - old_logprobs)
        surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages)
        loss = -((surrogate + 0.01 * ent) * mask).sum() / mask.sum()
        loss.backward()
        assert_close(namespace["loss"].detach(), loss.detach(), torch.float64, f"loss at step {step}")
        with torch.no_grad():
            for model in models:
                for p in model.parameters():
                    p -= 0.5 * p.grad
        for p, q in zip(fused.parameters(), eager.parameters()):
            assert_close(p, q, torch.float64, f"parameters after step {step}")


def test_verl_adapter(tier, gen):
    """verl's fused-kernel contract (its test's eager reference, written out): log-probs (<= 0) and entropies at a
    temperature, fp32, flattened, with the gradients of the same eager function."""
    from fusedloss.integrations import verl

    hidden = randn(gen, 1, 37, 24, dtype=torch.bfloat16, device=tier.device, requires_grad=True)
    weight = randn(gen, 300, 24, dtype=torch.bfloat16, device=tier.device, scale=0.3, requires_grad=True)
    labels = torch.randint(0, 300, (1, 37), generator=gen).to(tier.device)
    logprobs, entropy = verl.linear_cross_entropy(hidden, weight, labels, 0.7)
    assert logprobs.shape == entropy.shape == (37,) and logprobs.dtype == entropy.dtype == torch.float32
    logits = (hidden.reshape(-1, 24).double() @ weight.double().T) / 0.7
    ref_lp = -F.cross_entropy(logits, labels.reshape(-1), reduction="none")
    ref_ent = torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    assert_close(logprobs, ref_lp, torch.bfloat16, "logprobs")
    assert_close(entropy, ref_ent, torch.bfloat16, "entropy")
    go = [torch.randn(37, generator=gen, dtype=torch.float64).to(tier.device) for _ in range(2)]
    got = torch.autograd.grad([logprobs, entropy], [hidden, weight], [g.float() for g in go])
    want = torch.autograd.grad([ref_lp, ref_ent], [hidden, weight], go)
    for g, w, name in zip(got, want, ("hidden", "weight")):
        assert_close(g, w, torch.bfloat16, f"{name} gradient")
    with pytest.raises(ValueError, match="reduction"):
        verl.linear_cross_entropy(hidden, weight, labels, 1.0, reduction="mean")


def test_kernel_hub_causal_lm_loss(tier, gen):
    """``for_causal_lm_loss`` with the kernel hub's keywords equals transformers' ForCausalLMLoss on the logits:
    shifted labels, given ``shift_labels``, ``num_items_in_batch``, a final soft cap."""
    pytest.importorskip("transformers")
    from transformers.loss.loss_utils import ForCausalLMLoss

    from fusedloss.integrations.transformers import for_causal_lm_loss

    hidden = randn(gen, 2, 9, 16, dtype=torch.float32, device=tier.device, requires_grad=True)
    weight = randn(gen, 50, 16, dtype=torch.float32, device=tier.device, scale=0.5, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9), generator=gen).to(tier.device)
    labels[:, :3] = -100
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    for kw in (dict(), dict(num_items_in_batch=torch.tensor(7)), dict(shift_labels=shifted),
               dict(final_logit_softcapping=2.0)):
        cap = kw.pop("final_logit_softcapping", None)
        got = for_causal_lm_loss(hidden_states=hidden, lm_head_weight=weight, labels=labels, hidden_size=16,
                                 final_logit_softcapping=cap, **kw)
        logits = hidden @ weight.T
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        want = ForCausalLMLoss(logits, labels, 50, **kw)
        assert_close(got, want, torch.float32, f"loss with {sorted(kw)}, cap {cap}")
        g_got, g_want = torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight))
        for a, b in zip(g_got, g_want):
            assert_close(a, b, torch.float32, f"gradient with {sorted(kw)}, cap {cap}")


def _lp_case(kind, **kw):
    def make(gen, dtype):
        logits = randn(gen, 2, 7, 30, dtype=dtype, scale=2.0)
        target = torch.randint(0, 30, (2, 7), generator=gen)
        target[0, :2] = -100
        if kind == "logits":
            return [logits, target], kw
        x = randn(gen, 2, 7, 8, dtype=dtype)
        w = randn(gen, 30, 8, dtype=dtype, scale=8 ** -0.5)
        return [x, w, target, randn(gen, 30, dtype=dtype)], kw

    return make


def _logprob_plus_entropy(*args, **kw):
    """Both differentiable outputs in one tensor: the log-probs plus half the entropies."""
    lp, ent = fusedloss.log_probs(*args, return_entropy=True, **kw)
    return lp + 0.5 * ent


def _linear(input, weight, target, bias=None, **kw):
    lp, ent = fusedloss.linear_log_probs(input, weight, target, linear_bias=bias, return_entropy=True, **kw)
    return lp - 0.3 * ent


CONTRACT_CASES = [
    Case("log_probs-entropy-softcap-temperature", _logprob_plus_entropy,
         _lp_case("logits", softcap=3.0, temperature=0.8), compile=True),
    Case("log_probs-plain", fusedloss.log_probs, _lp_case("logits")),
    Case("linear_log_probs-entropy-shift-bias", _linear, _lp_case("linear", shift=True, temperature=1.3),
         grad_args=(0, 1, 3), compile=True),
]
