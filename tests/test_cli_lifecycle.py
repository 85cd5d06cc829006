"""`lt` driving the whole lifecycle the way a user runs it: a process against the fake Lambda API, a
real sshd playing the GPU instance, and the fake Hub; CPU training of a tiny model.

Each test checks what a user would: the exit status and messages, the run record, `lt status`,
what the (fake) cloud says about the instance, and that no secret was left behind.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.cli_cloud_support import API_KEY, MODEL_REPO, CloudWorld, kill_controller, wait_for
from tests.hub_support import HUB_TOKEN

pytestmark = pytest.mark.slow


def runner_dirs() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("lt-runner-*")} if shm.is_dir() else set()


def files_holding(secret: str, *roots: Path) -> list[str]:
    found = []
    for root in roots:
        for path in root.rglob("*") if root.exists() else []:
            if path.is_file() and not path.is_symlink():
                try:
                    if secret.encode() in path.read_bytes():
                        found.append(str(path))
                except OSError:
                    continue
    return found


def only_run(world) -> dict:
    (run,) = world.lt.runs()
    run["outputs"] = json.loads(run["outputs"]) if run["outputs"] else None
    return run


def job_started(world, run_id: str) -> bool:
    return (world.trainer_dir / "runs" / run_id / "train.pid").exists()


def test_train_runs_the_whole_lifecycle_and_records_it(tmp_path):
    before = runner_dirs()
    with CloudWorld(tmp_path) as world:
        result = world.lt("train", "--yes", timeout=900)
        assert result.returncode == 0, result.stdout + result.stderr
        run = only_run(world)

        # The record: instance, type, region, price, times, status, outputs.
        instance = world.instance(run["instance_name"])
        assert run["instance_id"] == instance["id"] and run["instance_name"].startswith("lt-")
        assert (run["instance_type"], run["region"], run["price_cents_per_hour"]) == ("gpu_1x_a10", "us-east-1", 75)
        assert run["status"] == "succeeded" and run["instance_state"] == "terminated"
        assert run["launched_at"] < run["terminated_at"] <= time.time()
        assert run["outputs"]["result"]["hub"]["repo"] == MODEL_REPO
        assert run["outputs"]["result"]["steps"] == world.max_steps

        # The cloud agrees, and the model is on the Hub.
        assert instance["status"] in ("terminating", "terminated") and world.live_instances() == []
        assert "model.safetensors" in world.hub.list_files(MODEL_REPO)

        # What the user saw: the plan and price before the launch, a line per step, the result.
        assert "gpu_1x_a10 in us-east-1, $0.75/h" in result.stderr and "estimate" in result.stderr
        assert "✓ Launch (or reuse) instance" in result.stderr and "training " in result.stderr
        assert f"✓ run {run['run_id']} succeeded, {world.max_steps} steps" in result.stdout
        fetched = world.lt.cwd / "outputs" / run["run_id"]
        assert (fetched / "result.json").is_file() and (fetched / "train.log").is_file()

        status = world.lt.json("status", "--json")
        assert [r["run_id"] for r in status["runs"]] == [run["run_id"]]
        assert status["runs"][0]["instance_state"] == "terminated" and status["unknown_instances"] == []
        assert status["runs"][0]["cost_so_far"] > 0

        # No secret left behind: not on the instance, not in lt's files, not in runner's.
        assert not (world.trainer_dir / "secrets.env").exists()
        assert not (world.trainer_dir / "watchdog" / "watchdog.env").exists()
        for secret in (API_KEY, HUB_TOKEN):
            assert files_holding(secret, world.lt.state, world.lt.cwd, world.lt.home, world.trainer_dir) == []
            assert secret not in result.stdout + result.stderr
    assert runner_dirs() <= before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_train_terminates_the_instance(tmp_path, signum):
    with CloudWorld(tmp_path, max_steps=5000) as world:
        process = world.lt.popen("train", "--yes")
        run = wait_for(lambda: (world.lt.runs() or [None])[0], 60, what="the run record")
        assert run["status"] == "launching" and run["instance_name"]  # recorded before the launch
        wait_for(lambda: job_started(world, run["run_id"]), 300, what="the training job to start")
        process.send_signal(signum)
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 1, output
        assert f"run {run['run_id']} interrupted; its instance is terminated" in output
        run = only_run(world)
        assert run["status"] == "interrupted" and run["instance_state"] == "terminated"
        assert run["terminated_at"] >= run["launched_at"]
        assert world.instance(run["instance_name"])["status"] in ("terminating", "terminated")
        assert world.live_instances() == []


def test_detach_then_follow_from_another_process(tmp_path):
    with CloudWorld(tmp_path, max_steps=40) as world:
        started = world.lt("train", "--detach", "--yes", timeout=900)
        assert started.returncode == 0, started.stdout + started.stderr
        run = only_run(world)
        assert f"run {run['run_id']} is training" in started.stdout and f"lt logs -f {run['run_id']}" in started.stdout
        assert run["status"] == "training" and run["instance_state"] == "active"

        status = world.lt.json("status", "--json")
        assert status["runs"][0]["instance_state"] == "active" and status["runs"][0]["cost_so_far"] >= 0
        assert status["instances"][0]["name"] == run["instance_name"]

        followed = world.lt("logs", "-f", run["run_id"], timeout=900)
        assert followed.returncode == 0, followed.stdout + followed.stderr
        assert f"✓ run {run['run_id']} succeeded" in followed.stdout
        run = only_run(world)
        assert run["status"] == "succeeded" and run["instance_state"] == "terminated"
        assert world.live_instances() == []
        assert world.lt.json("status", "--json")["runs"][0]["status"] == "succeeded"


def test_killed_controller_leaves_it_to_the_watchdog_after_the_job(tmp_path):
    with CloudWorld(tmp_path, max_steps=60) as world:
        process = world.lt.popen("train", "--yes")
        run = wait_for(lambda: (world.lt.runs() or [None])[0], 60, what="the run record")
        wait_for(lambda: job_started(world, run["run_id"]), 300, what="the training job to start")
        kill_controller(process)
        assert world.instance(run["instance_name"])["status"] == "active"  # nobody tore it down

        # The job ends, pushes its model, and the watchdog ends the instance.
        wait_for(lambda: world.instance(run["instance_name"])["status"] in ("terminating", "terminated"),
                 600, what="the watchdog to terminate the instance")
        log = (world.trainer_dir / "watchdog" / "watchdog.log").read_text()
        assert f"finished: {run['run_id']} ended and its outputs were pushed to {MODEL_REPO}" in log
        assert "model.safetensors" in world.hub.list_files(MODEL_REPO)

        status = world.lt.json("status", "--json")
        (shown,) = status["runs"]
        assert shown["instance_state"] == "terminated" and shown["status"] == "interrupted"

        # The killed lt could not remove its private folder (and the secrets file in it); the next
        # lt that runs a playbook does.
        assert world.lt("down", run["run_id"], timeout=300).returncode == 0
        assert not list(Path("/dev/shm").glob(f"lt-runner-{process.pid}-*"))


def test_killed_controller_and_the_max_hours_budget(tmp_path):
    with CloudWorld(tmp_path, max_steps=100000) as world:
        budget_hours = 75 / 3600
        process = world.lt.popen("train", "--yes", "--max-hours", f"{budget_hours:.6f}",
                                 env={"LT_WATCHDOG_GRACE_SECONDS": "5"})
        run = wait_for(lambda: (world.lt.runs() or [None])[0], 60, what="the run record")
        wait_for(lambda: job_started(world, run["run_id"]), 300, what="the training job to start")
        kill_controller(process)
        wait_for(lambda: world.instance(run["instance_name"])["status"] in ("terminating", "terminated"),
                 300, what="the watchdog to terminate the instance")
        assert time.time() - run["launched_at"] >= 75
        log = (world.trainer_dir / "watchdog" / "watchdog.log").read_text()
        assert "budget: " in log and "max-hours 0.0208" in log
        assert "asking job pid" in log  # the job was told to stop (and checkpoint) first


def test_step_by_step_verbs_then_down(tmp_path):
    with CloudWorld(tmp_path) as world:
        up = world.lt("up", "--yes", timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        run = only_run(world)
        assert run["status"] == "up" and run["instance_state"] == "active"
        assert f"lt down {run['run_id']}" in up.stderr  # says how to end what bills
        again = world.lt("up", "--yes", timeout=600)  # idempotent: the same run, the same instance
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"Run {run['run_id']}: reusing" in again.stderr
        assert len(world.lt.runs()) == 1 and len(world.live_instances()) == 1

        # The watchdog would end the instance soon after the job's outputs are safe: not in this test.
        patient = {"LT_WATCHDOG_FINISHED_GRACE_SECONDS": "900"}
        for verb in ("push", "configure", "install"):
            result = world.lt(verb, timeout=600, env=patient)
            assert result.returncode == 0, result.stdout + result.stderr
            assert f"✓ {verb}: done" in result.stdout
        assert only_run(world)["status"] == "installed"
        assert (world.trainer_dir / "watchdog" / "watchdog.pid").exists()

        trained = world.lt("train", timeout=900, env=patient)  # the prepared instance: train on it, keep it
        assert trained.returncode == 0, trained.stdout + trained.stderr
        assert "is still running" in trained.stderr and "the watchdog ends it" in trained.stderr
        run = only_run(world)
        assert run["status"] == "succeeded" and run["instance_state"] == "active"
        assert world.instance(run["instance_name"])["status"] == "active"

        ssh = world.lt("ssh", run["run_id"], "--", "cat", f"{world.trainer_dir}/job.json", timeout=60)
        assert ssh.returncode == 0 and json.loads(ssh.stdout)["run_id"] == run["run_id"]

        logs = world.lt("logs", run["run_id"], "--raw", "-n", "5", timeout=300)
        assert logs.returncode == 0, logs.stdout + logs.stderr
        assert '"event": "done"' in logs.stdout

        down = world.lt("down", run["run_id"], timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr
        assert world.live_instances() == []
        assert only_run(world)["instance_state"] == "terminated"
        again = world.lt("down", run["run_id"], timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr


def test_down_all_ends_instances_no_run_knows(tmp_path):
    from tests.lambda_support import lambda_client

    with CloudWorld(tmp_path) as world:
        client = lambda_client(world.api)
        client.launch(region_name="us-west-1", instance_type_name="gpu_1x_a10",
                      ssh_key_names=["e2e-laptop"], name="lt-forgotten")
        flagged = world.lt("status", check=True)
        assert "lt-forgotten" in flagged.stderr
        result = world.lt("down", "--all", "--yes", timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "terminated 1 instance(s)" in result.stdout
        assert world.live_instances() == []
        assert os.environ.get("LAMBDA_API_KEY") != API_KEY  # the test never put the key in its own env
