"""Collectives for the losses that take a ``process_group``, each with the autograd its use needs.

In a vocabulary-parallel loss every rank computes the same loss from statistics gathered from all ranks, and
differentiates it only with respect to its own shard. So the gradient flowing into a rank's own contribution to a
gathered tensor is the gradient of its copy of the loss alone: ``gather_shards``' backward takes the rank's slot
and sends nothing. The replicated input of a vocabulary-parallel linear layer is the opposite case: each rank's
loss depends on it only through the rank's shard, so its gradient is the sum over ranks (``copy_to_group``: the
identity forward, an all-reduce backward), which is Megatron's pairing of these two functions.
"""

import torch


def check_group(process_group):
    """``process_group`` as given, after checking that it can be used (a ProcessGroup of an initialized
    ``torch.distributed``); ValueError / TypeError naming it otherwise."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    return process_group


def rank_and_size(process_group):
    import torch.distributed as dist

    return dist.get_rank(process_group), dist.get_world_size(process_group)


# dtypes named by their index in the metadata every rank sends (``shard_classes``)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


def shard_classes(process_group, local_classes, device, **must_agree):
    """(n_classes, class_offset, widths): the class count of the whole vocabulary, the first class of this rank's
    contiguous slice and every rank's slice width, so that shards need not be even (11 classes on 2 ranks: 6
    and 5). ``must_agree`` as ``agree``'s, checked in the same collective."""
    table = agree(process_group, device, (local_classes,), **must_agree)
    rank, _ = rank_and_size(process_group)
    widths = tuple(row[0] for row in table)
    return sum(widths), sum(widths[:rank]), widths


def agree(process_group, device, free=(), **must_agree):
    """Every rank's ``free`` integers (which may differ) as a table, one row per rank, after checking that every
    rank holds the same ``must_agree`` values (name -> an int, a bool or a dtype: rows, hidden size, dtypes, which
    inputs need a gradient). A disagreement raises the same ValueError on every rank, before the loss's own
    collectives, instead of a one-sided abort, a hang or a wrong answer. One all-gather of a few int64 per rank,
    read on the host: on a GPU group a host sync, the price of facts that no rank can know alone."""
    names = list(must_agree)
    values = [_DTYPES.index(v) if isinstance(v, torch.dtype) else int(v) for v in must_agree.values()]
    import torch.distributed as dist

    if dist.get_backend(process_group) == "gloo":
        device = torch.device("cpu")
    table = all_gather(torch.tensor(list(free) + values, dtype=torch.int64, device=device), process_group).tolist()
    for column, name in enumerate(names, start=len(free)):
        seen = [row[column] for row in table]
        if len(set(seen)) > 1:
            shown = [_DTYPES[v] if isinstance(must_agree[name], torch.dtype) else v for v in seen]
            raise ValueError(f"process_group: the ranks disagree on {name} ("
                             + ", ".join(f"{v} on rank {r}" for r, v in enumerate(shown))
                             + "); every rank must call the loss on the same shapes with the same dtypes and "
                             "options")
    return [row[:len(free)] for row in table]


def all_gather(t, process_group):
    """(world, *t.shape): every rank's ``t`` in rank order, one collective, not differentiable."""
    import torch.distributed as dist

    _, world = rank_and_size(process_group)
    t = t.contiguous()
    out = torch.empty((world * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    # concatenated along dim 0, as every backend takes it (all_gather_single: the name of torch >= 2.13)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=process_group)
    return out.view((world,) + tuple(t.shape))


def all_reduce_(t, process_group):
    """``t`` summed over the ranks, in place."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
    return t


def gather_with_grad(t, group):
    """Every rank's ``t`` concatenated along dim 0, differentiable: the backward sums each rank's gradient of the
    gathered tensor onto the slice's owner (``torch.distributed``'s functional collectives)."""
    from torch.distributed import _functional_collectives as collectives

    gather = getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd
    return gather(t.contiguous(), gather_dim=0, group=group)


def reduce_scatter(x, group):
    """(W n, ...) summed over the ranks, this rank's n rows."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # (renamed in torch 2.13)
    scatter(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


class _GatherShards(torch.autograd.Function):
    @staticmethod
    def forward(t, process_group):
        return all_gather(t, process_group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.rank = rank_and_size(inputs[1])[0]

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None


def gather_shards(t, process_group):
    """``all_gather`` whose backward keeps the gradient of this rank's own slot (module docstring)."""
    return _GatherShards.apply(t, process_group)


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(t, process_group):
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.process_group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.clone(), ctx.process_group), None


def copy_to_group(t, process_group):
    """``t`` unchanged, with a backward that sums its gradient over the ranks (module docstring)."""
    return _CopyToGroup.apply(t, process_group)


def ring_pass(block, visit, process_group, accumulator=None, combine=None):
    """Pass every rank's ``block`` (a tuple of tensors, the same shapes on every rank) around the group, one hop
    to the next rank per step, and call ``visit(source, block_in_hand)`` on each in turn: this rank's own first
    (``source`` = the rank it came from). The next block's receive and this one's send are in flight while
    ``visit`` runs, and no rank ever holds more than two blocks: memory independent of the world size (the point
    of a ring, against an all-gather's ``world`` blocks).

    ``accumulator``: None, or a tuple of tensors whose shapes and dtypes ``visit``'s return matches: then each
    block carries a sum around the ring behind it: ``visit`` returns this rank's contribution for the block in
    hand, ``combine(arrived, contribution)`` (default: ``arrived.add_(contribution)``) merges it into what the
    previous ranks contributed, and that travels on with the block. Returned: the accumulator of this rank's own
    block once every rank has contributed (the block's last hop is this accumulator alone), else None.

    Each step is two ``batch_isend_irecv`` groups, the same on every rank: the accumulators' exchange, waited for
    before ``visit`` (so the previous sum is freed before the next is made), then the blocks', overlapping
    ``visit``. Every send and its receive are in one group on both ends and in the same order, as NCCL needs (its
    point-to-point calls block the GPU until matched, and match in order); the price is that the accumulator's
    hop (n x d x 4 bytes) is not overlapped."""
    import torch.distributed as dist

    rank, world = rank_and_size(process_group)
    combine = combine or (lambda arrived, contribution: arrived.add_(contribution))
    if world == 1:
        out = visit(rank, block)
        return tuple(out) if accumulator is not None else None
    send_to = dist.get_global_rank(process_group, (rank + 1) % world)
    receive_from = dist.get_global_rank(process_group, (rank - 1) % world)

    def exchange(sends, receives):
        ops = [dist.P2POp(dist.irecv, t, receive_from, process_group) for t in receives]
        ops += [dist.P2POp(dist.isend, t, send_to, process_group) for t in sends]
        return dist.batch_isend_irecv(ops) if ops else []

    def wait(works):
        for work in works:
            work.wait()

    hand, total = tuple(t.contiguous() for t in block), None
    for step in range(world):
        arrived = None
        if total is not None:  # the sum of the block this rank held last step goes on; the next one's comes in
            arrived = tuple(torch.empty_like(t) for t in accumulator)
            wait(exchange(total, arrived))
        incoming = tuple(torch.empty_like(t) for t in hand) if step < world - 1 else ()
        works = exchange(hand if incoming else (), incoming)
        contribution = visit((rank - step) % world, hand)
        if accumulator is not None:
            contribution = tuple(contribution)
            total = tuple(combine(a, c) for a, c in zip(arrived, contribution)) if arrived is not None else \
                tuple(c.contiguous() for c in contribution)
        wait(works)
        hand = incoming
    if accumulator is None:
        return None
    home = tuple(torch.empty_like(t) for t in accumulator)
    wait(exchange(total, home))
    return home
