"""docs/cli.md embeds every command's --help; this test fails when the page is out of date.

Regenerate the page after changing a command:  LT_UPDATE_DOCS=1 python3 -m pytest tests/test_cli_docs.py
"""

from __future__ import annotations

import os
from pathlib import Path

import click
from click.testing import CliRunner

from wrapper.cli import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
INTRO = """# `lt` command reference

Every command's `--help`, exactly as `lt` prints it. The README explains the lifecycle; this page
is the reference. It is generated, and a test fails when it falls behind the code: after changing a
command, run `LT_UPDATE_DOCS=1 python3 -m pytest tests/test_cli_docs.py`.
"""


def command_paths(group: click.Group = cli, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name in sorted(group.commands):
        command = group.commands[name]
        if isinstance(command, click.Group):
            paths.extend(command_paths(command, (*prefix, name)))
        else:
            paths.append((*prefix, name))
    return paths


def render() -> str:
    runner = CliRunner()
    sections = [INTRO]
    for path in command_paths():
        result = runner.invoke(cli, [*path, "--help"], prog_name="lt", terminal_width=100)
        assert result.exit_code == 0, result.output
        title = " ".join(("lt", *path))
        sections.append(f"## {title}\n\n```\n{result.output.rstrip()}\n```\n")
    return "\n".join(sections)


def test_cli_reference_is_current():
    expected = render()
    if os.environ.get("LT_UPDATE_DOCS"):
        DOC.write_text(expected, encoding="utf-8")
    assert DOC.read_text(encoding="utf-8") == expected, (
        "docs/cli.md is out of date: LT_UPDATE_DOCS=1 python3 -m pytest tests/test_cli_docs.py")


def test_reference_covers_every_verb():
    titles = {line[3:] for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("## ")}
    for verb in ("up", "push", "configure", "install", "train", "down", "status", "logs", "ssh", "types",
                 "preflight", "export", "config init", "config show", "config check"):
        assert f"lt {verb}" in titles
