"""GGUF export: the files a real llama.cpp (llama-cpp-python) loads, tokenizes, scores and chats with
exactly like the Hugging Face model they came from.

Tests that run llama.cpp skip only when llama_cpp cannot be imported: `scripts/ensure-llama-cpp`
builds and installs it (CI runs it first).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainjob.export import FORMATS, UnsupportedModelError, export_model
from trainjob.tiny import (
    EOT,
    LLAMA3_CHAT_TEMPLATE,
    build_llama3_style_tokenizer,
    build_tiny_llama,
    write_tiny_base_model,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris. 12 times 12 is 144."},
    {"role": "user", "content": "And  of Spain?\n\nDon't guess; say 'I'LL check'. ¿Qué? 東京 🤖"},
]
# What the crafted model says to CHAT, token by token, before it ends its turn.
REPLY = "The capital of France is Paris."


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed: run scripts/ensure-llama-cpp"
    )


@contextlib.contextmanager
def loaded(llama_cpp, path, **kw):
    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, verbose=False, **kw)
    try:
        yield llm
    finally:
        llm.close()


def save(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer():
    return build_llama3_style_tokenizer()


@pytest.fixture(scope="module")
def sharp_model(tokenizer):
    """The tiny Llama with weights ~5x the usual init: with near-uniform attention a wrong q/k row
    order would barely move the logits, with sharp attention it changes them by whole units."""
    model = build_tiny_llama(tokenizer, seed=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sharp_model, tokenizer):
    merged = save(sharp_model, tokenizer, tmp_path_factory.mktemp("merged"))
    out = tmp_path_factory.mktemp("gguf")
    paths = export_model(merged, out, ["gguf-f16", "gguf-q8_0"], model_name="tiny-chat")
    return {p.name: p for p in paths}


def read_gguf(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


# --- the files -------------------------------------------------------------------------------


def test_export_writes_one_gguf_per_format_and_modelfiles(exported):
    assert sorted(exported) == ["Modelfile", "Modelfile.q8_0", "tiny-chat-f16.gguf", "tiny-chat-q8_0.gguf"]
    assert not list(exported["Modelfile"].parent.glob("*.partial"))


def test_gguf_metadata_describes_a_llama3_chat_model(exported, sharp_model, tokenizer):
    fields, tensors = read_gguf(exported["tiny-chat-f16.gguf"])
    config = sharp_model.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.embedding_length"] == config.hidden_size
    assert fields["llama.attention.head_count"] == config.num_attention_heads
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert fields["llama.rope.freq_base"] == pytest.approx(500000.0)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert len(fields["tokenizer.ggml.tokens"]) == config.vocab_size
    eot = tokenizer.convert_tokens_to_ids(EOT)
    # A chat turn ends with <|eot_id|>: it is the EOS every runtime stops on.
    assert fields["tokenizer.ggml.eos_token_id"] == eot
    assert fields["tokenizer.ggml.eot_token_id"] == eot
    assert fields["tokenizer.ggml.eom_token_id"] == tokenizer.convert_tokens_to_ids("<|eom_id|>")
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id != eot
    assert fields["tokenizer.chat_template"] == LLAMA3_CHAT_TEMPLATE
    special = fields["tokenizer.ggml.token_type"][tokenizer.convert_tokens_to_ids("<|start_header_id|>")]
    assert special == 3  # control: never produced from plain text
    assert fields["tokenizer.ggml.token_type"][0] == 1  # normal
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert "output.weight" in tensors and "token_embd.weight" in tensors


def test_q8_0_file_holds_the_same_weights_quantized(exported):
    from gguf.quants import dequantize

    _, f16 = read_gguf(exported["tiny-chat-f16.gguf"])
    fields, q8 = read_gguf(exported["tiny-chat-q8_0.gguf"])
    assert fields["general.file_type"] == 7  # MOSTLY_Q8_0
    for name in ("token_embd.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight", "output.weight"):
        assert q8[name].tensor_type.name == "Q8_0"
        restored = dequantize(q8[name].data, q8[name].tensor_type)
        reference = np.asarray(f16[name].data, dtype=np.float32)
        assert restored.shape == reference.shape
        assert np.abs(restored - reference).max() < 0.01 * np.abs(reference).max()


def test_unknown_format_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="gguf-q4_k_m"):
        export_model(tmp_path / "missing", tmp_path / "out", ["gguf-q4_k_m"])
    assert "gguf-q8_0" in FORMATS and "gguf-f16" in FORMATS


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _gpt2_split(tokenizer_json):
    tokenizer_json["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }


def _no_header_tokens(tokenizer_json):
    for token in tokenizer_json["added_tokens"]:
        if token["content"] == "<|start_header_id|>":
            token["content"] = "<|im_start|>"


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        (
            "config.json",
            lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral"),
            "MistralForCausalLM",
        ),
        (
            "config.json",
            lambda c: c.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
            "Qwen2ForCausalLM",
        ),
        ("config.json", lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        ("tokenizer.json", _gpt2_split, "does not pre-tokenize like Llama 3"),
        ("tokenizer.json", _no_header_tokens, "<|start_header_id|>"),
    ],
    ids=["mistral", "qwen2", "yarn-rope", "gpt2-split", "no-llama3-specials"],
)
def test_unsupported_models_fail_clearly_and_write_nothing(tmp_path, file, edit, message):
    base = write_tiny_base_model(tmp_path / "model")
    _edit_json(base / file, edit)
    out = tmp_path / "out"
    with pytest.raises(UnsupportedModelError, match=message.replace("|", r"\|")):
        export_model(base, out, ["gguf-f16"])
    assert not out.exists() or not any(out.iterdir())


def test_adapter_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    base = write_tiny_base_model(tmp_path / "model")
    weights = load_file(base / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)
    save_file(weights, base / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="merged model"):
        export_model(base, tmp_path / "out", ["gguf-f16"])


def test_cli_prints_files_and_ollama_commands(tmp_path):
    base = write_tiny_base_model(tmp_path / "model")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "trainjob.export", "--model", str(base), "--out", str(out)]
    done = subprocess.run(
        [*command, "--formats", "gguf-q8_0", "--name", "My Tiny"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [str(out / "my-tiny-q8_0.gguf"), str(out / "Modelfile")]
    assert f"  ollama create my-tiny -f {out}/Modelfile" in lines
    assert "  ollama run my-tiny" in lines

    _edit_json(base / "config.json", lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    failed = subprocess.run(
        [*command, "--formats", "gguf-f16"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert failed.returncode == 2
    assert "GPT2LMHeadModel" in failed.stderr and "not supported" in failed.stderr


# --- llama.cpp reads them as the Hugging Face model computes ------------------------------------


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama_cpp_tokenizes_a_chat_like_the_hf_tokenizer(llama_cpp, exported, tokenizer, quant):
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    with loaded(llama_cpp, exported[f"tiny-chat-{quant}.gguf"], vocab_only=True) as llm:
        for text in [prompt, "  spaces,\ttabs\n\n\nnewlines 1234567 don't", "Ünïcödé façade — naïve"]:
            assert (
                llm.tokenize(text.encode(), add_bos=False, special=True)
                == tokenizer(text, add_special_tokens=False).input_ids
            ), text
        # llama.cpp adds <|begin_of_text|> by itself, as the HF tokenizer does.
        assert llm.tokenize(b"Hello", add_bos=True, special=True) == tokenizer("Hello").input_ids


@pytest.mark.parametrize(("quant", "tolerance"), [("f16", 0.03), ("q8_0", 0.3)])
def test_llama_cpp_logits_match_the_hf_model(llama_cpp, exported, sharp_model, tokenizer, quant, tolerance):
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        expected = sharp_model(torch.tensor([ids])).logits[0].numpy()
    with loaded(llama_cpp, exported[f"tiny-chat-{quant}.gguf"], logits_all=True) as llm:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    # Logits span several units here; a wrong rotary layout is off by whole units.
    assert np.abs(expected).max() > 2
    assert np.abs(got - expected).max() < tolerance
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_llama31_rope_scaling_matches_the_hf_model(llama_cpp, tmp_path, sharp_model, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = sharp_model.config.to_dict()
    # Llama 3.1's long-context RoPE with a short "original" context, so that it changes the
    # frequencies that matter within a 60-token prompt.
    config["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = LlamaForCausalLM(LlamaConfig.from_dict(config)).eval()
    model.load_state_dict(sharp_model.state_dict())
    [gguf_path, *_] = export_model(save(model, tokenizer, tmp_path / "m31"), tmp_path / "out", ["gguf-f16"])

    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
        unscaled = sharp_model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(expected - unscaled).max() > 0.5  # the scaling matters for this prompt
    with loaded(llama_cpp, gguf_path, logits_all=True) as llm:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - expected).max() < 0.03


def test_tied_embeddings_llama32_style_match_the_hf_model(llama_cpp, tmp_path, sharp_model, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = sharp_model.config.to_dict()
    config["tie_word_embeddings"] = True  # as Llama 3.2 1B / 3B: no lm_head tensor is saved
    model = LlamaForCausalLM(LlamaConfig.from_dict(config)).eval()
    model.load_state_dict(sharp_model.state_dict(), strict=False)
    [gguf_path, *_] = export_model(save(model, tokenizer, tmp_path / "tied"), tmp_path / "out", ["gguf-f16"])
    assert "output.weight" not in read_gguf(gguf_path)[1]

    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    with loaded(llama_cpp, gguf_path, logits_all=True) as llm:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - expected).max() < 0.03


def test_untied_model_without_output_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    base = write_tiny_base_model(tmp_path / "model")
    weights = load_file(base / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, base / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match=r"lacks output\.weight"):
        export_model(base, tmp_path / "out", ["gguf-f16"])


def make_model_say(tokenizer, prompt_ids: list[int], reply_ids: list[int]):
    """A tiny Llama whose greedy reply to `prompt_ids` is `reply_ids` then <|eot_id|>.

    With the attention and MLP outputs zeroed, each position's hidden state is its token's
    embedding, so the model is a bigram table: lm_head row b points along the (normed) embedding
    of the token a that b follows.
    """
    model = build_tiny_llama(tokenizer, seed=2)
    chain = [prompt_ids[-1], *reply_ids, tokenizer.convert_tokens_to_ids(EOT)]
    assert len(set(chain)) == len(chain), "each token of the chain must be followed by one token only"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embeddings = model.model.embed_tokens.weight
        head = torch.zeros_like(model.lm_head.weight)
        for current, following in itertools.pairwise(chain):
            head[following] += 10 * embeddings[current] / embeddings[current].norm()
        model.lm_head.weight.copy_(head)
    return model.eval()


@pytest.fixture(scope="module")
def talking_model(tmp_path_factory, tokenizer):
    prompt_ids = tokenizer.apply_chat_template(
        CHAT, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    reply_ids = tokenizer(REPLY, add_special_tokens=False).input_ids
    model = make_model_say(tokenizer, prompt_ids, reply_ids)
    merged = save(model, tokenizer, tmp_path_factory.mktemp("talking"))
    out = tmp_path_factory.mktemp("talking-gguf")
    paths = export_model(merged, out, ["gguf-f16", "gguf-q8_0"], model_name="talker")
    return model, prompt_ids, reply_ids, {p.name: p for p in paths}


def test_the_hf_model_replies_and_ends_its_turn(talking_model, tokenizer):
    model, prompt_ids, reply_ids, _ = talking_model
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=20, do_sample=False)
    assert out[0, len(prompt_ids) :].tolist() == [*reply_ids, tokenizer.convert_tokens_to_ids(EOT)]


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_chat_completion_through_the_embedded_template_stops_at_eot(
    llama_cpp, talking_model, tokenizer, quant
):
    _, prompt_ids, reply_ids, files = talking_model
    with loaded(llama_cpp, files[f"talker-{quant}.gguf"]) as llm:
        assert llm.token_eos() == tokenizer.convert_tokens_to_ids(EOT)
        # The chat handler renders the GGUF's own template; it must give the HF prompt.
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(
            template=llm.metadata["tokenizer.chat_template"], eos_token=EOT, bos_token="<|begin_of_text|>"
        )
        assert formatter(messages=CHAT).prompt == tokenizer.decode(prompt_ids)
        result = llm.create_chat_completion(messages=CHAT, max_tokens=40, temperature=0.0, seed=0)
    choice = result["choices"][0]
    assert choice["message"]["content"] == REPLY
    # It stopped on its own, at <|eot_id|>, long before max_tokens.
    assert choice["finish_reason"] == "stop"
    assert result["usage"]["prompt_tokens"] == len(prompt_ids)
    assert result["usage"]["completion_tokens"] <= len(reply_ids) + 1


# --- the real Llama 3 vocabulary --------------------------------------------------------------


def test_real_llama3_vocab_exports_exactly_like_llama_cpps_converter(llama_cpp, tmp_path):
    """With Meta's 128k vocabulary, the exported tokenizer equals the one llama.cpp's own converter
    wrote (its vocab-only GGUF in the llama-cpp-python sdist), and tokenizes like the HF tokenizer."""
    from tests.llama3_vocab import llama3_tokenizer_or_skip, llama3_vocab_gguf

    tokenizer = llama3_tokenizer_or_skip()
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    reference = llama3_vocab_gguf()
    model = build_tiny_llama(tokenizer, hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    [gguf_path, *_] = export_model(save(model, tokenizer, tmp_path / "m"), tmp_path / "out", ["gguf-f16"])
    shutil.rmtree(tmp_path / "m")

    ours, _ = read_gguf(gguf_path)
    theirs, _ = read_gguf(reference)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        assert ours[key] == theirs[key], key
    assert ours["tokenizer.ggml.eos_token_id"] == 128009  # <|eot_id|>, not the base model's 128001
    assert ours["tokenizer.ggml.eot_token_id"] == 128009

    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    texts = [prompt, "Hello world", "  x\n\n\ty 3.14159 1234567 can't WON'T", "Ünïcödé — 東京 🤖 naïve"]
    with (
        loaded(llama_cpp, gguf_path, vocab_only=True) as llm,
        loaded(llama_cpp, reference, vocab_only=True) as ref,
    ):
        for text in texts:
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert ids == ref.tokenize(text.encode(), add_bos=False, special=True), text
            assert ids == tokenizer(text, add_special_tokens=False).input_ids, text
        assert llm.tokenize(b"Hello world", add_bos=False, special=False) == [9906, 1917]
