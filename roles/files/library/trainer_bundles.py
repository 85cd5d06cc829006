#!/usr/bin/python
"""Ansible module: which tarballs of the files role a host lacks, and unpacking them, for all in one call."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: trainer_bundles
short_description: Compare the host's copies of the files role's tarballs, or unpack them
description:
  - Each bundle is a tarball C(<dest>/.<name>.tar.gz) on the host, sent by the C(files) role, whose
    SHA-1 the controller knows.
  - With O(unpack=false) the module only looks, for every bundle in one call - RV(upload) names the
    bundles whose tarball differs (or is missing), RV(unpack) those whose unpacked copy is not of the
    current tarball (a stamp C(<dest>/.<name>.unpacked) holds the SHA-1 of the last tarball unpacked).
    It creates each O(bundles[].dest) (mode C(0700)) so a copy can land there.
  - With O(unpack=true) it unpacks each bundle's tarball into O(bundles[].dest), first removing
    whatever the archive's top-level entries replace, so files deleted on the controller go on the
    host too, then writes the stamp.
options:
  bundles:
    description: The bundles.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: The bundle's name (its tarball is C(.<name>.tar.gz)).
        type: str
        required: true
      sha1:
        description: SHA-1 of the controller's tarball.
        type: str
        required: true
      dest:
        description: Folder on the host that holds the tarball and its unpacked content.
        type: path
        required: true
  unpack:
    description: Unpack the bundles instead of only comparing them.
    type: bool
    default: false
author:
  - llama-trainer contributors
"""

EXAMPLES = r"""
- name: Compare the host's copies
  trainer_bundles:
    bundles: [{name: job, sha1: 0a4d55a8d778e5022fab701977c5d840bbc486d0, dest: ~/llama-trainer/job}]
  register: remote

- name: Unpack the bundles that need it
  trainer_bundles:
    bundles: "{{ bundles | selectattr('name', 'in', remote.unpack) }}"
    unpack: true
"""

RETURN = r"""
upload:
  description: Names of the bundles whose tarball on the host differs from the controller's.
  type: list
  elements: str
  returned: when O(unpack=false)
unpack:
  description: Names of the bundles whose unpacked copy is not of the controller's tarball.
  type: list
  elements: str
  returned: when O(unpack=false)
unpacked:
  description: Names of the bundles unpacked.
  type: list
  elements: str
  returned: when O(unpack=true)
"""


def sha1_of(path):
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def read_stamp(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return None


def paths_of(bundle):
    return (os.path.join(bundle["dest"], f".{bundle['name']}.tar.gz"),
            os.path.join(bundle["dest"], f".{bundle['name']}.unpacked"))


def make_private_dirs(path):
    """Like mkdir -p, each folder it creates private to its user (0700)."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        os.mkdir(folder, 0o700)


def compare(module, bundles):
    upload, unpack, changed = [], [], False
    for bundle in bundles:
        if not os.path.isdir(bundle["dest"]):
            changed = True
            if not module.check_mode:
                make_private_dirs(bundle["dest"])
        archive, stamp = paths_of(bundle)
        if sha1_of(archive) != bundle["sha1"]:
            upload.append(bundle["name"])
        if read_stamp(stamp) != bundle["sha1"] or bundle["name"] in upload:
            unpack.append(bundle["name"])
    module.exit_json(changed=changed, upload=upload, unpack=unpack)


def extract(archive, dest):
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        # Like tar --recursive-unlink: what the archive brings replaces the host's copy entirely.
        for top in sorted({member.name.split("/", 1)[0] for member in members} - {"", ".", ".."}):
            target = os.path.join(dest, top)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.unlink(target)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # Python without extraction filters: the archive is our own, packed on the controller.
            tar.extractall(dest, members=members)


def unpack(module, bundles):
    done = []
    for bundle in bundles:
        archive, stamp = paths_of(bundle)
        found = sha1_of(archive)
        # In check mode the copy before this did not upload anything.
        if found != bundle["sha1"] and not module.check_mode:
            module.fail_json(msg=f"{archive} is not the tarball sent (SHA-1 {found}, expected {bundle['sha1']})")
        done.append(bundle["name"])
        if module.check_mode:
            continue
        try:
            extract(archive, bundle["dest"])
        except (OSError, tarfile.TarError) as exc:
            module.fail_json(msg=f"unpacking {archive} into {bundle['dest']} failed: {exc}", unpacked=done[:-1])
        with open(stamp, "w", encoding="utf-8") as handle:
            handle.write(bundle["sha1"] + "\n")
    module.exit_json(changed=bool(done), unpacked=done)


def main():
    module = AnsibleModule(
        argument_spec={
            "bundles": {"type": "list", "elements": "dict", "required": True, "options": {
                "name": {"type": "str", "required": True},
                "sha1": {"type": "str", "required": True},
                "dest": {"type": "path", "required": True},
            }},
            "unpack": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    if module.params["unpack"]:
        unpack(module, module.params["bundles"])
    compare(module, module.params["bundles"])


if __name__ == "__main__":
    main()
