"""The Llama 3 chat template, the stop and pad tokens, and which tokens the loss sees.

Training must match serving: every assistant turn ends with `<|eot_id|>`, that token is inside the
loss (or the model never learns to stop), padding uses a reserved token (never the eos), and the
text carries exactly one `<|begin_of_text|>`. The loss mask is computed here from the rendered
conversation itself (incremental rendering), so it works for the stock Llama 3 and 3.1 templates
alike, without `{% generation %}` markers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from trainjob.data import DataValidationError, Problem

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
FINETUNE_PAD = "<|finetune_right_pad_id|>"
RESERVED = "<|reserved_special_token_{}|>"

FAMILIES = ("llama-3", "llama-3.1")
POLICIES = ("drop", "fail", "truncate")

# Meta-Llama-3-8B-Instruct's template (its tokenizer_config.json), byte for byte: TRL and other tools
# recognise this exact string.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama 3.1 Instruct's format for system/user/assistant conversations (no tool calls): a system
# block that always opens with the knowledge-cutoff and date lines, then the same turns as Llama 3.
# Renders the same text as Meta's 3.1 template for these conversations.
LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: ' + date_string + '\n\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in loop_messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

OFFICIAL_TEMPLATES = {"llama-3": LLAMA3_CHAT_TEMPLATE, "llama-3.1": LLAMA31_CHAT_TEMPLATE}

# 3.1 (and 3.2/3.3, same turn format) names: "Meta-Llama-3.1-8B-Instruct", "Llama-3.2-1B", "llama3.1".
_NAME_31 = re.compile(r"llama[-_ ]?3[._][1-9](?!\d)", re.IGNORECASE)
_NAME_3 = re.compile(r"llama[-_ ]?3(?![\d.])", re.IGNORECASE)
_TEMPLATE_31_MARKERS = ("Cutting Knowledge Date", "<|python_tag|>", "ipython")


class TemplateError(ValueError):
    """The tokenizer or its chat template can't produce correct Llama 3 training data."""


@dataclass(frozen=True)
class TemplateInfo:
    """What `prepare_tokenizer` settled on; train.py records it and export reuses it."""

    family: str
    chat_template: str
    template_source: str  # "tokenizer" (kept the model's own) or "official" (set here)
    bos_id: int
    eos_id: int
    eot_id: int
    pad_id: int
    pad_token: str
    start_header_id: int
    end_header_id: int


# ---------------------------------------------------------------------------------------------
# Family and tokenizer set-up


def detect_family(tokenizer_or_name) -> str:
    """ "llama-3.1" (also 3.2/3.3), "llama-3" or "unknown", from a model name or a tokenizer."""
    if isinstance(tokenizer_or_name, str):
        return _family_from_name(tokenizer_or_name)
    tokenizer = tokenizer_or_name
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template:
        if any(marker in template for marker in _TEMPLATE_31_MARKERS):
            return "llama-3.1"
        if START_HEADER in template and EOT in template:
            return "llama-3"
    if _token_id(tokenizer, START_HEADER) is None or _token_id(tokenizer, EOT) is None:
        return "unknown"
    # Tokens 3.1 added over 3.0 (`<|eom_id|>` alone is not decisive: some 3.0-style vocabularies have it).
    if _token_id(tokenizer, FINETUNE_PAD) is not None or _token_id(tokenizer, "<|python_tag|>") is not None:
        return "llama-3.1"
    name_family = _family_from_name(getattr(tokenizer, "name_or_path", "") or "")
    return name_family if name_family != "unknown" else "llama-3"


def _family_from_name(name: str) -> str:
    if _NAME_31.search(name):
        return "llama-3.1"
    if _NAME_3.search(name):
        return "llama-3"
    return "unknown"


def prepare_tokenizer(tokenizer, family: str = "auto") -> TemplateInfo:
    """Make `tokenizer` train Llama 3 Instruct correctly, in place, and say what was set.

    - chat template: the model's own when it has one (family "auto"), else the official one for
      the detected family; a forced family ("llama-3", "llama-3.1") always sets the official one;
    - eos `<|eot_id|>` (what ends each assistant turn, and what the model must learn to emit);
    - pad: `<|finetune_right_pad_id|>` where it exists, else a reserved special token; never the eos.
    """
    if family not in ("auto", *FAMILIES):
        raise TemplateError(f"unknown chat_template {family!r}; use one of: auto, {', '.join(FAMILIES)}")
    missing = [
        token
        for token in (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT)
        if _token_id(tokenizer, token) is None
    ]
    if missing:
        raise TemplateError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no {', '.join(missing)}: "
            "it is not a Llama 3 tokenizer, and this job trains Llama 3 Instruct models"
        )

    existing = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if family == "auto" and existing:
        chosen, source = detect_family(tokenizer), "tokenizer"
    else:
        chosen = detect_family(tokenizer) if family == "auto" else family
        tokenizer.chat_template = OFFICIAL_TEMPLATES[chosen]
        source = "official"
    if chosen == "unknown":
        raise TemplateError(
            "the tokenizer's chat template is not a Llama 3 template; set chat_template to "
            '"llama-3" or "llama-3.1" to use the official one'
        )

    tokenizer.bos_token = BEGIN_OF_TEXT
    tokenizer.eos_token = EOT
    pad_token = _choose_pad_token(tokenizer)
    tokenizer.pad_token = pad_token
    info = TemplateInfo(
        family=chosen,
        chat_template=tokenizer.chat_template,
        template_source=source,
        bos_id=_token_id(tokenizer, BEGIN_OF_TEXT),
        eos_id=tokenizer.eos_token_id,
        eot_id=_token_id(tokenizer, EOT),
        pad_id=tokenizer.pad_token_id,
        pad_token=pad_token,
        start_header_id=_token_id(tokenizer, START_HEADER),
        end_header_id=_token_id(tokenizer, END_HEADER),
    )
    if info.pad_id in (info.eos_id, info.eot_id):
        raise TemplateError(f"pad token {pad_token} has the eos id {info.eos_id}")
    _probe_template(tokenizer)
    return info


def _choose_pad_token(tokenizer) -> str:
    """A token that never appears in real text, so masking padding hides nothing the model must learn."""
    if _token_id(tokenizer, FINETUNE_PAD) is not None:
        return FINETUNE_PAD
    current = tokenizer.pad_token
    if current and re.fullmatch(r"<\|reserved_special_token_\d+\|>", current):
        return current  # e.g. a reserved token the model's publisher already chose
    for number in range(256):
        if _token_id(tokenizer, RESERVED.format(number)) is not None:
            return RESERVED.format(number)
    raise TemplateError(
        f"the tokenizer has neither {FINETUNE_PAD} nor any <|reserved_special_token_N|> to pad with; "
        f"padding with {EOT} would mask the stop token out of the loss"
    )


def _probe_template(tokenizer) -> None:
    """Fail at set-up, not mid-run, when the template can't yield a correct assistant mask."""
    probe = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    tokenize_conversation(tokenizer, probe)


def _token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if the vocabulary really holds it (not the unknown-token fallback)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or not isinstance(token_id, int):
        return None
    if tokenizer.convert_ids_to_tokens(token_id) != token:
        return None
    return token_id


# ---------------------------------------------------------------------------------------------
# One conversation -> ids and loss mask


def tokenize_conversation(tokenizer, messages: Sequence[dict], max_length: int | None = None) -> dict:
    """Render with the tokenizer's chat template and tokenize, marking what the loss trains on.

    Returns `input_ids` and `assistant_masks` (cut to `max_length` when given) and `num_tokens`, the
    full length before any cut. The mask is 1 on each assistant reply's tokens and the `<|eot_id|>`
    closing it, 0 on everything else (bos, headers, system and user turns).
    """
    text, spans = _render_with_assistant_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    masks = [
        1 if any(start < end_span and end > start_span for start_span, end_span in spans) else 0
        for start, end in offsets
    ]

    eot_id = _token_id(tokenizer, EOT)
    for start_span, end_span in spans:
        last = max(i for i, (start, end) in enumerate(offsets) if start < end_span and end > start_span)
        if input_ids[last] != eot_id:
            raise TemplateError(
                f"the chat template does not end assistant turns with {EOT}: the model would not learn to stop"
            )
    bos_id = _token_id(tokenizer, BEGIN_OF_TEXT)
    bos_count = input_ids.count(bos_id)
    if bos_count == 0:
        input_ids.insert(0, bos_id)  # a template without bos still gets exactly one
        masks.insert(0, 0)
    elif bos_count > 1 or input_ids[0] != bos_id:
        raise TemplateError(
            f"the rendered conversation has {bos_count} {BEGIN_OF_TEXT} tokens; it needs exactly one, first"
        )

    num_tokens = len(input_ids)
    if max_length is not None:
        input_ids, masks = input_ids[:max_length], masks[:max_length]
    return {"input_ids": input_ids, "assistant_masks": masks, "num_tokens": num_tokens}


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _render_with_assistant_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and, per assistant message, the character span the loss covers.

    The span of message i runs from the end of "everything before it + the assistant header"
    (rendered with the generation prompt) to the end of "everything up to it": its content and
    the end-of-turn token, whatever the template puts around them.
    """
    full = _render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1])
        if not (through.startswith(prompt) and full.startswith(through)) or len(through) == len(prompt):
            raise TemplateError(
                "the chat template renders earlier turns differently as the conversation grows, so the "
                'assistant replies can\'t be located; set chat_template to "llama-3" or "llama-3.1"'
            )
        spans.append((len(prompt), len(through)))
    return full, spans


# ---------------------------------------------------------------------------------------------
# A split -> the dataset TRL trains on


@dataclass
class BuildStats:
    """What happened to one split on its way to token ids."""

    split: str
    max_length: int | None
    policy: str
    token_counts: list[int] = field(default_factory=list)  # every conversation, before any drop or cut
    dropped: list[str] = field(default_factory=list)  # "path:line" of conversations left out
    truncated: list[str] = field(default_factory=list)
    kept: int = 0
    total_tokens: int = 0  # in the kept examples, after any cut
    loss_tokens: int = 0  # of those, the ones the loss trains on

    @property
    def conversations(self) -> int:
        return len(self.token_counts)

    @property
    def over_length(self) -> int:
        if self.max_length is None:
            return 0
        return sum(1 for count in self.token_counts if count > self.max_length)

    @property
    def max_tokens(self) -> int:
        return max(self.token_counts, default=0)

    @property
    def mean_tokens(self) -> float:
        return sum(self.token_counts) / len(self.token_counts) if self.token_counts else 0.0

    def as_dict(self) -> dict:
        return {
            "split": self.split,
            "conversations": self.conversations,
            "kept": self.kept,
            "dropped": len(self.dropped),
            "truncated": len(self.truncated),
            "over_length": self.over_length,
            "max_length": self.max_length,
            "policy": self.policy,
            "tokens": {
                "all_conversations": sum(self.token_counts),
                "mean": round(self.mean_tokens, 1),
                "max": self.max_tokens,
                "kept": self.total_tokens,
                "in_loss": self.loss_tokens,
            },
        }


class TrainingData(NamedTuple):
    dataset: object  # datasets.Dataset with input_ids and assistant_masks
    stats: BuildStats
    examples: list[dict]  # the same rows as plain dicts, with "where" (path:line), for samples and reports


def tokenize_split(
    tokenizer,
    conversations: Iterable[Sequence[dict]],
    max_length: int | None,
    policy: str = "drop",
    *,
    split: str = "train",
) -> tuple[list[dict], BuildStats, list[Problem]]:
    """Tokenize a split and apply the long-conversation policy; problems are returned, not raised.

    policy: "drop" leaves out conversations longer than `max_length` (counted in the stats), "fail"
    reports each of them as a problem, "truncate" cuts them to `max_length`. Any example left with
    no token in the loss is a problem under every policy: it would train on nothing.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown long-conversation policy {policy!r}; use one of: {', '.join(POLICIES)}")
    stats = BuildStats(split=split, max_length=max_length, policy=policy)
    problems: list[Problem] = []
    examples: list[dict] = []
    for conversation in conversations:
        source, line = getattr(conversation, "source", split), getattr(conversation, "line", None)
        where = source if line is None else f"{source}:{line}"
        tokens = tokenize_conversation(tokenizer, conversation, max_length)
        count = tokens["num_tokens"]
        stats.token_counts.append(count)
        too_long = max_length is not None and count > max_length
        if too_long and policy == "drop":
            stats.dropped.append(where)
            continue
        if too_long and policy == "fail":
            problems.append(
                Problem(
                    source,
                    line,
                    "chats",
                    f"{count:,} tokens, over max_seq_length {max_length:,} "
                    '(long_conversations is "fail"; use "drop" to leave such conversations out, '
                    "or raise max_seq_length)",
                )
            )
            continue
        if not any(tokens["assistant_masks"]):
            reason = (
                f"after cutting to max_seq_length {max_length:,} tokens (of {count:,})"
                if too_long
                else "after applying the chat template"
            )
            problems.append(
                Problem(
                    source,
                    line,
                    "chats",
                    f"no assistant tokens left in the loss {reason}; it would train on nothing",
                )
            )
            continue
        if too_long:
            stats.truncated.append(where)
        stats.kept += 1
        stats.total_tokens += len(tokens["input_ids"])
        stats.loss_tokens += sum(tokens["assistant_masks"])
        examples.append(
            {"input_ids": tokens["input_ids"], "assistant_masks": tokens["assistant_masks"], "where": where}
        )
    if stats.conversations and not examples and not problems:
        problems.append(
            Problem(
                source,
                None,
                "split",
                f'all {stats.conversations} conversations of the "{split}" split are longer than '
                f"max_seq_length {max_length:,}: nothing is left to {'train' if split == 'train' else 'evaluate'} on",
            )
        )
    return examples, stats, problems


def build_training_dataset(
    tokenizer,
    conversations: Iterable[Sequence[dict]],
    max_length: int | None,
    policy: str = "drop",
    *,
    split: str = "train",
) -> TrainingData:
    """The pre-tokenized `datasets.Dataset` (`input_ids`, `assistant_masks`) TRL's SFTTrainer trains on.

    TRL 1.15 builds `labels` from the `assistant_masks` column of a pre-tokenized dataset (-100
    where the mask is 0) whatever `assistant_only_loss` says; leave `assistant_only_loss` False with
    this dataset (True makes TRL demand a `messages` column). Raises `DataValidationError` listing
    every over-long (policy "fail") or loss-less conversation.
    """
    from datasets import Dataset

    examples, stats, problems = tokenize_split(tokenizer, conversations, max_length, policy, split=split)
    if problems:
        raise DataValidationError(problems)
    dataset = Dataset.from_dict(
        {
            "input_ids": [example["input_ids"] for example in examples],
            "assistant_masks": [example["assistant_masks"] for example in examples],
        }
    )
    return TrainingData(dataset, stats, examples)


# ---------------------------------------------------------------------------------------------
# Showing what is trained

ANSI_TRAINED = "\x1b[1;32m"
ANSI_RESET = "\x1b[0m"


def render_masked_sample(tokenizer, example: dict, style: str = "plain") -> str:
    """The example's text with the trained tokens marked: `[[...]]` ("plain", for logs) or green ("ansi")."""
    if style not in ("plain", "ansi"):
        raise ValueError(f"unknown style {style!r}; use plain or ansi")
    opening, closing = ("[[", "]]") if style == "plain" else (ANSI_TRAINED, ANSI_RESET)
    pieces = []
    run: list[int] = []
    run_mask = None
    for token_id, mask in zip(example["input_ids"], example["assistant_masks"], strict=True):
        if mask != run_mask and run:
            pieces.append(_decode_run(tokenizer, run, run_mask, opening, closing))
            run = []
        run.append(token_id)
        run_mask = mask
    if run:
        pieces.append(_decode_run(tokenizer, run, run_mask, opening, closing))
    return "".join(pieces)


def _decode_run(tokenizer, ids, mask, opening, closing) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return f"{opening}{text}{closing}" if mask else text


__all__ = [
    "FAMILIES",
    "LLAMA3_CHAT_TEMPLATE",
    "LLAMA31_CHAT_TEMPLATE",
    "POLICIES",
    "BuildStats",
    "TemplateError",
    "TemplateInfo",
    "TrainingData",
    "build_training_dataset",
    "detect_family",
    "prepare_tokenizer",
    "render_masked_sample",
    "tokenize_conversation",
    "tokenize_split",
]
