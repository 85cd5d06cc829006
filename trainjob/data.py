"""Load chat conversations and check every line before any GPU time is spent.

A dataset is a local `.jsonl` file, a local directory, or a Hugging Face Hub dataset repo id. Each
line holds one conversation in the seed's format, `{"chats": [{"role": ..., "content": ...}, ...]}`
(`{"messages": [...]}` is accepted too). Splits are found by file name the way `datasets` finds
them (`train.jsonl`, `validation.jsonl`, `eval.jsonl` -> test, `data/train-00000-of-00001.jsonl`, ...).

Validation never stops at the first mistake: every problem is collected as `path:line: field: message`
so a user fixes the whole file in one pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "validation", "test")
# The names `datasets` recognises for each split (so "eval.jsonl" is the test split, not validation).
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
CONVERSATION_KEYS = ("chats", "messages")
# Enough to fix a file in one go without burying the terminal.
MAX_LISTED_PROBLEMS = 50

# Text that the Llama 3 tokenizer reads as a control token: inside content it would end a turn or
# fake a header, silently changing what the model learns.
SPECIAL_TOKEN_TEXT = re.compile(
    r"<\|(?:begin_of_text|end_of_text|start_header_id|end_header_id|eot_id|eom_id|python_tag"
    r"|finetune_right_pad_id|reserved_special_token_\d+)\|>"
)
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PREFIX = "hf://datasets/"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data, located as precisely as possible."""

    path: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.field}: {self.message}"


class DataValidationError(ValueError):
    """The dataset can't be trained on; `.problems` lists every reason."""

    def __init__(self, problems: Iterable[Problem], max_listed: int = MAX_LISTED_PROBLEMS):
        self.problems = list(problems)
        self.max_listed = max_listed
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return format_problems(self.problems, self.max_listed)


def format_problems(problems: list[Problem], max_listed: int = MAX_LISTED_PROBLEMS) -> str:
    """The human list: one `path:line: field: message` per line, capped, with a count of the rest."""
    lines = [str(problem) for problem in problems[:max_listed]]
    hidden = len(problems) - len(lines)
    if hidden > 0:
        lines.append(f"... and {hidden} more ({len(problems)} problems in all)")
    return "\n".join(lines)


class Conversation(list):
    """A conversation's messages (`{"role", "content"}` dicts) that remembers where it came from."""

    def __init__(self, messages: Iterable[dict] = (), source: str = "", line: int | None = None):
        super().__init__(messages)
        self.source = source
        self.line = line

    @property
    def where(self) -> str:
        return self.source if self.line is None else f"{self.source}:{self.line}"


class ChatSplits(dict):
    """`{"train": [...], "validation": [...], "test": [...]}` (only the splits found), plus what the
    loader noticed: the files read per split, warnings (duplicates) and, when loaded with
    `strict=False`, the problems that excluded conversations."""

    def __init__(self, source: str):
        super().__init__()
        self.source = source
        self.files: dict[str, list[str]] = {}
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.blank_lines = 0


# ---------------------------------------------------------------------------------------------
# Loading


def load_chats(
    source: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | Path | None = None,
    strict: bool = True,
) -> ChatSplits:
    """Read and validate every split of `source` (a .jsonl file, a directory or a Hub dataset repo id).

    With `strict` (the default) any problem raises `DataValidationError`; otherwise the splits hold the
    valid conversations and `.problems` the rest, so later checks can still run on what is valid.
    """
    splits = ChatSplits(str(source))
    try:
        root, display_root = _resolve_source(source, revision, token, endpoint, cache_dir)
    except DataValidationError as error:
        splits.problems.extend(error.problems)
        return _finish(splits, strict)

    if root.is_file():
        split_files = {"train": [root]}  # a file named explicitly is read whatever its suffix
    else:
        split_files = discover_split_files(root)
        _check_split_files(split_files, root, display_root, splits)

    seen: dict[str, str] = {}  # conversation fingerprint -> where it first appeared
    for split in SPLITS:
        files = [f for f in split_files.get(split, []) if root.is_file() or _is_jsonl(f)]
        if not files:
            continue
        conversations: list[Conversation] = []
        for path in files:
            display = _display_path(path, root, display_root)
            splits.files.setdefault(split, []).append(display)
            found, problems, blank = read_conversations(path, display)
            conversations.extend(found)
            splits.problems.extend(problems)
            splits.blank_lines += blank
        splits.warnings.extend(_duplicate_warnings(split, conversations, seen))
        if not conversations and not any(p.path in splits.files[split] for p in splits.problems):
            splits.problems.append(
                Problem(
                    splits.files[split][0],
                    None,
                    "split",
                    f'the "{split}" split has no conversations (the file is empty or blank)',
                )
            )
        splits[split] = conversations
    return _finish(splits, strict)


def _finish(splits: ChatSplits, strict: bool) -> ChatSplits:
    if strict and splits.problems:
        raise DataValidationError(splits.problems)
    return splits


def _resolve_source(source, revision, token, endpoint, cache_dir) -> tuple[Path, str]:
    """A local path as is; a Hub repo id downloaded (its JSONL files only) to a local snapshot."""
    text = str(source)
    repo_id = text[len(HUB_PREFIX) :] if text.startswith(HUB_PREFIX) else None
    if repo_id is None:
        path = Path(text).expanduser()
        if path.exists():
            return path, text.rstrip("/") or text
        if not HUB_REPO_ID.match(text):
            raise DataValidationError([Problem(text, None, "dataset", "no such file or directory")])
        repo_id = text
    return _download_hub_dataset(repo_id, revision, token, endpoint, cache_dir)


def _download_hub_dataset(repo_id, revision, token, endpoint, cache_dir) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    display = f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    try:
        local = snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=revision,
            token=token,
            endpoint=endpoint,
            cache_dir=cache_dir,
            # fnmatch's "*" crosses "/", so this also takes data/train-00000-of-00001.jsonl.
            allow_patterns=["*.jsonl", "*.JSONL"],
        )
    except GatedRepoError:
        message = "this dataset is gated: accept its terms on the Hub and set HF_TOKEN"
    except RepositoryNotFoundError:
        message = (
            "not a local path, and no such dataset on the Hub "
            "(check the name; a private dataset needs HF_TOKEN with read access)"
        )
    except RevisionNotFoundError:
        message = f"the dataset has no revision {revision!r}"
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        message = f"could not download from the Hub: {error}"
    else:
        return Path(local), display
    raise DataValidationError([Problem(display, None, "dataset", message)])


def discover_split_files(root: Path) -> dict[str, list[Path]]:
    """Split name -> files under `root`, by the rules `datasets.load_dataset` applies to a folder.

    In order, the first rule that matches any file decides: `data/{split}-00000-of-00001.*` shards;
    a folder named for a split (`train/`, `my-dev/`); a file named for one (`train.jsonl`,
    `chats-eval.jsonl`); otherwise every file is train. Hidden files are skipped. Stdlib only, so
    the controller can check a dataset before launch.
    """
    files = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith((".", "__")) for part in path.relative_to(root).parts)
    )
    sharded: dict[str, list[Path]] = {}
    for name in files:
        match = _SHARDED.match(name)
        if match:
            sharded.setdefault(match["split"], []).append(root / name)
    if sharded:
        order = [*SPLITS, *sorted(set(sharded) - set(SPLITS))]
        return {split: sharded[split] for split in order if split in sharded}
    for named in (_in_folder_name, _in_file_name):
        found = {}
        for split, keywords in SPLIT_KEYWORDS.items():
            matching = [root / name for name in files if any(named(name, keyword) for keyword in keywords)]
            if matching:
                found[split] = matching
        if found:
            return found
    return {"train": [root / name for name in files]} if files else {}


_SEP = r"[-._ 0-9]"  # what may stand next to a split keyword in a name ("my-train", "train1")
_SHARDED = re.compile(r"^data/(?P<split>\w+(?:\.\w+)*)-\d{5}-of-\d{5}[^/]*\.[^/]*$")


def _in_folder_name(name: str, keyword: str) -> bool:
    pattern = rf"(?:.*{_SEP})?{keyword}(?:{_SEP}.*)?"
    return any(re.fullmatch(pattern, folder) for folder in name.split("/")[:-1])


def _in_file_name(name: str, keyword: str) -> bool:
    return re.fullmatch(rf"(?:.*{_SEP})?{keyword}{_SEP}.*", name.rsplit("/", 1)[-1]) is not None


def _check_split_files(split_files, root: Path, display_root: str, splits: ChatSplits) -> None:
    problems = splits.problems
    for split, files in split_files.items():
        if split not in SPLITS:
            splits.warnings.append(
                Problem(display_root, None, split, "split not used: only train, validation and test are read")
            )
            continue
        if files and not any(_is_jsonl(f) for f in files):
            names = ", ".join(_display_path(f, root, display_root) for f in files[:5])
            problems.append(
                Problem(
                    display_root,
                    None,
                    split,
                    f"only JSON Lines (.jsonl) files are read; this split has {names}",
                )
            )
    has_train = any(_is_jsonl(f) for f in split_files.get("train", []))
    if not has_train and not any(problem.field == "train" for problem in problems):
        found = sorted(_display_path(f, root, display_root) for files in split_files.values() for f in files)
        seen = f"; found {', '.join(found[:8])}" if found else "; the dataset has no .jsonl files"
        problems.append(
            Problem(
                display_root,
                None,
                "train",
                "no train split: name a file train.jsonl (or training.jsonl, "
                f"data/train-00000-of-00001.jsonl){seen}",
            )
        )


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def _display_path(path: Path, root: Path, display_root: str) -> str:
    if path == root:
        return display_root
    try:
        relative = path.relative_to(root)
    except ValueError:
        return str(path)
    return f"{display_root}/{relative.as_posix()}"


# ---------------------------------------------------------------------------------------------
# Checking


def read_conversations(path: Path, display: str) -> tuple[list[Conversation], list[Problem], int]:
    """Parse one JSONL file: (valid conversations, problems, number of blank lines skipped)."""
    conversations: list[Conversation] = []
    problems: list[Problem] = []
    blank = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                problems.append(Problem(display, number, "json", f"not UTF-8 text (byte {error.start + 1})"))
                continue
            if not text.strip():
                blank += 1  # blank lines (a trailing newline, spacing) carry no data
                continue
            try:
                record = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                problems.append(Problem(display, number, "json", _json_error(error)))
                continue
            found = check_record(record, display, number)
            if found:
                problems.extend(found)
            else:
                key = "chats" if "chats" in record else "messages"
                messages = [{"role": m["role"], "content": m["content"]} for m in record[key]]
                conversations.append(Conversation(messages, display, number))
    return conversations, problems, blank


def _json_error(error: json.JSONDecodeError) -> str:
    # json's messages end in " at" when they name a start position ("Unterminated string starting at").
    if error.msg.endswith(" at"):
        return f"invalid JSON: {error.msg} column {error.colno}"
    return f"invalid JSON: {error.msg} (column {error.colno})"


def check_record(record, path: str, line: int | None) -> list[Problem]:
    """Every schema problem of one parsed line (an empty list when it is a valid conversation)."""

    def problem(where: str, message: str) -> Problem:
        return Problem(path, line, where, message)

    if not isinstance(record, dict):
        return [problem("record", f'expected a JSON object like {{"chats": [...]}}, got {_kind(record)}')]
    present = [key for key in CONVERSATION_KEYS if key in record]
    if not present:
        keys = ", ".join(f'"{k}"' for k in list(record)[:5]) or "none"
        return [
            problem("chats", f'missing: each line needs a "chats" (or "messages") list; keys here: {keys}')
        ]
    if len(present) > 1:
        return [problem("record", 'has both "chats" and "messages"; keep one')]
    key = present[0]
    messages = record[key]
    if not isinstance(messages, list):
        return [problem(key, f"expected a list of messages, got {_kind(messages)}")]
    if not messages:
        return [problem(key, "empty: a conversation needs at least a user and an assistant message")]

    problems: list[Problem] = []
    roles_ok = True
    for index, message in enumerate(messages):
        where = f"{key}[{index}]"
        if not isinstance(message, dict):
            problems.append(
                problem(where, f'expected an object with "role" and "content", got {_kind(message)}')
            )
            roles_ok = False
            continue
        role_problem = _check_role(message)
        if role_problem:
            problems.append(problem(f"{where}.role", role_problem))
            roles_ok = False
        content_problem = _check_content(message)
        if content_problem:
            problems.append(problem(f"{where}.content", content_problem))
    if roles_ok:
        problems.extend(problem(where, message) for where, message in _check_turn_order(key, messages))
    return problems


def _check_role(message: dict) -> str | None:
    if "role" not in message:
        return "missing"
    role = message["role"]
    if not isinstance(role, str):
        return f"expected a string, got {_kind(role)}"
    if role not in ROLES:
        hint = " (roles are lowercase)" if role.lower() in ROLES else ""
        return f'unknown role "{role}"; allowed: {", ".join(ROLES)}{hint}'
    return None


def _check_content(message: dict) -> str | None:
    if "content" not in message:
        return "missing"
    content = message["content"]
    if not isinstance(content, str):
        return f"expected a string, got {_kind(content)}"
    if not content.strip():
        return "empty (or only whitespace)"
    special = SPECIAL_TOKEN_TEXT.search(content)
    if special:
        return (
            f'contains "{special.group(0)}", which the tokenizer reads as a control token, not text; '
            "remove it"
        )
    return None


def _check_turn_order(key: str, messages: list[dict]) -> list[tuple[str, str]]:
    """An optional system message, then user/assistant alternating, ending with the assistant.

    Only the first break in the order is reported: everything after it is off by one anyway.
    """
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        return [(key, 'no "assistant" message: there is nothing to learn from')]
    start = 1 if roles[0] == "system" else 0
    for index in range(start, len(roles)):
        role = roles[index]
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if role == "system":
            return [(f"{key}[{index}].role", '"system" is only allowed as the first message')]
        if role != expected:
            if index == start:
                return [
                    (
                        f"{key}[{index}].role",
                        f'the conversation must start with "user" (after an optional "system"), got "{role}"',
                    )
                ]
            return [
                (
                    f"{key}[{index}].role",
                    f'expected "{expected}" after "{roles[index - 1]}" (turns alternate), got "{role}"',
                )
            ]
    if roles[-1] != "assistant":
        return [
            (
                f"{key}[{len(roles) - 1}].role",
                f'the conversation must end with an "assistant" message, got "{roles[-1]}"',
            )
        ]
    return []


def _duplicate_warnings(split: str, conversations: list[Conversation], seen: dict[str, str]) -> list[Problem]:
    """Repeated conversations: within a split they weigh double; across splits they flatter the eval."""
    warnings = []
    in_split: dict[str, str] = {}
    for conversation in conversations:
        fingerprint = json.dumps(list(conversation), sort_keys=True, ensure_ascii=False)
        if fingerprint in in_split:
            message = f"duplicate of {in_split[fingerprint]}"
        elif fingerprint in seen:
            message = f"same conversation as {seen[fingerprint]}: evaluation on it flatters the model"
        else:
            in_split[fingerprint] = conversation.where
            continue
        warnings.append(Problem(conversation.source, conversation.line, "chats", message))
    for fingerprint, where in in_split.items():
        seen.setdefault(fingerprint, where)
    return warnings


def _kind(value) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Handing on


def to_hf_dataset(conversations: Iterable[list[dict]]):
    """A `datasets.Dataset` with one `messages` column (the conversational format TRL reads)."""
    from datasets import Dataset

    rows = [
        [{"role": m["role"], "content": m["content"]} for m in conversation] for conversation in conversations
    ]
    return Dataset.from_dict({"messages": rows})


__all__ = [
    "SPLITS",
    "ChatSplits",
    "Conversation",
    "DataValidationError",
    "Problem",
    "check_record",
    "discover_split_files",
    "format_problems",
    "load_chats",
    "read_conversations",
    "to_hf_dataset",
]
