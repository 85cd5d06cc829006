"""A whole cloud on loopback for `lt` end-to-end tests: the fake Lambda API, a real sshd playing the
GPU instance, the fake Hugging Face Hub, and an isolated user whose config points at all three.

    with CloudWorld(tmp_path) as world:
        result = world.lt("train", "--yes")
        world.api.instances, world.hub.list_files("tester/model")
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from tests.cli_support import REPO_ROOT, LtEnv
from tests.fakes.hub import FakeHub
from tests.fakes.lambda_api import FakeLambdaAPI
from tests.hub_support import HUB_TOKEN, HUB_USER, client_env
from tests.sshd import SSHServer

API_KEY = "lt-e2e-sentinel-lambda-key-7d41c0"
SSH_KEY_NAME = "e2e-laptop"
MODEL_REPO = f"{HUB_USER}/e2e-chats"


class CloudWorld:
    def __init__(self, root: Path, *, max_steps: int = 6, hub_repo: str | None = MODEL_REPO, boot_seconds=0.5,
                 **config):
        self.root = Path(root)
        self.max_steps = max_steps
        self.hub_repo = hub_repo
        self.boot_seconds = boot_seconds
        self.extra_config = config
        self.api: FakeLambdaAPI | None = None
        self.hub: FakeHub | None = None
        self.sshd: SSHServer | None = None
        self.lt: LtEnv | None = None

    def __enter__(self) -> CloudWorld:
        self.api = FakeLambdaAPI(api_key=API_KEY, boot_seconds=self.boot_seconds, terminate_seconds=0.2,
                                 forget_seconds=120).start()
        self.hub = FakeHub(HUB_TOKEN, user=HUB_USER, root=self.root / "hub").__enter__()
        self.sshd = SSHServer(self.root / "sshd").start()
        self.api.add_ssh_key(SSH_KEY_NAME, Path(f"{self.sshd.client_key}.pub").read_text().strip())
        self.lt = LtEnv(self.root / "user")
        self.remote_home = self.root / "instance-home"
        self.remote_home.mkdir()
        base = self._tiny_base_model()
        config = {
            "lambda-cloud-api-url": self.api.url,
            "lambda-cloud-ssh-key-name": SSH_KEY_NAME,
            "lambda-cloud-ssh-identity-file": str(self.sshd.client_key),
            "instance-types": ["gpu_1x_a10", "gpu_1x_a100_sxm4"],
            "dataset": str(REPO_ROOT / "examples" / "chats"),
            "base-model": str(base),
            "chat-template": "llama-3",
            "max-seq-length": 256,
            "max-steps": self.max_steps,
            "batch-size": 2,
            "gradient-accumulation-steps": 1,
            "eval-steps": 3,
            "save-steps": 3,
            "lora-r": 4,
            "hub-repo": self.hub_repo,
            "wandb-project": None,
            "export": [],
            "max-hours": 2,
            **self.extra_config,
        }
        self.config_path = self.lt.write_config(config)
        self.trainer_dir = self.remote_home / "llama-trainer"
        # How the playbooks reach this "instance": this machine's sshd as root, its Python with the
        # training stack; the job's Hub is the fake one.
        job_env = client_env(self.hub.url, self.remote_home / "hf")
        job_env.pop("HF_TOKEN")
        self.extra_vars = {
            "instance_user": self.sshd.user, "instance_ssh_port": self.sshd.port,
            "instance_python": sys.executable, "trainer_dir": str(self.trainer_dir),
            "train_poll_interval": 1, "job_env": job_env, "launch_wait_timeout": 60,
        }
        # A unix socket path must stay short: ssh's ControlPersist sockets live in a short folder.
        self.control_dir = Path(tempfile.mkdtemp(prefix="ltcp-", dir="/tmp"))
        self.lt.env.update(LAMBDA_API_KEY=API_KEY, HF_TOKEN=HUB_TOKEN,
                           ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.control_dir),
                           LT_EXTRA_VARS=json.dumps(self.extra_vars),
                           LT_WATCHDOG_POLL_SECONDS="0.5", LT_WATCHDOG_FINISHED_GRACE_SECONDS="2",
                           LAMBDA_API_BACKOFF="0.05", LAMBDA_LAUNCH_INTERVAL="0")
        return self

    def _tiny_base_model(self) -> Path:
        from tests.hub_support import run_python

        out = self.root / "tiny-base"
        run_python("import sys\nfrom trainjob.tiny import write_tiny_base_model\nwrite_tiny_base_model(sys.argv[1])",
                   {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HOME": str(self.root)}, out)
        return out

    def __exit__(self, *exc) -> None:
        # The "instance" is this machine: the fake API ending it stops no process. Do it here, each
        # step on its own so that one failing leaves no server or process behind.
        steps = []
        if self.trainer_dir.exists():
            steps.append(lambda: _stop_watchdog(self.trainer_dir / "watchdog"))
            steps += [lambda p=p: _kill_group(p) for p in self.trainer_dir.glob("runs/*/train.pid")]
        if self.sshd:
            steps.append(self.sshd.stop)
        if getattr(self, "control_dir", None):
            steps.append(lambda: _stop_ssh_masters(self.control_dir))
            steps.append(lambda: shutil.rmtree(self.control_dir, ignore_errors=True))
        if self.hub:
            steps.append(lambda: self.hub.__exit__(None, None, None))
        if self.api:
            steps.append(self.api.stop)
        for step in steps:
            with contextlib.suppress(Exception):
                step()

    # -- what tests look at ----------------------------------------------------------------------

    def live_instances(self) -> list[dict]:
        return [i for i in self.api.instances.values() if i["status"] in ("booting", "active", "unhealthy")]

    def instance(self, name: str) -> dict:
        (found,) = [i for i in self.api.instances.values() if i.get("name") == name]
        return found


def _stop_ssh_masters(control_dir: Path) -> None:
    """ControlPersist masters outlive ansible-playbook by design; end the ones of this test."""
    import subprocess

    for socket_path in control_dir.glob("*"):
        subprocess.run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "x"], capture_output=True,
                       timeout=10)


def _kill_group(pid_file: Path) -> None:
    import os
    import signal

    try:
        pid = int(pid_file.read_text().split()[0])
        group = os.getpgid(pid)
    except (OSError, ValueError, IndexError):
        return
    if group != os.getpgrp():
        os.killpg(group, signal.SIGKILL)


def _stop_watchdog(folder: Path) -> None:
    """A test must not leave a watchdog process behind."""
    import os
    import signal

    try:
        pid = int((folder / "watchdog.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return
    if b"watchdog" in cmdline:
        os.kill(pid, signal.SIGTERM)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found by their parent pid in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_controller(process) -> None:
    """SIGKILL `lt` and everything it started on this side (ansible-playbook, ssh), as when a laptop
    dies: nothing gets to clean up."""
    import os
    import signal

    for pid in [process.pid, *descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
