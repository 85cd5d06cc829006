"""`python3 -m trainjob.preflight`: every pre-training check with the tokenizer only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainjob import tiny
from trainjob.data import load_chats
from trainjob.preflight import main, run_preflight
from trainjob.template import build_training_dataset, prepare_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
CHATS = "tests/data/chats"
MALFORMED = "tests/data/malformed"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A saved Llama 3-style tokenizer next to weights that can't be read: preflight must not touch them."""
    folder = tmp_path_factory.mktemp("base-model")
    tokenizer = tiny.build_llama3_style_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder


def preflight(*args, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainjob.preflight", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
    )


def expected_loss_tokens(tokenizer_dir, max_length) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prepare_tokenizer(tokenizer)
    data = build_training_dataset(tokenizer, load_chats(CHATS)["train"], max_length)
    return data.stats.loss_tokens


def test_valid_set_prints_counts_tokens_and_a_marked_sample(tokenizer_dir):
    result = preflight("--dataset", CHATS, "--tokenizer", tokenizer_dir, "--max-seq-length", 256)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"  train          40 conversations  {CHATS}/train.jsonl" in out
    assert f"  validation      8 conversations  {CHATS}/validation.jsonl" in out
    assert f"  test            8 conversations  {CHATS}/test.jsonl" in out
    assert "eos <|eot_id|> = 521, pad <|reserved_special_token_0|> = 514" in out
    assert f"Training tokens in the loss: {expected_loss_tokens(tokenizer_dir, 256):,} of " in out
    # The sample is a multi-turn conversation with each reply and its <|eot_id|> marked.
    sample = out.split("the loss trains on the [[...]] part:\n", 1)[1]
    assert sample.count("[[") == 2
    assert "What's a good name for a cat?<|eot_id|><|start_header_id|>assistant<|end_header_id|>" in sample
    assert "[[Whiskers is a classic. Or Pepper, if it is a grey one.<|eot_id|>]]" in sample
    assert out.rstrip().endswith("OK: ready to train.")


def test_json_output_for_machines(tokenizer_dir):
    result = preflight("--dataset", CHATS, "--tokenizer", tokenizer_dir, "--max-seq-length", 48, "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["event"], report["ok"], report["problem_count"]) == ("preflight", True, 0)
    assert report["template"]["family"] == "llama-3"
    assert report["template"]["eos_id"] != report["template"]["pad_id"]
    train = report["splits"]["train"]
    assert train["conversations"] == 40
    assert train["over_length"] == train["dropped"] > 0
    assert train["kept"] == 40 - train["dropped"]
    assert report["loss_tokens"] == train["tokens"]["in_loss"] == expected_loss_tokens(tokenizer_dir, 48)
    assert train["files"] == [f"{CHATS}/train.jsonl"]
    assert "[[" in report["sample"]["text"] and report["sample"]["where"].startswith(f"{CHATS}/train.jsonl:")


def test_malformed_file_exits_2_with_the_error_lines(tokenizer_dir):
    path = f"{MALFORMED}/two_user_turns_in_a_row.jsonl"

    result = preflight("--dataset", path, "--tokenizer", tokenizer_dir, "--max-seq-length", 256)

    assert result.returncode == 2
    assert result.stdout.splitlines()[-2:] == [
        "1 problem(s); fix them and run again:",
        f'{path}:1: chats[1].role: expected "assistant" after "user" (turns alternate), got "user"',
    ]


def test_job_config_supplies_the_settings(tokenizer_dir, tmp_path):
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "run_id": "check-1",
                "dataset": str(REPO_ROOT / CHATS),
                "base_model": str(tokenizer_dir),
                "max_seq_length": 100,
                "long_conversations": "fail",
            }
        )
    )

    result = preflight("--config", job, "--json", cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    report = json.loads(result.stdout)
    assert (report["max_seq_length"], report["long_conversations"]) == (100, "fail")
    assert report["problem_count"] == report["splits"]["train"]["over_length"] > 0
    first = report["problems"][0]
    assert first["field"] == "chats"
    assert first["text"].startswith(f"{REPO_ROOT / CHATS}/train.jsonl:{first['line']}: chats: ")
    assert "over max_seq_length 100" in first["message"]


def test_flags_override_the_job_config(tokenizer_dir, tmp_path):
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps({"run_id": "check-2", "dataset": "nowhere/at-all", "base_model": str(tokenizer_dir)})
    )

    result = preflight("--config", job, "--dataset", REPO_ROOT / CHATS, "--json", cwd=tmp_path)

    assert result.returncode == 0, result.stdout
    assert json.loads(result.stdout)["max_seq_length"] == 2048


def test_bad_job_config_exits_2_naming_the_key(tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"run_id": "x", "dataset": CHATS, "max_seq_lenght": 10}))

    code = main(["--config", str(job)])

    assert code == 2
    err = capsys.readouterr().err
    assert "max_seq_lenght" in err and "max_seq_length" in err


def test_color_marks_the_trained_span_in_green(tokenizer_dir):
    result = preflight(
        "--dataset", CHATS, "--tokenizer", tokenizer_dir, "--max-seq-length", 256, "--color", "always"
    )

    assert result.returncode == 0
    assert (
        "\x1b[1;32mWhiskers is a classic. Or Pepper, if it is a grey one.<|eot_id|>\x1b[0m" in result.stdout
    )


def test_every_kind_of_problem_is_reported_in_one_run(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    good = {"chats": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    long = {"chats": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Yes."}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(long) + "\n{broken\n")
    (tmp_path / "validation.jsonl").write_text("")

    report = run_preflight(str(tmp_path), AutoTokenizer.from_pretrained(tokenizer_dir), 64, "fail")

    assert not report.ok
    assert [(Path(p.path).name, p.line, p.field) for p in report.problems] == [
        ("train.jsonl", 3, "json"),
        ("validation.jsonl", None, "split"),
        ("train.jsonl", 2, "chats"),
    ]
    assert report.splits["train"].kept == 1


def test_a_tokenizer_that_cannot_load_is_a_problem_not_a_crash(tmp_path, capsys):
    missing = tmp_path / "no-model"
    missing.mkdir()

    code = main(["--dataset", CHATS, "--tokenizer", str(missing), "--max-seq-length", "64"])

    assert code == 2
    assert f"{missing}: base_model: can't load its tokenizer" in capsys.readouterr().out


def test_missing_dataset_argument_is_explained(capsys):
    assert main(["--max-seq-length", "64"]) == 2
    assert "give --dataset and --tokenizer (or --config job.json)" in capsys.readouterr().err
