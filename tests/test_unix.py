"""pam_unix with a real, throwaway system user (root only: it edits /etc/shadow)."""

from __future__ import annotations

import secrets

import pytest

import pamphlet
from conftest import UNIX_STACK, ScriptedApp, run_account_tool

pytestmark = pytest.mark.root  # pam_unix reads /etc/shadow


@pytest.fixture
def unix_service(make_service):
    return make_service(UNIX_STACK)


def no_delay(app):
    # pam_unix sleeps about 2 s after a failure; the fail_delay callback
    # replaces that sleep (and proves it is wired to the real module).
    delays = []
    app.fail_delay = lambda status, usec: delays.append((status, usec))
    return delays


def test_unix_login(unix_service, unix_user):
    name, password = unix_user
    with unix_service.app(ScriptedApp, name, answers=[password]) as app:
        app.authenticate()
        app.account_management()
        app.open_session()
    assert app.seen == ["Password: "]


def test_unix_wrong_password(unix_service, unix_user):
    name, _ = unix_user
    with unix_service.app(ScriptedApp, name, answers=["wrong"]) as app:
        delays = no_delay(app)
        with pytest.raises(pamphlet.AuthenticationError):
            app.authenticate()
    assert delays and delays[0][0] == pamphlet.ReturnCode.AUTH_ERR and delays[0][1] > 0


def test_unix_asks_for_login_name(unix_service, unix_user):
    name, password = unix_user
    with unix_service.app(ScriptedApp, None, answers=[name, password]) as app:
        app.authenticate()
        assert app.user == name
    assert app.seen[0] == "login:" or app.seen[0].startswith("login")
    assert app.seen[0].style == pamphlet.PAM_PROMPT_ECHO_ON


def test_unix_unknown_user(unix_service):
    with unix_service.app(ScriptedApp, "pmph-nobody-here", answers=["x"]) as app:
        no_delay(app)
        with pytest.raises((pamphlet.UserUnknown, pamphlet.AuthenticationError)):
            app.authenticate()


def test_unix_expired_password_is_changed(unix_service, unix_user):
    name, password = unix_user
    run_account_tool(["chage", "-d", "0", name], check=True)
    new = "Nw-" + secrets.token_hex(8)
    with unix_service.app(ScriptedApp, name, answers=[password]) as app:
        app.authenticate()
        with pytest.raises(pamphlet.NewAuthTokenRequired):
            app.account_management()
        app.answers = [password, new, new]
        app.change_authtoken(change_expired_authtoken=True)
        prompts = [m for m in app.seen if m.is_prompt]
        assert prompts[-2:] == ["New password: ", "Retype new password: "]
        app.account_management()
    with unix_service.app(ScriptedApp, name, answers=[new]) as app:
        app.authenticate()
        app.account_management()
