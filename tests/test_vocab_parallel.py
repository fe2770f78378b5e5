"""Vocabulary-parallel cross-entropy and linear cross-entropy (``process_group=``): 2 and 4 gloo ranks on CPU, each
holding a shard of the classes, reproduce the single-process loss and that shard of its gradients to fp64
round-off, for every option of both families (tests/vocab_parallel_worker.py lists the cases), on both CPU backends.
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import DEVICE, assert_close

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_ranks(tmp_path, world, backend_name, seed=2024):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDLOSS_BACKEND")}
    env.update({"TRITON_INTERPRET": "1"} if backend_name == "interpret" else {"FUSEDLOSS_BACKEND": "torch"})
    env["FUSEDLOSS_POISON"] = "1"
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "vocab_parallel_worker.py"), str(r), str(world),
                               str(tmp_path / "init"), str(outs[r]), str(seed)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(world)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a gloo rank did not finish in 300 s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"rank failed:\n{log[-4000:]}"
    return [torch.load(o) for o in outs]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend_name", ["interpret", "torch"])
def test_shards_reproduce_the_single_process_result(tmp_path, world, backend_name):
    if DEVICE != "cpu":
        pytest.skip("the gloo tests run in the CPU session; the CUDA tier runs the kernels on one GPU")
    if backend_name == "interpret":
        pytest.importorskip("triton")
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    results = _run_ranks(tmp_path, world, backend_name)
    expected_backend = "triton-interpret" if backend_name == "interpret" else "torch"
    assert {r.pop("backend") for r in results} == {expected_backend}
    assert len(results[0]) == 11, "every case of the worker ran"
    for rank, result in enumerate(results):
        for case, (mine, single) in result.items():
            assert len(mine) == len(single)
            for index, (got, want) in enumerate(zip(mine, single)):
                assert_close(got, want, torch.float64, f"rank {rank}, {case}, output {index}")


def test_group_of_one_on_cuda(tier, gen, tmp_path):
    """The CUDA tier's check of the collectives' plumbing on one GPU: an NCCL group of one rank gives the
    single-process result (the kernels' sharded paths with W = 1)."""
    if tier.name != "cuda":
        pytest.skip("NCCL on a GPU (the CPU tiers run 2 and 4 gloo ranks above)")
    import torch.distributed as dist

    import fusedloss

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        x = (torch.randn(64, 1000, generator=gen) * 3).cuda().requires_grad_()
        t = torch.randint(0, 1000, (64,), generator=gen).cuda()
        kw = dict(label_smoothing=0.1, focal_gamma=1.0, z_loss=1e-3)
        single = fusedloss.cross_entropy(x, t, **kw)
        (g_single,) = torch.autograd.grad(single, x)
        sharded = fusedloss.cross_entropy(x, t, process_group=dist.group.WORLD, **kw)
        (g_sharded,) = torch.autograd.grad(sharded, x)
        assert_close(sharded, single, torch.float32, "loss")
        assert_close(g_sharded, g_single, torch.float32, "gradient")
        h = torch.randn(64, 256, generator=gen).cuda().requires_grad_()
        w = (torch.randn(1000, 256, generator=gen) / 16).cuda().requires_grad_()
        single = fusedloss.linear_cross_entropy(h, w, t, **kw)
        grads_single = torch.autograd.grad(single, [h, w])
        sharded = fusedloss.linear_cross_entropy(h, w, t, process_group=dist.group.WORLD, **kw)
        for got, want in zip(torch.autograd.grad(sharded, [h, w]), grads_single):
            assert_close(got, want, torch.float32, "gradient")
    finally:
        dist.destroy_process_group()
