"""One rank of the vocabulary-parallel tests (run by tests/test_vocab_parallel.py).

    python tests/vocab_parallel_worker.py RANK WORLD INIT_FILE OUT_FILE SEED

For every case of ``CASES`` it builds the whole problem from SEED (identical on every rank), computes the loss and
gradients once with this rank's shard of the classes over a gloo group, and once on the whole problem in this
process (the single-process result, same backend), and saves both for the test to compare. The backend comes from
the environment (TRITON_INTERPRET=1 or FUSEDLOSS_BACKEND=torch), set by the test.
"""


import torch
import torch.distributed as dist

import gloo_rank

# (name, options): classes per rank 7 (23 for the linear loss's vocabulary), every option of each family; "uneven":
# the odd ranks hold one class fewer (shards of 7 and 6: the offsets and the class count come from every rank)
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
    ("uneven-smoothing-weight-focal-mean", {"uneven": True, "label_smoothing": 0.1, "weight": True, "ignore": True,
                                            "focal_gamma": 1.0, "alpha": "tensor", "z_loss": 1e-2}),
    ("uneven-probabilities-smoothing-sum", {"uneven": True, "prob": True, "label_smoothing": 0.2,
                                            "reduction": "sum"}),
]
LCE_CASES = [
    ("plain-mean", {}),
    ("shift-bias-smoothing-mean", {"shift": True, "bias": True, "label_smoothing": 0.1}),
    ("focal-z-softcap-sum", {"focal_gamma": 1.0, "z_loss": 1e-3, "softcap": 4.0, "reduction": "sum"}),
    ("lse-none", {"return_lse": True, "reduction": "none", "bias": True}),
    ("uneven-bias-smoothing-lse-mean", {"uneven": True, "bias": True, "label_smoothing": 0.1, "return_lse": True}),
]
LOG_PROB_CASES = [
    ("entropy", {"return_entropy": True}),
    ("uneven-bias-shift-softcap-temperature_tensor-entropy", {"uneven": True, "bias": True, "shift": True,
                                                             "softcap": 4.0, "temperature": "tensor",
                                                             "return_entropy": True}),
]
# (name, what this rank changes): ranks that disagree get the same ValueError on every rank, naming what differs
DISAGREEMENTS = [("rows", "one row fewer on rank 1"), ("input_dtype", "float32 input on rank 1")]


def _shards(n_local, world, uneven):
    """Each rank's slice of the classes: ``n_local`` each, or one fewer on the odd ranks when ``uneven``."""
    widths = [n_local - (r % 2 if uneven else 0) for r in range(world)]
    starts = [sum(widths[:r]) for r in range(world)]
    return [slice(a, a + w) for a, w in zip(starts, widths)]


def _cross_entropy_case(opts, gen, rank, world, group):
    import fusedloss

    n_local, n_rows = 7, 9
    shards = _shards(n_local, world, opts.get("uneven"))
    n_classes = shards[-1].stop
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
    shard = shards[rank]
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


def _lm_head_case(opts, gen, rank, world, group, call, n_out, grad_outs):
    """An LM-head problem (hidden states (3, 5, 16), a vocabulary of ``world`` shards of 23 classes, 20% ignored
    targets): ``call(x, w, b, target, group)`` once with this rank's shard and once whole; returns (this rank's
    outputs and gradients, the whole problem's with this rank's slice of the weight's and bias's gradients).
    ``grad_outs(target)`` gives the gradients of the ``n_out`` outputs."""
    n_local, hidden = 23, 16
    shards = _shards(n_local, world, opts.get("uneven"))
    vocab = shards[-1].stop
    x = torch.randn(3, 5, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if opts.get("bias") else None
    target = torch.randint(0, vocab, (3, 5), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.2] = -100
    gos = grad_outs(target)
    shard = shards[rank]

    def run(w_, b_, group=None):
        leaves = [x.clone().requires_grad_(), w_.detach().requires_grad_()]
        if b_ is not None:
            leaves.append(b_.detach().requires_grad_())
        out = call(leaves[0], leaves[1], leaves[2] if b_ is not None else None, target, group)
        outs = list(out) if n_out == 2 else [out]
        return outs + list(torch.autograd.grad(outs, leaves, gos[:n_out]))

    whole = run(w, b)
    mine = run(w[shard], None if b is None else b[shard], group)
    expected = whole[:n_out] + [whole[n_out], whole[n_out + 1][shard]] + ([whole[n_out + 2][shard]] if b is not None
                                                                           else [])
    return mine, expected


def _linear_cross_entropy_case(opts, gen, rank, world, group):
    import fusedloss

    kw = {k: v for k, v in opts.items() if k not in ("bias", "uneven")}
    out_shape = (3, 5) if opts.get("reduction") == "none" else ()
    return _lm_head_case(
        opts, gen, rank, world, group,
        lambda x, w, b, t, g: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, process_group=g, **kw),
        2 if opts.get("return_lse") else 1,
        lambda t: [torch.rand(out_shape, generator=gen, dtype=torch.float64),
                   torch.rand((3, 5), generator=gen, dtype=torch.float64)])


def _linear_log_probs_case(opts, gen, rank, world, group):
    import fusedloss

    kw = {k: v for k, v in opts.items() if k in ("shift", "softcap", "return_entropy")}
    if opts.get("temperature") == "tensor":
        kw["temperature"] = torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.5
    return _lm_head_case(
        opts, gen, rank, world, group,
        lambda x, w, b, t, g: fusedloss.linear_log_probs(x, w, t, linear_bias=b, process_group=g, **kw),
        2 if opts.get("return_entropy") else 1,
        lambda t: [torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(2)])


def _disagreement(what, gen, rank, group):
    """The ValueError message each family raises when rank 1 differs from the others in ``what``."""
    import fusedloss

    rows = 9 - (what == "rows" and rank == 1)
    dtype = torch.float32 if what == "input_dtype" and rank == 1 else torch.float64
    logits = torch.randn(rows, 7, generator=gen, dtype=torch.float64).to(dtype)
    target = torch.randint(0, 7 * dist.get_world_size(group), (rows,), generator=gen)
    hidden = torch.randn(rows, 16, generator=gen, dtype=torch.float64).to(dtype)
    messages = []
    for call in (lambda: fusedloss.cross_entropy(logits, target, process_group=group),
                 lambda: fusedloss.linear_cross_entropy(hidden, torch.randn(7, 16, generator=gen, dtype=dtype),
                                                        target, process_group=group)):
        try:
            call()
            messages.append("no error")
        except ValueError as error:
            messages.append(str(error))
    return messages


def main(rank, world, seed):
    import fusedloss

    results = {"backend": fusedloss.backend("cpu")}
    for family, cases, run in (("cross_entropy", CE_CASES, _cross_entropy_case),
                               ("linear_cross_entropy", LCE_CASES, _linear_cross_entropy_case),
                               ("linear_log_probs", LOG_PROB_CASES, _linear_log_probs_case)):
        for name, opts in cases:
            gen = torch.Generator().manual_seed(seed)  # the same problem on every rank
            mine, expected = run(opts, gen, rank, world, dist.group.WORLD)
            results[f"{family}/{name}"] = ([t.detach() for t in mine], [t.detach() for t in expected])
    for what, _ in DISAGREEMENTS:
        results[f"disagree/{what}"] = _disagreement(what, torch.Generator().manual_seed(seed), rank,
                                                    dist.group.WORLD)
    return results


if __name__ == "__main__":
    gloo_rank.serve(main)
