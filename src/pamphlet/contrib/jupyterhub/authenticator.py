"""The JupyterHub authenticator: PAM's whole conversation on the hub's sign-in page.

``c.JupyterHub.authenticator_class = "pamphlet"`` (the entry point) or
``"pamphlet.contrib.jupyterhub.PamphletAuthenticator"``.

Built on :mod:`pamphlet.stepwise`: an :class:`~pamphlet.stepwise.AsyncLogin`
per sign-in, kept in a :class:`~pamphlet.stepwise.LoginRegistry` (caps in all
and per client address, only an answer extends a sign-in, expiry ends it).
"""

from __future__ import annotations

import asyncio
import grp
import ipaddress
import os
import pwd
from collections.abc import Sequence
from typing import Any

from jinja2 import ChoiceLoader, DictLoader, Environment
from jupyterhub.auth import LocalAuthenticator
from jupyterhub.handlers.login import LoginHandler
from tornado.httputil import HTTPServerRequest, url_concat
from traitlets import Bool, Float, Integer, Set, Unicode, default

from ...message import Message
from ...stepwise import (
    LOGIN_INCORRECT,
    AsyncLogin,
    LoginRegistry,
    LoginSequence,
    Outcome,
    Step,
    TooManyLogins,
)
from ._templates import TEMPLATES

__all__ = ["PamphletAuthenticator", "PamphletLoginHandler", "client_addresses"]

#: The cookie that binds a browser to its sign-in in progress.
FLOW_COOKIE = "pamphlet-signin"
#: The key under which the handler hands a finished sign-in to ``authenticate``.
#: Only server-side code can put a _Verdict there: form data holds strings.
_FLOW_KEY = "pamphlet-flow"


def info(text: str) -> Message:
    return Message(text)  # TEXT_INFO


def error(text: str) -> Message:
    return Message(text, 3)  # PAM_ERROR_MSG


class _Verdict:
    """PAM's yes for one sign-in, handed to ``authenticate`` once."""

    def __init__(self, user: str, login: AsyncLogin) -> None:
        self.user = user
        self.login = login
        self.claimed = False


class PamphletLoginHandler(LoginHandler):  # type: ignore[misc]  # JupyterHub is untyped
    """``/hub/login``: one page per question of the PAM stack.

    The first page asks the user name and the password, as JupyterHub's own
    does. Each later question of the stack (a one-time code, a new password)
    is a page of its own; info and error messages are shown on the next
    page. The sign-in stays in the hub's memory, keyed by an unguessable id
    in an HttpOnly, SameSite=Strict cookie; every form carries JupyterHub's
    ``_xsrf`` token and the number of the question it answers, so a stale or
    replayed form answers nothing. Viewing the page never extends a sign-in:
    only an answer does.
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
        step: Step | None = None,
        username: str = "",
        continue_url: str = "",
        waiting: bool = False,
        status: int = 200,
    ) -> None:
        form_action, restart_url = self._urls()
        namespace: dict[str, Any] = dict(self.template_namespace)
        first_page = step is None and not waiting
        namespace.update(
            title=title,
            notices=list(notices),
            first_page=first_page,
            ask_password=self.pam.password_on_first_page,
            username=username,
            step=step.number if step else 0,
            prompts=list(step.prompts) if step else [],
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

    async def _show(self, sid: str) -> None:
        """The page for where the sign-in is now (the GET side of Post/Redirect/Get)."""
        if not await self.pam.settled(sid):
            # A module is still working (a slow network check): say so.
            await self._page(notices=[info("Checking…")], waiting=True)
            return
        login = self.pam.find(sid)
        if login is None:  # it broke before it started (logged by settled)
            self.pam.forget(sid)
            self._clear_flow_cookie()
            await self._page(notices=[error(LOGIN_INCORRECT)], status=403)
            return
        step, outcome = login.step, login.outcome
        if step is not None:
            title = "Change your password" if step.changing_password else "Sign in"
            await self._page(title=title, notices=step.notices, step=step)
            return
        assert outcome is not None
        self.pam.forget(sid)
        self._clear_flow_cookie()
        if outcome.success and self.pam.accept_user(outcome.user):
            await self._finish_login(login, outcome)
            return
        if outcome.success:
            # The stack renamed the user into one the hub refuses (PAM_USER).
            self.pam.log.warning(
                "PAM signed %r in as %r, which the hub refuses", login.user, outcome.user
            )
            await self.pam.end_quietly(login)
            outcome = Outcome(False, None, LOGIN_INCORRECT, outcome.notices)
        message = outcome.message.replace("may not log in", "may not sign in")
        notices = [*outcome.notices, error(message)]
        await self._page(notices=notices, username=login.user or "", status=403)

    # -- the flow cookie ------------------------------------------------------

    def _sid(self) -> str | None:
        return self.get_cookie(FLOW_COOKIE) or None

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

    def _fresh_xsrf_cookie(self) -> None:
        """As JupyterHub's LoginHandler: a fresh ``_xsrf`` cookie with every form a
        browser navigates to, which the form's token must match (public API only)."""
        token = self.xsrf_token
        if self.request.headers.get("Sec-Fetch-Mode", "navigate") != "navigate":
            return
        options = dict(self.settings.get("xsrf_cookie_kwargs", {}))
        options.setdefault("path", self.hub.base_url)
        options.pop("expires", None)
        options.pop("expires_days", None)
        options["max_age"] = 3600  # an anonymous form's token, as JupyterHub's
        value = token.decode("ascii") if isinstance(token, bytes) else str(token)
        self.set_cookie("_xsrf", value, **options)

    # -- GET and POST ---------------------------------------------------------

    async def get(self) -> None:
        if self.current_user:
            await super().get()
            return
        self._fresh_xsrf_cookie()
        sid = self._sid()
        known = self.pam.known(sid)  # a page view: never extends the sign-in
        if sid is not None and known and self.get_argument("restart", default=""):
            await self.pam.release(sid)
            self._clear_flow_cookie()
            known = False
        if sid is None or not known:
            notices = []
            if sid is not None and self.pam.timed_out(sid):
                self._clear_flow_cookie()
                notices.append(error("Your sign-in timed out. Please start again."))
            await self._page(notices=notices, username=self.get_argument("username", default=""))
            return
        await self._show(sid)

    async def post(self) -> None:
        # JupyterHub has checked _xsrf before we get here.
        sid = self._sid()
        if "username" in self.request.body_arguments:
            if sid is not None:
                await self.pam.release(sid)
            username = self.get_argument("username", strip=True)
            password = self.get_body_argument("password", default=None, strip=False)
            if not self.pam.password_on_first_page:
                password = None
            if not username:
                await self._page(notices=[error("Please enter a user name.")], status=403)
                return
            address, counted = client_addresses(self.request, self.pam.trusted_proxy_ips)
            try:
                sid = self.pam.start(username, password, rhost=address, counted_as=counted)
            except TooManyLogins as refused:
                self.pam.log.warning("a sign-in from %s was refused: %s", address, refused)
                self._clear_flow_cookie()
                self.set_header("Retry-After", str(refused.retry_after))
                await self._page(
                    notices=[
                        error(
                            "Too many sign-ins are in progress. Please try again in "
                            f"{refused.retry_after} seconds."
                        )
                    ],
                    username=username,
                    status=refused.status,
                )
                return
            self._set_flow_cookie(sid)
        elif sid is None or not self.pam.known(sid):
            self._clear_flow_cookie()
            timed_out = sid is not None and self.pam.timed_out(sid)
            text = "Your sign-in timed out." if timed_out else "Your sign-in was replaced."
            await self._page(notices=[error(f"{text} Please start again.")], status=403)
            return
        else:
            try:
                number = int(self.get_body_argument("step", default=""))
            except ValueError:
                number = -1
            # A stale or malformed form answers nothing: the page shows where
            # the sign-in is now.
            self.pam.answer(sid, number, self.get_body_arguments("answer", strip=False))
        settled = await self.pam.settled(sid)
        login = self.pam.find(sid)
        if settled and (login is None or login.outcome is not None):
            await self._show(sid)
        else:
            # Post/Redirect/Get: a reload never sends an answer twice.
            self.redirect(self._urls()[0], status=303)

    async def _finish_login(self, login: AsyncLogin, outcome: Outcome) -> None:
        """PAM said yes: let JupyterHub check the user (allowed, blocked, admin) and log in."""
        name = outcome.user or ""
        verdict = _Verdict(name, login)
        user = await self.login_user({"username": name, _FLOW_KEY: verdict})
        # authenticate() claimed the handle if the hub accepted the user.
        await self.pam.settle(verdict, user.name if user else None)
        if user is None:
            await self._page(
                notices=[*outcome.notices, error("This user may not use this hub.")],
                username=name,
                status=403,
            )
            return
        self._jupyterhub_user = user
        next_url = self.get_next_url(user)
        if outcome.notices:
            # What the stack said on the way in (a password about to expire)
            # is shown before the hub's pages take over.
            await self._page(title="Signed in", notices=outcome.notices, continue_url=next_url)
        else:
            self.redirect(next_url)


def client_addresses(
    request: HTTPServerRequest, trusted_proxies: Sequence[str] | set[str]
) -> tuple[str, str]:
    """(the client's address for PAM_RHOST, the address the per-address cap counts).

    PAM_RHOST is the peer of the connection, unless the peer is one of
    ``trusted_proxies`` (addresses or networks): then the last
    ``X-Forwarded-For`` entry that is not a trusted proxy. Tornado's
    ``remote_ip`` (with JupyterHub's ``xheaders=True``) believes
    ``X-Real-Ip`` and ``X-Forwarded-For`` from anyone who reaches the hub's
    port; this does not.

    The cap counts the same address, except behind a proxy nobody declared
    trusted: then the last ``X-Forwarded-For`` entry, which
    configurable-http-proxy appends with the address it saw. Otherwise every
    sign-in through a local proxy would share one address, and one client
    would fill its share for all. A header forged straight to the hub's port
    (only local accounts reach it) can spend another address's share, never
    more than the total cap, and never reaches PAM.
    """
    context = getattr(request.connection, "context", None)
    address = getattr(context, "address", None)
    peer = str(address[0]) if isinstance(address, tuple) and address else ""
    if not peer:
        peer = str(getattr(context, "remote_ip", "") or "")
    networks = []
    for entry in trusted_proxies:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue

    def valid(candidate: str) -> bool:
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            return False
        return True

    def trusted(candidate: str) -> bool:
        return valid(candidate) and any(
            ipaddress.ip_address(candidate) in network for network in networks
        )

    hops = [hop.strip() for hop in (request.headers.get("X-Forwarded-For") or "").split(",")]
    hops = [hop for hop in hops if hop]
    if not trusted(peer):
        last = hops[-1] if hops and valid(hops[-1]) else peer
        return peer, last
    client = peer
    for candidate in reversed(hops):
        if not valid(candidate):
            break  # garbage: the last good hop stands
        client = candidate
        if not trusted(candidate):
            break
    return client, client


class PamphletAuthenticator(LocalAuthenticator):  # type: ignore[misc]  # JupyterHub is untyped
    """Sign in to JupyterHub through PAM, with the stack's whole conversation.

    A drop-in for JupyterHub's ``PAMAuthenticator``: the same option names
    where the meaning is the same (``service``, ``encoding``,
    ``check_account``, ``open_sessions``, ``admin_groups``, ``allowed_groups``,
    ``pam_normalize_username``), plus ``broker``, ``confdir``,
    ``login_timeout``, ``password_on_first_page``, ``max_pending_logins``,
    ``max_pending_logins_per_address`` and ``trusted_proxy_ips``.
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
        A group that does not exist is logged as a warning and grants nothing."""
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
        help="""Seconds a sign-in waits for the browser's next answer. Only an answer
        extends it, never a page view. An abandoned sign-in (a closed tab, a client that
        only polls) is then released: its conversation ends with PAM_CONV_ERR and its
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
        new sign-in beyond this is refused (HTTP 503, Retry-After) until one finishes.""",
    ).tag(config=True)

    max_pending_logins_per_address = Integer(
        8,
        help="""Sign-ins in progress at once from one client address (an IPv6 /64),
        so that one client cannot take every place (see trusted_proxy_ips).""",
    ).tag(config=True)

    trusted_proxy_ips = Set(
        help="""Addresses (or networks, "10.0.0.0/8") of the proxies whose X-Forwarded-For
        header names the client. A request from any other peer is its own client, whatever
        headers it sends: anyone who reaches the hub's port could otherwise name any
        address as PAM_RHOST. Empty (the default): the peer is the client, and every
        sign-in through a proxy comes from the proxy's address. JupyterHub's proxy
        connects from 127.0.0.1 by default: trust it only where no untrusted local
        users (or their notebook servers) can reach the hub's port.""",
    ).tag(config=True)

    @default("allowed_groups")
    def _no_allowed_groups(self) -> set[str]:
        return set()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._registry: LoginRegistry[AsyncLogin] | None = None
        # the start or answer each sign-in is busy with (a request waits answer_wait for it)
        self._busy: dict[str, asyncio.Task[object]] = {}
        # sign-ins released by the timeout, remembered a while to tell their browser
        self._timed_out: dict[str, float] = {}
        # handles of finished sign-ins, kept for the session (open_sessions)
        self._login_handles: dict[str, AsyncLogin] = {}
        # handles with an open session, per (user, server name)
        self._sessions: dict[tuple[str, str], AsyncLogin] = {}
        self._reaper: asyncio.Task[None] | None = None

    @property
    def registry(self) -> LoginRegistry[AsyncLogin]:
        if self._registry is None:
            self._registry = LoginRegistry(
                max_logins=self.max_pending_logins,
                max_per_address=self.max_pending_logins_per_address,
                timeout=self.login_timeout,
            )
        return self._registry

    # -- what JupyterHub calls ----------------------------------------------

    def get_handlers(self, app: Any) -> list[tuple[str, type]]:
        return [("/login", PamphletLoginHandler)]

    async def authenticate(self, handler: Any, data: dict[str, Any]) -> dict[str, Any] | None:
        """Accept only a sign-in that PAM finished on this hub, in this request.

        A name and password from elsewhere (JupyterHub's token API with
        ``auth``, another login handler) are refused: they carry no finished
        PAM conversation.
        """
        verdict = data.get(_FLOW_KEY) if isinstance(data, dict) else None
        if not isinstance(verdict, _Verdict) or verdict.claimed:
            self.log.warning("refused a sign-in that did not go through the PAM conversation")
            return None
        return {"name": verdict.user}

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
            gids = set()
            for group in sorted(self.admin_groups):
                try:
                    gids.add(grp.getgrnam(group).gr_gid)
                except KeyError:
                    # A typo or a group of another distribution (wheel on
                    # Debian): it grants nothing, and the sign-in goes on.
                    self.log.warning("admin_groups names %r, which is not a group here", group)
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                return False
            return bool(gids & set(os.getgrouplist(name, entry.pw_gid)))

        return await asyncio.to_thread(in_admin_groups)

    async def pre_spawn_start(self, user: Any, spawner: Any) -> None:
        """Open the PAM session on the handle the user signed in with."""
        if not self.open_sessions:
            return
        key = (user.name, getattr(spawner, "name", "") or "")
        login = self._login_handles.pop(user.name, None)
        if login is None:
            # No handle from a sign-in in this hub process (the hub restarted,
            # or another server of the user took it): a handle of its own, as
            # PAMAuthenticator makes for every session, with no question asked.
            self.log.info("no sign-in handle for %r: opening the session on a new one", user.name)
            login = await AsyncLogin.start(
                self.service,
                user.name,
                sequence=LoginSequence(authenticate=False, check_account=False, keep_handle=True),
                **self._where(),
            )
            if login.step is not None:
                await login.end()
                raise RuntimeError(f"the PAM stack asked {user.name!r} a question at spawn")
        try:
            # No pam_setcred in the hub: pam_group would change the hub's own groups.
            await login.open_session(credentials=False)
        except BaseException:
            await self.end_quietly(login)
            raise
        old = self._sessions.pop(key, None)
        self._sessions[key] = login
        if old is not None:
            await self.end_quietly(old)

    async def post_spawn_stop(self, user: Any, spawner: Any) -> None:
        """Close the PAM session and end its handle."""
        key = (user.name, getattr(spawner, "name", "") or "")
        login = self._sessions.pop(key, None)
        if login is not None:
            await self.end_quietly(login)

    # -- sign-ins in progress -------------------------------------------------

    def _where(self) -> dict[str, Any]:
        where: dict[str, Any] = {"encoding": self.encoding}
        if self.broker:
            where["broker"] = self.broker
        else:
            where["confdir"] = self.confdir
        return where

    def accept_user(self, pam_user: str | None) -> bool:
        """Whether the user PAM settled on is the hub's user, character for character."""
        if not pam_user:
            return False
        try:
            return bool(self.normalize_username(pam_user) == pam_user)
        except KeyError:  # pam_normalize_username and no such account
            return False

    def start(
        self, username: str, password: str | None, *, rhost: str, counted_as: str | None = None
    ) -> str:
        """Start the PAM conversation of one browser; its id. Raises TooManyLogins.

        ``counted_as``: the address the per-address cap counts (``rhost`` by default)."""
        try:
            name = self.normalize_username(username)
        except KeyError:
            name = username  # PAM will refuse it, with the same words as any refusal
        sid = self.registry.admit(counted_as or rhost)
        sequence = LoginSequence(
            check_account=self.check_account,
            change_expired_password=True,
            keep_handle=self.open_sessions,
        )

        async def begin() -> object:
            login = await AsyncLogin.start(
                self.service, name, sequence=sequence, rhost=rhost, **self._where()
            )
            self.registry.attach(sid, login)
            step = login.step
            if (
                password is not None
                and step is not None
                and step.number == 1
                and len(step.prompts) == 1
                and step.prompts[0].wants_password
            ):
                # The first page asked it: it answers the stack's first question.
                return await login.answer([password])
            return step or login.outcome

        self._busy[sid] = asyncio.get_running_loop().create_task(
            begin(), name=f"pamphlet: sign-in of {name!r}"
        )
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap(), name="pamphlet: release abandoned sign-ins"
            )
        return sid

    def known(self, sid: str | None) -> bool:
        """Whether ``sid`` is a sign-in in progress (reading never extends its life)."""
        return sid is not None and (sid in self._busy or self.registry.get(sid) is not None)

    def find(self, sid: str | None) -> AsyncLogin | None:
        """The sign-in of ``sid`` once it has started (reading never extends its life)."""
        return None if sid is None else self.registry.get(sid)

    def timed_out(self, sid: str) -> bool:
        return sid in self._timed_out

    async def settled(self, sid: str) -> bool:
        """Wait (up to answer_wait) for what the sign-in is busy with; whether it is done."""
        task = self._busy.get(sid)
        if task is None:
            return True
        done, _ = await asyncio.wait({task}, timeout=self.answer_wait)
        if not done:
            return False
        if self._busy.get(sid) is task:
            del self._busy[sid]
        if task.exception() is not None:
            self.log.error("the sign-in broke", exc_info=task.exception())
        return True

    def answer(self, sid: str, number: int, answers: list[str]) -> bool:
        """Hand the browser's answers to the sign-in; False for a stale or wrong form."""
        login = self.registry.get(sid)
        busy = self._busy.get(sid)
        if login is None or (busy is not None and not busy.done()):
            return False
        step = login.step
        if step is None or step.number != number or len(answers) != len(step.prompts):
            return False
        self.registry.answered(sid)  # only an answer extends a sign-in
        self._busy[sid] = asyncio.get_running_loop().create_task(login.answer(answers))
        return True

    def forget(self, sid: str) -> None:
        self.registry.remove(sid)
        self._busy.pop(sid, None)

    async def release(self, sid: str) -> None:
        """End the sign-in of ``sid`` wherever it is."""
        login = self.registry.remove(sid)
        task = self._busy.pop(sid, None)
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=self.answer_wait)
            login = login or self.registry.get(sid)
        if login is not None:
            await self.end_quietly(login)

    async def settle(self, verdict: _Verdict, hub_user: str | None) -> None:
        """After JupyterHub's verdict: keep the handle for the session, or end it."""
        if verdict.claimed:
            return
        verdict.claimed = True
        login = verdict.login
        if hub_user is not None and self.open_sessions:
            old = self._login_handles.pop(hub_user, None)
            self._login_handles[hub_user] = login
            if old is not None:
                await self.end_quietly(old)
        else:
            await self.end_quietly(login)

    async def end_quietly(self, login: AsyncLogin) -> None:
        try:
            await login.end()
        except Exception:
            # The handle is gone either way; a failure here is the hub's
            # business, not the browser's.
            self.log.exception("ending the PAM handle of %r failed", login.user)

    async def _reap(self) -> None:
        """Release sign-ins that waited longer than login_timeout for an answer."""
        loop = asyncio.get_running_loop()
        while len(self.registry) or self._timed_out:
            await asyncio.sleep(max(0.2, min(5.0, self.login_timeout / 4)))
            try:
                now = loop.time()
                for sid, login in self.registry.reap():
                    user = login.user if login is not None else "?"
                    self.log.info("releasing the abandoned sign-in of %r", user)
                    self._timed_out[sid] = now
                    self._busy.pop(sid, None)
                for sid, when in list(self._timed_out.items()):
                    if now - when > 2 * self.login_timeout + 60:
                        del self._timed_out[sid]
            except Exception:
                self.log.exception("releasing abandoned sign-ins failed")
