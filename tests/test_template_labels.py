"""Chat template, stop/pad tokens and the assistant-only loss mask, on a Llama 3-style tokenizer and
on the real 128k Llama 3 tokenizer."""

from __future__ import annotations

import pytest

from tests.llama3_vocab import llama3_tokenizer_or_skip
from trainjob import tiny
from trainjob.data import Conversation, DataValidationError, load_chats
from trainjob.template import (
    LLAMA3_CHAT_TEMPLATE,
    LLAMA31_CHAT_TEMPLATE,
    TemplateError,
    build_training_dataset,
    detect_family,
    prepare_tokenizer,
    render_masked_sample,
    tokenize_conversation,
    tokenize_split,
)

EOT = "<|eot_id|>"
BOS = "<|begin_of_text|>"

CONVERSATION = [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "  Rome is the capital of Italy.\n"},
]

LLAMA3_RENDERED = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer in one sentence.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nThe capital of France is Paris.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nRome is the capital of Italy.<|eot_id|>"
)
LLAMA31_SYSTEM_BLOCK = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)


@pytest.fixture
def tokenizer():
    """The Llama 3-style test tokenizer, with no chat template yet (as a GGUF-derived one comes)."""
    built = tiny.build_llama3_style_tokenizer()
    built.chat_template = None
    return built


@pytest.fixture(scope="module")
def real_tokenizer():
    built = llama3_tokenizer_or_skip()
    prepare_tokenizer(built)
    return built


def trained_runs(tokenizer, tokens) -> list[str]:
    """The decoded text of each run of consecutive loss tokens."""
    runs, current = [], []
    for token_id, mask in zip(tokens["input_ids"], tokens["assistant_masks"], strict=True):
        if mask:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def assert_loss_is_exactly_the_assistant_replies(tokenizer, messages, tokens):
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    replies = [m["content"].strip() + EOT for m in messages if m["role"] == "assistant"]
    assert trained_runs(tokenizer, tokens) == replies
    ids, masks = tokens["input_ids"], tokens["assistant_masks"]
    # Exactly one bos, first, outside the loss.
    assert ids.count(bos_id) == 1 and ids[0] == bos_id and masks[0] == 0
    # Every turn ends with <|eot_id|>; only the assistant turns' ones are trained.
    eot_masks = [mask for token, mask in zip(ids, masks, strict=True) if token == eot_id]
    assert len(eot_masks) == len(messages)
    assert sum(eot_masks) == len(replies)
    # Headers are never trained.
    header_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|start_header_id|>", "<|end_header_id|>")}
    assert not any(mask for token, mask in zip(ids, masks, strict=True) if token in header_ids)


# --- the templates ----------------------------------------------------------------------------


def test_official_llama3_template_is_the_one_the_test_tokenizer_ships():
    assert LLAMA3_CHAT_TEMPLATE == tiny.LLAMA3_CHAT_TEMPLATE


def test_llama3_template_renders_the_official_format(tokenizer):
    prepare_tokenizer(tokenizer)

    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == LLAMA3_RENDERED
    assert tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True
    ).endswith("What is the capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama31_template_renders_the_official_format(tokenizer):
    prepare_tokenizer(tokenizer, family="llama-3.1")

    with_system = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    without_system = tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False)

    turns = (
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe capital of France is Paris.<|eot_id|>"
    )
    assert with_system == LLAMA31_SYSTEM_BLOCK + "You answer in one sentence.<|eot_id|>" + turns
    # 3.1 always opens with a system block, even when the conversation has none.
    assert without_system == LLAMA31_SYSTEM_BLOCK + "<|eot_id|>" + turns


def meta_template(name: str) -> str:
    """Meta's own Llama 3.x chat template, as TRL ships it (a reference to compare against)."""
    from importlib.resources import files

    path = files("trl") / "chat_templates" / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(f"trl no longer ships {name}.jinja")
    return path.read_text()


@pytest.mark.parametrize("conversation", [CONVERSATION, CONVERSATION[1:]], ids=["system", "no-system"])
def test_our_templates_render_like_metas(tokenizer, conversation):
    for ours, theirs in ((LLAMA3_CHAT_TEMPLATE, "llama3"), (LLAMA31_CHAT_TEMPLATE, "llama3_1")):
        for prompt in (False, True):
            messages = conversation[:-1] if prompt else conversation
            assert tokenizer.apply_chat_template(
                messages, chat_template=ours, tokenize=False, add_generation_prompt=prompt
            ) == tokenizer.apply_chat_template(
                messages, chat_template=meta_template(theirs), tokenize=False, add_generation_prompt=prompt
            )


@pytest.mark.parametrize("name", ["llama3_1", "llama3_2"])
def test_metas_own_31_and_32_templates_mask_correctly(tokenizer, name):
    # A 3.1/3.2 checkpoint brings Meta's full template (tools, dates); "auto" keeps it.
    tokenizer.chat_template = meta_template(name)

    info = prepare_tokenizer(tokenizer)
    tokens = tokenize_conversation(tokenizer, CONVERSATION)

    assert (info.family, info.template_source) == ("llama-3.1", "tokenizer")
    assert_loss_is_exactly_the_assistant_replies(tokenizer, CONVERSATION, tokens)


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("unsloth/llama-3-8b-Instruct-bnb-4bit", "llama-3"),
        ("meta-llama/Meta-Llama-3-8B-Instruct", "llama-3"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1"),
        ("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", "llama-3.1"),
        ("meta-llama/Llama-3.2-1B-Instruct", "llama-3.1"),
        ("ollama/llama3.1", "llama-3.1"),
        ("mistralai/Mistral-7B-Instruct-v0.3", "unknown"),
    ],
)
def test_family_from_model_name(name, family):
    assert detect_family(name) == family


def test_family_from_tokenizer(tokenizer):
    assert detect_family(tokenizer) == "llama-3"  # Llama 3 tokens, no template
    tokenizer.chat_template = LLAMA31_CHAT_TEMPLATE
    assert detect_family(tokenizer) == "llama-3.1"
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    assert detect_family(tokenizer) == "llama-3"


def test_family_from_tokens_added_in_31(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|finetune_right_pad_id|>"]})

    assert detect_family(tokenizer) == "llama-3.1"


def test_a_non_llama_tokenizer_is_refused_clearly():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")

    assert detect_family(other) == "unknown"
    with pytest.raises(TemplateError, match=r"has no <\|begin_of_text\|>, .*not a Llama 3 tokenizer"):
        prepare_tokenizer(other)


# --- eos and pad ------------------------------------------------------------------------------


def test_prepare_sets_official_template_eot_eos_and_a_reserved_pad(tokenizer):
    tokenizer.eos_token = "<|end_of_text|>"  # a base model's eos: would never stop a chat turn
    tokenizer.pad_token = EOT  # a common mistake: the stop token masked away as padding

    info = prepare_tokenizer(tokenizer)

    assert (info.family, info.template_source) == ("llama-3", "official")
    assert tokenizer.chat_template == LLAMA3_CHAT_TEMPLATE
    assert tokenizer.eos_token == EOT and info.eos_id == info.eot_id == tokenizer.convert_tokens_to_ids(EOT)
    assert tokenizer.pad_token == info.pad_token == "<|reserved_special_token_0|>"
    assert info.pad_id != info.eos_id
    assert info.bos_id == tokenizer.convert_tokens_to_ids(BOS)


def test_prepare_keeps_the_models_own_template_on_auto(tokenizer):
    own = LLAMA3_CHAT_TEMPLATE.replace("{{ content }}", "{{- content }}")
    tokenizer.chat_template = own

    info = prepare_tokenizer(tokenizer)

    assert (info.family, info.template_source, tokenizer.chat_template) == ("llama-3", "tokenizer", own)


def test_forced_family_replaces_the_models_template(tokenizer):
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE

    info = prepare_tokenizer(tokenizer, family="llama-3.1")

    assert (info.family, info.template_source) == ("llama-3.1", "official")
    assert tokenizer.chat_template == LLAMA31_CHAT_TEMPLATE


def test_llama31_pads_with_finetune_right_pad_id(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|finetune_right_pad_id|>"]})

    info = prepare_tokenizer(tokenizer)

    assert info.family == "llama-3.1"
    assert info.pad_token == "<|finetune_right_pad_id|>"
    assert info.pad_id == tokenizer.convert_tokens_to_ids("<|finetune_right_pad_id|>") != info.eos_id


def test_no_pad_candidate_fails_clearly():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["a", BOS, "<|start_header_id|>", "<|end_header_id|>", EOT])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    backend.add_special_tokens(list(vocab)[1:])
    bare = PreTrainedTokenizerFast(tokenizer_object=backend)

    with pytest.raises(TemplateError, match=r"neither <\|finetune_right_pad_id\|> nor any"):
        prepare_tokenizer(bare)


def test_unknown_family_name_is_refused(tokenizer):
    with pytest.raises(TemplateError, match="unknown chat_template 'chatml'"):
        prepare_tokenizer(tokenizer, family="chatml")


# --- the loss mask ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama-3", "llama-3.1"])
def test_loss_covers_exactly_the_assistant_replies_and_their_eot(tokenizer, family):
    prepare_tokenizer(tokenizer, family=family)

    tokens = tokenize_conversation(tokenizer, CONVERSATION)

    assert_loss_is_exactly_the_assistant_replies(tokenizer, CONVERSATION, tokens)
    assert tokens["num_tokens"] == len(tokens["input_ids"])


def test_the_rendered_ids_are_the_rendered_text_without_a_second_bos(tokenizer):
    prepare_tokenizer(tokenizer)

    tokens = tokenize_conversation(tokenizer, CONVERSATION)

    # The tokenizer's own post-processor adds a bos too; the template's is the only one kept.
    assert tokenizer("x")["input_ids"][0] == tokenizer.convert_tokens_to_ids(BOS)
    assert tokenizer.decode(tokens["input_ids"], skip_special_tokens=False) == LLAMA3_RENDERED


def test_every_example_of_the_example_set_trains_only_on_replies(tokenizer):
    prepare_tokenizer(tokenizer)
    conversations = load_chats("tests/data/chats")["train"]

    for conversation in conversations:
        tokens = tokenize_conversation(tokenizer, conversation)
        assert_loss_is_exactly_the_assistant_replies(tokenizer, conversation, tokens)


def test_truncation_keeps_the_mask_aligned(tokenizer):
    prepare_tokenizer(tokenizer)
    full = tokenize_conversation(tokenizer, CONVERSATION)

    cut = tokenize_conversation(tokenizer, CONVERSATION, max_length=40)

    assert cut["input_ids"] == full["input_ids"][:40]
    assert cut["assistant_masks"] == full["assistant_masks"][:40]
    assert cut["num_tokens"] == full["num_tokens"] > 40


def test_a_conversation_whose_reply_is_cut_away_is_caught_not_trained(tokenizer):
    prepare_tokenizer(tokenizer)
    first_reply = tokenize_conversation(tokenizer, CONVERSATION)["assistant_masks"].index(1)
    conversation = Conversation(CONVERSATION, "data/train.jsonl", 7)

    with pytest.raises(DataValidationError) as caught:
        build_training_dataset(tokenizer, [conversation], max_length=first_reply, policy="truncate")

    full = tokenize_conversation(tokenizer, CONVERSATION)["num_tokens"]
    assert str(caught.value) == (
        f"data/train.jsonl:7: chats: no assistant tokens left in the loss after cutting to max_seq_length "
        f"{first_reply} tokens (of {full}); it would train on nothing"
    )


def test_truncate_policy_keeps_partly_cut_conversations(tokenizer):
    prepare_tokenizer(tokenizer)
    first_reply = tokenize_conversation(tokenizer, CONVERSATION)["assistant_masks"].index(1)
    conversation = Conversation(CONVERSATION, "data/train.jsonl", 3)

    data = build_training_dataset(tokenizer, [conversation], max_length=first_reply + 5, policy="truncate")

    assert data.dataset.num_rows == 1
    assert data.stats.truncated == ["data/train.jsonl:3"]
    assert data.stats.loss_tokens == 5


def test_drop_policy_leaves_long_conversations_out_and_counts_them(tokenizer):
    prepare_tokenizer(tokenizer)
    conversations = load_chats("tests/data/chats")["train"]
    lengths = [tokenize_conversation(tokenizer, c)["num_tokens"] for c in conversations]
    limit = sorted(lengths)[-5]  # the four longest are over it
    longest = [c.where for c, n in zip(conversations, lengths, strict=True) if n > limit]

    data = build_training_dataset(tokenizer, conversations, max_length=limit, policy="drop")

    assert data.dataset.num_rows == 40 - len(longest)
    assert data.stats.dropped == longest
    assert data.stats.over_length == len(longest)
    assert data.stats.max_tokens == max(lengths)
    assert max(len(ids) for ids in data.dataset["input_ids"]) <= limit
    assert data.stats.loss_tokens == sum(sum(m) for m in data.dataset["assistant_masks"])


def test_fail_policy_lists_every_long_conversation(tokenizer):
    prepare_tokenizer(tokenizer)
    conversations = load_chats("tests/data/chats")["train"]
    lengths = [tokenize_conversation(tokenizer, c)["num_tokens"] for c in conversations]
    limit = sorted(lengths)[-3]

    with pytest.raises(DataValidationError) as caught:
        build_training_dataset(tokenizer, conversations, max_length=limit, policy="fail")

    expected = [
        f'{c.where}: chats: {n} tokens, over max_seq_length {limit} (long_conversations is "fail"; '
        'use "drop" to leave such conversations out, or raise max_seq_length)'
        for c, n in zip(conversations, lengths, strict=True)
        if n > limit
    ]
    assert [str(p) for p in caught.value.problems] == expected
    assert len(expected) == 2


def test_a_split_dropped_to_nothing_is_an_error(tokenizer):
    prepare_tokenizer(tokenizer)
    conversations = load_chats("tests/data/chats")["validation"]

    _, stats, problems = tokenize_split(tokenizer, conversations, 8, "drop", split="validation")

    assert stats.kept == 0 and len(stats.dropped) == 8
    assert [p.field for p in problems] == ["split"]
    assert problems[0].message == (
        'all 8 conversations of the "validation" split are longer than max_seq_length 8: nothing is left '
        "to evaluate on"
    )


def test_a_template_that_loses_the_stop_token_is_refused(tokenizer):
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE.replace("'<|eot_id|>'", "'<|end_of_text|>'")

    with pytest.raises(TemplateError, match=r"does not end assistant turns with <\|eot_id\|>"):
        prepare_tokenizer(tokenizer)


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # Earlier turns change as the conversation grows: the replies can't be located by rendering.
    tokenizer.chat_template = "{{ bos_token }}{{ messages | length }}" + LLAMA3_CHAT_TEMPLATE.replace(
        "bos_token + content", "content"
    )

    with pytest.raises(TemplateError, match="renders earlier turns differently"):
        prepare_tokenizer(tokenizer)


def test_a_template_that_adds_a_second_bos_is_refused(tokenizer):
    tokenizer.chat_template = "{{ bos_token }}" + LLAMA3_CHAT_TEMPLATE

    with pytest.raises(TemplateError, match=r"has 2 <\|begin_of_text\|> tokens; it needs exactly one"):
        prepare_tokenizer(tokenizer)


# --- what TRL does with the dataset -----------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True])
def test_trl_trains_on_exactly_the_masked_tokens(tokenizer, tmp_path, packing):
    from trl import SFTConfig, SFTTrainer

    prepare_tokenizer(tokenizer)
    conversations = load_chats("tests/data/chats")["train"][28:36]
    data = build_training_dataset(tokenizer, conversations, max_length=128)
    model = tiny.build_tiny_llama(tokenizer)

    # Pre-tokenized data: TRL builds labels from the assistant_masks column by itself;
    # assistant_only_loss=True would ask for a `messages` column instead.
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_length=128,
            packing=packing,
            bf16=False,
            use_cpu=True,
            report_to="none",
            assistant_only_loss=False,
        ),
        train_dataset=data.dataset,
        processing_class=tokenizer,
    )

    prepared = trainer.train_dataset
    trained = sum(label != -100 for labels in prepared["labels"] for label in labels)
    assert trained == data.stats.loss_tokens
    if not packing:
        for example, row in zip(data.examples, prepared, strict=True):
            assert row["labels"] == [
                token if mask else -100
                for token, mask in zip(example["input_ids"], example["assistant_masks"], strict=True)
            ]


# --- showing the trained span -----------------------------------------------------------------


def test_render_masked_sample_marks_the_trained_span(tokenizer):
    prepare_tokenizer(tokenizer)
    tokens = tokenize_conversation(tokenizer, CONVERSATION[1:3])

    plain = render_masked_sample(tokenizer, tokens)
    ansi = render_masked_sample(tokenizer, tokens, style="ansi")

    assert plain == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n[[The capital of France is Paris.<|eot_id|>]]"
    )
    assert ansi.endswith("\x1b[1;32mThe capital of France is Paris.<|eot_id|>\x1b[0m")


# --- the real Llama 3 tokenizer ---------------------------------------------------------------


def test_real_tokenizer_gets_llama3_ids_for_the_official_format(real_tokenizer):
    tokens = tokenize_conversation(real_tokenizer, CONVERSATION[1:3])

    # Meta's ids: bos, header(user), "\n\n" = 271, ..., header(assistant) = 78191, eot = 128009.
    assert tokens["input_ids"][:5] == [128000, 128006, 882, 128007, 271]
    assert tokens["input_ids"][-1] == 128009
    assistant_header = tokens["input_ids"].index(78191)
    assert tokens["input_ids"][assistant_header - 1 : assistant_header + 3] == [128006, 78191, 128007, 271]
    assert real_tokenizer.decode(tokens["input_ids"], skip_special_tokens=False) == (
        real_tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    )


def test_real_tokenizer_stop_and_pad_tokens(real_tokenizer):
    assert real_tokenizer.eos_token_id == 128009
    assert real_tokenizer.pad_token == "<|reserved_special_token_0|>"
    assert real_tokenizer.pad_token_id == 128002
    assert len(real_tokenizer) == 128256


def test_real_tokenizer_loss_mask(real_tokenizer):
    tokens = tokenize_conversation(real_tokenizer, CONVERSATION)

    assert_loss_is_exactly_the_assistant_replies(real_tokenizer, CONVERSATION, tokens)


def test_real_tokenizer_with_the_31_template(real_tokenizer):
    template = real_tokenizer.chat_template
    try:
        prepare_tokenizer(real_tokenizer, family="llama-3.1")
        tokens = tokenize_conversation(real_tokenizer, CONVERSATION)
        assert_loss_is_exactly_the_assistant_replies(real_tokenizer, CONVERSATION, tokens)
        rendered = real_tokenizer.decode(tokens["input_ids"], skip_special_tokens=False)
        assert rendered == real_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
        assert rendered.startswith(LLAMA31_SYSTEM_BLOCK + "You answer in one sentence.<|eot_id|>")
    finally:
        real_tokenizer.chat_template = template
