"""Contrastive losses: tiled kernels vs eager PyTorch, torch.compile, Inf-CL and the bare matmuls.

Work, per problem (CLIP and SigLIP: N image-text pairs; NT-Xent: M = 2N rows; d features), counted as the matmuls
the loss needs, whoever computes it:
    forward            flops = 2 N^2 d   (one similarity matrix; CLIP's two directions share it)
    forward + backward flops = 6 N^2 d   (plus the two gradient products, dQ = W K and dK = W^T Q, 2 N^2 d each)
(NT-Xent: the same with M rows, since dF = W F + W^T F.) The fused kernels do more: the backward recomputes the
logits (forward + backward 8 N^2 d for CLIP and SigLIP, 6 M^2 d for NT-Xent, recorded as ``hw_flops``); Inf-CL
computes the logits once per direction and per backward kernel (4 N^2 d forward, 16 N^2 d forward + backward). The
``matmul`` provider times just the bare matmuls at this shape (``S = Q K^T``, then ``W K`` and ``W^T Q`` with a
random ``W``), the practical ceiling for any implementation.

Providers ``fusedloss`` and ``fusedloss-fixed_shift``: the kernels on the exact schedule (the default) and on the
opt-in fixed-shift one (``schedule="fixed_shift"``, kernels/contrastive.py), in the same process and
harness. Both take the band GEMMs where ``FUSEDLOSS_CONTRASTIVE_GEMM`` says (Triton unless it is ``cublas``), so a
second run with that variable set times the four combinations (bench/NOTES.md has the command). SigLIP has one
schedule (the fixed shift leaves its kernels as they are).

Retrieval InfoNCE (``info_nce`` with S shared negatives, ``positive_ids`` and ``false_negative_margin``; providers
``fusedloss``, the default torch bands, and ``fusedloss-kernels``, the opt-in kernels): the same counts over the
N + S candidate columns, ``2 N (N + S) d`` forward and ``6 N (N + S) d`` forward + backward (the
fused path recomputes the similarities: 8). Its ``eager`` provider materializes the ``N x (N + S)`` logits, the
masks and a soft-target cross-entropy. SigLIP's ``open_clip-chunked``: open_clip's own ``SigLipLoss`` with
``chunk_size`` (merged 2026-04), where the installed open_clip has it.

Sizes: ``--quick`` (CPU, fp32, the torch backend): CLIP and SigLIP N = 1024, NT-Xent 2N = 1024, retrieval N = S =
512, d = 128. GPU (bf16): CLIP N = 65536, d = 768 (the performance target) and N = 16384, d = 512; SigLIP N =
65536, d = 768 (its target: within 1.1x of CLIP's time); NT-Xent 2N = 32768, d = 128; retrieval N = S = 32768,
d = 768.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F

from fusedloss import clip_loss, info_nce, nt_xent, siglip_loss

from benchutil import compiled, row, skip_if_oom

TEMPERATURE = 0.1  # NT-Xent
LOGIT_SCALE = 14.285  # CLIP, 1 / 0.07
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # SigLIP's initialization


def eager_clip(image, text, scale):
    """open_clip's ClipLoss, single process: what a user writes."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def eager_siglip(image, text, scale, bias):
    """open_clip's SigLipLoss, single process."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(image.shape[0], device=image.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


def fixed_shift(fn):
    """``fn`` (a contrastive loss) on the fixed-shift schedule (its ``schedule`` argument)."""
    return lambda *args, **kwargs: fn(*args, schedule="fixed_shift", **kwargs)


def eager_nt_xent(features):
    """SimCLR's info_nce_loss: the 2N x 2N similarity, the diagonal masked, positive of row i at i + N mod 2N."""
    features = F.normalize(features, dim=1)
    similarity = features @ features.T / TEMPERATURE
    n = features.shape[0] // 2
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(features.device)
    mask = torch.eye(2 * n, dtype=torch.bool, device=features.device)
    return F.cross_entropy(similarity.masked_fill(mask, -float("inf")), labels)


def inf_cl_clip(dim):
    """Inf-CL's single-GPU flash loss (``inf_cl.flash.cal_flash_loss``), one call per direction; its inputs are
    normalized by the caller and its head_dim (256) must divide d."""
    from inf_cl.flash import cal_flash_loss

    if dim % 256:
        pytest.skip("Inf-CL's flash loss needs d to be a multiple of its head_dim 256")

    def loss(image, text, scale):
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        labels = torch.arange(image.shape[0], device=image.device)
        return (cal_flash_loss(image, text, labels, scale).mean()
                + cal_flash_loss(text, image, labels, scale).mean()) / 2

    return loss


RETRIEVAL_TEMPERATURE, RETRIEVAL_MARGIN, RETRIEVAL_IDS = 0.05, 0.1, 4  # ids: every 4 consecutive keys share one


def retrieval_ids(n, device):
    return torch.arange(n, device=device) // RETRIEVAL_IDS


def fused_retrieval(schedule=None):
    return lambda query, key, negatives: info_nce(
        query, key, RETRIEVAL_TEMPERATURE, negatives=negatives, positive_ids=retrieval_ids(key.shape[0], key.device),
        false_negative_margin=RETRIEVAL_MARGIN, schedule=schedule)


def eager_retrieval(query, key, negatives):
    """What a user writes: the logits over keys and negatives, the false negatives masked, the uniform target over
    the keys sharing the query's id."""
    query, key, negatives = (F.normalize(t, dim=-1) for t in (query, key, negatives))
    sim = query @ torch.cat([key, negatives]).T
    ids = retrieval_ids(key.shape[0], key.device)
    rows = torch.arange(query.shape[0], device=query.device)
    positive = F.pad(ids[:, None] == ids[None, :], (0, negatives.shape[0]))
    removed = ~positive & (sim > sim[rows, rows, None].detach() - RETRIEVAL_MARGIN)
    log_p = torch.log_softmax((sim / RETRIEVAL_TEMPERATURE).masked_fill(removed, float("-inf")), dim=1)
    return (-torch.where(positive, log_p, 0.0).sum(1) / positive.sum(1)).mean()


def open_clip_chunked_siglip(dim):
    """open_clip's ``SigLipLoss(chunk_size=512)`` (its per-rank chunked loss), on the normalized features its models
    return; skipped where the installed open_clip predates ``chunk_size``."""
    from open_clip.loss import SigLipLoss

    if "chunk_size" not in inspect.signature(SigLipLoss).parameters:
        pytest.skip("the installed open_clip's SigLipLoss has no chunk_size")
    module = SigLipLoss(chunk_size=512)
    return lambda image, text, scale, bias: module(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale,
                                                   bias)


def bare_matmuls(q, k, w):
    """S = Q K^T, and with W (S's shape) the two gradient products W K and W^T Q."""
    q @ k.T
    if w is not None:
        w @ k
        w.T @ q


# family -> provider -> (the loss for feature dimension d, how it is called, module it needs)
PROVIDERS = {
    "clip": {
        "fusedloss": (lambda d: clip_loss, "fusedloss.clip_loss(image, text, logit_scale)", None),
        "fusedloss-fixed_shift": (lambda d: fixed_shift(clip_loss),
                                  "fusedloss.clip_loss(..., schedule='fixed_shift')", "triton"),
        "eager": (lambda d: eager_clip, "open_clip ClipLoss, single process", None),
        "torch.compile": (lambda d: compiled(eager_clip, "clip"), "torch.compile(eager, dynamic=False)", "torch"),
        "inf_cl": (inf_cl_clip, "inf_cl.flash.cal_flash_loss per direction, inputs normalized", "inf_cl"),
        "matmul": (None, "Q @ K.T; W @ K and W.T @ Q (forward + backward)", None),
    },
    "nt_xent": {
        "fusedloss": (lambda d: lambda f: nt_xent(f, TEMPERATURE), "fusedloss.nt_xent(features, 0.1)", None),
        "fusedloss-fixed_shift": (lambda d: fixed_shift(lambda f: nt_xent(f, TEMPERATURE)),
                                  "fusedloss.nt_xent(..., schedule='fixed_shift')", "triton"),
        "eager": (lambda d: eager_nt_xent, "SimCLR info_nce_loss", None),
        "torch.compile": (lambda d: compiled(eager_nt_xent, "nt_xent"), "torch.compile(eager, dynamic=False)",
                          "torch"),
        "matmul": (None, "F @ F.T; W @ F and W.T @ F (forward + backward)", None),
    },
    "siglip": {
        "fusedloss": (lambda d: siglip_loss, "fusedloss.siglip_loss(image, text, logit_scale, logit_bias)", None),
        "eager": (lambda d: eager_siglip, "open_clip SigLipLoss, single process", None),
        "open_clip-chunked": (open_clip_chunked_siglip, "open_clip.loss.SigLipLoss(chunk_size=512)", "open_clip"),
        "matmul": (None, "Q @ K.T; W @ K and W.T @ Q (forward + backward)", None),
    },
    "retrieval": {
        "fusedloss": (lambda d: fused_retrieval(), "fusedloss.info_nce(query, key, 0.05, negatives=, positive_ids=, "
                                                   "false_negative_margin=0.1): the torch bands", None),
        "fusedloss-kernels": (lambda d: fused_retrieval("kernels"), "fusedloss.info_nce(..., schedule='kernels')",
                              "triton"),
        "eager": (lambda d: eager_retrieval, "N x (N + S) logits, masks, soft-target cross-entropy", None),
        "matmul": (None, "Q @ [K; S].T; W @ [K; S] and W.T @ Q (forward + backward)", None),
    },
}
# (on CPU the kernels' schedules are not in play)
GPU_ONLY = ("torch.compile", "inf_cl", "fusedloss-fixed_shift", "fusedloss-kernels")
TARGET = ("clip", 65536, 768)  # torch.compile runs here only (compile time)


def sizes(quick):
    if quick:
        return {"clip": [(1024, 128)], "nt_xent": [(1024, 128)], "siglip": [(1024, 128)], "retrieval": [(512, 128)]}
    return {"clip": [(65536, 768), (16384, 512)], "nt_xent": [(32768, 128)], "siglip": [(65536, 768)],
            "retrieval": [(32768, 768)]}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS["clip"]))
@pytest.mark.parametrize("size", [0, 1])
def test_clip(run_bench, device, quick, provider, mode, size):
    shapes = sizes(quick)["clip"]
    if size >= len(shapes):
        pytest.skip("no such size in --quick mode")
    _throughput(run_bench, device, "clip", provider, mode, *shapes[size])


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS["nt_xent"]))
def test_nt_xent(run_bench, device, quick, provider, mode):
    _throughput(run_bench, device, "nt_xent", provider, mode, *sizes(quick)["nt_xent"][0])


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS["siglip"]))
def test_siglip(run_bench, device, quick, provider, mode):
    _throughput(run_bench, device, "siglip", provider, mode, *sizes(quick)["siglip"][0])


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS["retrieval"]))
def test_retrieval(run_bench, device, quick, provider, mode):
    _throughput(run_bench, device, "retrieval", provider, mode, *sizes(quick)["retrieval"][0])


def _throughput(run_bench, device, family, provider, mode, rows, dim):
    make, settings, module = PROVIDERS[family][provider]
    if device.type == "cpu" and provider in GPU_ONLY:
        pytest.skip(f"{provider} is benchmarked on GPU only")
    if module is not None:
        pytest.importorskip(module, reason=f"{provider} is not installed")
    if provider == "torch.compile" and (mode != "fwd_bwd" or (family, rows, dim) != TARGET):
        pytest.skip("torch.compile is timed on the target problem's forward+backward only (compile time)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    feats = [skip_if_oom(lambda: torch.randn(rows, dim, device=device, dtype=dtype, generator=gen))
             for _ in range({"nt_xent": 1, "retrieval": 3}.get(family, 2))]
    cols = 2 * rows if family == "retrieval" else rows  # (retrieval: N keys and S = N shared negatives)
    fused = 2 if mode == "fwd" else 6 if family == "nt_xent" else 8
    hw = {"fusedloss": fused, "fusedloss-fixed_shift": fused,
          "inf_cl": (4 if mode == "fwd" else 16)}.get(provider, 2 if mode == "fwd" else 6)
    common = dict(flops=(2 if mode == "fwd" else 6) * rows * cols * dim, hw_flops=hw * rows * cols * dim,
                  **row(family, provider, mode, f"{rows}x{dim}", f"d={dim}", dtype, settings))
    if provider == "matmul":
        w = None if mode == "fwd" else skip_if_oom(
            lambda: torch.randn(rows, cols, device=device, dtype=dtype, generator=gen))
        keys = torch.cat(feats[1:]) if family == "retrieval" else feats[-1]
        run_bench(bare_matmuls, [feats[0], keys, w], **common)
        return
    inputs, reference = feats, eager_nt_xent
    if family == "retrieval":
        reference = eager_retrieval
    elif family == "clip":
        inputs, reference = feats + [torch.tensor(LOGIT_SCALE, device=device)], eager_clip
    elif family == "siglip":
        inputs = feats + [torch.tensor(SIGLIP_SCALE, device=device), torch.tensor(SIGLIP_BIAS, device=device)]
        reference = eager_siglip
    run_bench(make(dim), inputs, differentiable=inputs if mode == "fwd_bwd" else [], reference=reference, **common)
