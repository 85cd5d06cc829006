#!/usr/bin/python
"""Ansible module: prepare, watch and stop a llama-trainer training run on the instance."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tarfile
import time

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: trainer_job
short_description: Prepare, watch and stop a training run started by the train role's launcher
description:
  - V(prepare) reads the job config, creates C(runs/<run_id>/), writes the launcher there and reports
    whether a job of that run is already running (so a second start attaches instead). With
    O(fresh=true), the files of a previous, finished attempt are moved aside.
  - V(status) is one poll, made for an C(until) loop. It reads Ansible's async job file (like
    C(async_status)), checks that the launcher's pid is alive, reads the exit status and returns the
    last lines of the job's log, so each retry carries the progress to the controller. It records the
    async job id in the run folder, so a later attach can clean up Ansible's async files.
  - V(stop) sends SIGTERM to the job (it saves what it can), then SIGKILL to its process group after
    O(grace) seconds.
  - V(pack) reads the run's C(result.json) and, unless O(fetch_outputs) says otherwise, packs the run's
    output folder into one uncompressed tar in the run folder (model weights barely compress), hashing
    it as it is written. It reports whether the Hub push was confirmed (C(status) succeeded and
    C(hub.confirmed)); V(auto) packs only when it was not.
  - V(fetched) records that the controller holds the outputs (the C(outputs-fetched) marker in the run
    folder, which the watchdog reads as "outputs safe") and removes the archive.
options:
  mode:
    description: What to do.
    type: str
    choices: [prepare, status, stop, pack, fetched]
    default: status
  trainer_dir:
    description: The trainer directory (the job's working directory).
    type: path
    required: true
  run_id:
    description: The run; default is the C(run_id) of the job config.
    type: str
  job_config:
    description: The job config file, relative to O(trainer_dir).
    type: str
    default: job.json
  launcher:
    description: The launcher script's contents (V(prepare) writes it into the run folder).
    type: str
  python:
    description: The job's interpreter (V(prepare) returns it with C(~) expanded).
    type: str
  fresh:
    description: With V(prepare), move a finished attempt's files aside so a new start begins clean.
    type: bool
    default: false
  jid:
    description: The async job id of the launcher, when this play started it.
    type: str
  async_dir:
    description: Ansible's async job folder on this host.
    type: path
    default: ~/.ansible_async
  tail_lines:
    description: How many of the log's last lines to return.
    type: int
    default: 20
  start_grace:
    description: Seconds a started launcher may take to write its pid before the run counts as dead.
    type: int
    default: 120
  grace:
    description: With V(stop), seconds between SIGTERM and SIGKILL.
    type: int
    default: 30
  fetch_outputs:
    description: >-
      With V(pack), when to pack: V(auto) when the Hub push was not confirmed, V(always), or V(never).
    type: str
    choices: [auto, always, never]
    default: auto
  fetched_to:
    description: With V(fetched), where the controller keeps the outputs (recorded in the marker).
    type: str
  checksum:
    description: With V(fetched), the SHA-1 of the archive the controller verified (recorded in the marker).
    type: str
author:
  - llama-trainer contributors
"""

RETURN = r"""
state:
  description: >-
    not_started, starting, running, succeeded, failed (the job exited non-zero) or dead (the
    launcher is gone without an exit status).
  type: str
  returned: always
run_id: {description: The run., type: str, returned: always}
run_dir: {description: Absolute path of the run folder., type: str, returned: always}
trainer_dir: {description: Absolute path of the trainer directory., type: str, returned: always}
log_file: {description: The job's log (stdout events and stderr)., type: str, returned: always}
result_file: {description: The job's result.json., type: str, returned: always}
python: {description: The job's interpreter with ~ expanded (prepare)., type: str, returned: when given}
exit_code: {description: The job's exit status once it ended., type: int, returned: always}
pid: {description: The launcher's pid., type: int, returned: always}
jid: {description: The async job id (given, or recorded by an earlier poll)., type: str, returned: always}
tail: {description: The log's last lines., type: list, elements: str, returned: status}
stdout: {description: The same lines joined, for callbacks that show stdout., type: str, returned: status}
tail_offset: {description: Byte offset in the log where RV(tail) starts., type: int, returned: status}
progress: {description: The last JSON event in RV(tail) (e.g. a C(step) event)., type: dict, returned: status}
async_result: {description: Ansible's async job record, when the file exists., type: dict, returned: status}
outputs_dir: {description: The run's output folder., type: str, returned: pack}
outputs_exist: {description: The output folder exists., type: bool, returned: pack}
pushed: {description: result.json says the run succeeded and the Hub push was confirmed., type: bool, returned: pack}
archive: {description: The tar of the output folder, or empty when nothing was packed., type: str, returned: pack}
size: {description: Bytes of the archive., type: int, returned: pack}
checksum: {description: SHA-1 of the archive (what the fetch module reports for the copy)., type: str, returned: pack}
files: {description: Files in the archive., type: int, returned: pack}
marker: {description: The C(outputs-fetched) marker., type: str, returned: fetched}
"""

LOG = "train.log"
PID = "train.pid"
EXIT_CODE = "exit_code"
JID = "ansible_job_id"
LAUNCHER = "launch.sh"
# The watchdog's "outputs safe" marker (roles/watchdog/files/watchdog.py, FETCHED_MARKER).
FETCHED_MARKER = "outputs-fetched"
ARCHIVE = "outputs.tar"
ATTEMPT_FILES = (LOG, PID, EXIT_CODE, JID, FETCHED_MARKER)
TAIL_BYTES = 64 * 1024


def read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return None


def read_json(path):
    text = read_text(path)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def read_int(path):
    text = read_text(path)
    try:
        return int(text) if text else None
    except ValueError:
        return None


def write_text(path, text):
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def launcher_alive(pid):
    """The pid runs our launcher (a recycled pid running something else does not count)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except OSError:
        return False
    return LAUNCHER.encode() in cmdline


def children_of(pid):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def tail_of(path, lines):
    """The last ``lines`` lines of a file and the byte offset where they start."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            start = max(0, size - TAIL_BYTES)
            handle.seek(start)
            chunk = handle.read()
    except OSError:
        return [], 0
    parts = chunk.split(b"\n")
    if start > 0:
        start += len(parts[0]) + 1
        parts = parts[1:]
    if parts and parts[-1] == b"":
        parts = parts[:-1]
    kept = parts[-lines:] if lines > 0 else []
    offset = start + sum(len(p) + 1 for p in parts[: len(parts) - len(kept)])
    return [p.decode("utf-8", errors="replace") for p in kept], offset


def last_event(lines):
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "event" in event:
                return event
    return None


class Run:
    def __init__(self, module):
        self.module = module
        params = module.params
        self.trainer_dir = os.path.abspath(params["trainer_dir"])
        self.run_id = params["run_id"] or self._job_config().get("run_id")
        if not self.run_id:
            module.fail_json(msg=f"{self._job_config_path()} has no run_id: run the config role (configure) first")
        self.run_dir = os.path.join(self.trainer_dir, "runs", self.run_id)
        self.result = {
            "changed": False, "run_id": self.run_id, "run_dir": self.run_dir, "trainer_dir": self.trainer_dir,
            "log_file": self._path(LOG), "result_file": self._result_file(),
        }

    def _job_config_path(self):
        return os.path.join(self.trainer_dir, self.module.params["job_config"])

    def _job_config(self):
        if not hasattr(self, "_config"):
            text = read_text(self._job_config_path())
            if text is None:
                self.module.fail_json(msg=f"no job config at {self._job_config_path()}: run the config role "
                                          "(configure) first")
            try:
                self._config = json.loads(text)
            except ValueError as exc:
                self.module.fail_json(msg=f"{self._job_config_path()} is not valid JSON: {exc}")
        return self._config

    def _result_file(self):
        output_dir = None
        if not self.module.params["run_id"] or self._job_config().get("run_id") == self.run_id:
            output_dir = self._job_config().get("output_dir")
        output_dir = output_dir or os.path.join("runs", self.run_id, "outputs")
        return os.path.join(self.trainer_dir, output_dir, "result.json")

    def _path(self, name):
        return os.path.join(self.run_dir, name)

    def state(self, jid=None, async_record=None):
        """The run's state from its files, the launcher's pid and (when known) the async record."""
        exit_code = read_int(self._path(EXIT_CODE))
        pid = read_int(self._path(PID))
        self.result.update(exit_code=exit_code, pid=pid)
        if exit_code is not None:
            if async_record is not None and not async_record["finished"] and self._age(EXIT_CODE) < 30:
                # Ansible's async wrapper writes its record right after the launcher exits; cleaning up
                # before that would leave a record behind.
                return "running"
            return "succeeded" if exit_code == 0 else "failed"
        if launcher_alive(pid):
            return "running"
        if pid is not None:
            return "dead"
        if async_record and async_record.get("finished") and async_record.get("failed", async_record.get("rc")):
            # The launcher itself could not start (the async record holds why).
            return "failed"
        if jid:
            started = self._async_file_age(jid)
            if started is not None and started > self.module.params["start_grace"]:
                return "dead"
            return "starting"
        return "not_started"

    def _async_file_age(self, jid):
        return _age(os.path.join(self.module.params["async_dir"], jid))

    def _age(self, name):
        return _age(self._path(name)) or 0.0

    # -- modes ----------------------------------------------------------------------------------

    def prepare(self):
        params = self.module.params
        state = self.state()
        if params["fresh"] and state not in ("running", "not_started") and not self.module.check_mode:
            self._set_aside_previous_attempt()
            state = self.state()
            self.result["changed"] = True
        if not self.module.check_mode:
            os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
            if params["launcher"] is not None and read_text(self._path(LAUNCHER)) != params["launcher"].strip():
                write_text(self._path(LAUNCHER), params["launcher"])
                os.chmod(self._path(LAUNCHER), 0o700)
                self.result["changed"] = True
        if params["python"]:
            self.result["python"] = os.path.expanduser(params["python"])
        self.result.update(state=state, jid=read_text(self._path(JID)))
        self.module.exit_json(**self.result)

    def _set_aside_previous_attempt(self):
        attempt = 1
        while os.path.exists(os.path.join(self.run_dir, f"attempt-{attempt}")):
            attempt += 1
        folder = os.path.join(self.run_dir, f"attempt-{attempt}")
        os.makedirs(folder, mode=0o700)
        for name in ATTEMPT_FILES:
            if os.path.exists(self._path(name)):
                os.replace(self._path(name), os.path.join(folder, name))

    def status(self):
        params = self.module.params
        jid = params["jid"] or read_text(self._path(JID))
        if params["jid"] and os.path.isdir(self.run_dir) and read_text(self._path(JID)) != params["jid"]:
            write_text(self._path(JID), params["jid"])
        async_record = self._async_record(jid) if jid else None
        state = self.state(jid, async_record)
        lines, offset = tail_of(self._path(LOG), params["tail_lines"])
        self.result.update(state=state, jid=jid, tail=lines, stdout="\n".join(lines), tail_offset=offset,
                           progress=last_event(lines), async_result=async_record)
        if state == "failed" and self.result["exit_code"] is None and async_record:
            self.result["tail"] = [*lines, str(async_record.get("msg") or async_record.get("stderr") or "")]
        self.module.exit_json(**self.result)

    def _async_record(self, jid):
        text = read_text(os.path.join(self.module.params["async_dir"], jid))
        if not text:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return None
        # async_status's reading: a record without "started" is a finished module's result.
        if "started" not in record:
            record["finished"] = True
        record.setdefault("finished", False)
        return record

    def pack(self):
        params = self.module.params
        outputs_dir = os.path.dirname(self.result["result_file"])
        result = read_json(self.result["result_file"]) or {}
        hub = result.get("hub") if isinstance(result.get("hub"), dict) else {}
        pushed = result.get("status") == "succeeded" and bool(hub.get("confirmed"))
        exists = os.path.isdir(outputs_dir)
        self.result.update(outputs_dir=outputs_dir, outputs_exist=exists, pushed=pushed, archive="", size=0,
                           checksum="", files=0)
        wanted = params["fetch_outputs"] == "always" or (params["fetch_outputs"] == "auto" and not pushed)
        if exists and wanted and not self.module.check_mode:
            archive = self._path(ARCHIVE)
            os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
            size, checksum, files = pack_folder(outputs_dir, archive)
            self.result.update(changed=True, archive=archive, size=size, checksum=checksum, files=files)
        self.module.exit_json(**self.result)

    def fetched(self):
        params = self.module.params
        marker = self._path(FETCHED_MARKER)
        self.result.update(changed=True, marker=marker)
        if not self.module.check_mode:
            write_text(marker, json.dumps({"fetched_to": params["fetched_to"], "checksum": params["checksum"],
                                           "at": time.time()}) + "\n")
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._path(ARCHIVE))
        self.module.exit_json(**self.result)

    def stop(self):
        grace = self.module.params["grace"]
        state = self.state()
        pid = self.result["pid"]
        if state != "running":
            self.result["state"] = state
            self.module.exit_json(**self.result)
        self.result["changed"] = True
        if not self.module.check_mode:
            # The job (the launcher's child) gets SIGTERM: it writes result.json and the launcher the exit code.
            for child in children_of(pid):
                _signal(child, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and launcher_alive(pid):
                time.sleep(0.5)
            if launcher_alive(pid):
                try:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                except OSError:
                    _signal(pid, signal.SIGKILL)
        self.result["state"] = self.state()
        self.module.exit_json(**self.result)


class HashingWriter:
    """A file that hashes what is written to it, so the archive is read once, while it is written."""

    def __init__(self, handle):
        self.handle = handle
        # SHA-1 is the checksum Ansible's fetch reports for the copy.
        self.digest = hashlib.sha1()
        self.size = 0

    def write(self, data):
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)


def pack_folder(folder, archive):
    """Tar the contents of ``folder`` (names relative to it) into ``archive``; (size, sha1, files)."""
    temporary = f"{archive}.tmp"
    with open(temporary, "wb") as handle:
        writer = HashingWriter(handle)
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(os.listdir(folder)):
                tar.add(os.path.join(folder, name), arcname=name)
            files = sum(1 for member in tar.getmembers() if member.isfile())
    os.replace(temporary, archive)
    return writer.size, writer.digest.hexdigest(), files


def _age(path):
    """Seconds since the file was last written, or None when it does not exist."""
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return None


def _signal(pid, number):
    with contextlib.suppress(OSError):
        os.kill(pid, number)


def main():
    module = AnsibleModule(
        argument_spec={
            "mode": {"type": "str", "choices": ["prepare", "status", "stop", "pack", "fetched"], "default": "status"},
            "trainer_dir": {"type": "path", "required": True},
            "run_id": {"type": "str"},
            "job_config": {"type": "str", "default": "job.json"},
            "launcher": {"type": "str"},
            "python": {"type": "str"},
            "fresh": {"type": "bool", "default": False},
            "jid": {"type": "str"},
            "async_dir": {"type": "path", "default": "~/.ansible_async"},
            "tail_lines": {"type": "int", "default": 20},
            "start_grace": {"type": "int", "default": 120},
            "grace": {"type": "int", "default": 30},
            "fetch_outputs": {"type": "str", "choices": ["auto", "always", "never"], "default": "auto"},
            "fetched_to": {"type": "str"},
            "checksum": {"type": "str"},
        },
        supports_check_mode=True,
    )
    run = Run(module)
    getattr(run, module.params["mode"])()


if __name__ == "__main__":
    main()
