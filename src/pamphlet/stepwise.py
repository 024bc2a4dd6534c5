"""The stepwise login: a PAM login handed out one step at a time, for the web.

PAM asks from inside a blocking call; a web login answers one request at a
time, perhaps in another process. :class:`Login` runs the login sequence
(:class:`LoginSequence`: authenticate, acct_mgmt, an expired password changed
on the same handle, a session if wanted) and stops at every question: a
:class:`Step` (prompts, and the notices since the last step). ``answer()``
goes on to the next step or the :class:`Outcome`. :class:`AsyncLogin` is the
same for asyncio. Two transports: in this process (the phases on a thread of
the login's own, the flavours' :class:`~pamphlet._flavours.PhaseThread`), or
the broker (``broker=PATH``), where a login can be detached between requests
and resumed in any process of the site.

:class:`LoginRegistry` holds the rules for logins in progress that every web
front end needs: only an answer extends a login's life, caps in total and per
client address, every login ended on expiry and at shutdown. Every failure
before the user has authenticated reads :data:`LOGIN_INCORRECT`; the real
code and libpam's text go to the ``pamphlet.stepwise`` logger.

See docs/guide/stepwise.md.
"""

from __future__ import annotations

import _thread
import asyncio
import dataclasses
import ipaddress
import logging
import math
import os
import secrets
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from ._flavours import HandleGuard, PhaseThread
from .application import ApplicationBase
from .broker.client import BrokerSteps, Progress
from .broker.errors import (
    BrokerError,
    BrokerNotTrusted,
    BrokerUnavailable,
    Busy,
    ResumeRefused,
)
from .constants import Flag, Item, Phase, ReturnCode
from .errors import ConversationStateError, PamError, pam_error
from .message import Message

__all__ = [
    "Login",
    "AsyncLogin",
    "LoginSequence",
    "Step",
    "Outcome",
    "LoginRegistry",
    "TooManyLogins",
    "address_key",
    "LOGIN_INCORRECT",
]

log = logging.getLogger("pamphlet.stepwise")

#: What every failure before the user has authenticated says to the browser.
LOGIN_INCORRECT = "Login incorrect."
CANCELLED = "Login cancelled."
EXPIRED = "This login waited too long and has ended."
UNAVAILABLE = "The login service is unavailable; try again later."
BROKEN = "Something went wrong on our side. Please try again."
SESSION_FAILED = "The session could not be set up."

_SUCCESS = int(ReturnCode.SUCCESS)
_NEW_AUTHTOK_REQD = int(ReturnCode.NEW_AUTHTOK_REQD)
_ABORT = int(ReturnCode.ABORT)


@dataclasses.dataclass(frozen=True)
class LoginSequence:
    """Which phases a login runs, as data.

    ``authenticate`` (unless ``authenticate`` is false); then ``acct_mgmt``
    when ``check_account``; when acct_mgmt says the password has expired (PAM_NEW_AUTHTOK_REQD) and
    ``change_expired_password``, ``chauthtok(PAM_CHANGE_EXPIRED_AUTHTOK)`` on
    the same handle; with ``open_session``, ``setcred(PAM_ESTABLISH_CRED)``
    and ``open_session`` on success (the handle then stays until ``end()``).
    """

    check_account: bool = True
    change_expired_password: bool = True
    open_session: bool = False
    #: False only for a handle that opens a session for a user authenticated
    #: before (a JupyterHub spawn after a hub restart, as PAMAuthenticator does).
    authenticate: bool = True
    #: Keep the handle after a success without a session, for a session
    #: opened later on it (:meth:`Login.open_session`, at a JupyterHub spawn).
    keep_handle: bool = False

    @property
    def keeps_handle(self) -> bool:
        return self.open_session or self.keep_handle

    def next_call(self, done: Phase | None, code: int) -> tuple[Phase, int] | None:
        """The phase (and flags) after ``done`` returned ``code``; None: decided."""
        if done is None:
            if self.authenticate:
                return Phase.AUTHENTICATE, 0
            return self.next_call(Phase.AUTHENTICATE, _SUCCESS)
        if done is Phase.ACCT_MGMT and code == _NEW_AUTHTOK_REQD and self.change_expired_password:
            return Phase.CHAUTHTOK, int(Flag.CHANGE_EXPIRED_AUTHTOK)
        if code != _SUCCESS:
            return None
        if done is Phase.AUTHENTICATE and self.check_account:
            return Phase.ACCT_MGMT, 0
        if done is Phase.SETCRED:
            return Phase.OPEN_SESSION, 0
        if done is not Phase.OPEN_SESSION and self.open_session:
            return Phase.SETCRED, int(Flag.ESTABLISH_CRED)
        return None


@dataclasses.dataclass(frozen=True)
class Step:
    """Where a login waits: the stack's question.

    ``number`` counts the steps from 1 (put it in the form: a stale page is
    then recognised); ``prompts`` are the questions, one field each;
    ``notices`` the info and error messages since the last step, in order;
    ``changing_password`` is true while an expired password is changed.
    """

    number: int
    prompts: tuple[Message, ...]
    notices: tuple[Message, ...]
    changing_password: bool = False


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a login ended.

    ``message`` is safe to show a browser (``""`` on success); ``code`` and
    ``detail`` (libpam's text, or the broker's or our error) are for the log.
    ``user`` is the user PAM settled on, on success; ``environ`` the PAM
    environment when a session was opened.
    """

    success: bool
    user: str | None
    message: str
    notices: tuple[Message, ...] = ()
    code: int | None = None
    detail: str = ""
    phase: Phase | None = None
    environ: dict[str, str] = dataclasses.field(default_factory=dict)


def _failure_text(done: Phase | None, code: int, strerror: str) -> str:
    if done is Phase.AUTHENTICATE or done is None:
        return LOGIN_INCORRECT
    if done is Phase.ACCT_MGMT:
        if code == _NEW_AUTHTOK_REQD:
            return "Your password has expired; change it before you log in."
        return f"This account may not log in now: {strerror}"
    if done is Phase.CHAUTHTOK:
        return f"Your password was not changed: {strerror}"
    return SESSION_FAILED


def _outside_the_login(messages: list[Message], user: str | None) -> list[str | None]:
    """A conversation after the login (a session opened later): nobody can answer."""
    for message in messages:
        if message.is_prompt:
            raise ConversationStateError(f"nobody can answer {str(message)!r} after the login")
        log.info("PAM said to %r after the login: %s", user, message)
    return [None] * len(messages)


def _split(messages: Sequence[Message]) -> tuple[tuple[Message, ...], tuple[Message, ...]]:
    prompts = tuple(m for m in messages if m.is_prompt)
    return prompts, tuple(m for m in messages if not m.is_prompt)


class _Recorder:
    """What both transports keep: the sequence, the step count, the verdict."""

    def __init__(self, sequence: LoginSequence, user: str | None, rhost: str | None) -> None:
        self.sequence = sequence
        self.user = user
        self.rhost = rhost
        self.number = 0
        self.done: Phase | None = None
        self.authenticated = False
        self.reason: str | None = None  # CANCELLED or EXPIRED once asked for
        # Set for an in-process login only: where the doctor would look when
        # PAM refuses (a broker runs as root with its own stacks).
        self.stack: tuple[str, str | None] | None = None

    def step(self, messages: Sequence[Message], notices: Sequence[Message]) -> Step:
        self.number += 1
        prompts, said = _split(messages)
        return Step(
            self.number, prompts, (*notices, *said), changing_password=self.done is Phase.CHAUTHTOK
        )

    def begin(self, phase: Phase) -> Message | None:
        """A phase of the sequence starts; the notice to show with its first step, if any."""
        self.done = phase
        if phase is Phase.CHAUTHTOK:
            return Message("Your password has expired. Choose a new one.")
        return None

    def ran(self, phase: Phase, code: int) -> None:
        if phase is Phase.AUTHENTICATE and code == _SUCCESS:
            self.authenticated = True

    def verdict(
        self,
        code: int,
        strerror: str,
        notices: Sequence[Message],
        *,
        user: str | None = None,
        environ: dict[str, str] | None = None,
    ) -> Outcome:
        if code == _SUCCESS and self.reason is None:
            return Outcome(
                True, user or self.user, "", tuple(notices), code, "", self.done, environ or {}
            )
        message = self.reason or _failure_text(self.done, code, strerror)
        detail = f"{self.done.value if self.done else 'start'}: {strerror} ({code})"
        if self.stack is not None and not self.authenticated:
            from .doctor import refusal_hint

            service, confdir = self.stack
            hint = refusal_hint(pam_error(code, strerror), service, self.user, confdir)
            if hint is not None:
                detail = f"{detail}; {hint}"
        self._log(detail)
        return Outcome(False, None, message, tuple(notices), code, detail, self.done)

    def broken(self, error: BaseException, notices: Sequence[Message]) -> Outcome:
        """The outcome of an error on our side or the broker's (never a success)."""
        if isinstance(error, (BrokerUnavailable, BrokerNotTrusted, Busy)):
            message = UNAVAILABLE
        elif self.reason is not None:
            message = self.reason
        elif isinstance(error, (BrokerError, PamError, ValueError)) and not self.authenticated:
            message = LOGIN_INCORRECT
        elif isinstance(error, (BrokerError, PamError)):
            message = "The login could not go on; start again."
        else:
            message = BROKEN
        code = error.code if isinstance(error, PamError) else None
        detail = f"{type(error).__name__}: {error}"
        if message == BROKEN:
            log.error("the login of %r from %s broke", self.user, self.rhost, exc_info=error)
        else:
            self._log(detail)
        return Outcome(False, None, message, tuple(notices), code, detail, self.done)

    def _log(self, detail: str) -> None:
        log.info(
            "login of %r from %s failed (%s): %s",
            self.user,
            self.rhost or "-",
            self.reason or "refused",
            detail,
        )


# -- the in-process transport ---------------------------------------------------------


class _StepApplication(ApplicationBase):
    """The handle of an in-process login; its conversation is the login's."""

    _new_guard = HandleGuard

    def __init__(self, driver: _InProcess, *args: Any, **kwargs: Any) -> None:
        self._driver = driver
        super().__init__(*args, **kwargs)

    def _answer(self, messages: list[Message]) -> Any:
        return self._driver.converse(messages)

    def _on_fail_delay(self, status: int, delay_usec: int) -> None:
        self._driver.note_delay(status, delay_usec)


class _InProcess:
    """The login sequence on a phase thread of its own, waiting inside libpam."""

    def __init__(
        self,
        record: _Recorder,
        service: str,
        user: str | None,
        items: dict[Item, str],
        *,
        confdir: str | None,
        encoding: str,
    ) -> None:
        self.record = record
        self.app = _StepApplication(self, service, user, confdir=confdir, encoding=encoding)
        try:
            for item, value in items.items():
                self.app.set_item(item, value)
        except BaseException:
            self.app._transaction.end(close=False, converse=False)
            raise
        # libpam's failure delay comes here instead of sleeping in libpam: the
        # last phase's delay is waited out by whoever waits for the outcome
        # (on the event loop for AsyncLogin), after the phase thread is gone.
        self._delay: tuple[float, float] | None = None  # (when asked, seconds)
        #: When the outcome may be shown (monotonic), after a failure's delay.
        self.delay_until = 0.0
        self.app._transaction.set_fail_delay(True)
        self.thread = PhaseThread(self.app._transaction)
        self.thread.on_abort = self._drop_answers
        self.state = self.thread.state
        self._notices: list[Message] = []
        self._batch: list[Message] = []
        self._answers: list[str | None] | None = None
        self.step: Step | None = None
        self.outcome: Outcome | None = None

    # -- the phase thread ------------------------------------------------------------

    def run(self) -> Step | Outcome:
        self.thread.start(self._sequence, self._report, joinable=False)
        return self._next()

    def _sequence(self) -> Outcome:
        record, transaction = self.record, self.app._transaction
        code, strerror, keep = _SUCCESS, "", False
        try:
            while (call := record.sequence.next_call(record.done, code)) is not None:
                if record.reason is not None:
                    break  # released between phases: no phase after it
                phase, flags = call
                notice = record.begin(phase)
                if notice is not None:
                    with self.state:
                        self._notices.append(notice)
                try:
                    transaction.run(phase, flags)
                    code, strerror = _SUCCESS, ""
                except PamError as error:
                    code, strerror = int(error.code), error.strerror
                record.ran(phase, code)
                delay, self._delay = self._delay, None
                if delay is not None:
                    until = delay[0] + delay[1]
                    if record.sequence.next_call(phase, code) is None:
                        self.delay_until = until  # the caller waits, not this thread
                    else:
                        time.sleep(max(0.0, until - time.monotonic()))
            with self.state:
                notices, self._notices = self._notices, []
            if code != _SUCCESS or record.reason is not None:
                return record.verdict(code, strerror, notices)
            keep = record.sequence.keeps_handle
            environ = dict(self.app.environ) if record.sequence.open_session else {}
            return record.verdict(code, "", notices, user=self.app.user, environ=environ)
        finally:
            if not keep:
                transaction.end(close=True, converse=False)

    def _report(self, error: BaseException | None, result: object) -> None:
        # Under ``state``, on the phase thread, last.
        if error is not None:
            if not self.app.ended:
                try:
                    self.app._transaction.end(close=True, converse=False)
                except BaseException:
                    pass
            self.outcome = self.record.broken(error, self._notices)
        else:
            assert isinstance(result, Outcome)
            self.outcome = result
        self.step = None
        self.state.notify_all()

    def converse(self, messages: list[Message]) -> list[str | None]:
        if not self.thread.on_phase_thread():
            return _outside_the_login(messages, self.record.user)
        if not any(m.is_prompt for m in messages):
            with self.state:
                self._notices.extend(messages)
            return [None] * len(messages)
        with self.state:
            self.thread.check_not_aborted()
        with self.thread.guard.lend(), self.state:
            self.step = self.record.step(messages, self._notices)
            self._notices = []
            self._batch = messages
            self._answers = None
            self.state.notify_all()
            self.state.wait_for(lambda: self._answers is not None or self.thread.aborted)
            self.thread.check_not_aborted()
            answers, self._answers = self._answers, None
            assert answers is not None
            return answers

    def _drop_answers(self) -> None:
        # Under ``state``, by abort: nothing may answer any more.
        self._answers = None
        self.step = None

    # -- the caller's side -----------------------------------------------------------

    def _next(self) -> Step | Outcome:
        with self.state:
            self.state.wait_for(lambda: self.step is not None or self.outcome is not None)
            return self.step or self.outcome  # type: ignore[return-value]

    def answer(self, answers: Sequence[str]) -> Step | Outcome:
        with self.state:
            step = self.step
            if step is None:
                raise ConversationStateError("this login waits for no answer")
            if len(answers) != len(step.prompts):
                raise ValueError(f"{len(step.prompts)} answers are needed, not {len(answers)}")
            given = iter(answers)
            self._answers = [next(given) if m.is_prompt else None for m in self._batch]
            self.step = None
            self.state.notify_all()
        return self._next()

    def release(self, reason: str) -> None:
        """Fail the waiting question (PAM_CONV_ERR); the thread ends the handle."""
        with self.state:
            if self.record.reason is None:
                self.record.reason = reason
        self.thread.abort(reason)

    def wait(self, timeout: float | None) -> bool:
        with self.state:
            return self.state.wait_for(lambda: self.outcome is not None, timeout)

    def run_later(self, phase: Phase, flags: int) -> None:
        """A phase on the kept handle after the login (nobody answers its questions)."""
        self.app._transaction.run(phase, flags)

    def note_delay(self, status: int, delay_usec: int) -> None:
        if status != _SUCCESS and delay_usec > 0:
            self._delay = (time.monotonic(), delay_usec / 1_000_000)

    def remaining_delay(self) -> float:
        return max(0.0, self.delay_until - time.monotonic())

    def end(self) -> None:
        if self.outcome is None:
            self.release(EXPIRED if self.record.reason is None else self.record.reason)
        self.thread.begin_ending()
        self.thread.wait()
        self.app._transaction.end(close=True, converse=False)

    @property
    def ended(self) -> bool:
        return self.app.ended


# -- the broker transport ---------------------------------------------------------------


class _Broker:
    """The login sequence driven through the broker, a step per exchange."""

    def __init__(self, record: _Recorder, steps: BrokerSteps) -> None:
        self.record = record
        self.steps = steps
        self.notices: list[Message] = []
        self.step: Step | None = None
        self.outcome: Outcome | None = None
        self.session_open = False

    def run(self, items: dict[Item, str]) -> Step | Outcome:
        try:
            for item, value in items.items():
                code = self.steps.set_item(item, value)
                if code != _SUCCESS:
                    raise PamError(self.steps.strerror(code), code=code)
            return self._advance(None)
        except (BrokerError, PamError, ValueError) as error:
            return self._broke(error)

    def _advance(self, progress: Progress | None) -> Step | Outcome:
        record, steps = self.record, self.steps
        while True:
            if progress is not None:
                if progress.waiting is not None:
                    said = progress.messages[: len(progress.messages) - len(progress.waiting)]
                    self.notices.extend(said)
                    self.step = record.step(progress.waiting, self.notices)
                    self.notices = []
                    return self.step
                self.notices.extend(progress.messages)
                assert progress.code is not None
                code = progress.code
                assert record.done is not None
                record.ran(record.done, code)
            else:
                code = _SUCCESS
            call = record.sequence.next_call(record.done, code)
            if call is None:
                return self._finish(code)
            phase, flags = call
            notice = record.begin(phase)
            if notice is not None:
                self.notices.append(notice)
            progress = steps.call(phase, flags)

    def _finish(self, code: int) -> Outcome:
        notices, self.notices = self.notices, []
        record, steps = self.record, self.steps
        if code != _SUCCESS or record.reason is not None:
            self.outcome = record.verdict(code, steps.strerror(code), notices)
            steps.end(code)
            return self.outcome
        user = steps.get_item(Item.USER)
        self.outcome = record.verdict(code, "", notices, user=user)
        self.session_open = record.sequence.open_session
        if not record.sequence.keeps_handle:
            steps.end(_SUCCESS)
        return self.outcome

    def _broke(self, error: BaseException) -> Outcome:
        self.steps.close()  # the worker ends the handle
        self.step = None
        self.outcome = self.record.broken(error, self.notices)
        return self.outcome

    def answer(self, answers: Sequence[str]) -> Step | Outcome:
        step = self.step
        if step is None:
            raise ConversationStateError("this login waits for no answer")
        if len(answers) != len(step.prompts):
            raise ValueError(f"{len(step.prompts)} answers are needed, not {len(answers)}")
        self.step = None
        try:
            return self._advance(self.steps.answer(list(answers)))
        except (BrokerError, PamError, ValueError) as error:
            return self._broke(error)

    def release(self, reason: str) -> None:
        if self.record.reason is None:
            self.record.reason = reason
        self.steps.close()  # the worker ends the handle (PAM_CONV_ERR to a waiting call)

    def cancel(self) -> Outcome:
        self.record.reason = CANCELLED
        try:
            progress = self.steps.cancel()
            self.notices.extend(progress.messages)
            return self._finish(progress.code if progress.code is not None else _ABORT)
        except (BrokerError, PamError, RuntimeError) as error:
            return self._broke(error)

    def end(self) -> None:
        if self.outcome is None and self.record.reason is None:
            self.record.reason = EXPIRED
        success = self.outcome is not None and self.outcome.success
        if success and self.session_open and not self.steps.closed:
            # The worker's pam_end does not close what is open: a logout does.
            for phase, flags in ((Phase.CLOSE_SESSION, 0), (Phase.SETCRED, int(Flag.DELETE_CRED))):
                try:
                    if self.steps.call(phase, flags).waiting is not None:
                        self.steps.cancel()  # a module that asks at logout gets no answer
                except (BrokerError, RuntimeError) as error:
                    log.warning("%s of %r failed: %s", phase.value, self.record.user, error)
        self.steps.end(_SUCCESS if success else _ABORT)

    def run_later(self, phase: Phase, flags: int) -> None:
        """A phase on the kept handle after the login (nobody answers its questions)."""
        progress = self.steps.call(phase, flags)
        for message in progress.messages:
            if not message.is_prompt:
                log.info("PAM said to %r after the login: %s", self.record.user, message)
        if progress.waiting is not None:
            progress = self.steps.cancel()
        code = progress.code if progress.code is not None else int(ReturnCode.CONV_ERR)
        if code != _SUCCESS:
            raise pam_error(code, self.steps.strerror(code))
        if phase is Phase.OPEN_SESSION:
            self.session_open = True

    @property
    def ended(self) -> bool:
        return self.steps.closed


# -- the public objects ------------------------------------------------------------------


class Login:
    """One login, a step at a time (see the module's text and the guide).

    Make it with :meth:`start` (or :meth:`resume`). ``step`` is the step it
    waits at, ``outcome`` the outcome once it is decided; exactly one of the
    two is set.
    """

    def __init__(self, driver: _InProcess | _Broker, first: Step | Outcome) -> None:
        self._driver = driver
        self._lock = threading.Lock()  # one request at a time drives it
        self.step: Step | None = first if isinstance(first, Step) else None
        self.outcome: Outcome | None = first if isinstance(first, Outcome) else None

    @classmethod
    def start(
        cls,
        service: str,
        user: str | None,
        *,
        sequence: LoginSequence = LoginSequence(),
        rhost: str | None = None,
        tty: str | None = None,
        confdir: str | None = None,
        broker: str | None = None,
        broker_uid: int | None = None,
        encoding: str = "utf-8",
    ) -> Login:
        """Start a login and run it to its first step (or its outcome).

        ``rhost`` is the client's address (PAM_RHOST): give it. With
        ``broker`` the handle lives in the broker listening there. A failure
        to start (pam_start, the broker's refusal, a user name with a NUL) is
        an outcome, not an exception.
        """
        options: dict[str, Any] = dict(sequence=sequence, rhost=rhost, tty=tty, confdir=confdir)
        options.update(broker=broker, broker_uid=broker_uid, encoding=encoding)
        login = cls._begin(service, user, options)
        time.sleep(login.remaining_delay())
        return login

    @classmethod
    def _begin(cls, service: str, user: str | None, options: dict[str, Any]) -> Login:
        """:meth:`start` without waiting out a failure's delay (AsyncLogin awaits it)."""
        unknown = sorted(set(options) - _START_OPTIONS)
        if unknown:
            raise TypeError(f"Login.start() got an unexpected keyword argument {unknown[0]!r}")
        sequence: LoginSequence = options.get("sequence") or LoginSequence()
        rhost: str | None = options.get("rhost")
        tty: str | None = options.get("tty")
        confdir: str | None = options.get("confdir")
        broker: str | None = options.get("broker")
        broker_uid: int | None = options.get("broker_uid")
        encoding: str = options.get("encoding") or "utf-8"
        record = _Recorder(sequence, user, rhost)
        items = {k: v for k, v in ((Item.RHOST, rhost), (Item.TTY, tty)) if v is not None}
        if broker is not None:
            if confdir is not None:
                raise ValueError("confdir= cannot be used with broker=: the broker has its own")
            try:
                steps = BrokerSteps.start(
                    broker, service, user, encoding=encoding, broker_uid=broker_uid
                )
            except (BrokerError, PamError, ValueError) as error:
                return cls._failed(record, error)
            through_broker = _Broker(record, steps)
            return cls(through_broker, through_broker.run(items))
        record.stack = (service, confdir)
        try:
            in_process = _InProcess(
                record, service, user, items, confdir=confdir, encoding=encoding
            )
        except (PamError, ValueError) as error:
            return cls._failed(record, error)
        return cls(in_process, in_process.run())

    @classmethod
    def _failed(cls, record: _Recorder, error: BaseException) -> Login:
        self = cls.__new__(cls)
        self._driver = None  # type: ignore[assignment]
        self._lock = threading.Lock()
        self.step = None
        self.outcome = record.broken(error, ())
        return self

    @classmethod
    def resume(
        cls,
        broker: str,
        state: dict[str, Any],
        *,
        encoding: str = "utf-8",
        broker_uid: int | None = None,
    ) -> Login:
        """Take up a login that :meth:`detach` left with the broker, in any process.

        A token the broker refuses (used, expired, of another uid) makes the
        outcome a failure, as does anything else that went wrong.
        """
        record = _Recorder(LoginSequence(**state["sequence"]), state["user"], state["rhost"])
        record.number = int(state["number"])
        record.done = None if state["done"] is None else Phase(state["done"])
        record.authenticated = bool(state["authenticated"])
        try:
            steps = BrokerSteps.resume(
                broker, state["token"], encoding=encoding, broker_uid=broker_uid
            )
        except ResumeRefused as error:
            record.reason = EXPIRED  # used, expired, or another uid's: over, whatever it was
            return cls._failed(record, error)
        except (BrokerError, ValueError) as error:
            return cls._failed(record, error)
        driver = _Broker(record, steps)
        waiting = steps.waiting
        if waiting is None:
            steps.close()
            return cls._failed(record, BrokerError("the resumed login waited for no answer"))
        prompts, said = _split(waiting)
        driver.step = Step(record.number, prompts, said, record.done is Phase.CHAUTHTOK)
        return cls(driver, driver.step)

    # -- driving it ------------------------------------------------------------------

    def _drive(self, call: Callable[[], Step | Outcome]) -> Step | Outcome:
        with self._lock:
            if self.outcome is not None:
                raise ConversationStateError(
                    "this login is over: " + (self.outcome.message or "ok")
                )
            result = call()
            self.step = result if isinstance(result, Step) else None
            self.outcome = result if isinstance(result, Outcome) else None
            return result

    def remaining_delay(self) -> float:
        """Seconds of libpam's failure delay still to wait before the outcome is shown."""
        driver = self._driver
        return driver.remaining_delay() if isinstance(driver, _InProcess) else 0.0

    def answer(self, answers: Sequence[str]) -> Step | Outcome:
        """Answer the step's prompts, one answer each, in order; the next step or the outcome.

        A failure's outcome comes after the delay the stack asked for (pam_unix,
        pam_faildelay), as libpam would have slept it."""
        result = self._answer(answers)
        time.sleep(self.remaining_delay())
        return result

    def _answer(self, answers: Sequence[str]) -> Step | Outcome:
        if isinstance(answers, str):
            raise TypeError("answer() takes a list of answers, one per prompt, not a string")
        return self._drive(lambda: self._driver.answer(answers))

    def cancel(self) -> Outcome:
        """Fail the waiting question; the outcome is ``Login cancelled.``, the handle ended."""

        def cancel() -> Outcome:
            driver = self._driver
            if isinstance(driver, _Broker):
                return driver.cancel()
            driver.release(CANCELLED)
            driver.wait(None)
            assert driver.outcome is not None
            return driver.outcome

        result = self._drive(cancel)
        assert isinstance(result, Outcome)
        return result

    def detach(self) -> dict[str, Any]:
        """Leave a broker login with the broker between requests (see the guide).

        Returns what :meth:`resume` needs, JSON-able. It holds the resume
        token, a secret: keep it in a server-side session, never in a cookie.
        """
        driver = self._driver
        if not isinstance(driver, _Broker):
            raise TypeError("only a login through the broker can be detached")
        with self._lock:
            if self.step is None:
                raise ConversationStateError("only a login that waits at a step can be detached")
            record = driver.record
            token = driver.steps.detach()
            return {
                "token": token,
                "number": record.number,
                "done": None if record.done is None else record.done.value,
                "authenticated": record.authenticated,
                "user": record.user,
                "rhost": record.rhost,
                "sequence": dataclasses.asdict(record.sequence),
                "prompts": [[int(m.style), str(m)] for m in self.step.prompts],
                "notices": [[int(m.style), str(m)] for m in self.step.notices],
                "changing_password": self.step.changing_password,
                "detach_timeout": driver.steps.detach_timeout,
            }

    def abandon(self, reason: str = EXPIRED) -> None:
        """Release the login without waiting: its question fails, its handle is ended.

        For the registry's expiry; :meth:`end` waits too.
        """
        driver = self._driver
        if driver is not None and self.outcome is None:
            driver.release(reason)

    def end(self) -> None:
        """End the login wherever it is: close its session, end its handle. Idempotent."""
        driver = self._driver
        if driver is None:
            return
        driver.end()
        if self.outcome is None:
            self.step = None
            if isinstance(driver, _InProcess) and driver.outcome is not None:
                self.outcome = driver.outcome
            else:
                self.outcome = driver.record.broken(BrokerError("ended"), ())

    def open_session(self, *, credentials: bool = True) -> None:
        """Open a session on the handle of a successful login whose sequence kept it
        (``keep_handle``); :meth:`end` closes it. ``credentials``: establish
        them first (pam_setcred), which a server that must not change its own
        process (pam_group) leaves off. A module that asks something now gets
        no answer. Raises the PamError of a failure."""
        driver = self._driver
        if driver is None or self.outcome is None or not self.outcome.success:
            raise ConversationStateError(
                "only a successful login has a handle to open a session on"
            )
        if not driver.record.sequence.keeps_handle or driver.ended:
            raise ConversationStateError("this login's handle was not kept (keep_handle=False)")
        with self._lock:
            if credentials:
                driver.run_later(Phase.SETCRED, int(Flag.ESTABLISH_CRED))
            driver.run_later(Phase.OPEN_SESSION, 0)

    @property
    def ended(self) -> bool:
        """Whether the handle is gone (failed, or ended)."""
        return self._driver is None or self._driver.ended

    @property
    def user(self) -> str | None:
        """The user name the login was started with (the outcome has PAM's)."""
        return None if self._driver is None else self._driver.record.user


_T = TypeVar("_T")


async def _off_the_loop(call: Callable[[], _T]) -> _T:
    """``call()`` on a thread of its own (never a bounded pool), awaited on the loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(error: BaseException | None, value: Any) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def main() -> None:
        try:
            value = call()
        except BaseException as error:
            try:
                loop.call_soon_threadsafe(settle, error, None)
            except RuntimeError:  # pragma: no cover - the loop closed meanwhile
                pass
            return
        try:
            loop.call_soon_threadsafe(settle, None, value)
        except RuntimeError:  # pragma: no cover
            pass

    _thread.start_new_thread(main, ())
    return await asyncio.shield(future)


class AsyncLogin:
    """:class:`Login` for asyncio: the same steps, with coroutines that never block the loop."""

    def __init__(self, login: Login) -> None:
        self.login = login

    @classmethod
    async def start(cls, service: str, user: str | None, **kwargs: Any) -> AsyncLogin:
        """As :meth:`Login.start` (same keywords)."""
        login = cls(await _off_the_loop(lambda: Login._begin(service, user, kwargs)))
        await asyncio.sleep(login.login.remaining_delay())
        return login

    @classmethod
    async def resume(cls, broker: str, state: dict[str, Any], **kwargs: Any) -> AsyncLogin:
        return cls(await _off_the_loop(lambda: Login.resume(broker, state, **kwargs)))

    @property
    def step(self) -> Step | None:
        return self.login.step

    @property
    def outcome(self) -> Outcome | None:
        return self.login.outcome

    @property
    def ended(self) -> bool:
        return self.login.ended

    @property
    def user(self) -> str | None:
        return self.login.user

    async def answer(self, answers: Sequence[str]) -> Step | Outcome:
        """As :meth:`Login.answer`; a failure's delay is awaited on the loop, no thread held."""
        result = await _off_the_loop(lambda: self.login._answer(answers))
        await asyncio.sleep(self.login.remaining_delay())
        return result

    async def cancel(self) -> Outcome:
        return await _off_the_loop(self.login.cancel)

    async def detach(self) -> dict[str, Any]:
        return await _off_the_loop(self.login.detach)

    def abandon(self, reason: str = EXPIRED) -> None:
        self.login.abandon(reason)

    async def open_session(self, *, credentials: bool = True) -> None:
        await _off_the_loop(lambda: self.login.open_session(credentials=credentials))

    async def end(self) -> None:
        await _off_the_loop(self.login.end)


# -- the registry of logins in progress ------------------------------------------------


class TooManyLogins(Exception):
    """The registry's caps are reached: answer HTTP 503 with ``Retry-After``."""

    status = 503

    def __init__(self, message: str, retry_after: int, *, per_address: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: Whether the client's own address (or /64) is over its share, not the site.
        self.per_address = per_address


def address_key(address: str | None) -> str:
    """What a client address counts as: itself, an IPv6 address by its /64."""
    if not address:
        return "-"
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


_L = TypeVar("_L", Login, AsyncLogin)

_START_OPTIONS = frozenset(
    {"sequence", "rhost", "tty", "confdir", "broker", "broker_uid", "encoding"}
)


class _Places:
    """Where the registry counts its logins: (key -> address, deadline), in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[str, float]] = {}

    def reserve(
        self, key: str, address: str, now: float, deadline: float, limits: tuple[int, int]
    ) -> None:
        with self._lock:
            _check_room(list(self._entries.items()), key, address, now, limits)
            self._entries[key] = (address, deadline)

    def extend(self, key: str, deadline: float) -> None:
        with self._lock:
            if key in self._entries:
                self._entries[key] = (self._entries[key][0], deadline)

    def drop(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def take_expired(self, now: float) -> list[str]:
        with self._lock:
            gone = [k for k, (_, deadline) in self._entries.items() if deadline <= now]
            for key in gone:
                del self._entries[key]
        return gone

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def alive(self, key: str, now: float) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry[1] > now

    def addresses(self, now: float) -> list[str]:
        return [address for address, deadline in list(self._entries.values()) if deadline > now]


class SharedPlaces(_Places):
    """The registry's count kept in a directory that every process of a site shares.

    For a site of several processes (gunicorn ``--workers``) whose next
    request may reach another process: a login started in one and finished
    in another is counted once. One file per login; the directory must be
    owned by this process's user and closed to others (it is made so).
    Deadlines are wall-clock times here (``time.time``).
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.stat(path, follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise PermissionError(
                f"{path} must be a directory of uid {os.geteuid()} that others cannot enter "
                "(it holds who is logging in from where)"
            )
        self.path = path

    def _read(self) -> list[tuple[str, tuple[str, float]]]:
        found = []
        for name in os.listdir(self.path):
            if name.startswith("."):
                continue
            try:
                with open(os.path.join(self.path, name)) as file:
                    address, deadline = file.read().rsplit(" ", 1)
                found.append((name, (address, float(deadline))))
            except (OSError, ValueError):
                continue  # being written or removed by another process
        return found

    def _write(self, key: str, address: str, deadline: float) -> None:
        temporary = os.path.join(self.path, f".{key}.{os.getpid()}")
        with open(temporary, "w") as file:
            file.write(f"{address} {deadline!r}")
        os.replace(temporary, os.path.join(self.path, key))

    def reserve(
        self, key: str, address: str, now: float, deadline: float, limits: tuple[int, int]
    ) -> None:
        with self._lock:  # (processes may race here: each over by at most its one)
            _check_room(self._read(), key, address, now, limits)
            self._write(key, address, deadline)

    def extend(self, key: str, deadline: float) -> None:
        with self._lock:
            entries = dict(self._read())
            if key in entries:
                self._write(key, entries[key][0], deadline)

    def drop(self, key: str) -> None:
        try:
            os.unlink(os.path.join(self.path, key))
        except FileNotFoundError:
            pass

    def take_expired(self, now: float) -> list[str]:
        gone = []
        for key, (_, deadline) in self._read():
            if deadline <= now:
                self.drop(key)
                gone.append(key)
        return gone

    def __contains__(self, key: str) -> bool:
        return os.path.exists(os.path.join(self.path, key))

    def alive(self, key: str, now: float) -> bool:
        return any(name == key and deadline > now for name, (_, deadline) in self._read())

    def addresses(self, now: float) -> list[str]:
        return [address for _, (address, deadline) in self._read() if deadline > now]


def _check_room(
    entries: list[tuple[str, tuple[str, float]]],
    key: str,
    address: str,
    now: float,
    limits: tuple[int, int],
) -> None:
    """Raise TooManyLogins when ``key`` from ``address`` would exceed the caps."""
    max_logins, max_per_address = limits
    # Expired entries do not count, whether or not a reaper has removed them yet.
    others = [(a, d) for k, (a, d) in entries if k != key and d > now]
    mine = [d for a, d in others if a == address]
    if len(mine) >= max_per_address:
        raise TooManyLogins(
            f"{len(mine)} logins from {address} are in progress",
            _seconds(min(mine) - now),
            per_address=True,
        )
    if len(others) >= max_logins:
        first = min(d for _, d in others)
        raise TooManyLogins(f"{len(others)} logins are in progress", _seconds(first - now))


class LoginRegistry(Generic[_L]):
    """Logins in progress, with the rules every web front end needs (see the guide).

    ``max_logins`` in all and ``max_per_address`` per client address (IPv6
    by /64) may be in progress; each lives ``timeout`` seconds after it
    started or was last answered. ``shared_dir`` keeps the count in a
    directory that every process of a site shares (:class:`SharedPlaces`);
    without it, each process counts its own. Thread-safe.
    """

    def __init__(
        self,
        *,
        max_logins: int = 256,
        max_per_address: int = 8,
        timeout: float = 120.0,
        shared_dir: str | None = None,
    ) -> None:
        self.max_logins = max_logins
        self.max_per_address = max_per_address
        self.timeout = timeout
        self._places: _Places = _Places() if shared_dir is None else SharedPlaces(shared_dir)
        self._clock = time.monotonic if shared_dir is None else time.time
        self._lock = threading.Lock()
        self._logins: dict[str, _L] = {}
        self._stop = threading.Event()
        self._closed = False

    def __len__(self) -> int:
        # A place past its deadline is no login in progress, reaped or not.
        return len(self._places.addresses(self._clock()))

    def count(self, address: str | None) -> int:
        """Logins in progress from ``address`` (its /64 for IPv6)."""
        key = address_key(address)
        return sum(1 for a in self._places.addresses(self._clock()) if a == key)

    def __contains__(self, key: str) -> bool:
        # Expiry holds when asked, not only when a reaper last ran: a front end
        # that checks a key (Django's view) must not take an answer past it.
        # (Reading reaps nothing: reap() still reports the key.)
        return self._places.alive(key, self._clock())

    def admit(self, address: str | None, key: str | None = None) -> str:
        """Reserve a place for a login from ``address``; its key. Raises TooManyLogins.

        Start the login after this and :meth:`attach` it, or :meth:`remove`
        the key if it could not start. A ``key`` already admitted keeps its
        place (and gets a new deadline).
        """
        self.reap()
        if self._closed:
            raise TooManyLogins("the site is shutting down", 5)
        key = key or secrets.token_urlsafe(24)
        now = self._clock()
        limits = (self.max_logins, self.max_per_address)
        self._places.reserve(key, address_key(address), now, now + self.timeout, limits)
        return key

    def attach(self, key: str, login: _L) -> None:
        """Keep ``login`` under ``key`` (admitted before) in this process."""
        if key in self._places and not self._closed:
            with self._lock:
                self._logins[key] = login
            return
        login.abandon()  # reaped or closed meanwhile

    def start(self, address: str | None, begin: Callable[[], Login]) -> tuple[str, Login]:
        """Admit, then ``begin()`` a Login and attach it: (key, login)."""
        key = self.admit(address)
        try:
            login = begin()
        except BaseException:
            self.remove(key)
            raise
        self.attach(key, login)  # type: ignore[arg-type]
        return key, login

    async def start_async(
        self, address: str | None, begin: Callable[[], Awaitable[AsyncLogin]]
    ) -> tuple[str, AsyncLogin]:
        """Admit, then ``await begin()`` an AsyncLogin and attach it: (key, login)."""
        key = self.admit(address)
        try:
            login = await begin()
        except BaseException:
            self.remove(key)
            raise
        self.attach(key, login)  # type: ignore[arg-type]
        return key, login

    def get(self, key: str | None) -> _L | None:
        """The login of ``key`` in this process; reading it never extends its life."""
        if key is None or key not in self:
            return None
        return self._logins.get(key)

    def answered(self, key: str) -> None:
        """An answer came for ``key``: it lives ``timeout`` seconds from now."""
        self._places.extend(key, self._clock() + self.timeout)

    def answer(self, key: str, answers: Sequence[str]) -> Step | Outcome:
        """Answer the login of ``key`` (a Login); a decided one leaves the registry."""
        login = self.get(key)
        if not isinstance(login, Login):
            raise KeyError(key)
        self.answered(key)
        result = login.answer(answers)
        if isinstance(result, Outcome):
            self.remove(key)
        return result

    async def answer_async(self, key: str, answers: Sequence[str]) -> Step | Outcome:
        """As :meth:`answer`, for an AsyncLogin."""
        login = self.get(key)
        if not isinstance(login, AsyncLogin):
            raise KeyError(key)
        self.answered(key)
        result = await login.answer(answers)
        if isinstance(result, Outcome):
            self.remove(key)
        return result

    def remove(self, key: str | None) -> _L | None:
        """Forget ``key`` (its login is the caller's to end, if it is not over)."""
        if key is None:
            return None
        self._places.drop(key)
        with self._lock:
            return self._logins.pop(key, None)

    def reap(self) -> list[tuple[str, _L | None]]:
        """End every login past its time (without waiting); the (key, login) pairs ended."""
        expired: set[str] = set(self._places.take_expired(self._clock()))
        with self._lock:
            # Logins of this process whose place is gone (reaped by another
            # process of the site, or here) are over too.
            gone = [k for k in self._logins if k not in self._places]
            ended: list[tuple[str, _L | None]] = [(k, self._logins.pop(k)) for k in gone]
        for _, login in ended:
            if login is not None:
                login.abandon(EXPIRED)
                log.info("a login of %r expired unanswered", login.user)
        seen: set[str] = {key for key, _ in ended}
        ended.extend((key, None) for key in expired - seen)
        return ended

    def run_reaper(self, interval: float = 5.0) -> threading.Thread:
        """Reap every ``interval`` seconds on a daemon thread, until :meth:`close`."""

        def loop() -> None:
            while not self._stop.wait(interval):
                self.reap()

        thread = threading.Thread(target=loop, name="pamphlet-login-reaper", daemon=True)
        thread.start()
        return thread

    async def reap_every(self, interval: float = 5.0) -> None:
        """Reap every ``interval`` seconds, as an asyncio task, until cancelled."""
        while not self._closed:
            await asyncio.sleep(interval)
            self.reap()

    def close(self, timeout: float = 30.0) -> None:
        """At shutdown: end every login of this process and wait for it (up to ``timeout``)."""
        self._stop.set()
        self._closed = True
        with self._lock:
            taken = list(self._logins.items())
            self._logins.clear()
        for key, login in taken:
            self._places.drop(key)
            login.abandon(EXPIRED)
        deadline = time.monotonic() + timeout
        for _, login in taken:
            sync = login.login if isinstance(login, AsyncLogin) else login
            driver = sync._driver
            if isinstance(driver, _InProcess):
                driver.wait(max(0.0, deadline - time.monotonic()))
            try:
                sync.end()
            except Exception:
                log.exception("ending a login at shutdown failed")

    async def close_async(self, timeout: float = 30.0) -> None:
        await _off_the_loop(lambda: self.close(timeout))


def _seconds(remaining: float) -> int:
    return max(1, math.ceil(remaining))
