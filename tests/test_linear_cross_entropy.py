"""fusedloss.linear_cross_entropy against the materialized fp64 reference, in the three tiers.

The reference builds the logits with ``F.linear`` in fp64 and applies the extras by their formulas (soft cap, then
``F.cross_entropy`` with label smoothing, focal factor ``(1 - p_t) ** gamma``, ``z * lse ** 2``); ``shift`` is a
slice of the logits and the targets, as a causal LM's loss is usually written.

Interpreter and torch tiers run small problems whose sizes are not multiples of the tiles (37 rows of 16, 100
classes of 16, H = 24 in steps of 16), with tiles, vocabulary splits and backward chunks made small through
``configs.LCE_OVERRIDE`` (and ``TORCH_CHUNK_BYTES`` for the torch backend) so that every boundary is crossed:
3 row tiles, 7 vocabulary tiles in 3 splits, 4 backward chunks with a 4-wide last one. The CUDA tier runs the
shipped configs on larger odd sizes, in bf16 as well (the interpreter computes bf16 ``tl.dot`` wrongly).

The Triton tiers run every schedule (``FUSEDLOSS_LCE_SCHEDULE``): "pointer" and "tma" (tensor-descriptor loads, a
persistent grid of 2 programs on the CPU tiers so that every program walks several items, cuBLAS / torch dW, the
compensated dX sum, ignored token tiles skipped), and "chunked" (16-token chunks: 3 of them), whose GEMMs run in
torch, so it is tested in bf16 in the interpreter too (also with ``accumulate_in_input_dtype``, Liger-Kernel's
accumulation). torch's own contract (its OpInfo samples) is tested in ``test_linear_cross_entropy_opinfo.py``.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fusedloss import _alloc
from fusedloss.losses import linear_cross_entropy as host
from fusedloss.losses.linear_cross_entropy import linear_cross_entropy

from conftest import TOL, Case, assert_close, peak_allocated_bytes, randn, rel_err

try:
    from fusedloss.kernels import _common, configs
    from fusedloss.kernels import linear_cross_entropy as kernels
except ImportError:  # no triton: only the torch tier runs
    _common = configs = kernels = None

_TILE = dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16)
_GEMM = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
SMALL = dict(fwd=_TILE, dlogits=_TILE, gemm_dw=_GEMM, gemm_dx=_GEMM, n_splits=3, chunk=32, chunk_rows=16)
SCHEDULES = ("pointer", "tma", "chunked")


def use_schedule(monkeypatch, tier, schedule):
    """Run the Triton kernels under ``schedule`` (through the environment default); on the CPU tiers with the small
    configs (a persistent grid of 2 programs for tensor-descriptor loads)."""
    monkeypatch.setenv("FUSEDLOSS_LCE_SCHEDULE", schedule)
    small_configs(monkeypatch, tier, host.SCHEDULES[schedule])


def small_configs(monkeypatch, tier, schedule):
    """The small configs on the CPU tiers for a ``LinearCrossEntropySchedule``."""
    if tier.name != "cuda" and configs is not None:
        monkeypatch.setattr(configs, "LCE_OVERRIDE", dict(SMALL, programs=2) if schedule.tma_loads else SMALL)


def config(x, w, schedule):
    """The kernels' launch configuration for ``x``, ``w`` under the named ``schedule``."""
    s = host.SCHEDULES[schedule]
    return kernels.config_for(x, w, tma_loads=s.tma_loads, compact_workspace=s.compensated_dx,
                              skip_ignored=s.skip_ignored)


@pytest.fixture(params=SCHEDULES)
def small(tier, request, monkeypatch):
    """Small tiles / chunks on the CPU tiers (see the module docstring), under each schedule on the Triton tiers;
    the CUDA tier keeps the shipped configs."""
    if tier.name == "torch" and request.param != "pointer":
        pytest.skip("the torch backend has no kernel schedule")
    use_schedule(monkeypatch, tier, request.param)
    if tier.name != "cuda":
        monkeypatch.setattr(host, "TORCH_CHUNK_BYTES", 16 * 100 * 4)  # 16 rows of 100 fp32 logits: 3 chunks
    tier.schedule = request.param
    return tier


def sizes(tier):
    """(lead shape, H, V): odd sizes; larger on CUDA, where the tiles are 128 wide."""
    return ((37,), 24, 100) if tier.name != "cuda" else ((1000,), 200, 3001)


def reference(x, w, t, b=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
              softcap=None, focal_gamma=0.0, shift=False):
    """(loss, lse) from the materialized fp64 logits."""
    logits = F.linear(x.double(), w.double(), None if b is None else b.double())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lead = logits.shape[:-1]
    lse_all = torch.logsumexp(logits, dim=-1)
    y = t
    if shift:  # a copy here, which the fused loss must not need
        y = torch.cat([t[..., 1:], torch.full_like(t[..., :1], ignore_index)], dim=-1)
    flat, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    ce = F.cross_entropy(flat, y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = y != ignore_index
    log_p_t = flat.log_softmax(-1).gather(1, y.clamp(0, flat.shape[1] - 1)[:, None]).squeeze(1)
    rows = (1.0 - log_p_t.exp()) ** focal_gamma * ce + z_loss * lse_all.reshape(-1) ** 2
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        out = rows.reshape(lead)
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / valid.sum()
    return out, lse_all


def make_inputs(gen, tier, lead, hidden, vocab, dtype, *, bias=False, ignore_frac=0.0, scale=1.0):
    x = randn(gen, *lead, hidden, dtype=dtype, device=tier.device, requires_grad=True)
    w = randn(gen, vocab, hidden, dtype=dtype, device=tier.device, scale=scale / hidden ** 0.5 * 2,
              requires_grad=True)
    b = randn(gen, vocab, dtype=dtype, device=tier.device, requires_grad=True) if bias else None
    t = torch.randint(0, vocab, lead, generator=gen)
    if ignore_frac:
        t[torch.rand(lead, generator=gen) < ignore_frac] = -100
    return x, w, b, t.to(tier.device)


def check(tier, gen, x, w, b, t, dtype, factor=1.0, **kw):
    """Value and the gradients of input, weight, bias (random grad_output, and a random gradient into the returned
    lse when asked for) against the reference."""
    out = linear_cross_entropy(x, w, t, linear_bias=b, **kw)
    ref_kw = {k: v for k, v in kw.items()
              if k not in ("return_lse", "input_precision", "accumulate_in_input_dtype", "schedule")}
    leaves = [a for a in (x, w, b) if a is not None and a.requires_grad]
    ref_leaves = [a.detach().double().cpu().requires_grad_() for a in leaves]  # the reference runs on the CPU
    ref_args = {id(a): r for a, r in zip(leaves, ref_leaves)}
    xr, wr, br = (ref_args.get(id(a), None if a is None else a.detach().double().cpu()) for a in (x, w, b))
    expected, expected_lse = reference(xr, wr, t.cpu(), br, **ref_kw)
    if kw.get("return_lse"):
        out, lse = out
        assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(lse, expected_lse, dtype, "lse", factor)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, dtype, "loss", factor)
    go = randn(gen, max(out.numel(), 1), dtype=torch.float64).reshape(out.shape) + 1.5
    total = (out * go.to(dtype).to(tier.device)).sum()
    ref_total = (expected * go.to(dtype).double()).sum()
    if kw.get("return_lse"):
        glse = randn(gen, *lse.shape, dtype=torch.float64) * 0.1
        total = total + (lse * glse.to(lse.dtype).to(tier.device)).sum()
        ref_total = ref_total + (expected_lse * glse).sum()
    grads = torch.autograd.grad(total, leaves)
    ref_grads = torch.autograd.grad(ref_total, ref_leaves)
    for name, g, r, a in zip("xwb", grads, ref_grads, leaves):
        assert g.dtype == a.dtype and g.shape == a.shape
        assert_close(g, r, dtype, f"grad {name}", factor)
    return out


CASES = {
    "plain": dict(),
    "bias": dict(bias=True),
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=0.05),
    "softcap": dict(softcap=1.5),
    "focal": dict(focal_gamma=2.0),
    "focal_half": dict(focal_gamma=0.5),
    "ignore": dict(ignore_frac=0.3),
    "sum": dict(reduction="sum", ignore_frac=0.2),
    "none": dict(reduction="none", ignore_frac=0.2),
    "everything": dict(bias=True, ignore_frac=0.2, label_smoothing=0.2, z_loss=0.01, softcap=2.0,
                       focal_gamma=1.5, return_lse=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_values_and_grads(small, gen, case, dtype):
    """Each extra alone and all together, on sizes that are not multiples of any tile. (bf16 in the interpreter
    tier runs the torch path, as a user's call there does: the interpreter's bf16 tl.dot is wrong.)"""
    kw = dict(CASES[case])
    bias, ignore_frac = kw.pop("bias", False), kw.pop("ignore_frac", 0.0)
    lead, hidden, vocab = sizes(small)
    x, w, b, t = make_inputs(gen, small, lead, hidden, vocab, dtype, bias=bias, ignore_frac=ignore_frac)
    check(small, gen, x, w, b, t, dtype, **kw)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shift(small, gen, reduction):
    """shift=True: row t predicts target t + 1 of its own sequence; the last position is ignored (and 0 in 'none')."""
    hidden, vocab = sizes(small)[1:]
    lead = (3, 13) if small.name != "cuda" else (4, 257)
    x, w, b, t = make_inputs(gen, small, lead, hidden, vocab, torch.float32, bias=True, ignore_frac=0.1)
    out = check(small, gen, x, w, b, t, torch.float32, shift=True, reduction=reduction, label_smoothing=0.1,
                z_loss=0.01, return_lse=True)
    if reduction == "none":
        assert torch.all(out[..., -1] == 0)


def test_shift_matches_manual_slice(small, gen):
    """The causal-LM idiom it replaces: logits[..., :-1, :] against target[..., 1:]."""
    hidden, vocab = sizes(small)[1:]
    x, w, _, t = make_inputs(gen, small, (2, 11), hidden, vocab, torch.float32)
    loss = linear_cross_entropy(x, w, t, shift=True)
    manual = F.cross_entropy((x[:, :-1].double() @ w.double().t()).reshape(-1, vocab), t[:, 1:].reshape(-1))
    assert_close(loss, manual, torch.float32)


def test_strided_inputs(small, gen):
    """Non-contiguous input (every other hidden unit), transposed weight, and a target sliced out of a wider
    batch: all read through their strides."""
    lead, hidden, vocab = (5, 9), sizes(small)[1], sizes(small)[2]
    x = randn(gen, *lead, 2 * hidden, device=small.device)[..., ::2].requires_grad_()
    w = randn(gen, hidden, vocab, device=small.device, scale=2 / hidden ** 0.5).t().requires_grad_()
    t = torch.randint(0, vocab, (lead[0], 2 * lead[1]), generator=gen).to(small.device)[:, ::2]
    assert not x.is_contiguous() and not w.is_contiguous() and not t.is_contiguous()
    check(small, gen, x, w, None, t, torch.float32, shift=True, label_smoothing=0.1)


def test_fp64(small, gen):
    if small.name == "cuda":
        pytest.skip("fp64 dot products are slow on GPU; the CPU tiers cover the fp64 path")
    lead, hidden, vocab = sizes(small)
    x, w, b, t = make_inputs(gen, small, lead, hidden, vocab, torch.float64, bias=True, ignore_frac=0.2)
    check(small, gen, x, w, b, t, torch.float64, label_smoothing=0.1, z_loss=0.01, softcap=3.0, focal_gamma=0.5,
          return_lse=True)


def test_default_config(tier, gen):
    """The shipped tile configuration (one tile, one split, one chunk at this size on the CPU tiers)."""
    lead, hidden, vocab = sizes(tier)
    x, w, b, t = make_inputs(gen, tier, lead, hidden, vocab, torch.float32, bias=True, ignore_frac=0.1)
    check(tier, gen, x, w, b, t, torch.float32, label_smoothing=0.1, softcap=2.0)


@pytest.mark.parametrize("shape", [(1, 24, 100), (37, 24, 1), (37, 5, 100), (4, 24, 100_000)],
                         ids=["one_row", "one_class", "tiny_hidden", "vocab_1e5"])
def test_edge_sizes(small, gen, shape):
    """One row; one class (loss 0, gradients 0 but for the z-loss); H below one step; a vocabulary much larger
    than a chunk (the chunked dX accumulation over 3125 chunks on the CPU tiers)."""
    n, hidden, vocab = shape
    if vocab == 100_000 and small.name == "interpret":
        pytest.skip("3125 backward chunks are too slow in the interpreter; the torch and CUDA tiers run it")
    x, w, b, t = make_inputs(gen, small, (n,), hidden, vocab, torch.float32, bias=True)
    check(small, gen, x, w, b, t, torch.float32, z_loss=0.01)


def test_partial_requires_grad(small, gen):
    """Frozen input and bias: only weight's gradient, the others None."""
    lead, hidden, vocab = sizes(small)
    x, w, b, t = make_inputs(gen, small, lead, hidden, vocab, torch.float32, bias=True)
    x.requires_grad_(False)
    b.requires_grad_(False)
    check(small, gen, x, w, b, t, torch.float32, label_smoothing=0.1)
    assert x.grad is None and b.grad is None


def test_lse_only_backward(small, gen):
    """A gradient through the returned lse alone (the loss unused): d lse / d logits = softmax."""
    lead, hidden, vocab = sizes(small)
    x, w, b, t = make_inputs(gen, small, lead, hidden, vocab, torch.float32, bias=True)
    _, lse = linear_cross_entropy(x, w, t, linear_bias=b, return_lse=True)
    gx, gw, gb = torch.autograd.grad(lse.square().sum(), (x, w, b))
    leaves = [a.detach().double().requires_grad_() for a in (x, w, b)]
    _, ref_lse = reference(*leaves[:2], t, leaves[2])
    for g, r in zip((gx, gw, gb), torch.autograd.grad(ref_lse.square().sum(), leaves)):
        assert_close(g, r, torch.float32, "grad")


def test_tf32_opt_in(small, gen):
    """input_precision='tf32' runs (tensor cores on GPU: 10-bit mantissas, hence the looser tolerance)."""
    lead, hidden, vocab = sizes(small)
    x, w, b, t = make_inputs(gen, small, lead, hidden, vocab, torch.float32, bias=True)
    check(small, gen, x, w, b, t, torch.float32, factor=200.0, input_precision="tf32")


def test_all_ignored(small, gen):
    """Every row ignored: 'mean' is NaN (0 / 0) as in torch, 'sum' is 0, and every gradient is 0."""
    lead, hidden, vocab = sizes(small)
    x, w, b, t = make_inputs(gen, small, lead, hidden, vocab, torch.float32, bias=True)
    t = torch.full_like(t, -100)
    assert torch.isnan(F.cross_entropy(torch.zeros(1, 3), torch.tensor([-100])))
    mean = linear_cross_entropy(x, w, t, linear_bias=b)
    assert torch.isnan(mean)
    for g in torch.autograd.grad(mean, (x, w, b)):
        assert torch.all(g == 0)
    assert linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum") == 0


def test_empty(tier):
    x = torch.zeros(0, 8, device=tier.device, requires_grad=True)
    w = torch.ones(5, 8, device=tier.device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=tier.device)
    assert torch.isnan(linear_cross_entropy(x, w, t))
    loss = linear_cross_entropy(x, w, t, reduction="sum")
    assert loss == 0
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert gx.shape == x.shape and torch.all(gw == 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zero_width_hidden(tier, gen, reduction):
    """H = 0: the logits are the bias alone (zeros without one), as torch's F.linear gives; the rows are kept."""
    x = torch.zeros(2, 3, 0, dtype=torch.float64, device=tier.device, requires_grad=True)
    w = torch.zeros(7, 0, dtype=torch.float64, device=tier.device, requires_grad=True)
    b = randn(gen, 7, dtype=torch.float64, device=tier.device, requires_grad=True)
    t = torch.randint(0, 7, (2, 3), generator=gen).to(tier.device)
    loss = linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1)
    expected, _ = reference(x, w, t, b, reduction=reduction, label_smoothing=0.1)
    assert_close(loss, expected, torch.float64)
    go = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(tier.device)
    got, want = torch.autograd.grad(loss, (x, w, b), go), torch.autograd.grad(expected, (x, w, b), go)
    assert got[0].shape == x.shape and got[1].shape == w.shape
    assert_close(got[2], want[2], torch.float64, "bias gradient")


def workspace_bound(cfg, schedule, n, hidden, vocab, itemsize):
    """The workspace bound of docs/kernels/linear_cross_entropy.md (bytes beyond inputs, outputs
    and gradients, a bias that needs its gradient included), for config ``cfg`` of the named ``schedule``."""
    features = host.SCHEDULES[schedule]
    splits, _ = kernels.num_splits(cfg, vocab)
    chunk = min(cfg["chunk"], vocab)
    pitch = -(-chunk // 8) * 8
    n_tiles = -(-n // cfg["dlogits"]["BLOCK_N"])
    compensated = features.compensated_dx and itemsize == 2
    dx_sum = 0 if itemsize == 4 or vocab <= chunk else 2 * n * hidden if compensated else 4 * n * hidden
    return (16 * n * splits + 6 * 4 * n  # forward partials, loss, lse, coefficients
            + n * pitch * itemsize + dx_sum  # G chunk, the dX sum
            + 4 * n_tiles * chunk + 4 * vocab  # bias partials and sum
            + (8 * n_tiles if features.skip_ignored else 0))  # the live-tile list


@pytest.mark.parametrize("schedule,dtype", [("pointer", torch.float16), ("tma", torch.float16),
                                            ("tma", torch.bfloat16)], ids=str)
def test_no_logits_allocated(tier, gen, monkeypatch, schedule, dtype):
    """Triton backends: every buffer the loss allocates, summed (so at least its peak), stays within the
    workspace bound of fusedloss.kernels.linear_cross_entropy (no rows x vocab buffer), with a vocabulary 10
    chunks wide (5 on CUDA). bf16 in the interpreter: only the allocations are checked (its tl.dot values are
    wrong there, so the kernels are forced), which is where the compensated dX sum's bf16 low half shows."""
    if tier.name == "torch":
        pytest.skip("the torch backend's bound is measured by test_torch_backend_peak_memory")
    monkeypatch.setattr(_common, "interpreter_bf16_dot_exact", lambda: True)
    use_schedule(monkeypatch, tier, schedule)
    monkeypatch.setattr(configs, "LCE_OVERRIDE", dict(SMALL, chunk=64) if tier.name == "interpret" else None)
    sizes_seen = []
    empty = _alloc.empty

    def recording(shape, *, dtype, device):
        out = empty(shape, dtype=dtype, device=device)
        sizes_seen.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(_alloc, "empty", recording)
    n, hidden, vocab = (40, 24, 640) if tier.name == "interpret" else (4096, 256, 40_000)
    x, w, b, t = make_inputs(gen, tier, (n,), hidden, vocab, dtype, bias=True)
    linear_cross_entropy(x, w, t, linear_bias=b).backward()
    gradients = 2 * (n * hidden + vocab * hidden + vocab)
    assert sum(sizes_seen) <= workspace_bound(config(x, w, schedule), schedule, n, hidden, vocab, 2) + gradients
    assert max(sizes_seen) < n * vocab * 2, "a rows x vocab buffer was allocated"


def test_tma_workspace_under_5_percent(monkeypatch):
    """The "tma" schedule's workspace bound at N = 8192, H = 4096, V = 128256, bf16 (the configs an H100 / H200
    gets, 132 SMs assumed off-GPU) stays under 5% of the bf16 logits; the "pointer" schedule's does not (9.6%)."""
    if configs is None:
        pytest.skip("needs triton")
    n, hidden, vocab = 8192, 4096, 128256
    x = torch.empty(n, hidden, dtype=torch.bfloat16, device="meta")
    w = torch.empty(vocab, hidden, dtype=torch.bfloat16, device="meta")
    fractions = {}
    for schedule in SCHEDULES:
        fractions[schedule] = workspace_bound(config(x, w, schedule), schedule, n, hidden, vocab, 2) / (n * vocab * 2)
    print(f"\nworkspace / bf16 logits: {fractions}")
    assert fractions["tma"] < 0.05 < fractions["pointer"]


def test_schedule_is_checked(tier, monkeypatch):
    x, w = torch.randn(4, 8, device=tier.device), torch.randn(10, 8, device=tier.device)
    t = torch.tensor([1, 2, 3, 4], device=tier.device)
    with pytest.raises(ValueError, match="schedule must be one of 'chunked', 'pointer', 'tma'"):
        linear_cross_entropy(x, w, t, schedule="fastest")
    with pytest.raises(TypeError, match="schedule must be a str or a LinearCrossEntropySchedule"):
        linear_cross_entropy(x, w, t, schedule=1)
    monkeypatch.setenv("FUSEDLOSS_LCE_SCHEDULE", "fastest")
    with pytest.raises(ValueError, match="FUSEDLOSS_LCE_SCHEDULE must be one of"):
        linear_cross_entropy(x, w, t)


def test_forward_and_backward_run_the_schedule_of_the_call(tier, gen, monkeypatch):
    """The argument beats the environment; the schedule is resolved once, at the call, and the backward runs it
    even when the environment changes in between (every launch sees the call's features)."""
    if tier.name == "torch":
        pytest.skip("the torch backend has no kernel schedule")
    launches = []
    for name in ("linear_cross_entropy_forward", "linear_cross_entropy_dlogits"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: launches.append(
            (_name, k["tma_loads"], k["skip_ignored"])) or _real(*a, **k))
    small_configs(monkeypatch, tier, host.SCHEDULES["tma"])
    monkeypatch.setenv("FUSEDLOSS_LCE_SCHEDULE", "pointer")
    x, w, b, t = make_inputs(gen, tier, (37,), 24, 100, torch.float32, bias=True, ignore_frac=0.2)
    loss = linear_cross_entropy(x, w, t, linear_bias=b, schedule="tma")
    monkeypatch.setenv("FUSEDLOSS_LCE_SCHEDULE", "pointer")
    loss.backward()
    assert loss.grad_fn.opts.schedule == host.SCHEDULES["tma"]
    assert {name for name, _, _ in launches} == {"linear_cross_entropy_forward", "linear_cross_entropy_dlogits"}
    assert all(tma and skip for _, tma, skip in launches), launches


def _count_chunks(monkeypatch):
    """The (tokens) of every chunk the chunked schedule's forward sweep runs, recorded."""
    from fusedloss.kernels import cross_entropy as ce_kernels

    chunks = []
    real = ce_kernels.cross_entropy_forward
    monkeypatch.setattr(ce_kernels, "cross_entropy_forward",
                        lambda logits, *a, **k: chunks.append(logits.shape[0]) or real(logits, *a, **k))
    return chunks


def test_chunked_skips_ignored_tokens(tier, gen, monkeypatch):
    """The chunked schedule runs its GEMMs over the tokens with a target only (SFT prompts and padding cost no
    GEMM work); the ignored ones get a zero loss and a zero input gradient, as the definition gives them."""
    if tier.name == "torch":
        pytest.skip("the torch backend has no kernel schedule")
    small_configs(monkeypatch, tier, host.SCHEDULES["chunked"])
    chunks = _count_chunks(monkeypatch)
    x, w, b, t = make_inputs(gen, tier, (6, 7), 24, 100, torch.float64, bias=True)
    t[:, :4] = -100  # a prompt of 4 tokens per sequence: 18 of 42 tokens have a target
    for reduction in ("mean", "none"):
        chunks.clear()
        out = linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, schedule="chunked")
        assert sum(chunks) == 18, chunks
        expected, _ = reference(x, w, t, b, reduction=reduction)
        assert_close(out, expected, torch.float64)
        go = torch.rand(out.shape, generator=gen, dtype=torch.float64).to(tier.device)
        got, want = torch.autograd.grad(out, (x, w, b), go), torch.autograd.grad(expected, (x, w, b), go)
        for g, e, name in zip(got, want, ("input", "weight", "bias")):
            assert_close(g, e, torch.float64, f"{reduction}: {name} gradient")
        assert torch.all(got[0][:, :4] == 0)
    chunks.clear()
    all_ignored = linear_cross_entropy(x, w, torch.full_like(t, -100), reduction="sum", schedule="chunked")
    gx, gw = torch.autograd.grad(all_ignored, (x, w))
    assert chunks == [] and all_ignored == 0 and torch.all(gx == 0) and torch.all(gw == 0)


def test_chunked_honours_torch_options(tier, gen, monkeypatch):
    """``options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=k)`` runs chunks of k tokens (and selects the
    chunked schedule when none is named); ``LinearCrossEntropySchedule(workspace_bytes=...)`` sizes them from a
    budget."""
    if tier.name == "torch":
        pytest.skip("the torch backend has no kernel schedule")
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip("torch < 2.13 has no LinearCrossEntropyOptions")
    chunks = _count_chunks(monkeypatch)
    x, w, b, t = make_inputs(gen, tier, (37,), 24, 100, torch.float64, bias=True)
    expected, _ = reference(x, w, t, b)
    out = linear_cross_entropy(x, w, t, linear_bias=b, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=10))
    assert chunks == [10, 10, 10, 7]
    assert_close(out, expected, torch.float64)
    chunks.clear()
    budget = host.LinearCrossEntropySchedule(chunked=True, workspace_bytes=100 * 8 * 16)  # 16 tokens of fp64 logits
    assert_close(linear_cross_entropy(x, w, t, linear_bias=b, schedule=budget), expected, torch.float64)
    assert chunks == [16, 16, 5]
    with pytest.raises(ValueError, match="workspace_bytes"):
        host.LinearCrossEntropySchedule(chunked=True, workspace_bytes=0)


# the recompute schedule's features, each alone
FEATURES = [field.name for field in dataclasses.fields(host.LinearCrossEntropySchedule)
            if field.type is bool and field.name != "chunked"]


@pytest.mark.parametrize("feature", FEATURES)
def test_each_feature_alone(tier, gen, monkeypatch, feature):
    """Each feature of the "tma" schedule on its own (as bench/phases_linear_cross_entropy.py measures it), with
    every extra and ignored tokens: the reference's values and gradients. (compensated_dx changes bf16 sums only:
    its arithmetic is test_compensated_dx_sum's.)"""
    if tier.name == "torch":
        pytest.skip("the torch backend has no kernel schedule")
    schedule = host.LinearCrossEntropySchedule(**{feature: True})
    small_configs(monkeypatch, tier, schedule)
    kw = dict(CASES["everything"])
    kw.pop("return_lse")
    bias, ignore_frac = kw.pop("bias"), kw.pop("ignore_frac")
    lead, hidden, vocab = sizes(tier)
    x, w, b, t = make_inputs(gen, tier, lead, hidden, vocab, torch.float32, bias=bias, ignore_frac=ignore_frac)
    check(tier, gen, x, w, b, t, torch.float32, schedule=schedule, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Skipped token tiles ("tma"), the compensated dX sum, the precision rule


def _dead_tiles(gen, tier, n, tile_rows, t):
    """``t`` with whole token tiles ignored (the first, the third, the last partial one) and a few more rows;
    returns it and the mask of the rows in dead tiles."""
    t = t.clone()
    dead = torch.zeros(n, dtype=torch.bool)
    for tile in (0, 2, -(-n // tile_rows) - 1):
        dead[tile * tile_rows:(tile + 1) * tile_rows] = True
    t[dead.to(t.device)] = -100
    t[torch.rand(n, generator=gen).to(t.device) < 0.2] = -100
    return t, dead


@pytest.mark.parametrize("dw_on_cublas", [True, False], ids=["dw_cublas", "dw_triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_skipped_tiles(tier, gen, monkeypatch, reduction, dw_on_cublas):
    """"tma": token tiles whose every row is ignored are not computed: with the Triton dW they are not read either.
    Their hidden states are NaN there: were they multiplied into anything (the logits, G, dW = G^T X), NaN would
    reach the loss or a gradient. (Eager torch's dW would be NaN: 0 * NaN.) cuBLAS's dW runs over every row, the
    skipped ones as zero rows of G, so their hidden states stay finite in that case. Everything else matches the
    reference computed without those rows; their input gradient is exactly 0."""
    if tier.name == "torch":
        pytest.skip("skipping is a property of the Triton kernels")
    use_schedule(monkeypatch, tier, "tma")
    schedule = dataclasses.replace(host.SCHEDULES["tma"], cublas_dw=dw_on_cublas)
    n, hidden, vocab = (70, 24, 100) if tier.name != "cuda" else (1000, 200, 3001)
    dtype = torch.float32
    x, w, b, t = make_inputs(gen, tier, (n,), hidden, vocab, dtype, bias=True)
    tile_rows = config(x, w, "tma")["dlogits"]["BLOCK_N"]
    t, dead = _dead_tiles(gen, tier, n, tile_rows, t)
    if not dw_on_cublas:
        x = x.detach().clone()
        x[dead.to(x.device)] = float("nan")
        x.requires_grad_(True)
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    out = linear_cross_entropy(x, w, t, linear_bias=b, schedule=schedule, **kw)
    go = (randn(gen, max(out.numel(), 1), dtype=torch.float64).reshape(out.shape) + 1.5).to(tier.device)
    gx, gw, gb = torch.autograd.grad((out * go.to(out.dtype)).sum(), (x, w, b))
    assert torch.all(gx[dead.to(gx.device)] == 0)
    leaves = [a.detach().double().cpu().requires_grad_() for a in (x[~dead.to(x.device)], w, b)]
    expected, _ = reference(leaves[0], leaves[1], t[~dead.to(t.device)].cpu(), leaves[2], **kw)
    if reduction == "none":
        assert torch.all(out[dead.to(out.device)] == 0)
        out, go = out[~dead.to(out.device)], go[~dead.to(go.device)]
    assert_close(out, expected, dtype, "loss")
    refs = torch.autograd.grad((expected * go.cpu()).sum(), leaves)
    for name, g, r in zip("xwb", (gx[~dead.to(gx.device)], gw, gb), refs):
        assert_close(g, r, dtype, f"grad {name}")


def test_skipped_tiles_keep_the_lse(tier, gen, monkeypatch):
    """"tma" with ``return_lse``: the forward computes every row (the lse of ignored rows is returned), and a
    gradient into the lse reaches the rows of ignored tiles too (no tile is skipped in that backward)."""
    if tier.name == "torch":
        pytest.skip("skipping is a property of the Triton kernels")
    use_schedule(monkeypatch, tier, "tma")
    n, hidden, vocab = (70, 24, 100) if tier.name != "cuda" else (1000, 200, 3001)
    x, w, b, t = make_inputs(gen, tier, (n,), hidden, vocab, torch.float32, bias=True)
    t, _ = _dead_tiles(gen, tier, n, config(x, w, "tma")["dlogits"]["BLOCK_N"], t)
    check(tier, gen, x, w, b, t, torch.float32, return_lse=True, label_smoothing=0.1)


def _chunked_sum(gen, tier, operands, accumulator, chunks=32, m=64, n=48, k=16):
    """Sum ``chunks`` products A_i @ B_i (fp16 operands: exact in the interpreter's tl.dot) with
    ``kernels._gemm.matmul`` the way the backward sums dX, in ``accumulator``: "fp32" (a buffer), "bf16x2" (the
    compensated pair), "bf16" (plain bf16, Liger's dW); returns (the sum in fp64, the exact sum)."""
    from fusedloss.kernels._gemm import matmul

    a = randn(gen, chunks, m, k, dtype=operands, device=tier.device)
    b = randn(gen, chunks, k, n, dtype=operands, device=tier.device)
    exact = torch.einsum("imk,ikn->mn", a.double().cpu(), b.double().cpu())
    tile = [16, 16, 16, 8, 4, 2] if tier.name != "cuda" else [64, 64, 16, 8, 4, 3]
    out = torch.empty(m, n, dtype=torch.float32 if accumulator == "fp32" else torch.bfloat16, device=tier.device)
    lo = torch.empty(m, n, dtype=torch.bfloat16, device=tier.device) if accumulator == "bf16x2" else None
    for i in range(chunks):
        matmul(a[i], b[i], out, acc=None if i == 0 else out, lo_in=None if i == 0 else lo, lo_out=lo, tile=tile)
    total = out.double() + (0 if lo is None else lo.double())
    return total.cpu(), exact


def test_compensated_dx_sum(tier, gen, capsys):
    """The "tma" schedule's dX sum for bf16 inputs: a bf16 high half (the dX output itself) and a bf16 low half,
    added in fp32 in the GEMM epilogue and split back, over 32 chunks, against fp64. Each step loses at most
    2^-18 of the sum with round-to-nearest conversions (the GPU's), 2^-16 with the interpreter's, which truncate:
    its error stays far below the final rounding of dX to bf16 (2^-9 per element, paid by the exact mode anyway)
    and plain bf16 accumulation. Measured: interpreter 1.4e-4 (fp32 1.2e-7, plain bf16 5.2e-2, final rounding
    1.7e-3)."""
    if tier.name == "torch":
        pytest.skip("a Triton GEMM epilogue")
    operands = torch.float16 if tier.name != "cuda" else torch.bfloat16
    errors = {acc: rel_err(*_chunked_sum(gen, tier, operands, acc)) for acc in ("fp32", "bf16x2", "bf16")}
    _, exact = _chunked_sum(gen, tier, operands, "fp32")
    errors["final bf16 rounding"] = rel_err(exact.to(torch.bfloat16), exact)
    with capsys.disabled():
        print("\nrelative error of a 32-chunk sum vs fp64: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert errors["bf16x2"] <= 32 * 2.0 ** (-18 if tier.name == "cuda" else -16)
    assert errors["bf16x2"] < errors["final bf16 rounding"] / 10 < errors["bf16"] / 10


def test_precision_follows_torch(tier, gen, monkeypatch):
    """One precision rule (kernels._gemm.dot_precision): fp32 operands follow torch's fp32 matmul policy unless
    ``input_precision`` overrides it; 16-bit and fp64 operands have no choice. The launches resolve it there."""
    if tier.name == "torch":
        pytest.skip("the torch backend is F.linear itself")
    from fusedloss.kernels import _gemm

    saved = torch.get_float32_matmul_precision()
    try:
        assert _gemm.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert _gemm.dot_precision(torch.float32) == "tf32"
        assert _gemm.dot_precision(torch.float32, "ieee") == "ieee"
        assert _gemm.dot_precision(torch.bfloat16) == _gemm.dot_precision(torch.float64) == "ieee"
        resolved = []
        monkeypatch.setattr(kernels, "dot_precision", lambda *a: resolved.append(_gemm.dot_precision(*a)) or
                            resolved[-1])
        x, w, b, t = make_inputs(gen, tier, (8,), 16, 40, torch.float32, bias=True)
        linear_cross_entropy(x, w, t, linear_bias=b).backward()
        assert resolved and set(resolved) == {"tf32"}
        resolved.clear()
        linear_cross_entropy(x, w, t, linear_bias=b, input_precision="ieee").backward()
        assert set(resolved) == {"ieee"}
    finally:
        torch.set_float32_matmul_precision(saved)


# ---------------------------------------------------------------------------------------------------------------
# accumulate_in_input_dtype=True: Liger-Kernel's schedule

FAST_CASES = {
    "plain": dict(),
    "everything": dict(bias=True, ignore_frac=0.2, label_smoothing=0.2, z_loss=0.01, softcap=2.0, focal_gamma=1.5,
                       return_lse=True),
    "sum": dict(reduction="sum", ignore_frac=0.2, bias=True),
    "none": dict(reduction="none", ignore_frac=0.2),  # the exact path: per-row grad_output is known in backward
}
# Relative error against fp64 the fast mode is held to, beyond the dtype's tolerance: the loss of logits rounded to
# the input dtype and dW summed over token chunks in it. Measured in the interpreter (5 chunks of 16 tokens, the
# plain, everything and sum cases): bf16 <= 7.4e-3 (dW and db the worst), fp16 <= 5.8e-4, fp32 <= 2.1e-7.
FAST_TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 5e-5}


@pytest.mark.parametrize("case", FAST_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_accumulate_in_input_dtype(small, gen, case, dtype):
    """Values and every gradient against fp64 within FAST_TOL, several token chunks crossed. On the torch tier
    the flag changes nothing (it computes in fp32)."""
    if dtype == torch.bfloat16 and small.name == "torch":
        pytest.skip("the torch tier's bf16 is the exact path, tested above")
    kw = dict(FAST_CASES[case])
    bias, ignore_frac = kw.pop("bias", False), kw.pop("ignore_frac", 0.0)
    lead, hidden, vocab = ((5, 15), 24, 100) if small.name != "cuda" else ((4, 1000), 256, 32000)
    x, w, b, t = make_inputs(gen, small, lead, hidden, vocab, dtype, bias=bias, ignore_frac=ignore_frac)
    check(small, gen, x, w, b, t, dtype, factor=FAST_TOL[dtype] / TOL[dtype], accumulate_in_input_dtype=True,
          shift=True, **kw)


def test_accumulate_in_input_dtype_accuracy(tier, gen, capsys, monkeypatch):
    """The trade, measured: relative error against fp64 of the loss, dX and dW for bf16 inputs, exact mode and
    accumulate_in_input_dtype=True on the same inputs, printed side by side (bench/NOTES.md quotes them). On the
    CPU tiers the exact mode's bf16 runs on the torch backend (fp32 math, as the kernels'), since the
    interpreter's bf16 tl.dot is wrong; the fast mode's GEMMs are torch's, so its kernels are forced there."""
    if tier.name == "torch":
        pytest.skip("compares the Triton fast path")
    monkeypatch.setattr(_common, "interpreter_bf16_dot_exact", lambda: True)
    n, hidden, vocab = (256, 64, 2000) if tier.name != "cuda" else (4096, 512, 32000)
    x, w, _, t = make_inputs(gen, tier, (n,), hidden, vocab, torch.bfloat16)
    leaves = [a.detach().double().cpu().requires_grad_() for a in (x, w)]
    expected, _ = reference(*leaves, t.cpu())
    ref = (expected.detach(), *torch.autograd.grad(expected, leaves))
    errors = {}
    for mode, fast in (("exact", False), ("accumulate_in_input_dtype", True)):
        monkeypatch.setenv("FUSEDLOSS_BACKEND", "torch" if tier.name != "cuda" and not fast else "auto")
        loss = linear_cross_entropy(x, w, t, accumulate_in_input_dtype=fast)
        got = (loss, *torch.autograd.grad(loss, (x, w)))
        errors[mode] = [rel_err(g, r) for g, r in zip(got, ref)]
    with capsys.disabled():
        print(f"\nbf16 {n}x{hidden}x{vocab}, relative error vs fp64 (loss, dX, dW): "
              + "; ".join(f"{k} " + ", ".join(f"{e:.2e}" for e in v) for k, v in errors.items()))
    assert max(errors["accumulate_in_input_dtype"]) <= FAST_TOL[torch.bfloat16]
    assert max(errors["exact"]) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("schedule,dtype,fast", [("pointer", torch.float32, False), ("pointer", torch.float16, False),
                                                 ("tma", torch.bfloat16, False), ("tma", torch.float16, False),
                                                 ("pointer", torch.bfloat16, True)], ids=str)
def test_cuda_graph_capture(tier, gen, monkeypatch, schedule, dtype, fast):
    """No host sync: forward + backward capture in a CUDA graph and replay to the eager result (under "tma" with
    ignored token tiles, so the live-tile list and the tensor descriptors' scratch allocation are captured too)."""
    if tier.name != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    use_schedule(monkeypatch, tier, schedule)
    x, w, b, t = make_inputs(gen, tier, (1000,), 256, 5000, dtype, bias=True, ignore_frac=0.1)
    t[:256] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0, focal_gamma=1.0, shift=False,
              accumulate_in_input_dtype=fast)

    def step(leaves):
        loss = linear_cross_entropy(*leaves[:2], t, leaves[2], **kw)
        return (loss.detach(), *torch.autograd.grad(loss, leaves))

    def fresh():  # leaves used on one stream only: autograd ties a leaf's gradient node to its first stream
        return [v.detach().clone().requires_grad_(True) for v in (x, w, b)]

    eager = step(fresh())
    static = fresh()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(static)  # warm up: compile, allocate
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured = step(static)
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(captured, eager):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-6)


def test_public_api(small, gen):
    """``fusedloss.linear_cross_entropy`` and ``fusedloss.nn.LinearCrossEntropyLoss`` are this function."""
    import fusedloss

    lead, hidden, vocab = sizes(small)
    x, w, b, t = make_inputs(gen, small, lead, hidden, vocab, torch.float32, bias=True, ignore_frac=0.1)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, focal_gamma=1.0, reduction="sum")
    expected = linear_cross_entropy(x, w, t, linear_bias=b, **kw)
    assert torch.equal(fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, **kw), expected)
    module = fusedloss.nn.LinearCrossEntropyLoss(**kw)
    assert torch.equal(module(x, w, t, linear_bias=b), expected)
    # torch's constructor: the module owns the classifier
    owner = fusedloss.nn.LinearCrossEntropyLoss(hidden, vocab, bias=True, dtype=torch.float32, **kw)
    with torch.no_grad():
        owner.linear.weight.copy_(w)
        owner.linear.bias.copy_(b)
    assert torch.equal(owner(x, t), expected)


def test_deprecated_positional_bias(tier, gen):
    """fusedloss <= 0.2's positional ``bias`` (and ``bias=``) still works, with a DeprecationWarning."""
    x, w, b, t = make_inputs(gen, tier, (3, 4), 8, 20, torch.float64, bias=True)
    expected = linear_cross_entropy(x, w, t, linear_bias=b)
    with pytest.warns(DeprecationWarning, match="linear_bias"):
        assert torch.equal(linear_cross_entropy(x, w, t, b), expected)
    with pytest.warns(DeprecationWarning, match="linear_bias"):
        assert torch.equal(linear_cross_entropy(x, w, t, bias=b), expected)
    with pytest.raises(TypeError, match="both"), pytest.warns(DeprecationWarning):
        linear_cross_entropy(x, w, t, b, linear_bias=b)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument, before any launch.


def _bad_cases():
    x = torch.randn(6, 8)
    w = torch.randn(10, 8)
    t = torch.randint(0, 10, (6,))
    yield "input", TypeError, (torch.ones(6, 8, dtype=torch.long), w, t), {}
    yield "input", ValueError, (torch.tensor(1.0), w, t), {}
    yield "weight", TypeError, (x, w.double(), t), {}
    yield "weight", ValueError, (x, torch.randn(10, 7), t), {}
    yield "weight", ValueError, (x, torch.randn(10), t), {}
    yield "weight", ValueError, (x, torch.randn(0, 8), t), {}
    yield "target", ValueError, (x, w, t.float()), {}  # probabilities of the wrong shape
    yield "target", TypeError, (x, w, t.to(torch.int16)), {}
    yield "target", ValueError, (x, w, t[:5]), {}
    yield "linear_bias", ValueError, (x, w, t), dict(linear_bias=torch.randn(9))
    yield "linear_bias", TypeError, (x, w, t), dict(linear_bias=torch.randn(10, dtype=torch.float64))
    yield "ignore_index", TypeError, (x, w, t), dict(ignore_index=1.5)
    yield "reduction", ValueError, (x, w, t), dict(reduction="avg")
    yield "label_smoothing", ValueError, (x, w, t), dict(label_smoothing=1.5)
    yield "z_loss", ValueError, (x, w, t), dict(z_loss=-1.0)
    yield "softcap", ValueError, (x, w, t), dict(softcap=0.0)
    yield "focal_gamma", ValueError, (x, w, t), dict(focal_gamma=-0.5)
    yield "focal_gamma", TypeError, (x, w, t), dict(focal_gamma=torch.ones(2))
    yield "shift", TypeError, (x, w, t), dict(shift=1)
    yield "shift", ValueError, (torch.randn(8), w, torch.tensor(1)), dict(shift=True)
    yield "return_lse", TypeError, (x, w, t), dict(return_lse="yes")
    yield "input_precision", ValueError, (x, w, t), dict(input_precision="bf16x3")
    yield "input_precision", TypeError, (x, w, t), dict(input_precision=32)
    yield "accumulate_in_input_dtype", TypeError, (x, w, t), dict(accumulate_in_input_dtype="bf16")
    yield "accumulate_in_input_dtype", ValueError, (x, w, t), dict(accumulate_in_input_dtype=True,
                                                                   process_group=object())


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: f"{c[0]}-{c[1].__name__}")
def test_bad_input(tier, case, monkeypatch):
    name, exc, args, kw = case
    if tier.name == "cuda":
        args = tuple(a.cuda() for a in args)
    launched = []
    if configs is not None:  # any launch would ask for a config first
        monkeypatch.setattr(configs, "linear_cross_entropy_config", lambda *a: launched.append(a))
    with pytest.raises(exc, match=name):
        linear_cross_entropy(*args, **kw)
    assert not launched


def test_out_of_range_class(tier):
    if tier.name == "cuda":
        x, w = torch.randn(4, 8, device="cuda"), torch.randn(10, 8, device="cuda")
        loss = linear_cross_entropy(x, w, torch.tensor([1, 2, 10, 3], device="cuda"), reduction="none")
        assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
        return
    with pytest.raises(IndexError):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 10, 3]))
    # with shift, position 0's target is never a label, so it is not checked
    linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([99, 2, 1, 3]), shift=True)


# ---------------------------------------------------------------------------------------------------------------
# The torch backend's memory bound, measured.


def test_torch_backend_peak_memory(tier):
    """8192 tokens x 256 hidden x 50000 classes, fp32, forward + backward on the torch backend: the peak of live
    memory beyond the gradients stays under 5% of the logits that eager F.cross_entropy(F.linear(...)) must hold
    (1.5 GiB; eager's whole peak is ~3x that). Measured: ~113 MiB, of which 57 MiB are the gradients. Eager is
    measured too, at 1024 tokens (its 8192-token run would add 30 s): it must show at least its logits, which
    checks that the measurement sees the allocations."""
    if tier.name != "torch":
        pytest.skip("measures the torch backend (CPU)")
    hidden, vocab = 256, 50_000
    gen = torch.Generator().manual_seed(0)

    def inputs(n):
        x = torch.randn(n, hidden, generator=gen, requires_grad=True)
        w = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5).requires_grad_()
        return x, w, torch.randint(0, vocab, (n,), generator=gen)

    x, w, t = inputs(1024)
    eager = peak_allocated_bytes(lambda: F.cross_entropy(F.linear(x, w), t, label_smoothing=0.1).backward())
    assert eager >= 1024 * vocab * 4, "the measurement missed eager's logits"
    n = 8192
    x, w, t = inputs(n)
    fused = peak_allocated_bytes(
        lambda: linear_cross_entropy(x, w, t, label_smoothing=0.1, z_loss=1e-4, focal_gamma=1.0).backward())
    logits = n * vocab * 4
    grads = (n + vocab) * hidden * 4
    print(f"\npeak allocated: fused {fused / 2**20:.0f} MiB (gradients {grads / 2**20:.0f} MiB), eager logits "
          f"{logits / 2**20:.0f} MiB; eager at 1024 tokens {eager / 2**20:.0f} MiB")
    assert fused - grads <= 0.05 * logits


# ---------------------------------------------------------------------------------------------------------------
# The autograd / compile / layout contract (tests/test_contract.py)


def _lce_case(lead, hidden, vocab, *, bias=True, **kw):
    def make(gen, dtype):
        x = randn(gen, *lead, hidden, dtype=dtype)
        w = randn(gen, vocab, hidden, dtype=dtype, scale=hidden ** -0.5)
        t = torch.randint(0, vocab, lead, generator=gen)
        t[torch.rand(lead, generator=gen) < 0.2] = -100
        args = [x, w, t] + ([randn(gen, vocab, dtype=dtype)] if bias else [])
        return args, kw

    return make


def _lce(input, weight, target, bias=None, **kw):
    """``linear_cross_entropy`` with the bias positional, as the contract cases pass their tensors."""
    return linear_cross_entropy(input, weight, target, linear_bias=bias, **kw)


def _loss_plus_lse(*args, **kw):
    """Both differentiable outputs in one tensor: the loss per row plus a tenth of the log-sum-exp."""
    loss, lse = _lce(*args, return_lse=True, **kw)
    return loss + 0.1 * lse


def _expand_bias(args, kw):
    return args[:3] + [args[3][:1].expand(args[3].shape[0])], kw


CONTRACT_CASES = [
    Case("linear_cross_entropy-shift-every_extra", _lce,
         _lce_case((2, 9), 16, 50, shift=True, label_smoothing=0.1, z_loss=1e-3, softcap=4.0, focal_gamma=1.0),
         grad_args=(0, 1, 3), compile=True, stride0=_expand_bias),
    Case("linear_cross_entropy-none-lse", _loss_plus_lse, _lce_case((11,), 8, 30, reduction="none"),
         grad_args=(0, 1, 3)),
    Case("linear_cross_entropy-sum-no_bias", _lce,
         _lce_case((7,), 12, 40, bias=False, reduction="sum", label_smoothing=0.2), grad_args=(0, 1)),
    Case("linear_cross_entropy-accumulate_in_input_dtype", _lce,
         _lce_case((2, 9), 16, 50, shift=True, z_loss=1e-3, softcap=4.0, accumulate_in_input_dtype=True),
         grad_args=(0, 1, 3), compile=True),
]


def test_fp16_dw_summed_in_fp16_takes_the_scale(tier):
    """``accumulate_in_input_dtype=True`` in fp16 sums dW in fp16: the mean's 1 / N goes into G before the sum, or
    4096 tokens of |G x| ~ 20 would overflow fp16 (it gave -inf)."""
    if tier.name == "torch":
        pytest.skip("the torch backend computes in fp32")
    x = torch.full((4096, 4), 20.0, dtype=torch.float16, device=tier.device, requires_grad=True)
    w = torch.zeros(8, 4, dtype=torch.float16, device=tier.device, requires_grad=True)
    t = torch.zeros(4096, dtype=torch.long, device=tier.device)
    (gw,) = torch.autograd.grad(linear_cross_entropy(x, w, t, accumulate_in_input_dtype=True), (w,))
    (want,) = torch.autograd.grad(F.cross_entropy(F.linear(x.double(), w.double()), t), (w,))
    assert torch.isfinite(gw).all()
    assert_close(gw, want, torch.float16)
