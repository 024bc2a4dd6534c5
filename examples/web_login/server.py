"""The aiohttp side of the web login: routes, the session cookie, CSRF, timeouts.

Every browser gets an unguessable id in an HttpOnly, SameSite=Strict cookie,
signed with a key that lives only in this process: an id the server did not
issue is never adopted. The id names its :class:`LoginFlow` (if any) in
``WebLogin.flows``; the PAM handle itself never leaves the server. Each form
carries a CSRF token, an HMAC of the id.

Session fixation: a POST that hands something to PAM (the user name, the
answers) spends the id it came with, and the flow gets a new id that is sent
only in the answer to that POST, made once the stack has answered (or, for a
slow stack, again at the first request that sees the login done). Whoever
planted or learnt an id before the login never reaches the session.

Resources: every flow whose task runs is in ``WebLogin.live``, whatever its
id; the reaper and shutdown work from there. Logins in flight (not yet logged
in) are capped overall and per client address; over the cap the answer is 503
with Retry-After. Only an answer extends a login's life, never a page view.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import pathlib
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from pamphlet import PAM_MAX_RESP_SIZE, Message, MessageStyle, PamError

from . import pages
from .flow import LoginFlow, Stage

__all__ = ["COOKIE", "MAX_LOGINS", "MAX_LOGINS_PER_ADDRESS", "WebLogin"]

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


def client_key(remote: str | None) -> str:
    """What the per-address cap counts by: the IPv4 address, or the IPv6 /64.

    One IPv6 client usually holds a whole /64, so single addresses would be
    no limit at all.
    """
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or ""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


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
    client address (see :func:`client_key`); each holds a thread and a PAM
    handle. Behind a reverse proxy every client has the proxy's address.
    """

    def __init__(
        self,
        service: str,
        *,
        confdir: str | None = None,
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
        self.confdir = confdir
        self.login_timeout = login_timeout
        self.session_timeout = session_timeout
        self.wait_timeout = wait_timeout
        self.secure_cookie = secure_cookie
        self.max_logins = max_logins
        self.max_logins_per_address = max_logins_per_address
        # id -> the flow that id reaches (a finished one until its result is shown)
        self.flows: dict[str, LoginFlow] = {}
        # every flow whose task still runs, with or without an id: what holds threads
        self.live: set[LoginFlow] = set()
        # the id a login was started from -> that login, which a new one from it replaces
        self._started_by: dict[str, LoginFlow] = {}
        self._id_key = secrets.token_bytes(32)
        self._csrf_key = secrets.token_bytes(32)
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False
        self._refusal_logged_at = -math.inf
        self._refused_since_logged = 0

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
        form = await request.post()
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

    def _give_id(self, flow: LoginFlow, response: web.StreamResponse) -> str:
        """A fresh id for ``flow``, sent only in ``response``; its old id reaches nothing."""
        if self.flows.get(flow.sid) is flow:
            del self.flows[flow.sid]
        sid = self._new_id()
        flow.sid = sid
        flow.sid_after_login = flow.logged_in
        if not self._closing:
            self.flows[sid] = flow
        self._set_cookie(response, sid)
        return sid

    def _spend_id(self, flow: LoginFlow) -> None:
        """The flow's id reaches it no more (it gets a new one with the answer)."""
        if self.flows.get(flow.sid) is flow:
            del self.flows[flow.sid]

    # -- the flows in flight --------------------------------------------------

    def _adopt(self, flow: LoginFlow, started_from: str) -> None:
        self.live.add(flow)
        self._started_by[started_from] = flow

        def done(_task: object) -> None:
            self.live.discard(flow)
            if self._started_by.get(started_from) is flow:
                del self._started_by[started_from]

        flow.task.add_done_callback(done)

    def _check_room(self, address: str, leaving: set[LoginFlow]) -> None:
        """Refuse (503) a login over the caps; ``leaving`` are being replaced by it."""
        in_flight = [flow for flow in self.live if not flow.logged_in and flow not in leaving]
        here = [flow for flow in in_flight if flow.address == address]
        if len(here) >= self.max_logins_per_address:
            self._too_many(here, "Too many sign-ins from your network are in progress right now.")
        if len(in_flight) >= self.max_logins:
            self._too_many(in_flight, "Too many sign-ins are in progress right now.")

    def _too_many(self, holding: list[LoginFlow], text: str) -> None:
        # The earliest a place frees up without anybody's help: when the
        # oldest of these logins reaches its timeout.
        now = asyncio.get_running_loop().time()
        earliest = min(flow.last_active for flow in holding) + self.login_timeout - now
        seconds = max(1, min(math.ceil(earliest), math.ceil(self.login_timeout)))
        # One line per few seconds at most: a client over the cap must not flood the log.
        self._refused_since_logged += 1
        if now - self._refusal_logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "sign-in refused over the caps (%d since the last such line): %s (%d in flight)",
                self._refused_since_logged,
                text,
                len(holding),
            )
            self._refusal_logged_at, self._refused_since_logged = now, 0
        raise _Refused(
            503,
            "Try again later",
            f"{text} Please try again in {_in_words(seconds)}.",
            {"Retry-After": str(seconds)},
        )

    # -- handlers ---------------------------------------------------------------

    async def style(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=STYLE, content_type="text/css")

    async def index(self, request: web.Request) -> web.StreamResponse:
        response = _html("")
        sid = self._browser_id(request)
        flow = self.flows.get(sid) if sid is not None else None
        if sid is None:
            # No id, or one we never issued: never adopt it, give our own.
            sid = self._new_id()
            self._set_cookie(response, sid)
        if flow is not None:
            if flow.logged_in and not flow.stage.finished:
                flow.touch()  # a logged-in session's activity; a login's is its answers
            if flow.stage is Stage.WORKING:
                await flow.wait_for_screen(flow.step, self.wait_timeout)
                if self.flows.get(sid) is not flow:
                    flow = None  # replaced while we waited: this id reaches it no more
        if flow is None:
            response.text = pages.start_page(self._csrf_token(sid))
            return response
        if flow.logged_in and not flow.sid_after_login and not flow.stage.finished:
            # Logged in after this id was made (a stack slower than wait_timeout).
            sid = self._give_id(flow, response)
        response.text = self._render(flow, sid, response)
        return response

    def _render(self, flow: LoginFlow, sid: str, response: web.StreamResponse) -> str:
        csrf = self._csrf_token(sid)
        if flow.stage is Stage.ASKING:
            return pages.ask_page(csrf, flow.title, flow.user, flow.step, flow.shown)
        if flow.stage is Stage.WORKING:
            return pages.working_page(flow.title)
        if flow.stage is Stage.WELCOME:
            return pages.welcome_page(csrf, flow.user, flow.environ, flow.shown)
        # Finished: shown once, then the browser starts afresh under a new id.
        self.flows.pop(sid, None)
        new_sid = self._new_id()
        self._set_cookie(response, new_sid)
        notices = flow.shown
        if flow.stage is Stage.EXPIRED:
            notices = [
                Message(
                    "Your sign-in timed out and was cancelled. Please start again.",
                    MessageStyle.ERROR_MSG,
                )
            ]
        username = "" if flow.stage is Stage.LOGGED_OUT else flow.user
        return pages.start_page(self._csrf_token(new_sid), notices, username)

    async def login(self, request: web.Request) -> web.StreamResponse:
        sid, form = await self._checked_form(request)
        username = form.get("username", "").strip()
        if not username or len(username) >= PAM_MAX_RESP_SIZE or not username.isprintable():
            raise _Refused(400, "Sign in", "Please enter a valid user name.")
        current = self.flows.get(sid)
        if current is not None and current.logged_in and not current.stage.finished:
            return _see_other()  # already logged in: show the welcome page
        if self._closing:
            raise _Refused(503, "Sign-in unavailable", "The server is shutting down.")
        # From here to the flow's registration nothing awaits: two POSTs with
        # one id cannot both see the old login, and none is left unregistered.
        # A browser starts one login at a time: a new one replaces the login
        # this id holds or started.
        replaced = {
            flow
            for flow in (current, self._started_by.get(sid))
            if flow is not None and not flow.logged_in
        }
        address = client_key(request.remote)
        self._check_room(address, replaced)
        for old in replaced:
            self._spend_id(old)
        try:
            flow = LoginFlow(self.service, username, confdir=self.confdir, address=address)
        except PamError as error:
            log.error("pam_start for service %r failed: %r", self.service, error)
            flow = None
        if flow is not None:
            self._adopt(flow, started_from=sid)
        for old in replaced:
            await old.release(Stage.FAILED)
        if flow is None:
            raise _Refused(503, "Sign-in unavailable", "Signing in is not possible right now.")
        response = _see_other()
        await flow.wait_for_screen(0, self.wait_timeout)
        self._give_id(flow, response)
        return response

    async def answer(self, request: web.Request) -> web.StreamResponse:
        sid, form = await self._checked_form(request)
        flow = self.flows.get(sid)
        if flow is None:
            return _see_other()
        try:
            step = int(form.get("step", ""))
        except ValueError:
            raise _Refused(400, "Bad request", "The form was incomplete.") from None
        names = [f"answer-{index}" for index in range(flow.prompt_count)]
        if step != flow.step or any(name not in form for name in names):
            # An old form (back button, second tab, double click): show the
            # current question again rather than answering it with stale data.
            return _see_other()
        if not flow.submit(step, [form[name] for name in names]):
            return _see_other()
        # The answers are PAM's now: the id they came with is spent, and the
        # flow's next id goes to this browser only, once the stack has answered.
        self._spend_id(flow)
        response = _see_other()
        await flow.wait_for_screen(step, self.wait_timeout)
        self._give_id(flow, response)
        return response

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        sid, _form = await self._checked_form(request)
        flow = self.flows.get(sid)
        if flow is not None and not (flow.logged_in and not flow.stage.finished):
            self.flows.pop(sid, None)
            await flow.release(Stage.FAILED)
        return _see_other()

    async def logout(self, request: web.Request) -> web.StreamResponse:
        sid, _form = await self._checked_form(request)
        flow = self.flows.get(sid)
        if flow is not None:
            step = flow.step
            if flow.request_logout():
                await flow.wait_for_screen(step, self.wait_timeout)
        return _see_other()

    # -- timeouts -----------------------------------------------------------------

    async def _start_reaper(self, app: web.Application) -> None:
        self._reaper = asyncio.create_task(self._reap_forever(), name="web login reaper")

    async def _reap_forever(self) -> None:
        interval = max(0.1, min(self.login_timeout, self.session_timeout) / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap()
            except Exception:
                # The reaper must outlive a bad flow: it is what frees handles.
                log.exception("releasing idle logins failed")

    async def reap(self) -> None:
        """Release every flow idle for longer than its timeout; forget old results."""
        now = asyncio.get_running_loop().time()
        due = []
        for flow in list(self.live):
            limit = self.session_timeout if flow.logged_in else self.login_timeout
            if not flow.stage.finished and now - flow.last_active > limit:
                due.append(flow)
        for sid, flow in list(self.flows.items()):
            finished_at = flow.finished_at
            if finished_at is not None and now - finished_at > self.login_timeout:
                del self.flows[sid]  # a result nobody came back to read
        # Together: one slow PAM module must not hold up the others' release.
        await asyncio.gather(*(self._expire(flow) for flow in due))

    async def _expire(self, flow: LoginFlow) -> None:
        log.info("releasing the idle login of %r (%s)", flow.user, flow.stage.value)
        await flow.release(Stage.EXPIRED)

    async def _release_all(self, app: web.Application) -> None:
        # No login starts after this (login() checks _closing before it makes one).
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        flows = list(self.live)
        self.flows.clear()
        self._started_by.clear()
        await asyncio.gather(*(flow.release() for flow in flows))


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _see_other() -> web.Response:
    # Post/Redirect/Get: a reload never sends a password twice.
    return web.Response(status=303, headers={"Location": "/"})
