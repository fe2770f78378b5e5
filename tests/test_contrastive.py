"""Contrastive losses (``nt_xent``, ``clip_loss``, ``info_nce``; ``siglip_loss`` in test_siglip.py) against fp64
eager references, in every tier, and ``clip_loss`` / ``siglip_loss`` across gloo ranks.

References: SimCLR's ``info_nce_loss`` verbatim (NT-Xent), open_clip's ``ClipLoss`` and ``SigLipLoss`` (written
here from open_clip's ``loss.py``: single process, and each rank's loss with ``local_loss=True,
gather_with_grad=True`` / the neighbour exchange), and ``F.cross_entropy`` over normalized similarities (InfoNCE).
Shapes: N not a multiple of any tile (75, 150, 300 rows against 32/64/128-row tiles), d not a power of two (100,
200, 33), a single pair (N = 1), extra negative keys. Unless a test says otherwise the backward bands are made small
(128 rows for the kernels, ~13 rows for the torch path) and the forward runs 2 programs, so that every test walks
several bands, programs of several row tiles and the band-to-band fp32 accumulation.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from contrastive_dist_worker import RETRIEVAL_MARGIN, dist_batch, retrieval_batch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fusedloss
from fusedloss.losses import contrastive as host
from fusedloss.losses.contrastive import clip_loss, info_nce, nt_xent, siglip_loss

from conftest import (
    DEVICE,
    TOL,
    Case,
    assert_close,
    peak_allocated_bytes,
    randn,
    readme_example,
    rel_err,
    run_gloo_ranks,
)

# ---------------------------------------------------------------------------------------------------------------
# References (fp64 eager)


def simclr_info_nce_loss(features, temperature=0.07):
    """SimCLR's ``info_nce_loss`` (its reference implementation), verbatim (labels/mask on the features' device)."""
    features = F.normalize(features, dim=1)
    similarity = features @ features.T / temperature
    N = features.shape[0] // 2
    labels = torch.cat([torch.arange(N, 2 * N), torch.arange(N)]).to(features.device)
    mask = torch.eye(2 * N, dtype=bool, device=features.device)
    similarity.masked_fill_(mask, -float("inf"))
    return F.cross_entropy(similarity, labels)


def open_clip_loss(image, text, logit_scale, logit_bias=None, normalize=True):
    """open_clip's ClipLoss, single process, on features normalized first (as open_clip's models return them)."""
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = logit_scale * image @ text.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def open_clip_siglip_block(image, text, logit_scale, logit_bias, negative_only=False):
    """open_clip's ``SigLipLoss._loss`` on normalized features: ``-logsigmoid(labels * logits).sum() / n``."""
    logits = logit_scale * image @ text.T + logit_bias
    labels = -torch.ones_like(logits)
    if not negative_only:
        labels = labels + 2 * torch.eye(*logits.shape, dtype=logits.dtype, device=logits.device)
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


def open_clip_siglip(image, text, logit_scale, logit_bias):
    return open_clip_siglip_block(F.normalize(image, dim=-1), F.normalize(text, dim=-1), logit_scale, logit_bias)


def open_clip_rank_losses(kind, images, texts, scale, bias, world):
    """Each rank's loss as open_clip's distributed losses compute it on that rank (``(W,)``), differentiable in the
    global tensors: ClipLoss(local_loss=True, gather_with_grad=True): its rows against the gathered batch, both
    directions; SigLipLoss(rank, world_size): its block with positives, plus every other rank's texts as negatives
    (the blocks its neighbour exchange brings, in any order)."""
    img, txt = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    n = img.shape[0] // world
    losses = []
    for r in range(world):
        rows = slice(r * n, (r + 1) * n)
        if kind == "clip":
            labels = torch.arange(r * n, (r + 1) * n)
            losses.append((F.cross_entropy(scale * img[rows] @ txt.T, labels) +
                           F.cross_entropy(scale * txt[rows] @ img.T, labels)) / 2)
            continue
        loss = open_clip_siglip_block(img[rows], txt[rows], scale, bias)
        for s in range(world):
            if s != r:
                loss = loss + open_clip_siglip_block(img[rows], txt[s * n:(s + 1) * n], scale, bias, True)
        losses.append(loss)
    return torch.stack(losses)


def eager_info_nce(query, key, temperature, normalize=True, reduction="mean"):
    if normalize:
        query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    labels = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(query @ key.T / temperature, labels, reduction=reduction)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


# bf16 in the interpreter tier: the torch path, as a user's call there takes (its bf16 tl.dot is wrong)
DTYPES = {"interpret": (torch.float32, torch.float16, torch.bfloat16),
          "torch": (torch.float32, torch.float64, torch.bfloat16),
          "cuda": (torch.bfloat16, torch.float16, torch.float32)}


def need_dtype(tier, dtype):
    if dtype not in DTYPES[tier.name] and dtype != torch.float64:
        pytest.skip(f"{dtype} is covered in other tiers")


def kernel_configs():
    from fusedloss.kernels import configs

    return configs


@pytest.fixture
def small_bands(tier, monkeypatch):
    """Backward bands of 128 rows (kernels) or ~13 rows (torch path at N = 300 columns), 2 forward programs of
    several row tiles: the multi-band / multi-program code paths at test sizes."""
    monkeypatch.setattr(host, "_TORCH_BAND_ELEMENTS", 4096)
    if tier.name != "torch":
        monkeypatch.setattr(kernel_configs(), "CONTRASTIVE_BAND_BYTES", 0)
        monkeypatch.setattr(kernel_configs(), "CONTRASTIVE_BAND_MIN_ROWS", 128)
        monkeypatch.setattr(kernel_configs(), "CONTRASTIVE_FWD_PROGRAMS", 2)
    return tier


@pytest.fixture(params=["exact", "fixed_shift"])
def schedule(request, tier, monkeypatch):
    """Both kernel schedules (``FUSEDLOSS_CONTRASTIVE_SCHEDULE``, kernels/contrastive.py's docstring); the torch tier
    has one path, so it runs the first only."""
    if tier.name == "torch" and request.param != "exact":
        pytest.skip("the schedule is the kernels' (the torch tier runs its own path)")
    monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_SCHEDULE", request.param)
    return request.param


def leaves(device, dtype, *tensors):
    """Copies of fp64 CPU tensors as leaves of ``dtype`` on ``device`` (the tested inputs) and fp64 leaves of the
    same rounded values (the reference's inputs)."""
    tested = [t.to(dtype).to(device).requires_grad_() for t in tensors]
    ref = [t.detach().to(torch.float64).cpu().requires_grad_() for t in tested]
    return tested, ref


# ---------------------------------------------------------------------------------------------------------------
# NT-Xent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,dim,temperature", [
    (75, 100, 0.07),  # 150 rows: not a multiple of 32/64/128; d not a power of two (one chunk for 16-bit)
    (150, 200, 0.01),  # d streamed in chunks; the sharpest temperature
    (1, 8, 1.0),  # one pair: each row's only candidate is its positive (loss 0, gradient 0)
])
def test_nt_xent_matches_simclr(small_bands, schedule, gen, dtype, n, dim, temperature):
    tier = small_bands
    need_dtype(tier, dtype)
    x = randn(gen, 2 * n, dim, dtype=torch.float64)
    (features,), (features_ref,) = leaves(tier.device, dtype, x)
    grad_out = randn(gen, 1, dtype=torch.float64).reshape(())

    loss = nt_xent(features, temperature)
    ref = simclr_info_nce_loss(features_ref, temperature)
    assert loss.dtype == dtype and loss.shape == ()
    (loss * grad_out.to(dtype).to(tier.device)).backward()
    (ref * grad_out).backward()
    if n == 1:  # no negatives: the loss is exactly 0 (the reference's gradient is rounding noise around 0)
        assert float(loss.detach()) == 0.0 and float(features.grad.abs().max()) == 0.0
        return
    assert_close(loss, ref, dtype, "loss")
    assert_close(features.grad, features_ref.grad, dtype, "features.grad")


def test_nt_xent_fp64_and_temperature_tensor(small_bands, gen):
    """fp64 end to end (1e-10), with a learnable temperature (its gradient through 1 / t)."""
    tier = small_bands
    x = randn(gen, 2 * 70, 33, dtype=torch.float64)
    t = torch.tensor([0.2], dtype=torch.float64)
    (features, temp), (features_ref, temp_ref) = leaves(tier.device, torch.float64, x, t)
    loss = nt_xent(features, temp)
    ref = simclr_info_nce_loss(features_ref, temp_ref)
    loss.backward()
    ref.backward()
    assert_close(loss, ref, torch.float64, "loss")
    assert_close(features.grad, features_ref.grad, torch.float64, "features.grad")
    assert_close(temp.grad, temp_ref.grad, torch.float64, "temperature.grad")


def test_nt_xent_non_contiguous_and_one_band(tier, gen):
    """A transposed (non-contiguous) input, with the default band sizes (the whole problem in one band)."""
    x = randn(gen, 40, 2 * 60, dtype=torch.float64)
    features = x.to(torch.float32).to(tier.device).t().requires_grad_()
    features_ref = x.t().clone().requires_grad_()
    assert not features.is_contiguous()
    loss = nt_xent(features, 0.1)
    loss.backward()
    ref = simclr_info_nce_loss(features_ref, 0.1)
    ref.backward()
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(features.grad, features_ref.grad, torch.float32, "features.grad")


# ---------------------------------------------------------------------------------------------------------------
# CLIP


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,dim,scale", [
    (300, 100, 14.285),  # open_clip's initial exp(log(1 / 0.07)); 3-5 row tiles, 2 forward programs
    (150, 200, 100.0),  # open_clip's clamp, temperature 0.01; d in chunks
    (1, 16, 1.0),  # one pair: both directions are log 1 = 0
])
def test_clip_loss_matches_open_clip(small_bands, schedule, gen, dtype, n, dim, scale):
    tier = small_bands
    need_dtype(tier, dtype)
    image, text = randn(gen, n, dim, dtype=torch.float64), randn(gen, n, dim, dtype=torch.float64)
    logit_scale = torch.tensor(scale, dtype=torch.float64)
    grad_out = randn(gen, 1, dtype=torch.float64).reshape(())
    (img, txt), (img_ref, txt_ref) = leaves(tier.device, dtype, image, text)
    s = logit_scale.clone().to(tier.device).requires_grad_()
    s_ref = logit_scale.clone().requires_grad_()

    loss = clip_loss(img, txt, s)
    ref = open_clip_loss(img_ref, txt_ref, s_ref)
    assert loss.dtype == dtype and loss.shape == ()
    (loss * grad_out.to(dtype).to(tier.device)).backward()
    (ref * grad_out).backward()
    if n == 1:
        assert float(loss.detach()) == 0.0 and float(img.grad.abs().max()) == 0.0 and float(s.grad) == 0.0
        return
    assert_close(loss, ref, dtype, "loss")
    assert_close(img.grad, img_ref.grad, dtype, "image_features.grad")
    assert_close(txt.grad, txt_ref.grad, dtype, "text_features.grad")
    assert_close(s.grad, s_ref.grad, dtype, "logit_scale.grad")


def test_clip_loss_fp64_exp_scale_and_bias(small_bands, gen):
    """fp64 (1e-10) with open_clip's parametrization ``logit_scale.exp()`` and a learnable bias: the bias cancels in
    both softmaxes, so the loss is unchanged and its gradient is exactly 0 (the reference's is rounding noise)."""
    tier = small_bands
    image, text = randn(gen, 130, 33, dtype=torch.float64), randn(gen, 130, 33, dtype=torch.float64)
    (img, txt), (img_ref, txt_ref) = leaves(tier.device, torch.float64, image, text)
    log_scale = torch.tensor(2.659, dtype=torch.float64, device=tier.device, requires_grad=True)
    log_scale_ref = torch.tensor(2.659, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, device=tier.device, requires_grad=True)
    bias_ref = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)

    loss = clip_loss(img, txt, log_scale.exp(), bias)
    ref = open_clip_loss(img_ref, txt_ref, log_scale_ref.exp(), bias_ref)
    loss.backward()
    ref.backward()
    assert_close(loss, ref, torch.float64, "loss")
    assert_close(loss, open_clip_loss(img_ref, txt_ref, log_scale_ref.exp()), torch.float64, "loss without bias")
    assert_close(img.grad, img_ref.grad, torch.float64, "image_features.grad")
    assert_close(txt.grad, txt_ref.grad, torch.float64, "text_features.grad")
    assert_close(log_scale.grad, log_scale_ref.grad, torch.float64, "log_scale.grad")
    assert float(bias.grad) == 0.0 and abs(float(bias_ref.grad)) < 1e-12
    nan_bias = clip_loss(img, txt, 10.0, torch.tensor(float("-inf"), dtype=torch.float64, device=tier.device))
    assert torch.isnan(nan_bias) and torch.isnan(open_clip_loss(img_ref, txt_ref, 10.0, float("-inf")))


def test_clip_loss_fp64_kernels(small_bands, gen):
    """The fp64 kernel variants (fp64 dot and accumulation) in the interpreter, 1e-10."""
    tier = small_bands
    image, text = randn(gen, 70, 20, dtype=torch.float64), randn(gen, 70, 20, dtype=torch.float64)
    (img, txt), (img_ref, txt_ref) = leaves(tier.device, torch.float64, image, text)
    loss = clip_loss(img, txt, 20.0)
    ref = open_clip_loss(img_ref, txt_ref, 20.0)
    loss.backward()
    ref.backward()
    assert_close(loss, ref, torch.float64, "loss")
    assert_close(img.grad, img_ref.grad, torch.float64, "image_features.grad")
    assert_close(txt.grad, txt_ref.grad, torch.float64, "text_features.grad")


# ---------------------------------------------------------------------------------------------------------------
# InfoNCE


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_info_nce_matches_eager(small_bands, schedule, gen, reduction, normalize):
    """One direction, 140 queries against 140 + 37 keys (the extra keys are negatives only); ``normalize=False``
    takes the exact kernels on either schedule."""
    tier = small_bands
    dtype = torch.float32
    query, key = randn(gen, 140, 50, dtype=torch.float64), randn(gen, 177, 50, dtype=torch.float64)
    scale = 1.0 if normalize else 0.15  # raw dot products of N(0, 1) features: keep the logits O(1)
    (q, k), (q_ref, k_ref) = leaves(tier.device, dtype, query, key * scale)
    grad_out = randn(gen, 140, dtype=torch.float64)
    if reduction != "none":
        grad_out = grad_out[0]

    loss = info_nce(q, k, 0.05 if normalize else 1.0, normalize=normalize, reduction=reduction)
    ref = eager_info_nce(q_ref, k_ref, 0.05 if normalize else 1.0, normalize=normalize, reduction=reduction)
    assert loss.shape == ref.shape and loss.dtype == dtype
    (loss * grad_out.to(dtype).to(tier.device)).sum().backward()
    (ref * grad_out).sum().backward()
    assert_close(loss, ref, dtype, "loss")
    assert_close(q.grad, q_ref.grad, dtype, "query.grad")
    assert_close(k.grad, k_ref.grad, dtype, "key.grad")


def test_info_nce_detached_key_and_temperature_grad(small_bands, gen):
    """MoCo-style: a key without requires_grad gets no gradient product; the temperature tensor's gradient."""
    tier = small_bands
    query, key = randn(gen, 100, 40, dtype=torch.float64), randn(gen, 100, 40, dtype=torch.float64)
    (q, t), (q_ref, t_ref) = leaves(tier.device, torch.float32, query, torch.tensor(0.1, dtype=torch.float64))
    k = key.to(torch.float32).to(tier.device)
    loss = info_nce(q, k, t)
    ref = eager_info_nce(q_ref, key.to(torch.float32).to(torch.float64), t_ref)
    loss.backward()
    ref.backward()
    assert k.grad is None
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(q.grad, q_ref.grad, torch.float32, "query.grad")
    assert_close(t.grad, t_ref.grad, torch.float32, "temperature.grad")


def test_info_nce_neg_inf_logit_has_torch_gradient(tier, gen):
    """A raw dot product that overflows fp32 to -inf (``normalize=False``): torch's softmax gives that key weight 0,
    so every gradient stays finite; here too (no inf - inf or 0 * inf in the gradient)."""
    query = randn(gen, 2, 4, dtype=torch.float64) * 0.5
    key = randn(gen, 3, 4, dtype=torch.float64) * 0.5
    query[0, 0], key[:2, 0], key[2, 0] = 1e20, 0.0, -1e20  # <q_0, k_2> = -1e40: -inf in fp32; the rest finite
    (q, k), (q_ref, k_ref) = leaves(tier.device, torch.float32, query, key)
    with torch.no_grad():
        assert torch.isneginf((q_ref.float() @ k_ref.float().T)[0, 2])
    loss = info_nce(q, k, 0.5, normalize=False, reduction="none")
    ref = eager_info_nce(q_ref.float(), k_ref.float(), 0.5, normalize=False, reduction="none")
    loss.sum().backward()
    ref.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(q.grad, q_ref.grad, torch.float32, "query.grad")
    assert_close(k.grad, k_ref.grad, torch.float32, "key.grad")


# ---------------------------------------------------------------------------------------------------------------
# Accuracy at a small loss: the positive's gradient from the stored loss (expm1), the scale's from the negatives


def _separated(gen, n, dim, loss_target, kind):
    """fp64 features whose loss at the returned scale is ``loss_target`` (text = image + noise: the positives'
    cosines stand out; the scale found by bisection on the fp64 loss)."""
    image = randn(gen, n, dim, dtype=torch.float64)
    text = image + 0.3 * randn(gen, n, dim, dtype=torch.float64)
    features = torch.cat([image, text]) if kind == "nt_xent" else None

    def loss_at(scale):
        if kind == "nt_xent":
            return float(simclr_info_nce_loss(features, 1.0 / scale))
        return float(open_clip_loss(image, text, scale))

    lo, hi = 1.0, 1e4
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if loss_at(mid) > loss_target else (lo, mid)
    return image, text, features, hi


@pytest.mark.parametrize("kind", ["nt_xent", "clip"])
@pytest.mark.parametrize("loss_target", [1e-3, 1e-4])
def test_fp32_gradients_at_small_loss_at_least_eager(tier, schedule, gen, kind, loss_target):
    """fp32 at a loss of 1e-3 / 1e-4: the relative error of every gradient (and of the loss) against fp64 is at most
    eager fp32's. Eager's ``softmax - 1`` at the positive keeps ~log10(loss / 6e-8) digits; this path keeps them
    all (``expm1(-loss)`` from a loss computed through the negatives, ``dL/ds`` from their weight): 4x better at
    least."""
    image, text, features, scale = _separated(gen, 48, 24, loss_target, kind)
    if kind == "nt_xent":
        temp = torch.tensor(1.0 / scale, dtype=torch.float64)
        fn, ref_fn, inputs = nt_xent, simclr_info_nce_loss, (features, temp)
    else:
        fn, ref_fn, inputs = clip_loss, open_clip_loss, (image, text, torch.tensor(scale, dtype=torch.float64))
    (tested, ref) = leaves(tier.device, torch.float32, *inputs)
    exact = [t.detach().double().cpu().requires_grad_() for t in ref]
    eager = [t.detach().float().requires_grad_() for t in ref]
    outs = [fn(*tested), ref_fn(*exact), ref_fn(*eager)]
    grads = [torch.autograd.grad(o, leaves_) for o, leaves_ in zip(outs, (tested, exact, eager))]
    assert float(outs[1].detach()) == pytest.approx(loss_target, rel=0.1)
    for index, (ours, truth, theirs) in enumerate(zip(*grads)):
        ours_err, eager_err = rel_err(ours, truth), rel_err(theirs, truth)
        # measured: 10-1700x under eager's (1e-7 - 2e-6 against 6e-6 - 4e-4)
        assert ours_err <= eager_err / 4, f"gradient {index}: {ours_err:.2e} vs eager's {eager_err:.2e}"
    assert rel_err(outs[0], outs[1]) <= max(rel_err(outs[2], outs[1]), 1e-5)


def test_scale_gradient_when_perfectly_separated(tier, schedule):
    """Negatives 300 logits below their positives: their softmax weights underflow (exp(-300) is 0 in fp32), the
    loss is 0 and so is every gradient, ``logit_scale``'s exactly. Then negatives ~22 logits below (loss ~3e-10,
    under fp32's resolution of 1): eager's ``softmax - 1`` rounds to 0 and its scale gradient is ``sum_j P_ij C_ij``
    alone, here of the wrong sign; this one is the fp64 value's. (Fixed shift: the first batch's negatives sum to 0
    in its domain, so every row and column is recomputed exactly; the second stays on the fixed shift.)"""
    n = 8
    image = torch.eye(n, dtype=torch.float64)
    (img, txt, s), _ = leaves(tier.device, torch.float32, image, image, torch.tensor(300.0, dtype=torch.float64))
    loss = clip_loss(img, txt, s)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(s.grad) == 0.0
    assert float(img.grad.abs().max()) == 0.0 and float(txt.grad.abs().max()) == 0.0

    text = image + 0.1 * torch.roll(image, 1, dims=1)  # text i = e_i + 0.1 e_(i+1): one negative at cosine 0.1
    (img, txt, s), (img_ref, txt_ref, s_ref) = leaves(tier.device, torch.float32, image, text,
                                                       torch.tensor(25.0, dtype=torch.float64))
    clip_loss(img, txt, s).backward()
    open_clip_loss(img_ref, txt_ref, s_ref).backward()
    s_eager = torch.tensor(25.0, requires_grad=True)
    open_clip_loss(image.float(), text.float(), s_eager).backward()
    assert -1e-8 < float(s_ref.grad) < 0.0 < float(s_eager.grad)  # the premise: eager's sign is wrong
    assert float(s.grad) == pytest.approx(float(s_ref.grad), rel=1e-3)


def test_temperature_inf_and_logit_scale_inf(tier, schedule, gen):
    """``temperature=inf`` is eager's limit (every logit 0: the loss of a uniform softmax, zero gradients);
    ``logit_scale=inf`` as a number is rejected (eager's logits would be inf - inf = NaN)."""
    x = randn(gen, 10, 6, dtype=torch.float32, device=tier.device, requires_grad=True)
    loss = nt_xent(x, float("inf"))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(math.log(9), rel=1e-6)
    assert float(x.grad.abs().max()) == 0.0
    assert float(info_nce(x, x, math.inf).detach()) == pytest.approx(math.log(10), rel=1e-6)
    t = torch.tensor(float("inf"), device=tier.device, requires_grad=True)
    nt_xent(x, t).backward()
    assert float(t.grad) == 0.0
    with pytest.raises(ValueError, match="logit_scale"):
        clip_loss(x, x, float("inf"))
    with pytest.raises(ValueError, match="logit_scale"):
        siglip_loss(x, x, math.inf, -10.0)


def test_nan_and_inf_features_propagate_as_in_torch(tier, schedule, gen):
    """A NaN feature (or an inf one, which F.normalize turns into NaN) makes the loss NaN, as eager's."""
    for bad in (float("nan"), float("inf")):
        image, text = randn(gen, 12, 6, device=tier.device), randn(gen, 12, 6, device=tier.device)
        image[3, 2] = bad
        assert torch.isnan(open_clip_loss(image.cpu().double(), text.cpu().double(), 10.0))
        assert torch.isnan(clip_loss(image, text, 10.0))
        assert torch.isnan(siglip_loss(image, text, 10.0, -10.0))
        assert torch.isnan(nt_xent(torch.cat([image, text]), 0.1))
        assert torch.isnan(info_nce(image, text, 0.1, reduction="none")[3])


# ---------------------------------------------------------------------------------------------------------------
# The fixed-shift schedule and the cuBLAS band GEMMs (docs/kernels/contrastive.md): against the fp64
# references and the exact schedule, at the scales of training, at the bounds, where the bound does not hold


@pytest.fixture
def fixed_shift(tier, monkeypatch):
    if tier.name == "torch":
        pytest.skip("the schedule is the kernels' (the torch tier runs its own path)")
    monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_SCHEDULE", "fixed_shift")
    return tier


def _fixed_shift_flags(q, k, scale, excluded):
    """From the definition, in fp64: the rows and columns whose negatives (``excluded`` masks the rest) the fixed
    shift cannot hold at ``scale``, their sum of exp(S - m) (m = |s| - HEADROOM ln 2) below 2^FLOOR_LOG2; those are
    the ones the exact kernels recompute."""
    from fusedloss.kernels.contrastive import FIXED_SHIFT_FLOOR_LOG2, FIXED_SHIFT_HEADROOM

    c = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T
    e = torch.exp(scale * c - (abs(scale) - FIXED_SHIFT_HEADROOM.value * math.log(2))).masked_fill(excluded, 0.0)
    floor = 2.0 ** FIXED_SHIFT_FLOOR_LOG2.value
    return e.sum(1) < floor, e.sum(0) < floor


def _unit_rows(gen, n, dim):
    """n random unit vectors orthogonal to the first two axes (v and u)."""
    r = torch.zeros(n, dim, dtype=torch.float64)
    r[:, 2:] = torch.randn(n, dim - 2, generator=gen, dtype=torch.float64)
    return F.normalize(r, dim=1)


def _flagged_batch(gen, n, dim):
    """fp64 (image, text, rows, cols) where at scale 100 the rows i = 3 mod 7 and the columns j = 1 mod 5 are the
    lines the fixed shift flags, and every term of theirs, the positive's too, is 0 in its domain (cosine <= -0.5:
    below 2^-150, under fp32's subnormals too): without the exact fallback their loss would read 0 instead of
    ~log N. Flagged images lie along -v + u, flagged texts along -u, the others 0.48 apart along v (+ u)."""
    v, u = torch.eye(dim, dtype=torch.float64)[:2]
    rows, cols = torch.arange(n) % 7 == 3, torch.arange(n) % 5 == 1
    image = torch.where(rows[:, None], -0.8 * v + 0.6 * u, 0.6 * v + 0.5 * u + 0.62 * _unit_rows(gen, n, dim))
    text = torch.where(cols[:, None], -u, 0.8 * v + 0.6 * _unit_rows(gen, n, dim))
    return image, text, rows, cols


def _loss_and_grads(kind, dtype, device, image, text, scale):
    """(tested outputs, fp64 reference outputs): the loss and every gradient of ``kind`` at ``scale`` (a tensor, so
    that CLIP's and the temperature's gradients are checked), random grad_output."""
    if kind == "nt_xent":
        (f, t), (f_ref, t_ref) = leaves(device, dtype, torch.cat([image, text]), torch.tensor(1.0 / scale))
        tested, ref = [f, t], [f_ref, t_ref]
        outs = nt_xent(f, t.to(torch.float32)), simclr_info_nce_loss(f_ref, t_ref)
    else:
        tested, ref = leaves(device, dtype, image, text)
        s = torch.tensor(scale, device=device, requires_grad=True)
        s_ref = s.detach().to(torch.float64).cpu().requires_grad_()
        tested, ref = tested + [s], ref + [s_ref]
        if kind == "clip":
            outs = clip_loss(*tested), open_clip_loss(*ref)
        else:
            outs = info_nce(tested[0], tested[1], 1.0 / s), eager_info_nce(ref[0], ref[1], 1.0 / s_ref)
    grad_out = torch.tensor(0.75, dtype=torch.float64)
    got = [outs[0].detach()] + list(torch.autograd.grad(outs[0] * grad_out.to(outs[0].dtype).to(device), tested))
    want = [outs[1].detach()] + list(torch.autograd.grad(outs[1] * grad_out, ref))
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["clip", "nt_xent", "info_nce"])
def test_fixed_shift_recomputes_flagged_rows_and_columns(small_bands, fixed_shift, gen, dtype, kind):
    """At scale 100, rows and columns whose every term flushes to 0 in the fixed shift's domain (the premise,
    checked in fp64 first) next to lines that do not: the exact kernels recompute the former (the forward's
    fallback launches; the exact epilogue in the backward tiles that hold them), the fixed shift serves the rest;
    the loss and every gradient match fp64. CLIP and InfoNCE: ``_flagged_batch`` (21 rows, 30 columns of 150);
    NT-Xent: one sample's first view along -v, every other view along +v (its row only: a view's negatives include
    the other flagged views, so no set of several can be flagged)."""
    tier = small_bands
    need_dtype(tier, dtype)
    if kind == "nt_xent":
        features = 0.8 * torch.eye(64, dtype=torch.float64)[0] + 0.6 * _unit_rows(gen, 150, 64)
        features[0] = -torch.eye(64, dtype=torch.float64)[0]
        image, text = features[:75], features[75:]
        pos = (torch.arange(150) + 75) % 150
        excluded = torch.eye(150, dtype=torch.bool) | (torch.arange(150)[None, :] == pos[:, None])
        flagged_rows, _ = _fixed_shift_flags(features, features, 100.0, excluded)
        assert flagged_rows.nonzero().flatten().tolist() == [0]  # the premise
    else:
        image, text, rows, cols = _flagged_batch(gen, 150, 64)
        flagged_rows, flagged_cols = _fixed_shift_flags(image, text, 100.0, torch.eye(150, dtype=torch.bool))
        assert torch.equal(flagged_rows, rows) and torch.equal(flagged_cols, cols)  # the premise
    got, want = _loss_and_grads(kind, dtype, tier.device, image, text, 100.0)
    for index, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, dtype, f"{kind} output {index}")


def _schedule_errors(monkeypatch, kind, dtype, device, image, text, scale):
    """{schedule: max relative error of the loss and gradients against fp64}."""
    errors = {}
    for name in ("exact", "fixed_shift"):
        monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_SCHEDULE", name)
        got, want = _loss_and_grads(kind, dtype, device, image, text, scale)
        errors[name] = max(rel_err(g, w) for g, w in zip(got, want))
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale", [
    14.285,  # open_clip's initial scale
    100.0,  # open_clip's clamp
    65.0,  # the flush bound: anti-aligned pairs (cosine -1) put terms at 2^-123.6, just above 2^-126
    70.0,  # past it: those terms flush (2^-138), their rows' sums stay far above the floor
    1000.0,  # in range: every row and column falls below the floor and is recomputed exactly
    1100.0,  # beyond FIXED_SHIFT_MAX_SCALE: decided on the device, everything exact
])
def test_fixed_shift_accuracy_against_fp64_and_exact(small_bands, gen, monkeypatch, dtype, scale):
    """CLIP, 150 pairs, d = 200 (chunked), text = image + noise with every fifth text the negated image of the
    next pair (cosine -1, the smallest logit): the fixed shift's loss and gradients match fp64 within the dtype's
    tolerance and within 4x the exact schedule's own error (printed: the numbers in bench/NOTES.md)."""
    tier = small_bands
    if tier.name == "torch":
        pytest.skip("the schedule is the kernels'")
    need_dtype(tier, dtype)
    image = randn(gen, 150, 200, dtype=torch.float64)
    text = image + randn(gen, 150, 200, dtype=torch.float64)
    text[::5] = -torch.roll(image, -1, dims=0)[::5]
    errors = _schedule_errors(monkeypatch, "clip", dtype, tier.device, image, text, scale)
    print(f"\nCLIP {dtype} scale {scale}: max relative error vs fp64 exact {errors['exact']:.2e}, "
          f"fixed_shift {errors['fixed_shift']:.2e}")
    assert errors["fixed_shift"] <= TOL[dtype]
    assert errors["fixed_shift"] <= max(4 * errors["exact"], TOL[dtype] / 50)


def test_fixed_shift_negative_and_nan_scale(tier, fixed_shift, gen):
    """The shift is |s| (a negative scale caps the logits at -s C <= |s|); a NaN scale is out of range, so the exact
    kernels give eager's NaN."""
    image, text = randn(gen, 40, 24, dtype=torch.float64), randn(gen, 40, 24, dtype=torch.float64)
    got, want = _loss_and_grads("clip", torch.float32, tier.device, image, text, -20.0)
    for index, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, torch.float32, f"output {index}")
    x, y = image.float().to(tier.device), text.float().to(tier.device)
    assert torch.isnan(clip_loss(x, y, torch.tensor(float("nan"), device=tier.device)))
    assert torch.isnan(nt_xent(x, torch.tensor(float("nan"), device=tier.device)))


def test_fixed_shift_routes_raw_and_fp64_features_to_exact(tier, gen, monkeypatch):
    """``info_nce(normalize=False)`` (logits not bounded by the scale: raw norms of ~30 here, where a fixed shift
    would overflow) and fp64 features take the exact kernels on the fixed-shift schedule: bitwise the exact
    schedule's results, and fp64's."""
    if tier.name == "torch":
        pytest.skip("the schedule is the kernels'")
    query, key = randn(gen, 60, 12, dtype=torch.float64) * 9, randn(gen, 70, 12, dtype=torch.float64) * 9
    results = {}
    for name in ("exact", "fixed_shift"):
        monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_SCHEDULE", name)
        (q, k), (q_ref, k_ref) = leaves(tier.device, torch.float32, query, key)
        loss = info_nce(q, k, 2.0, normalize=False, reduction="none")
        loss.sum().backward()
        (x, y), _ = leaves(tier.device, torch.float64, query.clone(), key[:60].clone())
        clip_loss(x, y, 30.0).backward()
        results[name] = [loss.detach(), q.grad, k.grad, x.grad, y.grad]
    for got, want in zip(results["fixed_shift"], results["exact"]):
        assert torch.equal(got, want)
    ref = eager_info_nce(q_ref, k_ref, 2.0, normalize=False, reduction="none")
    ref.sum().backward()
    assert float(ref.detach().max()) > 100  # the premise: logits far past any unit-vector bound
    assert_close(results["fixed_shift"][0], ref, torch.float32, "loss")
    assert_close(results["fixed_shift"][1], q_ref.grad, torch.float32, "query.grad")


def test_fixed_shift_column_partials_of_one_rank(tier, fixed_shift, gen):
    """Across ranks every rank flags and recomputes its own column partials (over its rows) before they are
    all-reduced: rank 1 of 2, 75 local rows of the flagged batch against all 150 texts (column j's positive is
    local row j - 75 when j >= 75): each column's partial log-sum-exp of its negatives and their mean cosine, and
    each row's, against fp64."""
    image, text, _, _ = _flagged_batch(gen, 150, 64)
    q, k = F.normalize(image[75:], dim=1), F.normalize(text, dim=1)
    opts = host.ContrastiveOptions("clip", engine="triton", rank=1, world_size=2, schedule="fixed_shift")
    scale = torch.tensor(100.0, device=tier.device)
    rows, cols = host._TritonEngine.stats(opts, q.float().to(tier.device), k.float().to(tier.device), scale, None)
    c = q.float().double() @ k.float().double().T
    negatives = (100.0 * c).masked_fill(torch.arange(150)[None, :] == torch.arange(75, 150)[:, None], float("-inf"))
    for stats, dim in ((rows[:, :3].T, 1), (cols, 0)):
        m, s, t = stats.double().cpu()
        lse = torch.logsumexp(negatives, dim=dim)
        mean_cos = (torch.softmax(negatives, dim=dim) * c).sum(dim)
        assert_close(m + torch.log(s), lse, torch.float32, f"partial lse along dim {1 - dim}")
        assert_close(t / s, mean_cos, torch.float32, f"negatives' mean cosine along dim {1 - dim}")


@pytest.mark.parametrize("kind", ["clip", "nt_xent", "info_nce"])
def test_cublas_band_gemms(small_bands, schedule, gen, monkeypatch, kind):
    """``FUSEDLOSS_CONTRASTIVE_GEMM=cublas``: the band GEMMs through torch.mm / addmm (fp32 output for 16-bit
    operands; on the CPU the operands are converted first), the scale applied on the device afterwards, several
    bands accumulated: fp64's results, in fp32 and fp16."""
    tier = small_bands
    if tier.name == "torch":
        pytest.skip("the switch is the kernels'")
    monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_GEMM", "cublas")
    image, text = randn(gen, 150, 40, dtype=torch.float64), randn(gen, 150, 40, dtype=torch.float64)
    for dtype in DTYPES[tier.name][:2]:
        got, want = _loss_and_grads(kind, dtype, tier.device, image, image + text, 14.285)
        for index, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, dtype, f"{kind} {dtype} output {index}")


@pytest.mark.parametrize("argument,name,value", [("schedule", "FUSEDLOSS_CONTRASTIVE_SCHEDULE", "fast"),
                                                 ("gemm", "FUSEDLOSS_CONTRASTIVE_GEMM", "cutlass")])
def test_schedule_switches_reject_unknown_values(tier, monkeypatch, argument, name, value):
    """On every backend, as an argument or as the environment's default."""
    x = torch.randn(8, 4, device=tier.device, requires_grad=True)
    with pytest.raises(ValueError, match=f"{argument} must be one of"):
        clip_loss(x, x, 10.0, **{argument: value})
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} must be one of"):
        clip_loss(x, x, 10.0)


def test_forward_and_backward_run_the_switches_of_the_call(tier, gen, monkeypatch):
    """The arguments beat the environment, and the backward runs the call's switches even when the environment
    changes before it (they travel in the options)."""
    if tier.name == "torch":
        pytest.skip("the switches are the Triton engine's")
    from fusedloss.losses import contrastive as host

    seen = []
    for name in ("_triton_stats", "_triton_grads"):
        real = getattr(host, name)
        monkeypatch.setattr(host, name, lambda *a, _real=real, **k: seen.append((k["schedule"], k.get("gemm")))
                            or _real(*a, **k))
    monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_SCHEDULE", "exact")
    monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_GEMM", "triton")
    image = randn(gen, 40, 16, requires_grad=True)
    text = randn(gen, 40, 16, requires_grad=True)
    loss = clip_loss(image, text, 10.0, schedule="fixed_shift", gemm="cublas")
    monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_SCHEDULE", "exact")
    loss.backward()
    assert seen == [("fixed_shift", None), ("fixed_shift", "cublas")], seen


def test_fixed_shift_bf16_at_scale_on_cuda(tier, gen, monkeypatch):
    """CUDA: CLIP and NT-Xent at 4173 rows, d = 768, bf16 (33 bands, 2 forward programs of several row tiles, the
    128 x 128 tiles): each schedule and GEMM backend against fp64 on the GPU, the fixed shift within 2x the exact
    schedule's error (printed for bench/NOTES.md), and the flagged batch at scale 100."""
    if tier.name != "cuda":
        pytest.skip("bf16 tensor-core kernels at size: CUDA tier")
    image = randn(gen, 4173, 768, dtype=torch.float64, device=tier.device)
    text = image + randn(gen, 4173, 768, dtype=torch.float64, device=tier.device)
    for kind in ("clip", "nt_xent"):
        errors = {}
        for schedule_name in ("exact", "fixed_shift"):
            for gemm in ("triton", "cublas"):
                monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_SCHEDULE", schedule_name)
                monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_GEMM", gemm)
                got, want = _loss_and_grads(kind, torch.bfloat16, tier.device, image, text, 14.285)
                errors[schedule_name, gemm] = max(rel_err(g, w) for g, w in zip(got, want))
        print(f"\n{kind} 4173 x 768 bf16, max relative error vs fp64: {errors}")
        assert max(errors.values()) <= TOL[torch.bfloat16]
        assert errors["fixed_shift", "triton"] <= 2 * errors["exact", "triton"]
    monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_SCHEDULE", "fixed_shift")
    image, text, _, _ = _flagged_batch(gen, 1000, 64)
    got, want = _loss_and_grads("clip", torch.bfloat16, tier.device, image.to(tier.device), text.to(tier.device), 100.0)
    for index, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, torch.bfloat16, f"flagged batch output {index}")


# ---------------------------------------------------------------------------------------------------------------
# torch.autocast: mixed feature dtypes accepted, cast like eager's matmul, fp32 result


def _autocast_dtype(tier):
    return torch.float16 if tier.name == "interpret" else torch.bfloat16  # (bf16 tl.dot: wrong in the interpreter)


@pytest.mark.parametrize("fn,ref_fn", [(clip_loss, lambda *a: open_clip_loss(*a, normalize=False)),
                                        (siglip_loss, open_clip_siglip_block)], ids=["clip", "siglip"])
def test_autocast_mixed_dtypes(tier, gen, fn, ref_fn):
    """An autocast model's image features in fp32 and text features in 16-bit: both are cast to the autocast dtype
    after normalization, the loss is fp32 and each feature's gradient has its own dtype. Outside autocast the same
    call is a TypeError."""
    dtype = _autocast_dtype(tier)
    image, text = randn(gen, 40, 24, dtype=torch.float64), randn(gen, 40, 24, dtype=torch.float64)
    img = image.float().to(tier.device).requires_grad_()
    txt = text.to(dtype).to(tier.device).requires_grad_()
    scale = torch.tensor(10.0, device=tier.device, requires_grad=True)
    args = (scale, torch.tensor(-5.0, device=tier.device)) if fn is siglip_loss else (scale,)
    with torch.autocast(tier.device.type, dtype=dtype):
        loss = fn(img, txt, *args)
    assert loss.dtype == torch.float32
    loss.backward()
    assert img.grad.dtype == torch.float32 and txt.grad.dtype == dtype and scale.grad.dtype == torch.float32
    # the reference: the features normalized in fp32 (torch's autocast runs norm in fp32) and rounded to the
    # autocast dtype, as eager's matmul rounds its operands; then open_clip's math in fp64 on them
    img_ref = F.normalize(img.detach().float(), dim=1).to(dtype).double()
    txt_ref = F.normalize(txt.detach().float(), dim=1).to(dtype).double()
    assert_close(loss, ref_fn(img_ref, txt_ref, *(a.double() for a in args)), torch.float32, "loss")
    with pytest.raises(TypeError, match="text_features"):
        fn(img, txt, *args)


def test_autocast_nt_xent_and_info_nce_are_fp32(tier, gen):
    dtype = _autocast_dtype(tier)
    x = randn(gen, 20, 16, dtype=dtype, device=tier.device, requires_grad=True)
    with torch.autocast(tier.device.type, dtype=dtype):
        assert nt_xent(x, 0.1).dtype == torch.float32
        assert info_nce(x, x.float(), 0.1).dtype == torch.float32
    assert nt_xent(x, 0.1).dtype == dtype


# ---------------------------------------------------------------------------------------------------------------
# open_clip's modules: swapping the module is the whole change


class _TinyClipModel(torch.nn.Module):
    """What open_clip's models return from ``forward``: normalized features, ``logit_scale.exp()`` and (SigLIP)
    ``logit_bias``, from two linear towers."""

    def __init__(self, gen, siglip):
        super().__init__()
        self.visual = torch.nn.Parameter(torch.randn(12, 10, generator=gen, dtype=torch.float64))
        self.text = torch.nn.Parameter(torch.randn(12, 10, generator=gen, dtype=torch.float64))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0 if siglip else 1 / 0.07), dtype=torch.float64))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0, dtype=torch.float64)) if siglip else None

    def forward(self, image, text):
        out = {"image_features": F.normalize(image @ self.visual, dim=-1),
               "text_features": F.normalize(text @ self.text, dim=-1), "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def _open_clip_module(siglip):
    class OpenClipLoss(torch.nn.Module):  # open_clip's call signature and output_dict, its single-process math
        def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
            logits = logit_scale * image_features @ text_features.T
            if siglip:
                loss = open_clip_siglip_block(image_features, text_features, logit_scale, logit_bias)
            else:
                labels = torch.arange(logits.shape[0])
                loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            return {"contrastive_loss": loss} if output_dict else loss

    return OpenClipLoss()


@pytest.mark.parametrize("siglip", [False, True], ids=["ClipLoss", "SigLipLoss"])
def test_open_clip_module_swap(tier, gen, siglip):
    """open_clip's training step ``losses = loss(**model_out, output_dict=True)`` with fusedloss.nn's module in
    place of open_clip's: the same loss and every parameter's gradient (the towers, logit_scale, logit_bias).
    The features' own gradient is open_clip's minus its radial part (normalization inside)."""
    model = _TinyClipModel(gen, siglip).to(tier.device)
    image, text = randn(gen, 30, 12, dtype=torch.float64), randn(gen, 30, 12, dtype=torch.float64)
    results = []
    for loss_fn in ((fusedloss.nn.SigLipLoss() if siglip else fusedloss.nn.ClipLoss()), _open_clip_module(siglip)):
        model.zero_grad()
        model_out = model(image.to(tier.device), text.to(tier.device))
        for value in model_out.values():
            value.retain_grad()
        losses = loss_fn(**model_out, output_dict=True)
        assert set(losses) == {"contrastive_loss"}
        losses["contrastive_loss"].backward()
        results.append((losses["contrastive_loss"].detach(), [p.grad.clone() for p in model.parameters()],
                        model_out["image_features"]))
    (ours, our_grads, features), (theirs, their_grads, their_features) = results
    assert_close(ours, theirs, torch.float64, "loss")
    for index, (g, e) in enumerate(zip(our_grads, their_grads)):
        assert_close(g, e, torch.float64, f"parameter {index}.grad")
    g = their_features.grad
    projected = g - their_features.detach() * (their_features.detach() * g).sum(1, keepdim=True)
    assert_close(features.grad, projected, torch.float64, "image_features.grad (tangent part of open_clip's)")


def _open_clip_constructions(siglip):
    """open_clip's constructor calls of a single process: positional in its order, by name, every value."""
    if siglip:
        return [((), {}), ((True, 0, 1, None), {})] + [
            ((), {"cache_labels": index % 2 == 0, "rank": 0, "world_size": 1, "dist_impl": impl})
            for index, impl in enumerate(fusedloss.nn.SigLipLoss.DIST_IMPLS)]
    return [((), {}), ((False, False, False, 0, 1, False), {})] + [
        ((), {"local_loss": local, "gather_with_grad": gather, "cache_labels": True, "rank": 0, "world_size": 1})
        for local in (False, True) for gather in (False, True)]


@pytest.mark.parametrize("siglip", [False, True], ids=["ClipLoss", "SigLipLoss"])
def test_open_clip_constructor_arguments_single_process(tier, gen, siglip):
    """open_clip's constructor arguments with its values in a single process: every combination is open_clip's
    loss, with its gradients (``cache_labels`` and ``dist_impl`` change nothing; ``local_loss`` and
    ``gather_with_grad`` change nothing without other ranks, in open_clip too)."""
    module = fusedloss.nn.SigLipLoss if siglip else fusedloss.nn.ClipLoss
    image, text = randn(gen, 30, 12, dtype=torch.float64), randn(gen, 30, 12, dtype=torch.float64)
    params = (torch.tensor(10.0), torch.tensor(-5.0)) if siglip else (torch.tensor(14.0),)
    for args, kwargs in _open_clip_constructions(siglip):
        loss_fn = module(*args, **kwargs)
        assert (loss_fn.rank, loss_fn.world_size) == (0, 1)
        if siglip:
            assert loss_fn.dist_impl == (kwargs.get("dist_impl") or "bidir")
        tested, ref = leaves(tier.device, torch.float32, image, text, *params)
        loss = loss_fn(*tested)
        expected = (open_clip_siglip if siglip else open_clip_loss)(*ref)
        got = [loss, *torch.autograd.grad(loss, tested)]
        for g, want in zip(got, [expected, *torch.autograd.grad(expected, ref)]):
            assert_close(g, want, torch.float32, f"{module.__name__}(*{args}, **{kwargs})")


@pytest.mark.parametrize("make,exc,message", [
    (lambda: fusedloss.nn.ClipLoss(world_size=2), ValueError, "world_size=2 needs process_group"),
    (lambda: fusedloss.nn.SigLipLoss(rank=1, world_size=2), ValueError, "world_size=2 needs process_group"),
    (lambda: fusedloss.nn.ClipLoss(False, False, True, 1, 1), ValueError, "rank=1"),
    (lambda: fusedloss.nn.ClipLoss(world_size=0), ValueError, "world_size=0"),
    (lambda: fusedloss.nn.ClipLoss(world_size=2.0), TypeError, "world_size"),
    (lambda: fusedloss.nn.ClipLoss(use_horovod=True), ValueError, "use_horovod"),
    (lambda: fusedloss.nn.ClipLoss(local_loss="yes"), TypeError, "local_loss"),
    (lambda: fusedloss.nn.ClipLoss(gather_with_grad=1), TypeError, "gather_with_grad"),
    (lambda: fusedloss.nn.SigLipLoss(cache_labels=None), TypeError, "cache_labels"),
    (lambda: fusedloss.nn.SigLipLoss(dist_impl="ring"), ValueError, "dist_impl"),
    (lambda: fusedloss.nn.SigLipLoss(process_group="group"), ValueError, "process_group"),
])
def test_open_clip_constructor_refusals(make, exc, message):
    with pytest.raises(exc, match=message):
        make()


@pytest.fixture
def rank_1_of_2(monkeypatch):
    """A stand-in for rank 1 of a 2-rank process group, for the constructors' checks: they read only the group's
    rank and size (nothing is communicated before a forward); the gloo test below runs real ranks."""
    monkeypatch.setattr(host._distributed, "check_group", lambda group: group)
    monkeypatch.setattr(host._distributed, "rank_and_size", lambda group: (1, 2))
    return object()


def test_open_clip_constructor_with_a_group(rank_1_of_2):
    """Across ranks open_clip's arguments must describe what fusedloss computes: the group's rank and size, and
    (CLIP) ``local_loss=True, gather_with_grad=True``; False for either would change the loss (its value, or its
    gradients) and raises, naming it; None takes the group's values and fusedloss's semantics."""
    group = rank_1_of_2
    for loss_fn in (fusedloss.nn.ClipLoss(process_group=group),
                    fusedloss.nn.ClipLoss(True, True, True, 1, 2, False, process_group=group),
                    *(fusedloss.nn.SigLipLoss(rank=1, world_size=2, dist_impl=impl, process_group=group)
                      for impl in (None, *fusedloss.nn.SigLipLoss.DIST_IMPLS))):
        assert (loss_fn.rank, loss_fn.world_size, loss_fn.process_group) == (1, 2, group)
    for kwargs, message in (({"local_loss": False}, "local_loss=False"),
                            ({"local_loss": True, "gather_with_grad": False}, "gather_with_grad=False"),
                            ({"rank": 0}, "rank=0 is not 1"), ({"world_size": 4}, "world_size=4 is not")):
        with pytest.raises(ValueError, match=message):
            fusedloss.nn.ClipLoss(**kwargs, process_group=group)
    with pytest.raises(ValueError, match="rank=0 is not 1"):
        fusedloss.nn.SigLipLoss(rank=0, world_size=2, process_group=group)


# ---------------------------------------------------------------------------------------------------------------
# Across processes: gloo ranks on CPU give open_clip's per-rank losses and gradients


@pytest.mark.parametrize("dist_impl", ["gather", "ring"])
@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("backend_name", ["torch", "interpret"])
def test_gloo_ranks_match_open_clip(tmp_path, monkeypatch, backend_name, world, dist_impl):
    """``nn.ClipLoss`` / ``nn.SigLipLoss`` with a process group, fp64, each rank a different grad_output, the text
    features gathered or passed around the ring: each rank's loss and every gradient are what open_clip's
    distributed loss gives on that rank; gradients through ``create_graph=True`` (the definition, differentiable
    collectives) agree, the scale's summed over ranks. Likewise ``info_nce`` with every retrieval option
    (``check_info_nce_ranks``): on the torch bands in the torch backend's run, on the retrieval kernels in the
    interpreter's."""
    n_local, dim, seed = 13, 12, 1234
    if backend_name == "interpret":
        monkeypatch.setenv("FUSEDLOSS_RETRIEVAL_SCHEDULE", "kernels")
    results = run_gloo_ranks(tmp_path, "contrastive_dist_worker.py", backend_name, world, n_local, dim, seed,
                             dist_impl)
    for kind in ("clip", "siglip"):
        images, texts, scale, bias, grad_outs = dist_batch(world, n_local, dim, seed)
        leaves_ = [t.clone().requires_grad_() for t in (images, texts, scale, bias)]
        losses = open_clip_rank_losses(kind, *leaves_, world)
        features = torch.autograd.grad((losses * grad_outs).sum(), leaves_[:2], retain_graph=True)
        for r, res in enumerate(results):
            rows = slice(r * n_local, (r + 1) * n_local)
            params = torch.autograd.grad(losses[r] * grad_outs[r], leaves_[2:], retain_graph=True, allow_unused=True)
            expected = [features[0][rows], features[1][rows]] + [torch.zeros(()) if p is None else p for p in params]
            assert_close(res[kind]["loss"], losses[r], torch.float64, f"{kind} rank {r} loss")
            for name, got, want in zip(("image", "text", "logit_scale", "logit_bias"), res[kind]["grads"], expected):
                assert_close(got, want, torch.float64, f"{kind} rank {r} {name}.grad")
            for got, want in zip(res[kind]["create_graph"][:2], expected[:2]):
                assert_close(got, want, torch.float64, f"{kind} rank {r} create_graph features' grad")
        scale_sum = sum(res[kind]["create_graph"][2] for res in results)
        assert_close(scale_sum, sum(res[kind]["grads"][2] for res in results), torch.float64, "create_graph scale")
        if kind == "clip":
            assert all(float(res[kind]["grads"][3]) == 0.0 for res in results)
    check_info_nce_ranks(results, world, n_local, dim, seed)
    for what in ("text_features_grad", "key_rows"):
        for res in results:
            assert f"ranks disagree on {what}" in res.get("disagree/" + what, "no ValueError"), what
    # DDP averages gradients: with equal grad_outputs the mean of the ranks' losses is the global batch's loss
    images, texts, scale, bias, _ = dist_batch(world, n_local, dim, seed)
    assert_close(sum(r["clip"]["loss"] for r in results) / world, open_clip_loss(images, texts, scale),
                 torch.float64, "mean of the CLIP rank losses")
    assert_close(sum(r["siglip"]["loss"] for r in results) / world, open_clip_siglip(images, texts, scale, bias),
                 torch.float64, "mean of the SigLIP rank losses")


def check_info_nce_ranks(results, world, n_local, dim, seed):
    """``info_nce`` across ranks with every option (a queue, shared or per-query negatives, positive ids shared
    across ranks, a margin): rank r's loss is the single-process reference of its queries against the keys and
    shared negatives of every rank (its own keys first: the loss does not depend on the candidates' order), the
    keys' and shared negatives' gradients those of ``sum_s g_s loss_s``, the rest ``g_r loss_r``'s."""
    from test_info_nce_retrieval import reference_info_nce

    queries, keys, shared, per_query, ids, temperature = retrieval_batch(world, n_local, dim, seed)
    grad_outs = dist_batch(world, n_local, dim, seed)[4]
    n_keys = n_local + 2

    def own_first(r):  # every rank's keys, rank r's first
        return torch.cat([torch.arange(r * n_keys, (r + 1) * n_keys), torch.arange(0, r * n_keys),
                          torch.arange((r + 1) * n_keys, world * n_keys)])

    for variant in ("shared", "per_query"):
        leaves = [t.clone().requires_grad_() for t in (queries, keys, shared if variant == "shared" else per_query,
                                                       temperature)]
        losses = []
        for r in range(world):
            order = own_first(r)
            negatives = leaves[2] if variant == "shared" else leaves[2][r * n_local:(r + 1) * n_local]
            losses.append(reference_info_nce(leaves[0][r * n_local:(r + 1) * n_local], leaves[1][order],
                                             leaves[3], negatives, ids[order], RETRIEVAL_MARGIN))
        losses = torch.stack(losses)
        every = torch.autograd.grad((losses * grad_outs).sum(), leaves[1:3] if variant == "shared" else leaves[1:2],
                                    retain_graph=True)
        for r, res in enumerate(results):
            got = res["info_nce_" + variant]
            own = torch.autograd.grad(losses[r] * grad_outs[r], leaves, retain_graph=True)
            expected = [own[0][r * n_local:(r + 1) * n_local], every[0][r * n_keys:(r + 1) * n_keys],
                        every[1].view(world, 3, dim)[r] if variant == "shared" else
                        own[2][r * n_local:(r + 1) * n_local], own[3]]
            assert_close(got["loss"], losses[r], torch.float64, f"info_nce {variant} rank {r} loss")
            for name, g, want in zip(("query", "key", "negatives", "temperature"), got["grads"], expected):
                assert_close(g, want, torch.float64, f"info_nce {variant} rank {r} {name}.grad")
            for g, want in zip(got["create_graph"][:3], expected[:3]):
                assert_close(g, want, torch.float64, f"info_nce {variant} rank {r} create_graph grad")
            if variant == "shared":  # the README's call (temperature 0.05, the ring) on the same batch
                readme = reference_info_nce(queries[r * n_local:(r + 1) * n_local], keys[own_first(r)], 0.05,
                                            shared, ids[own_first(r)], RETRIEVAL_MARGIN)
                assert_close(res["readme_retrieval"], readme, torch.float64, f"README retrieval rank {r}")


# ---------------------------------------------------------------------------------------------------------------
# Memory: the torch path's peak at 8192 rows


def test_torch_path_memory_is_linear(monkeypatch, gen):
    """8192-row CLIP forward + backward (d = 32, fp32) on the torch path: peak memory allocated during the call,
    against open_clip's eager loss on the same input. Eager holds the 8192^2 fp32 logits (256 MiB), their
    transpose's log-softmax and the gradients (1 GiB measured); the tiled path a few 128 x 8192 fp32 band
    temporaries (4 MiB each) and O(N d) buffers (24 MiB measured)."""
    if DEVICE != "cpu":
        pytest.skip("measured on the CPU torch path")
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "torch")
    image, text = randn(gen, 8192, 32), randn(gen, 8192, 32)

    def run(fn):
        img, txt = image.clone().requires_grad_(), text.clone().requires_grad_()
        return peak_allocated_bytes(lambda: fn(img, txt, 10.0).backward()), img.grad

    ours, grad = run(clip_loss)
    eager, grad_ref = run(open_clip_loss)
    print(f"\npeak tensor memory, 8192 x 32 CLIP fwd+bwd: tiled torch path {ours / 2**20:.1f} MiB, "
          f"eager {eager / 2**20:.1f} MiB ({ours / eager:.1%})")
    assert eager > 8192**2 * 4  # eager really holds the N x N matrix
    assert ours < 0.1 * eager
    assert rel_err(grad, grad_ref) < 1e-4  # and it computes the same thing


# ---------------------------------------------------------------------------------------------------------------
# Properties: random shapes and scales against the fp64 references, both CPU tiers


@pytest.mark.parametrize("kind", ["nt_xent", "clip", "info_nce"])
def test_property_against_fp64_references(tier, kind):
    if tier.name == "cuda":
        pytest.skip("the fp64 property tests run in the CPU tiers")

    @settings(max_examples=6, deadline=None)
    @given(n=st.integers(1, 40), dim=st.integers(1, 20), scale=st.floats(0.5, 60.0), seed=st.integers(0, 2**16))
    def check(n, dim, scale, seed):
        gen = torch.Generator().manual_seed(seed)
        x, y = randn(gen, n, dim, dtype=torch.float64), randn(gen, n + 3, dim, dtype=torch.float64)
        s = torch.tensor(scale, dtype=torch.float64)
        if kind == "nt_xent":
            inputs, fn, ref_fn = (torch.cat([x, x + y[:n]]), 1.0 / s), nt_xent, simclr_info_nce_loss
        elif kind == "clip":
            inputs, fn, ref_fn = (x, y[:n], s), clip_loss, open_clip_loss
        else:
            inputs, fn, ref_fn = (x, y, 1.0 / s), info_nce, eager_info_nce
        tested, ref = leaves(tier.device, torch.float64, *inputs)
        out, expected = fn(*tested), ref_fn(*ref)
        # below 1e-4 the reference's own lse - S_pos cancels past 1e-10 (the small-loss tests cover that range)
        assume(float(expected.detach()) == 0.0 or float(expected.detach()) > 1e-4)
        assert_close(out, expected, torch.float64, "loss")
        for got, want in zip(torch.autograd.grad(out, tested), torch.autograd.grad(expected, ref)):
            # or 1e-12 absolute: a gradient that is a small difference (d = 1, where normalization is constant; a
            # tiny softmax weight minus 1) has no relative accuracy in the fp64 reference itself
            assert rel_err(got, want) <= 1e-9 or float((got - want).abs().max()) <= 1e-12

    check()


# ---------------------------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument, before any launch


def _bad_calls():
    x = torch.randn(8, 4)
    t3 = torch.randn(2, 4, 4)
    return [
        (lambda: nt_xent("features"), TypeError, "features"),
        (lambda: nt_xent(torch.ones(8, 4, dtype=torch.long)), TypeError, "features"),
        (lambda: nt_xent(t3), ValueError, "features"),
        (lambda: nt_xent(torch.randn(7, 4)), ValueError, "features"),
        (lambda: nt_xent(torch.randn(8, 0)), ValueError, "features"),
        (lambda: nt_xent(x, 0.0), ValueError, "temperature"),
        (lambda: nt_xent(x, -1.0), ValueError, "temperature"),
        (lambda: nt_xent(x, "0.1"), TypeError, "temperature"),
        (lambda: nt_xent(x, torch.ones(2)), ValueError, "temperature"),
        (lambda: clip_loss(x, torch.randn(8, 5), 10.0), ValueError, "text_features"),
        (lambda: clip_loss(x, x.double(), 10.0), TypeError, "text_features"),
        (lambda: clip_loss(x, x, "10"), TypeError, "logit_scale"),
        (lambda: clip_loss(x, x, torch.ones(2)), ValueError, "logit_scale"),
        (lambda: clip_loss(x, x, torch.ones(2, dtype=torch.long)), TypeError, "logit_scale"),
        (lambda: clip_loss(x, x, 10.0, torch.ones(3)), ValueError, "logit_bias"),
        (lambda: clip_loss(x, x, 10.0, process_group="group"), ValueError, "process_group"),
        (lambda: clip_loss(torch.randn(0, 4), torch.randn(0, 4), 10.0), ValueError, "image_features"),
        (lambda: info_nce(x, torch.randn(6, 4)), ValueError, "key"),
        (lambda: info_nce(x, torch.randn(8, 3)), ValueError, "key"),
        (lambda: info_nce(x, x.half()), TypeError, "key"),
        (lambda: info_nce(x, x, reduction="avg"), ValueError, "reduction"),
        (lambda: info_nce(x, x, normalize=1), TypeError, "normalize"),
        (lambda: info_nce(torch.randn(0, 4), x), ValueError, "query"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    call, exc, name = _bad_calls()[case]
    with pytest.raises(exc, match=name):
        call()


def test_number_forms(tier, gen):
    """NumPy scalars and 0-d tensors (integer ones too) wherever a number is accepted, as torch's parser takes
    them."""
    np = pytest.importorskip("numpy")
    x, y = randn(gen, 6, 4, device=tier.device), randn(gen, 6, 4, device=tier.device)
    expected = clip_loss(x, y, 10.0)
    for scale in (np.float32(10.0), np.int64(10), torch.tensor(10), torch.tensor(10.0, device=tier.device)):
        assert_close(clip_loss(x, y, scale), expected, torch.float32, f"logit_scale={scale!r}")
    assert_close(nt_xent(x, np.float64(0.5)), nt_xent(x, 0.5), torch.float32, "numpy temperature")


# ---------------------------------------------------------------------------------------------------------------
# CUDA only: no host synchronization in forward + backward


def test_no_host_sync_on_cuda(tier, gen):
    if tier.name != "cuda":
        pytest.skip("host synchronization is only observable on CUDA")
    img = randn(gen, 1000, 256, dtype=torch.bfloat16, device=tier.device, requires_grad=True)
    txt = randn(gen, 1000, 256, dtype=torch.bfloat16, device=tier.device, requires_grad=True)
    scale = torch.tensor(14.0, device=tier.device, requires_grad=True)
    bias = torch.tensor(-10.0, device=tier.device, requires_grad=True)
    clip_loss(img, txt, scale).backward()  # compile outside the checked region
    siglip_loss(img, txt, scale, bias).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clip_loss(img, txt, scale).backward()
        siglip_loss(img, txt, scale, bias).backward()
        nt_xent(img, 0.1).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_fixed_shift_no_host_sync_on_cuda(tier, gen, monkeypatch, gemm):
    """The fixed shift decides its range and its fallbacks on the device, and the cuBLAS GEMMs take no host-side
    scale: no synchronization either."""
    if tier.name != "cuda":
        pytest.skip("host synchronization is only observable on CUDA")
    monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_SCHEDULE", "fixed_shift")
    monkeypatch.setenv("FUSEDLOSS_CONTRASTIVE_GEMM", gemm)
    img = randn(gen, 1000, 256, dtype=torch.bfloat16, device=tier.device, requires_grad=True)
    txt = randn(gen, 1000, 256, dtype=torch.bfloat16, device=tier.device, requires_grad=True)
    scale = torch.tensor(14.0, device=tier.device, requires_grad=True)
    clip_loss(img, txt, scale).backward()  # compile outside the checked region
    nt_xent(img, 0.1).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clip_loss(img, txt, scale).backward()
        nt_xent(img, 0.1).backward()
        info_nce(img, txt, 0.1).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------------------------
# torch.compile across batch sizes: the batch size stays symbolic (the kernels' passes are custom ops)


_COMPILE_BATCHES = (3, 4, 6, 8, 11, 13, 16, 19, 23, 27, 32, 40)  # 12 sizes: past Dynamo's recompile_limit of 8
_COMPILE_LOSSES = {  # (loss, fp64 reference, fp64 inputs at batch n): tensors only, the scales learnable
    "clip": (clip_loss, open_clip_loss, lambda gen, n: [randn(gen, n, 12, dtype=torch.float64),
                                                        randn(gen, n, 12, dtype=torch.float64), torch.tensor(14.0)]),
    "siglip": (siglip_loss, open_clip_siglip, lambda gen, n: [randn(gen, n, 12, dtype=torch.float64),
                                                              randn(gen, n, 12, dtype=torch.float64),
                                                              torch.tensor(10.0), torch.tensor(-5.0)]),
    "nt_xent": (nt_xent, simclr_info_nce_loss, lambda gen, n: [randn(gen, 2 * n, 12, dtype=torch.float64),
                                                             torch.tensor(0.2)]),
    "info_nce": (info_nce, eager_info_nce, lambda gen, n: [randn(gen, n, 12, dtype=torch.float64),
                                                           randn(gen, n + 5, 12, dtype=torch.float64),
                                                           torch.tensor(0.1)]),
}


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("kind", list(_COMPILE_LOSSES))
def test_compile_keeps_the_batch_size_symbolic(tier, gen, kind, dynamic):
    """``torch.compile(fullgraph=True)`` over 12 batch sizes compiles at most twice (the first size static, then
    one graph with N symbolic), ``dynamic=True`` once (3 sizes): the kernels' launch arithmetic and band loop run
    inside custom ops, where traced they made a graph per size and the ninth size failed (recompile_limit 8).
    Every size's loss and gradients are the fp64 reference's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    fn, ref_fn, make = _COMPILE_LOSSES[kind]
    torch._dynamo.reset()  # no graph of fn cached by an earlier test
    counter = CompileCounterWithBackend("aot_eager")  # (Inductor's code generation is slow on the CPU, and not tested)
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=counter)
    for n in (_COMPILE_BATCHES if dynamic is None else _COMPILE_BATCHES[::4]):  # (dynamic: symbolic from the first)
        tested, ref = leaves(tier.device, torch.float32, *make(gen, n))
        loss, expected = compiled(*tested), ref_fn(*ref)
        got = [loss, *torch.autograd.grad(loss, tested)]
        for index, (g, want) in enumerate(zip(got, [expected, *torch.autograd.grad(expected, ref)])):
            assert_close(g, want, torch.float32, f"{kind} N = {n}, output {index}")
    assert counter.frame_count <= (1 if dynamic else 2), f"{counter.frame_count} graphs"


# ---------------------------------------------------------------------------------------------------------------
# The autograd / compile / layout contract (tests/test_contract.py)


def _pair(n, dim):
    def make(gen, dtype):
        x, y = randn(gen, n, dim, dtype=dtype), randn(gen, n, dim, dtype=dtype)
        return [x, y + x, (torch.rand((), generator=gen, dtype=torch.float64) * 5 + 3).to(dtype)], {}
    return make


def _stride0_text(args, kwargs):
    x, y, s = args
    return [x, y[:1].expand_as(y), s], kwargs


CONTRACT_CASES = [
    Case("nt_xent", nt_xent,
         lambda gen, dtype: ([randn(gen, 10, 5, dtype=dtype), torch.tensor(0.3, dtype=dtype)], {}),
         grad_args=(0, 1), compile=True),
    Case("clip_loss", clip_loss, _pair(7, 5), grad_args=(0, 1, 2), compile=True, stride0=_stride0_text),
    Case("info_nce", info_nce,
         lambda gen, dtype: ([randn(gen, 6, 4, dtype=dtype), randn(gen, 9, 4, dtype=dtype), 0.5], {}),
         grad_args=(0, 1)),
    Case("info_nce_raw_none", info_nce,
         lambda gen, dtype: ([randn(gen, 6, 4, dtype=dtype), randn(gen, 8, 4, dtype=dtype),
                              torch.tensor(2.0, dtype=dtype)], {"normalize": False, "reduction": "none"}),
         grad_args=(0, 1, 2),
         stride0=lambda args, kwargs: ([args[0], args[1][:1].expand_as(args[1]), args[2]], kwargs)),
]


def test_grad_cache_step_equals_the_uncached_step(tier, gen):
    """The README's GradCache step (``clip_loss_and_grads`` on embeddings made without a graph, then each chunk
    re-embedded and backpropagated) leaves the uncached step's loss and gradients in every parameter."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    encoders = [[torch.nn.Linear(12, 8, dtype=torch.float64).to(tier.device) for _ in range(2)] for _ in range(2)]
    encoders[1][0].load_state_dict(encoders[0][0].state_dict())
    encoders[1][1].load_state_dict(encoders[0][1].state_dict())
    scales = [torch.tensor(7.0, dtype=torch.float64, device=tier.device, requires_grad=True) for _ in range(2)]
    images_in = torch.randn(32, 12, generator=gen, dtype=torch.float64).to(tier.device)
    texts_in = torch.randn(32, 12, generator=gen, dtype=torch.float64).to(tier.device)
    (image_encoder, text_encoder), logit_scale = encoders[0], scales[0]
    uncached = fusedloss.clip_loss(image_encoder(images_in), text_encoder(texts_in), logit_scale)
    uncached.backward()
    namespace = dict(torch=torch, fusedloss=fusedloss, image_encoder=encoders[1][0], text_encoder=encoders[1][1],
                     logit_scale=scales[1], chunk_size=8, image_chunks=images_in.split(8),
                     text_chunks=texts_in.split(8))
    exec(readme_example("grad_cache"), namespace)
    assert_close(namespace["loss"], uncached.detach(), torch.float64, "loss")
    for a, b in zip([*encoders[0][0].parameters(), *encoders[0][1].parameters(), scales[0]],
                    [*encoders[1][0].parameters(), *encoders[1][1].parameters(), scales[1]]):
        assert_close(b.grad, a.grad, torch.float64, "gradient")


@pytest.mark.parametrize("which", ["siglip", "info_nce"])
def test_loss_and_grads_are_autograds(tier, gen, which):
    """``siglip_loss_and_grads`` and ``info_nce_and_grads``: the loss and the gradients autograd gives, detached."""
    x = torch.randn(20, 8, generator=gen, dtype=torch.float64).to(tier.device).requires_grad_()
    y = torch.randn(20, 8, generator=gen, dtype=torch.float64).to(tier.device).requires_grad_()
    a = torch.tensor(5.0, dtype=torch.float64, device=tier.device, requires_grad=True)
    b = torch.tensor(-3.0, dtype=torch.float64, device=tier.device, requires_grad=True)
    if which == "siglip":
        loss, *grads = fusedloss.siglip_loss_and_grads(x, y, a, b)
        leaves, want = [x, y, a, b], fusedloss.siglip_loss(x, y, a, b)
    else:
        loss, *grads = fusedloss.info_nce_and_grads(x, y, 0.1)
        leaves, want = [x, y], fusedloss.info_nce(x, y, 0.1)
        assert grads[2] is None  # a number temperature
        grads = grads[:2]
    expected = torch.autograd.grad(want, leaves)
    assert not loss.requires_grad and all(not g.requires_grad for g in grads)
    assert_close(loss, want.detach(), torch.float64, "loss")
    for g, e in zip(grads, expected):
        assert_close(g, e, torch.float64, "gradient")



def test_ring_memory_per_rank_is_flat_in_the_world_size(tmp_path, monkeypatch):
    """The ring's point: with the same local batch (256 x 8192 fp32: 8 MiB per block) each rank's peak resident
    memory during ``clip_loss`` / ``siglip_loss`` forward + backward does not grow with the world size: equal
    (within 10%) at 4 and 8 gloo ranks, and no higher at 2, where no step holds a block arriving and an
    accumulator arriving at once, while the gather's grows with the gathered features and their fp32 gradient
    (bench/results/cpu-xeon-2core-2026-12-07-ring-memory.md has one run's figures): the test checks that growth
    too, so that the measurement is seen to resolve it. glibc's allocator is told to map every block of 64 KiB or
    more and unmap it when freed, so that resident memory follows the live tensors (its default keeps freed heap
    resident, which hides or shifts a peak). On every rank the ring's loss and gradients are the gather's (fp32)."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    peaks = {}
    for world in (2, 4, 8):
        (tmp_path / str(world)).mkdir()
        results = run_gloo_ranks(tmp_path / str(world), "contrastive_memory_worker.py", "torch", world, 256, 8192)
        for kind in ("clip", "siglip"):
            for r, res in enumerate(results):
                ring, gather = res[(kind, "ring")], res[(kind, "gather")]
                assert_close(ring["loss"], gather["loss"], torch.float32, f"{kind} W={world} rank {r} loss")
                for name, got, want in zip(("image", "text", "scale"), ring["grads"], gather["grads"]):
                    assert_close(got, want, torch.float32, f"{kind} W={world} rank {r} {name}.grad")
            for dist_impl in ("ring", "gather"):
                peaks[kind, dist_impl, world] = max(res[(kind, dist_impl)]["peak"] for res in results)
    for kind in ("clip", "siglip"):
        ring = [peaks[kind, "ring", w] for w in (2, 4, 8)]
        gather = [peaks[kind, "gather", w] for w in (2, 4, 8)]
        shown = f"{kind} peak MiB per rank at W = 2, 4, 8: ring {[p >> 20 for p in ring]}, gather " \
                f"{[p >> 20 for p in gather]}"
        assert max(ring[1:]) <= 1.1 * min(ring[1:]) and ring[0] <= 1.1 * ring[1], shown
        assert gather[2] >= gather[0] + 96 * 2**20, shown  # 6 more blocks of features and fp32 gradient: 96 MiB
