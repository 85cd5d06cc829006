"""The fake Lambda API keeps the contract of the real one (shapes, codes, lifecycles)."""

import json
import re
import time

import pytest
import requests

from tests.lambda_support import SENTINEL_API_KEY, SSH_KEY_NAME, fake_lambda, start_fake_lambda_process

LAUNCH_BODY = {"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": [SSH_KEY_NAME]}


@pytest.fixture
def api():
    with fake_lambda(boot_seconds=0.1, forget_seconds=0.3) as api:
        yield api


def call(api, method, path, body=None, key=SENTINEL_API_KEY, **kwargs):
    kwargs.setdefault("headers", {"Authorization": f"Bearer {key}"})
    return requests.request(method, api.url + path, json=body, timeout=5, **kwargs)


def test_instance_shape_and_lifecycle(api):
    reply = call(api, "POST", "/instance-operations/launch", {**LAUNCH_BODY, "name": "shape"})
    assert reply.status_code == 200
    (instance_id,) = reply.json()["data"]["instance_ids"]
    assert re.fullmatch(r"[0-9a-f]{32}", instance_id)

    booting = call(api, "GET", f"/instances/{instance_id}").json()["data"]
    assert booting["status"] == "booting" and booting["ip"] is None
    assert booting["region"] == {"name": "us-east-1", "description": "Virginia, USA"}
    assert booting["instance_type"]["price_cents_per_hour"] == 75
    assert set(booting["instance_type"]["specs"]) == {"vcpus", "memory_gib", "storage_gib", "gpus"}
    time.sleep(0.15)
    active = call(api, "GET", f"/instances/{instance_id}").json()["data"]
    assert active["status"] == "active" and active["ip"] == "127.0.0.1"

    terminated = call(api, "POST", "/instance-operations/terminate", {"instance_ids": [instance_id]})
    assert terminated.json()["data"]["terminated_instances"][0]["status"] == "terminating"
    time.sleep(0.25)
    assert call(api, "GET", "/instances").json()["data"][0]["status"] == "terminated"
    time.sleep(0.35)  # terminated instances drop out of the listing after a while
    assert call(api, "GET", "/instances").json()["data"] == []
    gone = call(api, "GET", f"/instances/{instance_id}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "global/object-does-not-exist"


def test_auth(api):
    refused = call(api, "GET", "/instances", key="wrong")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "global/invalid-api-key"
    assert call(api, "GET", "/instances", headers={}).status_code == 401
    assert call(api, "GET", "/instances", headers=None, auth=(SENTINEL_API_KEY, "")).status_code == 200
    api.account_active = False
    assert call(api, "GET", "/instances").json()["error"]["code"] == "global/account-inactive"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"quantity": 2}, "global/invalid-parameters"),
        ({"region_name": "mars-1"}, "global/invalid-parameters"),
        ({"instance_type_name": "gpu_9x_nope"}, "global/invalid-parameters"),
        ({"ssh_key_names": []}, "global/invalid-parameters"),
        ({"name": "x" * 65}, "global/invalid-parameters"),
        ({"file_system_names": ["missing"]}, "global/object-does-not-exist"),
        ({"region_name": "asia-northeast-1"}, "instance-operations/launch/insufficient-capacity"),
    ],
)
def test_launch_errors(api, change, code):
    api.set_capacity("gpu_1x_a10", ["us-east-1"])
    reply = call(api, "POST", "/instance-operations/launch", {**LAUNCH_BODY, **change})
    assert reply.status_code == 400 or code.endswith("does-not-exist")
    assert reply.json()["error"]["code"] == code
    assert api.instances == {}


def test_images_list_both_lambda_stack_families_in_every_region(api):
    images = call(api, "GET", "/images").json()["data"]
    families = {}
    for image in images:
        assert re.fullmatch(r"[0-9a-f]{32}", image["id"]) and image["architecture"] == "x86_64"
        assert set(image) >= {"name", "description", "family", "version", "created_time", "updated_time"}
        families.setdefault(image["region"]["name"], set()).add(image["family"])
    assert families["us-east-1"] == families["asia-northeast-1"] == {"lambda-stack-22-04", "lambda-stack-24-04"}
    assert len({image["id"] for image in images}) == len(images)  # one image per family and region
    api.set_image_families("us-west-3", ["lambda-stack-22-04"])
    listed = call(api, "GET", "/images").json()["data"]
    assert {i["family"] for i in listed if i["region"]["name"] == "us-west-3"} == {"lambda-stack-22-04"}


def test_launch_boots_the_image_asked_for_or_the_api_default(api):
    images = call(api, "GET", "/images").json()["data"]
    by_family = {i["family"]: i for i in images if i["region"]["name"] == "us-east-1"}
    booted = {}
    for image in ({"family": "lambda-stack-24-04"}, {"id": by_family["lambda-stack-22-04"]["id"]}, None):
        body = LAUNCH_BODY if image is None else {**LAUNCH_BODY, "image": image}
        (instance_id,) = call(api, "POST", "/instance-operations/launch", body).json()["data"]["instance_ids"]
        booted[json.dumps(image)] = api.instance_images[instance_id]
        assert "image" not in call(api, "GET", f"/instances/{instance_id}").json()["data"]  # not in the API's shape
    assert [image["family"] for image in booted.values()] == ["lambda-stack-24-04", "lambda-stack-22-04",
                                                              "lambda-stack-22-04"]
    assert all(image["region"]["name"] == "us-east-1" for image in booted.values())


@pytest.mark.parametrize(
    "image",
    [{"family": "lambda-stack-18-04"}, {"family": "lambda-stack-24-04"}, {"id": "0" * 32},
     {"name": "ubuntu"}, {"family": "lambda-stack-24-04", "id": "x"}, "lambda-stack-24-04"],
    ids=["unknown family", "family not in region", "unknown id", "other key", "two keys", "not an object"],
)
def test_launch_with_an_image_the_region_lacks_is_invalid(api, image):
    api.set_image_families("us-east-1", ["lambda-stack-22-04"])
    reply = call(api, "POST", "/instance-operations/launch", {**LAUNCH_BODY, "image": image})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "global/invalid-parameters"
    assert api.instances == {} and api.instance_images == {} and api.crashes == []


def test_launch_rate_limit_and_injected_bursts(api):
    api.launch_interval = 5
    assert call(api, "POST", "/instance-operations/launch", LAUNCH_BODY).status_code == 200
    limited = call(api, "POST", "/instance-operations/launch", LAUNCH_BODY)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    api.fail_next("/instances", 503, times=2)
    assert [call(api, "GET", "/instances").status_code for _ in range(3)] == [503, 503, 200]
    api.fail_next("/ssh-keys", 500, code="global/internal-error")
    assert call(api, "GET", "/ssh-keys").json() == {
        "error": {"code": "global/internal-error", "message": "Injected failure 500."}
    }
    assert api.crashes == []


def test_capacity_listing_follows_set_capacity(api):
    api.set_capacity("gpu_1x_h100_sxm5", ["us-south-1"])
    types = call(api, "GET", "/instance-types").json()["data"]
    assert [r["name"] for r in types["gpu_1x_h100_sxm5"]["regions_with_capacity_available"]] == ["us-south-1"]
    assert types["gpu_1x_a10"]["instance_type"]["name"] == "gpu_1x_a10"


def test_runs_as_a_process_and_persists_state(tmp_path):
    state_file = tmp_path / "state.json"
    process, url = start_fake_lambda_process(state_file, extra_args=[
        "--boot-seconds", "0", "--ssh-port", "2222", "--image-families", "us-west-3=lambda-stack-22-04"])
    try:
        assert url.endswith("/api/v1")
        headers = {"Authorization": f"Bearer {SENTINEL_API_KEY}"}
        reply = requests.post(f"{url}/instance-operations/launch", json=LAUNCH_BODY, headers=headers, timeout=5)
        (instance_id,) = reply.json()["data"]["instance_ids"]
        state = json.loads(state_file.read_text())
        assert state["launches"] == 1 and state["ssh_port"] == 2222
        assert state["instances"][0]["id"] == instance_id
        assert state["instance_images"][instance_id]["family"] == "lambda-stack-22-04"
        images = requests.get(f"{url}/images", headers=headers, timeout=5).json()["data"]
        assert {i["family"] for i in images if i["region"]["name"] == "us-west-3"} == {"lambda-stack-22-04"}
        requests.post(
            f"{url}/instance-operations/terminate", json={"instance_ids": [instance_id]}, headers=headers, timeout=5
        )
        assert json.loads(state_file.read_text())["instances"][0]["status"] == "terminating"
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert process.returncode == 0
