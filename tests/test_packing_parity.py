"""Packing must not change what the model learns from: documents packed into one row (position_ids
restarting per document, no cross-document attention) score exactly as they do one by one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from tests.train_support import chat_splits  # noqa: E402
from trainjob.backend import choose_backend  # noqa: E402
from trainjob.config import JobConfig  # noqa: E402
from trainjob.model import add_lora  # noqa: E402
from trainjob.template import build_training_dataset, prepare_tokenizer  # noqa: E402
from trainjob.tiny import build_llama3_style_tokenizer, build_tiny_llama  # noqa: E402
from trainjob.train import build_sft_config, build_trainer  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model with (non-zero) LoRA weights and the chats tokenized the way the job does it."""
    splits = chat_splits()
    conversations = [row["chats"] for row in splits["train"][:24]]
    tokenizer = build_llama3_style_tokenizer([m["content"] for c in conversations for m in c], vocab_size=400)
    prepare_tokenizer(tokenizer)
    dataset = build_training_dataset(tokenizer, conversations, 256).dataset
    backend = choose_backend()
    config = JobConfig(run_id="parity", dataset="-", lora_r=8, batch_size=4, max_seq_length=256)
    model = add_lora(build_tiny_llama(tokenizer, seed=1), config, backend)
    # Fresh LoRA B matrices are zero; give the adapters a real effect so they are part of the check.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    model.eval()
    return model, tokenizer, dataset, backend, config, tmp_path_factory.mktemp("parity")


def batches(setup, packing: bool):
    model, tokenizer, dataset, backend, config, out = setup
    config.packing = packing
    sft_config = build_sft_config(config, backend, out / ("packed" if packing else "padded"))
    trainer = build_trainer(model, tokenizer, sft_config, dataset, dataset, fused_loss=backend.fused_loss)
    return list(trainer.get_eval_dataloader())


def token_loss(model, batch, use_position_ids=True) -> tuple[float, int]:
    """Summed cross-entropy over the loss tokens, and their count."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    if not use_position_ids:
        inputs.pop("position_ids")
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")
    return loss.item(), int((labels != -100).sum())


def mean_loss(model, batch_list, **kwargs) -> tuple[float, int]:
    results = [token_loss(model, b, **kwargs) for b in batch_list]
    total, count = sum(r[0] for r in results), sum(r[1] for r in results)
    return total / count, count


def test_packed_batches_restart_positions_per_document(setup):
    packed = batches(setup, packing=True)
    dataset = setup[2]
    for batch in packed:
        assert "attention_mask" not in batch  # padding-free: documents are told apart by position_ids
        assert batch["input_ids"].shape[0] == 1
    starts = sum(int((b["position_ids"] == 0).sum()) for b in packed)
    assert starts == len(dataset)  # every document starts again at position 0
    assert len(packed) < len(dataset) / 4  # several documents per row: packing happened


def test_packed_loss_equals_unpacked_loss(setup):
    model = setup[0]
    padded, packed = batches(setup, packing=False), batches(setup, packing=True)
    unpacked_loss, unpacked_count = mean_loss(model, padded)
    packed_loss, packed_count = mean_loss(model, packed)
    assert packed_count == unpacked_count  # the same tokens are in the loss
    assert packed_loss == pytest.approx(unpacked_loss, abs=1e-4)
    # Control: the same packed rows with positions running on (documents attending to each other,
    # as with a KV cache or a lost position_ids) score differently, so the check above can fail.
    leaky_loss, _ = mean_loss(model, packed, use_position_ids=False)
    assert abs(leaky_loss - unpacked_loss) > 5e-4, (leaky_loss, unpacked_loss)
