"""How `lt` runs a playbook: secrets reach it through a 0600 file only, and nothing is left behind."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest

from tests.fakes.lambda_api import FakeLambdaAPI
from wrapper import runner
from wrapper.progress import Progress

KEY = "runner-sentinel-lambda-key-93b1f0e2"


def _runner_dirs() -> set[Path]:
    parent = Path(runner.private_dir_parent() or "/tmp")
    return set(parent.glob("lt-runner-*"))


@pytest.fixture
def api():
    with FakeLambdaAPI(api_key=KEY, boot_seconds=0.1) as fake:
        yield fake


def test_secret_reaches_the_playbook_only_through_the_env_file(api, monkeypatch):
    monkeypatch.setenv("LAMBDA_API_KEY", KEY)  # as a user who exports it
    before = _runner_dirs()
    seen: dict[str, list[str]] = {"leaks": [], "dirs": [], "modes": []}

    def scan(event: dict) -> None:
        for folder in _runner_dirs() - before:
            seen["dirs"].append(str(folder))
            for path in folder.rglob("*"):
                if not path.is_file():
                    continue
                if path.name == "secrets.env":
                    seen["modes"].append(oct(stat.S_IMODE(path.stat().st_mode)))
                    continue
                if KEY in path.read_text(errors="replace"):
                    seen["leaks"].append(str(path.relative_to(folder)))

    stream = io.StringIO()
    result = runner.run_playbook(
        "down", {"instance_name": "lt-nothing-here", "lambda_api_url": api.url},
        secrets={"LAMBDA_API_KEY": KEY}, progress=Progress(stream=stream), on_event=scan)

    assert result.ok, stream.getvalue()
    assert seen["dirs"], "the scan never saw the private data dir"
    assert seen["leaks"] == []  # not in env/, not in artifacts/*/command, not in events or stdout
    assert set(seen["modes"]) == {"0o600"}
    assert _runner_dirs() <= before  # removed afterwards
    assert os.environ["LAMBDA_API_KEY"] == KEY  # this process's environment is restored
    assert KEY not in stream.getvalue()
    # The playbook did use the key: it asked the API (which refuses any other key) for instances.
    assert api.requests_to("GET", "/instances") and not api.unauthorized


def test_private_dir_lives_in_memory_when_possible():
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    with runner.private_data_dir() as folder:
        assert str(folder).startswith("/dev/shm/") and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not folder.exists()


def test_command_file_is_masked(tmp_path):
    command = tmp_path / "artifacts" / "x" / "command"
    command.parent.mkdir(parents=True)
    command.write_text(json.dumps({"command": ["ansible-playbook"], "env": {"A": KEY, "B": "fine"}}))
    runner.mask_command_file(tmp_path, [KEY])
    assert KEY not in command.read_text() and "fine" in command.read_text()


def test_a_killed_lt_leaves_no_private_dir_for_long(tmp_path):
    """SIGKILL skips `finally`: the next run removes the folder of an lt that is gone."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    parent = Path(runner.private_dir_parent() or "/tmp")
    stale = parent / f"lt-runner-{gone.pid}-abcd1234"
    stale.mkdir(mode=0o700)
    (stale / "secrets.env").write_text(f"LAMBDA_API_KEY={KEY}\n")
    alive = parent / f"lt-runner-{os.getpid()}-efgh5678"  # a running lt's folder stays
    alive.mkdir(mode=0o700)
    try:
        with runner.private_data_dir() as folder:
            assert folder.name.startswith(f"lt-runner-{os.getpid()}-")
        assert not stale.exists() and alive.exists()
    finally:
        for path in (stale, alive):
            if path.exists():
                import shutil

                shutil.rmtree(path)
