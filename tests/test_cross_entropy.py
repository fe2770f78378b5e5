"""fusedloss.cross_entropy / focal_loss against an fp64 eager reference, in every tier."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss

from conftest import TOL, Case, assert_close, randn, rel_err

# ---------------------------------------------------------------------------------------------------------------
# The reference: torch's own F.cross_entropy in fp64 for the cross-entropy part (weights, ignore_index,
# label smoothing, probability targets, reductions exactly as torch defines them), and the extras written from
# their definitions: focal (1 - p_t)^gamma with p_t the target's softmax probability, alpha, z * lse^2, softcap.


def reference(x, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              focal_gamma=0.0, focal_alpha=None, z_loss=0.0, softcap=None):
    x = x.to(torch.float64)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    w = None if weight is None else weight.to(torch.float64)
    prob = target.is_floating_point()
    t = target.to(torch.float64) if prob else target
    ce = F.cross_entropy(x, t, weight=w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    class_dim = 0 if x.dim() == 1 else 1
    lse = torch.logsumexp(x, dim=class_dim)
    if prob:
        rows = ce + z_loss * lse**2
        return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / max(rows.numel(), 1)}[reduction]
    target = target.long()  # a uint8 target compared with ignore_index=-100 must not wrap (torch compares in int64)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    log_p_t = torch.log_softmax(x, dim=class_dim).gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)
    rows = ce
    if focal_gamma:
        # 1 - p_t is exactly 0 only when the class count is 1 (or the margin is huge); the focal weight is then 0
        # and so is its contribution to the gradient, which the where() keeps out of pow's backward (inf * 0).
        one_minus = -torch.expm1(log_p_t)
        positive = one_minus > 0
        rows = rows * torch.where(positive, torch.where(positive, one_minus, 1.0) ** focal_gamma, 0.0)
    if isinstance(focal_alpha, torch.Tensor):
        rows = rows * focal_alpha.to(torch.float64)[safe]
    elif focal_alpha is not None:
        rows = rows * focal_alpha
    rows = torch.where(valid, rows + z_loss * lse**2, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    denom = valid.sum() if w is None else torch.where(valid, w[safe], 0.0).sum()
    return rows.sum() / denom


def check(tier, x, target, dtype, factor=1.0, **kw):
    """Compare value and gradients (input; probability target) with the reference, random grad_output."""
    x = x.detach().to(tier.device).requires_grad_(True)
    target = target.to(tier.device)
    if target.is_floating_point():
        target = target.detach().requires_grad_(True)
    kw = {k: (v.to(tier.device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = fusedloss.cross_entropy(x, target, **kw)
    x_ref = x.detach().cpu().requires_grad_(True)
    t_ref = target.detach().cpu().requires_grad_(target.requires_grad)
    ref = reference(x_ref, t_ref, **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    assert out.dtype == (torch.promote_types(x.dtype, target.dtype) if target.is_floating_point() else x.dtype)
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, "loss", factor)
    grad_out = torch.randn(ref.shape, dtype=torch.float64) + 2.0
    inputs = [x] + ([target] if target.requires_grad else [])
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype).to(tier.device))
    ref_grads = torch.autograd.grad(ref, [x_ref] + ([t_ref] if t_ref.requires_grad else []),
                                    grad_out.to(out.dtype).to(torch.float64))
    for name, g, r in zip(("d input", "d target"), grads, ref_grads):
        assert g.dtype == (x.dtype if name == "d input" else target.dtype)
        assert_close(g, r, dtype, name, factor)
    return out, grads


# ---------------------------------------------------------------------------------------------------------------
# Shapes catalogue, each with its reason.

SHAPES = {
    "gpt2_vocab": (3, 50257),  # vocabulary not a power of two, several 4096-wide blocks
    "smaller_than_block": (7, 10),  # C below the block; 7 rows, not a multiple of the row tile
    "one_class": (5, 1),  # C == 1: loss is 0 (or pure smoothing / z-loss)
    "one_row": (1, 300),
    "rows_not_multiple": (300, 33),  # many rows per program, the last program partial
    "unbatched": (37,),  # (C,) input with a 0-d target
    "k_dim": (3, 11, 4, 5),  # (N, C, d1, d2): class stride d1*d2, rows walk the spatial dims
}


def make_inputs(gen, shape, dtype=torch.float32, ignore_frac=0.0, scale=3.0):
    x = randn(gen, *shape, dtype=dtype, scale=scale)
    n_classes = shape[1] if len(shape) > 1 else shape[0]
    target_shape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    target = torch.randint(0, n_classes, target_shape, generator=gen)
    if ignore_frac:
        target[torch.rand(target_shape, generator=gen) < ignore_frac] = -100
    return x, target


OPTIONS = {
    "plain": {},
    "weight+ignore": {"weight": True, "ignore": 0.3},
    "smoothing+weight+ignore": {"label_smoothing": 0.15, "weight": True, "ignore": 0.3},
    "focal+alpha_tensor": {"focal_gamma": 2.0, "focal_alpha": True},
    "z+softcap": {"z_loss": 1e-2, "softcap": 4.0},
    "everything": {"label_smoothing": 0.1, "weight": True, "ignore": 0.2, "focal_gamma": 0.5, "focal_alpha": 0.25,
                   "z_loss": 1e-3, "softcap": 5.0},
}


def build_options(gen, n_classes, spec):
    kw = {k: v for k, v in spec.items() if k not in ("weight", "ignore")}
    if spec.get("weight"):
        kw["weight"] = torch.rand(n_classes, generator=gen, dtype=torch.float64).float() + 0.1
    if spec.get("focal_alpha") is True:
        kw["focal_alpha"] = torch.rand(n_classes, generator=gen, dtype=torch.float64).float() + 0.1
    return kw, spec.get("ignore", 0.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_class_index_targets(tier, gen, shape, option, reduction):
    shape = SHAPES[shape]
    n_classes = shape[1] if len(shape) > 1 else shape[0]
    kw, ignore = build_options(gen, n_classes, OPTIONS[option])
    x, target = make_inputs(gen, shape, ignore_frac=ignore)
    check(tier, x, target, torch.float32, reduction=reduction, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("option", ["plain", "everything"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dtypes(tier, gen, dtype, option, reduction):
    kw, ignore = build_options(gen, 5000, OPTIONS[option])
    x, target = make_inputs(gen, (4, 5000), dtype=dtype, ignore_frac=ignore)
    check(tier, x, target, dtype, reduction=reduction, **kw)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_focal_gamma_including_saturation(tier, gen, gamma):
    """Rows 0-1 random, rows 2-3 saturated: the target logit 25 above the rest, so p_t rounds to 1 in fp32 while
    the fp64 reference still resolves 1 - p_t (~1e-11); gradients must stay finite and match."""
    x, target = make_inputs(gen, (4, 257))
    x[2:] *= 0.1
    x[2:].scatter_(1, target[2:, None], 25.0)
    out, (grad,) = check(tier, x, target, torch.float32, focal_gamma=gamma, reduction="none")
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("gamma", [0.25, 0.5])
def test_focal_gradient_finite_when_p_t_is_one_in_fp64(tier, gamma):
    """p_t == 1 exactly even in fp64 (margin 800): the true gradient is 0; the naive (1 - p_t)^(gamma - 1)
    would give inf * 0 = NaN."""
    x = torch.zeros(2, 16, dtype=torch.float64)
    x[:, 3] = 800.0
    x = x.to(tier.device).requires_grad_(True)
    loss = fusedloss.cross_entropy(x, torch.tensor([3, 3], device=tier.device), focal_gamma=gamma)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0
    assert torch.equal(grad.cpu(), torch.zeros(2, 16, dtype=torch.float64))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(6, 50257), (9, 13), (13,), (2, 7, 3, 4)])
@pytest.mark.parametrize("option", [{}, {"label_smoothing": 0.2}, {"weight": True, "z_loss": 1e-2, "softcap": 3.0}])
def test_probability_targets(tier, gen, shape, option, reduction):
    n_classes = shape[1] if len(shape) > 1 else shape[0]
    kw, _ = build_options(gen, n_classes, option)
    x = randn(gen, *shape, scale=2.0)
    target = torch.softmax(randn(gen, *shape, scale=2.0), dim=1 if len(shape) > 1 else 0)
    check(tier, x, target, torch.float32, reduction=reduction, **kw)


def test_probability_targets_weight_gradient(tier, gen):
    """torch differentiates the class weights for probability targets (not for class indices)."""
    x = randn(gen, 5, 7, device=tier.device, requires_grad=True)
    target = torch.softmax(randn(gen, 5, 7), dim=1).to(tier.device)
    weight = (torch.rand(7, generator=gen) + 0.5).to(tier.device).requires_grad_(True)
    out = fusedloss.cross_entropy(x, target, weight=weight, label_smoothing=0.1)
    (gw,) = torch.autograd.grad(out, weight)
    w64 = weight.detach().cpu().double().requires_grad_(True)
    ref = F.cross_entropy(x.detach().cpu().double(), target.cpu().double(), weight=w64, label_smoothing=0.1)
    (gw_ref,) = torch.autograd.grad(ref, w64)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(gw, gw_ref, torch.float32, "d weight")


def test_focal_loss_equals_seed_formula(tier, gen):
    """The focal loss as eager code usually writes it: ce = CE(none); pt = exp(-ce); mean(alpha (1-pt)^gamma ce)."""
    x, target = make_inputs(gen, (64, 20))
    x64 = x.double().requires_grad_(True)
    ce = F.cross_entropy(x64, target, reduction="none")
    pt = torch.exp(-ce)
    seed = (0.25 * (1 - pt) ** 2.0 * ce).mean()
    xt = x.to(tier.device).requires_grad_(True)
    ours = fusedloss.focal_loss(xt, target.to(tier.device), gamma=2.0, alpha=0.25)
    assert_close(ours, seed, torch.float32, "focal loss")
    assert_close(torch.autograd.grad(ours, xt)[0], torch.autograd.grad(seed, x64)[0], torch.float32, "d input")
    assert torch.isclose(fusedloss.focal_loss(xt, target.to(tier.device), gamma=0.0).cpu(),
                         F.cross_entropy(x64, target).float(), rtol=1e-5)


def test_inplace_backward(tier, gen):
    x, target = make_inputs(gen, (6, 5000))
    target = target.to(tier.device)
    leaf = x.clone().to(tier.device).requires_grad_(True)
    ref_loss = fusedloss.cross_entropy(leaf, target, label_smoothing=0.1)
    (ref_grad,) = torch.autograd.grad(ref_loss * 1.7, leaf)
    logits = x.clone().to(tier.device).requires_grad_(True)
    act = logits * 1.0  # a non-leaf, as a model's output would be
    loss = fusedloss.cross_entropy(act, target, label_smoothing=0.1, inplace_backward=True)
    (loss * 1.7).backward()
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(logits.grad, ref_grad, torch.float32, "d input")
    if tier.backend != "torch":  # the torch backend ignores the hint: its gradient is a new tensor anyway
        assert_close(act.detach(), ref_grad, torch.float32, "logits overwritten by the gradient")


def test_inplace_backward_refuses_saved_logits(tier, gen):
    """If another op saved the logits for its backward, overwriting them must raise, not corrupt silently."""
    if tier.backend == "torch":
        pytest.skip("the torch backend does not overwrite its input")
    x, target = make_inputs(gen, (4, 300))
    leaf = x.to(tier.device).requires_grad_(True)
    saved = torch.tanh(leaf)  # tanh saves its output for backward
    loss = fusedloss.cross_entropy(saved, target.to(tier.device), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_all_ignored_mean_is_nan(tier, gen):
    x, _ = make_inputs(gen, (4, 9))
    target = torch.full((4,), -100)
    xt = x.to(tier.device).requires_grad_(True)
    out = fusedloss.cross_entropy(xt, target.to(tier.device))
    assert torch.isnan(out).item()
    x_ref = x.clone().requires_grad_(True)
    ref = F.cross_entropy(x_ref, target)
    (grad,) = torch.autograd.grad(out, xt)
    (ref_grad,) = torch.autograd.grad(ref, x_ref)
    assert torch.equal(grad.cpu(), ref_grad), "torch's gradient of an all-ignored mean is zero"


def test_nan_and_inf_logits_propagate_like_torch(tier, gen):
    x, target = make_inputs(gen, (4, 9))
    x[1, 3] = float("nan")
    x[2, 5] = float("-inf")
    for reduction in ("none", "sum"):
        xt = x.to(tier.device).requires_grad_(True)
        out = fusedloss.cross_entropy(xt, target.to(tier.device), reduction=reduction)
        x_ref = x.clone().double().requires_grad_(True)
        ref = F.cross_entropy(x_ref, target, reduction=reduction)
        assert rel_err(out, ref) <= TOL[torch.float32]
        go = torch.rand(ref.shape, dtype=torch.float64) + 0.5
        (g,) = torch.autograd.grad(out, xt, go.float().to(tier.device))
        (g_ref,) = torch.autograd.grad(ref, x_ref, go)
        assert rel_err(g, g_ref) <= TOL[torch.float32]


def test_empty_input(tier):
    x = torch.zeros(0, 5, device=tier.device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=tier.device)
    assert torch.isnan(fusedloss.cross_entropy(x, target)).item()
    assert fusedloss.cross_entropy(x, target, reduction="sum").item() == 0.0
    assert fusedloss.cross_entropy(x, target, reduction="none").shape == (0,)


def test_legacy_size_average_and_reduce(tier, gen):
    x, target = make_inputs(gen, (5, 7))
    x, target = x.to(tier.device), target.to(tier.device)
    with pytest.warns(UserWarning):
        out = fusedloss.cross_entropy(x, target, None, False)  # positional size_average, as in torch
    assert torch.allclose(out, fusedloss.cross_entropy(x, target, reduction="sum"))
    with pytest.warns(UserWarning):
        out = fusedloss.cross_entropy(x, target, reduce=False)
    assert out.shape == (5,)


def test_uint8_targets(tier, gen):
    x, target = make_inputs(gen, (6, 12))
    check(tier, x, target.to(torch.uint8), torch.float32, label_smoothing=0.1)


def test_modules_match_functional(tier, gen):
    x, target = make_inputs(gen, (8, 11), ignore_frac=0.2)
    x, target = x.to(tier.device), target.to(tier.device)
    weight = (torch.rand(11, generator=gen) + 0.5).to(tier.device)
    module = fusedloss.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1, focal_gamma=1.0, z_loss=1e-3)
    assert "weight" in module.state_dict()
    expected = fusedloss.cross_entropy(x, target, weight=weight, label_smoothing=0.1, focal_gamma=1.0, z_loss=1e-3)
    assert torch.equal(module(x, target), expected)
    focal = fusedloss.nn.FocalLoss(gamma=2.0, alpha=0.5)
    assert torch.equal(focal(x, target), fusedloss.focal_loss(x, target, gamma=2.0, alpha=0.5))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: metadata checks on every backend, before any launch.

BAD = [
    ("input", TypeError, lambda x, t: fusedloss.cross_entropy(x.numpy(), t)),
    ("input", TypeError, lambda x, t: fusedloss.cross_entropy(x.long(), t)),
    ("input", ValueError, lambda x, t: fusedloss.cross_entropy(x[0, 0], t)),
    ("target", ValueError, lambda x, t: fusedloss.cross_entropy(x, t[:3])),
    ("target", TypeError, lambda x, t: fusedloss.cross_entropy(x, t.int())),
    ("target", ValueError, lambda x, t: fusedloss.cross_entropy(x, torch.rand(4, 7))),
    ("weight", ValueError, lambda x, t: fusedloss.cross_entropy(x, t, weight=torch.ones(6))),
    ("weight", TypeError, lambda x, t: fusedloss.cross_entropy(x, t, weight=torch.ones(7, dtype=torch.long))),
    ("weight", ValueError, lambda x, t: fusedloss.cross_entropy(x, t, weight=torch.ones(7, requires_grad=True))),
    ("reduction", ValueError, lambda x, t: fusedloss.cross_entropy(x, t, reduction="avg")),
    ("label_smoothing", ValueError, lambda x, t: fusedloss.cross_entropy(x, t, label_smoothing=1.5)),
    ("label_smoothing", TypeError, lambda x, t: fusedloss.cross_entropy(x, t, label_smoothing="0.1")),
    ("focal_gamma", ValueError, lambda x, t: fusedloss.cross_entropy(x, t, focal_gamma=-1.0)),
    ("focal_alpha", ValueError, lambda x, t: fusedloss.cross_entropy(x, t, focal_alpha=torch.ones(3))),
    ("z_loss", ValueError, lambda x, t: fusedloss.cross_entropy(x, t, z_loss=-0.1)),
    ("softcap", ValueError, lambda x, t: fusedloss.cross_entropy(x, t, softcap=0.0)),
    ("ignore_index", ValueError, lambda x, t: fusedloss.cross_entropy(x, torch.rand(5, 7), ignore_index=0)),
    ("focal_gamma", ValueError, lambda x, t: fusedloss.cross_entropy(x, torch.rand(5, 7), focal_gamma=2.0)),
    ("ignore_index", TypeError, lambda x, t: fusedloss.cross_entropy(x, t, ignore_index=1.5)),
]


@pytest.mark.parametrize("name,error,call", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(tier, gen, name, error, call):
    x, target = make_inputs(gen, (5, 7))
    if tier.device.type != "cpu":
        pytest.skip("the bad-input table builds CPU tensors; the checks are device-independent")
    with pytest.raises(error, match=name):
        call(x, target)


def test_out_of_range_class_raises_on_cpu(tier, gen):
    if tier.device.type != "cpu":
        pytest.skip("CPU backends only; on GPU the row's loss is NaN (test_out_of_range_class_is_nan_on_gpu)")
    x, target = make_inputs(gen, (5, 7))
    for bad in (7, -1):
        target[2] = bad
        with pytest.raises(IndexError, match="out of bounds"):
            fusedloss.cross_entropy(x, target)


# ---------------------------------------------------------------------------------------------------------------
# CUDA-only behaviour


def test_out_of_range_class_is_nan_on_gpu(tier, gen):
    if tier.device.type != "cuda":
        pytest.skip("GPU behaviour (CPU backends raise IndexError)")
    x, target = make_inputs(gen, (5, 7))
    target[2] = 7
    target[3] = -5
    xt = x.to(tier.device).requires_grad_(True)
    rows = fusedloss.cross_entropy(xt, target.to(tier.device), reduction="none").cpu()
    assert torch.isnan(rows[2:4]).all() and torch.isfinite(rows[[0, 1, 4]]).all()
    (grad,) = torch.autograd.grad(fusedloss.cross_entropy(xt, target.to(tier.device), reduction="sum"), xt)
    assert torch.isnan(grad[2:4]).all().item() and torch.isfinite(grad[[0, 1, 4]]).all().item()


def test_no_host_sync_and_cuda_graph(tier, gen):
    if tier.device.type != "cuda":
        pytest.skip("CUDA graphs and sync detection need a GPU")
    x, target = make_inputs(gen, (64, 32000), dtype=torch.bfloat16, ignore_frac=0.1)
    x, target = x.cuda(), target.cuda()
    kw = {"label_smoothing": 0.1, "focal_gamma": 2.0, "z_loss": 1e-4}
    ref_x = x.clone().requires_grad_(True)
    expected = fusedloss.cross_entropy(ref_x, target, **kw)
    expected.backward()

    sync_x = x.clone().requires_grad_(True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fusedloss.cross_entropy(sync_x, target, **kw).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    # Whole forward + backward in one graph, as torch's docs capture a training step: warm up on a side
    # stream with a leaf used nowhere else, drop every output, then capture.
    static_x = x.clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            static_x.grad = None
            fusedloss.cross_entropy(static_x, target, **kw).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_loss = fusedloss.cross_entropy(static_x, target, **kw)
        static_loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_loss, expected.detach())
    assert torch.equal(static_x.grad, ref_x.grad)


@pytest.mark.parametrize("config", ["4096,8,0", "1024,4,1000", "2048,4,5000"])
@pytest.mark.parametrize("target_kind", ["index", "probability"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_large_vocab_schedules(tier, gen, monkeypatch, config, target_kind, reduction):
    """Both large-vocabulary schedules at a small size: one program per row (chunk 0), and rows split into
    chunks whose last finisher merges the partials and writes the gradient (9 chunks; 2 chunks, one partial)."""
    monkeypatch.setenv("FUSEDLOSS_CE_CONFIG", config)
    if target_kind == "index":
        kw, ignore = build_options(gen, 9000, OPTIONS["everything"])
        x, target = make_inputs(gen, (5, 9000), ignore_frac=ignore)
    else:
        kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}
        x = randn(gen, 5, 9000, scale=3.0)
        target = torch.softmax(randn(gen, 5, 9000, scale=3.0), dim=1)
    check(tier, x, target, torch.float32, reduction=reduction, **kw)


# ---------------------------------------------------------------------------------------------------------------
# The autograd / compile / layout contract (tests/test_contract.py)


def _ce_case(shape, *, prob=False, reduction="mean", weight=False, ignore=0.0, target_dtype=torch.int64, **extra):
    def make(gen, dtype):
        x, target = make_inputs(gen, shape, dtype=dtype, ignore_frac=ignore)
        n_classes = shape[1] if len(shape) > 1 else shape[0]
        if prob:
            target = torch.softmax(randn(gen, *shape, dtype=dtype), dim=1)
        kw = dict(extra, reduction=reduction)
        if weight:
            kw["weight"] = (torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        if isinstance(kw.get("focal_alpha"), str):
            kw["focal_alpha"] = (torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        if not prob:  # ignored rows carry this case's ignore_index (255 for a uint8 target)
            target = torch.where(target == -100, extra.get("ignore_index", -100), target).to(target_dtype)
        return [x, target], kw

    return make


def _expand_weight(args, kw):
    return args, dict(kw, weight=kw["weight"][:1].expand(kw["weight"].shape[0]))


CONTRACT_CASES = [
    Case("cross_entropy-every_extra", fusedloss.cross_entropy,
         _ce_case((6, 37), weight=True, ignore=0.3, label_smoothing=0.1, focal_gamma=1.5, focal_alpha="per_class",
                  z_loss=1e-3, softcap=5.0),
         compile=True, stride0=_expand_weight),
    Case("cross_entropy-none-k_dim", fusedloss.cross_entropy,
         _ce_case((3, 11, 4), reduction="none", label_smoothing=0.2, weight=True), stride0=_expand_weight),
    Case("cross_entropy-probabilities", fusedloss.cross_entropy,
         _ce_case((5, 13), prob=True, weight=True, label_smoothing=0.1, z_loss=1e-2), grad_args=(0, 1)),
    Case("cross_entropy-sum-uint8", fusedloss.cross_entropy,
         _ce_case((7, 20), reduction="sum", ignore=0.2, target_dtype=torch.uint8, ignore_index=255)),
]


# ---------------------------------------------------------------------------------------------------------------
# Hostile inputs: what a drop-in must not get silently wrong


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_huge_logits_keep_log_s(tier, reduction):
    """fp32 logits near 1e8: lse = m + log s rounds to m (the ulp there is 8), so lse - x_y would be 0 and the
    gradient unnormalized; (m - x_y) + log s keeps torch's log 2 and the gradient (p - onehot)."""
    x = torch.tensor([[1e8, 1e8], [1e8 + 8, 1e8 + 8]], dtype=torch.float32, device=tier.device, requires_grad=True)
    target = torch.tensor([0, 1], device=tier.device)
    out = fusedloss.cross_entropy(x, target, reduction=reduction)
    ref = F.cross_entropy(x.detach().cpu().requires_grad_(), target.cpu(), reduction=reduction)
    assert torch.allclose(out.cpu(), ref.detach(), rtol=1e-6), (out, ref)
    assert torch.allclose(out.detach().cpu().reshape(-1)[0], torch.tensor(0.6931472), rtol=1e-6)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(g.cpu(), torch.tensor([[-0.5, 0.5], [0.5, -0.5]]) / (2 if reduction == "mean" else 1))


@pytest.mark.parametrize("option", [{}, {"label_smoothing": 0.1}, {"focal_gamma": 2.0}, {"z_loss": 1e-3}])
def test_minus_inf_logits_have_torchs_finite_gradient(tier, gen, option):
    """Masked classes (-inf logits), including the target's: torch's gradient is finite (p = 0 there, and the
    target row's gradient is -1 at the target); the loss is inf for that row as in torch."""
    x, target = make_inputs(gen, (4, 9))
    x[:, 5] = float("-inf")
    x[1, target[1]] = float("-inf")
    xt = x.to(tier.device).requires_grad_(True)
    out = fusedloss.cross_entropy(xt, target.to(tier.device), reduction="none", **option)
    (grad,) = torch.autograd.grad(out, xt, torch.ones_like(out))
    x_ref = x.double().requires_grad_(True)
    ref = reference(x_ref, target, reduction="none", **option)
    (grad_ref,) = torch.autograd.grad(ref, x_ref, torch.ones_like(ref))
    rows = [0, 2, 3]
    assert rel_err(out[rows], ref[rows]) <= TOL[torch.float32]
    assert torch.isinf(out[1]).item() == torch.isinf(ref[1]).item()
    if option.get("label_smoothing") or option.get("z_loss"):
        pytest.skip("smoothing over a -inf logit and z-loss of it are inf in torch as well; rows checked above")
    assert torch.isfinite(grad[rows]).all().item() == torch.isfinite(grad_ref[rows]).all().item()
    assert rel_err(grad[rows], grad_ref[rows]) <= TOL[torch.float32]


def test_inf_weight_on_a_class_only_ignored_rows_have(tier, gen):
    """torch's mean stays finite when the only rows of an inf-weight class are ignored: an ignored row
    contributes 0 to the denominator, not 0 * inf."""
    x, target = make_inputs(gen, (6, 11))
    weight = torch.rand(11, generator=gen) + 0.5
    target[target == 0] = 1
    weight[0] = float("inf")
    target[2] = -100
    check(tier, x, target, torch.float32, weight=weight)


def test_uint8_targets_compare_in_int64(tier, gen):
    """A uint8 class 156 is not ignore_index=-100 (which wraps to 156 in uint8), and 255 is ignored only when
    ignore_index is 255; 300 classes, so 156 and 255 are valid classes."""
    x, _ = make_inputs(gen, (4, 300))
    target = torch.tensor([156, 255, 3, 156], dtype=torch.uint8)
    check(tier, x, target, torch.float32, ignore_index=-100)
    check(tier, x, target, torch.float32, ignore_index=255)


def test_strided_weight_alpha_and_target_read_in_place(tier, gen):
    """A column of a label table, an expanded (stride-0) weight and a strided per-class alpha: the values the
    caller sees, as torch reads them."""
    x, _ = make_inputs(gen, (6, 40))
    table = torch.randint(0, 40, (6, 3), generator=gen)
    weight = (torch.rand(1, generator=gen) + 0.5).expand(40)
    alpha = (torch.rand(80, generator=gen) + 0.5)[::2]
    check(tier, x, table[:, 1], torch.float32, weight=weight, focal_alpha=alpha, focal_gamma=1.0,
          label_smoothing=0.1)


def test_transposed_probability_target_gradient(tier, gen):
    x = randn(gen, 5, 9, scale=2.0)
    target = torch.softmax(randn(gen, 9, 5, scale=2.0), dim=0).t()  # (5, 9), class stride 5
    assert not target.is_contiguous()
    check(tier, x, target, torch.float32, label_smoothing=0.1, reduction="sum")


def test_autocast_returns_fp32_like_torch(tier, gen):
    x, target = make_inputs(gen, (8, 50), dtype=torch.bfloat16)
    x, target = x.to(tier.device).requires_grad_(True), target.to(tier.device)
    with torch.autocast(tier.device.type, dtype=torch.bfloat16):
        ours = fusedloss.cross_entropy(x, target, label_smoothing=0.1)
        theirs = F.cross_entropy(x, target, label_smoothing=0.1)
    assert ours.dtype == theirs.dtype == torch.float32
    (g,) = torch.autograd.grad(ours, x)
    assert g.dtype == torch.bfloat16
    assert_close(ours, theirs, torch.bfloat16, "loss under autocast")


@pytest.mark.parametrize("softcap", [float("inf"), float("nan"), -1.0])
def test_softcap_must_be_a_finite_positive_number(tier, gen, softcap):
    x, target = make_inputs(gen, (3, 5))
    with pytest.raises(ValueError, match="softcap"):
        fusedloss.cross_entropy(x.to(tier.device), target.to(tier.device), softcap=softcap)


def test_number_arguments_in_every_form_torch_takes(tier, gen):
    import numpy as np

    x, target = make_inputs(gen, (4, 7), ignore_frac=0.3)
    x, target = x.to(tier.device), target.to(tier.device)
    expected = fusedloss.cross_entropy(x, target, ignore_index=-100, label_smoothing=0.25)
    for ignore, eps in ((np.int64(-100), np.float32(0.25)), (torch.tensor(-100), torch.tensor(0.25))):
        assert torch.equal(fusedloss.cross_entropy(x, target, ignore_index=ignore, label_smoothing=eps), expected)


@pytest.mark.parametrize("shape,target_shape", [((0, 5), (0,)), ((3, 0), (3,)), ((0, 4, 2), (0, 2))])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_and_zero_width_inputs_give_torchs_answer(tier, shape, target_shape, reduction):
    x = torch.zeros(shape, device=tier.device, requires_grad=True)
    target = torch.full(target_shape, -100, dtype=torch.long, device=tier.device)
    try:
        expected = F.cross_entropy(x.detach().cpu(), target.cpu(), reduction=reduction)
    except (IndexError, RuntimeError) as error:
        with pytest.raises(type(error)):
            fusedloss.cross_entropy(x, target, reduction=reduction)
        return
    out = fusedloss.cross_entropy(x, target, reduction=reduction)
    assert out.shape == expected.shape and torch.equal(out.detach().cpu().isnan(), expected.isnan())
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape


# ---------------------------------------------------------------------------------------------------------------
# Property test: random shapes, options and layouts against the fp64 reference

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(
    rows=st.integers(1, 6), classes=st.integers(1, 70), k_dim=st.booleans(), transposed=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]), smoothing=st.sampled_from([0.0, 0.05, 1.0]),
    gamma=st.sampled_from([0.0, 0.5, 2.0]), z=st.sampled_from([0.0, 1e-2]), softcap=st.sampled_from([None, 3.0]),
    weight=st.booleans(), ignore=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_property_against_reference(tier, rows, classes, k_dim, transposed, reduction, smoothing, gamma, z, softcap,
                                    weight, ignore, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, classes, 3) if k_dim else (rows, classes)
    x, target = make_inputs(gen, shape, ignore_frac=ignore)
    if transposed:  # the same values, classes walked with a stride other than one
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    kw = dict(reduction=reduction, label_smoothing=smoothing, focal_gamma=gamma, z_loss=z, softcap=softcap)
    if weight:
        kw["weight"] = torch.rand(classes, generator=gen, dtype=torch.float64).float() + 0.1
    check(tier, x, target, torch.float32, **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_read_schedule_through_the_public_function(tier, gen, monkeypatch, reduction):
    """The opt-in single-read schedule (FUSEDLOSS_CE_SCHEDULE=single_read) behind cross_entropy: every extra,
    ignored rows, a vocabulary of several chunks (small chunks in the interpreter)."""
    if tier.name == "torch":
        pytest.skip("a Triton schedule")
    monkeypatch.setenv("FUSEDLOSS_CE_SCHEDULE", "single_read")
    if tier.name == "interpret":
        monkeypatch.setenv("FUSEDLOSS_CE_SINGLE_READ_CONFIG", "1024,4")
    kw, ignore = build_options(gen, 5000, OPTIONS["everything"])
    x, target = make_inputs(gen, (5, 5000), ignore_frac=ignore)
    check(tier, x, target, torch.float32, reduction=reduction, **kw)


def test_ignored_rows_have_a_zero_gradient_under_any_grad_output(tier, gen):
    """reduction='none': torch's gradient of an ignored row is 0 even where grad_output is NaN or inf."""
    x, target = make_inputs(gen, (4, 9))
    target[1] = target[3] = -100
    xt = x.to(tier.device).requires_grad_(True)
    out = fusedloss.cross_entropy(xt, target.to(tier.device), reduction="none", label_smoothing=0.1)
    go = torch.tensor([1.0, float("nan"), 2.0, float("inf")], device=tier.device)
    (grad,) = torch.autograd.grad(out, xt, go)
    assert torch.equal(grad[[1, 3]].cpu(), torch.zeros(2, 9))
    assert torch.isfinite(grad[[0, 2]]).all()
