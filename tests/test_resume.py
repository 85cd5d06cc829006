"""A run killed mid-training resumes on a fresh machine from the checkpoint it pushed to the Hub:
it continues after that step (not from 0), on the same schedule, and ends at the planned step."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest

from tests.hub_support import fake_hub_fixture, hub_env_fixture  # noqa: F401
from tests.train_support import read_events, run_job, start_job, upload_base_and_chats, write_job_config

pytest.importorskip("trl")

MODEL_REPO = "tester/tiny-resume"
MAX_STEPS = 40
SAVE_STEPS = 5


@pytest.mark.slow
def test_killed_run_resumes_from_the_pushed_checkpoint(fake_hub, hub_env, tmp_path):
    upload_base_and_chats(fake_hub, tmp_path)
    outputs = tmp_path / "outputs"
    config = write_job_config(tmp_path, run_id="tiny-resume", hub_repo=MODEL_REPO, max_steps=MAX_STEPS,
                              save_steps=SAVE_STEPS, eval_steps=10, output_dir=str(outputs))
    env = {**hub_env, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}

    # First run: SIGKILL (no cleanup, like a lost instance) as soon as a checkpoint is on the Hub.
    proc = start_job(config, env, tmp_path)
    try:
        first, _ = read_events(proc, stop_when=lambda e: e["event"] == "checkpoint" and e.get("pushed"))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert first and first[-1]["event"] == "checkpoint", proc.log_path.read_text()[-4000:]
    planned = next(e for e in first if e["event"] == "start")["max_steps"]
    assert planned == MAX_STEPS
    first_steps = {e["step"]: e for e in first if e["event"] == "step"}
    assert max(first_steps) < MAX_STEPS  # killed mid-training
    assert not any(e["event"] == "done" for e in first)

    hub_step = json.loads(fake_hub.read_file(MODEL_REPO, "last-checkpoint/trainer_state.json"))["global_step"]
    assert hub_step >= first[-1]["step"] > 0 and hub_step % SAVE_STEPS == 0

    # A new machine has nothing local: only the Hub holds the checkpoint.
    shutil.rmtree(outputs)
    second = run_job(config, env, tmp_path, "--resume")
    assert second.returncode == 0, second.stderr[-6000:]

    start = second.one("start")
    assert start["resumed_from_step"] == hub_step
    assert start["max_steps"] == planned
    steps = second.of("step")
    assert [e["step"] for e in steps] == list(range(hub_step + 1, MAX_STEPS + 1))
    assert 0 not in [e["step"] for e in second.of("eval")]  # no fresh baseline: this is not a new run

    # Same schedule and same data order as the uninterrupted run would have had.
    for event in steps:
        if event["step"] in first_steps:
            before = first_steps[event["step"]]
            assert event["lr"] == pytest.approx(before["lr"], rel=1e-9)
            assert event["loss"] == pytest.approx(before["loss"], abs=1e-4)

    result = json.loads((outputs / "result.json").read_text())
    assert result["status"] == "succeeded"
    assert (result["steps"], result["max_steps"], result["resumed_from_step"]) == (MAX_STEPS, MAX_STEPS, hub_step)
    pushed_state = json.loads(fake_hub.read_file(MODEL_REPO, "last-checkpoint/trainer_state.json"))
    assert pushed_state["global_step"] == MAX_STEPS
    assert "model.safetensors" in fake_hub.list_files(MODEL_REPO)


@pytest.mark.slow
def test_sigterm_ends_the_run_cleanly(fake_hub, hub_env, tmp_path):
    """What the watchdog or `lt down` sends: the job checkpoints, stops, says so, and finishes W&B."""
    from tests.wandb_reader import find_run_files, read_run

    upload_base_and_chats(fake_hub, tmp_path)
    config = write_job_config(tmp_path, run_id="tiny-term", max_steps=MAX_STEPS, save_steps=SAVE_STEPS)
    env = {**hub_env, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}

    proc = start_job(config, env, tmp_path)
    try:
        read_events(proc, stop_when=lambda e: e["event"] == "step")
        proc.send_signal(signal.SIGTERM)
        rest, _ = read_events(proc)
        proc.wait(60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143, proc.log_path.read_text()[-4000:]
    # It stopped at the next step boundary with a checkpoint to resume from, not at the end.
    stopped_at = [e for e in rest if e["event"] == "checkpoint"][-1]["step"]
    assert stopped_at == [e for e in rest if e["event"] == "step"][-1]["step"] < MAX_STEPS
    assert (tmp_path / "outputs" / "checkpoints" / f"checkpoint-{stopped_at}" / "trainer_state.json").is_file()
    error = next(e for e in rest if e["event"] == "error")
    assert error["stage"] == "train" and "SIGTERM" in error["message"] and f"step {stopped_at}" in error["message"]
    assert rest[-1] == {"event": "done", "result": str(tmp_path / "outputs" / "result.json"), "status": "failed"}
    result = json.loads((tmp_path / "outputs" / "result.json").read_text())
    assert (result["status"], result["stage"], result["steps"]) == ("failed", "train", stopped_at)
    [run_file] = find_run_files(tmp_path / "wandb")
    assert read_run(run_file).exit_code == 143
