"""A loopback "cloud" for the playbooks: the fake Lambda API hands out 127.0.0.1, a real sshd on a free
port plays the GPU instance, the fake Hub holds a tiny base model and receives the trained one.

    with PlaybookRig(tmp_path) as rig:
        result = rig.playbook("train.yml", instance_name="lt-e2e-main", run_id="main-1")
        result.returncode, result.stdout, rig.api.instances, rig.hub.list_files(...)

Secrets are sentinels, handed over the way a user does: LAMBDA_API_KEY and HF_TOKEN in the
environment of ansible-playbook, the W&B key in the (0600) config file; never as extra vars.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fakes.hub import FakeHub
from tests.fakes.lambda_api import FakeLambdaAPI
from tests.hub_support import REPO_ROOT, client_env
from tests.sshd import SSHServer
from tests.train_support import BASE_REPO, chat_splits, jsonl, write_tiny_base

LAMBDA_SENTINEL = "lambda-sentinel-6c1f0e9a4b"
HF_SENTINEL = "hf_SentinelToken5d2b8c7e1f"
WANDB_SENTINEL = "wandb-sentinel-3a9d7e2c40"
SENTINELS = (LAMBDA_SENTINEL, HF_SENTINEL, WANDB_SENTINEL)
MODEL_REPO = "tester/roles-e2e-model"
BOOT_SECONDS = 0.5
SSH_KEY_NAME = "roles-e2e"
ASYNC_DIR = Path.home() / ".ansible_async"


@dataclass
class PlaybookResult:
    returncode: int
    stdout: str
    seconds: float

    def recap(self, host: str) -> dict[str, int]:
        """The PLAY RECAP counters of ``host``."""
        match = re.search(rf"^{re.escape(host)}\s+:\s+(.*)$", self.stdout, re.MULTILINE)
        assert match, f"no recap for {host}:\n{self.stdout[-3000:]}"
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


@dataclass
class Background:
    proc: subprocess.Popen
    output: Path

    @property
    def stdout(self) -> str:
        return self.output.read_text()

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the whole session: ansible-playbook, its workers and its ssh processes."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class PlaybookRig:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.remote_dir = self.root / "instance" / "llama-trainer"
        self.fetch_dir = self.root / "outputs"
        self.sshd = SSHServer(self.root / "sshd")
        self.api = FakeLambdaAPI(api_key=LAMBDA_SENTINEL, boot_seconds=BOOT_SECONDS, forget_seconds=600)
        self.hub = FakeHub(HF_SENTINEL, user="tester", root=self.root / "hub")

    def __enter__(self) -> PlaybookRig:
        self.sshd.start()
        self.api.start()
        self.hub.__enter__()
        splits = chat_splits()
        self.hub.add_repo(BASE_REPO, write_tiny_base(self.root / "tiny-base", splits))
        self.dataset = self.root / "chats"
        self.dataset.mkdir()
        for split in ("train", "validation"):
            (self.dataset / f"{split}.jsonl").write_text(jsonl(splits[split]))
        self.config_file = self.write_config()
        return self

    def __exit__(self, *exc) -> None:
        self.kill_remote_jobs()
        self.hub.__exit__(*exc)
        self.api.stop()
        self.sshd.stop()

    def write_config(self, name: str = "trainer.json", **overrides) -> Path:
        config = {
            "lambda-cloud-api-url": self.api.url,
            "lambda-cloud-ssh-key-name": SSH_KEY_NAME,
            "lambda-cloud-ssh-identity-file": str(self.sshd.client_key),
            "lambda-cloud-instance-name-prefix": "lt-e2e",
            "instance-types": ["gpu_1x_a10"],
            "watchdog": False,
            "base-model": BASE_REPO,
            "dataset": str(self.dataset),
            "max-seq-length": 256,
            "max-steps": 4,
            "batch-size": 2,
            "gradient-accumulation-steps": 1,
            "learning-rate": 0.005,
            "lora-r": 8,
            "eval-steps": 2,
            "save-steps": 2,
            "hub-repo": MODEL_REPO,
            "export": [],
            "sample-prompts": ["What colour is the cat?"],
            "wandb-project": None,
            "weights-and-biases-api-key": WANDB_SENTINEL,
        }
        config.update(overrides)
        path = self.root / name
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def write_config_copy(self, **overrides) -> Path:
        """Another config file: the rig's settings with ``overrides`` (kebab-case keys)."""
        self._copies = getattr(self, "_copies", 0) + 1
        return self.write_config(f"trainer-{self._copies}.json", **overrides)

    # -- running playbooks ----------------------------------------------------------------------

    def environment(self, **more: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("LAMBDA_API_KEY", "HF_TOKEN", "WANDB_API_KEY")}
        env.update(LAMBDA_API_KEY=LAMBDA_SENTINEL, HF_TOKEN=HF_SENTINEL, LAMBDA_LAUNCH_INTERVAL="0",
                   LAMBDA_API_BACKOFF="0.05", ANSIBLE_NOCOLOR="1", PYTHONUNBUFFERED="1")
        env.update(more)
        return env

    def extravars(self, **more) -> dict:
        """What a test passes with -e: where things are, never a secret."""
        job_env = {k: v for k, v in client_env(self.hub.url, self.root / "instance" / "hf-home").items()
                   if k != "HF_TOKEN"}
        variables = {
            "config_file": str(self.config_file),
            "instance_user": self.sshd.user,
            "instance_ssh_port": self.sshd.port,
            "instance_python": sys.executable,
            "trainer_dir": str(self.remote_dir),
            "train_fetch_dir": str(self.fetch_dir),
            "train_poll_interval": 1,
            "job_env": job_env,
            "launch_known_hosts_dir": str(self.root / "known_hosts"),
            "files_bundle_dir": str(self.root / "bundles"),
        }
        variables.update(more)
        return variables

    def command(self, playbook: str, **more) -> list[str]:
        return ["ansible-playbook", f"playbooks/{playbook}", "-e", json.dumps(self.extravars(**more))]

    def playbook(self, playbook: str, timeout: float = 600, env: dict[str, str] | None = None,
                 **more) -> PlaybookResult:
        """Run a playbook to its end; ``env``: more environment variables for ansible-playbook."""
        started = time.monotonic()
        proc = subprocess.run(self.command(playbook, **more), cwd=REPO_ROOT, env=self.environment(**(env or {})),
                              capture_output=True, text=True, timeout=timeout)
        return PlaybookResult(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started)

    def start_playbook(self, playbook: str, **more) -> Background:
        """ansible-playbook in the background, in a session of its own (so a test can kill all of it),
        its output going to a file."""
        self._started = getattr(self, "_started", 0) + 1
        output = self.root / f"playbook-{self._started}.out"
        with open(output, "w") as handle:
            proc = subprocess.Popen(self.command(playbook, **more), cwd=REPO_ROOT, env=self.environment(),
                                    stdout=handle, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        return Background(proc, output)

    # -- what tests look at ---------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        return self.remote_dir / "runs" / run_id

    def instances_named(self, name: str) -> list[dict]:
        return [i for i in self.api.instances.values() if i["name"] == name]

    def wait_for_log(self, run_id: str, pattern: str, timeout: float = 300) -> str:
        """Wait until the run's remote log has a line matching ``pattern``; returns the log."""
        log = self.run_dir(run_id) / "train.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text() if log.exists() else ""
            if re.search(pattern, text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"{log} never matched {pattern!r}:\n{log.read_text() if log.exists() else '(no log)'}")

    def launcher_pid(self, run_id: str) -> int:
        return int((self.run_dir(run_id) / "train.pid").read_text())

    def kill_remote_jobs(self) -> None:
        """Stop any training process a test left behind (found by this rig's folder in its arguments)."""
        for pid in processes_matching(str(self.remote_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def processes_matching(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


class ProcessListWatch:
    """Samples every process's command line while a run goes on, keeping any that shows a sentinel."""

    def __init__(self, secrets=SENTINELS, interval: float = 0.2):
        self.secrets = secrets
        self.interval = interval
        self.hits: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if any(secret in cmdline for secret in self.secrets):
                    self.hits.append(cmdline.replace("\0", " "))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def files_containing(roots, secrets=SENTINELS, skip=()) -> list[str]:
    """Every file under ``roots`` whose bytes contain a secret (``skip``: paths allowed to)."""
    skip = {str(Path(p)) for p in skip}
    found = []
    needles = [s.encode() for s in secrets]
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else (p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        for path in paths:
            if str(path) in skip:
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(needle in data for needle in needles):
                found.append(str(path))
    return found


def stub_job(root: Path) -> Path:
    """A stand-in `trainjob` package with the real job's contract (events on stdout, result.json in
    output_dir) that "trains" for 1.5 s: for timing the orchestration around a job."""
    package = root / "stub" / "trainjob"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text('''
import argparse, json, time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--resume", action="store_true")
job = json.loads(Path(parser.parse_args().config).read_text())
out = Path(job["output_dir"])
out.mkdir(parents=True, exist_ok=True)
print(json.dumps({"event": "start", "run_id": job["run_id"], "max_steps": 3}))
for step in (1, 2, 3):
    time.sleep(0.5)
    print(json.dumps({"event": "step", "step": step, "max_steps": 3, "loss": 1.0 / step}))
result = {"run_id": job["run_id"], "status": "succeeded", "stage": "done", "steps": 3, "train_loss": 0.3,
          "eval_loss": None, "hub": {}}
(out / "result.json").write_text(json.dumps(result))
print(json.dumps({"event": "done", "result": str(out / "result.json"), "status": "succeeded"}))
''')
    return package
