"""DTensor arguments (FSDP2, tensor parallelism, torchtitan): the losses take them without ``full_tensor()``.

Each public function that accepts DTensors asks ``has_dtensor`` first and, with a DTensor among its arguments, hands
the call to ``dispatch``: the placements decide the local computation, which runs on the local shards through the
plain function, and the results are wrapped back into DTensors on the same 1-D mesh, differentiably (``to_local`` /
``from_local``: gradients come back with the inputs' placements, but for the case below that says otherwise). The
placements served:

- every DTensor ``Replicate()``: computed locally (every rank computes the same), results ``Replicate()``;
- the vocabulary sharded, ``Shard(0)`` of a linear weight (and ``Shard(0)`` of its bias) or ``Shard(1)`` of logits
  (the class dimension, what ``loss_parallel()`` takes), with replicated activations and targets: the
  vocabulary-parallel path (``process_group=`` the mesh's group), results ``Replicate()``;
- the tokens sharded, ``Shard(0)`` of the activations / logits and targets with replicated weights: computed
  locally; per-token results (``reduction='none'``, log-probs, metrics) come back ``Shard(0)``, and the replicated
  weights' gradients ``Partial()`` (each rank's tokens' share; DTensor sums them where a placement asks); a
  ``'mean'`` or ``'sum'`` needs every rank's rows, so it is refused with a ValueError naming the placement (reduce
  the ``'none'`` result, whose DTensor sum is exact);
- anything else (``Partial``, a mesh of more than one dimension, the vocabulary sharded while the tokens are too,
  or a sharded weight with plain activations, whose equality across ranks nothing guarantees): a ValueError naming
  the argument and its placement, raised on every rank alike (placements are the same on every rank), before any
  collective.
"""

import torch

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # a torch without distributed: no DTensor can reach here
    DTensor = None


def has_dtensor(*values):
    return DTensor is not None and any(isinstance(v, DTensor) for v in values)


def _placement(name, t, mesh):
    """The placement of a DTensor argument on the common 1-D mesh ("replicate", "shard0", "shard1"), or "plain"."""
    if not isinstance(t, DTensor):
        return "plain"
    if t.device_mesh != mesh:
        raise ValueError(f"{name} is on another DeviceMesh than the other DTensor arguments")
    (placement,) = t.placements
    if isinstance(placement, Replicate):
        return "replicate"
    if isinstance(placement, Shard) and placement.dim in (0, 1, 1 - t.dim()):
        return "shard0" if placement.dim == 0 else "shard1"
    raise ValueError(f"{name}: placement {placement} is not supported (Replicate(), Shard(0) of the tokens or the "
                     "vocabulary, Shard(1) of logits are); redistribute it first")


def _mesh(named):
    meshes = [t.device_mesh for _, t in named if isinstance(t, DTensor)]
    mesh = meshes[0]
    if mesh.ndim != 1:
        raise ValueError(f"DTensor arguments on a {mesh.ndim}-D DeviceMesh: pass a 1-D mesh (slice the mesh "
                         "dimension the loss runs over, e.g. mesh['tp'])")
    return mesh


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _wrap(outputs, mesh, placement):
    """Each tensor of ``outputs`` (a tensor, a tuple, or a LossWithMetrics) as a DTensor of ``placement``."""
    if isinstance(outputs, torch.Tensor):
        return DTensor.from_local(outputs, mesh, [placement], run_check=False)
    if isinstance(outputs, tuple):
        return tuple(_wrap(o, mesh, placement) for o in outputs)
    if outputs is None:
        return None
    fields = {f: _wrap(getattr(outputs, f), mesh, placement) for f in outputs.__dataclass_fields__}
    return type(outputs)(**fields)


def dispatch(*, activations, weights, targets, replicated, reduction, process_group, call, vocab_parallel=True):
    """Run ``call(**local tensors[, process_group=...])`` for DTensor arguments (module docstring): name -> tensor or
    None in each group. ``activations``: logits (class dimension 1) or hidden states; ``weights``: a linear weight
    and bias (vocabulary dimension 0); ``targets``: per-token tensors (class indices, probabilities, temperatures);
    ``replicated``: per-class tensors that every rank holds whole (class weights). ``reduction``: the call's, or
    None for per-token results. ``vocab_parallel``: whether the function has a vocabulary-parallel path."""
    groups = (activations, weights, targets, replicated)
    named = [(n, t) for group in groups for n, t in group.items() if isinstance(t, torch.Tensor)]
    mesh = _mesh(named)
    where = {n: _placement(n, t, mesh) for n, t in named}

    def of(group):
        return {where[n] for n, t in group.items() if isinstance(t, torch.Tensor)}

    acts, wts, tgts, reps = of(activations), of(weights), of(targets), of(replicated)
    described = ", ".join(f"{n} {where[n]}" for n, _ in named)
    if process_group is not None:
        raise ValueError("process_group comes from the DTensor arguments' mesh: do not pass it with DTensors")
    if reps - {"replicate", "plain"}:
        raise ValueError(f"per-class tensors must be Replicate() (every rank holds every class), got {described}")
    vocab_sharded = "shard0" in wts or "shard1" in acts
    tokens_sharded = "shard0" in acts
    if vocab_sharded and (tokens_sharded or not vocab_parallel):
        raise ValueError(f"unsupported placements ({described}): "
                         + ("the vocabulary and the tokens are both sharded; redistribute one of them" if vocab_parallel
                            else "this function has no vocabulary-parallel path; redistribute the logits"))
    local = {n: (t.to_local() if isinstance(t, DTensor) else t) for group in groups for n, t in group.items()}
    if vocab_sharded:
        if acts - {"replicate", "shard1"} or tgts - {"replicate", "shard1"} or wts - {"replicate", "shard0"}:
            raise ValueError(f"a vocabulary-sharded loss needs the activations and targets as Replicate() DTensors "
                             f"(every rank the same tokens: a plain tensor does not say so), got {described}")
        return _wrap(call(**local, process_group=mesh.get_group()), mesh, Replicate())
    if tokens_sharded:
        if wts - {"replicate", "plain"} or tgts - {"shard0"}:
            raise ValueError(f"token-sharded activations need the per-token tensors Shard(0) and the weights "
                             f"replicated, got {described}")
        if reduction not in (None, "none"):
            raise ValueError(f"reduction={reduction!r} of token-sharded activations ({described}) would need every "
                             "rank's tokens: compute reduction='none' and reduce the Shard(0) result")
        # each rank's weight gradient covers its own tokens: a Partial() gradient (the sum over the ranks pending),
        # as DTensor's own matmul gives a replicated weight multiplied by sharded activations
        for group in (weights, replicated):
            for n, t in group.items():
                if isinstance(t, DTensor):
                    local[n] = t.to_local(grad_placements=[Partial()])
        return _wrap(call(**local), mesh, Shard(0))
    if set(where.values()) - {"replicate", "plain"}:
        raise ValueError(f"unsupported placements: {described}")
    return _wrap(call(**local), mesh, Replicate())
