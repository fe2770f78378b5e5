"""Device side of fusedloss: the ``@triton.jit`` kernels and their launchers, installed as ``fusedloss.kernels``.

``INTERPRETED`` records whether the kernels were decorated under ``TRITON_INTERPRET=1``: Triton reads that
variable when ``@triton.jit`` runs, so it is fixed for the life of the process once this package is imported.
"""

import os


def _hand_over_top_level_name():
    """This folder was imported as a top-level ``kernels``: Python puts the working directory on ``sys.path``
    (``python -m pytest`` or ``python -c`` in a checkout), and the repository root holds ``kernels/``. That name
    belongs to another distribution (Hugging Face's ``kernels``, which transformers imports since 5.x), so the
    import is handed to the installed one; without it, the name is refused instead of exposing fusedloss's
    launchers under it."""
    import importlib.machinery
    import importlib.util
    import sys

    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
    if spec is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r} (the folder {os.path.dirname(__file__)} is "
                                  "fusedloss's device code, imported as fusedloss.kernels)", name=__name__)
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module  # what the import statement returns once this file has run
    spec.loader.exec_module(module)


if __name__ == "fusedloss.kernels":
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
else:
    _hand_over_top_level_name()
