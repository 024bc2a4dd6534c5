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
from collections.abc import AsyncIterable, Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, Literal, NoReturn, Self, TypeVar

from . import application
from ._flavours import HandleGuard, PhaseThread, wrap_phase
from .application import ApplicationBase, FailDelay
from .errors import ConversationAborted
from .message import Message

__all__ = ["AsyncPamApplication", "FailDelayPolicy", "libpam_delay"]

_R = TypeVar("_R")

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


def _awaited(app: AsyncPamApplication, call: Callable[[], _R]) -> Coroutine[Any, Any, _R]:
    return app._run_phase(call)


_ASYNC_NOTE = "A coroutine: the phase runs on a thread of its own."


class AsyncPamApplication(ApplicationBase):
    """A PAM transaction for asyncio: subclass it and write ``async def conversation``.

    ::

        class WebLogin(AsyncPamApplication):
            async def conversation(self, messages):
                return [await ask(message) if message.is_prompt else "" for message in messages]

        async with WebLogin("login", "alice") as app:
            await app.authenticate()
            await app.account_management()

    Every phase is a coroutine. Cancelling the task that awaits one ends its
    conversation (PAM_CONV_ERR) and waits for the phase's thread to leave
    libpam; the handle can then be ended. ``end()`` is a coroutine too, and
    ``async with`` calls it.

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

    _new_guard = HandleGuard

    def __init__(
        self,
        *args: Any,
        fail_delay: Literal["asyncio", "libpam"] | FailDelayPolicy = "asyncio",
        **kwargs: Any,
    ) -> None:
        """``AsyncPamApplication(service, user=None, *, confdir=None, encoding="utf-8",
        fail_delay="asyncio")``."""
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
        super().__init__(*args, **kwargs)
        self._phase = PhaseThread(self._transaction)
        self._phase.on_abort = self._cancel_pending_answers
        if policy is not None:
            self._transaction.set_fail_delay(True)

    # -- what subclasses write ---------------------------------------------------

    async def conversation(self, messages: list[Message]) -> Iterable[str | bytes | None]:
        """Answer the PAM stack: one answer per message, ``""`` for non-prompts.

        A coroutine returning a list (an async generator works too). It runs
        on the event loop that awaits the phase.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no conversation method, but the PAM stack sent {messages!r}"
        )

    # -- the phases ----------------------------------------------------------------

    authenticate = wrap_phase(application.authenticate, _awaited, _ASYNC_NOTE)
    account_management = wrap_phase(application.account_management, _awaited, _ASYNC_NOTE)
    acct_mgmt = account_management
    open_session = wrap_phase(application.open_session, _awaited, _ASYNC_NOTE)
    close_session = wrap_phase(application.close_session, _awaited, _ASYNC_NOTE)
    change_authtoken = wrap_phase(application.change_authtoken, _awaited, _ASYNC_NOTE)
    setcred = wrap_phase(application.setcred, _awaited, _ASYNC_NOTE)
    initialize_credentials = wrap_phase(application.initialize_credentials, _awaited, _ASYNC_NOTE)
    delete_credentials = wrap_phase(application.delete_credentials, _awaited, _ASYNC_NOTE)
    reinitialize_credentials = wrap_phase(
        application.reinitialize_credentials, _awaited, _ASYNC_NOTE
    )
    refresh_credentials = wrap_phase(application.refresh_credentials, _awaited, _ASYNC_NOTE)
    get_user = wrap_phase(application.get_user, _awaited, _ASYNC_NOTE)

    async def _run_phase(self, call: Callable[[], _R]) -> _R:
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[tuple[BaseException | None, Any]] = loop.create_future()

        def report(error: BaseException | None, result: object) -> None:
            loop.call_soon_threadsafe(_settle, finished, (error, result))

        # The loop is the phase's only once its start is accepted: a refused
        # start from another loop must not take the running phase's.
        self._phase.start(call, report, joinable=False, reset=functools.partial(self._reset, loop))
        # (after the start: a refused start must not replace the running
        # phase's future, which end() awaits; no await comes in between)
        self._finished = finished
        try:
            error, result = await asyncio.shield(finished)
        except asyncio.CancelledError:
            self._phase.abort("the task awaiting the phase was cancelled")
            # Nothing may be left inside libpam when the cancellation goes on:
            # wait for the thread, through any further cancellation too.
            while not finished.done():
                try:
                    await asyncio.shield(finished)
                except asyncio.CancelledError:
                    pass
            raise
        requested, self._requested_delay = self._requested_delay, None
        if requested is not None and self._delay_policy is not None:
            status, delay_usec, requested_at = requested
            # counted from when libpam asked, as its own sleep would have been
            seconds = self._delay_policy(status, delay_usec) - (time.monotonic() - requested_at)
            if seconds > 0:
                await asyncio.sleep(seconds)
        if error is not None:
            raise error
        return result  # type: ignore[no-any-return]

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        self._requested_delay = None
        self._loop = loop

    def _on_fail_delay(self, status: int, delay_usec: int) -> None:
        if self._fail_delay is not None:
            self._fail_delay(status, delay_usec)
        elif self._delay_policy is not None:
            # libpam calls this on the phase's thread instead of sleeping
            # there; the phase's coroutine awaits the delay once the thread is gone.
            self._requested_delay = (status, delay_usec, time.monotonic())

    def _routes_fail_delay(self, function: FailDelay | None) -> bool:
        return function is not None or self._delay_policy is not None

    # -- the conversation, on the loop ------------------------------------------------

    def _answer(self, messages: list[Message]) -> Any:
        loop = self._loop
        if loop is None or not self._phase.on_phase_thread():
            raise ConversationAborted("no event loop is running a phase to converse on")
        with self._phase.state:
            self._phase.check_not_aborted()
        coroutine = self._converse(messages)
        with self._phase.guard.lend():
            try:
                answers = asyncio.run_coroutine_threadsafe(coroutine, loop)
            except BaseException:
                coroutine.close()  # the loop is closed: never scheduled
                raise
            with self._phase.state:
                self._pending_answers = answers
                if self._phase.aborted:
                    answers.cancel()
            try:
                return answers.result()
            except concurrent.futures.CancelledError:
                raise ConversationAborted(
                    self._phase.abort_reason or "the conversation coroutine was cancelled"
                ) from None
            finally:
                with self._phase.state:
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

    def _cancel_pending_answers(self) -> None:
        # Called under the phase's state by abort.
        if self._pending_answers is not None:
            self._pending_answers.cancel()

    # -- ending ----------------------------------------------------------------------------

    async def end(self) -> None:
        """Abort a running phase, wait for its thread, then end as PamApplication does.

        When a session or credentials are still open, closing them runs on a
        thread of its own, as the phases do. end() does not converse: a
        module that speaks while end() closes the session gets PAM_CONV_ERR;
        close the session yourself first if it should be heard.
        """
        cancelled = False
        running = self._finished if self._phase.begin_ending() else None
        while running is not None and not running.done():
            try:
                await asyncio.shield(running)
            except asyncio.CancelledError:
                cancelled = True  # ending finishes first, or the handle would stay open
        transaction = self._transaction
        if transaction.has_open_state and self._end_closes and not transaction.ended:
            # Closing runs modules, which may take their time: on a thread.
            loop = asyncio.get_running_loop()
            closing: asyncio.Future[BaseException | None] = loop.create_future()

            def close() -> None:
                error: BaseException | None = None
                try:
                    transaction.end(converse=False)
                except BaseException as exc:
                    error = exc
                loop.call_soon_threadsafe(_settle, closing, error)

            # A bare thread, as for the phases: no pool that could be starved.
            _thread.start_new_thread(close, ())
            while not closing.done():
                try:
                    await asyncio.shield(closing)
                except asyncio.CancelledError:
                    cancelled = True
            error = closing.result()
            if error is not None:
                raise error
        else:
            transaction.end(close=self._end_closes, converse=False)
        if cancelled:
            raise asyncio.CancelledError

    def __enter__(self) -> NoReturn:
        raise TypeError(f"use 'async with' with {type(self).__name__}")

    def __exit__(self, *exc_info: object) -> None:
        """Never reached: __enter__ refuses."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.end()
