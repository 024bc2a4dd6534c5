"""PamError, one subclass per PAM return code, and pamphlet's own errors."""

from __future__ import annotations

import builtins

from .constants import ReturnCode
from .message import Message

__all__ = [
    "PamError",
    "HandleEndedError",
    "HandleBusyError",
    "ConversationAborted",
    "ConversationStateError",
    "UnansweredPromptError",
    "error_class",
    "pam_error",
    "Abort",
    "AccountExpired",
    "AuthenticationError",
    "AuthinfoUnavailable",
    "AuthTokenAgingDisabled",
    "AuthTokenManipulationError",
    "AuthTokenExpired",
    "AuthTokenLockBusy",
    "AuthTokenRecoveryError",
    "BadItem",
    "BufferError",
    "ConversationAgain",
    "ConversationError",
    "CredentialError",
    "CredentialExpired",
    "CredentialsUnavailable",
    "CredenrialsUnavailable",
    "Ignore",
    "Incomplete",
    "InsufficientCredentials",
    "MaxTriesExceeded",
    "ModuleUnknown",
    "NewAuthTokenRequired",
    "NoModuleData",
    "OpenError",
    "PermissionDenied",
    "ServiceError",
    "SessionError",
    "SymbolError",
    "SystemError",
    "TryAgain",
    "UserUnknown",
]


class PamError(Exception):
    """A PAM call failed. ``code`` is PAM's return code, ``strerror`` libpam's text."""

    code: int = -1

    def __init__(self, message: str | None = None, *, code: int | None = None) -> None:
        if code is not None:
            self.code = code
        self.strerror = message or f"PAM error {self.code}"
        super().__init__(self.strerror)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.strerror, self.code))


def _rebuild(cls: type[PamError], message: str, code: int) -> PamError:
    return cls(message, code=code)


class HandleEndedError(builtins.RuntimeError):
    """The application was used after ``end()``."""


class HandleBusyError(builtins.RuntimeError):
    """The handle is in use by a phase running inside libpam on another thread.

    Raised instead of waiting: a phase may run for long (a module doing
    network I/O, libpam's failure delay), and an event loop must not stall
    behind it. Items and the environment can be used between phases, and while
    the phase waits in its conversation.
    """


class ConversationAborted(Exception):
    """The conversation was released without answers: the peer went away.

    libpam gets PAM_CONV_ERR and the phase raises ConversationError chained to
    this exception.
    """


class ConversationStateError(builtins.RuntimeError):
    """get_data or set_input was called when there is nothing to read or answer."""


class UnansweredPromptError(ValueError):
    """The PAM stack asked something that this caller cannot answer.

    ``prompt`` is the :class:`~pamphlet.Message` it asked. The phase that
    asked fails with a ConversationError chained to this exception.
    """

    def __init__(
        self,
        prompt: Message,
        who: str,
        why: str,
        *,
        how: str = "answer it in the conversation of a pamphlet.PamApplication subclass",
    ) -> None:
        self.prompt = prompt
        super().__init__(
            f"{who} cannot answer the PAM prompt {str(prompt)!r} "
            f"({prompt.style.name}): {why}; {how}"
        )


class OpenError(PamError):
    code = ReturnCode.OPEN_ERR


class SymbolError(PamError):
    code = ReturnCode.SYMBOL_ERR


class ServiceError(PamError):
    code = ReturnCode.SERVICE_ERR


class SystemError(PamError):  # noqa: A001 - the API document's name
    code = ReturnCode.SYSTEM_ERR


class BufferError(PamError):  # noqa: A001 - the API document's name
    code = ReturnCode.BUF_ERR


class PermissionDenied(PamError):
    code = ReturnCode.PERM_DENIED


class AuthenticationError(PamError):
    code = ReturnCode.AUTH_ERR


class InsufficientCredentials(PamError):
    code = ReturnCode.CRED_INSUFFICIENT


class AuthinfoUnavailable(PamError):
    code = ReturnCode.AUTHINFO_UNAVAIL


class UserUnknown(PamError):
    code = ReturnCode.USER_UNKNOWN


class MaxTriesExceeded(PamError):
    code = ReturnCode.MAXTRIES


class NewAuthTokenRequired(PamError):
    code = ReturnCode.NEW_AUTHTOK_REQD


class AccountExpired(PamError):
    code = ReturnCode.ACCT_EXPIRED


class SessionError(PamError):
    code = ReturnCode.SESSION_ERR


class CredentialsUnavailable(PamError):
    code = ReturnCode.CRED_UNAVAIL


CredenrialsUnavailable = CredentialsUnavailable  # the API document's spelling


class CredentialExpired(PamError):
    code = ReturnCode.CRED_EXPIRED


class CredentialError(PamError):
    code = ReturnCode.CRED_ERR


class NoModuleData(PamError):
    code = ReturnCode.NO_MODULE_DATA


class ConversationError(PamError):
    code = ReturnCode.CONV_ERR


class AuthTokenManipulationError(PamError):
    code = ReturnCode.AUTHTOK_ERR


class AuthTokenRecoveryError(PamError):
    code = ReturnCode.AUTHTOK_RECOVERY_ERR


class AuthTokenLockBusy(PamError):
    code = ReturnCode.AUTHTOK_LOCK_BUSY


class AuthTokenAgingDisabled(PamError):
    code = ReturnCode.AUTHTOK_DISABLE_AGING


class TryAgain(PamError):
    code = ReturnCode.TRY_AGAIN


class Ignore(PamError):
    code = ReturnCode.IGNORE


class Abort(PamError):
    code = ReturnCode.ABORT


class AuthTokenExpired(PamError):
    code = ReturnCode.AUTHTOK_EXPIRED


class ModuleUnknown(PamError):
    code = ReturnCode.MODULE_UNKNOWN


class BadItem(PamError):
    code = ReturnCode.BAD_ITEM


class ConversationAgain(PamError):
    code = ReturnCode.CONV_AGAIN


class Incomplete(PamError):
    code = ReturnCode.INCOMPLETE


_BY_CODE: dict[int, type[PamError]] = {cls.code: cls for cls in PamError.__subclasses__()}


def error_class(code: int) -> type[PamError]:
    """The exception class of a PAM return code (PamError for unknown codes)."""
    return _BY_CODE.get(code, PamError)


def pam_error(code: int, text: str) -> PamError:
    """The exception for a failed libpam call: ``raise pam_error(code, text)``.

    The one place where a PAM return code becomes an exception.
    """
    return error_class(code)(text, code=code)
