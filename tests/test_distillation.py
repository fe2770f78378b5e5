"""kl_div_with_logits against an fp64 eager reference (torch's log_softmax, the KL sum written with the 0 log 0
convention, and torch's own kl_div where the logits are finite), in every tier."""

import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.losses.distillation import kl_div_with_logits

from conftest import Case, assert_close, randn


def reference(student, teacher, temperature=1.0, target=None, ignore_index=-100, reduction="batchmean"):
    """Hinton et al. (2015): T^2 sum_c p_c (log p_c - log q_c) per row with p, q the softmaxes at temperature T,
    ignored rows zeroed, batchmean over the kept rows. Terms with p_c = 0 are 0; torch's kl_div makes them NaN
    when log q_c is -inf too (-inf - -inf), so the sum is written out, safe for autograd
    (``test_matches_torch_kl_div`` ties it to torch's function on finite logits)."""
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    p = log_p.exp()
    mass = p > 0
    zero = torch.zeros_like(p)
    terms = torch.where(mass, p * (torch.where(mass, log_p, zero) - torch.where(mass, log_q, zero)), zero)
    rows = temperature**2 * terms.sum(-1)
    kept = torch.ones_like(rows, dtype=torch.bool) if target is None else target != ignore_index
    rows = torch.where(kept, rows, torch.zeros_like(rows))
    return {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / kept.sum()}[reduction]


def check(tier, gen, student, teacher, dtype, teacher_grad=False, factor=1.0, **kw):
    s = student.detach().to(tier.device).requires_grad_(True)
    t = teacher.detach().to(tier.device).requires_grad_(teacher_grad)
    kw_dev = {k: (v.to(tier.device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = kl_div_with_logits(s, t, **kw_dev)
    s64 = student.detach().double().requires_grad_(True)
    t64 = teacher.detach().double().requires_grad_(teacher_grad)
    ref = reference(s64, t64, **kw)
    assert out.dtype == torch.promote_types(student.dtype, teacher.dtype) and out.shape == ref.shape
    assert_close(out, ref, dtype, "loss", factor)
    grad_out = (torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5).to(out.dtype)
    inputs, ref_inputs = [s] + ([t] if teacher_grad else []), [s64] + ([t64] if teacher_grad else [])
    grads = torch.autograd.grad(out, inputs, grad_out.to(tier.device))
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
    for name, g, r, x in zip(("d student", "d teacher"), grads, ref_grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close(g, r, dtype, name, factor)


SHAPES = {
    "blocks": (3, 9000),  # 9000 classes: the 4096-wide block loop, the last block partial
    "small_vocab": (37, 10),  # several rows per program, classes padded to 16
    "one_row": (1, 300),
    "tokens": (2, 3, 257),  # (B, T, V) as a language model emits
}


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_distillation(tier, gen, shape, masked, reduction):
    shape = SHAPES[shape]
    student = randn(gen, *shape, scale=3.0)
    teacher = randn(gen, *shape, scale=3.0)
    kw = {"temperature": 2.0, "reduction": reduction}
    if masked:
        target = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        target.view(-1)[0] = -100
        kw["target"] = target
    check(tier, gen, student, teacher, torch.float32, teacher_grad=True, **kw)


def test_matches_torch_kl_div(tier, gen):
    """The usual distillation recipe with torch's functions, batchmean over all rows."""
    s, t = randn(gen, 6, 333, scale=3.0, dtype=torch.float64), randn(gen, 6, 333, scale=3.0, dtype=torch.float64)
    expected = 4.0 * F.kl_div(F.log_softmax(s / 2.0, -1), F.log_softmax(t / 2.0, -1), reduction="batchmean",
                              log_target=True)
    assert_close(kl_div_with_logits(s.to(tier.device), t.to(tier.device), 2.0), expected, torch.float64)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_temperature_and_student_only(tier, gen, temperature):
    """T^2 scaling at several temperatures; the teacher frozen (no gradient), the common case."""
    check(tier, gen, randn(gen, 5, 700, scale=4.0), randn(gen, 5, 700, scale=4.0), torch.float32,
          temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(tier, gen, dtype):
    student = randn(gen, 4, 1500, dtype=dtype, scale=3.0)
    check(tier, gen, student, randn(gen, 4, 1500, dtype=dtype, scale=3.0), dtype, teacher_grad=True)
    # A frozen fp32 teacher for a low-precision student: promotes, each gradient in its own dtype.
    check(tier, gen, student, randn(gen, 4, 1500, dtype=torch.float32, scale=3.0), dtype)


def test_identical_logits_give_zero(tier, gen):
    """KL(p || p) = 0 exactly: the cross term and the two log-sum-exps cancel without rounding."""
    x = randn(gen, 3, 5000, scale=5.0, device=tier.device, requires_grad=True)
    loss = kl_div_with_logits(x, x.detach(), temperature=1.5, reduction="none")
    assert loss.abs().max().item() < 1e-5
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert g.abs().max().item() < 1e-6


def test_masked_vocabulary(tier, gen):
    """-inf logits (a masked vocabulary): teacher zeros contribute nothing (0 log 0), and a student -inf where
    the teacher also has -inf is fine; gradients stay finite."""
    student = randn(gen, 4, 300, scale=2.0)
    teacher = randn(gen, 4, 300, scale=2.0)
    student[:, 250:] = float("-inf")
    teacher[:, 250:] = float("-inf")
    teacher[1, :100] = float("-inf")  # teacher-only zeros
    check(tier, gen, student, teacher, torch.float32, reduction="sum")


def test_all_rows_ignored(tier, gen):
    x = randn(gen, 3, 20, device=tier.device, requires_grad=True)
    target = torch.full((3,), -100, device=tier.device)
    loss = kl_div_with_logits(x, randn(gen, 3, 20, device=tier.device), target=target)
    assert torch.isnan(loss).item()  # 0 / 0, like an all-ignored cross-entropy
    (g,) = torch.autograd.grad(loss, x)
    assert torch.equal(g.cpu(), torch.zeros(3, 20))


def test_fused_gradient_is_final_when_grad_output_is_one(tier, gen):
    s = randn(gen, 6, 3000, device=tier.device, requires_grad=True)
    t = randn(gen, 6, 3000, device=tier.device)
    kl_div_with_logits(s, t, temperature=2.0).backward()
    s64 = s.detach().cpu().double().requires_grad_(True)
    reference(s64, t.cpu().double(), temperature=2.0).backward()
    assert_close(s.grad, s64.grad, torch.float32)


def test_noncontiguous_rows(tier, gen):
    """A strided row view (every other row of a larger batch) is read in place; a transposed layout, whose
    class stride is not 1, is copied."""
    base = randn(gen, 8, 400, scale=2.0)
    check(tier, gen, base[::2], randn(gen, 4, 400, scale=2.0), torch.float32, teacher_grad=True)
    check(tier, gen, randn(gen, 400, 4).t(), randn(gen, 4, 400), torch.float32, reduction="none")


BAD = [
    ("student_logits", TypeError, lambda s, t: kl_div_with_logits(s.long(), t)),
    ("teacher_logits", TypeError, lambda s, t: kl_div_with_logits(s, t.int())),
    ("teacher_logits", ValueError, lambda s, t: kl_div_with_logits(s, t[:, :3])),
    ("student_logits", ValueError, lambda s, t: kl_div_with_logits(s[0, 0], t[0, 0])),
    ("temperature", ValueError, lambda s, t: kl_div_with_logits(s, t, 0.0)),
    ("temperature", ValueError, lambda s, t: kl_div_with_logits(s, t, float("inf"))),
    ("temperature", TypeError, lambda s, t: kl_div_with_logits(s, t, torch.tensor([2.0, 3.0]))),
    ("target", TypeError, lambda s, t: kl_div_with_logits(s, t, target=torch.zeros(3))),
    ("target", ValueError, lambda s, t: kl_div_with_logits(s, t, target=torch.zeros(4, dtype=torch.long))),
    ("ignore_index", TypeError, lambda s, t: kl_div_with_logits(s, t, ignore_index=1.5)),
    ("target", TypeError, lambda s, t: kl_div_with_logits(s, t, target=torch.zeros(3, dtype=torch.bool))),
    ("batchmean", ValueError, lambda s, t: kl_div_with_logits(s, t, reduction="mean")),
    ("reduction", ValueError, lambda s, t: kl_div_with_logits(s, t, reduction="avg")),
]


@pytest.mark.parametrize("name,error,call", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(tier, gen, name, error, call):
    if tier.device.type != "cpu":
        pytest.skip("the bad-input table builds CPU tensors; the checks are device-independent")
    with pytest.raises(error, match=name):
        call(randn(gen, 3, 5), randn(gen, 3, 5))


def test_exports_and_modules(tier, gen):
    assert fusedloss.kl_div_with_logits is kl_div_with_logits
    s, t = randn(gen, 4, 9, device=tier.device), randn(gen, 4, 9, device=tier.device)
    target = torch.tensor([1, -100, 2, 3], device=tier.device)
    module = fusedloss.nn.DistillationKLDivLoss(temperature=2.0, ignore_index=-100, reduction="sum")
    assert torch.equal(module(s, t, target), kl_div_with_logits(s, t, 2.0, target=target, reduction="sum"))


# ---------------------------------------------------------------------------------------------------------------
# Hostile inputs: what the loss must not get silently wrong


def torch_composition(student, teacher, temperature=1.0, reduction="none", log_target=True):
    """The distillation loss as users write it with torch's functions, per row ('none') or reduced."""
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    terms = F.kl_div(log_q, log_p if log_target else log_p.exp(), reduction="none", log_target=log_target)
    rows = temperature**2 * terms.sum(-1)
    return {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / rows.numel()}[reduction]


def check_against(tier, gen, student, teacher, expected_fn, teacher_grad=True, **kw):
    """Value and the gradients (random grad_output) in fp64 against ``expected_fn``, NaN and inf positions
    included (conftest.rel_err)."""
    s, t = (x.detach().clone().to(tier.device).requires_grad_(True) for x in (student, teacher))
    out = kl_div_with_logits(s, t, **kw)
    s64, t64 = (x.detach().clone().requires_grad_(True) for x in (student, teacher))
    ref = expected_fn(s64, t64)
    assert_close(out, ref, torch.float64, "loss")
    grad_out = torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5
    pairs = [(s, s64)] + ([(t, t64)] if teacher_grad else [])
    for name, g, r in zip(("d student", "d teacher"), torch.autograd.grad(out, [a for a, _ in pairs],
                                                                          grad_out.to(tier.device)),
                          torch.autograd.grad(ref, [b for _, b in pairs], grad_out)):
        assert_close(g, r, torch.float64, name)


NON_FINITE = {
    "nan_student": lambda s, t: s.__setitem__((1, 2), math.nan),
    "nan_teacher": lambda s, t: t.__setitem__((1, 2), math.nan),
    "inf_student": lambda s, t: s.__setitem__((1, 2), math.inf),
    "inf_teacher": lambda s, t: t.__setitem__((2, 0), math.inf),
    "minus_inf_student_where_teacher_has_mass": lambda s, t: s.__setitem__((1, 2), -math.inf),
    "all_minus_inf_teacher_row": lambda s, t: t.__setitem__(1, -math.inf),
    "all_minus_inf_student_row": lambda s, t: s.__setitem__(0, -math.inf),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_logits_match_torchs_composition(tier, gen, case):
    """NaN, +inf, and -inf student logits where the teacher has mass: torch's composition's loss (NaN rows, an
    inf row) and its student and teacher gradients, element by element."""
    student, teacher = randn(gen, 4, 37, dtype=torch.float64), randn(gen, 4, 37, dtype=torch.float64)
    NON_FINITE[case](student, teacher)
    check_against(tier, gen, student, teacher, lambda s, t: torch_composition(s, t, 2.0), temperature=2.0,
                  reduction="none")


def test_masked_teacher_classes_contribute_zero(tier, gen):
    """The one place the loss departs from torch's composition: a class without teacher mass (-inf logit) adds
    0 (0 log 0 = 0) where the composition forms 0 * -inf = NaN. With a finite student there, the loss is torch's
    ``kl_div(log_q, p)`` (log_target=False, whose xlogy gives the same 0); masked in both, it is torch's
    composition on the unmasked classes. (The teacher's gradient there is 0, the derivative of a constant 0
    term, where torch's xlogy backward gives NaN: checked against ``reference`` by ``test_masked_vocabulary``.)"""
    student, teacher = randn(gen, 3, 40, dtype=torch.float64), randn(gen, 3, 40, dtype=torch.float64)
    teacher[:, 30:] = -math.inf
    assert torch.isnan(torch_composition(student, teacher, 2.0)).all()
    check_against(tier, gen, student, teacher, lambda s, t: torch_composition(s, t, 2.0, log_target=False),
                  teacher_grad=False, temperature=2.0, reduction="none")
    student[:, 30:] = -math.inf
    assert torch.isnan(torch_composition(student, teacher, 2.0, log_target=False)).all()
    s, t = student.to(tier.device).requires_grad_(True), teacher.to(tier.device)
    out = kl_div_with_logits(s, t, 2.0, reduction="none")
    s_kept = student[:, :30].clone().requires_grad_(True)
    expected = torch_composition(s_kept, teacher[:, :30], 2.0)
    assert_close(out, expected, torch.float64, "loss on the unmasked classes")
    (g,) = torch.autograd.grad(out.sum(), s)
    (r,) = torch.autograd.grad(expected.sum(), s_kept)
    assert_close(g[:, :30], r, torch.float64, "d student")
    assert torch.equal(g[:, 30:].cpu(), torch.zeros(3, 10, dtype=torch.float64))


@pytest.mark.parametrize("temperature", [math.inf, -math.inf, math.nan, -1.0])
def test_temperature_must_be_finite_and_positive(tier, gen, temperature):
    """T = inf is refused: every softmax is uniform, T^2 KL is inf * 0 (torch's composition returns NaN), and the
    limit T -> inf is another loss (logit matching)."""
    s, t = randn(gen, 2, 5, device=tier.device), randn(gen, 2, 5, device=tier.device)
    if temperature == math.inf:
        assert torch.isnan(torch_composition(s.cpu(), t.cpu(), temperature, reduction="sum"))
    with pytest.raises(ValueError, match="temperature"):
        kl_div_with_logits(s, t, temperature)


def test_number_arguments_in_every_form_torch_takes(tier, gen):
    import numpy as np

    s, t = randn(gen, 4, 9, device=tier.device), randn(gen, 4, 9, device=tier.device)
    target = torch.tensor([1, -100, 2, 3], device=tier.device)
    expected = kl_div_with_logits(s, t, 2.0, target=target, ignore_index=-100)
    for temperature, ignore in ((np.float32(2.0), np.int64(-100)), (torch.tensor(2.0), torch.tensor(-100)),
                                (2, np.int32(-100))):
        assert torch.equal(kl_div_with_logits(s, t, temperature, target=target, ignore_index=ignore), expected)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_targets_of_every_integer_dtype_compare_in_int64(tier, gen, dtype):
    """A uint8 target 156 is not ignore_index = -100 (which wraps to 156 in uint8); 255 is ignored only when
    ignore_index is 255. Every dtype keeps the same rows as the int64 values it holds."""
    s, t = randn(gen, 4, 30, device=tier.device), randn(gen, 4, 30, device=tier.device)
    values = torch.tensor([156, 255, 3, 100]) if dtype == torch.uint8 else torch.tensor([-100, 127, 3, -5])
    target = values.to(dtype).to(tier.device)
    for ignore in (-100, 255, 3):
        kept = values != ignore
        out = kl_div_with_logits(s, t, target=target, ignore_index=ignore, reduction="none")
        assert torch.equal(out.cpu() != 0, kept), (dtype, ignore)
        assert_close(out[kept.to(tier.device)], reference(s.cpu().double(), t.cpu().double(),
                                                          reduction="none")[kept], torch.float32)


@pytest.mark.parametrize("shape", [(0, 7), (3, 0), (2, 0, 5), (0, 3, 5)],
                         ids=["no_rows", "no_classes", "no_tokens", "no_batch"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_empty_and_zero_width_inputs_give_torchs_answer(tier, shape, reduction):
    """No rows: 'batchmean' is 0 / 0 = NaN, 'sum' 0, 'none' empty. No classes: every KL is a sum of nothing, 0."""
    s = torch.zeros(shape, device=tier.device, requires_grad=True)
    t = torch.zeros(shape, device=tier.device)
    out = kl_div_with_logits(s, t, 2.0, reduction=reduction)
    expected = torch_composition(torch.zeros(shape), torch.zeros(shape), 2.0, reduction=reduction)
    assert out.shape == expected.shape
    assert torch.allclose(out.detach().cpu(), expected, equal_nan=True)
    (g,) = torch.autograd.grad(out.sum(), s)
    assert g.shape == s.shape and not g.any()
    target = torch.full(shape[:-1], -100, dtype=torch.long, device=tier.device)
    masked = kl_div_with_logits(s, t, 2.0, target=target, reduction=reduction)
    assert masked.shape == expected.shape


def test_autocast_returns_fp32(tier, gen):
    s = randn(gen, 6, 50, dtype=torch.bfloat16, scale=3.0, device=tier.device, requires_grad=True)
    t = randn(gen, 6, 50, dtype=torch.bfloat16, scale=3.0, device=tier.device)
    with torch.autocast(tier.device.type, dtype=torch.bfloat16):
        out = kl_div_with_logits(s, t, 2.0)
    assert out.dtype == torch.float32
    (g,) = torch.autograd.grad(out, s)
    assert g.dtype == torch.bfloat16
    assert_close(out, reference(s.detach().cpu().double(), t.cpu().double(), 2.0), torch.bfloat16)


def test_broadcast_teacher_and_strided_target_read_in_place(tier, gen):
    """A teacher row expanded over the batch (row stride 0), in storage whose next row is NaN; a target column of
    a label table; a student whose classes are one expanded value (class stride 0, copied): the dense inputs'
    results."""
    base = torch.full((2, 60), math.nan)
    base[0] = randn(gen, 60, scale=2.0)
    teacher = base[:1].expand(5, 60)
    table = torch.randint(0, 60, (5, 3), generator=gen)
    table[1, 1] = -100
    check(tier, gen, randn(gen, 5, 60, scale=2.0), teacher, torch.float32, temperature=1.5, target=table[:, 1])
    column = randn(gen, 5, 2)
    check(tier, gen, column[:, :1].expand(5, 60), randn(gen, 5, 60), torch.float32, reduction="none")


def test_second_backward_recomputes(tier, gen):
    """A fused batchmean gradient is handed out once; the next backward through the retained graph recomputes it
    from the stored row statistics, teacher included."""
    s = randn(gen, 4, 3000, device=tier.device, requires_grad=True)
    t = randn(gen, 4, 3000, device=tier.device, requires_grad=True)
    loss = kl_div_with_logits(s, t, 2.0)
    first = torch.autograd.grad(loss, (s, t), retain_graph=True)
    second = torch.autograd.grad(loss, (s, t), torch.tensor(3.0, device=tier.device))
    for a, b in zip(first, second):
        assert_close(b, 3 * a, torch.float32, "second backward")


# ---------------------------------------------------------------------------------------------------------------
# Property test: random shapes, temperatures, masks and layouts against the fp64 reference

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(rows=st.integers(1, 7), classes=st.integers(1, 300), temperature=st.sampled_from([0.5, 1.0, 3.0]),
                  reduction=st.sampled_from(["batchmean", "sum", "none"]), ignore=st.sampled_from([0.0, 0.5, 1.0]),
                  teacher_grad=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_property_against_reference(tier, rows, classes, temperature, reduction, ignore, teacher_grad, transposed,
                                    seed):
    gen = torch.Generator().manual_seed(seed)
    student, teacher = randn(gen, rows, classes, scale=3.0), randn(gen, rows, classes, scale=3.0)
    if transposed:  # the same values, classes walked with a stride other than one (copied)
        student = student.t().contiguous().t()
    kw = dict(temperature=temperature, reduction=reduction)
    if ignore:
        target = torch.randint(0, classes, (rows,), generator=gen)
        target[torch.rand(rows, generator=gen) < ignore] = -100
        kw["target"] = target
    check(tier, gen, student, teacher, torch.float32, teacher_grad=teacher_grad, **kw)


# ---------------------------------------------------------------------------------------------------------------
# The autograd / compile / layout contract (tests/test_contract.py)


def _case(shape, *, masked=False, **kw):
    def make(gen, dtype):
        student, teacher = randn(gen, *shape, dtype=dtype, scale=2.0), randn(gen, *shape, dtype=dtype, scale=2.0)
        if masked:
            target = torch.randint(0, shape[-1], shape[:-1], generator=gen)
            target.view(-1)[0] = -100
            kw["target"] = target
        return [student, teacher], kw

    return make


def _expand_teacher_row(args, kw):
    student, teacher = args
    return [student, teacher[:1].expand(teacher.shape)], kw


CONTRACT_CASES = [
    Case("kl_div_with_logits-batchmean-masked", kl_div_with_logits, _case((2, 3, 17), masked=True, temperature=2.0),
         grad_args=(0, 1), compile=True, stride0=_expand_teacher_row),
    # compiled too: its backward is the recompute from the row statistics, which must not read strides
    Case("kl_div_with_logits-none", kl_div_with_logits, _case((5, 23), temperature=0.5, reduction="none"),
         grad_args=(0, 1), compile=True),
    Case("kl_div_with_logits-sum-student_only", kl_div_with_logits, _case((4, 9), reduction="sum"),
         stride0=_expand_teacher_row),
]
