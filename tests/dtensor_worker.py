"""One rank of the DTensor tests (run by tests/test_dtensor.py).

    python tests/dtensor_worker.py RANK WORLD INIT_FILE OUT_FILE SEED

On a 1-D gloo DeviceMesh of WORLD ranks, for every case of ``CASES`` it builds the whole problem from SEED (identical
on every rank), distributes its tensors with the case's placements, runs the fusedloss function on the DTensors and
saves, per output and per gradient, this rank's local result, its placement, and the single-process result (the
same function on plain tensors, same backend) as the DTensor of that placement would hold it on this rank. For every
case of ``REFUSED`` it saves the ValueError message. ``loss_parallel`` compares with torch's own.
"""


import torch
import torch.nn.functional as F

import gloo_rank


def _problem(gen, n=12):
    hidden, vocab = 16, 46
    return dict(
        logits=torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2,
        hidden=torch.randn(n, hidden, generator=gen, dtype=torch.float64),
        weight=torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5,
        bias=torch.randn(vocab, generator=gen, dtype=torch.float64),
        target=torch.where(torch.rand(n, generator=gen) < 0.2, -100, torch.randint(0, vocab, (n,), generator=gen)),
        class_weight=torch.rand(vocab, generator=gen, dtype=torch.float64) + 0.5,
    )


# (name, function of the problem's tensors, {tensor: placement}, differentiable tensors, output placement)
def _ce(kw):
    import fusedloss

    return lambda p: fusedloss.cross_entropy(p["logits"], p["target"], **kw)


def _lce(kw):
    import fusedloss

    return lambda p: fusedloss.linear_cross_entropy(p["hidden"], p["weight"], p["target"],
                                                    linear_bias=p.get("bias"), **kw)


def _llp(kw):
    import fusedloss

    return lambda p: fusedloss.linear_log_probs(p["hidden"], p["weight"], p["target"], linear_bias=p.get("bias"),
                                                return_entropy=True, **kw)


CASES = [
    ("cross_entropy-replicated", _ce(dict(label_smoothing=0.1)), {"logits": "R", "target": "R"}, ["logits"]),
    ("cross_entropy-vocab_sharded", _ce(dict(label_smoothing=0.1, z_loss=1e-3)), {"logits": "S1", "target": "R"},
     ["logits"]),
    ("cross_entropy-tokens_sharded-none", _ce(dict(reduction="none")), {"logits": "S0", "target": "S0"}, ["logits"]),
    ("linear_cross_entropy-replicated", _lce(dict(softcap=3.0)), {"hidden": "R", "weight": "R", "bias": "R",
                                                                   "target": "R"}, ["hidden", "weight", "bias"]),
    ("linear_cross_entropy-vocab_sharded", _lce(dict(label_smoothing=0.1)),
     {"hidden": "R", "weight": "S0", "bias": "S0", "target": "R"}, ["hidden", "weight", "bias"]),
    ("linear_cross_entropy-tokens_sharded-none", _lce(dict(reduction="none")),
     {"hidden": "S0", "weight": "R", "bias": "R", "target": "S0"}, ["hidden", "weight", "bias"]),
    ("linear_log_probs-vocab_sharded", _llp(dict(temperature=0.8)),
     {"hidden": "R", "weight": "S0", "bias": "S0", "target": "R"}, ["hidden", "weight", "bias"]),
    ("linear_log_probs-tokens_sharded", _llp(dict(temperature=0.8)),
     {"hidden": "S0", "weight": "R", "target": "S0"}, ["hidden", "weight"]),
    # 11 tokens: shards of unequal size (the outputs' global shape comes from the input's)
    ("cross_entropy-tokens_sharded-uneven-none", _ce(dict(reduction="none")), {"logits": "S0", "target": "S0"},
     ["logits"], 11),
]
# (name, function, placements): refused with a ValueError on every rank
REFUSED = [
    ("partial", _ce({}), {"logits": "P", "target": "R"}),
    ("tokens_sharded-mean", _ce({}), {"logits": "S0", "target": "S0"}),
    ("sharded_weight-plain_hidden", _lce({}), {"weight": "S0"}),
    ("both_sharded", _lce({}), {"hidden": "S0", "weight": "S0", "target": "S0"}),
    ("hidden_dimension_sharded", _lce(dict(reduction="none")), {"hidden": "S1", "weight": "R", "target": "R"}),
    ("shift_across_token_shards", _lce(dict(reduction="none", shift=True)),
     {"hidden": "S0", "weight": "R", "target": "S0"}),
]


def _placement(code):
    from torch.distributed.tensor import Partial, Replicate, Shard

    return {"R": Replicate(), "S0": Shard(0), "S1": Shard(1), "P": Partial()}[code]


def _distribute(t, mesh, code):
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    if code == "P":  # a partial sum: each rank holds 1 / world of the value
        return DTensor.from_local(t / mesh.size(), mesh, [_placement("P")], run_check=False)
    return distribute_tensor(t, mesh, [_placement(code)]) if code != "R" else \
        distribute_tensor(t, mesh, [Replicate()])


def _local_view(t, code, rank, world):
    """What a DTensor of ``code`` placement holding ``t`` keeps on ``rank`` (torch.chunk's split)."""
    if code in ("R", None):
        return t
    dim = 0 if code == "S0" else 1
    chunks = t.chunk(world, dim=dim)
    return chunks[rank] if rank < len(chunks) else t.narrow(dim, 0, 0)


def _run_case(fn, placements, grads, gen, mesh, rank, world, n=12):
    problem = _problem(gen, n)
    problem = {k: v for k, v in problem.items() if k in placements or k == "target" or
               (k == "bias" and "bias" in placements)}
    leaves = {k: problem[k].clone().requires_grad_(k in grads) for k in problem}
    whole = fn(leaves)
    whole = whole if isinstance(whole, tuple) else (whole,)
    gos = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in whole]
    whole_grads = torch.autograd.grad(whole, [leaves[k] for k in grads], gos)
    dist_leaves = {k: _distribute(problem[k], mesh, placements[k]).requires_grad_(k in grads) if k in placements
                   else problem[k] for k in problem}
    outs = fn(dist_leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    from torch.distributed.tensor import DTensor, distribute_tensor

    dist_gos = [distribute_tensor(g, mesh, list(o.placements)) for g, o in zip(gos, outs)]
    got_grads = torch.autograd.grad(outs, [dist_leaves[k] for k in grads], dist_gos)
    result = []
    for o, w in zip(outs, whole):
        assert isinstance(o, DTensor), f"an output is a {type(o).__name__}, not a DTensor"
        code = "S0" if o.placements[0].is_shard() else "R"
        result.append((f"output {code}", o.to_local(), _local_view(w, code, rank, world)))
    tokens_sharded = "S0" in (placements.get("logits"), placements.get("hidden"))
    assert all(tuple(o.shape) == tuple(w.shape) for o, w in zip(outs, whole)), "an output's global shape"
    for k, g, w in zip(grads, got_grads, whole_grads):
        if tokens_sharded and placements[k] == "R":  # each rank's share of a replicated weight's gradient
            assert g.placements[0].is_partial(), f"{k}'s gradient placement {g.placements}"
            result.append((f"grad {k} partial, summed", g.full_tensor(), w))
            continue
        assert tuple(g.placements) == tuple(dist_leaves[k].placements), f"{k}'s gradient placement {g.placements}"
        result.append((f"grad {k} {placements[k]}", g.to_local(), _local_view(w, placements[k], rank, world)))
    return result


def _loss_parallel_case(gen, mesh):
    """torch's loss_parallel() + F.cross_entropy on Shard(1) logits against fusedloss on the same DTensors."""
    from torch.distributed.tensor.parallel import loss_parallel

    import fusedloss

    problem = _problem(gen)
    logits = _distribute(problem["logits"], mesh, "S1").requires_grad_()
    target = _distribute(problem["target"], mesh, "R")
    ours = fusedloss.cross_entropy(logits, target)
    (g_ours,) = torch.autograd.grad(ours, [logits])
    with loss_parallel():
        theirs = F.cross_entropy(logits, target)
        (g_theirs,) = torch.autograd.grad(theirs, [logits])
    return [("loss", ours.to_local(), theirs.to_local()), ("grad logits", g_ours.to_local(), g_theirs.to_local())]


def main(rank, world, seed):
    from torch.distributed.device_mesh import init_device_mesh

    import fusedloss

    mesh = init_device_mesh("cpu", (world,))
    results = {"backend": fusedloss.backend("cpu")}
    for name, fn, placements, grads, *n in CASES:
        results[name] = _run_case(fn, placements, grads, torch.Generator().manual_seed(seed), mesh, rank, world, *n)
    results["loss_parallel"] = _loss_parallel_case(torch.Generator().manual_seed(seed), mesh)
    for name, fn, placements in REFUSED:
        problem = _problem(torch.Generator().manual_seed(seed))
        args = {k: (_distribute(v, mesh, placements[k]) if k in placements else v) for k, v in problem.items()}
        try:
            fn(args)
            results[f"refused/{name}"] = "no error"
        except ValueError as error:
            results[f"refused/{name}"] = str(error)
    return results


if __name__ == "__main__":
    gloo_rank.serve(main)
