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
  hidden states sharded on another dimension than the tokens' (sequence parallelism: redistribute first), a causal
  shift across token shards of one sequence, or a sharded weight with plain activations, whose equality across
  ranks nothing guarantees): a ValueError naming
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


def _placement(name, t, mesh, vocab_dim):
    """The placement of an argument on the common 1-D mesh: "plain" (not a DTensor), "replicate", "shard0" (the
    tokens: dimension 0) or "vocab" (Shard(vocab_dim): the classes; None where the argument has none). Any other
    shard (a sequence-parallel Shard(1) of hidden states, a hidden dimension) and Partial raise, naming it."""
    if not isinstance(t, DTensor):
        return "plain"
    if t.device_mesh != mesh:
        raise ValueError(f"{name} is on another DeviceMesh than the other DTensor arguments")
    (placement,) = t.placements
    if isinstance(placement, Replicate):
        return "replicate"
    if isinstance(placement, Shard):
        dim = placement.dim % t.dim()
        if vocab_dim is not None and t.dim() > vocab_dim and dim == vocab_dim:
            return "vocab"
        if dim == 0:
            return "shard0"
    raise ValueError(f"{name}: placement {placement} of a tensor of shape {tuple(t.shape)} is not supported "
                     "(Replicate(), Shard(0) of the tokens, or a shard of the vocabulary are); redistribute it first")


def _mesh(named):
    meshes = [t.device_mesh for _, t in named if isinstance(t, DTensor)]
    mesh = meshes[0]
    if mesh.ndim != 1:
        raise ValueError(f"DTensor arguments on a {mesh.ndim}-D DeviceMesh: pass a 1-D mesh (slice the mesh "
                         "dimension the loss runs over, e.g. mesh['tp'])")
    return mesh


def _wrap(outputs, mesh, placement, n_tokens=None):
    """Each tensor of ``outputs`` (a tensor, a tuple, or a LossWithMetrics) as a DTensor of ``placement``; for a
    ``Shard(0)`` of per-token results, of ``n_tokens`` tokens in all (shards may differ in size)."""
    if isinstance(outputs, torch.Tensor):
        if n_tokens is None:
            return DTensor.from_local(outputs, mesh, [placement], run_check=False)
        shape = (n_tokens, *outputs.shape[1:])
        return DTensor.from_local(outputs, mesh, [placement], run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())
    if isinstance(outputs, tuple):
        return tuple(_wrap(o, mesh, placement, n_tokens) for o in outputs)
    if outputs is None:
        return None
    fields = {f: _wrap(getattr(outputs, f), mesh, placement, n_tokens) for f in outputs.__dataclass_fields__}
    return type(outputs)(**fields)


def dispatch(*, activations, weights, targets, replicated, reduction, process_group, call, logits=False,
             vocab_parallel=True, shift=False):
    """Run ``call(**local tensors[, process_group=...])`` for DTensor arguments (module docstring): name -> tensor or
    None in each group. ``activations``: logits (``logits=True``: the class dimension is 1) or hidden states;
    ``weights``: a linear weight and bias (vocabulary dimension 0); ``targets``: per-token tensors (class indices,
    probabilities, temperatures); ``replicated``: per-class tensors that every rank holds whole (class weights).
    ``reduction``: the call's, or None for per-token results. ``vocab_parallel``: whether the function has a
    vocabulary-parallel path. ``shift``: the call's causal shift, which needs each sequence whole on a rank."""
    groups = (activations, weights, targets, replicated)
    named = [(n, t) for group in groups for n, t in group.items() if isinstance(t, torch.Tensor)]
    mesh = _mesh(named)
    vocab_dims = {**{n: (1 if logits and vocab_parallel else None) for n in activations},
                  **{n: 0 for n in weights}, **{n: 1 for n in targets}, **{n: None for n in replicated}}
    where = {n: _placement(n, t, mesh, vocab_dims[n]) for n, t in named}

    def of(group):
        return {where[n] for n, t in group.items() if isinstance(t, torch.Tensor)}

    acts, wts, tgts, reps = of(activations), of(weights), of(targets), of(replicated)
    described = ", ".join(f"{n} {where[n]}" for n, _ in named)
    if process_group is not None:
        raise ValueError("process_group comes from the DTensor arguments' mesh: do not pass it with DTensors")
    if reps - {"replicate", "plain"}:
        raise ValueError(f"per-class tensors must be Replicate() (every rank holds every class), got {described}")
    vocab_sharded = "vocab" in wts or "vocab" in acts
    tokens_sharded = "shard0" in acts
    if vocab_sharded and tokens_sharded:
        raise ValueError(f"unsupported placements ({described}): the vocabulary and the tokens are both sharded; "
                         "redistribute one of them")
    local = {n: (t.to_local() if isinstance(t, DTensor) else t) for group in groups for n, t in group.items()}
    if vocab_sharded:
        # per-token tensors replicated: every rank the same tokens (a plain tensor does not say so); a probability
        # target may be sharded with the logits' classes
        probs_with_logits = {where[n] for n, t in targets.items() if isinstance(t, torch.Tensor)
                             and t.is_floating_point() and where[n] == "vocab"}
        if acts - {"replicate", "vocab"} or tgts - {"replicate"} - probs_with_logits or wts - {"replicate", "vocab"}:
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
        sharded = next(t for t in activations.values() if isinstance(t, DTensor))
        if shift and sharded.dim() <= 2:
            raise ValueError("shift=True with token-sharded (T, H) activations would cut the sequence at every shard: "
                             "shard a batch dimension, (B, T, H) Shard(0), or shift the targets before sharding")
        # each rank's weight gradient covers its own tokens: a Partial() gradient (the sum over the ranks pending),
        # as DTensor's own matmul gives a replicated weight multiplied by sharded activations
        for group in (weights, replicated):
            for n, t in group.items():
                if isinstance(t, DTensor):
                    local[n] = t.to_local(grad_placements=[Partial()])
        return _wrap(call(**local), mesh, Shard(0), n_tokens=sharded.shape[0])
    if set(where.values()) - {"replicate", "plain"}:
        raise ValueError(f"unsupported placements: {described}")
    return _wrap(call(**local), mesh, Replicate())
