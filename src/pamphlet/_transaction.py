"""The transaction: one PAM handle's life, whatever carries it.

Every flavour (plain, threaded, asyncio) drives its handle through one
:class:`Transaction`: the phases, the items, the environment and the end,
which runs exactly once. Under it sits a :class:`Transport`: libpam in this
process (``_libpam.Handle``) or the broker in another. The transaction is the
transport's :class:`Conversant`: it asks the application for answers, checks
them, and keeps the first failure for the phase to raise.
"""

from __future__ import annotations

import importlib
import signal
import threading
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import FrameType
from typing import Any, Protocol

from . import _libpam, conversation
from .constants import STRING_ITEMS, Flag, Item, Phase, ReturnCode
from .conversation import ConversationProtocolError
from .errors import ConversationError, HandleBusyError, HandleEndedError, pam_error
from .message import Message

__all__ = ["Conversant", "Transport", "Transaction", "Application"]

_SUCCESS = int(ReturnCode.SUCCESS)
_BAD_ITEM = int(ReturnCode.BAD_ITEM)
_BUF_ERR = int(ReturnCode.BUF_ERR)
_DELETE_CRED = int(Flag.DELETE_CRED)
_ESTABLISHING = int(Flag.ESTABLISH_CRED | Flag.REINITIALIZE_CRED | Flag.REFRESH_CRED)
# The phases whose outcome end() must know about.
_OPEN_SESSION, _CLOSE_SESSION, _SETCRED = Phase.OPEN_SESSION, Phase.CLOSE_SESSION, Phase.SETCRED


class Conversant(Protocol):
    """What a transport calls back into while a phase runs."""

    encoding: str

    def converse(self, messages: list[Message]) -> list[bytes | None]:
        """One checked answer per message: bytes for prompts, None for the rest.

        Raises on any failure; the transport then gives libpam PAM_CONV_ERR
        (PAM_BUF_ERR for MemoryError).
        """

    def fail(self, error: BaseException) -> None:
        """Record a failure the transport found itself; the phase raises it."""

    def fail_delay(self, status: int, delay_usec: int) -> None:
        """libpam's failure delay, when the transport was asked to route it here."""


class Transport(Protocol):
    """What carries a handle's calls to libpam: in this process, or through the broker."""

    def call(self, phase: Phase, flags: int) -> int: ...

    def get_user(self, prompt: bytes | None) -> tuple[int, bytes | None]: ...

    def get_item(self, item: int) -> tuple[int, bytes | None]: ...

    def set_item(self, item: int, value: bytes | None) -> int: ...

    def get_xauthdata(self) -> tuple[int, tuple[bytes, bytes] | None]: ...

    def set_xauthdata(self, value: tuple[bytes, bytes] | None) -> int: ...

    def set_fail_delay(self, enabled: bool) -> int: ...

    def getenv(self, name: bytes) -> bytes | None: ...

    def putenv(self, entry: bytes) -> int: ...

    def getenvlist(self) -> list[bytes] | None: ...

    def strerror(self, code: int) -> str: ...

    def end(self, status: int) -> int: ...


class Application(Protocol):
    """What a transaction asks of the application that owns it."""

    def _answer(self, messages: list[Message]) -> Any:
        """The conversation's raw answers (checked by the transaction)."""

    def _on_fail_delay(self, status: int, delay_usec: int) -> None:
        """libpam asked for a failure delay."""


# The C functions behind signal.getsignal and signal.signal: those wrappers turn
# every number into an enum, which costs more than the rest of a phase.
_signal: Any = importlib.import_module("_signal")
# Signals whose Python handlers are held while a phase runs on the main thread.
_HELD_SIGNALS = tuple(
    int(getattr(signal, name))
    # KeyboardInterrupt, and the SystemExit a server's SIGTERM handler raises
    for name in ("SIGINT", "SIGTERM")
)


class HeldSignals:
    """Python signal handlers held back while a phase runs inside libpam.

    A handler that raises (SIGINT's KeyboardInterrupt) at the first bytecode
    of a ctypes callback raises where ctypes swallows it, and libpam gets an
    undefined return code. So while a phase runs on the main thread (the only
    thread that runs Python signal handlers), signals are recorded; they act
    at once inside the conversation, where a failure becomes PAM_CONV_ERR,
    and the rest act when the phase is over.
    """

    __slots__ = ("conversing", "_pending", "_saved")

    def __init__(self) -> None:
        self.conversing = False
        self._pending: list[tuple[int, FrameType | None]] = []
        self._saved: dict[int, Any] = {}

    def hold(self) -> None:
        """Put our recorder in place of every Python-level handler."""
        for signum in _HELD_SIGNALS:
            handler = _signal.getsignal(signum)
            if callable(handler):
                self._saved[signum] = handler
                _signal.signal(signum, self)  # this object is the handler: no bound method

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        """The handler while held: record the signal, or pass it on inside the conversation."""
        if self.conversing:
            self._saved[signum](signum, frame)
        else:
            self._pending.append((signum, frame))

    def deliver(self) -> None:
        """Run the handlers of the signals held so far (they may raise)."""
        while self._pending:  # one that raises leaves the rest for the next release
            signum, frame = self._pending.pop(0)
            self._saved[signum](signum, frame)

    def release(self) -> None:
        """Put the handlers back, then run those of the signals held (they may raise)."""
        for signum, handler in self._saved.items():
            if _signal.getsignal(signum) is self:
                _signal.signal(signum, handler)
        if self._pending:
            self.deliver()


def _nobody() -> None:
    """An application reference that is gone: the conversation gets PAM_CONV_ERR."""


_MAIN_THREAD = threading.main_thread().ident


class Transaction:
    """One PAM handle: phases, items, environment and end, over a transport.

    ``guard`` serialises the handle's use (a lock, or the flavours' guard).
    The application is held weakly: a transaction never keeps its
    application alive, so an application nobody ended is collected and its
    finalizer ends the handle.
    """

    def __init__(
        self,
        service: str,
        user: str | None,
        *,
        confdir: str | None,
        encoding: str,
        application: Application,
        guard: AbstractContextManager[Any],
        broker: str | None = None,
        broker_uid: int | None = None,
    ) -> None:
        if broker is not None and confdir is not None:
            raise ValueError(
                "confdir= cannot be used with broker=: the broker reads its own PAM configuration"
            )
        if encoding != "utf-8":
            "".encode(encoding)  # an unknown encoding fails here, not mid-phase
        self.encoding = encoding
        self.guard = guard
        self._application: Callable[[], Application | None] = weakref.ref(application)
        self._last_status = _SUCCESS
        self._session_open = False
        self._credentials_established = False
        # The last return code of each phase run on this handle: what
        # pamphlet.process checks before it runs anything as the user.
        self.results: dict[Phase, int] = {}
        self._caller: int | None = None  # the thread inside a libpam call, while one runs
        self._failure: BaseException | None = None
        self._held: HeldSignals | None = None  # while a call on the main thread holds them
        self._signals: HeldSignals | None = None  # made on the first such call
        raw_service = self.encode(service, "service name")
        raw_user = None if user is None else self.encode(user, "user name")
        raw_confdir = None if confdir is None else self.encode(str(confdir), "confdir")
        if broker is not None:  # the transport: the broker's worker, or libpam here
            from .broker import client

            self._transport: Transport | None = client.start(
                broker, raw_service, raw_user, self, broker_uid=broker_uid
            )
            return
        code, handle = conversation.start_in_process(raw_service, raw_user, raw_confdir, self)
        if handle is None:
            raise pam_error(
                code, f"pam_start failed: {_libpam.strerror(_libpam.NULL_HANDLE, code)}"
            )
        self._transport = handle

    # -- strings ---------------------------------------------------------------

    def encode(self, value: str, what: str) -> bytes:
        """``value`` as the C string libpam will see; never truncated."""
        if not isinstance(value, str):
            raise TypeError(f"the {what} must be str, not {type(value).__name__}")
        raw = str.encode(value, self.encoding, "surrogateescape")
        if 0 in raw:  # the byte value NUL
            raise ValueError(f"the {what} {value!r} contains a NUL byte")
        return raw

    def decode(self, raw: bytes) -> str:
        return raw.decode(self.encoding, "surrogateescape")

    # -- the handle --------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self._transport is None

    def check_open(self) -> None:
        """Raise HandleEndedError once the handle has been ended."""
        self._require()

    def _require(self) -> Transport:
        transport = self._transport
        if transport is None:
            raise HandleEndedError("this PAM handle has been ended; start a new one")
        return transport

    def _check(self, code: int) -> None:
        if code != _SUCCESS:
            raise pam_error(code, self._require().strerror(code))

    def _enter_call(self, action: str) -> Transport:
        """Before a libpam call that may converse (under the guard): refuse re-entry,
        hold signals on the main thread."""
        transport = self._require()
        me = threading.get_ident()
        caller = self._caller
        if caller is not None:
            if caller != me:
                raise HandleBusyError(
                    f"cannot {action}: a PAM phase is already running on this handle, "
                    "on another thread"
                )
            raise RuntimeError(f"cannot {action} from inside the conversation of a running phase")
        self._caller = me
        if me == _MAIN_THREAD:
            held = self._signals
            if held is None:
                held = self._signals = HeldSignals()
            held.hold()
            self._held = held
        return transport

    def _leave_call(self) -> BaseException | None:
        """After the call and its bookkeeping: the conversation's failure; held signals act."""
        failure, held = self._failure, self._held
        self._failure = self._held = self._caller = None
        if held is not None:
            held.release()
        return failure

    @staticmethod
    def _raise_for(transport: Transport, code: int, failure: BaseException | None) -> None:
        """Raise the conversation's failure, or the PamError of ``code``."""
        if failure is not None:
            if not isinstance(failure, Exception):
                raise failure  # KeyboardInterrupt, SystemExit: as they are
            raise ConversationError(
                f"the conversation failed ({failure!r}); libpam said: {transport.strerror(code)}",
                code=int(ReturnCode.CONV_ERR),
            ) from failure
        if code != _SUCCESS:
            raise pam_error(code, transport.strerror(code))

    # -- phases ----------------------------------------------------------------------

    def run(self, phase: Phase, flags: int) -> None:
        """Run one phase; raise the conversation's failure or the PamError of its code."""
        with self.guard:
            transport = self._enter_call("run a PAM phase")
            try:
                # Forgotten before the call: end() does not retry a failed close.
                if phase is _CLOSE_SESSION:
                    self._session_open = False
                elif phase is _SETCRED and flags & _DELETE_CRED:
                    self._credentials_established = False
                self.results[phase] = -1  # not done until it returns
                code = transport.call(phase, flags)
                self._last_status = self.results[phase] = code
                # What libpam opened is remembered for end() even when the
                # conversation failed during the phase.
                if code == _SUCCESS:
                    if phase is _OPEN_SESSION:
                        self._session_open = True
                    elif phase is _SETCRED and flags & _ESTABLISHING:
                        self._credentials_established = True
            finally:
                failure = self._leave_call()
            if failure is not None or code != _SUCCESS:
                if failure is not None:  # a phase that raised never counts as done
                    self.results[phase] = int(ReturnCode.CONV_ERR)
                self._raise_for(transport, code, failure)

    def get_user(self, prompt: str | None) -> str | None:
        """pam_get_user. Not a phase: the status end() passes to pam_end stays."""
        raw_prompt = None if prompt is None else self.encode(prompt, "prompt")
        with self.guard:
            transport = self._enter_call("run a PAM phase")
            try:
                code, user = transport.get_user(raw_prompt)
            finally:
                failure = self._leave_call()
            if failure is not None or code != _SUCCESS:
                self._raise_for(transport, code, failure)
        return None if user is None else self.decode(user)

    # -- the conversant ------------------------------------------------------------

    def converse(self, messages: list[Message]) -> list[bytes | None]:
        if self._failure is not None:
            # The conversation already failed in this phase: answer nothing more.
            raise ConversationProtocolError("the conversation already failed in this phase")
        held = self._held
        if held is not None:
            held.conversing = True
        try:
            if held is not None:
                held.deliver()  # a signal that came as libpam called in acts now
            application = self._application()
            if application is None:
                raise ReferenceError("the application of this PAM handle is gone")
            # The application may change the list it gets; the answers are
            # checked against our own copy: one per message sent, never fewer.
            asked = tuple(messages)
            return conversation.encode_answers(asked, application._answer(messages), self.encoding)
        finally:
            if held is not None:
                held.conversing = False

    def fail(self, error: BaseException) -> None:
        if self._failure is None:  # the first failure is the one to raise
            self._failure = error

    def fail_delay(self, status: int, delay_usec: int) -> None:
        application = self._application()
        if application is not None:
            application._on_fail_delay(status, delay_usec)

    # -- items -------------------------------------------------------------------

    @staticmethod
    def _string_item(item: int) -> Item:
        try:
            known = Item(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a PAM item") from None
        if known not in STRING_ITEMS:
            # libpam would read a Python buffer as a struct or a function pointer.
            raise ValueError(
                f"{known.name} is not a string item; only string items pass through "
                "get_item/set_item (xauthdata and fail_delay have properties of their own)"
            )
        return known

    def get_item(self, item: int) -> str | None:
        item = self._string_item(item)
        with self.guard:
            code, raw = self._require().get_item(item)
            self._check(code)
        return None if raw is None else self.decode(raw)

    def set_item(self, item: int, value: str | None) -> None:
        item = self._string_item(item)
        raw = None if value is None else self.encode(value, f"item {item.name}")
        with self.guard:
            self._check(self._require().set_item(item, raw))

    def get_xauthdata(self) -> tuple[str, bytes] | None:
        with self.guard:
            code, value = self._require().get_xauthdata()
            self._check(code)
        return None if value is None else (self.decode(value[0]), value[1])

    def set_xauthdata(self, value: tuple[str, bytes] | None) -> None:
        raw = None
        if value is not None:
            name, data = value
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError("xauthdata's data must be bytes")
            raw = (self.encode(name, "xauthdata name"), bytes(data))
        with self.guard:
            self._check(self._require().set_xauthdata(raw))

    def set_fail_delay(self, enabled: bool) -> None:
        with self.guard:
            self._check(self._require().set_fail_delay(enabled))

    # -- the environment -------------------------------------------------------------

    def getenv(self, name: bytes) -> str | None:
        with self.guard:
            value = self._require().getenv(name)
        return None if value is None else self.decode(value)

    def putenv(self, entry: bytes) -> None:
        with self.guard:
            self._check(self._require().putenv(entry))

    def unsetenv(self, name: bytes) -> bool:
        """Delete a variable; False when it was not set."""
        with self.guard:
            code = self._require().putenv(name)
            if code == _BAD_ITEM:
                return False
            self._check(code)
        return True

    def environment(self) -> list[tuple[str, str]]:
        with self.guard:
            transport = self._require()
            entries = transport.getenvlist()
            if entries is None:
                raise pam_error(_BUF_ERR, transport.strerror(_BUF_ERR))
        pairs = []
        for entry in entries:
            name, _, value = entry.partition(b"=")
            pairs.append((self.decode(name), self.decode(value)))
        return pairs

    # -- the end ----------------------------------------------------------------------

    @property
    def has_open_state(self) -> bool:
        """A session or credentials that end() would close."""
        return self._session_open or self._credentials_established

    def end(self, *, close: bool = True, converse: bool = True) -> None:
        """Close what is open (unless ``close`` is False), then pam_end; once.

        Failures of the implied close and delete are not raised; a failure of
        pam_end is. With ``converse=False`` (a finalizer, a flavour whose
        peer is gone) modules that speak meanwhile get PAM_CONV_ERR.
        """
        if not converse:
            self._application = _nobody
        with self.guard:
            transport = self._transport
            if transport is None:
                return
            if self._caller is not None:
                raise RuntimeError(
                    "cannot end the handle from inside the conversation of a running phase"
                )
            try:
                if close and self._session_open:
                    try:
                        self.run(Phase.CLOSE_SESSION, 0)
                    except Exception:
                        pass
                if close and self._credentials_established:
                    try:
                        self.run(Phase.SETCRED, _DELETE_CRED)
                    except Exception:
                        pass
            finally:
                self._transport = None
                code = transport.end(self._last_status)
            if code != _SUCCESS:
                raise pam_error(code, f"pam_end failed: {transport.strerror(code)}")
