#!/usr/bin/python
"""Ansible module: list Lambda Cloud instances, instance types with prices, and capacity."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.lambda_cloud import LambdaCloudError
from ansible.module_utils.lambda_cloud_module import (
    LambdaCloudModule,
    instance_summary,
    lambda_cloud_argument_spec,
)

DOCUMENTATION = r"""
module: lambda_instance_info
short_description: List Lambda Cloud instances, instance types, prices and capacity
description:
  - Returns the account's instances, optionally filtered by exact name, name prefix and status.
  - Returns every instance type with its price, GPUs and the regions that list capacity for it now.
extends_documentation_fragment:
  - lambda_cloud
options:
  name:
    description: Only the instances with exactly this name.
    type: str
  name_prefix:
    description: Only the instances whose name starts with this prefix, for example V(lt-).
    type: str
  status:
    description:
      - Only the instances in one of these statuses (V(booting), V(active), V(unhealthy),
        V(terminating), V(terminated), V(preempted)). Empty means all.
    type: list
    elements: str
    default: []
notes:
  - Read only; supports check mode.
author:
  - llama-trainer contributors
"""

EXAMPLES = r"""
- name: Our running instances and the cheapest types with capacity
  lambda_instance_info:
    name_prefix: lt-
    status: [booting, active]
  register: lambda_info

- name: Show what an A10 costs and where it is available
  ansible.builtin.debug:
    msg: "{{ lambda_info.instance_types | selectattr('name', 'equalto', 'gpu_1x_a10') | first }}"
"""

RETURN = r"""
instances:
  description: Instances that match the filters, in the order the API lists them.
  returned: always
  type: list
  elements: dict
  contains:
    id: {description: Instance id., type: str}
    name: {description: Instance name., type: str}
    ip: {description: "Public IPv4 address; null while booting.", type: str}
    status: {description: Instance status., type: str}
    region: {description: Region name., type: str}
    instance_type: {description: Instance type name., type: str}
    price_cents_per_hour: {description: Price in US cents per hour., type: int}
    gpu_description: {description: GPU model., type: str}
instance_types:
  description: Every instance type, cheapest first.
  returned: always
  type: list
  elements: dict
  contains:
    name: {description: Type name., type: str, sample: gpu_1x_a10}
    description: {description: Human description., type: str}
    gpu_description: {description: GPU model., type: str}
    price_cents_per_hour: {description: Price in US cents per hour., type: int, sample: 75}
    specs: {description: "vcpus, memory_gib, storage_gib, gpus.", type: dict}
    regions_with_capacity: {description: Regions that list capacity now., type: list, elements: str}
"""


class LambdaInstanceInfo(LambdaCloudModule):
    def gather(self):
        try:
            instances = self.client.list_instances()
            catalogue = self.client.instance_types()
        except LambdaCloudError as exc:
            self.fail(exc)
        self.result["instances"] = [instance_summary(i) for i in instances if self._wanted(i)]
        self.result["instance_types"] = sorted(
            (_type_summary(entry) for entry in catalogue.values()),
            key=lambda t: (t["price_cents_per_hour"] or 0, t["name"]),
        )

    def _wanted(self, instance):
        params = self.module.params
        name = instance.get("name") or ""
        if params["name"] is not None and name != params["name"]:
            return False
        if params["name_prefix"] and not name.startswith(params["name_prefix"]):
            return False
        return not params["status"] or instance.get("status") in params["status"]


def _type_summary(entry):
    instance_type = entry["instance_type"]
    return {
        "name": instance_type["name"],
        "description": instance_type.get("description"),
        "gpu_description": instance_type.get("gpu_description"),
        "price_cents_per_hour": instance_type.get("price_cents_per_hour"),
        "specs": instance_type.get("specs") or {},
        "regions_with_capacity": [r["name"] for r in entry.get("regions_with_capacity_available", [])],
    }


def main():
    argument_spec = lambda_cloud_argument_spec()
    argument_spec.update(
        name={"type": "str"},
        name_prefix={"type": "str"},
        status={"type": "list", "elements": "str", "default": []},
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    info = LambdaInstanceInfo(module)
    info.gather()
    info.exit()


if __name__ == "__main__":
    main()
