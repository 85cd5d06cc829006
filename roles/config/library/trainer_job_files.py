#!/usr/bin/python
"""Ansible module: the trainer folder, job.json and the 0600 secrets.env in one call to the host."""

from __future__ import annotations

import json
import os
import shlex
import stat
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: trainer_job_files
short_description: Write the trainer folder, the job config and the job's environment file at once
description:
  - Creates O(trainer_dir) (mode C(0700), parents as needed), writes O(job) as C(job.json) and O(env) as
    C(secrets.env) (C(NAME='value') lines, shell-quoted, sourced by the job's launcher), both mode C(0600).
  - One connection to the host instead of one C(file) and two C(copy) tasks; a file whose content and mode
    are already right is not touched, so a second run reports no change.
  - Files are written to a 0600 temporary file in the same folder and moved into place, so the secrets
    are never readable by others, not even for a moment.
  - O(env) is marked C(no_log); still run the task with C(no_log) (its result is no secret, but a failure
    message could quote a value).
options:
  trainer_dir:
    description: Folder that holds everything of llama-trainer; made private to its user.
    type: path
    required: true
  job:
    description: The job config, written as C(job.json) (indented, keys sorted).
    type: dict
    required: true
  env:
    description: The job's environment variables (secrets among them), written as C(secrets.env).
    type: dict
    default: {}
author:
  - llama-trainer contributors
"""

EXAMPLES = r"""
- name: Write the job config and the env file
  trainer_job_files:
    trainer_dir: ~/llama-trainer
    job: {run_id: my-run, dataset: me/my-chats}
    env: {HF_TOKEN: "{{ lookup('ansible.builtin.env', 'HF_TOKEN') }}"}
  no_log: true
"""

RETURN = r"""
trainer_dir:
  description: The trainer folder, with C(~) expanded.
  type: str
  returned: always
job_file:
  description: Path of C(job.json).
  type: str
  returned: always
env_file:
  description: Path of C(secrets.env).
  type: str
  returned: always
"""

ENV_HEADER = "# The training job's environment, sourced by its launcher. Secrets: keep this file 0600.\n"


def job_text(job):
    return json.dumps(job, indent=4, sort_keys=True) + "\n"


def env_text(env):
    # The launcher sources the file with `set -a`: every value is shell-quoted.
    lines = [f"{name}={shlex.quote(str(value))}\n" for name, value in sorted(env.items(), key=lambda kv: kv[0].lower())]
    return ENV_HEADER + "".join(lines)


def current(path):
    """(text, mode) of ``path``, or (None, None) when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read(), stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
    except (OSError, UnicodeDecodeError):
        return None, None


def write_private(path, text):
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        os.fchmod(handle, 0o600)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def main():
    module = AnsibleModule(
        argument_spec={
            "trainer_dir": {"type": "path", "required": True},
            "job": {"type": "dict", "required": True},
            "env": {"type": "dict", "default": {}, "no_log": True},
        },
        supports_check_mode=True,
    )
    folder = module.params["trainer_dir"]
    files = {os.path.join(folder, "job.json"): job_text(module.params["job"]),
             os.path.join(folder, "secrets.env"): env_text(module.params["env"])}
    result = {"changed": False, "trainer_dir": folder, "job_file": os.path.join(folder, "job.json"),
              "env_file": os.path.join(folder, "secrets.env")}

    try:
        mode = stat.S_IMODE(os.stat(folder).st_mode)
    except FileNotFoundError:
        mode = None
    if mode != 0o700:
        result["changed"] = True
        if not module.check_mode:
            try:
                os.makedirs(folder, exist_ok=True)
                os.chmod(folder, 0o700)
            except OSError as exc:
                module.fail_json(msg=f"cannot create {folder}: {exc.strerror}", **result)

    for path, text in files.items():
        if current(path) == (text, 0o600):
            continue
        result["changed"] = True
        if not module.check_mode:
            try:
                write_private(path, text)
            except OSError as exc:
                module.fail_json(msg=f"cannot write {path}: {exc.strerror}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
