"""Device side of fusedloss: the ``@triton.jit`` kernels and their launchers, installed as ``fusedloss.kernels``.

``INTERPRETED`` records whether the kernels were decorated under ``TRITON_INTERPRET=1``: Triton reads that
variable when ``@triton.jit`` runs, so it is fixed for the life of the process once this package is imported.
"""

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
