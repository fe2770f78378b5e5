"""The LM-head engine: a loss of the logits ``input @ weight.T + bias`` computed token chunk by token chunk, each
chunk's logits (n tokens x the whole vocabulary) materialized in one reused buffer and never all of them at once.
``linear_cross_entropy``'s chunked schedule and ``linear_log_probs`` run on it; they differ only in the row kernel
that turns a chunk of logits into its per-row results and its logit gradient G, written over the logits.

Per chunk: logits by ``torch.mm`` / ``addmm`` (cuBLAS on a GPU: 2 n H V FLOPs); the family's row kernel; then dX of
the chunk = G @ W (K = V complete: written once, no accumulator), dW (+)= G^T X_chunk into an accumulator of the
caller's dtype (fp32 for 16-bit inputs: ``accumulate``), db (+)= the column sums of G. 6 N H V FLOPs for the whole
forward and backward, the bare matmuls' own work, plus one read and write of each logits chunk by the row kernel
and one read and write of the dW accumulator per chunk. Ignored tokens (no target) can be left out before the
sweep (``live_tokens``), so they cost no GEMM work.
"""

import functools

import torch

from . import _alloc


def chunk_rows(n_classes, itemsize, workspace_bytes):
    """Tokens per chunk so that one chunk's logits fit ``workspace_bytes``: a multiple of 128 above 128 (whole GEMM
    tiles), at least 1."""
    rows = max(1, workspace_bytes // max(n_classes * itemsize, 1))
    return rows - rows % 128 if rows > 128 else rows


@functools.lru_cache(maxsize=None)
def mixed_dtype_gemm_works(device, dtype):
    """Whether ``torch.mm`` / ``torch.addmm`` with ``out_dtype=torch.float32`` into an fp32 ``out`` (the accumulator
    itself, beta = 1) take ``dtype`` operands on ``device`` and sum right: probed once per (device, dtype) on a
    16 x 16 problem against the fp32 product, so that a torch without the overload, or one whose in-place form is
    wrong, costs the upcast path instead of a failure or a wrong gradient. The probe reads its result on the host:
    the first call per dtype must not be inside CUDA graph capture (the warm-up before a capture is that call)."""
    a = torch.randn(16, 16, device=device).to(dtype)
    b = torch.randn(16, 16, device=device).to(dtype)
    acc = torch.ones(16, 16, device=device)
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        product = torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    want = a.float() @ b.float()
    return bool(torch.allclose(acc, want + 1, rtol=1e-3, atol=1e-3) and torch.allclose(product, want, rtol=1e-3,
                                                                                          atol=1e-3))


def accumulate(acc, a, b, first):
    """``acc (+)= a @ b`` with ``acc`` in its own dtype: fp32 sums of 16-bit products by cuBLAS where torch has the
    mixed-dtype GEMM (CUDA, ``out_dtype``: the fp32 accumulator is read and written once per chunk, in the
    epilogue; ``mixed_dtype_gemm_works``), by upcast operands elsewhere (CPU: the interpreter tier)."""
    if acc.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif acc.is_cuda and mixed_dtype_gemm_works(acc.device, a.dtype):
        if first:
            torch.mm(a, b, out_dtype=acc.dtype, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    elif first:
        torch.mm(a.to(acc.dtype), b.to(acc.dtype), out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def sweep(x2d, weight, bias, step, row_kernel, *, needs, acc_dtype, bias_dtype, post_scale=None):
    """One pass over the tokens of ``x2d`` (n, H) in chunks of ``step``: each chunk's logits (its dtype), then
    ``row_kernel(logits, start, stop)``, which writes the chunk's per-row results and, when any of ``needs`` (dX,
    dW, db) is set, G over the logits; then the GEMM tail. dW is summed in ``acc_dtype``, db in ``bias_dtype``;
    ``post_scale`` (a 0-d tensor, or None) multiplies them at the end (fp16 keeps G unscaled: p / N would flush to
    zero). Returns (dX, dW, db), None where not needed; dW in ``acc_dtype``."""
    need_x, need_w, need_b = needs
    n_rows, n_cols = x2d.shape[0], weight.shape[0]
    device = x2d.device
    dx = _alloc.empty(tuple(x2d.shape), dtype=x2d.dtype, device=device) if need_x else None
    # (zeros when there is no token at all: no chunk writes it)
    dw = (torch.zeros if n_rows == 0 else _alloc.empty)(tuple(weight.shape), dtype=acc_dtype, device=device) \
        if need_w else None
    db = torch.zeros(n_cols, dtype=bias_dtype, device=device) if need_b else None
    buffer = _alloc.empty(min(step, n_rows) * n_cols, dtype=x2d.dtype, device=device)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        x_chunk = x2d[start:stop]
        logits = buffer[: (stop - start) * n_cols].view(stop - start, n_cols)
        if bias is None:
            torch.mm(x_chunk, weight.t(), out=logits)
        else:
            torch.addmm(bias, x_chunk, weight.t(), out=logits)
        row_kernel(logits, start, stop)
        if need_x:
            torch.mm(logits, weight, out=dx[start:stop])
        if need_w:
            accumulate(dw, logits.t(), x_chunk, start == 0)
        if need_b:
            db += logits.sum(dim=0, dtype=db.dtype)
    if post_scale is not None:
        for g in (dx, dw, db):
            if g is not None:
                g.mul_(post_scale.to(g.dtype))
    return dx, dw, db


def live_tokens(y, ignore_index):
    """The tokens of the class-index target ``y`` (n,) that have a target, an int64 index, or None when all do or
    under CUDA graph capture (every token is computed there). The count is read on the host (GEMM sizes are host
    values): one sync per call."""
    if y.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    live = torch.nonzero(y != ignore_index).squeeze(1)
    return None if live.numel() == y.numel() else live


def take(t, live):
    """``t``'s rows at ``live`` (``t`` itself for None, or a 0-d ``t``)."""
    return t if live is None or t.dim() == 0 else t.index_select(0, live)


def spread(t, live, n_rows):
    """The inverse of ``take``: ``t``'s rows at ``live``, zeros elsewhere."""
    return t if live is None else t.new_zeros((n_rows, *t.shape[1:])).index_copy_(0, live, t)
