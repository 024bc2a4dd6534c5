"""Each worker's next deadline, in memory it shares with the broker.

A worker enforces its own timeouts, but its peer can stop it (SIGSTOP: the
worker's real uid is the peer's) or a module can hang it. So before each
wait the worker writes the moment by which it will have moved on
(``time.monotonic()``, which is one clock for every process of the machine),
and the broker kills a worker that is past that moment by more than
:data:`GRACE`. Writing is a store into a page shared since the fork: no
system call, no message on the control socket. The page is made once, with
a slot for each worker that can exist at a time.
"""

from __future__ import annotations

import mmap
import struct
import time

__all__ = ["Deadline", "Deadlines", "GRACE", "SLOTS"]

#: Seconds a worker may be late before the broker kills it.
GRACE = 5.0
#: Workers (spares included) that can exist at once.
SLOTS = 4096
_SLOT = struct.Struct("d")


class Deadline:
    """One worker's deadline (0: none, as while a session is open)."""

    def __init__(self, page: mmap.mmap, slot: int) -> None:
        self._page = page
        self.slot = slot
        self._offset = slot * _SLOT.size

    def expect(self, seconds: float | None) -> None:
        """The worker will have moved on within ``seconds`` (None: no bound)."""
        value = 0.0 if seconds is None else time.monotonic() + seconds
        _SLOT.pack_into(self._page, self._offset, value)

    def overdue(self, now: float) -> bool:
        """Whether the worker missed its deadline by more than the grace."""
        first = _SLOT.unpack_from(self._page, self._offset)[0]
        # Read twice: a store the worker is making right now is not trusted.
        if first != _SLOT.unpack_from(self._page, self._offset)[0]:
            return False
        return bool(first) and now > first + GRACE


class Deadlines:
    """The shared page, and which of its slots are free (the broker's side)."""

    def __init__(self, slots: int = SLOTS) -> None:
        self._page = mmap.mmap(-1, slots * _SLOT.size)  # MAP_SHARED: survives the fork
        self._free = list(range(slots - 1, -1, -1))

    def take(self) -> Deadline | None:
        """A slot for a new worker, with no deadline yet; None when all are taken."""
        if not self._free:
            return None
        deadline = Deadline(self._page, self._free.pop())
        deadline.expect(None)
        return deadline

    def give_back(self, deadline: Deadline) -> None:
        """The slot's worker is gone (reaped, or never given a connection)."""
        self._free.append(deadline.slot)
