"""A worker's next deadline, in memory it shares with the broker.

A worker enforces its own timeouts, but its peer can stop it (SIGSTOP: the
worker's real uid is the peer's) or a module can hang it. So before each
wait the worker writes the moment by which it will have moved on
(``time.monotonic()``, which is one clock for every process of the machine),
and the broker kills a worker that is past that moment by more than
:data:`GRACE`. Writing is a store into a shared page: no system call, no
message on the control socket.
"""

from __future__ import annotations

import mmap
import struct
import time

__all__ = ["Deadline", "GRACE"]

#: Seconds a worker may be late before the broker kills it.
GRACE = 5.0
_SLOT = struct.Struct("d")


class Deadline:
    """One worker's deadline (0: none, as while a session is open)."""

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, _SLOT.size)  # MAP_SHARED: survives the fork

    def expect(self, seconds: float | None) -> None:
        """The worker will have moved on within ``seconds`` (None: no bound)."""
        _SLOT.pack_into(self._page, 0, 0.0 if seconds is None else time.monotonic() + seconds)

    def overdue(self, now: float) -> bool:
        """Whether the worker missed its deadline by more than the grace."""
        first = _SLOT.unpack_from(self._page, 0)[0]
        # Read twice: a store the worker is making right now is not trusted.
        if first != _SLOT.unpack_from(self._page, 0)[0]:
            return False
        return bool(first) and now > first + GRACE

    def close(self) -> None:
        self._page.close()
