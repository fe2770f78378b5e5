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
