"""The job config: one JSON file of snake_case keys that says everything about a training run.

Written by the `config` role on the instance (and usable by hand):

    {"run_id": "lt-20261129-1200", "dataset": "me/my-chats", "hub_repo": "me/llama3-chats"}

Every other key has a default. Secrets never live here: `HF_TOKEN` and `WANDB_API_KEY` come from
the environment.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHAT_TEMPLATES = ("auto", "llama-3", "llama-3.1")
LONG_CONVERSATION_POLICIES = ("drop", "fail", "truncate")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
# The export stage owns the exact list of quantizations; here only the shape is checked.
EXPORT_EXAMPLES = ("gguf-q8_0", "gguf-q4_k_m", "gguf-f16")
_EXPORT_FORMAT = re.compile(r"^gguf-[a-z0-9_]+$")
_QUANTIZED_SUFFIX = "-bnb-4bit"
# Hub repo ids: "name" or "owner/name", letters, digits, "-", "_", "." (no "--" or "..").
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


class JobConfigError(ValueError):
    """A job config that cannot run; the message names the file and the field."""


@dataclass
class JobConfig:
    run_id: str
    dataset: str
    base_model: str = "unsloth/llama-3-8b-Instruct"
    # The unquantized base the adapter is merged into; None: base_model without "-bnb-4bit".
    merge_base_model: str | None = None
    chat_template: str = "auto"
    dataset_revision: str | None = None
    max_seq_length: int = 2048
    long_conversations: str = "drop"
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    # None: 4-bit on CUDA, full precision elsewhere.
    load_in_4bit: bool | None = None
    packing: bool = True
    num_epochs: float = 1.0
    # -1: as many steps as num_epochs takes.
    max_steps: int = -1
    batch_size: int = 2
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    warmup_steps: int = 5
    weight_decay: float = 0.001
    lr_scheduler: str = "linear"
    # None: about five evaluations per run.
    eval_steps: int | None = None
    # None: save (and push) a checkpoint at every evaluation.
    save_steps: int | None = None
    logging_steps: int = 1
    seed: int = 3407
    # None: outputs/<run_id>.
    output_dir: str | None = None
    # None: nothing is pushed; outputs stay in output_dir.
    hub_repo: str | None = None
    hub_private: bool = True
    push_checkpoints: bool = True
    # None: no W&B at all.
    wandb_project: str | None = "llama-trainer"
    wandb_run_name: str | None = None
    export: list[str] = field(default_factory=list)
    # None: the first three user prompts of the test split.
    sample_prompts: list[str] | None = None
    # None: adamw_8bit on CUDA with bitsandbytes, adamw_torch elsewhere.
    optim: str | None = None

    def __post_init__(self) -> None:
        if self.merge_base_model is None:
            self.merge_base_model = _unquantized_name(self.base_model)
        if self.output_dir is None:
            self.output_dir = str(Path("outputs") / self.run_id)
        if self.wandb_run_name is None:
            self.wandb_run_name = self.run_id

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _unquantized_name(model: str) -> str:
    return model[: -len(_QUANTIZED_SUFFIX)] if model.endswith(_QUANTIZED_SUFFIX) else model


# What each key accepts, checked before the dataclass sees the value.
_NULLABLE = {
    "merge_base_model",
    "dataset_revision",
    "load_in_4bit",
    "eval_steps",
    "save_steps",
    "output_dir",
    "hub_repo",
    "wandb_project",
    "wandb_run_name",
    "sample_prompts",
    "optim",
}
_TYPES: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "dataset": (str,),
    "base_model": (str,),
    "merge_base_model": (str,),
    "chat_template": (str,),
    "dataset_revision": (str,),
    "max_seq_length": (int,),
    "long_conversations": (str,),
    "lora_r": (int,),
    "lora_alpha": (int, float),
    "lora_dropout": (int, float),
    "lora_target_modules": (list,),
    "load_in_4bit": (bool,),
    "packing": (bool,),
    "num_epochs": (int, float),
    "max_steps": (int,),
    "batch_size": (int,),
    "gradient_accumulation_steps": (int,),
    "learning_rate": (int, float),
    "warmup_steps": (int,),
    "weight_decay": (int, float),
    "lr_scheduler": (str,),
    "eval_steps": (int,),
    "save_steps": (int,),
    "logging_steps": (int,),
    "seed": (int,),
    "output_dir": (str,),
    "hub_repo": (str,),
    "hub_private": (bool,),
    "push_checkpoints": (bool,),
    "wandb_project": (str,),
    "wandb_run_name": (str,),
    "export": (list,),
    "sample_prompts": (list,),
    "optim": (str,),
}
_CHOICES = {
    "chat_template": CHAT_TEMPLATES,
    "long_conversations": LONG_CONVERSATION_POLICIES,
    "lr_scheduler": LR_SCHEDULERS,
}
_AT_LEAST_ONE = {"max_seq_length", "lora_r", "batch_size", "gradient_accumulation_steps", "logging_steps",
                 "eval_steps", "save_steps"}
_AT_LEAST_ZERO = {"warmup_steps", "weight_decay", "seed"}
_POSITIVE = {"lora_alpha", "num_epochs", "learning_rate"}


def load_job_config(path: str | Path) -> JobConfig:
    """Read and check a job config file; JobConfigError names the file and the field at fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JobConfigError(f"{path}: cannot read the job config ({exc.strerror or exc})") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobConfigError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise JobConfigError(f"{path}: the job config must be a JSON object of keys, not {_kind(raw)}")
    return job_config_from_dict(raw, source=str(path))


def job_config_from_dict(raw: dict[str, Any], source: str = "job config") -> JobConfig:
    known = [f.name for f in dataclasses.fields(JobConfig)]
    for key in raw:
        if key not in known:
            raise JobConfigError(f"{source}: unknown key {key!r}{_did_you_mean(key, known)}")
    for key in ("run_id", "dataset"):
        if raw.get(key) in (None, ""):
            raise JobConfigError(f"{source}: {key!r} is required")
    for key, value in raw.items():
        _check_value(source, key, value)
    config = JobConfig(**raw)
    _check_combinations(source, config)
    return config


def _did_you_mean(key: str, known: list[str]) -> str:
    # Users write the CLI's kebab-case; compare in one spelling.
    normalized = key.replace("-", "_").lower()
    if normalized in known:
        return f"; did you mean {normalized!r}?"
    close = difflib.get_close_matches(normalized, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _check_value(source: str, key: str, value: Any) -> None:
    where = f"{source}: {key!r}"
    if value is None:
        if key in _NULLABLE:
            return
        raise JobConfigError(f"{where} cannot be null")
    allowed = _TYPES[key]
    # JSON true/false are Python bools, which are also ints: keep them apart.
    if isinstance(value, bool) and bool not in allowed:
        raise JobConfigError(f"{where} must be {_expected(allowed)}, got {json.dumps(value)}")
    if not isinstance(value, allowed):
        raise JobConfigError(f"{where} must be {_expected(allowed)}, got {_kind(value)} {json.dumps(value)}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise JobConfigError(f"{where} must be one of {', '.join(_CHOICES[key])}; got {value!r}")
    if key in _AT_LEAST_ONE and value < 1:
        raise JobConfigError(f"{where} must be at least 1, got {value}")
    if key in _AT_LEAST_ZERO and value < 0:
        raise JobConfigError(f"{where} must be 0 or more, got {value}")
    if key in _POSITIVE and value <= 0:
        raise JobConfigError(f"{where} must be greater than 0, got {value}")
    if key == "lora_dropout" and not 0 <= value < 1:
        raise JobConfigError(f"{where} must be in [0, 1), got {value}")
    if key == "max_steps" and (value == 0 or value < -1):
        raise JobConfigError(f"{where} must be a positive number of steps, or -1 to train num_epochs; got {value}")
    if key in {"run_id", "dataset", "base_model", "merge_base_model", "output_dir"} and not value.strip():
        raise JobConfigError(f"{where} cannot be empty")
    if key == "run_id" and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise JobConfigError(f"{where} may hold only letters, digits, '.', '_' and '-'; got {value!r}")
    if key == "hub_repo" and (not _REPO_ID.match(value) or "--" in value or ".." in value):
        raise JobConfigError(f"{where} must be a Hub repo id like 'your-name/llama3-chats'; got {value!r}")
    if key in {"lora_target_modules", "export", "sample_prompts"}:
        bad = [item for item in value if not isinstance(item, str) or not item.strip()]
        if bad:
            raise JobConfigError(f"{where} must be a list of non-empty strings; got {json.dumps(bad[0])}")
    if key == "lora_target_modules" and not value:
        raise JobConfigError(f"{where} must name at least one module, e.g. {list(DEFAULT_TARGET_MODULES)}")
    if key == "export":
        for item in value:
            if not _EXPORT_FORMAT.match(item):
                raise JobConfigError(
                    f"{where}: unknown format {item!r}; formats look like {', '.join(EXPORT_EXAMPLES)}"
                )


def _expected(allowed: tuple[type, ...]) -> str:
    if allowed == (int, float):
        return "a number"
    return {str: "a string", int: "a whole number", bool: "true or false", list: "a list"}[allowed[0]]


def _check_combinations(source: str, config: JobConfig) -> None:
    if config.merge_base_model.endswith(_QUANTIZED_SUFFIX):
        raise JobConfigError(
            f"{source}: 'merge_base_model' {config.merge_base_model!r} is a 4-bit checkpoint; merging into it "
            "changes the model's outputs. Name the 16-bit base (e.g. 'unsloth/llama-3-8b-Instruct')."
        )
