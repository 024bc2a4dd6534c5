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
    c_uint,
    c_void_p,
)
from typing import Any

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
# memory that the preloaded free() cannot free.
# A PyDLL keeps the GIL over the call: these never block nor call back into
# Python, and releasing and retaking the GIL would cost more than they do.
_libc = ctypes.PyDLL(None)


class PamMessage(Structure):
    _fields_ = [("msg_style", c_int), ("msg", c_char_p)]


class PamResponse(Structure):
    # resp is a void pointer, not c_char_p: ctypes must not copy or convert
    # the malloc'd buffer that libpam will free.
    _fields_ = [("resp", c_void_p), ("resp_retcode", c_int)]


# The message and response arrays arrive as plain addresses: ctypes builds no
# pointer objects per call; read_messages and write_responses walk them.
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
    # calloc's size_t arguments are declared c_void_p, of the same size and
    # calling convention on every Linux ABI: ctypes converts a Python int to
    # c_void_p several times faster than to c_size_t.
    "calloc": (c_void_p, [c_void_p, c_void_p]),
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

pam_end: Callable[[c_void_p, int], int] = _f["pam_end"]
pam_authenticate: Callable[[c_void_p, int], int] = _f["pam_authenticate"]
pam_setcred: Callable[[c_void_p, int], int] = _f["pam_setcred"]
pam_acct_mgmt: Callable[[c_void_p, int], int] = _f["pam_acct_mgmt"]
pam_open_session: Callable[[c_void_p, int], int] = _f["pam_open_session"]
pam_close_session: Callable[[c_void_p, int], int] = _f["pam_close_session"]
pam_chauthtok: Callable[[c_void_p, int], int] = _f["pam_chauthtok"]
pam_putenv: Callable[[c_void_p, bytes], int] = _f["pam_putenv"]
_pam_start = _f["pam_start"]
_pam_start_confdir = _f.get("pam_start_confdir")
_pam_set_item = _f["pam_set_item"]
_pam_get_item = _f["pam_get_item"]
_pam_get_user = _f["pam_get_user"]
_pam_strerror = _f["pam_strerror"]
_pam_getenv = _f["pam_getenv"]
_pam_getenvlist = _f["pam_getenvlist"]
_calloc = _c["calloc"]
_strdup = _c["strdup"]
_free = _c["free"]
_string_at = ctypes.string_at

HAS_CONFDIR = _pam_start_confdir is not None
NULL_HANDLE = c_void_p()


class Handle:
    """An opaque pam_handle_t pointer with the conversation that must outlive it."""

    __slots__ = ("pointer", "conv")

    def __init__(self, pointer: c_void_p, conv: PamConv) -> None:
        self.pointer = pointer
        self.conv = conv


def make_conv(callback: Any, appdata: int) -> PamConv:
    """A pam_conv struct pointing at ``callback`` with ``appdata`` as its key."""
    return PamConv(callback, appdata)


def start(
    service: bytes, user: bytes | None, conv: PamConv, confdir: bytes | None
) -> tuple[int, c_void_p]:
    """pam_start or pam_start_confdir; the code and the new handle."""
    pointer = c_void_p()
    if confdir is None:
        code = _pam_start(service, user, byref(conv), byref(pointer))
    else:
        if _pam_start_confdir is None:
            raise NotImplementedError(
                "this libpam has no pam_start_confdir (Linux-PAM 1.4 or newer "
                "is needed for confdir=)"
            )
        code = _pam_start_confdir(service, user, byref(conv), confdir, byref(pointer))
    return code, pointer


def strerror(handle: c_void_p, code: int) -> str:
    text: bytes | None = _pam_strerror(handle, code)
    return text.decode("utf-8", "replace") if text else f"PAM error {code}"


def get_item_pointer(handle: c_void_p, item: int) -> tuple[int, int | None]:
    """pam_get_item: the code and the item's raw address (None for NULL)."""
    out = c_void_p()
    code: int = _pam_get_item(handle, item, byref(out))
    return code, out.value


def get_string_item(handle: c_void_p, item: int) -> tuple[int, bytes | None]:
    code, address = get_item_pointer(handle, item)
    if code or not address:
        return code, None
    return code, _string_at(address)


def set_string_item(handle: c_void_p, item: int, value: bytes | None) -> int:
    # libpam copies the string, so a Python buffer is fine here.
    code: int = _pam_set_item(handle, item, value)
    return code


def get_xauthdata(handle: c_void_p) -> tuple[int, tuple[bytes, bytes] | None]:
    """PAM_XAUTHDATA as (name, data); None when it is empty (Linux-PAM's unset)."""
    code, address = get_item_pointer(handle, 12)
    if code or not address:
        return code, None
    data = PamXauthData.from_address(address)
    name = _string_at(data.name, data.namelen) if data.name and data.namelen > 0 else b""
    blob = _string_at(data.data, data.datalen) if data.data and data.datalen > 0 else b""
    return code, (name, blob) if name or blob else None


def set_xauthdata(handle: c_void_p, value: tuple[bytes, bytes] | None) -> int:
    if value is None:
        # Linux-PAM dereferences the item, so "unset" is an all-zero struct.
        # It clears the item, then reports PAM_BUF_ERR for the NULL name it
        # did not copy: for this call that code means success.
        empty = PamXauthData(0, None, 0, None)
        code: int = _pam_set_item(handle, 12, byref(empty))
        return 0 if code == 5 else code
    name, blob = value
    # libpam copies name and data out of the struct (pam_set_item).
    name_buf = ctypes.create_string_buffer(name, len(name) + 1)
    data_buf = ctypes.create_string_buffer(blob, len(blob) + 1)
    data = PamXauthData(
        len(name), ctypes.addressof(name_buf), len(blob), ctypes.addressof(data_buf)
    )
    code = _pam_set_item(handle, 12, byref(data))
    return code


def set_fail_delay(handle: c_void_p, callback: Any) -> int:
    """Point PAM_FAIL_DELAY at a FAIL_DELAY_FUNC, or at nothing with None."""
    pointer = None if callback is None else ctypes.cast(callback, c_void_p)
    code: int = _pam_set_item(handle, 10, pointer)
    return code


def get_user(handle: c_void_p, prompt: bytes | None) -> tuple[int, bytes | None]:
    out = c_char_p()
    code: int = _pam_get_user(handle, byref(out), prompt)
    return code, out.value


def getenv(handle: c_void_p, name: bytes) -> bytes | None:
    value: bytes | None = _pam_getenv(handle, name)
    return value


def getenvlist(handle: c_void_p) -> list[bytes] | None:
    """pam_getenvlist, copied into Python and freed; None when libpam fails."""
    address = _pam_getenvlist(handle)
    if not address:
        return None
    array = ctypes.cast(address, POINTER(c_void_p))
    entries = []
    try:
        i = 0
        while True:
            entry = array[i]
            if not entry:
                break
            try:
                entries.append(_string_at(entry))
            finally:
                _free(entry)
            i += 1
    finally:
        _free(address)
    return entries


_POINTER_SIZE = ctypes.sizeof(c_void_p)
_RESPONSE_SIZE = ctypes.sizeof(PamResponse)
# resp is pam_response's first field: response i's pointer is at
# array + i * _RESPONSE_SIZE.
assert PamResponse.resp.offset == 0
_pointer_at = c_void_p.from_address
_message_at = PamMessage.from_address


def read_message(msg: int) -> tuple[int, bytes]:
    """The (style, text) of the message whose pointer is at the address ``msg``;
    NULL text reads as b''."""
    address = _pointer_at(msg).value
    if not address:
        raise ValueError("a module passed a NULL message pointer")
    message = _message_at(address)
    return message.msg_style, message.msg or b""


def read_messages(num_msg: int, msg: int) -> list[tuple[int, bytes]]:
    """The (style, text) pairs of a conversation call.

    ``msg`` is the address of the module's array of ``num_msg`` message pointers.
    """
    end = msg + num_msg * _POINTER_SIZE
    return [read_message(address) for address in range(msg, end, _POINTER_SIZE)]


def write_response(resp: int, answer: bytes | None) -> bool:
    """write_responses for one answer."""
    array_address = _calloc(1, _RESPONSE_SIZE)
    if not array_address:
        return False
    if answer is not None:
        if 0 in answer:  # strdup would stop there: never a truncated secret
            _free(array_address)
            raise ValueError("an answer holding a NUL byte reached write_response")
        copy = _strdup(answer)
        if not copy:
            _free(array_address)
            return False
        _pointer_at(array_address).value = copy
    _pointer_at(resp).value = array_address
    return True


def write_responses(resp: int, answers: list[bytes | None]) -> bool:
    """Store a libc-allocated pam_response array at the address ``resp``.

    Each non-None answer becomes a libc-allocated copy; None leaves that
    response NULL. Returns False, with nothing allocated, when memory runs out.
    """
    count = len(answers)
    array_address = _calloc(count, _RESPONSE_SIZE)
    if not array_address:
        return False
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        if 0 in answer:  # strdup would stop there: never a truncated secret
            free_responses(array_address, i)
            raise ValueError("an answer holding a NUL byte reached write_responses")
        copy = _strdup(answer)
        if not copy:
            free_responses(array_address, i)
            return False
        _pointer_at(array_address + i * _RESPONSE_SIZE).value = copy
    _pointer_at(resp).value = array_address
    return True


def free_responses(array_address: int, count: int) -> None:
    for i in range(count):
        copy = _pointer_at(array_address + i * _RESPONSE_SIZE).value
        if copy:
            ctypes.memset(copy, 0, len(_string_at(copy)))
            _free(copy)
    _free(array_address)
