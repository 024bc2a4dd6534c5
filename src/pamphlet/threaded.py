"""ThreadedPamApplication: a PAM transaction driven with get_data and set_input.

libpam asks its questions from inside a blocking call (the conversation). A
server that cannot block there, because it learns the answers later in
another callback (paramiko, a web request), runs the phases that ask on a
thread of their own: the thread waits inside libpam while the server reads
the questions with :meth:`~ThreadedPamApplication.get_data` and answers with
:meth:`~ThreadedPamApplication.set_input`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from . import application
from ._flavours import HandleGuard, PhaseThread, wrap_phase
from .application import ApplicationBase
from .errors import (
    ConversationAborted,
    ConversationStateError,
    HandleBusyError,
    UnansweredPromptError,
)
from .message import Message

__all__ = [
    "ThreadedPamApplication",
    "HandleBusyError",
    "ConversationAborted",
    "ConversationStateError",
]


def _on_a_thread(app: ThreadedPamApplication, call: Callable[[], object]) -> threading.Thread:
    return app._start_phase(call)


_THREAD_NOTE = (
    "Starts the phase on a thread of its own and returns the thread; follow it with "
    "get_data() and set_input(), and join the thread once get_data() gave the outcome."
)


class ThreadedPamApplication(ApplicationBase):
    """A PAM transaction driven from outside: no conversation method to write.

    Instantiate it directly. :meth:`authenticate`, :meth:`change_authtoken`
    and :meth:`get_user`, the phases that ask the user, start a thread and
    return it (as the API document says). Then call :meth:`get_data`: it
    returns the messages of the pending conversation call (answer them with
    :meth:`set_input`), the exception the phase failed with, or ``None`` once
    it succeeded. Join the thread when the outcome is in.

    Every other phase (:meth:`account_management`, :meth:`open_session`, the
    credentials, :meth:`close_session`) is a plain call that returns or raises,
    as in PamApplication. Info and error messages a module sends during such a
    call are kept: read them with :meth:`pop_messages` and relay them. A
    prompt during a plain call fails the phase closed (ConversationError
    chained to an UnansweredPromptError that names it), unless a subclass
    provides a ``conversation`` method, which then answers every phase.

    If the peer goes away mid-conversation, call :meth:`abort` (or
    :meth:`end`, which aborts first) so that the thread and the handle do not
    wait forever. ``conversation_timeout`` (seconds) does it on its own when
    no answer comes in that time.
    """

    _new_guard = HandleGuard

    def __init__(
        self, *args: Any, conversation_timeout: float | None = None, **kwargs: Any
    ) -> None:
        """``ThreadedPamApplication(service, user=None, *, confdir=None, encoding="utf-8",
        conversation_timeout=None)``."""
        self.conversation_timeout = conversation_timeout
        self._pending: list[Message] | None = None
        self._answers: list[str | bytes | None] | None = None
        self._outcome: BaseException | None = None
        self._outcome_ready = False
        self._relayed: list[Message] = []
        super().__init__(*args, **kwargs)
        guard = self._transaction.guard
        assert isinstance(guard, HandleGuard)
        self._phase = PhaseThread(guard)
        self._phase.on_abort = self._drop_pending

    # -- the phases ------------------------------------------------------------------

    authenticate = wrap_phase(application.authenticate, _on_a_thread, _THREAD_NOTE)
    change_authtoken = wrap_phase(application.change_authtoken, _on_a_thread, _THREAD_NOTE)
    # The user it finds is the ``user`` item once get_data() says None.
    get_user = wrap_phase(application.get_user, _on_a_thread, _THREAD_NOTE)

    account_management = application.account_management
    acct_mgmt = application.account_management
    open_session = application.open_session
    close_session = application.close_session
    setcred = application.setcred
    initialize_credentials = application.initialize_credentials
    delete_credentials = application.delete_credentials
    reinitialize_credentials = application.reinitialize_credentials
    refresh_credentials = application.refresh_credentials

    def _start_phase(self, call: Callable[[], object]) -> threading.Thread:
        self._transaction.check_open()
        thread = self._phase.start(call, self._report, reset=self._reset)
        assert thread is not None
        return thread

    def _reset(self) -> None:
        self._outcome = None
        self._outcome_ready = False
        self._pending = None
        self._answers = None

    def _report(self, error: BaseException | None, result: object) -> None:
        self._outcome = error
        self._outcome_ready = True

    # -- the conversation ----------------------------------------------------------------

    def _answer(self, messages: list[Message]) -> Any:
        conversation = getattr(self, "conversation", None)
        if conversation is not None:
            return conversation(messages)
        if self._phase.on_phase_thread():
            with self._phase.state:
                self._phase.check_not_aborted()
            with self._phase.guard.lend():
                return self._wait_for_answers(messages)
        # A plain call: nobody waits on get_data() to answer.
        for message in messages:
            if message.is_prompt:
                raise UnansweredPromptError(
                    message,
                    type(self).__name__,
                    "the PAM stack asked during a phase that runs without a thread",
                    how="ask through authenticate(), change_authtoken() or get_user(), or give "
                    "the subclass a conversation method",
                )
        self._relayed.extend(messages)
        return [None] * len(messages)

    def _wait_for_answers(self, messages: list[Message]) -> list[str | bytes | None]:
        timeout = self.conversation_timeout
        state = self._phase.state
        with state:
            self._pending = list(messages)
            self._answers = None
            state.notify_all()
            try:
                answered = state.wait_for(
                    lambda: self._answers is not None or self._phase.aborted, timeout
                )
                if not answered:
                    self._phase.abort_locked(f"no answer came within {timeout} s")
                self._phase.check_not_aborted()
                assert self._answers is not None
                return self._answers
            finally:
                self._pending = None
                self._answers = None

    def _drop_pending(self) -> None:
        # Called under the phase's state by abort: nothing may answer any more.
        self._pending = None
        self._answers = None

    def pop_messages(self) -> list[Message]:
        """The info and error messages that phases without a thread received.

        Oldest first; they are forgotten once returned. Relay them to the user.
        """
        with self._phase.state:
            messages, self._relayed = self._relayed, []
        return messages

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
        state = self._phase.state
        with state:
            if not self._phase.running and not self._outcome_ready:
                raise ConversationStateError(
                    "get_data(): no phase has been started (authenticate, change_authtoken "
                    "and get_user run on a thread; the other phases return or raise)"
                )
            if not state.wait_for(
                lambda: self._pending is not None or self._outcome_ready, timeout
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
        with self._phase.state:
            pending = self._pending
            if self._phase.aborted or self._phase.ending:
                raise ConversationStateError(
                    "set_input(): the conversation was aborted; nothing may answer it"
                )
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
            self._phase.state.notify_all()

    def abort(self) -> None:
        """Release the running phase's conversation: the peer is gone.

        The pending conversation call (or the next one, if the phase is still
        working) gets PAM_CONV_ERR, the phase fails with ConversationError and
        its thread finishes on its own. Nothing happens if no phase runs.
        """
        self._phase.abort("abort() released the conversation")

    def end(self) -> None:
        """Abort a running phase, wait for its thread, then end as PamApplication does.

        end() does not converse: a module that speaks while end() closes the
        session gets PAM_CONV_ERR. Close the session yourself first if it
        should be heard.
        """
        self._phase.begin_ending()
        self._phase.wait()
        self._transaction.end(close=self._end_closes, converse=False)

    def __enter__(self) -> ThreadedPamApplication:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end()
