"""One rank of the FSDP2 tests (run by tests/test_dtensor.py).

    python tests/fsdp_worker.py RANK WORLD INIT_FILE OUT_FILE SEED

A tiny Llama (transformers) with its parameters sharded by ``fully_shard`` (each decoder layer and the root) trains
3 SGD steps on the same batch on every rank, its loss computed by fusedloss in two ways: the Hugging Face
integration (``patch_causal_lm``: the loss inside the model's forward, where FSDP2's parameters are unsharded plain
tensors) and ``linear_cross_entropy`` called directly from a method registered with
``register_fsdp_forward_method`` (so that FSDP2 unshards the LM head for it). Each saves the losses and the final
parameters (``full_tensor()``), for the test to compare with the unwrapped model trained on one process.
"""

import torch
import torch.distributed as dist

import gloo_rank

STEPS, LR = 3, 0.5


def make_model(seed):
    import transformers

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).train()


def batch(seed):
    gen = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, 96, (2, 10), generator=gen)
    labels = input_ids.clone()
    labels[0, :3] = -100  # a prompt
    return input_ids, labels


def direct_loss(model, input_ids, labels):
    """The causal-LM loss from the decoder's hidden states and the LM head, by ``linear_cross_entropy``."""
    import fusedloss

    hidden = model.model(input_ids=input_ids).last_hidden_state
    return fusedloss.linear_cross_entropy(hidden, model.lm_head.weight, labels, shift=True)


def train(model, loss_fn, input_ids, labels):
    """(losses per step, final parameters by name) of STEPS steps of plain SGD."""
    losses = []
    for _ in range(STEPS):
        model.zero_grad()
        loss = loss_fn(input_ids, labels)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
        losses.append(float(loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss.detach()))
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters()}
    return losses, params


def main(rank, world, seed):
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from fusedloss.integrations.transformers import patch_causal_lm

    input_ids, labels = batch(seed)
    results = {"backend": __import__("fusedloss").backend("cpu")}

    model = make_model(seed)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    patch_causal_lm(model)
    results["integration"] = train(model, lambda ids, y: model(input_ids=ids, labels=y).loss, input_ids, labels)

    model = make_model(seed)
    model.direct_loss = direct_loss.__get__(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    register_fsdp_forward_method(model, "direct_loss")
    results["direct"] = train(model, model.direct_loss, input_ids, labels)
    dist.barrier()
    return results


if __name__ == "__main__":
    gloo_rank.serve(main)
