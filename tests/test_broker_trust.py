"""The broker's trust boundary, attacked from unprivileged peers.

A real root broker (tests/broker_harness.py) with real modules: pam_unix and
throwaway users, pam_rootok, pam_exec markers, pam_matrix. Peers are
``nobody`` and throwaway users through setpriv; the test process is root.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

import pamphlet
from broker_harness import (
    SYSTEM_PYTHON,
    Broker,
    Holder,
    as_user,
    frame,
    public_source,
    raw_connect,
    read_frame,
    run_as,
    shadow_hash,
    start_frame,
)
from conftest import ScriptedApp
from pamphlet.broker import ServiceNotAllowed, Throttled
from test_broker import Brokers, Setup

pytestmark = pytest.mark.root

NOBODY = pwd.getpwnam("nobody").pw_uid

TRUST_POLICY = """\
[[allow]]
groups = ["nogroup"]
services = ["chsh", "matrix"]
require_authentication = false
max_in_flight = 3

[[allow]]
users = ["root"]
services = ["chsh", "guess", "matrix", "session"]
phases = ["authenticate", "acct_mgmt", "chauthtok", "open_session", "setcred"]
max_in_flight = 100

[limits]
start_timeout = 2
frame_timeout = 2
conversation_timeout = 2
idle_timeout = 10
max_pending_per_peer = 64
"""


@pytest.fixture
def make_broker(scripted_module_path: str) -> Iterator[Callable[[str], Setup]]:
    brokers = Brokers(scripted_module_path)
    yield brokers.make
    brokers.cleanup()


@pytest.fixture
def site(make_broker: Callable[[str], Setup]) -> Setup:
    return make_broker(TRUST_POLICY)


def guesses(site: Setup) -> list[str]:
    """The guesses that reached pam_unix in the "guess" stack: "USER RHOST" each."""
    return (site.confdir / "guesses").read_text().splitlines()


@pytest.fixture(scope="module")
def source() -> Iterator[pathlib.Path]:
    path = public_source()
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


# -- 1. who the modules think the caller is ----------------------------------------------

CHSH_CLIENT = """\
import json
import pamphlet
user, password, path = {args!r}
seen = []
class Peer(pamphlet.PamApplication):
    def __init__(self, *args, answers, **kwargs):
        super().__init__(*args, **kwargs)
        self.answers = list(answers)
    def conversation(self, messages):
        seen.extend(str(m) for m in messages)
        return [self.answers.pop(0) if m.is_prompt else None for m in messages]
result = {{}}
def attempt(key, phase, answers):
    seen.clear()
    try:
        with Peer("chsh", user, broker=path, answers=answers) as app:
            getattr(app, phase)()
        result[key] = "ok"
    except Exception as exc:
        result[key] = type(exc).__name__
    result[key + "_seen"] = list(seen)
attempt("wrong", "authenticate", ["wrong-" + password])
attempt("right", "authenticate", [password])
attempt("chauthtok", "change_authtoken", ["wrong-" + password, "N3w-Pass-x9", "N3w-Pass-x9"])
print(json.dumps(result))
"""


def test_pam_rootok_sees_the_peer_not_root(site, source, unix_user):
    name, password = unix_user
    before = shadow_hash(name)
    result = run_as(
        "nobody", "nogroup", source, CHSH_CLIENT.format(args=(name, password, site.path))
    )
    # pam_rootok says no to nobody: pam_unix asks, and a wrong password fails.
    assert result["wrong"] == "AuthenticationError", result
    assert result["wrong_seen"] == ["Password: "]
    assert result["right"] == "ok"
    # pam_unix lets only a real root skip the current password.
    assert result["chauthtok"] != "ok"
    assert "Current password: " in result["chauthtok_seen"], result
    assert shadow_hash(name) == before
    assert site.broker.audit_lines(f"user={name}", "service=chsh", "phases=chauthtok:")
    # A root peer is root to the modules, as when root runs chsh: no prompt.
    with ScriptedApp("chsh", name, answers=[], broker=site.path) as app:
        app.authenticate()
        assert app.seen == []


def test_a_worker_has_the_peer_as_its_real_uid_and_cannot_be_dumped(site, source):
    holder = Holder("nobody", "nogroup", source, site.path, "matrix", "bob", 1)
    try:
        assert holder.replies[0]["op"] == "converse"
        (worker,) = site.broker.workers_of(NOBODY)
        status = pathlib.Path(f"/proc/{worker}/status").read_text().splitlines()
        uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
        gids = next(line for line in status if line.startswith("Gid:")).split()[1:]
        assert uids == [str(NOBODY), "0", "0", "0"]  # real, effective, saved, filesystem
        assert gids[:3] == [str(pwd.getpwnam("nobody").pw_gid), "0", "0"]
        limits = pathlib.Path(f"/proc/{worker}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core"))
        assert core.split()[4:6] == ["0", "0"]
        # The peer can signal its worker but cannot read its memory or environment.
        peek = subprocess.run(
            as_user("nobody", "nogroup", "cat", f"/proc/{worker}/environ"), capture_output=True
        )
        assert peek.returncode != 0 and b"Permission denied" in peek.stderr
    finally:
        holder.release()


# -- 4. a worker its peer signals costs only that transaction -----------------------------


def _as_nobody_kill(pid: int, signum: int) -> None:
    code = f"import os; os.kill({pid}, {signum})"
    subprocess.run(as_user("nobody", "nogroup", SYSTEM_PYTHON, "-c", code), check=True)


@pytest.mark.parametrize(
    ("signum", "seen"),
    [
        (40, "signal SIGRTMIN+6"),
        (signal.SIGSEGV, "signal SIGSEGV"),
        (signal.SIGSTOP, "stopped: killed by the broker"),
    ],
    ids=["signal-40", "SIGSEGV", "SIGSTOP"],
)
def test_a_worker_its_peer_kills_or_stops_costs_only_its_own_transaction(
    site, source, signum, seen
):
    site.marker.write_text("")  # pam_exec's, in the session stack
    with_session = ScriptedApp("session", "erin", answers=["secret"], broker=site.path)
    with_session.authenticate()
    with_session.open_session()
    holder = Holder("nobody", "nogroup", source, site.path, "matrix", "bob", 1)
    try:
        assert holder.replies[0]["op"] == "converse"
        (worker,) = site.broker.workers_of(NOBODY)
        _as_nobody_kill(worker, signum)  # its real uid is the peer's: the peer may
        # A stopped worker is killed at once (it may hold /etc/.pwd.lock, or
        # have no deadline set yet), well before its deadline: conversation
        # (2 s) + frame (2 s) + the broker's grace (5 s).
        lines = site.broker.audit_lines(f'worker="{worker}:', timeout=4)
        assert lines, site.broker.audit_text()
        assert seen in lines[0] and "peer_uid=65534" in lines[0], lines
        assert site.broker.process.poll() is None
        with ScriptedApp("matrix", "bob", answers=["secret"], broker=site.path) as app:
            app.authenticate()  # and the broker goes on
    finally:
        holder.release()
    with_session.account_management()  # the other session is still open
    with_session.end()
    assert site.marker.read_text() == "open_session erin\nclose_session erin\n"


# A broker with a bug planted in the code that names how a worker ended.
FAULTY_BROKER = """\
import sys
from pamphlet.broker import server
def broken(signum):
    raise RuntimeError("a planted bug")
server._signal_name = broken
sys.exit(server.main(sys.argv[sys.argv.index("broker") + 1 :]))
"""


def test_a_failure_in_handling_one_worker_is_contained(scripted_module_path, source):
    brokers = Brokers(scripted_module_path)
    policy = TRUST_POLICY.replace("max_in_flight = 3\n", "max_in_flight = 1\n")
    brokers.make(policy)  # a confdir; the broker that matters is the faulty one below
    confdir = brokers.made[0].confdir
    faulty = Broker(policy, str(confdir), wrapper=[sys.executable, "-c", FAULTY_BROKER])
    try:
        first = Holder("nobody", "nogroup", source, faulty.socket, "matrix", "bob", 1)
        assert first.replies[0]["op"] == "converse"
        (worker,) = faulty.workers_of(NOBODY)
        os.kill(worker, signal.SIGKILL)
        (line,) = faulty.audit_lines("event=internal-error")
        assert "planted bug" in line and "where=_reap" in line
        first.release()
        # The loop went on, and the worker's slot (max_in_flight = 1) is free again.
        second = Holder("nobody", "nogroup", source, faulty.socket, "matrix", "bob", 1)
        assert second.replies[0]["op"] == "converse", second.replies
        second.release()
        assert faulty.process.poll() is None
    finally:
        faulty.cleanup()
        brokers.cleanup()


# -- 2. throttle reservations ------------------------------------------------------------


def _guess(site: Setup, user: str, password: str, rhost: str | None) -> str:
    try:
        with ScriptedApp("guess", user, answers=[password], broker=site.path) as app:
            if rhost is not None:
                app.rhost = rhost
            app.authenticate()
        return "ok"
    except Throttled as exc:
        return f"Throttled: {exc}"
    except pamphlet.PamError as exc:
        return type(exc).__name__


def _guess_at_once(site: Setup, guesses: list[tuple[str, str, str | None]]) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(len(guesses)) as pool:
        return list(pool.map(lambda g: _guess(site, *g), guesses))


def _throttle_policy(**settings: int) -> str:
    table = "".join(f"{key} = {value}\n" for key, value in settings.items())
    return TRUST_POLICY + "\n[throttle]\ndelay = 0.4\n" + table


def test_60_concurrent_guesses_for_one_user_reach_pam_unix_at_most_the_limit(
    make_broker, unix_user
):
    name, password = unix_user
    site = make_broker(
        _throttle_policy(
            user_slow_after=10, user_refuse_after=10, peer_refuse_after=1000, peer_slow_after=1000
        )
    )
    results = _guess_at_once(site, [(name, "wrong-" + password, None)] * 60)
    reached = guesses(site)
    assert 1 <= len(reached) <= 10, (len(reached), results)
    assert results.count("AuthenticationError") == len(reached)
    refusals = [r for r in results if r.startswith("Throttled")]
    assert len(refusals) == 60 - len(reached)
    # Exact counts: failures counted plus guesses in flight make the limit.
    for text in refusals:
        failed, in_flight = _counts(text)
        assert failed + in_flight == 10, text
    # Nothing is in flight now: ten failures, the right password is refused too.
    assert _guess(site, name, password, None).startswith("Throttled: 10 failed logins and 0 in")


def _counts(text: str) -> tuple[int, int]:
    words = text.split()
    return int(words[1]), int(words[words.index("and") + 1])


def test_60_concurrent_guesses_from_one_peer_reach_pam_unix_at_most_the_peer_limit(make_broker):
    site = make_broker(
        _throttle_policy(
            user_slow_after=100, user_refuse_after=100, peer_slow_after=10, peer_refuse_after=10
        )
    )
    results = _guess_at_once(site, [(f"nosuch{i}", "guess", None) for i in range(60)])
    reached = guesses(site)
    assert 1 <= len(reached) <= 10, (len(reached), results)
    assert sum(r.startswith("Throttled") for r in results) == 60 - len(reached)


def test_one_address_cannot_lock_out_the_others_with_the_default_throttle(make_broker, unix_user):
    name, password = unix_user
    site = make_broker(TRUST_POLICY)  # the default [throttle]
    attacker = "198.51.100.7"
    results = _guess_at_once(site, [(f"nosuch{i}", "guess", attacker) for i in range(60)])
    reached = guesses(site)
    assert 1 <= len(reached) <= 30, (len(reached), results)  # rhost_refuse_after
    assert all(line.endswith(attacker) for line in reached)
    assert _guess(site, "nosuch-more", "guess", attacker).startswith("Throttled")
    started = time.monotonic()
    assert _guess(site, name, password, "203.0.113.20") == "ok"  # another address
    assert time.monotonic() - started < 1.5  # and not slowed down
    assert site.broker.audit_lines("outcome=refused:throttled", f"address '{attacker}'")


def test_a_detached_login_counts_while_it_waits(make_broker):
    site = make_broker(_throttle_policy(user_slow_after=2, user_refuse_after=2))
    detached = []
    for _ in range(2):
        sock = raw_connect(site.path)
        sock.sendall(start_frame("matrix", "carol"))
        assert read_frame(sock) == {"op": "started"}
        sock.sendall(frame({"op": "call", "phase": "authenticate", "flags": 0}))
        assert read_frame(sock)["op"] == "converse"
        sock.sendall(frame({"op": "detach"}))
        reply = read_frame(sock)
        assert reply is not None and reply["op"] == "detached", reply
        detached.append(sock)
    with pytest.raises(Throttled, match="0 failed logins and 2 in progress"):
        with ScriptedApp("matrix", "carol", answers=["secret"], broker=site.path) as app:
            app.authenticate()
    with ScriptedApp("matrix", "bob", answers=["secret"], broker=site.path) as app:
        app.authenticate()  # another user of the same peer is not held up


# -- 3. fair shares ----------------------------------------------------------------------

SHARE_CLIENT = """\
import json
import pamphlet
path = {path!r}
class Login(pamphlet.PamApplication):
    def conversation(self, messages):
        return ["secret" if m.is_prompt else None for m in messages]
with Login("matrix", "bob", broker=path) as app:
    app.authenticate()
print(json.dumps({{"ok": True}}))
"""


def test_one_uid_of_a_group_rule_cannot_take_the_others_slots(make_broker, source, unix_user):
    name, _ = unix_user
    # Conversations that wait longer than the test takes, however loaded the machine.
    site = make_broker(
        TRUST_POLICY.replace("conversation_timeout = 2", "conversation_timeout = 60")
    )
    holder = Holder("nobody", "nogroup", source, site.path, "matrix", "bob", 4)
    try:
        ops = [r["op"] for r in holder.replies]
        assert ops == ["converse"] * 3 + ["refused"], site.broker.audit_text()
        assert holder.replies[3]["kind"] == "busy"
        assert "this peer has 3 transactions" in holder.replies[3]["message"]
        # Another uid of the same group rule still gets in.
        assert run_as(name, "nogroup", source, SHARE_CLIENT.format(path=site.path)) == {"ok": True}
    finally:
        holder.release()


def test_max_in_flight_total_bounds_the_rule_as_a_whole(make_broker, source, unix_user):
    name, _ = unix_user
    policy = TRUST_POLICY.replace("conversation_timeout = 2", "conversation_timeout = 60")
    site = make_broker(
        policy.replace("max_in_flight = 3\n", "max_in_flight = 3\nmax_in_flight_total = 4\n")
    )
    nobody = Holder("nobody", "nogroup", source, site.path, "matrix", "bob", 3)
    other = Holder(name, "nogroup", source, site.path, "matrix", "bob", 2)
    try:
        assert [r["op"] for r in nobody.replies] == ["converse"] * 3
        assert [r["op"] for r in other.replies] == ["converse", "refused"]
        assert other.replies[1]["kind"] == "busy"
        assert "4 transactions of [[allow]] rule 1" in other.replies[1]["message"]
        assert "max_in_flight_total" in other.replies[1]["message"]
    finally:
        nobody.release()
        other.release()


REFUSED_CLIENT = """\
import json, socket, struct
path = {path!r}
refused = 0
for _ in range(3000):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    refused += b"refused" in sock.recv(4096)
    sock.close()
print(json.dumps({{"refused": refused}}))
"""


def test_3000_refused_connections_write_a_bounded_number_of_audit_lines(
    make_broker, source, unix_user
):
    name, _ = unix_user
    uid = pwd.getpwnam(name).pw_uid
    site = make_broker(TRUST_POLICY)
    result = run_as(name, name, source, REFUSED_CLIENT.format(path=site.path), timeout=120)
    assert result == {"refused": 3000}
    lines = site.broker.audit_lines(f"peer_uid={uid}")
    assert len(lines) == 1 and "outcome=refused:peer" in lines[0]
    assert site.broker.stop() == 0
    (summary,) = site.broker.audit_lines(f"peer_uid={uid}", "event=refusals-summarized")
    assert "more=2999" in summary


# -- 4. SIGHUP -----------------------------------------------------------------------------


def test_sighup_reloads_the_policy_and_running_transactions_keep_their_rule(make_broker):
    site = make_broker(TRUST_POLICY)
    running = ScriptedApp("matrix", "bob", answers=["secret"], broker=site.path)
    running.authenticate()
    site.broker.policy.write_text(
        '[[allow]]\nusers = ["root"]\nservices = ["session"]\n'
        'phases = ["authenticate", "open_session"]\n'
    )
    os.kill(site.broker.pid, signal.SIGHUP)
    assert site.broker.audit_lines("event=reloaded", "rules=1")
    with pytest.raises(ServiceNotAllowed):
        ScriptedApp("matrix", "bob", broker=site.path)
    with ScriptedApp("session", "erin", answers=["secret"], broker=site.path) as app:
        app.authenticate()
        app.open_session()
    running.account_management()  # admitted by the old rule, which allowed it
    running.end()
    # A broken policy keeps the one in force, with an audit line.
    site.broker.policy.write_text("[[allow]\n")
    os.kill(site.broker.pid, signal.SIGHUP)
    (line,) = site.broker.audit_lines("event=reload-failed")
    assert "not valid TOML" in line
    with ScriptedApp("session", "erin", answers=["secret"], broker=site.path) as app:
        app.authenticate()
    assert site.broker.process.poll() is None
    assert site.broker.stop() == 0


def test_a_reload_that_raises_a_limit_keeps_counting_past_the_old_one():
    # The broker's own counter (no libpam in it): after a SIGHUP raised
    # user_refuse_after from 10 to 20, a bucket created under the old policy
    # was capped at 11 entries and never refused again.
    from pamphlet.broker.policy import Throttle
    from pamphlet.broker.throttle import FailureCounter

    counter = FailureCounter(Throttle(user_slow_after=10, user_refuse_after=10))

    def fail(now: float) -> str | None:
        refusal, _, reservation = counter.reserve(None, 65534, "bob", None, now)
        if refusal is not None:
            return refusal
        assert reservation is not None
        counter.settle(reservation, 7, now, "bob")
        return None

    assert [fail(float(t)) for t in range(10)] == [None] * 10
    assert fail(10.0) is not None and fail(10.0).startswith("10 failed logins")
    counter.settings = Throttle(user_slow_after=20, user_refuse_after=20, delay=0)
    assert [fail(float(t)) for t in range(11, 21)] == [None] * 10
    refusal = fail(21.0)
    assert refusal is not None and refusal.startswith("20 failed logins"), refusal
