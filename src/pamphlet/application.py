"""PamApplication: one PAM handle, its phases, its items and its environment.

The phases are written once, as the functions below the base class; each
flavour (this module's PamApplication, ThreadedPamApplication,
AsyncPamApplication) takes them as they are or wraps them, and all of them
drive the handle through one private :class:`~pamphlet._transaction.Transaction`.
"""

from __future__ import annotations

import _thread
import functools
import os
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, ClassVar, Self, overload

from . import conversation
from ._transaction import StartTransport, Transaction, c_string
from .constants import Flag, Item, Phase, phase_flags
from .environ import PamEnvironment
from .message import Message

__all__ = ["PamApplication", "PamAplication", "FailDelay"]

FailDelay = Callable[[int, int], object]
"""``f(status, delay_usec)``: called by libpam instead of sleeping after a failure."""


class _StringItem:
    """A PAM string item as a property; None reads and writes a NULL item."""

    def __init__(self, item: Item, doc: str) -> None:
        self.item = item
        self.__doc__ = doc  # what help() and the API reference show for this item

    @overload
    def __get__(self, app: None, owner: type) -> _StringItem: ...
    @overload
    def __get__(self, app: ApplicationBase, owner: type) -> str | None: ...
    def __get__(self, app: ApplicationBase | None, owner: type) -> _StringItem | str | None:
        if app is None:
            return self
        return app._transaction.get_item(self.item)

    def __set__(self, app: ApplicationBase, value: str | None) -> None:
        app._transaction.set_item(self.item, value)


class ApplicationBase:
    """What every flavour of PAM application shares: the handle, items, environment.

    ``Flavour(service, user=None, *, confdir=None, encoding="utf-8", broker=None,
    broker_uid=None)`` starts a handle for ``service`` (looked up in
    ``/etc/pam.d``, or in ``confdir`` when given). With ``broker=PATH`` the
    handle lives in a worker of the ``pamphlet broker`` listening on PATH (see
    the guide's "Unprivileged servers: the broker"); the confdir is then the
    broker's. The process listening there must run as root, or as
    ``broker_uid`` when given (a broker in a container or a test), else
    :class:`~pamphlet.broker.BrokerNotTrusted` is raised before anything is
    sent. The phases are the flavour's own.
    """

    #: The confdir used when none is given. None means libpam's own
    #: (/etc/pam.d). Meant for tests of code that creates applications
    #: itself: see :func:`pamphlet.testing.TemporaryService.as_default`.
    #: Set on ``PamApplication``, it serves every flavour.
    default_confdir: ClassVar[str | None] = None

    # What serialises the use of the handle; the flavours that run phases on
    # threads of their own use their guard.
    # (_thread's own: threading.RLock is a Python function in front of it.)
    _new_guard: ClassVar[Callable[[], AbstractContextManager[Any]]] = _thread.RLock

    _transaction: Transaction

    def __init__(
        self,
        service: str | None = None,
        user: str | None = None,
        *,
        confdir: str | None = None,
        encoding: str = "utf-8",
        service_name: str | None = None,
        user_name: str | None = None,
        broker: str | os.PathLike[str] | None = None,
        broker_uid: int | None = None,
    ) -> None:
        # service_name and user_name are the API document's names.
        if service is None:
            service = service_name
        if user is None:
            user = user_name
        if service is None:
            raise TypeError(f"{type(self).__name__} needs a service name")
        self._fail_delay: FailDelay | None = None
        self._transaction = Transaction(
            service,
            user,
            encoding=encoding,
            application=self,
            guard=type(self)._new_guard(),
            start=self._transport_start(confdir, broker, broker_uid, encoding),
        )

    def _transport_start(
        self,
        confdir: str | os.PathLike[str] | None,
        broker: str | os.PathLike[str] | None,
        broker_uid: int | None,
        encoding: str,
    ) -> StartTransport:
        """What carries the handle: libpam in this process, or a worker of the broker."""
        if broker is not None:
            if confdir is not None:
                raise ValueError(
                    "confdir= cannot be used with broker=: the broker reads its own PAM "
                    "configuration"
                )
            from .broker import client

            return functools.partial(client.start, os.fspath(broker), broker_uid=broker_uid)
        if confdir is None:
            confdir = self.default_confdir or PamApplication.default_confdir
        raw_confdir = None if confdir is None else c_string(str(confdir), "confdir", encoding)
        return functools.partial(conversation.open_in_process, raw_confdir)

    @property
    def encoding(self) -> str:
        """How str crosses to libpam's C strings (``surrogateescape`` for undecodable bytes)."""
        return self._transaction.encoding

    @functools.cached_property
    def environ(self) -> PamEnvironment:
        """The PAM environment, a MutableMapping like os.environ."""
        # Made on first use: most transactions never look.
        return PamEnvironment(self._transaction)

    # -- what the transaction asks of the application ------------------------------

    def _answer(self, messages: list[Message]) -> Any:
        """The answers of the flavour's conversation (checked by the transaction)."""
        raise NotImplementedError

    def _on_fail_delay(self, status: int, delay_usec: int) -> None:
        if self._fail_delay is not None:
            self._fail_delay(status, delay_usec)

    # -- ending ------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """True once the handle has been ended."""
        return self._transaction.ended

    #: Whether ending closes an open session and deletes established
    #: credentials first. The command line tool, like pamtester, runs only the
    #: operations it is told to.
    _end_closes: ClassVar[bool] = True

    def __del__(self) -> None:
        transaction = getattr(self, "_transaction", None)
        if transaction is None or transaction.ended:
            return
        try:
            warnings.warn(
                f"{type(self).__name__} was never ended",
                ResourceWarning,
                source=self,
                stacklevel=2,
            )
        except Exception:
            pass
        try:
            transaction.end(close=self._end_closes, converse=False)
        except BaseException:
            pass

    def __repr__(self) -> str:
        if self.ended:
            return f"<{type(self).__name__} (ended)>"
        return f"<{type(self).__name__} service={self.service!r} user={self.user!r}>"

    # -- items -------------------------------------------------------------------------

    def get_item(self, item: Item) -> str | None:
        """A string item by number (``pamphlet.Item``); None when unset.

        Only string items: ``Item.CONV``, ``Item.FAIL_DELAY`` and
        ``Item.XAUTHDATA`` raise ValueError (see :attr:`xauthdata` and
        :attr:`fail_delay`).
        """
        return self._transaction.get_item(item)

    def set_item(self, item: Item, value: str | None) -> None:
        """Set a string item; None sets it to NULL. Only string items (see get_item)."""
        self._transaction.set_item(item, value)

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
        return self._transaction.get_xauthdata()

    @xauthdata.setter
    def xauthdata(self, value: tuple[str, bytes] | None) -> None:
        self._transaction.set_xauthdata(value)

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
        self._transaction.set_fail_delay(self._routes_fail_delay(function))
        self._fail_delay = function

    def _routes_fail_delay(self, function: FailDelay | None) -> bool:
        """Whether libpam's delay comes to _on_fail_delay once ``function`` is set."""
        return function is not None


# -- the phases, written once ------------------------------------------------------------
# Module-level functions, so that each flavour can take them as methods or wrap them.


# Module constants: an enum member looked up on its class costs more than
# the rest of the phase's Python code (Python 3.11).
_AUTHENTICATE, _ACCT_MGMT, _SETCRED = Phase.AUTHENTICATE, Phase.ACCT_MGMT, Phase.SETCRED
_OPEN_SESSION, _CLOSE_SESSION, _CHAUTHTOK = (
    Phase.OPEN_SESSION,
    Phase.CLOSE_SESSION,
    Phase.CHAUTHTOK,
)
_ESTABLISH_CRED, _DELETE_CRED = int(Flag.ESTABLISH_CRED), int(Flag.DELETE_CRED)
_REINITIALIZE_CRED, _REFRESH_CRED = int(Flag.REINITIALIZE_CRED), int(Flag.REFRESH_CRED)


def authenticate(
    self: ApplicationBase,
    silent: bool = False,
    disallow_null_authtoken: bool = False,
    *,
    flags: int = 0,
) -> None:
    """pam_authenticate: who is the user? May converse."""
    flags = phase_flags(flags, silent, disallow_null_authtoken)
    self._transaction.run(_AUTHENTICATE, flags)


def account_management(
    self: ApplicationBase,
    silent: bool = False,
    disallow_null_authtoken: bool = False,
    *,
    flags: int = 0,
) -> None:
    """pam_acct_mgmt: may this account log in now (expiry, access rules)?"""
    flags = phase_flags(flags, silent, disallow_null_authtoken)
    self._transaction.run(_ACCT_MGMT, flags)


def open_session(self: ApplicationBase, silent: bool = False, *, flags: int = 0) -> None:
    """pam_open_session; ending the handle closes it if you do not."""
    self._transaction.run(_OPEN_SESSION, phase_flags(flags, silent))


def close_session(self: ApplicationBase, silent: bool = False, *, flags: int = 0) -> None:
    """pam_close_session."""
    self._transaction.run(_CLOSE_SESSION, phase_flags(flags, silent))


def change_authtoken(
    self: ApplicationBase,
    silent: bool = False,
    change_expired_authtoken: bool = False,
    *,
    flags: int = 0,
) -> None:
    """pam_chauthtok: change the password (or other token). Converses."""
    flags = phase_flags(flags, silent, False, change_expired_authtoken)
    self._transaction.run(_CHAUTHTOK, flags)


def setcred(self: ApplicationBase, flags: int) -> None:
    """pam_setcred with raw flags; the four methods below name them."""
    self._transaction.run(_SETCRED, int(flags))


def initialize_credentials(self: ApplicationBase, silent: bool = False, *, flags: int = 0) -> None:
    """pam_setcred(PAM_ESTABLISH_CRED); ending the handle deletes them."""
    self._transaction.run(_SETCRED, phase_flags(flags | _ESTABLISH_CRED, silent))


def delete_credentials(self: ApplicationBase, silent: bool = False, *, flags: int = 0) -> None:
    """pam_setcred(PAM_DELETE_CRED)."""
    self._transaction.run(_SETCRED, phase_flags(flags | _DELETE_CRED, silent))


def reinitialize_credentials(
    self: ApplicationBase, silent: bool = False, *, flags: int = 0
) -> None:
    """pam_setcred(PAM_REINITIALIZE_CRED)."""
    self._transaction.run(_SETCRED, phase_flags(flags | _REINITIALIZE_CRED, silent))


def refresh_credentials(self: ApplicationBase, silent: bool = False, *, flags: int = 0) -> None:
    """pam_setcred(PAM_REFRESH_CRED)."""
    self._transaction.run(_SETCRED, phase_flags(flags | _REFRESH_CRED, silent))


def get_user(self: ApplicationBase, prompt: str | None = None) -> str | None:
    """pam_get_user: the user item, asking through the conversation if unset."""
    return self._transaction.get_user(prompt)


def end(self: ApplicationBase) -> None:
    """Close an open session, delete established credentials, then pam_end.

    Idempotent. Failures of the implied close and delete are not raised:
    call them yourself first if you need to know.
    """
    self._transaction.end(close=self._end_closes)


class PamApplication(ApplicationBase):
    """A PAM transaction: subclass it and write ``conversation``.

    ``PamApplication(service, user=None, *, confdir=None, encoding="utf-8")``
    starts a handle for ``service`` (looked up in ``/etc/pam.d``, or in
    ``confdir`` when given). Every phase raises the :class:`PamError` subclass
    of the code libpam returned. Call :meth:`end` when done, or use the object
    as a context manager.
    """

    def conversation(self, messages: list[Message]) -> Iterable[str | bytes | None]:
        """Answer the PAM stack: one answer per message, ``""`` for non-prompts.

        May return a list or be a generator. The default refuses to converse,
        which fails the phase with a ConversationError.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no conversation method, but the PAM stack sent {messages!r}"
        )

    def _answer(self, messages: list[Message]) -> Any:
        return self.conversation(messages)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The transaction asks _answer; a subclass's conversation is that, as it
        # is (function, staticmethod or classmethod), with no frame in between.
        if "conversation" in cls.__dict__:
            cls._answer = cls.__dict__["conversation"]  # type: ignore[method-assign]

    authenticate = authenticate
    account_management = account_management
    acct_mgmt = account_management
    open_session = open_session
    close_session = close_session
    change_authtoken = change_authtoken
    setcred = setcred
    initialize_credentials = initialize_credentials
    delete_credentials = delete_credentials
    reinitialize_credentials = reinitialize_credentials
    refresh_credentials = refresh_credentials
    get_user = get_user
    end = end

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end()


PamAplication = PamApplication  # the API document's spelling
