"""ThreadedPamApplication: phases on threads of their own, driven by get_data and set_input.

libpam asks its questions from inside a blocking call (the conversation). A
server that cannot block there, because it learns the answers later in
another callback (paramiko, an event loop, a web request), runs each phase on
a thread of its own: the thread waits inside libpam while the server reads the
questions with :meth:`~ThreadedPamApplication.get_data` and answers with
:meth:`~ThreadedPamApplication.set_input`.

This module also holds what the threaded and the asyncio flavours share: the
guard that replaces the core's lock, the phase threads, and abort.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

from .application import PamApplication
from .message import Message

__all__ = [
    "ThreadedPamApplication",
    "HandleBusyError",
    "ConversationAborted",
    "ConversationStateError",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: The outcome of a phase that has not finished (None means success).
_NOTHING: Any = object()

# What a phase thread hands back: (exception or None, the base method's result).
Report = Callable[[BaseException | None, Any], None]


class HandleBusyError(RuntimeError):
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


class ConversationStateError(RuntimeError):
    """get_data or set_input was called when there is nothing to read or answer."""


class _HandleGuard:
    """The lock of a handle whose phases run on threads of their own.

    It stands in for the core's RLock (``with app._lock``), with two changes:

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
        self._phase: int | None = None  # the phase thread, while a phase runs

    def held_by_me(self) -> bool:
        return self._owner == threading.get_ident()

    def acquire(self) -> None:
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

    def release(self) -> None:
        with self._changed:
            if self._owner != threading.get_ident():
                raise RuntimeError("the handle guard is released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._changed.notify_all()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

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
                raise RuntimeError("the handle guard is lent by a thread that does not hold it")
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


class PhaseThreads(PamApplication):
    """What ThreadedPamApplication and AsyncPamApplication share.

    Each phase runs on a thread started for it, holding the handle's guard;
    the flavour decides how the conversation gets its answers
    (:meth:`_wait_for_answers`) and how the outcome is delivered (the
    ``report`` callback, called by the phase thread as its last act).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._guard = _HandleGuard()
        self._state = threading.Condition(threading.Lock())
        self._phase_running = False
        self._phase_thread: threading.Thread | None = None
        self._aborted = False
        self._abort_reason = ""
        self._ending = False
        super().__init__(*args, **kwargs)
        # Every `with self._lock` of the core (phases, items, environ, end)
        # now goes through the guard.
        self._lock = self._guard  # type: ignore[assignment]

    # -- starting phases ------------------------------------------------------

    def _start_thread(
        self,
        base: Callable[..., object],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        report: Report,
        *,
        ending: bool = False,
    ) -> threading.Thread | None:
        """Start ``base(self, *args, **kwargs)`` on a new thread; ``report`` gets its outcome."""
        self._require_handle()
        with self._state:
            if self._ending and not ending:
                raise ConversationStateError(f"this {type(self).__name__} is being ended")
            if self._phase_running:
                raise HandleBusyError(
                    "a PAM phase is already running on this handle: wait for its outcome "
                    "(or abort it) before starting another"
                )
            self._phase_running = True
            # end() does not converse: nobody is there to answer any more.
            self._aborted = ending
            self._abort_reason = "the handle is being ended" if ending else ""
            self._phase_starting()
        try:
            thread = self._spawn(
                self._phase_main,
                (base, args, kwargs, report),
                f"pamphlet-{getattr(base, '__name__', 'phase')}",
            )
        except BaseException:
            with self._state:
                self._phase_running = False
                self._state.notify_all()
            raise
        self._phase_thread = thread
        return thread

    def _spawn(
        self, target: Callable[..., None], args: tuple[Any, ...], name: str
    ) -> threading.Thread | None:
        """Start a phase's thread; the Thread, if it can be joined."""
        # A conversation nobody answers must not keep the interpreter from exiting.
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        return thread

    def _phase_starting(self) -> None:
        """Called under ``_state`` when a phase starts: reset per-phase state."""

    def _phase_main(
        self,
        base: Callable[..., object],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        report: Report,
    ) -> None:
        error: BaseException | None = None
        result: Any = None
        try:
            with self._guard.phase():
                result = base(self, *args, **kwargs)
        except BaseException as exc:
            error = exc
        with self._state:
            # Once the outcome is out, another phase may start at once: this
            # thread no longer touches the handle.
            self._phase_running = False
            self._state.notify_all()
            try:
                report(error, result)
            except BaseException:  # pragma: no cover - a closed event loop
                pass

    def _wait_for_phase(self) -> None:
        """Block until no phase runs (not from the phase thread itself)."""
        thread = self._phase_thread
        with self._state:
            if thread is not threading.current_thread():
                self._state.wait_for(lambda: not self._phase_running)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the conversation --------------------------------------------------------

    def _answer(self, messages: list[Message]) -> Any:
        with self._state:
            if self._aborted:
                raise ConversationAborted(self._abort_reason)
        if not self._guard.held_by_me():
            raise HandleBusyError("a conversation ran on a thread that does not hold the handle")
        with self._guard.lend():
            return self._wait_for_answers(messages)

    def _wait_for_answers(self, messages: list[Message]) -> Any:
        raise NotImplementedError

    def abort(self) -> None:
        """Release the running phase's conversation: the peer is gone.

        The pending conversation call (or the next one, if the phase is still
        working) gets PAM_CONV_ERR, the phase fails with ConversationError and
        its thread finishes on its own. Nothing happens if no phase runs.
        """
        with self._state:
            if self._phase_running:
                self._abort_locked("abort() released the conversation")

    def _abort_locked(self, reason: str) -> None:
        if not self._aborted:
            self._aborted = True
            self._abort_reason = reason
        self._state.notify_all()


def on_a_thread(
    base: Callable[Concatenate[PamApplication, _P], object],
) -> Callable[Concatenate[ThreadedPamApplication, _P], threading.Thread]:
    """A core phase method that runs on a thread of its own and returns the started thread."""

    def start(
        self: ThreadedPamApplication, /, *args: _P.args, **kwargs: _P.kwargs
    ) -> threading.Thread:
        if self._guard.held_by_me():
            # Called by a phase already holding the handle on this thread (the
            # core's acct_mgmt, initialize_credentials, end): run right here.
            base(self, *args, **kwargs)
            return threading.current_thread()
        thread = self._start_thread(base, args, kwargs, self._report)
        assert thread is not None  # ThreadedPamApplication's threads are threading.Threads
        return thread

    functools.update_wrapper(start, base)
    start.__doc__ = (
        f"{base.__doc__}\n\nStarts the phase on a thread of its own and returns it; "
        "follow it with get_data()."
    )
    return start


class ThreadedPamApplication(PhaseThreads):
    """A PAM transaction driven from outside: no conversation method to write.

    Instantiate it directly. Every phase (``authenticate()``,
    ``change_authtoken()``, ``account_management()``, ``open_session()``, ...)
    starts a thread and returns it. Then call :meth:`get_data`: it returns the
    messages of the pending conversation call (answer them with
    :meth:`set_input`), the exception the phase failed with, or ``None`` once
    it succeeded. Join the thread when the outcome is in.

    If the peer goes away mid-conversation, call :meth:`abort` (or
    :meth:`end`, which aborts first) so that the thread and the handle do not
    wait forever. ``conversation_timeout`` (seconds) does it on its own when
    no answer comes in that time.
    """

    def __init__(
        self,
        service: str | None = None,
        user: str | None = None,
        *,
        confdir: str | None = None,
        encoding: str = "utf-8",
        conversation_timeout: float | None = None,
        service_name: str | None = None,
        user_name: str | None = None,
    ) -> None:
        self.conversation_timeout = conversation_timeout
        self._pending: list[Message] | None = None
        self._answers: list[str | bytes | None] | None = None
        self._outcome: BaseException | None = _NOTHING
        super().__init__(
            service,
            user,
            confdir=confdir,
            encoding=encoding,
            service_name=service_name,
            user_name=user_name,
        )

    authenticate = on_a_thread(PamApplication.authenticate)
    account_management = on_a_thread(PamApplication.account_management)
    acct_mgmt = on_a_thread(PamApplication.acct_mgmt)
    open_session = on_a_thread(PamApplication.open_session)
    close_session = on_a_thread(PamApplication.close_session)
    change_authtoken = on_a_thread(PamApplication.change_authtoken)
    setcred = on_a_thread(PamApplication.setcred)
    initialize_credentials = on_a_thread(PamApplication.initialize_credentials)
    delete_credentials = on_a_thread(PamApplication.delete_credentials)
    reinitialize_credentials = on_a_thread(PamApplication.reinitialize_credentials)
    refresh_credentials = on_a_thread(PamApplication.refresh_credentials)
    # The user it finds is the `user` item once get_data() says None.
    get_user = on_a_thread(PamApplication.get_user)  # type: ignore[assignment]

    def _phase_starting(self) -> None:
        self._outcome = _NOTHING
        self._pending = None
        self._answers = None

    def _report(self, error: BaseException | None, result: object) -> None:
        self._outcome = error

    def _wait_for_answers(self, messages: list[Message]) -> Any:
        timeout = self.conversation_timeout
        with self._state:
            self._pending = list(messages)
            self._answers = None
            self._state.notify_all()
            try:
                answered = self._state.wait_for(
                    lambda: self._answers is not None or self._aborted, timeout
                )
                if self._answers is not None:
                    return self._answers
                if not answered:
                    self._abort_locked(f"no answer came within {timeout} s")
                raise ConversationAborted(self._abort_reason)
            finally:
                self._pending = None
                self._answers = None

    def get_data(self, timeout: float | None = None) -> list[Message] | BaseException | None:
        """What the running phase has to say, waiting up to ``timeout`` seconds.

        * a list of messages: the pending conversation call. Answer all of
          them, in order, with :meth:`set_input` (``""`` for info and error
          messages);
        * an exception instance: the phase failed;
        * ``None``: the phase succeeded.

        Asking again before answering returns the same messages; the outcome
        stays until the next phase starts. When ``timeout`` passes first, it
        raises TimeoutError: a timeout is never success.
        """
        with self._state:
            if not self._phase_running and self._outcome is _NOTHING:
                raise ConversationStateError("get_data(): no phase has been started")
            if not self._state.wait_for(
                lambda: self._pending is not None or self._outcome is not _NOTHING, timeout
            ):
                raise TimeoutError(
                    f"the PAM phase said nothing within {timeout} s; it is still running "
                    "(call get_data() again, or abort() it)"
                )
            if self._pending is not None:
                return list(self._pending)
            return self._outcome

    def set_input(self, answers: Iterable[str | bytes | None]) -> None:
        """Answer the pending conversation call: one answer per message."""
        if isinstance(answers, (str, bytes)):
            raise TypeError("set_input() takes a list of answers, one per message, not a string")
        answers = list(answers)
        with self._state:
            pending = self._pending
            if pending is None:
                raise ConversationStateError(
                    "set_input(): no conversation is waiting for answers "
                    "(call get_data() to see what the phase wants)"
                )
            if len(answers) != len(pending):
                raise ValueError(
                    f"set_input() got {len(answers)} answers for {len(pending)} messages; "
                    'answer every message, "" for info and error messages'
                )
            self._answers = answers
            self._pending = None
            self._state.notify_all()

    def end(self) -> None:
        """Abort a running phase, wait for its thread, then end as PamApplication does.

        end() does not converse: a module that speaks while end() closes the
        session gets PAM_CONV_ERR. Close the session yourself first if it
        should be heard.
        """
        with self._state:
            self._ending = True
            if self._phase_running:
                self._abort_locked("the handle is being ended")
        self._wait_for_phase()
        with self._state:
            self._aborted = True
            self._abort_reason = "the handle is being ended"
        super().end()
