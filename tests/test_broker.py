"""pamphlet broker, end to end: a root broker, real PAM stacks, real clients.

The broker runs as root in a subprocess; clients run in this process (as
root, which the policy names like any other peer) or as ``nobody`` through
setpriv, to show what an unprivileged server gains.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

import broker_harness
import pamphlet
from broker_harness import (
    Broker,
    frame,
    frames_until_closed,
    pam_wrapper_module,
    public_dir,
    public_source,
    raw_connect,
    read_frame,
    run_as,
    start_frame,
)
from conftest import UNIX_STACK, ScriptedApp
from pamphlet.broker import (
    ConfdirNotAllowed,
    EnvironNotAllowed,
    ItemNotAllowed,
    PhaseNotAllowed,
    ServiceNotAllowed,
    Throttled,
    WorkerDied,
)
from pamphlet.broker.server import SPARES

pytestmark = pytest.mark.root  # the broker runs PAM as root; clients become nobody

POLICY_TEMPLATE = """\
[[allow]]
users = ["root"]
services = ["matrix", "crash", "unix", "expired"]
max_in_flight = 300

[[allow]]
users = ["root"]
services = ["session"]
phases = ["authenticate", "acct_mgmt", "chauthtok", "open_session", "setcred"]
setenv = ["LANG"]

[[allow]]
groups = ["nogroup"]
services = ["unix", "matrix"]

[throttle]
user_slow_after = {slow}
user_refuse_after = {refuse}
delay = 0.4
peer_slow_after = 1000
peer_refuse_after = 2000

[limits]
start_timeout = 2
frame_timeout = 2
conversation_timeout = {conversation}
idle_timeout = 10
max_pending_per_peer = 64
"""


POLICY = POLICY_TEMPLATE.format(slow=1000, refuse=1000, conversation=2)
STRICT_POLICY = POLICY_TEMPLATE.format(slow=2, refuse=4, conversation=2)
PATIENT_POLICY = POLICY_TEMPLATE.format(slow=1000, refuse=1000, conversation=120)
USERS = ("bob", "carol", "dave", "erin")


class Setup:
    def __init__(self, broker: Broker, confdir: Any, marker: Any) -> None:
        self.broker = broker
        self.path = broker.socket
        self.confdir = confdir
        self.marker = marker


def _write_confdir(confdir: Any, scripted_module_path: str) -> Any:
    matrix = pam_wrapper_module("pam_matrix.so")

    def stack(service: str) -> str:
        # pam_matrix reads the first line of a user: one passdb per service.
        passdb = confdir / f"passdb-{service}"
        passdb.write_text("".join(f"{user}:secret:{service}\n" for user in USERS))
        return "".join(
            f"{kind} required {matrix} passdb={passdb}\n"
            for kind in ("auth", "account", "password", "session")
        )

    (confdir / "matrix").write_text(stack("matrix"))
    # pam_stress says every account's password has expired; pam_matrix changes it.
    (confdir / "expired").write_text(
        stack("expired").replace(
            f"account required {matrix}", "account required pam_stress.so expired", 1
        )
    )
    marker = confdir / "marker"
    script = confdir / "marker.sh"
    script.write_text(f'#!/bin/sh\necho "$PAM_TYPE $PAM_USER" >> {marker}\n')
    script.chmod(0o755)
    (confdir / "session").write_text(stack("session") + f"session optional pam_exec.so {script}\n")
    crash_script = confdir / "crash.script"
    crash_script.write_text("crash\n")
    (confdir / "crash").write_text(f"auth required {scripted_module_path} script={crash_script}\n")
    (confdir / "unix").write_text(UNIX_STACK)
    # Debian's /etc/pam.d/chsh, with common-auth and common-password inlined.
    (confdir / "chsh").write_text(
        "auth sufficient pam_rootok.so\n"
        "auth required pam_unix.so\n"
        "account required pam_unix.so\n"
        "password required pam_unix.so yescrypt\n"
    )
    # A line per guess that reaches pam_unix ("$PAM_USER $PAM_RHOST" in
    # "guesses"); seteuid, or pam_exec runs the script with the peer's real uid.
    guesses = confdir / "guesses"
    guesses.write_text("")
    guess_script = confdir / "guess.sh"
    guess_script.write_text(f'#!/bin/sh\necho "$PAM_USER $PAM_RHOST" >> {guesses}\n')
    guess_script.chmod(0o755)
    (confdir / "guess").write_text(
        f"auth optional pam_exec.so seteuid quiet {guess_script}\nauth required pam_unix.so\n"
    )
    return marker


@pytest.fixture(scope="module")
def setup(scripted_module_path: str) -> Any:
    confdir = public_dir("pamphlet-confdir-")
    marker = _write_confdir(confdir, scripted_module_path)
    broker = Broker(POLICY, str(confdir))
    yield Setup(broker, confdir, marker)
    broker.cleanup()
    subprocess.run(["rm", "-rf", str(confdir)], check=True)


@pytest.fixture(scope="module")
def source() -> Any:
    path = public_source()
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


def login(setup: Setup, user: str = "bob", password: str = "secret") -> ScriptedApp:
    with ScriptedApp("matrix", user, answers=[password], broker=setup.path) as app:
        app.authenticate()
        app.account_management()
    return app


# -- what an unprivileged server gains ---------------------------------------------

CLIENT = """\
import json, sys, time
import pamphlet
from pamphlet import broker
user, password, socket_path, confdir = {args!r}
result = {{}}
def attempt(key, **kwargs):
    started = time.monotonic()
    try:
        pamphlet.authenticate(user, kwargs.pop("password", password), service="unix", **kwargs)
        result[key] = "ok"
    except Exception as exc:
        result[key] = type(exc).__name__
    result[key + "_seconds"] = time.monotonic() - started
attempt("in_process", confdir=confdir)
attempt("broker", broker=socket_path)
attempt("broker_wrong", broker=socket_path, password="wrong-" + password)
print(json.dumps(result))
"""


def test_unprivileged_client_logs_in_only_through_the_broker(setup, source, unix_user):
    name, password = unix_user
    args = (name, password, setup.path, str(setup.confdir))
    result = run_as("nobody", "nogroup", source, CLIENT.format(args=args))
    # In its own process, nobody's pam_unix cannot read the shadow entry.
    assert result["in_process"] in ("AuthinfoUnavailable", "AuthenticationError")
    assert result["broker"] == "ok"
    assert result["broker_wrong"] == "AuthenticationError"
    # pam_unix's failure delay (about 2 s, randomized) was served all the same.
    assert result["broker_wrong_seconds"] > 0.5
    lines = setup.broker.audit_lines(f"user={name}", "outcome=failure")
    assert lines and "peer_uid=65534" in lines[0] and "service=unix" in lines[0]
    assert setup.broker.audit_lines(f"user={name}", "outcome=success")


def test_a_peer_no_rule_names_is_refused(setup, source, unix_user):
    name, _ = unix_user
    code = f"""\
    import json
    import pamphlet
    try:
        pamphlet.authenticate("bob", "secret", service="matrix", broker={setup.path!r})
        print(json.dumps({{"error": None}}))
    except Exception as exc:
        print(json.dumps({{"error": type(exc).__name__, "text": str(exc)}}))
    """
    result = run_as(name, name, source, code)
    assert result["error"] == "PeerNotAllowed", result
    uid = subprocess.run(["id", "-u", name], capture_output=True, text=True).stdout.strip()
    assert setup.broker.audit_lines(f"peer_uid={uid}", "outcome=refused:peer")


# -- the same API, through the broker ---------------------------------------------------


def test_login_messages_environment_and_errors_pass_through(setup):
    with ScriptedApp("session", "bob", answers=["secret"], broker=setup.path) as app:
        app.authenticate()
        assert app.seen == ["Password: "]
        app.account_management()
        app.open_session()
        assert app.environ["HOMEDIR"] == "/home/bob"
        app.environ["LANG"] = "C.UTF-8"
        assert dict(app.environ) == {"HOMEDIR": "/home/bob", "LANG": "C.UTF-8"}
        app.rhost = "203.0.113.9"
        assert app.rhost == "203.0.113.9"
        assert app.user == "bob"
    with ScriptedApp("matrix", "bob", answers=["wrong"], broker=setup.path) as app:
        with pytest.raises(pamphlet.AuthenticationError) as caught:
            app.authenticate()
        assert caught.value.code == pamphlet.ReturnCode.AUTH_ERR
    assert setup.broker.audit_lines("service=session", "rhost=203.0.113.9", "outcome=success")


def test_an_expired_password_changed_in_the_login_is_audited_as_a_success(setup):
    with ScriptedApp(
        "expired",
        "carol",
        answers=["secret", "secret", "n3w-Secret", "n3w-Secret"],
        broker=setup.path,
    ) as app:
        app.authenticate()
        with pytest.raises(pamphlet.NewAuthTokenRequired):
            app.account_management()
        app.change_authtoken(change_expired_authtoken=True)
    (line,) = setup.broker.audit_lines(
        "user=carol", "phases=authenticate:0,acct_mgmt:12,chauthtok:0"
    )
    assert "outcome=success" in line


def test_conversation_failure_is_raised_as_on_the_client(setup):
    class Broken(pamphlet.PamApplication):
        def conversation(self, messages):
            raise KeyError("no answer here")

    with Broken("matrix", "bob", broker=setup.path) as app:
        with pytest.raises(pamphlet.ConversationError) as caught:
            app.authenticate()
        assert isinstance(caught.value.__cause__, KeyError)
    login(setup)  # and the broker goes on


def test_refusals_have_their_own_classes_and_are_audited(setup):
    with pytest.raises(ServiceNotAllowed):
        ScriptedApp("login", "bob", broker=setup.path)
    assert setup.broker.audit_lines("service=login", "outcome=refused:service")

    with ScriptedApp("matrix", "dave", answers=["secret"], broker=setup.path) as app:
        with pytest.raises(PhaseNotAllowed, match="needs a successful authenticate"):
            app.account_management()
        app.authenticate()
        with pytest.raises(PhaseNotAllowed, match="open_session"):
            app.open_session()
        with pytest.raises(ItemNotAllowed):
            app.user_prompt = "Who? "
        with pytest.raises(ItemNotAllowed, match="cannot change"):
            app.user = "root"
        with pytest.raises(EnvironNotAllowed):
            app.environ["LD_PRELOAD"] = "/tmp/evil.so"
        app.account_management()  # the transaction is still usable
    assert setup.broker.audit_lines("user=dave", "refused:phase,phase,item,item,environ")

    with pytest.raises(ValueError, match="confdir"):
        ScriptedApp("matrix", "bob", broker=setup.path, confdir="/tmp")
    sock = raw_connect(setup.path)
    sock.sendall(start_frame("matrix", "bob", confdir="/tmp"))
    reply = read_frame(sock)
    assert reply is not None and reply["op"] == "refused" and reply["kind"] == "confdir"
    assert read_frame(sock) is None
    assert setup.broker.audit_lines("outcome=refused:confdir")
    from pamphlet.broker.errors import refusal

    assert isinstance(refusal(reply["kind"], reply["message"]), ConfdirNotAllowed)


def test_a_crashing_module_kills_only_its_worker(setup):
    with pytest.raises(WorkerDied):
        with ScriptedApp("crash", "bob", answers=["secret"], broker=setup.path) as app:
            app.authenticate()
    assert setup.broker.audit_lines("service=crash", "outcome=worker-died", "SIGABRT")
    login(setup)


# -- clients that go away or misbehave --------------------------------------------------


def test_disconnect_mid_conversation_closes_the_session(setup):
    setup.marker.write_text("")
    sock = raw_connect(setup.path)
    sock.sendall(start_frame("session", "erin"))
    assert read_frame(sock) == {"op": "started"}

    def request(message: dict[str, Any], answer: bytes | None = None) -> dict[str, Any]:
        sock.sendall(frame(message))
        while True:
            reply = read_frame(sock)
            assert reply is not None
            if reply["op"] != "converse":
                return reply
            answers = [None if style > 2 else _b64(answer) for style, _ in reply["messages"]]
            sock.sendall(frame({"op": "answers", "answers": answers}))

    assert request({"op": "call", "phase": "authenticate", "flags": 0}, b"secret")["code"] == 0
    assert request({"op": "call", "phase": "open_session", "flags": 0})["code"] == 0
    assert setup.marker.read_text() == "open_session erin\n"
    sock.sendall(frame({"op": "call", "phase": "chauthtok", "flags": 0}))
    assert read_frame(sock)["op"] == "converse"  # 'Old password: ' -- and we leave
    sock.close()
    lines = setup.broker.audit_lines("user=erin", "end=disconnect")
    assert lines, setup.broker.audit_text()
    assert "close_session:0" in lines[0] and "exit 0" in lines[0]
    assert setup.marker.read_text() == "open_session erin\nclose_session erin\n"
    worker = int(lines[0].split("worker=")[1].strip('"').split(":")[0])
    assert not os.path.exists(f"/proc/{worker}")  # reaped: no zombie
    assert all(state != "Z" for _, state in setup.broker.children())


def _b64(data: bytes | None) -> str | None:
    import base64

    return None if data is None else base64.b64encode(data).decode()


def test_a_silent_client_is_released_with_conv_err(setup):
    sock = raw_connect(setup.path)
    sock.sendall(start_frame("matrix", "bob"))
    assert read_frame(sock) == {"op": "started"}
    sock.sendall(frame({"op": "call", "phase": "authenticate", "flags": 0}))
    assert read_frame(sock)["op"] == "converse"
    started = time.monotonic()
    reply = read_frame(sock)  # we say nothing; conversation_timeout is 2 s
    assert time.monotonic() - started < 10
    assert reply is not None and reply["op"] == "error", reply
    assert read_frame(sock) is None
    # pam_matrix turns the failed conversation into PAM_AUTHINFO_UNAVAIL
    (line,) = setup.broker.audit_lines("user=bob", "phases=authenticate:9", "timed out")
    assert "outcome=failure" in line


MALFORMED = {
    "garbage": b"\x00\x00\x00\x05hello",
    "oversized": b"\x7f\xff\xff\xff" + b"x" * 100,
    "invalid-utf8": frame(b'{"op": "start", "v": 1, "service": "\xff\xfe"}'),
    "not-an-object": frame(b"[1, 2, 3]"),
    "half-sent": b"\x00\x00\x01\x00" + b"{" * 10,
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_start_frames_close_the_connection(setup, name):
    sock = raw_connect(setup.path)
    started = time.monotonic()
    sock.sendall(MALFORMED[name])
    frames = frames_until_closed(sock)
    assert time.monotonic() - started < 10
    assert all(f["op"] == "error" for f in frames)
    login(setup)


def test_malformed_requests_inside_a_transaction(setup):
    for bad in (
        frame({"op": "call", "phase": "authenticate", "flags": "all"}),
        frame({"op": "call", "phase": "rm -rf", "flags": 0}),
        frame({"op": "set_item", "item": 2, "value": "!!not base64!!"}),
        frame({"op": "getenv", "name": _b64(b"A\0B")}),
        b"\x00\x10\x00\x00",  # a 1 MiB frame announced
        frame(b"\xc3\x28"),
    ):
        sock = raw_connect(setup.path)
        sock.sendall(start_frame("matrix", "bob"))
        assert read_frame(sock) == {"op": "started"}
        sock.sendall(bad)
        frames = frames_until_closed(sock)
        assert [f["op"] for f in frames] == ["error"], (bad, frames)
    assert setup.broker.audit_lines('end="protocol error')


def test_too_many_answers_fail_the_conversation(setup):
    sock = raw_connect(setup.path)
    sock.sendall(start_frame("matrix", "bob"))
    assert read_frame(sock) == {"op": "started"}
    sock.sendall(frame({"op": "call", "phase": "authenticate", "flags": 0}))
    assert read_frame(sock)["op"] == "converse"
    sock.sendall(frame({"op": "answers", "answers": [_b64(b"secret")] * 33}))
    assert [f["op"] for f in frames_until_closed(sock)] == ["error"]
    assert setup.broker.audit_lines("user=bob", "phases=authenticate:9", "answers do not match")


def test_slow_and_broken_clients_do_not_hold_up_others(setup):
    slow = raw_connect(setup.path)
    start = start_frame("matrix", "bob")
    hogs = []
    for _ in range(10):  # connections that never send a thing
        hogs.append(raw_connect(setup.path))
    began = time.monotonic()
    closed_after = None
    for byte in start:  # one byte per second: the start timeout (2 s) ends it
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            break
        ready = _readable(slow, 1.0)
        if ready:
            frames_until_closed(slow)
            closed_after = time.monotonic() - began
            break
        started = time.monotonic()
        login(setup, "dave")  # others log in meanwhile, fast
        assert time.monotonic() - started < 1.5
    assert closed_after is not None and closed_after < 6
    for hog in hogs:
        assert frames_until_closed(hog)[0]["op"] == "error"
    assert setup.broker.audit_lines("outcome=timeout")


def _readable(sock: socket.socket, timeout: float) -> bool:
    import select

    return bool(select.select([sock], [], [], timeout)[0])


class Brokers:
    """Brokers of a test's own, each with a fresh confdir; ``cleanup()`` stops them."""

    def __init__(self, scripted_module_path: str) -> None:
        self.scripted_module_path = scripted_module_path
        self.made: list[Setup] = []

    def make(self, policy: str) -> Setup:
        confdir = public_dir("pamphlet-confdir-")
        marker = _write_confdir(confdir, self.scripted_module_path)
        self.made.append(Setup(Broker(policy, str(confdir)), confdir, marker))
        return self.made[-1]

    def cleanup(self) -> None:
        for setup in self.made:
            setup.broker.cleanup()
            subprocess.run(["rm", "-rf", str(setup.confdir)], check=True)


@pytest.fixture
def make_broker(scripted_module_path: str) -> Any:
    """``make_broker(policy)``: a broker of the test's own, stopped after it."""
    brokers = Brokers(scripted_module_path)
    yield brokers.make
    brokers.cleanup()


@pytest.fixture
def strict(make_broker: Any) -> Setup:
    """A broker whose throttle engages after two failures."""
    return make_broker(STRICT_POLICY)


def test_throttling_slows_then_refuses_one_peer_and_user_only(strict, source):
    setup = strict

    def wrong() -> float:
        started = time.monotonic()
        with pytest.raises(pamphlet.AuthenticationError):
            login(setup, "carol", "wrong")
        return time.monotonic() - started

    fast = [wrong(), wrong()]
    slowed = [wrong(), wrong()]  # delay 0.4 s per failure past 2
    assert max(fast) < 0.3 and slowed[0] >= 0.35 and slowed[1] >= 0.75
    with pytest.raises(Throttled):
        login(setup, "carol")  # even the right password: refused for now
    started = time.monotonic()
    login(setup, "bob")  # another user from the same peer is not slowed
    assert time.monotonic() - started < 0.3
    code = f"""\
    import json, time
    import pamphlet
    started = time.monotonic()
    pamphlet.authenticate("carol", "secret", service="matrix", broker={setup.path!r})
    print(json.dumps({{"seconds": time.monotonic() - started}}))
    """
    result = run_as("nobody", "nogroup", source, code)  # another peer: not slowed
    assert result["seconds"] < 0.3
    assert setup.broker.audit_lines("peer_uid=0", "user=carol", "refused:throttled")


def test_200_concurrent_async_logins_all_waiting_at_once(make_broker):
    setup = make_broker(PATIENT_POLICY)  # 200 conversations wait longer than 2 s
    count = 200
    waiting = 0
    everyone = asyncio.Event()

    class Login(pamphlet.AsyncPamApplication):
        async def conversation(self, messages):
            nonlocal waiting
            if any(m.is_prompt for m in messages):
                waiting += 1
                if waiting == count:
                    everyone.set()
                await asyncio.wait_for(everyone.wait(), 60)
            return ["secret" if m.is_prompt else None for m in messages]

    async def one() -> None:
        app = Login("matrix", "bob", broker=setup.path)
        try:
            await app.authenticate()
            await app.account_management()
        finally:
            await app.end()

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(count)))

    asyncio.run(main())
    assert waiting == count
    # every worker exited and was reaped; what is left are the spares
    assert len(setup.broker.wait_for_children(SPARES)) == SPARES
    assert len(setup.broker.audit_lines("user=bob", "outcome=success")) == count


# -- the end --------------------------------------------------------------------------


def test_sigterm_ends_every_transaction_cleanly(make_broker):
    setup = make_broker(POLICY)
    broker, marker = setup.broker, setup.marker
    with_session = ScriptedApp("session", "erin", answers=["secret"], broker=broker.socket)
    with_session.authenticate()
    with_session.open_session()
    conversing = raw_connect(broker.socket)
    conversing.sendall(start_frame("matrix", "bob"))
    assert read_frame(conversing) == {"op": "started"}
    conversing.sendall(frame({"op": "call", "phase": "authenticate", "flags": 0}))
    assert read_frame(conversing)["op"] == "converse"
    waiting = raw_connect(broker.socket)  # no start frame yet
    assert len(broker.children()) == 2 + SPARES
    started = time.monotonic()
    assert broker.stop() == 0
    assert time.monotonic() - started < 10
    assert marker.read_text() == "open_session erin\nclose_session erin\n"
    assert [f["op"] for f in frames_until_closed(conversing)] == ["error"]
    assert [f["op"] for f in frames_until_closed(waiting)] == ["error"]
    with pytest.raises(WorkerDied):
        with_session.account_management()
    with_session.end()
    assert broker.children() == []
    text = broker.audit_text()
    assert text.count("end=shutdown") == 2 and "event=stopped" in text
    assert not os.path.exists(broker.socket)


def test_every_connection_in_the_backlog_at_sigterm_is_answered(make_broker):
    """Connections the broker has not accepted yet when SIGTERM comes get an
    answer, not a reset: the broker answers its backlog before it closes."""
    setup = make_broker(POLICY)
    process = setup.broker.process
    # Stopped, the broker accepts nothing: the connections wait in its backlog,
    # and it takes at most 64 per turn once it runs again.
    process.send_signal(signal.SIGSTOP)
    flood = [raw_connect(setup.broker.socket) for _ in range(600)]
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    assert process.wait(timeout=30) == 0
    answers = [[f["op"] for f in frames_until_closed(sock)] for sock in flood]
    unanswered = sum(not ops for ops in answers)
    assert unanswered == 0, f"{unanswered} of {len(flood)} connections got no frame"
    assert "error" in answers[-1]
    assert setup.broker.audit_lines("event=backlog-answered")


def test_bad_policy_files_are_reported(tmp_path):
    from pamphlet.broker.policy import PolicyError, load

    cases = {
        "[[allow]]\nservices = ['x']\n": "names no users and no groups",
        "[[allow]]\nusers = ['a']\n": "names no services",
        "[[allow]]\nusers = ['a']\nservices = ['x']\nphases = ['login']\n": "unknown phase",
        "[[allow]]\nusers = ['a']\nservices = ['x']\nmax_in_flight = -1\n": "max_in_flight",
        "[[allow]]\nusers = ['a']\nservices = ['x']\nphase = []\n": "unknown key 'phase'",
        "allow = 3\n": "no [[allow]] rules",
        "[[allow]\n": "not valid TOML",
        "[[allow]]\nusers = ['a']\nservices = ['x']\nmax_in_flight = 8\n"
        "max_in_flight_total = 4\n": "max_in_flight_total must not be below max_in_flight",
        "[[allow]]\nusers = ['a']\nservices = ['x']\n[throttle]\nrhost_slow_after = 40\n": (
            "rhost_refuse_after must not be below rhost_slow_after"
        ),
        "[[allow]]\nusers = ['a']\nservices = ['x']\n[throttle]\ndelay = 'x'\n": "delay",
    }
    for text, message in cases.items():
        path = tmp_path / "policy.toml"
        path.write_text(text)
        with pytest.raises(PolicyError, match=message.replace("[", r"\[")):
            load(str(path))
    proc = subprocess.run(
        [sys.executable, "-m", "pamphlet", "broker", "--policy", str(path), "--socket", "/tmp/x"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "delay" in proc.stderr


def test_command_line_through_the_broker(setup):
    def pamphlet_command(*args: str, answer: str = "secret\n") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pamphlet", *args],
            input=answer,
            capture_output=True,
            text=True,
            timeout=60,
        )

    proc = pamphlet_command("--broker", setup.path, "matrix", "bob", "authenticate", "acct_mgmt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "pamphlet: successfully authenticated",
        "pamphlet: account management done.",
    ]
    proc = pamphlet_command("--broker", setup.path, "matrix", "bob", "authenticate", "open_session")
    assert proc.returncode == 1
    assert "open_session failed: PhaseNotAllowed" in proc.stderr
    proc = pamphlet_command("--broker", setup.path, "sshd", "bob", "authenticate")
    assert proc.returncode == 1 and "ServiceNotAllowed" in proc.stderr
    proc = pamphlet_command(
        "--broker", setup.path, "--confdir", "/tmp", "matrix", "bob", "authenticate"
    )
    assert proc.returncode == 2 and "--broker" in proc.stderr


def test_change_password_through_the_broker_authenticates_first(setup, source, unix_user):
    name, password = unix_user
    new = "Nw-" + secrets.token_hex(8)
    code = f"""\
    import json
    import pamphlet
    user, old, new, path = {(name, password, new, setup.path)!r}
    result = {{}}
    try:
        pamphlet.change_password(user, "wrong-" + old, new, service="unix", broker=path)
    except Exception as exc:
        result["wrong_old"] = type(exc).__name__
    pamphlet.change_password(user, old, new, service="unix", broker=path)
    pamphlet.authenticate(user, new, service="unix", broker=path)
    result["changed"] = True
    print(json.dumps(result))
    """
    result = run_as("nobody", "nogroup", source, code)
    assert result == {"wrong_old": "AuthenticationError", "changed": True}


def test_socket_activation_as_systemd_does_it(tmp_path):
    directory = public_dir("pamphlet-activation-")
    try:
        path = str(directory / "broker.sock")
        policy = directory / "policy.toml"
        policy.write_text('[[allow]]\nusers = ["root"]\nservices = ["other"]\n')
        launcher = f"""\
        import os, socket, sys
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind({path!r})
        listener.listen()
        os.dup2(listener.fileno(), 3)
        os.set_inheritable(3, True)  # a no-op dup2 when it is fd 3 already
        os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
        os.execv(sys.executable, [sys.executable, "-m", "pamphlet", "broker",
                 "--policy", {str(policy)!r}, "--audit", "stderr"])
        """
        process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(launcher)],
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(broker_harness.SRC)),
        )
        try:
            assert "the socket systemd passed" in process.stderr.readline()
            with pytest.raises(ServiceNotAllowed):  # it answers, by the policy
                ScriptedApp("login", "bob", broker=path)
        finally:
            process.terminate()
            assert process.wait(timeout=30) == 0
        assert "outcome=refused:service" in process.stderr.read()
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=True)


def test_policy_check_command():
    example = pathlib.Path(__file__).parent.parent / "contrib" / "systemd" / "broker.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "pamphlet", "broker", "--policy", str(example), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "1 rules, OK" in proc.stdout
