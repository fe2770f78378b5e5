"""``siglip_loss`` against open_clip's ``SigLipLoss`` (written from its definition in test_contrastive.py) in fp64
eager, in every tier: values, the features', ``logit_scale``'s and ``logit_bias``'s gradients, the numerics at
large ``|z|`` and infinite biases. The modules, autocast and the gloo ranks are tested with CLIP in
test_contrastive.py.
"""

import pytest
import test_contrastive
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_contrastive import leaves, need_dtype, open_clip_siglip, open_clip_siglip_block

from fusedloss import siglip_loss

from conftest import Case, assert_close, peak_allocated_bytes, randn, rel_err

small_bands = test_contrastive.small_bands  # the fixture: several bands and forward programs at test sizes
schedule = test_contrastive.schedule  # the fixture: both kernel schedules


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,dim,scale,bias", [
    (300, 100, 10.0, -10.0),  # open_clip's SigLIP initialization (log scale log(10), bias -10); 3-5 row tiles
    (150, 200, 100.0, -5.0),  # d in chunks, a sharp scale
    (1, 16, 10.0, -10.0),  # one pair: only the positive term
])
def test_siglip_matches_open_clip(small_bands, schedule, gen, dtype, n, dim, scale, bias):
    tier = small_bands
    need_dtype(tier, dtype)
    image, text = randn(gen, n, dim, dtype=torch.float64), randn(gen, n, dim, dtype=torch.float64)
    (img, txt), (img_ref, txt_ref) = leaves(tier.device, dtype, image, text + image)
    (s, b), (s_ref, b_ref) = leaves(tier.device, torch.float64, torch.tensor(scale), torch.tensor(bias))
    grad_out = randn(gen, 1, dtype=torch.float64).reshape(())

    loss = siglip_loss(img, txt, s, b)
    ref = open_clip_siglip(img_ref, txt_ref, s_ref, b_ref)
    assert loss.dtype == dtype and loss.shape == ()
    (loss * grad_out.to(dtype).to(tier.device)).backward()
    (ref * grad_out).backward()
    assert_close(loss, ref, dtype, "loss")
    assert_close(img.grad, img_ref.grad, dtype, "image_features.grad")
    assert_close(txt.grad, txt_ref.grad, dtype, "text_features.grad")
    assert_close(s.grad, s_ref.grad, dtype, "logit_scale.grad")
    assert_close(b.grad, b_ref.grad, dtype, "logit_bias.grad")


@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_siglip_schedules_and_band_gemms(small_bands, gen, monkeypatch, gemm):
    """The fixed-shift schedule leaves SigLIP on the exact schedule's kernels and tiles (its sigmoid epilogue spills
    at 128 x 128: kernels/configs.py), so its results are bitwise the exact schedule's; the cuBLAS band GEMMs
    (``FUSEDLOSS_CONTRASTIVE_GEMM=cublas``) give fp64's values and gradients."""
    tier = small_bands
    if tier.name == "torch":
        pytest.skip("the switches are the kernels'")
    monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_GEMM", gemm)
    image, text = randn(gen, 150, 40, dtype=torch.float64), randn(gen, 150, 40, dtype=torch.float64)
    results = {}
    for name in ("exact", "fixed_shift"):
        monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_SCHEDULE", name)
        (img, txt, s, b), ref = leaves(tier.device, torch.float32, image, text + image, torch.tensor(10.0),
                                       torch.tensor(-10.0))
        loss = siglip_loss(img, txt, s, b)
        results[name] = [loss.detach(), *torch.autograd.grad(loss, [img, txt, s, b])]
    for got, want in zip(results["fixed_shift"], results["exact"]):
        assert torch.equal(got, want)
    expected = open_clip_siglip(*ref)
    for got, want, what in zip(results["exact"], [expected.detach(), *torch.autograd.grad(expected, ref)],
                               ("loss", "image", "text", "logit_scale", "logit_bias")):
        assert_close(got, want, torch.float32, what)


def test_siglip_fp64_exp_scale(small_bands, gen):
    """fp64 (1e-10) with open_clip's parametrization: ``logit_scale.exp()``, a learnable bias, 130 pairs."""
    tier = small_bands
    image, text = randn(gen, 130, 33, dtype=torch.float64), randn(gen, 130, 33, dtype=torch.float64)
    (img, txt, log_s, b), (img_ref, txt_ref, log_s_ref, b_ref) = leaves(
        tier.device, torch.float64, image, text, torch.tensor(2.3), torch.tensor(-10.0))
    loss = siglip_loss(img, txt, log_s.exp(), b)
    ref = open_clip_siglip(img_ref, txt_ref, log_s_ref.exp(), b_ref)
    loss.backward()
    ref.backward()
    for got, want, what in ((loss, ref, "loss"), (img.grad, img_ref.grad, "image"), (txt.grad, txt_ref.grad, "text"),
                            (log_s.grad, log_s_ref.grad, "log_scale"), (b.grad, b_ref.grad, "bias")):
        assert_close(got, want, torch.float64, what)


def test_siglip_large_logits_and_infinite_bias(tier, gen):
    """``|z|`` up to 1e4 (the stable forms: no overflow to inf - inf), and a bias of -inf / +inf, where torch's
    loss is inf and every gradient finite (sigmoid saturates to 0 or 1)."""
    image, text = randn(gen, 20, 8, dtype=torch.float64), randn(gen, 20, 8, dtype=torch.float64)
    for scale, bias in ((1e4, 0.0), (10.0, float("-inf")), (10.0, float("inf"))):
        (img, txt, s, b), (img_ref, txt_ref, s_ref, b_ref) = leaves(
            tier.device, torch.float32, image, text, torch.tensor(scale), torch.tensor(bias))
        loss = siglip_loss(img, txt, s, b)
        ref = open_clip_siglip(img_ref, txt_ref, s_ref, b_ref)
        loss.backward()
        ref.backward()
        assert torch.isfinite(img.grad).all() and torch.isfinite(s.grad) and torch.isfinite(b.grad)
        assert rel_err(loss, ref) <= 1e-5, (scale, bias)
        for got, want in ((img.grad, img_ref.grad), (txt.grad, txt_ref.grad), (s.grad, s_ref.grad),
                          (b.grad, b_ref.grad)):
            assert rel_err(got, want) <= 1e-4, (scale, bias)


def test_siglip_bias_none_and_numbers(tier, gen):
    """``logit_bias=None`` is no bias; numbers (NumPy's too) for scale and bias."""
    np = pytest.importorskip("numpy")
    x, y = randn(gen, 9, 5, device=tier.device), randn(gen, 9, 5, device=tier.device)
    ref = open_clip_siglip(x.double().cpu(), y.double().cpu(), 7.0, 0.0)
    assert_close(siglip_loss(x, y, 7.0, None), ref, torch.float32, "no bias")
    assert_close(siglip_loss(x, y, np.float32(7.0), np.int64(0)), ref, torch.float32, "numpy numbers")


def test_siglip_is_not_clip_with_a_bias(tier, gen):
    """The issue's pitfall: ``clip_loss`` ignores a bias (it cancels in the softmax), SigLIP's loss depends on it."""
    x, y = randn(gen, 16, 8, device=tier.device), randn(gen, 16, 8, device=tier.device)
    from fusedloss import clip_loss

    assert float(siglip_loss(x, y, 10.0, -10.0)) != pytest.approx(float(clip_loss(x, y, 10.0, -10.0)), rel=0.1)
    assert float(siglip_loss(x, y, 10.0, -10.0)) != pytest.approx(float(siglip_loss(x, y, 10.0, -5.0)), rel=0.01)


@pytest.mark.parametrize("bad,exc,name", [
    (lambda x: siglip_loss(x, x[:, :3], 10.0, -10.0), ValueError, "text_features"),
    (lambda x: siglip_loss(x, x.double(), 10.0, -10.0), TypeError, "text_features"),
    (lambda x: siglip_loss(x, x, torch.ones(2), -10.0), ValueError, "logit_scale"),
    (lambda x: siglip_loss(x, x, 10.0, torch.ones(2)), ValueError, "logit_bias"),
    (lambda x: siglip_loss(x, x, 10.0, "b"), TypeError, "logit_bias"),
    (lambda x: siglip_loss(x, x, 10.0, -10.0, process_group=1), ValueError, "process_group"),
    (lambda x: siglip_loss(x[:0], x[:0], 10.0, -10.0), ValueError, "image_features"),
])
def test_siglip_bad_input_names_the_argument(bad, exc, name):
    with pytest.raises(exc, match=name):
        bad(torch.randn(6, 4))


def test_siglip_property_against_fp64_reference(tier):
    if tier.name == "cuda":
        pytest.skip("the fp64 property tests run in the CPU tiers")

    @settings(max_examples=8, deadline=None)
    @given(n=st.integers(1, 40), dim=st.integers(1, 20), scale=st.floats(0.1, 100.0), bias=st.floats(-20.0, 20.0),
           seed=st.integers(0, 2**16))
    def check(n, dim, scale, bias, seed):
        gen = torch.Generator().manual_seed(seed)
        inputs = (randn(gen, n, dim, dtype=torch.float64), randn(gen, n, dim, dtype=torch.float64),
                  torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64))
        tested, ref = leaves(tier.device, torch.float64, *inputs)
        out, expected = siglip_loss(*tested), open_clip_siglip(*ref)
        assert_close(out, expected, torch.float64, "loss")
        for got, want in zip(torch.autograd.grad(out, tested), torch.autograd.grad(expected, ref)):
            # or 1e-12 absolute: a gradient that is a small difference (d = 1, where normalization is constant; a
            # tiny softmax weight minus 1) has no relative accuracy in the fp64 reference itself
            assert rel_err(got, want) <= 1e-9 or float((got - want).abs().max()) <= 1e-12

    check()


def open_clip_siglip_by_blocks(image, text, logit_scale, logit_bias, block=512):
    """``open_clip_siglip`` and its gradients with respect to the four leaves, ``block`` rows of images at a time
    (the texts reordered so that the block's positives come first, as open_clip's labels ``2 I - 1`` need), so that
    the fp64 reference never holds the N x N logits. Returns (loss, image.grad, text.grad, scale.grad, bias.grad)."""
    img, txt = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    n = img.shape[0]
    total = torch.zeros((), dtype=img.dtype)
    grads = [torch.zeros_like(t) for t in (img, txt, logit_scale, logit_bias)]
    for start in range(0, n, block):
        stop = min(n, start + block)
        order = torch.cat([torch.arange(start, stop), torch.arange(start), torch.arange(stop, n)])
        loss = open_clip_siglip_block(img[start:stop], txt[order], logit_scale, logit_bias) * ((stop - start) / n)
        total += loss.detach()
        for g, part in zip(grads, torch.autograd.grad(loss, [img, txt, logit_scale, logit_bias])):
            g += part
    return (total, *torch.autograd.grad([img, txt], [image, text], grads[:2]), *grads[2:])


def test_torch_path_memory_is_linear(tier, gen):
    """8192-pair SigLIP forward + backward (d = 32, fp32) on the torch path, as CLIP's in test_contrastive.py: the
    peak of memory allocated during the call is under a tenth of the 8192^2 fp32 logits (256 MiB; 20 MiB measured,
    bands of 128 x 8192 with three such temporaries, and O(N d) buffers: a label mask and selects per band of
    512 rows made it 150 MiB), and the loss and every gradient are the fp64 reference's."""
    if tier.name != "torch":
        pytest.skip("the torch backend's bands; the kernels' band is sized in kernels/configs.py")
    image, text = randn(gen, 8192, 32, dtype=torch.float64), randn(gen, 8192, 32, dtype=torch.float64)
    tested, ref = leaves(tier.device, torch.float32, image, text, torch.tensor(10.0), torch.tensor(-10.0))
    losses = []

    def forward_backward():
        losses.append(siglip_loss(*tested))
        losses[0].backward()

    peak = peak_allocated_bytes(forward_backward)
    print(f"\npeak tensor memory, 8192 x 32 SigLIP fwd+bwd: torch path {peak / 2**20:.1f} MiB "
          f"({peak / (8192**2 * 4):.1%} of the fp32 logits)")
    assert peak < 0.1 * 8192**2 * 4
    expected = open_clip_siglip_by_blocks(*ref)
    for got, want, what in zip([losses[0], *(t.grad for t in tested)], expected,
                               ("loss", "image", "text", "logit_scale", "logit_bias")):
        assert_close(got, want, torch.float32, what)


def _siglip_case(gen, dtype):
    x, y = randn(gen, 7, 5, dtype=dtype), randn(gen, 7, 5, dtype=dtype)
    return [x, x + y, torch.tensor(4.0, dtype=dtype), torch.tensor(-2.0, dtype=dtype)], {}


CONTRACT_CASES = [
    Case("siglip_loss", siglip_loss, _siglip_case, grad_args=(0, 1, 2, 3), compile=True,
         stride0=lambda args, kwargs: ([args[0][:1].expand_as(args[0]), *args[1:]], kwargs)),
]


def test_reference_is_open_clip_formula(gen):
    """The reference itself: open_clip's labels 2I - 1 form equals the per-pair softplus sum."""
    x = F.normalize(randn(gen, 5, 3, dtype=torch.float64), dim=1)
    y = F.normalize(randn(gen, 5, 3, dtype=torch.float64), dim=1)
    z = 3.0 * x @ y.T - 1.0
    direct = (F.softplus(-z.diagonal()).sum() + F.softplus(z).sum() - F.softplus(z.diagonal()).sum()) / 5
    assert_close(open_clip_siglip(x, y, 3.0, -1.0), direct, torch.float64, "reference")
