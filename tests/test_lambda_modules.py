"""The lambda_* modules through real ansible-playbook runs (ansible-runner) against the fake API.

The API key reaches the modules only through the runner's environment (LAMBDA_API_KEY). Every run
is scanned for it: stdout, job events and every file the runner wrote, except the two files that
hold the environment by design (env/envvars, artifacts/*/command), which the temporary private
data dir takes with it when it is removed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lambda_support import (
    REPO_ROOT,
    SENTINEL_API_KEY,
    SSH_KEY_NAME,
    fake_lambda,
    lambda_client,
    module_env,
    run_playbook,
    secret_leaks,
)

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx9oJ0rXjv5Lp2iQ3Yc2n0Wd8zS6eTqKqX4a1b2c3d4 laptop"
LAUNCH = "/instance-operations/launch"
MUTATING = ("POST", "DELETE", "PUT", "PATCH")


def play(*tasks):
    return [{"name": "Lambda Cloud", "hosts": "localhost", "gather_facts": False, "tasks": list(tasks)}]


def task(title, module, /, ignore_errors=False, check_mode=None, **args):
    entry = {"name": title, module: args}
    if ignore_errors:
        entry["ignore_errors"] = True
    if check_mode is not None:
        entry["check_mode"] = check_mode
    return entry


def instance_task(title, instance, /, **args):
    args = {"name": instance, "instance_type": ["gpu_1x_a10"], "ssh_key_name": SSH_KEY_NAME} | args
    return task(title, "lambda_instance", **args)


def run(api, plays, **kwargs):
    result = run_playbook(plays, envvars=module_env(api), **kwargs)
    assert secret_leaks(result) == []
    assert not Path(result.private_data_dir).exists()
    assert SENTINEL_API_KEY not in json.dumps(api.requests) + "\n".join(api.log)
    assert api.crashes == []
    return result


def launches(api):
    return [(body["instance_type_name"], body["region_name"]) for _, _, body in api.requests_to("POST", LAUNCH)]


@pytest.fixture
def api():
    with fake_lambda(boot_seconds=0.2, terminate_seconds=0.2) as api:
        yield api


def test_lifecycle_failover_idempotence_restart_and_terminate(api, tmp_path):
    # The H100 is listed in us-east-1 but the launch finds no capacity there; the A100 is listed in
    # us-west-1 only. Preference: H100 then A100, us-east-1 then us-west-1.
    api.set_capacity("gpu_1x_h100_sxm5", ["us-east-1"])
    api.set_capacity("gpu_1x_a100_sxm4", ["us-west-1"])
    api.fail_next(LAUNCH, 400, code="instance-operations/launch/insufficient-capacity")
    # Bursts the client must ride out.
    api.fail_next("/instance-types", 429, times=2)
    api.fail_next("/instances", 503, times=2)
    api.fail_next("/instance-operations/terminate", 500, code="global/internal-error")
    api.fail_next("/ssh-keys", 502)
    (tmp_path / "laptop.pub").write_text(PUBLIC_KEY + "\n")
    up = {"instance_type": ["gpu_1x_h100_sxm5", "gpu_1x_a100_sxm4"], "region": ["us-east-1", "us-west-1"],
          "tags": {"run": "r1"}}

    result = run(api, play(
        task("key", "lambda_ssh_key", name="laptop", public_key_file=str(tmp_path / "laptop.pub")),
        task("key again", "lambda_ssh_key", name="laptop", public_key=PUBLIC_KEY.rsplit(" ", 1)[0]),
        # Launch without waiting (so a caller can record the id at once), then wait in a second task.
        instance_task("up", "lt-run-1", wait=False, **up),
        instance_task("up again", "lt-run-1", **up),
        task("info", "lambda_instance_info", name_prefix="lt-", status=["active"]),
        instance_task("restart", "lt-run-1", state="restarted"),
        instance_task("down", "lt-run-1", state="absent"),
        instance_task("down again", "lt-run-1", state="absent"),
        task("key gone", "lambda_ssh_key", name="laptop", state="absent"),
        task("key gone again", "lambda_ssh_key", name="laptop", state="absent"),
    ))
    assert result.status == "successful", result.stdout

    assert result.result("key")["changed"] and result.result("key")["ssh_key"]["public_key"] == PUBLIC_KEY
    assert not result.result("key again")["changed"]

    up_result = result.result("up")
    instance = up_result["instance"]
    assert up_result["changed"] and up_result["launched"]
    assert instance["status"] == "booting" and instance["ip"] is None
    assert (instance["instance_type"], instance["region"]) == ("gpu_1x_a100_sxm4", "us-west-1")
    assert instance["price_cents_per_hour"] == 129 and instance["gpu_description"] == "A100 (40 GB SXM4)"
    assert launches(api) == [("gpu_1x_h100_sxm5", "us-east-1"), ("gpu_1x_a100_sxm4", "us-west-1")]
    # No image given: the module asks for Lambda Stack on Ubuntu 24.04, which the instance boots.
    assert {json.dumps(body.get("image")) for _, _, body in api.requests_to("POST", LAUNCH)} == {
        '{"family": "lambda-stack-24-04"}'}
    assert api.instance_images[instance["id"]]["family"] == "lambda-stack-24-04"
    assert api.instances[instance["id"]]["tags"] == [{"key": "run", "value": "r1"}]

    again = result.result("up again")
    assert not again["changed"] and not again["launched"] and again["instance"]["id"] == instance["id"]
    assert again["instance"]["status"] == "active" and again["instance"]["ip"] == "127.0.0.1"

    info = result.result("info")
    assert [i["id"] for i in info["instances"]] == [instance["id"]]
    types = {t["name"]: t for t in info["instance_types"]}
    assert types["gpu_1x_a100_sxm4"]["regions_with_capacity"] == ["us-west-1"]
    assert info["instance_types"][0]["price_cents_per_hour"] <= info["instance_types"][-1]["price_cents_per_hour"]

    assert result.result("restart")["changed"] and result.result("restart")["instance"]["status"] == "active"
    assert len(api.requests_to("POST", "/instance-operations/restart")) == 1

    down = result.result("down")
    assert down["changed"] and [i["id"] for i in down["instances"]] == [instance["id"]]
    assert down["instance"]["status"] == "terminated"
    assert not result.result("down again")["changed"]
    assert api.instances[instance["id"]]["status"] == "terminated"
    assert result.result("key gone")["changed"] and not result.result("key gone again")["changed"]
    assert {k["name"] for k in api.ssh_keys} == {SSH_KEY_NAME}


def test_check_mode_sends_no_mutating_request(api):
    client = lambda_client(api)
    existing = client.launch(region_name="us-east-1", instance_type_name="gpu_1x_a10",
                             ssh_key_names=[SSH_KEY_NAME], name="lt-existing")[0]
    client.wait_for_instance(existing, timeout=5, interval=0.1)
    seen = len(api.requests)

    result = run(api, play(
        instance_task("new", "lt-new", region=["us-west-2"], check_mode=True),
        instance_task("existing", "lt-existing", check_mode=True),
        instance_task("restart", "lt-existing", state="restarted", check_mode=True),
        instance_task("down", "lt-existing", state="absent", check_mode=True),
        task("key", "lambda_ssh_key", name="laptop", public_key=PUBLIC_KEY, check_mode=True),
        task("key gone", "lambda_ssh_key", name=SSH_KEY_NAME, state="absent", check_mode=True),
    ))
    assert result.status == "successful", result.stdout
    during = api.requests[seen:]
    assert during and [r for r in during if r[0] in MUTATING] == []

    new = result.result("new")
    assert new["changed"] and new["instance"] == {
        "id": None, "name": "lt-new", "status": None, "instance_type": "gpu_1x_a10", "region": "us-west-2"
    }
    assert not result.result("existing")["changed"]
    assert result.result("restart")["changed"] and result.result("down")["changed"]
    assert result.result("down")["instance"]["id"] == existing
    assert result.result("key")["changed"] and result.result("key gone")["changed"]
    assert api.instances[existing]["status"] == "active" and len(api.instances) == 1
    assert SSH_KEY_NAME in {k["name"] for k in api.ssh_keys}


def test_every_error_surfaces_as_a_message_a_person_can_act_on(api, tmp_path):
    api.quota = 0  # checked after the request's own parameters, as the real API does
    api.set_capacity("gpu_8x_h100_sxm5", [])
    api.add_file_system("data-west", region="us-west-1")
    api.add_ssh_key("laptop", PUBLIC_KEY)
    api.fail_next("/instances", 403, code="global/account-inactive")
    # One more than the modules' retries: each burst outlasts exactly one task.
    api.fail_next("/instance-types", 429, times=6)
    api.fail_next("/ssh-keys", 500, times=6)
    private_key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAAPrivateKeyBody\n-----END OPENSSH PRIVATE KEY-----\n"  # fake key material
    (tmp_path / "id_ed25519").write_text(private_key)
    us_east = {"region": ["us-east-1"]}
    cases = {
        "inactive": ("global/account-inactive", "account is not active"),
        "rate limited": ("rate-limited", "gave up after 6 attempts"),
        "quota": ("global/quota-exceeded", "Terminate instances you no longer need"),
        "bad ssh key": ("global/invalid-parameters", "SSH key 'nobody' does not exist"),
        "missing fs": ("global/object-does-not-exist", "File system 'missing' does not exist"),
        "fs elsewhere": ("instance-operations/launch/file-system-in-wrong-region", "Launch in the region"),
        "no capacity": ("instance-operations/launch/insufficient-capacity", "gpu_8x_h100_sxm5 in us-east-1: no capacity listed"),
        "unknown type": ("global/invalid-parameters", "Unknown instance type(s) gpu_1x_a11"),
        "server down": ("server-error", "gave up after 6 attempts"),
        "bad key": ("global/invalid-api-key", "LAMBDA_API_KEY"),
    }
    tasks = [
        task("inactive", "lambda_instance_info", ignore_errors=True),
        task("rate limited", "lambda_instance_info", ignore_errors=True),
        instance_task("quota", "lt-q", ignore_errors=True, **us_east),
        instance_task("bad ssh key", "lt-k", ssh_key_name="nobody", ignore_errors=True, **us_east),
        instance_task("missing fs", "lt-f", file_systems=["missing"], ignore_errors=True, **us_east),
        instance_task("fs elsewhere", "lt-w", file_systems=["data-west"], ignore_errors=True, **us_east),
        instance_task("no capacity", "lt-c", instance_type=["gpu_8x_h100_sxm5"], ignore_errors=True, **us_east),
        instance_task("unknown type", "lt-u", instance_type=["gpu_1x_a11"], ignore_errors=True),
        task("server down", "lambda_ssh_key", name="x", public_key=PUBLIC_KEY, ignore_errors=True),
        # An explicit argument, as a playbook might pass it: no_log keeps it out of the output.
        task("bad key", "lambda_instance_info", api_key="{{ 'not-the-' + lookup('env', 'LAMBDA_API_KEY') }}",
             ignore_errors=True),
    ]
    # Input errors the modules catch before they change anything.
    local_cases = {
        "long name": "name must be 1-64 characters",
        "bad image": "image must be {id: ...} or {family: ...}",
        "private key file": "holds a private key",
        "other key": "registered with a different public key",
    }
    tasks += [
        instance_task("long name", "x" * 65, ignore_errors=True),
        instance_task("bad image", "lt-i", image={"name": "ubuntu"}, ignore_errors=True),
        task("private key file", "lambda_ssh_key", name="k", public_key_file=str(tmp_path / "id_ed25519"),
             ignore_errors=True),
        # Lambda Cloud cannot change a key: a different one under the same name is refused, not replaced.
        task("other key", "lambda_ssh_key", name="laptop", ignore_errors=True,
             public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherOtherOtherOtherOtherOtherOtherOth other"),
    ]
    result = run(api, play(*tasks), verbosity=3)

    for name, (code, advice) in cases.items():
        outcome = result.result(name)
        assert result.failed(name), (name, outcome)
        assert outcome["failure"]["code"] == code, (name, outcome["msg"])
        assert advice in outcome["msg"] and "What to do:" in outcome["msg"], (name, outcome["msg"])
    for name, text in local_cases.items():
        assert result.failed(name) and text in result.result(name)["msg"], name
    assert [k["public_key"] for k in api.ssh_keys if k["name"] == "laptop"] == [PUBLIC_KEY]
    assert "PrivateKeyBody" not in json.dumps(result.events)  # the private key was not echoed
    # Nothing was launched, and the bad key cost exactly one request: no retries.
    assert api.instances == {} and len(api.unauthorized) == 1
    assert len(api.requests_to("GET", "/ssh-keys")) == 6 + 1  # "server down" tried 6 times, "other key" once


def test_an_image_family_the_regions_lack_fails_before_any_launch_and_failover_skips_such_regions(api):
    api.set_image_families("us-east-1", ["lambda-stack-22-04"])
    missing = {"family": "lambda-stack-20-04"}
    east_then_west = {"region": ["us-east-1", "us-west-1"]}
    result = run(api, play(
        instance_task("unknown family", "lt-old", image=missing, ignore_errors=True, **east_then_west),
        instance_task("unknown family, check", "lt-old", image=missing, ignore_errors=True, check_mode=True,
                      **east_then_west),
        instance_task("default family, check", "lt-new", check_mode=True, **east_then_west),
        instance_task("not in us-east-1", "lt-east", region=["us-east-1"], ignore_errors=True),
        instance_task("default family", "lt-new", wait=False, **east_then_west),
    ))
    for name in ("unknown family", "unknown family, check"):
        outcome = result.result(name)
        assert result.failed(name) and outcome["failure"]["code"] == "global/invalid-parameters", outcome
        assert "Image family 'lambda-stack-20-04' is not offered in us-east-1 or us-west-1" in outcome["msg"]
        assert "us-east-1: lambda-stack-22-04; us-west-1: lambda-stack-22-04, lambda-stack-24-04" in outcome["msg"]
    east = result.result("not in us-east-1")
    assert result.failed("not in us-east-1") and "is offered in" in east["msg"] and "us-west-1" in east["msg"]
    # Check mode plans the first region that offers the image, and launches nothing.
    assert result.result("default family, check")["instance"]["region"] == "us-west-1"

    launched = result.result("default family")
    assert launched["launched"] and launched["instance"]["region"] == "us-west-1"
    # The only launch request of the whole play went where the image is.
    assert launches(api) == [("gpu_1x_a10", "us-west-1")]
    assert api.instance_images[launched["instance"]["id"]]["family"] == "lambda-stack-24-04"


def test_the_default_image_family_is_the_same_everywhere():
    import yaml

    from module_utils import lambda_cloud, trainer_config

    config_default = next(key.default for key in trainer_config.KEYS if key.name == "image-family")
    role_default = yaml.safe_load((REPO_ROOT / "roles/launch/defaults/main.yml").read_text())["launch_image_family"]
    assert config_default == role_default == lambda_cloud.DEFAULT_IMAGE_FAMILY == "lambda-stack-24-04"


def test_a_launch_that_never_becomes_active_is_terminated(api):
    api.boot_seconds = 600
    # The first terminate is refused: that instance must be named, with the command that ends it.
    api.fail_next("/instance-operations/terminate", 400, code="global/invalid-parameters")
    result = run(api, play(
        instance_task("stuck, terminate fails", "lt-stuck-1", wait_timeout=1, ignore_errors=True),
        instance_task("stuck", "lt-stuck-2", wait_timeout=1, ignore_errors=True),
    ))
    by_name = {i["name"]: i for i in api.instances.values()}

    kept = result.result("stuck, terminate fails")
    kept_id = by_name["lt-stuck-1"]["id"]
    assert result.failed("stuck, terminate fails") and kept["instance_id"] == kept_id and kept["terminated"] is False
    assert f"Instance {kept_id}" in kept["msg"] and "terminating it FAILED" in kept["msg"]
    assert "still billing" in kept["msg"] and f'"instance_ids": ["{kept_id}"]' in kept["msg"]
    assert by_name["lt-stuck-1"]["status"] == "booting"

    ended = result.result("stuck")
    ended_id = by_name["lt-stuck-2"]["id"]
    assert result.failed("stuck") and ended["instance_id"] == ended_id and ended["terminated"] is True
    assert f"Instance {ended_id}" in ended["msg"] and "so it was terminated" in ended["msg"]
    assert by_name["lt-stuck-2"]["status"] in ("terminating", "terminated")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_run_stopped_while_waiting_terminates_what_it_launched(api, tmp_path, signum):
    api.boot_seconds = 600
    (tmp_path / "play.yml").write_text(json.dumps(play(instance_task("up", "lt-stopped", wait_timeout=300))))
    (tmp_path / "hosts").write_text(f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}\n")
    env = {**os.environ, **module_env(api), "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg")}
    # Its own process group, as a terminal's foreground job: Ctrl-C and `kill -- -PGID` reach every process.
    playbook = subprocess.Popen(
        ["ansible-playbook", "-i", str(tmp_path / "hosts"), str(tmp_path / "play.yml")],
        cwd=REPO_ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert _until(lambda: api.requests_to("GET", "/instances/"), 60), "the module never started waiting"
        os.killpg(playbook.pid, signum)
        playbook.communicate(timeout=60)
        assert _until(lambda: api.requests_to("POST", "/instance-operations/terminate"), 15)
    finally:
        if playbook.poll() is None:
            os.killpg(playbook.pid, signal.SIGKILL)
            playbook.wait()
    (instance,) = api.instances.values()
    assert instance["name"] == "lt-stopped" and instance["status"] in ("terminating", "terminated")


def _until(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_module_docs_render_with_the_shared_options():
    output = subprocess.run(
        ["ansible-doc", "-M", "library", "lambda_instance", "lambda_instance_info", "lambda_ssh_key"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1", "PAGER": "cat"},
    )
    assert output.returncode == 0, output.stderr
    text = output.stdout
    for expected in (
        "MODULE lambda_instance ",
        "MODULE lambda_instance_info ",
        "MODULE lambda_ssh_key ",
        "LAMBDA_API_KEY",  # from the shared doc fragment
        "LAMBDA_API_URL",
        "wait_timeout",
        "price_cents_per_hour",
        "regions_with_capacity",
        "public_key_file",
        "lambda-stack-24-04",
        "GET /images",
    ):
        assert expected in text, expected
    assert text.count("api_key") >= 3 and "ERROR" not in output.stderr
