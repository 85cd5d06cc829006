"""Llama 3's tokenizer as llama.cpp reads it: a GPT-2 style byte-level BPE with the `llama-bpe` split.

llama.cpp does not run the Hugging Face tokenizer: it re-implements it from the GGUF's token list,
merges and the name of a pre-tokenizer. So the export refuses any tokenizer whose behaviour that name
would not reproduce (another split pattern, SentencePiece, byte fallback) instead of writing a file
that tokenizes differently from the model's training.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from trainjob.template import LLAMA3_CHAT_TEMPLATE  # used when a checkpoint carries none
from trainjob.tiny import LLAMA3_SPLIT_PATTERN  # Llama 3's pre-tokenizer regex, one copy

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
REQUIRED_SPECIAL_TOKENS = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT)

GGUF_TOKENIZER_MODEL = "gpt2"
GGUF_PRE_TOKENIZER = "llama-bpe"


# Training templates mark the assistant's tokens with {% generation %} blocks, a Hugging Face
# extension that llama.cpp's and llama-cpp-python's Jinja engines reject; rendering ignores them.
_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


class UnsupportedModelError(ValueError):
    """The checkpoint is not one this export converts faithfully."""


@dataclass
class Llama3Vocab:
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]
    bos_id: int
    eot_id: int
    eom_id: int | None
    pad_id: int | None
    chat_template: str


def read_llama3_vocab(model_dir: Path, vocab_size: int) -> Llama3Vocab:
    """Read and check `tokenizer.json` (+ config, chat template) of a saved Hugging Face tokenizer.

    `vocab_size` is the model's embedding size: the token list is padded with unused entries to it,
    as llama.cpp requires one token per embedding row.
    """
    import gguf

    model_dir = Path(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UnsupportedModelError(
            f"{model_dir} has no tokenizer.json: save the tokenizer with the model "
            "(tokenizer.save_pretrained) before exporting"
        )
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    _check_llama3_tokenizer(tokenizer, tokenizer_file)

    # Read by hand rather than with gguf.vocab.BpeVocab: that reader refuses tokenizers re-saved with
    # a decoder sequence or an inert byte-fallback flag, and types every added token as control,
    # while llama.cpp must know which added tokens are special (control) and which are plain text.
    tokens, token_types = _tokens_and_types(tokenizer, tokenizer_file)
    if len(tokens) > vocab_size:
        raise UnsupportedModelError(
            f"the tokenizer in {model_dir} has {len(tokens)} tokens but the model's embedding has only "
            f"{vocab_size} rows (config.json vocab_size): resize the embeddings before exporting"
        )
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        token_types.append(gguf.TokenType.UNUSED)

    ids = {text: i for i, text in enumerate(tokens)}
    missing = [t for t in REQUIRED_SPECIAL_TOKENS if t not in ids]
    if missing:
        raise UnsupportedModelError(
            f"{tokenizer_file} lacks Llama 3's special tokens {', '.join(missing)}: "
            "only Llama 3 / 3.1 Instruct-style tokenizers are supported"
        )

    special = _special_vocab(model_dir, vocab_size)
    if not special.merges:
        raise UnsupportedModelError(f"{tokenizer_file} has no BPE merges")
    pad_id = special.special_token_ids.get("pad")
    eot_id = ids[EOT]
    return Llama3Vocab(
        tokens=tokens,
        token_types=[int(t) for t in token_types],
        merges=special.merges,
        bos_id=ids[BEGIN_OF_TEXT],
        eot_id=eot_id,
        eom_id=ids.get(EOM),
        # The pad token is only a hint to runtimes; a pad equal to the end-of-turn token would read as
        # "stop" to some of them, so it is left out then.
        pad_id=pad_id if pad_id is not None and pad_id != eot_id else None,
        chat_template=_chat_template(special.chat_template),
    )


def _special_vocab(model_dir: Path, vocab_size: int):
    import gguf

    # gguf's reader warns that Llama 3's pair template (two sequences, each after a BOS) is unusual;
    # pairs never occur in chat, so only real errors are let through.
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    finally:
        log.setLevel(level)


def add_vocab(writer, vocab: Llama3Vocab) -> None:
    """Write the tokenizer keys llama.cpp reads for a Llama 3 model."""
    writer.add_tokenizer_model(GGUF_TOKENIZER_MODEL)
    writer.add_tokenizer_pre(GGUF_PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    # A chat model's turn ends with <|eot_id|>: as EOS it is what every runtime stops on.
    writer.add_eos_token_id(vocab.eot_id)
    writer.add_eot_token_id(vocab.eot_id)
    if vocab.eom_id is not None:
        writer.add_eom_token_id(vocab.eom_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    # Llama 3 prompts start with <|begin_of_text|>; nothing is appended.
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(vocab.chat_template)


def _tokens_and_types(tokenizer: dict, path: Path) -> tuple[list[str], list[int]]:
    import gguf

    by_id: dict[int, tuple[str, int]] = {
        i: (text, gguf.TokenType.NORMAL) for text, i in tokenizer["model"]["vocab"].items()
    }
    for added in tokenizer.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        if added["id"] in by_id and by_id[added["id"]][0] != added["content"]:
            raise UnsupportedModelError(f"{path}: token id {added['id']} has two different texts")
        if added["id"] not in by_id or kind == gguf.TokenType.CONTROL:
            by_id[added["id"]] = (added["content"], kind)
    count = max(by_id) + 1
    gaps = [i for i in range(count) if i not in by_id]
    if gaps:
        raise UnsupportedModelError(
            f"{path}: token ids {gaps[:5]}... have no token; the vocabulary has holes"
        )
    return [by_id[i][0] for i in range(count)], [int(by_id[i][1]) for i in range(count)]


def _chat_template(template) -> str:
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        return LLAMA3_CHAT_TEMPLATE
    return _GENERATION_TAG.sub("", template)


def _check_llama3_tokenizer(tokenizer: dict, path: Path) -> None:
    model = tokenizer.get("model") or {}
    # (A byte-fallback flag is inert here: ByteLevel maps every byte to a token of the vocabulary.)
    if model.get("type") != "BPE":
        raise UnsupportedModelError(
            f"{path} is a {model.get('type')} tokenizer, not Llama 3's byte-level BPE "
            "(SentencePiece tokenizers such as Llama 2's or Mistral's are not supported)"
        )
    normalizer = tokenizer.get("normalizer")
    if normalizer and not (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
        raise UnsupportedModelError(f"{path} normalizes text ({normalizer.get('type')}); Llama 3's does not")
    if not _has_llama3_split(tokenizer.get("pre_tokenizer")):
        raise UnsupportedModelError(
            f"{path} does not pre-tokenize like Llama 3 (a Split on Llama 3's pattern followed by "
            f"ByteLevel without its own regex); found {json.dumps(tokenizer.get('pre_tokenizer'))[:300]}. "
            "llama.cpp would split text differently from the model's training"
        )


def _has_llama3_split(pre: dict | None) -> bool:
    if not pre or pre.get("type") != "Sequence":
        return False
    steps = pre.get("pretokenizers") or []
    if len(steps) != 2:
        return False
    split, byte_level = steps
    return (
        split.get("type") == "Split"
        and (split.get("pattern") or {}).get("Regex") == LLAMA3_SPLIT_PATTERN
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("use_regex", True)
        and not byte_level.get("add_prefix_space", False)
    )
