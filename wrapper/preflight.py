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
