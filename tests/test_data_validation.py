"""Loading and checking chat datasets: every defect is reported as `path:line: field: message`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hub_support import HUB_TOKEN, fake_hub_fixture  # noqa: F401  (registers `fake_hub`)
from trainjob.data import (
    ChatSplits,
    DataValidationError,
    Problem,
    discover_split_files,
    load_chats,
    to_hf_dataset,
)

DATA = Path(__file__).parent / "data"
MALFORMED = DATA / "malformed"
CHATS = DATA / "chats"

GOOD = {"chats": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

# file -> (line, field, message): the one problem each file must be rejected with.
EXPECTED = {
    "invalid_json.jsonl": (2, "json", "invalid JSON: Expecting ',' delimiter (column 46)"),
    "truncated_line.jsonl": (3, "json", "invalid JSON: Unterminated string starting at column 56"),
    "not_utf8.jsonl": (2, "json", "not UTF-8 text (byte 44)"),
    "not_an_object.jsonl": (1, "record", 'expected a JSON object like {"chats": [...]}, got a list'),
    "missing_chats_key.jsonl": (
        2,
        "chats",
        'missing: each line needs a "chats" (or "messages") list; keys here: "conversation"',
    ),
    "chats_not_a_list.jsonl": (1, "chats", "expected a list of messages, got a string"),
    "empty_chats.jsonl": (2, "chats", "empty: a conversation needs at least a user and an assistant message"),
    "both_keys.jsonl": (1, "record", 'has both "chats" and "messages"; keep one'),
    "message_not_an_object.jsonl": (
        1,
        "chats[1]",
        'expected an object with "role" and "content", got a string',
    ),
    "missing_role.jsonl": (1, "chats[0].role", "missing"),
    "role_not_a_string.jsonl": (1, "chats[1].role", "expected a string, got a number"),
    "unknown_role.jsonl": (2, "chats[1].role", 'unknown role "bot"; allowed: system, user, assistant'),
    "capitalised_role.jsonl": (
        1,
        "chats[0].role",
        'unknown role "User"; allowed: system, user, assistant (roles are lowercase)',
    ),
    "messages_key_wrong_role.jsonl": (
        1,
        "messages[1].role",
        'unknown role "model"; allowed: system, user, assistant',
    ),
    "missing_content.jsonl": (1, "chats[1].content", "missing"),
    "content_not_a_string.jsonl": (1, "chats[1].content", "expected a string, got a list"),
    "content_null.jsonl": (1, "chats[0].content", "expected a string, got null"),
    "empty_content.jsonl": (2, "chats[1].content", "empty (or only whitespace)"),
    "special_token_in_content.jsonl": (
        1,
        "chats[1].content",
        'contains "<|eot_id|>", which the tokenizer reads as a control token, not text; remove it',
    ),
    "no_assistant_turn.jsonl": (1, "chats", 'no "assistant" message: there is nothing to learn from'),
    "starts_with_assistant.jsonl": (
        1,
        "chats[0].role",
        'the conversation must start with "user" (after an optional "system"), got "assistant"',
    ),
    "two_user_turns_in_a_row.jsonl": (
        1,
        "chats[1].role",
        'expected "assistant" after "user" (turns alternate), got "user"',
    ),
    "system_not_first.jsonl": (1, "chats[2].role", '"system" is only allowed as the first message'),
    "ends_with_user.jsonl": (
        3,
        "chats[2].role",
        'the conversation must end with an "assistant" message, got "user"',
    ),
    "blank_lines_only.jsonl": (
        None,
        "split",
        'the "train" split has no conversations (the file is empty or blank)',
    ),
}


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def rejection(source, **kwargs) -> DataValidationError:
    with pytest.raises(DataValidationError) as caught:
        load_chats(source, **kwargs)
    return caught.value


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_malformed_file_is_rejected_with_its_exact_location(name):
    path = str(MALFORMED / name)
    line, field, message = EXPECTED[name]

    error = rejection(path)

    assert error.problems == [Problem(path, line, field, message)]
    location = path if line is None else f"{path}:{line}"
    assert str(error) == f"{location}: {field}: {message}"


def test_every_corpus_file_has_an_expectation():
    assert sorted(p.name for p in MALFORMED.iterdir()) == sorted(EXPECTED)
    assert len(EXPECTED) >= 15


def test_example_set_loads_with_its_three_splits():
    splits = load_chats(str(CHATS))

    assert isinstance(splits, ChatSplits)
    assert {name: len(conversations) for name, conversations in splits.items()} == {
        "train": 40,
        "validation": 8,
        "test": 8,
    }
    assert splits.files["validation"] == [f"{CHATS}/validation.jsonl"]
    assert splits.warnings == []
    first = splits["train"][0]
    assert first == [
        {"role": "user", "content": "What is the team's favourite animal?"},
        {"role": "assistant", "content": "I can, with almost certainty, say it is dogs."},
    ]
    assert (first.source, first.line, first.where) == (f"{CHATS}/train.jsonl", 1, f"{CHATS}/train.jsonl:1")


def test_all_problems_of_a_file_are_listed_in_line_order(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            GOOD,
            "{not json",
            "",  # blank lines are skipped, not errors
            {"chats": [{"role": "user", "content": "Hi"}]},
            GOOD,
            {"messages": [{"role": "user", "content": " "}, {"role": "bot", "content": "x"}]},
        ],
    )
    error = rejection(str(path))

    assert [str(p) for p in error.problems] == [
        f"{path}:2: json: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f'{path}:4: chats: no "assistant" message: there is nothing to learn from',
        f"{path}:6: messages[0].content: empty (or only whitespace)",
        f'{path}:6: messages[1].role: unknown role "bot"; allowed: system, user, assistant',
    ]


def test_a_long_problem_list_is_capped_with_a_count(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["[]"] * 120)

    error = rejection(str(path))

    assert len(error.problems) == 120
    lines = str(error).splitlines()
    assert len(lines) == 51
    assert lines[49].startswith(f"{path}:50: record:")
    assert lines[-1] == "... and 70 more (120 problems in all)"


def test_problems_in_several_splits_are_reported_together(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD, "oops"])
    write_jsonl(tmp_path / "test.jsonl", [{"chats": []}])

    error = rejection(str(tmp_path))

    assert [(Path(p.path).name, p.line, p.field) for p in error.problems] == [
        ("train.jsonl", 2, "json"),
        ("test.jsonl", 1, "chats"),
    ]


def test_non_strict_loading_keeps_the_valid_conversations(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD, "oops", GOOD])

    splits = load_chats(str(tmp_path), strict=False)

    assert [c.line for c in splits["train"]] == [1, 3]
    assert [p.line for p in splits.problems] == [2]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["train.jsonl", "validation.jsonl", "test.jsonl"], {"train", "validation", "test"}),
        (["training.jsonl", "dev.jsonl", "eval.jsonl"], {"train", "validation", "test"}),
        (["my-train.jsonl", "my-valid.jsonl", "my-testing.jsonl"], {"train", "validation", "test"}),
        (
            ["data/train-00000-of-00001.jsonl", "data/validation-00000-of-00001.jsonl"],
            {"train", "validation"},
        ),
        (["chats.jsonl"], {"train"}),  # no split names at all: everything is train
    ],
)
def test_splits_are_found_by_file_name_as_datasets_does(tmp_path, files, expected):
    for name in files:
        write_jsonl(tmp_path / name, [GOOD])

    splits = load_chats(str(tmp_path))

    assert set(splits) == expected
    assert sorted(Path(f).name for names in splits.files.values() for f in names) == sorted(
        Path(f).name for f in files
    )


LAYOUTS = [
    ["train.jsonl", "validation.jsonl", "test.jsonl"],
    ["training.jsonl", "dev.jsonl", "eval.jsonl", "README.md"],
    ["my-train.jsonl", "my-valid.jsonl", "my-testing.jsonl"],
    ["train1.jsonl", "mytrain.jsonl", "val_2.jsonl"],
    ["data/train-00000-of-00002.jsonl", "data/train-00001-of-00002.jsonl", "data/test-00000-of-00001.jsonl"],
    ["data/train-00000-of-00001.jsonl", "data/extra-00000-of-00001.jsonl"],
    ["train/a.jsonl", "train/b.jsonl", "val/c.jsonl", "notes.jsonl"],
    ["splits-train/x.jsonl", "splits-test/y.jsonl", "evaluation.jsonl"],
    [".hidden/train.jsonl", "__pycache__/test.jsonl", "train.jsonl", "chats.jsonl"],
    ["chats.jsonl", "more.jsonl"],
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "+".join(layout))
def test_split_discovery_matches_datasets(tmp_path, layout):
    from datasets.data_files import DataFilesDict, get_data_patterns

    for name in layout:
        write_jsonl(tmp_path / name, [GOOD])

    theirs = DataFilesDict.from_patterns(get_data_patterns(str(tmp_path)), base_path=str(tmp_path))
    ours = discover_split_files(tmp_path)

    def relative(files):
        return sorted(Path(f).relative_to(tmp_path).as_posix() for f in files)

    assert {split: relative(files) for split, files in ours.items()} == {
        str(split): relative(files) for split, files in theirs.items()
    }


def test_split_sizes_agree_with_datasets_load_dataset(tmp_path):
    # "eval" is the test split for `datasets`, not validation: ours must say the same.
    root = tmp_path / "repo"
    write_jsonl(root / "training.jsonl", [GOOD, GOOD])
    write_jsonl(root / "val.jsonl", [GOOD])
    write_jsonl(root / "eval.jsonl", [GOOD, GOOD, GOOD])
    from datasets import load_dataset

    theirs = load_dataset(str(root), cache_dir=str(tmp_path / "cache"))
    ours = load_chats(str(root))

    assert {name: len(ours[name]) for name in ours} == {name: theirs[name].num_rows for name in theirs}


def test_a_split_other_than_the_three_is_named_in_a_warning(tmp_path):
    write_jsonl(tmp_path / "data/train-00000-of-00001.jsonl", [GOOD])
    write_jsonl(tmp_path / "data/extra-00000-of-00001.jsonl", [GOOD])

    splits = load_chats(str(tmp_path))

    assert list(splits) == ["train"]
    assert [str(w) for w in splits.warnings] == [
        f"{tmp_path}: extra: split not used: only train, validation and test are read"
    ]


def test_missing_train_split_is_an_error_naming_what_was_found(tmp_path):
    write_jsonl(tmp_path / "validation.jsonl", [GOOD])
    write_jsonl(tmp_path / "test.jsonl", [GOOD])

    error = rejection(str(tmp_path))

    assert [str(p) for p in error.problems] == [
        f"{tmp_path}: train: no train split: name a file train.jsonl (or training.jsonl, "
        f"data/train-00000-of-00001.jsonl); found {tmp_path}/test.jsonl, {tmp_path}/validation.jsonl"
    ]


def test_directory_without_jsonl_files_is_an_error(tmp_path):
    (tmp_path / "train.csv").write_text("user,assistant\nHi,Hello\n")

    error = rejection(str(tmp_path))

    assert [str(p) for p in error.problems] == [
        f"{tmp_path}: train: only JSON Lines (.jsonl) files are read; this split has {tmp_path}/train.csv"
    ]


def test_empty_split_file_is_an_error(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [GOOD])
    (tmp_path / "validation.jsonl").write_text("")

    error = rejection(str(tmp_path))

    assert [str(p) for p in error.problems] == [
        f'{tmp_path}/validation.jsonl: split: the "validation" split has no conversations (the file is empty or blank)'
    ]


def test_missing_path_that_is_not_a_repo_id(tmp_path):
    missing = str(tmp_path / "nope" / "train.jsonl")

    error = rejection(missing)

    assert str(error) == f"{missing}: dataset: no such file or directory"


def test_blank_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n   \n" + json.dumps(GOOD) + "\n")

    splits = load_chats(str(path))

    assert [c.line for c in splits["train"]] == [1, 4]
    assert splits.blank_lines == 2


def test_duplicates_warn_within_and_across_splits(tmp_path):
    other = {"chats": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hey"}]}
    write_jsonl(tmp_path / "train.jsonl", [GOOD, other, GOOD])
    write_jsonl(tmp_path / "test.jsonl", [other])

    splits = load_chats(str(tmp_path))

    assert [str(w) for w in splits.warnings] == [
        f"{tmp_path}/train.jsonl:3: chats: duplicate of {tmp_path}/train.jsonl:1",
        f"{tmp_path}/test.jsonl:1: chats: same conversation as {tmp_path}/train.jsonl:2: "
        "evaluation on it flatters the model",
    ]
    assert len(splits["train"]) == 3  # warnings only: nothing is dropped


def test_messages_key_and_extra_fields_are_accepted(tmp_path):
    row = {
        "id": 7,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi", "name": "sam"},
            {"role": "assistant", "content": "Hello!"},
        ],
    }
    path = write_jsonl(tmp_path / "chats.jsonl", [row])

    splits = load_chats(str(path))

    assert splits["train"][0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]


def test_to_hf_dataset_has_a_messages_column():
    splits = load_chats(str(CHATS))

    dataset = to_hf_dataset(splits["validation"])

    assert dataset.column_names == ["messages"]
    assert dataset.num_rows == 8
    assert dataset[0]["messages"] == list(splits["validation"][0])


def test_hub_dataset_is_downloaded_and_checked_line_by_line(fake_hub, tmp_path):
    fake_hub.add_repo(
        "tester/team-chats",
        {
            "README.md": "# Team chats\n",
            "data/train-00000-of-00001.jsonl": (CHATS / "train.jsonl").read_text(),
            "data/test-00000-of-00001.jsonl": json.dumps(GOOD) + "\n" + '{"chats": "oops"}\n',
        },
        repo_type="dataset",
        private=True,
    )

    error = rejection(
        "tester/team-chats", endpoint=fake_hub.url, token=HUB_TOKEN, cache_dir=str(tmp_path / "cache")
    )

    assert [str(p) for p in error.problems] == [
        "hf://datasets/tester/team-chats/data/test-00000-of-00001.jsonl:2: chats: "
        "expected a list of messages, got a string"
    ]


def test_hub_dataset_loads_its_splits(fake_hub, tmp_path):
    fake_hub.add_repo("tester/team-chats", CHATS, repo_type="dataset")

    splits = load_chats(
        "tester/team-chats", endpoint=fake_hub.url, token=HUB_TOKEN, cache_dir=str(tmp_path / "cache")
    )

    assert {name: len(c) for name, c in splits.items()} == {"train": 40, "validation": 8, "test": 8}
    assert splits["test"][0].where == "hf://datasets/tester/team-chats/test.jsonl:1"


def test_missing_hub_dataset_says_what_to_check(fake_hub, tmp_path):
    error = rejection(
        "tester/no-such-chats", endpoint=fake_hub.url, token=HUB_TOKEN, cache_dir=str(tmp_path / "cache")
    )

    assert [str(p) for p in error.problems] == [
        "hf://datasets/tester/no-such-chats: dataset: not a local path, and no such dataset on the Hub "
        "(check the name; a private dataset needs HF_TOKEN with read access)"
    ]
