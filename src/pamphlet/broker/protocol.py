"""The broker's wire protocol: bounded, length-prefixed JSON frames.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of
UTF-8 JSON holding one object. Byte strings (service, user, items, messages,
answers, environment entries) travel as base64 text, ``null`` for a NULL
pointer. See docs/guide/protocol.md for every message.

Everything here fails closed: a frame that is too long, not UTF-8, not JSON,
not an object, or that does not arrive whole within its deadline raises
:class:`ProtocolViolation`, and the side that reads it closes the connection.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import select
import socket
import struct
import time
from typing import Any

from ..constants import PAM_MAX_MSG_SIZE, PAM_MAX_NUM_MSG, PAM_MAX_RESP_SIZE

__all__ = [
    "VERSION",
    "MAX_REQUEST_FRAME",
    "MAX_REPLY_FRAME",
    "ProtocolViolation",
    "PeerGone",
    "Interrupted",
    "encode_frame",
    "send_frame",
    "recv_frame",
    "FrameBuffer",
    "b64",
    "unb64",
    "PAM_MAX_NUM_MSG",
    "PAM_MAX_MSG_SIZE",
    "PAM_MAX_RESP_SIZE",
]

#: The protocol version; the start frame names it and the broker refuses others.
VERSION = 1

#: The largest frame a client may send: 32 answers of 512 bytes in base64,
#: with room to spare. Anything larger closes the connection.
MAX_REQUEST_FRAME = 64 * 1024

#: The largest frame the broker sends (module messages are not bounded by
#: PAM_MAX_MSG_SIZE in Linux-PAM: pam_motd sends whole files as one message).
MAX_REPLY_FRAME = 1024 * 1024

#: The largest single name or item value a client may send.
MAX_VALUE = 4096

_HEADER = struct.Struct(">I")


class ProtocolViolation(Exception):
    """The peer sent something outside the protocol; the connection is closed."""


class PeerGone(ProtocolViolation):
    """The peer closed the connection (between frames or mid-frame)."""


class Interrupted(Exception):
    """A wake-up file descriptor became readable while waiting (shutdown)."""


def b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode("ascii")


def unb64(value: Any, what: str, limit: int = MAX_VALUE, *, nul_ok: bool = False) -> bytes | None:
    """A base64 field back to bytes; None for null. Strict: anything else is a violation."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > (limit + 2) // 3 * 4:
        raise ProtocolViolation(f"{what} is not a base64 string of at most {limit} bytes")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise ProtocolViolation(f"{what} is not valid base64") from exc
    if len(raw) > limit:
        raise ProtocolViolation(f"{what} is longer than {limit} bytes")
    if not nul_ok and 0 in raw:
        raise ProtocolViolation(f"{what} contains a NUL byte")
    return raw


def encode_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return _HEADER.pack(len(body)) + body


def send_frame(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode_frame(message))


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("a frame is not UTF-8") from exc
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProtocolViolation("a frame is not JSON") from exc
    if type(message) is not dict:
        raise ProtocolViolation("a frame is not a JSON object")
    return message


def _wait_readable(
    sock: socket.socket, deadline: float | None, wake: int | None, what: str
) -> None:
    while True:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise ProtocolViolation(f"timed out waiting for {what}")
        fds: list[Any] = [sock] if wake is None else [sock, wake]
        ready, _, _ = select.select(fds, [], [], timeout)
        if wake is not None and wake in ready:
            raise Interrupted
        if sock in ready:
            return


def _recv_exactly(
    sock: socket.socket, count: int, deadline: float | None, wake: int | None, what: str
) -> bytes:
    chunks = []
    while count:
        _wait_readable(sock, deadline, wake, what)
        try:
            chunk = sock.recv(min(count, 65536))
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise PeerGone("the peer reset the connection") from exc
        except BlockingIOError:
            continue
        if not chunk:
            raise PeerGone("the peer closed the connection")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def recv_frame(
    sock: socket.socket,
    *,
    max_size: int,
    wait: float | None,
    frame_timeout: float | None,
    wake: int | None = None,
) -> dict[str, Any]:
    """Read one frame: its first byte within ``wait`` seconds (None: forever),
    the whole frame within ``frame_timeout`` seconds of its first byte."""
    first_deadline = None if wait is None else time.monotonic() + wait
    _wait_readable(sock, first_deadline, wake, "a frame")
    deadline = None if frame_timeout is None else time.monotonic() + frame_timeout
    header = _recv_exactly(sock, _HEADER.size, deadline, wake, "a frame's length")
    (length,) = _HEADER.unpack(header)
    if length > max_size:
        raise ProtocolViolation(f"a frame of {length} bytes is over the limit of {max_size}")
    body = _recv_exactly(sock, length, deadline, wake, f"the rest of a {length}-byte frame")
    return decode_body(body)


class FrameBuffer:
    """Frames from bytes fed as they arrive (the broker's non-blocking side)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._data = bytearray()

    @property
    def pending(self) -> bool:
        return bool(self._data)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._data += data
        frames = []
        while len(self._data) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._data)
            if length > self.max_size:
                raise ProtocolViolation(
                    f"a frame of {length} bytes is over the limit of {self.max_size}"
                )
            if len(self._data) < _HEADER.size + length:
                break
            body = bytes(self._data[_HEADER.size : _HEADER.size + length])
            del self._data[: _HEADER.size + length]
            frames.append(decode_body(body))
        return frames


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def close_quietly(fd: socket.socket | int | None) -> None:
    if fd is None:
        return
    try:
        if isinstance(fd, int):
            os.close(fd)
        else:
            fd.close()
    except OSError:
        pass
