"""Host side of each loss family: argument checks, buffers, autograd Functions and the torch backend.

Each module here pairs with the kernel module of the same name in ``fusedloss.kernels``. The public functions are
re-exported from ``fusedloss``; this package does not re-export them, so no function shadows its module.
"""
