"""The playbooks end to end, run the way a user runs them (ansible-playbook / ansible-runner as
processes), against a real sshd on 127.0.0.1 playing the GPU instance, the fake Lambda API and the fake
Hugging Face Hub: launch, copy, configure, install, train the tiny model, push, fetch, terminate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hub_support import REPO_ROOT
from tests.roles_support import (
    ASYNC_DIR,
    BOOT_SECONDS,
    HF_SENTINEL,
    LAMBDA_SENTINEL,
    MODEL_REPO,
    SENTINELS,
    SSH_KEY_NAME,
    WANDB_SENTINEL,
    PlaybookRig,
    ProcessListWatch,
    alive,
    children,
    files_containing,
    stub_job,
)

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    with PlaybookRig(tmp_path_factory.mktemp("roles-e2e")) as rig:
        yield rig


def secret_scan_roots(rig: PlaybookRig) -> list[Path]:
    """Everything a run leaves on the instance and the controller, but the user's own config file."""
    roots = [rig.root / "instance", rig.fetch_dir, rig.root / "bundles", rig.root / "known_hosts", ASYNC_DIR,
             Path.home() / ".ansible" / "tmp"]
    return [root for root in roots if root.exists()]


# -- settings fail before anything is launched ------------------------------------------------------


def test_missing_dataset_fails_at_the_start_naming_the_key(rig):
    launches = len(rig.api.requests_to("POST", "/instance-operations/launch"))
    result = rig.playbook("train.yml", config_file=str(rig.write_config_copy(dataset=None)))
    assert result.returncode != 0
    assert "dataset: is required" in result.stdout
    assert "Launch (or reuse)" not in result.stdout
    assert len(rig.api.requests_to("POST", "/instance-operations/launch")) == launches


def test_unknown_config_key_names_the_closest_key_and_line(rig):
    path = rig.write_config_copy(**{"max-step": 3})
    result = rig.playbook("up.yml", config_file=str(path))
    assert result.returncode != 0
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if '"max-step"' in text)
    assert f"{path}:{line}: max-step: unknown key; did you mean 'max-steps'?" in result.stdout


def test_a_secret_passed_as_extra_var_is_refused(rig):
    result = rig.playbook("up.yml", hf_token="hf_passed_on_the_command_line")
    assert result.returncode != 0
    assert "hugging-face--access-token: is a secret and cannot be passed as an Ansible variable" in result.stdout


def test_variables_override_the_config_file_and_are_typed(rig):
    """-e max_steps=7 (a string on the command line) beats the file's 4 and reaches the job config."""
    settings = subprocess.run(
        ["ansible", "localhost", "-m", "trainer_config", "-a",
         json.dumps({"config_file": str(rig.config_file), "variables": {"max_steps": "7"}, "run_id": "r1"})],
        cwd=REPO_ROOT, env={**rig.environment(), "ANSIBLE_CALLBACK_RESULT_FORMAT": "json"},
        capture_output=True, text=True)
    assert settings.returncode == 0, settings.stdout + settings.stderr
    reply = json.loads(settings.stdout.split("=>", 1)[1])
    assert reply["job"]["max_steps"] == 7 and reply["sources"]["max_steps"] == "variable"
    assert reply["job"]["dataset"] == "data/chats" and reply["local_dataset"] == str(rig.dataset)
    assert reply["job_secret_env"] == {"HF_TOKEN": HF_SENTINEL, "WANDB_API_KEY": WANDB_SENTINEL}
    assert reply["secrets"]["lambda_api_key"] == LAMBDA_SENTINEL
    assert not any(secret in json.dumps(reply["settings"]) for secret in SENTINELS)


# -- the whole lifecycle ----------------------------------------------------------------------------


@pytest.mark.slow
def test_train_playbook_runs_the_whole_lifecycle_without_leaking_secrets(rig):
    env_file = rig.remote_dir / "secrets.env"
    with ProcessListWatch() as watch:
        modes = []
        run = rig.start_playbook("train.yml", instance_name="lt-e2e-main", run_id="main-1")
        while run.proc.poll() is None:
            if env_file.exists():
                modes.append(env_file.stat().st_mode & 0o777)
            time.sleep(0.2)
    stdout = run.stdout
    assert run.proc.returncode == 0, stdout[-6000:]

    # Launched once, terminated at the end.
    [instance] = rig.instances_named("lt-e2e-main")
    assert instance["status"] in ("terminating", "terminated")
    assert "The instance was terminated." in stdout

    # Trained, pushed to the Hub, result and log fetched to the controller.
    result = json.loads((rig.fetch_dir / "main-1" / "result.json").read_text())
    assert result["status"] == "succeeded" and result["steps"] == 4 and result["backend"]["name"] == "cpu"
    assert result["hub"]["repo"] == MODEL_REPO
    pushed = rig.hub.list_files(MODEL_REPO)
    assert {"model.safetensors", "adapter/adapter_model.safetensors", "README.md"} <= set(pushed)
    log = (rig.fetch_dir / "main-1" / "train.log").read_text()
    assert '"event": "step"' in log and '"event": "done"' in log
    # The push was confirmed, so the model was not fetched as well.
    assert not (rig.fetch_dir / "main-1" / "merged").exists()
    assert not (rig.run_dir("main-1") / "outputs-fetched").exists()

    # Layout on the instance; the env file was 0600 while it existed, and is gone now.
    assert (rig.remote_dir / "job" / "trainjob" / "train.py").exists()
    assert (rig.remote_dir / "data" / "chats" / "train.jsonl").exists()
    assert json.loads((rig.remote_dir / "job.json").read_text())["dataset"] == "data/chats"
    assert modes and set(modes) == {0o600}
    assert not env_file.exists()

    # Ansible's async job file was cleaned up.
    jid = (rig.run_dir("main-1") / "ansible_job_id").read_text().strip()
    assert not (ASYNC_DIR / jid).exists()

    # No secret anywhere: output, process list, files on the instance and the controller.
    assert not [s for s in SENTINELS if s in stdout]
    assert watch.samples > 10 and watch.hits == []
    assert files_containing(secret_scan_roots(rig)) == []


@pytest.mark.slow
def test_install_twice_changes_nothing_the_second_time_and_down_is_idempotent(rig):
    up = rig.playbook("up.yml", instance_name="lt-e2e-install")
    assert up.returncode == 0, up.stdout[-4000:]
    old_python = Path.home() / ".pyenv/versions/3.10.13/bin/python3"
    if old_python.exists():  # an Ubuntu 22.04-like Python: refused at once, with what to do
        refused = rig.playbook("install.yml", instance_name="lt-e2e-install", instance_python=str(old_python))
        assert refused.returncode != 0
        assert "is Python 3.10; the training stack needs Python 3.11 or newer" in refused.stdout
    first = rig.playbook("install.yml", instance_name="lt-e2e-install")
    assert first.returncode == 0, first.stdout[-4000:]
    second = rig.playbook("install.yml", instance_name="lt-e2e-install")
    assert second.returncode == 0, second.stdout[-4000:]
    assert second.recap("lt-e2e-install")["changed"] == 0
    assert second.recap("localhost")["changed"] == 0
    assert second.seconds < 30, f"a second install took {second.seconds:.1f}s"

    for attempt in range(2):
        down = rig.playbook("down.yml", instance_name="lt-e2e-install")
        assert down.returncode == 0, down.stdout[-4000:]
        assert down.recap("localhost")["changed"] == (1 if attempt == 0 else 0)
    [instance] = rig.instances_named("lt-e2e-install")
    assert instance["status"] in ("terminating", "terminated")


@pytest.mark.slow
def test_a_crashing_job_fails_the_play_with_its_last_log_lines_and_still_terminates(rig):
    run = rig.start_playbook("train.yml", instance_name="lt-e2e-crash", run_id="crash-1")
    rig.wait_for_log("crash-1", r'"event": "step"')
    # The job dies mid-training as an out-of-memory kill would end it.
    [job] = children(rig.launcher_pid("crash-1"))
    os.kill(job, signal.SIGKILL)
    assert run.wait(timeout=300) != 0
    stdout = run.stdout

    assert "The training run crash-1 on lt-e2e-crash failed with exit code 137" in stdout
    assert '"event": "step"' in stdout.split("failed with exit code 137", 1)[1]
    [instance] = rig.instances_named("lt-e2e-crash")
    assert instance["status"] in ("terminating", "terminated")
    assert not (rig.remote_dir / "secrets.env").exists()
    assert (rig.fetch_dir / "crash-1" / "train.log").exists()


@pytest.mark.slow
def test_the_job_survives_the_connection_and_the_controller_and_a_reattach_sees_it_finish(rig, tmp_path):
    import ansible_runner

    run = rig.start_playbook("train.yml", instance_name="lt-e2e-drop", run_id="drop-1")
    rig.wait_for_log("drop-1", r'"event": "step"')
    launcher = rig.launcher_pid("drop-1")
    # Hold the job still (the tiny model would otherwise finish before the reattach starts); it is
    # let go once the reattach sees it running.
    [job] = children(launcher)
    os.kill(job, signal.SIGSTOP)

    # The SSH connection drops: the play reconnects and goes on polling.
    polls_before = run.stdout.count("RETRYING")
    assert rig.sshd.kill_connections() > 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and run.stdout.count("RETRYING") < polls_before + 3:
        time.sleep(0.2)
    assert run.stdout.count("RETRYING") >= polls_before + 3, run.stdout[-4000:]
    assert run.proc.poll() is None, run.stdout[-4000:]

    # Then the controller dies with its connections: the job is still there.
    run.kill()
    rig.sshd.kill_connections()
    assert alive(launcher) and alive(job)
    assert not (rig.run_dir("drop-1") / "exit_code").exists()

    # Reattach, as `lt logs -f` does: through ansible-runner, secrets in a 0600 env file (not in the
    # runner's environment), progress in runner_retry events.
    secrets_file = tmp_path / "secrets" / "lt.env"
    secrets_file.parent.mkdir(mode=0o700)
    secrets_file.write_text(f"LAMBDA_API_KEY={LAMBDA_SENTINEL}\nHF_TOKEN={HF_SENTINEL}\n")
    secrets_file.chmod(0o600)
    events = []

    def on_event(event):
        events.append(event)
        if event["event"] == "runner_retry":
            os.kill(job, signal.SIGCONT)
        return True

    private = tmp_path / "runner"
    private.mkdir()
    runner = ansible_runner.run(
        private_data_dir=str(private), project_dir=str(REPO_ROOT), playbook="playbooks/reattach.yml",
        extravars=rig.extravars(instance_name="lt-e2e-drop", trainer_env_file=str(secrets_file)),
        envvars={"LAMBDA_LAUNCH_INTERVAL": "0", "ANSIBLE_NOCOLOR": "1"}, quiet=True, event_handler=on_event)
    if alive(job):  # the reattach failed before its first poll: let the job go anyway
        os.kill(job, signal.SIGCONT)
    stdout = runner.stdout.read()
    assert runner.status == "successful", stdout[-6000:]

    retries = [e["event_data"]["res"] for e in events if e["event"] == "runner_retry"]
    assert retries, "the reattach never saw the job running"
    assert all(res["state"] == "running" for res in retries)
    assert any('"event": "step"' in line for res in retries for line in res["tail"])
    assert retries[-1]["progress"]["event"] in ("step", "eval", "stage", "done")

    result = json.loads((rig.fetch_dir / "drop-1" / "result.json").read_text())
    assert result["status"] == "succeeded" and result["steps"] == 4
    jid = (rig.run_dir("drop-1") / "ansible_job_id").read_text().strip()
    assert not (ASYNC_DIR / jid).exists()
    assert files_containing([private]) == []
    assert not [s for s in SENTINELS if s in stdout]

    logs = rig.playbook("logs.yml", instance_name="lt-e2e-drop")
    assert logs.returncode == 0, logs.stdout[-4000:]
    assert "Training run drop-1 is succeeded" in logs.stdout and '"event": "done"' in logs.stdout

    down = rig.playbook("down.yml", instance_name="lt-e2e-drop")
    assert down.returncode == 0, down.stdout[-4000:]
    [instance] = rig.instances_named("lt-e2e-drop")
    assert instance["status"] in ("terminating", "terminated")


@pytest.mark.slow
def test_an_instance_that_stops_answering_is_still_terminated(rig, tmp_path):
    """The instance goes away while the run is followed: the play fails fast and still terminates."""
    run = rig.start_playbook("train.yml", instance_name="lt-e2e-gone", run_id="gone-1",
                             files_job_src=str(stub_job(tmp_path)), files_examples_src="")
    try:
        deadline = time.monotonic() + 120
        while "TASK [train : Follow the training job" not in run.stdout and time.monotonic() < deadline:
            time.sleep(0.05)
        rig.sshd.stop()
        assert run.wait(timeout=300) != 0
    finally:
        rig.sshd.start()
    assert "lt-e2e-gone stopped answering" in run.stdout
    [instance] = rig.instances_named("lt-e2e-gone")
    assert instance["status"] in ("terminating", "terminated")
    # A real instance takes Ansible's async record with it; this one is the test machine.
    for record in files_containing([ASYNC_DIR], secrets=[str(rig.run_dir("gone-1"))]):
        Path(record).unlink(missing_ok=True)


# -- a model that is not pushed comes to the controller before the instance goes ---------------------


@pytest.mark.slow
def test_a_run_without_a_hub_repo_brings_the_model_to_the_controller_before_terminating(rig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = rig.write_config_copy(**{"hub-repo": None})
    result = rig.playbook("train.yml", config_file=str(config), instance_name="lt-e2e-fetch", run_id="fetch-1")
    assert result.returncode == 0, result.stdout[-6000:]

    # The merged model, the adapter and the rest of the output folder are on the controller.
    fetched = rig.fetch_dir / "fetch-1"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (fetched / "merged").iterdir()}
    assert (fetched / "adapter" / "adapter_model.safetensors").exists()
    assert (fetched / "README.md").exists() and (fetched / "loss.png").exists()
    assert not json.loads((fetched / "result.json").read_text())["hub"].get("confirmed")
    assert not (fetched / "outputs.tar").exists()
    model = AutoModelForCausalLM.from_pretrained(fetched / "merged")
    tokenizer = AutoTokenizer.from_pretrained(fetched / "merged")
    assert model.config.model_type == "llama" and tokenizer("cat")["input_ids"]

    # Byte for byte what the job wrote on the instance.
    job = json.loads((rig.remote_dir / "job.json").read_text())
    remote_merged = rig.remote_dir / job["output_dir"] / "merged" / "model.safetensors"
    assert (fetched / "merged" / "model.safetensors").read_bytes() == remote_merged.read_bytes()

    # The watchdog's marker was written (and the archive removed) before the instance was terminated.
    marker = json.loads((rig.run_dir("fetch-1") / "outputs-fetched").read_text())
    assert marker["fetched_to"] == str(fetched) and len(marker["checksum"]) == 40
    assert not (rig.run_dir("fetch-1") / "outputs.tar").exists()
    stdout = result.stdout
    assert stdout.index("TASK [train : Record on the instance that the outputs are on the controller]") < stdout.index(
        "TASK [teardown : Terminate instance lt-e2e-fetch]")
    [instance] = rig.instances_named("lt-e2e-fetch")
    assert instance["status"] in ("terminating", "terminated")
    assert f"Outputs: {fetched}/." in stdout


@pytest.mark.slow
def test_outputs_that_cannot_be_fetched_keep_the_instance_and_the_play_says_what_to_do(rig, tmp_path):
    job = stub_job(tmp_path)
    common = {"files_job_src": str(job), "files_examples_src": "", "instance_name": "lt-e2e-keep"}
    # A fetch folder below a regular file cannot be created, whoever runs the play.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    terminations = len(rig.api.requests_to("POST", "/instance-operations/terminate"))
    try:
        result = rig.playbook("train.yml", run_id="keep-1", train_fetch_dir=str(blocker / "outputs"), **common)
        stdout = result.stdout
        assert result.returncode != 0
        assert "The outputs of training run keep-1" in stdout and "are only on lt-e2e-keep" in stdout
        assert "INSTANCE lt-e2e-keep WAS NOT TERMINATED" in stdout
        assert "playbooks/reattach.yml" in stdout and "-e run_id=keep-1" in stdout
        assert "lt down keep-1" in stdout and "ansible-playbook playbooks/down.yml" in stdout
        assert "-e instance_name=lt-e2e-keep" in stdout
        assert len(rig.api.requests_to("POST", "/instance-operations/terminate")) == terminations
        assert "Fetch the run's result and log: " in stdout and "One or more items failed" not in stdout
        [instance] = rig.instances_named("lt-e2e-keep")
        assert instance["status"] == "active"
        # Not marked safe for the watchdog; the job's secrets are gone all the same.
        assert not (rig.run_dir("keep-1") / "outputs-fetched").exists()
        assert not (rig.remote_dir / "secrets.env").exists()

        # What the message says works: the reattach brings the outputs back and marks them.
        fetched = rig.playbook("reattach.yml", run_id="keep-1", instance_name="lt-e2e-keep")
        assert fetched.returncode == 0, fetched.stdout[-4000:]
        assert json.loads((rig.fetch_dir / "keep-1" / "result.json").read_text())["status"] == "succeeded"
        assert (rig.run_dir("keep-1") / "outputs-fetched").exists()
    finally:
        down = rig.playbook("down.yml", instance_name="lt-e2e-keep")
    assert down.returncode == 0, down.stdout[-4000:]
    [instance] = rig.instances_named("lt-e2e-keep")
    assert instance["status"] in ("terminating", "terminated")


# -- ~ in trainer_dir is one folder for every role ----------------------------------------------------


@pytest.mark.slow
def test_a_home_that_differs_from_the_account_is_one_trainer_folder_for_every_role(rig, tmp_path):
    """HOME points elsewhere than the password database: copy/template and the modules agree on ~."""
    import pwd

    home = tmp_path / "home"
    home.mkdir()
    account_dir = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".local" / "share" / "llama-trainer"
    existed = account_dir.exists()
    result = rig.playbook("local.yml", env={"HOME": str(home)}, trainer_dir="~/.local/share/llama-trainer",
                          files_job_src=str(stub_job(tmp_path)), files_examples_src="", run_id="home-1",
                          instance_python=sys.executable)
    assert result.returncode == 0, result.stdout[-4000:]
    trainer_dir = home / ".local" / "share" / "llama-trainer"
    assert json.loads((trainer_dir / "job.json").read_text())["run_id"] == "home-1"
    assert (trainer_dir / "job" / "trainjob" / "train.py").exists()
    assert (trainer_dir / "runs" / "home-1" / "exit_code").read_text().strip() == "0"
    assert json.loads((rig.fetch_dir / "home-1" / "result.json").read_text())["status"] == "succeeded"
    if not existed:
        assert not account_dir.exists()


# -- the same roles on this machine, and what orchestration costs ---------------------------------


@pytest.mark.slow
def test_local_playbook_runs_the_same_roles_here(rig, tmp_path):
    job = stub_job(tmp_path)
    local_dir = tmp_path / "local" / "llama-trainer"
    launches = len(rig.api.requests_to("POST", "/instance-operations/launch"))
    result = rig.playbook("local.yml", trainer_dir=str(local_dir), files_job_src=str(job), files_examples_src="",
                          run_id="local-1", instance_python=sys.executable)
    assert result.returncode == 0, result.stdout[-4000:]
    assert json.loads((rig.fetch_dir / "local-1" / "result.json").read_text())["status"] == "succeeded"
    assert (local_dir / "venv" / "bin" / "python").exists()
    assert not (local_dir / "secrets.env").exists()
    assert len(rig.api.requests_to("POST", "/instance-operations/launch")) == launches


@pytest.mark.slow
def test_orchestration_overhead_against_a_plain_ssh_script(rig, tmp_path, record_property):
    """Everything but the job and the fake boot delay, train.yml vs. the same steps with ssh/scp."""
    job = stub_job(tmp_path)
    common = {"files_job_src": str(job), "files_examples_src": ""}
    warm = rig.playbook("train.yml", instance_name="lt-e2e-warm", run_id="warm-1", **common)
    assert warm.returncode == 0, warm.stdout[-4000:]

    playbook = rig.playbook("train.yml", instance_name="lt-e2e-timed", run_id="timed-1", **common)
    assert playbook.returncode == 0, playbook.stdout[-4000:]
    playbook_job = job_seconds(rig.run_dir("timed-1"))

    plain_seconds, plain_job = run_plain_script(rig, tmp_path, job, run_id="plain-1")

    playbook_overhead = playbook.seconds - playbook_job - BOOT_SECONDS
    plain_overhead = plain_seconds - plain_job - BOOT_SECONDS
    ratio = playbook_overhead / plain_overhead
    report = {"playbook_seconds": round(playbook.seconds, 2), "playbook_job_seconds": round(playbook_job, 2),
              "playbook_overhead_seconds": round(playbook_overhead, 2), "plain_seconds": round(plain_seconds, 2),
              "plain_job_seconds": round(plain_job, 2), "plain_overhead_seconds": round(plain_overhead, 2),
              "ratio": round(ratio, 2)}
    record_property("orchestration_overhead", report)
    print("orchestration overhead:", json.dumps(report))
    (rig.root / "overhead.json").write_text(json.dumps(report, indent=2))
    assert ratio < 4, report


def job_seconds(run_dir: Path) -> float:
    """How long the launcher ran: from its pid file to its exit status."""
    return (run_dir / "exit_code").stat().st_mtime - (run_dir / "train.pid").stat().st_mtime


def run_plain_script(rig: PlaybookRig, tmp_path: Path, job: Path, run_id: str) -> tuple[float, float]:
    job_json = tmp_path / "plain-job.json"
    job_json.write_text(json.dumps({"run_id": run_id, "dataset": "data/chats",
                                    "output_dir": f"runs/{run_id}/outputs"}))
    env_file = tmp_path / "plain-secrets.env"
    env_file.write_text(f"HF_TOKEN='{HF_SENTINEL}'\n")
    env_file.chmod(0o600)
    env = {**rig.environment(),
           "API_URL": rig.api.url, "API_KEY": LAMBDA_SENTINEL, "INSTANCE_NAME": "lt-e2e-plain",
           "INSTANCE_TYPE": "gpu_1x_a10", "KEY_NAME": SSH_KEY_NAME, "PUBLIC_KEY_FILE": f"{rig.sshd.client_key}.pub",
           "SSH_KEY": str(rig.sshd.client_key), "SSH_PORT": str(rig.sshd.port), "SSH_USER": rig.sshd.user,
           "REMOTE_DIR": str(rig.remote_dir), "JOB_SRC": str(job), "DATASET": str(rig.dataset),
           "JOB_JSON": str(job_json), "ENV_FILE": str(env_file), "PYTHON": str(rig.remote_dir / "venv/bin/python"),
           "RUN_ID": run_id, "LAUNCHER": str(REPO_ROOT / "roles/train/files/launch.sh"),
           "FETCH_DIR": str(tmp_path / "plain-outputs"), "POLL_SECONDS": "1"}
    started = time.monotonic()
    proc = subprocess.run(["bash", str(REPO_ROOT / "tests" / "plain_ssh_train.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "plain-outputs" / "result.json").read_text())["status"] == "succeeded"
    return seconds, job_seconds(rig.run_dir(run_id))
