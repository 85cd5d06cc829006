"""Lambda Cloud dynamic inventory: the account's GPU instances as Ansible hosts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ansible.errors import AnsibleError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable

DOCUMENTATION = r"""
name: lambda_cloud
short_description: Lambda Cloud GPU instances as Ansible hosts
description:
  - Lists the instances of a Lambda Cloud account through the Lambda Cloud API and turns those whose
    name starts with O(name_prefix) into hosts.
  - Uses a YAML configuration file whose name ends with C(lambda_cloud.yml) or C(lambda_cloud.yaml),
    with C(plugin) set to C(lambda_cloud).
  - Each host gets C(ansible_host) (the instance's public IP address), C(ansible_user),
    C(ansible_ssh_private_key_file) when O(private_key_file) is set, and these variables from the API,
    C(lambda_id), C(lambda_name), C(lambda_status), C(lambda_ip), C(lambda_private_ip), C(lambda_hostname),
    C(lambda_region), C(lambda_region_description), C(lambda_instance_type),
    C(lambda_instance_type_description), C(lambda_gpu_description), C(lambda_gpus), C(lambda_vcpus),
    C(lambda_memory_gib), C(lambda_storage_gib), C(lambda_price_cents_per_hour),
    C(lambda_price_dollars_per_hour), C(lambda_ssh_key_names), C(lambda_file_system_names).
  - Every host is in the group C(lambda_cloud). With O(default_groups), hosts are also grouped by
    status, region and instance type, for example C(lambda_status_active), C(lambda_region_us_east_1) and
    C(lambda_type_gpu_1x_a10) (characters that are not valid in group names become C(_)).
  - An instance without an IP address yet (still booting) is left out with a warning; run the
    inventory again once it is active.
  - The instance's Jupyter URL is not exposed, because it carries a login token.
requirements:
  - requests
extends_documentation_fragment:
  - constructed
  - inventory_cache
options:
  plugin:
    description: Marks this file as a configuration for this plugin.
    required: true
    type: str
    choices: [lambda_cloud]
  api_key:
    description:
      - The Lambda Cloud API key.
      - Prefer the environment variable over writing the key into the configuration file. The key is
        never written to the cache, to logs or to error messages.
    type: str
    env:
      - name: LAMBDA_API_KEY
  api_url:
    description: Base URL of the Lambda Cloud API.
    type: str
    default: https://cloud.lambda.ai/api/v1
    env:
      - name: LAMBDA_API_URL
  timeout:
    description: Seconds to wait for each API reply.
    type: int
    default: 30
  name_prefix:
    description:
      - Only instances whose name starts with this prefix become hosts (the configuration key
        C(lambda-cloud-instance-name-prefix)).
      - The empty string selects every instance of the account, named or not.
    type: str
    default: ""
  status:
    description:
      - Only instances in one of these states become hosts.
      - Add C(booting) to see instances that are still starting; those without an IP address yet are
        still left out.
    type: list
    elements: str
    default: [active]
  regions:
    description: Only instances in these regions (for example C(us-east-1)); empty means every region.
    type: list
    elements: str
    default: []
  instance_types:
    description: Only instances of these types (for example C(gpu_1x_a10)); empty means every type.
    type: list
    elements: str
    default: []
  private_key_file:
    description:
      - SSH private key for the instances, set as C(ansible_ssh_private_key_file) on every host
        (the configuration key C(lambda-cloud-ssh-identity-file)).
    type: path
    env:
      - name: LAMBDA_SSH_IDENTITY_FILE
  ansible_user:
    description: SSH user on the instances, set as C(ansible_user) on every host.
    type: str
    default: ubuntu
  hostnames:
    description:
      - What names the hosts, the instance name or the instance id.
      - An instance without a name, or whose name another instance already took, is named by its id.
    type: str
    choices: [name, id]
    default: name
  default_groups:
    description: Add the groups by status, region and instance type described above.
    type: bool
    default: true
"""

EXAMPLES = r"""
# my.lambda_cloud.yml: the active instances named lt-*, with LAMBDA_API_KEY in the environment.
plugin: lambda_cloud
name_prefix: lt-
private_key_file: ~/.ssh/lambda_cloud

---
# Booting instances too, only A10s and H100s in two regions, named by instance id.
plugin: lambda_cloud
name_prefix: lt-
status: [booting, active]
regions: [us-east-1, us-west-1]
instance_types: [gpu_1x_a10, gpu_1x_h100_pcie]
hostnames: id

---
# Own groups and variables, and a cache that spares the API for five minutes.
plugin: lambda_cloud
name_prefix: lt-
keyed_groups:
  - key: lambda_gpu_description
    prefix: gpu
groups:
  expensive: lambda_price_cents_per_hour > 200
compose:
  ansible_python_interpreter: "'/usr/bin/python3'"
  hourly_cost: lambda_price_dollars_per_hour
cache: true
cache_plugin: jsonfile
cache_connection: ~/.cache/llama-trainer/inventory
cache_timeout: 300
"""

HOSTVAR_PREFIX = "lambda_"
TOP_GROUP = "lambda_cloud"
DEFAULT_GROUP_PREFIX = "lambda"
KNOWN_STATUSES = ("booting", "active", "unhealthy", "terminating", "terminated", "preempted")

# The client's module name in sys.modules: private to this plugin, so it cannot shadow anything.
_CLIENT_MODULE_NAME = "_llama_trainer_lambda_cloud_client"


def load_lambda_client_module():
    """Return the project's one Lambda Cloud client, module_utils/lambda_cloud.py.

    Ansible gives inventory plugins no access to custom module_utils (``from
    ansible.module_utils.lambda_cloud import ...`` fails here), so the file is loaded by its path. It
    sits at ../module_utils/ next to this plugin's folder, both in a checkout and in the installed
    package (wrapper/_project/).
    """
    if _CLIENT_MODULE_NAME in sys.modules:
        return sys.modules[_CLIENT_MODULE_NAME]
    path = Path(__file__).resolve().parent.parent / "module_utils" / "lambda_cloud.py"
    if not path.is_file():
        raise AnsibleError(f"The Lambda Cloud client is missing: expected it at {path}.")
    spec = importlib.util.spec_from_file_location(_CLIENT_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs (the importlib recipe), so code that looks its module up by name finds it.
    sys.modules[_CLIENT_MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[_CLIENT_MODULE_NAME]
        raise
    return module


def instance_record(instance):
    """Flatten one instance from the API into the JSON-safe dict that is cached and becomes host vars.

    The Jupyter URL is left out on purpose: it carries a login token.
    """
    region = instance.get("region") or {}
    instance_type = instance.get("instance_type") or {}
    specs = instance_type.get("specs") or {}
    cents = instance_type.get("price_cents_per_hour")
    return {
        "id": instance["id"],
        "name": instance.get("name"),
        "status": instance.get("status"),
        "ip": instance.get("ip"),
        "private_ip": instance.get("private_ip"),
        "hostname": instance.get("hostname"),
        "region": region.get("name"),
        "region_description": region.get("description"),
        "instance_type": instance_type.get("name"),
        "instance_type_description": instance_type.get("description"),
        "gpu_description": instance_type.get("gpu_description"),
        "gpus": specs.get("gpus"),
        "vcpus": specs.get("vcpus"),
        "memory_gib": specs.get("memory_gib"),
        "storage_gib": specs.get("storage_gib"),
        "price_cents_per_hour": cents,
        "price_dollars_per_hour": None if cents is None else round(cents / 100, 2),
        "ssh_key_names": list(instance.get("ssh_key_names") or []),
        "file_system_names": list(instance.get("file_system_names") or []),
    }


def describe(record):
    """How a warning names an instance: its name and id, or the id alone."""
    return f"{record['name']} ({record['id']})" if record["name"] else record["id"]


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    NAME = "lambda_cloud"

    # Host vars come from the API, so Ansible must not template them: trust stays off (the default).

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith(("lambda_cloud.yml", "lambda_cloud.yaml"))

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        # Extra vars may feed templated options, e.g. `api_key: "{{ vault_lambda_api_key }}"`.
        self.templar.available_variables = self._vars
        self._read_config_data(path)
        self._check_options()
        records = self._instance_records(path, cache)
        self._populate(records)

    def _check_options(self):
        unknown = [s for s in self.get_option("status") if s not in KNOWN_STATUSES]
        if unknown:
            raise AnsibleError(
                f"Unknown Lambda Cloud instance status {', '.join(map(repr, unknown))} in the inventory option "
                f"'status'; choose from {', '.join(KNOWN_STATUSES)}."
            )

    def _instance_records(self, path, cache):
        """Every instance of the account as records: from the cache when allowed and fresh, else the API.

        A cache hit is not written back, so the entry keeps its original timeout.
        """
        use_cache = self.get_option("cache")
        cache_key = self.get_cache_key(path)
        # `cache` is False under --flush-cache and meta: refresh_inventory.
        if use_cache and cache:
            try:
                return self._cache[cache_key]
            except KeyError:
                pass  # no entry yet, or it expired
        records = [instance_record(instance) for instance in self._fetch_instances()]
        if use_cache:
            self._cache[cache_key] = records
        return records

    def _fetch_instances(self):
        client_module = load_lambda_client_module()
        api_key = self.get_option("api_key")
        if api_key:
            api_key = self.templar.template(api_key)
        if not api_key:
            raise AnsibleError(
                "No Lambda Cloud API key: set the LAMBDA_API_KEY environment variable "
                "(or the api_key option of the inventory file)."
            )
        client = client_module.LambdaCloudClient(
            api_key,
            base_url=self.get_option("api_url") or client_module.DEFAULT_BASE_URL,
            timeout=self.get_option("timeout"),
        )
        try:
            return client.list_instances()
        except client_module.LambdaCloudError as exc:
            # The client's message says what failed and what to do; it never contains the key.
            raise AnsibleError(f"Could not list Lambda Cloud instances: {exc}") from None

    def _wanted(self, record):
        prefix = self.get_option("name_prefix")
        if prefix and not (record["name"] or "").startswith(prefix):
            return False
        if record["status"] not in self.get_option("status"):
            return False
        regions = self.get_option("regions")
        if regions and record["region"] not in regions:
            return False
        types = self.get_option("instance_types")
        return not types or record["instance_type"] in types

    def _host_vars(self, record):
        host_vars = {f"{HOSTVAR_PREFIX}{key}": value for key, value in record.items()}
        host_vars["ansible_host"] = record["ip"]
        host_vars["ansible_user"] = self.get_option("ansible_user")
        private_key_file = self.get_option("private_key_file")
        if private_key_file:
            host_vars["ansible_ssh_private_key_file"] = private_key_file
        return host_vars

    def _hostname(self, record, taken):
        """The host's name; ``taken`` holds the names this source already gave out."""
        name = record["name"] if self.get_option("hostnames") == "name" else None
        if name and name in taken:
            self.display.warning(
                f"Two Lambda Cloud instances are named {name!r}; the one with id {record['id']} "
                "is added under its id."
            )
            name = None
        return name or record["id"]

    def _populate(self, records):
        self.inventory.add_group(TOP_GROUP)
        strict = self.get_option("strict")
        taken = set()
        for record in records:
            if not self._wanted(record):
                continue
            if not record["ip"]:
                self.display.warning(
                    f"Lambda Cloud instance {describe(record)} is {record['status']} and has no IP address "
                    "yet; it is left out of the inventory. Run the inventory again once it is active."
                )
                continue
            host = self._hostname(record, taken)
            taken.add(host)
            self.inventory.add_host(host, group=TOP_GROUP)
            for key, value in self._host_vars(record).items():
                self.inventory.set_variable(host, key, value)
            if self.get_option("default_groups"):
                self._add_default_groups(host, record)
            host_vars = self.inventory.get_host(host).get_vars()
            self._set_composite_vars(self.get_option("compose"), host_vars, host, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), {}, host, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), {}, host, strict=strict)

    def _add_default_groups(self, host, record):
        for kind, value in (
            ("status", record["status"]),
            ("region", record["region"]),
            ("type", record["instance_type"]),
        ):
            if value:
                group = self.inventory.add_group(
                    self._sanitize_group_name(f"{DEFAULT_GROUP_PREFIX}_{kind}_{value}")
                )
                self.inventory.add_child(group, host)
