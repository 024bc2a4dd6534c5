"""The per-login worker: one PAM transaction in a process of its own.

The broker forks one worker per accepted connection, after the start frame
passed the policy. The worker starts libpam in its own process, with the
credentials of a setuid-root program run by the peer
(:mod:`pamphlet.broker.credentials`), then serves the client's requests one
at a time: each maps to one call of a :class:`~pamphlet._transaction.Transaction`
over libpam in this process, the same one every in-process application
drives, and libpam's return code goes back to the client. While a phase
runs, every conversation call is relayed to the client, which has
``conversation_timeout`` seconds to answer; a silent,
disconnected or misbehaving client makes the conversation fail
(PAM_CONV_ERR), and the transaction is then ended as ``end()`` ends it:
an open session is closed, established credentials are deleted, pam_end runs.
What is open is the transaction's record, the one its ``end()`` closes; the
worker keeps none of its own.

A worker never trusts the client: phases, items and environment variables
are checked against the peer's rule, authenticate asks the broker's throttle
first, and libpam's failure delay is always served here, whatever the client
asked.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from .. import conversation
from .._transaction import Transaction
from ..constants import Item, Phase, ReturnCode
from ..errors import PamError
from ..message import Message
from . import protocol
from .policy import SETTABLE_ITEMS, Limits, Rule
from .protocol import MAX_REPLY_FRAME, MAX_REQUEST_FRAME, ProtocolViolation, b64, unb64
from .watchdog import Deadline

__all__ = ["run"]

_SUCCESS = int(ReturnCode.SUCCESS)
_ALL_FLAGS = 0xFFFF
#: Seconds a detached worker waits past the broker's own expiry before it
#: ends the transaction by itself (only when the broker is unresponsive).
_DETACH_GRACE = 10.0
# Items a client may read: every string item but the tokens (libpam refuses
# those to applications anyway; the broker does not even ask).
_READABLE_ITEMS = frozenset(
    int(item)
    for item in (
        Item.SERVICE,
        Item.USER,
        Item.TTY,
        Item.RHOST,
        Item.RUSER,
        Item.USER_PROMPT,
        Item.XDISPLAY,
        Item.AUTHTOK_TYPE,
    )
)


class _Refused(Exception):
    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        self.message = message
        super().__init__(message)


class _Shutdown(Exception):
    """The broker is stopping (SIGTERM reached this worker)."""


class _DetachExpired(ConnectionError):
    """No resume came for a detached transaction in time (or the broker ended it)."""


class _Relay:
    """The application of the worker's transaction: the client answers for it.

    The transaction checks the answers it returns as it checks any
    application's; what is checked here is the wire protocol, whose breach
    ends the connection.
    """

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.delays: list[tuple[int, int]] = []
        self.user_checked = False

    def _answer(self, messages: list[Message]) -> list[bytes | None]:
        worker = self.worker
        if worker.broken is not None:
            raise ConnectionError("the client is gone")
        if worker.phase == "authenticate" and not self.user_checked:
            # The stack may have asked for the user name: throttle that user
            # before the password prompt reaches the client.
            user = worker.item(Item.USER)
            if user is not None:
                self.user_checked = True
                worker.ask_throttle(user)
        raw = [(int(m.style), str.encode(m, "utf-8", "surrogateescape")) for m in messages]
        call = {"op": "converse", "messages": [[s, b64(t)] for s, t in raw]}
        try:
            worker.send(call)
            reply = worker.receive(worker.limits.conversation_timeout)
            while reply == {"op": "detach"}:
                # Detach and resume: the call waits here, with the handle, for
                # a new connection; it is asked again on that connection.
                worker.detach(pending=True)
                worker.send(call)
                reply = worker.receive(worker.limits.conversation_timeout)
        except protocol.Interrupted:
            worker.shutdown = True
            raise _Shutdown from None
        except (OSError, ProtocolViolation) as exc:
            worker.broken = exc
            raise
        op = reply.get("op")
        if op == "conv_error":
            raise ConnectionAbortedError("the client's conversation failed")
        if op != "answers" or set(reply) != {"op", "answers"}:
            worker.broken = ProtocolViolation(f"expected the conversation's answers, got {op!r}")
            raise worker.broken
        answers = reply["answers"]
        if not isinstance(answers, list) or len(answers) != len(messages):
            worker.broken = ProtocolViolation(
                f"{len(messages)} messages were sent, the answers do not match"
            )
            raise worker.broken
        checked: list[bytes | None] = []
        for message, answer in zip(messages, answers, strict=True):
            if message.is_prompt:
                data = unb64(answer, "an answer", protocol.PAM_MAX_RESP_SIZE)
                if data is None:
                    worker.broken = ProtocolViolation("a prompt was answered with null")
                    raise worker.broken
                checked.append(data)
            else:
                if answer is not None:
                    worker.broken = ProtocolViolation("an info or error message got an answer")
                    raise worker.broken
                checked.append(None)
        return checked

    def _on_fail_delay(self, status: int, delay_usec: int) -> None:
        self.delays.append((status, delay_usec))  # served by the worker after the phase


class _Worker:
    def __init__(
        self,
        conn: socket.socket,
        control: socket.socket,
        rule: Rule,
        limits: Limits,
        wake: int,
        deadline: Deadline,
    ) -> None:
        self.conn = conn
        self.control = control
        self.rule = rule
        self.limits = limits
        self.wake = wake
        self.deadline = deadline
        # Set once libpam started; every request is served on it.
        self.transaction: Transaction
        # Held here: the transaction holds its application weakly.
        self.relay = _Relay(self)
        self.broken: BaseException | None = None
        self.shutdown = False
        self.phase: str | None = None
        self.authenticated: bytes | None = None
        self.client_fail_delay = False
        self.phases: list[str] = []
        # What the client was told is open (a session, credentials): a phase
        # whose conversation failed is reported as PAM_CONV_ERR even when
        # libpam opened something, so the client's own end() cannot close it.
        self.client_knows_session = False
        self.client_knows_credentials = False
        self.refusals: list[str] = []
        self.refusal_reason: str | None = None  # the last refusal's text, for the audit
        self.end_reason = "client"
        self.items: dict[str, str | None] = {}
        self.detaches = 0
        self.resumes = 0

    # -- the two connections ------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        frame = protocol.encode_frame(message)
        if len(frame) > MAX_REPLY_FRAME + 4:
            raise ProtocolViolation("a reply would be over the frame limit")
        self.conn.sendall(frame)

    def receive(self, wait: float | None) -> dict[str, Any]:
        limits = self.limits
        self.deadline.expect(None if wait is None else wait + limits.frame_timeout)
        request = protocol.recv_frame(
            self.conn,
            max_size=MAX_REQUEST_FRAME,
            wait=wait,
            frame_timeout=limits.frame_timeout,
            wake=self.wake,
        )
        # What follows a request or an answer is module work, which gets as
        # long as a conversation would (the broker kills a worker past it).
        self.deadline.expect(limits.conversation_timeout)
        return request

    def tell_broker(self, message: dict[str, Any]) -> None:
        protocol.send_frame(self.control, message)

    def ask_broker(self, message: dict[str, Any]) -> dict[str, Any]:
        self.tell_broker(message)
        return protocol.recv_frame(
            self.control, max_size=MAX_REPLY_FRAME, wait=None, frame_timeout=None
        )

    def ask_throttle(self, user: bytes | None) -> None:
        """Ask the broker whether this peer may try ``user`` now; wait if told.

        A yes holds a place in the throttle until this authenticate's result.
        """
        rhost = self.item(Item.RHOST)
        answer = self.ask_broker(
            {"op": "may_authenticate", "user": _text(user), "rhost": _text(rhost)}
        )
        refused = answer.get("refuse")
        if refused:
            raise _Refused("throttled", str(refused))
        delay = answer.get("delay")
        if isinstance(delay, (int, float)) and delay > 0:
            self.deadline.expect(delay + self.limits.conversation_timeout)
            ready, _, _ = select.select([self.wake], [], [], float(delay))
            if ready:
                self.shutdown = True
                raise _Shutdown

    # -- requests -----------------------------------------------------------------

    def item(self, item: Item) -> bytes | None:
        """A string item as libpam holds it; None when unset or unreadable."""
        _, value = _attempt(self.transaction.get_item, item)
        return _raw(value)

    def serve(self) -> None:
        while True:
            wait = None if self.transaction.session_open else self.limits.idle_timeout
            try:
                request = self.receive(wait)
            except protocol.Interrupted:
                self.shutdown = True
                return
            op = request.get("op")
            if request == {"op": "detach"}:
                self.detach(pending=False)
                continue
            handler = _HANDLERS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ProtocolViolation(f"unknown request {op!r}")
            try:
                reply = handler(self, request)
            except _Refused as refusal:
                self.refusals.append(refusal.kind)
                self.refusal_reason = refusal.message
                reply = {"op": "refused", "kind": refusal.kind, "message": refusal.message}
            if self.broken is not None:
                raise self.broken
            if self.shutdown:
                return
            self.send(reply)
            if op == "end":
                return

    def do_call(self, request: dict[str, Any]) -> dict[str, Any]:
        _fields(request, {"phase", "flags"})
        try:
            phase = Phase(request["phase"])
        except ValueError:
            raise ProtocolViolation(f"unknown phase {request['phase']!r}") from None
        flags = _int(request["flags"], "flags", 0, _ALL_FLAGS)
        name = phase.value
        if not self.rule.allows_phase(name):
            raise _Refused("phase", f"the broker's policy does not allow {name} for this peer")
        if (
            self.rule.require_authentication
            and phase is not Phase.AUTHENTICATE
            and self.authenticated is None
        ):
            raise _Refused(
                "phase",
                f"{name} needs a successful authenticate first in the same transaction",
            )
        if phase is Phase.AUTHENTICATE:
            user = self.item(Item.USER)
            self.relay.user_checked = user is not None
            self.ask_throttle(user)
        try:
            code = self._call(phase, flags)
        except _Refused:
            if phase is Phase.AUTHENTICATE:
                # Refused when the stack named its user, before any prompt
                # reached the client: no guess was made; the places go back.
                self.tell_broker({"op": "result", "user": None, "code": None})
            raise
        self.phases.append(f"{name}:{code}")
        transaction = self.transaction
        # A close is forgotten on both sides whatever its code; an opening
        # only when the client was told success.
        told = code == _SUCCESS
        self.client_knows_session = transaction.session_open and (told or self.client_knows_session)
        self.client_knows_credentials = transaction.credentials_established and (
            told or self.client_knows_credentials
        )
        if phase is Phase.AUTHENTICATE:
            user = self.item(Item.USER)
            if code == _SUCCESS:
                self.authenticated = user
            self.tell_broker({"op": "result", "user": _text(user), "code": code})
        reply: dict[str, Any] = {"op": "result", "code": code}
        delays = [list(d) for d in self.relay.delays]
        if delays and self.client_fail_delay:
            reply["fail_delay"] = delays
        return reply

    def _call(self, phase: Phase, flags: int) -> int:
        """Run the phase; libpam's own code, but never success past a failed conversation."""
        transaction = self.transaction
        self.phase = phase.value
        self.relay.delays = []
        code = _SUCCESS
        try:
            transaction.run(phase, flags)
        except PamError as error:
            if isinstance(error.__cause__, _Refused):
                raise error.__cause__ from None  # the throttle refused mid-conversation
            # error.code is libpam's, or PAM_CONV_ERR when the conversation
            # failed; then libpam's own code is the more telling one, unless
            # it says success.
            code = transaction.last_status or error.code
        finally:
            self.phase = None
        # libpam's failure delay is served here, whatever the client asked.
        delay = max((usec for status, usec in self.relay.delays if status != _SUCCESS), default=0)
        if delay and not self.shutdown and self.broken is None:
            self.deadline.expect(delay / 1e6 + self.limits.conversation_timeout)
            ready, _, _ = select.select([self.wake], [], [], delay / 1e6)
            if ready:
                self.shutdown = True
        return code

    def do_get_user(self, request: dict[str, Any]) -> dict[str, Any]:
        _fields(request, {"prompt"})
        prompt = unb64(request["prompt"], "the prompt")
        self.phase = "get_user"
        try:
            code, user = _attempt(self.transaction.get_user, _text(prompt))
        finally:
            self.phase = None
        return {"op": "result", "code": code, "value": b64(_raw(user))}

    def do_get_item(self, request: dict[str, Any]) -> dict[str, Any]:
        _fields(request, {"item"})
        item = _int(request["item"], "item", 0, 1 << 16)
        if item not in _READABLE_ITEMS:
            raise _Refused("item", f"item {_item_name(item)} cannot be read through the broker")
        code, value = _attempt(self.transaction.get_item, item)
        return {"op": "result", "code": code, "value": b64(_raw(value))}

    def do_set_item(self, request: dict[str, Any]) -> dict[str, Any]:
        _fields(request, {"item", "value"})
        item = _int(request["item"], "item", 0, 1 << 16)
        if item not in SETTABLE_ITEMS:
            raise _Refused(
                "item",
                f"item {_item_name(item)} cannot be set through the broker "
                "(only user, tty, rhost and ruser)",
            )
        value = unb64(request["value"], "the item's value")
        if (
            item == int(Item.USER)
            and self.authenticated is not None
            and value != self.authenticated
        ):
            raise _Refused("item", "the user cannot change after a successful authenticate")
        code, _ = _attempt(self.transaction.set_item, item, _text(value))
        return {"op": "result", "code": code}

    def do_get_xauthdata(self, request: dict[str, Any]) -> dict[str, Any]:
        _fields(request, set())
        code, value = _attempt(self.transaction.get_xauthdata)
        shown = None if value is None else [b64(_raw(value[0])), b64(value[1])]
        return {"op": "result", "code": code, "value": shown}

    def do_set_xauthdata(self, request: dict[str, Any]) -> dict[str, Any]:
        raise _Refused("item", "item XAUTHDATA cannot be set through the broker")

    def do_set_fail_delay(self, request: dict[str, Any]) -> dict[str, Any]:
        _fields(request, {"enabled"})
        enabled = request["enabled"]
        if not isinstance(enabled, bool):
            raise ProtocolViolation("enabled must be true or false")
        self.client_fail_delay = enabled
        return {"op": "result", "code": _SUCCESS}

    def do_getenv(self, request: dict[str, Any]) -> dict[str, Any]:
        _fields(request, {"name"})
        name = unb64(request["name"], "the variable's name")
        if name is None:
            raise ProtocolViolation("the variable's name is null")
        return {"op": "result", "value": b64(_raw(self.transaction.getenv(name)))}

    def do_putenv(self, request: dict[str, Any]) -> dict[str, Any]:
        _fields(request, {"entry"})
        entry = unb64(request["entry"], "the environment entry")
        if entry is None:
            raise ProtocolViolation("the environment entry is null")
        name = entry.partition(b"=")[0].decode("utf-8", "surrogateescape")
        if name not in self.rule.setenv:
            raise _Refused(
                "environ",
                f"the broker's policy does not let this peer set {name!r} in the PAM environment",
            )
        code, _ = _attempt(self.transaction.putenv, entry)
        return {"op": "result", "code": code}

    def do_getenvlist(self, request: dict[str, Any]) -> dict[str, Any]:
        _fields(request, set())
        _, pairs = _attempt(self.transaction.environment)
        value = None if pairs is None else [b64(_raw(f"{n}={v}")) for n, v in pairs]
        return {"op": "result", "value": value}

    def do_end(self, request: dict[str, Any]) -> dict[str, Any]:
        """The client's own end(): it closed what it meant to close; its status.

        What libpam opened while the client was told the phase failed, the
        client cannot know of: that is closed here, as a disconnect would.
        """
        _fields(request, {"status"})
        status = _int(request["status"], "status", 0, 255)
        self.note_items()
        transaction = self.transaction
        unknown_to_client = (transaction.session_open and not self.client_knows_session) or (
            transaction.credentials_established and not self.client_knows_credentials
        )
        closing = []
        if unknown_to_client:
            closing = [Phase.CLOSE_SESSION] if transaction.session_open else []
            if transaction.credentials_established:
                closing.append(Phase.SETCRED)
        code, _ = _attempt(transaction.end, close=unknown_to_client, converse=False, status=status)
        self.phases.extend(f"{p.value}:{transaction.results.get(p)}" for p in closing)
        return {"op": "result", "code": code}

    def note_items(self) -> None:
        """Remember the items the audit line names, while the handle lives."""
        transaction = self.transaction
        if transaction.open:
            for item, name in ((Item.USER, "user"), (Item.RHOST, "rhost")):
                code, value = _attempt(transaction.get_item, item)
                if code == _SUCCESS:
                    self.items[name] = value

    # -- detach and resume (docs/guide/protocol.md, "Detach and resume") -----------

    def detach(self, *, pending: bool) -> None:
        """Give up the connection, keep the handle; return on a resume's connection.

        The broker issues the token (it is the one that will check it); the
        worker hands it to the client, closes the connection and waits on the
        control socket for the resumed connection's descriptor. No resume in
        time, an ``expire`` from the broker, or no broker: _DetachExpired, and
        the transaction ends as a disconnect ends it.
        """
        timeout = self.limits.detach_timeout
        if timeout <= 0:
            raise ProtocolViolation("the broker's policy does not allow detaching (detach_timeout)")
        answer = self.ask_broker({"op": "detach"})
        token = answer.get("token")
        if not isinstance(token, str):
            raise ProtocolViolation(f"the broker would not detach: {answer.get('refuse')}")
        self.send({"op": "detached", "token": token, "timeout": timeout})
        protocol.close_quietly(self.conn)
        self.detaches += 1
        # The broker expires the token after ``timeout``; this is only for a
        # broker that is gone without closing the control socket.
        deadline = time.monotonic() + timeout + _DETACH_GRACE
        self.deadline.expect(timeout + _DETACH_GRACE + self.limits.frame_timeout)
        frames = protocol.FrameBuffer(MAX_REPLY_FRAME)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _DetachExpired("no resume before the detach timeout")
            ready, _, _ = select.select([self.control.fileno(), self.wake], [], [], left)
            if self.wake in ready:
                self.shutdown = True
                raise _Shutdown
            if not ready:
                continue
            data, fds, _, _ = socket.recv_fds(self.control, 65536, 1)
            conn = socket.socket(fileno=fds[0]) if fds else None
            if not data:
                protocol.close_quietly(conn)
                raise _DetachExpired("the broker is gone")
            for message in frames.feed(data):
                if message.get("op") == "resume" and conn is not None:
                    conn.setblocking(True)
                    self.conn = conn
                    self.resumes += 1
                    self.send({"op": "resumed", "pending": "converse" if pending else None})
                    return
                protocol.close_quietly(conn)
                conn = None
                if message.get("op") == "expire":
                    raise _DetachExpired("the detached transaction expired")
            protocol.close_quietly(conn)

    # -- the end ------------------------------------------------------------------

    def implied_end(self) -> None:
        """end() for a client that did not: close, delete, pam_end, with no one
        to converse with (modules that speak get PAM_CONV_ERR)."""
        transaction = self.transaction
        if transaction.ended:
            return  # the client's own end frame ended it
        closing = [Phase.CLOSE_SESSION] if transaction.session_open else []
        if transaction.credentials_established:
            closing.append(Phase.SETCRED)
        try:
            transaction.end(converse=False)
        except PamError:
            pass  # pam_end's own failure: the handle is gone all the same
        finally:
            self.phases.extend(f"{p.value}:{transaction.results.get(p)}" for p in closing)


_HANDLERS = {
    "call": _Worker.do_call,
    "get_user": _Worker.do_get_user,
    "get_item": _Worker.do_get_item,
    "set_item": _Worker.do_set_item,
    "get_xauthdata": _Worker.do_get_xauthdata,
    "set_xauthdata": _Worker.do_set_xauthdata,
    "set_fail_delay": _Worker.do_set_fail_delay,
    "getenv": _Worker.do_getenv,
    "putenv": _Worker.do_putenv,
    "getenvlist": _Worker.do_getenvlist,
    "end": _Worker.do_end,
}


def _fields(request: dict[str, Any], expected: set[str]) -> None:
    if set(request) != expected | {"op"}:
        raise ProtocolViolation(f"request {request.get('op')!r} must have the fields {expected}")


def _int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolViolation(f"{what} must be an integer from {low} to {high}")
    return value


def _item_name(item: int) -> str:
    try:
        return Item(item).name
    except ValueError:
        return str(item)


# The worker's transaction is UTF-8 with surrogateescape: any bytes from the
# client or libpam cross it as str and come back the same bytes.
def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


def _raw(text: str | None) -> bytes | None:
    return None if text is None else str.encode(text, "utf-8", "surrogateescape")


def _attempt(call: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """libpam's return code of a call of the transaction, and its value (None
    on failure): what goes back to the client."""
    try:
        return _SUCCESS, call(*args, **kwargs)
    except PamError as error:
        return error.code, None


def run(
    conn: socket.socket,
    control: socket.socket,
    rule: Rule,
    limits: Limits,
    service: bytes,
    user: bytes | None,
    confdir: bytes | None,
    wake: int,
    deadline: Deadline,
) -> None:
    """Serve one transaction on ``conn``; report to the broker on ``control``."""
    conn.setblocking(True)
    deadline.expect(limits.conversation_timeout)  # pam_start runs the modules' setup
    worker = _Worker(conn, control, rule, limits, wake, deadline)
    started = time.monotonic()
    summary: dict[str, Any] = {"op": "summary"}
    try:
        try:
            transaction = Transaction(
                service.decode("utf-8", "surrogateescape"),
                _text(user),
                encoding="utf-8",
                application=worker.relay,
                guard=_thread.RLock(),
                start=functools.partial(conversation.open_in_process, confdir),
            )
        except PamError as error:
            summary["outcome"] = f"start failed:{error.code}"
            try:
                worker.send({"op": "start_failed", "code": error.code})
            except OSError:
                pass
            return
        worker.transaction = transaction
        # libpam calls the relay instead of sleeping; the worker sleeps. (Should
        # libpam refuse, it sleeps itself: the delay is served either way.)
        with contextlib.suppress(PamError):
            transaction.set_fail_delay(True)
        try:
            worker.send({"op": "started"})
            worker.serve()
        except protocol.PeerGone:
            worker.end_reason = "disconnect"
        except _DetachExpired as exc:
            worker.end_reason = f"detached: {exc}"
        except ProtocolViolation as exc:
            worker.end_reason = f"protocol error: {exc}"
            _say_goodbye(worker, str(exc))
        except (OSError, _Shutdown) as exc:
            worker.end_reason = "shutdown" if worker.shutdown else f"connection error: {exc}"
        finally:
            if worker.shutdown:
                worker.end_reason = "shutdown"
                _say_goodbye(worker, "the broker is shutting down")
            deadline.expect(limits.conversation_timeout)
            worker.note_items()
            worker.implied_end()
    finally:
        summary["user"] = _text(user)
        summary.update(worker.items)
        summary["phases"] = worker.phases
        summary["refusals"] = worker.refusals
        if worker.refusal_reason is not None:
            summary["reason"] = worker.refusal_reason
        if worker.detaches:
            summary["detaches"] = worker.detaches
            summary["resumes"] = worker.resumes
        summary["end"] = worker.end_reason
        summary["seconds"] = round(time.monotonic() - started, 3)
        try:
            worker.tell_broker(summary)
        except OSError:
            pass


def _say_goodbye(worker: _Worker, text: str) -> None:
    try:
        worker.conn.setblocking(False)
        worker.conn.send(protocol.encode_frame({"op": "error", "message": text}))
    except OSError:
        pass
