"""One browser's sign-in: a PAM transaction that lives between HTTP requests.

A PAM phase runs from start to end in one call, while a browser answers one
form per request. ``LoginFlow`` joins the two: the phases run as one asyncio
task on the hub's event loop; when the stack asks something, the
conversation publishes a *screen* (what the page must show next) and awaits
a future that the browser's next POST resolves. Nothing here knows tornado
or JupyterHub: the request handler reads screens and hands answers over.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Any

from pamphlet import Message, MessageStyle
from pamphlet.aio import AsyncPamApplication
from pamphlet.errors import NewAuthTokenRequired, PamError

__all__ = ["LoginFlow", "Stage", "make_application"]

_log = logging.getLogger(__name__)
Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]


class Stage(enum.Enum):
    """Where a sign-in is, as the browser sees it."""

    WORKING = "working"  # a PAM phase runs; no question is pending
    ASKING = "asking"  # the stack asked; the page shows the form
    DONE = "done"  # PAM said yes; the handler logs the user into the hub
    FAILED = "failed"  # refused or broken; the handle is ended
    EXPIRED = "expired"  # abandoned, released by the timeout; the handle is ended

    @property
    def finished(self) -> bool:
        return self in (Stage.DONE, Stage.FAILED, Stage.EXPIRED)


def info(text: str) -> Message:
    return Message(text, MessageStyle.TEXT_INFO)


def error(text: str) -> Message:
    return Message(text, MessageStyle.ERROR_MSG)


class _HubLogin(AsyncPamApplication):
    """Answers the PAM stack with whatever the browser sends to its flow."""

    def __init__(self, *args: Any, flow: LoginFlow | None = None, **kwargs: Any) -> None:
        self._flow = flow
        super().__init__(*args, **kwargs)

    async def conversation(self, messages: list[Message]) -> list[str]:
        if self._flow is None:
            # A handle kept for the session only: a module that asks now
            # (at spawn, with nobody at the keyboard) gets PAM_CONV_ERR.
            if any(message.is_prompt for message in messages):
                raise ValueError(f"nobody can answer {messages!r} outside the sign-in")
            for message in messages:
                _log.info("PAM said (outside the sign-in): %s", message)
            return ["" for _ in messages]
        return await self._flow.converse(messages)

    def detach(self) -> None:
        """The sign-in is over: later phases (sessions) have nobody to ask."""
        self._flow = None


def make_application(
    service: str,
    user: str,
    *,
    confdir: str | None,
    encoding: str,
    broker: str | None,
    flow: LoginFlow | None = None,
) -> _HubLogin:
    """A PAM handle for ``user``; ``broker=`` only when a broker is configured."""
    options: dict[str, Any] = {"confdir": confdir, "encoding": encoding}
    if broker:
        options["broker"] = broker
    return _HubLogin(service, user, flow=flow, **options)


class LoginFlow:
    """The PAM transaction of one browser, from the user name to PAM's answer.

    Create it inside the event loop with :meth:`start`. ``stage``, ``title``,
    ``shown`` (the messages of the current screen, notices and prompts in
    order) and ``step`` (which screen this is) say what the page shows.
    ``password``, when given, answers the stack's first question if that is
    a single hidden prompt (the sign-in page asked it with the user name);
    any other first question gets a page of its own and the password is
    dropped unused.
    """

    def __init__(
        self,
        sid: str,
        user: str,
        *,
        password: str | None,
        rhost: str | None,
        check_account: bool,
        new_app: Callable[[LoginFlow], _HubLogin],
        accept_user: Callable[[str], bool],
        log: Logger = _log,
    ) -> None:
        self.log = log
        loop = asyncio.get_running_loop()
        self.sid = sid
        self.user = user
        self.stage = Stage.WORKING
        self.step = 0
        self.title = "Sign in"
        self.shown: list[Message] = []
        self.last_seen = loop.time()
        self.claimed = False
        self._password = password
        self._check_account = check_account
        self._accept_user = accept_user
        # Notices (info and error messages) that came in conversation calls
        # without prompts: they wait for the next screen, as a terminal
        # would have printed them before the next question.
        self._pending: list[Message] = []
        self._batch: list[Message] = []
        self._answers: asyncio.Future[list[str]] | None = None
        self._next_screen = asyncio.Event()
        self.app = new_app(self)
        if rhost:
            self.app.rhost = rhost
        self.task = loop.create_task(self._run(), name=f"PAM sign-in of {user!r}")

    # -- what the request handler calls ----------------------------------------

    def touch(self) -> None:
        self.last_seen = asyncio.get_running_loop().time()

    @property
    def prompts(self) -> list[Message]:
        return [message for message in self.shown if message.is_prompt]

    @property
    def notices(self) -> list[Message]:
        return [message for message in self.shown if not message.is_prompt]

    def submit(self, step: int, answers: list[str]) -> bool:
        """Answer the pending question; False if ``step`` is not the one asked."""
        future = self._answers
        if self.stage is not Stage.ASKING or step != self.step or future is None:
            return False
        if len(answers) != len(self.prompts):
            return False
        given = iter(answers)
        full = [next(given) if message.is_prompt else "" for message in self._batch]
        self.stage = Stage.WORKING
        future.set_result(full)
        return True

    async def wait_for_screen(self, after_step: int, timeout: float) -> bool:
        """Wait until a screen later than ``after_step`` is up; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.step <= after_step:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._next_screen.wait(), remaining)
            except TimeoutError:
                return False
        return True

    async def release(self, stage: Stage = Stage.EXPIRED, timeout: float = 30.0) -> None:
        """Stop the sign-in wherever it is and end the PAM handle.

        A pending conversation call is cancelled, which gives libpam
        PAM_CONV_ERR, so the phase's thread returns; the task's ``finally``
        then ends the handle. A finished sign-in that nobody claimed has
        its handle ended here.
        """
        if not self.task.done():
            self.task.cancel()
            done, _pending = await asyncio.wait({self.task}, timeout=timeout)
            if not done:
                self.log.error("the sign-in of %r is stuck inside a PAM module", self.user)
        if self.stage is Stage.DONE and not self.claimed:
            self.claimed = True
            await end_quietly(self.app, self.user, self.log)
        if not self.stage.finished:
            self._show(stage, [])

    def claim(self) -> _HubLogin | None:
        """The handle of a finished, successful sign-in, once; None otherwise."""
        if self.stage is not Stage.DONE or self.claimed:
            return None
        self.claimed = True
        self.app.detach()
        return self.app

    # -- the conversation, called by the application ---------------------------

    async def converse(self, messages: list[Message]) -> list[str]:
        if any(message.style == MessageStyle.BINARY_PROMPT for message in messages):
            # A browser form cannot answer binary data: fail the call (closed).
            raise ValueError("the PAM stack sent a binary prompt, which a web form cannot answer")
        prompts = [message for message in messages if message.is_prompt]
        if not prompts:
            self._pending.extend(messages)
            return ["" for _ in messages]
        password, self._password = self._password, None
        if password is not None and len(prompts) == 1 and prompts[0].wants_password:
            self._pending.extend(message for message in messages if not message.is_prompt)
            return [password if message.is_prompt else "" for message in messages]
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._answers = future
        self._batch = list(messages)
        self._show(Stage.ASKING, self._pending + self._batch)
        self._pending = []
        try:
            return await future
        finally:
            self._answers = None
            if self.stage is Stage.ASKING:
                self.stage = Stage.WORKING

    # -- the PAM transaction ---------------------------------------------------

    def _show(self, stage: Stage, messages: list[Message]) -> None:
        self.stage = stage
        self.shown = messages
        self.step += 1
        event, self._next_screen = self._next_screen, asyncio.Event()
        event.set()

    def _fail(self, *reasons: Message) -> None:
        self._show(Stage.FAILED, [*self._pending, *reasons])
        self._pending = []

    async def _run(self) -> None:
        app = self.app
        succeeded = False
        try:
            try:
                await app.authenticate()
            except PamError as problem:
                # The same words whatever the reason (unknown user, wrong
                # password, a failing second factor): no user enumeration.
                self.log.warning("PAM authentication of %r failed: %r", self.user, problem)
                self._fail(error("Login incorrect."))
                return
            # The stack may rename the user (PAM_USER). The hub's user must be
            # the one PAM authenticated, character for character.
            pam_user = app.user
            if not pam_user or not self._accept_user(pam_user):
                self.log.warning(
                    "PAM signed %r in as %r, which the hub refuses", self.user, pam_user
                )
                self._fail(error("Login incorrect."))
                return
            self.user = pam_user
            if self._check_account:
                try:
                    await app.account_management()
                except NewAuthTokenRequired:
                    self.title = "Change your password"
                    self._pending.append(info("Your password has expired. Choose a new one."))
                    try:
                        await app.change_authtoken(change_expired_authtoken=True)
                    except PamError as problem:
                        self.log.warning(
                            "%r did not change an expired password: %r", self.user, problem
                        )
                        self._fail(error(f"Your password was not changed: {problem.strerror}"))
                        return
                except PamError as problem:
                    # The user proved who they are: the account's state may be told.
                    self.log.warning("PAM account check of %r failed: %r", self.user, problem)
                    self._fail(error(f"This account may not sign in now: {problem.strerror}"))
                    return
            succeeded = True
            self._show(Stage.DONE, self._pending)
            self._pending = []
        except Exception:
            # Logged here, with its traceback; the browser only gets a sentence.
            self.log.exception("the sign-in of %r broke", self.user)
            self._fail(error("Something went wrong on our side. Please try again."))
        finally:
            # A successful sign-in keeps its handle for the hub to claim
            # (sessions); every other way out ends it here.
            if not succeeded:
                await end_quietly(app, self.user, self.log)


async def end_quietly(app: AsyncPamApplication, user: str, log: Logger = _log) -> None:
    try:
        await app.end()
    except Exception:
        # The handle is gone either way (end() clears it before pam_end);
        # a failure here is the server's business, not the browser's.
        log.exception("ending the PAM handle of %r failed", user)
