"""triplet_margin_loss against torch's own in fp64, and batch_hard_triplet_loss against a direct reference
(``torch.cdist`` + label masks), in every tier."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_close, randn
from fusedloss.losses.triplet import batch_hard_triplet_loss, triplet_margin_loss


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
    if tier.name == "interpret" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton issue 11584)")
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
