"""Lookup plugin: pack files and folders into a reproducible .tar.gz on the controller."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase

DOCUMENTATION = r"""
name: trainer_bundle
short_description: Pack files and folders into a reproducible tarball on the controller
description:
  - Packs each source (a file or a folder, by its own name at the top of the archive) into the
    gzipped tarball named by the first term and returns C({path, sha1}) of that tarball (the SHA-1 is
    what C(stat) reports for the copy on a host). C(__pycache__), C(*.pyc) and C(.git) are left out.
  - Times, owners, modes and the gzip header are fixed, so unchanged sources give the same bytes, and
    a C(copy) of the tarball transfers nothing. The tarball is rewritten only when its content changes.
  - Runs inside the controller's Ansible process (no extra process per folder).
options:
  _terms:
    description: The tarball's path, then the sources.
    required: true
"""

EXAMPLES = r"""
- name: Pack the job code and the examples
  ansible.builtin.set_fact:
    bundle: "{{ lookup('trainer_bundle', '/tmp/bundles/job.tar.gz', 'trainjob', 'examples') }}"

- name: Upload the tarball
  ansible.builtin.copy:
    src: "{{ bundle.path }}"
    dest: ~/llama-trainer/job/
    mode: "0600"
"""

RETURN = r"""
_raw:
  description: The tarball's path and SHA-1, as C({path, sha1}).
  type: list
  elements: dict
"""

SKIP_DIRS = {"__pycache__", ".git", ".ipynb_checkpoints"}
SKIP_SUFFIXES = (".pyc", ".pyo")


def _members(source):
    """(path on disk, name in the archive) for SRC and everything under it, sorted."""
    top = os.path.basename(os.path.normpath(source))
    yield source, top
    if not os.path.isdir(source):
        return
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        relative = os.path.relpath(root, source)
        for name in dirs + sorted(f for f in files if not f.endswith(SKIP_SUFFIXES)):
            path = os.path.join(root, name)
            yield path, os.path.normpath(os.path.join(top, relative, name))


def _normalized(info):
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    executable = info.isdir() or info.mode & 0o100
    info.mode = 0o755 if executable else 0o644
    return info


def pack(sources):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for source in sources:
            for path, name in _members(source):
                info = _normalized(archive.gettarinfo(path, arcname=name))
                if info.isfile():
                    with open(path, "rb") as handle:
                        archive.addfile(info, handle)
                elif info.isdir() or info.issym():
                    archive.addfile(info)
    packed = io.BytesIO()
    # mtime=0 and no file name: gzip's header is the same on every run.
    with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=0, compresslevel=6) as gz:
        gz.write(raw.getvalue())
    return packed.getvalue()


def write_bundle(out, sources):
    """Pack ``sources`` into ``out``; returns (SHA-1, whether the file changed)."""
    data = pack(sources)
    try:
        with open(out, "rb") as handle:
            changed = handle.read() != data
    except FileNotFoundError:
        changed = True
    if changed:
        os.makedirs(os.path.dirname(os.path.abspath(out)), mode=0o700, exist_ok=True)
        temporary = f"{out}.{os.getpid()}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, out)
    return hashlib.sha1(data).hexdigest(), changed


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        if len(terms) < 2:
            raise AnsibleLookupError("trainer_bundle needs the tarball's path and at least one source")
        out, *sources = (os.path.expanduser(str(term)) for term in terms)
        missing = [s for s in sources if not os.path.exists(s)]
        if missing:
            raise AnsibleLookupError(f"trainer_bundle: no such file or folder: {', '.join(missing)}")
        sha1, _ = write_bundle(out, sources)
        return [{"path": out, "sha1": sha1}]
