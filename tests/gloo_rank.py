"""The end of a gloo worker (tests/*_worker.py, run by ``conftest.run_gloo_ranks``); no pytest or fusedloss import,
so the worker's backend stays the one its environment selects."""

import os
import sys


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
