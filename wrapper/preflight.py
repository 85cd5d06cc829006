"""`lt preflight`: the training job's own checks, run on this machine before anything is launched."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from wrapper.project import project_dir, trainer_config


def job_file(settings, directory: Path, run_id: str = "preflight") -> Path:
    values = dict(settings.values)
    dataset = values.get("dataset")
    if dataset and Path(dataset).expanduser().exists():
        values["dataset"] = str(Path(dataset).expanduser().resolve())
    path = directory / "job.json"
    path.write_text(json.dumps(trainer_config().job_config(values, run_id), indent=2), encoding="utf-8")
    return path


def run(settings, as_json: bool = False) -> int:
    """Run `python -m trainjob.preflight` on the settings' job config; returns its exit code."""
    settings.require("dataset")
    with tempfile.TemporaryDirectory(prefix="lt-preflight-") as tmp:
        command = [sys.executable, "-m", "trainjob.preflight", "--config", str(job_file(settings, Path(tmp)))]
        if as_json:
            command.append("--json")
        env = {**_environ(), **settings.secrets_env()}
        result = subprocess.run(command, env=env, cwd=tmp)
    if result.returncode != 0 and _missing_job_stack(result.returncode):
        raise click.ClickException("the training stack is not installed here: pip install 'llama-trainer[train]'")
    return result.returncode


def _environ() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project_dir()), env.get("PYTHONPATH")]))
    return env


def _missing_job_stack(returncode: int) -> bool:
    # `python -m` of a module that cannot be imported exits 1 having printed "No module named";
    # a cheap second look tells that apart from failed checks.
    probe = subprocess.run([sys.executable, "-c", "import trainjob.preflight"], env=_environ(),
                           capture_output=True)
    return probe.returncode != 0


def before_launch(settings) -> None:
    """The job's checks on this machine before money is spent; a data problem stops the launch.

    Skipped (with a note) where the training stack isn't installed; a tokenizer that can't be
    loaded here (no Hub access from this machine) is left for the instance to load."""
    if _missing_job_stack(0):
        click.echo("Preflight skipped: the training stack is not installed here "
                   "(pip install 'llama-trainer[train]' checks the data before launching).", err=True)
        return
    click.echo("Preflight: checking the data and the chat template here before launching…", err=True)
    with tempfile.TemporaryDirectory(prefix="lt-preflight-") as tmp:
        command = [sys.executable, "-m", "trainjob.preflight", "--config", str(job_file(settings, Path(tmp))),
                   "--json"]
        result = subprocess.run(command, env={**_environ(), **settings.secrets_env()}, cwd=tmp,
                                capture_output=True, text=True)
    report = _last_json(result.stdout)
    if report is None:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise click.ClickException(f"preflight failed to run (exit {result.returncode}):\n{tail}")
    problems = report.get("problems") or []
    tokenizer_only = [p for p in problems if p.get("field") == "base_model"]
    if problems and len(tokenizer_only) == len(problems):
        click.echo(f"Preflight: the data is valid; the base model's tokenizer can't be loaded here "
                   f"({tokenizer_only[0].get('message')}); the job checks it on the instance.", err=True)
        return
    if problems:
        listed = "\n  ".join(_problem_text(p) for p in problems)
        raise click.ClickException(f"preflight found {report.get('problem_count', len(problems))} problem(s); "
                                   f"nothing was launched:\n  {listed}")
    click.echo(f"Preflight: ok ({report.get('loss_tokens', '?')} tokens in the loss).", err=True)


def _last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _problem_text(problem: dict) -> str:
    if problem.get("text"):
        return problem["text"]
    where = problem.get("path") or ""
    if problem.get("line"):
        where += f":{problem['line']}"
    return f"{where}: {problem.get('field')}: {problem.get('message')}"
