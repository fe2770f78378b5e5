"""Operand layouts of the elementwise loss kernels (``pointwise``, ``binary``): how each operand of a broadcast is
read through its strides, on the device (``flat_offsets``, ``load_operand``) and on the host (``walkable``,
``launch_strides``, ``operand_strides``).

Operand layouts. The operands broadcast to one shape, seen as a ``(rows, n_cols)`` matrix with ``n_cols`` its last
dimension. Each operand is read through a (row, column) stride pair of its broadcast view: a per-class vector
has row stride 0, a scalar both 0, a transposed or sliced matrix its own strides. When every operand is contiguous
of the shape or a single broadcast element (``STRIDED=False``), element ``k`` is at ``k * stride_col`` (1 or 0)
and no index is divided; otherwise (``STRIDED=True``) each program splits its flat offsets into (row, column)
once, with one 64-bit division, and every operand reads at ``row * stride_row + col * stride_col``. An optional
operand of a single element (a scalar ``weight``, ``margin`` or ``grad_scale``) is loaded once per program.
Operands whose dimensions do not merge into such a pair (``operand_strides`` returns None) are copied, contiguous,
by the launcher. Outputs (``loss`` for ``'none'``, the gradients) are contiguous of the broadcast shape.
"""

import math

import triton
import triton.language as tl


@triton.jit
def flat_offsets(numel, n_cols, BLOCK: tl.constexpr, STRIDED: tl.constexpr):
    """This program's flat element offsets (64-bit), their mask and, with ``STRIDED``, their (row, column) in the
    ``(numel / n_cols, n_cols)`` view (the offsets themselves otherwise, unused)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rows = offs
    cols = offs
    if STRIDED:
        rows = offs // n_cols
        cols = offs - rows * n_cols
    return offs, offs < numel, rows, cols


@triton.jit
def load_operand(ptr, offs, rows, cols, mask, stride_row, stride_col, STRIDED: tl.constexpr, DTYPE: tl.constexpr,
                 ONE: tl.constexpr = False):
    """One operand's values at this program's elements, in the compute dtype (module docstring); with
    ``ONE`` (an optional operand of one element broadcast to all) its value, loaded once."""
    if ONE:
        value = tl.load(ptr)
    elif STRIDED:
        value = tl.load(ptr + rows * stride_row + cols * stride_col, mask=mask, other=0.0)
    else:
        value = tl.load(ptr + offs * stride_col, mask=mask, other=0.0)
    return value.to(DTYPE)


def matrix_shape(shape):
    """(rows, n_cols) of the view every elementwise launch walks: the last dimension is the columns."""
    n_cols = shape[-1] if len(shape) else 1
    return (math.prod(shape) // n_cols if n_cols else 0), n_cols


def operand_strides(t, shape):
    """(stride_row, stride_col) of ``t`` broadcast to ``shape`` in the ``(rows, n_cols)`` view, or None when its
    leading dimensions do not merge into one row stride (then it must be made contiguous before a launch)."""
    view = t.expand(shape)
    if view.dim() == 0:
        return 0, 0
    stride_col = view.stride(-1) if view.shape[-1] != 1 else 0
    stride_row = span = None
    for size, stride in zip(reversed(view.shape[:-1]), reversed(view.stride()[:-1])):
        if size == 1:
            continue
        if stride_row is not None and stride != span:
            return None
        if stride_row is None:
            stride_row = stride
        span = stride * size
    return (0 if stride_row is None else stride_row), stride_col


def walkable(t, shape):
    """``t`` itself when a launch can read its broadcast to ``shape`` through strides (or it is None), else a
    contiguous copy of that broadcast."""
    if t is None or operand_strides(t, shape) is not None:
        return t
    return t.expand(shape).contiguous()


def launch_strides(operands, shape):
    """(STRIDED, one (row, column) stride pair per operand, one bool per operand: is it a single element) for
    operands ``walkable`` returned; None operands get (0, 0) and False. Without ``STRIDED`` each pair is (0, 1) for
    an operand contiguous of ``shape`` and (0, 0) for a single element."""
    rows, n_cols = matrix_shape(shape)
    pairs = [(0, 0) if t is None else operand_strides(t, shape) for t in operands]
    ones = [t is not None and pair == (0, 0) for t, pair in zip(operands, pairs)]
    flat = [_flat_stride(pair, rows, n_cols) for pair in pairs]
    if all(unit is not None for unit in flat):
        return False, [(0, unit) for unit in flat], ones
    return True, pairs, ones


def _flat_stride(pair, rows, n_cols):
    """1 when element k of the view is at offset k, 0 when every element is the first, None otherwise."""
    stride_row, stride_col = pair
    if stride_row == 0 and stride_col == 0:
        return 0
    if (n_cols == 1 or stride_col == 1) and (rows == 1 or stride_row == n_cols):
        return 1
    return None
