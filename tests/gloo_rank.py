"""The end of a gloo worker (tests/*_worker.py, run by ``conftest.run_gloo_ranks``); no pytest or fusedloss import,
so the worker's backend stays the one its environment selects."""

import os
import sys


def serve(main):
    """Run ``main(rank, world, *args)`` as one rank of a gloo group, from ``sys.argv``: RANK WORLD INIT_FILE OUT_FILE
    and the ARGS of ``conftest.run_gloo_ranks`` (integers as ints, the others as strings); save the dict it returns
    to OUT_FILE, then ``finish``. A failure tears the group down and propagates (the test reports the rank's
    output)."""
    import torch
    import torch.distributed as dist

    rank, world, init_file, out_file, *args = sys.argv[1:]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=int(rank), world_size=int(world))
    try:
        args = [int(a) if a.lstrip("-").isdigit() else a for a in args]
        torch.save(main(int(rank), int(world), *args), out_file)
    except BaseException:
        dist.destroy_process_group()
        raise
    finish(dist)


def finish(dist):
    """A worker's last step once its results are saved: wait for every rank (so none tears the group down while a
    peer still sends), destroy the group, and leave without the interpreter's finalization. At finalization gloo's
    threads can still release tensors that need the GIL being torn down, which aborts the process (std::terminate,
    exit -6) after its results were written: seen once in CI in a 4-rank run (pytorch/pytorch#179291)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
