"""``PamLoginView``: a login of as many pages as the PAM stack has questions.

The first page asks the user name. The view starts a transaction at the
broker, runs ``authenticate`` up to the stack's first prompt, *detaches* the
transaction (the broker's worker keeps the handle and the waiting
conversation call) and shows the prompt. The token that resumes the
transaction stays in the server-side session; the browser holds only its
session cookie. The next request, in whichever worker process it lands,
resumes the transaction with the token (good once), answers, and runs on to
the next prompt or the end: ``acct_mgmt``, and when the password has
expired, ``chauthtok`` with PAM_CHANGE_EXPIRED_AUTHTOK on the same handle.
Info and error messages of the stack are shown on the next page.
"""

from __future__ import annotations

import logging
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

from ...broker.client import BrokerSteps as Stepwise
from ...broker.client import Progress as Step
from ...broker.errors import (
    BrokerError,
    BrokerUnavailable,
    ResumeRefused,
    Throttled,
    TokenUsed,
)
from ...constants import Flag, Item, MessageStyle, Phase, ReturnCode
from ...message import Message
from .backends import PamBackend
from .conf import Config, config

__all__ = ["PamLoginView"]

logger = logging.getLogger("pamphlet.contrib.django")

#: The session key of a login in progress.
SESSION_KEY = "_pamphlet_login"
_BACKEND = "pamphlet.contrib.django.backends.PamBackend"

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


def _notices(messages: list[Message] | tuple[Message, ...]) -> list[dict[str, str]]:
    return [
        {"kind": "error" if m.is_error else "info", "text": str(m)}
        for m in messages
        if not m.is_prompt and str(m).strip()
    ]


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
        cfg = self._config(request)
        state = request.session.get(SESSION_KEY)
        if state is not None:
            return self._render_prompts(request, state, [])
        nxt = request.GET.get(self.redirect_field_name, "")
        request.session[SESSION_KEY + "_next"] = nxt
        del cfg
        return self._render_start(request, [])

    def post(self, request: HttpRequest) -> HttpResponse:
        cfg = self._config(request)
        action = request.POST.get("action")
        state = request.session.get(SESSION_KEY)
        if action == "start":
            if state is not None:
                self._abandon(cfg, state)
                self._clear(request)
            username = request.POST.get("username", "").strip()
            if not username:
                return self._render_start(request, [_error("Enter your user name.")])
            return self._start(request, cfg, username)
        if state is None:
            return self._render_start(
                request, [_error("This login is over or was never started: start again.")]
            )
        if action == "cancel":
            self._abandon(cfg, state)
            self._clear(request)
            return self._render_start(request, [{"kind": "info", "text": "Login cancelled."}])
        if request.POST.get("step") != str(state["step"]):
            return self._render_prompts(
                request, state, [_error("That page was out of date; here is the current step.")]
            )
        count = sum(1 for style, _ in state["waiting"] if style in _PROMPTS)
        answers = [request.POST.get(f"answer-{i}", "") for i in range(count)]
        try:
            txn = Stepwise.resume(cfg.broker or "", state["token"], encoding=cfg.encoding)
        except TokenUsed:
            self._clear(request)
            return self._render_start(
                request, [_error("This step was already sent once; start the login again.")]
            )
        except ResumeRefused:
            self._clear(request)
            return self._render_start(
                request, [_error("This login waited too long and has ended; start again.")]
            )
        except BrokerError as exc:
            self._clear(request)
            return self._render_start(request, [_error(_broker_trouble(exc))])
        if txn.waiting is None:
            txn.close()
            self._clear(request)
            return self._render_start(request, [_error("This login lost its place; start again.")])
        try:
            step = txn.answer(answers)
        except BrokerError as exc:
            txn.close()
            self._clear(request)
            return self._render_start(request, [_error(_broker_trouble(exc))])
        except ValueError as exc:
            txn.close()
            self._clear(request)
            return self._render_start(request, [_error(f"That answer cannot be used: {exc}")])
        return self._advance(request, cfg, txn, state, step, [])

    # -- the transaction -------------------------------------------------------------

    def _start(self, request: HttpRequest, cfg: Config, username: str) -> HttpResponse:
        try:
            txn = Stepwise.start(cfg.broker or "", cfg.service, username, encoding=cfg.encoding)
        except (BrokerError, ValueError) as exc:
            return self._render_start(request, [_error(_broker_trouble(exc))])
        except Exception as exc:  # pam_start failed: a PamError
            logger.warning("pam_start for %r failed: %s", username, exc)
            return self._render_start(request, [_error(f"Login is not possible: {exc}")])
        try:
            remote = request.META.get("REMOTE_ADDR")
            if remote:
                txn.set_item(Item.RHOST, remote)
            state: dict[str, Any] = {
                "user": username,
                "phase": Phase.AUTHENTICATE.value,
                "step": 0,
                "token": None,
                "waiting": [],
            }
            step = txn.call(Phase.AUTHENTICATE)
        except BrokerError as exc:
            txn.close()
            return self._render_start(request, [_error(_broker_trouble(exc))])
        return self._advance(request, cfg, txn, state, step, [])

    def _advance(
        self,
        request: HttpRequest,
        cfg: Config,
        txn: Stepwise,
        state: dict[str, Any],
        step: Step,
        notices: list[dict[str, str]],
    ) -> HttpResponse:
        """Run on until a prompt waits (detach, show it) or the login is decided."""
        try:
            while True:
                notices += _notices(step.messages)
                if step.waiting is not None:
                    state["token"] = txn.detach()
                    state["step"] += 1
                    state["waiting"] = [[int(m.style), str(m)] for m in step.waiting]
                    request.session[SESSION_KEY] = state
                    # The messages of the waiting call itself show with its fields.
                    shown = notices[: len(notices) - len(_notices(step.waiting))]
                    return self._render_prompts(request, state, shown)
                phase, code = Phase(state["phase"]), step.code
                if phase is Phase.AUTHENTICATE and code == _SUCCESS:
                    state["phase"] = Phase.ACCT_MGMT.value
                    step = txn.call(Phase.ACCT_MGMT)
                elif phase is Phase.ACCT_MGMT and code == _NEW_AUTHTOK_REQD:
                    notices.append(
                        {"kind": "info", "text": "Your password has expired: choose a new one."}
                    )
                    state["phase"] = Phase.CHAUTHTOK.value
                    step = txn.call(Phase.CHAUTHTOK, _CHANGE_EXPIRED)
                elif code == _SUCCESS:
                    return self._finish(request, cfg, txn, state, notices)
                else:
                    assert code is not None
                    reason = txn.strerror(code)
                    txn.end(code)
                    self._clear(request)
                    logger.info("PAM login of %r failed in %s: %s", state["user"], phase, reason)
                    return self._render_start(
                        request, [*notices, _error(f"Login failed: {reason}")]
                    )
        except Throttled as exc:
            txn.close()
            self._clear(request)
            return self._render_start(request, [*notices, _error(f"Too many failed logins: {exc}")])
        except BrokerError as exc:
            txn.close()
            self._clear(request)
            return self._render_start(request, [*notices, _error(_broker_trouble(exc))])

    def _finish(
        self,
        request: HttpRequest,
        cfg: Config,
        txn: Stepwise,
        state: dict[str, Any],
        notices: list[dict[str, str]],
    ) -> HttpResponse:
        pam_user = txn.get_item(Item.USER) or state["user"]
        txn.end(_SUCCESS)
        self._clear(request)
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

    def _abandon(self, cfg: Config, state: dict[str, Any]) -> None:
        """End a login left half way (resume it, then end it), quietly."""
        try:
            Stepwise.resume(cfg.broker or "", state["token"], encoding=cfg.encoding).end(
                int(ReturnCode.ABORT)
            )
        except BrokerError:
            pass  # expired or used: the broker has ended it already

    @staticmethod
    def _clear(request: HttpRequest) -> None:
        request.session.pop(SESSION_KEY, None)

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

    def _render_prompts(
        self, request: HttpRequest, state: dict[str, Any], notices: list[dict[str, str]]
    ) -> HttpResponse:
        fields: list[dict[str, str]] = []
        notices = list(notices)
        for style, text in state["waiting"]:
            if style in _PROMPTS:
                index = len(fields)
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
            elif text.strip():
                kind = "error" if style == int(MessageStyle.ERROR_MSG) else "info"
                notices.append({"kind": kind, "text": text})
        title = "Change your password" if state["phase"] == "chauthtok" else "Sign in"
        return self._render(
            request, title, state["user"], state["step"], notices, fields, "answer", "Continue"
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


_SUCCESS = int(ReturnCode.SUCCESS)
_NEW_AUTHTOK_REQD = int(ReturnCode.NEW_AUTHTOK_REQD)
_CHANGE_EXPIRED = int(Flag.CHANGE_EXPIRED_AUTHTOK)
_PROMPTS = {int(MessageStyle.PROMPT_ECHO_OFF), int(MessageStyle.PROMPT_ECHO_ON)}


def _error(text: str) -> dict[str, str]:
    return {"kind": "error", "text": text}


def _broker_trouble(exc: Exception) -> str:
    if isinstance(exc, BrokerUnavailable):
        logger.error("the pamphlet broker is unavailable: %s", exc)
        return "The login service is unavailable; try again later."
    logger.warning("a PAM login ended early: %s", exc)
    return f"The login could not go on: {exc}"
