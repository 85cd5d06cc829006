"""The playbooks and roles pass ansible-lint's production profile and Ansible's own syntax check."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.hub_support import REPO_ROOT

PLAYBOOKS = sorted(p.name for p in (REPO_ROOT / "playbooks").glob("*.yml"))
ROLES = ("files", "config", "deps", "train", "teardown", "launch")


@pytest.mark.skipif(shutil.which("ansible-lint") is None, reason="ansible-lint is not installed")
def test_ansible_lint_production_profile_passes():
    result = subprocess.run(["ansible-lint", "--profile", "production", "--nocolor", "playbooks", "roles"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_syntax(playbook):
    result = subprocess.run(["ansible-playbook", "--syntax-check", f"playbooks/{playbook}"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_playbook_verb_exists():
    assert {"up.yml", "push.yml", "configure.yml", "install.yml", "train.yml", "down.yml", "local.yml",
            "reattach.yml"} <= set(PLAYBOOKS)


@pytest.mark.parametrize("role", ROLES)
def test_every_role_variable_is_documented_and_specified(role):
    """Each role's defaults are described in meta/argument_specs.yml (so bad values fail at the start)
    and named in its README."""
    import yaml

    folder = REPO_ROOT / "roles" / role
    defaults = yaml.safe_load((folder / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((folder / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    specified = {name for spec in specs.values() for name in spec.get("options", {})}
    readme = (folder / "README.md").read_text()
    assert set(defaults) <= specified, f"not in argument_specs: {set(defaults) - specified}"
    assert [name for name in specified if f"`{name}`" not in readme] == []
    for spec in specs.values():
        for name, option in spec.get("options", {}).items():
            assert option.get("description"), f"{role}: {name} has no description"



@pytest.mark.parametrize("kind, folder, name", [
    ("module", "library", "trainer_config"),
    ("module", "roles/deps/library", "trainer_venv"),
    ("module", "roles/train/library", "trainer_job"),
    ("lookup", "roles/files/lookup_plugins", "trainer_bundle"),
])
def test_plugin_documentation_parses(kind, folder, name):
    result = subprocess.run(["ansible-doc", "-t", kind, "-M", folder, name], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "ERROR" not in result.stderr, result.stderr
