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
        assert set(result) == {c[0] for c in CASES} | {"loss_parallel"}
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
