"""triplet_margin_loss against torch's own in fp64, and batch_hard_triplet_loss against a direct reference
(``torch.cdist`` + label masks), in every tier."""

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.losses import triplet as triplet_module
from fusedloss.losses.triplet import batch_hard_triplet_loss, triplet_margin_loss

from conftest import Case, assert_close, peak_allocated_bytes, randn


def check_triplet(tier, gen, tensors, dtype, factor=1.0, **kw):
    """Value, dtype, shape and the gradients of anchor, positive and negative against torch's
    ``triplet_margin_loss`` in fp64, with a random grad_output."""
    ours = [t.detach().to(tier.device).requires_grad_(True) for t in tensors]
    refs = [t.detach().double().requires_grad_(True) for t in tensors]
    out = triplet_margin_loss(*ours, **kw)
    ref = F.triplet_margin_loss(*refs, **kw)
    assert out.dtype == F.triplet_margin_loss(*tensors, **kw).dtype
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, "loss", factor)
    grad_out = (torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5).to(out.dtype)
    grads = torch.autograd.grad(out, ours, grad_out.to(tier.device), allow_unused=True)
    ref_grads = torch.autograd.grad(ref, refs, grad_out.double(), allow_unused=True)
    for name, g, r, t in zip(("anchor", "positive", "negative"), grads, ref_grads, tensors):
        if r is None:  # p = 0: torch's norm has no gradient
            assert g is None, f"d {name}: torch gives no gradient"
            continue
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, r, dtype, f"d {name}", factor)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, -math.inf, 3.0, 0.5, -1.5, 0.0])
def test_triplet_norms(tier, gen, p, swap, reduction):
    """Every exponent torch accepts: the exact special cases (1, 2, +-inf, 0) and the general power form, on
    37 rows (not a multiple of the row block) of 53 features (not a power of two)."""
    tensors = [randn(gen, 37, 53) for _ in range(3)]
    check_triplet(tier, gen, tensors, torch.float32, margin=2.0, p=p, swap=swap, reduction=reduction)


TRIPLET_SHAPES = {
    "unbatched": ((53,), (53,), (53,)),  # (D,) inputs, a 0-d loss
    "one_row": ((1, 300), (1, 300), (1, 300)),
    "wide": ((3, 1100), (3, 1100), (3, 1100)),  # D over the 512-wide block: the row loops
    "broadcast_row": ((5, 53), (1, 53), (5, 53)),  # a (1, D) positive is read with row stride 0
    "nd_broadcast": ((2, 3, 20), (2, 1, 20), (1, 3, 20)),  # materialized; gradients summed back
    "noncontiguous": ((30, 17), (30, 17), (30, 17)),  # transposed (D, N) storage
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", list(TRIPLET_SHAPES))
def test_triplet_shapes(tier, gen, case, reduction):
    tensors = [randn(gen, *shape) for shape in TRIPLET_SHAPES[case]]
    if case == "noncontiguous":
        tensors = [randn(gen, t.shape[1], t.shape[0]).t() for t in tensors]
    # margin 5 keeps the hinge active for most rows: a one-row loss is not a difference near 0
    check_triplet(tier, gen, tensors, torch.float32, margin=5.0, swap=True, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_triplet_dtypes(tier, gen, dtype):
    tensors = [randn(gen, 19, 70, dtype=dtype) for _ in range(3)]
    check_triplet(tier, gen, tensors, dtype, margin=3.0)
    mixed = [tensors[0], tensors[1].double(), tensors[2]]  # promotes, each gradient in its own dtype
    check_triplet(tier, gen, mixed, dtype, margin=3.0, reduction="none")


def test_triplet_swap_tie_splits_the_gradient(tier, gen):
    """anchor == positive makes d(a, n) == d(p, n) exactly: torch's min() gives each half of the gradient (a
    margin of 10 keeps every hinge active, so there is a gradient to split)."""
    a = randn(gen, 6, 10)
    check_triplet(tier, gen, [a, a.clone(), randn(gen, 6, 10)], torch.float32, swap=True, margin=10.0,
                  reduction="sum")


@pytest.mark.parametrize("p", [math.inf, -math.inf])
def test_triplet_extreme_norm_ties_share_the_gradient(tier, gen, p):
    """Several entries attaining max |v| (min |v| for p = -inf): torch divides the gradient among them. Small
    integers and eps = 0 keep every difference exact, so the ties are exact in fp32 too."""
    anchor = torch.randint(-4, 5, (5, 6), generator=gen).float()
    diff = torch.tensor([3.0, -3.0, 1.0, 2.0, -3.0, 1.0]) if p > 0 else torch.tensor([1.0, -1.0, 2.0, 3.0, 1.0, 4.0])
    negative = anchor - 4 * diff.flip(0)
    check_triplet(tier, gen, [anchor, anchor - diff, negative], torch.float32, p=p, eps=0.0, margin=20.0,
                  reduction="sum")


def test_triplet_fused_gradient_is_final_when_grad_output_is_one(tier, gen):
    a, p, n = (randn(gen, 21, 40, device=tier.device, requires_grad=True) for _ in range(3))
    triplet_margin_loss(a, p, n, margin=3.0).backward()
    refs = [t.detach().cpu().double().requires_grad_(True) for t in (a, p, n)]
    F.triplet_margin_loss(*refs, margin=3.0).backward()
    for ours, ref in zip((a, p, n), refs):
        assert_close(ours.grad, ref.grad, torch.float32)


def test_triplet_legacy_and_empty(tier, gen):
    a, p, n = (randn(gen, 4, 6, device=tier.device) for _ in range(3))
    with pytest.warns(UserWarning, match="deprecated"):
        assert triplet_margin_loss(a, p, n, 1.0, 2.0, 1e-6, False, None, False).shape == (4,)
    empty = torch.zeros(0, 6, device=tier.device)
    assert torch.isnan(triplet_margin_loss(empty, empty, empty)).item()
    assert triplet_margin_loss(empty, empty, empty, reduction="sum").item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Batch-hard mining


def batch_hard_reference(x, labels, margin=1.0, soft_margin=False, reduction="mean"):
    """Hermans et al. (2017) written out: the full distance matrix, the farthest positive (other rows with the
    label) and the nearest negative per anchor, anchors lacking either excluded (mean over the others)."""
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool)
    d_pos = d.masked_fill(~positive, -math.inf).amax(1)
    d_neg = d.masked_fill(same, math.inf).amin(1)
    valid = positive.any(1) & (~same).any(1)
    z = torch.where(valid, d_pos - d_neg, torch.zeros_like(d_pos))
    loss = F.softplus(z) if soft_margin else torch.clamp_min(margin + z, 0.0)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / valid.sum()}[reduction]


def check_batch_hard(tier, gen, x, labels, dtype, **kw):
    ours = x.detach().to(tier.device).requires_grad_(True)
    ref_x = x.detach().double().requires_grad_(True)
    out = batch_hard_triplet_loss(ours, labels.to(tier.device), **kw)
    ref = batch_hard_reference(ref_x, labels, **kw)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "loss")
    grad_out = (torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5).to(out.dtype)
    (g,) = torch.autograd.grad(out, ours, grad_out.to(tier.device))
    (r,) = torch.autograd.grad(ref, ref_x, grad_out.double())
    assert g.dtype == x.dtype
    assert_close(g, r, dtype, "d embeddings")


def labels_with_a_singleton(gen, n_rows, n_classes):
    labels = torch.randint(0, n_classes, (n_rows,), generator=gen)
    labels[0] = n_classes  # a label seen once: anchor 0 has no positive and is excluded
    return labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("shape", [(70, 33), (9, 5), (1, 4)])  # two row / column tiles, partial; tiny; one row
def test_batch_hard(tier, gen, shape, soft_margin, reduction):
    x = randn(gen, *shape)
    labels = labels_with_a_singleton(gen, shape[0], 4)
    check_batch_hard(tier, gen, x, labels, torch.float32, margin=0.5, soft_margin=soft_margin, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_batch_hard_dtypes(tier, gen, dtype):
    """(bf16 in the interpreter tier: the torch path, as a user's call there takes; its bf16 tl.dot is wrong.)"""
    x = randn(gen, 40, 24, dtype=dtype)
    check_batch_hard(tier, gen, x, labels_with_a_singleton(gen, 40, 5), dtype, margin=1.0)


def test_batch_hard_strided_inputs(tier, gen):
    """Embeddings and labels as strided views (a column slice, every other label): no copy, same result."""
    x = randn(gen, 30, 50)[:, 5:41]
    labels = torch.randint(0, 3, (60,), generator=gen)[::2]
    check_batch_hard(tier, gen, x, labels, torch.float32, margin=2.0, reduction="none")


def test_batch_hard_distance_zero_has_zero_gradient(tier, gen):
    """Row 1 duplicates row 0 under the same label and is its only positive: d = 0, whose subgradient is 0. (The
    pair sits far from the rest, so that no other anchor meets the tie between two identical rows, where the
    reference's amin would split the gradient and the kernel gives it to the first index.)"""
    x = randn(gen, 8, 6)
    x[0] += 10.0
    x[1] = x[0]
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    check_batch_hard(tier, gen, x, labels, torch.float32, margin=1.0, reduction="sum")


def test_batch_hard_without_valid_anchors(tier, gen):
    """All labels distinct (no positives) or all equal (no negatives): 'none' is all zeros, 'sum' 0, 'mean' NaN
    (nothing to average, like an all-ignored cross-entropy), and the gradient is zero."""
    for labels in (torch.arange(6), torch.zeros(6, dtype=torch.long)):
        x = randn(gen, 6, 4, device=tier.device, requires_grad=True)
        labels = labels.to(tier.device)
        assert torch.equal(batch_hard_triplet_loss(x, labels, reduction="none").cpu(), torch.zeros(6))
        assert batch_hard_triplet_loss(x, labels, reduction="sum").item() == 0.0
        mean = batch_hard_triplet_loss(x, labels)
        assert torch.isnan(mean).item()
        (g,) = torch.autograd.grad(mean, x)
        assert torch.equal(g.cpu(), torch.zeros(6, 4))


def test_batch_hard_fused_gradient_is_final_when_grad_output_is_one(tier, gen):
    x = randn(gen, 33, 16, device=tier.device, requires_grad=True)
    labels = labels_with_a_singleton(gen, 33, 3)
    batch_hard_triplet_loss(x, labels.to(tier.device), margin=2.0).backward()
    ref_x = x.detach().cpu().double().requires_grad_(True)
    batch_hard_reference(ref_x, labels, margin=2.0).backward()
    assert_close(x.grad, ref_x.grad, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: every metadata check raises before any launch, naming the argument.

BAD = [
    ("anchor", TypeError, lambda x, y: triplet_margin_loss(x.long(), x, x)),
    ("negative", TypeError, lambda x, y: triplet_margin_loss(x, x, [1.0])),
    ("same number of dimensions", ValueError, lambda x, y: triplet_margin_loss(x, x[0], x)),
    ("do not broadcast", ValueError, lambda x, y: triplet_margin_loss(x, x[:, :3], x)),
    ("at least 1 dimension", ValueError, lambda x, y: triplet_margin_loss(x[0, 0], x[0, 0], x[0, 0])),
    ("margin", ValueError, lambda x, y: triplet_margin_loss(x, x, x, margin=0.0)),
    ("p", ValueError, lambda x, y: triplet_margin_loss(x, x, x, p=float("nan"))),
    ("eps", TypeError, lambda x, y: triplet_margin_loss(x, x, x, eps=None)),
    ("swap", TypeError, lambda x, y: triplet_margin_loss(x, x, x, swap=1)),
    ("reduction", ValueError, lambda x, y: triplet_margin_loss(x, x, x, reduction="batchmean")),
    ("embeddings", ValueError, lambda x, y: batch_hard_triplet_loss(x[0], y)),
    ("embeddings", TypeError, lambda x, y: batch_hard_triplet_loss(x.int(), y)),
    ("labels", TypeError, lambda x, y: batch_hard_triplet_loss(x, y.float())),
    ("labels", ValueError, lambda x, y: batch_hard_triplet_loss(x, y[:2])),
    ("labels", ValueError, lambda x, y: batch_hard_triplet_loss(x, y[:, None])),
    ("margin", ValueError, lambda x, y: batch_hard_triplet_loss(x, y, margin=-1.0)),
    ("soft_margin", TypeError, lambda x, y: batch_hard_triplet_loss(x, y, soft_margin="yes")),
    ("reduction", ValueError, lambda x, y: batch_hard_triplet_loss(x, y, reduction="avg")),
]


@pytest.mark.parametrize("name,error,call", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(tier, gen, name, error, call):
    if tier.device.type != "cpu":
        pytest.skip("the bad-input table builds CPU tensors; the checks are device-independent")
    with pytest.raises(error, match=name), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(randn(gen, 5, 4), torch.randint(0, 2, (5,), generator=gen))


def test_exports_and_modules(tier, gen):
    """The public names and the ``fusedloss.nn`` wrappers."""
    assert fusedloss.triplet_margin_loss is triplet_margin_loss
    assert fusedloss.batch_hard_triplet_loss is batch_hard_triplet_loss
    a, p, n = (randn(gen, 6, 5, device=tier.device) for _ in range(3))
    module = fusedloss.nn.TripletMarginLoss(margin=2.0, p=1.0, swap=True, reduction="sum")
    assert torch.equal(module(a, p, n), triplet_margin_loss(a, p, n, margin=2.0, p=1.0, swap=True, reduction="sum"))
    labels = torch.tensor([0, 0, 1, 1, 2, 2], device=tier.device)
    hard = fusedloss.nn.BatchHardTripletLoss(margin=0.3, soft_margin=True)
    assert torch.equal(hard(a, labels), batch_hard_triplet_loss(a, labels, margin=0.3, soft_margin=True))


# ---------------------------------------------------------------------------------------------------------------
# Hostile inputs: what a drop-in must not get silently wrong

NON_FINITE = {
    "nan_anchor": lambda a, p, n: a.__setitem__((1, 2), math.nan),
    "nan_negative": lambda a, p, n: n.__setitem__((3, 0), math.nan),
    "inf_anchor": lambda a, p, n: a.__setitem__((1, 2), math.inf),
    "minus_inf_positive": lambda a, p, n: p.__setitem__((1, 2), -math.inf),
    "inf_positive_and_negative": lambda a, p, n: (p.__setitem__((1, 2), math.inf), n.__setitem__((1, 2), math.inf)),
    "inf_anchor_and_positive": lambda a, p, n: (a.__setitem__((2, 4), math.inf), p.__setitem__((2, 4), math.inf)),
}


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, -math.inf, 3.0, 1.5, 0.5, -1.5])
@pytest.mark.parametrize("case", list(NON_FINITE))
def test_triplet_non_finite_inputs_match_torch(tier, gen, case, p, swap):
    """NaN and +-inf entries: torch's loss and gradients element by element (conftest.rel_err requires the same
    NaN and inf positions): NaN-propagating +-inf norms and min, NaN kept by clamp_min, and norm_backward's
    0 * inf and 0 * NaN. A margin of 2 keeps the finite rows' hinges active."""
    tensors = [randn(gen, 5, 6) for _ in range(3)]
    NON_FINITE[case](*tensors)
    check_triplet(tier, gen, tensors, torch.float32, margin=2.0, p=p, swap=swap, reduction="none")


def test_triplet_broadcast_rows_are_read_in_place_never_past_storage(tier, gen):
    """A (1, D) positive expanded to (N, D) (row stride 0) and a negative whose D entries are one expanded value
    (column stride 0), both views into storage whose following row is NaN: a read with the dense strides would
    meet the NaN (or run past the storage), a correct one gives the dense inputs' result."""
    base = torch.full((2, 7), math.nan)
    base[0] = randn(gen, 7)
    positive = base[:1].expand(6, 7)
    column = torch.full((6, 2), math.nan)
    column[:, 0] = randn(gen, 6)
    negative = column[:, :1].expand(6, 7)
    assert positive.stride() == (0, 1) and negative.stride() == (2, 0)
    for reduction in ("mean", "none"):
        check_triplet(tier, gen, [randn(gen, 6, 7), positive, negative], torch.float32, margin=3.0, swap=True,
                      reduction=reduction)


def test_triplet_autocast_returns_fp32_like_torch(tier, gen):
    a, p, n = (randn(gen, 9, 20, dtype=torch.bfloat16, device=tier.device, requires_grad=True) for _ in range(3))
    with torch.autocast(tier.device.type, dtype=torch.bfloat16):
        ours = triplet_margin_loss(a, p, n, margin=2.0, swap=True)
        theirs = F.triplet_margin_loss(a, p, n, margin=2.0, swap=True)
    assert ours.dtype == theirs.dtype == torch.float32
    grads = torch.autograd.grad(ours, (a, p, n))
    assert all(g.dtype == torch.bfloat16 for g in grads)
    assert_close(ours, theirs, torch.bfloat16, "loss under autocast")


def test_triplet_number_arguments_in_every_form_torch_takes(tier, gen):
    import numpy as np

    a, p, n = (randn(gen, 5, 8, device=tier.device) for _ in range(3))
    expected = triplet_margin_loss(a, p, n, margin=1.5, p=3.0, eps=1e-3, swap=True)
    for margin, norm, eps in ((np.float32(1.5), np.int64(3), np.float64(1e-3)),
                              (torch.tensor(1.5), torch.tensor(3.0), torch.tensor(1e-3))):
        assert torch.equal(triplet_margin_loss(a, p, n, margin=margin, p=norm, eps=eps, swap=True), expected)


def test_numpy_bool_arguments_are_refused_like_torch(tier, gen):
    """torch's own parser refuses a NumPy bool for ``swap`` ("must be bool, not numpy.bool"): so does this."""
    import numpy as np

    a, p, n = (randn(gen, 5, 8, device=tier.device) for _ in range(3))
    with pytest.raises(TypeError, match="swap"):
        triplet_margin_loss(a, p, n, swap=np.bool_(True))


@pytest.mark.parametrize("shape", [(0, 6), (4, 0), (0, 0), (0,)], ids=["no_rows", "zero_width", "both", "unbatched"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triplet_empty_and_zero_width_inputs_give_torchs_answer(tier, shape, reduction):
    """No rows: mean NaN, sum 0, 'none' empty; zero width: every distance is the norm of nothing, 0, so each
    row's loss is the margin; the gradients are empty or zero, as torch's."""
    ours = [torch.zeros(shape, device=tier.device, requires_grad=True) for _ in range(3)]
    theirs = [torch.zeros(shape, requires_grad=True) for _ in range(3)]
    out = triplet_margin_loss(*ours, margin=0.5, reduction=reduction)
    expected = F.triplet_margin_loss(*theirs, margin=0.5, reduction=reduction)
    assert out.shape == expected.shape and torch.equal(out.detach().cpu().isnan(), expected.isnan())
    assert torch.allclose(out.detach().cpu(), expected.detach(), equal_nan=True)
    for g, e in zip(torch.autograd.grad(out.sum(), ours), torch.autograd.grad(expected.sum(), theirs)):
        assert g.shape == e.shape and torch.equal(g.cpu(), e)


def test_triplet_inf_margin_and_nan_margin(tier, gen):
    """torch accepts any margin > 0, inf included (every hinge is inf); NaN, which torch would turn into a NaN
    loss without a word, is refused here."""
    a, p, n = (randn(gen, 3, 4, device=tier.device) for _ in range(3))
    assert torch.equal(triplet_margin_loss(a, p, n, margin=math.inf, reduction="none").cpu(),
                       F.triplet_margin_loss(a.cpu(), p.cpu(), n.cpu(), margin=math.inf, reduction="none"))
    with pytest.raises(ValueError, match="margin"):
        triplet_margin_loss(a, p, n, margin=math.nan)


def test_triplet_p_zero_has_no_gradient(tier, gen):
    """p = 0 counts the non-zero differences: torch's norm has no gradient there, so neither has this loss."""
    tensors = [randn(gen, 6, 5) for _ in range(3)]
    check_triplet(tier, gen, tensors, torch.float32, p=0.0, margin=8.0, reduction="sum")


# ---------------------------------------------------------------------------------------------------------------
# Batch-hard: hostile inputs

def batch_hard_definition(x, labels, margin=1.0, soft_margin=False, reduction="mean"):
    """The loss of the selected pairs in torch ops, the pairs picked from the full distance matrix: what the
    gradient owes when the full matrix's amax backward would spread NaN to every row. The first index of each
    extreme, a NaN distance winning both (as amax / amin propagate it); a non-finite anchor, whose distances are
    all inf or NaN and whose loss is NaN whatever it picks, is mined as the zero vector (the documented
    convention)."""
    finite = x.detach().isfinite().all(1)[:, None]
    d = torch.cdist(torch.where(finite, x.detach(), 0.0), x.detach(), compute_mode="donot_use_mm_for_euclid_dist")
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool)
    valid = positive.any(1) & (~same).any(1)
    key_pos = torch.where(d.isnan(), math.inf, d).masked_fill(~positive, -math.inf)
    key_neg = torch.where(d.isnan(), -math.inf, d).masked_fill(same, math.inf)
    index = torch.arange(len(labels))
    pos = torch.where(valid, key_pos.argmax(1), index)
    neg = torch.where(valid, key_neg.argmin(1), index)
    zero = torch.zeros_like(x)
    z = (torch.where(valid[:, None], x - x[pos], zero).norm(dim=1)
         - torch.where(valid[:, None], x - x[neg], zero).norm(dim=1))
    loss = torch.where(valid, F.softplus(z) if soft_margin else torch.clamp_min(margin + z, 0.0), 0.0)
    return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / valid.sum()}[reduction]


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("case", ["nan_row", "inf_row", "minus_inf_singleton", "nan_and_inf"])
def test_batch_hard_non_finite_embeddings(tier, gen, case, soft_margin, reduction):
    """A NaN embedding is a candidate of every other anchor (positive or negative), and the definition's amax /
    amin propagate its NaN distance: every valid anchor's loss is NaN (the Triton mining used to drop it). An
    infinite row is the farthest positive of its label's anchors (loss inf) and never the nearest negative. The
    values are the full-matrix reference's; the gradient is the selected pairs' (``batch_hard_definition``),
    since the full matrix's own spreads NaN to every row."""
    x = randn(gen, 40, 6, dtype=torch.float64)
    labels = labels_with_a_singleton(gen, 40, 4)
    if case in ("nan_row", "nan_and_inf"):
        x[5, 3] = math.nan
    if case in ("inf_row", "nan_and_inf"):
        x[11, 0] = math.inf
    if case == "minus_inf_singleton":  # anchor 0 has no positive: it only ever is a negative, never the nearest
        x[0, 1] = -math.inf
    ours = x.to(tier.device).requires_grad_(True)
    out = batch_hard_triplet_loss(ours, labels.to(tier.device), soft_margin=soft_margin, reduction=reduction)
    assert_close(out, batch_hard_reference(x, labels, soft_margin=soft_margin, reduction=reduction), torch.float64)
    if case in ("nan_row", "nan_and_inf") and reduction == "none":  # the issue: NaN for every anchor it touches
        same = labels[:, None] == labels[None, :]
        valid = (same.sum(1) > 1) & (~same).any(1)
        assert torch.isnan(out[valid.to(tier.device)]).all() and not out[~valid.to(tier.device)].any()
    ref_x = x.clone().requires_grad_(True)
    ref = batch_hard_definition(ref_x, labels, soft_margin=soft_margin, reduction=reduction)
    grad_out = (torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5)
    (g,) = torch.autograd.grad(out, ours, grad_out.to(tier.device))
    (r,) = torch.autograd.grad(ref, ref_x, grad_out)
    assert_close(g, r, torch.float64, "d embeddings")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
                                   torch.uint32, torch.uint64])
def test_batch_hard_labels_of_every_integer_dtype(tier, gen, dtype):
    """Labels of any integer dtype, compared in int64: the same result as int64 labels of the same values."""
    x = randn(gen, 30, 5)
    labels = torch.randint(0, 5, (30,), generator=gen) * 50  # 0 .. 200: within every dtype, including int8's sign
    labels = labels.to(dtype)
    check_batch_hard(tier, gen, x, labels.to(torch.int64), torch.float32, reduction="none")
    int64 = batch_hard_triplet_loss(x.to(tier.device), labels.to(torch.int64).to(tier.device), reduction="none")
    assert torch.equal(batch_hard_triplet_loss(x.to(tier.device), labels.to(tier.device), reduction="none"), int64)


def test_batch_hard_autocast_returns_fp32(tier, gen):
    """Under autocast (fp16 here: the interpreter's bf16 tl.dot is broken) the loss is fp32, the gradient in the
    embeddings' dtype, and the mining is not run in the autocast dtype."""
    x = randn(gen, 24, 16, dtype=torch.float16, device=tier.device, requires_grad=True)
    labels = labels_with_a_singleton(gen, 24, 4).to(tier.device)
    with torch.autocast(tier.device.type, dtype=torch.float16):
        out = batch_hard_triplet_loss(x, labels, margin=0.5)
    assert out.dtype == torch.float32
    (g,) = torch.autograd.grad(out, x)
    assert g.dtype == torch.float16
    assert_close(out, batch_hard_reference(x.detach().cpu().double(), labels.cpu(), margin=0.5), torch.float16)


def test_batch_hard_number_arguments_in_every_form(tier, gen):
    import numpy as np

    x = randn(gen, 12, 5, device=tier.device)
    labels = labels_with_a_singleton(gen, 12, 3).to(tier.device)
    expected = batch_hard_triplet_loss(x, labels, 0.75, soft_margin=False)
    for margin in (np.float32(0.75), np.int64(1) * 0.75, torch.tensor(0.75)):
        assert torch.equal(batch_hard_triplet_loss(x, labels, margin, soft_margin=False), expected)


@pytest.mark.parametrize("shape", [(0, 4), (5, 0)], ids=["no_rows", "zero_width"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_batch_hard_empty_and_zero_width(tier, shape, reduction):
    """No rows: the definition's answer (mean NaN, sum 0, 'none' empty). Zero width: every distance is 0, so each
    valid anchor's loss is the margin, as the full-matrix reference gives."""
    x = torch.zeros(shape, device=tier.device, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2][:shape[0]], dtype=torch.long, device=tier.device)
    out = batch_hard_triplet_loss(x, labels, margin=0.5, reduction=reduction)
    if shape[0] == 0:  # (the reference's amax needs a row)
        expected = {"mean": torch.tensor(math.nan), "sum": torch.tensor(0.0), "none": torch.zeros(0)}[reduction]
    else:
        expected = batch_hard_reference(torch.zeros(shape, dtype=torch.float64), labels.cpu(), margin=0.5,
                                        reduction=reduction)
    assert out.shape == expected.shape
    assert torch.allclose(out.detach().cpu().double(), expected.double(), equal_nan=True)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == x.shape


def test_batch_hard_torch_mining_in_chunks(tier, gen, monkeypatch):
    """The torch path's mining over several row chunks (one of 4 rows here, 18 chunks and a partial one) gives
    the full matrix's answer; on the Triton path the chunks serve the higher-order gradients."""
    monkeypatch.setattr(triplet_module, "TORCH_MINING_CHUNK_BYTES", 4 * 70 * 4)
    x = randn(gen, 70, 9)
    check_batch_hard(tier, gen, x, labels_with_a_singleton(gen, 70, 5), torch.float32, margin=0.5, reduction="none")


@pytest.mark.parametrize("compiled", [False, True])
def test_batch_hard_torch_backend_peak_memory(tier, compiled):
    """B = 4096, d = 64, fp32, forward + backward on the torch backend, eager and under ``torch.compile`` (where
    the chunked mining is one custom op): the peak of live memory beyond the inputs and the gradient stays under a
    third of the 64 MiB B x B distance matrix (measured: ~11 MiB both ways, the mining chunk's scores, one key
    block and the masks), which eager mining must hold whole, several times over."""
    if tier.name != "torch":
        pytest.skip("measures the torch backend (CPU)")

    gen = torch.Generator().manual_seed(0)
    n, dim = 4096, 64
    x = torch.randn(n, dim, generator=gen, requires_grad=True)
    labels = torch.randint(0, 100, (n,), generator=gen)
    loss = batch_hard_triplet_loss
    if compiled:
        torch._dynamo.reset()
        loss = torch.compile(batch_hard_triplet_loss, fullgraph=True, backend="aot_eager")
        loss(x, labels).backward()  # compile outside the measurement
    peak = peak_allocated_bytes(lambda: loss(x, labels).backward())
    matrix = n * n * 4
    print(f"\npeak allocated: {peak / 2**20:.0f} MiB; the distance matrix alone {matrix / 2**20:.0f} MiB")
    assert peak - 2 * n * dim * 4 <= matrix / 3


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` within the block, the caller's setting restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batch_hard_deterministic_algorithms(tier, gen, monkeypatch, reduction):
    """Under ``torch.use_deterministic_algorithms(True)`` the gradient is bitwise the same over repeated runs, and
    the fp64 reference's. The Triton path reads the flag once per call into its options and takes the route
    without atomics in every gradient launch (the fused forward for 'mean', the backward's recompute for 'none'),
    even when the flag is off again by the backward; without the flag it keeps the atomic adds. The interpreter
    runs programs one after another, so its atomics would repeat too: the launches' route is what is checked
    there. 70 rows in 4 labels: many anchors share a hardest negative, whose gradient row sums their terms."""
    x = randn(gen, 70, 33)
    labels = labels_with_a_singleton(gen, 70, 4)
    ref_x = x.double().requires_grad_(True)
    ref = batch_hard_reference(ref_x, labels, margin=0.5, reduction=reduction)
    grad_out = torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5
    (ref_grad,) = torch.autograd.grad(ref, ref_x, grad_out)
    routes = []  # the ``deterministic`` argument of every launch that writes a gradient
    if tier.backend != "torch":
        from fusedloss.kernels import triplet as kernels

        launch = kernels.batch_hard_loss

        def spy(*args, **kwargs):
            if args[5] is not None:
                routes.append(kwargs["deterministic"])
            return launch(*args, **kwargs)

        monkeypatch.setattr(kernels, "batch_hard_loss", spy)

    def run():
        ours = x.to(tier.device).requires_grad_(True)
        with deterministic_algorithms():
            out = batch_hard_triplet_loss(ours, labels.to(tier.device), margin=0.5, reduction=reduction)
        if tier.backend != "torch":
            assert out.grad_fn.opts.deterministic
        (grad,) = torch.autograd.grad(out, ours, grad_out.float().to(tier.device))  # the flag off again
        return out.detach(), grad

    (out, grad), (again, grad_again) = run(), run()
    assert torch.equal(out, again) and torch.equal(grad, grad_again)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "d embeddings")
    if tier.backend != "torch":
        assert routes and all(routes), f"gradient launches' deterministic flags: {routes}"
        routes.clear()
        out = batch_hard_triplet_loss(x.to(tier.device).requires_grad_(True), labels.to(tier.device), margin=0.5,
                                      reduction=reduction)
        assert not out.grad_fn.opts.deterministic
        out.backward(grad_out.float().to(tier.device))
        assert routes and not any(routes), f"default route's deterministic flags: {routes}"


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("loss", ["batch_hard", "triplet_margin"])
def test_compile_over_batch_sizes(tier, gen, monkeypatch, loss, dynamic):
    """``torch.compile(fullgraph=True)`` over 12 batch sizes compiles at most twice (static for the first size,
    then one dynamic graph), past Dynamo's recompile limit of 8 where a graph per size would fail; with
    ``dynamic=True`` once. Graphs are counted by Dynamo's ``unique_graphs``, not by calls of the backend: with
    ``dynamic=True`` Dynamo traces the float arguments (margin, p, eps) symbolically, then restarts the analysis
    once to specialize them, and the discarded attempt reaches the backend too. Values and gradients are the fp64
    reference's at every size. The torch path's mining runs in chunks of 256 bytes (one chunk at 4 rows, 37 chunks
    of a row at 37): the graph must not depend on their count."""
    monkeypatch.setattr(triplet_module, "TORCH_MINING_CHUNK_BYTES", 16 * 4 * 4)
    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    fn = batch_hard_triplet_loss if loss == "batch_hard" else triplet_margin_loss
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    sizes = range(4, 40, 3)
    assert len(sizes) == 12 > torch._dynamo.config.recompile_limit
    for rows in sizes:
        if loss == "batch_hard":
            inputs = [randn(gen, rows, 8), torch.randint(0, 3, (rows,), generator=gen)]
            reference = batch_hard_reference
        else:
            inputs = [randn(gen, rows, 8) for _ in range(3)]
            reference = F.triplet_margin_loss
        ours = [inputs[0].to(tier.device).requires_grad_(True)] + [t.to(tier.device) for t in inputs[1:]]
        refs = [inputs[0].double().requires_grad_(True)] + [t.double() if t.is_floating_point() else t
                                                             for t in inputs[1:]]
        out, ref = compiled(*ours), reference(*refs)
        assert_close(out, ref, torch.float32, f"loss at {rows} rows")
        (grad,) = torch.autograd.grad(out, ours[0])
        (ref_grad,) = torch.autograd.grad(ref, refs[0])
        assert_close(grad, ref_grad, torch.float32, f"gradient at {rows} rows")
    graphs = stats["unique_graphs"] - before
    assert graphs <= (1 if dynamic else 2), f"{graphs} graphs for {len(sizes)} batch sizes"


@pytest.mark.parametrize("in_dims", [(0, 0), (0, None), (None, 0)], ids=["both", "embeddings", "labels"])
def test_batch_hard_unchunked_definition_under_vmap(tier, gen, in_dims):
    """``_batch_hard_unchunked_definition`` (the definition for the ``torch.func`` transforms) under ``vmap`` and
    ``vmap(grad)``, batching embeddings, labels or both: each batch's fp64 reference value and gradient. It also
    propagates shapes on meta tensors (which have no autocast to turn off)."""
    n, rows, dim = 3, 20, 6
    xs = randn(gen, n, rows, dim, dtype=torch.float64)
    ys = torch.stack([labels_with_a_singleton(gen, rows, 4) for _ in range(n)])
    opts = triplet_module._batch_hard_options(xs[0], ys[0], 0.5, False, "mean")

    def loss(x, y):
        return triplet_module._batch_hard_unchunked_definition(opts, x, y)

    args = [t.to(tier.device) if in_dim == 0 else t[0].to(tier.device) for t, in_dim in zip((xs, ys), in_dims)]
    values = torch.func.vmap(loss, in_dims=in_dims)(*args)
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=in_dims)(*args)
    for i in range(n):
        x = (xs[i] if in_dims[0] == 0 else xs[0]).clone().requires_grad_(True)
        ref = batch_hard_reference(x, ys[i] if in_dims[1] == 0 else ys[0], margin=0.5)
        (ref_grad,) = torch.autograd.grad(ref, x)
        assert_close(values[i], ref, torch.float64, f"loss of batch {i}")
        assert_close(grads[i], ref_grad, torch.float64, f"gradient of batch {i}")
    meta = loss(xs[0].to("meta"), ys[0].to("meta"))
    assert (meta.shape, meta.dtype, meta.device.type) == ((), torch.float64, "meta")


# ---------------------------------------------------------------------------------------------------------------
# Property tests: random shapes and options against the fp64 definitions

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(rows=st.integers(1, 9), dim=st.integers(1, 40), p=st.sampled_from([2.0, 1.0, math.inf, 3.0, 0.5]),
                  swap=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]),
                  broadcast=st.sampled_from([None, 0, 1, 2]), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_triplet_property_against_torch(tier, rows, dim, p, swap, reduction, broadcast, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = [randn(gen, rows, dim) for _ in range(3)]
    if broadcast is not None:  # one input a single row, read with stride 0
        tensors[broadcast] = tensors[broadcast][:1]
    if transposed:
        tensors = [t.t().contiguous().t() for t in tensors]
    check_triplet(tier, gen, tensors, torch.float32, margin=1.5, p=p, swap=swap, reduction=reduction)


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(rows=st.integers(1, 80), dim=st.integers(1, 20), classes=st.integers(1, 6),
                  soft_margin=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]),
                  seed=st.integers(0, 2**16))
def test_batch_hard_property_against_reference(tier, rows, dim, classes, soft_margin, reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, rows, dim)
    labels = torch.randint(0, classes, (rows,), generator=gen)  # one class or singletons: nothing valid, NaN mean
    check_batch_hard(tier, gen, x, labels, torch.float32, margin=0.7, soft_margin=soft_margin, reduction=reduction)


# ---------------------------------------------------------------------------------------------------------------
# The autograd / compile / layout contract (tests/test_contract.py)


def _triplet_case(shapes, **kw):
    def make(gen, dtype):
        return [randn(gen, *shape, dtype=dtype) for shape in shapes], kw

    return make


def _expand_positive(args, kw):
    a, p, n = args
    return [a, p[:1].expand(p.shape), n], kw


def _batch_hard_case(rows, dim, classes, **kw):
    def make(gen, dtype):
        return [randn(gen, rows, dim, dtype=dtype), labels_with_a_singleton(gen, rows, classes)], kw

    return make


def _expand_embedding_columns(args, kw):
    x, labels = args
    return [x[:, :1].expand(x.shape), labels], kw


CONTRACT_CASES = [
    Case("triplet_margin_loss-swap", triplet_margin_loss, _triplet_case([(9, 13)] * 3, margin=2.0, swap=True),
         grad_args=(0, 1, 2), compile=True, stride0=_expand_positive),
    Case("triplet_margin_loss-none-p3-broadcast", triplet_margin_loss,
         _triplet_case([(6, 7), (1, 7), (6, 7)], margin=3.0, p=3.0, reduction="none"), grad_args=(0, 1, 2)),
    Case("triplet_margin_loss-sum-p1", triplet_margin_loss, _triplet_case([(5, 11)] * 3, margin=4.0, p=1.0,
                                                                          reduction="sum"), grad_args=(0, 2)),
    # compiled too: its torch backend is another engine (the chunked mining loop, traced as it is)
    Case("batch_hard_triplet_loss-mean", batch_hard_triplet_loss, _batch_hard_case(20, 6, 3, margin=2.0),
         compile=True, stride0=_expand_embedding_columns),
    Case("batch_hard_triplet_loss-none-soft", batch_hard_triplet_loss,
         _batch_hard_case(15, 4, 3, soft_margin=True, reduction="none")),
]
