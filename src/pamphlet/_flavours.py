"""What the threaded and the asyncio flavours share: phases on threads of their own.

libpam asks its questions from inside a blocking call. A flavour that cannot
block there runs a phase on a thread started for it: the thread waits inside
libpam while the flavour's owner answers from elsewhere (another thread, the
event loop). This module holds the guard that serialises the handle, the
phase's thread and its abort, the ending sequence, and the one wrapper that
turns a phase into a thread-running one.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Concatenate, ParamSpec, TypeVar

from ._transaction import Transaction
from .application import ApplicationBase
from .errors import ConversationAborted, HandleBusyError

__all__ = ["HandleGuard", "PhaseThread", "wrap_phase"]

_P = ParamSpec("_P")
_R = TypeVar("_R")
_D = TypeVar("_D")
_A = TypeVar("_A", bound=ApplicationBase)

#: How a phase's outcome reaches its flavour: (the exception or None, the result).
Report = Callable[[BaseException | None, object], None]


class HandleGuard:
    """The lock of a handle whose phases run on threads of their own.

    Reentrant, like the plain flavour's lock, with two changes:

    * A phase lends the handle while it waits for its conversation's answers,
      so that the code answering (the event loop, the server's thread) may use
      items and the environment, as a blocking conversation may. The phase
      thread is parked then, so libpam is still never entered by two threads.
    * A thread that wants the handle while a phase holds it inside libpam gets
      HandleBusyError at once instead of blocking behind the phase. Other
      holders (item access, end) are brief, and are waited for.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._phase: int | None = None  # the phase's thread, while a phase runs

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self._changed:
            if self._owner == me:
                self._depth += 1
                return
            while self._owner is not None:
                if self._owner == self._phase:
                    raise HandleBusyError(
                        "a PAM phase is running inside libpam on another thread; use the "
                        "handle between phases, or while the phase waits for its conversation"
                    )
                self._changed.wait()
            self._owner = me
            self._depth = 1

    def __exit__(self, *exc_info: object) -> None:
        with self._changed:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._changed.notify_all()

    @contextlib.contextmanager
    def phase(self) -> Iterator[None]:
        """Hold the handle for a phase run by this thread."""
        me = threading.get_ident()
        with self._changed:
            while self._owner is not None:  # a brief holder: item access
                self._changed.wait()
            self._owner = me
            self._depth = 1
            self._phase = me
        try:
            yield
        finally:
            with self._changed:
                self._owner = None
                self._depth = 0
                self._phase = None
                self._changed.notify_all()

    @contextlib.contextmanager
    def lend(self) -> Iterator[None]:
        """Let other threads use the handle while this one waits (for answers)."""
        me = threading.get_ident()
        with self._changed:
            if self._owner != me:
                raise HandleBusyError(
                    "a conversation ran on a thread that does not hold the handle"
                )
            depth = self._depth
            self._owner = None
            self._depth = 0
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                while self._owner is not None:
                    self._changed.wait()
                self._owner = me
                self._depth = depth


class PhaseThread:
    """One phase at a time on a thread of its own, its abort, and the ending sequence.

    ``state`` guards what a flavour keeps about the conversation in progress;
    waiting flavours wait on it and abort() wakes them. Whether the handle
    may still start a phase is the transaction's to say.
    """

    def __init__(self, transaction: Transaction) -> None:
        guard = transaction.guard
        if not isinstance(guard, HandleGuard):
            raise TypeError("phases on threads of their own need a HandleGuard")
        self.guard = guard
        self.transaction = transaction
        self.state = threading.Condition(threading.Lock())
        self.running = False
        self.aborted = False
        self.abort_reason = ""
        self._ident: int | None = None
        self._thread: threading.Thread | None = None
        self.on_abort: Callable[[], None] = lambda: None

    def start(
        self,
        call: Callable[[], object],
        report: Report,
        *,
        joinable: bool = True,
        reset: Callable[[], None] = lambda: None,
    ) -> threading.Thread | None:
        """Run ``call`` on a new thread; ``report`` gets its outcome, on that thread, last.

        ``reset`` runs under ``state`` as the phase starts. A joinable phase
        runs on a threading.Thread, which is returned; otherwise on a bare
        thread: ``Thread.start()`` waits until the new thread runs, which
        stalls an event loop while a thousand others hold the GIL.
        """
        with self.state:
            # Under ``state``: begin_ending() either sees this phase running
            # or this start sees the handle ending; never neither.
            self.transaction.check_open()
            if self.running:
                raise HandleBusyError(
                    "a PAM phase is already running on this handle: wait for its outcome "
                    "(or abort it) before starting another"
                )
            self.running = True
            self.aborted = False
            self.abort_reason = ""
            reset()
        try:
            if joinable:
                # A conversation nobody answers must not keep the interpreter from exiting.
                thread = threading.Thread(
                    target=self._main, args=(call, report), name="pamphlet-phase", daemon=True
                )
                self._thread = thread
                thread.start()
                return thread
            _thread.start_new_thread(self._main, (call, report))
            return None
        except BaseException:
            with self.state:
                self.running = False
                self.state.notify_all()
            raise

    def _main(self, call: Callable[[], object], report: Report) -> None:
        self._ident = threading.get_ident()
        error: BaseException | None = None
        result: object = None
        try:
            with self.guard.phase():
                result = call()
        except BaseException as exc:
            error = exc
        with self.state:
            # Once the outcome is out another phase may start at once: this
            # thread no longer touches the handle.
            self.running = False
            self._ident = None
            self.state.notify_all()
            try:
                report(error, result)
            except BaseException:  # pragma: no cover - a closed event loop
                pass

    def on_phase_thread(self) -> bool:
        """Whether the caller is the thread of the running phase."""
        return self._ident == threading.get_ident()

    def check_not_aborted(self) -> None:
        """Raise ConversationAborted if the running phase was aborted (under ``state``)."""
        if self.aborted:
            raise ConversationAborted(self.abort_reason)

    def abort(self, reason: str) -> None:
        """Release the running phase's conversation; nothing happens if none runs."""
        with self.state:
            if self.running:
                self.abort_locked(reason)

    def abort_locked(self, reason: str) -> None:
        if not self.aborted:
            self.aborted = True
            self.abort_reason = reason
        self.on_abort()
        self.state.notify_all()

    def begin_ending(self) -> bool:
        """Refuse everything from now, abort the running phase; whether one was running."""
        self.transaction.begin_end()
        with self.state:
            if self.running:
                self.abort_locked("the handle is being ended")
            return self.running

    def wait(self) -> None:
        """Block until no phase runs, its thread joined (never from the phase's thread)."""
        if self.on_phase_thread():
            return
        with self.state:
            self.state.wait_for(lambda: not self.running)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


def wrap_phase(
    function: Callable[Concatenate[ApplicationBase, _P], _R],
    deliver: Callable[[_A, Callable[[], _R]], _D],
    note: str,
) -> Callable[Concatenate[_A, _P], _D]:
    """A phase of application.py whose call ``deliver`` runs elsewhere and hands over."""

    def wrapper(self: _A, /, *args: _P.args, **kwargs: _P.kwargs) -> _D:
        return deliver(self, functools.partial(function, self, *args, **kwargs))

    functools.update_wrapper(wrapper, function)
    wrapper.__doc__ = f"{function.__doc__}\n\n{note}"
    return wrapper
