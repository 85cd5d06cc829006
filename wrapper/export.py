"""`lt export`: GGUF files and an Ollama Modelfile for a run's merged model (or any merged model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from wrapper import records as run_records
from wrapper.preflight import _environ


def merged_dir(target: str | None) -> Path:
    """A merged model folder from a path, a run id, or (no target) the latest local run."""
    if target and Path(target).is_dir():
        path = Path(target)
        if (path / "merged" / "config.json").is_file():
            path = path / "merged"
        if not (path / "config.json").is_file():
            raise click.ClickException(f"{path} holds no model (no config.json); give a run's merged/ folder")
        return path
    records = run_records.Records()
    try:
        run = records.find(target) if target else records.latest(kind="local")
    except run_records.RunNotFound:
        run = None
    if run is None:
        raise click.ClickException(f"no model folder or run {target!r}" if target else
                                   "no local run yet: give the merged model's folder")
    outputs = run.get("outputs") or {}
    candidates = [Path(outputs["output_dir"]) / "merged"] if outputs.get("output_dir") else []
    candidates.append(Path.cwd() / "outputs" / run["run_id"] / "merged")
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    repo = ((outputs.get("result") or {}).get("hub") or {}).get("repo")
    where = f"its model is on the Hub ({repo}): download it, then " if repo else ""
    raise click.ClickException(f"run {run['run_id']}'s merged model is not on this machine; {where}"
                               "run `lt export FOLDER`")


def run(target: str | None, out: str | None, formats: str, name: str | None, as_json: bool) -> int:
    model = merged_dir(target)
    out_dir = Path(out) if out else model.parent / "export"
    command = [sys.executable, "-m", "trainjob.export", "--model", str(model), "--out", str(out_dir),
               "--formats", formats]
    # A run's model is named for the run, not for its "merged" folder.
    name = name or (model.parent.name if model.name == "merged" else None)
    if name:
        command += ["--name", name]
    if as_json:
        command.append("--json")
    if not as_json:
        click.echo(f"Exporting {model} as {formats} into {out_dir}…", err=True)
    return subprocess.run(command, env=_environ()).returncode
