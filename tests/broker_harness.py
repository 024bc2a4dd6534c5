"""A real broker for the tests: a root process on a socket in a temporary folder.

The broker runs as ``python -m pamphlet broker`` in a subprocess, with its
audit lines on stderr (a file the tests read). Clients run in the test process
(as root, peer uid 0) or, to show what an unprivileged server can do, as
``nobody`` through ``setpriv`` with Debian's own interpreter and a
world-readable copy of the source (``/root``, where a pyenv interpreter lives,
is private).
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from typing import Any

import pamphlet

# The source this test run imports (the worktree's, with PYTHONPATH=src).
SRC = pathlib.Path(pamphlet.__file__).parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"


def pam_wrapper_module(name: str) -> str:
    (path,) = glob.glob(f"/usr/lib/*/pam_wrapper/{name}") or [name]
    return path


def public_dir(prefix: str) -> pathlib.Path:
    """A temporary folder that ``nobody`` may enter and read."""
    path = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def public_source() -> pathlib.Path:
    """A world-readable copy of src/ (and of this harness) for unprivileged interpreters."""
    target = public_dir("pamphlet-src-")
    shutil.copytree(
        SRC / "pamphlet", target / "pamphlet", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(__file__, target / "broker_harness.py")
    for root, dirs, files in os.walk(target):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return target


class Broker:
    """``python -m pamphlet broker`` on a socket in a fresh folder."""

    def __init__(
        self, policy: str, confdir: str | None, *extra: str, wrapper: Sequence[str] = ()
    ) -> None:
        """``wrapper``: a command the broker's command line is appended to (a namespace)."""
        self.directory = public_dir("pamphlet-broker-")
        self.socket = str(self.directory / "broker.sock")
        self.policy = self.directory / "policy.toml"
        self.policy.write_text(textwrap.dedent(policy))
        self.log = self.directory / "audit.log"
        self._log_file = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        command = [
            *wrapper,
            sys.executable,
            "-m",
            "pamphlet",
            "broker",
            "--socket",
            self.socket,
            "--policy",
            str(self.policy),
            "--audit",
            "stderr",
            *extra,
        ]
        if confdir is not None:
            command += ["--confdir", confdir]
        env = dict(os.environ, PYTHONPATH=str(SRC))
        self.process = subprocess.Popen(command, stderr=self._log_file, env=env)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the broker did not start:\n{self.audit_text()}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.process.pid

    def audit_text(self) -> str:
        return self.log.read_text()

    def audit_lines(self, *needles: str, timeout: float = 10) -> list[str]:
        """The audit lines containing every needle, waiting up to ``timeout`` for one."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                line
                for line in self.audit_text().splitlines()
                if all(needle in line for needle in needles)
            ]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def children(self) -> list[tuple[int, str]]:
        """(pid, state) of the broker's child processes (workers)."""
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as file:
                    fields = file.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.pid:
                found.append((int(name), fields[0]))
        return found

    def workers_of(self, uid: int) -> list[int]:
        """The broker's children whose real uid is ``uid``: the workers of that peer."""
        found = []
        for pid, _ in self.children():
            try:
                with open(f"/proc/{pid}/status") as file:
                    uids = next(line for line in file if line.startswith("Uid:")).split()[1:]
            except (OSError, StopIteration):
                continue
            if int(uids[0]) == uid:
                found.append(pid)
        return found

    def wait_for_children(self, count: int, timeout: float = 10) -> list[tuple[int, str]]:
        deadline = time.monotonic() + timeout
        while True:
            children = self.children()
            if len(children) <= count or time.monotonic() > deadline:
                return children
            time.sleep(0.02)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._log_file.close()
        return code

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


# -- a raw client, for what the library would never send ------------------------------


def frame(message: dict[str, Any] | bytes) -> bytes:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


def b64(data: bytes | None) -> str | None:
    import base64

    return None if data is None else base64.b64encode(data).decode()


def start_frame(service: str, user: str | None, **extra: Any) -> bytes:
    return frame(
        {
            "op": "start",
            "v": 1,
            "service": b64(service.encode()),
            "user": b64(None if user is None else user.encode()),
            **extra,
        }
    )


def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(30)
    return sock


def read_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next frame, or None when the broker closed the connection."""
    header = _read(sock, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    body = _read(sock, length)
    return None if body is None else json.loads(body)


def _read(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def frames_until_closed(sock: socket.socket) -> list[dict[str, Any]]:
    frames = []
    while (received := read_frame(sock)) is not None:
        frames.append(received)
    return frames


# -- an unprivileged client ----------------------------------------------------------


def as_user(user: str, group: str, *command: str) -> list[str]:
    """``command`` run as ``user`` and ``group`` only (setpriv, no other groups)."""
    return ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", "--", *command]


def python_env(source: pathlib.Path) -> dict[str, str]:
    """The environment of an unprivileged interpreter that imports ``source``."""
    return {"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def shadow_hash(user: str) -> str:
    """``user``'s password hash in /etc/shadow."""
    for line in pathlib.Path("/etc/shadow").read_text().splitlines():
        name, hashed, *_ = line.split(":")
        if name == user:
            return hashed
    raise AssertionError(f"{user} is not in /etc/shadow")


def run_as(
    user: str, group: str, source: pathlib.Path, code: str, timeout: float = 60
) -> dict[str, Any]:
    """Run ``code`` as ``user`` with Debian's python3; it prints one JSON object."""
    proc = subprocess.run(
        as_user(user, group, SYSTEM_PYTHON, "-c", textwrap.dedent(code)),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        env=python_env(source),
    )
    if proc.returncode != 0:
        raise AssertionError(f"the client failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- an unprivileged client that holds transactions open --------------------------------

_HOLDER = """\
import json, sys
from broker_harness import frame, raw_connect, read_frame, start_frame
path, service, user, count = sys.argv[1:5]
held = []
for _ in range(int(count)):
    sock = raw_connect(path)
    sock.sendall(start_frame(service, user))
    reply = read_frame(sock) or {"op": None}
    if reply["op"] == "started":
        sock.sendall(frame({"op": "call", "phase": "authenticate", "flags": 0}))
        reply = read_frame(sock) or {"op": None}
        held.append(sock)
    print(json.dumps(reply), flush=True)
sys.stdin.read()  # held until the test closes our stdin
"""


class Holder:
    """``count`` transactions of ``service`` started as ``user``, each waiting at its
    first prompt, until :meth:`release`. ``replies`` is the reply each got
    (``converse`` when it is held, else the broker's refusal)."""

    def __init__(
        self,
        user: str,
        group: str,
        source: pathlib.Path,
        path: str,
        service: str,
        target: str,
        count: int,
    ) -> None:
        self.process = subprocess.Popen(
            as_user(user, group, SYSTEM_PYTHON, "-c", _HOLDER, path, service, target, str(count)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
            env=python_env(source),
        )
        assert self.process.stdout is not None
        self.replies = [json.loads(self.process.stdout.readline() or "null") for _ in range(count)]

    def release(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
        self.process.wait(timeout=30)
