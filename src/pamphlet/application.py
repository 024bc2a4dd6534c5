"""PamApplication: one PAM handle, its phases, its items and its environment."""

from __future__ import annotations

import functools
import warnings
from _thread import RLock as _RLock
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Protocol, TypeVar, overload

from . import _libpam, conversation
from .constants import Flag, Item, ReturnCode
from .environ import PamEnvironment
from .errors import ConversationError, HandleEndedError, error_class
from .message import Message

__all__ = ["PamApplication", "PamAplication", "FailDelay"]

_SUCCESS = int(ReturnCode.SUCCESS)
# Plain ints: an IntFlag's | runs Python code, on every phase.
_SILENT = int(Flag.SILENT)
_DISALLOW_NULL_AUTHTOK = int(Flag.DISALLOW_NULL_AUTHTOK)
_CHANGE_EXPIRED_AUTHTOK = int(Flag.CHANGE_EXPIRED_AUTHTOK)
_ESTABLISH_CRED = int(Flag.ESTABLISH_CRED)
_DELETE_CRED = int(Flag.DELETE_CRED)
_REINITIALIZE_CRED = int(Flag.REINITIALIZE_CRED)
_REFRESH_CRED = int(Flag.REFRESH_CRED)
_CRED_ACTIONS = _ESTABLISH_CRED | _DELETE_CRED | _REINITIALIZE_CRED | _REFRESH_CRED

FailDelay = Callable[[int, int], object]
"""``f(status, delay_usec)``: called by libpam instead of sleeping after a failure."""

_T = TypeVar("_T")


class _HasItems(Protocol):
    def get_item(self, item: Item) -> str | None: ...

    def set_item(self, item: Item, value: str | None) -> None: ...


class _StringItem:
    """A PAM string item as a property; None reads and writes a NULL item."""

    __slots__ = ("item", "doc")

    def __init__(self, item: Item, doc: str) -> None:
        self.item = item
        self.doc = doc

    @overload
    def __get__(self, app: None, owner: type) -> _StringItem: ...
    @overload
    def __get__(self, app: _HasItems, owner: type) -> str | None: ...
    def __get__(self, app: _HasItems | None, owner: type) -> _StringItem | str | None:
        if app is None:
            return self
        return app.get_item(self.item)

    def __set__(self, app: _HasItems, value: str | None) -> None:
        app.set_item(self.item, value)


class PamApplication:
    """A PAM transaction: subclass it and write ``conversation``.

    ``PamApplication(service, user=None, *, confdir=None, encoding="utf-8")``
    starts a handle for ``service`` (looked up in ``/etc/pam.d``, or in
    ``confdir`` when given). Every phase raises the :class:`PamError` subclass
    of the code libpam returned. Call :meth:`end` when done, or use the object
    as a context manager.
    """

    _handle: _libpam.Handle | None = None

    #: The confdir used when none is given. None means libpam's own
    #: (/etc/pam.d). Meant for tests of code that creates applications
    #: itself: see :func:`pamphlet.testing.TemporaryService.as_default`.
    default_confdir: str | None = None

    def __init__(
        self,
        service: str | None = None,
        user: str | None = None,
        *,
        confdir: str | None = None,
        encoding: str = "utf-8",
        service_name: str | None = None,
        user_name: str | None = None,
    ) -> None:
        # service_name and user_name are the API document's names.
        if service is None:
            service = service_name
        if user is None:
            user = user_name
        if service is None:
            raise TypeError("PamApplication needs a service name")
        if encoding != "utf-8":
            "".encode(encoding)  # an unknown encoding fails here, not mid-phase
        self._encoding = encoding
        self._lock = _RLock()  # threading.RLock without its Python wrapper frame
        self._conversation_error: BaseException | None = None
        self._last_status = _SUCCESS
        self._session_open = False
        self._credentials_established = False
        self._fail_delay: FailDelay | None = None
        self._inside_phase = False
        raw_service = self._encode(service, "service name")
        raw_user = None if user is None else self._encode(user, "user name")
        if confdir is None:
            confdir = self.default_confdir
        raw_confdir = None if confdir is None else self._encode(str(confdir), "confdir")
        key = conversation.register(self)
        conv = _libpam.make_conv(conversation.CONVERSATION_CALLBACK, key)
        try:
            code, pointer = _libpam.start(raw_service, raw_user, conv, raw_confdir)
        except BaseException:
            conversation.unregister(key)
            raise
        if code != _SUCCESS:
            conversation.unregister(key)
            raise error_class(code)(
                f"pam_start failed: {_libpam.strerror(pointer, code)}", code=code
            )
        self._key = key
        self._handle = _libpam.Handle(pointer, conv)

    @functools.cached_property
    def environ(self) -> PamEnvironment:
        """The PAM environment, a MutableMapping like os.environ."""
        # Made on first use: it refers back to the application, and that
        # cycle would leave every transaction to the cyclic collector.
        return PamEnvironment(self)

    # -- what subclasses write ---------------------------------------------

    def conversation(self, messages: list[Message]) -> Iterable[str | bytes | None]:
        """Answer the PAM stack: one answer per message, ``""`` for non-prompts.

        May return a list or be a generator. The default refuses to converse,
        which fails the phase with a ConversationError.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no conversation method, but the PAM stack sent {messages!r}"
        )

    # -- plumbing shared with environ and the callbacks ---------------------

    def _answer(self, messages: list[Message]) -> Any:
        return self.conversation(messages)

    def _fail_delay_called(self, status: int, delay_usec: int) -> None:
        if self._fail_delay is not None:
            self._fail_delay(status, delay_usec)

    def _encode(self, value: str, what: str) -> bytes:
        if not isinstance(value, str):
            raise TypeError(f"the {what} must be str, not {type(value).__name__}")
        raw = value.encode(self._encoding, "surrogateescape")
        # 0, not b"\0": bytes.__contains__ tries an int first (no TypeError to clear)
        if 0 in raw:
            raise ValueError(f"the {what} {value!r} contains a NUL byte")
        return raw

    def _decode(self, raw: bytes) -> str:
        return raw.decode(self._encoding, "surrogateescape")

    def _require_handle(self) -> Any:
        handle = self._handle
        if handle is None:
            raise HandleEndedError(f"this {type(self).__name__} has been ended; start a new one")
        return handle.pointer

    def _refuse_reentry(self, action: str) -> None:
        # Called from inside the conversation, libpam would be re-entered
        # mid-phase (or, for end(), free the handle it is still using).
        if self._inside_phase:
            raise RuntimeError(f"cannot {action} from inside the conversation of a running phase")

    def _check(self, code: int) -> None:
        if code != _SUCCESS:
            handle = self._handle
            pointer = handle.pointer if handle is not None else _libpam.NULL_HANDLE
            raise error_class(code)(_libpam.strerror(pointer, code), code=code)

    def _run_phase(self, function: Callable[[Any, int], int], flags: int) -> None:
        with self._lock:
            handle = self._handle  # _require_handle inlined: every phase passes here
            pointer = handle.pointer if handle is not None else self._require_handle()
            if self._inside_phase:  # the check inlined, the error from _refuse_reentry
                self._refuse_reentry("run a PAM phase")
            self._inside_phase = True
            self._conversation_error = None
            try:
                code = function(pointer, flags)
            finally:
                self._inside_phase = False
            self._last_status = code
            failure = self._conversation_error
            if failure is not None:
                self._conversation_error = None
                if not isinstance(failure, Exception):
                    raise failure  # KeyboardInterrupt, SystemExit: as they are
                raise ConversationError(
                    f"the conversation failed ({failure!r}); "
                    f"libpam said: {_libpam.strerror(pointer, code)}"
                ) from failure
            if code != _SUCCESS:
                raise error_class(code)(_libpam.strerror(pointer, code), code=code)

    # -- the phases ----------------------------------------------------------

    def authenticate(
        self, silent: bool = False, disallow_null_authtoken: bool = False, *, flags: int = 0
    ) -> Any:
        """pam_authenticate: who is the user? May converse."""
        if silent:
            flags |= _SILENT
        if disallow_null_authtoken:
            flags |= _DISALLOW_NULL_AUTHTOK
        self._run_phase(_libpam.pam_authenticate, flags)

    def account_management(
        self, silent: bool = False, disallow_null_authtoken: bool = False, *, flags: int = 0
    ) -> Any:
        """pam_acct_mgmt: may this account log in now (expiry, access rules)?"""
        if silent:
            flags |= _SILENT
        if disallow_null_authtoken:
            flags |= _DISALLOW_NULL_AUTHTOK
        self._run_phase(_libpam.pam_acct_mgmt, flags)

    def acct_mgmt(
        self, silent: bool = False, disallow_null_authtoken: bool = False, *, flags: int = 0
    ) -> Any:
        """The API document's other name of :meth:`account_management`."""
        return self.account_management(silent, disallow_null_authtoken, flags=flags)

    def open_session(self, silent: bool = False, *, flags: int = 0) -> Any:
        """pam_open_session; :meth:`end` closes it if you do not."""
        if silent:
            flags |= _SILENT
        self._run_phase(_libpam.pam_open_session, flags)
        self._session_open = True

    def close_session(self, silent: bool = False, *, flags: int = 0) -> Any:
        """pam_close_session."""
        self._session_open = False
        if silent:
            flags |= _SILENT
        self._run_phase(_libpam.pam_close_session, flags)

    def change_authtoken(
        self, silent: bool = False, change_expired_authtoken: bool = False, *, flags: int = 0
    ) -> Any:
        """pam_chauthtok: change the password (or other token). Converses."""
        if silent:
            flags |= _SILENT
        if change_expired_authtoken:
            flags |= _CHANGE_EXPIRED_AUTHTOK
        self._run_phase(_libpam.pam_chauthtok, flags)

    def setcred(self, flags: int) -> Any:
        """pam_setcred with raw flags; the four methods below name them."""
        action = flags & _CRED_ACTIONS
        if action == _DELETE_CRED:
            self._credentials_established = False
        self._run_phase(_libpam.pam_setcred, flags)
        if action and action != _DELETE_CRED:
            self._credentials_established = True

    def _setcred(self, action: int, silent: bool, flags: int) -> None:
        flags |= action
        if silent:
            flags |= _SILENT
        self.setcred(flags)

    def initialize_credentials(self, silent: bool = False, *, flags: int = 0) -> Any:
        """pam_setcred(PAM_ESTABLISH_CRED); :meth:`end` deletes them."""
        self._setcred(_ESTABLISH_CRED, silent, flags)

    def delete_credentials(self, silent: bool = False, *, flags: int = 0) -> Any:
        """pam_setcred(PAM_DELETE_CRED)."""
        self._setcred(_DELETE_CRED, silent, flags)

    def reinitialize_credentials(self, silent: bool = False, *, flags: int = 0) -> Any:
        """pam_setcred(PAM_REINITIALIZE_CRED)."""
        self._setcred(_REINITIALIZE_CRED, silent, flags)

    def refresh_credentials(self, silent: bool = False, *, flags: int = 0) -> Any:
        """pam_setcred(PAM_REFRESH_CRED)."""
        self._setcred(_REFRESH_CRED, silent, flags)

    def get_user(self, prompt: str | None = None) -> str | None:
        """pam_get_user: the user item, asking through the conversation if unset."""
        raw_prompt = None if prompt is None else self._encode(prompt, "prompt")
        result: list[bytes | None] = []

        def call(pointer: Any, _flags: int) -> int:
            code, user = _libpam.get_user(pointer, raw_prompt)
            result.append(user)
            return code

        with self._lock:
            last_status = self._last_status
            self._run_phase(call, 0)
            self._last_status = last_status  # not a phase: end() keeps its status
        user = result[0] if result else None
        return None if user is None else self._decode(user)

    # -- ending --------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """True once :meth:`end` has run."""
        return self._handle is None

    def end(self) -> None:
        """Close an open session, delete established credentials, then pam_end.

        Idempotent. Failures of the implied close and delete are not raised:
        call them yourself first if you need to know.
        """
        with self._lock:
            handle = self._handle
            if handle is None:
                return
            if self._inside_phase:
                self._refuse_reentry("end the handle")
            try:
                if self._session_open:
                    try:
                        self.close_session()
                    except Exception:
                        pass
                if self._credentials_established:
                    try:
                        self.delete_credentials()
                    except Exception:
                        pass
            finally:
                self._handle = None
                code = _libpam.pam_end(handle.pointer, self._last_status)
                conversation.unregister(self._key)
            if code != _SUCCESS:
                raise error_class(code)(
                    f"pam_end failed: {_libpam.strerror(_libpam.NULL_HANDLE, code)}",
                    code=code,
                )

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end()

    def __del__(self) -> None:
        if self._handle is None:
            return
        try:
            warnings.warn(
                f"{type(self).__name__} for service {self.service!r} was never ended",
                ResourceWarning,
                source=self,
                stacklevel=2,
            )
        except Exception:
            pass
        try:
            # Weak references may already be gone in a cyclic collection; the
            # conversation must still find this object while end() runs.
            conversation.reregister(self._key, self)
            self._end_in_finalizer()
        except BaseException:
            pass

    def _end_in_finalizer(self) -> None:
        """How __del__ ends the handle; a flavour whose end() is a coroutine overrides it."""
        self.end()

    def __repr__(self) -> str:
        if self._handle is None:
            return f"<{type(self).__name__} (ended)>"
        return f"<{type(self).__name__} service={self.service!r} user={self.user!r}>"

    # -- items ---------------------------------------------------------------

    def get_item(self, item: Item) -> str | None:
        """A string item by number (``pamphlet.Item``); None when unset."""
        with self._lock:
            code, raw = _libpam.get_string_item(self._require_handle(), item)
            self._check(code)
        return None if raw is None else self._decode(raw)

    def set_item(self, item: Item, value: str | None) -> None:
        """Set a string item; None sets it to NULL."""
        raw = None if value is None else self._encode(value, f"item {Item(item).name}")
        with self._lock:
            self._check(_libpam.set_string_item(self._require_handle(), item, raw))

    authtok_type = _StringItem(
        Item.AUTHTOK_TYPE, 'The token\'s type, the "UNIX" in "New UNIX password".'
    )
    rhost = _StringItem(Item.RHOST, "The host the user connects from.")
    ruser = _StringItem(Item.RUSER, "The requesting user, often None.")
    service = _StringItem(Item.SERVICE, "The PAM service, which names the stack.")
    tty = _StringItem(Item.TTY, "The terminal the user is on.")
    user = _StringItem(Item.USER, "The user's login name; modules may change it.")
    user_prompt = _StringItem(Item.USER_PROMPT, "The prompt for the login name.")
    xdisplay = _StringItem(Item.XDISPLAY, "The X display the user is on.")

    @property
    def xauthdata(self) -> tuple[str, bytes] | None:
        """The X authentication item as ``(name, data)``, e.g. ("MIT-MAGIC-COOKIE-1", cookie)."""
        with self._lock:
            code, value = _libpam.get_xauthdata(self._require_handle())
            self._check(code)
        if value is None:
            return None
        return self._decode(value[0]), value[1]

    @xauthdata.setter
    def xauthdata(self, value: tuple[str, bytes] | None) -> None:
        raw = None
        if value is not None:
            name, data = value
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError("xauthdata's data must be bytes")
            raw = (self._encode(name, "xauthdata name"), bytes(data))
        with self._lock:
            self._check(_libpam.set_xauthdata(self._require_handle(), raw))

    @property
    def fail_delay(self) -> FailDelay | None:
        """A callable ``f(status, delay_usec)`` libpam calls instead of sleeping.

        libpam calls it after every phase that a module asked to delay
        (with status 0 after a success too). None restores libpam's own sleep.
        """
        return self._fail_delay

    @fail_delay.setter
    def fail_delay(self, function: FailDelay | None) -> None:
        if function is not None and not callable(function):
            raise TypeError("fail_delay must be a callable f(status, delay_usec) or None")
        with self._lock:
            callback = None if function is None else conversation.FAIL_DELAY_CALLBACK
            self._check(_libpam.set_fail_delay(self._require_handle(), callback))
            self._fail_delay = function


PamAplication = PamApplication  # the API document's spelling
