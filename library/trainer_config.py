#!/usr/bin/python
"""Ansible module: read llama-trainer's settings on the controller and hand them to the playbooks."""

from __future__ import annotations

import os
import re
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.trainer_config import (
    BY_NAME,
    BY_VAR,
    ConfigError,
    canonical_name,
    coerce,
    job_config,
    load_config_file,
    require,
    resolve,
    secret_file_warning,
)

DOCUMENTATION = r"""
module: trainer_config
short_description: Resolve llama-trainer's settings (config file, environment, variables) on the controller
description:
  - Reads the llama-trainer config file (kebab-case keys, as C(lt) reads it), the environment
    (E(LAMBDA_API_KEY), E(HF_TOKEN), E(WANDB_API_KEY), ...) and Ansible variables, and merges them with
    the precedence variables > environment > config file > defaults.
  - Every key has one snake_case name (C(base-model) is C(base_model)); the table of keys lives in
    C(module_utils/trainer_config.py) and nowhere else.
  - "Returns the settings as snake_case values, the job config for the instance, and the secrets
    separately. Run it with C(no_log: true), because the result holds the secrets."
  - Secrets are read from the environment, O(env_file) or the config file only. A secret passed in
    O(variables) (for example C(-e hf_token=...)) is refused, because extra vars end up in process lists and
    in ansible-runner's files.
  - "Runs on the controller (C(delegate_to: localhost) or a play on C(localhost)); it reads the
    environment of the process that runs it."
options:
  config_file:
    description:
      - Path of the config file (JSON object of kebab-case keys). Unknown keys fail naming the key and
        the closest known one, with the line.
      - Omit it to use defaults, the environment and O(variables) only.
    type: path
  env_file:
    description:
      - A file of C(NAME=value) lines read as if they were environment variables (after the real
        environment). A wrapper that must not put secrets into a child's environment passes them so.
    type: path
  variables:
    description:
      - Ansible variables that may set keys, by snake_case name (highest precedence). Names that are
        not keys are ignored, so a playbook can pass every variable it has.
      - Values may be strings (as C(-e key=value) gives them); they are converted to the key's type.
    type: dict
    default: {}
  required:
    description:
      - Keys (kebab-case or snake_case) that must have a value; the first missing one fails the task,
        naming the key and where to set it.
    type: list
    elements: str
    default: []
  run_id:
    description:
      - Id of the training run, used in the job config. Generated from the instance name prefix and
        the UTC time when omitted.
    type: str
notes:
  - Paths in RV(job) are relative to the trainer directory on the instance, where the job runs. A
    dataset or base model that exists on the controller is copied there by the C(files) role, and
    RV(job) names its copy (C(data/NAME), C(models/NAME)).
author:
  - llama-trainer contributors
"""

EXAMPLES = r"""
- name: Read the settings (the result holds secrets)
  trainer_config:
    config_file: config/trainer.json
    variables:
      base_model: "{{ base_model | default(omit) }}"
      max_steps: "{{ max_steps | default(omit) }}"
    required: [dataset]
  register: trainer_config
  no_log: true
  delegate_to: localhost
"""

RETURN = r"""
settings:
  description: Every key's value by snake_case name, secrets left out.
  returned: success
  type: dict
sources:
  description: Where each value came from (default, config file, environment, variable).
  returned: success
  type: dict
secrets:
  description: The secrets that are set, by snake_case name (lambda_api_key, hf_token, wandb_api_key).
  returned: success
  type: dict
job_secret_env:
  description: The job's secrets as environment variables (HF_TOKEN, WANDB_API_KEY) for its 0600 env file.
  returned: success
  type: dict
job:
  description: The job config (snake_case keys, no secrets), paths relative to the trainer directory.
  returned: success
  type: dict
run_id:
  description: The run id written into RV(job).
  returned: success
  type: str
local_dataset:
  description: Absolute path of the dataset on the controller when it is a local file or folder, else null.
  returned: success
  type: str
local_base_model:
  description: Absolute path of the base model on the controller when it is a local folder, else null.
  returned: success
  type: str
config_warnings:
  description: Warnings for people, e.g. a config file with secrets that others can read.
  returned: success
  type: list
  elements: str
"""

# The job reads these secrets from its environment; the Lambda key stays on the controller.
JOB_SECRET_VARS = ("hf_token", "wandb_api_key")
# Where local inputs land, relative to the trainer directory (the job's working directory).
REMOTE_DATA_DIR = "data"
REMOTE_MODELS_DIR = "models"
REMOTE_RUNS_DIR = "runs"
_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def read_env_file(path):
    """NAME=value lines (optionally quoted); blank lines and # comments are skipped."""
    values = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            match = _ENV_LINE.match(line.rstrip("\n"))
            if not match:
                raise ConfigError("expected NAME=value", source=path, line=number)
            name, value = match.groups()
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[name] = value
    return values


def variable_overrides(variables):
    """The keys among the Ansible variables, converted to their types; secrets are refused."""
    overrides = {}
    for name, value in variables.items():
        key = BY_VAR.get(name) or BY_NAME.get(canonical_name(name))
        if key is None or value is None:
            continue
        if key.secret:
            raise ConfigError(
                f"is a secret and cannot be passed as an Ansible variable (extra vars show up in process "
                f"lists and runner files): set ${key.env} in the environment or \"{key.name}\" in the "
                "config file", key=key.name)
        overrides[key.var] = coerce(key, value, source="variable")
    return overrides


def local_path(value, *, folder_only=False):
    """The absolute controller path when ``value`` names an existing local file or folder."""
    if not value:
        return None
    path = os.path.abspath(os.path.expanduser(value))
    if os.path.isdir(path) or (os.path.isfile(path) and not folder_only):
        return path
    return None


def build_job(values, run_id, local_dataset, local_base_model):
    job = job_config(values, run_id)
    if not values.get("output_dir"):
        job["output_dir"] = f"{REMOTE_RUNS_DIR}/{run_id}/outputs"
    if local_dataset:
        job["dataset"] = f"{REMOTE_DATA_DIR}/{os.path.basename(local_dataset)}"
    if local_base_model:
        job["base_model"] = f"{REMOTE_MODELS_DIR}/{os.path.basename(local_base_model)}"
    return job


def resolve_settings(params, environ):
    warnings = []
    file_values = None
    if params["config_file"]:
        file_values = load_config_file(params["config_file"])
        warning = secret_file_warning(params["config_file"])
        if warning and any(var in file_values for var in BY_VAR if BY_VAR[var].secret):
            warnings.append(warning)
    if params["env_file"]:
        environ = {**environ, **read_env_file(params["env_file"])}
    values, sources = resolve(file_values=file_values, environ=environ,
                              flags=variable_overrides(params["variables"]))
    sources = {var: ("variable" if source == "flag" else source) for var, source in sources.items()}
    require(values, *params["required"])

    dataset = values.get("dataset")
    local_dataset = local_path(dataset)
    if dataset and not local_dataset and dataset.endswith((".jsonl", ".json")):
        raise ConfigError(f"no such file on this machine: {os.path.abspath(os.path.expanduser(dataset))}",
                          key="dataset")
    local_base_model = local_path(values.get("base_model"), folder_only=True)
    run_id = params["run_id"] or f"{values['instance_name_prefix']}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"

    secret_vars = [var for var in BY_VAR if BY_VAR[var].secret]
    return {
        "settings": {var: value for var, value in values.items() if var not in secret_vars},
        "sources": sources,
        "secrets": {var: values[var] for var in secret_vars if values.get(var)},
        "job_secret_env": {BY_VAR[var].env: values[var] for var in JOB_SECRET_VARS if values.get(var)},
        "job": build_job(values, run_id, local_dataset, local_base_model),
        "run_id": run_id,
        "local_dataset": local_dataset,
        "local_base_model": local_base_model,
        "config_warnings": warnings,
    }


def main():
    module = AnsibleModule(
        argument_spec={
            "config_file": {"type": "path"},
            "env_file": {"type": "path"},
            "variables": {"type": "dict", "default": {}},
            "required": {"type": "list", "elements": "str", "default": []},
            "run_id": {"type": "str"},
        },
        supports_check_mode=True,
    )
    try:
        result = resolve_settings(module.params, dict(os.environ))
    except ConfigError as exc:
        module.fail_json(msg=str(exc), key=exc.key)
    for warning in result["config_warnings"]:
        module.warn(warning)
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
