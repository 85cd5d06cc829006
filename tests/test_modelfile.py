"""The Ollama Modelfile: it parses as `ollama create` reads it, and its TEMPLATE builds exactly the
prompt the Hugging Face chat template (the one the model was trained on) builds."""

from __future__ import annotations

import pytest

from trainjob.export import export_model
from trainjob.modelfile import (
    BOS_TEXT,
    LLAMA3_TEMPLATE,
    GoTemplate,
    GoTemplateError,
    ModelfileError,
    modelfile_text,
    ollama_commands,
    ollama_model_name,
    parse_modelfile,
    render_prompt,
)
from trainjob.tiny import build_llama3_style_tokenizer, write_tiny_base_model

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?\nAnswer in one word."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_llama3_style_tokenizer()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = write_tiny_base_model(tmp_path_factory.mktemp("tiny"))
    out = tmp_path_factory.mktemp("export")
    return out, export_model(base, out, ["gguf-q8_0", "gguf-f16"], model_name="Tiny Chat")


def hf_prompt(tokenizer, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


@pytest.mark.parametrize("messages", [[SYSTEM, *TWO_TURNS], TWO_TURNS], ids=["with-system", "no-system"])
def test_template_renders_a_two_turn_chat_like_the_hf_chat_template(tokenizer, messages):
    ollama = render_prompt(messages)
    # Ollama's tokenizer adds <|begin_of_text|> itself; the HF template writes it as text.
    assert BOS_TEXT + ollama == hf_prompt(tokenizer, messages, add_generation_prompt=True)
    ids = tokenizer(BOS_TEXT + ollama, add_special_tokens=False).input_ids
    assert ids == tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )


def test_template_leaves_a_final_assistant_message_open_for_continuation(tokenizer):
    messages = [*TWO_TURNS, {"role": "assistant", "content": "Madrid"}]
    closed = hf_prompt(tokenizer, messages, add_generation_prompt=False)
    assert closed.endswith("Madrid<|eot_id|>")
    assert BOS_TEXT + render_prompt(messages) == closed.removesuffix("<|eot_id|>")


def test_template_matches_ollamas_llama3_reference_prompt():
    # Ollama's own test expectation for Llama 3 Instruct (system, user, assistant, user).
    expected = (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello, how are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nI'm doing great. How can I help you today?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nI'd like to show off how chat templating works!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
        {"role": "user", "content": "I'd like to show off how chat templating works!"},
    ]
    assert render_prompt(messages) == expected


def test_modelfile_system_becomes_the_first_message_like_ollama(tokenizer):
    rendered = render_prompt(TWO_TURNS, system=SYSTEM["content"])
    assert BOS_TEXT + rendered == hf_prompt(tokenizer, [SYSTEM, *TWO_TURNS], add_generation_prompt=True)
    # A chat's own system message wins over the Modelfile's.
    assert render_prompt([SYSTEM, *TWO_TURNS], system="other") == render_prompt([SYSTEM, *TWO_TURNS])


def test_consecutive_messages_of_one_role_are_merged_like_ollama():
    rendered = render_prompt([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert rendered == (
        "<|start_header_id|>user<|end_header_id|>\n\na\n\nb<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_exported_modelfile_parses_and_points_at_the_gguf(exported, tokenizer):
    out, paths = exported
    assert [p.name for p in paths] == [
        "tiny-chat-q8_0.gguf",
        "tiny-chat-f16.gguf",
        "Modelfile",
        "Modelfile.f16",
    ]
    modelfile = parse_modelfile((out / "Modelfile").read_text())
    assert modelfile.from_ == "./tiny-chat-q8_0.gguf"
    assert (out / modelfile.from_).is_file()
    assert parse_modelfile((out / "Modelfile.f16").read_text()).from_ == "./tiny-chat-f16.gguf"
    assert modelfile.template == LLAMA3_TEMPLATE
    # The tiny tokenizer has Llama 3.1's <|eom_id|>, so it is a stop word too.
    assert modelfile.parameter_values("stop") == [
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|eom_id|>",
    ]
    assert modelfile.parameter_values("num_ctx") == ["1024"]  # the tiny model's context
    assert modelfile.parameter_values("temperature") == ["0.6"]
    rendered = render_prompt([SYSTEM, *TWO_TURNS], template=modelfile.template)
    assert BOS_TEXT + rendered == hf_prompt(tokenizer, [SYSTEM, *TWO_TURNS], add_generation_prompt=True)


def test_ollama_commands(exported):
    out, _ = exported
    assert ollama_commands(out, "tiny-chat") == [
        f"ollama create tiny-chat -f {out}/Modelfile",
        "ollama run tiny-chat",
    ]
    assert ollama_commands("/data/my models", "m") == [
        "ollama create m -f '/data/my models/Modelfile'",
        "ollama run m",
    ]
    assert ollama_model_name("Acme/Llama-3 8B Chat!") == "acme-llama-3-8b-chat"


def test_llama3_modelfile_has_no_eom_stop():
    modelfile = parse_modelfile(modelfile_text("./m.gguf", llama31=False, num_ctx=8192))
    assert modelfile.parameter_values("stop") == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def test_modelfile_parser_follows_ollamas_rules():
    text = (
        "# a comment\n"
        "from ./model.gguf\n"
        "\n"
        'SYSTEM """You are "helpful".\n'
        'Keep it short."""\n'
        'PARAMETER stop "<|eot_id|>"\n'
        "parameter num_ctx   4096  \n"
        "MESSAGE user hello there\n"
        'TEMPLATE "{{ .Prompt }}"\n'
    )
    modelfile = parse_modelfile(text)
    assert modelfile.from_ == "./model.gguf"
    assert modelfile.system == 'You are "helpful".\nKeep it short.'
    assert modelfile.parameters == [("stop", "<|eot_id|>"), ("num_ctx", "4096")]
    assert modelfile.other == [("MESSAGE", "user: hello there")]
    assert modelfile.template == "{{ .Prompt }}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM ./m.gguf\nTEMPLTE x\n", "line 2: unknown command 'TEMPLTE'"),
        ('FROM ./m.gguf\nTEMPLATE """never closed\n', "never closed"),
        ("PARAMETER stop x\n", "no FROM line"),
    ],
)
def test_modelfile_parser_rejects_broken_files(text, message):
    with pytest.raises(ModelfileError, match=message):
        parse_modelfile(text)


def test_system_with_triple_quotes_is_refused():
    with pytest.raises(ValueError, match='"""'):
        modelfile_text("./m.gguf", system='say """hi"""')


# The Go template subset: semantics Ollama's engine (Go text/template) has.


GO_TEMPLATE_CASES = [
    ("a  {{- .X -}}  b", {"X": "x"}, "axb"),
    ("a {{ .X }} b", {"X": "x"}, "a x b"),
    ("{{ if .X }}yes{{ else }}no{{ end }}", {"X": ""}, "no"),
    ("{{ if and .X .Y }}both{{ end }}", {"X": "1", "Y": []}, ""),
    ('{{ or .X "default" }}', {"X": ""}, "default"),
    ("{{ and .X .Y }}", {"X": "x", "Y": "y"}, "y"),
    ("{{ not .X }}", {"X": []}, "true"),
    ('{{ eq .X "a" "b" }}', {"X": "b"}, "true"),
    (
        "{{ range $i, $m := .L }}{{ $i }}={{ $m.N }};{{ end }}",
        {"L": [{"N": "p"}, {"N": "q"}]},
        "0=p;1=q;",
    ),
    ("{{ range .L }}x{{ else }}empty{{ end }}", {"L": []}, "empty"),
    ("{{ len (slice .L 1) }}", {"L": [1, 2, 3]}, "2"),
    ("{{ $x := .X }}{{ range .L }}{{ $x }}{{ . }}{{ end }}", {"X": "-", "L": [1, 2]}, "-1-2"),
    ("{{ range .L }}{{ $.X }}{{ end }}", {"X": "r", "L": [1, 2]}, "rr"),
    ('{{ "a\\nb" }}', {}, "a\nb"),
    ("{{/* comment */}}text", {}, "text"),
]


@pytest.mark.parametrize(("source", "data", "expected"), GO_TEMPLATE_CASES)
def test_go_template_subset(source, data, expected):
    assert GoTemplate(source).execute(data) == expected


@pytest.mark.parametrize(
    "source",
    ["{{ with .X }}{{ end }}", "{{ .X | printf }}", "{{ if .X }}unclosed", "{{ end }}", "{{ json .X }}"],
)
def test_go_template_refuses_what_it_does_not_implement(source):
    with pytest.raises(GoTemplateError):
        GoTemplate(source).execute({"X": "x"})


GO_EXECUTOR = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

// Executes each {template, data} case with Go's text/template, as Ollama does.
func main() {
	var cases []struct {
		Template string         `json:"template"`
		Data     map[string]any `json:"data"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	outputs := []string{}
	for _, c := range cases {
		var out strings.Builder
		t := template.Must(template.New("").Option("missingkey=zero").Parse(c.Template))
		if err := t.Execute(&out, c.Data); err != nil {
			panic(err)
		}
		outputs = append(outputs, out.String())
	}
	json.NewEncoder(os.Stdout).Encode(outputs)
}
"""


def test_template_renders_like_gos_text_template(tmp_path):
    """The interpreter against the real engine, where a Go toolchain is installed."""
    import json
    import os
    import shutil
    import subprocess

    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain to compare with (apt-get install golang-go)")
    (tmp_path / "main.go").write_text(GO_EXECUTOR)
    (tmp_path / "go.mod").write_text("module executor\n\ngo 1.19\n")
    env = {
        **os.environ,
        "GOCACHE": str(tmp_path / "cache"),
        "GOPATH": str(tmp_path / "gopath"),
        "GOFLAGS": "-mod=mod",
    }
    subprocess.run([go, "build", "-o", "executor", "."], cwd=tmp_path, env=env, check=True, timeout=300)

    chats = [
        [SYSTEM, *TWO_TURNS],
        [*TWO_TURNS, {"role": "assistant", "content": "Madrid"}],
        [
            {"role": "user", "content": " spaced \n"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "{{ .X }}"},
        ],
        [],
    ]
    cases = [
        {
            "template": LLAMA3_TEMPLATE,
            "data": {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in chat]},
        }
        for chat in chats
    ]
    expected = [render_prompt(chat) for chat in chats]
    for source, data, _ in GO_TEMPLATE_CASES:
        cases.append({"template": source, "data": data})
        expected.append(GoTemplate(source).execute(data))
    done = subprocess.run(
        [str(tmp_path / "executor")],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(done.stdout) == expected
