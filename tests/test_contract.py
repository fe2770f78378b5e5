"""The contract every loss owes its users beyond its values: it behaves like a composition of torch ops under every
use autograd, torch.compile and torch.func allow, and reads every argument through its strides.

Each family's test module lists its cases in ``CONTRACT_CASES`` (``conftest.Case``: the public function, inputs
built from a generator, which positions are differentiable), found by that name in every ``tests/test_*.py`` (a
module that defines them and fails to import fails this whole file, never silently drops its cases); every test
here runs on every case in every tier:

- backward twice through a retained graph accumulates twice, and ``autograd.grad(..., retain_graph=True)`` then
  ``backward()`` (the PCGrad / GradNorm pattern) gives the same gradient twice;
- ``gradcheck`` and ``gradgradcheck`` in fp64 (so ``create_graph=True`` gives the right second-order gradient);
- an in-place edit of an input between forward and backward either raises, as torch does when it saved that
  input, or leaves the gradient that of the inputs at forward time: never a gradient of the edited values;
- ``torch.compile(fullgraph=True)`` traces it with no graph break, values and gradients equal to eager;
- ``torch.func.grad``, ``vjp``, ``jacrev``, ``jvp``, ``hessian`` and ``vmap`` give autograd's answers; meta and fake
  tensors give the real call's shape and dtype;
- ``torch.compile(fullgraph=True)`` over 12 batch sizes compiles at most twice (``BATCHED``: every public loss);
- non-contiguous, strided and stride-0 (expanded) arguments give the contiguous arguments' results.
"""

import importlib
import pathlib

import pytest
import torch

import fusedloss as fl

from conftest import assert_close


def _cases():
    """Every ``CONTRACT_CASES`` of the test modules beside this one that define it (an import error propagates)."""
    here = pathlib.Path(__file__).parent
    cases = []
    for path in sorted(here.glob("test_*.py")):
        if path.name != pathlib.Path(__file__).name and "\nCONTRACT_CASES = " in path.read_text():
            cases += importlib.import_module(path.stem).CONTRACT_CASES
    return cases


CASES = _cases()
COMPILE_CASES = [case for case in CASES if case.compile]


def _call(case, tier, gen, dtype=torch.float64, transform=None):
    """(output, differentiable leaves) of one call with fresh inputs from ``gen`` on the tier's device."""
    args, kwargs = case.make(gen, dtype)
    leaves = []
    moved = []
    for index, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            arg = arg.to(tier.device)
            if index in case.grad_args:
                arg = arg.detach().requires_grad_(True)
                leaves.append(arg)
            if transform is not None:
                arg = transform(arg)
        moved.append(arg)
    kwargs = {k: (v.to(tier.device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return case.fn(*moved, **kwargs), leaves, moved, kwargs


def _grad_output(out, gen):
    return (torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5).to(out.dtype).to(out.device)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_backward_twice_accumulates_twice(tier, gen, case):
    out, leaves, _, _ = _call(case, tier, gen)
    go = _grad_output(out, gen)
    once = torch.autograd.grad(out, leaves, go, retain_graph=True)
    out.backward(go, retain_graph=True)
    out.backward(go)
    for leaf, g in zip(leaves, once):
        assert_close(leaf.grad, 2 * g, torch.float64, "twice the gradient")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_grad_then_backward(tier, gen, case):
    """PCGrad / GradNorm: per-task gradients with ``retain_graph``, then the usual backward."""
    out, leaves, _, _ = _call(case, tier, gen)
    go = _grad_output(out, gen)
    first = torch.autograd.grad(out, leaves, go, retain_graph=True)
    out.backward(go)
    for leaf, g in zip(leaves, first):
        assert_close(leaf.grad, g, torch.float64, "the same gradient")
        assert leaf.grad.data_ptr() != g.data_ptr() or leaf.grad is g, "a gradient buffer handed out twice"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradcheck_and_gradgradcheck(tier, gen, case):
    if tier.name == "cuda":
        pytest.skip("fp64 finite differences on the CPU tiers; the kernels are the interpreter tier's")
    args, kwargs = case.make(gen, torch.float64)
    leaves = [args[i].detach().requires_grad_(True) for i in case.grad_args]

    def fn(*diff):
        full = list(args)
        for i, t in zip(case.grad_args, diff):
            full[i] = t
        return case.fn(*full, **kwargs)

    # fast mode: the Jacobian against random projections, a few evaluations instead of one per input element
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_inplace_edit_before_backward_is_never_silent(tier, gen, case):
    state = gen.get_state()
    out, leaves, _, _ = _call(case, tier, gen)
    go = _grad_output(out, gen)
    expected = torch.autograd.grad(out, leaves, go)
    gen.set_state(state)
    out, leaves, moved, _ = _call(case, tier, gen, transform=lambda t: t * 1.0 if t.requires_grad else t.clone())
    for arg in moved:  # every tensor argument a non-leaf copy the caller may edit
        if isinstance(arg, torch.Tensor) and arg.is_floating_point():
            with torch.no_grad():
                arg.add_(0.5)
    try:
        got = torch.autograd.grad(out, leaves, go)
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error)
        return
    for g, e in zip(got, expected):
        assert_close(g, e, torch.float64, "the gradient at forward time")


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: c.name)
def test_compile_fullgraph(tier, gen, case):
    """One traced graph (a graph break or a host read fails ``fullgraph``), values and gradients equal to eager.
    ``aot_eager`` runs Dynamo and AOTAutograd without Inductor's codegen (slow on CPU); the launchers are opaque
    custom ops either way."""
    torch._dynamo.reset()
    state = gen.get_state()
    out, leaves, _, _ = _call(case, tier, gen, dtype=torch.float32)
    go = _grad_output(out, gen)
    expected = torch.autograd.grad(out, leaves, go)
    gen.set_state(state)
    args, kwargs = case.make(gen, torch.float32)
    args = [a.to(tier.device) if isinstance(a, torch.Tensor) else a for a in args]
    leaves = [args[i].detach().requires_grad_(True) for i in case.grad_args]
    for i, leaf in zip(case.grad_args, leaves):
        args[i] = leaf
    compiled = torch.compile(lambda *a: case.fn(*a, **kwargs), fullgraph=True, backend="aot_eager")
    got_out = compiled(*args)
    assert_close(got_out, out, torch.float32, "compiled value")
    for g, e in zip(torch.autograd.grad(got_out, leaves, go), expected):
        assert_close(g, e, torch.float32, "compiled gradient")


def _batch(n, gen):
    """Inputs of batch size ``n`` for ``BATCHED``: (features (n, 8) differentiable, class indices (n,) in [0, 10))."""
    return (torch.randn(n, 8, generator=gen).requires_grad_(True), torch.randint(0, 10, (n,), generator=gen))


# every public loss as a function of one batch: features x (n, 8) and class indices t (n,)
BATCHED = {
    "cross_entropy": lambda x, t: fl.cross_entropy(x.repeat(1, 2)[:, :10], t),
    "cross_entropy-extras": lambda x, t: fl.cross_entropy(x.repeat(1, 2)[:, :10], t, label_smoothing=0.1,
                                                         focal_gamma=1.5, z_loss=1e-3, softcap=5.0),
    "focal_loss": lambda x, t: fl.focal_loss(x.repeat(1, 2)[:, :10], t),
    "binary_cross_entropy_with_logits": lambda x, t: fl.binary_cross_entropy_with_logits(x, (x.detach() > 0).double()
                                                                                        .to(x.dtype)),
    "sigmoid_focal_loss": lambda x, t: fl.sigmoid_focal_loss(x, (x.detach() > 0).to(x.dtype), reduction="mean"),
    "linear_cross_entropy": lambda x, t: fl.linear_cross_entropy(x, torch.linspace(-1, 1, 80).view(10, 8), t,
                                                                label_smoothing=0.1),
    "nt_xent": lambda x, t: fl.nt_xent(torch.cat([x, x.flip(1)]), temperature=0.5),
    "clip_loss": lambda x, t: fl.clip_loss(x, x.flip(1), torch.tensor(5.0)),
    "siglip_loss": lambda x, t: fl.siglip_loss(x, x.flip(1), torch.tensor(5.0), torch.tensor(-2.0)),
    "info_nce": lambda x, t: fl.info_nce(x, x.flip(1)),
    "triplet_margin_loss": lambda x, t: fl.triplet_margin_loss(x, x.flip(1), x.roll(1, 0)),
    "batch_hard_triplet_loss": lambda x, t: fl.batch_hard_triplet_loss(x, t % 3),
    "mse_loss": lambda x, t: fl.mse_loss(x, x.detach().flip(1)),
    "l1_loss": lambda x, t: fl.l1_loss(x, x.detach().flip(1)),
    "huber_loss": lambda x, t: fl.huber_loss(x, x.detach().flip(1), delta=0.5),
    "smooth_l1_loss": lambda x, t: fl.smooth_l1_loss(x, x.detach().flip(1), beta=0.5),
    "kl_div": lambda x, t: fl.kl_div(x.log_softmax(1), x.detach().flip(1).softmax(1), reduction="batchmean"),
    "kl_div_with_logits": lambda x, t: fl.kl_div_with_logits(x, x.detach().flip(1), temperature=2.0),
    "bradley_terry_loss": lambda x, t: fl.bradley_terry_loss(x[:, 0], x[:, 1], margin=0.1),
    "perplexity": lambda x, t: fl.perplexity(x.repeat(1, 2)[:, :10], t),
    "log_probs": lambda x, t: fl.log_probs(x.repeat(1, 2)[:, :10], t, return_entropy=True)[1].sum(),
    "linear_log_probs": lambda x, t: fl.linear_log_probs(x, torch.linspace(-1, 1, 80).view(10, 8), t,
                                                         temperature=0.7).sum(),
}


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("name", list(BATCHED))
def test_compile_over_batch_sizes(tier, gen, name, dynamic):
    """12 batch sizes under ``torch.compile(fullgraph=True)`` compile at most two graphs (the first size static,
    then one dynamic graph; with ``dynamic=True`` one graph, traced twice at most when Dynamo turns symbolic float
    arguments back into constants): no Python loop over the batch or host read of a size guards on it (past
    Dynamo's recompile limit, 8, fullgraph fails). Values and gradients equal eager's at every size."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    fn = BATCHED[name]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=counter)
    for n in range(5, 17):
        x, t = _batch(n, gen)
        x, t = x.detach().to(tier.device).requires_grad_(True), t.to(tier.device)
        got = compiled(x, t)
        (got_grad,) = torch.autograd.grad(got, x)
        want = fn(x, t)
        assert_close(got, want, torch.float32, f"compiled value at batch {n}")
        assert_close(got_grad, torch.autograd.grad(want, x)[0], torch.float32, f"compiled gradient at batch {n}")
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles over 12 batch sizes"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_func_grad(tier, gen, case):
    args, kwargs = case.make(gen, torch.float64)
    args = [a.to(tier.device) if isinstance(a, torch.Tensor) else a for a in args]
    first = case.grad_args[0]

    def loss_of(x):
        full = list(args)
        full[first] = x
        return case.fn(*full, **kwargs).sum()

    x = args[first].detach()
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(loss_of(leaf), leaf)
    assert_close(torch.func.grad(loss_of)(x), expected, torch.float64, "torch.func.grad")


TRANSFORMS = ("vjp", "jacrev", "jvp", "hessian", "vmap")


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_func_transforms(tier, gen, case, transform):
    """Each ``torch.func`` transform gives what plain autograd gives for the same call (its Jacobian, its
    Jacobian-vector product, its Hessian, a Python loop for ``vmap``), in fp64, differentiating the first
    differentiable argument."""
    args, kwargs = case.make(gen, torch.float64)
    args = [a.to(tier.device) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {k: (v.to(tier.device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    first = case.grad_args[0]

    def f(x):
        full = list(args)
        full[first] = x
        return case.fn(*full, **kwargs)

    x = args[first].detach()
    out = f(x)
    if transform == "vjp":
        go = _grad_output(out, gen)
        _, vjp_fn = torch.func.vjp(f, x)
        leaf = x.clone().requires_grad_(True)
        assert_close(vjp_fn(go)[0], torch.autograd.grad(f(leaf), leaf, go)[0], torch.float64, "vjp")
    elif transform == "jacrev":
        assert_close(torch.func.jacrev(f)(x), torch.autograd.functional.jacobian(f, x), torch.float64, "jacrev")
    elif transform == "jvp":
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        value, tangent = torch.func.jvp(f, (x,), (v,))
        jacobian = torch.autograd.functional.jacobian(f, x).reshape(out.numel(), x.numel())
        assert_close(value, out, torch.float64, "jvp value")
        assert_close(tangent, (jacobian @ v.reshape(-1)).reshape(out.shape), torch.float64, "jvp tangent")
    elif transform == "hessian":
        total = lambda x: f(x).sum()  # noqa: E731
        assert_close(torch.func.hessian(total)(x), torch.autograd.functional.hessian(total, x), torch.float64,
                     "hessian")
    else:  # per-sample values and gradients over a new leading dimension of the argument
        other = (x + torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device) * 0.1).detach()
        stacked = torch.stack([x, other])
        loop = [f(t) for t in (x, other)]
        assert_close(torch.func.vmap(f)(stacked), torch.stack(loop), torch.float64, "vmap value")
        grads = []
        for t in (x, other):
            leaf = t.clone().requires_grad_(True)
            grads.append(torch.autograd.grad(f(leaf).sum(), leaf)[0])
        per_sample = torch.func.vmap(torch.func.grad(lambda t: f(t).sum()))(stacked)
        assert_close(per_sample, torch.stack(grads), torch.float64, "per-sample gradients")


@pytest.mark.parametrize("device", ["meta", "fake"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_meta_and_fake_tensors_give_torch_shapes_and_dtypes(gen, case, device):
    """Shape propagation without data (meta-initialized FSDP, FakeTensorMode): the output's shape and dtype are
    those of the call on real tensors, on every backend (``case.make`` builds CPU tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, kwargs = case.make(gen, torch.float32)
    real = case.fn(*args, **kwargs)
    if device == "meta":
        move = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
        out = case.fn(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
    else:
        with FakeTensorMode(allow_non_fake_inputs=False) as mode:
            move = lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
            out = case.fn(*map(move, args), **{k: move(v) for k, v in kwargs.items()})
    assert (out.shape, out.dtype) == (real.shape, real.dtype)
    assert out.device.type == ("meta" if device == "meta" else "cpu")


def _noncontiguous(t):
    """The same values in a non-contiguous layout: every other element of a doubled last dimension."""
    if t.dim() == 0:
        return t
    doubled = torch.stack([t, torch.full_like(t, 7.0) if t.is_floating_point() else t], dim=-1)
    return doubled.select(-1, 0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_strided_arguments(tier, gen, case):
    state = gen.get_state()
    out, leaves, _, _ = _call(case, tier, gen)
    go = _grad_output(out, gen)
    expected = torch.autograd.grad(out, leaves, go)
    gen.set_state(state)
    strided, leaves, _, _ = _call(case, tier, gen, transform=_noncontiguous)
    assert_close(strided, out, torch.float64, "value with strided arguments")
    for g, e in zip(torch.autograd.grad(strided, leaves, go), expected):
        assert_close(g, e, torch.float64, "gradient with strided arguments")
    if case.stride0 is not None:  # stride-0 (expanded) arguments are read in place, never past their storage
        gen.set_state(state)
        args, kwargs = case.stride0(*case.make(gen, torch.float64))
        args = [a.to(tier.device) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: (v.to(tier.device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        dense = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        dense_kwargs = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        assert any(isinstance(a, torch.Tensor) and 0 in a.stride() for a in list(args) + list(kwargs.values()))
        assert_close(case.fn(*args, **kwargs), case.fn(*dense, **dense_kwargs), torch.float64, "stride-0 value")


def test_torchscript_is_refused_by_name():
    """``torch.jit.script`` of any fusedloss module, alone or inside a model, names the module and the way out
    (TorchScript cannot compile the Triton launchers; its own error would point deep inside them)."""
    import warnings

    from fusedloss import nn

    modules = [cls for cls in vars(nn).values() if isinstance(cls, type) and issubclass(cls, torch.nn.Module)
               and cls.__module__ == nn.__name__ and not cls.__name__.startswith("_")]
    assert len(modules) >= 18
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script itself is deprecated
        for cls in modules:
            with pytest.raises(RuntimeError, match=f"{cls.__name__} cannot be compiled by torch.jit.script"):
                torch.jit.script(cls())
        with pytest.raises(RuntimeError, match="CrossEntropyLoss cannot be compiled by torch.jit.script"):
            torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 4), nn.CrossEntropyLoss()))
