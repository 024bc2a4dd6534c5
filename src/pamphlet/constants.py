"""PAM's numbers, as enums.

These are Linux-PAM's values (``security/_pam_types.h``). OpenPAM numbers
several of them differently; if pamphlet ever loads OpenPAM, its table goes
beside this one and :mod:`pamphlet._libpam` picks the table that matches the
library it loaded.
"""

from __future__ import annotations

import enum

__all__ = [
    "Flag",
    "Item",
    "MessageStyle",
    "ReturnCode",
    "Phase",
    "PAM_MAX_NUM_MSG",
    "PAM_MAX_MSG_SIZE",
    "PAM_MAX_RESP_SIZE",
    "STRING_ITEMS",
    "phase_flags",
]


class ReturnCode(enum.IntEnum):
    """What every libpam call returns."""

    SUCCESS = 0
    OPEN_ERR = 1
    SYMBOL_ERR = 2
    SERVICE_ERR = 3
    SYSTEM_ERR = 4
    BUF_ERR = 5
    PERM_DENIED = 6
    AUTH_ERR = 7
    CRED_INSUFFICIENT = 8
    AUTHINFO_UNAVAIL = 9
    USER_UNKNOWN = 10
    MAXTRIES = 11
    NEW_AUTHTOK_REQD = 12
    ACCT_EXPIRED = 13
    SESSION_ERR = 14
    CRED_UNAVAIL = 15
    CRED_EXPIRED = 16
    CRED_ERR = 17
    NO_MODULE_DATA = 18
    CONV_ERR = 19
    AUTHTOK_ERR = 20
    AUTHTOK_RECOVERY_ERR = 21
    AUTHTOK_LOCK_BUSY = 22
    AUTHTOK_DISABLE_AGING = 23
    TRY_AGAIN = 24
    IGNORE = 25
    ABORT = 26
    AUTHTOK_EXPIRED = 27
    MODULE_UNKNOWN = 28
    BAD_ITEM = 29
    CONV_AGAIN = 30
    INCOMPLETE = 31


class Phase(enum.StrEnum):
    """The six libpam calls that run a PAM stack; the value is the name after ``pam_``."""

    AUTHENTICATE = "authenticate"
    SETCRED = "setcred"
    ACCT_MGMT = "acct_mgmt"
    OPEN_SESSION = "open_session"
    CLOSE_SESSION = "close_session"
    CHAUTHTOK = "chauthtok"


class MessageStyle(enum.IntEnum):
    """The style of one conversation message."""

    PROMPT_ECHO_OFF = 1
    PROMPT_ECHO_ON = 2
    ERROR_MSG = 3
    TEXT_INFO = 4
    RADIO_TYPE = 5  # Linux-PAM only: a yes/no/maybe question
    BINARY_PROMPT = 7  # Linux-PAM only: a length-prefixed binary packet


class Item(enum.IntEnum):
    """The items an application can get and set on a handle."""

    SERVICE = 1
    USER = 2
    TTY = 3
    RHOST = 4
    CONV = 5
    AUTHTOK = 6
    OLDAUTHTOK = 7
    RUSER = 8
    USER_PROMPT = 9
    FAIL_DELAY = 10
    XDISPLAY = 11
    XAUTHDATA = 12
    AUTHTOK_TYPE = 13


class Flag(enum.IntFlag):
    """Flags passed to the phases."""

    NONE = 0
    DISALLOW_NULL_AUTHTOK = 0x0001
    ESTABLISH_CRED = 0x0002
    DELETE_CRED = 0x0004
    REINITIALIZE_CRED = 0x0008
    REFRESH_CRED = 0x0010
    CHANGE_EXPIRED_AUTHTOK = 0x0020
    SILENT = 0x8000


PAM_MAX_NUM_MSG = 32
PAM_MAX_MSG_SIZE = 512
PAM_MAX_RESP_SIZE = 512

#: The items whose value is a C string; the others (CONV, FAIL_DELAY,
#: XAUTHDATA) are structs or function pointers with properties of their own.
STRING_ITEMS = frozenset(
    (
        Item.SERVICE,
        Item.USER,
        Item.TTY,
        Item.RHOST,
        Item.AUTHTOK,
        Item.OLDAUTHTOK,
        Item.RUSER,
        Item.USER_PROMPT,
        Item.XDISPLAY,
        Item.AUTHTOK_TYPE,
    )
)


def phase_flags(
    flags: int = 0,
    silent: bool = False,
    disallow_null_authtoken: bool = False,
    change_expired_authtoken: bool = False,
) -> int:
    """The raw flags of a phase: ``flags`` with the API document's keywords folded in.

    Plain ints: an IntFlag's ``|`` runs Python code on every phase.
    """
    if silent:
        flags |= _SILENT
    if disallow_null_authtoken:
        flags |= _DISALLOW_NULL_AUTHTOK
    if change_expired_authtoken:
        flags |= _CHANGE_EXPIRED_AUTHTOK
    return int(flags)


_SILENT = int(Flag.SILENT)
_DISALLOW_NULL_AUTHTOK = int(Flag.DISALLOW_NULL_AUTHTOK)
_CHANGE_EXPIRED_AUTHTOK = int(Flag.CHANGE_EXPIRED_AUTHTOK)
