"""The run's settings: config file, environment and flags merged by the one key table.

Precedence is flag > environment > config file > defaults (module_utils/trainer_config.py owns the
keys, types and merge); this module only finds the file, turns ``--set key=value`` flags into
settings, and turns configuration errors into messages for people.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from wrapper.project import trainer_config

DEFAULT_CONFIG_PATH = "config/trainer.json"
CONFIG_ENV = "LT_CONFIG"


@dataclass
class Settings:
    values: dict[str, Any]
    sources: dict[str, str]
    config_path: Path
    config_exists: bool
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, var: str) -> Any:
        return self.values[var]

    def get(self, var: str, default: Any = None) -> Any:
        value = self.values.get(var)
        return default if value is None else value

    def require(self, *names: str) -> None:
        try:
            trainer_config().require(self.values, *names)
        except trainer_config().ConfigError as error:
            raise click.ClickException(f"{error} (config file: {self.config_path})") from None

    def secrets_env(self) -> dict[str, str]:
        """Secrets as the environment variables the playbooks and the job read them from."""
        table = trainer_config()
        return {key.env: str(self.values[key.var]) for key in table.KEYS
                if key.secret and key.env and self.values.get(key.var)}

    def public_values(self) -> dict[str, Any]:
        """Every setting except the secrets: safe to pass as Ansible extravars or to print."""
        secret = trainer_config().SECRET_VARS
        return {var: value for var, value in self.values.items() if var not in secret}


def config_path(explicit: str | None = None) -> tuple[Path, bool]:
    """The config file to read and whether the user named it (a named file must exist)."""
    named = explicit or os.environ.get(CONFIG_ENV)
    return Path(named or DEFAULT_CONFIG_PATH).expanduser(), bool(named)


def parse_set_options(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``--set key=value`` flags (kebab-case keys) as {var: value}, checked like file values."""
    raw = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--set")
        raw[name.strip()] = value
    values = _checked(lambda: trainer_config().normalize(raw, source="--set"))
    table = trainer_config()
    secret = [name for name in raw if table.BY_NAME[table.canonical_name(name)].secret]
    if secret:
        raise click.BadParameter(f"{secret[0]} is a secret: set it in the config file or the environment, "
                                 "never on a command line", param_hint="--set")
    return values


def load_settings(config: str | None = None, flags: dict[str, Any] | None = None,
                  set_options: tuple[str, ...] = ()) -> Settings:
    table = trainer_config()
    path, named = config_path(config)
    exists = path.is_file()
    if named and not exists:
        raise click.ClickException(f"config file {path} not found; `lt config init --path {path}` writes one")
    file_values = _checked(lambda: table.load_config_file(str(path))) if exists else {}
    merged_flags = {**parse_set_options(set_options), **_flag_values(flags or {})}
    values, sources = _checked(lambda: table.resolve(file_values=file_values, flags=merged_flags))
    warnings = []
    holds_secret = any(file_values.get(var) for var in table.SECRET_VARS)
    if holds_secret and (warning := table.secret_file_warning(str(path))):
        warnings.append(warning)
    return Settings(values, sources, path, exists, warnings)


def _flag_values(flags: dict[str, Any]) -> dict[str, Any]:
    """Click option values as settings: unset options and empty multiples are left to lower layers."""
    table = trainer_config()
    values = {}
    for var, value in flags.items():
        if value is None or value == () or value == []:
            continue
        key = table.BY_VAR[var]
        values[var] = _checked(lambda key=key, value=value: table.coerce(
            key, list(value) if isinstance(value, tuple) else value, source="flag"))
    return values


def _checked(read):
    try:
        return read()
    except trainer_config().ConfigError as error:
        raise click.ClickException(str(error)) from None
