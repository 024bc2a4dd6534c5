"""The client side of the broker's wire protocol: the one implementation of it.

``start(path, service, user, conversant)`` connects to the broker's socket,
asks for one transaction and returns a :class:`BrokerTransport`. The flavours
(PamApplication and the others, with ``broker=PATH``) use it exactly as they
use libpam in their own process: each Transport call becomes one request
frame and one reply. While a phase runs, the broker's worker sends the PAM
stack's conversation calls; each is answered by ``conversant.converse`` (the
application's own ``conversation``), and a conversation that raises is
reported to the worker, whose libpam then gets PAM_CONV_ERR.

:class:`BrokerSteps` speaks the same frames one step at a time, for a login
whose answers come in later requests (the stepwise login of
:mod:`pamphlet.stepwise`): a phase call returns at its first prompt, the
transaction can be *detached* (left with the broker) and *resumed* with the
token, in any process of the same uid. Both classes share :class:`_Connection`:
the framing, the refusals, the decoding of the stack's messages.

Before a byte is sent, the process listening on the socket must be the
broker: its uid (``SO_PEERCRED``) must be 0, or the ``broker_uid`` given.
Anything else raises :class:`~pamphlet.broker.BrokerNotTrusted`.

Refusals by the broker raise :mod:`pamphlet.broker.errors` classes; PAM's
own results come back as return codes, which the transaction turns into the
usual PamError subclasses.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import _libpam, conversation
from ..constants import PAM_MAX_NUM_MSG, Item, Phase
from ..errors import pam_error
from ..message import Message
from . import protocol
from .errors import (
    BrokerError,
    BrokerNotTrusted,
    BrokerProtocolError,
    BrokerUnavailable,
    WorkerDied,
    refusal,
)
from .protocol import MAX_REPLY_FRAME, ProtocolViolation, b64

if TYPE_CHECKING:
    from .._transaction import Conversant

__all__ = ["start", "connect", "BrokerTransport", "BrokerSteps", "Progress"]

log = logging.getLogger("pamphlet.broker.client")

#: Seconds a reply frame may take once its first byte arrived.
FRAME_TIMEOUT = 30.0

#: Refusals after which the transaction goes on (a request was refused, not
#: the connection); any other refusal comes at the door, and the broker closes.
_REFUSALS_IN_A_TRANSACTION = frozenset({"phase", "item", "environ", "throttled"})


def connect(path: str, *, broker_uid: int | None = None) -> socket.socket:
    """A connection to the broker at ``path``, its listener's identity checked.

    The process that listens must run as root, or as ``broker_uid`` (for
    tests and containers whose broker is not root). The check comes before
    anything is sent: a listener of anyone else never sees a user name.
    """
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
    try:
        pid, uid, _gid = protocol.peer_credentials(sock)
    except OSError as exc:
        sock.close()
        raise BrokerNotTrusted(path, None, None, f"its credentials cannot be read: {exc}") from exc
    if uid != 0 and uid != broker_uid:
        sock.close()
        expected = "root" if broker_uid is None else f"root or uid {broker_uid} (broker_uid)"
        refused = BrokerNotTrusted(path, uid, pid, f"it runs as uid {uid}, not {expected}")
        # A security refusal: the line names what was found, for the admin.
        log.warning(
            "refused the broker socket %s: the listener (pid %d) runs as uid %d, expected %s",
            path,
            pid,
            uid,
            expected,
        )
        raise refused
    return sock


def start(
    path: str,
    service: bytes,
    user: bytes | None,
    conversant: Conversant,
    *,
    broker_uid: int | None = None,
) -> BrokerTransport:
    """One transaction through the broker at ``path``.

    Raises a BrokerRefused subclass when the policy says no, the PamError of
    pam_start's code when the broker's libpam could not start,
    BrokerUnavailable when nothing listens, BrokerNotTrusted when what
    listens is not the broker (see :func:`connect`).
    """
    transport = BrokerTransport(connect(path, broker_uid=broker_uid), conversant)
    try:
        transport._open(service, user)
    except BaseException:
        transport._close()
        raise
    return transport


class _Connection:
    """One connection to the broker: frames, refusals, the stack's messages."""

    def __init__(self, sock: socket.socket, encoding: str) -> None:
        self._sock: socket.socket | None = sock
        self._encoding = encoding

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _send(self, request: dict[str, Any]) -> None:
        sock = self._sock
        if sock is None:
            raise WorkerDied("this transaction's connection to the broker is closed")
        try:
            protocol.send_frame(sock, request)
        except (BrokenPipeError, ConnectionResetError):
            # The broker may have refused this peer and closed before
            # reading: its refusal is still there to read.
            pass

    def _read(self) -> dict[str, Any]:
        sock = self._sock
        if sock is None:
            raise WorkerDied("this transaction's connection to the broker is closed")
        try:
            frame = protocol.recv_frame(
                sock, max_size=MAX_REPLY_FRAME, wait=None, frame_timeout=FRAME_TIMEOUT
            )
        except protocol.PeerGone as exc:
            self._close()
            raise WorkerDied(
                "the broker's worker for this transaction ended without an answer "
                "(a PAM module crashed, or the broker stopped)"
            ) from exc
        except ProtocolViolation as exc:
            self._close()
            raise BrokerProtocolError(f"the broker sent something unreadable: {exc}") from exc
        except OSError as exc:
            self._close()
            raise WorkerDied(f"the connection to the broker broke: {exc}") from exc
        op = frame.get("op")
        if op == "refused":
            if frame.get("kind") not in _REFUSALS_IN_A_TRANSACTION:
                self._close()
            raise refusal(frame.get("kind"), frame.get("message"))
        if op == "error":
            self._close()
            raise WorkerDied(f"the broker ended this transaction: {frame.get('message')}")
        return frame

    def _open(self, service: bytes, user: bytes | None) -> None:
        self._send(
            {"op": "start", "v": protocol.VERSION, "service": b64(service), "user": b64(user)}
        )
        reply = self._reply()
        op = reply.get("op")
        if op == "start_failed":
            code = reply.get("code")
            code = code if type(code) is int else 4  # PAM_SYSTEM_ERR
            raise pam_error(code, f"pam_start failed: {strerror(code)}")
        if op != "started":
            raise BrokerProtocolError(f"the broker answered the start frame with {op!r}")

    def _reply(self) -> dict[str, Any]:
        """The next frame that is not a conversation call (subclasses answer those)."""
        return self._read()

    @staticmethod
    def _pairs(frame: dict[str, Any]) -> list[tuple[int, bytes]]:
        """A conversation frame's (style, text) pairs; anything else is a ProtocolViolation."""
        raw = frame.get("messages")
        if not isinstance(raw, list) or not 1 <= len(raw) <= PAM_MAX_NUM_MSG:
            raise ProtocolViolation("a conversation frame without 1 to 32 messages")
        pairs = []
        for entry in raw:
            if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int):
                raise ProtocolViolation("a malformed conversation message")
            text = protocol.unb64(entry[1], "a message", MAX_REPLY_FRAME, nul_ok=False)
            pairs.append((entry[0], text or b""))
        return pairs

    def _encode_answer(self, answer: str | bytes | None) -> str | None:
        if answer is None:
            return None
        raw = (
            answer
            if isinstance(answer, bytes)
            else answer.encode(self._encoding, "surrogateescape")
        )
        if len(raw) > protocol.PAM_MAX_RESP_SIZE:
            raise ValueError(
                f"an answer of {len(raw)} bytes is over PAM_MAX_RESP_SIZE "
                f"({protocol.PAM_MAX_RESP_SIZE}), which the broker does not pass on"
            )
        if 0 in raw:
            raise ValueError("an answer contains a NUL byte")
        return b64(raw)

    def _result(self, request: dict[str, Any]) -> dict[str, Any]:
        self._send(request)
        reply = self._reply()
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

    def strerror(self, code: int) -> str:
        return strerror(code)

    def __del__(self) -> None:
        sock = self._sock
        if sock is not None:
            sock.close()  # the worker sees the disconnect and ends the handle


def strerror(code: int) -> str:
    # pam_strerror is the same table in the broker's libpam and ours.
    return _libpam.strerror(_libpam.NULL_HANDLE, code)


class BrokerTransport(_Connection):
    """A transaction's Transport over a connection to the broker."""

    def __init__(self, sock: socket.socket, conversant: Conversant) -> None:
        super().__init__(sock, conversant.encoding)
        self._conversant = weakref.ref(conversant)

    def _reply(self) -> dict[str, Any]:
        """Answer conversation calls until the reply comes."""
        try:
            while True:
                frame = self._read()
                if frame.get("op") != "converse":
                    return frame
                self._send(self._converse(frame))
        except ProtocolViolation as exc:
            self._close()
            raise BrokerProtocolError(f"the broker sent something unreadable: {exc}") from exc

    def _converse(self, frame: dict[str, Any]) -> dict[str, Any]:
        pairs = self._pairs(frame)  # unreadable: a ProtocolViolation, the connection ends
        conversant = self._conversant()
        if conversant is None:
            return {"op": "conv_error"}
        try:
            messages = conversation.make_messages(pairs, self._encoding)
            answers = conversant.converse(messages)
            if len(answers) != len(messages):
                raise ValueError("one answer per message is needed")
            encoded = [self._encode_answer(answer) for answer in answers]
        except BaseException as exc:
            conversant.fail(exc)
            return {"op": "conv_error"}
        return {"op": "answers", "answers": encoded}

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

    def end(self, status: int) -> int:
        if self._sock is None:
            return 0  # the worker is gone, and its handle with it
        try:
            return self._code({"op": "end", "status": int(status) & 0xFF})
        except BrokerError:
            return 0
        finally:
            self._close()


@dataclasses.dataclass(frozen=True)
class Progress:
    """How far a phase got, in step mode.

    ``messages``: everything the stack said since the previous step, in
    order (info and error messages, then the waiting call's own messages).
    ``waiting``: the messages of the conversation call that waits for
    answers (at least one prompt), or None when the phase is over, with
    ``code`` its PAM return code.
    """

    messages: tuple[Message, ...]
    waiting: tuple[Message, ...] | None
    code: int | None

    @property
    def prompts(self) -> tuple[Message, ...]:
        return tuple(m for m in self.waiting or () if m.is_prompt)


class BrokerSteps(_Connection):
    """One broker transaction, a step at a time, that another process can resume.

    A phase call returns a :class:`Progress`: the phase's return code, or the
    messages of a conversation call that waits for answers. Info and error
    messages that need no answer are answered (with nothing) as they come
    and handed over with the next step. Between steps :meth:`detach` leaves
    the transaction with the broker; :meth:`resume` takes it up again, once,
    in any process of the same uid, before the broker's ``detach_timeout``.
    See "Detach and resume" in docs/guide/protocol.md.
    """

    def __init__(self, path: str, sock: socket.socket, encoding: str) -> None:
        super().__init__(sock, encoding)
        self.path = path
        self.encoding = encoding
        self._waiting: tuple[Message, ...] | None = None
        #: Seconds the detached transaction waits for its resume (the broker's
        #: policy), once :meth:`detach` has told.
        self.detach_timeout: float | None = None

    @classmethod
    def start(
        cls,
        path: str,
        service: str,
        user: str | None,
        *,
        encoding: str = "utf-8",
        broker_uid: int | None = None,
    ) -> BrokerSteps:
        """Start a transaction at the broker on ``path`` (raises what :func:`start` raises)."""
        raw_service = _encode(service, encoding, "service name")
        raw_user = None if user is None else _encode(user, encoding, "user name")
        self = cls(path, connect(path, broker_uid=broker_uid), encoding)
        try:
            self._open(raw_service, raw_user)
        except BaseException:
            self._close()
            raise
        return self

    @classmethod
    def resume(
        cls, path: str, token: str, *, encoding: str = "utf-8", broker_uid: int | None = None
    ) -> BrokerSteps:
        """Take up a detached transaction; raises a ResumeRefused subclass
        (TokenInvalid, TokenExpired, TokenUsed, TokenPeerMismatch) when the
        broker will not. ``waiting`` is the conversation call that waits, if any."""
        self = cls(path, connect(path, broker_uid=broker_uid), encoding)
        try:
            self._send({"op": "resume", "v": protocol.VERSION, "token": token})
            reply = self._read()
            if reply.get("op") != "resumed":
                raise BrokerProtocolError(f"the broker answered resume with {reply.get('op')!r}")
            if reply.get("pending") == "converse":
                frame = self._read()
                if frame.get("op") != "converse":
                    raise BrokerProtocolError("a resumed call did not ask its question again")
                self._waiting = self._checked_messages(frame)
        except BaseException:
            self._close()
            raise
        return self

    def close(self) -> None:
        """Drop the connection (the worker then ends the transaction as ``end`` would)."""
        self._close()

    @property
    def waiting(self) -> tuple[Message, ...] | None:
        """The messages of the conversation call that waits for answers, if one does."""
        return self._waiting

    def _checked_messages(self, frame: dict[str, Any]) -> tuple[Message, ...]:
        try:
            pairs = self._pairs(frame)
        except ProtocolViolation as exc:
            self._close()
            raise BrokerProtocolError(str(exc)) from exc
        try:
            return tuple(conversation.make_messages(pairs, self._encoding))
        except Exception as exc:
            # A style nobody can answer (a binary prompt): the call fails.
            self._send({"op": "conv_error"})
            raise BrokerProtocolError(str(exc)) from exc

    def _progress(self, request: dict[str, Any]) -> Progress:
        """Send ``request``; read on to a call that waits for a prompt's answer, or a result."""
        said: list[Message] = []
        self._send(request)
        while True:
            frame = self._read()
            op = frame.get("op")
            if op == "converse":
                messages = self._checked_messages(frame)
                said.extend(messages)
                if any(m.is_prompt for m in messages):
                    self._waiting = messages
                    return Progress(tuple(said), messages, None)
                self._send({"op": "answers", "answers": [None] * len(messages)})
                continue
            if op == "result" and type(frame.get("code")) is int:
                self._waiting = None
                return Progress(tuple(said), None, frame["code"])
            self._close()
            raise BrokerProtocolError(f"the broker sent {op!r} where a result was due")

    def call(self, phase: Phase, flags: int = 0) -> Progress:
        """Run a phase up to its first prompt, or to its end."""
        if self._waiting is not None:
            raise RuntimeError("a conversation call waits for answers; answer() it first")
        return self._progress({"op": "call", "phase": phase.value, "flags": int(flags)})

    def answer(self, answers: Sequence[str | None]) -> Progress:
        """Answer the waiting call: one answer per prompt, in order (the info
        and error messages among them get none). Runs on to the next step."""
        waiting = self._waiting
        if waiting is None:
            raise RuntimeError("no conversation call waits for answers")
        prompts = [m for m in waiting if m.is_prompt]
        if len(answers) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts wait, {len(answers)} answers were given")
        given = iter(answers)
        encoded = [self._encode_answer(next(given) or "") if m.is_prompt else None for m in waiting]
        self._waiting = None
        return self._progress({"op": "answers", "answers": encoded})

    def cancel(self) -> Progress:
        """Fail the waiting call (the stack gets PAM_CONV_ERR); runs on to the result."""
        if self._waiting is None:
            raise RuntimeError("no conversation call waits for answers")
        self._waiting = None
        return self._progress({"op": "conv_error"})

    def set_item(self, item: Item, value: str | None) -> int:
        raw = None if value is None else _encode(value, self.encoding, "item")
        return self._code({"op": "set_item", "item": int(item), "value": b64(raw)})

    def get_item(self, item: Item) -> str | None:
        reply = self._result({"op": "get_item", "item": int(item)})
        if reply.get("code") != 0:
            return None
        raw = self._value(reply)
        return None if raw is None else raw.decode(self.encoding, "surrogateescape")

    def detach(self) -> str:
        """Leave the transaction (and a waiting call) with the broker; the token resumes it.

        The token is a secret: keep it on the server (a session store), never
        in the browser. This object is closed afterwards.
        """
        self._send({"op": "detach"})
        reply = self._read()
        token = reply.get("token")
        if reply.get("op") != "detached" or not isinstance(token, str):
            self._close()
            raise BrokerProtocolError(f"the broker answered detach with {reply.get('op')!r}")
        timeout = reply.get("timeout")
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            self.detach_timeout = float(timeout)
        self._close()
        return token

    def end(self, status: int = 0) -> int:
        """pam_end in the worker; the worker exits. Ending twice does nothing."""
        if self._sock is None:
            return 0
        try:
            if self._waiting is not None:
                self.cancel()
            return self._code({"op": "end", "status": int(status) & 0xFF})
        except BrokerError:
            return 0
        finally:
            self._close()


def _encode(value: str, encoding: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"the {what} must be str, not {type(value).__name__}")
    raw = value.encode(encoding, "surrogateescape")
    if 0 in raw:
        raise ValueError(f"the {what} contains a NUL byte")
    return raw
