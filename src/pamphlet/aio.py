"""AsyncPamApplication: PAM for asyncio, with ``async def conversation``.

Each phase runs on a thread started for it (never a bounded executor: a
thousand logins waiting on their users would starve it) while the
conversation coroutine runs on the event loop. Failure delays are awaited on
the loop, so no thread sits in libpam's sleep.
"""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import functools
import inspect
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, cast

from .application import PamApplication
from .message import Message
from .threaded import ConversationAborted, PhaseThreads

__all__ = ["AsyncPamApplication", "FailDelayPolicy", "libpam_delay"]

_P = ParamSpec("_P")
_R = TypeVar("_R")
_T = TypeVar("_T", bound="AsyncPamApplication")

FailDelayPolicy = Callable[[int, int], float]
"""``policy(status, delay_usec) -> seconds``: how long to await after a phase.

libpam passes the status of the phase and the delay its modules asked for
(pam_faildelay, pam_unix), after successes too (status 0).
"""


def libpam_delay(status: int, delay_usec: int) -> float:
    """The default policy: libpam's own rule, the requested delay after a failure only."""
    return delay_usec / 1_000_000 if status != 0 else 0.0


def _settle(future: asyncio.Future[_R], value: _R) -> None:
    if not future.done():
        future.set_result(value)


def _await_on_the_loop(status: int, delay_usec: int) -> None:
    """A marker for fail_delay: record the delay, to be awaited on the loop.

    (A plain function rather than a bound method: the handle holds no cycle to itself.)
    """


def awaitable_phase(
    base: Callable[Concatenate[PamApplication, _P], _R],
) -> Callable[Concatenate[AsyncPamApplication, _P], Awaitable[_R]]:
    """A core phase method that runs on a thread of its own and is awaited."""

    def run(self: AsyncPamApplication, /, *args: _P.args, **kwargs: _P.kwargs) -> Awaitable[_R]:
        if self._guard.held_by_me():
            # Called by a phase already holding the handle on this thread (the
            # core's acct_mgmt, initialize_credentials, end): run right here.
            return cast(Awaitable[_R], base(self, *args, **kwargs))
        return self._run_phase_on_thread(base, args, kwargs)

    functools.update_wrapper(run, base)
    run.__doc__ = f"{base.__doc__}\n\nA coroutine: the phase runs on a thread of its own."
    return run


class AsyncPamApplication(PhaseThreads):
    """A PAM transaction for asyncio: subclass it and write ``async def conversation``.

    ::

        class WebLogin(AsyncPamApplication):
            async def conversation(self, messages):
                return [await ask(message) if message.is_prompt else "" for message in messages]

        async with WebLogin("login", "alice") as app:
            await app.authenticate()
            await app.account_management()

    Every phase is a coroutine. Cancelling the task that awaits one ends its
    conversation (PAM_CONV_ERR) and lets the phase's thread finish; the
    handle can still be ended. ``end()`` is a coroutine too, and ``async
    with`` calls it.

    ``fail_delay`` says what happens to the delay libpam's modules ask for
    after a failure: ``"asyncio"`` (the default) awaits it on the loop with
    the thread already released; ``"libpam"`` lets libpam sleep on the phase's
    thread; a callable ``policy(status, delay_usec) -> seconds`` decides
    the seconds to await (see :func:`libpam_delay`, the default). The delay
    counts from the moment libpam asked for it, at the end of the phase.

    Items and ``environ`` work from the loop between phases and while a phase
    waits for its conversation; while a phase is inside libpam they raise
    :class:`~pamphlet.HandleBusyError` instead of blocking the loop.
    """

    def __init__(
        self,
        service: str | None = None,
        user: str | None = None,
        *,
        confdir: str | None = None,
        encoding: str = "utf-8",
        fail_delay: Literal["asyncio", "libpam"] | FailDelayPolicy = "asyncio",
        service_name: str | None = None,
        user_name: str | None = None,
    ) -> None:
        policy: FailDelayPolicy | None
        if fail_delay == "asyncio":
            policy = libpam_delay
        elif fail_delay == "libpam":
            policy = None
        elif callable(fail_delay):
            policy = fail_delay
        else:
            raise ValueError(
                'fail_delay must be "asyncio", "libpam" or a callable policy(status, delay_usec)'
            )
        self._delay_policy = policy
        # (status, delay_usec, when): what libpam asked for, and when
        self._requested_delay: tuple[int, int, float] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished: asyncio.Future[Any] | None = None
        self._pending_answers: concurrent.futures.Future[Any] | None = None
        super().__init__(
            service,
            user,
            confdir=confdir,
            encoding=encoding,
            service_name=service_name,
            user_name=user_name,
        )
        if policy is not None:
            self.fail_delay = _await_on_the_loop

    # -- what subclasses write ---------------------------------------------------

    async def conversation(  # type: ignore[override]  # the async flavour's contract
        self, messages: list[Message]
    ) -> Iterable[str | bytes | None]:
        """Answer the PAM stack: one answer per message, ``""`` for non-prompts.

        A coroutine returning a list (an async generator works too). It runs
        on the event loop that awaits the phase.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no conversation method, but the PAM stack sent {messages!r}"
        )

    # -- the phases ----------------------------------------------------------------

    authenticate = awaitable_phase(PamApplication.authenticate)
    account_management = awaitable_phase(PamApplication.account_management)
    acct_mgmt = awaitable_phase(PamApplication.acct_mgmt)
    open_session = awaitable_phase(PamApplication.open_session)
    close_session = awaitable_phase(PamApplication.close_session)
    change_authtoken = awaitable_phase(PamApplication.change_authtoken)
    setcred = awaitable_phase(PamApplication.setcred)
    initialize_credentials = awaitable_phase(PamApplication.initialize_credentials)
    delete_credentials = awaitable_phase(PamApplication.delete_credentials)
    reinitialize_credentials = awaitable_phase(PamApplication.reinitialize_credentials)
    refresh_credentials = awaitable_phase(PamApplication.refresh_credentials)
    get_user = awaitable_phase(PamApplication.get_user)  # type: ignore[assignment]

    async def _run_phase_on_thread(
        self,
        base: Callable[..., _R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        ending: bool = False,
    ) -> _R:
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[tuple[BaseException | None, Any]] = loop.create_future()

        def report(error: BaseException | None, result: Any) -> None:
            loop.call_soon_threadsafe(_settle, finished, (error, result))

        self._loop = loop
        self._start_thread(base, args, kwargs, report, ending=ending)
        # (after the start: a refused start must not replace the running
        # phase's future, which end() awaits; no await comes in between)
        self._finished = finished
        try:
            error, result = await asyncio.shield(finished)
        except asyncio.CancelledError:
            self._abort_for("the task awaiting the phase was cancelled")
            # The thread finishes at once now; wait for it, so that nothing
            # is left inside libpam when the cancellation goes on.
            await asyncio.shield(finished)
            raise
        requested, self._requested_delay = self._requested_delay, None
        if requested is not None and self._delay_policy is not None and not ending:
            status, delay_usec, requested_at = requested
            # counted from when libpam asked, as its own sleep would have been
            seconds = self._delay_policy(status, delay_usec) - (time.monotonic() - requested_at)
            if seconds > 0:
                await asyncio.sleep(seconds)
        if error is not None:
            raise error
        return cast(_R, result)

    def _phase_starting(self) -> None:
        self._requested_delay = None

    def _spawn(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
        # The low-level start: threading.Thread.start() waits until the new
        # thread runs, which stalls the loop for as long as a thousand other
        # threads keep the new one waiting for the GIL. The phase reports
        # through its future; nothing joins the thread.
        _thread.start_new_thread(target, args)

    def _fail_delay_called(self, status: int, delay_usec: int) -> None:
        if self._fail_delay is _await_on_the_loop:
            # libpam calls this on the phase's thread instead of sleeping
            # there; the phase's coroutine awaits the delay once the thread is gone.
            self._requested_delay = (status, delay_usec, time.monotonic())
        else:  # the application set its own fail_delay since
            super()._fail_delay_called(status, delay_usec)

    # -- the conversation, on the loop ------------------------------------------------

    def _wait_for_answers(self, messages: list[Message]) -> Any:
        loop = self._loop
        if loop is None:  # pragma: no cover - phases always set it
            raise ConversationAborted("no event loop to run the conversation on")
        coroutine = self._converse(messages)
        try:
            answers = asyncio.run_coroutine_threadsafe(coroutine, loop)
        except BaseException:
            coroutine.close()  # the loop is closed: never scheduled
            raise
        with self._state:
            self._pending_answers = answers
            if self._aborted:
                answers.cancel()
        try:
            return answers.result()
        except concurrent.futures.CancelledError:
            raise ConversationAborted(
                self._abort_reason or "the conversation coroutine was cancelled"
            ) from None
        finally:
            with self._state:
                self._pending_answers = None

    async def _converse(self, messages: list[Message]) -> Any:
        answers: Any = self.conversation(messages)
        if inspect.isawaitable(answers):
            answers = await answers
        if isinstance(answers, AsyncIterable):
            answers = [answer async for answer in answers]
        if isinstance(answers, Iterable) and not isinstance(answers, (str, bytes)):
            # A generator runs here, on the loop, not on the phase's thread.
            answers = list(answers)
        return answers

    def _abort_locked(self, reason: str) -> None:
        super()._abort_locked(reason)
        if self._pending_answers is not None:
            self._pending_answers.cancel()

    def _abort_for(self, reason: str) -> None:
        with self._state:
            if self._phase_running:
                self._abort_locked(reason)

    # -- ending ----------------------------------------------------------------------------

    async def end(self) -> None:  # type: ignore[override]  # a coroutine in this flavour
        """Abort a running phase, wait for its thread, then end as PamApplication does.

        When a session or credentials are still open, closing them runs on a
        thread of its own, as the phases do. end() does not
        converse: a module that speaks while end() closes the session gets
        PAM_CONV_ERR; close the session yourself first if it should be heard.
        """
        with self._state:
            self._ending = True
            if self._phase_running:
                self._abort_locked("the handle is being ended")
            running = self._finished if self._phase_running else None
        if running is not None:
            await asyncio.shield(running)
        if self._handle is None:
            return
        if self._session_open or self._credentials_established:
            # closing them runs modules, which may take their time: on a thread
            await self._run_phase_on_thread(PamApplication.end, (), {}, ending=True)
        else:
            # only pam_end is left, which frees the handle: no thread needed
            self._aborted = True
            PamApplication.end(self)

    async def __aenter__(self: _T) -> _T:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.end()

    def __enter__(self: _T) -> _T:
        raise TypeError(f"use 'async with' with {type(self).__name__}")

    def _end_in_finalizer(self) -> None:
        # end() is a coroutine here, and no loop may be left to converse:
        # end in place, every conversation refused.
        self._ending = self._aborted = True
        self._abort_reason = "the handle was never ended; the finalizer ends it"
        PamApplication.end(self)
