"""The broker's client checks who listens at the path before it says anything.

A "broker" run by an ordinary user (``nobody``, through setpriv) at the path
answers every request with success, as a liar would. The client must refuse
it before sending a byte: ``pamphlet.authenticate`` raises BrokerNotTrusted
naming the uid, the CLI exits non-zero, the stepwise login refuses too. With
``broker_uid`` naming that uid, the same liar is believed, which shows that
the refusal is the check's doing.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

import pamphlet
from broker_harness import SRC, SYSTEM_PYTHON, as_user, public_dir
from pamphlet.broker import BrokerError, BrokerNotTrusted
from pamphlet.broker.client import BrokerSteps
from pamphlet.constants import Phase

pytestmark = pytest.mark.root

NOBODY = 65534

# Speaks just enough of the protocol to say yes to everything, and prints,
# per connection, how many bytes the client sent it.
LIAR = r"""
import json, os, socket, struct, sys
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o666)
server.listen(16)
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    conn.settimeout(2)
    received = 0
    try:
        while True:
            header = conn.recv(4)
            if len(header) < 4:
                break
            (length,) = struct.unpack(">I", header)
            body = b""
            while len(body) < length:
                chunk = conn.recv(length - len(body))
                if not chunk:
                    break
                body += chunk
            received += 4 + len(body)
            op = json.loads(body).get("op")
            reply = {"op": "result", "code": 0, "value": [] if op == "getenvlist" else None}
            if op == "start":
                reply = {"op": "started"}
            data = json.dumps(reply).encode()
            conn.sendall(struct.pack(">I", len(data)) + data)
            if op == "end":
                break
    except OSError:
        pass
    conn.close()
    print(json.dumps({"received": received}), flush=True)
"""


class Liar:
    def __init__(self) -> None:
        self.directory = public_dir("pamphlet-liar-")
        os.chown(self.directory, NOBODY, NOBODY)
        self.socket = str(self.directory / "broker.sock")
        self.process = subprocess.Popen(
            as_user("nobody", "nogroup", SYSTEM_PYTHON, "-c", LIAR, self.socket),
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "listening"

    def received(self) -> int:
        """The bytes the last connection carried to the liar."""
        assert self.process.stdout is not None
        return int(json.loads(self.process.stdout.readline())["received"])

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        subprocess.run(["rm", "-rf", str(self.directory)], check=True)


@pytest.fixture
def liar() -> Iterator[Liar]:
    made = Liar()
    yield made
    made.stop()


def test_authenticate_refuses_a_broker_run_by_an_ordinary_user(
    liar: Liar, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "pamphlet.broker.client"):
        with pytest.raises(BrokerNotTrusted) as caught:
            pamphlet.authenticate("root", "wrong", broker=liar.socket)
    assert caught.value.uid == NOBODY
    assert f"uid {NOBODY}" in str(caught.value) and liar.socket in str(caught.value)
    assert isinstance(caught.value, BrokerError)
    assert liar.received() == 0  # not even the user name reached it
    (record,) = [r for r in caplog.records if "refused the broker socket" in r.getMessage()]
    assert f"uid {NOBODY}" in record.getMessage()


def test_every_way_in_refuses_it(liar: Liar) -> None:
    with pytest.raises(BrokerNotTrusted):
        pamphlet.change_password("root", "old", "new", broker=liar.socket)
    assert liar.received() == 0
    with pytest.raises(BrokerNotTrusted):
        pamphlet.PamApplication("login", "root", broker=liar.socket)
    assert liar.received() == 0
    with pytest.raises(BrokerNotTrusted):
        BrokerSteps.start(liar.socket, "login", "root")
    assert liar.received() == 0
    with pytest.raises(BrokerNotTrusted):
        BrokerSteps.resume(liar.socket, "0000000000000000.secret")
    assert liar.received() == 0
    # A trusted uid other than this one does not cover it either.
    with pytest.raises(BrokerNotTrusted):
        pamphlet.authenticate("root", "wrong", broker=liar.socket, broker_uid=NOBODY - 1)
    assert liar.received() == 0


def cli(*arguments: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pamphlet", *arguments],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(SRC)),
    )


def test_the_cli_exits_non_zero(liar: Liar) -> None:
    proc = cli(
        "--broker", liar.socket, "login", "root", "authenticate", "acct_mgmt", stdin="wrong\n"
    )
    assert proc.returncode == 1, proc
    assert "BrokerNotTrusted" in proc.stderr and f"uid {NOBODY}" in proc.stderr
    assert "successfully" not in proc.stdout + proc.stderr
    assert liar.received() == 0


def test_broker_uid_names_a_broker_that_is_not_root(liar: Liar) -> None:
    # Told to trust nobody's broker, the client talks to it -- and the liar's
    # "success" comes through: this is what the check keeps out by default.
    pamphlet.authenticate("root", "wrong", broker=liar.socket, broker_uid=NOBODY)
    assert liar.received() > 0
    steps = BrokerSteps.start(liar.socket, "login", "root", broker_uid=NOBODY)
    assert steps.call(Phase.AUTHENTICATE).code == 0
    steps.end()
    assert liar.received() > 0
    proc = cli(
        "--broker", liar.socket, "--broker-uid", str(NOBODY), "login", "root", "authenticate"
    )
    assert proc.returncode == 0, proc
    assert liar.received() > 0


def test_a_root_broker_is_trusted_without_broker_uid(tmp_path: pathlib.Path) -> None:
    # The real broker (root) is trusted as before: a refusal by its policy,
    # not by the client's check.
    from broker_harness import Broker

    broker = Broker(
        textwrap.dedent(
            """\
            [[allow]]
            users = ["nobody"]
            services = ["login"]
            """
        ),
        None,
    )
    try:
        with pytest.raises(pamphlet.broker.PeerNotAllowed):
            pamphlet.authenticate("root", "wrong", broker=broker.socket)
    finally:
        broker.cleanup()
