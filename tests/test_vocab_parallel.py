"""Vocabulary-parallel cross-entropy, linear cross-entropy and linear log-probs (``process_group=``): 2 and 4 gloo
ranks on CPU, each holding a shard of the classes, reproduce the single-process result and that shard of its
gradients to fp64 round-off, for every option of each family (tests/vocab_parallel_worker.py lists the cases), on
both CPU backends.
"""

import pytest
import torch

from conftest import assert_close, run_gloo_ranks


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend_name", ["interpret", "torch"])
def test_shards_reproduce_the_single_process_result(tmp_path, world, backend_name):
    results = run_gloo_ranks(tmp_path, "vocab_parallel_worker.py", backend_name, world, 2024)
    from vocab_parallel_worker import CE_CASES, DISAGREEMENTS, LCE_CASES, LOG_PROB_CASES

    cases = len(CE_CASES) + len(LCE_CASES) + len(LOG_PROB_CASES) + len(DISAGREEMENTS)
    assert len(results[0]) == cases, "every case of the worker ran"
    for what, _ in DISAGREEMENTS:  # the same error on every rank, naming what differs, not a one-sided abort
        messages = [r.pop(f"disagree/{what}") for r in results]
        for message in messages[0]:
            assert f"ranks disagree on {what}" in message, message
        assert all(m == messages[0] for m in messages), messages
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
