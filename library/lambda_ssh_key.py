#!/usr/bin/python
"""Ansible module: register (or remove) an SSH public key with Lambda Cloud by name."""

from __future__ import annotations

import os

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.lambda_cloud import LambdaCloudError
from ansible.module_utils.lambda_cloud_module import LambdaCloudModule, lambda_cloud_argument_spec

DOCUMENTATION = r"""
module: lambda_ssh_key
short_description: Register an SSH public key with Lambda Cloud
description:
  - Makes sure the public key is registered under O(name), so instances can be launched with it
    (see M(lambda_instance)), or that no key of that name is registered.
  - Lambda Cloud cannot change a registered key. If O(name) is registered with another key, the task
    fails rather than replace a key that running instances may use.
extends_documentation_fragment:
  - lambda_cloud
options:
  name:
    description: Name of the key in Lambda Cloud.
    type: str
    required: true
  public_key:
    description: The public key, one line in OpenSSH format (C(ssh-ed25519 AAAA... comment)).
    type: str
  public_key_file:
    description: Path of a public key file (C(.pub)) on the host that runs the module.
    type: path
  state:
    description: V(present) registers the key, V(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
notes:
  - Supports check mode.
  - One of O(public_key) or O(public_key_file) is required with O(state=present).
author:
  - llama-trainer contributors
"""

EXAMPLES = r"""
- name: Register the key that lambda_instance installs on instances
  lambda_ssh_key:
    name: llama-trainer
    public_key_file: ~/.ssh/lambda_cloud.pub

- name: Remove it
  lambda_ssh_key:
    name: llama-trainer
    state: absent
"""

RETURN = r"""
ssh_key:
  description: The registered key (for O(state=absent), the key deleted; empty when there was none).
  returned: always
  type: dict
  contains:
    id: {description: Key id (null in check mode before it exists)., type: str}
    name: {description: Key name., type: str}
    public_key: {description: The public key., type: str}
"""


class LambdaSshKey(LambdaCloudModule):
    def __init__(self, module):
        super().__init__(module)
        self.name = module.params["name"]
        self.result["ssh_key"] = {}

    def _get(self):
        try:
            keys = self.client.list_ssh_keys()
        except LambdaCloudError as exc:
            self.fail(exc)
        return next((k for k in keys if k.get("name") == self.name), None)

    def present(self):
        public_key = self._public_key()
        key = self._get()
        if key is not None:
            if _key_material(key.get("public_key")) != _key_material(public_key):
                self.module.fail_json(
                    msg=(
                        f"SSH key {self.name!r} is registered with a different public key. Lambda Cloud cannot "
                        "change it: use another name, or delete it (state=absent) once no instance needs it."
                    ),
                    **self.result,
                )
            self.result["ssh_key"] = _summary(key)
            return
        self._mark_as_changed()
        if self.module.check_mode:
            self.result["ssh_key"] = {"id": None, "name": self.name, "public_key": public_key}
            return
        try:
            self.result["ssh_key"] = _summary(self.client.add_ssh_key(self.name, public_key))
        except LambdaCloudError as exc:
            self.fail(exc)

    def absent(self):
        key = self._get()
        if key is None:
            return
        self._mark_as_changed()
        self.result["ssh_key"] = _summary(key)
        if not self.module.check_mode:
            try:
                self.client.delete_ssh_key(key["id"])
            except LambdaCloudError as exc:
                self.fail(exc)

    def _public_key(self):
        params = self.module.params
        if params["public_key"]:
            text, source = params["public_key"], "public_key"
        else:
            source = params["public_key_file"]
            try:
                with open(os.path.expanduser(source)) as handle:
                    text = handle.read()
            except OSError as exc:
                self.module.fail_json(msg=f"Cannot read public_key_file {source}: {exc.strerror}")
        text = text.strip()
        if "PRIVATE KEY" in text:
            # Never send (or echo) a private key: it is a secret and the API wants the public half.
            self.module.fail_json(msg=f"{source} holds a private key; give the public key (the .pub file).")
        if len(text.split()) < 2 or not text.split()[0].startswith(("ssh-", "ecdsa-", "sk-")):
            self.module.fail_json(msg=f"{source} is not an OpenSSH public key (expected 'ssh-ed25519 AAAA...').")
        return text


def _key_material(public_key):
    """Type and base64 of a key: the comment does not make it another key."""
    return tuple((public_key or "").split()[:2])


def _summary(key):
    return {"id": key.get("id"), "name": key.get("name"), "public_key": key.get("public_key")}


def main():
    argument_spec = lambda_cloud_argument_spec()
    argument_spec.update(
        name={"type": "str", "required": True},
        public_key={"type": "str", "no_log": False},
        public_key_file={"type": "path"},
        state={"type": "str", "choices": ["present", "absent"], "default": "present"},
    )
    module = AnsibleModule(
        argument_spec=argument_spec,
        mutually_exclusive=[("public_key", "public_key_file")],
        required_if=[("state", "present", ("public_key", "public_key_file"), True)],
        supports_check_mode=True,
    )
    ssh_key = LambdaSshKey(module)
    getattr(ssh_key, module.params["state"])()
    ssh_key.exit()


if __name__ == "__main__":
    main()
