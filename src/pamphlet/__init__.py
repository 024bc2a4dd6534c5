"""pamphlet: write PAM applications in Python.

Subclass :class:`PamApplication`, write ``conversation``, call the phases.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .application import FailDelay, PamAplication, PamApplication
from .constants import (
    PAM_MAX_MSG_SIZE,
    PAM_MAX_NUM_MSG,
    PAM_MAX_RESP_SIZE,
    Flag,
    Item,
    MessageStyle,
    ReturnCode,
)
from .environ import PamEnvironment
from .errors import (
    Abort,
    AccountExpired,
    AuthenticationError,
    AuthinfoUnavailable,
    AuthTokenAgingDisabled,
    AuthTokenExpired,
    AuthTokenLockBusy,
    AuthTokenManipulationError,
    AuthTokenRecoveryError,
    BadItem,
    BufferError,
    ConversationAgain,
    ConversationError,
    CredenrialsUnavailable,
    CredentialError,
    CredentialExpired,
    CredentialsUnavailable,
    HandleEndedError,
    Ignore,
    Incomplete,
    InsufficientCredentials,
    MaxTriesExceeded,
    ModuleUnknown,
    NewAuthTokenRequired,
    NoModuleData,
    OpenError,
    PamError,
    PermissionDenied,
    ServiceError,
    SessionError,
    SymbolError,
    SystemError,
    TryAgain,
    UserUnknown,
    error_class,
)
from .message import (
    PAM_BINARY_PROMPT,
    PAM_ERROR_MSG,
    PAM_PROMPT_ECHO_OFF,
    PAM_PROMPT_ECHO_ON,
    PAM_RADIO_TYPE,
    PAM_TEXT_INFO,
    Message,
)
from .simple import UnansweredPromptError, authenticate, change_password
from .threaded import (
    ConversationAborted,
    ConversationStateError,
    HandleBusyError,
    ThreadedPamApplication,
)

__version__ = "0.1.0"

__all__ = [
    "FailDelay",
    "PamAplication",
    "PamApplication",
    "PamEnvironment",
    "ThreadedPamApplication",
    "AsyncPamApplication",
    "FailDelayPolicy",
    "libpam_delay",
    "HandleBusyError",
    "ConversationAborted",
    "ConversationStateError",
    "Flag",
    "Item",
    "MessageStyle",
    "ReturnCode",
    "PAM_MAX_MSG_SIZE",
    "PAM_MAX_NUM_MSG",
    "PAM_MAX_RESP_SIZE",
    "Message",
    "PAM_BINARY_PROMPT",
    "PAM_ERROR_MSG",
    "PAM_PROMPT_ECHO_OFF",
    "PAM_PROMPT_ECHO_ON",
    "PAM_RADIO_TYPE",
    "PAM_TEXT_INFO",
    "PamError",
    "HandleEndedError",
    "error_class",
    "Abort",
    "AccountExpired",
    "AuthenticationError",
    "AuthinfoUnavailable",
    "AuthTokenAgingDisabled",
    "AuthTokenExpired",
    "AuthTokenLockBusy",
    "AuthTokenManipulationError",
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
    "authenticate",
    "change_password",
    "UnansweredPromptError",
]

if TYPE_CHECKING:
    from .aio import AsyncPamApplication, FailDelayPolicy, libpam_delay

# asyncio costs tens of milliseconds to import; a command line tool or a
# threaded server should not pay for it. The async names load on first use.
_LAZY = {"AsyncPamApplication": "aio", "FailDelayPolicy": "aio", "libpam_delay": "aio"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pamphlet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
