"""DTensor arguments (``fusedloss._dtensor``): on 2 and 4 gloo ranks of a 1-D DeviceMesh, both CPU backends, every
placement served (replicated; the vocabulary sharded as ``Shard(0)`` of the LM head or ``Shard(1)`` of logits; the
tokens sharded) gives each rank the single-process result, as the DTensor of the output's placement holds it, and the
single-process gradients with the inputs' placements; torch's own ``loss_parallel()`` + ``F.cross_entropy`` on the
same ``Shard(1)`` logits agrees; every refused placement raises the same ValueError on every rank
(tests/dtensor_worker.py lists the cases)."""

import pytest
import torch

from conftest import assert_close, run_gloo_ranks


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend_name", ["interpret", "torch"])
def test_placements_reproduce_the_single_process_result(tmp_path, world, backend_name):
    results = run_gloo_ranks(tmp_path, "dtensor_worker.py", backend_name, world, 7)
    from dtensor_worker import CASES, REFUSED

    for name, _, _ in REFUSED:
        messages = [r.pop(f"refused/{name}") for r in results]
        assert messages[0] != "no error", f"{name} was not refused"
        assert all(m == messages[0] for m in messages), messages
    for rank, result in enumerate(results):
        assert set(result) == {c[0] for c in CASES} | {"loss_parallel"}, "every case of the worker ran"
        for case, rows in result.items():
            for what, got, want in rows:
                assert_close(got, want, torch.float64, f"rank {rank}, {case}, {what}")


@pytest.mark.parametrize("backend_name", ["interpret", "torch"])
def test_fsdp2_training_matches_one_process(tmp_path, backend_name):
    """A tiny Llama sharded by ``fully_shard`` on 2 gloo ranks (the same batch on both), 3 SGD steps with the loss
    from the Hugging Face integration and from ``linear_cross_entropy`` in a method registered with
    ``register_fsdp_forward_method``: the losses and the final parameters of the unwrapped model trained on one
    process with transformers' own loss."""
    pytest.importorskip("transformers")
    from fsdp_worker import batch, make_model, train

    seed = 11
    results = run_gloo_ranks(tmp_path, "fsdp_worker.py", backend_name, 2, seed)
    ref = make_model(seed)
    input_ids, labels = batch(seed)
    want_losses, want_params = train(ref, lambda ids, y: ref(input_ids=ids, labels=y).loss, input_ids, labels)
    for rank, result in enumerate(results):
        for way in ("integration", "direct"):
            losses, params = result[way]
            assert_close(torch.tensor(losses), torch.tensor(want_losses), torch.float32, f"rank {rank}, {way}: losses")
            for name, p in params.items():
                assert_close(p, want_params[name], torch.float32, f"rank {rank}, {way}: {name}")


def test_mesh_of_one_on_cuda(tier, gen, tmp_path):
    """The CUDA tier's check of the DTensor plumbing on one GPU: an NCCL mesh of one rank, vocabulary-sharded logits
    and LM head (the sharded paths with W = 1) give the plain call's results and gradients."""
    if tier.name != "cuda":
        pytest.skip("NCCL on a GPU (the CPU tiers run 2 and 4 gloo ranks above)")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fusedloss

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        logits = (torch.randn(64, 1000, generator=gen) * 3).cuda().requires_grad_()
        hidden = torch.randn(64, 32, generator=gen).cuda().requires_grad_()
        weight = (torch.randn(1000, 32, generator=gen) / 32 ** 0.5).cuda().requires_grad_()
        target = torch.randint(0, 1000, (64,), generator=gen).cuda()
        plain = [fusedloss.cross_entropy(logits, target), fusedloss.linear_cross_entropy(hidden, weight, target)]
        plain_grads = torch.autograd.grad(plain, [logits, hidden, weight])
        leaves = [distribute_tensor(logits.detach(), mesh, [Shard(1)]).requires_grad_(),
                  distribute_tensor(hidden.detach(), mesh, [Replicate()]).requires_grad_(),
                  distribute_tensor(weight.detach(), mesh, [Shard(0)]).requires_grad_()]
        dt_target = distribute_tensor(target, mesh, [Replicate()])
        outs = [fusedloss.cross_entropy(leaves[0], dt_target),
                fusedloss.linear_cross_entropy(leaves[1], leaves[2], dt_target)]
        grads = torch.autograd.grad(outs, leaves)
        for got, want in zip([*outs, *grads], [*plain, *plain_grads]):
            assert_close(got.to_local(), want, torch.float32)
    finally:
        dist.destroy_process_group()
