"""The README is the front door: its commands, keys and verbs must stay true."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_two_commands_exist_and_ci_runs_the_test_command():
    assert "make quickstart" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^quickstart:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must call the README's test command"
    assert "lt train --local" in makefile


def test_config_table_matches_the_key_table():
    generated = subprocess.run([sys.executable, str(ROOT / "scripts" / "config-reference")],
                               capture_output=True, text=True, check=True).stdout
    assert generated in README, "README's key table is stale: scripts/config-reference > table, paste it"


def test_every_verb_is_documented():
    from wrapper.cli import cli

    for name, command in cli.commands.items():
        assert f"`lt {name}" in README, f"lt {name} is missing from the README"
        for sub in getattr(command, "commands", {}):
            assert sub in README, f"lt {name} {sub} is missing from the README"


def test_every_playbook_is_named():
    for playbook in (ROOT / "playbooks").glob("*.yml"):
        assert playbook.name in README, f"playbooks/{playbook.name} is missing from the README"
