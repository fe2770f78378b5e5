"""One rank of the per-rank memory test of the contrastive losses across ranks (run by tests/test_contrastive.py).

    python tests/contrastive_memory_worker.py RANK WORLD INIT_FILE OUT_FILE N_LOCAL DIM

For ``dist_impl`` "gather" and "ring", ``clip_loss`` and ``siglip_loss`` forward and backward on this rank's
``N_LOCAL x DIM`` fp32 features (the same local batch at every world size), each call's peak resident memory over
the memory resident before it: the kernel's high-water mark (``VmHWM``) is reset first (``/proc/self/clear_refs``,
Linux >= 4.0), so the peak is the call's own. Saves the peaks (bytes) and the losses and gradients.
"""

import re

import torch
import torch.distributed as dist

import gloo_rank


def resident_bytes(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def main(rank, world, n_local, dim):
    import fusedloss

    gen = torch.Generator().manual_seed(1000 + rank)
    image, text = (torch.randn(n_local, dim, generator=gen) for _ in range(2))
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    results = {"backend": fusedloss.backend("cpu")}
    for dist_impl in ("gather", "ring", "gather"):  # (gather twice: the first call pays one-time allocations)
        for kind, loss_fn in (("clip", fusedloss.clip_loss), ("siglip", fusedloss.siglip_loss)):
            leaves = [t.clone().requires_grad_() for t in (image, text, scale, bias)]
            dist.barrier()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = resident_bytes("VmRSS")
            loss = loss_fn(*leaves, process_group=dist.group.WORLD, dist_impl=dist_impl)
            grads = torch.autograd.grad(loss, leaves[:3])
            peak = resident_bytes("VmHWM") - before
            results[(kind, dist_impl)] = {"peak": peak, "loss": loss.detach(), "grads": [g.detach() for g in grads]}
            del loss, grads, leaves
    return results


if __name__ == "__main__":
    gloo_rank.serve(main)
