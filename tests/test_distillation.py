"""kl_div_with_logits against an fp64 eager reference (torch's log_softmax, the KL sum written with the 0 log 0
convention, and torch's own kl_div where the logits are finite), in every tier."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import assert_close, randn
from fusedloss.losses.distillation import kl_div_with_logits


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
    ("temperature", TypeError, lambda s, t: kl_div_with_logits(s, t, torch.tensor([2.0, 3.0]))),
    ("target", TypeError, lambda s, t: kl_div_with_logits(s, t, target=torch.zeros(3))),
    ("target", ValueError, lambda s, t: kl_div_with_logits(s, t, target=torch.zeros(4, dtype=torch.long))),
    ("ignore_index", TypeError, lambda s, t: kl_div_with_logits(s, t, ignore_index=1.5)),
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
