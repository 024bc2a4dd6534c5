"""ThreadedPamApplication: a PAM transaction driven with get_data and set_input.

libpam asks its questions from inside a blocking call (the conversation). A
server that cannot block there, because it learns the answers later in
another callback (paramiko, a web request), runs the phases that ask on a
thread of their own: the thread waits inside libpam while the server reads
the questions with :meth:`~ThreadedPamApplication.get_data` and answers with
:meth:`~ThreadedPamApplication.set_input`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from typing import Any

from . import application
from ._flavours import HandleGuard, PhaseThread
from .application import PamApplication
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


class ThreadedPamApplication(PamApplication):
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
    no answer comes in that time. :meth:`end` returns once the phase's thread
    has been joined.

    It is a :class:`PamApplication` (the API document's subclass), with one
    difference in signature: the three methods above return the phase's
    ``threading.Thread`` where PamApplication's return None, and raise
    nothing themselves (the outcome comes from :meth:`get_data`).
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
        self._phase = PhaseThread(self._transaction)
        self._phase.on_abort = self._drop_pending

    # -- the phases ------------------------------------------------------------------
    # The phases that ask the user return their thread (the API document's
    # choice), where PamApplication's return None: one ignore each for that.
    # The others are PamApplication's, as they are.

    def authenticate(  # type: ignore[override]
        self,
        silent: bool = False,
        disallow_null_authtoken: bool = False,
        *,
        flags: int = 0,
    ) -> threading.Thread:
        """pam_authenticate on a thread of its own; returns the thread.

        Follow it with get_data() and set_input(), and join the thread once
        get_data() gave the outcome.
        """
        return self._start_phase(
            functools.partial(
                application.authenticate, self, silent, disallow_null_authtoken, flags=flags
            )
        )

    def change_authtoken(  # type: ignore[override]
        self,
        silent: bool = False,
        change_expired_authtoken: bool = False,
        *,
        flags: int = 0,
    ) -> threading.Thread:
        """pam_chauthtok on a thread of its own; returns the thread (see authenticate)."""
        return self._start_phase(
            functools.partial(
                application.change_authtoken, self, silent, change_expired_authtoken, flags=flags
            )
        )

    def get_user(self, prompt: str | None = None) -> threading.Thread:  # type: ignore[override]
        """pam_get_user on a thread of its own; returns the thread (see authenticate).

        The user it finds is the ``user`` item once get_data() says None.
        """
        return self._start_phase(functools.partial(application.get_user, self, prompt))

    def _start_phase(self, call: Callable[[], object]) -> threading.Thread:
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
        if type(self).conversation is not PamApplication.conversation:
            return self.conversation(messages)  # a subclass's answers every phase
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
            if self._phase.aborted or not self._transaction.open:
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
