"""One rank of the multi-process ``clip_loss`` / ``siglip_loss`` tests (run by tests/test_contrastive.py).

    python tests/contrastive_dist_worker.py RANK WORLD INIT_FILE OUT_FILE N_LOCAL DIM SEED DIST_IMPL

Builds the global batch from SEED (identical on every rank: ``dist_batch``, which the test uses too), keeps rows
``RANK * N_LOCAL ...`` of it and, over a gloo group, for each loss: calls it, backpropagates this rank's own
grad_output, and takes the gradients once more with ``create_graph=True`` (the definition's path across ranks).
DIST_IMPL: fusedloss's ``"gather"`` or ``"ring"`` (for ``nn.SigLipLoss`` the open_clip exchange that runs it).
Saves the losses and gradients to OUT_FILE. The backend comes from the environment (TRITON_INTERPRET=1 or
FUSEDLOSS_BACKEND=torch), set by the test.
"""


import torch
import torch.distributed as dist

import gloo_rank


def dist_batch(world, n_local, dim, seed):
    """(images, texts, logit_scale, logit_bias, grad_outputs) in fp64: the global batch of ``world * n_local``
    pairs, open_clip's initial ``logit_scale.exp()`` of SigLIP (10) and bias (-10), one grad_output per rank."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(world * n_local, dim, generator=gen, dtype=torch.float64)
    texts = images + torch.randn(world * n_local, dim, generator=gen, dtype=torch.float64)
    grad_outs = torch.rand(world, generator=gen, dtype=torch.float64) + 0.5
    return images, texts, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64), grad_outs


def retrieval_batch(world, n_local, dim, seed):
    """(queries, keys, shared, per_query, ids, temperature) in fp64 for ``info_nce`` across ranks: per rank
    ``n_local`` queries, ``n_local + 2`` keys (a queue of 2), 3 shared and 2 per-query negatives; ids drawn from
    ``n_local`` values, so that queries share positives within and across ranks."""
    gen = torch.Generator().manual_seed(seed + 1)
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    queries = draw(world * n_local, dim)
    keys = draw(world * (n_local + 2), dim)
    keys.view(world, n_local + 2, dim)[:, :n_local] += queries.view(world, n_local, dim)
    ids = torch.randint(0, n_local, (world * (n_local + 2),), generator=gen)
    temperature = torch.tensor(0.2, dtype=torch.float64)
    return queries, keys, draw(world * 3, dim), draw(world * n_local, 2, dim), ids, temperature


RETRIEVAL_MARGIN = 0.1


def main(rank, world, n_local, dim, seed, dist_impl):
    import fusedloss

    images, texts, scale, bias, grad_outs = dist_batch(world, n_local, dim, seed)
    rows = slice(rank * n_local, (rank + 1) * n_local)
    results = {"backend": fusedloss.backend("cpu")}
    open_clip_exchange = {"gather": "gather", "ring": "shift"}[dist_impl]
    modules = {"clip": fusedloss.nn.ClipLoss(process_group=dist.group.WORLD, dist_impl=dist_impl),
               "siglip": fusedloss.nn.SigLipLoss(process_group=dist.group.WORLD, dist_impl=open_clip_exchange)}
    for kind, module in modules.items():
        image = images[rows].clone().requires_grad_()
        text = texts[rows].clone().requires_grad_()
        logit_scale = scale.clone().requires_grad_()
        logit_bias = bias.clone().requires_grad_()
        model_out = {"image_features": image, "text_features": text, "logit_scale": logit_scale,
                     "logit_bias": logit_bias}
        loss = module(**model_out, output_dict=True)["contrastive_loss"]
        leaves = [image, text, logit_scale, logit_bias]
        grads = torch.autograd.grad(loss, leaves, grad_outs[rank], retain_graph=True)
        higher = torch.autograd.grad(loss, leaves, grad_outs[rank], create_graph=True)
        results[kind] = {"loss": loss.detach(), "grads": [g.detach() for g in grads],
                         "create_graph": [g.detach() for g in higher]}
    queries, keys, shared, per_query, ids, temperature = retrieval_batch(world, n_local, dim, seed)
    key_rows = slice(rank * (n_local + 2), (rank + 1) * (n_local + 2))
    for variant, negatives in (("shared", shared.view(world, 3, dim)[rank]), ("per_query", per_query[rows])):
        leaves = [t.clone().requires_grad_() for t in (queries[rows], keys[key_rows], negatives, temperature)]
        loss = fusedloss.info_nce(*leaves[:2], leaves[3], negatives=leaves[2], positive_ids=ids[key_rows],
                                  false_negative_margin=RETRIEVAL_MARGIN, process_group=dist.group.WORLD,
                                  dist_impl=dist_impl)
        grads = torch.autograd.grad(loss, leaves, grad_outs[rank], retain_graph=True)
        higher = torch.autograd.grad(loss, leaves, grad_outs[rank], create_graph=True)
        results["info_nce_" + variant] = {"loss": loss.detach(), "grads": [g.detach() for g in grads],
                                          "create_graph": [g.detach() for g in higher]}
    from conftest import readme_example  # the README's retrieval call, on the shared-negatives batch

    namespace = dict(fusedloss=fusedloss, dist=dist, query=queries[rows], key=keys[key_rows],
                     hard_negatives=shared.view(world, 3, dim)[rank], doc_ids=ids[key_rows])
    exec(readme_example("retrieval"), namespace)
    results["readme_retrieval"] = namespace["loss"]
    # ranks that disagree get the same ValueError on every rank, naming what differs (a ring would hang instead)
    image, text = images[rows].clone().requires_grad_(), texts[rows].clone().requires_grad_(rank != 1)
    query, key = queries[rows].clone().requires_grad_(), keys[key_rows][:n_local + (rank == 1)].clone()
    for what, call in (
            ("text_features_grad", lambda: fusedloss.clip_loss(image, text, scale, process_group=dist.group.WORLD,
                                                               dist_impl="ring")),
            ("key_rows", lambda: fusedloss.info_nce(query, key, process_group=dist.group.WORLD,
                                                    dist_impl=dist_impl))):
        try:
            call()
        except ValueError as error:
            results["disagree/" + what] = str(error)
    return results


if __name__ == "__main__":
    gloo_rank.serve(main)
