"""One rank of the vocabulary-parallel tests (run by tests/test_vocab_parallel.py).

    python tests/vocab_parallel_worker.py RANK WORLD INIT_FILE OUT_FILE SEED

For every case of ``CASES`` it builds the whole problem from SEED (identical on every rank), computes the loss and
gradients once with this rank's shard of the classes over a gloo group, and once on the whole problem in this
process (the single-process result, same backend), and saves both for the test to compare. The backend comes from
the environment (TRITON_INTERPRET=1 or FUSEDLOSS_BACKEND=torch), set by the test.
"""

import sys

import torch
import torch.distributed as dist

import gloo_rank

# (name, function, options): classes per rank 7 (23 for the linear loss's vocabulary), every option of each family
CE_CASES = [
    ("plain-mean", {}),
    ("smoothing-weight-ignore-mean", {"label_smoothing": 0.1, "weight": True, "ignore": True}),
    ("focal-alpha_tensor-z-softcap-sum", {"focal_gamma": 1.5, "alpha": "tensor", "z_loss": 1e-2, "softcap": 3.0,
                                          "reduction": "sum"}),
    ("everything-none", {"label_smoothing": 0.2, "weight": True, "ignore": True, "focal_gamma": 0.5, "alpha": 0.3,
                         "z_loss": 1e-3, "softcap": 5.0, "reduction": "none"}),
    ("k_dim-smoothing-mean", {"label_smoothing": 0.1, "k_dim": True}),
    ("probabilities-weight-smoothing-mean", {"prob": True, "weight": True, "label_smoothing": 0.1, "z_loss": 1e-2}),
    ("probabilities-none", {"prob": True, "reduction": "none", "softcap": 4.0}),
]
LCE_CASES = [
    ("plain-mean", {}),
    ("shift-bias-smoothing-mean", {"shift": True, "bias": True, "label_smoothing": 0.1}),
    ("focal-z-softcap-sum", {"focal_gamma": 1.0, "z_loss": 1e-3, "softcap": 4.0, "reduction": "sum"}),
    ("lse-none", {"return_lse": True, "reduction": "none", "bias": True}),
]


def _cross_entropy_case(opts, gen, rank, world, group):
    import fusedloss

    n_local, n_rows = 7, 9
    n_classes = n_local * world
    shape = (n_rows, n_classes, 3) if opts.get("k_dim") else (n_rows, n_classes)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    if opts.get("prob"):
        target = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), dim=1)
    else:
        target = torch.randint(0, n_classes, shape[:1] + shape[2:], generator=gen)
        if opts.get("ignore"):
            target[torch.rand(target.shape, generator=gen) < 0.3] = -100
    kw = {k: v for k, v in opts.items() if k in ("label_smoothing", "focal_gamma", "z_loss", "softcap", "reduction")}
    if opts.get("weight"):
        kw["weight"] = torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.5
    if opts.get("alpha") == "tensor":
        kw["focal_alpha"] = torch.rand(n_classes, generator=gen, dtype=torch.float64) + 0.5
    elif "alpha" in opts:
        kw["focal_alpha"] = opts["alpha"]
    shard = slice(rank * n_local, (rank + 1) * n_local)
    grad_out = torch.rand(fusedloss.cross_entropy(logits, target, **kw).shape, generator=gen, dtype=torch.float64)

    def run(x, t, group=None):
        x = x.detach().requires_grad_()
        t = t.detach().requires_grad_(t.is_floating_point())
        loss = fusedloss.cross_entropy(x, t, process_group=group, **kw)
        grads = torch.autograd.grad(loss, [x, t] if t.requires_grad else [x], grad_out)
        return [loss] + list(grads)

    whole = run(logits, target)
    sliced = lambda t: t[:, shard] if t.is_floating_point() else t  # noqa: E731  (the class dimension is 1)
    mine = run(sliced(logits), sliced(target), group)
    return mine, [whole[0]] + [sliced(g) for g in whole[1:]]


def _linear_cross_entropy_case(opts, gen, rank, world, group):
    import fusedloss

    n_local, hidden = 23, 16
    vocab = n_local * world
    x = torch.randn(3, 5, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if opts.get("bias") else None
    target = torch.randint(0, vocab, (3, 5), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.2] = -100
    kw = {k: v for k, v in opts.items() if k not in ("bias",)}
    shard = slice(rank * n_local, (rank + 1) * n_local)
    out_shape = (3, 5) if opts.get("reduction") == "none" else ()
    grad_out = torch.rand(out_shape, generator=gen, dtype=torch.float64)
    grad_lse = torch.rand((3, 5), generator=gen, dtype=torch.float64)

    def run(w_, b_, group=None):
        leaves = [x.clone().requires_grad_(), w_.detach().requires_grad_()]
        if b_ is not None:
            leaves.append(b_.detach().requires_grad_())
        out = fusedloss.linear_cross_entropy(leaves[0], leaves[1], target, leaves[2] if b_ is not None else None,
                                             process_group=group, **kw)
        outs, gos = ([out[0], out[1]], [grad_out, grad_lse]) if opts.get("return_lse") else ([out], [grad_out])
        return list(outs) + list(torch.autograd.grad(outs, leaves, gos))

    whole = run(w, b)
    mine = run(w[shard], None if b is None else b[shard], group)
    n_out = 2 if opts.get("return_lse") else 1
    expected = whole[:n_out] + [whole[n_out], whole[n_out + 1][shard]] + ([whole[n_out + 2][shard]] if b is not None
                                                                           else [])
    return mine, expected


def main(rank, world, init_file, out_file, seed):
    import fusedloss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {"backend": fusedloss.backend("cpu")}
        for family, cases, run in (("cross_entropy", CE_CASES, _cross_entropy_case),
                                   ("linear_cross_entropy", LCE_CASES, _linear_cross_entropy_case)):
            for name, opts in cases:
                gen = torch.Generator().manual_seed(seed)  # the same problem on every rank
                mine, expected = run(opts, gen, rank, world, dist.group.WORLD)
                results[f"{family}/{name}"] = ([t.detach() for t in mine], [t.detach() for t in expected])
        torch.save(results, out_file)
    except BaseException:
        dist.destroy_process_group()
        raise
    gloo_rank.finish(dist)


if __name__ == "__main__":
    rank, world, init_file, out_file, seed = sys.argv[1:6]
    main(int(rank), int(world), init_file, out_file, int(seed))
