"""One browser's login: a PAM transaction that lives between HTTP requests.

A PAM phase runs from start to end in one call, while a browser answers one
form per request. ``LoginFlow`` joins the two: the phases run as one asyncio
task; when the stack asks something, the conversation publishes a *screen*
(what the browser must show next) and waits on a future that the next POST
resolves. HTTP handlers never touch PAM: they read the current screen, hand
answers over, and wait (bounded) for the screen after it.
"""

from __future__ import annotations

import asyncio
import enum
import logging

from pamphlet import Message, MessageStyle, NewAuthTokenRequired, PamError
from pamphlet.aio import AsyncPamApplication

__all__ = ["BrowserLogin", "LoginFlow", "Stage"]

log = logging.getLogger(__name__)


class Stage(enum.Enum):
    """Where a login is, as the browser sees it."""

    WORKING = "working"  # a PAM phase runs; no question is pending
    ASKING = "asking"  # the stack asked; the browser shows the form
    WELCOME = "welcome"  # logged in: credentials set, session open
    FAILED = "failed"  # refused or broken; the handle is ended
    LOGGED_OUT = "logged out"  # session closed, handle ended
    EXPIRED = "expired"  # abandoned and released by the timeout

    @property
    def finished(self) -> bool:
        return self in (Stage.FAILED, Stage.LOGGED_OUT, Stage.EXPIRED)


def _info(text: str) -> Message:
    return Message(text, MessageStyle.TEXT_INFO)


def _error(text: str) -> Message:
    return Message(text, MessageStyle.ERROR_MSG)


class BrowserLogin(AsyncPamApplication):
    """Answers the PAM stack with whatever the browser sends for the flow."""

    def __init__(
        self, flow: LoginFlow, service: str, user: str, *, confdir: str | None = None
    ) -> None:
        self._flow = flow
        super().__init__(service, user, confdir=confdir)

    async def conversation(self, messages: list[Message]) -> list[str]:
        return await self._flow.converse(messages)


class LoginFlow:
    """The PAM transaction of one browser, from the user name to the logout.

    Create it inside the event loop; it starts its task at once. ``stage``,
    ``title``, ``shown`` (the messages of the current screen, notices and
    prompts in order) and ``step`` (which screen this is) describe what the
    browser should display. ``address`` is the client's, for the per-address
    cap; ``logged_in`` turns true when the welcome screen is first shown and
    stays true; ``last_active`` is when the login began, or the last answer
    came, or (once logged in) the last request of the session.
    """

    def __init__(
        self,
        service: str,
        user: str,
        *,
        confdir: str | None = None,
        sid: str = "",
        address: str = "",
    ) -> None:
        loop = asyncio.get_running_loop()
        self.sid = sid
        self.address = address
        self.user = user
        self.stage = Stage.WORKING
        self.step = 0
        self.title = "Sign in"
        self.shown: list[Message] = []
        self.environ: dict[str, str] = {}
        self.logged_in = False
        # Whether ``sid`` was made after the login completed: an id from before
        # it is replaced at the first request that sees the welcome screen.
        self.sid_after_login = False
        self.last_active = loop.time()
        self.finished_at: float | None = None
        # Notices (info and error messages) that came in conversation calls
        # without prompts: they wait for the next screen, as a terminal
        # would have printed them before the next question.
        self._pending: list[Message] = []
        self._batch: list[Message] = []
        self._answers: asyncio.Future[list[str]] | None = None
        self._next_screen = asyncio.Event()
        self._logout_requested = asyncio.Event()
        self.app = BrowserLogin(self, service, user, confdir=confdir)
        self.task = loop.create_task(self._run(), name=f"login of {user!r}")

    # -- what the HTTP handlers call ------------------------------------------

    def touch(self) -> None:
        """Count the login as active now: for an answer, or a logged-in session's request.

        Never for a mere page view before the login: polling must not keep an
        unanswered login (a thread and a PAM handle) alive.
        """
        self.last_active = asyncio.get_running_loop().time()

    @property
    def prompt_count(self) -> int:
        return sum(1 for message in self.shown if message.is_prompt)

    def submit(self, step: int, answers: list[str]) -> bool:
        """Answer the pending question; False if ``step`` is not the one asked."""
        future = self._answers
        if self.stage is not Stage.ASKING or step != self.step or future is None:
            return False
        if len(answers) != self.prompt_count:
            raise ValueError(f"{self.prompt_count} answers are needed, not {len(answers)}")
        given = iter(answers)
        full = [next(given) if message.is_prompt else "" for message in self._batch]
        self.stage = Stage.WORKING
        self.touch()
        future.set_result(full)
        return True

    def request_logout(self) -> bool:
        if self.stage is not Stage.WELCOME:
            return False
        self.stage = Stage.WORKING
        self.title = "Log out"
        self._logout_requested.set()
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
        """Stop the login wherever it is and end the PAM handle.

        A pending conversation call is cancelled, which makes libpam see
        PAM_CONV_ERR, so the phase's thread returns; the task's ``finally``
        then ends the handle (closing an open session, deleting credentials).
        A module stuck inside libpam (not in the conversation) cannot be
        interrupted: after ``timeout`` the caller goes on, and the task ends
        the handle whenever the module returns.
        """
        if not self.task.done():
            self.task.cancel()
            done, _pending = await asyncio.wait({self.task}, timeout=timeout)
            if not done:
                log.error("the login of %r is stuck inside a PAM module", self.user)
        if self.task.done() and not self.app.ended:
            # Cancelled before its first step, the task never entered its
            # ``try``, so its ``finally`` did not end the handle: end it here.
            await self._end()
        if not self.stage.finished:
            self._show(stage, [])

    # -- the conversation, called by BrowserLogin -------------------------------

    async def converse(self, messages: list[Message]) -> list[str]:
        if any(message.style == MessageStyle.BINARY_PROMPT for message in messages):
            # A browser form cannot answer binary data: fail the call (closed).
            raise ValueError("the PAM stack sent a binary prompt, which a web form cannot answer")
        if not any(message.is_prompt for message in messages):
            self._pending.extend(messages)
            return ["" for _ in messages]
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

    # -- the PAM transaction -------------------------------------------------

    def _show(self, stage: Stage, messages: list[Message]) -> None:
        if stage is Stage.WELCOME:
            self.logged_in = True
        if stage.finished and self.finished_at is None:
            self.finished_at = asyncio.get_running_loop().time()
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
        try:
            try:
                await app.authenticate()
            except PamError as error:
                # The same words whatever the reason (unknown user, wrong
                # password, a failing second factor): no user enumeration.
                log.info("authentication of %r failed: %r", self.user, error)
                self._fail(_error("Login incorrect."))
                return
            try:
                await app.account_management()
            except NewAuthTokenRequired:
                self.title = "Change your password"
                self._pending.append(_info("Your password has expired. Choose a new one."))
                try:
                    await app.change_authtoken(change_expired_authtoken=True)
                except PamError as error:
                    self._fail(_error(f"Your password was not changed: {error.strerror}"))
                    return
            except PamError as error:
                # The user proved who they are: the account's state may be told.
                self._fail(_error(f"This account may not log in now: {error.strerror}"))
                return
            await app.initialize_credentials()
            await app.open_session()
            self.user = app.user or self.user
            self.environ = dict(app.environ)
            self._show(Stage.WELCOME, self._pending)
            self._pending = []
            await self._logout_requested.wait()
            await app.close_session()
            self._show(Stage.LOGGED_OUT, [*self._pending, _info("You have logged out.")])
            self._pending = []
        except PamError as error:
            log.warning("the PAM session of %r failed: %r", self.user, error)
            self._fail(_error(f"The session could not be set up: {error.strerror}"))
        except Exception:
            # Logged here, with its traceback; the browser only gets a sentence.
            log.exception("the login of %r broke", self.user)
            self._fail(_error("Something went wrong on our side. Please try again."))
        finally:
            await self._end()

    async def _end(self) -> None:
        try:
            await self.app.end()
        except Exception:
            # The handle is gone either way (end() clears it before pam_end);
            # a failure here is the server's business, not the browser's.
            log.exception("ending the PAM handle of %r failed", self.user)
