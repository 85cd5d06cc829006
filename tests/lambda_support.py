"""Helpers for tests that talk to the fake Lambda Cloud API or run playbooks through ansible-runner.

    from tests.lambda_support import fake_lambda, lambda_client, module_env, run_playbook

    @pytest.fixture
    def lambda_api():
        with fake_lambda(boot_seconds=0.2) as api:
            yield api
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ansible_runner

from module_utils.lambda_cloud import LambdaCloudClient
from tests.fakes.lambda_api import FakeLambdaAPI

REPO_ROOT = Path(__file__).resolve().parents[1]
# Distinctive enough to find in any output it leaks into, and different in every test session.
SENTINEL_API_KEY = f"sentinel-lambda-key-{secrets.token_hex(12)}"
SSH_KEY_NAME = "llama-trainer-test"


def start_fake_lambda(api_key=SENTINEL_API_KEY, ssh_key_name=SSH_KEY_NAME, **kwargs) -> FakeLambdaAPI:
    """A started fake with one registered SSH key; the caller calls ``.stop()``."""
    kwargs.setdefault("boot_seconds", 0.2)
    api = FakeLambdaAPI(api_key, **kwargs).start()
    if ssh_key_name:
        api.add_ssh_key(ssh_key_name)
    return api


@contextlib.contextmanager
def fake_lambda(**kwargs):
    api = start_fake_lambda(**kwargs)
    try:
        yield api
    finally:
        api.stop()


def lambda_client(api, **overrides) -> LambdaCloudClient:
    """A client of ``api`` that retries fast and does not space launches out."""
    settings = {"api_key": api.api_key, "base_url": api.url, "timeout": 5, "max_retries": 5,
                "backoff": 0.01, "launch_interval": 0}
    settings.update(overrides)
    return LambdaCloudClient(**settings)


def module_env(api, api_key=None) -> dict:
    """Environment for modules (and the inventory plugin) that points them at ``api``, retrying fast."""
    return {
        "LAMBDA_API_URL": api.url,
        "LAMBDA_API_KEY": api_key or api.api_key,
        "LAMBDA_API_BACKOFF": "0.01",
        "LAMBDA_LAUNCH_INTERVAL": "0",
    }


def local_inventory() -> dict:
    # Interpreter discovery can pick a dead shim here: name this very Python.
    host = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    return {"all": {"hosts": {"localhost": host}}}


RESULT_EVENTS = ("runner_on_ok", "runner_on_failed", "runner_on_skipped", "runner_on_unreachable")


@dataclass
class PlaybookRun:
    status: str
    rc: int
    stdout: str
    events: list = field(default_factory=list)
    # Every file ansible-runner left in its private data dir (relative path -> text), read before
    # the dir was removed: what a secret scan must look at.
    files: dict = field(default_factory=dict)
    private_data_dir: str = ""

    def results(self, task_name) -> list[dict]:
        """The ``res`` of every ok/failed/skipped event of the task called ``task_name``."""
        return [
            e["event_data"]["res"]
            for e in self.events
            if e.get("event") in RESULT_EVENTS and e["event_data"].get("task") == task_name
        ]

    def failed(self, task_name) -> bool:
        """Whether the task failed (ignored failures included)."""
        return any(
            e.get("event") == "runner_on_failed" and e["event_data"].get("task") == task_name for e in self.events
        )

    def result(self, task_name) -> dict:
        found = self.results(task_name)
        assert len(found) == 1, f"task {task_name!r} ran {len(found)} times:\n{self.stdout}"
        return found[0]


def run_playbook(
    plays, *, envvars=None, extravars=None, inventory=None, cmdline=None, verbosity=None, keep_dir=None
) -> PlaybookRun:
    """Run ``plays`` (a list of plays, or a playbook path) with ansible-runner from the repository root.

    The private data dir is temporary and removed afterwards (it holds env/envvars and the
    artifacts' ``command`` file, which carry the environment); pass ``keep_dir`` to copy it first.
    """
    private = Path(tempfile.mkdtemp(prefix="lt-runner-"))
    try:
        if isinstance(plays, str | Path):
            playbook = str(Path(plays).resolve())
        else:
            playbook = str(private / "playbook.yml")
            Path(playbook).write_text(json.dumps(plays, indent=1))
        env = {"ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
        env.update(envvars or {})
        events = []
        runner = ansible_runner.run(
            private_data_dir=str(private),
            project_dir=str(REPO_ROOT),
            playbook=playbook,
            inventory=inventory or local_inventory(),
            extravars=extravars,
            envvars=env,
            cmdline=cmdline,
            verbosity=verbosity,
            quiet=True,
            event_handler=lambda event: events.append(event) or True,
        )
        stdout = runner.stdout.read()
        files = {}
        for path in private.rglob("*"):
            if path.is_file():
                files[str(path.relative_to(private))] = path.read_text(errors="replace")
        if keep_dir:
            shutil.copytree(private, keep_dir, dirs_exist_ok=True)
        return PlaybookRun(runner.status, runner.rc, stdout, events, files, str(private))
    finally:
        shutil.rmtree(private, ignore_errors=True)


def secret_leaks(run: PlaybookRun, secret=SENTINEL_API_KEY) -> list[str]:
    """Where ``secret`` shows up in a run's stdout, events and files, except the two files that
    ansible-runner always writes the environment to (env/envvars, artifacts/*/command), which
    ``run_playbook`` deletes with the private data dir."""
    leaks = [name for name, text in run.files.items() if secret in text and not _holds_environment(name)]
    if secret in run.stdout:
        leaks.append("stdout")
    if secret in json.dumps(run.events):
        leaks.append("job events")
    return leaks


def _holds_environment(name):
    parts = Path(name).parts
    return parts == ("env", "envvars") or (parts[0] == "artifacts" and parts[-1] == "command")


def start_fake_lambda_process(state_file, *, api_key=SENTINEL_API_KEY, extra_args=()):
    """The fake as a separate process; returns ``(process, base_url)``. Terminate it when done."""
    command = [sys.executable, "-m", "tests.fakes.lambda_api", "--port", "0",
               "--state", str(state_file), "--ssh-key", SSH_KEY_NAME, *extra_args]
    # The key goes in through the environment, not argv, so `ps` never shows it.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FAKE_LAMBDA_API_KEY": api_key}
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env=env)
    url = process.stdout.readline().strip()
    if not url.startswith("http://"):
        process.kill()
        raise RuntimeError(f"fake Lambda API did not start (printed {url!r})")
    return process, url
