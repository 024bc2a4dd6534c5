"""The aiohttp side of the web login: routes, the session cookie, CSRF, timeouts.

Every browser gets an unguessable id in an HttpOnly, SameSite=Strict cookie.
The id names its :class:`LoginFlow` (if any) in ``WebLogin.flows``; the PAM
handle itself never leaves the server. Each form carries a CSRF token, an
HMAC of the id under a key that lives only in this process. After a login
succeeds the id is replaced, so an id seen before the login is worth nothing
after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import pathlib
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from pamphlet import PAM_MAX_RESP_SIZE, Message, MessageStyle, PamError

from . import pages
from .flow import LoginFlow, Stage

__all__ = ["COOKIE", "WebLogin"]

log = logging.getLogger(__name__)

COOKIE = "pamphlet_login"
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

    def __init__(self, status: int, title: str, text: str) -> None:
        super().__init__(text)
        self.status, self.title, self.text = status, title, text


class WebLogin:
    """A web application that logs users in through the PAM service ``service``.

    ``login_timeout``: seconds a login may sit unanswered (a tab closed
    mid-conversation) before its PAM handle is released. ``session_timeout``:
    idle seconds after which a logged-in session is closed and ended.
    ``wait_timeout``: how long one request waits for the PAM stack before it
    shows a "please wait" page that refreshes itself.
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
    ) -> None:
        self.service = service
        self.confdir = confdir
        self.login_timeout = login_timeout
        self.session_timeout = session_timeout
        self.wait_timeout = wait_timeout
        self.secure_cookie = secure_cookie
        self.flows: dict[str, LoginFlow] = {}
        self._csrf_key = secrets.token_bytes(32)
        self._reaper: asyncio.Task[None] | None = None

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

    # -- sessions and CSRF ----------------------------------------------------

    def _csrf_token(self, sid: str) -> str:
        return hmac.new(self._csrf_key, sid.encode(), hashlib.sha256).hexdigest()

    async def _checked_form(self, request: web.Request) -> tuple[str, dict[str, str]]:
        """The session id and the form of a POST whose CSRF token is right."""
        sid = request.cookies.get(COOKIE, "")
        if not sid:
            raise _Refused(403, "Cookies needed", "Signing in needs cookies for this site.")
        form = await request.post()
        token = form.get("csrf")
        if not isinstance(token, str) or not hmac.compare_digest(token, self._csrf_token(sid)):
            raise _Refused(403, "Form expired", "This form is out of date. Please start again.")
        return sid, {key: value for key, value in form.items() if isinstance(value, str)}

    def _set_cookie(self, response: web.StreamResponse, sid: str) -> None:
        response.set_cookie(
            COOKIE, sid, path="/", httponly=True, samesite="Strict", secure=self.secure_cookie
        )

    def _rotate(self, flow: LoginFlow, response: web.StreamResponse) -> str:
        """Give a logged-in flow a fresh id (no id from before the login stays valid)."""
        self.flows.pop(flow.sid, None)
        flow.sid = secrets.token_urlsafe(32)
        flow.sid_rotated = True
        self.flows[flow.sid] = flow
        self._set_cookie(response, flow.sid)
        return flow.sid

    # -- handlers ---------------------------------------------------------------

    async def style(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=STYLE, content_type="text/css")

    async def index(self, request: web.Request) -> web.StreamResponse:
        sid = request.cookies.get(COOKIE, "")
        flow = self.flows.get(sid)
        if flow is None:
            response = _html("")
            if not sid:
                sid = secrets.token_urlsafe(32)
                self._set_cookie(response, sid)
            response.text = pages.start_page(self._csrf_token(sid))
            return response
        flow.touch()
        if flow.stage is Stage.WORKING:
            await flow.wait_for_screen(flow.step, self.wait_timeout)
        response = _html("")
        if flow.stage is Stage.WELCOME and not flow.sid_rotated:
            sid = self._rotate(flow, response)
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
        new_sid = secrets.token_urlsafe(32)
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
        previous = self.flows.get(sid)
        if previous is not None:
            if previous.stage is Stage.WELCOME:
                return _see_other()  # already logged in: show the welcome page
            await previous.release(Stage.FAILED)
        try:
            flow = LoginFlow(self.service, username, confdir=self.confdir, sid=sid)
        except PamError as error:
            log.error("pam_start for service %r failed: %r", self.service, error)
            raise _Refused(
                503, "Sign-in unavailable", "Signing in is not possible right now."
            ) from None
        self.flows[sid] = flow
        await flow.wait_for_screen(0, self.wait_timeout)
        return _see_other()

    async def answer(self, request: web.Request) -> web.StreamResponse:
        sid, form = await self._checked_form(request)
        flow = self.flows.get(sid)
        if flow is None:
            return _see_other()
        flow.touch()
        try:
            step = int(form.get("step", ""))
        except ValueError:
            raise _Refused(400, "Bad request", "The form was incomplete.") from None
        names = [f"answer-{index}" for index in range(flow.prompt_count)]
        if step != flow.step or any(name not in form for name in names):
            # An old form (back button, second tab, double click): show the
            # current question again rather than answering it with stale data.
            return _see_other()
        if flow.submit(step, [form[name] for name in names]):
            await flow.wait_for_screen(step, self.wait_timeout)
        return _see_other()

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        sid, _form = await self._checked_form(request)
        flow = self.flows.get(sid)
        if flow is not None and flow.stage is not Stage.WELCOME:
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
        """Release every flow idle for longer than its timeout."""
        now = asyncio.get_running_loop().time()
        due = []
        for sid, flow in list(self.flows.items()):
            idle = now - flow.last_seen
            if flow.stage.finished:
                if idle > self.login_timeout:
                    self.flows.pop(sid, None)  # a result nobody came back to read
            elif idle > (
                self.session_timeout if flow.stage is Stage.WELCOME else self.login_timeout
            ):
                due.append(flow)
        # Together: one slow PAM module must not hold up the others' release.
        await asyncio.gather(*(self._expire(flow) for flow in due))

    async def _expire(self, flow: LoginFlow) -> None:
        log.info("releasing the idle login of %r (%s)", flow.user, flow.stage.value)
        await flow.release(Stage.EXPIRED)
        flow.touch()  # the "timed out" notice waits a while for the browser

    async def _release_all(self, app: web.Application) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        flows = list(self.flows.values())
        self.flows.clear()
        await asyncio.gather(*(flow.release() for flow in flows))


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _see_other() -> web.Response:
    # Post/Redirect/Get: a reload never sends a password twice.
    return web.Response(status=303, headers={"Location": "/"})
