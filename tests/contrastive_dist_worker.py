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
    return results


if __name__ == "__main__":
    gloo_rank.serve(main)
