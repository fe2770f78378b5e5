"""The backward of a fused ``mean``/``sum`` path: the forward launch already wrote the gradients, scaled by the
reduction; the backward multiplies them by the 0-d ``grad_output`` in place, with no pass when it is 1."""


def scale_fused_grads(grads, grad_output):
    """The gradients a fused forward wrote (None where autograd needs none), times the 0-d ``grad_output``: in
    place, and without a pass when it is 1 (``kernels._common.scale_unless_one``)."""
    from ._family import scale_unless_one

    return [None if g is None else scale_unless_one(g, grad_output) for g in grads]
