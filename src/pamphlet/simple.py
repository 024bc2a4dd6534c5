"""One-call helpers: check a password, change a password.

For web applications and scripts that have the user's password in hand and
want a yes or no from PAM::

    try:
        pamphlet.authenticate("alice", password, service="myapp")
    except pamphlet.NewAuthTokenRequired:
        ...  # send the user to the change-password page
    except pamphlet.PamError:
        ...  # refused: AuthenticationError, AccountExpired, ...

Both helpers fail closed: a prompt they cannot answer (a second factor, a
question) fails the call with a :class:`~pamphlet.ConversationError` whose
cause, an :class:`UnansweredPromptError`, names the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .application import PamApplication
from .errors import PamError, UnansweredPromptError
from .message import Message

__all__ = ["authenticate", "change_password", "UnansweredPromptError"]

MessageHandler = Callable[[Message], object]


class _OneCall(PamApplication):
    """Answers prompts through ``choose``; passes other messages to ``on_message``."""

    def __init__(
        self,
        service: str,
        user: str,
        *,
        choose: Callable[[Message], str | bytes],
        on_message: MessageHandler | None,
        **kwargs: Any,
    ) -> None:
        self._choose = choose
        self._on_message = on_message
        super().__init__(service, user, **kwargs)

    def conversation(self, messages: list[Message]) -> list[str | bytes | None]:
        answers: list[str | bytes | None] = []
        for message in messages:
            if message.is_prompt:
                answers.append(self._choose(message))
            else:
                if self._on_message is not None:
                    self._on_message(message)
                answers.append(None)
        return answers


def _start(
    service: str,
    username: str,
    choose: Callable[[Message], str | bytes],
    *,
    confdir: str | None,
    broker: str | None,
    broker_uid: int | None,
    encoding: str,
    on_message: MessageHandler | None,
    rhost: str | None,
    tty: str | None,
    ruser: str | None,
) -> _OneCall:
    app = _OneCall(
        service,
        username,
        choose=choose,
        on_message=on_message,
        confdir=confdir,
        broker=broker,
        broker_uid=broker_uid,
        encoding=encoding,
    )
    try:
        if rhost is not None:
            app.rhost = rhost
        if tty is not None:
            app.tty = tty
        if ruser is not None:
            app.ruser = ruser
    except BaseException:
        app.end()
        raise
    return app


def _check_secret(value: object, what: str) -> None:
    if not isinstance(value, (str, bytes)):
        raise TypeError(f"the {what} must be str or bytes, not {type(value).__name__}")


def authenticate(
    username: str,
    password: str | bytes,
    service: str = "login",
    *,
    confdir: str | None = None,
    broker: str | None = None,
    broker_uid: int | None = None,
    check_account: bool = True,
    encoding: str = "utf-8",
    rhost: str | None = None,
    tty: str | None = None,
    ruser: str | None = None,
    on_message: MessageHandler | None = None,
) -> None:
    """Check ``username``'s ``password`` against the PAM ``service``.

    Runs ``authenticate`` and, unless ``check_account`` is false,
    ``account_management``, then ends the handle. Returns None when PAM lets
    the user in, and raises the :class:`~pamphlet.PamError` subclass of the
    failure otherwise: :class:`~pamphlet.AuthenticationError` for a wrong
    password, :class:`~pamphlet.AccountExpired`,
    :class:`~pamphlet.NewAuthTokenRequired` (the password must be changed
    first), :class:`~pamphlet.PermissionDenied`, ...

    Every echo-off prompt that repeats the first one's text is answered with
    the password; any other prompt (a one-time code, a question) fails the
    call closed with a ConversationError caused by an
    :class:`UnansweredPromptError` naming the prompt. Info and error
    messages go to ``on_message`` if given. ``rhost``, ``tty`` and ``ruser``
    set those PAM items (``rhost`` lets modules such as pam_access and
    pam_faillock know where the user comes from). ``confdir`` reads the
    service from a directory of your own instead of /etc/pam.d; ``broker``
    runs the call through the ``pamphlet broker`` listening on that path,
    which must run as root (or as ``broker_uid``, when given).
    """
    _check_secret(password, "password")
    asked: list[str] = []

    def choose(prompt: Message) -> str | bytes:
        if not prompt.wants_password:
            raise UnansweredPromptError(
                prompt, "pamphlet.authenticate", "it answers only password (echo-off) prompts"
            )
        if asked and str(prompt) != asked[0]:
            raise UnansweredPromptError(
                prompt,
                "pamphlet.authenticate",
                f"it already answered the password prompt {asked[0]!r}, and this one asks "
                "for something else",
            )
        asked.append(str(prompt))
        return password

    app = _start(
        service,
        username,
        choose,
        confdir=confdir,
        broker=broker,
        broker_uid=broker_uid,
        encoding=encoding,
        on_message=on_message,
        rhost=rhost,
        tty=tty,
        ruser=ruser,
    )
    with app:
        try:
            app.authenticate()
            if check_account:
                app.account_management()
        except PamError as error:
            if broker is None:
                _point_at_the_doctor(error, service, username, confdir)
            raise


# Which password a change-password prompt asks for. Linux-PAM modules ask
# "Current password: " / "Old password: " and "New password: " /
# "Retype new password: " / "Verify New Password :" (pam_matrix).
_NEW_PROMPT = re.compile(r"\b(new|retype|re-enter|repeat|verify|confirm|again)\b", re.I)
_OLD_PROMPT = re.compile(r"\b(old|current|existing)\b", re.I)


def _password_for_prompt(prompt: Message, old: str | bytes, new: str | bytes) -> str | bytes:
    """The answer to one of pam_chauthtok's prompts: the old or the new password."""
    if not prompt.wants_password:
        raise UnansweredPromptError(
            prompt, "pamphlet.change_password", "it answers only password (echo-off) prompts"
        )
    if _NEW_PROMPT.search(prompt):
        return new
    if _OLD_PROMPT.search(prompt):
        return old
    raise UnansweredPromptError(
        prompt,
        "pamphlet.change_password",
        "it cannot tell whether it asks for the old or the new password",
    )


def change_password(
    username: str,
    old: str | bytes,
    new: str | bytes,
    service: str = "passwd",
    *,
    confdir: str | None = None,
    broker: str | None = None,
    broker_uid: int | None = None,
    encoding: str = "utf-8",
    rhost: str | None = None,
    tty: str | None = None,
    ruser: str | None = None,
    on_message: MessageHandler | None = None,
) -> None:
    """Change ``username``'s password from ``old`` to ``new`` through PAM.

    Runs ``change_authtoken`` (pam_chauthtok) on ``service``, as passwd(1)
    does, and ends the handle. Raises the :class:`~pamphlet.PamError`
    subclass of the failure: :class:`~pamphlet.AuthTokenManipulationError`
    when the stack refuses the change (wrong old password, a new one too
    weak, ...), :class:`~pamphlet.AuthenticationError`, ...

    Echo-off prompts are answered by what they ask for: one naming the
    current or old password gets ``old``; one naming a new password, or
    asking to retype, verify or repeat it, gets ``new``. Any other prompt
    fails the call closed (ConversationError caused by an
    :class:`UnansweredPromptError` naming the prompt). The stack's info and
    error messages (such as a password-quality complaint) go to
    ``on_message``. Through a ``broker``, the user is authenticated with
    ``old`` first (the broker's policy requires it before ``chauthtok``).
    """
    _check_secret(old, "old password")
    _check_secret(new, "new password")

    def choose(prompt: Message) -> str | bytes:
        return _password_for_prompt(prompt, old, new)

    app = _start(
        service,
        username,
        choose,
        confdir=confdir,
        broker=broker,
        broker_uid=broker_uid,
        encoding=encoding,
        on_message=on_message,
        rhost=rhost,
        tty=tty,
        ruser=ruser,
    )
    with app:
        if broker is not None:
            # The broker's policy wants the user authenticated before
            # chauthtok (its worker runs with the peer's real uid, so pam_unix
            # asks for the old password again in chauthtok as well).
            app._choose = lambda prompt: _old_password_for_prompt(prompt, old)
            app.authenticate()
            app._choose = choose
        try:
            app.change_authtoken()
        except PamError as error:
            if broker is None:
                _point_at_the_doctor(error, service, username, confdir)
            raise


def _point_at_the_doctor(error: PamError, service: str, user: str, confdir: str | None) -> None:
    # Only the cheap checks of refusal_hint run here, on the failure path.
    from .doctor import refusal_hint

    hint = refusal_hint(error, service, user, confdir)
    if hint is not None:
        error.add_note(hint)


def _old_password_for_prompt(prompt: Message, old: str | bytes) -> str | bytes:
    if not prompt.wants_password:
        raise UnansweredPromptError(
            prompt, "pamphlet.change_password", "it answers only password (echo-off) prompts"
        )
    return old
