"""Detach and resume: a transaction left with the broker mid-conversation and
taken up again by another process, with a single-use token.

A real root broker (tests/broker_harness.py), pam_matrix stacks, clients in
this process, in other processes of the same uid, and as ``nobody``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

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
from pamphlet.broker import TokenExpired, TokenInvalid, TokenPeerMismatch, TokenUsed, WorkerDied
from pamphlet.broker.client import BrokerSteps as Stepwise
from pamphlet.constants import Phase

pytestmark = pytest.mark.root

POLICY = """\
[[allow]]
users = ["root"]
groups = ["nogroup"]
services = ["matrix"]

[limits]
detach_timeout = {timeout}
start_timeout = 2
frame_timeout = 2
"""


@pytest.fixture(scope="module")
def confdir() -> Iterator[Any]:
    folder = public_dir("pamphlet-confdir-")
    matrix = pam_wrapper_module("pam_matrix.so")
    passdb = folder / "passdb"
    passdb.write_text("bob:secret:matrix\ncarol:secret:matrix\n")
    passdb.chmod(0o644)
    (folder / "matrix").write_text(
        "".join(
            f"{kind} required {matrix} passdb={passdb} verbose\n"
            for kind in ("auth", "account", "password")
        )
    )
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=True)


@pytest.fixture(scope="module")
def broker(confdir: Any) -> Iterator[Broker]:
    broker = Broker(POLICY.format(timeout=120), str(confdir))
    yield broker
    broker.cleanup()


@pytest.fixture(scope="module")
def source() -> Iterator[Any]:
    path = public_source()
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


def detached_at_password(broker: Broker, user: str = "bob") -> str:
    """A transaction whose authenticate waits at its password prompt, detached."""
    login = Stepwise.start(broker.socket, "matrix", user)
    step = login.call(Phase.AUTHENTICATE)
    assert [str(m) for m in step.prompts] == ["Password: "]
    return login.detach()


RESUME = """\
import json, sys
from pamphlet.broker.client import BrokerSteps as Stepwise
from pamphlet.constants import Phase
try:
    login = Stepwise.resume(sys.argv[1], sys.argv[2])
except Exception as exc:
    print(json.dumps({"refused": type(exc).__name__, "message": str(exc)}))
    raise SystemExit(0)
waiting = [str(m) for m in login.waiting or ()]
step = login.answer([sys.argv[3]])
account = login.call(Phase.ACCT_MGMT).code if step.code == 0 else None
said = [str(m) for m in step.messages]
print(json.dumps({"waiting": waiting, "code": step.code, "said": said,
                  "acct": account, "end": login.end()}))
"""


def resume_elsewhere(broker: Broker, token: str, password: str = "secret") -> dict[str, Any]:
    """Resume in a fresh interpreter (another process, the same uid: root)."""
    proc = subprocess.run(
        [sys.executable, "-c", RESUME, broker.socket, token, password],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_another_process_of_the_same_uid_resumes_the_waiting_call(broker: Broker) -> None:
    token = detached_at_password(broker)
    token_id, _, secret = token.partition(".")
    assert len(bytes.fromhex(token_id)) == 8 and len(secret) >= 43  # 256 random bits
    result = resume_elsewhere(broker, token)
    # The prompt that was waiting is asked again on the new connection; the
    # answer reaches the same handle, whose phase then ends.
    assert result == {
        "waiting": ["Password: "],
        "code": 0,
        "said": ["Authentication succeeded"],
        "acct": 0,
        "end": 0,
    }
    (line,) = broker.audit_lines("user=bob", "phases=authenticate:0,acct_mgmt:0")
    assert "outcome=success" in line
    assert broker.audit_lines("outcome=detached", f"token={token_id}")
    assert broker.audit_lines("outcome=resumed", f"token={token_id}")


def test_a_wrong_password_after_resume_fails_as_it_would_have(broker: Broker) -> None:
    result = resume_elsewhere(broker, detached_at_password(broker, "carol"), "wrong")
    assert result["code"] == 7  # PAM_AUTH_ERR
    assert result["said"] == ["Authentication failed"]


def test_each_detach_issues_a_new_token_good_once(broker: Broker) -> None:
    token1 = detached_at_password(broker)
    login = Stepwise.resume(broker.socket, token1)
    token2 = login.detach()  # still waiting at the password
    assert token2 != token1
    with pytest.raises(TokenUsed):
        Stepwise.resume(broker.socket, token1)
    login = Stepwise.resume(broker.socket, token2)
    assert login.answer(["secret"]).code == 0
    token3 = login.detach()  # between requests: no call waits
    login = Stepwise.resume(broker.socket, token3)
    assert login.waiting is None
    assert login.call(Phase.ACCT_MGMT).code == 0
    assert login.end() == 0
    for used in (token2, token3):
        with pytest.raises(TokenUsed):
            Stepwise.resume(broker.socket, used)
    token_id = token1.partition(".")[0]
    (line,) = broker.audit_lines("outcome=refused:token-used", f"token={token_id}")
    assert 'reason="this token was used already: a token is good once"' in line


def test_a_wrong_or_unknown_token_is_refused_alike(broker: Broker) -> None:
    token = detached_at_password(broker)
    token_id, _, secret = token.partition(".")
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for wrong in (f"{token_id}.{flipped}", f"{'0' * 16}.{secret}", "", "no-dot-at-all"):
        with pytest.raises(TokenInvalid) as caught:
            Stepwise.resume(broker.socket, wrong)
        assert str(caught.value) == "no detached transaction has this token"
    deadline = time.monotonic() + 10
    while len(broker.audit_lines("outcome=refused:token-invalid")) < 4:
        assert time.monotonic() < deadline, broker.audit_text()
        time.sleep(0.02)
    # The guesses did not hurt the transaction: the real token still works.
    assert resume_elsewhere(broker, token)["code"] == 0


def test_another_uid_is_refused_and_the_token_is_burnt(broker: Broker, source: Any) -> None:
    token = detached_at_password(broker)
    result = run_as(
        "nobody",
        "nogroup",
        source,
        f"""\
        import json
        from pamphlet.broker.client import BrokerSteps as Stepwise
        try:
            Stepwise.resume({broker.socket!r}, {token!r})
            print(json.dumps({{"refused": None}}))
        except Exception as exc:
            print(json.dumps({{"refused": type(exc).__name__, "message": str(exc)}}))
        """,
    )
    assert result["refused"] == "TokenPeerMismatch"
    token_id = token.partition(".")[0]
    (line,) = broker.audit_lines("outcome=refused:token-peer", f"token={token_id}")
    assert "peer_uid=65534" in line
    # The secret reached another user: the transaction is over for its owner too.
    with pytest.raises(TokenExpired):
        Stepwise.resume(broker.socket, token)
    (line,) = broker.audit_lines(f"token={token_id}", "outcome=detach-expired")
    assert "peer_uid=0" in line
    assert TokenPeerMismatch.kind == "token-peer"


def test_an_unresumed_transaction_expires_and_its_handle_ends(confdir: Any) -> None:
    short = Broker(POLICY.format(timeout=0.5), str(confdir))
    try:
        token = detached_at_password(short)
        token_id = token.partition(".")[0]
        (line,) = short.audit_lines("outcome=detach-expired", f"token={token_id}")
        # The worker ended the handle: its pending conversation failed, pam_end ran.
        (line,) = short.audit_lines("user=bob", "phases=")
        # (pam_matrix turns the failed conversation into PAM_AUTHINFO_UNAVAIL)
        assert "phases=authenticate:9 outcome=failure" in line
        assert "end=" in line and "detached" in line
        with pytest.raises(TokenExpired) as caught:
            Stepwise.resume(short.socket, token)
        assert "expired" in str(caught.value)
        assert short.audit_lines("outcome=refused:token-expired", f"token={token_id}")
        assert short.wait_for_children(2) == short.children()  # only the spares are left
    finally:
        short.cleanup()


def test_detaching_is_off_when_the_policy_says_zero(confdir: Any) -> None:
    off = Broker(POLICY.format(timeout=0), str(confdir))
    try:
        login = Stepwise.start(off.socket, "matrix", "bob")
        login.call(Phase.AUTHENTICATE)
        with pytest.raises(WorkerDied) as caught:
            login.detach()
        assert "does not allow detaching" in str(caught.value)
        assert off.audit_lines("user=bob", "protocol error")
    finally:
        off.cleanup()


def test_malformed_resume_frames_close_the_connection(broker: Broker) -> None:
    for bad in (
        {"op": "resume", "v": 1, "token": 12},
        {"op": "resume", "v": 1, "token": "x" * 129},
        {"op": "resume", "v": 1, "token": "a.b", "user": "root"},
        {"op": "resume", "v": 99, "token": "a.b"},
        {"op": "resume", "v": 1, "token": "é.b"},
    ):
        sock = raw_connect(broker.socket)
        sock.sendall(frame(bad))
        frames = frames_until_closed(sock)
        sock.close()
        assert [f["op"] for f in frames] == ["error"], bad
    assert broker.audit_lines("outcome=protocol-error")


def test_a_client_that_vanishes_after_detaching_changes_nothing(broker: Broker) -> None:
    """The detached frame is the last thing on the old connection: the worker
    closed it, and a raw client that keeps talking there is talking to nobody."""
    sock = raw_connect(broker.socket)
    sock.sendall(start_frame("matrix", "bob"))
    assert read_frame(sock) == {"op": "started"}
    sock.sendall(frame({"op": "call", "phase": "authenticate", "flags": 0}))
    assert read_frame(sock)["op"] == "converse"  # type: ignore[index]
    sock.sendall(frame({"op": "detach"}))
    detached = read_frame(sock)
    assert detached is not None and detached["op"] == "detached"
    assert detached["timeout"] == 120
    try:
        sock.sendall(frame({"op": "answers", "answers": ["c2VjcmV0"]}))
    except OSError:
        pass
    assert frames_until_closed(sock) == []
    sock.close()
    assert resume_elsewhere(broker, detached["token"])["code"] == 0


def test_a_token_raced_by_eight_resumes_is_taken_once(broker: Broker) -> None:
    # Eight processes present the same token at once: one gets the
    # transaction, every other one is refused; none gets a second copy.
    token = detached_at_password(broker)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RESUME, broker.socket, token, "secret"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    results = [
        json.loads(proc.communicate(timeout=60)[0].strip().splitlines()[-1]) for proc in procs
    ]
    resumed = [result for result in results if "refused" not in result]
    assert len(resumed) == 1, results
    assert resumed[0]["code"] == 0 and resumed[0]["acct"] == 0
    assert {result["refused"] for result in results if "refused" in result} <= {
        "TokenUsed",
        "TokenInvalid",
    }
