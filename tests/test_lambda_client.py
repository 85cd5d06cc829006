"""The Lambda Cloud client against the fake API over real HTTP on 127.0.0.1."""

import logging
import socket
import threading
import time

import pytest

from module_utils.lambda_cloud import (
    DEFAULT_IMAGE_FAMILY,
    AccountInactive,
    FileSystemInWrongRegion,
    InstanceNotReady,
    InsufficientCapacity,
    InvalidApiKey,
    InvalidParameters,
    LambdaCloudClient,
    LambdaCloudError,
    ObjectDoesNotExist,
    QuotaExceeded,
    RateLimited,
    ServerError,
)
from tests.lambda_support import SENTINEL_API_KEY, SSH_KEY_NAME, fake_lambda, lambda_client

LAUNCH = "/instance-operations/launch"


@pytest.fixture
def api():
    with fake_lambda(boot_seconds=0.2) as api:
        yield api


@pytest.fixture
def client(api):
    return lambda_client(api)


def launch_one(client, **kwargs):
    kwargs = {"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": [SSH_KEY_NAME]} | kwargs
    return client.launch(**kwargs)


def test_launch_wait_terminate(api, client):
    ids = launch_one(client, name="run-1", tags=[{"key": "run", "value": "1"}], user_data="#cloud-config\n")
    assert len(ids) == 1 and len(ids[0]) == 32
    body = api.requests_to("POST", LAUNCH)[0][2]
    assert body == {
        "region_name": "us-east-1",
        "instance_type_name": "gpu_1x_a10",
        "ssh_key_names": [SSH_KEY_NAME],
        "name": "run-1",
        "tags": [{"key": "run", "value": "1"}],
        "user_data": "#cloud-config\n",
    }
    assert client.get_instance(ids[0])["status"] == "booting"
    instance = client.wait_for_instance(ids[0], timeout=10, interval=0.1)
    assert instance["status"] == "active" and instance["ip"] == "127.0.0.1"
    assert [i["id"] for i in client.find_instances_by_name("run-1")] == ids

    terminated = client.terminate(ids)
    assert terminated[0]["id"] == ids[0] and terminated[0]["status"] == "terminating"
    time.sleep(0.3)
    assert client.get_instance(ids[0])["status"] == "terminated"
    assert client.find_instances_by_name("run-1") == []


def test_key_is_sent_as_bearer_and_kept_out_of_repr_errors_and_logs(api, client, caplog):
    caplog.set_level(logging.DEBUG)
    assert SENTINEL_API_KEY not in repr(client) and SENTINEL_API_KEY not in str(vars(client))
    api.fail_next("/instances", 500, code="global/internal-error", message=f"bad key {SENTINEL_API_KEY}")
    api.fail_next("/ssh-keys", 400, code="global/invalid-parameters", message=f"echo {SENTINEL_API_KEY}")
    client.list_instances()  # survives the 500
    with pytest.raises(InvalidParameters) as caught:
        client.list_ssh_keys()
    assert SENTINEL_API_KEY not in str(caught.value) and "***" in str(caught.value)
    assert SENTINEL_API_KEY not in caplog.text
    assert "Injected" not in caplog.text or SENTINEL_API_KEY not in caplog.text


def test_invalid_key_fails_fast_without_retry(api):
    client = lambda_client(api, api_key="not-the-key")
    with pytest.raises(InvalidApiKey) as caught:
        client.list_instances()
    assert len(api.requests) == 1 and len(api.unauthorized) == 1
    message = str(caught.value)
    assert "global/invalid-api-key" in message and "HTTP 401" in message
    assert "LAMBDA_API_KEY" in message and "not-the-key" not in message


def test_missing_key_is_reported_before_any_request(monkeypatch):
    monkeypatch.delenv("LAMBDA_API_KEY", raising=False)
    with pytest.raises(InvalidApiKey, match="No Lambda Cloud API key"):
        LambdaCloudClient(None, base_url="http://127.0.0.1:9")


def test_base_url_and_settings_come_from_the_environment(api, monkeypatch):
    monkeypatch.setenv("LAMBDA_API_URL", api.url)
    monkeypatch.setenv("LAMBDA_API_KEY", api.api_key)
    monkeypatch.setenv("LAMBDA_API_BACKOFF", "0.02")
    monkeypatch.setenv("LAMBDA_LAUNCH_INTERVAL", "0")
    client = LambdaCloudClient()
    assert client.base_url == api.url and client.backoff == 0.02 and client.launch_interval == 0
    assert "gpu_1x_a10" in client.instance_types()
    monkeypatch.delenv("LAMBDA_API_URL")
    assert LambdaCloudClient("k").base_url == "https://cloud.lambda.ai/api/v1"


@pytest.mark.parametrize(
    ("status", "code", "error_class", "hint"),
    [
        (403, "global/account-inactive", AccountInactive, "account"),
        (400, "instance-operations/launch/insufficient-capacity", InsufficientCapacity, "regions"),
        (400, "global/quota-exceeded", QuotaExceeded, "quota"),
        (400, "global/invalid-parameters", InvalidParameters, "instance type"),
        (404, "global/object-does-not-exist", ObjectDoesNotExist, "lt status"),
        (400, "instance-operations/launch/file-system-in-wrong-region", FileSystemInWrongRegion, "region"),
        (400, "global/some-new-code", LambdaCloudError, "retry"),
    ],
)
def test_each_error_code_becomes_its_exception_with_advice(api, client, status, code, error_class, hint):
    api.fail_next(LAUNCH, status, code=code)
    with pytest.raises(error_class) as caught:
        launch_one(client)
    error = caught.value
    assert type(error) is error_class
    assert (error.code, error.status) == (code, status)
    assert f"POST {LAUNCH} failed" in str(error) and code in str(error)
    assert "What to do:" in str(error) and hint in str(error)
    assert len(api.requests_to("POST", LAUNCH)) == 1  # client errors are not retried


def test_errors_the_fake_produces_itself(api, client):
    with pytest.raises(ObjectDoesNotExist, match="does not exist"):
        client.get_instance("0" * 32)
    with pytest.raises(InvalidParameters, match="SSH key"):
        launch_one(client, ssh_key_names=["nobody"])
    api.add_file_system("data", region="us-west-1")
    with pytest.raises(FileSystemInWrongRegion):
        launch_one(client, file_system_names=["data"])
    api.quota = 0
    with pytest.raises(QuotaExceeded):
        launch_one(client)


def test_429_and_5xx_bursts_are_survived_with_retry_after_honoured(api, client):
    api.fail_next("/instance-types", 429, headers={"Retry-After": "0.4"})
    api.fail_next("/instances", 502, times=2)  # an empty {} body, as proxies send
    api.fail_next("/instances", 500, code="global/internal-error")
    started = time.monotonic()
    assert client.instance_types()
    assert time.monotonic() - started >= 0.4
    assert client.list_instances() == []
    assert len(api.requests_to("GET", "/instances")) == 4


def test_retries_are_bounded(api):
    client = lambda_client(api, max_retries=2)
    api.fail_next("/instances", 503, times=10)
    with pytest.raises(ServerError, match="gave up after 3 attempts"):
        client.list_instances()
    api.fail_next("/ssh-keys", 429, times=10)
    with pytest.raises(RateLimited, match="1 launch per 12 s"):
        client.list_ssh_keys()
    assert len(api.requests_to("GET", "/instances")) == 3
    assert len(api.requests_to("GET", "/ssh-keys")) == 3


def test_backoff_grows_exponentially(api):
    client = lambda_client(api, max_retries=3, backoff=0.1)
    api.fail_next("/instances", 503, times=3)
    started = time.monotonic()
    client.list_instances()
    # Sleeps of 0.1, 0.2 and 0.4 s, each with jitter down to half: at least 0.35 s in all.
    assert 0.35 <= time.monotonic() - started < 2


def test_connection_refused_and_timeouts_are_retried_then_reported():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    client = LambdaCloudClient("k", base_url=f"http://127.0.0.1:{port}/api/v1", max_retries=1, backoff=0.01)
    with pytest.raises(ServerError, match="No answer from the Lambda Cloud API") as caught:
        client.list_instances()
    assert "ConnectionError" in str(caught.value) and "gave up after 2 attempts" in str(caught.value)

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    accepted = []
    threading.Thread(target=lambda: [accepted.append(silent.accept()) for _ in range(2)], daemon=True).start()
    client = LambdaCloudClient(
        "k", base_url=f"http://127.0.0.1:{silent.getsockname()[1]}/api/v1", timeout=0.2, max_retries=1, backoff=0.01
    )
    with pytest.raises(ServerError, match="ReadTimeout"):
        client.list_instances()
    assert len(accepted) == 2
    silent.close()


def test_failover_skips_unlisted_regions_and_falls_through_on_insufficient_capacity(api, client):
    api.set_capacity("gpu_1x_h100_sxm5", ["us-east-1"])
    api.set_capacity("gpu_1x_a100_sxm4", ["us-west-1"])
    # Listed is not reserved: us-east-1 lists the H100 but answers insufficient-capacity.
    api.fail_next(LAUNCH, 400, code="instance-operations/launch/insufficient-capacity")
    ids, type_name, region = client.launch_with_failover(
        instance_types=["gpu_1x_h100_sxm5", "gpu_1x_a100_sxm4"],
        regions=["us-west-1", "us-east-1"],
        ssh_key_names=[SSH_KEY_NAME],
        name="failover",
    )
    assert (type_name, region) == ("gpu_1x_a100_sxm4", "us-west-1")
    tried = [(b["instance_type_name"], b["region_name"]) for _, _, b in api.requests_to("POST", LAUNCH)]
    assert tried == [("gpu_1x_h100_sxm5", "us-east-1"), ("gpu_1x_a100_sxm4", "us-west-1")]
    assert api.instances[ids[0]]["region"]["name"] == "us-west-1"
    assert len(api.requests_to("GET", "/instance-types")) == 1


def test_failover_without_regions_uses_any_listed_region(api, client):
    api.set_capacity("gpu_1x_a10", ["europe-central-1"])
    _, _, region = client.launch_with_failover(instance_types=["gpu_1x_a10"], regions=[], ssh_key_names=[SSH_KEY_NAME])
    assert region == "europe-central-1"


def test_failover_reports_everything_it_tried(api, client):
    api.set_capacity("gpu_1x_a10", ["us-east-1"])
    api.set_capacity("gpu_1x_a6000", [])
    api.fail_next(LAUNCH, 400, code="instance-operations/launch/insufficient-capacity")
    with pytest.raises(InsufficientCapacity) as caught:
        client.launch_with_failover(
            instance_types=["gpu_1x_a10", "gpu_1x_a6000"], regions=["us-east-1", "us-west-2"], ssh_key_names=[SSH_KEY_NAME]
        )
    message = str(caught.value)
    for tried in (
        "gpu_1x_a10 in us-east-1: insufficient capacity at launch",
        "gpu_1x_a10 in us-west-2: no capacity listed",
        "gpu_1x_a6000 in us-east-1: no capacity listed",
        "gpu_1x_a6000 in us-west-2: no capacity listed",
    ):
        assert tried in message
    assert "lt types" in message
    assert len(api.requests_to("POST", LAUNCH)) == 1


def test_failover_rejects_unknown_instance_types_before_launching(api, client):
    with pytest.raises(InvalidParameters, match="gpu_1x_a11") as caught:
        client.launch_with_failover(instance_types=["gpu_1x_a11"], regions=["us-east-1"], ssh_key_names=[SSH_KEY_NAME])
    assert "gpu_1x_a10" in str(caught.value)
    assert api.requests_to("POST", LAUNCH) == []


def test_launch_whose_answer_is_lost_adopts_the_instance_instead_of_launching_twice(api, client):
    api.fail_next(LAUNCH, 502, after=True)
    ids = launch_one(client, name="lost-answer")
    assert len(api.requests_to("POST", LAUNCH)) == 1
    assert list(api.instances) == ids


def test_launches_are_spaced_by_the_launch_interval(api):
    client = lambda_client(api, launch_interval=0.5)
    launch_one(client)
    started = time.monotonic()
    launch_one(client)
    assert time.monotonic() - started >= 0.45
    assert len(api.requests_to("POST", LAUNCH)) == 2


def test_the_fakes_launch_rate_limit_is_waited_out(api, client):
    api.launch_interval = 0.5
    launch_one(client)
    launch_one(client)  # answered 429 with Retry-After: 1, then accepted
    launches = api.requests_to("POST", LAUNCH)
    assert len(launches) == 3 and len(api.instances) == 2


def test_wait_times_out_naming_the_instance(api):
    api.boot_seconds = 60
    client = lambda_client(api)
    instance_id = launch_one(client)[0]
    with pytest.raises(InstanceNotReady) as caught:
        client.wait_for_instance(instance_id, timeout=0.5, interval=0.1)
    assert caught.value.instance_id == instance_id and caught.value.last_status == "booting"
    assert instance_id in str(caught.value) and "lt down" in str(caught.value)


def test_wait_stops_when_the_instance_is_terminated(api, client):
    api.boot_seconds = 60
    instance_id = launch_one(client)[0]
    client.terminate([instance_id])
    with pytest.raises(InstanceNotReady, match="became 'terminating'"):
        client.wait_for_instance(instance_id, timeout=5, interval=0.1)


def test_restart_goes_back_through_booting(api, client):
    instance_id = launch_one(client)[0]
    client.wait_for_instance(instance_id, timeout=5, interval=0.1)
    restarted = client.restart([instance_id])
    assert restarted[0]["status"] == "booting"
    assert client.wait_for_instance(instance_id, timeout=5, interval=0.1)["status"] == "active"


def test_ssh_keys_images_and_file_systems(api, client):
    added = client.add_ssh_key("laptop", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBbB laptop")
    assert "private_key" not in added and len(added["id"]) == 32
    generated = client.add_ssh_key("generated")
    assert generated["private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")  # the fake server's key
    names = {k["name"] for k in client.list_ssh_keys()}
    assert names == {SSH_KEY_NAME, "laptop", "generated"}
    client.delete_ssh_key(added["id"])
    assert "laptop" not in {k["name"] for k in client.list_ssh_keys()}
    with pytest.raises(ObjectDoesNotExist):
        client.delete_ssh_key(added["id"])
    images = client.list_images()
    assert {image["family"] for image in images} == {"lambda-stack-22-04", "lambda-stack-24-04"}
    assert {image["region"]["name"] for image in images} >= {"us-east-1", "us-west-1"}
    api.add_file_system("datasets", region="us-east-1")
    assert [fs["name"] for fs in client.list_file_systems()] == ["datasets"]


def test_a_launch_that_keeps_failing_warns_that_an_instance_may_exist(api):
    client = lambda_client(api, max_retries=1)
    api.fail_next(LAUNCH, 503, times=2)
    with pytest.raises(ServerError) as caught:
        launch_one(client, name="maybe")
    assert "An instance named 'maybe' may have been created anyway" in str(caught.value)
    # Before the retry the client looked for an instance of that name (none), then tried again.
    assert len(api.requests_to("POST", LAUNCH)) == 2 and len(api.requests_to("GET", "/instances")) == 3


def test_an_image_no_asked_region_offers_fails_before_any_launch(api, client):
    with pytest.raises(InvalidParameters) as caught:
        client.launch_with_failover(instance_types=["gpu_1x_a10"], regions=["us-east-1", "us-west-1"],
                                    ssh_key_names=[SSH_KEY_NAME], image={"family": "lambda-stack-20-04"})
    message = str(caught.value)
    assert "Image family 'lambda-stack-20-04' is not offered in us-east-1 or us-west-1" in message
    assert "nothing was launched" in message and "global/invalid-parameters" in message
    assert "us-east-1, us-west-1: lambda-stack-22-04, lambda-stack-24-04" in message
    assert api.requests_to("POST", LAUNCH) == [] and len(api.requests_to("GET", "/images")) == 1


def test_an_image_offered_only_elsewhere_is_named_with_where_it_is(api, client):
    api.set_image_families("us-west-3", ["lambda-stack-22-04"])
    api.set_image_families("us-south-1", ["lambda-stack-22-04", "lambda-stack-24-04"])
    for region in ("us-east-1", "us-west-1", "us-west-2", "europe-central-1", "asia-northeast-1"):
        api.set_image_families(region, ["lambda-stack-22-04"])
    with pytest.raises(InvalidParameters) as caught:
        client.launch_with_failover(instance_types=["gpu_1x_a10"], regions=["us-west-3"],
                                    ssh_key_names=[SSH_KEY_NAME], image={"family": DEFAULT_IMAGE_FAMILY})
    message = str(caught.value)
    assert "us-west-3: lambda-stack-22-04." in message
    assert "Image family 'lambda-stack-24-04' is offered in us-south-1." in message
    assert api.requests_to("POST", LAUNCH) == []


def test_failover_skips_a_region_without_the_image(api, client):
    api.set_image_families("us-east-1", ["lambda-stack-22-04"])
    ids, type_name, region = client.launch_with_failover(
        instance_types=["gpu_1x_a10"], regions=["us-east-1", "us-west-1"], ssh_key_names=[SSH_KEY_NAME],
        image={"family": DEFAULT_IMAGE_FAMILY},
    )
    assert (type_name, region) == ("gpu_1x_a10", "us-west-1")
    (launch,) = api.requests_to("POST", LAUNCH)
    assert launch[2]["region_name"] == "us-west-1" and launch[2]["image"] == {"family": "lambda-stack-24-04"}
    assert api.instance_images[ids[0]]["family"] == "lambda-stack-24-04"
    assert api.instance_images[ids[0]]["region"]["name"] == "us-west-1"


def test_when_no_region_is_left_the_error_says_which_lacked_the_image(api, client):
    api.set_image_families("us-east-1", ["lambda-stack-22-04"])
    api.set_capacity("gpu_1x_a10", ["us-east-1"])
    with pytest.raises(InsufficientCapacity) as caught:
        client.launch_with_failover(instance_types=["gpu_1x_a10"], regions=["us-east-1", "us-west-1"],
                                    ssh_key_names=[SSH_KEY_NAME], image={"family": DEFAULT_IMAGE_FAMILY})
    message = str(caught.value)
    assert "gpu_1x_a10 in us-east-1: image family 'lambda-stack-24-04' not offered there" in message
    assert "gpu_1x_a10 in us-west-1: no capacity listed" in message
    assert api.requests_to("POST", LAUNCH) == []


def test_failover_over_any_region_keeps_to_regions_with_the_image(api, client):
    api.set_capacity("gpu_1x_a10", ["us-east-1", "us-south-1"])
    api.set_image_families("us-east-1", ["lambda-stack-22-04"])
    _, _, region = client.launch_with_failover(instance_types=["gpu_1x_a10"], regions=[],
                                               ssh_key_names=[SSH_KEY_NAME], image={"family": DEFAULT_IMAGE_FAMILY})
    assert region == "us-south-1" and len(api.requests_to("POST", LAUNCH)) == 1


def test_an_image_id_is_checked_per_region(api, client):
    by_region = {image["region"]["name"]: image for image in client.list_images()
                 if image["family"] == "lambda-stack-24-04"}
    wanted = by_region["us-west-1"]["id"]
    ids, _, region = client.launch_with_failover(instance_types=["gpu_1x_a10"], regions=["us-east-1", "us-west-1"],
                                                 ssh_key_names=[SSH_KEY_NAME], image={"id": wanted})
    assert region == "us-west-1" and api.instance_images[ids[0]]["id"] == wanted
    with pytest.raises(InvalidParameters, match=f"Image id '{wanted}' is not offered in us-east-1"):
        client.launch_with_failover(instance_types=["gpu_1x_a10"], regions=["us-east-1"],
                                    ssh_key_names=[SSH_KEY_NAME], image={"id": wanted})
    assert len(api.requests_to("POST", LAUNCH)) == 1


def test_without_an_image_failover_sends_none_and_the_api_default_boots(api, client):
    ids, _, _ = client.launch_with_failover(instance_types=["gpu_1x_a10"], regions=["us-east-1"],
                                            ssh_key_names=[SSH_KEY_NAME])
    assert "image" not in api.requests_to("POST", LAUNCH)[0][2] and api.requests_to("GET", "/images") == []
    assert api.instance_images[ids[0]]["family"] == "lambda-stack-22-04"
