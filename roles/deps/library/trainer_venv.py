#!/usr/bin/python
"""Ansible module: a Python venv with pinned requirements, skipped in one call when nothing changed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: trainer_venv
short_description: Create a venv and install pinned requirements, once
description:
  - Creates a virtual environment at O(path) with O(python) (with C(--system-site-packages) by
    default, so a CUDA PyTorch that the machine image provides is reused, not downloaded) and installs
    the requirements with pip.
  - Writes a stamp file holding a hash of the interpreter, the requirements, the pip options and the
    versions of O(keep_system_packages). When the stamp matches, the module returns unchanged without
    running pip, so a second run takes well under a second.
  - O(keep_system_packages) are pinned (as pip constraints) to the versions the system already has,
    so pip never replaces the image's PyTorch with another build; a requirement that needs another
    version fails with pip's explanation instead.
  - O(backend=auto) picks the C(gpu) requirements when the host has an NVIDIA GPU, else C(cpu).
  - When the system Python lacks C(ensurepip) (Debian/Ubuntu without C(python3-venv)), the module
    fails with RV(missing_system_packages) set, so the caller can install them and run it again.
options:
  path:
    description: Folder of the venv.
    type: path
    required: true
  python:
    description: Interpreter that creates the venv.
    type: str
    default: /usr/bin/python3
  requirements:
    description: Requirements file contents (pip format) by backend (keys V(gpu) and V(cpu)).
    type: dict
    required: true
  backend:
    description: Which entry of O(requirements) to install; V(auto) detects an NVIDIA GPU.
    type: str
    default: auto
  system_site_packages:
    description: Let the venv see the system's packages (to reuse the image's CUDA PyTorch).
    type: bool
    default: true
  keep_system_packages:
    description: System packages whose installed version pip must keep (ignored when not installed).
    type: list
    elements: str
    default: [torch]
  pip_args:
    description: Extra arguments for C(pip install).
    type: list
    elements: str
    default: []
  min_python:
    description:
      - Oldest Python the requirements install on (C(3.11) for trl 1.15). An older O(python) fails
        at once with what to do, instead of pip's "no matching distribution".
    type: str
    default: "3.11"
author:
  - llama-trainer contributors
"""

RETURN = r"""
backend:
  description: The backend whose requirements were used.
  type: str
  returned: always
python:
  description: The venv's interpreter.
  type: str
  returned: always
stamp:
  description: Hash of everything that decides the venv's content.
  type: str
  returned: always
pip_output:
  description: The last lines of pip's output when pip ran.
  type: list
  elements: str
  returned: when pip ran
missing_system_packages:
  description: System packages to install before the venv can be created (e.g. python3-venv).
  type: list
  elements: str
  returned: on failure for that reason
"""

STAMP = ".llama-trainer-requirements.sha256"
CONSTRAINTS = ".llama-trainer-constraints.txt"
REQUIREMENTS = "llama-trainer-requirements.txt"
# Reads the interpreter's version and installed versions without importing the packages (importing
# torch takes seconds).
VERSIONS_SCRIPT = """
import json, sys
from importlib import metadata
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "packages": found}))
"""


def has_nvidia_gpu():
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def installed_here(names):
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def runs_this_module(python):
    """Whether ``python`` is the interpreter running this module, outside any venv (same packages)."""
    try:
        same = os.path.samefile(python, sys.executable)
    except OSError:
        return False
    return same and sys.prefix == sys.base_prefix


def interpreter_facts(module, python, names):
    """(Python version "3.10", {package: installed version}) of ``python``."""
    # Usually the module's own interpreter: read it here instead of starting another Python.
    if runs_this_module(python):
        return "{}.{}".format(*sys.version_info[:2]), installed_here(names)
    try:
        rc, out, err = module.run_command([python, "-c", VERSIONS_SCRIPT, *names])
    except OSError as exc:
        module.fail_json(msg=f"cannot run {python}: {exc}")
    if rc != 0:
        module.fail_json(msg=f"{python} could not report its version: {err.strip() or out.strip()}")
    facts = json.loads(out)
    return facts["python"], facts["packages"]


def version_tuple(text):
    return tuple(int(part) for part in text.split("."))


def stamp_of(python_path, requirements, pip_args, system_site_packages, kept):
    material = json.dumps({"python": os.path.realpath(python_path), "requirements": requirements,
                           "pip_args": pip_args, "system_site_packages": system_site_packages,
                           "kept": kept}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()


def read_file(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return None


def write_file(path, text):
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def create_venv(module, params, venv_python):
    args = [params["python"], "-m", "venv"]
    if params["system_site_packages"]:
        args.append("--system-site-packages")
    rc, out, err = module.run_command([*args, params["path"]])
    if rc == 0 and os.path.exists(venv_python):
        return
    text = (err or out).strip()
    if "ensurepip" in text:
        version = subprocess.run([params["python"], "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True).stdout.strip()
        shutil.rmtree(params["path"], ignore_errors=True)
        module.fail_json(msg=f"{params['python']} cannot create a venv: ensurepip is missing (install "
                             f"python3-venv)", missing_system_packages=["python3-venv", f"python{version}-venv"])
    module.fail_json(msg=f"creating the venv at {params['path']} failed: {text[-2000:]}")


def main():
    module = AnsibleModule(
        argument_spec={
            "path": {"type": "path", "required": True},
            "python": {"type": "str", "default": "/usr/bin/python3"},
            "requirements": {"type": "dict", "required": True},
            "backend": {"type": "str", "default": "auto"},
            "system_site_packages": {"type": "bool", "default": True},
            "keep_system_packages": {"type": "list", "elements": "str", "default": ["torch"]},
            "pip_args": {"type": "list", "elements": "str", "default": []},
            "min_python": {"type": "str", "default": "3.11"},
        },
        supports_check_mode=True,
    )
    params = module.params
    backend = params["backend"]
    if backend == "auto":
        backend = "gpu" if has_nvidia_gpu() else "cpu"
    if backend not in params["requirements"]:
        module.fail_json(msg=f"no requirements for backend {backend!r}; have {sorted(params['requirements'])}")
    requirements = params["requirements"][backend].strip() + "\n"
    venv = params["path"]
    venv_python = os.path.join(venv, "bin", "python")

    # Versions come from the system interpreter: the venv sees the same site-packages.
    python_version, kept = interpreter_facts(module, params["python"], params["keep_system_packages"])
    if version_tuple(python_version) < version_tuple(params["min_python"]):
        module.fail_json(
            msg=f"{params['python']} is Python {python_version}; the training stack needs Python "
                f"{params['min_python']} or newer (trl 1.15). Boot an image with a newer Python (e.g. "
                "Ubuntu 24.04 Lambda Stack: image-family in the config), or point instance_python at one.",
            python_version=python_version)
    stamp = stamp_of(params["python"], requirements, params["pip_args"], params["system_site_packages"], kept)
    result = {"changed": False, "backend": backend, "python": venv_python, "stamp": stamp}
    if os.path.exists(venv_python) and read_file(os.path.join(venv, STAMP)) == stamp:
        module.exit_json(**result)

    result["changed"] = True
    if module.check_mode:
        module.exit_json(**result)
    if not os.path.exists(venv_python):
        create_venv(module, params, venv_python)
    write_file(os.path.join(venv, REQUIREMENTS), requirements)
    write_file(os.path.join(venv, CONSTRAINTS), "".join(f"{name}=={version}\n" for name, version in kept.items()))
    command = [venv_python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
               "-r", os.path.join(venv, REQUIREMENTS), "-c", os.path.join(venv, CONSTRAINTS), *params["pip_args"]]
    rc, out, err = module.run_command(command, environ_update={"PIP_NO_INPUT": "1"})
    result["pip_output"] = (out + err).strip().splitlines()[-30:]
    if rc != 0:
        module.fail_json(msg=f"pip install failed (exit {rc}) in {venv}; its last lines are in pip_output",
                         **result)
    write_file(os.path.join(venv, STAMP), stamp + "\n")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
