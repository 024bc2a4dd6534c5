"""The aiohttp side of the web login: routes, the session cookie, CSRF, timeouts.

The login itself is pamphlet's stepwise login (:class:`pamphlet.stepwise.AsyncLogin`:
the sequence, the questions one step at a time, the one failure text), and
the logins in flight live in a :class:`pamphlet.stepwise.LoginRegistry`
(caps, expiry, shutdown). This module adds what a web site adds: pages,
ids, CSRF, a session after the login, and its timeout.

Every browser gets an unguessable id in an HttpOnly, SameSite=Strict cookie,
signed with a key that lives only in this process: an id the server did not
issue is never adopted. The id names its :class:`Visit` (if any) in
``WebLogin.visits``; the PAM handle itself never leaves the server. Each form
carries a CSRF token, an HMAC of the id.

Session fixation: a POST that hands something to PAM (the user name, the
answers) spends the id it came with, and the flow gets a new id that is sent
only in the answer to that POST, made once the stack has answered (or, for a
slow stack, again at the first request that sees the login done). Whoever
planted or learnt an id before the login never reaches the session.

Resources: every login in flight is in the registry, whatever its id; the
reaper and shutdown work from there, and from ``WebLogin.sessions`` for the
logged-in ones. Logins in flight (not yet logged in) are capped overall and
per client address; over the cap the answer is 503 with Retry-After. Only an
answer extends a login's life, never a page view.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import hmac
import logging
import math
import pathlib
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from pamphlet import PAM_MAX_RESP_SIZE, Message, MessageStyle
from pamphlet.stepwise import (
    EXPIRED,
    AsyncLogin,
    LoginRegistry,
    LoginSequence,
    Outcome,
    TooManyLogins,
)

from . import pages

__all__ = ["COOKIE", "MAX_LOGINS", "MAX_LOGINS_PER_ADDRESS", "Stage", "Visit", "WebLogin"]

log = logging.getLogger(__name__)

COOKIE = "pamphlet_login"
MAX_LOGINS = 100
MAX_LOGINS_PER_ADDRESS = 10
REFUSAL_LOG_INTERVAL = 10.0  # seconds
STYLE = (pathlib.Path(__file__).parent / "style.css").read_bytes()

# Pages hold secrets in forms: keep them out of caches; allow nothing inline.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Refused(Exception):
    """A request we answer with a short problem page instead of a flow page."""

    def __init__(
        self, status: int, title: str, text: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(text)
        self.status, self.title, self.text = status, title, text
        self.headers = headers or {}


class Stage(enum.Enum):
    """Where a visit is, as the browser sees it."""

    WORKING = "working"  # the PAM stack works; no question is pending
    ASKING = "asking"  # the stack asked; the browser shows the form
    WELCOME = "welcome"  # logged in: credentials set, session open
    FAILED = "failed"  # refused or broken; the handle is ended
    LOGGED_OUT = "logged out"  # session closed, handle ended
    EXPIRED = "expired"  # abandoned and released by the timeout

    @property
    def finished(self) -> bool:
        return self in (Stage.FAILED, Stage.LOGGED_OUT, Stage.EXPIRED)


@dataclasses.dataclass(eq=False)
class Visit:
    """One browser's login as its pages show it; the login is ``login``.

    ``key`` is the login's place in the registry while it is in flight;
    ``started_from`` the id of the POST that started it (``sid`` changes,
    this never does); ``busy`` the start or answer the stack is working on;
    ``last_active`` (once logged in) the last request of the session;
    ``finished`` the end screen (stage and notices), shown once.
    """

    sid: str
    user: str
    address: str
    key: str
    started_from: str = ""
    login: AsyncLogin | None = None
    busy: asyncio.Task[None] | None = None
    logged_in: bool = False
    # Whether ``sid`` was made after the login completed: an id from before
    # it is replaced at the first request that sees the welcome screen.
    sid_after_login: bool = False
    last_active: float = 0.0
    environ: dict[str, str] = dataclasses.field(default_factory=dict)
    notices: list[Message] = dataclasses.field(default_factory=list)
    finished: Stage | None = None
    finished_at: float | None = None

    @property
    def stage(self) -> Stage:
        if self.finished is not None:
            return self.finished
        if self.logged_in:
            return Stage.WELCOME
        if self.login is None or (self.busy is not None and not self.busy.done()):
            return Stage.WORKING
        return Stage.ASKING if self.login.step is not None else Stage.WORKING

    @property
    def step(self) -> int:
        """The number of the question the browser is asked (0 before the first)."""
        step = None if self.login is None else self.login.step
        return 0 if step is None else step.number

    @property
    def ended(self) -> bool:
        return self.login is not None and self.login.ended


def _in_words(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} second{'' if seconds == 1 else 's'}"
    return f"{math.ceil(seconds / 60)} minutes"


class WebLogin:
    """A web application that logs users in through the PAM service ``service``.

    ``login_timeout``: seconds a login may go without an answer (a tab closed
    mid-conversation, or a client that only polls) before its PAM handle is
    released. ``session_timeout``: idle seconds after which a logged-in
    session is closed and ended. ``wait_timeout``: how long one request waits
    for the PAM stack before it shows a "please wait" page that refreshes
    itself. ``max_logins`` and ``max_logins_per_address``: how many logins
    may be in flight (started, not yet logged in) at once, overall and per
    client address (an IPv6 /64); each holds a thread and a PAM handle.
    Behind a reverse proxy every client has the proxy's address. ``broker``:
    the PAM handles live in the pamphlet broker listening there.
    """

    def __init__(
        self,
        service: str,
        *,
        confdir: str | None = None,
        broker: str | None = None,
        login_timeout: float = 120.0,
        session_timeout: float = 1800.0,
        wait_timeout: float = 20.0,
        secure_cookie: bool = False,
        max_logins: int = MAX_LOGINS,
        max_logins_per_address: int = MAX_LOGINS_PER_ADDRESS,
    ) -> None:
        if max_logins < 1 or max_logins_per_address < 1:
            raise ValueError("max_logins and max_logins_per_address must be at least 1")
        self.service = service
        self.where: dict[str, str] = (
            {"broker": broker} if broker else {"confdir": confdir} if confdir else {}
        )
        self.session_timeout = session_timeout
        self.wait_timeout = wait_timeout
        self.secure_cookie = secure_cookie
        self.registry: LoginRegistry[AsyncLogin] = LoginRegistry(
            max_logins=max_logins, max_per_address=max_logins_per_address, timeout=login_timeout
        )
        # id -> the visit that id reaches (a finished one until its result is shown)
        self.visits: dict[str, Visit] = {}
        # registry key -> its visit, for the logins in flight
        self._in_flight: dict[str, Visit] = {}
        # the logged-in visits, whose sessions are open
        self.sessions: set[Visit] = set()
        self._id_key = secrets.token_bytes(32)
        self._csrf_key = secrets.token_bytes(32)
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        self._refusal_logged_at = -math.inf
        self._refused_since_logged = 0

    @property
    def login_timeout(self) -> float:
        return self.registry.timeout

    @login_timeout.setter
    def login_timeout(self, seconds: float) -> None:
        self.registry.timeout = seconds

    # -- the aiohttp application --------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/", self.index)
        app.router.add_post("/login", self.login)
        app.router.add_post("/answer", self.answer)
        app.router.add_post("/cancel", self.cancel)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/style.css", self.style)
        app.on_startup.append(self._start_reaper)
        app.on_shutdown.append(self._release_all)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Security headers on every answer; errors become a page without details."""
        try:
            response = await handler(request)
        except _Refused as refused:
            response = _html(pages.problem_page(refused.title, refused.text), refused.status)
            response.headers.update(refused.headers)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            response = _html(
                pages.problem_page(error.reason, "That page does not exist."), error.status
            )
        except Exception:
            log.exception("error while serving %s %s", request.method, request.path)
            response = _html(
                pages.problem_page(
                    "Something went wrong", "The server could not handle this request."
                ),
                500,
            )
        response.headers.update(SECURITY_HEADERS)
        return response

    # -- ids and CSRF -----------------------------------------------------------

    def _mac(self, key: bytes, text: str) -> str:
        return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()

    def _new_id(self) -> str:
        token = secrets.token_urlsafe(32)
        return f"{token}.{self._mac(self._id_key, token)[:32]}"

    def _issued(self, sid: str) -> bool:
        """Whether this process made ``sid`` (whatever it names now)."""
        token, dot, mac = sid.partition(".")
        expected = self._mac(self._id_key, token)[:32]
        return bool(dot) and hmac.compare_digest(mac.encode(), expected.encode())

    def _browser_id(self, request: web.Request) -> str | None:
        sid = request.cookies.get(COOKIE, "")
        return sid if sid and self._issued(sid) else None

    def _csrf_token(self, sid: str) -> str:
        return self._mac(self._csrf_key, sid)

    async def _checked_form(self, request: web.Request) -> tuple[str, dict[str, str]]:
        """The session id and the form of a POST whose id and CSRF token are right."""
        sid = request.cookies.get(COOKIE, "")
        if not sid:
            raise _Refused(403, "Cookies needed", "Signing in needs cookies for this site.")
        expired = _Refused(403, "Form expired", "This form is out of date. Please start again.")
        if not self._issued(sid):
            raise expired
        try:
            form = await request.post()
        except (UnicodeDecodeError, ValueError):
            # Not a form (bytes that are not UTF-8, say): malformed input like any
            # other, not a bug of ours to log with a traceback per request.
            raise _Refused(400, "Bad request", "The form could not be read.") from None
        token = form.get("csrf")
        if not isinstance(token, str) or not hmac.compare_digest(
            token.encode(), self._csrf_token(sid).encode()
        ):
            raise expired
        return sid, {key: value for key, value in form.items() if isinstance(value, str)}

    def _set_cookie(self, response: web.StreamResponse, sid: str) -> None:
        response.set_cookie(
            COOKIE, sid, path="/", httponly=True, samesite="Strict", secure=self.secure_cookie
        )

    def _give_id(self, visit: Visit, response: web.StreamResponse) -> str:
        """A fresh id for ``visit``, sent only in ``response``; its old id reaches nothing."""
        if self.visits.get(visit.sid) is visit:
            del self.visits[visit.sid]
        sid = self._new_id()
        visit.sid = sid
        visit.sid_after_login = visit.logged_in
        if not self._closing:
            self.visits[sid] = visit
        self._set_cookie(response, sid)
        return sid

    def _spend_id(self, visit: Visit) -> None:
        """The visit's id reaches it no more (it gets a new one with the answer)."""
        if self.visits.get(visit.sid) is visit:
            del self.visits[visit.sid]

    # -- the logins in flight ---------------------------------------------------

    def _admit(self, address: str) -> str:
        """A place in the registry for a login from ``address``; 503 over the caps."""
        try:
            return self.registry.admit(address)
        except TooManyLogins as refused:
            if refused.per_address:
                text = "Too many sign-ins from your network are in progress right now."
            else:
                text = "Too many sign-ins are in progress right now."
            # One line per few seconds at most: a client over the cap must not flood the log.
            now = asyncio.get_running_loop().time()
            self._refused_since_logged += 1
            if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL:
                log.warning(
                    "sign-in refused over the caps (%d since the last such line): %s",
                    self._refused_since_logged,
                    refused,
                )
                self._refusal_logged_at, self._refused_since_logged = now, 0
            seconds = refused.retry_after
            raise _Refused(
                503,
                "Try again later",
                f"{text} Please try again in {_in_words(seconds)}.",
                {"Retry-After": str(seconds)},
            ) from None

    async def _begin(self, visit: Visit) -> None:
        login = await AsyncLogin.start(
            self.service,
            visit.user,
            sequence=LoginSequence(open_session=True),
            rhost=visit.address,
            **self.where,
        )
        visit.login = login
        if visit.finished is not None or self._closing:
            # Replaced (or the server stops) while it started: nobody will answer it.
            await login.end()
            return
        self.registry.attach(visit.key, login)
        self._settle(visit, login.outcome)

    async def _answer(self, visit: Visit, login: AsyncLogin, answers: list[str]) -> None:
        self._settle(visit, await login.answer(answers))

    def _settle(self, visit: Visit, result: object) -> None:
        """After a step of the login: a decided one leaves the registry."""
        if not isinstance(result, Outcome) or visit.finished is not None:
            return
        self._leave_flight(visit)
        if result.success:
            visit.user = result.user or visit.user
            visit.environ = dict(result.environ)
            visit.notices = list(result.notices)
            visit.logged_in = True
            visit.last_active = asyncio.get_running_loop().time()
            self.sessions.add(visit)
        else:
            stage = Stage.EXPIRED if result.message == EXPIRED else Stage.FAILED
            self._finish(visit, stage, [*result.notices, _error(result.message)])

    def _finish(self, visit: Visit, stage: Stage, notices: list[Message]) -> None:
        visit.finished = stage
        visit.notices = notices
        visit.finished_at = asyncio.get_running_loop().time()

    def _leave_flight(self, visit: Visit) -> None:
        self.registry.remove(visit.key)
        self._in_flight.pop(visit.key, None)

    async def _release(self, visit: Visit, stage: Stage) -> None:
        """End a visit's login wherever it is (a cancel, a replaced login)."""
        if visit.finished is None:
            self._finish(visit, stage, [])
        self._leave_flight(visit)
        self.sessions.discard(visit)
        if visit.login is not None:
            try:
                await visit.login.end()
            except Exception:
                log.exception("ending the PAM handle of %r failed", visit.user)

    # -- handlers ---------------------------------------------------------------

    async def style(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=STYLE, content_type="text/css")

    async def _wait(self, visit: Visit) -> None:
        busy = visit.busy
        if busy is not None and not busy.done():
            await asyncio.wait({busy}, timeout=self.wait_timeout)

    async def index(self, request: web.Request) -> web.StreamResponse:
        response = _html("")
        sid = self._browser_id(request)
        visit = self.visits.get(sid) if sid is not None else None
        if sid is None:
            # No id, or one we never issued: never adopt it, give our own.
            sid = self._new_id()
            self._set_cookie(response, sid)
        if visit is not None:
            if visit.stage is Stage.WELCOME:
                # a logged-in session's activity; a login's is its answers
                visit.last_active = asyncio.get_running_loop().time()
            if visit.stage is Stage.WORKING:
                await self._wait(visit)
                if self.visits.get(sid) is not visit:
                    visit = None  # replaced while we waited: this id reaches it no more
        if visit is None:
            response.text = pages.start_page(self._csrf_token(sid))
            return response
        if visit.logged_in and not visit.sid_after_login and not visit.stage.finished:
            # Logged in after this id was made (a stack slower than wait_timeout).
            sid = self._give_id(visit, response)
        response.text = self._render(visit, sid, response)
        return response

    def _render(self, visit: Visit, sid: str, response: web.StreamResponse) -> str:
        csrf = self._csrf_token(sid)
        stage = visit.stage
        login = visit.login
        if stage is Stage.ASKING and login is not None and login.step is not None:
            step = login.step
            title = "Change your password" if step.changing_password else "Sign in"
            messages = [*step.notices, *step.prompts]
            return pages.ask_page(csrf, title, visit.user, step.number, messages)
        if stage is Stage.WORKING:
            return pages.working_page("Sign in")
        if stage is Stage.WELCOME:
            return pages.welcome_page(csrf, visit.user, visit.environ, visit.notices)
        # Finished: shown once, then the browser starts afresh under a new id.
        self.visits.pop(sid, None)
        new_sid = self._new_id()
        self._set_cookie(response, new_sid)
        notices = visit.notices
        if stage is Stage.EXPIRED:
            notices = [_error("Your sign-in timed out and was cancelled. Please start again.")]
        username = "" if stage is Stage.LOGGED_OUT else visit.user
        return pages.start_page(self._csrf_token(new_sid), notices, username)

    async def login(self, request: web.Request) -> web.StreamResponse:
        sid, form = await self._checked_form(request)
        username = form.get("username", "").strip()
        if not username or len(username) >= PAM_MAX_RESP_SIZE or not username.isprintable():
            raise _Refused(400, "Sign in", "Please enter a valid user name.")
        current = self.visits.get(sid)
        if current is not None and current.stage is Stage.WELCOME:
            return _see_other()  # already logged in: show the welcome page
        if self._closing:
            raise _Refused(503, "Sign-in unavailable", "The server is shutting down.")
        # From here to the visit's registration nothing awaits: two POSTs with
        # one id cannot both see the old login, and none is left unregistered.
        # A browser starts one login at a time: a new one replaces the login
        # this id holds or started (the one POST /login with this id began:
        # a double submit, its answer with the new id not yet read).
        replaced = {visit for visit in self._in_flight.values() if visit.started_from == sid}
        if current is not None and not current.logged_in:
            replaced.add(current)
        for old in replaced:
            self._spend_id(old)
            self._leave_flight(old)
        try:
            # The client's own address: PAM_RHOST, and (by its /64 for IPv6) the cap's count.
            address = request.remote or ""
            key = self._admit(address)
            visit = Visit(sid, username, address, key, started_from=sid)
            self._in_flight[key] = visit
            visit.busy = asyncio.get_running_loop().create_task(
                self._begin(visit), name=f"login of {username!r}"
            )
        finally:
            # Replaced even when the new one is refused (503): out of the
            # registry, an old login would hold its handle and thread for ever.
            for old in replaced:
                await self._release(old, Stage.FAILED)
        response = _see_other()
        await self._wait(visit)
        self._give_id(visit, response)
        return response

    async def answer(self, request: web.Request) -> web.StreamResponse:
        sid, form = await self._checked_form(request)
        visit = self.visits.get(sid)
        if visit is None or visit.stage is not Stage.ASKING or visit.login is None:
            return _see_other()
        login = visit.login
        try:
            number = int(form.get("step", ""))
        except ValueError:
            raise _Refused(400, "Bad request", "The form was incomplete.") from None
        step = login.step
        assert step is not None
        names = [f"answer-{index}" for index in range(len(step.prompts))]
        if number != step.number or any(name not in form for name in names):
            # An old form (back button, second tab, double click): show the
            # current question again rather than answering it with stale data.
            return _see_other()
        self.registry.answered(visit.key)  # only an answer extends a login
        visit.busy = asyncio.get_running_loop().create_task(
            self._answer(visit, login, [form[name] for name in names])
        )
        # The answers are PAM's now: the id they came with is spent, and the
        # visit's next id goes to this browser only, once the stack has answered.
        self._spend_id(visit)
        response = _see_other()
        await self._wait(visit)
        self._give_id(visit, response)
        return response

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        sid, _form = await self._checked_form(request)
        visit = self.visits.get(sid)
        if visit is not None and visit.stage is not Stage.WELCOME:
            self.visits.pop(sid, None)
            await self._release(visit, Stage.FAILED)
        return _see_other()

    async def logout(self, request: web.Request) -> web.StreamResponse:
        sid, _form = await self._checked_form(request)
        visit = self.visits.get(sid)
        if visit is not None and visit.stage is Stage.WELCOME:
            self.sessions.discard(visit)
            self._finish(visit, Stage.LOGGED_OUT, [_info("You have logged out.")])
            await self._release(visit, Stage.LOGGED_OUT)
        return _see_other()

    # -- timeouts -----------------------------------------------------------------

    async def _start_reaper(self, app: web.Application) -> None:
        self._reaper = asyncio.create_task(self._reap_forever(), name="web login reaper")

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(max(0.1, min(self.login_timeout, self.session_timeout) / 4))
            try:
                await self.reap()
            except Exception:
                # The reaper must outlive a bad visit: it is what frees handles.
                log.exception("releasing idle logins failed")

    async def reap(self) -> None:
        """Release every login idle past its timeout, and every idle session."""
        for key, _login in self.registry.reap():
            visit = self._in_flight.pop(key, None)
            if visit is not None and visit.finished is None:
                log.info("releasing the idle login of %r", visit.user)
                self._finish(visit, Stage.EXPIRED, [])
        now = asyncio.get_running_loop().time()
        idle = [v for v in self.sessions if now - v.last_active > self.session_timeout]
        for visit in idle:
            log.info("closing the idle session of %r", visit.user)
        # Together: one slow PAM module must not hold up the others' release.
        await asyncio.gather(*(self._release(visit, Stage.EXPIRED) for visit in idle))
        for sid, visit in list(self.visits.items()):
            finished_at = visit.finished_at
            if finished_at is not None and now - finished_at > self.login_timeout:
                del self.visits[sid]  # a result nobody came back to read

    async def _release_all(self, app: web.Application) -> None:
        # No login starts after this (login() checks _closing before it makes one).
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        busy = [v.busy for v in self._in_flight.values() if v.busy is not None]
        sessions = list(self.sessions)
        self.visits.clear()
        self.sessions.clear()
        await self.registry.close_async()
        if busy:
            await asyncio.wait(busy, timeout=30)
        await asyncio.gather(*(self._release(visit, Stage.LOGGED_OUT) for visit in sessions))


def _info(text: str) -> Message:
    return Message(text, MessageStyle.TEXT_INFO)


def _error(text: str) -> Message:
    return Message(text, MessageStyle.ERROR_MSG)


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _see_other() -> web.Response:
    # Post/Redirect/Get: a reload never sends a password twice.
    return web.Response(status=303, headers={"Location": "/"})
