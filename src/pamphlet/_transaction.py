"""The transaction: one PAM handle's life, whatever carries it.

Every flavour (plain, threaded, asyncio) drives its handle through one
:class:`Transaction`: the phases, the items, the environment and the end,
which runs exactly once. Under it sits a :class:`Transport`: libpam in this
process (``_libpam.Handle``) or the broker in another. The transaction is the
transport's :class:`Conversant`: it asks the application for answers, checks
them, and keeps the first failure for the phase to raise.
"""

from __future__ import annotations

import signal
import threading
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import FrameType
from typing import Any, Protocol

from . import conversation
from .constants import STRING_ITEMS, Flag, Item, Phase, ReturnCode
from .conversation import ConversationProtocolError
from .errors import (
    ConversationError,
    ConversationStateError,
    HandleBusyError,
    HandleEndedError,
    pam_error,
)
from .message import Message

__all__ = ["Conversant", "Transport", "StartTransport", "Transaction", "Application", "c_string"]

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


#: How the application gives a transaction its transport:
#: ``start(service, user, conversant)`` starts a handle that ``conversant``
#: answers for, or raises the PamError of pam_start's code.
StartTransport = Callable[[bytes, "bytes | None", Conversant], Transport]


# -- signals ---------------------------------------------------------------------
# A Python signal handler that raises (SIGINT's KeyboardInterrupt, the
# SystemExit of a server's SIGTERM handler) at the first bytecode of a ctypes
# callback raises where ctypes swallows it, and libpam gets an undefined return
# code; raised right after a phase, it loses what the phase opened. So the
# first time a phase runs on the main thread (the only thread that runs Python
# signal handlers), a deferring handler takes the place of each Python-level
# handler of these signals, once, for good: while a phase is inside libpam on
# the main thread it records the signal, inside the conversation (where a
# failure becomes PAM_CONV_ERR) and at every other time it calls the handler
# it stands in for at once.
_HELD_SIGNALS = (int(signal.SIGINT), int(signal.SIGTERM))


_Handler = Callable[[int, "FrameType | None"], Any]


class _Deferrer:
    """The handler of one signal in front of the handler it stands in for.

    Nothing of pamphlet's holds it but the interpreter's table of handlers,
    so a handler installed over it frees it, and a weak reference tells each
    phase so for the price of one call.
    """

    __slots__ = ("original", "__weakref__")

    def __init__(self, original: _Handler) -> None:
        self.original = original

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if _deferral.holding:
            _deferral.pending.append((self.original, signum, frame))
        else:
            self.original(signum, frame)

    def __repr__(self) -> str:
        return f"<pamphlet: deferring to {self.original!r} while libpam runs>"


class _SignalDeferral:
    """The process's held signals: whether a phase holds them, and those held.

    ``installed`` turns False when a handler installed over one of ours frees
    it (a weak reference's callback says so at once), so each phase checks
    one attribute, not the interpreter's table of handlers: signal.getsignal
    costs more than the whole phase on Python 3.11 (it raises inside Enum for
    every callable handler).
    """

    __slots__ = ("holding", "pending", "installed", "_watched")

    def __init__(self) -> None:
        # A phase is inside libpam on the main thread, outside its conversation.
        self.holding = False
        self.pending: list[tuple[_Handler, int, FrameType | None]] = []
        self.installed = False
        self._watched: tuple[weakref.ref[_Deferrer], ...] = ()

    def deliver(self) -> None:
        """Run the handlers of the signals held so far (they may raise)."""
        pending = self.pending
        while pending:  # one that raises leaves the rest for the next release
            handler, signum, frame = pending.pop(0)
            handler(signum, frame)

    def install(self) -> None:
        """Put a deferrer in front of every Python-level handler of the held signals."""
        watched = []
        for signum in _HELD_SIGNALS:
            handler = signal.getsignal(signum)
            if not isinstance(handler, _Deferrer):
                if not callable(handler):
                    continue  # SIG_DFL, SIG_IGN or a C handler: nothing runs Python code
                handler = _Deferrer(handler)
                signal.signal(signum, handler)
            watched.append(weakref.ref(handler, self._lost))
        self._watched = tuple(watched)
        self.installed = True

    def _lost(self, _: weakref.ref[_Deferrer]) -> None:
        self.installed = False  # the next phase on the main thread installs again


_deferral = _SignalDeferral()
_MAIN_THREAD = threading.main_thread().ident
_get_ident = threading.get_ident


def c_string(value: str, what: str, encoding: str) -> bytes:
    """``value`` (the ``what``) as the C string libpam will see; never truncated."""
    if not isinstance(value, str):
        raise TypeError(f"the {what} must be str, not {type(value).__name__}")
    # str.encode, not value.encode: a str subclass cannot change what PAM sees.
    raw = str.encode(value, encoding, "surrogateescape")
    if 0 in raw:  # the byte value NUL
        raise ValueError(f"the {what} {value!r} contains a NUL byte")
    return raw


def _nobody() -> None:
    """An application reference that is gone: the conversation gets PAM_CONV_ERR."""


class Transaction:
    """One PAM handle: phases, items, environment and end, over a transport.

    ``start`` is how the application starts the transport (libpam here, or
    the broker); the transaction knows nothing of either. ``guard``
    serialises the handle's use (a lock, or the flavours' guard). The
    application is held weakly: a transaction never keeps its application
    alive, so an application nobody ended is collected and its finalizer ends
    the handle.

    Ending is a state: from the moment end() (or begin_end()) begins, on any
    thread, every phase, get_user, item and environment call is refused with
    ConversationStateError, and HandleEndedError once the handle has ended.
    This is the one place that decides it.
    """

    __slots__ = (
        "encoding",
        "guard",
        "_application",
        "_last_status",
        "_session_open",
        "_credentials_established",
        "results",
        "_caller",
        "_failure",
        "_holding",
        "_held_before",
        "_handle",
        "_transport",
        "__weakref__",  # the conversation's registry holds the transaction weakly
    )

    def __init__(
        self,
        service: str,
        user: str | None,
        *,
        encoding: str,
        application: Application,
        guard: AbstractContextManager[Any],
        start: StartTransport,
    ) -> None:
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
        self._holding = False  # whether the call inside libpam holds signals
        self._held_before = False  # and whether they were held before it (nested phases)
        raw_service = c_string(service, "service name", encoding)
        raw_user = None if user is None else c_string(user, "user name", encoding)
        # _handle is the transport until pam_end; _transport is the same
        # object for every entry point until end() begins, then None.
        self._handle: Transport | None = start(raw_service, raw_user, self)
        self._transport: Transport | None = self._handle

    # -- strings ---------------------------------------------------------------

    def encode(self, value: str, what: str) -> bytes:
        """``value`` as the C string libpam will see; never truncated."""
        return c_string(value, what, self.encoding)

    def decode(self, raw: bytes) -> str:
        return raw.decode(self.encoding, "surrogateescape")

    # -- the handle's state ------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self._handle is None

    @property
    def open(self) -> bool:
        """False from the moment end() begins."""
        return self._transport is not None

    def check_open(self) -> None:
        """Raise ConversationStateError once end() has begun, HandleEndedError once it is over."""
        if self._transport is None:
            raise self._refusal()

    def _refusal(self) -> Exception:
        if self._handle is None:
            return HandleEndedError("this PAM handle has been ended; start a new one")
        return ConversationStateError("this PAM handle is being ended: nothing more may run on it")

    def _require(self) -> Transport:
        transport = self._transport
        if transport is None:
            raise self._refusal()
        return transport

    def _check(self, transport: Transport, code: int) -> None:
        if code != _SUCCESS:
            raise pam_error(code, transport.strerror(code))

    def _enter_call(self, transport: Transport | None, action: str) -> Transport:
        """Before a libpam call that may converse (under the guard): refuse an
        ending handle and re-entry; hold signals on the main thread."""
        if transport is None:
            transport = self._transport
            if transport is None:
                raise self._refusal()
        me = _get_ident()
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
            deferral = _deferral
            if not deferral.installed:
                deferral.install()
            self._holding = True
            self._held_before, deferral.holding = deferral.holding, True
        return transport

    def _leave_call(self) -> BaseException | None:
        """After the call and its bookkeeping: the conversation's failure; held signals act."""
        failure = self._failure
        self._failure = self._caller = None
        if self._holding:
            # Back to the state the call found (nested phases); signals held
            # meanwhile act now (they may raise).
            self._holding = False
            held = _deferral.holding = self._held_before
            if _deferral.pending and not held:
                _deferral.deliver()
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

    def run(self, phase: Phase, flags: int, transport: Transport | None = None) -> None:
        """Run one phase; raise the conversation's failure or the PamError of its code.

        ``transport`` is end()'s own, for the session and credentials it closes.
        """
        with self.guard:
            transport = self._enter_call(transport, "run a PAM phase")
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
            transport = self._enter_call(None, "run a PAM phase")
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
        application = self._application()
        if application is None:
            raise ReferenceError("the application of this PAM handle is gone")
        # The application may change the list it gets; the answers are
        # checked against our own copy: one per message sent, never fewer.
        asked = tuple(messages)
        holding = self._holding
        if holding:  # in here a signal acts at once: its failure becomes PAM_CONV_ERR
            _deferral.holding = False
        try:
            if holding and _deferral.pending:
                _deferral.deliver()  # a signal that came as libpam called in
            answers = application._answer(messages)
        finally:
            if holding:
                _deferral.holding = True
        return conversation.encode_answers(asked, answers, self.encoding)

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
            transport = self._require()
            code, raw = transport.get_item(item)
            self._check(transport, code)
        return None if raw is None else self.decode(raw)

    def set_item(self, item: int, value: str | None) -> None:
        item = self._string_item(item)
        raw = None if value is None else self.encode(value, f"item {item.name}")
        with self.guard:
            transport = self._require()
            self._check(transport, transport.set_item(item, raw))

    def get_xauthdata(self) -> tuple[str, bytes] | None:
        with self.guard:
            transport = self._require()
            code, value = transport.get_xauthdata()
            self._check(transport, code)
        return None if value is None else (self.decode(value[0]), value[1])

    def set_xauthdata(self, value: tuple[str, bytes] | None) -> None:
        raw = None
        if value is not None:
            name, data = value
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError("xauthdata's data must be bytes")
            raw = (self.encode(name, "xauthdata name"), bytes(data))
        with self.guard:
            transport = self._require()
            self._check(transport, transport.set_xauthdata(raw))

    def set_fail_delay(self, enabled: bool) -> None:
        with self.guard:
            transport = self._require()
            self._check(transport, transport.set_fail_delay(enabled))

    # -- the environment -------------------------------------------------------------

    def getenv(self, name: bytes) -> str | None:
        with self.guard:
            value = self._require().getenv(name)
        return None if value is None else self.decode(value)

    def putenv(self, entry: bytes) -> None:
        with self.guard:
            transport = self._require()
            self._check(transport, transport.putenv(entry))

    def unsetenv(self, name: bytes) -> bool:
        """Delete a variable; False when it was not set."""
        with self.guard:
            transport = self._require()
            code = transport.putenv(name)
            if code == _BAD_ITEM:
                return False
            self._check(transport, code)
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
    def last_status(self) -> int:
        """libpam's own return code of the last phase (what pam_end gets by default).

        Unlike ``results``, not overridden when the phase's conversation failed.
        """
        return self._last_status

    @property
    def session_open(self) -> bool:
        """open_session succeeded and no close_session has run since."""
        return self._session_open

    @property
    def credentials_established(self) -> bool:
        """setcred established credentials and no delete has run since."""
        return self._credentials_established

    @property
    def has_open_state(self) -> bool:
        """A session or credentials that end() would close."""
        return self._session_open or self._credentials_established

    def begin_end(self) -> None:
        """From now on every entry point refuses; end() does the rest.

        A flavour that must wait for its phase's thread before ending calls
        this first, so that nothing starts meanwhile.
        """
        if self._caller is not None and self._caller == _get_ident():
            raise RuntimeError(
                "cannot end the handle from inside the conversation of a running phase"
            )
        self._transport = None

    def end(self, *, close: bool = True, converse: bool = True, status: int | None = None) -> None:
        """Close what is open (unless ``close`` is False), then pam_end; once.

        Failures of the implied close and delete are not raised; a failure of
        pam_end is. With ``converse=False`` (a finalizer, a flavour whose
        peer is gone) modules that speak meanwhile get PAM_CONV_ERR.
        pam_end gets ``status``, or else the last phase's return code (a
        broker worker passes on the status its client's end() chose).
        """
        self.begin_end()
        if not converse:
            self._application = _nobody
        with self.guard:
            transport = self._handle
            if transport is None:
                return
            if self._caller is not None:
                raise HandleBusyError(
                    "cannot end the handle while a PAM phase runs on it on another thread"
                )
            try:
                if close and self._session_open:
                    try:
                        self.run(Phase.CLOSE_SESSION, 0, transport)
                    except Exception:
                        pass
                if close and self._credentials_established:
                    try:
                        self.run(Phase.SETCRED, _DELETE_CRED, transport)
                    except Exception:
                        pass
            finally:
                self._handle = None
                code = transport.end(self._last_status if status is None else status)
            if code != _SUCCESS:
                raise pam_error(code, f"pam_end failed: {transport.strerror(code)}")
