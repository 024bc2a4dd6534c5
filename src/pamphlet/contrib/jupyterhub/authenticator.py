"""The JupyterHub authenticator: PAM's whole conversation on the hub's sign-in page.

``c.JupyterHub.authenticator_class = "pamphlet"`` (the entry point) or
``"pamphlet.contrib.jupyterhub.PamphletAuthenticator"``.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import secrets
from collections.abc import Sequence
from typing import Any

from jinja2 import ChoiceLoader, DictLoader, Environment
from jupyterhub._xsrf_utils import _set_xsrf_cookie
from jupyterhub.auth import LocalAuthenticator
from jupyterhub.handlers.login import LoginHandler
from tornado.httputil import HTTPServerRequest, url_concat
from tornado.netutil import is_valid_ip
from traitlets import Bool, Float, Integer, Set, Unicode, default

from pamphlet import Message

from ._flow import LoginFlow, Stage, _HubLogin, end_quietly, error, info, make_application
from ._templates import TEMPLATES

__all__ = ["PamphletAuthenticator", "PamphletLoginHandler"]

#: The cookie that binds a browser to its sign-in in progress.
FLOW_COOKIE = "pamphlet-signin"
#: The key under which the handler hands a finished flow to ``authenticate``.
#: Only server-side code can put a LoginFlow there: form data holds strings.
_FLOW_KEY = "pamphlet-flow"


class PamphletLoginHandler(LoginHandler):  # type: ignore[misc]  # JupyterHub is untyped
    """``/hub/login``: one page per question of the PAM stack.

    The first page asks the user name and the password, as JupyterHub's own
    does. Each later question of the stack (a one-time code, a new password)
    is a page of its own; info and error messages are shown on the next
    page. The PAM transaction stays in the hub's memory, keyed by an
    unguessable id in an HttpOnly, SameSite=Strict cookie; every form carries
    JupyterHub's ``_xsrf`` token and the number of the question it answers,
    so a stale or replayed form answers nothing.
    """

    @property
    def pam(self) -> PamphletAuthenticator:
        authenticator = self.authenticator
        assert isinstance(authenticator, PamphletAuthenticator)
        return authenticator

    # -- rendering ----------------------------------------------------------

    def _pamphlet_env(self) -> Environment:
        settings: dict[str, Any] = self.settings
        env = settings.get("pamphlet_jinja2_env")
        if env is None:
            base: Environment = settings["jinja2_env"]
            # The hub's own paths first, so a site can override our page.
            loaders = [base.loader] if base.loader is not None else []
            loader = ChoiceLoader([*loaders, DictLoader(TEMPLATES)])
            env = base.overlay(loader=loader)
            settings["pamphlet_jinja2_env"] = env
        assert isinstance(env, Environment)
        return env

    def _urls(self) -> tuple[str, str]:
        login_url = self.pam.login_url(self.hub.base_url)
        next_url = self.get_argument("next", default="")
        query = {"next": next_url} if next_url else {}
        return url_concat(login_url, query), url_concat(login_url, {**query, "restart": "1"})

    async def _page(
        self,
        *,
        title: str = "Sign in",
        notices: Sequence[Message] = (),
        flow: LoginFlow | None = None,
        username: str = "",
        continue_url: str = "",
        waiting: bool = False,
        status: int = 200,
    ) -> None:
        form_action, restart_url = self._urls()
        namespace: dict[str, Any] = dict(self.template_namespace)
        namespace.update(
            title=title,
            notices=list(notices),
            first_page=flow is None,
            ask_password=self.pam.password_on_first_page,
            username=username,
            step=flow.step if flow else 0,
            prompts=flow.prompts if flow and flow.stage is Stage.ASKING else [],
            continue_url=continue_url,
            waiting=waiting,
            form_action=form_action,
            restart_url=restart_url,
            # login.html's own variables
            next=self.get_argument("next", default=""),
            login_error=None,
            custom_html="",
            authenticator=self.pam,
            authenticator_login_url=form_action,
            login_url=self.settings["login_url"],
        )
        html = (
            await self._pamphlet_env().get_template("pamphlet_login.html").render_async(**namespace)
        )
        self.set_status(status)
        self.set_header("Cache-Control", "no-store")
        self.finish(html)

    async def _show(self, flow: LoginFlow) -> None:
        """The page for where ``flow`` is now (the GET side of Post/Redirect/Get)."""
        if flow.stage is Stage.ASKING:
            await self._page(title=flow.title, notices=flow.notices, flow=flow)
        elif flow.stage is Stage.DONE:
            await self._finish_login(flow)
        elif flow.stage.finished:  # FAILED or EXPIRED
            self.pam.forget(flow)
            self._clear_flow_cookie()
            notices = list(flow.shown)
            if flow.stage is Stage.EXPIRED:
                notices.append(error("Your sign-in timed out. Please start again."))
            await self._page(notices=notices, username=flow.user, status=403)
        else:
            # A module is still working (a slow network check): say so.
            await self._page(title=flow.title, notices=[info("Checking…")], flow=flow, waiting=True)

    # -- the flow cookie ------------------------------------------------------

    def _flow(self) -> LoginFlow | None:
        sid = self.get_cookie(FLOW_COOKIE)
        flow = self.pam.find(sid) if sid else None
        if flow is not None:
            flow.touch()
        return flow

    def _set_flow_cookie(self, sid: str) -> None:
        self.set_cookie(
            FLOW_COOKIE,
            sid,
            path=self.hub.base_url,
            httponly=True,
            samesite="Strict",
            secure=self.request.protocol == "https",
        )

    def _clear_flow_cookie(self) -> None:
        self.clear_cookie(FLOW_COOKIE, path=self.hub.base_url)

    # -- GET and POST ---------------------------------------------------------

    async def get(self) -> None:
        if self.current_user:
            await super().get()
            return
        # As JupyterHub's LoginHandler: a fresh _xsrf cookie with every form
        # a browser navigates to, which the form's token must match.
        if self.request.headers.get("Sec-Fetch-Mode", "navigate") == "navigate":
            _set_xsrf_cookie(
                self, self._xsrf_token_id, cookie_path=self.hub.base_url, xsrf_token=self.xsrf_token
            )
        flow = self._flow()
        if flow is not None and self.get_argument("restart", default=""):
            await self.pam.release(flow, Stage.FAILED)
            self._clear_flow_cookie()
            flow = None
        if flow is None:
            await self._page(username=self.get_argument("username", default=""))
            return
        await self._show(flow)

    async def post(self) -> None:
        # JupyterHub has checked _xsrf before we get here.
        flow = self._flow()
        if "username" in self.request.body_arguments:
            if flow is not None:
                await self.pam.release(flow, Stage.FAILED)
            username = self.get_argument("username", strip=True)
            password = self.get_body_argument("password", default=None, strip=False)
            if not self.pam.password_on_first_page:
                password = None
            try:
                flow = self.pam.start(username, password, rhost=client_address(self.request))
            except _Refused as refusal:
                self._clear_flow_cookie()
                await self._page(notices=[error(str(refusal))], username=username, status=403)
                return
            self._set_flow_cookie(flow.sid)
            await flow.wait_for_screen(0, self.pam.answer_wait)
        elif flow is None:
            self._clear_flow_cookie()
            await self._page(
                notices=[error("Your sign-in timed out or was replaced. Please start again.")],
                status=403,
            )
            return
        else:
            try:
                step = int(self.get_body_argument("step", default=""))
            except ValueError:
                step = -1
            answers = self.get_body_arguments("answer", strip=False)
            if flow.submit(step, answers):
                await flow.wait_for_screen(step, self.pam.answer_wait)
            # A stale or malformed form answers nothing: the page shows where
            # the sign-in is now.
        if flow.stage is Stage.ASKING or not flow.stage.finished:
            # Post/Redirect/Get: a reload never sends an answer twice.
            self.redirect(self._urls()[0], status=303)
        else:
            await self._show(flow)

    async def _finish_login(self, flow: LoginFlow) -> None:
        """PAM said yes: let JupyterHub check the user (allowed, blocked, admin) and log in."""
        self.pam.forget(flow)
        self._clear_flow_cookie()
        user = await self.login_user({"username": flow.user, _FLOW_KEY: flow})
        # authenticate() claimed the handle if the hub accepted the user.
        await self.pam.settle(flow, user.name if user else None)
        if user is None:
            await self._page(
                notices=[*flow.shown, error("This user may not use this hub.")],
                username=flow.user,
                status=403,
            )
            return
        self._jupyterhub_user = user
        next_url = self.get_next_url(user)
        if flow.shown:
            # What the stack said on the way in (a password about to expire)
            # is shown before the hub's pages take over.
            await self._page(title="Signed in", notices=list(flow.shown), continue_url=next_url)
        else:
            self.redirect(next_url)


def client_address(request: HTTPServerRequest) -> str | None:
    """The client's address for PAM_RHOST, as JupyterHub's proxy settings say.

    JupyterHub serves with tornado's ``xheaders=True`` and
    ``trusted_downstream=c.JupyterHub.trusted_downstream_ips``: the address is
    the last ``X-Forwarded-For`` entry that is not a trusted proxy (its
    proxy, configurable-http-proxy, appends the address it saw), else the
    peer's. Tornado's ``remote_ip`` then lets an ``X-Real-Ip`` header win
    over that; configurable-http-proxy passes a client's ``X-Real-Ip``
    through untouched, so any client could name its own address. PAM
    modules decide with PAM_RHOST (pam_access, pam_faillock), so that header
    is not honoured here.
    """
    context = getattr(request.connection, "context", None)
    peer = getattr(context, "_orig_remote_ip", None) or request.remote_ip
    trusted = getattr(context, "trusted_downstream", None) or set()
    forwarded = request.headers.get("X-Forwarded-For")
    address = peer
    if forwarded:
        for candidate in (part.strip() for part in reversed(forwarded.split(","))):
            address = candidate
            if candidate not in trusted:
                break
    if address and is_valid_ip(address):
        return str(address)
    return str(peer) if peer else None


class _Refused(Exception):
    """A sign-in that is not even started (too many in flight)."""


class PamphletAuthenticator(LocalAuthenticator):  # type: ignore[misc]  # JupyterHub is untyped
    """Sign in to JupyterHub through PAM, with the stack's whole conversation.

    A drop-in for JupyterHub's ``PAMAuthenticator``: the same option names
    where the meaning is the same (``service``, ``encoding``,
    ``check_account``, ``open_sessions``, ``admin_groups``, ``allowed_groups``,
    ``pam_normalize_username``), plus ``broker``, ``confdir``,
    ``login_timeout``, ``password_on_first_page`` and
    ``max_pending_logins``.
    """

    service = Unicode("login", help="The name of the PAM service to use.").tag(config=True)

    encoding = Unicode("utf8", help="The text encoding to use when communicating with PAM.").tag(
        config=True
    )

    check_account = Bool(
        True,
        help="""Run PAM's account management (acct_mgmt) after authentication, on the same
        handle. A refused account (locked, expired, outside its hours) cannot sign in, and
        the stack's message is shown. An expired password is changed right there.""",
    ).tag(config=True)

    open_sessions = Bool(
        False,
        help="""Open a PAM session when the user's server starts and close it when the
        server stops, on the handle the user signed in with (not a new one). An error
        opening the session stops the spawn.""",
    ).tag(config=True)

    admin_groups = Set(
        help="""Users in any of these UNIX groups are admins (besides admin_users).
        A group that cannot be resolved is an error, as with PAMAuthenticator."""
    ).tag(config=True)

    pam_normalize_username = Bool(
        False,
        help="""Round-trip the user name through its uid (getpwnam, getpwuid) before
        PAM sees it, so that aliases of one account become one hub user.""",
    ).tag(config=True)

    broker = Unicode(
        None,
        allow_none=True,
        help="""Path of the socket of a pamphlet broker (``pamphlet broker``), for a hub
        that does not run as root: the PAM handles then live in the broker's
        processes. Unset: libpam runs in the hub's own process.""",
    ).tag(config=True)

    confdir = Unicode(
        None,
        allow_none=True,
        help="""Read the PAM service from this directory instead of /etc/pam.d
        (Linux-PAM 1.4 or newer). For tests, or a stack of the hub's own.""",
    ).tag(config=True)

    login_timeout = Float(
        120.0,
        help="""Seconds a sign-in waits for the browser's next answer. An abandoned sign-in
        (a closed tab) is then released: its conversation ends with PAM_CONV_ERR and its
        PAM handle is ended.""",
    ).tag(config=True)

    answer_wait = Float(
        20.0,
        help="""Seconds a request waits for the stack's next question before the page
        says it is still checking (a slow module).""",
    ).tag(config=True)

    password_on_first_page = Bool(
        True,
        help="""The first page asks the password with the user name, and it answers the
        stack's first question if that is a single hidden prompt. Set False for stacks
        whose first question is not the password: the first page then asks only the user
        name, and every question of the stack is a page of its own.""",
    ).tag(config=True)

    max_pending_logins = Integer(
        256,
        help="""Sign-ins in progress at once (each may hold a thread inside libpam). A
        new sign-in beyond this is refused with a message until one finishes.""",
    ).tag(config=True)

    @default("allowed_groups")
    def _no_allowed_groups(self) -> set[str]:
        return set()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._flows: dict[str, LoginFlow] = {}
        # released by the timeout, remembered a while to tell their browser
        self._expired: dict[str, LoginFlow] = {}
        # handles of finished sign-ins, kept for the session (open_sessions)
        self._login_handles: dict[str, _HubLogin] = {}
        # handles with an open session, per (user, server name)
        self._sessions: dict[tuple[str, str], _HubLogin] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # -- what JupyterHub calls ----------------------------------------------

    def get_handlers(self, app: Any) -> list[tuple[str, type]]:
        return [("/login", PamphletLoginHandler)]

    async def authenticate(self, handler: Any, data: dict[str, Any]) -> dict[str, Any] | None:
        """Accept only a sign-in that PAM finished on this hub, in this request.

        A name and password from elsewhere (JupyterHub's token API with
        ``auth``, another login handler) are refused: they carry no finished
        PAM conversation.
        """
        flow = data.get(_FLOW_KEY) if isinstance(data, dict) else None
        if not isinstance(flow, LoginFlow) or flow.stage is not Stage.DONE or flow.claimed:
            self.log.warning("refused a sign-in that did not go through the PAM conversation")
            return None
        return {"name": flow.user}

    def normalize_username(self, username: str) -> str:
        if self.pam_normalize_username:
            username = pwd.getpwuid(pwd.getpwnam(username).pw_uid).pw_name
            return str(self.username_map.get(username, username))
        return str(super().normalize_username(username))

    async def is_admin(self, handler: Any, authentication: dict[str, Any]) -> bool:
        admin = bool(super().is_admin(handler, authentication))
        if admin or not self.admin_groups:
            return admin
        name = authentication["name"]

        def in_admin_groups() -> bool:
            # NSS may ask the network (LDAP, sssd): off the event loop.
            gids = {grp.getgrnam(group).gr_gid for group in self.admin_groups}
            return bool(gids & set(os.getgrouplist(name, pwd.getpwnam(name).pw_gid)))

        try:
            return await asyncio.to_thread(in_admin_groups)
        except Exception as problem:
            # As PAMAuthenticator: a group that cannot be resolved fails the
            # sign-in (a 500) rather than quietly leaving admin unset.
            self.log.error("admin group check of %r failed: %s", name, problem)
            raise

    async def pre_spawn_start(self, user: Any, spawner: Any) -> None:
        """Open the PAM session on the handle the user signed in with."""
        if not self.open_sessions:
            return
        key = (user.name, getattr(spawner, "name", "") or "")
        app = self._login_handles.pop(user.name, None)
        if app is None:
            # No handle from a sign-in in this hub process (the hub restarted,
            # or another server of the user took it): a new handle, as
            # PAMAuthenticator makes for every session.
            self.log.info("no sign-in handle for %r: opening the session on a new one", user.name)
            app = self._new_app(user.name, None)
        try:
            await app.open_session()
        except BaseException:
            await end_quietly(app, user.name, self.log)
            raise
        old = self._sessions.pop(key, None)
        self._sessions[key] = app
        if old is not None:
            await self._close(old, key)

    async def post_spawn_stop(self, user: Any, spawner: Any) -> None:
        """Close the PAM session and end its handle."""
        key = (user.name, getattr(spawner, "name", "") or "")
        app = self._sessions.pop(key, None)
        if app is not None:
            await self._close(app, key)

    # -- sign-ins in progress -------------------------------------------------

    def _new_app(self, user: str, flow: LoginFlow | None) -> _HubLogin:
        return make_application(
            self.service,
            user,
            confdir=self.confdir,
            encoding=self.encoding,
            broker=self.broker,
            flow=flow,
        )

    def _accept_user(self, pam_user: str) -> bool:
        try:
            return bool(self.normalize_username(pam_user) == pam_user)
        except KeyError:  # pam_normalize_username and no such account
            return False

    def start(self, username: str, password: str | None, *, rhost: str | None) -> LoginFlow:
        """Start the PAM conversation of one browser."""
        if len(self._flows) >= self.max_pending_logins:
            raise _Refused("Too many sign-ins are in progress. Please try again in a minute.")
        if not username:
            raise _Refused("Please enter a user name.")
        try:
            name = self.normalize_username(username)
        except KeyError:
            name = username  # PAM will refuse it, with the same words as any refusal
        sid = secrets.token_urlsafe(32)
        flow = LoginFlow(
            sid,
            name,
            password=password,
            rhost=rhost,
            check_account=self.check_account,
            new_app=lambda flow: self._new_app(name, flow),
            accept_user=self._accept_user,
            log=self.log,
        )
        self._flows[sid] = flow
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(), name="pamphlet: release abandoned sign-ins"
            )
        return flow

    def find(self, sid: str) -> LoginFlow | None:
        return self._flows.get(sid) or self._expired.get(sid)

    def forget(self, flow: LoginFlow) -> None:
        for flows in (self._flows, self._expired):
            if flows.get(flow.sid) is flow:
                del flows[flow.sid]

    async def release(self, flow: LoginFlow, stage: Stage = Stage.EXPIRED) -> None:
        self.forget(flow)
        await flow.release(stage)

    async def settle(self, flow: LoginFlow, hub_user: str | None) -> None:
        """After JupyterHub's verdict: keep the handle for the session, or end it."""
        app = flow.claim()
        if app is None:
            return
        if hub_user is not None and self.open_sessions:
            old = self._login_handles.pop(hub_user, None)
            self._login_handles[hub_user] = app
            if old is not None:
                await end_quietly(old, hub_user, self.log)
        else:
            await end_quietly(app, flow.user, self.log)

    async def _close(self, app: _HubLogin, key: tuple[str, str]) -> None:
        try:
            await app.close_session()
        except Exception as problem:
            self.log.warning("closing the PAM session of %r failed: %s", key, problem)
        finally:
            await end_quietly(app, key[0], self.log)

    async def _sweep(self) -> None:
        """Release sign-ins that have waited longer than login_timeout."""
        loop = asyncio.get_running_loop()
        while self._flows or self._expired:
            await asyncio.sleep(max(0.2, min(5.0, self.login_timeout / 4)))
            try:
                now = loop.time()
                stale = [f for f in self._flows.values() if now - f.last_seen > self.login_timeout]
                for flow in stale:
                    self.log.info("releasing the abandoned sign-in of %r", flow.user)
                    del self._flows[flow.sid]
                    # Its browser's next request learns that it timed out.
                    self._expired[flow.sid] = flow
                await asyncio.gather(*(flow.release(Stage.EXPIRED) for flow in stale))
                for sid, flow in list(self._expired.items()):
                    if now - flow.last_seen > 2 * self.login_timeout + 60:
                        del self._expired[sid]
            except Exception:
                self.log.exception("releasing abandoned sign-ins failed")
