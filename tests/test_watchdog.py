"""The on-instance watchdog: it ends its own instance on budget, when the job is done, or when idle.

The script runs as a real process against the fake Lambda API over HTTP, reading a job folder laid
out as the train role lays it out; the role runs through ansible-runner over a real loopback sshd.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakes.lambda_api import FakeLambdaAPI
from tests.lambda_support import lambda_client

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "roles" / "watchdog" / "files" / "watchdog.py"
KEY = "watchdog-sentinel-key-5f0c2a9e"
NAME = "lt-20260101-000000-beef"


@pytest.fixture
def api():
    with FakeLambdaAPI(api_key=KEY, boot_seconds=0.05, terminate_seconds=0.05, forget_seconds=60) as fake:
        fake.add_ssh_key("laptop")
        yield fake


def launch(api, name=NAME, type_name="gpu_1x_a10") -> str:
    client = lambda_client(api)
    (instance_id,) = client.launch(region_name="us-east-1", instance_type_name=type_name,
                                   ssh_key_names=["laptop"], name=name)
    client.wait_for_instance(instance_id, timeout=10, interval=0.05)
    return instance_id


class Instance:
    """A trainer folder as the roles leave it, and a watchdog process watching it."""

    def __init__(self, root: Path, api, **config):
        self.trainer_dir = root / "llama-trainer"
        self.dir = self.trainer_dir / "watchdog"
        self.dir.mkdir(parents=True)
        env_file = self.dir / "watchdog.env"
        env_file.write_text(f"LAMBDA_API_KEY='{api.api_key}'\n")
        env_file.chmod(0o600)
        self.config = {"instance_name": NAME, "api_url": api.url, "env_file": str(env_file),
                       "trainer_dir": str(self.trainer_dir), "poll_seconds": 0.1, "idle_minutes": 60,
                       "finished_grace_seconds": 0, "grace_seconds": 10, **config}
        self.write_config()
        self.process: subprocess.Popen | None = None
        self.jobs: list[subprocess.Popen] = []

    def write_config(self, **changes):
        self.config.update(changes)
        (self.dir / "config.json").write_text(json.dumps(self.config))

    def start(self, *extra: str) -> subprocess.Popen:
        self.process = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(self.dir / "config.json"),
                                         *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self.process

    def wait(self, timeout: float) -> str:
        out, _ = self.process.communicate(timeout=timeout)
        return out + self.log()

    def log(self) -> str:
        path = self.dir / "watchdog.log"
        return path.read_text() if path.exists() else ""

    def run_dir(self, run_id="20260101-000000-beef") -> Path:
        path = self.trainer_dir / "runs" / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start_job(self, seconds=60, trap=False) -> subprocess.Popen:
        """A running job: its own session, as the train role starts it, with its pid file."""
        script = f"trap 'echo saved > {self.run_dir()}/saved; exit 143' TERM; sleep {seconds} & wait" if trap \
            else f"sleep {seconds}"
        job = subprocess.Popen(["bash", "-c", script], start_new_session=True)
        (self.run_dir() / "train.pid").write_text(f"{job.pid}\n")
        self.jobs.append(job)
        return job

    def end_job(self, result: dict | None = None, code: int = 0) -> None:
        for job in self.jobs:
            job.kill()
            job.wait()
        if result is not None:
            (self.run_dir() / "outputs").mkdir(exist_ok=True)
            (self.run_dir() / "outputs" / "result.json").write_text(json.dumps(result))
        (self.run_dir() / "exit_code").write_text(f"{code}\n")

    def stop(self):
        for process in [self.process, *self.jobs]:
            if process and process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def instance(tmp_path, api):
    created = []

    def make(**config):
        made = Instance(tmp_path, api, **config)
        created.append(made)
        return made

    yield make
    for made in created:
        made.stop()


def status(api, instance_id) -> str:
    return api.instances[instance_id]["status"]


def terminated(api, instance_id) -> bool:
    return status(api, instance_id) in ("terminating", "terminated")


def test_max_hours_stops_the_job_then_terminates(api, instance):
    instance_id = launch(api)
    other = launch(api, name="lt-someone-else")
    box = instance(max_hours=1.5 / 3600, grace_seconds=10)
    job = box.start_job(trap=True)
    started = time.monotonic()
    box.start()
    log = box.wait(timeout=30)
    assert time.monotonic() - started >= 1.4
    assert terminated(api, instance_id), log
    assert status(api, other) == "active"  # only its own instance
    assert "budget: " in log and "max-hours" in log
    assert job.wait(timeout=5) == 143 and (box.run_dir() / "saved").exists()  # the job got SIGTERM first
    assert KEY not in log


def test_max_cost_at_the_instance_price(api, instance):
    instance_id = launch(api, type_name="gpu_1x_a10")  # $0.75/h: $0.0004 is about 1.9 s
    box = instance(max_cost=0.0004)
    box.start()
    log = box.wait(timeout=30)
    assert terminated(api, instance_id)
    assert "$0.75/h" in log and "max-cost" in log


def test_finished_and_pushed_terminates(api, instance):
    instance_id = launch(api)
    box = instance()
    box.start_job()
    box.start()
    time.sleep(1)
    assert status(api, instance_id) == "active"  # a running job keeps it
    box.end_job({"status": "succeeded", "hub": {"repo": "me/model", "confirmed": True}})
    log = box.wait(timeout=30)
    assert terminated(api, instance_id)
    assert "finished:" in log and "pushed to me/model" in log


def test_finished_but_not_safe_waits_for_the_fetch(api, instance):
    instance_id = launch(api)
    box = instance()
    box.end_job({"status": "succeeded", "hub": {}})
    box.start()
    time.sleep(1.5)
    assert status(api, instance_id) == "active" and box.process.poll() is None
    (box.run_dir() / "outputs-fetched").touch()
    log = box.wait(timeout=30)
    assert terminated(api, instance_id)
    assert "fetched its outputs" in log


def test_idle_never_ends_an_instance_holding_the_only_trained_model(api, instance):
    instance_id = launch(api)
    box = instance(idle_minutes=0.5 / 60, max_hours=4 / 3600)
    box.end_job({"status": "succeeded", "hub": {}})  # trained, but neither pushed nor fetched
    box.start()
    time.sleep(2.5)  # well past idle_minutes
    assert status(api, instance_id) == "active" and box.process.poll() is None
    log = box.wait(timeout=30)  # the budget still ends it
    assert terminated(api, instance_id)
    assert "budget:" in log and "idle:" not in log


def test_idle_counts_from_the_last_activity(api, instance):
    instance_id = launch(api)
    box = instance(idle_minutes=1.5 / 60)
    box.start()
    # Setup keeps touching files (copies, pip installs): that is not idle.
    for _ in range(10):
        (box.trainer_dir / "venv").mkdir(exist_ok=True)
        (box.trainer_dir / "venv" / f"pkg{_}").touch()
        time.sleep(0.3)
    assert status(api, instance_id) == "active"
    started = time.monotonic()
    log = box.wait(timeout=30)
    assert time.monotonic() - started >= 1.0
    assert terminated(api, instance_id)
    assert "idle: no job and no activity" in log


def test_a_running_job_is_never_idle(api, instance):
    instance_id = launch(api)
    box = instance(idle_minutes=0.5 / 60)
    box.start_job()
    box.start()
    time.sleep(2)
    assert status(api, instance_id) == "active"
    box.end_job(code=1)  # failed and nothing fetched: idle from now on
    box.wait(timeout=30)
    assert terminated(api, instance_id)


def test_api_errors_are_retried_and_the_key_stays_out_of_the_log(api, instance):
    instance_id = launch(api)
    box = instance(max_hours=0.5 / 3600)
    api.fail_next("/instance-operations/terminate", 500, "global/internal-error", times=1)
    box.start()
    log = box.wait(timeout=60)
    assert terminated(api, instance_id)
    assert KEY not in log and KEY not in (box.dir / "state.json").read_text()


def test_wrong_key_is_logged_and_nothing_crashes(api, instance):
    launch(api)
    box = instance(max_hours=0.5 / 3600)
    env_file = Path(box.config["env_file"])
    env_file.write_text("LAMBDA_API_KEY='not-the-key'\n")
    box.start()
    time.sleep(3)
    assert box.process.poll() is None  # still trying
    box.process.kill()
    log = box.wait(timeout=5)
    assert "HTTP 401" in log and "not-the-key" not in log


def test_disabling_makes_it_exit(api, instance):
    instance_id = launch(api)
    box = instance()
    box.start()
    time.sleep(0.5)
    box.write_config(enabled=False)
    box.wait(timeout=10)
    assert status(api, instance_id) == "active"


def test_daemon_outlives_its_parent_and_terminates(api, instance):
    instance_id = launch(api)
    box = instance(max_hours=2 / 3600)
    box.start("--daemon")
    assert box.process.wait(timeout=10) == 0  # the launching command returns at once
    pid = int((box.dir / "watchdog.pid").read_text())
    assert os.getsid(pid) != os.getsid(0)  # its own session: SSH logging out does not end it
    second = box.start("--daemon")
    assert "already running" in second.communicate(timeout=10)[0]
    deadline = time.monotonic() + 30
    while not terminated(api, instance_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert terminated(api, instance_id)
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid)
    assert "terminate requested" in box.log() and KEY not in box.log()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_budget_never_signals_its_own_process_group(api, instance):
    instance_id = launch(api)
    box = instance(max_hours=0.5 / 3600, grace_seconds=5)
    # A job in the watchdog's (and this test's) process group: only the job may get the signal.
    job = subprocess.Popen(["sleep", "60"])
    (box.run_dir() / "train.pid").write_text(f"{job.pid}\n")
    box.start()
    log = box.wait(timeout=30)
    assert job.wait(timeout=5) == -signal.SIGTERM
    assert terminated(api, instance_id) and "terminate requested" in log


# -- the role, over SSH ------------------------------------------------------------------------------

def _watchdog_play(**role_vars):
    return [{"name": "Configure the watchdog", "hosts": "gpu", "gather_facts": False,
             "roles": [{"role": "watchdog", "vars": role_vars}]}]


@pytest.mark.slow
def test_role_starts_a_watchdog_that_outlives_ssh(tmp_path, api):
    from tests.lambda_support import run_playbook, secret_leaks
    from tests.sshd import SSHServer

    instance_id = launch(api)
    trainer_dir = tmp_path / "remote" / "llama-trainer"
    env = {"LAMBDA_API_KEY": KEY, "LT_WATCHDOG_POLL_SECONDS": "0.2"}
    with SSHServer(tmp_path / "sshd") as server:
        host = {**server.ansible_host_vars(), "ansible_python_interpreter": sys.executable}
        inventory = {"all": {"hosts": {"gpu": host}}}
        extravars = {"instance_name": NAME, "trainer_dir": str(trainer_dir), "lambda_api_url": api.url,
                     "max_hours": 1.0, "idle_minutes": 30}
        first = run_playbook(_watchdog_play(), inventory=inventory, extravars=extravars, envvars=env)
        assert first.status == "successful", first.stdout
        assert secret_leaks(first, KEY) == []
        folder = trainer_dir / "watchdog"
        assert oct((folder / "watchdog.env").stat().st_mode & 0o777) == "0o600"
        assert KEY not in (folder / "config.json").read_text()
        pid = int((folder / "watchdog.pid").read_text())
        assert os.getsid(pid) != os.getsid(0)

        # Configuring again keeps the same process and hands it the new budget: 25 s from now.
        again = run_playbook(_watchdog_play(), inventory=inventory, envvars=env,
                             extravars={**extravars, "max_hours": 25 / 3600, "launched_at": time.time()})
        assert again.status == "successful", again.stdout
        assert again.result("Start the watchdog, detached from this session")["changed"] is False
        assert int((folder / "watchdog.pid").read_text()) == pid

        # The controller goes away: every SSH session is cut. The watchdog does not care.
        server.kill_connections()
        deadline = time.monotonic() + 60
        while not terminated(api, instance_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert terminated(api, instance_id), (folder / "watchdog.log").read_text()
        assert "max-hours" in (folder / "watchdog.log").read_text()


@pytest.mark.slow
def test_role_with_watchdog_off_stops_it_and_removes_the_key(tmp_path, api):
    from tests.lambda_support import run_playbook
    from tests.sshd import SSHServer

    instance_id = launch(api)
    trainer_dir = tmp_path / "remote" / "llama-trainer"
    env = {"LAMBDA_API_KEY": KEY, "LT_WATCHDOG_POLL_SECONDS": "0.2"}
    with SSHServer(tmp_path / "sshd") as server:
        host = {**server.ansible_host_vars(), "ansible_python_interpreter": sys.executable}
        inventory = {"all": {"hosts": {"gpu": host}}}
        extravars = {"instance_name": NAME, "trainer_dir": str(trainer_dir), "lambda_api_url": api.url}
        assert run_playbook(_watchdog_play(), inventory=inventory, extravars=extravars,
                            envvars=env).status == "successful"
        pid = int((trainer_dir / "watchdog" / "watchdog.pid").read_text())
        off = run_playbook(_watchdog_play(), inventory=inventory, extravars={**extravars, "watchdog": False},
                           envvars=env)
        assert off.status == "successful", off.stdout
        assert "nothing on the instance will terminate it" in off.stdout
        assert not (trainer_dir / "watchdog" / "watchdog.env").exists()
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid)
        assert status(api, instance_id) == "active"
