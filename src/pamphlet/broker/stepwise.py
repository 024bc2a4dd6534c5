"""A broker transaction driven one step at a time, that another process can resume.

The flavours answer the conversation from a callback, inside the phase. A
web login cannot: each prompt is a page, each answer a new request, and the
next request may reach another process of the server. :class:`Stepwise`
speaks the broker protocol directly. A phase call returns a :class:`Step`:
either the phase's return code, or the messages of a conversation call that
waits for answers. Between steps the client may :meth:`~Stepwise.detach`:
the broker's worker keeps the handle and the waiting conversation call, and
the returned token lets :meth:`Stepwise.resume` (in any process of the same
user) take the transaction up again, once, before the broker's
``detach_timeout``. See "Detach and resume" in docs/guide/protocol.md.

Info and error messages that need no answer are answered (with nothing) as
they come and handed over with the next step, so a step that waits always
waits for at least one prompt.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Sequence
from typing import Any

from .. import _libpam, conversation
from ..constants import PAM_MAX_NUM_MSG, PAM_MAX_RESP_SIZE, Item, Phase
from ..errors import pam_error
from ..message import Message
from . import protocol
from .client import FRAME_TIMEOUT, _connect
from .errors import BrokerProtocolError, WorkerDied, refusal
from .protocol import MAX_REPLY_FRAME, ProtocolViolation, b64

__all__ = ["Step", "Stepwise"]


@dataclasses.dataclass(frozen=True)
class Step:
    """What a phase did so far.

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


class Stepwise:
    """One broker transaction, a step at a time (see the module's text)."""

    def __init__(self, path: str, sock: socket.socket, encoding: str) -> None:
        self.path = path
        self.encoding = encoding
        self._sock: socket.socket | None = sock
        self._waiting: tuple[Message, ...] | None = None
        #: Seconds the detached transaction waits for its resume (the broker's
        #: policy), once :meth:`detach` has told.
        self.detach_timeout: float | None = None

    # -- starting and resuming -------------------------------------------------------

    @classmethod
    def start(
        cls, path: str, service: str, user: str | None, *, encoding: str = "utf-8"
    ) -> Stepwise:
        """Start a transaction at the broker on ``path``.

        Raises what :func:`pamphlet.broker.client.start` raises: a
        BrokerRefused subclass, BrokerUnavailable, the PamError of pam_start.
        """
        sock = _connect(path)
        self = cls(path, sock, encoding)
        try:
            raw_user = None if user is None else _encode(user, encoding, "user name")
            reply = self._exchange(
                {
                    "op": "start",
                    "v": protocol.VERSION,
                    "service": b64(_encode(service, encoding, "service name")),
                    "user": b64(raw_user),
                }
            )
            if reply.get("op") == "start_failed":
                code = reply.get("code")
                code = code if type(code) is int else 4
                raise pam_error(code, f"pam_start failed: {_strerror(code)}")
            if reply.get("op") != "started":
                raise BrokerProtocolError(f"the broker answered start with {reply.get('op')!r}")
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def resume(cls, path: str, token: str, *, encoding: str = "utf-8") -> Stepwise:
        """Take up a detached transaction; raises a ResumeRefused subclass
        (TokenInvalid, TokenExpired, TokenUsed, TokenPeerMismatch) when the
        broker will not. ``waiting`` is the conversation call that waits, if any."""
        sock = _connect(path)
        self = cls(path, sock, encoding)
        try:
            reply = self._exchange({"op": "resume", "v": protocol.VERSION, "token": token})
            if reply.get("op") != "resumed":
                raise BrokerProtocolError(f"the broker answered resume with {reply.get('op')!r}")
            if reply.get("pending") == "converse":
                frame = self._read()
                if frame.get("op") != "converse":
                    raise BrokerProtocolError("a resumed call did not ask its question again")
                self._waiting = self._messages(frame)
        except BaseException:
            self.close()
            raise
        return self

    # -- frames ------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the connection (the worker then ends the transaction as ``end`` would)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    @property
    def waiting(self) -> tuple[Message, ...] | None:
        """The messages of the conversation call that waits for answers, if one does."""
        return self._waiting

    def _read(self) -> dict[str, Any]:
        sock = self._sock
        if sock is None:
            raise WorkerDied("this transaction's connection to the broker is closed")
        try:
            frame = protocol.recv_frame(
                sock, max_size=MAX_REPLY_FRAME, wait=None, frame_timeout=FRAME_TIMEOUT
            )
        except protocol.PeerGone as exc:
            self.close()
            raise WorkerDied(
                "the broker's worker for this transaction ended without an answer"
            ) from exc
        except ProtocolViolation as exc:
            self.close()
            raise BrokerProtocolError(f"the broker sent something unreadable: {exc}") from exc
        op = frame.get("op")
        if op == "refused":
            if frame.get("kind") not in ("phase", "item", "environ", "throttled"):
                self.close()  # a refusal at the door: the broker has closed
            raise refusal(frame.get("kind"), frame.get("message"))
        if op == "error":
            self.close()
            raise WorkerDied(f"the broker ended this transaction: {frame.get('message')}")
        return frame

    def _send(self, message: dict[str, Any]) -> None:
        sock = self._sock
        if sock is None:
            raise WorkerDied("this transaction's connection to the broker is closed")
        try:
            protocol.send_frame(sock, message)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the reason (a refusal, an error) is there to read

    def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        self._send(message)
        return self._read()

    def _messages(self, frame: dict[str, Any]) -> tuple[Message, ...]:
        raw = frame.get("messages")
        if not isinstance(raw, list) or not 1 <= len(raw) <= PAM_MAX_NUM_MSG:
            self.close()
            raise BrokerProtocolError("a conversation frame without 1 to 32 messages")
        pairs = []
        for entry in raw:
            if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int):
                self.close()
                raise BrokerProtocolError("a malformed conversation message")
            text = protocol.unb64(entry[1], "a message", MAX_REPLY_FRAME)
            pairs.append((entry[0], text or b""))
        try:
            return tuple(conversation.make_messages(pairs, self.encoding))
        except Exception as exc:
            # A style nobody can answer (a binary prompt): the call fails.
            self._send({"op": "conv_error"})
            raise BrokerProtocolError(str(exc)) from exc

    def _step(self, frame: dict[str, Any]) -> Step:
        """Read on from ``frame`` to a call that waits for a prompt's answer, or a result."""
        said: list[Message] = []
        while True:
            op = frame.get("op")
            if op == "converse":
                messages = self._messages(frame)
                said.extend(messages)
                if any(m.is_prompt for m in messages):
                    self._waiting = messages
                    return Step(tuple(said), messages, None)
                frame = self._exchange({"op": "answers", "answers": [None] * len(messages)})
                continue
            if op == "result" and type(frame.get("code")) is int:
                self._waiting = None
                return Step(tuple(said), None, frame["code"])
            self.close()
            raise BrokerProtocolError(f"the broker sent {op!r} where a result was due")

    # -- the transaction -----------------------------------------------------------------

    def call(self, phase: Phase, flags: int = 0) -> Step:
        """Run a phase up to its first prompt, or to its end."""
        if self._waiting is not None:
            raise RuntimeError("a conversation call waits for answers; answer() it first")
        return self._step(self._exchange({"op": "call", "phase": phase.value, "flags": flags}))

    def answer(self, answers: Sequence[str | None]) -> Step:
        """Answer the waiting call: one answer per prompt, in order (the info
        and error messages among them get none). Runs on to the next step."""
        waiting = self._waiting
        if waiting is None:
            raise RuntimeError("no conversation call waits for answers")
        prompts = [m for m in waiting if m.is_prompt]
        if len(answers) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts wait, {len(answers)} answers were given")
        given = iter(answers)
        encoded: list[str | None] = []
        for message in waiting:
            if not message.is_prompt:
                encoded.append(None)
                continue
            answer = next(given)
            raw = _encode(answer or "", self.encoding, "answer")
            if len(raw) > PAM_MAX_RESP_SIZE:
                raise ValueError(f"an answer is longer than {PAM_MAX_RESP_SIZE} bytes")
            encoded.append(b64(raw))
        self._waiting = None
        return self._step(self._exchange({"op": "answers", "answers": encoded}))

    def cancel(self) -> Step:
        """Fail the waiting call (the stack gets PAM_CONV_ERR); runs on to the result."""
        if self._waiting is None:
            raise RuntimeError("no conversation call waits for answers")
        self._waiting = None
        return self._step(self._exchange({"op": "conv_error"}))

    def set_item(self, item: Item, value: str | None) -> int:
        raw = None if value is None else _encode(value, self.encoding, "item")
        reply = self._exchange({"op": "set_item", "item": int(item), "value": b64(raw)})
        code = reply.get("code")
        return code if type(code) is int else 4

    def get_item(self, item: Item) -> str | None:
        reply = self._exchange({"op": "get_item", "item": int(item)})
        if reply.get("code") != 0:
            return None
        raw = protocol.unb64(reply.get("value"), "a value", MAX_REPLY_FRAME)
        return None if raw is None else raw.decode(self.encoding, "surrogateescape")

    def detach(self) -> str:
        """Leave the transaction (and a waiting call) with the broker; the token resumes it.

        The token is a secret: keep it on the server (a session store), never
        in the browser. This object is closed afterwards.
        """
        reply = self._exchange({"op": "detach"})
        token = reply.get("token")
        if reply.get("op") != "detached" or not isinstance(token, str):
            self.close()
            raise BrokerProtocolError(f"the broker answered detach with {reply.get('op')!r}")
        timeout = reply.get("timeout")
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            self.detach_timeout = float(timeout)
        self.close()
        return token

    def end(self, status: int = 0) -> int:
        """pam_end in the worker; the worker exits. Ending twice does nothing."""
        if self._sock is None:
            return 0
        try:
            if self._waiting is not None:
                self.cancel()
            reply = self._exchange({"op": "end", "status": int(status) & 0xFF})
            code = reply.get("code")
            return code if type(code) is int else 0
        except (WorkerDied, BrokerProtocolError):
            return 0
        finally:
            self.close()

    def strerror(self, code: int) -> str:
        return _strerror(code)

    def __del__(self) -> None:
        sock = self._sock
        if sock is not None:
            sock.close()


def _encode(value: str, encoding: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"the {what} must be str, not {type(value).__name__}")
    raw = value.encode(encoding, "surrogateescape")
    if b"\0" in raw:
        raise ValueError(f"the {what} contains a NUL byte")
    return raw


def _strerror(code: int) -> str:
    return _libpam.strerror(_libpam.NULL_HANDLE, code)
