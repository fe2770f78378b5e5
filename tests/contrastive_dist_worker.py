"""One rank of the 2-process ``clip_loss(..., process_group=...)`` test (run by tests/test_contrastive.py).

    python tests/contrastive_dist_worker.py RANK WORLD INIT_FILE OUT_FILE DTYPE N_LOCAL DIM SEED

Builds the global batch from SEED (identical on every rank), keeps rows ``RANK * N_LOCAL ...`` of it, computes the
loss over a gloo group, backpropagates a shared random grad_output and saves the loss and gradients to OUT_FILE.
The backend comes from the environment (TRITON_INTERPRET=1 or FUSEDLOSS_BACKEND=torch), set by the test.
"""

import sys

import torch
import torch.distributed as dist


def main(rank, world, init_file, out_file, dtype, n_local, dim, seed):
    import fusedloss
    from fusedloss.losses.contrastive import clip_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(seed)
        images = torch.randn(world * n_local, dim, generator=gen, dtype=torch.float64)
        texts = torch.randn(world * n_local, dim, generator=gen, dtype=torch.float64)
        grad_out = torch.randn((), generator=gen, dtype=torch.float64)
        rows = slice(rank * n_local, (rank + 1) * n_local)
        image = images[rows].to(dtype).requires_grad_()
        text = texts[rows].to(dtype).requires_grad_()
        logit_scale = torch.tensor(11.0, dtype=torch.float64, requires_grad=True)
        loss = clip_loss(image, text, logit_scale, process_group=dist.group.WORLD)
        (loss * grad_out.to(loss.dtype)).backward()
        torch.save({"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad,
                    "scale_grad": logit_scale.grad, "backend": fusedloss.backend("cpu")}, out_file)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, init_file, out_file, dtype, n_local, dim, seed = sys.argv[1:9]
    main(int(rank), int(world), init_file, out_file, getattr(torch, dtype), int(n_local), int(dim), int(seed))
