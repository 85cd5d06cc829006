"""`lt config init | show | check`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from wrapper.project import trainer_config


def template() -> dict:
    """Every key with its default, secrets empty: what `config init` writes."""
    table = trainer_config()
    return {key.name: (None if key.secret else table.defaults()[key.var]) for key in table.KEYS}


def init(path: str, force: bool) -> None:
    target = Path(path)
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists; use --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    if force and target.exists():
        target.unlink()
    # Created 0600 from the start: the file is meant to hold API keys.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(template(), handle, indent=2)
        handle.write("\n")
    click.echo(f"Wrote {target} (mode 600). Fill in lambda-cloud-api-key, lambda-cloud-ssh-key-name, "
               f"dataset and hub-repo, then run `lt config check`.")


def show(settings, as_json: bool) -> None:
    table = trainer_config()
    shown = table.redact(settings.values)
    rows = [{"key": key.name, "value": shown[key.var], "source": settings.sources[key.var]}
            for key in table.KEYS]
    if as_json:
        click.echo(json.dumps({"config_file": str(settings.config_path),
                               "config_file_exists": settings.config_exists,
                               "settings": {row["key"]: row["value"] for row in rows},
                               "sources": {row["key"]: row["source"] for row in rows}}, indent=2))
        return
    exists = "" if settings.config_exists else " (not found: defaults and environment only)"
    click.echo(f"config file: {settings.config_path}{exists}")
    width = max(len(row["key"]) for row in rows)
    for row in rows:
        click.echo(f"{row['key']:<{width}}  {json.dumps(row['value']):<40}  {row['source']}")


def problems(settings, local: bool) -> list[str]:
    """What stops a run with these settings, each with the fix."""
    found = []
    needed = ["dataset"] if local else ["dataset", "lambda-cloud-api-key", "lambda-cloud-ssh-key-name"]
    for name in needed:
        try:
            trainer_config().require(settings.values, name)
        except trainer_config().ConfigError as error:
            found.append(str(error))
    dataset = settings.get("dataset")
    if dataset and _looks_local(dataset) and not Path(dataset).expanduser().exists():
        found.append(f"dataset: {dataset} does not exist (a local .jsonl file or folder, or a Hub repo id)")
    if not local:
        identity = Path(settings.get("ssh_identity_file", "")).expanduser()
        if not identity.is_file():
            found.append(f"lambda-cloud-ssh-identity-file: {identity} not found; set it to the private key "
                         f"that matches lambda-cloud-ssh-key-name")
        if settings.get("hub_repo") and not settings.get("hf_token"):
            found.append("hugging-face--access-token: needed to push to hub-repo; set it or $HF_TOKEN")
    return found


def _looks_local(dataset: str) -> bool:
    return dataset.startswith((".", "/", "~")) or dataset.endswith(".jsonl") or Path(dataset).exists()


def check(settings, local: bool) -> int:
    found = problems(settings, local)
    where = settings.config_path if settings.config_exists else "defaults and environment"
    if not found:
        click.echo(f"✓ settings from {where} are complete for {'a local' if local else 'a cloud'} run")
        return 0
    click.echo(f"✗ settings from {where}:", err=True)
    for problem in found:
        click.echo(f"  - {problem}", err=True)
    return 1
