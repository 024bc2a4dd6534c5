"""The HTML of the web login: small functions, every value escaped.

No template engine: the pages are few and short, and ``html.escape`` on each
value is easy to check by eye. Styles come from ``/style.css`` so that the
Content-Security-Policy can forbid inline styles and scripts altogether.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape

from pamphlet import PAM_MAX_RESP_SIZE, Message

__all__ = [
    "ask_page",
    "problem_page",
    "start_page",
    "welcome_page",
    "working_page",
]


def _layout(title: str, body: str, *, wide: bool = False, refresh: bool = False) -> str:
    head_refresh = '<meta http-equiv="refresh" content="1">' if refresh else ""
    main_class = ' class="wide"' if wide else ""
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{head_refresh}<title>{escape(title)} · pamphlet</title>"
        '<link rel="stylesheet" href="/style.css"></head>\n'
        f"<body><main{main_class}>"
        '<p class="brand">pamphlet web login</p>'
        f"<h1>{escape(title)}</h1>\n{body}\n</main></body></html>\n"
    )


def _notice(message: Message) -> str:
    # Error messages are shown as alerts, info messages as plain notes: the
    # difference a terminal shows by writing to stderr or stdout.
    kind = "error" if message.is_error else "info"
    role = "alert" if message.is_error else "status"
    return f'<p class="notice {kind}" role="{role}">{escape(message)}</p>'


def _notices(messages: Iterable[Message]) -> str:
    return "\n".join(_notice(message) for message in messages)


def _csrf(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{escape(token)}">'


def start_page(csrf: str, notices: Iterable[Message] = (), username: str = "") -> str:
    """The first page: only the user name, which starts the PAM transaction."""
    body = f"""{_notices(notices)}
<form method="post" action="/login">{_csrf(csrf)}
<label for="username">User name</label>
<input type="text" id="username" name="username" value="{escape(username)}"
 autocomplete="username" autocapitalize="none" spellcheck="false" required autofocus
 maxlength="{PAM_MAX_RESP_SIZE - 1}">
<div class="actions"><button type="submit">Continue</button></div>
</form>"""
    return _layout("Sign in", body)


def ask_page(csrf: str, title: str, user: str, step: int, messages: list[Message]) -> str:
    """One conversation call: its notices as notices, each prompt as a field.

    Echo-off prompts become password fields, echo-on prompts text fields. The
    prompt text is the label, exactly as the PAM module wrote it. ``step``
    ties the answers to this call, so that a form sent twice (or from an old
    tab) cannot answer a later question.
    """
    parts = []
    index = 0
    for message in messages:
        if not message.is_prompt:
            parts.append(_notice(message))
            continue
        field = f"answer-{index}"
        kind = "password" if message.wants_password else "text"
        focus = " autofocus" if index == 0 else ""
        parts.append(
            f'<label for="{field}">{escape(message)}</label>'
            f'<input type="{kind}" id="{field}" name="{field}" autocomplete="off"'
            f' maxlength="{PAM_MAX_RESP_SIZE - 1}"{focus}>'
        )
        index += 1
    fields = "\n".join(parts)
    body = f"""<p class="who">Signing in as <strong>{escape(user)}</strong></p>
<form method="post" action="/answer">{_csrf(csrf)}
<input type="hidden" name="step" value="{step}">
{fields}
<div class="actions"><button type="submit">Continue</button>
<button type="submit" class="secondary" formaction="/cancel" formnovalidate>Cancel</button></div>
</form>"""
    return _layout(title, body)


def working_page(title: str) -> str:
    """Shown when the PAM stack takes longer than a request may wait."""
    body = '<p class="who">Please wait: the PAM stack is still working.</p>'
    return _layout(title, body, refresh=True)


def welcome_page(
    csrf: str, user: str, environ: Mapping[str, str], notices: Iterable[Message] = ()
) -> str:
    """After a login: the session is open; its PAM environment is listed."""
    if environ:
        rows = "\n".join(
            f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>"
            for name, value in sorted(environ.items())
        )
        table = f"<table><caption>Your session's PAM environment</caption>\n{rows}\n</table>"
    else:
        table = '<p class="muted">The PAM stack set no environment variables.</p>'
    body = f"""{_notices(notices)}
<p>You are logged in. Your credentials are established and your PAM session
is open until you log out.</p>
{table}
<form method="post" action="/logout">{_csrf(csrf)}
<div class="actions"><button type="submit">Log out</button></div>
</form>"""
    return _layout(f"Welcome, {user}", body, wide=True)


def problem_page(title: str, text: str) -> str:
    """A request we refuse or could not serve: a sentence, never a traceback."""
    body = f'<p>{escape(text)}</p>\n<p><a href="/">Back to the sign-in page</a></p>'
    return _layout(title, body)
