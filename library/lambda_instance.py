#!/usr/bin/python
"""Ansible module: create, restart or terminate a Lambda Cloud instance by name."""

from __future__ import annotations

import signal
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.lambda_cloud import (
    DEFAULT_IMAGE_FAMILY,
    LIVE_STATUSES,
    LambdaCloudError,
    ObjectDoesNotExist,
)
from ansible.module_utils.lambda_cloud_module import (
    LambdaCloudModule,
    instance_summary,
    lambda_cloud_argument_spec,
)

DOCUMENTATION = r"""
module: lambda_instance
short_description: Launch, restart or terminate a Lambda Cloud GPU instance by name
description:
  - Makes sure an instance called O(name) exists (launching one if needed, trying instance types and
    regions in order of preference), is restarted, or is terminated.
  - The name is the identity. With O(state=present), a booting, active or unhealthy instance of that
    name is reused and nothing is launched, so running the task twice launches one instance.
  - A launch that never becomes active within O(wait_timeout) is terminated before the task fails, so
    a failed task does not leave a GPU billing. If that terminate fails too, the task fails with the
    instance id and a command that terminates it.
  - Before launching, the image is looked up in the region's image list (C(GET /images)). Regions
    that do not offer it are skipped like regions without capacity; when none of the O(region)s (any
    region, when O(region) is empty) offers it, the task fails before any launch request, listing
    the image families each region does offer. Check mode makes the same lookup (it only reads).
extends_documentation_fragment:
  - lambda_cloud
options:
  name:
    description:
      - Name of the instance (at most 64 characters); the module finds instances by it.
    type: str
    required: true
  state:
    description:
      - V(present) launches the instance unless one of that name is running.
      - V(absent) terminates every instance of that name that is not already ending.
      - V(restarted) restarts the instance of that name (it must exist).
    type: str
    choices: [present, absent, restarted]
    default: present
  instance_type:
    description:
      - Instance type names in order of preference, for example V(gpu_1x_a10). Types without
        capacity in any of the O(region)s are skipped. Required with O(state=present).
    type: list
    elements: str
  region:
    description:
      - Region names in order of preference, for example V(us-east-1). Regions that do not list
        capacity for a type are skipped without a launch request.
      - Empty means any region that lists capacity, in the order the API gives them.
    type: list
    elements: str
    default: []
  ssh_key_name:
    description:
      - Name of the SSH key registered with Lambda Cloud (see M(lambda_ssh_key)) to install on the
        instance for user C(ubuntu). Required with O(state=present).
    type: str
  file_systems:
    description:
      - Names of persistent file systems to attach; they must be in the region the instance lands in.
    type: list
    elements: str
    default: []
  image:
    description:
      - "Machine image, as C({id: ...}) or C({family: ...}), for example C({family: lambda-stack-22-04})."
      - "Defaults to C({family: lambda-stack-24-04}): Lambda Stack on Ubuntu 24.04, whose Python 3.12
        the pinned training stack needs (3.11 or newer). The API's own default, Lambda Stack on
        Ubuntu 22.04, has Python 3.10."
    type: dict
  tags:
    description:
      - Tags to give the instance at launch, as a mapping of key to value.
    type: dict
  user_data:
    description:
      - Cloud-init user data (at most 1 MB) run on first boot.
    type: str
  wait:
    description:
      - Wait until the instance is active and has an IP address (for O(state=present) and
        O(state=restarted)), or until it is terminated (for O(state=absent)).
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to wait. One GPU boots in 3-5 minutes, eight in 10-20.
    type: int
    default: 900
notes:
  - Supports check mode; in check mode no request that changes anything is sent.
  - Instances of one name launched by other tools are treated as this module's own.
author:
  - llama-trainer contributors
"""

EXAMPLES = r"""
- name: Launch (or reuse) the training instance, cheapest acceptable GPU first
  lambda_instance:
    name: lt-run-20250101
    instance_type: [gpu_1x_a10, gpu_1x_a100_sxm4]
    region: [us-east-1, us-west-1]
    ssh_key_name: llama-trainer
    tags:
      run: "20250101"
  register: launched

- name: Launch without waiting, record the id, then wait in a second task
  lambda_instance:
    name: lt-run-20250101
    instance_type: [gpu_1x_a10]
    ssh_key_name: llama-trainer
    wait: false
  register: launched

- name: Terminate it (a second run changes nothing)
  lambda_instance:
    name: lt-run-20250101
    state: absent
"""

RETURN = r"""
instance:
  description: The instance (for O(state=absent), the first one terminated; empty when none was found).
    In check mode without an existing instance, the planned name, type and region with a null id.
  returned: always
  type: dict
  contains:
    id: {description: Instance id (32 hex characters)., type: str, sample: 0920582c7ff041399e34823a0be62549}
    name: {description: Instance name., type: str, sample: lt-run-20250101}
    ip: {description: "Public IPv4 address; null while booting.", type: str, sample: 198.51.100.2}
    private_ip: {description: Private IPv4 address., type: str}
    status: {description: "booting, active, unhealthy, terminating or terminated.", type: str, sample: active}
    region: {description: Region name., type: str, sample: us-east-1}
    instance_type: {description: Instance type name., type: str, sample: gpu_1x_a10}
    price_cents_per_hour: {description: Price of the type in US cents per hour., type: int, sample: 75}
    gpu_description: {description: GPU model., type: str, sample: A10 (24 GB PCIe)}
    hostname: {description: Host name given by Lambda Cloud., type: str}
    ssh_key_names: {description: SSH key names installed., type: list, elements: str}
    file_system_names: {description: Attached file systems., type: list, elements: str}
instances:
  description: Every instance terminated (O(state=absent)).
  returned: when O(state=absent)
  type: list
  elements: dict
launched:
  description: Whether this run launched a new instance.
  returned: always
  type: bool
"""

class LambdaInstance(LambdaCloudModule):
    def __init__(self, module):
        super().__init__(module)
        self.name = module.params["name"]
        self.result.update(instance={}, launched=False)

    def _get(self):
        """Instances of this name that exist and may bill (booting, active, unhealthy)."""
        try:
            found = [i for i in self.client.find_instances_by_name(self.name) if i.get("status") in LIVE_STATUSES]
        except LambdaCloudError as exc:
            self.fail(exc)
        if len(found) > 1:
            ids = ", ".join(i["id"] for i in found)
            self.module.warn(f"{len(found)} instances are named {self.name!r} ({ids}); using {found[0]['id']}.")
        return found

    def _create(self):
        params = self.module.params
        image = params["image"] or {"family": DEFAULT_IMAGE_FAMILY}
        self._mark_as_changed()
        if self.module.check_mode:
            # Only reads: a check run already fails when the image is not offered where it would launch.
            offering = self._call(self.client.regions_with_image, image, params["region"])
            regions = [region for region in params["region"] if region in offering] or [None]
            self.result["instance"] = {"id": None, "name": self.name, "status": None,
                                       "instance_type": params["instance_type"][0], "region": regions[0]}
            return
        tags = [{"key": str(k), "value": str(v)} for k, v in (params["tags"] or {}).items()]
        try:
            ids, _, _ = self.client.launch_with_failover(
                instance_types=params["instance_type"],
                regions=params["region"],
                ssh_key_names=[params["ssh_key_name"]],
                name=self.name,
                file_system_names=params["file_systems"],
                image=image,
                user_data=params["user_data"],
                tags=tags,
            )
        except LambdaCloudError as exc:
            self.fail(exc)
        self.result["launched"] = True
        instance_id = ids[0]
        if params["wait"]:
            self._set_instance(self._wait_or_terminate(instance_id))
        else:
            self._set_instance(self._call(self.client.get_instance, instance_id))

    def _wait_or_terminate(self, instance_id):
        """Wait for the instance we launched; if it never comes up, end it before failing."""
        try:
            with _signals_interrupt():
                return self.client.wait_for_instance(instance_id, timeout=self.module.params["wait_timeout"])
        except (LambdaCloudError, KeyboardInterrupt) as exc:
            reason = str(exc) or "interrupted"
        try:
            self.client.terminate([instance_id])
        except LambdaCloudError as exc:
            self.module.fail_json(
                msg=(
                    f"Instance {instance_id} ({self.name!r}) was launched but did not become active ({reason}), "
                    f"and terminating it FAILED ({exc}). It is still billing: terminate it in the Lambda Cloud "
                    f"dashboard or with: {self._terminate_command(instance_id)}"
                ),
                instance_id=instance_id, terminated=False, **self.result,
            )
        self.module.fail_json(
            msg=(
                f"Instance {instance_id} ({self.name!r}) was launched but did not become active, so it was "
                f"terminated: {reason}"
            ),
            instance_id=instance_id, terminated=True, **self.result,
        )

    def _terminate_command(self, instance_id):
        return (
            f"curl -u \"$LAMBDA_API_KEY:\" -X POST {self.client.base_url}/instance-operations/terminate "
            f"-H 'Content-Type: application/json' -d '{{\"instance_ids\": [\"{instance_id}\"]}}'"
        )

    def _wait_existing(self, instance):
        """Wait for an instance this run did not launch: fail loudly, but leave it to its owner."""
        try:
            return self.client.wait_for_instance(instance["id"], timeout=self.module.params["wait_timeout"])
        except LambdaCloudError as exc:
            self.fail(exc, msg=f"{exc} To end it: {self._terminate_command(instance['id'])}",
                      instance_id=instance["id"])

    def _call(self, method, *args):
        try:
            return method(*args)
        except LambdaCloudError as exc:
            self.fail(exc)

    def _set_instance(self, instance):
        self.result["instance"] = instance_summary(instance)

    def present(self):
        found = self._get()
        if not found:
            self._create()
            return
        instance = found[0]
        wanted_types = self.module.params["instance_type"]
        type_name = instance["instance_type"]["name"]
        if type_name not in wanted_types:
            self.module.warn(
                f"Instance {instance['id']} ({self.name!r}) is a {type_name}, not one of {', '.join(wanted_types)}; "
                "reusing it. Terminate it (state=absent) to launch another type."
            )
        ready = instance.get("status") == "active" and instance.get("ip")
        if self.module.params["wait"] and not ready and not self.module.check_mode:
            instance = self._wait_existing(instance)
        self._set_instance(instance)

    def absent(self):
        found = self._get()
        if not found:
            return
        self._mark_as_changed()
        if not self.module.check_mode:
            found = self._call(self.client.terminate, [i["id"] for i in found])
            if self.module.params["wait"]:
                found = self._wait_terminated([i["id"] for i in found])
        self.result["instances"] = [instance_summary(i) for i in found]
        self._set_instance(found[0])

    def _wait_terminated(self, instance_ids):
        """Poll until every instance is terminated (or gone from the API)."""
        deadline = time.monotonic() + self.module.params["wait_timeout"]
        pending, done = list(instance_ids), []
        while pending:
            instance_id = pending[0]
            try:
                instance = self.client.get_instance(instance_id)
            except ObjectDoesNotExist:
                done.append({"id": instance_id, "name": self.name, "status": "terminated"})
                pending.pop(0)
                continue
            except LambdaCloudError as exc:
                self.fail(exc)
            if instance.get("status") not in LIVE_STATUSES | {"terminating"}:
                done.append(instance)
                pending.pop(0)
            elif time.monotonic() > deadline:
                self.module.fail_json(
                    msg=f"Instance {instance_id} ({self.name!r}) was still {instance.get('status')!r} after "
                    f"{self.module.params['wait_timeout']} s; check it in the Lambda Cloud dashboard.",
                    instance_id=instance_id, **self.result,
                )
            else:
                time.sleep(0.5)
        return done

    def restarted(self):
        found = self._get()
        if not found:
            self.module.fail_json(
                msg=f"No instance named {self.name!r} to restart: launch it with state=present.", **self.result
            )
        instance = found[0]
        self._mark_as_changed()
        if not self.module.check_mode:
            self._call(self.client.restart, [instance["id"]])
            if self.module.params["wait"]:
                instance = self._wait_existing(instance)
            else:
                instance = self._call(self.client.get_instance, instance["id"])
        self._set_instance(instance)


class _signals_interrupt:
    """While waiting after a launch, SIGTERM and SIGHUP interrupt like Ctrl-C, so the launched
    instance is terminated instead of left running when the run is cancelled."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._interrupt) for s in self.SIGNALS}

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    @staticmethod
    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"interrupted by signal {signum}")


def main():
    argument_spec = lambda_cloud_argument_spec()
    argument_spec.update(
        name={"type": "str", "required": True},
        state={"type": "str", "choices": ["present", "absent", "restarted"], "default": "present"},
        instance_type={"type": "list", "elements": "str"},
        region={"type": "list", "elements": "str", "default": []},
        ssh_key_name={"type": "str", "no_log": False},
        file_systems={"type": "list", "elements": "str", "default": []},
        image={"type": "dict"},
        tags={"type": "dict"},
        user_data={"type": "str"},
        wait={"type": "bool", "default": True},
        wait_timeout={"type": "int", "default": 900},
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        required_if=[("state", "present", ("instance_type", "ssh_key_name"))],
        supports_check_mode=True,
    )
    _check_input(module)
    instance = LambdaInstance(module)
    getattr(instance, module.params["state"])()
    instance.exit()


def _check_input(module):
    """Bad input fails here, before any request."""
    params = module.params
    if len(params["name"]) > 64 or not params["name"].strip():
        module.fail_json(msg=f"name must be 1-64 characters, got {len(params['name'])}: {params['name']!r}")
    if params["state"] == "present" and not params["instance_type"]:
        module.fail_json(msg="instance_type needs at least one instance type name, e.g. [gpu_1x_a10]")
    image = params["image"]
    if image is not None and (len(image) != 1 or next(iter(image)) not in ("id", "family")):
        module.fail_json(msg=f"image must be {{id: ...}} or {{family: ...}}, got {image!r}")


if __name__ == "__main__":
    main()
