"""Every phase against real modules: pam_matrix, pam_debug, pam_permit, pam_deny."""

from __future__ import annotations

import pytest

import pamphlet
from conftest import ScriptedApp
from pamphlet import ReturnCode
from pamphlet.testing import matrix_stack

# pam_debug's name for each code; PAM_IGNORE is left out because libpam turns
# a stack where every module ignores into PAM_PERM_DENIED (tested below).
DEBUG_NAMES = {
    code: code.name.lower().replace("authtok_recovery_err", "authtok_recover_err")
    for code in ReturnCode
    if code not in (ReturnCode.SUCCESS, ReturnCode.IGNORE)
}

PHASES = [
    ("auth", "auth", "authenticate"),
    ("account", "acct", "account_management"),
    ("account", "acct", "acct_mgmt"),
    ("session", "open_session", "open_session"),
    ("session", "close_session", "close_session"),
    ("auth", "cred", "initialize_credentials"),
    ("auth", "cred", "delete_credentials"),
    ("auth", "cred", "reinitialize_credentials"),
    ("auth", "cred", "refresh_credentials"),
    ("password", "chauthtok", "change_authtoken"),
]


def test_matrix_login_with_right_password(matrix):
    app = matrix.app(ScriptedApp, "bob", answers=["secret"])
    app.authenticate()
    app.account_management()
    app.initialize_credentials()
    app.open_session()
    assert app.seen == ["Password: "]
    assert app.seen[0].wants_password
    assert app.environ["HOMEDIR"] == "/home/bob"
    assert "CRED" in app.environ
    app.close_session()
    assert "HOMEDIR" not in app.environ
    app.end()


def test_matrix_wrong_password_raises_authentication_error(matrix):
    app = matrix.app(ScriptedApp, "bob", answers=["wrong"])
    with pytest.raises(pamphlet.AuthenticationError) as info:
        app.authenticate()
    assert info.value.code == ReturnCode.AUTH_ERR == 7
    assert str(info.value) == "Authentication failure"  # libpam's own text
    app.end()


def test_unknown_user_fails(matrix):
    with matrix.app(ScriptedApp, "mallory", answers=["secret"]) as app:
        with pytest.raises(pamphlet.AuthenticationError):
            app.authenticate()


def test_other_users_password_fails(matrix):
    with matrix.app(ScriptedApp, "alice", answers=["secret"]) as app:
        with pytest.raises(pamphlet.AuthenticationError):
            app.authenticate()


def test_account_not_allowed_in_service(make_service):
    service = make_service(users={})
    service.add_user("carol", "pw", service="elsewhere")
    with service.app(ScriptedApp, "carol", answers=["pw"]) as app:
        with pytest.raises(pamphlet.PermissionDenied):
            app.account_management()


def test_verbose_info_and_error_messages_reach_conversation(make_service):
    service = make_service(users={"bob": "secret"})
    service.add_service("verbose", matrix_stack(service.passdb, options="verbose"))
    app = ScriptedApp("verbose", "bob", confdir=service.confdir, answers=["secret"])
    app.authenticate()
    assert app.seen[-1] == "Authentication succeeded" and app.seen[-1].is_info
    app.answers = ["bad"]
    with pytest.raises(pamphlet.AuthenticationError):
        app.authenticate()
    assert app.seen[-1] == "Authentication failed" and app.seen[-1].is_error
    app.end()


def test_echo_on_prompt(make_service):
    service = make_service(users={"bob": "secret"})
    service.add_service("echo", matrix_stack(service.passdb, options="echo"))
    with ScriptedApp("echo", "bob", confdir=service.confdir, answers=["secret"]) as app:
        app.authenticate()
        assert app.seen[0].style == pamphlet.PAM_PROMPT_ECHO_ON
        assert app.seen[0].is_prompt and not app.seen[0].wants_password


def test_change_password_rewrites_passdb(matrix):
    app = matrix.app(ScriptedApp, "bob", answers=["secret", "n3w", "n3w"])
    app.change_authtoken()
    assert app.seen == ["Old password: ", "New Password :", "Verify New Password :"]
    assert matrix.password_of("bob") == "n3w"
    app.end()
    with matrix.app(ScriptedApp, "bob", answers=["n3w"]) as again:
        again.authenticate()


def test_change_password_mismatch(matrix):
    app = matrix.app(ScriptedApp, "bob", answers=["secret", "one", "two"])
    with pytest.raises(pamphlet.PamError):
        app.change_authtoken()
    assert "Passwords do not match" in app.seen
    assert matrix.password_of("bob") == "secret"
    app.end()


def test_user_none_is_bad_item_for_matrix(matrix):
    with matrix.app(ScriptedApp, None) as app:
        with pytest.raises(pamphlet.BadItem):
            app.authenticate()
        assert app.seen == []


@pytest.mark.parametrize("code", sorted(DEBUG_NAMES), ids=lambda c: c.name)
@pytest.mark.parametrize(("kind", "argument", "method"), PHASES, ids=lambda p: str(p))
def test_every_error_code_raises_its_class(make_service, code, kind, argument, method):
    service = make_service(f"{kind} required pam_debug.so {argument}={DEBUG_NAMES[code]}")
    with service.app(ScriptedApp, "bob") as app:
        with pytest.raises(pamphlet.PamError) as info:
            getattr(app, method)()
    assert type(info.value) is pamphlet.error_class(code)
    assert type(info.value).__name__ != "PamError"
    assert info.value.code == code
    assert str(info.value) == _strerror(code)


def _strerror(code):
    import ctypes

    libpam = ctypes.CDLL("libpam.so.0")
    libpam.pam_strerror.restype = ctypes.c_char_p
    libpam.pam_strerror.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return libpam.pam_strerror(None, code).decode()


@pytest.mark.parametrize(("kind", "argument", "method"), PHASES, ids=lambda p: str(p))
def test_every_phase_succeeds_and_is_visible_to_module(make_service, kind, argument, method):
    service = make_service(f"{kind} required pam_debug.so {argument}=success")
    with service.app(ScriptedApp, "bob") as app:
        getattr(app, method)()
        assert app.seen == [f"{argument}=success"]


def test_ignore_everywhere_is_permission_denied(make_service):
    service = make_service("auth required pam_debug.so auth=ignore")
    with service.app(ScriptedApp, "bob") as app, pytest.raises(pamphlet.PermissionDenied):
        app.authenticate()


def test_permit_and_deny(make_service):
    service = make_service("auth required pam_permit.so\naccount required pam_deny.so")
    with service.app(ScriptedApp, "bob") as app:
        app.authenticate()
        with pytest.raises(pamphlet.AuthenticationError):  # pam_deny's code for every type
            app.account_management()


@pytest.mark.parametrize(
    ("keywords", "method", "expected"),
    [
        ({"silent": True}, "authenticate", pamphlet.Flag.SILENT),
        ({"disallow_null_authtoken": True}, "authenticate", pamphlet.Flag.DISALLOW_NULL_AUTHTOK),
        ({"silent": True}, "open_session", pamphlet.Flag.SILENT),
    ],
)
def test_silent_flag_reaches_modules(make_service, keywords, method, expected):
    # pam_echo says nothing under PAM_SILENT (it returns PAM_IGNORE instead).
    kind = "session" if method == "open_session" else "auth"
    service = make_service(f"{kind} optional pam_echo.so hello\n{kind} required pam_permit.so")
    with service.app(ScriptedApp, "bob") as app:
        getattr(app, method)(**keywords)
        if expected & pamphlet.Flag.SILENT:
            assert app.seen == []
        else:
            assert app.seen == ["hello"]
        getattr(app, method)()
        assert app.seen[-1] == "hello"


def test_change_expired_authtoken_flag(make_service):
    # pam_stress changes a token under PAM_CHANGE_EXPIRED_AUTHTOK only if it
    # has expired ("expired"); otherwise it has nothing to ask.
    fresh = make_service("password required pam_stress.so", name="fresh")
    with fresh.app(ScriptedApp, "bob", answers=["x", "x"]) as app:
        app.change_authtoken(change_expired_authtoken=True)
        assert app.seen == []
        app.change_authtoken()
        assert app.seen[0] == "Changing STRESS password for bob."
    expired = make_service("password required pam_stress.so expired", name="expired")
    with expired.app(ScriptedApp, "bob", answers=["x", "x"]) as app:
        app.change_authtoken(change_expired_authtoken=True)
        assert [m for m in app.seen if m.is_prompt] == [
            "Enter new STRESS password: ",
            "Retype new STRESS password: ",
        ]


def test_get_user_prompts_through_conversation(make_service):
    service = make_service("auth required pam_permit.so")
    with service.app(ScriptedApp, None, answers=["zoe"]) as app:
        assert app.get_user("Who are you? ") == "zoe"
        assert app.seen == ["Who are you? "]
        assert app.seen[0].style == pamphlet.PAM_PROMPT_ECHO_ON
        assert app.user == "zoe"
        assert app.get_user() == "zoe"  # set now: no second question
        assert len(app.seen) == 1


def test_user_prompt_item_is_used_by_get_user(make_service):
    service = make_service("auth required pam_permit.so")
    with service.app(ScriptedApp, None, answers=["zoe"]) as app:
        app.user_prompt = "Name please: "
        assert app.get_user() == "zoe"
        assert app.seen == ["Name please: "]


def test_missing_service_falls_back_to_other(make_service):
    service = make_service("auth required pam_deny.so", name="other")
    with ScriptedApp("nosuch", "bob", confdir=service.confdir) as app:
        with pytest.raises(pamphlet.AuthenticationError):
            app.authenticate()


def test_start_fails_without_service_or_other(tmp_path):
    with pytest.raises(pamphlet.Abort) as info:
        ScriptedApp("nosuch", "bob", confdir=str(tmp_path))
    assert "pam_start" in str(info.value)


def test_unknown_module(make_service):
    service = make_service("auth required /nonexistent/pam_nothing.so")
    with service.app(ScriptedApp, "bob") as app, pytest.raises(pamphlet.ModuleUnknown):
        app.authenticate()


def test_system_service_without_confdir():
    # /etc/pam.d/other exists on every Debian machine.
    app = pamphlet.PamApplication("pamphlet-no-such-service", "nobody")
    assert app.service == "pamphlet-no-such-service"
    app.end()
