"""Load the base model and tokenizer, and put LoRA adapters on them.

Plain transformers + PEFT everywhere (bf16/fp32 on CPU, bitsandbytes 4-bit on CUDA); Unsloth's
FastLanguageModel only on the `unsloth` backend, in its own small function.
"""

from __future__ import annotations

import logging
from typing import Any

from .backend import UNSLOTH, Backend
from .config import JobConfig

log = logging.getLogger(__name__)


def load_base_model(config: JobConfig, backend: Backend) -> tuple[Any, Any]:
    """The base model (frozen, maybe 4-bit) and its tokenizer, as the backend wants them."""
    if backend.name == UNSLOTH:
        model, tokenizer = _load_with_unsloth(config, backend)
    else:
        tokenizer = load_tokenizer(config.base_model)
        model = _load_with_transformers(config, backend)
    # With a KV cache the model ignores packed position_ids and lets documents attend to each other.
    model.config.use_cache = False
    return model, tokenizer


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _load_with_transformers(config: JobConfig, backend: Backend):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, backend.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if backend.on_cuda:
        kwargs["device_map"] = {"": 0}
    if backend.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    log.info("loading %s (%s%s)", config.base_model, backend.dtype, ", 4-bit nf4" if backend.load_in_4bit else "")
    model = AutoModelForCausalLM.from_pretrained(config.base_model, **kwargs)
    if backend.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return model


def _load_with_unsloth(config: JobConfig, backend: Backend):
    from unsloth import FastLanguageModel

    log.info("loading %s with Unsloth (4-bit %s)", config.base_model, backend.load_in_4bit)
    return FastLanguageModel.from_pretrained(
        model_name=config.base_model,
        max_seq_length=config.max_seq_length,
        dtype=None,
        load_in_4bit=backend.load_in_4bit,
    )


def add_lora(model, config: JobConfig, backend: Backend):
    """Wrap the base in LoRA adapters on the configured projections; only those train."""
    if backend.name == UNSLOTH:
        from unsloth import FastLanguageModel

        model = FastLanguageModel.get_peft_model(
            model,
            r=config.lora_r,
            target_modules=list(config.lora_target_modules),
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=config.seed,
        )
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        ))
    trainable, total = _count_parameters(model)
    log.info("LoRA r=%d alpha=%s on %s: %s of %s parameters train (%.3f%%)", config.lora_r, config.lora_alpha,
             ",".join(config.lora_target_modules), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model


def _count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
