"""`-e/--extra-vars` and $LT_EXTRA_VARS: Ansible variables handed to the playbooks as they are.

For what the config keys don't cover (how to reach an instance, role tuning), written as
ansible-playbook takes them: KEY=VALUE (VALUE parsed as JSON when it is JSON), a JSON object, or
@FILE holding one. Secrets are refused: extra vars are written to disk and show in process lists.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import click

from wrapper.project import trainer_config

ENV = "LT_EXTRA_VARS"
_SECRET_NAME = re.compile(r"(api_key|token|secret|password|passwd)", re.IGNORECASE)


def parse(items: tuple[str, ...] | list[str] = (), environ: dict | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if environ.get(ENV):
        values.update(_object(environ[ENV], f"${ENV}"))
    for item in items:
        values.update(_item(item))
    for name in values:
        if name in trainer_config().SECRET_VARS or _SECRET_NAME.search(name):
            raise click.BadParameter(
                f"{name!r} looks like a secret; secrets go in the environment or the config file, never "
                "in extra vars (they are written to disk and show in process lists)", param_hint="--extra-vars")
    return values


def _item(item: str) -> dict[str, Any]:
    if item.startswith("@"):
        path = Path(item[1:]).expanduser()
        try:
            return _object(path.read_text(encoding="utf-8"), str(path))
        except OSError as error:
            raise click.BadParameter(f"cannot read {path}: {error.strerror}", param_hint="--extra-vars") from None
    if item.lstrip().startswith("{"):
        return _object(item, "--extra-vars")
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise click.BadParameter(f"{item!r} is not KEY=VALUE, a JSON object or @FILE", param_hint="--extra-vars")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return {name.strip(): parsed}


def _object(text: str, source: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"{source} is not valid JSON: {error.msg}", param_hint="--extra-vars") from None
    if not isinstance(value, dict):
        raise click.BadParameter(f"{source} must be a JSON object", param_hint="--extra-vars")
    return value
