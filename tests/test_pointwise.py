"""mse_loss, l1_loss, huber_loss, smooth_l1_loss, kl_div and bradley_terry_loss against fp64 eager references
(torch's own functions; for Bradley-Terry the seed's formula), in every tier."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_close, randn
from fusedloss.losses.pointwise import bradley_terry_loss, huber_loss, kl_div, l1_loss, mse_loss, smooth_l1_loss


def bradley_terry_reference(chosen, rejected, margin=None, reduction="mean"):
    """The seed's reward-model loss -log sigmoid(r_w - r_l), with TRL's margin subtracted from the gap."""
    loss = -F.logsigmoid(chosen - rejected - (0.0 if margin is None else margin))
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


OURS = {"mse": mse_loss, "l1": l1_loss, "huber": huber_loss, "smooth_l1": smooth_l1_loss, "kl_div": kl_div,
        "bradley_terry": bradley_terry_loss}
REFERENCE = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss, "smooth_l1": F.smooth_l1_loss,
             "kl_div": F.kl_div, "bradley_terry": bradley_terry_reference}


def check(tier, gen, name, operands, dtype, factor=1.0, **kw):
    """Value, dtype, shape and the gradient of every floating operand against the fp64 reference, with a random
    grad_output (the same rounded values for both). ``operands`` are CPU tensors (or None); ``dtype`` sets the
    tolerance."""
    ours = [None if t is None else t.detach().to(tier.device).requires_grad_(t.is_floating_point())
            for t in operands]
    # Integer operands enter the reference as exact fp64 values (torch's huber backward fails on mixed dtypes).
    refs = [None if t is None else t.detach().double().requires_grad_(t.is_floating_point()) for t in operands]
    kw_ours = {k: (v.to(tier.device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    kw_refs = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the broadcasting / 'mean' warnings have their own tests
        out = OURS[name](*ours, **kw_ours)
        ref = REFERENCE[name](*refs, **kw_refs)
        expected_dtype = REFERENCE[name](*operands, **kw).dtype  # torch's own output dtype for these inputs
    assert out.dtype == expected_dtype, f"dtype {out.dtype} != torch's {expected_dtype}"
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, "loss", factor)
    grad_out = (torch.randn(ref.shape, generator=gen, dtype=torch.float64) + 2.0).to(out.dtype)
    diff = [t for t in ours if t is not None and t.requires_grad]
    diff_ref = [t for t in refs if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, diff, grad_out.to(tier.device))
    ref_grads = torch.autograd.grad(ref, diff_ref, grad_out.double())
    for i, (g, r, t) in enumerate(zip(grads, ref_grads, diff)):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, r, dtype, f"d operand {i}", factor)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Regression losses: the shapes catalogue, each case with its reason.

REGRESSION_CASES = {
    "blocks": ((3, 1500), (3, 1500)),  # 4500 elements: several programs, the last one partial
    "one": ((1,), (1,)),  # a single element
    "scalar": ((), ()),  # 0-d tensors, as torch allows
    "nd": ((2, 3, 4, 5), (2, 3, 4, 5)),
    "broadcast": ((5, 1, 7), (4, 1)),  # shapes differ: torch warns, the broadcast is materialized
    "noncontiguous": ((40, 30), (40, 30)),  # transposed views: made contiguous on the host
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(REGRESSION_CASES))
@pytest.mark.parametrize("name", ["mse", "l1", "huber", "smooth_l1"])
def test_regression(tier, gen, name, case, reduction):
    input_shape, target_shape = REGRESSION_CASES[case]
    x = randn(gen, max(math.prod(input_shape), 1), scale=2.0).reshape(input_shape)  # randn(gen) needs a size
    t = randn(gen, max(math.prod(target_shape), 1)).reshape(target_shape)
    if case == "noncontiguous":
        x, t = x.t(), t.t()
    kw = {"delta": 0.7} if name == "huber" else {"beta": 0.7} if name == "smooth_l1" else {}
    check(tier, gen, name, [x, t], torch.float32, reduction=reduction, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("name", ["mse", "l1", "huber"])
def test_regression_weight(tier, gen, name, broadcast, reduction):
    """``weight`` (input's size) is differentiable too; 'mean' divides by weight.sum() for mse/l1 and by numel for
    huber, as torch does; with a broadcast target the weight broadcasts with the input."""
    x = randn(gen, 6, 1 if broadcast else 50, scale=2.0)
    t = randn(gen, 50)
    w = torch.rand(x.shape, generator=gen) + 0.25
    check(tier, gen, name, [x, t], torch.float32, reduction=reduction, weight=w)
    # The weight's own gradient (torch differentiates it): a separate call with weight as an operand.
    weight_grad_reference = {"mse": lambda w: F.mse_loss(x.double(), t.double(), weight=w, reduction=reduction),
                             "l1": lambda w: F.l1_loss(x.double(), t.double(), weight=w, reduction=reduction),
                             "huber": lambda w: F.huber_loss(x.double(), t.double(), weight=w, reduction=reduction)}
    w_ours = w.to(tier.device).requires_grad_(True)
    w_ref = w.double().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = OURS[name](x.to(tier.device), t.to(tier.device), reduction=reduction, weight=w_ours)
        ref = weight_grad_reference[name](w_ref)
    grad_out = torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(out, w_ours, grad_out.float().to(tier.device))
    (r,) = torch.autograd.grad(ref, w_ref, grad_out.float().double())
    assert_close(g, r, torch.float32, "d weight")


@pytest.mark.parametrize("name,kw", [("huber", {"delta": 0.3}), ("huber", {"delta": math.inf}),
                                     ("smooth_l1", {"beta": 2.5}), ("smooth_l1", {"beta": 0.0}),
                                     ("smooth_l1", {"beta": math.inf})])
def test_regression_thresholds(tier, gen, name, kw):
    """Both branches of the piecewise losses, and the limits torch defines: beta = 0 is L1, beta = inf gives 0,
    delta = inf is half the MSE."""
    x = randn(gen, 7, 300, scale=3.0)
    check(tier, gen, name, [x, randn(gen, 7, 300)], torch.float32, reduction="mean", **kw)


def test_l1_gradient_is_zero_at_equality(tier, gen):
    x = randn(gen, 5, 9)
    check(tier, gen, "l1", [x, x.clone()], torch.float32, reduction="sum")


@pytest.mark.parametrize("name", ["mse", "l1", "huber", "smooth_l1"])
def test_regression_mixed_dtypes_and_integer_target(tier, gen, name):
    """fp32 input with an fp64 target promotes (huber keeps the input's dtype, as torch); an integer target
    promotes to the input's dtype and has no gradient."""
    x = randn(gen, 4, 33, scale=3.0)
    check(tier, gen, name, [x, randn(gen, 4, 33, dtype=torch.float64)], torch.float32, reduction="mean")
    check(tier, gen, name, [x, torch.randint(-3, 4, (4, 33), generator=gen)], torch.float32, reduction="none")


def test_regression_broadcast_warns_like_torch(tier, gen):
    x, t = randn(gen, 3, 1, device=tier.device), randn(gen, 3, device=tier.device)
    for fn in (mse_loss, l1_loss, huber_loss, smooth_l1_loss):
        with pytest.warns(UserWarning, match="different to the input size"):
            fn(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mse_loss(x, x.clone())


def test_regression_legacy_reduction(tier, gen):
    x, t = randn(gen, 6, 5, device=tier.device), randn(gen, 6, 5, device=tier.device)
    with pytest.warns(UserWarning, match="deprecated"):
        summed = mse_loss(x, t, size_average=False)
    assert_close(summed, F.mse_loss(x.cpu().double(), t.cpu().double(), reduction="sum"), torch.float32)
    with pytest.warns(UserWarning, match="deprecated"):
        assert smooth_l1_loss(x, t, None, False).shape == (6, 5)  # torch's positional order: reduce is 4th


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["mse", "l1", "huber", "smooth_l1", "kl_div", "bradley_terry"])
def test_dtypes(tier, gen, name, dtype):
    x = randn(gen, 5, 700, dtype=dtype, scale=2.0)
    t = randn(gen, 5, 700, dtype=dtype)
    reduction = "batchmean" if name == "kl_div" else "mean"
    if name == "kl_div":
        x = torch.log_softmax(x.double(), -1).to(dtype)
        t = torch.softmax(t.double(), -1).to(dtype)
    check(tier, gen, name, [x, t], dtype, reduction=reduction)


@pytest.mark.parametrize("name", ["mse", "kl_div", "bradley_terry"])
def test_fused_gradient_is_final_when_grad_output_is_one(tier, gen, name):
    """A plain ``loss.backward()``: the gradient the forward wrote, already divided by the mean's denominator, is
    returned as is (the scaling kernel returns early)."""
    x = randn(gen, 9, 130, device=tier.device, requires_grad=True)
    t = torch.rand(9, 130, generator=gen).to(tier.device)
    reduction = "batchmean" if name == "kl_div" else "mean"
    OURS[name](x, t, reduction=reduction).backward()
    x64 = x.detach().cpu().double().requires_grad_(True)
    REFERENCE[name](x64, t.cpu().double(), reduction=reduction).backward()
    assert_close(x.grad, x64.grad, torch.float32, "d input")


def test_empty(tier):
    x = torch.zeros(0, 3, device=tier.device)
    for fn in (mse_loss, l1_loss, huber_loss, smooth_l1_loss, bradley_terry_loss):
        assert torch.isnan(fn(x, x)).item()
        assert fn(x, x, reduction="sum").item() == 0.0
        assert fn(x, x, reduction="none").shape == (0, 3)
    assert torch.isnan(kl_div(x, x, reduction="batchmean")).item()  # 0 / input.size(0) = 0 / 0, as torch


# ---------------------------------------------------------------------------------------------------------------
# kl_div


KL_CASES = {
    "matrix": ((9, 301), (9, 301)),
    "nd": ((2, 3, 50), (2, 3, 50)),
    "broadcast_target": ((6, 40), (40,)),  # no warning in torch's kl_div
    "broadcast_input": ((40,), (6, 40)),  # batchmean still divides by input.size(0) = 40, as torch
}


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none", "mean"])
@pytest.mark.parametrize("case", list(KL_CASES))
def test_kl_div(tier, gen, case, reduction, log_target):
    input_shape, target_shape = KL_CASES[case]
    x = torch.log_softmax(randn(gen, *input_shape, dtype=torch.float64, scale=2.0), -1).float()
    t = torch.softmax(randn(gen, *target_shape, dtype=torch.float64, scale=2.0), -1).float()
    if log_target:
        t = t.log()
    check(tier, gen, "kl_div", [x, t], torch.float32, reduction=reduction, log_target=log_target)


def test_kl_div_zero_and_negative_targets(tier):
    """torch's conventions: target 0 contributes 0 (xlogy) but its target-gradient is NaN; a negative target
    makes the loss NaN; the input gradient is -target everywhere."""
    x = torch.tensor([-1.0, -2.0, -0.5, -3.0], device=tier.device, requires_grad=True)
    t = torch.tensor([0.0, 0.5, -0.25, 0.25], device=tier.device, requires_grad=True)
    loss = kl_div(x, t, reduction="none")
    x64 = x.detach().cpu().double().requires_grad_(True)
    t64 = t.detach().cpu().double().requires_grad_(True)
    ref = F.kl_div(x64, t64, reduction="none")
    assert_close(loss, ref, torch.float32)  # rel_err requires the NaNs in the same places
    grad_out = torch.tensor([1.5, -0.5, 2.0, 0.25], dtype=torch.float64)
    gx, gt = torch.autograd.grad(loss, [x, t], grad_out.float().to(tier.device))
    rx, rt = torch.autograd.grad(ref, [x64, t64], grad_out)
    assert_close(gx, rx, torch.float32, "d input")
    assert_close(gt, rt, torch.float32, "d target")
    assert torch.isnan(gt[0]).item() and torch.isnan(loss[2]).item()


def test_kl_div_warnings_and_legacy_like_torch(tier, gen):
    x = torch.log_softmax(randn(gen, 4, 6), -1).to(tier.device)
    t = torch.softmax(randn(gen, 4, 6), -1).to(tier.device)
    with pytest.warns(UserWarning, match="'mean' divides the total loss"):
        kl_div(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kl_div(x, t, reduction="batchmean")
    x64, t64 = x.cpu().double(), t.cpu().double()
    for legacy in ({"size_average": False}, {"reduce": False}, {"size_average": True}):
        for reduction in ("mean", "batchmean"):  # torch also divides by input.size(0) for a legacy batchmean
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ours = kl_div(x, t, reduction=reduction, **legacy)
                ref = F.kl_div(x64, t64, reduction=reduction, **legacy)
            assert_close(ours, ref, torch.float32, f"{legacy} {reduction}")


# ---------------------------------------------------------------------------------------------------------------
# Bradley-Terry


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin", ["none", "number", "tensor", "tensor_grad"])
@pytest.mark.parametrize("shape", [(37,), (4097, 1)])  # one program; several, the last partial
def test_bradley_terry(tier, gen, shape, margin, reduction):
    chosen = randn(gen, *shape, scale=3.0)
    rejected = randn(gen, *shape, scale=3.0)
    if margin == "number":
        check(tier, gen, "bradley_terry", [chosen, rejected], torch.float32, margin=0.75, reduction=reduction)
    elif margin == "tensor":  # a per-pair margin is data: passed as a keyword, not differentiated
        check(tier, gen, "bradley_terry", [chosen, rejected], torch.float32, reduction=reduction,
              margin=torch.rand(shape, generator=gen))
    elif margin == "tensor_grad":
        check(tier, gen, "bradley_terry", [chosen, rejected, torch.rand(shape, generator=gen)], torch.float32,
              reduction=reduction)
    else:
        check(tier, gen, "bradley_terry", [chosen, rejected], torch.float32, reduction=reduction)


def test_bradley_terry_is_the_seed_formula_at_large_gaps(tier):
    """-log sigmoid(u) for |u| up to 60: log1p keeps the loss of a confident right answer (~exp(-60)) instead of
    rounding it to 0, and a confident wrong answer costs |u|, without overflow."""
    chosen = torch.tensor([60.0, -60.0, 0.0, 20.0], dtype=torch.float64)
    rejected = torch.tensor([0.0, 0.0, 0.0, -20.0], dtype=torch.float64)
    out = bradley_terry_loss(chosen.to(tier.device), rejected.to(tier.device), reduction="none")
    expected = -torch.log(torch.sigmoid(chosen - rejected))  # the seed's formula, exact in fp64 here
    expected[0] = math.exp(-60.0)  # -log(sigmoid(60)) = log1p(exp(-60)), which sigmoid's rounding loses
    assert_close(out, expected, torch.float64)
    broadcast = bradley_terry_loss(torch.zeros(3, 1, device=tier.device), torch.zeros(4, device=tier.device),
                                   margin=torch.zeros(1, 4, device=tier.device), reduction="none")
    assert broadcast.shape == (3, 4) and torch.allclose(broadcast.cpu(), torch.full((3, 4), math.log(2.0)))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: every metadata check raises before any launch, naming the argument.

BAD = [
    ("input", TypeError, lambda x, t: mse_loss(x.long(), t)),
    ("target", TypeError, lambda x, t: l1_loss(x, t > 0)),
    ("target", ValueError, lambda x, t: mse_loss(x, t[:, :3])),
    ("reduction", ValueError, lambda x, t: mse_loss(x, t, reduction="batchmean")),
    ("weight", ValueError, lambda x, t: mse_loss(x, t, weight=torch.ones(4))),
    ("weight", TypeError, lambda x, t: l1_loss(x, t, weight=torch.ones(3, 4, dtype=torch.long))),
    ("delta", ValueError, lambda x, t: huber_loss(x, t, delta=0.0)),
    ("delta", ValueError, lambda x, t: huber_loss(x, t, delta=float("nan"))),
    ("beta", ValueError, lambda x, t: smooth_l1_loss(x, t, beta=-1.0)),
    ("beta", TypeError, lambda x, t: smooth_l1_loss(x, t, beta=torch.ones(2))),
    ("target", TypeError, lambda x, t: kl_div(x, t.long())),
    ("input", TypeError, lambda x, t: kl_div(x.int(), t)),
    ("reduction", ValueError, lambda x, t: kl_div(x, t, reduction="avg")),
    ("target", ValueError, lambda x, t: kl_div(x, t[:2, :2])),
    ("chosen_rewards", TypeError, lambda x, t: bradley_terry_loss(x.long(), t)),
    ("rejected_rewards", ValueError, lambda x, t: bradley_terry_loss(x, t[:, :2])),
    ("margin", ValueError, lambda x, t: bradley_terry_loss(x, t, margin=torch.zeros(5))),
    ("margin", TypeError, lambda x, t: bradley_terry_loss(x, t, margin="0.5")),
    ("reduction", ValueError, lambda x, t: bradley_terry_loss(x, t, reduction="batchmean")),
]


@pytest.mark.parametrize("name,error,call", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(tier, gen, name, error, call):
    if tier.device.type != "cpu":
        pytest.skip("the bad-input table builds CPU tensors; the checks are device-independent")
    with pytest.raises(error, match=name), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(randn(gen, 3, 4), randn(gen, 3, 4))


def test_exports_and_modules(tier, gen):
    """The public names (``fusedloss.<fn>``) and the ``fusedloss.nn`` wrappers."""
    names = ("mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "kl_div", "bradley_terry_loss")
    assert all(getattr(fusedloss, n) is OURS[k] for n, k in zip(names, OURS))
    x, t = randn(gen, 6, 5, device=tier.device), randn(gen, 6, 5, device=tier.device)
    w = torch.rand(6, 5, generator=gen).to(tier.device)
    assert torch.equal(fusedloss.nn.MSELoss(reduction="sum", weight=w)(x, t), mse_loss(x, t, reduction="sum",
                                                                                         weight=w))
    assert torch.equal(fusedloss.nn.L1Loss()(x, t), l1_loss(x, t))
    assert torch.equal(fusedloss.nn.HuberLoss(delta=0.5)(x, t), huber_loss(x, t, delta=0.5))
    assert torch.equal(fusedloss.nn.SmoothL1Loss(beta=0.5)(x, t), smooth_l1_loss(x, t, beta=0.5))
    assert torch.equal(fusedloss.nn.KLDivLoss(reduction="batchmean", log_target=True)(x, t),
                       kl_div(x, t, reduction="batchmean", log_target=True))
    assert torch.equal(fusedloss.nn.BradleyTerryLoss(margin=0.5)(x, t), bradley_terry_loss(x, t, margin=0.5))
    assert "weight" in fusedloss.nn.MSELoss(weight=w).state_dict()
