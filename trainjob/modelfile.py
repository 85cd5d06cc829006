"""Ollama's Modelfile for an exported Llama 3 GGUF, and the prompt Ollama builds with it.

A GGUF carries its Jinja chat template, but Ollama formats prompts with the Go template in the
Modelfile and stops on its `stop` parameters; without both, a fine-tuned model runs past the end of
its turn. `render_prompt` interprets the template the way Ollama's Go engine does (only the subset
the template uses), so tests can prove it matches the Hugging Face chat template the model learned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# Ollama's own Llama 3.x template, reduced to chat without tools. Ollama gives the template every
# message (its SYSTEM line becomes a leading system message). A final assistant message is left
# open, as Ollama's templates do, so the reply continues it.
LLAMA3_TEMPLATE = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}
{{- if or (not $last) (ne .Role "assistant") }}<|eot_id|>{{ end }}
{{- if and $last (ne .Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}"""

LLAMA3_STOPS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA31_STOPS = (*LLAMA3_STOPS, "<|eom_id|>")

# Meta's recommended sampling for Llama 3 Instruct; 8192 is Llama 3's native context (Ollama's
# default is much shorter and silently drops the start of long chats).
DEFAULT_PARAMETERS = {"temperature": 0.6, "top_p": 0.9}
DEFAULT_NUM_CTX = 8192

# Ollama prepends BOS itself (the GGUF's add_bos_token), so its template has no <|begin_of_text|>.
BOS_TEXT = "<|begin_of_text|>"


def modelfile_text(
    gguf_file: str,
    *,
    llama31: bool = True,
    num_ctx: int = DEFAULT_NUM_CTX,
    system: str | None = None,
    parameters: dict | None = None,
) -> str:
    """The Modelfile for `gguf_file` (a path relative to the Modelfile, e.g. "./model-q8_0.gguf")."""
    stops = LLAMA31_STOPS if llama31 else LLAMA3_STOPS
    lines = [f"FROM {gguf_file}", f'TEMPLATE """{LLAMA3_TEMPLATE}"""']
    if system:
        if '"""' in system:
            raise ValueError('a SYSTEM message cannot contain """')
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    for name, value in {**DEFAULT_PARAMETERS, **(parameters or {}), "num_ctx": num_ctx}.items():
        lines.append(f"PARAMETER {name} {value}")
    return "\n".join(lines) + "\n"


def write_modelfile(
    model_dir, gguf_path, *, context_length: int, llama31: bool = True, filename: str = "Modelfile", **kw
) -> Path:
    """Write `model_dir`/`filename` pointing at `gguf_path` (which must lie in `model_dir`)."""
    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    if gguf_path.parent.resolve() != model_dir.resolve():
        raise ValueError(f"{gguf_path} must be in {model_dir} so the Modelfile can name it relatively")
    text = modelfile_text(
        f"./{gguf_path.name}", llama31=llama31, num_ctx=min(context_length, DEFAULT_NUM_CTX), **kw
    )
    path = model_dir / filename
    path.write_text(text, encoding="utf-8")
    return path


def ollama_commands(model_dir, name: str) -> list[str]:
    """The commands that load the exported model into Ollama and chat with it."""
    modelfile = Path(model_dir) / "Modelfile"
    return [f"ollama create {name} -f {_shell_quote(str(modelfile))}", f"ollama run {name}"]


def ollama_model_name(name: str) -> str:
    """A valid Ollama model name from a run or repo name (lowercase letters, digits, . _ -)."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return cleaned or "llama-trainer-model"


# --- reading a Modelfile, as `ollama create` does --------------------------------------------

COMMANDS = (
    "FROM", "LICENSE", "TEMPLATE", "SYSTEM", "ADAPTER", "DRAFT", "RENDERER", "PARSER",
    "PARAMETER", "MESSAGE", "REQUIRES",
)  # fmt: skip


@dataclass
class Modelfile:
    from_: str = ""
    template: str | None = None
    system: str | None = None
    parameters: list[tuple[str, str]] = field(default_factory=list)
    other: list[tuple[str, str]] = field(default_factory=list)

    def parameter_values(self, name: str) -> list[str]:
        return [v for k, v in self.parameters if k == name]


class ModelfileError(ValueError):
    pass


_BLANK_OR_COMMENT = re.compile(r"[ \t\r\n]+|#[^\n]*")
_COMMAND = re.compile(r"([A-Za-z]+)[ \t]+")
_PARAMETER_NAME = re.compile(r"([A-Za-z0-9_]+)[ \t]+")


def parse_modelfile(text: str) -> Modelfile:
    """Parse a Modelfile with Ollama's rules: a command name (any case), then a value that runs to
    the end of the line, unless it opens with \" or \"\"\": then it runs to the first line end where
    the text closes with the same quote. Quotes are only stripped; nothing inside is unescaped."""
    result = Modelfile()
    pos = 0
    while pos < len(text):
        m = _BLANK_OR_COMMENT.match(text, pos)
        if m:
            pos = m.end()
            continue
        line_no = text.count("\n", 0, pos) + 1
        m = _COMMAND.match(text, pos)
        if not m or m.group(1).upper() not in COMMANDS:
            word = text[pos:].split(None, 1)[0]
            raise ModelfileError(
                f"line {line_no}: unknown command {word!r} (expected one of {', '.join(COMMANDS)})"
            )
        command, pos = m.group(1).upper(), m.end()
        key = None
        if command in ("PARAMETER", "MESSAGE"):
            km = _PARAMETER_NAME.match(text, pos)
            if not km:
                raise ModelfileError(f"line {line_no}: {command} needs a name and a value")
            key, pos = km.group(1), km.end()
        value, pos = _read_value(text, pos, line_no)
        if command == "FROM":
            result.from_ = value
        elif command == "TEMPLATE":
            result.template = value
        elif command == "SYSTEM":
            result.system = value
        elif command == "PARAMETER":
            result.parameters.append((key, value))
        else:
            result.other.append((command, f"{key}: {value}" if key else value))
    if not result.from_:
        raise ModelfileError("no FROM line")
    return result


def _read_value(text: str, start: int, line_no: int) -> tuple[str, int]:
    pos = start
    while True:
        newline = text.find("\n", pos)
        end = len(text) if newline < 0 else newline
        value, complete = _unquote(text[start:end].strip())
        if complete:
            return value, end
        if newline < 0:
            raise ModelfileError(f"line {line_no}: a quoted value is never closed")
        pos = newline + 1


def _unquote(value: str) -> tuple[str, bool]:
    if value.startswith('"""'):
        return (value[3:-3], True) if len(value) >= 6 and value.endswith('"""') else ("", False)
    if value.startswith('"'):
        return (value[1:-1], True) if len(value) >= 2 and value.endswith('"') else ("", False)
    return value, True


def _quote(value: str) -> str:
    if '"' in value or "\n" in value:
        raise ValueError(f"cannot write {value!r} as a one-line Modelfile value")
    return '"' + value + '"'


def _shell_quote(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9_./:@+-]+", value) else "'" + value.replace("'", "'\\''") + "'"


# --- rendering the template, as Ollama's Go text/template does ------------------------------


def render_prompt(messages: list[dict], template: str = LLAMA3_TEMPLATE, system: str | None = None) -> str:
    """The text Ollama gives the model for `messages` (dicts with "role" and "content").

    Like Ollama, a `system` from the Modelfile is placed first unless the chat starts with its own
    system message. The BOS token Ollama's tokenizer adds is not part of the text.
    """
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    # Ollama merges consecutive messages of one role (tool results aside) and collects the system
    # messages into .System before executing the template.
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"] and m["role"] != "tool":
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    system_text = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    root = {"Messages": collated, "System": system_text, "Tools": [], "Response": ""}
    return GoTemplate(template).execute(root)


class GoTemplateError(ValueError):
    pass


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(
    r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+)|(?P<assign>:=)|(?P<lp>\()|(?P<rp>\))"""
    r"""|(?P<comma>,)|(?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)|(?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)"""
    r"""|(?P<ident>[A-Za-z_][A-Za-z0-9_]*))"""
)


class GoTemplate:
    """A small interpreter for the part of Go's text/template that Ollama chat templates use:
    text with {{- -}} trimming, fields, $variables (:=), range with index/element variables, if/else,
    and the builtins eq, ne, not, and, or, len, slice, index. Anything else raises GoTemplateError."""

    FUNCTIONS = ("eq", "ne", "not", "and", "or", "len", "slice", "index", "lt", "le", "gt", "ge")

    def __init__(self, source: str):
        self.nodes, rest = self._parse(self._lex(source), 0, ())
        if rest != len(self._items):
            raise GoTemplateError(f"unexpected {{{{{self._items[rest][1]}}}}}")

    def execute(self, root) -> str:
        out: list[str] = []
        self._run(self.nodes, root, [{"$": root}], out)
        return "".join(out)

    # lexing and parsing

    def _lex(self, source: str) -> list[tuple[str, str]]:
        items: list[tuple[str, str]] = []
        pos = 0
        trim_next = False
        for m in _ACTION.finditer(source):
            text = source[pos : m.start()]
            if trim_next:
                text = text.lstrip(" \t\r\n")
            if m.group(1):
                text = text.rstrip(" \t\r\n")
            items.append(("text", text))
            items.append(("action", m.group(2).strip()))
            trim_next = bool(m.group(3))
            pos = m.end()
        text = source[pos:]
        items.append(("text", text.lstrip(" \t\r\n") if trim_next else text))
        self._items = items
        return items

    def _parse(self, items, i, stop):
        nodes = []
        while i < len(items):
            kind, value = items[i]
            if kind == "text":
                if value:
                    nodes.append(("text", value))
                i += 1
                continue
            word = value.split(None, 1)[0] if value else ""
            if word in stop:
                return nodes, i
            if value.startswith("/*"):
                i += 1
            elif word in ("if", "range"):
                body, i = self._parse(items, i + 1, ("else", "end"))
                else_body = []
                if i < len(items) and items[i][1].split(None, 1)[0] == "else":
                    if items[i][1].strip() != "else":
                        raise GoTemplateError(f"unsupported {{{{{items[i][1]}}}}}")
                    else_body, i = self._parse(items, i + 1, ("end",))
                if i >= len(items) or items[i][1] != "end":
                    raise GoTemplateError(f"{{{{{value}}}}} has no {{{{end}}}}")
                nodes.append((word, value[len(word) :].strip(), body, else_body))
                i += 1
            elif word in ("with", "define", "template", "block", "break", "continue", "end", "else"):
                raise GoTemplateError(f"unsupported or misplaced {{{{{value}}}}}")
            else:
                nodes.append(("action", value))
                i += 1
        return nodes, i

    # evaluation

    def _run(self, nodes, dot, scopes, out):
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "action":
                names, expr = self._split_assignment(node[1])
                value = self._eval(self._tokens(expr), dot, scopes)
                if names:
                    scopes[-1][names[0]] = value
                else:
                    out.append(_go_print(value))
            elif kind == "if":
                branch = node[2] if _truthy(self._eval(self._tokens(node[1]), dot, scopes)) else node[3]
                self._run(branch, dot, [*scopes, {}], out)
            elif kind == "range":
                names, expr = self._split_assignment(node[1])
                items = self._eval(self._tokens(expr), dot, scopes)
                if not items:
                    self._run(node[3], dot, [*scopes, {}], out)
                for index, item in enumerate(items or []):
                    scope = {}
                    if len(names) == 1:
                        scope[names[0]] = item
                    elif len(names) == 2:
                        scope[names[0]], scope[names[1]] = index, item
                    self._run(node[2], item, [*scopes, scope], out)

    @staticmethod
    def _split_assignment(expr: str) -> tuple[list[str], str]:
        m = re.match(r"\s*(\$\w*(?:\s*,\s*\$\w*)?)\s*:=\s*(.*)$", expr, re.DOTALL)
        if not m:
            return [], expr
        return [n.strip() for n in m.group(1).split(",")], m.group(2)

    def _tokens(self, expr: str) -> list[tuple[str, str]]:
        tokens, pos = [], 0
        while pos < len(expr):
            if expr[pos:].strip() == "":
                break
            m = _TOKEN.match(expr, pos)
            if not m or m.end() == pos:
                raise GoTemplateError(f"cannot read {expr[pos:]!r}")
            kind = m.lastgroup
            tokens.append((kind, m.group(kind)))
            pos = m.end()
        if any(k == "ident" and v not in (*self.FUNCTIONS, "true", "false", "nil") for k, v in tokens):
            raise GoTemplateError(f"unsupported function in {expr!r}")
        return tokens

    def _eval(self, tokens, dot, scopes):
        value, rest = self._command(tokens, 0, dot, scopes)
        if rest != len(tokens):
            raise GoTemplateError(f"unexpected {tokens[rest][1]!r}")
        return value

    def _command(self, tokens, i, dot, scopes):
        if i < len(tokens) and tokens[i][0] == "ident" and tokens[i][1] in self.FUNCTIONS:
            name, i = tokens[i][1], i + 1
            args = []
            while i < len(tokens) and tokens[i][0] != "rp":
                arg, i = self._operand(tokens, i, dot, scopes)
                args.append(arg)
            return _call(name, args), i
        return self._operand(tokens, i, dot, scopes)

    def _operand(self, tokens, i, dot, scopes):
        kind, text = tokens[i]
        if kind == "lp":
            value, i = self._command(tokens, i + 1, dot, scopes)
            if i >= len(tokens) or tokens[i][0] != "rp":
                raise GoTemplateError("missing )")
            return value, i + 1
        if kind == "str":
            return _go_unquote(text), i + 1
        if kind == "raw":
            return text[1:-1], i + 1
        if kind == "num":
            return int(text), i + 1
        if kind == "ident":
            return {"true": True, "false": False, "nil": None}[text], i + 1
        if kind == "field":
            return _fields(dot, text), i + 1
        if kind == "var":
            name, _, path = text.partition(".")
            for scope in reversed(scopes):
                if name in scope:
                    return _fields(scope[name], "." + path if path else "."), i + 1
            raise GoTemplateError(f"undefined variable {name}")
        raise GoTemplateError(f"unexpected {text!r}")


def _fields(value, path: str):
    for name in filter(None, path.split(".")):
        if not isinstance(value, dict) or name not in value:
            raise GoTemplateError(f"can't evaluate field {name}")
        value = value[name]
    return value


def _call(name: str, args: list):
    if name in ("eq", "ne", "lt", "le", "gt", "ge") and len(args) < 2:
        raise GoTemplateError(f"{name} needs two arguments")
    if name == "eq":
        return any(args[0] == other for other in args[1:])
    if name == "ne":
        return args[0] != args[1]
    if name in ("lt", "le", "gt", "ge"):
        a, b = args
        return {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[name]
    if name == "not":
        return not _truthy(args[0])
    if name == "and":  # Go returns the first falsy argument, else the last
        return next((a for a in args if not _truthy(a)), args[-1])
    if name == "or":
        return next((a for a in args if _truthy(a)), args[-1])
    if name == "len":
        return len(args[0])
    if name == "slice":
        seq, bounds = args[0], args[1:]
        return seq[bounds[0] : bounds[1]] if len(bounds) == 2 else seq[bounds[0] :] if bounds else seq
    if name == "index":
        value = args[0]
        for key in args[1:]:
            value = value[key]
        return value
    raise GoTemplateError(f"unsupported function {name}")


def _truthy(value) -> bool:
    return bool(value) and value is not None


def _go_print(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "<no value>"
    return str(value)


def _go_unquote(text: str) -> str:
    escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
    return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), "\\" + m.group(1)), text[1:-1])
