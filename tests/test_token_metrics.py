"""Token metrics beside the loss (``return_token_accuracy``, ``return_entropy``): per-token accuracy and entropy of
the logits, against their eager definitions, from ``cross_entropy`` and from ``linear_cross_entropy`` on every
engine (the chunked schedule, which a call asking for metrics runs on the Triton tiers, across several token
chunks, and the torch backend), with ignored tokens, a soft cap, ties in the argmax, and the loss unchanged."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.losses import linear_cross_entropy as lce_host

from conftest import assert_close, randn


def eager_metrics(logits, target, ignore_index=-100, softcap=None):
    """(accuracy, entropy) per token in fp64, 0 on ignored tokens; logits (..., C) class-last."""
    valid = target != ignore_index
    accuracy = (logits.argmax(-1) == target) & valid
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z, dim=-1)
    entropy = torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0)
    return accuracy.double(), entropy


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_metrics(tier, gen, dtype, softcap):
    logits = randn(gen, 37, 50, dtype=dtype, device=tier.device, scale=3.0, requires_grad=True)
    target = torch.randint(0, 50, (37,), generator=gen)
    target[::5] = -100
    target[1] = logits[1].argmax().item()  # at least one hit
    target = target.to(tier.device)
    out = fusedloss.cross_entropy(logits, target, softcap=softcap, return_token_accuracy=True, return_entropy=True)
    assert isinstance(out, fusedloss.LossWithMetrics)
    assert torch.equal(out.loss, fusedloss.cross_entropy(logits, target, softcap=softcap))
    accuracy, entropy = eager_metrics(logits, target, softcap=softcap)
    assert torch.equal(out.token_accuracy.double(), accuracy)
    assert_close(out.entropy, entropy, dtype, "entropy")
    out.loss.backward()  # the loss keeps its gradient; the metrics are detached
    assert logits.grad is not None and not out.entropy.requires_grad


def test_argmax_ties_as_torch(tier):
    """Two maximal classes: the first one is the prediction, as torch.argmax decides."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 1.0, 2.0]], device=tier.device)
    for target, hit in (([1, 0], [1.0, 1.0]), ([2, 3], [0.0, 0.0])):
        t = torch.tensor(target, device=tier.device)
        out = fusedloss.cross_entropy(logits, t, return_token_accuracy=True)
        assert out.token_accuracy.tolist() == hit and out.entropy is None


@pytest.mark.parametrize("schedule", ["pointer", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_linear_cross_entropy_metrics(tier, gen, monkeypatch, dtype, schedule):
    if tier.name != "cuda":
        from fusedloss.kernels import configs

        monkeypatch.setattr(configs, "LCE_OVERRIDE", {"chunk_rows": 16})
        monkeypatch.setattr(lce_host, "TORCH_CHUNK_BYTES", 16 * 100 * 8)
    x = randn(gen, 3, 13, 24, dtype=dtype, device=tier.device, requires_grad=True)
    w = randn(gen, 100, 24, dtype=dtype, device=tier.device, scale=0.5, requires_grad=True)
    target = torch.randint(0, 100, (3, 13), generator=gen)
    target[:, :3] = -100
    target = target.to(tier.device)
    kw = dict(softcap=5.0, label_smoothing=0.1, schedule=schedule)
    out = fusedloss.linear_cross_entropy(x, w, target, return_token_accuracy=True, return_entropy=True,
                                         return_lse=True, **kw)
    loss, lse = fusedloss.linear_cross_entropy(x, w, target, return_lse=True, **kw)
    assert_close(out.loss, loss, dtype, "loss")
    assert_close(out.lse, lse, dtype, "lse")
    logits = F.linear(x.double(), w.double())
    accuracy, entropy = eager_metrics(logits, target, softcap=5.0)
    assert out.token_accuracy.shape == entropy.shape == target.shape
    # bf16 logits can round two near-maximal logits together: compare the accuracy where the top two differ
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05
    assert torch.equal(out.token_accuracy.double()[clear], accuracy[clear])
    assert_close(out.entropy, entropy, dtype, "entropy")
    gx, gw = torch.autograd.grad(out.loss, (x, w))
    ex, ew = torch.autograd.grad(loss, (x, w))
    assert_close(gx, ex, dtype, "input gradient")
    assert_close(gw, ew, dtype, "weight gradient")


def test_metrics_arguments(tier):
    x = torch.randn(4, 10, device=tier.device)
    with pytest.raises(ValueError, match="class-index"):
        fusedloss.cross_entropy(x, torch.softmax(x, -1), return_token_accuracy=True)
    with pytest.raises(TypeError, match="return_entropy"):
        fusedloss.cross_entropy(x, torch.zeros(4, dtype=torch.long, device=tier.device), return_entropy="yes")
