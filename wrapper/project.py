"""Where the Ansible project lives, and loading its shared modules by file path.

An installed wheel carries the project under ``wrapper/_project``; a checkout has it at the root.
``module_utils`` is not a Python package (Ansible imports it by its own rules), so `lt` loads the
files it shares with the playbooks by path, once per process.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@cache
def project_dir() -> Path:
    bundled = PACKAGE_DIR / "_project"
    if (bundled / "ansible.cfg").is_file():
        return bundled
    return PACKAGE_DIR.parent


def playbook(name: str) -> Path:
    return project_dir() / "playbooks" / f"{name}.yml"


def examples_dir() -> Path:
    return project_dir() / "examples"


def load_module_util(name: str):
    """Import ``module_utils/<name>.py`` under a private module name."""
    module_name = f"_lt_module_utils_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = project_dir() / "module_utils" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def trainer_config():
    return load_module_util("trainer_config")


def lambda_cloud():
    return load_module_util("lambda_cloud")
