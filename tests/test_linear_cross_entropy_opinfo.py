"""``fusedloss.linear_cross_entropy`` against torch's own ``F.linear_cross_entropy`` on every sample of torch's OpInfo
database for it (``nn.functional.linear_cross_entropy``: the reference, "chunked" and "chunked_none" variants, in
each dtype): the value and the gradient of every tensor that requires one (input, linear weight, linear bias,
probability target) within the tolerance table of the fp64 reference (torch's function on the samples upcast to
fp64), and each OpInfo error input raising an exception that ``except RuntimeError`` (torch's type) catches.
Needs torch >= 2.13 (the function and its database) and expecttest (which the database imports)."""

import pytest
import torch
import torch.nn.functional as F

import fusedloss

from conftest import TOL, rel_err

pytest.importorskip("expecttest", reason="torch's OpInfo database imports expecttest (the test extra installs it)")
if not hasattr(F, "linear_cross_entropy"):
    pytest.skip("torch < 2.13 has no F.linear_cross_entropy", allow_module_level=True)

from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

OPS = {op.variant_test_name or "reference": op for op in op_db if op.name == "nn.functional.linear_cross_entropy"}
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _fp64(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64).requires_grad_(value.requires_grad)
    return value


def _differentiable(args, kwargs):
    return [t for t in (*args, kwargs.get("linear_bias")) if isinstance(t, torch.Tensor) and t.requires_grad]


def _value_and_grads(fn, args, kwargs, gen):
    out = fn(*args, **kwargs)
    leaves = _differentiable(args, kwargs)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    return out, torch.autograd.grad(out, leaves, grad_out) if leaves else ()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", sorted(OPS))
def test_every_opinfo_sample(tier, variant, dtype):
    op = OPS[variant]
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples, f"torch's database has no {variant} sample in {dtype}"
    failures = []
    for index, sample in enumerate(samples):
        args = (sample.input, *sample.args)
        kwargs = dict(sample.kwargs)
        ref_args, ref_kwargs = [_fp64(a) for a in args], {k: _fp64(v) for k, v in kwargs.items()}
        ref_kwargs.pop("options", None)  # torch's reference path, in fp64
        ref, ref_grads = _value_and_grads(F.linear_cross_entropy, ref_args, ref_kwargs,
                                          torch.Generator().manual_seed(index))
        out, grads = _value_and_grads(fusedloss.linear_cross_entropy, args, kwargs,
                                      torch.Generator().manual_seed(index))
        what = f"sample {index}: shapes {[tuple(a.shape) for a in args]}, kwargs {sorted(kwargs)}"
        expected_dtype = torch.promote_types(dtype, args[2].dtype) if args[2].is_floating_point() else dtype
        if out.dtype != expected_dtype:
            failures.append(f"{what}: dtype {out.dtype}, torch's {expected_dtype}")
        errors = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
        if len(grads) != len(ref_grads) or max(errors) > TOL[dtype]:
            failures.append(f"{what}: relative errors {['%.1e' % e for e in errors]} > {TOL[dtype]:.0e}")
    print(f"{variant} {dtype}: {len(samples) - len(failures)} of {len(samples)} samples agree")
    assert not failures, f"{len(failures)} of {len(samples)} samples disagree:\n" + "\n".join(failures[:10])


@pytest.mark.parametrize("variant", sorted(OPS))
def test_every_opinfo_error_input_raises_what_torch_raises(tier, variant):
    for error in OPS[variant].error_inputs("cpu"):
        sample = error.sample_input
        with pytest.raises(RuntimeError):  # torch raises RuntimeError for each (error.error_regex)
            F.linear_cross_entropy(sample.input, *sample.args, **sample.kwargs)
        with pytest.raises(RuntimeError) as caught:
            fusedloss.linear_cross_entropy(sample.input, *sample.args, **sample.kwargs)
        assert isinstance(caught.value, ValueError), "fusedloss's argument errors are ValueErrors too"
        named = ("input", "linear_weight", "linear_bias", "target", "ignore_index")
        assert any(name in str(caught.value) for name in named), f"no argument named in {caught.value}"
