"""Helpers for tests that run the training job: a tiny base model and chats on the fake Hub, a job
config, and the job as a subprocess whose stdout events are read line by line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.hub_support import HUB_USER, REPO_ROOT

BASE_REPO = f"{HUB_USER}/tiny-llama-3-instruct"
DATASET_REPO = f"{HUB_USER}/tiny-chats"

_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
_ANIMALS = ["cat", "dog", "horse", "spider", "bird", "fish", "mouse", "lion"]


def make_chats(count: int, seed: int) -> list[dict]:
    """Short two-turn chats in the seed's format, with a pattern a tiny model can pick up fast."""
    rng = random.Random(seed)
    chats = []
    for _ in range(count):
        animal, colour = rng.choice(_ANIMALS), rng.choice(_COLOURS)
        turns = [
            {"role": "user", "content": f"What colour is the {animal}?"},
            {"role": "assistant", "content": f"The {animal} is {colour}."},
        ]
        if rng.random() < 0.3:
            turns.insert(0, {"role": "system", "content": "Answer in one short sentence."})
        chats.append({"chats": turns})
    return chats


def chat_splits() -> dict[str, list[dict]]:
    return {"train": make_chats(48, 1), "validation": make_chats(8, 2), "test": make_chats(8, 3)}


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_tiny_base(out_dir: Path, splits: dict[str, list[dict]]) -> Path:
    """A tiny Llama 3-style base whose tokenizer is trained on the chats, with the generation config
    Meta first shipped (eos = <|end_of_text|> only): the job must add <|eot_id|> itself."""
    from trainjob.tiny import END_OF_TEXT, write_tiny_base_model

    texts = [m["content"] for rows in splits.values() for row in rows for m in row["chats"]]
    write_tiny_base_model(out_dir, texts=texts, vocab_size=400)
    generation = json.loads((out_dir / "generation_config.json").read_text())
    tokenizer = json.loads((out_dir / "tokenizer.json").read_text())
    end_of_text = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == END_OF_TEXT)
    generation["eos_token_id"] = end_of_text
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_dir


def upload_base_and_chats(hub, tmp_path: Path) -> dict[str, list[dict]]:
    """Put the tiny base model and a three-split chats dataset on the fake Hub."""
    splits = chat_splits()
    base = write_tiny_base(tmp_path / "tiny-base", splits)
    hub.add_repo(BASE_REPO, base)
    hub.add_repo(DATASET_REPO, {f"{name}.jsonl": jsonl(rows) for name, rows in splits.items()},
                 repo_type="dataset")
    return splits


def job_config(tmp_path: Path, **overrides) -> dict:
    config = {
        "run_id": "tiny-e2e",
        "base_model": BASE_REPO,
        "dataset": DATASET_REPO,
        "max_seq_length": 256,
        "max_steps": 16,
        "batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 0.01,
        "warmup_steps": 1,
        "eval_steps": 4,
        "save_steps": 4,
        "lora_r": 8,
        "lora_alpha": 32,
        "output_dir": str(tmp_path / "outputs"),
        "wandb_project": "llama-trainer-tests",
    }
    config.update(overrides)
    return config


def write_job_config(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job_config(tmp_path, **overrides), indent=2))
    return path


def job_env(hub_env: dict, tmp_path: Path) -> dict:
    env = dict(hub_env)
    env.pop("WANDB_API_KEY", None)
    env.update({"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-dir"), "WANDB_SILENT": "true"})
    (tmp_path / "wandb-dir").mkdir(exist_ok=True)
    return env


@dataclass
class JobRun:
    returncode: int
    events: list[dict]
    stderr: str
    seconds: float
    non_json: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    def one(self, kind: str) -> dict:
        found = self.of(kind)
        assert len(found) == 1, f"expected one {kind!r} event, got {found}\n{self.stderr[-4000:]}"
        return found[0]


def start_job(config_path: Path, env: dict, cwd: Path, *extra: str) -> subprocess.Popen:
    """The job as a subprocess; stdout is a pipe of events, stderr goes to `proc.log_path`."""
    log_path = cwd / f"job-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trainjob.train", "--config", str(config_path), *extra],
            cwd=cwd, env={**env, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE, stderr=log, text=True,
        )
    proc.log_path = log_path
    return proc


def read_events(proc: subprocess.Popen, stop_when=None) -> tuple[list[dict], list[str]]:
    """Read stdout events until the job exits, or until `stop_when(event)` is true."""
    events, non_json = [], []
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            non_json.append(line)
            continue
        events.append(event)
        if stop_when is not None and stop_when(event):
            break
    return events, non_json


def run_job(config_path: Path, env: dict, cwd: Path, *extra: str, timeout: float = 300) -> JobRun:
    started = time.monotonic()
    proc = start_job(config_path, env, cwd, *extra)
    try:
        events, non_json = read_events(proc)
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return JobRun(proc.returncode, events, proc.log_path.read_text(), time.monotonic() - started, non_json)
