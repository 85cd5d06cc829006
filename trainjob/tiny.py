"""A tiny Llama 3-style base model that runs anywhere in seconds.

`lt train --local` falls back to it when no base model can be reached, and tests train it on CPU.
The tokenizer is a small byte-level BPE carrying Llama 3 Instruct's real special tokens, chat
template and bos/eos/pad conventions, so every template, mask and stop-token path behaves as it
would with the real 128k vocabulary; the model is a randomly initialised `LlamaForCausalLM`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from trainjob.template import LLAMA3_CHAT_TEMPLATE  # one copy of Meta's template

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOM = "<|eom_id|>"
EOT = "<|eot_id|>"
PAD = "<|reserved_special_token_0|>"

# Llama 3's order after the ordinary vocabulary (128000 + i there, len(bpe) + i here). Slot 8 is
# `<|eom_id|>` as in 3.1; the reserved tokens past `<|eot_id|>` keep 3.0's numbering.
SPECIAL_TOKENS = [
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    START_HEADER,
    END_HEADER,
    EOM,
    EOT,
    "<|reserved_special_token_4|>",
    "<|reserved_special_token_5|>",
]


# Llama 3's pre-tokenizer split (contractions, letters, numbers of up to 3 digits, punctuation, spaces).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Enough English for a few hundred useful merges when no dataset text is given.
DEFAULT_CORPUS = [
    "You are a helpful assistant. Answer briefly and clearly.",
    "Each turn has a role: system, user or assistant. The system sets the rules, the user asks, "
    "and the assistant answers.",
    "What is the capital of France?",
    "The capital of France is Paris.",
    "How many legs does a spider have?",
    "A spider has eight legs.",
    "Translate 'good morning' into Spanish.",
    "'Good morning' in Spanish is 'buenos días'.",
    "Write a haiku about the sea.",
    "Waves fold into foam, the tide keeps its patient time, salt wind on the stones.",
    "Can you summarise the plot of a story in one sentence?",
    "Sure. A young traveller leaves home, meets friends and enemies, and returns changed.",
    "What is 12 times 12? 12 times 12 is 144.",
    "Fine-tuning adapts a pretrained language model to a new task with a small dataset. "
    "Low-rank adapters train a few extra matrices while the base weights stay frozen, "
    "which keeps memory use low and lets one base model serve many tasks.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "In the morning the market opens early. Farmers bring vegetables, bread and cheese, and "
    "the square fills with voices, music and the smell of coffee until the afternoon.",
    "Python, JSON, HTTP and SSH are everyday tools: print('hello, world'); {\"key\": [1, 2, 3]}.",
]


def build_llama3_style_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE on `texts` and dress it as Llama 3 Instruct's tokenizer.

    `vocab_size` counts the ordinary tokens (at most; a small corpus may stop earlier); Llama 3's
    special tokens follow them. Byte-level, so any text encodes without an unknown token.
    Returns a `PreTrainedTokenizerFast`; the same input always gives the same tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(DEFAULT_CORPUS if texts is None else texts)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    bpe.add_special_tokens(SPECIAL_TOKENS)
    # Like Llama 3: plain `tokenizer(text)` starts with <|begin_of_text|>.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A",
        pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT}:1 $B:1",
        special_tokens=[(BEGIN_OF_TEXT, bpe.token_to_id(BEGIN_OF_TEXT))],
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BEGIN_OF_TEXT,
        eos_token=EOT,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(
    tokenizer,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_position_embeddings: int = 1024,
    seed: int = 0,
):
    """A randomly initialised `LlamaForCausalLM` sized for `tokenizer`, with Llama 3's token ids."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    bos_id = tokenizer.convert_tokens_to_ids(BEGIN_OF_TEXT)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    end_of_text_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_position_embeddings,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eot_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Fork the RNG so building a model neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id,
        # Meta's Instruct generation config stops on both; chat turns end with <|eot_id|>.
        eos_token_id=[end_of_text_id, eot_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def write_tiny_base_model(out_dir, texts: Iterable[str] | None = None, **kw) -> Path:
    """Build the tokenizer and model and save both (safetensors) where `from_pretrained` finds them.

    `vocab_size` goes to the tokenizer; other keyword arguments to `build_tiny_llama`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_kw = {"vocab_size": kw.pop("vocab_size")} if "vocab_size" in kw else {}
    tokenizer = build_llama3_style_tokenizer(texts, **tokenizer_kw)
    model = build_tiny_llama(tokenizer, **kw)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
