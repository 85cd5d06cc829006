"""`lt ssh`: a shell (or one command) on a run's instance, the way the playbooks reach it."""

from __future__ import annotations

import os
from pathlib import Path

import click


def known_hosts_file(instance_id: str) -> Path:
    """The per-instance known_hosts file the launch role uses (IP addresses get reused)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "llama-trainer" / "known_hosts" / instance_id


def ssh_argv(settings, record: dict, extra_vars: dict, command: list[str]) -> list[str]:
    if not record.get("ip") or not record.get("instance_id"):
        raise click.ClickException(f"run {record['run_id']}'s instance has no address yet; `lt status` shows it")
    known_hosts = known_hosts_file(record["instance_id"])
    known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    user = extra_vars.get("instance_user", "ubuntu")
    port = str(extra_vars.get("instance_ssh_port", 22))
    return ["ssh", "-i", str(Path(settings["ssh_identity_file"]).expanduser()), "-p", port,
            "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={known_hosts}", f"{user}@{record['ip']}", *command]


def open_ssh(settings, ref: str | None, command: list[str], extra_vars: dict) -> None:
    from wrapper import lifecycle, records

    run = lifecycle.find_run(settings, ref, extra_vars)
    if not records.instance_may_be_running(run.record):
        raise click.ClickException(f"run {run.id} has no running instance")
    argv = ssh_argv(settings, run.record, extra_vars, command)
    os.execvp(argv[0], argv)
