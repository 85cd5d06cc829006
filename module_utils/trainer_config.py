"""The one table of llama-trainer configuration keys, and how values are read and merged.

Users write kebab-case keys (the seed's, verbatim) in ``config/trainer.json``; Ansible variables cannot
contain dashes, so every key also has a snake_case variable name. This module is the only place that
mapping lives: ``lt`` imports it by path, the playbooks reach it through the ``trainer_config`` module.
Pure standard library, so it runs on the controller and in an Ansible module alike.
"""

from __future__ import annotations

import difflib
import json
import os
import stat
from dataclasses import dataclass
from typing import Any

LORA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Key:
    name: str  # kebab-case, as users write it
    var: str  # snake_case Ansible variable / job config key
    type: str  # str | int | float | bool | list | path
    default: Any = None
    help: str = ""
    scope: str = "run"  # cloud: controller/instance settings; job: copied into the job config
    secret: bool = False
    env: str | None = None
    choices: tuple = ()
    nullable: bool = True


def _k(name, type_, default=None, help_="", scope="run", var=None, **kw) -> Key:
    return Key(name=name, var=var or name.replace("-", "_"), type=type_, default=default, help=help_,
               scope=scope, **kw)


KEYS: list[Key] = [
    # --- Lambda Cloud (the seed's keys) ---
    _k("lambda-cloud-api-key", "str", None, "Lambda Cloud API key.", "cloud", var="lambda_api_key",
       secret=True, env="LAMBDA_API_KEY"),
    _k("lambda-cloud-api-url", "str", "https://cloud.lambda.ai/api/v1", "Lambda Cloud API base URL.",
       "cloud", var="lambda_api_url", env="LAMBDA_API_URL"),
    _k("lambda-cloud-ssh-identity-file", "path", "~/.ssh/id_ed25519",
       "Private key used to SSH into the instance (its .pub is registered if the key name is unknown).",
       "cloud", var="ssh_identity_file", env="LAMBDA_SSH_IDENTITY_FILE"),
    _k("lambda-cloud-ssh-key-name", "str", None, "Name of the SSH key registered in Lambda Cloud.",
       "cloud", var="ssh_key_name", env="LAMBDA_SSH_KEY_NAME"),
    _k("lambda-cloud-instance-name-prefix", "str", "lt",
       "Prefix of every instance name; `lt status` and `lt down --all` act on this prefix.", "cloud",
       var="instance_name_prefix"),
    _k("instance-types", "list", ["gpu_1x_h100_sxm5", "gpu_1x_h100_pcie", "gpu_1x_a100_sxm4"],
       "Instance types in order of preference (capacity failover).", "cloud"),
    _k("regions", "list", [], "Regions in order of preference; empty means any region with capacity.",
       "cloud"),
    _k("image-family", "str", "lambda-stack-24-04",
       "Image family to boot: Lambda Stack on Ubuntu 24.04 by default, as the pinned training stack "
       "needs Python 3.11 or newer (Ubuntu 22.04's lambda-stack-22-04 has 3.10).", "cloud"),
    _k("file-systems", "list", [], "Lambda file systems to attach.", "cloud"),
    _k("boot-timeout", "int", 1200, "Seconds to wait for the instance to be active and reachable.", "cloud"),
    _k("max-hours", "float", 8.0, "Hard time budget: the watchdog terminates the instance after this.",
       "cloud"),
    _k("max-cost", "float", None, "Hard cost budget in dollars, enforced by the watchdog.", "cloud"),
    _k("watchdog", "bool", True,
       "Run the on-instance watchdog (puts the Lambda API key, 0600, on the instance).", "cloud"),
    _k("idle-minutes", "int", 30,
       "Watchdog: terminate when no training job has run for this long (never while a trained model "
       "exists only on the instance).", "cloud"),
    # --- Hugging Face and W&B ---
    _k("hugging-face--access-token", "str", None, "Hugging Face token (write access to hub-repo).",
       "cloud", var="hf_token", secret=True, env="HF_TOKEN"),
    _k("weights-and-biases-api-key", "str", None, "Weights & Biases API key (offline run when unset).",
       "cloud", var="wandb_api_key", secret=True, env="WANDB_API_KEY"),
    # --- The training job (copied into the job config) ---
    _k("base-model", "str", "unsloth/llama-3-8b-Instruct", "Base model: Hub repo id or local directory.",
       "job", nullable=False),
    _k("merge-base-model", "str", None,
       "16-bit model the adapter is merged into (default: base-model without -bnb-4bit).", "job"),
    _k("chat-template", "str", "auto", "Chat template family.", "job",
       choices=("auto", "llama-3", "llama-3.1"), nullable=False),
    _k("dataset", "str", None, "Chats dataset: Hub dataset repo id, or a local .jsonl file or folder.",
       "job", env="LT_DATASET"),
    _k("dataset-revision", "str", None, "Dataset revision (branch, tag or commit).", "job"),
    _k("max-seq-length", "int", 2048, "Longest conversation in tokens.", "job", nullable=False),
    _k("long-conversations", "str", "drop",
       "Conversations over max-seq-length: drop (with a count), fail, or truncate (keeps what fits).",
       "job", choices=("drop", "fail", "truncate"), nullable=False),
    _k("lora-r", "int", 16, "LoRA rank.", "job", nullable=False),
    _k("lora-alpha", "int", 16, "LoRA alpha.", "job", nullable=False),
    _k("lora-dropout", "float", 0.0, "LoRA dropout.", "job", nullable=False),
    _k("lora-target-modules", "list", LORA_PROJECTIONS, "Modules LoRA adapts.", "job", nullable=False),
    _k("load-in-4bit", "bool", None, "QLoRA: load the base in 4 bits (default: on with CUDA).", "job"),
    _k("packing", "bool", True, "Pack conversations (per-document attention).", "job", nullable=False),
    _k("num-epochs", "float", 1.0, "Epochs (ignored when max-steps > 0).", "job", nullable=False),
    _k("max-steps", "int", -1, "Optimizer steps; -1 derives them from num-epochs.", "job", nullable=False),
    _k("batch-size", "int", 2, "Per-device batch size.", "job", nullable=False),
    _k("gradient-accumulation-steps", "int", 4, "Gradient accumulation steps.", "job", nullable=False),
    _k("learning-rate", "float", 2e-4, "Peak learning rate.", "job", nullable=False),
    _k("warmup-steps", "int", 5, "Warmup steps.", "job", nullable=False),
    _k("weight-decay", "float", 0.001, "Weight decay.", "job", nullable=False),
    _k("lr-scheduler", "str", "linear", "Learning-rate schedule.", "job", nullable=False),
    _k("eval-steps", "int", None, "Evaluate every N steps (default: about 5 evaluations a run).", "job"),
    _k("save-steps", "int", None, "Checkpoint every N steps (default: eval-steps).", "job"),
    _k("logging-steps", "int", 1, "Log (and print progress) every N steps.", "job", nullable=False),
    _k("seed", "int", 3407, "Random seed.", "job", nullable=False),
    _k("optim", "str", None, "Optimizer (default: adamw_8bit on CUDA, adamw_torch on CPU).", "job"),
    _k("hub-repo", "str", None, "Model repo to push to (none: keep outputs local only).", "job"),
    _k("hub-private", "bool", True, "Create the model repo private.", "job", nullable=False),
    _k("push-checkpoints", "bool", True, "Push checkpoints to the model repo (for resume).", "job",
       nullable=False),
    _k("wandb-project", "str", "llama-trainer", "W&B project (null disables W&B).", "job"),
    _k("wandb-run-name", "str", None, "W&B run name (default: the run id).", "job"),
    _k("export", "list", ["gguf-q8_0"], "Exports after training: gguf-f16, gguf-q8_0.", "job"),
    _k("sample-prompts", "list", None,
       "Prompts for the model card's sample generations (default: 3 from the data; [] for none).", "job"),
    _k("output-dir", "str", None, "Where the job writes outputs (default: outputs/<run-id>).", "job"),
]

# The seed spells the Hugging Face key with a double dash; the corrected spelling is accepted too.
ALIASES = {"hugging-face-access-token": "hugging-face--access-token"}

BY_NAME = {key.name: key for key in KEYS}
BY_VAR = {key.var: key for key in KEYS}
SECRET_VARS = frozenset(key.var for key in KEYS if key.secret)
JOB_VARS = tuple(key.var for key in KEYS if key.scope == "job")
# Keys of the job config that are not user settings: set by the run itself.
JOB_ONLY_FIELDS = ("run_id",)


class ConfigError(ValueError):
    """A bad configuration value; str() names the source (file:line), the key and the fix."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 key: str | None = None):
        self.source, self.line, self.key = source, line, key
        where = source or ""
        if source and line:
            where = f"{source}:{line}"
        prefix = ": ".join(part for part in (where, key) if part)
        super().__init__(f"{prefix}: {message}" if prefix else message)


def canonical_name(name: str) -> str:
    """The table's kebab-case name for a key written as kebab-case, snake_case or an alias."""
    if name in BY_NAME:
        return name
    if name in ALIASES:
        return ALIASES[name]
    if name in BY_VAR:
        return BY_VAR[name].name
    return name


def closest_key(name: str) -> str | None:
    candidates = list(BY_NAME) + list(ALIASES)
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return match[0] if match else None


def _key_line(text: str, name: str) -> int | None:
    """Line of ``"name"`` in the JSON text, so errors point at it (json keeps no positions)."""
    needle = json.dumps(name)
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    return None


def coerce(key: Key, value: Any, *, source: str | None = None, line: int | None = None) -> Any:
    """Convert a value (from JSON, an env var or a flag) to the key's type, or raise ConfigError."""

    def fail(why: str):
        raise ConfigError(why, source=source, line=line, key=key.name)

    if value is None:
        if not key.nullable:
            fail("must not be null")
        return None
    if key.type in ("str", "path"):
        if not isinstance(value, str):
            fail(f"expected a string, got {json.dumps(value)}")
        value = value.strip()
        if key.choices and value not in key.choices:
            fail(f"{value!r} is not one of {', '.join(key.choices)}")
        return os.path.expanduser(value) if key.type == "path" else value
    if key.type == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        fail(f"expected true or false, got {json.dumps(value)}")
    if key.type in ("int", "float"):
        if isinstance(value, bool):
            fail(f"expected a number, got {json.dumps(value)}")
        try:
            number = float(value) if key.type == "float" else int(value)
        except (TypeError, ValueError):
            fail(f"expected {'a number' if key.type == 'float' else 'a whole number'}, got {json.dumps(value)}")
        if key.type == "int" and isinstance(value, float) and not value.is_integer():
            fail(f"expected a whole number, got {value}")
        return number
    if key.type == "list":
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            fail(f"expected a list of strings, got {json.dumps(value)}")
        return value
    raise AssertionError(f"unknown key type {key.type}")


def normalize(raw: dict[str, Any], *, source: str, text: str | None = None) -> dict[str, Any]:
    """Check a mapping of user keys (kebab-case, or snake_case vars) and return {var: value}."""
    values: dict[str, Any] = {}
    for name, value in raw.items():
        line = _key_line(text, name) if text else None
        canonical = canonical_name(name)
        if canonical not in BY_NAME:
            hint = closest_key(name)
            fix = f"; did you mean {hint!r}?" if hint else ""
            raise ConfigError(f"unknown key{fix}", source=source, line=line, key=name)
        key = BY_NAME[canonical]
        values[key.var] = coerce(key, value, source=source, line=line)
    return values


def load_config_file(path: str) -> dict[str, Any]:
    """Read a trainer.json and return {var: value}; errors name the file, line and key."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError("file not found; `lt config init` writes one", source=path) from None
    try:
        raw = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as error:
        raise ConfigError(f"invalid JSON: {error.msg} (column {error.colno})", source=path,
                          line=error.lineno) from None
    if not isinstance(raw, dict):
        raise ConfigError("the file must hold one JSON object of \"key\": value pairs", source=path)
    return normalize(raw, source=path, text=text)


def secret_file_warning(path: str) -> str | None:
    """A warning when a config file holding secrets can be read by group or others."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return (f"{path} holds secrets and is readable by group/others "
                f"(mode {stat.S_IMODE(mode):o}); run: chmod 600 {path}")
    return None


def from_environment(environ: dict[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    values = {}
    for key in KEYS:
        if key.env and environ.get(key.env):
            values[key.var] = coerce(key, environ[key.env], source=f"${key.env}")
    return values


def defaults() -> dict[str, Any]:
    return {key.var: (list(key.default) if isinstance(key.default, list) else key.default) for key in KEYS}


def resolve(*, file_values: dict[str, Any] | None = None, environ: dict[str, str] | None = None,
            flags: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge defaults < config file < environment < flags; return (values, source of each value)."""
    values, sources = defaults(), dict.fromkeys(BY_VAR, "default")
    layers = (("config file", file_values or {}), ("environment", from_environment(environ)),
              ("flag", {k: v for k, v in (flags or {}).items() if v is not None}))
    for layer_name, layer in layers:
        for var, value in layer.items():
            key = BY_VAR.get(var) or BY_NAME.get(canonical_name(var))
            if key is None:
                raise ConfigError(f"unknown setting {var!r}", source=layer_name)
            values[key.var] = value
            sources[key.var] = layer_name
    return values, sources


def job_config(values: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The job config file's content: the training keys, no secrets, plus the run id."""
    job = {var: values.get(var, BY_VAR[var].default) for var in JOB_VARS}
    job["run_id"] = run_id
    if not job.get("output_dir"):
        job["output_dir"] = f"outputs/{run_id}"
    return job


def require(values: dict[str, Any], *names: str) -> None:
    """Fail naming the first missing required key (kebab-case, as the user writes it)."""
    for name in names:
        key = BY_NAME[canonical_name(name)]
        if values.get(key.var) in (None, "", []):
            where = f"set \"{key.name}\" in config/trainer.json"
            if key.env:
                where += f", or ${key.env}"
            raise ConfigError(f"is required: {where}", key=key.name)


def redact(values: dict[str, Any]) -> dict[str, Any]:
    return {var: ("********" if var in SECRET_VARS and value else value) for var, value in values.items()}
