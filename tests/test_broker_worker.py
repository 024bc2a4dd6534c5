"""The broker's worker keeps one record of what end() must close: its Transaction's.

Each service here has a session line of pam_exec, whose script appends
"$PAM_TYPE $PAM_USER" to the service's marker (open_session and
close_session lines), and an auth line of pam_scripted, whose record names
the flags of every authenticate and setcred (ESTABLISH 2, DELETE 4) and the
status pam_end gave it. So each test can count how many times a session was
closed and credentials deleted, whichever way the transaction ended.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
from typing import Any

import pytest

import pamphlet
from broker_harness import (
    Broker,
    b64,
    frame,
    frames_until_closed,
    public_dir,
    raw_connect,
    read_frame,
    start_frame,
)
from conftest import LibpamGate, ScriptedApp
from hostile_module import Call, read_record, script_text

pytestmark = pytest.mark.root  # the broker runs PAM as root

ESTABLISH = 2  # PAM_ESTABLISH_CRED
DELETE = 4  # PAM_DELETE_CRED
CONV_ERR = 19
ABORT = 26

SERVICES = (
    "disconnect",
    "closed",
    "client_end",
    "raw_end",
    "failed_conv",
    "failed_conv_end",
    "shutdown",
    "gated",
)

POLICY = f"""\
[[allow]]
users = ["root"]
services = {[*SERVICES, "missing"]!r}
phases = ["authenticate", "acct_mgmt", "setcred", "open_session", "close_session"]

[limits]
start_timeout = 2
frame_timeout = 2
conversation_timeout = 5
idle_timeout = 10
"""


class Service:
    """One service of the confdir: its marker and its pam_scripted record."""

    def __init__(self, confdir: pathlib.Path, name: str, scripted: str) -> None:
        self.name = name
        self.marker = confdir / f"{name}.marker"
        self.record = confdir / f"{name}.record"
        script = confdir / f"{name}.sh"
        script.write_text(f'#!/bin/sh\necho "$PAM_TYPE $PAM_USER" >> {self.marker}\n')
        script.chmod(0o755)
        quiet = confdir / "quiet.script"
        quiet.write_text(script_text([]))
        lines = [
            "auth required pam_permit.so",
            f"auth required {scripted} script={quiet} record={self.record}",
            "account required pam_permit.so",
        ]
        if name in ("failed_conv", "failed_conv_end"):
            # A session module that speaks while opening, and whose failure
            # does not decide the stack: libpam opens the session even when
            # the conversation fails.
            chatty = confdir / "chatty.script"
            chatty.write_text(script_text([Call([(4, b"welcome")], expect=[None])]))
            lines.append(f"session optional {scripted} script={chatty}")
        if name == "gated":
            # open_session waits inside libpam until the test opens the gate.
            self.gate = LibpamGate(confdir)
            lines.append(self.gate.line("session"))
        lines += ["session required pam_permit.so", f"session optional pam_exec.so {script}"]
        (confdir / name).write_text("\n".join(lines) + "\n")

    def marker_lines(self) -> list[str]:
        return self.marker.read_text().splitlines() if self.marker.exists() else []

    def setcred_flags(self) -> list[int]:
        """The flags of each setcred (authenticate's are the record's 0s, left out)."""
        return [flags for flags in read_record(self.record).flags if flags]

    def end_status(self) -> list[int]:
        return read_record(self.record).end_status


class Site:
    def __init__(self, scripted: str) -> None:
        self.confdir = public_dir("pamphlet-worker-confdir-")
        self.services = {name: Service(self.confdir, name, scripted) for name in SERVICES}
        self.broker = Broker(POLICY, str(self.confdir))

    def cleanup(self) -> None:
        self.broker.cleanup()
        subprocess.run(["rm", "-rf", str(self.confdir)], check=True)


@pytest.fixture(scope="module")
def site(scripted_module_path: str) -> Any:
    made = Site(scripted_module_path)
    yield made
    made.cleanup()


class RawClient:
    """The wire protocol by hand: what a client that goes away does."""

    def __init__(self, site: Site, service: str, user: str) -> None:
        self.sock = raw_connect(site.broker.socket)
        self.sock.sendall(start_frame(service, user))
        assert read_frame(self.sock) == {"op": "started"}

    def request(self, message: dict[str, Any], *, conv_error: bool = False) -> dict[str, Any]:
        """Send ``message``; answer conversation calls (or fail them); the reply."""
        self.sock.sendall(frame(message))
        while True:
            reply = read_frame(self.sock)
            assert reply is not None
            if reply["op"] != "converse":
                return reply
            if conv_error:
                self.sock.sendall(frame({"op": "conv_error"}))
            else:
                answers = [None if style > 2 else b64(b"") for style, _ in reply["messages"]]
                self.sock.sendall(frame({"op": "answers", "answers": answers}))

    def call(self, phase: str, flags: int = 0, **options: Any) -> int:
        reply = self.request({"op": "call", "phase": phase, "flags": flags}, **options)
        assert reply["op"] == "result", reply
        code: int = reply["code"]
        return code

    def leave(self) -> None:
        self.sock.close()


def ended_line(site: Site, user: str, end: str) -> str:
    lines = site.broker.audit_lines(f"user={user}", f"end={end}")
    assert len(lines) == 1, site.broker.audit_text()
    return lines[0]


def test_a_disconnect_closes_the_session_and_deletes_the_credentials_once(site):
    service = site.services["disconnect"]
    client = RawClient(site, service.name, "ada")
    assert client.call("authenticate") == 0
    assert client.call("setcred", ESTABLISH) == 0
    assert client.call("open_session") == 0
    client.leave()
    line = ended_line(site, "ada", "disconnect")
    assert line.count("close_session:0") == 1 and line.count("setcred:0") == 2, line
    assert service.marker_lines() == ["open_session ada", "close_session ada"]
    assert service.setcred_flags() == [ESTABLISH, DELETE]
    assert service.end_status() == [0]


def test_what_the_client_closed_itself_is_not_closed_again(site):
    service = site.services["closed"]
    client = RawClient(site, service.name, "ben")
    assert client.call("authenticate") == 0
    assert client.call("setcred", ESTABLISH) == 0
    assert client.call("open_session") == 0
    assert client.call("close_session") == 0
    assert client.call("setcred", DELETE) == 0
    client.leave()
    line = ended_line(site, "ben", "disconnect")
    assert line.count("close_session:") == 1 and line.count("setcred:") == 2, line
    assert service.marker_lines() == ["open_session ben", "close_session ben"]
    assert service.setcred_flags() == [ESTABLISH, DELETE]


def test_the_clients_own_end_closes_once(site):
    service = site.services["client_end"]
    app = ScriptedApp(service.name, "cleo", broker=site.broker.socket)
    app.authenticate()
    app.initialize_credentials()
    app.open_session()
    app.end()  # the client closes and deletes, then sends its end frame
    ended_line(site, "cleo", "client")
    assert service.marker_lines() == ["open_session cleo", "close_session cleo"]
    assert service.setcred_flags() == [ESTABLISH, DELETE]
    assert service.end_status() == [0]


def test_pam_end_gets_the_status_of_the_clients_end_frame(site):
    service = site.services["raw_end"]
    client = RawClient(site, service.name, "dora")
    assert client.call("authenticate") == 0
    assert client.request({"op": "end", "status": 7}) == {"op": "result", "code": 0}
    assert read_frame(client.sock) is None
    ended_line(site, "dora", "client")
    assert service.end_status() == [7]  # not the last phase's 0


def test_a_session_opened_while_the_conversation_failed_is_closed(site):
    # libpam opened the session, but the client failed the conversation: the
    # client is told PAM_CONV_ERR (never success past a failed conversation),
    # and the worker still knows the session is open.
    service = site.services["failed_conv"]
    client = RawClient(site, service.name, "eve")
    assert client.call("authenticate") == 0
    assert client.call("open_session", conv_error=True) == CONV_ERR
    client.leave()
    line = ended_line(site, "eve", "disconnect")
    # The module speaks at the close too, to a client that is gone: PAM_CONV_ERR.
    assert f"open_session:{CONV_ERR}" in line and line.count("close_session:") == 1, line
    assert service.marker_lines() == ["open_session eve", "close_session eve"]


def test_a_session_opened_while_the_conversation_failed_is_closed_at_the_clients_end(site):
    # The same, but the client ends the transaction itself: it was told
    # PAM_CONV_ERR, so its own end() closes nothing; the worker does.
    service = site.services["failed_conv_end"]
    client = RawClient(site, service.name, "ivy")
    assert client.call("authenticate") == 0
    assert client.call("open_session", conv_error=True) == CONV_ERR
    assert client.request({"op": "end", "status": CONV_ERR}) == {"op": "result", "code": 0}
    line = ended_line(site, "ivy", "client")
    assert line.count("close_session:") == 1, line
    assert service.marker_lines() == ["open_session ivy", "close_session ivy"]
    assert service.end_status() == [CONV_ERR]


def test_a_worker_told_to_end_closes_the_session_and_deletes_the_credentials_once(
    scripted_module_path,
):
    own = Site(scripted_module_path)  # its broker is stopped by the test
    try:
        service = own.services["shutdown"]
        client = RawClient(own, service.name, "fay")
        assert client.call("authenticate") == 0
        assert client.call("setcred", ESTABLISH) == 0
        assert client.call("open_session") == 0
        assert own.broker.stop() == 0
        assert read_frame(client.sock)["op"] == "error"
        line = ended_line(own, "fay", "shutdown")
        assert line.count("close_session:0") == 1 and line.count("setcred:0") == 2, line
        assert service.marker_lines() == ["open_session fay", "close_session fay"]
        assert service.setcred_flags() == [ESTABLISH, DELETE]
        assert service.end_status() == [0]
    finally:
        own.cleanup()


def _parent_of(script: pathlib.Path) -> int:
    """The pid of the process that runs ``script`` as its child (pam_exec's caller)."""
    for name in os.listdir("/proc"):
        try:
            cmdline = pathlib.Path(f"/proc/{name}/cmdline").read_bytes()
            status = pathlib.Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        if str(script).encode() in cmdline:
            return int(
                next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1]
            )
    raise AssertionError(f"no process runs {script}")


def test_sigterm_while_libpam_runs_a_phase_ends_the_worker_and_closes_once(site):
    # The transaction holds Python signal handlers while libpam runs; the
    # worker's SIGTERM reaches it through the wakeup descriptor all the same:
    # the phase finishes, its result is sent, then the worker ends as the
    # broker's shutdown ends it (the peer may signal its own worker).
    service = site.services["gated"]
    client = RawClient(site, service.name, "gus")
    assert client.call("authenticate") == 0
    client.sock.sendall(frame({"op": "call", "phase": "open_session", "flags": 0}))
    service.gate.wait_entered()
    os.kill(_parent_of(service.gate.script), signal.SIGTERM)
    time.sleep(0.2)  # let it arrive while the module still runs
    service.gate.open()
    frames = frames_until_closed(client.sock)
    assert [f["op"] for f in frames] == ["result", "error"], frames
    assert frames[0]["code"] == 0
    line = ended_line(site, "gus", "shutdown")
    assert line.count("close_session:0") == 1, line
    assert service.marker_lines() == ["open_session gus", "close_session gus"]


def test_a_failed_pam_start_reports_libpams_code(site):
    # "missing" is allowed, but neither it nor "other" is in the confdir:
    # pam_start_confdir returns PAM_ABORT, which reaches the client as it is.
    sock = raw_connect(site.broker.socket)
    sock.sendall(start_frame("missing", "hal"))
    assert frames_until_closed(sock) == [{"op": "start_failed", "code": ABORT}]
    assert site.broker.audit_lines("user=hal", f'outcome="start failed:{ABORT}"')
    with pytest.raises(pamphlet.PamError) as raised:
        ScriptedApp("missing", "ida", broker=site.broker.socket)
    assert raised.value.code == ABORT
    assert site.broker.audit_lines("user=ida", f'outcome="start failed:{ABORT}"')
