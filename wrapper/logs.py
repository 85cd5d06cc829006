"""`lt logs [-f]`: a run's training log, or following it to the end (reattaching to a detached run)."""

from __future__ import annotations

import io
from pathlib import Path

import click

from wrapper import records as run_records
from wrapper.progress import Progress

FOLLOW_TASK = "Follow the training job (each try brings the log's last lines)"


def show(settings, ref: str | None, follow: bool, lines: int, raw: bool, extra_vars: dict) -> None:
    from wrapper import lifecycle

    run = _pick(settings, ref, extra_vars)
    if run.record["kind"] == "local":
        _print_file(Path(run.record["outputs"]["output_dir"]) / "train.log", lines)
        return
    if not run_records.instance_may_be_running(run.record):
        fetched = Path.cwd() / "outputs" / run.id / "train.log"
        if fetched.is_file():
            _print_file(fetched, lines)
            return
        raise click.ClickException(f"run {run.id}'s instance is gone and no fetched log is in {fetched.parent}")
    variables = {"train_run_id": run.id, "train_tail_lines": lines}
    if not follow:
        progress = Progress(stream=io.StringIO() if raw else None, quiet_tasks=True)
        result = run.playbook("logs", progress, **variables)
        if not result.ok:
            raise click.ClickException(f"could not read run {run.id}'s log: {'; '.join(progress.failures)}")
        if raw:
            for res in result.task_results(FOLLOW_TASK):
                click.echo("\n".join(res.get("tail") or []))
        else:
            progress.show_tail("log lines")
        return
    click.echo(f"Following run {run.id} on {run.describe_instance()}…", err=True)
    lifecycle.follow(run, **variables)


def _pick(settings, ref: str | None, extra_vars: dict):
    from wrapper import lifecycle

    if ref:
        return lifecycle.find_run(settings, ref, extra_vars)
    records = run_records.Records()
    latest = records.latest(live_instance=True) or records.latest()
    if latest is None:
        raise click.ClickException("no runs yet")
    return lifecycle.Run(settings, latest, extra_vars)


def _print_file(path: Path, lines: int) -> None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        raise click.ClickException(f"no log at {path}") from None
    click.echo("\n".join(text.splitlines()[-lines:]))
