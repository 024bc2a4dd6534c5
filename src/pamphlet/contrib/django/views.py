"""``PamLoginView``: a login of as many pages as the PAM stack has questions.

Built on :mod:`pamphlet.stepwise`. The first page asks the user name. The
view admits the login in the site's :class:`~pamphlet.stepwise.LoginRegistry`
(caps in total and per client address: a 503 with Retry-After beyond them,
before anything reaches the broker), starts it at the broker with the client
address as PAM_RHOST, runs it to the stack's first question and *detaches*
it: the broker's worker keeps the handle and the waiting conversation call.
What resumes it (with the broker's single-use token) stays in the
server-side session; the browser holds only its session cookie. The next
request, in whichever worker process it lands, resumes it, answers, and runs
on to the next question or the outcome. Every failure before the user has
authenticated shows the one text "Login incorrect."; the details go to the
log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from typing import Any

from django.conf import settings
from django.contrib.auth import REDIRECT_FIELD_NAME
from django.contrib.auth import login as auth_login
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.middleware.csrf import get_token
from django.shortcuts import resolve_url
from django.template import Context, Engine, TemplateDoesNotExist, loader
from django.utils.decorators import method_decorator
from django.utils.http import url_has_allowed_host_and_scheme
from django.views import View
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_post_parameters

from ...constants import MessageStyle
from ...stepwise import Login, LoginRegistry, LoginSequence, Outcome, Step, TooManyLogins
from .backends import PamBackend
from .conf import Config, config

__all__ = ["PamLoginView", "registry"]

logger = logging.getLogger("pamphlet.contrib.django")

#: The session key of a login in progress.
SESSION_KEY = "_pamphlet_login"
_BACKEND = "pamphlet.contrib.django.backends.PamBackend"
_SEQUENCE = LoginSequence(check_account=True, change_expired_password=True, open_session=False)

DEFAULT_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:sans-serif;max-width:28em;margin:3em auto;color:#222}
.notice{padding:.5em .8em;border-radius:4px;background:#eef4ff;border:1px solid #9bd}
.notice.error{background:#fff0f0;border-color:#d99;color:#900}
label{display:block;margin-top:1em}input{font-size:1.1em;width:100%;box-sizing:border-box}
button{margin-top:1.2em;font-size:1em;padding:.4em 1.2em}
</style></head><body>
<h1>{{ title }}</h1>
{% if username %}<p class="who">Signing in as <strong>{{ username }}</strong></p>{% endif %}
{% for notice in notices %}<p class="notice {{ notice.kind }}">{{ notice.text }}</p>
{% endfor %}<form method="post">{% csrf_token %}
<input type="hidden" name="step" value="{{ step }}">
{% for field in fields %}<label for="{{ field.id }}">{{ field.label }}</label>
<input id="{{ field.id }}" name="{{ field.name }}" type="{{ field.type }}" \
autocomplete="{{ field.autocomplete }}"{% if forloop.first %} autofocus{% endif %}>
{% endfor %}<button type="submit" name="action" value="{{ action }}">{{ button }}</button>
{% if username %}<button type="submit" name="action" value="cancel">Cancel</button>{% endif %}
</form></body></html>
"""
_ENGINE = Engine()

_registry: LoginRegistry[Login] | None = None
_registry_lock = threading.Lock()


def registry() -> LoginRegistry[Login]:
    """This process's logins in progress (made from the settings at first use)."""
    global _registry
    with _registry_lock:
        if _registry is None:
            cfg = config()
            _registry = LoginRegistry(
                max_logins=cfg.max_logins,
                max_per_address=cfg.max_logins_per_address,
                timeout=cfg.login_timeout,
                shared_dir=cfg.login_state_dir or _default_state_dir(),
            )
        return _registry


def _default_state_dir() -> str:
    """A folder the site's processes share, that other local users cannot guess
    (and so cannot take first): named after a hash of SECRET_KEY."""
    digest = hashlib.sha256(b"pamphlet-logins:" + str(settings.SECRET_KEY).encode()).hexdigest()
    return os.path.join(tempfile.gettempdir(), f"pamphlet-logins-{os.geteuid()}-{digest[:16]}")


def _notices(pairs: list[list[Any]]) -> list[dict[str, str]]:
    return [
        {"kind": "error" if style == int(MessageStyle.ERROR_MSG) else "info", "text": text}
        for style, text in pairs
        if str(text).strip()
    ]


def _message_pairs(messages: Any) -> list[list[Any]]:
    return [[int(m.style), str(m)] for m in messages]


@method_decorator(
    [sensitive_post_parameters(), csrf_protect, never_cache],
    name="dispatch",
)
class PamLoginView(View):
    """The multi-step login (see the module's text). Needs ``PAMPHLET["BROKER"]``."""

    #: Overrides ``PAMPHLET["LOGIN_TEMPLATE"]`` when set.
    template_name: str | None = None
    redirect_field_name = REDIRECT_FIELD_NAME

    # -- the requests -------------------------------------------------------------

    def get(self, request: HttpRequest) -> HttpResponse:
        self._config(request)
        state = request.session.get(SESSION_KEY)
        if state is not None:
            return self._render_step(request, state, [])
        request.session[SESSION_KEY + "_next"] = request.GET.get(self.redirect_field_name, "")
        return self._render_start(request, [])

    def post(self, request: HttpRequest) -> HttpResponse:
        cfg = self._config(request)
        action = request.POST.get("action")
        state = request.session.get(SESSION_KEY)
        if action == "start":
            if state is not None:
                self._abandon(request, cfg, state)
            username = request.POST.get("username", "").strip()
            if not username:
                return self._render_start(request, [_error("Enter your user name.")])
            return self._start(request, cfg, username)
        if state is None:
            return self._render_start(
                request, [_error("This login is over or was never started: start again.")]
            )
        if action == "cancel":
            self._abandon(request, cfg, state)
            return self._render_start(request, [{"kind": "info", "text": "Login cancelled."}])
        if request.POST.get("step") != str(state["login"]["number"]):
            return self._render_step(
                request, state, [_error("That page was out of date; here is the current step.")]
            )
        # The site's processes share the registry's count: a key that is gone
        # expired (LOGIN_TIMEOUT after its last answer), whatever the broker's
        # detach_timeout would still allow.
        key = state["key"]
        if key not in registry():
            self._abandon(request, cfg, state)
            return self._render_start(
                request, [_error("This login waited too long and has ended. Start again.")]
            )
        count = len(state["login"]["prompts"])
        answers = [request.POST.get(f"answer-{i}", "") for i in range(count)]
        login = Login.resume(
            cfg.broker or "", state["login"], encoding=cfg.encoding, broker_uid=cfg.broker_uid
        )
        if login.outcome is None:
            registry().answered(key)
            login.answer(answers)
        return self._advance(request, cfg, key, login, state["user"])

    # -- the login ---------------------------------------------------------------------

    def _start(self, request: HttpRequest, cfg: Config, username: str) -> HttpResponse:
        address = _address(request)
        try:
            key, login = registry().start(
                address,
                lambda: Login.start(
                    cfg.service,
                    username,
                    sequence=_SEQUENCE,
                    rhost=address,
                    broker=cfg.broker,
                    broker_uid=cfg.broker_uid,
                    encoding=cfg.encoding,
                ),
            )
        except TooManyLogins as refused:
            return self._too_many(request, refused)
        return self._advance(request, cfg, key, login, username)

    def _advance(
        self, request: HttpRequest, cfg: Config, key: str, login: Login, username: str
    ) -> HttpResponse:
        """Detach a login that waits at a step (and show it), or finish a decided one."""
        result: Step | Outcome | None = login.step or login.outcome
        if isinstance(result, Step):
            detached = login.detach() if login.outcome is None else None
            if detached is not None:
                registry().attach(key, login)
                state = {"key": key, "user": username, "login": detached}
                request.session[SESSION_KEY] = state
                return self._render_step(request, state, [])
            result = login.outcome
        registry().remove(key)
        request.session.pop(SESSION_KEY, None)
        assert isinstance(result, Outcome)
        notices = _notices(_message_pairs(result.notices))
        if not result.success:
            return self._render_start(request, [*notices, _error(result.message)])
        return self._finish(request, cfg, result.user or username, notices)

    def _finish(
        self, request: HttpRequest, cfg: Config, pam_user: str, notices: list[dict[str, str]]
    ) -> HttpResponse:
        backend = PamBackend()
        user = backend.sync_user(request, pam_user, cfg)
        if user is None or not backend.user_can_authenticate(user):
            return self._render_start(
                request, [*notices, _error("Your account cannot sign in to this site.")]
            )
        nxt = request.session.pop(SESSION_KEY + "_next", "")
        auth_login(request, user, backend=_BACKEND)
        if notices and "django.contrib.messages" in settings.INSTALLED_APPS:
            from django.contrib import messages

            for notice in notices:
                level = messages.ERROR if notice["kind"] == "error" else messages.INFO
                messages.add_message(request, level, notice["text"])
        if not url_has_allowed_host_and_scheme(
            nxt, allowed_hosts={request.get_host()}, require_https=request.is_secure()
        ):
            nxt = ""
        return HttpResponseRedirect(nxt or resolve_url(settings.LOGIN_REDIRECT_URL))

    def _too_many(self, request: HttpRequest, refused: TooManyLogins) -> HttpResponse:
        logger.warning("a login from %s was refused: %s", _address(request), refused)
        response = self._render_start(
            request,
            [_error(f"Too many sign-ins are in progress; try again in {refused.retry_after} s.")],
        )
        response.status_code = refused.status
        response["Retry-After"] = str(refused.retry_after)
        return response

    def _abandon(self, request: HttpRequest, cfg: Config, state: dict[str, Any]) -> None:
        """End a login left half way (resume it, then end it), quietly."""
        request.session.pop(SESSION_KEY, None)
        registry().remove(state.get("key"))
        Login.resume(
            cfg.broker or "", state["login"], encoding=cfg.encoding, broker_uid=cfg.broker_uid
        ).end()

    def _config(self, request: HttpRequest) -> Config:
        cfg = config()
        if not cfg.broker:
            raise ImproperlyConfigured(
                "PamLoginView needs PAMPHLET['BROKER']: the transaction waits in the "
                "broker between the pages of a login"
            )
        if settings.SESSION_ENGINE.endswith("signed_cookies"):
            raise ImproperlyConfigured(
                "PamLoginView keeps the broker's resume token in the session: use a "
                "server-side SESSION_ENGINE, not signed_cookies"
            )
        return cfg

    # -- pages ------------------------------------------------------------------------

    def _render_start(self, request: HttpRequest, notices: list[dict[str, str]]) -> HttpResponse:
        fields = [
            {
                "id": "pamphlet-username",
                "name": "username",
                "label": "Username",
                "type": "text",
                "autocomplete": "username",
            }
        ]
        return self._render(request, "Sign in", None, 0, notices, fields, "start", "Continue")

    def _render_step(
        self, request: HttpRequest, state: dict[str, Any], notices: list[dict[str, str]]
    ) -> HttpResponse:
        login = state["login"]
        fields: list[dict[str, str]] = []
        for index, (style, text) in enumerate(login["prompts"]):
            secret = style == int(MessageStyle.PROMPT_ECHO_OFF)
            fields.append(
                {
                    "id": f"pamphlet-answer-{index}",
                    "name": f"answer-{index}",
                    "label": text.strip(),
                    "type": "password" if secret else "text",
                    "autocomplete": "off",
                }
            )
        notices = [*_notices(login["notices"]), *notices]
        title = "Change your password" if login["changing_password"] else "Sign in"
        return self._render(
            request, title, state["user"], login["number"], notices, fields, "answer", "Continue"
        )

    def _render(
        self,
        request: HttpRequest,
        title: str,
        username: str | None,
        step: int,
        notices: list[dict[str, str]],
        fields: list[dict[str, str]],
        action: str,
        button: str,
    ) -> HttpResponse:
        context = {
            "title": title,
            "username": username,
            "step": step,
            "notices": notices,
            "fields": fields,
            "action": action,
            "button": button,
        }
        name = self.template_name or config().login_template
        try:
            template = loader.get_template(name)
        except TemplateDoesNotExist:
            context["csrf_token"] = get_token(request)
            return HttpResponse(_ENGINE.from_string(DEFAULT_TEMPLATE).render(Context(context)))
        return HttpResponse(template.render(context, request))


def _address(request: HttpRequest) -> str:
    """The client's address: the connection's (a proxy in front sets REMOTE_ADDR itself)."""
    return str(request.META.get("REMOTE_ADDR") or "")


def _error(text: str) -> dict[str, str]:
    return {"kind": "error", "text": text}
