"""The stepwise login (pamphlet.stepwise), with both transports and both faces.

Real stacks in a throwaway confdir, used in this process and by a real root
broker (tests/broker_harness.py): pam_matrix for passwords, pam_oath for a
TOTP code, pam_stress for an expired password changed through pam_matrix,
pam_echo for a module that only informs, pam_exec markers for sessions.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from broker_harness import SRC, Broker, pam_wrapper_module, public_dir
from conftest import settled_thread_count, thread_count, wait_for_thread_count
from pamphlet.stepwise import (
    LOGIN_INCORRECT,
    AsyncLogin,
    Login,
    LoginRegistry,
    LoginSequence,
    Outcome,
    Step,
    TooManyLogins,
    address_key,
)
from test_django import totp

pytestmark = pytest.mark.root  # a root broker; pam_oath's users files

OATH_SECRET = "3132333435363738393031323334353637383930"
USERS = {"bob": "secret", "carol": "secret", "erin": "old-pw", "dave": "secret"}
# pam_oath takes a code once per user: each login that sends one has a user of its own.
CODE_USERS = iter([f"otp{i}" for i in range(16)])
USERS.update({name: "secret" for name in [f"otp{i}" for i in range(16)]})


class Stacks:
    def __init__(self) -> None:
        self.folder = public_dir("pamphlet-stepwise-")
        matrix = pam_wrapper_module("pam_matrix.so")
        self.marker = self.folder / "marker"
        self.marker.touch()
        self.marker.chmod(0o666)
        script = self.folder / "mark.sh"
        script.write_text(f'#!/bin/sh\necho "$PAM_TYPE $PAM_USER $PAM_RHOST" >> {self.marker}\n')
        script.chmod(0o755)
        self.oath = self.folder / "oath"
        self.oath.mkdir(mode=0o700)
        self.reset_passwords()

        def db(service: str) -> str:
            return f"{matrix} passdb={self.folder}/passdb-{service}"

        services = {
            "pw": f"auth required {db('pw')} verbose\naccount required {db('pw')}\n",
            "otp": (
                f"auth requisite {db('otp')}\n"
                f"auth required pam_oath.so usersfile={self.oath}/users window=3 digits=6\n"
                f"account required {db('otp')}\n"
            ),
            "expired": (
                f"auth required {db('expired')}\naccount required pam_stress.so expired\n"
                f"password required {db('expired')}\n"
            ),
            "slow": (
                "auth optional pam_faildelay.so delay=1000000\n"
                f"auth required {db('slow')}\naccount required {db('slow')}\n"
            ),
            "info": (
                "auth required pam_echo.so Welcome, %u from %H.\nauth required pam_permit.so\n"
                "account required pam_permit.so\n"
            ),
            "session": (
                f"auth required {db('session')}\naccount required {db('session')}\n"
                f"session required pam_exec.so {script}\nsession required {db('session')}\n"
            ),
        }
        self.confdir = self.folder / "pam.d"
        self.confdir.mkdir()
        for name, stack in services.items():
            (self.confdir / name).write_text(stack)

    def reset_passwords(self) -> None:
        # One passdb per service: pam_matrix reads a user's first line only.
        for service in ("pw", "otp", "expired", "session", "slow"):
            (self.folder / f"passdb-{service}").write_text(
                "".join(f"{user}:{password}:{service}\n" for user, password in USERS.items())
            )
        # One file: pam_oath expands ${USER} only for system users. (Tests
        # here send one code at a time: pam_oath's lock on it does not wait.)
        users = self.oath / "users"
        users.write_text("".join(f"HOTP/T30/6 {user} - {OATH_SECRET}\n" for user in USERS))
        users.chmod(0o600)

    def markers(self) -> list[str]:
        return self.marker.read_text().splitlines()


@pytest.fixture(scope="module")
def stacks() -> Iterator[Stacks]:
    made = Stacks()
    yield made
    shutil.rmtree(made.folder, ignore_errors=True)


POLICY = """\
[[allow]]
users = ["root"]
services = ["pw", "otp", "expired", "info", "session", "slow"]
phases = ["authenticate", "acct_mgmt", "chauthtok", "setcred", "open_session", "close_session"]

[limits]
detach_timeout = 60
"""


@pytest.fixture(scope="module")
def broker(stacks: Stacks) -> Iterator[Broker]:
    made = Broker(POLICY, str(stacks.confdir))
    yield made
    made.cleanup()


class Face:
    """One way of driving a login: a transport and a face, the same calls."""

    def __init__(self, transport: str, face: str, stacks: Stacks, broker: Broker | None) -> None:
        self.transport, self.face = transport, face
        self.where: dict[str, Any] = (
            {"broker": broker.socket} if broker is not None else {"confdir": str(stacks.confdir)}
        )

    def __repr__(self) -> str:
        return f"{self.transport}-{self.face}"

    def start(self, service: str, user: str, **kwargs: Any) -> Any:
        if self.face == "sync":
            return Login.start(service, user, **self.where, **kwargs)
        return asyncio.run(AsyncLogin.start(service, user, **self.where, **kwargs))

    def answer(self, login: Any, answers: list[str]) -> Step | Outcome:
        if self.face == "sync":
            return login.answer(answers)  # type: ignore[no-any-return]
        return asyncio.run(login.answer(answers))  # type: ignore[no-any-return]

    def cancel(self, login: Any) -> Outcome:
        if self.face == "sync":
            return login.cancel()  # type: ignore[no-any-return]
        return asyncio.run(login.cancel())  # type: ignore[no-any-return]


@pytest.fixture(
    params=[
        ("in-process", "sync"),
        ("in-process", "async"),
        ("broker", "sync"),
        ("broker", "async"),
    ],
    ids=lambda p: "-".join(p),
)
def face(request: Any, stacks: Stacks) -> Face:
    transport, kind = request.param
    broker = request.getfixturevalue("broker") if transport == "broker" else None
    return Face(transport, kind, stacks, broker)


def texts(messages: Any) -> list[str]:
    return [str(m) for m in messages]


def test_password_only(face: Face) -> None:
    login = face.start("pw", "bob", rhost="192.0.2.7")
    assert login.step is not None and login.outcome is None
    assert login.step.number == 1 and texts(login.step.prompts) == ["Password: "]
    assert login.step.prompts[0].wants_password
    outcome = face.answer(login, ["secret"])
    assert isinstance(outcome, Outcome)
    assert outcome.success and outcome.user == "bob" and outcome.message == ""
    assert texts(outcome.notices) == ["Authentication succeeded"]
    assert login.ended


def test_one_failure_text_for_a_wrong_password_and_an_unknown_user(face: Face) -> None:
    seen = []
    for user, password in (("bob", "wrong"), ("nosuchuser", "secret")):
        login = face.start("pw", user)
        outcome = face.answer(login, [password])
        assert isinstance(outcome, Outcome) and not outcome.success
        seen.append((outcome.message, texts(outcome.notices), outcome.user))
        assert outcome.code == 7 and "Authentication failure" in outcome.detail
        assert login.ended
    assert seen[0] == seen[1] == (LOGIN_INCORRECT, ["Authentication failed"], None)


def test_password_and_totp(face: Face) -> None:
    user = next(CODE_USERS)
    login = face.start("otp", user)
    assert texts(login.step.prompts) == ["Password: "]
    step = face.answer(login, ["secret"])
    assert isinstance(step, Step) and step.number == 2
    assert texts(step.prompts) == [f"One-time password (OATH) for `{user}': "]
    outcome = face.answer(login, [totp(OATH_SECRET)])
    assert isinstance(outcome, Outcome) and outcome.success, outcome
    assert outcome.user == user


def test_a_wrong_code_reads_as_a_wrong_password(face: Face) -> None:
    login = face.start("otp", "dave")
    face.answer(login, ["secret"])
    outcome = face.answer(login, ["000000" if totp(OATH_SECRET) != "000000" else "111111"])
    assert isinstance(outcome, Outcome)
    assert not outcome.success and outcome.message == LOGIN_INCORRECT


def test_an_expired_password_is_changed_on_the_same_handle(face: Face, stacks: Stacks) -> None:
    try:
        login = face.start("expired", "erin")
        step = face.answer(login, ["old-pw"])
        assert isinstance(step, Step) and step.changing_password
        answers = {
            "Old password: ": "old-pw",
            "New Password :": "new-pw",
            "Verify New Password :": "new-pw",
        }
        asked = []
        while isinstance(step, Step):
            asked += texts(step.prompts)
            step = face.answer(login, [answers[str(p)] for p in step.prompts])
        assert step.success, step
        assert step.phase is not None and step.phase.value == "chauthtok"
        assert set(asked) <= set(answers) and "New Password :" in asked
        assert "erin:new-pw:" in (stacks.folder / "passdb-expired").read_text()
    finally:
        stacks.reset_passwords()


def test_a_module_that_only_informs(face: Face) -> None:
    login = face.start("info", "bob", rhost="198.51.100.4")
    # No question: decided at once, with the notice.
    assert login.step is None
    assert login.outcome is not None and login.outcome.success
    assert texts(login.outcome.notices) == ["Welcome, bob from 198.51.100.4."]


@pytest.mark.parametrize("where", ["password", "code", "new password"])
def test_cancel_at_each_step(face: Face, stacks: Stacks, where: str) -> None:
    service = "expired" if where == "new password" else "otp"
    login = face.start(service, "dave" if service == "otp" else "erin")
    if where == "code":
        assert isinstance(face.answer(login, ["secret"]), Step)
    if where == "new password":
        step = face.answer(login, ["old-pw"])
        assert isinstance(step, Step) and step.changing_password
    outcome = face.cancel(login)
    assert not outcome.success and outcome.message == "Login cancelled."
    assert login.ended and login.outcome is outcome
    stacks.reset_passwords()


def test_the_session_is_opened_and_closed_at_end(face: Face, stacks: Stacks) -> None:
    login = face.start(
        "session", "bob", rhost="203.0.113.5", sequence=LoginSequence(open_session=True)
    )
    before = len(stacks.markers())
    outcome = face.answer(login, ["secret"])
    assert isinstance(outcome, Outcome) and outcome.success
    assert stacks.markers()[before:] == ["open_session bob 203.0.113.5"]
    assert not login.ended
    if face.face == "sync":
        login.end()
    else:
        asyncio.run(login.end())
    assert login.ended
    assert stacks.markers()[before:] == [
        "open_session bob 203.0.113.5",
        "close_session bob 203.0.113.5",
    ]


RESUME = """\
import json, sys
from pamphlet.stepwise import Login
state = json.loads(sys.argv[2])
login = Login.resume(sys.argv[1], state)
print(json.dumps({"prompts": [str(p) for p in login.step.prompts] if login.step else None,
                  "number": login.step.number if login.step else None}), flush=True)
outcome = login.answer([sys.argv[3]])
print(json.dumps({"success": outcome.success, "user": outcome.user, "message": outcome.message}))
"""


def test_a_detached_login_is_resumed_in_another_process(broker: Broker) -> None:
    user = next(CODE_USERS)
    login = Login.start("otp", user, broker=broker.socket, rhost="192.0.2.9")
    step = login.answer(["secret"])
    assert isinstance(step, Step)
    state = login.detach()
    assert state["number"] == 2 and isinstance(state["token"], str)
    json.dumps(state)  # a server-side session can hold it
    proc = subprocess.run(
        [sys.executable, "-c", RESUME, broker.socket, json.dumps(state), totp(OATH_SECRET)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    first, last = (json.loads(line) for line in proc.stdout.splitlines())
    assert first == {"prompts": [f"One-time password (OATH) for `{user}': "], "number": 2}
    assert last == {"success": True, "user": user, "message": ""}
    # The token was good once.
    again = Login.resume(broker.socket, state)
    assert again.outcome is not None and not again.outcome.success
    assert "TokenUsed" in again.outcome.detail
    (line,) = broker.audit_lines(f"user={user}", "rhost=192.0.2.9", "outcome=success")
    assert "phases=authenticate:0,acct_mgmt:0" in line


def test_a_failures_delay_is_awaited_on_the_loop_and_holds_no_thread(stacks: Stacks) -> None:
    # pam_faildelay asks for a second after a failure: in-process, libpam's
    # sleep is routed to the caller, and AsyncLogin awaits it on the loop
    # after the phase's thread has gone.
    async def main() -> tuple[float, int, Outcome]:
        login = await AsyncLogin.start("slow", "bob", confdir=str(stacks.confdir))
        baseline = settled_thread_count()
        started = time.monotonic()
        answering = asyncio.ensure_future(login.answer(["wrong"]))
        await asyncio.sleep(0.4)  # inside the delay: the phase is over
        during = thread_count() - (baseline - 1)  # (the phase thread waited before)
        outcome = await answering
        assert isinstance(outcome, Outcome)
        return time.monotonic() - started, during, outcome

    elapsed, during, outcome = asyncio.run(main())
    assert not outcome.success and outcome.message == LOGIN_INCORRECT
    assert elapsed >= 0.5  # libpam draws 0.5 to 1.5 times what was asked
    assert during <= 0, "a thread was held during the delay"
    # The sync face sleeps it, as libpam would have.
    login = Login.start("slow", "bob", confdir=str(stacks.confdir))
    started = time.monotonic()
    assert not login.answer(["wrong"]).success  # type: ignore[union-attr]
    assert time.monotonic() - started >= 0.5


# -- the registry ------------------------------------------------------------------------


def test_address_keys() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:3:4:5:6") == address_key("2001:db8:1:2:ffff::1")
    assert address_key("2001:db8:1:2:3:4:5:6") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key(None) == "-"


def test_caps_in_total_and_per_address_leave_room_for_others(stacks: Stacks) -> None:
    registry: LoginRegistry[Login] = LoginRegistry(max_logins=6, max_per_address=3, timeout=60)
    confdir = str(stacks.confdir)
    try:
        for _ in range(3):
            registry.start("2001:db8::1", lambda: Login.start("pw", "bob", confdir=confdir))
        # The same /64, another host: refused, with a Retry-After.
        with pytest.raises(TooManyLogins) as refused:
            registry.admit("2001:db8::ffff")
        assert refused.value.status == 503 and 1 <= refused.value.retry_after <= 60
        # Another address still logs in.
        key, _ = registry.start("192.0.2.50", lambda: Login.start("pw", "carol", confdir=confdir))
        outcome = registry.answer(key, ["secret"])
        assert isinstance(outcome, Outcome) and outcome.success
        assert registry.get(key) is None  # decided: it left the registry
        for address in ("192.0.2.51", "192.0.2.52", "192.0.2.53"):
            registry.start(address, lambda: Login.start("pw", "bob", confdir=confdir))
        with pytest.raises(TooManyLogins):
            registry.admit("192.0.2.54")  # six in all
    finally:
        registry.close()


def where_for(transport: str, stacks: Stacks, request: Any) -> tuple[dict[str, Any], Any]:
    """Login.start's keywords for ``transport``, and the broker (or None)."""
    if transport == "broker":
        broker = request.getfixturevalue("broker")
        return {"broker": broker.socket}, broker
    return {"confdir": str(stacks.confdir)}, None


@pytest.mark.parametrize("transport", ["in-process", "broker"])
def test_only_an_answer_extends_a_login_and_expiry_ends_it(
    transport: str, stacks: Stacks, request: Any
) -> None:
    where, _ = where_for(transport, stacks, request)
    baseline = settled_thread_count()
    # The registry's clock is the test's: a loaded machine cannot move deadlines.
    now = [1000.0]
    registry: LoginRegistry[Login] = LoginRegistry(timeout=2.0)
    registry._clock = lambda: now[0]
    try:
        polled, _ = registry.start("192.0.2.1", lambda: Login.start("otp", "bob", **where))
        answered, _ = registry.start("192.0.2.2", lambda: Login.start("otp", "dave", **where))
        for now[0] in (1000.5, 1001.0, 1001.5, 1001.9):
            assert registry.get(polled) is not None  # a page view, again and again
        step = registry.answer(answered, ["secret"])  # an answer: two seconds more
        assert isinstance(step, Step)
        polled_login, answered_login = registry.get(polled), registry.get(answered)
        assert polled_login is not None and answered_login is not None
        now[0] = 1002.1
        assert registry.get(polled) is None and registry.get(answered) is not None
        assert [key for key, _ in registry.reap()] == [polled]
        _wait_until(lambda: polled_login.ended)
        now[0] = 1003.95
        assert registry.get(answered) is None
        assert [key for key, _ in registry.reap()] == [answered]
        _wait_until(lambda: answered_login.ended)
        assert polled_login.outcome is None or not polled_login.outcome.success
        assert wait_for_thread_count(baseline) <= baseline
    finally:
        registry.close()


@pytest.mark.parametrize("shared", [False, True], ids=["one-process", "shared-dir"])
def test_a_key_past_its_deadline_is_gone_without_a_reaper(
    shared: bool, stacks: Stacks, tmp_path: Any
) -> None:
    # Django's view asks `key in registry` and runs no reaper: an answer past
    # the deadline must not find the login still in progress.
    registry: LoginRegistry[Login] = LoginRegistry(
        timeout=0.3, shared_dir=str(tmp_path / "places") if shared else None
    )
    try:
        key, login = registry.start(
            "192.0.2.9", lambda: Login.start("pw", "bob", confdir=str(stacks.confdir))
        )
        assert key in registry and len(registry) == 1 and registry.count("192.0.2.9") == 1
        time.sleep(0.5)
        assert key not in registry
        assert len(registry) == 0 and registry.count("192.0.2.9") == 0
        assert registry.get(key) is None
        # Reading reaps nothing: the reaper still finds the key and ends it.
        assert [k for k, _ in registry.reap()] == [key]
        _wait_until(lambda: login.ended)
    finally:
        registry.close()


@pytest.mark.parametrize("transport", ["in-process", "broker"])
def test_shutdown_ends_every_login_in_progress(
    transport: str, stacks: Stacks, request: Any
) -> None:
    where, broker = where_for(transport, stacks, request)
    baseline = settled_thread_count()
    workers = None if broker is None else len(broker.children())
    before = len(stacks.markers())
    registry: LoginRegistry[Login] = LoginRegistry(timeout=60)
    sequence = LoginSequence(open_session=True)
    logins = []
    for i in range(4):  # waiting at the password
        logins.append(registry.start(f"192.0.2.{i}", lambda: Login.start("otp", "bob", **where))[1])
    for i in range(2):  # logged in, sessions open
        _, login = registry.start(
            f"198.51.100.{i}",
            lambda i=i: Login.start(
                "session", "bob", sequence=sequence, rhost=f"198.51.100.{i}", **where
            ),
        )
        assert isinstance(login.answer(["secret"]), Outcome) and not login.ended
        logins.append(login)
    if transport == "in-process":
        assert thread_count() >= baseline + 4  # one phase thread per login at a prompt
    registry.close()
    assert all(login.ended for login in logins)
    marks = stacks.markers()[before:]
    assert sorted(marks) == sorted(
        [f"open_session bob 198.51.100.{i}" for i in range(2)]
        + [f"close_session bob 198.51.100.{i}" for i in range(2)]
    )
    assert wait_for_thread_count(baseline) <= baseline
    if broker is not None:
        assert workers is not None
        # Each login's worker ended its handle and exited; the spares are left.
        assert len(broker.wait_for_children(workers)) <= workers
    with pytest.raises(TooManyLogins):
        registry.admit("192.0.2.99")  # closed: nothing new starts


def _wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_processes_of_a_site_share_one_count(tmp_path: Any) -> None:
    # Two registries on one folder stand for two worker processes: a login
    # started in one and finished in the other is counted once, not twice.
    folder = str(tmp_path / "logins")
    first: LoginRegistry[Login] = LoginRegistry(max_per_address=2, shared_dir=folder)
    second: LoginRegistry[Login] = LoginRegistry(max_per_address=2, shared_dir=folder)
    one = first.admit("192.0.2.1")
    second.admit("192.0.2.1")
    with pytest.raises(TooManyLogins):
        first.admit("192.0.2.1")
    assert one in second and second.count("192.0.2.1") == 2
    second.answered(one)  # the next step was served by the other process
    second.remove(one)  # and the login ended there
    first.admit("192.0.2.1")  # its place is free in the first one too
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o777)
    open_folder.chmod(0o777)
    with pytest.raises(PermissionError):
        LoginRegistry(shared_dir=str(open_folder))


def test_a_refusal_from_the_other_fallback_points_the_log_at_the_doctor(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # libpam reads 'other' for a service it cannot find: the page says only
    # "Login incorrect.", the log says which command explains it.
    confdir = tmp_path / "pam.d"
    confdir.mkdir()
    (confdir / "other").write_text("auth required pam_deny.so\naccount required pam_deny.so\n")
    with caplog.at_level("INFO", logger="pamphlet.stepwise"):
        login = Login.start("webapp", "bob", confdir=str(confdir))
        outcome = login.outcome
        if outcome is None:
            outcome = login.answer(["secret"])
    assert isinstance(outcome, Outcome) and not outcome.success
    assert outcome.message == LOGIN_INCORRECT and "doctor" not in outcome.message
    assert outcome.code == 7
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"pamphlet doctor webapp bob --confdir {confdir}" in logged, logged
    assert "'other'" in logged
