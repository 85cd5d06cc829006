"""`lt train --local`: the same training job on this machine, no cloud and no accounts.

Without --config it is the offline quickstart: examples/quickstart.json's settings, the example
chats, and a tiny Llama 3-style base model built on the spot when the configured one is missing,
so the whole pipeline (data checks, LoRA training, merge) finishes on a laptop CPU in about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from wrapper import records as run_records
from wrapper.progress import Progress, format_duration
from wrapper.project import examples_dir, playbook, project_dir, trainer_config
from wrapper.settings import load_settings

QUICKSTART = "quickstart.json"


def train_local(config: str | None, set_options, flags: dict, extra_vars: dict | None = None) -> dict:
    quickstart = not (config or os.environ.get("LT_CONFIG"))
    config_file = Path(config or os.environ.get("LT_CONFIG") or examples_dir() / QUICKSTART)
    settings = load_settings(str(config_file), flags, set_options)
    for warning in settings.warnings:
        click.secho(f"Warning: {warning}", fg="yellow", err=True)
    values = dict(settings.values)
    values["dataset"] = resolve_dataset(values.get("dataset"), config_file)
    values["base_model"] = resolve_base_model(values["base_model"], values["dataset"], quickstart)

    run_id = run_records.new_run_id()
    job = trainer_config().job_config(values, run_id)
    output_dir = Path(job["output_dir"]).resolve()
    job["output_dir"] = str(output_dir)
    records = run_records.Records()
    records.create(run_id, "local", "training", settings=_public(values), launched_at=None,
                   outputs={"output_dir": str(output_dir)})
    what = "quickstart" if quickstart else str(config_file)
    click.echo(f"Run {run_id}: training locally ({what}), outputs in {_relative(output_dir)}/", err=True)

    started = time.monotonic()
    progress = Progress()
    try:
        if playbook("local").is_file():
            ok = _run_local_playbook(values, job, settings, progress, extra_vars or {})
        else:
            ok = _run_job(job, output_dir, {**settings.secrets_env(), **_offline_env(job)}, progress)
    except KeyboardInterrupt:
        progress.finish()
        records.update(run_id, status="interrupted", message="interrupted by the user")
        raise click.ClickException(f"run {run_id} interrupted; partial outputs in {_relative(output_dir)}/") from None
    result = _read_result(output_dir)
    outputs = {"output_dir": str(output_dir), "result": result}
    took = format_duration(time.monotonic() - started)
    if not ok or not result or result.get("status") not in (None, "succeeded", "success", "ok"):
        progress.show_tail()
        message = "; ".join(progress.failures) or "the training job failed"
        records.update(run_id, status="failed", message=message, outputs=outputs)
        raise click.ClickException(f"run {run_id} failed after {took}: {message} "
                                   f"(full log: {_relative(output_dir / 'train.log')})")
    records.update(run_id, status="succeeded", outputs=outputs)
    merged = output_dir / "merged"
    click.echo(f"✓ run {run_id} finished in {took}: merged model in {_relative(merged)}/"
               + _losses(result))
    return records.get(run_id)


def resolve_dataset(dataset: str | None, config_file: Path) -> str:
    """A relative local dataset path is looked up in the current directory, then next to the config."""
    if not dataset:
        raise click.ClickException("no dataset: set \"dataset\" in the config file, --dataset or $LT_DATASET")
    path = Path(dataset).expanduser()
    if path.exists():
        return str(path.resolve())
    beside_config = config_file.parent / path
    if not path.is_absolute() and beside_config.exists():
        return str(beside_config.resolve())
    return dataset  # a Hub dataset repo id


def resolve_base_model(base_model: str, dataset: str, quickstart: bool) -> str:
    path = Path(base_model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if not quickstart or not _looks_like_path(base_model):
        return base_model
    click.echo(f"Base model {base_model} not found: building a tiny Llama 3-style model there "
               "(random weights: it proves the pipeline, it does not chat well).", err=True)
    build_tiny_model(path, dataset)
    return str(path.resolve())


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.count("/") != 1


def build_tiny_model(path: Path, dataset: str) -> None:
    texts = _dataset_texts(dataset)
    code = ("import json, sys\n"
            "from trainjob.tiny import write_tiny_base_model\n"
            "write_tiny_base_model(sys.argv[1], json.loads(sys.argv[2]) or None)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(texts)],
                            env=_job_env({}), capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(f"could not build the tiny base model in {path}:\n"
                                   + "\n".join(result.stderr.strip().splitlines()[-10:]))


def _dataset_texts(dataset: str) -> list[str]:
    """Message texts of a local dataset, so the tiny tokenizer learns the words it will see."""
    root = Path(dataset)
    files = sorted(root.glob("*.jsonl")) if root.is_dir() else [root] if root.is_file() else []
    texts = []
    for file in files:
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            for message in record.get("chats") or record.get("messages") or []:
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    texts.append(message["content"])
    return texts


def _job_env(secrets: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # A checkout's job code is importable from the project root; a wheel installs it as a package.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project_dir()), env.get("PYTHONPATH")]))
    env.update(secrets)
    return env


def _offline_env(job: dict) -> dict[str, str]:
    """Nothing to download or push: keep the Hub client from trying the network at all."""
    local = all(Path(job[name]).exists() for name in ("base_model", "dataset"))
    return {"HF_HUB_OFFLINE": "1"} if local and not job.get("hub_repo") else {}


def _run_job(job: dict, output_dir: Path, secrets: dict[str, str], progress: Progress) -> bool:
    output_dir.mkdir(parents=True, exist_ok=True)
    job_file = output_dir / "job.json"
    job_file.write_text(json.dumps(job, indent=2), encoding="utf-8")
    log_path = output_dir / "train.log"
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen([sys.executable, "-m", "trainjob.train", "--config", str(job_file)],
                                   stdout=subprocess.PIPE, stderr=log, text=True, env=_job_env(secrets))
        try:
            for line in process.stdout:
                progress.job_line(line)
        finally:
            process.stdout.close()
            code = process.wait()
    progress.finish()
    if code != 0:
        progress.tail.extend(_last_lines(log_path, 30))
    return code == 0


def _run_local_playbook(values: dict, job: dict, settings, progress: Progress, extra_vars: dict) -> bool:
    """playbooks/local.yml: the same roles as on an instance, against this machine."""
    from wrapper.runner import run_playbook

    output_dir = Path(job["output_dir"])
    extravars = {
        **_public(values),
        "run_id": job["run_id"],
        # The job writes straight into ./outputs/<run>/; the result and log are fetched beside it.
        "output_dir": str(output_dir),
        "train_fetch_dir": str(output_dir.parent),
        "train_poll_interval": 2,
        "train_tail_lines": 100,
        "job_env": _offline_env(job),
        # Absolute: "~" would mean $HOME to some modules and the password database's home to others.
        "trainer_dir": str(local_trainer_dir()),
        **extra_vars,
    }
    result = run_playbook("local", extravars, secrets=settings.secrets_env(), progress=progress)
    if not result.ok:
        progress.tail.extend(_last_lines(output_dir / "train.log", 30))
    return result.ok


def local_trainer_dir() -> Path:
    """Where local runs keep the job code, venv and run folders (as an instance's ~/llama-trainer)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "llama-trainer"


def _read_result(output_dir: Path) -> dict | None:
    try:
        return json.loads((output_dir / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _last_lines(path: Path, count: int) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-count:]
    except OSError:
        return []


def _public(values: dict) -> dict:
    secret = trainer_config().SECRET_VARS
    return {var: value for var, value in values.items() if var not in secret}


def _losses(result: dict) -> str:
    parts = [f"{name.replace('_', ' ')} {result[name]:.4f}" for name in ("train_loss", "eval_loss", "test_loss")
             if isinstance(result.get(name), int | float)]
    return f" ({', '.join(parts)})" if parts else ""


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
