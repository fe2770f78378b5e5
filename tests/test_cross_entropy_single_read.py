"""The single-read cross-entropy kernel (``kernels.cross_entropy_single_read``), through its launcher, against the
fp64 reference of ``test_cross_entropy`` (torch's ``F.cross_entropy`` with the extras from their definitions).

Interpreter tier: the two-phase form only (the ticket form spins until a row's other programs arrive, and the
interpreter runs programs one at a time), with chunks made small (128-256 classes on 4 warps) so that rows of a
few hundred classes cross several chunks: V not a multiple of the chunk, V below it (one chunk), N = 1, a chunk
of -inf logits, strided and expanded inputs, in-place gradients. Every output is poisoned with NaN before the
launch (``FUSEDLOSS_POISON=1``), so an element no program wrote fails. The CUDA tier runs the same tests in both
forms, then what only a GPU can check: the ticket form bit-identical to the two-phase one, over thousands of
launches with odd row counts, 100003 rows, LLM shapes with the shipped configs, and inside a CUDA graph.
"""

import pytest
import torch
from test_cross_entropy import reference

import fusedloss
from fusedloss import _alloc

from conftest import _tier_skip_reason, assert_close, randn

pytest.importorskip("triton")
from fusedloss.kernels import cross_entropy_single_read as sr  # noqa: E402
from fusedloss.kernels.cross_entropy_rows import ROW_STATE  # noqa: E402

SMALL = [256, 4]  # 1000 classes: 4 chunks of 256; 200 classes: one chunk
SMALLER = [128, 4]  # 517 classes: 5 chunks of 112 (the equal widths _chunking picks)


@pytest.fixture(params=["interpret", "cuda"])
def device(request):
    reason = _tier_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return torch.device("cuda" if request.param == "cuda" else "cpu")


def modes(device):
    """The schedules a device can run: the ticket form spins, which the interpreter cannot."""
    return ["ticket", "twophase"] if device.type == "cuda" else ["twophase"]


def launch(x, target, *, config, mode, scale, weight=None, focal_alpha=None, grad=None, ignore_index=-100,
           label_smoothing=0.0, focal_gamma=0.0, z_loss=0.0, softcap=None):
    """(loss, row_state, grad) from the launcher, into NaN-poisoned outputs."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss = _alloc.empty(x.shape[0], dtype=acc, device=x.device)
    state = _alloc.empty((x.shape[0], ROW_STATE), dtype=acc, device=x.device)
    grad = _alloc.empty_like(x) if grad is None else grad
    alpha = focal_alpha if isinstance(focal_alpha, torch.Tensor) else None
    sr.cross_entropy_single_read(
        x, target, weight, alpha, torch.tensor(scale, dtype=acc, device=x.device), loss, state, grad,
        ignore_index=ignore_index, label_smoothing=label_smoothing, focal_gamma=focal_gamma,
        focal_alpha=1.0 if focal_alpha is None or alpha is not None else focal_alpha, z_loss=z_loss,
        softcap=softcap, mode=mode, config=config)
    return loss, state, grad


def expected(x, target, scale, **opts):
    """fp64 per-row loss, lse, and the gradient of scale * sum(loss) (the fused path's gradient)."""
    x64 = x.detach().cpu().double().requires_grad_(True)
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    rows = reference(x64, target.cpu(), reduction="none", **kw)
    (grad,) = torch.autograd.grad(rows.sum() * scale, x64)
    cap = opts.get("softcap")
    capped = x64.detach() if cap is None else cap * torch.tanh(x64.detach() / cap)
    return rows.detach(), torch.logsumexp(capped, dim=1), grad


def check(device, x, target, dtype, config, gen, **opts):
    """Every schedule of ``device`` against the reference: loss, lse = m + log s, gradient."""
    scale = float(torch.rand((), generator=gen, dtype=torch.float64)) + 0.5  # a grad_output / denominator
    rows, lse, grad = expected(x, target.long(), scale, **opts)
    x, target = x.to(device), target.to(device)
    opts = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
    outs = []
    for mode in modes(device):
        loss, state, g = launch(x, target, config=config, mode=mode, scale=scale, **opts)
        assert_close(loss, rows, dtype, f"{mode}: loss")
        assert_close(state[:, 0] + state[:, 1], lse, dtype, f"{mode}: lse")
        assert g.dtype == x.dtype
        assert_close(g, grad, dtype, f"{mode}: d logits")
        outs.append((loss, state, g))
    return outs


def make(gen, n, v, dtype=torch.float32, ignore=0.0, scale=3.0):
    x = randn(gen, n, v, dtype=dtype, scale=scale)
    target = torch.randint(0, v, (n,), generator=gen)
    if ignore:
        target[torch.rand(n, generator=gen) < ignore] = -100
    return x, target


def per_class(gen, v):
    return torch.rand(v, generator=gen, dtype=torch.float64).float() + 0.1


OPTIONS = {
    "plain": {},
    "weight+ignore": {"weight": True, "ignore": 0.3},
    "ls+focal+z": {"label_smoothing": 0.1, "focal_gamma": 2.0, "z_loss": 1e-3},
    "z+softcap": {"z_loss": 1e-2, "softcap": 4.0},
    "everything": {"label_smoothing": 0.15, "weight": True, "ignore": 0.2, "focal_gamma": 0.5,
                   "focal_alpha": True, "z_loss": 1e-3, "softcap": 5.0},
}


def options(gen, v, name):
    spec = OPTIONS[name]
    kw = {k: val for k, val in spec.items() if k not in ("weight", "ignore", "focal_alpha")}
    if spec.get("weight"):
        kw["weight"] = per_class(gen, v)
    if spec.get("focal_alpha"):
        kw["focal_alpha"] = per_class(gen, v)
    return kw, spec.get("ignore", 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Both tiers


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape,config", [
    ((5, 1000), SMALL),  # 4 chunks, V not a multiple of CHUNK
    ((3, 200), SMALL),  # one chunk: V below CHUNK
    ((1, 517), SMALLER),  # N = 1, 5 chunks of 112 classes
])
def test_against_reference(device, gen, shape, config, option):
    kw, ignore = options(gen, shape[1], option)
    x, target = make(gen, *shape, ignore=ignore)
    check(device, x, target, torch.float32, config, gen, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(device, gen, dtype):
    kw, ignore = options(gen, 700, "everything")
    x, target = make(gen, 4, 700, dtype=dtype, ignore=ignore)
    check(device, x, target, dtype, SMALL, gen, **kw)


def test_out_of_range_targets_give_nan_rows(device, gen):
    """A class index outside [0, C) (C itself, negative, beyond int32: compared in int64, so 2**32 + 5 is not
    class 5) gives that row a NaN loss and gradient and reads nothing out of bounds; the other rows, the ignored
    one included, are unaffected."""
    x, target = make(gen, 6, 520)
    target[1], target[2], target[4] = 520, -7, 2**32 + 5
    target[3] = -100
    good = torch.tensor([True, False, False, True, False, True])
    scale = 0.7
    rows, _, grad = expected(x[good], target[good], scale, label_smoothing=0.1, z_loss=1e-3)
    for mode in modes(device):
        loss, _, g = launch(x.to(device), target.to(device), config=SMALL, mode=mode, scale=scale,
                            label_smoothing=0.1, z_loss=1e-3)
        assert torch.isnan(loss[~good.to(device)]).all() and torch.isnan(g[~good.to(device)]).all()
        assert_close(loss[good.to(device)], rows, torch.float32, "loss")
        assert_close(g[good.to(device)], grad, torch.float32, "d logits")
        assert loss[3].item() == 0.0 and (g[3] == 0).all()


def test_uint8_targets(device, gen):
    x, target = make(gen, 3, 250)
    check(device, x, target.to(torch.uint8), torch.float32, SMALLER, gen, label_smoothing=0.1)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_at_saturation(device, gen, gamma):
    """Rows 2-3 saturated (target logit 25 above the rest: p_t rounds to 1 in fp32): the gradient stays finite
    for gamma < 1 (the bounded-ratio form) and matches the fp64 reference."""
    x, target = make(gen, 4, 600)
    x[2:] *= 0.1
    x[2:].scatter_(1, target[2:, None], 25.0)
    for _, _, g in check(device, x, target, torch.float32, SMALL, gen, focal_gamma=gamma):
        assert torch.isfinite(g).all()


def test_logits_near_1e8(device, gen):
    """fp32 logits near 1e8 (spacing 8): lse - x_y would round to a multiple of 8; carried as (m, log s), the loss
    and the probabilities keep their digits."""
    x = 1e8 + 8.0 * torch.randint(-2, 3, (4, 700), generator=gen).float()
    target = torch.randint(0, 700, (4,), generator=gen)
    check(device, x, target, torch.float32, SMALL, gen, label_smoothing=0.1, focal_gamma=2.0)


def test_chunk_of_minus_inf_logits(device, gen):
    """Vocabulary padding masked with -inf, a whole chunk of it: those classes get p = 0 and a zero gradient,
    not NaN (exp(-inf - (-inf)))."""
    x, target = make(gen, 3, 1000)
    x[:, 600:] = float("-inf")
    target = target % 600
    for _, _, g in check(device, x, target, torch.float32, SMALL, gen, focal_gamma=2.0, z_loss=1e-3):
        assert (g[:, 600:] == 0).all()


def test_strided_inputs(device, gen):
    """Every tensor through its strides: logits and gradient as column slices of wider buffers (row strides 1021
    and 1037), targets, weights and alpha as every other or third element of longer vectors."""
    n, v = 5, 1000
    buf = randn(gen, n, v + 21, scale=3.0)
    x = buf[:, 7:7 + v]
    target = torch.randint(0, v, (2 * n,), generator=gen)[::2]
    weight, alpha = per_class(gen, 3 * v)[::3], per_class(gen, 2 * v)[::2]
    opts = dict(weight=weight, focal_alpha=alpha, label_smoothing=0.1, focal_gamma=1.5, softcap=6.0)
    scale = 0.9
    rows, _, grad = expected(x, target, scale, **opts)
    dev = {k: (val.to(device) if isinstance(val, torch.Tensor) else val) for k, val in opts.items()}
    for mode in modes(device):
        grad_buf = _alloc.empty((n, v + 37), dtype=torch.float32, device=device)
        loss, _, g = launch(x.to(device), target.to(device), config=SMALL, mode=mode, scale=scale,
                            grad=grad_buf[:, 30:30 + v], **dev)
        assert_close(loss, rows, torch.float32, "loss")
        assert_close(g, grad, torch.float32, "d logits")


def test_expanded_rows(device, gen):
    """Row stride 0 (one row of logits expanded over several targets)."""
    row = randn(gen, 1, 517, scale=3.0)
    x = row.expand(4, 517)
    target = torch.randint(0, 517, (4,), generator=gen)
    check(device, x, target, torch.float32, SMALLER, gen, label_smoothing=0.1, z_loss=1e-3)


def test_inplace_gradient(device, gen):
    """grad aliasing logits (inplace_backward): each program reads its chunk before writing it, and the target
    logit travels in the records, so the result is the out-of-place one, bit for bit."""
    kw, ignore = options(gen, 600, "everything")
    x, target = make(gen, 4, 600, ignore=ignore)  # 3 chunks of 208
    x, target = x.to(device), target.to(device)
    kw = {k: (val.to(device) if isinstance(val, torch.Tensor) else val) for k, val in kw.items()}
    for mode in modes(device):
        loss, state, grad = launch(x, target, config=SMALL, mode=mode, scale=0.3, **kw)
        logits = x.clone()
        loss2, state2, grad2 = launch(logits, target, config=SMALL, mode=mode, scale=0.3, grad=logits, **kw)
        assert grad2 is logits
        assert torch.equal(loss, loss2) and torch.equal(state, state2) and torch.equal(grad, grad2)


def test_deterministic(device, gen):
    kw, ignore = options(gen, 600, "everything")
    x, target = make(gen, 4, 600, ignore=ignore)  # 3 chunks of 208
    x, target = x.to(device), target.to(device)
    kw = {k: (val.to(device) if isinstance(val, torch.Tensor) else val) for k, val in kw.items()}
    for mode in modes(device):
        first = launch(x, target, config=SMALL, mode=mode, scale=0.3, **kw)
        second = launch(x, target, config=SMALL, mode=mode, scale=0.3, **kw)
        assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_no_rows(device):
    x = torch.zeros(0, 4096, device=device)
    loss, state, grad = launch(x, torch.zeros(0, dtype=torch.long, device=device), config=None, mode=None,
                               scale=1.0)
    assert loss.shape == (0,) and state.shape == (0, ROW_STATE) and grad.shape == (0, 4096)


def test_rejects_what_it_does_not_cover(device):
    x = torch.zeros(4, 300, device=device)
    target = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="class stride 1"):
        launch(x.t(), target, config=SMALL, mode=None, scale=1.0)
    with pytest.raises(ValueError, match="class-index targets"):
        launch(x, torch.zeros(4, 300, device=device), config=SMALL, mode=None, scale=1.0)
    with pytest.raises(ValueError, match="grad must have"):
        launch(x, target, config=SMALL, mode=None, scale=1.0, grad=torch.zeros(4, 301, device=device))
    with pytest.raises(ValueError, match="mode must be one of"):
        launch(x, target, config=SMALL, mode="persistent", scale=1.0)
    if device.type == "cpu":
        with pytest.raises(ValueError, match="interpreter"):
            launch(x, target, config=SMALL, mode="ticket", scale=1.0)
    else:
        wide = torch.zeros(2, 16 * 1024, device=device)  # 1024 chunks of 16: more than the SMs
        with pytest.raises(ValueError, match="at most one chunk per SM"):
            launch(wide, target[:2], config=[16, 1], mode="ticket", scale=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Host-side policy: no kernel


def test_schedule_argument_and_environment_default(monkeypatch):
    """``schedule=`` picks the forward's launcher; None takes FUSEDLOSS_CE_SCHEDULE, unset "two_pass"; the choice
    is made once, in the options the backward gets."""
    if fusedloss.backend("cpu") != "triton-interpret":
        pytest.skip("launches the kernels in the interpreter (the CPU session)")
    launched = []
    for name in ("cross_entropy_single_read",):
        real = getattr(sr, name)
        monkeypatch.setattr(sr, name, lambda *a, _real=real, **k: launched.append("single_read") or _real(*a, **k))
    x = torch.randn(3, 4096).requires_grad_()
    y = torch.randint(0, 4096, (3,))
    monkeypatch.setenv("FUSEDLOSS_CE_SINGLE_READ_CONFIG", "1024,4")
    for env, argument, expected in ((None, None, "two_pass"), ("", None, "two_pass"), ("single_read", None,
                                    "single_read"), ("single_read", "two_pass", "two_pass"),
                                    (None, "single_read", "single_read")):
        if env is None:
            monkeypatch.delenv("FUSEDLOSS_CE_SCHEDULE", raising=False)
        else:
            monkeypatch.setenv("FUSEDLOSS_CE_SCHEDULE", env)
        launched.clear()
        loss = fusedloss.cross_entropy(x, y, schedule=argument)
        assert loss.grad_fn.opts.schedule == expected
        assert launched == (["single_read"] if expected == "single_read" else [])
    with pytest.raises(ValueError, match="schedule must be one of 'two_pass', 'single_read'"):
        fusedloss.cross_entropy(x, y, schedule="single-read")
    monkeypatch.setenv("FUSEDLOSS_CE_SCHEDULE", "fastest")
    with pytest.raises(ValueError, match="FUSEDLOSS_CE_SCHEDULE must be one of"):
        fusedloss.cross_entropy(x, y)


def test_applies_to_large_vocabularies_with_class_indices():
    x = torch.zeros(3, 4096)
    y = torch.zeros(3, dtype=torch.long)
    assert sr.single_read_applies(x, y)
    assert sr.single_read_applies(torch.zeros(3, 8192)[:, :4096], y)
    assert not sr.single_read_applies(torch.zeros(3, 1000), y)  # small V: the two-pass tiles of rows
    assert not sr.single_read_applies(x, torch.zeros(3, 4096))  # probability targets
    assert not sr.single_read_applies(torch.zeros(4096, 3).t(), y)  # class stride != 1
    assert not sr.single_read_applies(torch.zeros(3, 4096, 2), y)  # K-dimensional


def test_configs(monkeypatch):
    """<= 32 elements per thread (the register budget), 16-bit / fp32 chunks twice the soft-capped ones, fp64 at
    most 8 per thread; small vocabularies get one power-of-two chunk; the environment override wins."""
    monkeypatch.delenv(sr.CONFIG_ENV, raising=False)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for cap in (False, True):
            chunk, warps = sr.single_read_config(128256, dtype, cap)
            per_thread = chunk // (32 * warps)
            assert per_thread <= (8 if dtype == torch.float64 else 16 if cap else 32)
    assert sr.single_read_config(3000, torch.bfloat16, False)[0] == 4096
    monkeypatch.setenv(sr.CONFIG_ENV, "16384,16")
    assert sr.single_read_config(128256, torch.bfloat16, False) == [16384, 16]


@pytest.mark.parametrize("chunk", [16, 128, 4096, 8192])
def test_chunking(chunk):
    """Equal chunks, multiples of 16 classes, at most CHUNK wide, each non-empty, covering the row."""
    for n_classes in list(range(1, 300)) + [32000, 50257, 128256, 256000, 262145]:
        num_chunks, size = sr._chunking(n_classes, chunk)
        assert num_chunks == -(-n_classes // chunk)
        assert size % 16 == 0 and size <= max(chunk, 16)
        assert (num_chunks - 1) * size < n_classes <= num_chunks * size


# ---------------------------------------------------------------------------------------------------------------
# CUDA only: the ticket schedule under the real block scheduler


def cuda_device():
    reason = _tier_skip_reason("cuda")
    if reason:
        pytest.skip(reason)
    return torch.device("cuda")


def both_modes(x, target, **kw):
    ticket = launch(x, target, mode="ticket", **kw)
    twophase = launch(x, target, mode="twophase", **kw)
    for name, a, b in zip(("loss", "row state", "grad"), ticket, twophase):
        assert torch.equal(a, b), f"ticket and twophase differ in {name}"
    return ticket


@pytest.mark.cuda
def test_ticket_many_launches_odd_rows():
    """2400 launches, row counts 1, 3, 17 and 129, two different inputs alternating so that a program reading a
    record of the previous launch (a memory-ordering bug) would show; each equal to its two-phase result."""
    dev = cuda_device()
    gen = torch.Generator().manual_seed(0)
    cases = []
    for n in (1, 3, 17, 129):
        for _ in range(2):
            x, target = make(gen, n, 32000, dtype=torch.bfloat16)
            x, target = x.to(dev), target.to(dev)
            cases.append((x, target, launch(x, target, config=None, mode="twophase", scale=0.5, label_smoothing=0.1,
                                            focal_gamma=2.0, z_loss=1e-4)))
    for i in range(2400):
        x, target, ref = cases[i % len(cases)]
        out = launch(x, target, config=None, mode="ticket", scale=0.5, label_smoothing=0.1, focal_gamma=2.0,
                     z_loss=1e-4)
        assert all(torch.equal(a, b) for a, b in zip(out, ref)), f"launch {i}, {x.shape[0]} rows"


@pytest.mark.cuda
def test_ticket_100003_rows():
    """400012 programs of 4 chunks each (V = 1000 in 256-class chunks)."""
    dev = cuda_device()
    gen = torch.Generator().manual_seed(1)
    x, target = make(gen, 100003, 1000, ignore=0.1)
    loss, _, grad = both_modes(x.to(dev), target.to(dev), config=SMALL, scale=1e-5, label_smoothing=0.1,
                               z_loss=1e-4)
    rows = torch.arange(0, 100003, 997)
    ref_rows, _, ref_grad = expected(x[rows], target[rows], 1e-5, label_smoothing=0.1, z_loss=1e-4)
    assert_close(loss[rows.to(dev)], ref_rows, torch.float32, "loss")
    assert_close(grad[rows.to(dev)], ref_grad, torch.float32, "d logits")


@pytest.mark.cuda
@pytest.mark.parametrize("n_classes", [32000, 128256, 256000])
@pytest.mark.parametrize("option", ["plain", "ls+focal+z", "everything"])
def test_llm_shapes_shipped_configs(n_classes, option):
    """16384 rows in bf16 with the shipped configs (drawn on the device: 8.4 GB of logits at V = 256000); 64 rows
    checked against the fp64 reference."""
    dev = cuda_device()
    gen = torch.Generator().manual_seed(n_classes)
    kw, ignore = options(gen, n_classes, option)
    x = (torch.randn(16384, n_classes, generator=torch.Generator(dev).manual_seed(n_classes), device=dev) * 3).to(
        torch.bfloat16)
    target = torch.randint(0, n_classes, (16384,), generator=gen)
    target[torch.rand(16384, generator=gen) < ignore] = -100
    dev_kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss, state, grad = both_modes(x, target.to(dev), config=None, scale=1.0 / 16384, **dev_kw)
    rows = torch.randperm(16384, generator=gen)[:64]
    ref_rows, lse, ref_grad = expected(x[rows.to(dev)], target[rows], 1.0 / 16384, **kw)
    r = rows.to(dev)
    assert_close(loss[r], ref_rows, torch.bfloat16, "loss")
    assert_close(state[r, 0] + state[r, 1], lse, torch.bfloat16, "lse")
    assert_close(grad[r], ref_grad, torch.bfloat16, "d logits")


@pytest.mark.cuda
def test_ticket_in_cuda_graph():
    """The counters' memset and the launch are captured and replayed: no host sync anywhere."""
    dev = cuda_device()
    gen = torch.Generator().manual_seed(2)
    x, target = make(gen, 257, 128256, dtype=torch.bfloat16)
    x, target = x.to(dev), target.to(dev)
    ref = launch(x, target, config=None, mode="ticket", scale=0.25, z_loss=1e-4)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launch(x, target, config=None, mode="ticket", scale=0.25, z_loss=1e-4)  # warm-up: compile outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch(x, target, config=None, mode="ticket", scale=0.25, z_loss=1e-4)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
