"""pamphlet: write PAM applications in Python.

Subclass :class:`PamApplication`, write ``conversation``, call the phases.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .constants import (
    PAM_MAX_MSG_SIZE,
    PAM_MAX_NUM_MSG,
    PAM_MAX_RESP_SIZE,
    Flag,
    Item,
    MessageStyle,
    ReturnCode,
)
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
    ConversationAborted,
    ConversationAgain,
    ConversationError,
    ConversationStateError,
    CredenrialsUnavailable,
    CredentialError,
    CredentialExpired,
    CredentialsUnavailable,
    HandleBusyError,
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
    UnansweredPromptError,
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
    "diagnose",
    "UnansweredPromptError",
]

if TYPE_CHECKING:
    from .aio import AsyncPamApplication, FailDelayPolicy, libpam_delay
    from .application import FailDelay, PamAplication, PamApplication
    from .doctor import diagnose
    from .environ import PamEnvironment
    from .simple import authenticate, change_password
    from .threaded import ThreadedPamApplication

# The names below load on first use. Those that drive a handle load libpam,
# which the pytest plugin (pamphlet.testing) must not do when it is merely
# registered; and asyncio costs tens of milliseconds to import, which a
# command line tool or a threaded server should not pay.
_LAZY = {
    "PamApplication": "application",
    "PamAplication": "application",
    "FailDelay": "application",
    "PamEnvironment": "environ",
    "ThreadedPamApplication": "threaded",
    "authenticate": "simple",
    "change_password": "simple",
    "AsyncPamApplication": "aio",
    "FailDelayPolicy": "aio",
    "libpam_delay": "aio",
    "diagnose": "doctor",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pamphlet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
