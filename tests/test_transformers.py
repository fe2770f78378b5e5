"""fusedloss.integrations.transformers on tiny models built from configs in code (no downloads): a patched model's
loss and every parameter's gradient against the same model unpatched, for every tested family and both CPU tiers;
``num_items_in_batch``, ``shift_labels``, the loss extras, autocast, the Trainer, peak memory at a 32000-word
vocabulary, the refusals, and the examples of the docs executed as written.

The reference is the unpatched model in fp32 (its loss upcasts the logits to fp32 whatever the model's dtype, so an
fp64 model would not give a finer reference), hence the fp32 tolerance of conftest.TOL."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, peak_allocated_bytes, readme_example, rel_err

transformers = pytest.importorskip("transformers", reason="pip install 'fusedloss[transformers]' to test it")
from fusedloss.integrations.transformers import patch_causal_lm, unpatch_causal_lm  # noqa: E402

FP32 = torch.float32
VOCAB, BATCH, SEQ = 160, 2, 12
_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               initializer_range=0.2)  # logits of order 1, so that the soft-cap and the extras matter


def _config(family, vocab=VOCAB, **overrides):
    """A tiny config of ``family``: Gemma, Gemma 2 and GPT-2 tie their embeddings, Phi's head has a bias, Gemma 2
    soft-caps at 0.5 (its default 30 would leave logits of order 1 nearly uncapped, hiding a missing cap)."""
    c = dict(_COMMON, vocab_size=vocab, **overrides)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=c["hidden_size"], n_layer=c["num_hidden_layers"],
                                       n_head=c["num_attention_heads"], n_positions=c["max_position_embeddings"],
                                       bos_token_id=1, eos_token_id=2, initializer_range=c["initializer_range"],
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config, "gemma": transformers.GemmaConfig,
           "gemma2": transformers.Gemma2Config, "phi": transformers.PhiConfig, "phi3": transformers.Phi3Config}[family]
    if family in ("qwen3", "gemma", "gemma2"):
        c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
    if family == "gemma2":
        c.setdefault("final_logit_softcapping", 0.5)
    return cls(**c)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "phi", "phi3")


def _model(family, gen, device="cpu", **overrides):
    """(unpatched, patched copy), identical fp32 parameters drawn from ``gen``, in train mode without dropout."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ref = transformers.AutoModelForCausalLM.from_config(_config(family, **overrides)).to(device).train()
    return ref, patch_causal_lm(copy.deepcopy(ref))


def _batch(gen, device="cpu", vocab=VOCAB, batch=BATCH, seq=SEQ):
    """input_ids, attention_mask (the last row right-padded) and labels (-100 on the padding and on a prompt)."""
    input_ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[-1, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :4] = -100
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def _assert_same_training_signal(patched, ref, loss, ref_loss):
    """fp32 losses and every parameter's gradient (a tied embedding once) within the fp32 tolerance."""
    assert loss.dtype == ref_loss.dtype == FP32
    assert_close(loss, ref_loss, FP32, "loss")
    for (name, p), q in zip(patched.named_parameters(), ref.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert_close(p.grad, q.grad, FP32, f"gradient of {name}")


@pytest.mark.parametrize("case", ["labels", "num_items_in_batch", "shift_labels"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_unpatched_model(tier, gen, family, case):
    """Loss and every parameter's gradient equal the unpatched model's, with no logits in the output; with
    ``num_items_in_batch`` (a tensor, as the Trainer passes it: the loss is the sum over it), and with
    ``shift_labels`` (used instead of shifting ``labels``, whose values then do not matter)."""
    ref, patched = _model(family, gen, tier.device)
    input_ids, attention_mask, labels = _batch(gen, tier.device)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    if case == "num_items_in_batch":
        kwargs["num_items_in_batch"] = 3 * (labels[:, 1:] != -100).sum()
    if case == "shift_labels":
        shift_labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        shift_labels[1, ::3] = -100
        shift_labels = shift_labels.to(tier.device)
        kwargs.update(shift_labels=shift_labels, labels=torch.zeros_like(labels))
    out = patched(**kwargs)
    ref_out = ref(**kwargs)
    out.loss.backward()
    ref_out.loss.backward()
    assert out.logits is None
    assert set(out.keys()) == set(ref_out.keys()) - {"logits"}
    _assert_same_training_signal(patched, ref, out.loss, ref_out.loss)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_loss_options(tier, gen, family):
    """label_smoothing, z_loss and focal_gamma pass through: against the eager loss of the unpatched model's logits
    (Gemma 2's come soft-capped)."""
    ls, z, gamma = 0.1, 1e-2, 1.0
    ref, patched = _model(family, gen, tier.device)
    patch_causal_lm(patched, label_smoothing=ls, z_loss=z, focal_gamma=gamma)
    input_ids, attention_mask, labels = _batch(gen, tier.device)
    loss = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    logits = ref(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].reshape(-1, VOCAB)
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    logits, target = logits[keep], target[keep]
    ce = F.cross_entropy(logits, target, label_smoothing=ls, reduction="none")
    p_t = torch.softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    ref_loss = ((1 - p_t) ** gamma * ce + z * torch.logsumexp(logits, -1) ** 2).mean()
    loss.backward()
    ref_loss.backward()
    _assert_same_training_signal(patched, ref, loss, ref_loss)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast(tier, gen, dtype):
    """Under autocast the head's inputs are cast as F.linear's would be: the loss and gradients match the
    unpatched model's to the 16-bit tolerance (both compute 16-bit logits; the fused loss does not round them to
    16 bits before its fp32 softmax, the unpatched one does). bf16 in the interpreter tier: the torch path, as a
    user's call there takes (the interpreter's bf16 tl.dot is wrong)."""
    ref, patched = _model("llama", gen, tier.device)
    input_ids, attention_mask, labels = _batch(gen, tier.device)
    losses = []
    for m in (patched, ref):
        with torch.autocast(tier.device.type, dtype=dtype):
            loss = m(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        losses.append(loss)
    assert_close(losses[0], losses[1], dtype, "loss")
    for (name, p), q in zip(patched.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, dtype, f"gradient of {name}")


def test_without_labels_and_tuple_outputs(gen):
    """Without labels the forward is the model's own (the same logits, bit for bit); with return_dict=False and
    labels the tuple is the output's fields without the logits; labels with a logits_to_keep that drops positions raise
    a ValueError that says so (the unpatched model fails on the shape mismatch too)."""
    ref, patched = _model("gpt2", gen)
    input_ids, attention_mask, labels = _batch(gen)
    assert torch.equal(patched(input_ids=input_ids).logits, ref(input_ids=input_ids).logits)
    out = patched(input_ids=input_ids, labels=labels)
    as_tuple = patched(input_ids=input_ids, labels=labels, return_dict=False)
    assert len(as_tuple) == len(out) and torch.equal(as_tuple[0], out.loss)
    with pytest.raises(ValueError, match="logits_to_keep"):
        patched(input_ids=input_ids, labels=labels, logits_to_keep=1)


def test_unpatch_repatch_and_deepcopy(gen):
    """unpatch restores the class's forward; patching again replaces the options (a refused re-patch keeps them);
    a deep copy of a patched model is patched on the copy (its gradients land in the copy's parameters)."""
    ref, patched = _model("llama", gen)
    input_ids, _, labels = _batch(gen)
    plain = patched(input_ids=input_ids, labels=labels).loss
    patch_causal_lm(patched, label_smoothing=0.5)
    smoothed = patched(input_ids=input_ids, labels=labels).loss
    assert smoothed != plain
    with pytest.raises(TypeError, match="set by the model"):
        patch_causal_lm(patched, shift=True)
    again = patched(input_ids=input_ids, labels=labels).loss
    assert torch.equal(again, smoothed), "a refused re-patch changed the options"
    clone = copy.deepcopy(patched)
    clone(input_ids=input_ids, labels=labels).loss.backward()
    assert all(p.grad is None for p in patched.parameters())
    assert all(p.grad is not None for p in clone.parameters())
    assert unpatch_causal_lm(patched) is patched
    assert "forward" not in patched.__dict__
    assert patched(input_ids=input_ids, labels=labels).logits is not None
    with pytest.raises(ValueError, match="not patched"):
        unpatch_causal_lm(patched)


def test_refuses_what_it_cannot_patch(gen):
    """Clear TypeError/ValueError for models and options it cannot honour, before any forward."""
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch_causal_lm(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="output embedding"):
        patch_causal_lm(transformers.LlamaModel(_config("llama")))  # the decoder alone: no head
    cohere = transformers.CohereConfig(**dict(_COMMON, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="logit_scale"):
        patch_causal_lm(transformers.CohereForCausalLM(cohere))
    t5 = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                               decoder_start_token_id=0)
    with pytest.raises(ValueError, match="encoder-decoder"):
        patch_causal_lm(transformers.T5ForConditionalGeneration(t5))
    ref, _ = _model("llama", gen)
    for option, match in (("softcap", "set by the model"), ("reduction", "set by the model"),
                          ("smoothing", "unknown loss option")):
        with pytest.raises(TypeError, match=match):
            patch_causal_lm(ref, **{option: 0.1})
    ref.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(ValueError, match="loss function"):
        patch_causal_lm(ref)
    assert "forward" not in ref.__dict__


class _TwoHeadCalls(transformers.LlamaForCausalLM):
    """Calls its output embedding twice per forward, as a multi-token-prediction head would."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        self.lm_head(self.model.embed_tokens(input_ids))
        return super().forward(input_ids=input_ids, labels=labels, **kwargs)


def test_refuses_a_forward_it_cannot_follow(gen):
    """A forward that does not call the output embedding and the loss function once each raises at the call (the
    patch cannot see that beforehand); without labels it runs as the model's own."""
    model = patch_causal_lm(_TwoHeadCalls(_config("llama")))
    input_ids, _, labels = _batch(gen)
    assert model(input_ids=input_ids).logits.shape == (BATCH, SEQ, VOCAB)
    with pytest.raises(RuntimeError, match="more than once"):
        model(input_ids=input_ids, labels=labels)
    assert model(input_ids=input_ids).logits.shape == (BATCH, SEQ, VOCAB), "the capture outlived the failed call"


def test_unpatch_restores_the_instance(gen):
    """Unpatching leaves no stand-in on the model or its head; a deep copy of a patched model is patched on its own
    (its stand-ins bound to the copy, not to the original)."""
    model = transformers.LlamaForCausalLM(_config("llama"))
    copied = copy.deepcopy(patch_causal_lm(model))
    input_ids, attention_mask, labels = _batch(gen)
    unpatch_causal_lm(model)
    assert not {"forward", "_loss_function"} & set(model.__dict__) and "forward" not in model.lm_head.__dict__
    expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out = copied(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits is None
    assert_close(out.loss, expected.loss, FP32, "the copy's loss")


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_patched_model(tier, gen, fullgraph):
    """``torch.compile(patched_model)`` traces the patched forward (fullgraph too: the capture is thread-local
    state, nothing is swapped per call): loss and gradients of the unpatched eager model."""
    ref, patched = _model("llama", gen, tier.device)
    input_ids, attention_mask, labels = _batch(gen, tier.device)
    torch._dynamo.reset()
    compiled = torch.compile(patched, fullgraph=fullgraph, backend="aot_eager")
    out = compiled(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    ref_loss = ref(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    out.loss.backward()
    ref_loss.backward()
    assert out.logits is None
    _assert_same_training_signal(patched, ref, out.loss, ref_loss)


def test_concurrent_forwards(tier, gen):
    """Forwards of one patched model from 4 threads at once (inference servers, data-parallel threads): each
    returns the loss of its own batch, and a forward without labels its logits."""
    import concurrent.futures

    ref, patched = _model("llama", gen, tier.device)
    batches = [_batch(gen, tier.device) for _ in range(4)]
    with torch.no_grad():
        expected = [ref(input_ids=i, attention_mask=m, labels=lab).loss for i, m, lab in batches]

    def run(index):
        input_ids, attention_mask, labels = batches[index % 4]
        with torch.no_grad():
            if index % 5 == 4:
                return index, patched(input_ids=input_ids, attention_mask=attention_mask).logits
            return index, patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    rounds = 40 if tier.name == "torch" else 12
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(rounds)))
    for index, got in results:
        if index % 5 == 4:
            assert got.shape == (BATCH, SEQ, VOCAB)
        else:
            assert_close(got, expected[index % 4], FP32, f"loss of forward {index}")


def _train(model, args, dataset):
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_trainer_parity(tier, gen, tmp_path):
    """The docs' Trainer example trains the patched model to the unpatched model's logged losses and parameters (up
    to fp32 rounding): 3 optimizer steps of AdamW, each accumulating 2 micro-batches whose labels have different
    numbers of ignored positions, so that ``num_items_in_batch`` weights them (a per-micro-batch mean would not)."""
    ref, model = _model("llama", gen, tier.device)
    unpatch_causal_lm(model)  # the docs' example patches it
    dataset = []
    for i in range(12):
        input_ids, attention_mask, labels = _batch(gen, batch=1)
        labels[0, : 4 + 2 * (i % 3)] = -100  # prompts of 4, 6 and 8 tokens
        dataset.append(dict(input_ids=input_ids[0], attention_mask=attention_mask[0], labels=labels[0]))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=tier.name != "cuda",
        disable_tqdm=True, seed=0)
    namespace = dict(model=model, args=args, train_dataset=dataset)
    exec(readme_example("trainer"), namespace)
    patched_losses = [log["loss"] for log in namespace["trainer"].state.log_history if "loss" in log]
    ref_losses = _train(ref, args, dataset)
    assert len(patched_losses) == len(ref_losses) == 3
    assert_close(torch.tensor(patched_losses), torch.tensor(ref_losses), FP32, "logged losses")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p, q, FP32, name)


def test_one_call_example(tier, gen):
    """The docs' one-call example, executed as written: the loss and gradients of the unpatched model, and the model
    unpatched at the end."""
    ref, model = _model("qwen2", gen, tier.device)
    unpatch_causal_lm(model)
    input_ids, attention_mask, labels = _batch(gen, tier.device)
    namespace = dict(model=model, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    exec(readme_example("one_call"), namespace)
    assert namespace["out"].logits is None and "forward" not in model.__dict__
    ref_loss = ref(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    ref_loss.backward()
    _assert_same_training_signal(model, ref, namespace["out"].loss, ref_loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_hand_written_recipe(tier, gen, family):
    """The docs' hand-written-loop recipe, executed as written for every family (GPT-2's decoder is
    ``transformer``, Phi's head has a bias, Gemma 2 soft-caps): the unpatched model's loss and gradients."""
    ref, model = _model(family, gen, tier.device)
    unpatch_causal_lm(model)
    input_ids, attention_mask, labels = _batch(gen, tier.device)
    namespace = dict(model=model, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    exec(readme_example("recipe"), namespace)
    loss = namespace["loss"]
    loss.backward()
    ref_loss = ref(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    ref_loss.backward()
    _assert_same_training_signal(model, ref, loss, ref_loss)


def test_peak_memory(tier, gen):
    """A patched forward + backward at a 32000-word vocabulary, 2048 tokens (a 250 MiB fp32 logits tensor) peaks
    below half the logits, gradients and activations included; the unpatched one peaks above the logits (which
    checks that the measurement sees the allocations). Torch tier only: the interpreter's forward + backward at this
    size takes over 5 minutes on two cores (the Triton tiers' workspace bound is tested by
    test_linear_cross_entropy)."""
    if tier.name != "torch":
        pytest.skip("the interpreter takes over 5 minutes at a 32000-word vocabulary; torch tier only")
    vocab, batch, seq = 32000, 4, 512
    ref, patched = _model("llama", gen, vocab=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          max_position_embeddings=seq)
    input_ids, attention_mask, labels = _batch(gen, vocab=vocab, batch=batch, seq=seq)
    logits = batch * seq * vocab * 4

    def step(m):
        return lambda: m(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()

    fused, eager = peak_allocated_bytes(step(patched)), peak_allocated_bytes(step(ref))
    print(f"\npeak allocated: patched {fused / 2**20:.0f} MiB, unpatched {eager / 2**20:.0f} MiB, "
          f"fp32 logits {logits / 2**20:.0f} MiB")
    assert eager >= logits, "the measurement missed the unpatched model's logits"
    assert fused < logits / 2
    assert rel_err(patched.lm_head.weight.grad, ref.lm_head.weight.grad) < 1e-4
