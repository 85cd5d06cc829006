"""The lambda_cloud inventory plugin, run the way users run it: `ansible-inventory` from the repository
root (its ansible.cfg finds inventory_plugins/) against the fake Lambda Cloud API on 127.0.0.1, with
the API key in the environment only."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from module_utils.lambda_cloud import LambdaCloudClient
from tests.fakes.lambda_api import FakeLambdaAPI

REPO = Path(__file__).resolve().parent.parent
# Distinctive, so that any leak of it into output or cache files is found.
API_KEY = "secret-inventory-key-" + secrets.token_hex(12)
SSH_KEY_FILE = "/keys/lambda_cloud"


def launch(client, name, instance_type="gpu_1x_a10", region="us-east-1"):
    return client.launch(
        region_name=region, instance_type_name=instance_type, ssh_key_names=["laptop"], name=name
    )[0]


@pytest.fixture(scope="module")
def lambda_api():
    """An account with our instances (prefix lt-) in several states, types and regions, and one
    instance of someone else's."""
    with FakeLambdaAPI(api_key=API_KEY, boot_seconds=0, instance_ip="192.0.2.10") as api:
        api.add_ssh_key("laptop")
        client = LambdaCloudClient(API_KEY, base_url=api.url, launch_interval=0, max_retries=0)
        ids = {
            "lt-alpha": launch(client, "lt-alpha", "gpu_1x_a10", "us-east-1"),
            "lt-beta": launch(client, "lt-beta", "gpu_1x_h100_pcie", "us-west-1"),
            "other-gamma": launch(client, "other-gamma", "gpu_1x_a10", "us-east-1"),
            "lt-epsilon": launch(client, "lt-epsilon", "gpu_1x_a10", "us-east-1"),
        }
        client.list_instances()  # the fake boots instances as it answers; boot_seconds=0 makes them active
        api.instances[ids["lt-epsilon"]]["status"] = "unhealthy"
        api.boot_seconds = 3600  # from here on, a launched instance stays booting, without an ip
        ids["lt-delta"] = launch(client, "lt-delta", "gpu_1x_a100_sxm4", "us-east-1")
        api.ids = ids
        yield api


def write_config(directory, api, **options):
    config = {"plugin": "lambda_cloud", "api_url": api.url, "name_prefix": "lt-", **options}
    path = Path(directory) / "test.lambda_cloud.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def ansible_inventory(config, *args, api_key=API_KEY, check=True, cwd=REPO):
    """Run ansible-inventory as a user would; the key travels in the environment only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "LAMBDA_"))}
    env.update(
        LAMBDA_API_KEY=api_key,
        LAMBDA_SSH_IDENTITY_FILE=SSH_KEY_FILE,
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        # An inventory source that fails to parse fails the run (by default it is only a warning).
        ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED="1",
    )
    if api_key is None:
        del env["LAMBDA_API_KEY"]
    result = subprocess.run(
        ["ansible-inventory", "-i", str(config), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert API_KEY not in result.stdout + result.stderr
    if check:
        assert result.returncode == 0, result.stderr
    return result


def plain(value):
    """JSON from `ansible-inventory --list` with Ansible's untrusted-string marker taken off.

    Host vars from the API are data, not templates: Ansible 2.19 marks them untrusted and --list
    writes each such string as {"__ansible_unsafe": "..."}.
    """
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def inventory_list(config, *args, **kwargs):
    return plain(json.loads(ansible_inventory(config, "--list", *args, **kwargs).stdout))


def hosts_of(listing, group="lambda_cloud"):
    return set(listing.get(group, {}).get("hosts", []))


def test_graph_and_list_show_our_active_instances(lambda_api, tmp_path):
    config = write_config(tmp_path, lambda_api)

    graph = ansible_inventory(config, "--graph").stdout
    assert "@lambda_cloud:" in graph
    assert "lt-alpha" in graph and "lt-beta" in graph
    for absent in ("other-gamma", "lt-delta", "lt-epsilon"):
        assert absent not in graph

    listing = inventory_list(config)
    assert hosts_of(listing) == {"lt-alpha", "lt-beta"}
    alpha = listing["_meta"]["hostvars"]["lt-alpha"]
    instance = lambda_api.instances[lambda_api.ids["lt-alpha"]]
    assert alpha["ansible_host"] == "192.0.2.10"
    assert alpha["ansible_user"] == "ubuntu"
    assert alpha["ansible_ssh_private_key_file"] == SSH_KEY_FILE
    assert alpha["lambda_id"] == instance["id"]
    assert alpha["lambda_name"] == "lt-alpha"
    assert alpha["lambda_status"] == "active"
    assert alpha["lambda_region"] == "us-east-1"
    assert alpha["lambda_instance_type"] == "gpu_1x_a10"
    assert alpha["lambda_price_cents_per_hour"] == 75
    assert alpha["lambda_price_dollars_per_hour"] == 0.75
    assert alpha["lambda_gpu_description"] == "A10 (24 GB PCIe)"
    assert alpha["lambda_hostname"] == instance["hostname"]
    assert alpha["lambda_private_ip"] == instance["private_ip"]
    # The Jupyter URL carries a login token: it stays out of the inventory.
    assert instance["jupyter_url"] and instance["jupyter_url"] not in json.dumps(listing)

    assert hosts_of(listing, "lambda_region_us_east_1") == {"lt-alpha"}
    assert hosts_of(listing, "lambda_region_us_west_1") == {"lt-beta"}
    assert hosts_of(listing, "lambda_type_gpu_1x_h100_pcie") == {"lt-beta"}
    assert hosts_of(listing, "lambda_status_active") == {"lt-alpha", "lt-beta"}


def test_keyed_groups_compose_and_groups(lambda_api, tmp_path):
    config = write_config(
        tmp_path,
        lambda_api,
        keyed_groups=[{"key": "lambda_gpu_description.split(' ')[0]", "prefix": "gpu"}],
        compose={"hourly_cost": "lambda_price_dollars_per_hour * 2", "ansible_port": "2222"},
        groups={"expensive": "lambda_price_cents_per_hour > 200"},
        default_groups=False,
        strict=True,
    )
    listing = inventory_list(config)
    assert hosts_of(listing, "gpu_A10") == {"lt-alpha"}
    assert hosts_of(listing, "gpu_H100") == {"lt-beta"}
    assert hosts_of(listing, "expensive") == {"lt-beta"}
    hostvars = listing["_meta"]["hostvars"]
    assert hostvars["lt-alpha"]["hourly_cost"] == 1.5
    assert hostvars["lt-beta"]["ansible_port"] == 2222
    assert not any(group.startswith("lambda_region_") for group in listing)


def test_booting_instance_without_ip_is_skipped_with_a_warning(lambda_api, tmp_path):
    config = write_config(tmp_path, lambda_api, status=["booting", "active"])
    result = ansible_inventory(config, "--list")
    assert hosts_of(json.loads(result.stdout)) == {"lt-alpha", "lt-beta"}
    warning = " ".join(result.stderr.split())
    assert "lt-delta" in warning and lambda_api.ids["lt-delta"] in warning
    assert "no IP address yet" in warning


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"status": ["active", "unhealthy"]}, {"lt-alpha", "lt-beta", "lt-epsilon"}),
        ({"status": ["unhealthy"], "hostnames": "id"}, {"lt-epsilon"}),
        ({"regions": ["us-west-1"]}, {"lt-beta"}),
        ({"instance_types": ["gpu_1x_a10", "gpu_8x_h100_sxm5"]}, {"lt-alpha"}),
        ({"name_prefix": ""}, {"lt-alpha", "lt-beta", "other-gamma"}),
    ],
)
def test_filters(lambda_api, tmp_path, options, expected):
    config = write_config(tmp_path, lambda_api, **options)
    hosts = hosts_of(inventory_list(config))
    if options.get("hostnames") == "id":
        expected = {lambda_api.ids[name] for name in expected}
    assert hosts == expected


def test_unknown_status_is_an_error_naming_the_choices(lambda_api, tmp_path):
    config = write_config(tmp_path, lambda_api, status=["running"])
    result = ansible_inventory(config, "--list", check=False)
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert "'running'" in message and "booting, active" in message


def test_invalid_key_is_a_clear_error(lambda_api, tmp_path):
    config = write_config(tmp_path, lambda_api)
    wrong_key = "wrong-key-" + secrets.token_hex(8)
    result = ansible_inventory(config, "--list", api_key=wrong_key, check=False)
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert "Could not list Lambda Cloud instances" in message
    assert "invalid" in message and "global/invalid-api-key" in message
    assert "LAMBDA_API_KEY" in message
    assert wrong_key not in result.stdout + result.stderr


def test_missing_key_says_how_to_give_one(lambda_api, tmp_path):
    result = ansible_inventory(write_config(tmp_path, lambda_api), "--list", api_key=None, check=False)
    assert result.returncode != 0
    assert "No Lambda Cloud API key" in " ".join(result.stderr.split())


def test_key_stays_out_of_verbose_output(lambda_api, tmp_path):
    # ansible_inventory() asserts the key is absent from stdout and stderr.
    ansible_inventory(write_config(tmp_path, lambda_api), "--list", "-vvvv")


def test_cache_serves_hosts_within_its_ttl(tmp_path):
    cache_dir = tmp_path / "cache"
    api = FakeLambdaAPI(api_key=API_KEY, boot_seconds=0, instance_ip="192.0.2.20").start()
    try:
        api.add_ssh_key("laptop")
        client = LambdaCloudClient(API_KEY, base_url=api.url, launch_interval=0, max_retries=0)
        launch(client, "lt-one")
        config = write_config(
            tmp_path,
            api,
            cache=True,
            cache_plugin="jsonfile",
            cache_connection=str(cache_dir),
            cache_timeout=300,
        )

        assert hosts_of(inventory_list(config)) == {"lt-one"}
        cache_files = list(cache_dir.iterdir())
        assert len(cache_files) == 1
        written_at = cache_files[0].stat().st_mtime

        # A changed instance set is not seen while the cache is fresh, and reading it keeps its age.
        launch(client, "lt-two")
        assert hosts_of(inventory_list(config)) == {"lt-one"}
        assert cache_files[0].stat().st_mtime == written_at

        # Once the entry is older than cache_timeout, the API is asked again.
        os.utime(cache_files[0], (written_at - 600, written_at - 600))
        assert hosts_of(inventory_list(config)) == {"lt-one", "lt-two"}

        # --flush-cache always asks the API.
        launch(client, "lt-three")
        assert hosts_of(inventory_list(config, "--flush-cache")) == {"lt-one", "lt-two", "lt-three"}
    finally:
        api.stop()

    # With the API gone, the cached hosts still come back.
    listing = inventory_list(config)
    assert hosts_of(listing) == {"lt-one", "lt-two", "lt-three"}
    assert listing["_meta"]["hostvars"]["lt-one"]["ansible_host"] == "192.0.2.20"
    for path in cache_dir.iterdir():
        cached = path.read_text()
        assert API_KEY not in cached and "jupyter" not in cached


def test_duplicate_and_missing_names_fall_back_to_the_id(tmp_path):
    with FakeLambdaAPI(api_key=API_KEY, boot_seconds=0) as api:
        api.add_ssh_key("laptop")
        client = LambdaCloudClient(API_KEY, base_url=api.url, launch_interval=0, max_retries=0)
        launch(client, "lt-twin")
        second = launch(client, "lt-twin")
        unnamed = launch(client, None)
        result = ansible_inventory(write_config(tmp_path, api, name_prefix=""), "--list")
    hosts = hosts_of(plain(json.loads(result.stdout)))
    assert hosts == {"lt-twin", second, unnamed}
    assert "Two Lambda Cloud instances are named 'lt-twin'" in " ".join(result.stderr.split())


def test_plugin_finds_the_client_in_the_installed_layout(lambda_api, tmp_path):
    """An installed `lt` carries the plugin and the client side by side under wrapper/_project/."""
    project = tmp_path / "_project"
    for part in ("inventory_plugins", "module_utils"):
        shutil.copytree(REPO / part, project / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "ansible.cfg", project / "ansible.cfg")
    config = write_config(tmp_path, lambda_api)
    listing = plain(json.loads(ansible_inventory(config, "--list", cwd=project).stdout))
    assert hosts_of(listing) == {"lt-alpha", "lt-beta"}


def test_example_config_works(lambda_api, tmp_path):
    example = yaml.safe_load((REPO / "examples/inventory/lambda_cloud.yml").read_text())
    example.update(api_url=lambda_api.url, cache_connection=str(tmp_path / "cache"))
    config = tmp_path / "example.lambda_cloud.yml"
    config.write_text(yaml.safe_dump(example))
    listing = inventory_list(config)
    assert hosts_of(listing) == {"lt-alpha", "lt-beta"}
    assert hosts_of(listing, "gpus_1") == {"lt-alpha", "lt-beta"}


@pytest.mark.parametrize("args", [[], ["-M", "inventory_plugins"]])
def test_ansible_doc_renders(args):
    result = subprocess.run(
        ["ansible-doc", "-t", "inventory", *args, "lambda_cloud"],
        cwd=REPO,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for text in ("name_prefix", "LAMBDA_API_KEY", "LAMBDA_SSH_IDENTITY_FILE", "keyed_groups", "EXAMPLES"):
        assert text in result.stdout
    assert not result.stderr.strip()


def test_example_and_docs_examples_are_valid_yaml():
    from inventory_plugins import lambda_cloud

    examples = list(yaml.safe_load_all(lambda_cloud.EXAMPLES))
    assert examples and all(doc["plugin"] == "lambda_cloud" for doc in examples)
    options = yaml.safe_load(lambda_cloud.DOCUMENTATION)["options"]
    fragment_options = {
        "cache",
        "cache_plugin",
        "cache_timeout",
        "cache_connection",
        "cache_prefix",
        "keyed_groups",
        "compose",
        "groups",
        "strict",
        "leading_separator",
        "use_extra_vars",
    }
    example_file = yaml.safe_load((REPO / "examples/inventory/lambda_cloud.yml").read_text())
    for doc in [*examples, example_file]:
        assert set(doc) <= set(options) | fragment_options
