"""A real ``sshd`` on 127.0.0.1 for the remote-source and offsite-copy tests, started and stopped by the test.

Everything is throw-away: a host key and a client key made with
``ssh-keygen`` in the test's directory, a config that lets only that client
key in, and a free port. The daemon is killed by its PID in the fixture's
teardown, so no ``sshd`` outlives the test (issue 10, "Tests").
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"


@dataclasses.dataclass(frozen=True)
class Sshd:
    """A running throw-away ``sshd``: how to reach it as ``root@127.0.0.1``."""

    port: int
    key: Path
    known_hosts: Path
    pid: int

    @property
    def rsh(self) -> str:
        """The ``--rsh`` command line that reaches this daemon and nothing else, without a question."""
        return shlex.join(["ssh", "-p", str(self.port), "-i", str(self.key), "-o", "BatchMode=yes",
                           "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                           "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"])

    def remote(self, path: Path | str, user: str = "root") -> str:
        """``USER@HOST:PATH`` naming ``path`` on this machine through the daemon."""
        return f"{user}@127.0.0.1:{path}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def missing() -> str | None:
    """Why no ``sshd`` can be started here, or None."""
    for tool in (SSHD, "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian openssh-server)"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}; the ssh tests must not be skipped")
    pytest.skip(reason)


@contextlib.contextmanager
def sshd_running(directory: Path) -> Iterator[Sshd]:
    """Start a throw-away ``sshd`` configured in ``directory``; kill it by its PID on the way out."""
    reason = missing()
    if reason:
        _skip_or_fail(reason)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    host_key, client_key = directory / "host_ed25519", directory / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    authorized = directory / "authorized_keys"
    authorized.write_bytes(client_key.with_suffix(".pub").read_bytes())
    port = _free_port()
    known = directory / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} " + host_key.with_suffix(".pub").read_text())
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {directory / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "Subsystem sftp internal-sftp",
        "LogLevel ERROR", "",
    ]))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    with open(directory / "sshd.log", "wb") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(directory / 'sshd.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("sshd did not listen within 10 s")
            time.sleep(0.05)
        yield Sshd(port=port, key=client_key, known_hosts=known, pid=proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the listener and every session it forked
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def sshd(scratch: Path) -> Iterator[Sshd]:
    """A throw-away ``sshd`` on 127.0.0.1 that lets in ``root`` with its own client key."""
    with sshd_running(scratch / "sshd") as daemon:
        yield daemon
