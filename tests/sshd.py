"""A real OpenSSH server on 127.0.0.1 that plays the GPU instance in tests.

It runs the system's ``/usr/sbin/sshd`` in the foreground on a free port, with a host key, a client key
and an ``authorized_keys`` file made for it in a temporary folder, so nothing in ``/etc/ssh`` or
``~/.ssh`` is read or changed. It must run as root (sshd needs it to switch users).

Who logs in: the test process's own user (root here). A Lambda instance's user is ``ubuntu``, but the
tests' "instance" is this machine, whose Python and training stack live under root's home; the roles
take the user from ``ansible_user`` (the playbooks' ``instance_user``), so the tests pass ``root``.

    with SSHServer(tmp_path / "sshd") as server:
        server.port, server.client_key, server.user
        server.ssh_command("true")          # argv for a plain ssh call, as a script would make
        server.kill_connections()           # drop every open SSH session (the server keeps listening)
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True)


class SSHServer:
    def __init__(self, workdir: str | os.PathLike, port: int | None = None):
        self.dir = Path(workdir)
        self.port = port or free_port()
        self.user = getpass.getuser()
        self.host = "127.0.0.1"
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self.client_key = self.dir / "client_ed25519"
        self.authorized_keys = self.dir / "authorized_keys"
        self.known_hosts = self.dir / "known_hosts"
        self.config = self.dir / "sshd_config"
        self.log = self.dir / "sshd.log"
        self.process: subprocess.Popen | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> SSHServer:
        if not os.access(SSHD, os.X_OK):
            raise RuntimeError(f"{SSHD} is missing: install it with `apt-get install -y openssh-server`")
        if os.geteuid() != 0:
            raise RuntimeError("the test sshd must run as root (it switches to the logged-in user)")
        self.dir.mkdir(parents=True, exist_ok=True)
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        # Keys survive a stop: a restarted server is the same host to its clients.
        if not self.host_key.exists():
            _keygen(self.host_key, "test-host")
        if not self.client_key.exists():
            _keygen(self.client_key, "test-client")
        shutil.copyfile(f"{self.client_key}.pub", self.authorized_keys)
        public_host_key = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {public_host_key[0]} {public_host_key[1]}\n")
        self.config.write_text(self._config_text())
        with open(self.log, "ab") as log:
            # -D: stay in the foreground (we own the process); -e: log to stderr (the log file).
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_until_listening()
        return self

    def _config_text(self) -> str:
        return "\n".join([
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"PidFile {self.dir / 'sshd.pid'}",
            "UsePAM no",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {self.user}",
            # Ansible multiplexes sessions over one connection; tests run several plays at once.
            "MaxSessions 50",
            "MaxStartups 50:30:100",
            "PrintMotd no",
            "LogLevel ERROR",
            "Subsystem sftp internal-sftp",
            "",
        ])

    def _wait_until_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on {self.host}:{self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.kill_connections()
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> SSHServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what tests use ----------------------------------------------------------------------

    def ssh_options(self) -> list[str]:
        return ["-i", str(self.client_key), "-p", str(self.port), "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]

    def ssh_command(self, *remote_command: str) -> list[str]:
        """argv of a plain ``ssh`` call running ``remote_command`` on the server."""
        return ["ssh", *self.ssh_options(), f"{self.user}@{self.host}", *remote_command]

    def scp_command(self, *paths: str) -> list[str]:
        """argv of a plain ``scp``; write remote paths as ``:path``."""
        options = [("-P" if option == "-p" else option) for option in self.ssh_options()]
        target = f"{self.user}@{self.host}"
        return ["scp", "-q", *options, *[f"{target}{p}" if p.startswith(":") else p for p in paths]]

    def ansible_host_vars(self) -> dict[str, str]:
        """Connection variables that point Ansible at this server."""
        return {
            "ansible_host": self.host,
            "ansible_port": str(self.port),
            "ansible_user": self.user,
            "ansible_ssh_private_key_file": str(self.client_key),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes",
        }

    def session_pids(self) -> list[int]:
        """Pids of the per-connection sshd processes (the listener's children)."""
        if not self.process:
            return []
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                children.append(int(entry.name))
        return children

    def kill_connections(self) -> int:
        """Drop every open SSH session, as a network failure would; returns how many were cut."""
        pids = self.session_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)
