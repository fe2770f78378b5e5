"""binary_cross_entropy_with_logits and sigmoid_focal_loss against fp64 eager references, in every tier."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_close, randn


def torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss, written out (torchvision is not a dependency), except that the
    modulating factor's pow is kept out of autograd where 1 - p_t == 0 (inf * 0 there; the limit is 0)."""
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    one_minus = 1 - p_t
    positive = one_minus > 0
    loss = ce * torch.where(positive, torch.where(positive, one_minus, 1.0) ** gamma, 0.0 if gamma else 1.0)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return {"none": loss, "mean": loss.mean() if loss.numel() else loss.sum() / 0, "sum": loss.sum()}[reduction]


def check(tier, fn, ref_fn, x, t, dtype, **kw):
    xt = x.to(tier.device).requires_grad_(True)
    tt = t.to(tier.device).requires_grad_(True)
    kw_dev = {k: (v.to(tier.device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = fn(xt, tt, **kw_dev)
    x64 = x.double().requires_grad_(True)
    t64 = t.double().requires_grad_(True)
    ref = ref_fn(x64, t64, **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "loss")
    go = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    gx, gt = torch.autograd.grad(out, [xt, tt], go.to(out.dtype).to(tier.device))
    rx, rt = torch.autograd.grad(ref, [x64, t64], go.to(out.dtype).double())
    assert_close(gx, rx, dtype, "d input")
    assert_close(gt, rt, dtype, "d target")


SHAPES = {"vector": (37,), "matrix": (9, 17), "large": (3, 5000), "nd": (2, 3, 4, 5)}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", ["none", "weight_full", "pos_weight_last", "both_scalar", "weight_middle"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bce_with_logits(tier, gen, shape, weights, reduction):
    shape = SHAPES[shape]
    x = randn(gen, *shape, scale=4.0)
    t = torch.rand(shape, generator=gen)
    kw = {"reduction": reduction}
    if weights == "weight_full":
        kw["weight"] = torch.rand(shape, generator=gen) + 0.5
    elif weights == "pos_weight_last":
        kw["pos_weight"] = torch.rand(shape[-1], generator=gen) * 3
    elif weights == "both_scalar":
        kw["weight"] = torch.tensor([0.7])
        kw["pos_weight"] = torch.tensor(2.5)
    elif weights == "weight_middle":  # broadcast along a middle dim: materialized on the host
        if len(shape) < 2:
            pytest.skip("needs two dimensions")
        kw["weight"] = torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=gen) + 0.5
        kw["pos_weight"] = torch.rand((1,) * (len(shape) - 1) + (shape[-1],), generator=gen) + 0.5
    check(tier, fusedloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t,
          torch.float32, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_bce_dtypes(tier, gen, dtype):
    x = randn(gen, 6, 300, dtype=dtype, scale=3.0)
    t = (torch.rand(6, 300, generator=gen) > 0.5).to(dtype)
    check(tier, fusedloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t, dtype,
          pos_weight=torch.rand(300, generator=gen).to(dtype) + 0.5)


def test_bce_saturated_logits_are_accurate(tier):
    """|x| = 30: log(1 + exp(-30)) ~ 9e-14 needs log1p, or the loss of the right answer rounds to 0."""
    x = torch.tensor([30.0, -30.0, 30.0, -30.0], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    out = fusedloss.binary_cross_entropy_with_logits(x.to(tier.device), t.to(tier.device), reduction="none")
    assert_close(out, F.binary_cross_entropy_with_logits(x, t, reduction="none"), torch.float64)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_sigmoid_focal_loss(tier, gen, gamma, alpha, reduction):
    x = randn(gen, 7, 130, scale=4.0)
    x[0, :10] = 40.0  # saturated: 1 - p_t rounds to 0 in fp32 for the positives
    t = (torch.rand(7, 130, generator=gen) > 0.7).float()
    t[0, :5] = 1.0
    t[1, :20] = torch.rand(20, generator=gen)  # soft targets are allowed
    check(tier, fusedloss.sigmoid_focal_loss, torchvision_sigmoid_focal_loss, x, t, torch.float32, alpha=alpha,
          gamma=gamma, reduction=reduction)


@pytest.mark.parametrize("gamma", [0.25, 0.5])
def test_sigmoid_focal_gradient_finite_at_saturation(tier, gamma):
    x = torch.tensor([50.0, -50.0, 800.0], device=tier.device, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.0, 1.0], device=tier.device, dtype=torch.float64)
    loss = fusedloss.sigmoid_focal_loss(x, t, gamma=gamma, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and torch.isfinite(loss)


def test_modules_match_functional(tier, gen):
    x = randn(gen, 8, 5, device=tier.device)
    t = torch.rand(8, 5, generator=gen).to(tier.device)
    pw = (torch.rand(5, generator=gen) + 0.5).to(tier.device)
    module = fusedloss.nn.BCEWithLogitsLoss(pos_weight=pw)
    assert "pos_weight" in module.state_dict()
    assert torch.equal(module(x, t), fusedloss.binary_cross_entropy_with_logits(x, t, pos_weight=pw))
    focal = fusedloss.nn.SigmoidFocalLoss(alpha=0.5, gamma=1.0, reduction="mean")
    assert torch.equal(focal(x, t), fusedloss.sigmoid_focal_loss(x, t, alpha=0.5, gamma=1.0, reduction="mean"))


def test_empty(tier):
    x = torch.zeros(0, 3, device=tier.device)
    assert torch.isnan(fusedloss.binary_cross_entropy_with_logits(x, x)).item()
    assert fusedloss.sigmoid_focal_loss(x, x, reduction="sum").item() == 0.0


BAD = [
    ("input", TypeError, lambda x, t: fusedloss.binary_cross_entropy_with_logits(x.long(), t)),
    ("target", TypeError, lambda x, t: fusedloss.binary_cross_entropy_with_logits(x, t.long())),
    ("Target size", ValueError, lambda x, t: fusedloss.binary_cross_entropy_with_logits(x, t[:2])),
    ("reduction", ValueError, lambda x, t: fusedloss.binary_cross_entropy_with_logits(x, t, reduction="x")),
    ("weight", ValueError, lambda x, t: fusedloss.binary_cross_entropy_with_logits(x, t, weight=torch.ones(2, 2))),
    ("pos_weight", ValueError,
     lambda x, t: fusedloss.binary_cross_entropy_with_logits(x, t, pos_weight=torch.ones(4, requires_grad=True))),
    ("gamma", ValueError, lambda x, t: fusedloss.sigmoid_focal_loss(x, t, gamma=-1.0)),
    ("alpha", ValueError, lambda x, t: fusedloss.sigmoid_focal_loss(x, t, alpha=1.5)),
    ("reduction", ValueError, lambda x, t: fusedloss.sigmoid_focal_loss(x, t, reduction="batchmean")),
]


@pytest.mark.parametrize("name,error,call", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(tier, gen, name, error, call):
    if tier.device.type != "cpu":
        pytest.skip("the bad-input table builds CPU tensors; the checks are device-independent")
    x = randn(gen, 3, 4)
    with pytest.raises(error, match=name):
        call(x, torch.rand(3, 4, generator=gen))
