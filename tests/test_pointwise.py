"""mse_loss, l1_loss, huber_loss, smooth_l1_loss, kl_div and bradley_terry_loss against fp64 eager references
(torch's own functions; for Bradley-Terry ``-logsigmoid(chosen - rejected - margin)``), in every tier."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.losses.pointwise import bradley_terry_loss, huber_loss, kl_div, l1_loss, mse_loss, smooth_l1_loss

from conftest import Case, assert_close, randn


def bradley_terry_reference(chosen, rejected, margin=None, reduction="mean"):
    """The reward-model loss -log sigmoid(r_w - r_l), with TRL's margin subtracted from the gap."""
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
    "noncontiguous": ((40, 30), (40, 30)),  # transposed views: read through their strides
    "expanded": ((6, 50), (50,)),  # the target expanded to the input's shape (stride 0): read in place
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
    if case == "expanded":
        t = t.expand(input_shape)
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


@pytest.mark.parametrize("name", ["mse", "l1"])
def test_weighted_mean_with_zero_weights_is_torchs(tier, gen, name):
    """'mean' divides by weight.sum() even when it is 0 (every element masked): torch's loss is 0 / 0 = NaN and so
    are the gradients; no zero-gradient convention here."""
    out = check(tier, gen, name, [randn(gen, 3, 5, scale=2.0), randn(gen, 3, 5)], torch.float32, reduction="mean",
                weight=torch.zeros(3, 5))
    assert torch.isnan(out).item()


def test_l1_gradient_is_zero_at_equality(tier, gen):
    x = randn(gen, 5, 9)
    check(tier, gen, "l1", [x, x.clone()], torch.float32, reduction="sum")


@pytest.mark.parametrize("name", ["mse", "l1", "huber", "smooth_l1"])
def test_regression_mixed_dtypes_and_integer_target(tier, gen, name):
    """fp32 input with an fp64 target promotes (huber keeps the input's dtype, as torch); an integer target of any
    width and signedness (and bool, except for l1, which torch refuses) promotes to the input's dtype, read as its
    value (an int8 -3 is -3, a uint8 200 is 200), and has no gradient."""
    x = randn(gen, 4, 33, scale=3.0)
    check(tier, gen, name, [x, randn(gen, 4, 33, dtype=torch.float64)], torch.float32, reduction="mean")
    for dtype, low, high in ((torch.int64, -3, 4), (torch.int8, -3, 4), (torch.uint8, 190, 210),
                             (torch.int32, -3, 4), (torch.bool, 0, 2)):
        if name == "l1" and dtype == torch.bool:
            continue
        target = torch.randint(low, high, (4, 33), generator=gen).to(dtype)
        check(tier, gen, name, [x, target], torch.float32, reduction="none")


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


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0,)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
@pytest.mark.parametrize("name", list(OURS))
def test_empty_and_zero_width_inputs_give_torchs_answer(tier, name, shape, reduction):
    if reduction == "batchmean" and name != "kl_div":
        pytest.skip("batchmean is kl_div's")
    x = torch.zeros(shape, device=tier.device, requires_grad=True)
    t = torch.zeros(shape, device=tier.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kl_div's 'mean' warning has its own test
        out = OURS[name](x, t, reduction=reduction)
        expected = REFERENCE[name](x.detach().cpu(), t.cpu(), reduction=reduction)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_close(out, expected, torch.float64, "empty loss")  # NaN where torch's is NaN, equal elsewhere
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape


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


def test_bradley_terry_is_minus_log_sigmoid_at_large_gaps(tier):
    """-log sigmoid(u) for |u| up to 60: log1p keeps the loss of a confident right answer (~exp(-60)) instead of
    rounding it to 0, and a confident wrong answer costs |u|, without overflow."""
    chosen = torch.tensor([60.0, -60.0, 0.0, 20.0], dtype=torch.float64)
    rejected = torch.tensor([0.0, 0.0, 0.0, -20.0], dtype=torch.float64)
    out = bradley_terry_loss(chosen.to(tier.device), rejected.to(tier.device), reduction="none")
    expected = -torch.log(torch.sigmoid(chosen - rejected))  # the definition, exact in fp64 here
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


# ---------------------------------------------------------------------------------------------------------------
# NaN and infinite inputs: torch's values and gradients, element by element

SPECIAL = (math.nan, math.inf, -math.inf)

SPECIAL_CASES = {
    "mse": {}, "l1": {}, "huber": {"delta": 0.7}, "huber-inf_delta": {"delta": math.inf},
    "smooth_l1": {"beta": 0.7}, "smooth_l1-inf_beta": {"beta": math.inf}, "smooth_l1-zero_beta": {"beta": 0.0},
    "kl_div": {}, "kl_div-log_target": {"log_target": True}, "bradley_terry": {"margin": 0.5},
}


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("case", list(SPECIAL_CASES))
def test_nan_and_inf_like_torch(tier, case, reduction):
    """torch's gradient at a NaN difference is NaN for huber and smooth_l1 (a clamp would give the finite bound),
    0 for l1 (sign(NaN) = 0), inf - inf = NaN for the others; kl_div's target gradient is NaN at t = inf; every
    loss and gradient of the kernel follows torch's, element by element."""
    from test_binary import compare_special, special_grid

    name = case.split("-")[0]
    if name == "kl_div":
        x, t = special_grid(SPECIAL + (0.0, -1.5), SPECIAL + (0.0, 0.3, -0.2))
    else:
        x, t = special_grid(SPECIAL + (0.0, 1.5, -40.0), SPECIAL + (0.0, 1.0, 0.3))
    compare_special(tier, OURS[name], REFERENCE[name], x, t, reduction, **SPECIAL_CASES[case])


def test_weight_nan_and_inf_like_torch(tier):
    from test_binary import compare_special, special_grid

    x, t = special_grid(SPECIAL + (0.0, 1.5), SPECIAL + (0.0, 0.3))
    w = torch.tensor([1.0, math.inf, math.nan, 0.0, 0.5], dtype=torch.float64).repeat(x.numel() // 5)
    for name in ("mse", "l1", "huber"):
        compare_special(tier, OURS[name], REFERENCE[name], x, t, "none", weight=w)


# ---------------------------------------------------------------------------------------------------------------
# Higher order, autocast, number forms


@pytest.mark.parametrize("name,kw", [("mse", {}), ("mse", {"reduction": "sum", "weight": True}),
                                     ("huber", {"delta": 0.5}), ("bradley_terry", {})])
def test_hessian_vector_product(tier, gen, name, kw):
    """``torch.autograd.functional.hvp`` differentiates the gradient (create_graph=True): the definition's second
    derivative, e.g. 2 v / numel for mse_loss, never zeros."""
    x = randn(gen, 4, 6, dtype=torch.float64, device=tier.device)
    t = randn(gen, 4, 6, dtype=torch.float64, device=tier.device)
    v = randn(gen, 4, 6, dtype=torch.float64, device=tier.device)
    if kw.get("weight"):
        kw = dict(kw, weight=(torch.rand(4, 6, generator=gen, dtype=torch.float64) + 0.5).to(tier.device))
    _, hvp = torch.autograd.functional.hvp(lambda a: OURS[name](a, t, **kw), x, v)
    _, expected = torch.autograd.functional.hvp(lambda a: REFERENCE[name](a.cpu(), t.cpu(), **kw), x.cpu(), v.cpu())
    assert_close(hvp, expected, torch.float64, "hvp")
    assert hvp.abs().sum() > 0
    if name == "mse" and not kw:
        assert_close(hvp, 2 * v / x.numel(), torch.float64, "2 v / numel")


@pytest.mark.parametrize("name", ["mse", "l1", "huber", "smooth_l1", "kl_div", "bradley_terry", "mse-weight"])
def test_autocast_follows_torch(tier, gen, name):
    """Under autocast the losses torch runs in fp32 return fp32 for bf16 inputs; Bradley-Terry keeps the inputs'
    dtype, as torch's logsigmoid does. With a weight, mse_loss returns fp32 too (the fp32 policy of the function
    replaced), where torch's own weighted composite is fp32 on CUDA (its pow is on the fp32 list) and bf16 on CPU."""
    name, weighted = name.split("-")[0], name.endswith("weight")
    x = randn(gen, 8, 40, dtype=torch.bfloat16, device=tier.device, requires_grad=True)
    t = randn(gen, 8, 40, dtype=torch.bfloat16, device=tier.device)
    kw = {"reduction": "batchmean"} if name == "kl_div" else {}
    if weighted:
        kw["weight"] = (torch.rand(8, 40, generator=gen) + 0.5).to(torch.bfloat16).to(tier.device)
    with torch.autocast(tier.device.type, dtype=torch.bfloat16):
        ours = OURS[name](x, t, **kw)
        theirs = REFERENCE[name](x, t, **kw)
    expected_dtype = torch.float32 if weighted else theirs.dtype
    assert ours.dtype == expected_dtype == (torch.bfloat16 if name == "bradley_terry" else torch.float32)
    reference = REFERENCE[name](x.detach().double(), t.double(), **{k: v.double() if isinstance(v, torch.Tensor)
                                                                  else v for k, v in kw.items()})
    assert_close(ours, reference, torch.bfloat16, "loss under autocast")
    (g,) = torch.autograd.grad(ours, x)
    assert g.dtype == torch.bfloat16


def test_number_arguments_in_every_form(tier, gen):
    import numpy as np

    x, t = randn(gen, 4, 9, device=tier.device), randn(gen, 4, 9, device=tier.device)
    for fn, name, value in ((huber_loss, "delta", 0.5), (smooth_l1_loss, "beta", 0.5),
                            (bradley_terry_loss, "margin", 0.5)):
        expected = fn(x, t, **{name: value})
        for form in (np.float32(value), np.float64(value), torch.tensor(value, dtype=torch.float64)):
            assert_close(fn(x, t, **{name: form}), expected, torch.float32, f"{name}={form!r}")
    with pytest.raises(TypeError, match="log_target"):  # torch's kl_div refuses a NumPy bool too
        kl_div(x, t, reduction="batchmean", log_target=np.bool_(True))


# ---------------------------------------------------------------------------------------------------------------
# The autograd / compile / layout contract (tests/test_contract.py)


def _case(name, shapes, *rest, positive_target=False, weight=None, margin=None):
    """``[input, target, *rest]`` of ``shapes`` (rest: the remaining positional arguments, in the function's
    order); ``weight`` / ``margin`` (a shape) replace the argument at that position of ``rest`` (``(index, shape)``)."""
    def make(gen, dtype):
        x = randn(gen, *shapes[0], dtype=dtype, scale=2.0)
        t = randn(gen, *shapes[1], dtype=dtype)
        if name == "kl_div":
            x = torch.log_softmax(x, -1)
            t = torch.softmax(t, -1) if positive_target else torch.log_softmax(t, -1)
        args = [x, t, *rest]
        for extra in (weight, margin):
            if extra is not None:
                index, shape = extra
                args[index] = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        return args, {}

    return make


def _expand_arg(index):
    def stride0(args, kw):
        args = list(args)
        args[index] = args[index].reshape(-1)[:1].expand(args[index].shape)
        return args, kw

    return stride0


def _without_size_warning(fn):
    """``fn`` without torch's (and our) warning about a target size that differs from the input's: the broadcast is
    the point of the case."""
    def call(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using a target size")
            return fn(*args, **kwargs)

    return call


CONTRACT_CASES = [
    Case("mse-mean-weight", mse_loss, _case("mse", ((5, 7), (5, 7)), None, None, "mean", None, weight=(5, (5, 7))),
         grad_args=(0, 1, 5), compile=True, stride0=_expand_arg(1)),
    Case("l1-none-broadcast_target", _without_size_warning(l1_loss), _case("l1", ((4, 6), (6,)), None, None, "none"),
         grad_args=(0, 1)),
    Case("huber-sum-weight", huber_loss, _case("huber", ((3, 8), (3, 8)), "sum", 0.5, None, weight=(4, (3, 8))),
         grad_args=(0, 1, 4), stride0=_expand_arg(4)),
    Case("smooth_l1-mean", smooth_l1_loss, _case("smooth_l1", ((6, 5), (6, 5)), None, None, "mean", 0.7),
         grad_args=(0, 1)),
    Case("kl_div-batchmean", kl_div, _case("kl_div", ((4, 9), (4, 9)), None, None, "batchmean", False,
                                           positive_target=True), grad_args=(0, 1)),
    Case("kl_div-none-log_target-broadcast", kl_div, _case("kl_div", ((3, 6), (6,)), None, None, "none", True),
         grad_args=(0, 1), stride0=_expand_arg(1)),
    Case("bradley_terry-margin_tensor", bradley_terry_loss,
         _case("bradley_terry", ((9,), (9,)), None, "mean", margin=(2, (9,))), grad_args=(0, 1, 2), compile=True,
         stride0=_expand_arg(2)),
    Case("bradley_terry-none-broadcast", bradley_terry_loss,
         _case("bradley_terry", ((5, 1), (5,)), 0.3, "none"), grad_args=(0, 1)),
]


# ---------------------------------------------------------------------------------------------------------------
# Property test: random shapes, broadcasts, layouts and options against torch in fp64

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(
    name=st.sampled_from(["mse", "l1", "huber", "smooth_l1", "kl_div", "bradley_terry"]),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), broadcast=st.lists(st.booleans(), min_size=3,
                                                                                  max_size=3),
    reduction=st.sampled_from(["mean", "sum", "none"]), weight=st.booleans(), transposed=st.booleans(),
    seed=st.integers(0, 2**16))
def test_property_against_torch(tier, name, shape, broadcast, reduction, weight, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    target_shape = tuple(1 if b else n for n, b in zip(shape, broadcast))  # size-1 dimensions broadcast
    x = randn(gen, *shape, dtype=torch.float64, scale=2.0)
    t = randn(gen, *target_shape, dtype=torch.float64)
    if transposed:  # the same values, read through the strides of a transposed copy
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    kw = {"reduction": reduction}
    if name == "kl_div":
        x, t = torch.log_softmax(x, -1), torch.softmax(t, -1)
    if weight and name in ("mse", "l1", "huber"):
        kw["weight"] = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.25
    if name in ("huber", "smooth_l1"):
        kw["delta" if name == "huber" else "beta"] = 0.6
    check(tier, gen, name, [x, t], torch.float64, **kw)
