"""The one module that knows C: libpam's and libc's prototypes and structs.

Everything above this module calls the typed functions defined here and never
sees a ctypes pointer. Memory that libpam will free is allocated here with the
process's allocator (the one libpam frees with); memory libpam hands over is
copied and freed here.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    byref,
    c_char_p,
    c_int,
    c_size_t,
    c_uint,
    c_void_p,
)
from typing import Any

from .constants import Item, Phase, ReturnCode

__all__ = [
    "LibPamNotFoundError",
    "CONV_FUNC",
    "FAIL_DELAY_FUNC",
]


class LibPamNotFoundError(ImportError):
    """The system's libpam could not be loaded."""


def _load_libpam() -> ctypes.CDLL:
    # Linux-PAM's soname first: ctypes.util.find_library runs ldconfig in a
    # subprocess and imports subprocess, shutil and a dozen extension modules;
    # every shared object loaded makes each later dlopen of a PAM module (one
    # per stack line, every transaction) search a longer list.
    try:
        return ctypes.CDLL("libpam.so.0")
    except OSError:
        pass
    from ctypes.util import find_library

    path = find_library("pam") or "libpam.so"
    try:
        return ctypes.CDLL(path)
    except OSError as exc:
        raise LibPamNotFoundError(
            f"pamphlet needs the system's PAM library ({path!r} could not be loaded: "
            f"{exc}); on Debian and Ubuntu it comes with the package libpam0g"
        ) from exc


_pam = _load_libpam()
# calloc and free are looked up in the process's global scope, as libpam and
# its modules look up the free() they call on our answers: with an allocator
# preloaded (jemalloc, tcmalloc), libc.so.6's own calloc would hand them
# memory that the preloaded free() cannot free. (A PyDLL: these never block,
# so there is no reason to release the GIL around them.)
_libc = ctypes.PyDLL(None)


class PamMessage(Structure):
    _fields_ = [("msg_style", c_int), ("msg", c_char_p)]


class PamResponse(Structure):
    # resp is a void pointer, not c_char_p: ctypes must not copy or convert
    # the malloc'd buffer that libpam will free.
    _fields_ = [("resp", c_void_p), ("resp_retcode", c_int)]


# The message and response arrays arrive as plain addresses, walked by
# read_messages and write_responses.
CONV_FUNC = CFUNCTYPE(c_int, c_int, c_void_p, c_void_p, c_void_p)
FAIL_DELAY_FUNC = CFUNCTYPE(None, c_int, c_uint, c_void_p)


class PamConv(Structure):
    _fields_ = [("conv", CONV_FUNC), ("appdata_ptr", c_void_p)]


class PamXauthData(Structure):
    _fields_ = [
        ("namelen", c_int),
        ("name", c_void_p),
        ("datalen", c_int),
        ("data", c_void_p),
    ]


_HANDLE = c_void_p
_PHASE_ARGS = [_HANDLE, c_int]

# name: (restype, argtypes); the whole application API of libpam.
_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "pam_start": (c_int, [c_char_p, c_char_p, POINTER(PamConv), POINTER(_HANDLE)]),
    "pam_end": (c_int, [_HANDLE, c_int]),
    "pam_authenticate": (c_int, _PHASE_ARGS),
    "pam_setcred": (c_int, _PHASE_ARGS),
    "pam_acct_mgmt": (c_int, _PHASE_ARGS),
    "pam_open_session": (c_int, _PHASE_ARGS),
    "pam_close_session": (c_int, _PHASE_ARGS),
    "pam_chauthtok": (c_int, _PHASE_ARGS),
    "pam_set_item": (c_int, [_HANDLE, c_int, c_void_p]),
    "pam_get_item": (c_int, [_HANDLE, c_int, POINTER(c_void_p)]),
    "pam_get_user": (c_int, [_HANDLE, POINTER(c_char_p), c_char_p]),
    "pam_strerror": (c_char_p, [_HANDLE, c_int]),
    "pam_getenv": (c_char_p, [_HANDLE, c_char_p]),
    "pam_putenv": (c_int, [_HANDLE, c_char_p]),
    "pam_getenvlist": (c_void_p, [_HANDLE]),
}
_OPTIONAL_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    # Linux-PAM >= 1.4
    "pam_start_confdir": (
        c_int,
        [c_char_p, c_char_p, POINTER(PamConv), c_char_p, POINTER(_HANDLE)],
    ),
}
_LIBC_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "calloc": (c_void_p, [c_size_t, c_size_t]),
    # strdup allocates through malloc as libc itself calls it, so an
    # interposed allocator sees our answers as its own.
    "strdup": (c_void_p, [c_char_p]),
    "free": (None, [c_void_p]),
}


def _declare(lib: ctypes.CDLL, name: str, restype: Any, argtypes: list[Any]) -> Any:
    func = getattr(lib, name)
    func.restype = restype
    func.argtypes = argtypes
    return func


_f = {name: _declare(_pam, name, *proto) for name, proto in _PROTOTYPES.items()}
for _name, _proto in _OPTIONAL_PROTOTYPES.items():
    if hasattr(_pam, _name):
        _f[_name] = _declare(_pam, _name, *_proto)
_c = {name: _declare(_libc, name, *proto) for name, proto in _LIBC_PROTOTYPES.items()}

_pam_start = _f["pam_start"]
_pam_start_confdir = _f.get("pam_start_confdir")
_pam_end = _f["pam_end"]
_pam_set_item = _f["pam_set_item"]
_pam_get_item = _f["pam_get_item"]
_pam_get_user = _f["pam_get_user"]
_pam_strerror = _f["pam_strerror"]
_pam_getenv = _f["pam_getenv"]
_pam_putenv = _f["pam_putenv"]
_pam_getenvlist = _f["pam_getenvlist"]
_calloc = _c["calloc"]
_strdup = _c["strdup"]
_free = _c["free"]

_PHASE_FUNCTIONS: dict[Phase, Callable[[c_void_p, int], int]] = {
    phase: _f[f"pam_{phase.value}"] for phase in Phase
}

NULL_HANDLE = c_void_p()
_BUF_ERR = int(ReturnCode.BUF_ERR)


def strerror(handle: c_void_p, code: int) -> str:
    text: bytes | None = _pam_strerror(handle, code)
    return text.decode("utf-8", "replace") if text else f"PAM error {code}"


class Handle:
    """libpam in this process: a pam_handle_t and the callbacks that must outlive it.

    Its methods are the in-process transport under pamphlet's transaction
    (``pamphlet._transaction.Transport``), in bytes; ``end`` runs once.
    """

    __slots__ = ("_pointer", "_conv", "_fail_delay", "_release")

    def __init__(
        self, pointer: c_void_p, conv: PamConv, fail_delay: Any, release: Callable[[], object]
    ) -> None:
        self._pointer = pointer
        self._conv = conv
        self._fail_delay = fail_delay
        self._release = release

    @classmethod
    def start(
        cls,
        service: bytes,
        user: bytes | None,
        confdir: bytes | None,
        conversation: Any,
        fail_delay: Any,
        appdata: int,
        release: Callable[[], object],
    ) -> tuple[int, Handle | None]:
        """pam_start (pam_start_confdir with a confdir): the code, and the handle on success.

        ``conversation`` (a CONV_FUNC) and ``fail_delay`` (a FAIL_DELAY_FUNC)
        get ``appdata``; ``release`` runs once the handle has ended.
        """
        conv = PamConv(conversation, appdata)
        pointer = c_void_p()
        if confdir is None:
            code: int = _pam_start(service, user, byref(conv), byref(pointer))
        else:
            if _pam_start_confdir is None:
                raise NotImplementedError(
                    "this libpam has no pam_start_confdir (Linux-PAM 1.4 or newer "
                    "is needed for confdir=)"
                )
            code = _pam_start_confdir(service, user, byref(conv), confdir, byref(pointer))
        if code != 0:
            return code, None
        return code, cls(pointer, conv, fail_delay, release)

    def call(self, phase: Phase, flags: int) -> int:
        return _PHASE_FUNCTIONS[phase](self._pointer, flags)

    def strerror(self, code: int) -> str:
        return strerror(self._pointer, code)

    def _item_address(self, item: int) -> tuple[int, int | None]:
        out = c_void_p()
        code: int = _pam_get_item(self._pointer, item, byref(out))
        return code, out.value

    def get_item(self, item: int) -> tuple[int, bytes | None]:
        """A string item (the caller has checked that it is one)."""
        code, address = self._item_address(item)
        if code or not address:
            return code, None
        return code, ctypes.string_at(address)

    def set_item(self, item: int, value: bytes | None) -> int:
        """A string item (the caller has checked that it is one); libpam copies it."""
        code: int = _pam_set_item(self._pointer, item, value)
        return code

    def get_xauthdata(self) -> tuple[int, tuple[bytes, bytes] | None]:
        """PAM_XAUTHDATA as (name, data); None when it is empty (Linux-PAM's unset)."""
        code, address = self._item_address(Item.XAUTHDATA)
        if code or not address:
            return code, None
        data = PamXauthData.from_address(address)
        name = ctypes.string_at(data.name, data.namelen) if data.name and data.namelen > 0 else b""
        blob = ctypes.string_at(data.data, data.datalen) if data.data and data.datalen > 0 else b""
        return code, (name, blob) if name or blob else None

    def set_xauthdata(self, value: tuple[bytes, bytes] | None) -> int:
        if value is None:
            # Linux-PAM dereferences the item, so "unset" is an all-zero struct.
            # It clears the item, then reports PAM_BUF_ERR for the NULL name it
            # did not copy: for this call that code means success.
            empty = PamXauthData(0, None, 0, None)
            code: int = _pam_set_item(self._pointer, Item.XAUTHDATA, byref(empty))
            return 0 if code == _BUF_ERR else code
        name, blob = value
        # libpam copies name and data out of the struct (pam_set_item).
        name_buf = ctypes.create_string_buffer(name, len(name) + 1)
        data_buf = ctypes.create_string_buffer(blob, len(blob) + 1)
        data = PamXauthData(
            len(name), ctypes.addressof(name_buf), len(blob), ctypes.addressof(data_buf)
        )
        code = _pam_set_item(self._pointer, Item.XAUTHDATA, byref(data))
        return code

    def set_fail_delay(self, enabled: bool) -> int:
        """Point PAM_FAIL_DELAY at the fail-delay callback, or at nothing."""
        pointer = ctypes.cast(self._fail_delay, c_void_p) if enabled else None
        code: int = _pam_set_item(self._pointer, Item.FAIL_DELAY, pointer)
        return code

    def get_user(self, prompt: bytes | None) -> tuple[int, bytes | None]:
        out = c_char_p()
        code: int = _pam_get_user(self._pointer, byref(out), prompt)
        return code, out.value

    def getenv(self, name: bytes) -> bytes | None:
        value: bytes | None = _pam_getenv(self._pointer, name)
        return value

    def putenv(self, entry: bytes) -> int:
        code: int = _pam_putenv(self._pointer, entry)
        return code

    def getenvlist(self) -> list[bytes] | None:
        """pam_getenvlist, copied into Python and freed; None when libpam fails."""
        address = _pam_getenvlist(self._pointer)
        if not address:
            return None
        array = ctypes.cast(address, POINTER(c_void_p))
        entries = []
        try:
            i = 0
            while entry := array[i]:
                try:
                    entries.append(ctypes.string_at(entry))
                finally:
                    _free(entry)
                i += 1
        finally:
            _free(address)
        return entries

    def end(self, status: int) -> int:
        pointer, self._pointer = self._pointer, NULL_HANDLE
        try:
            code: int = _pam_end(pointer, status)
        finally:
            self._release()
        return code


_POINTER_SIZE = ctypes.sizeof(c_void_p)
_RESPONSE_SIZE = ctypes.sizeof(PamResponse)
# resp is pam_response's first field: response i's pointer is at
# array + i * _RESPONSE_SIZE.
assert PamResponse.resp.offset == 0


def read_messages(num_msg: int, msg: int) -> list[tuple[int, bytes]]:
    """The (style, text) pairs of a conversation call; NULL text reads as b''.

    ``msg`` is the address of the module's array of ``num_msg`` message pointers
    (Linux-PAM's and OpenPAM's layout).
    """
    messages = []
    for i in range(num_msg):
        address = c_void_p.from_address(msg + i * _POINTER_SIZE).value
        if not address:
            raise ValueError("a module passed a NULL message pointer")
        message = PamMessage.from_address(address)
        messages.append((message.msg_style, message.msg or b""))
    return messages


def write_responses(resp: int, answers: list[bytes | None]) -> bool:
    """Store a libc-allocated pam_response array at the address ``resp``.

    Each non-None answer becomes a libc-allocated copy; None leaves that
    response NULL. Returns False, with nothing allocated, when memory runs out.
    """
    array_address = _calloc(len(answers), _RESPONSE_SIZE)
    if not array_address:
        return False
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        if 0 in answer:  # a NUL byte: strdup would stop there: never a truncated secret
            free_responses(array_address, i)
            raise ValueError("an answer holding a NUL byte reached write_responses")
        copy = _strdup(answer)
        if not copy:
            free_responses(array_address, i)
            return False
        c_void_p.from_address(array_address + i * _RESPONSE_SIZE).value = copy
    c_void_p.from_address(resp).value = array_address
    return True


def free_responses(array_address: int, count: int) -> None:
    """Wipe and free the first ``count`` answers of a response array, then the array."""
    for i in range(count):
        copy = c_void_p.from_address(array_address + i * _RESPONSE_SIZE).value
        if copy:
            ctypes.memset(copy, 0, len(ctypes.string_at(copy)))
            _free(copy)
    _free(array_address)
