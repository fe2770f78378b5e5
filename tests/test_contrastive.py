"""Contrastive losses (``nt_xent``, ``clip_loss``, ``info_nce``) against fp64 eager references, in every tier.

References: the seed's ``info_nce_loss`` verbatim (NT-Xent), the open_clip-style symmetric loss, and
``F.cross_entropy`` over normalized similarities (InfoNCE). Shapes: N not a multiple of any tile (75, 150, 300 rows
against 32/64/128-row tiles), d not a power of two (100, 200, 33), a single pair (N = 1), extra negative keys.
Unless a test says otherwise the backward bands are made small (128 rows for the kernels, ~13 rows for the torch
path), so that every test walks several bands, several forward programs and the band-to-band fp32 accumulation.
"""

import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TOL, assert_close, randn, rel_err
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fusedloss.losses import contrastive as host
from fusedloss.losses.contrastive import clip_loss, info_nce, nt_xent

# ---------------------------------------------------------------------------------------------------------------
# References (fp64 eager)


def seed_info_nce_loss(features, temperature=0.07):
    """The seed's section 4 ``info_nce_loss``, verbatim (labels/mask on the features' device)."""
    features = F.normalize(features, dim=1)
    similarity = features @ features.T / temperature
    N = features.shape[0] // 2
    labels = torch.cat([torch.arange(N, 2 * N), torch.arange(N)]).to(features.device)
    mask = torch.eye(2 * N, dtype=bool, device=features.device)
    similarity.masked_fill_(mask, -float("inf"))
    return F.cross_entropy(similarity, labels)


def open_clip_loss(image, text, logit_scale, logit_bias=None):
    """open_clip's ClipLoss (single process): normalized features, ``logit_scale * image @ text.T``."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = logit_scale * image @ text.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def eager_info_nce(query, key, temperature, normalize=True, reduction="mean"):
    if normalize:
        query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    labels = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(query @ key.T / temperature, labels, reduction=reduction)


# ---------------------------------------------------------------------------------------------------------------
# Helpers


DTYPES = {"interpret": (torch.float32, torch.float16), "torch": (torch.float32, torch.float64, torch.bfloat16),
          "cuda": (torch.bfloat16, torch.float16, torch.float32)}


def need_dtype(tier, dtype):
    if tier.name == "interpret" and dtype == torch.bfloat16:
        pytest.skip("tl.dot on bf16 is wrong in Triton's interpreter (triton issue 11584); bf16 runs in the CUDA tier")
    if dtype not in DTYPES[tier.name] and dtype != torch.float64:
        pytest.skip(f"{dtype} is covered in other tiers")


def kernel_configs():
    from fusedloss.kernels import configs

    return configs


@pytest.fixture
def small_bands(tier, monkeypatch):
    """Backward bands of 128 rows (kernels) or ~13 rows (torch path at N = 300 columns), forward bands of
    several row tiles: the multi-band / multi-program code paths at test sizes."""
    monkeypatch.setattr(host, "_TORCH_BAND_ELEMENTS", 4096)
    if tier.name != "torch":
        monkeypatch.setattr(kernel_configs(), "CONTRASTIVE_BAND_BYTES", 0)
        monkeypatch.setattr(kernel_configs(), "CONTRASTIVE_BAND_MIN_ROWS", 128)
    return tier


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
    (1, 8, 1.0),  # one pair: each row's only candidate is its positive (loss 0, gradient 0 up to rounding)
])
def test_nt_xent_matches_seed(small_bands, gen, dtype, n, dim, temperature):
    tier = small_bands
    need_dtype(tier, dtype)
    x = randn(gen, 2 * n, dim, dtype=torch.float64)
    (features,), (features_ref,) = leaves(tier.device, dtype, x)
    grad_out = randn(gen, 1, dtype=torch.float64).reshape(())

    loss = nt_xent(features, temperature)
    ref = seed_info_nce_loss(features_ref, temperature)
    assert loss.dtype == dtype and loss.shape == ()
    (loss * grad_out.to(dtype).to(tier.device)).backward()
    (ref * grad_out).backward()
    if n == 1:  # the reference gradient is pure rounding noise around 0
        assert abs(float(loss.detach())) <= TOL[dtype] and float(features.grad.abs().max()) <= 1e-3
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
    ref = seed_info_nce_loss(features_ref, temp_ref)
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
    ref = seed_info_nce_loss(features_ref, 0.1)
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
def test_clip_loss_matches_open_clip(small_bands, gen, dtype, n, dim, scale):
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
def test_info_nce_matches_eager(small_bands, gen, reduction, normalize):
    """One direction, 140 queries against 140 + 37 keys (the extra keys are negatives only)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Across processes: 2 gloo ranks on CPU reproduce the global-batch loss and gradients


@pytest.mark.parametrize("backend_name", ["torch", "interpret"])
def test_clip_loss_two_gloo_ranks(tmp_path, backend_name):
    if DEVICE != "cpu":
        pytest.skip("the gloo test runs in the CPU session")
    if backend_name == "interpret":
        pytest.importorskip("triton")
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    world, n_local, dim, seed = 2, 37, 24, 1234
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDLOSS_BACKEND")}
    env.update({"TRITON_INTERPRET": "1"} if backend_name == "interpret" else {"FUSEDLOSS_BACKEND": "torch"})
    env["FUSEDLOSS_POISON"] = "1"
    worker = os.path.join(os.path.dirname(__file__), "contrastive_dist_worker.py")
    init_file = tmp_path / "init"
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, worker, str(r), str(world), str(init_file), str(outs[r]), "float64",
                               str(n_local), str(dim), str(seed)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(world)]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a gloo rank did not finish in 180 s")
        logs.append(out.decode(errors="replace"))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"rank failed:\n{log[-3000:]}"
    results = [torch.load(o) for o in outs]
    assert {r["backend"] for r in results} == {"triton-interpret" if backend_name == "interpret" else "torch"}

    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(world * n_local, dim, generator=gen, dtype=torch.float64).requires_grad_()
    texts = torch.randn(world * n_local, dim, generator=gen, dtype=torch.float64).requires_grad_()
    grad_out = torch.randn((), generator=gen, dtype=torch.float64)
    scale = torch.tensor(11.0, dtype=torch.float64, requires_grad=True)
    ref = open_clip_loss(images, texts, scale)
    (ref * grad_out).backward()

    # Each rank's own loss is open_clip's local loss (its rows against the gathered batch).
    img_n, txt_n = F.normalize(images.detach(), dim=1), F.normalize(texts.detach(), dim=1)
    for r, res in enumerate(results):
        rows = slice(r * n_local, (r + 1) * n_local)
        labels = torch.arange(r * n_local, (r + 1) * n_local)
        local = (F.cross_entropy(11.0 * img_n[rows] @ txt_n.T, labels) +
                 F.cross_entropy(11.0 * txt_n[rows] @ img_n.T, labels)) / 2
        assert_close(res["loss"], local, torch.float64, f"rank {r} loss")
    # DDP averages gradients over ranks: that average equals the global-batch loss's gradient.
    assert_close(sum(r["loss"] for r in results) / world, ref, torch.float64, "mean of rank losses")
    image_grad = torch.cat([r["image_grad"] for r in results]) / world
    text_grad = torch.cat([r["text_grad"] for r in results]) / world
    assert_close(image_grad, images.grad, torch.float64, "image_features.grad / world")
    assert_close(text_grad, texts.grad, torch.float64, "text_features.grad / world")
    assert_close(sum(r["scale_grad"] for r in results) / world, scale.grad, torch.float64, "mean logit_scale.grad")


# ---------------------------------------------------------------------------------------------------------------
# Memory: the torch path's peak at 16384 rows


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive, and their peak: every op output's storage
    is counted once when it appears and released when the storage is freed (a finalizer on its Python object,
    which torch keeps for the storage's lifetime)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = set()

    def _release(self, key, nbytes):
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def test_torch_path_memory_is_linear(monkeypatch, gen):
    """16384-row NT-Xent forward + backward (d = 32, fp32) on the torch path: peak tensor memory allocated during
    the call, against the seed's eager version on the same input. Eager holds the 16384^2 fp32 similarity (1 GiB),
    its log-softmax and their gradients; the tiled path holds one 256 x 16384 band and O(N d) buffers."""
    if DEVICE != "cpu":
        pytest.skip("measured on the CPU torch path")
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "torch")
    x = randn(gen, 16384, 32)

    def run(fn):
        features = x.clone().requires_grad_()
        mode = LiveTensorBytes()
        with mode:
            fn(features, 0.1).backward()
        assert features.grad is not None
        return mode.peak, features.grad

    ours, grad = run(nt_xent)
    eager, grad_ref = run(seed_info_nce_loss)
    print(f"\npeak tensor memory, 16384 x 32 NT-Xent fwd+bwd: tiled torch path {ours / 2**20:.1f} MiB, "
          f"eager {eager / 2**20:.1f} MiB ({ours / eager:.1%})")
    assert eager > 16384**2 * 4  # eager really holds the N x N matrix
    assert ours < 0.05 * eager
    assert rel_err(grad, grad_ref) < 1e-4  # and it computes the same thing


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
        (lambda: clip_loss(x, x, torch.ones((), dtype=torch.long)), TypeError, "logit_scale"),
        (lambda: clip_loss(x, x, 10.0, torch.ones(3)), ValueError, "logit_bias"),
        (lambda: clip_loss(x, x, 10.0, process_group="group"), ValueError, "process_group"),
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


# ---------------------------------------------------------------------------------------------------------------
# CUDA only: no host synchronization in forward + backward


def test_no_host_sync_on_cuda(tier, gen):
    if tier.name != "cuda":
        pytest.skip("host synchronization is only observable on CUDA")
    img = randn(gen, 1000, 256, dtype=torch.bfloat16, device=tier.device, requires_grad=True)
    txt = randn(gen, 1000, 256, dtype=torch.bfloat16, device=tier.device, requires_grad=True)
    scale = torch.tensor(14.0, device=tier.device, requires_grad=True)
    clip_loss(img, txt, scale).backward()  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clip_loss(img, txt, scale).backward()
        nt_xent(img, 0.1).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
