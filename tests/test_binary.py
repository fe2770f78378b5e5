"""binary_cross_entropy_with_logits and sigmoid_focal_loss against fp64 eager references, in every tier: torch's own
``F.binary_cross_entropy_with_logits`` and torchvision's ``sigmoid_focal_loss`` (written out: torchvision is not a
dependency)."""

import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss

from conftest import TOL, Case, assert_close, randn, rel_err


def torchvision_sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none", guard=True):
    """torchvision.ops.sigmoid_focal_loss, line for line. ``guard`` keeps the modulating factor's pow out of
    autograd where 1 - p_t == 0 (torchvision's gradient is NaN there for gamma < 1: inf * 0; the limit is 0)."""
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    one_minus = 1 - p_t
    if guard:
        positive = one_minus > 0
        loss = ce * torch.where(positive, torch.where(positive, one_minus, 1.0) ** gamma, 0.0 if gamma else 1.0)
    else:
        loss = ce * (one_minus**gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def check(tier, fn, ref_fn, x, t, dtype, **kw):
    """Value, dtype, shape and both gradients (random grad_output) against ``ref_fn`` in fp64."""
    xt = x.to(tier.device).requires_grad_(True)
    tt = t.to(tier.device).requires_grad_(True)
    kw_dev = {k: (v.to(tier.device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = fn(xt, tt, **kw_dev)
    x64 = x.double().requires_grad_(True)
    t64 = t.double().requires_grad_(True)
    ref = ref_fn(x64, t64, **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    assert out.dtype == t.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "loss")
    go = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    gx, gt = torch.autograd.grad(out, [xt, tt], go.to(out.dtype).to(tier.device))
    rx, rt = torch.autograd.grad(ref, [x64, t64], go.to(out.dtype).double())
    assert gx.dtype == x.dtype and gt.dtype == t.dtype
    assert_close(gx, rx, dtype, "d input")
    assert_close(gt, rt, dtype, "d target")


SHAPES = {"vector": (37,), "matrix": (9, 17), "large": (3, 5000), "nd": (2, 3, 4, 5)}


def _weights(gen, shape, kind):
    """weight / pos_weight in the forms torch broadcasts, each read in place by the kernel unless noted."""
    if kind == "weight_full":
        return {"weight": torch.rand(shape, generator=gen) + 0.5}
    if kind == "pos_weight_last":  # the usual per-class pos_weight
        return {"pos_weight": torch.rand(shape[-1], generator=gen) * 3}
    if kind == "both_scalar":
        return {"weight": torch.tensor([0.7]), "pos_weight": torch.tensor(2.5)}
    if kind == "expanded":  # stride 0 in every dimension but the last: never read past its storage
        return {"weight": (torch.rand(shape[-1], generator=gen) + 0.5).expand(shape),
                "pos_weight": (torch.rand(1, generator=gen) * 3).expand(shape[-1])}
    if kind == "strided_pos_weight":  # every other element of a longer vector
        return {"pos_weight": (torch.rand(2 * shape[-1], generator=gen) * 3)[::2]}
    # along a middle dimension: (shape[0], 1, ..., 1) merges with the last only for 2-d inputs; copied otherwise
    return {"weight": torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=gen) + 0.5,
            "pos_weight": torch.rand((1,) * (len(shape) - 1) + (shape[-1],), generator=gen) + 0.5}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", ["none", "weight_full", "pos_weight_last", "both_scalar", "expanded",
                                     "strided_pos_weight", "weight_middle"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bce_with_logits(tier, gen, shape, weights, reduction):
    shape = SHAPES[shape]
    x = randn(gen, *shape, scale=4.0)
    t = torch.rand(shape, generator=gen)
    kw = {} if weights == "none" else _weights(gen, shape, weights)
    check(tier, fusedloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t,
          torch.float32, reduction=reduction, **kw)


def test_broadcast_weights_are_read_in_place():
    """The layouts the kernel reads without a copy: a per-class vector (row stride 0), an expanded tensor, a slice,
    one element, a transposed matrix; and those it cannot (copied before the launch)."""
    from fusedloss.kernels.operands import launch_strides, operand_strides

    shape = (6, 5)
    assert operand_strides(torch.ones(5), shape) == (0, 1)
    assert operand_strides(torch.ones(1).expand(5), shape) == (0, 0)
    assert operand_strides(torch.ones(10)[::2], shape) == (0, 2)
    assert operand_strides(torch.ones(6, 1), shape) == (1, 0)
    assert operand_strides(torch.ones(5, 6).t(), shape) == (1, 6)
    assert operand_strides(torch.ones(4, 1, 1), (4, 3, 5)) is None  # row index i * 3 + j, address i: no stride
    assert operand_strides(torch.ones(3, 5), (4, 3, 5)) is None  # address j * 5 of row i * 3 + j: none either
    assert launch_strides([torch.ones(shape), torch.ones(shape), None, torch.ones(()), torch.ones(1)], shape) == (
        False, [(0, 1), (0, 1), (0, 0), (0, 0), (0, 0)], [False, False, False, True, True])
    assert launch_strides([torch.ones(shape), torch.ones(5)], shape) == (True, [(5, 1), (0, 1)], [False, False])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_bce_dtypes(tier, gen, dtype):
    x = randn(gen, 6, 300, dtype=dtype, scale=3.0)
    t = (torch.rand(6, 300, generator=gen) > 0.5).to(dtype)
    check(tier, fusedloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t, dtype,
          pos_weight=torch.rand(300, generator=gen).to(dtype) + 0.5)


@pytest.mark.parametrize("input_dtype,target_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                      (torch.bfloat16, torch.float32)])
def test_bce_mixed_dtypes_return_targets_dtype(tier, gen, input_dtype, target_dtype):
    """torch's BCE computes into a target-typed buffer: the loss has the target's dtype, whatever the input's."""
    x = randn(gen, 4, 7, dtype=input_dtype, device=tier.device, requires_grad=True)
    t = torch.rand(4, 7, generator=gen).to(target_dtype).to(tier.device)
    out = fusedloss.binary_cross_entropy_with_logits(x, t, reduction="sum")
    ref = F.binary_cross_entropy_with_logits(x.detach().cpu(), t.cpu(), reduction="sum")
    assert out.dtype == ref.dtype == target_dtype
    assert_close(out, ref, torch.float32 if torch.bfloat16 not in (input_dtype, target_dtype) else torch.bfloat16)
    (g,) = torch.autograd.grad(out, x)
    assert g.dtype == input_dtype


def test_bce_saturated_logits_are_accurate(tier):
    """|x| = 30: log(1 + exp(-30)) ~ 9e-14 needs log1p, or the loss of the right answer rounds to 0."""
    x = torch.tensor([30.0, -30.0, 30.0, -30.0], dtype=torch.float64)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    out = fusedloss.binary_cross_entropy_with_logits(x.to(tier.device), t.to(tier.device), reduction="none")
    assert_close(out, F.binary_cross_entropy_with_logits(x, t, reduction="none"), torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# NaN and infinite inputs: torch's values and gradients, element by element

SPECIAL = (math.nan, math.inf, -math.inf)


def special_grid(xs, ts):
    """Every (x, t) pair of the two value lists, as two flat fp64 tensors."""
    x, t = torch.meshgrid(torch.tensor(xs, dtype=torch.float64), torch.tensor(ts, dtype=torch.float64),
                          indexing="ij")
    return x.reshape(-1).clone(), t.reshape(-1).clone()


def compare_special(tier, fn, ref_fn, x, t, reduction, **kw):
    """Loss and both gradients in fp64 against ``ref_fn``: NaN exactly where torch's is NaN, infinities equal
    (``fn`` and ``ref_fn`` called as ``fn(x, t, reduction=reduction, **kw)``; also used by test_pointwise)."""
    go = torch.linspace(0.5, 1.5, x.numel(), dtype=torch.float64).reshape(x.shape)
    go = go if reduction == "none" else go[(0,) * x.dim()]
    xt, tt = x.to(tier.device).requires_grad_(True), t.to(tier.device).requires_grad_(True)
    out = fn(xt, tt, reduction=reduction, **{k: v.to(tier.device) if isinstance(v, torch.Tensor) else v
                                             for k, v in kw.items()})
    x64, t64 = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
    ref = ref_fn(x64, t64, reduction=reduction, **kw)
    grads = torch.autograd.grad(out, [xt, tt], go.to(tier.device))
    ref_grads = torch.autograd.grad(ref, [x64, t64], go)
    for what, a, e in (("loss", out, ref), ("d input", grads[0], ref_grads[0]), ("d target", grads[1], ref_grads[1])):
        assert rel_err(a, e) <= TOL[torch.float64], f"{what}: {a.tolist()} != torch's {e.tolist()}"


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("pos_weight", [None, 1.0, 0.0, 2.5])
def test_bce_nan_and_inf_like_torch(tier, reduction, pos_weight):
    """torch's expressions give 0 * inf = NaN in places a rearranged formula would not (x = +inf, t = 1; x = -inf
    with pos_weight 1): the kernel's loss and both gradients follow torch's everywhere."""
    x, t = special_grid(SPECIAL + (0.0, 1.5, -40.0), SPECIAL + (0.0, 1.0, 0.3))
    kw = {}
    if pos_weight is not None:
        kw["pos_weight"] = torch.tensor(pos_weight, dtype=torch.float64)
    compare_special(tier, fusedloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t,
                     reduction, **kw)
    if reduction == "none":  # a weight with infinities and a NaN multiplies both
        w = torch.tensor([1.0, math.inf, math.nan, 0.5], dtype=torch.float64).repeat(x.numel() // 4 + 1)[:x.numel()]
        compare_special(tier, fusedloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x,
                         t, reduction, weight=w, **kw)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_sigmoid_focal_nan_and_inf_like_torchvision(tier, gamma, alpha):
    x, t = special_grid(SPECIAL + (0.0, 1.5), (math.nan, 0.0, 1.0, 0.3))
    compare_special(tier, fusedloss.sigmoid_focal_loss,
                     lambda a, b, **kw: torchvision_sigmoid_focal_loss(a, b, guard=False, **kw), x, t, "none",
                     alpha=alpha, gamma=gamma)


# ---------------------------------------------------------------------------------------------------------------
# Sigmoid focal loss


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0, 1.5])
def test_sigmoid_focal_loss(tier, gen, gamma, alpha, reduction):
    """alpha > 1 weights the negatives negatively; torchvision accepts it, so does this."""
    x = randn(gen, 7, 130, scale=4.0)
    x[0, :10] = 40.0  # saturated: 1 - p_t rounds to 0 in fp32 for the positives
    t = (torch.rand(7, 130, generator=gen) > 0.7).float()
    t[0, :5] = 1.0
    t[1, :20] = torch.rand(20, generator=gen)  # soft targets are allowed
    check(tier, fusedloss.sigmoid_focal_loss, torchvision_sigmoid_focal_loss, x, t, torch.float32, alpha=alpha,
          gamma=gamma, reduction=reduction)


@pytest.mark.parametrize("gamma", [0.25, 0.5])
def test_sigmoid_focal_gradient_finite_at_saturation(tier, gamma):
    """Where 1 - p_t is 0 in the compute dtype (x = 800) or tiny (x = +-50), torchvision's gradient is NaN or inf
    for gamma < 1; the limit is finite (and 0 at x = 800)."""
    x = torch.tensor([50.0, -50.0, 800.0], device=tier.device, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.0, 1.0], device=tier.device, dtype=torch.float64)
    loss = fusedloss.sigmoid_focal_loss(x, t, gamma=gamma, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and torch.isfinite(loss)
    assert g[2].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sigmoid_focal_16_bit(tier, gen, dtype):
    x = randn(gen, 5, 64, dtype=dtype, scale=3.0)
    t = (torch.rand(5, 64, generator=gen) > 0.5).to(dtype)
    check(tier, fusedloss.sigmoid_focal_loss, torchvision_sigmoid_focal_loss, x, t, dtype, reduction="mean")


# ---------------------------------------------------------------------------------------------------------------
# Autocast, number forms, empty inputs, bad input


def test_autocast_returns_fp32_like_torch(tier, gen):
    x = randn(gen, 8, 50, dtype=torch.bfloat16, device=tier.device, requires_grad=True)
    t = torch.rand(8, 50, generator=gen).to(torch.bfloat16).to(tier.device)
    pw = (torch.rand(50, generator=gen) + 0.5).to(torch.bfloat16).to(tier.device)
    with torch.autocast(tier.device.type, dtype=torch.bfloat16):
        ours = fusedloss.binary_cross_entropy_with_logits(x, t, pos_weight=pw)
        theirs = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw)
        focal = fusedloss.sigmoid_focal_loss(x, t, reduction="sum")
        focal_ref = torchvision_sigmoid_focal_loss(x, t, reduction="sum")
    assert ours.dtype == theirs.dtype == torch.float32
    assert focal.dtype == focal_ref.dtype == torch.float32
    assert_close(ours, theirs, torch.bfloat16, "loss under autocast")
    assert_close(focal, focal_ref, torch.bfloat16, "focal loss under autocast")
    (g,) = torch.autograd.grad(ours + focal, x)
    assert g.dtype == torch.bfloat16


def test_number_arguments_in_every_form(tier, gen):
    import numpy as np

    x, t = randn(gen, 4, 9, device=tier.device), torch.rand(4, 9, generator=gen).to(tier.device)
    expected = fusedloss.sigmoid_focal_loss(x, t, alpha=0.5, gamma=1.5, reduction="sum")
    for alpha, gamma in ((np.float32(0.5), np.float64(1.5)), (torch.tensor(0.5), torch.tensor(1.5)), (0.5, 1.5)):
        assert_close(fusedloss.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="sum"), expected,
                     torch.float64)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0,)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_and_zero_width_inputs_give_torchs_answer(tier, shape, reduction):
    x = torch.zeros(shape, device=tier.device, requires_grad=True)
    t = torch.zeros(shape, device=tier.device)
    for ours, theirs in ((fusedloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits),
                         (fusedloss.sigmoid_focal_loss, torchvision_sigmoid_focal_loss)):
        out = ours(x, t, reduction=reduction)
        expected = theirs(x.detach().cpu(), t.cpu(), reduction=reduction)
        assert out.shape == expected.shape and torch.equal(out.detach().cpu().isnan(), expected.isnan())
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.shape == x.shape


def test_modules_match_functional(tier, gen):
    x = randn(gen, 8, 5, device=tier.device)
    t = torch.rand(8, 5, generator=gen).to(tier.device)
    pw = (torch.rand(5, generator=gen) + 0.5).to(tier.device)
    module = fusedloss.nn.BCEWithLogitsLoss(pos_weight=pw)
    assert "pos_weight" in module.state_dict()
    assert torch.equal(module(x, t), fusedloss.binary_cross_entropy_with_logits(x, t, pos_weight=pw))
    focal = fusedloss.nn.SigmoidFocalLoss(alpha=0.5, gamma=1.0, reduction="mean")
    assert torch.equal(focal(x, t), fusedloss.sigmoid_focal_loss(x, t, alpha=0.5, gamma=1.0, reduction="mean"))


BAD = [
    ("input", TypeError, lambda x, t: fusedloss.binary_cross_entropy_with_logits(x.long(), t)),
    ("target", TypeError, lambda x, t: fusedloss.binary_cross_entropy_with_logits(x, t.long())),
    ("Target size", ValueError, lambda x, t: fusedloss.binary_cross_entropy_with_logits(x, t[:2])),
    ("reduction", ValueError, lambda x, t: fusedloss.binary_cross_entropy_with_logits(x, t, reduction="x")),
    ("weight", ValueError, lambda x, t: fusedloss.binary_cross_entropy_with_logits(x, t, weight=torch.ones(2, 2))),
    ("weight", ValueError, lambda x, t: fusedloss.binary_cross_entropy_with_logits(x, t, weight=torch.ones(1, 3, 4))),
    ("pos_weight", ValueError,
     lambda x, t: fusedloss.binary_cross_entropy_with_logits(x, t, pos_weight=torch.ones(4, requires_grad=True))),
    ("pos_weight", TypeError,
     lambda x, t: fusedloss.binary_cross_entropy_with_logits(x, t, pos_weight=torch.ones(4, dtype=torch.long))),
    ("gamma", ValueError, lambda x, t: fusedloss.sigmoid_focal_loss(x, t, gamma=-1.0)),
    ("gamma", ValueError, lambda x, t: fusedloss.sigmoid_focal_loss(x, t, gamma=float("inf"))),
    ("alpha", ValueError, lambda x, t: fusedloss.sigmoid_focal_loss(x, t, alpha=float("nan"))),
    ("alpha", TypeError, lambda x, t: fusedloss.sigmoid_focal_loss(x, t, alpha="0.25")),
    ("reduction", ValueError, lambda x, t: fusedloss.sigmoid_focal_loss(x, t, reduction="batchmean")),
]


@pytest.mark.parametrize("name,error,call", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(tier, gen, name, error, call):
    if tier.device.type != "cpu":
        pytest.skip("the bad-input table builds CPU tensors; the checks are device-independent")
    x = randn(gen, 3, 4)
    with pytest.raises(error, match=name):
        call(x, torch.rand(3, 4, generator=gen))


# ---------------------------------------------------------------------------------------------------------------
# The autograd / compile / layout contract (tests/test_contract.py)


def _bce_case(shape, *, reduction="mean", weight=None, pos_weight=None):
    """BCE with weight and pos_weight passed positionally (so the contract's layout transforms reach them):
    ``weight`` / ``pos_weight`` give the shape each is broadcast from."""
    def make(gen, dtype):
        x = randn(gen, *shape, dtype=dtype, scale=3.0)
        t = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
        w = None if weight is None else (torch.rand(weight, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        pw = None if pos_weight is None else (torch.rand(pos_weight, generator=gen, dtype=torch.float64) * 3).to(dtype)
        return [x, t, w, None, None, reduction, pw], {}

    return make


def _focal_case(shape, **kw):
    def make(gen, dtype):
        x = randn(gen, *shape, dtype=dtype, scale=3.0)
        t = (torch.rand(shape, generator=gen, dtype=torch.float64) > 0.5).to(dtype)
        return [x, t], kw

    return make


def _expand_pos_weight(args, kw):
    args = list(args)
    args[6] = args[6][:1].expand(args[6].shape[0])
    return args, kw


CONTRACT_CASES = [
    Case("bce-mean-weight-pos_weight", fusedloss.binary_cross_entropy_with_logits,
         _bce_case((6, 9), weight=(6, 1), pos_weight=(9,)), compile=True, stride0=_expand_pos_weight),
    Case("bce-none-target_grad", fusedloss.binary_cross_entropy_with_logits,
         _bce_case((4, 7), reduction="none", weight=(7,)), grad_args=(0, 1)),
    Case("bce-sum-target_grad", fusedloss.binary_cross_entropy_with_logits,
         _bce_case((3, 2, 5), reduction="sum", pos_weight=(5,)), grad_args=(0, 1), stride0=_expand_pos_weight),
    Case("sigmoid_focal-none", fusedloss.sigmoid_focal_loss, _focal_case((5, 8), gamma=2.0), grad_args=(0, 1)),
    Case("sigmoid_focal-mean-gamma_half", fusedloss.sigmoid_focal_loss,
         _focal_case((4, 6), gamma=0.5, alpha=0.3, reduction="mean"), compile=True),
]


# ---------------------------------------------------------------------------------------------------------------
# Property test: random shapes, broadcast weights and layouts against torch in fp64

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), reduction=st.sampled_from(["mean", "sum", "none"]),
    weight=st.sampled_from([None, "full", "last", "first", "one"]), pos_weight=st.sampled_from([None, "last", "one"]),
    transposed=st.booleans(), focal=st.booleans(), seed=st.integers(0, 2**16))
def test_property_against_torch(tier, shape, reduction, weight, pos_weight, transposed, focal, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    x = randn(gen, *shape, dtype=torch.float64, scale=4.0)
    t = torch.rand(shape, generator=gen, dtype=torch.float64)
    if transposed:  # the same values, read through the strides of a transposed copy
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    if focal:
        check(tier, fusedloss.sigmoid_focal_loss, torchvision_sigmoid_focal_loss, x, t, torch.float64,
              reduction=reduction, gamma=1.5)
        return
    broadcast = {"full": shape, "last": shape[-1:], "first": shape[:1] + (1,) * (len(shape) - 1), "one": (1,)}
    kw = {name: torch.rand(broadcast[form], generator=gen, dtype=torch.float64) + 0.25
          for name, form in (("weight", weight), ("pos_weight", pos_weight)) if form is not None}
    check(tier, fusedloss.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t,
          torch.float64, reduction=reduction, **kw)
