"""The tiny Llama 3-style base model: tokenizer conventions, chat template, save and reload."""

import time

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from trainjob.tiny import (  # noqa: E402
    BEGIN_OF_TEXT,
    EOT,
    LLAMA3_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_llama3_style_tokenizer,
    build_tiny_llama,
    write_tiny_base_model,
)

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "  Paris.\n"},
]
# What Meta's template renders for TWO_TURNS (content is trimmed, BOS once, <|eot_id|> per turn).
TWO_TURNS_RENDERED = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_llama3_style_tokenizer()


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("tiny-base")
    started = time.monotonic()
    write_tiny_base_model(out)
    return out, time.monotonic() - started


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "  leading spaces, tabs\tand\nnew lines\n\n",
        "Unicode: héllo wörld, 日本語, emoji 🦙🔥, math ∑ x² ≤ 3",
        "code: def f(x): return {'a': [1, 2, 3]}  # comment",
    ],
)
def test_any_text_round_trips_without_unknown_tokens(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id is None
    assert tokenizer.decode(ids) == text


def test_plain_encoding_starts_with_begin_of_text_like_llama3(tokenizer):
    ids = tokenizer("Hello").input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids(BEGIN_OF_TEXT)
    assert ids.count(ids[0]) == 1


def test_special_tokens_are_single_ids_in_llama3_order(tokenizer):
    first = tokenizer.convert_tokens_to_ids(BEGIN_OF_TEXT)
    for offset, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.encode(token, add_special_tokens=False) == [first + offset], token
    # Same distances as Llama 3's 128000 / 128006 / 128007 / 128009.
    assert tokenizer.convert_tokens_to_ids("<|start_header_id|>") == first + 6
    assert tokenizer.convert_tokens_to_ids("<|end_header_id|>") == first + 7
    assert tokenizer.convert_tokens_to_ids(EOT) == first + 9
    assert first + len(SPECIAL_TOKENS) == len(tokenizer)


def test_special_token_roles(tokenizer):
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token.startswith("<|reserved_special_token_")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id != tokenizer.convert_tokens_to_ids("<|end_of_text|>")


def test_chat_template_renders_exact_llama3_format(tokenizer):
    assert tokenizer.chat_template == LLAMA3_CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(TWO_TURNS, tokenize=False) == TWO_TURNS_RENDERED
    prompt = tokenizer.apply_chat_template(TWO_TURNS[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_template_tokens_have_one_bos_and_eot_per_turn(tokenizer):
    ids = tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(tokenizer.eos_token_id) == 2
    assert ids[-1] == tokenizer.eos_token_id


def test_tokenizer_learns_from_given_texts():
    tokenizer = build_llama3_style_tokenizer(["the llama grazes; llama llama llama"] * 50, vocab_size=300)
    assert len(tokenizer.tokenize(" llama")) == 1
    assert tokenizer.decode(tokenizer.encode("zebra 42", add_special_tokens=False)) == "zebra 42"


def test_builds_are_deterministic(tokenizer):
    again = build_llama3_style_tokenizer()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    first, second = build_tiny_llama(tokenizer, seed=3), build_tiny_llama(again, seed=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = build_tiny_llama(tokenizer, seed=4)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_model_config_carries_llama3_token_ids(tokenizer):
    model = build_tiny_llama(tokenizer)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == eot
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert eot in model.generation_config.eos_token_id
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_saved_model_reloads_and_generates(saved_dir):
    out, seconds = saved_dir
    assert seconds < 5, f"writing the tiny base model took {seconds:.1f}s"
    assert (out / "model.safetensors").is_file()

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama"
    assert tokenizer.apply_chat_template(TWO_TURNS, tokenize=False) == TWO_TURNS_RENDERED
    assert tokenizer.pad_token_id != tokenizer.eos_token_id

    inputs = tokenizer.apply_chat_template(
        TWO_TURNS[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert output.shape[1] > prompt_len
    assert torch.equal(output[0, :prompt_len], inputs["input_ids"][0])


def test_trl_recognises_the_template_as_stock_llama3(tokenizer):
    # TRL swaps in its assistant-mask training template only for the exact stock string.
    chat_template_utils = pytest.importorskip("trl.chat_template_utils")
    assert tokenizer.chat_template == chat_template_utils.llama3_chat_template
