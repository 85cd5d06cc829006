"""Running a playbook through ansible-runner without leaving secrets behind.

ansible-runner writes everything it is given into its private data directory: extravars and
envvars under env/, and always the child's whole environment in artifacts/<ident>/command. So:
- secrets are never extravars, and never in ansible-playbook's environment either: they go into a
  0600 env file in the private directory, which the playbooks' settings task reads
  (``trainer_env_file``); the secret variables of this process's own environment are taken out of
  the child's environment for the run;
- the private directory is a fresh one per run, in memory (/dev/shm) where the system has it,
  mode 0700, and removed in ``finally``;
- as a second line of defence, runner's copy of the environment in ``command`` is rewritten with
  any secret value masked as soon as the playbook reports its first event.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wrapper.progress import Progress
from wrapper.project import playbook, project_dir, trainer_config

MASK = "********"


@dataclass
class PlaybookResult:
    name: str
    status: str  # successful | failed | timeout | canceled
    rc: int
    stats: dict = field(default_factory=dict)
    artifact_data: dict = field(default_factory=dict)  # what the playbook set with set_stats
    results: list[dict] = field(default_factory=list)  # {task, host, res} of every finished task

    @property
    def ok(self) -> bool:
        return self.status == "successful" and self.rc == 0

    def task_results(self, task: str) -> list[dict]:
        return [r["res"] for r in self.results if r["task"] == task]


def secret_env_names() -> list[str]:
    """The environment variables that carry secrets (the config key table's)."""
    return [key.env for key in trainer_config().KEYS if key.secret and key.env]


def private_dir_parent() -> str | None:
    """/dev/shm when usable, so secrets in runner's files never reach a disk."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return str(shm)
    return None


RUNNER_DIR_PREFIX = "lt-runner-"


@contextlib.contextmanager
def private_data_dir() -> Iterator[Path]:
    parent = private_dir_parent()
    remove_stale_private_dirs(Path(parent or tempfile.gettempdir()))
    # The creator's pid is in the name, so a later lt can remove the folder of one that was killed.
    path = Path(tempfile.mkdtemp(prefix=f"{RUNNER_DIR_PREFIX}{os.getpid()}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_private_dirs(parent: Path) -> list[Path]:
    """Private folders of lt processes that died without cleaning up (SIGKILL, power loss)."""
    removed = []
    for folder in parent.glob(f"{RUNNER_DIR_PREFIX}*-*"):
        pid = folder.name[len(RUNNER_DIR_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except (PermissionError, OSError):
            continue
    return removed


@contextlib.contextmanager
def environment(set_vars: dict[str, str], unset: tuple[str, ...] | list[str] = ()) -> Iterator[None]:
    """Change this process's environment (which runner copies for its child), then restore it."""
    names = set(set_vars) | set(unset)
    saved = {name: os.environ.get(name) for name in names}
    for name in unset:
        os.environ.pop(name, None)
    os.environ.update(set_vars)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def write_env_file(path: Path, values: dict[str, str]) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for name, value in values.items():
            if "\n" in value:
                raise ValueError(f"{name} holds a line break")
            handle.write(f"{name}={value}\n")
    return path


def mask_command_file(data_dir: Path, secret_values: list[str]) -> None:
    """Rewrite runner's artifacts/*/command with every secret value masked."""
    for command_file in data_dir.glob("artifacts/*/command"):
        try:
            content = json.loads(command_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        env = content.get("env") or {}
        masked = {name: (MASK if value in secret_values else value) for name, value in env.items()}
        if masked != env:
            content["env"] = masked
            command_file.write_text(json.dumps(content), encoding="utf-8")


def run_playbook(name: str, extravars: dict[str, Any], *, secrets: dict[str, str],
                 progress: Progress, inventory: Any = None, env: dict[str, str] | None = None,
                 cancelled: Callable[[], bool] | None = None,
                 on_event: Callable[[dict], None] | None = None) -> PlaybookResult:
    """Run ``playbooks/<name>.yml``; ``secrets`` (environment variable names and values) reach the
    playbook through a 0600 env file only."""
    import ansible_runner

    path = playbook(name)
    if not path.is_file():
        raise FileNotFoundError(f"playbook {path} is missing from the installation")
    secret_values = [value for value in secrets.values() if value]
    progress.results = []
    masked = False
    artifact_data: dict = {}

    with private_data_dir() as data_dir:
        env_file = write_env_file(data_dir / "secrets.env", {k: v for k, v in secrets.items() if v})

        def handle(event: dict) -> bool:
            nonlocal masked
            if not masked:
                mask_command_file(data_dir, secret_values)
                masked = True
            if event.get("event") == "playbook_on_stats":
                artifact_data.update((event.get("event_data") or {}).get("artifact_data") or {})
            progress.ansible_event(event)
            if on_event:
                on_event(event)
            return True

        child_env = {**(env or {}), "ANSIBLE_CONFIG": str(project_dir() / "ansible.cfg"),
                     "ANSIBLE_NOCOLOR": "1"}
        with environment(child_env, unset=secret_env_names()):
            runner = ansible_runner.run(
                private_data_dir=str(data_dir),
                project_dir=str(project_dir()),
                playbook=str(path),
                inventory=inventory,
                extravars={**extravars, "trainer_env_file": str(env_file)},
                ident=name,
                quiet=True,
                event_handler=handle,
                cancel_callback=cancelled or (lambda: False),
            )
        progress.finish()
        return PlaybookResult(name=name, status=runner.status, rc=runner.rc if runner.rc is not None else -1,
                              stats=runner.stats or {}, artifact_data=artifact_data,
                              results=list(progress.results))


class Interrupts:
    """Turns SIGINT/SIGTERM into a flag the runner polls, so a run is cancelled and cleaned up
    instead of dying mid-way; a second signal while cleaning up is reported, not obeyed."""

    def __init__(self, on_signal: Callable[[int], None] | None = None):
        self.received: int | None = None
        self.on_signal = on_signal
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received is None
        self.received = self.received or signum
        if self.on_signal:
            self.on_signal(signum if first else -signum)

    def __call__(self) -> bool:
        return self.received is not None
