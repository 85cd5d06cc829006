"""The fast path computes the same loss as the plain one, and the plan fits the machine it is given.

CPU, tiny model, fp32: packed documents score exactly as each document alone; TRL's fused LM head with
the plain-torch kernel equals the model's own cross-entropy, gradients included; checkpointing modes
change memory, never numbers. Then the chooser, on described machines (an H200, a 24 GiB card, ...).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("trl")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from trainjob import speed  # noqa: E402
from trainjob.tiny import build_llama3_style_tokenizer, build_tiny_llama  # noqa: E402

GIB = 1024**3
DOC_LENGTHS = (23, 41, 9, 30)
LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8)
H200 = speed.DeviceInfo("cuda", "NVIDIA H200", 141 * GIB, 125 * GIB, 15 * GIB, (9, 0))
NO_KERNELS = speed.Kernels()


@pytest.fixture(scope="module")
def tokenizer():
    return build_llama3_style_tokenizer()


def lora_model(tokenizer, layers: int = 3):
    model = build_tiny_llama(tokenizer, hidden_size=64, layers=layers, heads=4, kv_heads=2, intermediate=128)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # non-zero B, so the adapters take part
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def documents(vocab: int):
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, vocab - 20, (n,), generator=generator) for n in DOC_LENGTHS]
    labels = []
    for doc in docs:
        label = doc.clone()
        label[: len(doc) // 3] = -100  # a prompt the loss doesn't see
        labels.append(label)
    return docs, labels


def packed_batch(docs, labels):
    """What TRL's padding-free collator builds: one row, positions restarting, first label of each doc off."""
    positions = torch.cat([torch.arange(len(d)) for d in docs])
    packed_labels = torch.cat(labels).clone()
    packed_labels[positions == 0] = -100
    return {"input_ids": torch.cat(docs)[None], "position_ids": positions[None], "labels": packed_labels[None]}


def per_document_loss(model, docs, labels):
    """Token-weighted mean loss over the documents, each run alone."""
    total, count = 0.0, 0
    for doc, label in zip(docs, labels, strict=True):
        logits = model(input_ids=doc[None]).logits[0, :-1]
        target = label[1:]
        keep = target != -100
        total = total + torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        count += int(keep.sum())
    return total / count


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


# ---------------------------------------------------------------------------------------------
# Loss parity


@pytest.mark.parametrize("attention", ["sdpa", speed.VARLEN])
def test_packed_loss_and_logits_equal_each_document_alone(tokenizer, attention):
    model = lora_model(tokenizer)
    base = model.get_base_model()
    if attention == speed.VARLEN:
        assert speed.register_varlen_attention() is None
    base.set_attn_implementation(attention)
    docs, labels = documents(len(tokenizer))
    batch = packed_batch(docs, labels)

    packed = model(**batch)
    alone = per_document_loss(model, docs, labels)
    assert abs(packed.loss.item() - alone.item()) < 1e-5

    logits_alone = torch.cat([model(input_ids=d[None]).logits[0] for d in docs])
    assert (packed.logits[0] - logits_alone).abs().max().item() < 1e-4


def test_generation_with_the_varlen_attention_matches_sdpa(tokenizer):
    """The training model keeps its attention after training; generating with it must still be right."""
    model = build_tiny_llama(tokenizer, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate=128)
    prompts = tokenizer(["Hello world, this is", "A spider"], return_tensors="pt", padding=True, padding_side="left")
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    model.set_attn_implementation("sdpa")
    expected = model.generate(**prompts, **settings)
    assert speed.register_varlen_attention() is None
    model.set_attn_implementation(speed.VARLEN)
    assert torch.equal(model.generate(**prompts, **settings), expected)


def test_packed_documents_do_not_see_each_other(tokenizer):
    """Changing the first document must not move the second one's logits by a hair."""
    model = lora_model(tokenizer)
    docs, labels = documents(len(tokenizer))
    before = model(**packed_batch(docs, labels)).logits[0, DOC_LENGTHS[0]:]
    docs[0] = (docs[0] + 1) % 100
    after = model(**packed_batch(docs, labels)).logits[0, DOC_LENGTHS[0]:]
    assert (before - after).abs().max().item() == 0.0


def test_fused_head_with_torch_kernel_equals_model_cross_entropy(tokenizer):
    from trl.trainer.utils import add_fused_lm_head

    docs, labels = documents(len(tokenizer))
    batch = packed_batch(docs, labels)

    reference = lora_model(tokenizer)
    loss_ref = reference(**batch).loss
    loss_ref.backward()

    fused = lora_model(tokenizer)
    assert speed.install_torch_fused_head()
    add_fused_lm_head(fused.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    out = fused(**batch, fused_lm_head=True)
    out.loss.backward()

    assert abs(out.loss.item() - loss_ref.item()) < 1e-5
    ref_grads, grads = lora_grads(reference), lora_grads(fused)
    assert ref_grads.keys() == grads.keys() and ref_grads
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-4, atol=1e-6), name
    # Scored positions are exactly the labelled ones.
    assert int(out.label_mask.sum()) == int((batch["labels"][0, 1:] != -100).sum())


def test_torch_chunked_logprob_matches_full_softmax_with_softcap_and_temperature():
    chunked = speed.torch_chunked_logprob()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(70, 16, generator=generator, requires_grad=True)
    weight = torch.randn(5000, 16, generator=generator, requires_grad=True)  # > one chunk of rows
    bias = torch.randn(5000, generator=generator, requires_grad=True)
    targets = torch.randint(0, 5000, (70,), generator=generator)
    outputs = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    log_probs, entropy, log_sum_sq, mean, top1 = chunked.apply(hidden, weight, bias, targets, 0.7, 32768, 30.0,
                                                               0.5, outputs)

    z = 30.0 * torch.tanh(torch.nn.functional.linear(hidden, weight, bias) * 0.5 / 30.0) / 0.7
    log_softmax = z.log_softmax(-1)
    ref_log_probs = log_softmax.gather(1, targets[:, None])[:, 0]
    ref_entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    assert torch.allclose(log_probs, ref_log_probs, atol=1e-4)
    assert torch.allclose(entropy, ref_entropy, atol=1e-4)
    assert torch.allclose(log_sum_sq, torch.logsumexp(2 * log_softmax, -1), atol=1e-4)
    assert torch.allclose(mean, z.mean(-1), atol=1e-5)
    assert torch.equal(top1, z.argmax(-1) == targets)

    weights = torch.randn(70, generator=generator), torch.randn(70, generator=generator)
    grads = torch.autograd.grad((log_probs * weights[0]).sum() + (entropy * weights[1]).sum(), (hidden, weight, bias))
    ref = torch.autograd.grad((ref_log_probs * weights[0]).sum() + (ref_entropy * weights[1]).sum(),
                              (hidden, weight, bias))
    for got, want in zip(grads, ref, strict=True):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mode", ["selective", "full", pytest.param("offloaded", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="offloading pins host memory, which needs a GPU"))])
def test_checkpointing_modes_change_memory_not_numbers(tokenizer, mode):
    docs, labels = documents(len(tokenizer))
    batch = packed_batch(docs, labels)

    plain = lora_model(tokenizer, layers=4)
    plain.train()
    plain(**batch).loss.backward()

    plan = speed.SpeedPlan(device="cpu", attention="sdpa", packing=True, fused_loss="model", liger=False,
                           checkpointing=mode, every_n_layers=2, compile_layers=False, unsloth=False,
                           tokens_per_step=sum(DOC_LENGTHS), memory_available=None, memory_estimate=0)
    kwargs = plan.trainer_kwargs()
    assert kwargs["gradient_checkpointing"] is True
    settings = dict(kwargs["gradient_checkpointing_kwargs"])
    checkpointed = lora_model(tokenizer, layers=4)
    # What Trainer does with these arguments at the start of training.
    checkpointed.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": settings.pop("use_reentrant")},
        every_n_layers=settings.pop("every_n_layers", 1), offload=settings.pop("offload", False))
    assert not settings
    layers = checkpointed.get_base_model().model.layers
    expected = [i % 2 == 0 for i in range(4)] if mode == "selective" else [True] * 4
    assert [layer.gradient_checkpointing for layer in layers] == expected
    checkpointed.train()
    loss = checkpointed(**batch).loss
    loss.backward()

    assert abs(loss.item() - plain(**batch).loss.item()) < 1e-6
    for name, grad in lora_grads(checkpointed).items():
        assert torch.allclose(grad, lora_grads(plain)[name], rtol=1e-5, atol=1e-7), name


def test_apply_speed_plan_sets_attention_and_turns_checkpointing_off(tokenizer):
    model = lora_model(tokenizer)
    model.get_base_model().gradient_checkpointing_enable()  # as 4-bit loading leaves it
    device = speed.DeviceInfo("cpu", "cpu", 64 * GIB, 32 * GIB)
    plan = speed.choose_speed_plan(device, model.config, max_seq_length=256, batch_size=2, kernels=NO_KERNELS,
                                   overrides={"attention": speed.VARLEN})
    applied = speed.apply_speed_plan(model, plan)
    base = model.get_base_model()
    assert applied.attention == speed.VARLEN == base.config._attn_implementation
    assert applied.checkpointing == "none" and not base.is_gradient_checkpointing
    docs, labels = documents(len(tokenizer))
    loss = model(**packed_batch(docs, labels)).loss
    assert abs(loss.item() - per_document_loss(model, docs, labels).item()) < 1e-5


# ---------------------------------------------------------------------------------------------
# Choosing the plan


def plan_for(device, **kw):
    kw.setdefault("kernels", NO_KERNELS)
    kw.setdefault("overrides", {})
    return speed.choose_speed_plan(device, LLAMA3_8B, max_seq_length=kw.pop("max_seq_length", 2048),
                                   batch_size=kw.pop("batch_size", 2), **kw)


def gpu(total_gib: float, weights_gib: float = 15.0):
    return speed.DeviceInfo("cuda", f"{total_gib:.0f} GiB GPU", int(total_gib * GIB),
                            int((total_gib - weights_gib - 1) * GIB), int(weights_gib * GIB), (9, 0))


def test_h200_trains_without_checkpointing():
    plan = plan_for(H200)
    assert plan.checkpointing == "none"
    assert plan.trainer_kwargs() == {"gradient_checkpointing": False}
    assert plan.packing and plan.tokens_per_step == 4096


def test_24_gib_card_checkpoints_and_its_estimate_fits():
    plan = plan_for(gpu(24))
    assert plan.checkpointing in ("selective", "full")
    assert plan.memory_estimate * speed.SAFETY_FACTOR + speed.SAFETY_BYTES <= plan.memory_available
    assert plan.trainer_kwargs()["gradient_checkpointing"] is True


def test_a_48_gib_card_checkpoints_only_some_layers():
    plan = plan_for(gpu(48))
    assert plan.checkpointing == "selective" and plan.every_n_layers in speed.SELECTIVE_STEPS
    assert plan.trainer_kwargs()["gradient_checkpointing_kwargs"] == {"use_reentrant": False,
                                                                       "every_n_layers": plan.every_n_layers}


def test_long_sequences_on_a_small_card_offload_checkpoints():
    plan = plan_for(gpu(24), max_seq_length=32768, batch_size=1)
    assert plan.checkpointing == "offloaded"
    assert plan.trainer_kwargs()["gradient_checkpointing_kwargs"]["offload"] is True


def test_more_memory_never_means_more_recompute():
    order = {"none": 0, "selective": 1, "full": 2, "offloaded": 3}
    plans = [plan_for(gpu(total)) for total in (20, 24, 32, 40, 48, 64, 80, 141)]
    ranks = [(order[p.checkpointing], -p.every_n_layers) for p in plans]
    assert ranks == sorted(ranks, reverse=True)


def test_a_memory_cap_counts_the_weights_already_loaded():
    assert plan_for(H200, memory_budget=24 * GIB).checkpointing in ("selective", "full")
    assert plan_for(H200, memory_budget=120 * GIB).checkpointing == "none"


def test_estimate_matches_the_measured_8b_activations():
    """Measured on an H200, Liger + packed 2x4096: 82.3 GiB peak without checkpointing, 20.3 GiB with it,
    ~15.6 GiB of that the weights."""
    shape = speed.ModelShape.of(LLAMA3_8B)
    estimate = speed.estimate_training_memory(shape, 8192, "none", fused_kernels=True, fused_loss=True)
    assert 0.85 * (82.3 - 15.6) * GIB < estimate.total < 1.15 * (82.3 - 15.6) * GIB
    full = speed.estimate_training_memory(shape, 8192, "full", fused_kernels=True, fused_loss=True)
    assert 0.7 * (20.3 - 15.6) * GIB < full.total < 1.3 * (20.3 - 15.6) * GIB
    assert abs(speed.training_flops_per_token(shape) / 4 - 7.5e9) < 0.1e9


@pytest.mark.parametrize(("kernels", "capability", "expected"), [
    (speed.Kernels(flash_attention_3=True, flash_attention_2=True, torch_varlen=True), (9, 0), "flash_attention_3"),
    (speed.Kernels(flash_attention_3=True, flash_attention_2=True), (8, 0), "flash_attention_2"),
    (speed.Kernels(torch_varlen=True), (9, 0), speed.VARLEN),
    (speed.Kernels(torch_varlen=True), (7, 5), "sdpa"),
    (NO_KERNELS, (9, 0), "sdpa"),
])
def test_attention_prefers_varlen_kernels_the_gpu_supports(kernels, capability, expected):
    device = speed.DeviceInfo("cuda", "gpu", 80 * GIB, 60 * GIB, 15 * GIB, capability)
    assert plan_for(device, kernels=kernels).attention == expected


def test_kernels_and_loss_head_follow_the_device():
    on_gpu = plan_for(H200, kernels=speed.Kernels(liger=True, triton=True))
    assert (on_gpu.liger, on_gpu.fused_loss, on_gpu.uses_fused_loss) == (True, "trl-triton", True)
    cpu = speed.DeviceInfo("cpu", "cpu", 64 * GIB, 32 * GIB)
    on_cpu = plan_for(cpu, kernels=speed.Kernels(liger=True, triton=True), max_seq_length=256)
    assert (on_cpu.liger, on_cpu.fused_loss, on_cpu.attention) == (False, "torch-chunked", "sdpa")
    forced = plan_for(cpu, max_seq_length=256, overrides={"checkpointing": "offloaded"})
    assert forced.checkpointing == "full"
    unsloth = plan_for(H200, backend="unsloth", kernels=speed.Kernels(liger=True, triton=True, unsloth=True))
    assert (unsloth.unsloth, unsloth.liger, unsloth.checkpointing) == (True, False, "unsloth")
    assert unsloth.trainer_kwargs() == {"gradient_checkpointing": False}


def test_overrides_force_single_choices_and_unknown_ones_are_named(monkeypatch):
    monkeypatch.setenv(speed.SPEED_ENV, "checkpointing=selective, every_n_layers=4; compile=on")
    plan = speed.choose_speed_plan(H200, LLAMA3_8B, max_seq_length=2048, batch_size=2, kernels=NO_KERNELS)
    assert (plan.checkpointing, plan.every_n_layers, plan.compile_layers) == ("selective", 4, True)
    assert plan.reasons["checkpointing"] == f"forced by {speed.SPEED_ENV}"
    with pytest.raises(speed.SpeedPlanError, match="unknown setting 'checkpoint'"):
        speed.parse_overrides("checkpoint=full")
    with pytest.raises(speed.SpeedPlanError, match="must be one of"):
        speed.parse_overrides("attention=flash")


def test_describe_is_json_ready_and_says_why(tokenizer):
    import json

    plan = plan_for(gpu(24))
    described = json.loads(json.dumps(plan.describe()))
    assert described["checkpointing"] == plan.checkpointing
    assert set(described["reasons"]) >= {"attention", "checkpointing", "fused_loss", "liger", "packing"}
    assert "GiB" in plan.summary()
