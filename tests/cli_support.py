"""Running `lt` the way a user does: a separate process, with its own HOME, state and config.

    from tests.cli_support import LtEnv

    def test_x(tmp_path):
        lt = LtEnv(tmp_path)
        result = lt("status", "--json")
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Variables of the user's shell that would leak into a test run's settings.
_SCRUBBED = ("LAMBDA_API_KEY", "LAMBDA_API_URL", "HF_TOKEN", "WANDB_API_KEY", "LT_CONFIG", "LT_DATASET",
             "LAMBDA_SSH_IDENTITY_FILE", "LAMBDA_SSH_KEY_NAME", "LT_DEBUG", "LT_YES", "LT_MAX_HOURS",
             "LT_MAX_COST", "XDG_STATE_HOME")


def lt_command() -> list[str]:
    """The installed console script when it is this checkout's, else the package as a module."""
    script = shutil.which("lt")
    if script:
        probe = subprocess.run([script, "--version"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.startswith("lt"):
            return [script]
    return [sys.executable, "-m", "wrapper"]


class LtEnv:
    """An isolated user: HOME, state dir and working directory under ``root``."""

    def __init__(self, root: Path, **env: str):
        self.root = Path(root)
        self.home = self.root / "home"
        self.state = self.root / "state"
        self.cwd = self.root / "work"
        for path in (self.home, self.state, self.cwd):
            path.mkdir(parents=True, exist_ok=True)
        self.env = {name: value for name, value in os.environ.items() if name not in _SCRUBBED}
        # XDG_CACHE_HOME absolute: ssh expands "~" from the password database, not from $HOME.
        self.env.update(HOME=str(self.home), LT_STATE_DIR=str(self.state), XDG_CACHE_HOME=str(self.home / ".cache"),
                        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                        PYTHONUNBUFFERED="1")
        self.env.update(env)
        self.command = lt_command()

    def __call__(self, *args: str, input: str | None = None, timeout: float = 300,
                 env: dict | None = None, check: bool | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.command, *args], cwd=self.cwd, env={**self.env, **(env or {})},
                                input=input, capture_output=True, text=True, timeout=timeout)
        if check is True:
            assert result.returncode == 0, f"lt {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def popen(self, *args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([*self.command, *args], cwd=self.cwd, env={**self.env, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)

    def json(self, *args: str, **kwargs):
        result = self(*args, **kwargs)
        assert result.returncode == 0, f"lt {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return json.loads(result.stdout)

    def write_config(self, values: dict, mode: int = 0o600, name: str = "config/trainer.json") -> Path:
        path = self.cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values, indent=2))
        path.chmod(mode)
        return path

    def runs(self) -> list[dict]:
        """The run records, read with sqlite3 directly (what `lt` wrote, not what it says)."""
        import sqlite3

        db_path = self.state / "runs.sqlite3"
        if not db_path.exists():
            return []
        with sqlite3.connect(db_path) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute("SELECT * FROM runs ORDER BY created_at")]
