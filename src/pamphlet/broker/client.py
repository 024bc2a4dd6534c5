"""The client side: a Transport that carries a transaction to the broker.

``start(path, service, user, conversant)`` connects to the broker's socket,
asks for one transaction and returns a :class:`BrokerTransport`. The flavours
(PamApplication and the others, with ``broker=PATH``) use it exactly as they
use libpam in their own process: each Transport call becomes one request
frame and one reply. While a phase runs, the broker's worker sends the PAM
stack's conversation calls; each is answered by ``conversant.converse`` (the
application's own ``conversation``), and a conversation that raises is
reported to the worker, whose libpam then gets PAM_CONV_ERR.

Refusals by the broker raise :mod:`pamphlet.broker.errors` classes; PAM's
own results come back as return codes, which the transaction turns into the
usual PamError subclasses.
"""

from __future__ import annotations

import socket
import weakref
from typing import TYPE_CHECKING, Any

from .. import _libpam, conversation
from ..constants import PAM_MAX_NUM_MSG, Phase
from ..errors import pam_error
from . import protocol
from .errors import (
    BrokerError,
    BrokerProtocolError,
    BrokerUnavailable,
    WorkerDied,
    refusal,
)
from .protocol import MAX_REPLY_FRAME, ProtocolViolation, b64

if TYPE_CHECKING:
    from .._transaction import Conversant

__all__ = ["start", "BrokerTransport"]

#: Seconds a reply frame may take once its first byte arrived.
FRAME_TIMEOUT = 30.0


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise BrokerUnavailable(f"no pamphlet broker listens on {path}: {exc.strerror}") from exc
    except PermissionError as exc:
        sock.close()
        raise BrokerUnavailable(
            f"this process may not connect to the broker's socket {path}: {exc.strerror} "
            "(see --socket-mode and --socket-group)"
        ) from exc
    except OSError as exc:
        sock.close()
        raise BrokerUnavailable(f"cannot connect to the broker at {path}: {exc}") from exc
    return sock


def start(path: str, service: bytes, user: bytes | None, conversant: Conversant) -> BrokerTransport:
    """One transaction through the broker at ``path``.

    Raises a BrokerRefused subclass when the policy says no, the PamError of
    pam_start's code when the broker's libpam could not start, and
    BrokerUnavailable when nothing listens.
    """
    sock = _connect(path)
    transport = BrokerTransport(sock, conversant)
    try:
        reply = transport._exchange(
            {"op": "start", "v": protocol.VERSION, "service": b64(service), "user": b64(user)}
        )
        op = reply.get("op")
        if op == "start_failed":
            code = reply.get("code")
            code = code if type(code) is int else 4  # PAM_SYSTEM_ERR
            raise pam_error(code, f"pam_start failed: {transport.strerror(code)}")
        if op != "started":
            raise BrokerProtocolError(f"the broker answered the start frame with {op!r}")
    except BaseException:
        transport._close()
        raise
    return transport


class BrokerTransport:
    """A transaction's Transport over a connection to the broker."""

    def __init__(self, sock: socket.socket, conversant: Conversant) -> None:
        self._sock: socket.socket | None = sock
        self._conversant = weakref.ref(conversant)
        self._encoding = conversant.encoding

    # -- frames --------------------------------------------------------------------

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _exchange(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request; answer conversation calls until its reply comes."""
        sock = self._sock
        if sock is None:
            raise WorkerDied("this transaction's connection to the broker is closed")
        try:
            try:
                protocol.send_frame(sock, request)
            except (BrokenPipeError, ConnectionResetError):
                # The broker may have refused this peer and closed before
                # reading: its refusal is still there to read.
                pass
            while True:
                frame = protocol.recv_frame(
                    sock, max_size=MAX_REPLY_FRAME, wait=None, frame_timeout=FRAME_TIMEOUT
                )
                op = frame.get("op")
                if op == "converse":
                    protocol.send_frame(sock, self._converse(frame))
                    continue
                if op == "refused":
                    raise refusal(frame.get("kind"), frame.get("message"))
                if op == "error":
                    self._close()
                    raise WorkerDied(f"the broker ended this transaction: {frame.get('message')}")
                return frame
        except protocol.PeerGone as exc:
            self._close()
            raise WorkerDied(
                "the broker's worker for this transaction ended without an answer "
                "(a PAM module crashed, or the broker stopped)"
            ) from exc
        except ProtocolViolation as exc:
            self._close()
            raise BrokerProtocolError(f"the broker sent something unreadable: {exc}") from exc
        except (BrokenPipeError, ConnectionResetError) as exc:
            self._close()
            raise WorkerDied(f"the connection to the broker broke: {exc}") from exc

    def _converse(self, frame: dict[str, Any]) -> dict[str, Any]:
        raw = frame.get("messages")
        if not isinstance(raw, list) or not 1 <= len(raw) <= PAM_MAX_NUM_MSG:
            raise ProtocolViolation("a conversation frame without 1 to 32 messages")
        pairs = []
        for entry in raw:
            if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int):
                raise ProtocolViolation("a malformed conversation message")
            text = protocol.unb64(entry[1], "a message", MAX_REPLY_FRAME, nul_ok=False)
            pairs.append((entry[0], text or b""))
        conversant = self._conversant()
        if conversant is None:
            return {"op": "conv_error"}
        try:
            messages = conversation.make_messages(pairs, self._encoding)
            answers = conversant.converse(messages)
            if len(answers) != len(messages):
                raise ValueError("one answer per message is needed")
            for answer in answers:
                if answer is not None and len(answer) > protocol.PAM_MAX_RESP_SIZE:
                    raise ValueError(
                        f"an answer of {len(answer)} bytes is over PAM_MAX_RESP_SIZE "
                        f"({protocol.PAM_MAX_RESP_SIZE}), which the broker does not pass on"
                    )
        except BaseException as exc:
            conversant.fail(exc)
            return {"op": "conv_error"}
        return {"op": "answers", "answers": [b64(a) for a in answers]}

    def _result(self, request: dict[str, Any]) -> dict[str, Any]:
        reply = self._exchange(request)
        if reply.get("op") != "result":
            self._close()
            raise BrokerProtocolError(
                f"the broker answered {request['op']} with {reply.get('op')!r}"
            )
        return reply

    def _code(self, request: dict[str, Any]) -> int:
        code = self._result(request).get("code")
        if type(code) is not int:
            self._close()
            raise BrokerProtocolError("the broker's reply has no return code")
        return code

    def _value(self, reply: dict[str, Any]) -> bytes | None:
        try:
            return protocol.unb64(reply.get("value"), "a value", MAX_REPLY_FRAME)
        except ProtocolViolation as exc:
            self._close()
            raise BrokerProtocolError(str(exc)) from exc

    # -- the Transport ---------------------------------------------------------------

    def call(self, phase: Phase, flags: int) -> int:
        reply = self._result({"op": "call", "phase": phase.value, "flags": int(flags)})
        code = reply.get("code")
        if type(code) is not int:
            self._close()
            raise BrokerProtocolError("the broker's reply has no return code")
        delays = reply.get("fail_delay") or []
        conversant = self._conversant()
        if conversant is not None and isinstance(delays, list):
            for delay in delays:
                if isinstance(delay, list) and len(delay) == 2:
                    try:
                        conversant.fail_delay(int(delay[0]), int(delay[1]))
                    except BaseException as exc:
                        conversant.fail(exc)
        return code

    def get_user(self, prompt: bytes | None) -> tuple[int, bytes | None]:
        reply = self._result({"op": "get_user", "prompt": b64(prompt)})
        code = reply.get("code")
        return (code if type(code) is int else 4), self._value(reply)

    def get_item(self, item: int) -> tuple[int, bytes | None]:
        reply = self._result({"op": "get_item", "item": int(item)})
        code = reply.get("code")
        return (code if type(code) is int else 4), self._value(reply)

    def set_item(self, item: int, value: bytes | None) -> int:
        return self._code({"op": "set_item", "item": int(item), "value": b64(value)})

    def get_xauthdata(self) -> tuple[int, tuple[bytes, bytes] | None]:
        reply = self._result({"op": "get_xauthdata"})
        code = reply.get("code")
        value = reply.get("value")
        if value is None:
            return (code if type(code) is int else 4), None
        if not isinstance(value, list) or len(value) != 2:
            raise BrokerProtocolError("a malformed xauthdata reply")
        name = protocol.unb64(value[0], "a name", MAX_REPLY_FRAME, nul_ok=True) or b""
        data = protocol.unb64(value[1], "data", MAX_REPLY_FRAME, nul_ok=True) or b""
        return (code if type(code) is int else 4), (name, data)

    def set_xauthdata(self, value: tuple[bytes, bytes] | None) -> int:
        request: dict[str, Any] = {"op": "set_xauthdata"}
        if value is not None:
            request["name"], request["data"] = b64(value[0]), b64(value[1])
        return self._code(request)

    def set_fail_delay(self, enabled: bool) -> int:
        return self._code({"op": "set_fail_delay", "enabled": bool(enabled)})

    def getenv(self, name: bytes) -> bytes | None:
        return self._value(self._result({"op": "getenv", "name": b64(name)}))

    def putenv(self, entry: bytes) -> int:
        return self._code({"op": "putenv", "entry": b64(entry)})

    def getenvlist(self) -> list[bytes] | None:
        value = self._result({"op": "getenvlist"}).get("value")
        if value is None:
            return None
        if not isinstance(value, list):
            raise BrokerProtocolError("a malformed environment reply")
        entries = []
        for entry in value:
            raw = protocol.unb64(entry, "an environment entry", MAX_REPLY_FRAME)
            if raw is not None:
                entries.append(raw)
        return entries

    def strerror(self, code: int) -> str:
        # pam_strerror is the same table in the broker's libpam and ours.
        return _libpam.strerror(_libpam.NULL_HANDLE, code)

    def end(self, status: int) -> int:
        if self._sock is None:
            return 0  # the worker is gone, and its handle with it
        try:
            return self._code({"op": "end", "status": int(status) & 0xFF})
        except BrokerError:
            return 0
        finally:
            self._close()

    def __del__(self) -> None:
        sock = self._sock
        if sock is not None:
            sock.close()  # the worker sees the disconnect and ends the handle
