"""pamphlet.authenticate and pamphlet.change_password against real PAM stacks."""

from __future__ import annotations

import secrets

import pytest

import pamphlet
from conftest import UNIX_STACK, run_account_tool
from pamphlet.simple import UnansweredPromptError

MATRIX = (
    "auth required {pam_matrix} passdb={passdb} verbose\n"
    "account required {pam_matrix} passdb={passdb}\n"
    "password required {pam_matrix} passdb={passdb}\n"
)


@pytest.fixture
def login(pam_service_factory):
    service = pam_service_factory(MATRIX, users={"alice": "secret"}, name="webapp")
    service.add_user("mallory", "pw", service="elsewhere")
    return service


def check(service, user, password, **kwargs):
    return pamphlet.authenticate(user, password, service.name, confdir=service.confdir, **kwargs)


def cause_of(error: pytest.ExceptionInfo) -> BaseException | None:
    return error.value.__cause__


# -- authenticate -----------------------------------------------------------------


def test_right_password(login):
    assert check(login, "alice", "secret") is None
    assert check(login, "alice", b"secret") is None


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("nobody", "secret")])
def test_wrong_password_or_user(login, user, password):
    with pytest.raises(pamphlet.AuthenticationError) as error:
        check(login, user, password)
    assert error.value.strerror == "Authentication failure"


def test_account_is_checked_unless_told_not_to(login):
    # pam_matrix knows mallory's password, but not for this service.
    with pytest.raises(pamphlet.PermissionDenied):
        check(login, "mallory", "pw")
    check(login, "mallory", "pw", check_account=False)


@pytest.mark.parametrize(
    ("result", "error"),
    [
        ("new_authtok_reqd", pamphlet.NewAuthTokenRequired),
        ("acct_expired", pamphlet.AccountExpired),
        ("perm_denied", pamphlet.PermissionDenied),
    ],
)
def test_account_failures_are_told_apart(pam_service_factory, result, error):
    service = pam_service_factory(
        "auth required {pam_matrix} passdb={passdb}\n"
        f"account required pam_debug.so acct={result}",
        users={"alice": "secret"},
    )
    with pytest.raises(error) as raised:
        check(service, "alice", "secret")
    assert not isinstance(raised.value, pamphlet.AuthenticationError)


def test_repeated_password_prompt_is_answered(pam_service_factory):
    service = pam_service_factory(
        "auth required {pam_matrix} passdb={passdb}\nauth required {pam_matrix} passdb={passdb}",
        users={"alice": "secret"},
    )
    check(service, "alice", "secret", check_account=False)


def test_second_factor_fails_closed(pam_service_factory):
    # pam_stress asks 'STRESS Password: ' and, being optional here, could not
    # fail the stack itself: only pamphlet refusing to answer makes it fail.
    service = pam_service_factory(
        "auth required {pam_matrix} passdb={passdb}\n"
        "auth optional pam_stress.so\n"
        "auth required pam_permit.so",
        users={"alice": "secret"},
    )
    with pytest.raises(pamphlet.ConversationError) as error:
        check(service, "alice", "secret", check_account=False)
    cause = cause_of(error)
    assert isinstance(cause, UnansweredPromptError)
    assert cause.prompt == "STRESS Password: "
    assert "'STRESS Password: '" in str(error.value)


def test_echo_on_prompt_fails_closed(pam_service_factory):
    service = pam_service_factory(
        "auth required {pam_matrix} passdb={passdb} echo", users={"alice": "secret"}
    )
    with pytest.raises(pamphlet.ConversationError) as error:
        check(service, "alice", "secret")
    assert isinstance(cause_of(error), UnansweredPromptError)
    assert "PROMPT_ECHO_ON" in str(cause_of(error))


def test_messages_and_items(pam_service_factory):
    service = pam_service_factory(
        "auth required pam_echo.so from %H on %t\nauth required pam_permit.so\n"
        "account required pam_permit.so"
    )
    shown: list[pamphlet.Message] = []
    check(service, "alice", "x", rhost="client.example", tty="web", on_message=shown.append)
    assert shown == ["from client.example on web"]
    assert shown[0].style == pamphlet.PAM_TEXT_INFO


def test_ruser_item(pam_service_factory):
    service = pam_service_factory("auth required pam_succeed_if.so quiet ruser = admin")
    with pytest.raises(pamphlet.PamError):
        check(service, "root", "x", check_account=False)
    check(service, "root", "x", ruser="admin", check_account=False)


def test_password_must_be_a_string(login):
    with pytest.raises(TypeError, match="the password must be str or bytes"):
        check(login, "alice", None)


def test_nul_in_password_fails_closed(login):
    with pytest.raises(pamphlet.ConversationError) as error:
        check(login, "alice", "secret\0more")
    assert isinstance(cause_of(error), ValueError)


@pytest.mark.pam_service(users={"alice": "secret"}, name="login", as_default=True)
def test_default_service_is_login(pam_service):
    # The throwaway service is the default confdir's "login", the helper's default.
    pamphlet.authenticate("alice", "secret")
    with pytest.raises(pamphlet.AuthenticationError):
        pamphlet.authenticate("alice", "wrong")


def test_missing_service_raises_at_start(login):
    with pytest.raises(pamphlet.Abort):
        pamphlet.authenticate("alice", "secret", "no-such-service", confdir=login.confdir)


# -- change_password -----------------------------------------------------------------


def test_change_password(login):
    messages: list[pamphlet.Message] = []
    pamphlet.change_password(
        "alice", "secret", "n3w", login.name, confdir=login.confdir, on_message=messages.append
    )
    assert login.password_of("alice") == "n3w"
    check(login, "alice", "n3w")


def test_change_password_wrong_old(login):
    with pytest.raises(pamphlet.AuthenticationError):
        pamphlet.change_password("alice", "nope", "n3w", login.name, confdir=login.confdir)
    assert login.password_of("alice") == "secret"


def test_change_password_through_pam_stress(pam_service_factory):
    # pam_stress asks "Enter new STRESS password: ", then to retype it.
    service = pam_service_factory("password required pam_stress.so")
    messages: list[pamphlet.Message] = []
    pamphlet.change_password(
        "alice", "old", "new", service.name, confdir=service.confdir, on_message=messages.append
    )
    assert messages == ["Changing STRESS password for alice."]


def test_change_password_echo_on_fails_closed(pam_service_factory):
    service = pam_service_factory(
        "password required {pam_matrix} passdb={passdb} echo", users={"alice": "secret"}
    )
    with pytest.raises(pamphlet.ConversationError) as error:
        pamphlet.change_password("alice", "secret", "n", service.name, confdir=service.confdir)
    assert isinstance(cause_of(error), UnansweredPromptError)
    assert service.password_of("alice") == "secret"


@pytest.mark.parametrize(
    ("prompt", "answer"),
    [
        ("Old password: ", "old"),  # pam_matrix
        ("New Password :", "new"),
        ("Verify New Password :", "new"),
        ("Current password: ", "old"),  # pam_unix
        ("New password: ", "new"),
        ("Retype new password: ", "new"),
        ("(current) UNIX password: ", "old"),  # older pam_unix
        ("Enter new STRESS password: ", "new"),  # pam_stress
        ("Retype new STRESS password: ", "new"),
        ("Password: ", None),  # which one? pamphlet does not guess
        ("Verification code: ", None),
    ],
)
def test_change_password_prompt_reading(prompt, answer):
    from pamphlet.simple import _password_for_prompt

    message = pamphlet.Message(prompt, pamphlet.PAM_PROMPT_ECHO_OFF)
    if answer is None:
        with pytest.raises(UnansweredPromptError, match="old or the new"):
            _password_for_prompt(message, "old", "new")
    else:
        assert _password_for_prompt(message, "old", "new") == answer


# -- pam_unix with a throwaway system user (root) --------------------------------------

needs_root = pytest.mark.root  # conftest skips it without root (a failure in CI)


@pytest.fixture
def unix_service(unix_user, pam_service_factory):
    """(service, name, password): the throwaway user behind a pam_unix service."""
    return pam_service_factory(UNIX_STACK, name="unix"), *unix_user


@needs_root
@pytest.mark.root
def test_unix_password_change_when_expired(unix_service):
    service, name, password = unix_service
    pamphlet.authenticate(name, password, service.name, confdir=service.confdir)
    run_account_tool(["chage", "-d", "0", name], check=True)
    with pytest.raises(pamphlet.NewAuthTokenRequired):
        pamphlet.authenticate(name, password, service.name, confdir=service.confdir)
    new = "Nw-" + secrets.token_hex(8)
    pamphlet.change_password(name, password, new, service.name, confdir=service.confdir)
    pamphlet.authenticate(name, new, service.name, confdir=service.confdir)
