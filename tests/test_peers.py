"""What docs/guide/migration.md says of the peers, checked by running them.

python-pam, pamela and JupyterHub's PAMAuthenticator, as installed from PyPI
(the ``test`` extra), against real PAM stacks. They have no ``confdir``:
each test points libpam's ``pam_start``, as the peer calls it, at
``pam_start_confdir`` with the test's directory, and changes nothing else.
Everything from the conversation function to ``pam_end`` is the peer's
released code. If a new release changes what they do, these tests fail and
the migration chapter needs the same change.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import pathlib
import stat

import pam
import pamela
import pytest
from jupyterhub.auth import PAMAuthenticator

import pamphlet
from hostile_module import Call, read_record
from pamphlet.testing import TemporaryService

ECHO_OFF, ECHO_ON, INFO = 1, 2, 4
PAM_SUCCESS = 0
PAM_AUTH_ERR = 7
PAM_CRED_ERR = 17
PAM_NEW_AUTHTOK_REQD = 12
PAM_AUTHINFO_UNAVAIL = 9
PAM_REINITIALIZE_CRED = 0x8

_pam_start_confdir = ctypes.CDLL("libpam.so.0").pam_start_confdir
_pam_start_confdir.restype = ctypes.c_int


@pytest.fixture
def peers_read(monkeypatch):
    """``peers_read(service)``: the peers' pam_start reads ``service.confdir``."""

    def point_at(service: TemporaryService) -> TemporaryService:
        confdir = service.confdir.encode()

        def pam_start(name, user, conversation, handle):
            return _pam_start_confdir(name, user, conversation, confdir, handle)

        monkeypatch.setattr(pamela, "PAM_START", pam_start)
        pam.PamAuthenticator._ensure_libs()
        monkeypatch.setattr(pam.PamAuthenticator, "pam_start", staticmethod(pam_start))
        return service

    return point_at


def code_stack(echo: bool) -> str:
    """A password, then a code from a second pam_matrix file (``echo``: asked echo-on)."""
    option = " echo" if echo else ""
    return (
        "auth required {pam_matrix} passdb={passdb}\n"
        f"auth required {{pam_matrix}} passdb={{passdb}}-codes{option}\n"
        "account required pam_permit.so\n"
    )


def with_codes(service: TemporaryService, codes: dict[str, str]) -> TemporaryService:
    pathlib.Path(service.passdb + "-codes").write_text(
        "".join(f"{user}:{code}:{service.name}\n" for user, code in codes.items())
    )
    return service


# -- python-pam 2.1 -----------------------------------------------------------------


def test_python_pam_checks_the_account_and_cannot_be_told_not_to(peers_read):
    service = peers_read(TemporaryService.expired_password(users={"bob": "pw"}))
    try:
        p = pam.pam()
        assert p.authenticate("bob", "pw", service=service.name) is False
        assert (p.code, p.reason) == (
            PAM_NEW_AUTHTOK_REQD,
            "Authentication token is no longer valid; new one required",
        )
        for function in (pam.authenticate, pam.pam().authenticate):
            assert not {"check", "check_account"} & set(inspect.signature(function).parameters)
    finally:
        service.cleanup()


def test_python_pam_fails_the_login_when_setcred_fails(peers_read, pam_service_factory):
    service = peers_read(
        pam_service_factory(
            "auth required pam_debug.so auth=success cred=cred_err\n"
            "account required pam_permit.so\n"
        )
    )
    p = pam.pam()
    assert p.authenticate("bob", "", service=service.name) is False  # resetcreds=True
    assert p.code == PAM_CRED_ERR
    assert p.authenticate("bob", "", service=service.name, resetcreds=False) is True


def test_python_pam_answers_the_first_echo_off_prompt_of_each_call(peers_read, scripted):
    line, record_path = scripted.line(
        [
            Call([(ECHO_OFF, b"Password: "), (ECHO_OFF, b"Again: "), (ECHO_ON, b"Code: ")]),
            Call([(ECHO_ON, b"Code: ")]),
            Call([(ECHO_OFF, b"Token: ")]),
        ]
    )
    service = peers_read(TemporaryService(line + "\naccount required pam_permit.so"))
    try:
        assert pam.pam().authenticate("bob", "pw", service=service.name) is True
    finally:
        service.cleanup()
    record = read_record(record_path)
    # Every call reports success; only the first message of a call, if echo-off,
    # gets the password; anything else gets NULL, and a later call's echo-off
    # prompt (a token, a code) gets the password again.
    assert [call.rc for call in record.calls[:3]] == [PAM_SUCCESS] * 3
    answers = [[text for text, _code in call.answers] for call in record.calls[:3]]
    assert answers == [[b"pw", None, None], [None], [b"pw"]]
    # Then pam_setcred(PAM_REINITIALIZE_CRED) ran the module again (resetcreds=True).
    assert record.flags == [0, PAM_REINITIALIZE_CRED]


def test_python_pam_gives_the_password_to_pam_oath_and_has_no_way_to_give_a_code(
    peers_read,
):
    service = peers_read(TemporaryService.password_and_totp(users={"bob": "pw"}))
    try:
        p = pam.pam()
        assert p.authenticate("bob", "pw", service=service.name) is False
        assert p.code == PAM_AUTH_ERR
        assert p.messages == ["Password: ", "One-time password (OATH) for `bob': "]
    finally:
        service.cleanup()


def test_python_pam_collects_messages_and_prints_only_its_reason(
    peers_read, pam_service_factory, capsys
):
    service = peers_read(
        pam_service_factory("auth optional pam_echo.so Hello %u\nauth required pam_deny.so\n")
    )
    p = pam.pam()
    assert p.authenticate("bob", "", service=service.name, print_failure_messages=True) is False
    # The module's message is kept in p.messages, not printed;
    # print_failure_messages prints pam_strerror's text of the failure.
    assert p.messages == ["Hello bob"]
    assert capsys.readouterr().out == "Failure: Authentication failure\n"


# -- pamela 1.2 ------------------------------------------------------------------------


def test_pamela_checks_the_account_unless_check_is_false(peers_read):
    service = peers_read(TemporaryService.expired_password(users={"bob": "pw"}))
    try:
        with pytest.raises(pamela.PAMError) as caught:
            pamela.authenticate("bob", "pw", service=service.name)
        assert caught.value.errno == PAM_NEW_AUTHTOK_REQD
        assert pamela.authenticate("bob", "pw", service=service.name, check=False) is None
    finally:
        service.cleanup()


def test_pamela_ignores_a_failing_setcred(peers_read, pam_service_factory):
    service = peers_read(
        pam_service_factory(
            "auth required pam_debug.so auth=success cred=cred_err\n"
            "account required pam_permit.so\n"
        )
    )
    assert pamela.authenticate("bob", "", service=service.name) is None


def test_pamela_answers_echo_off_prompts_in_turn_and_echo_on_with_null(peers_read, scripted):
    line, record_path = scripted.line(
        [
            Call([(ECHO_OFF, b"Password: ")]),
            Call([(ECHO_ON, b"Verification code: "), (INFO, b"hello")]),
            Call([(ECHO_OFF, b"Token: ")]),
        ]
    )
    service = peers_read(TemporaryService(line + "\naccount required pam_permit.so"))
    try:
        assert pamela.authenticate("bob", ["pw", "123456"], service=service.name) is None
    finally:
        service.cleanup()
    record = read_record(record_path)
    # The echo-on prompt got NULL, and the conversation said PAM_SUCCESS; the
    # code went to the next echo-off prompt instead, whatever it asked.
    assert [call.rc for call in record.calls[:3]] == [PAM_SUCCESS] * 3
    answers = [[text for text, _code in call.answers] for call in record.calls[:3]]
    assert answers == [[b"pw"], [None, None], [b"123456"]]
    # Then pam_setcred(PAM_REINITIALIZE_CRED) ran the module again; out of
    # passwords, pamela's conversation returned 1, and pamela ignored the result.
    assert record.flags == [0, PAM_REINITIALIZE_CRED]
    assert record.calls[3].rc == 1


def test_pamela_on_a_password_plus_code_stack(peers_read, pam_service_factory):
    def make(stack: str) -> TemporaryService:
        return pam_service_factory(stack, users={"bob": "pw"})

    # An echo-on code prompt (where codes are usually asked): the code never
    # reaches the module, which fails on the NULL answer with a misleading error.
    service = peers_read(with_codes(make(code_stack(echo=True)), {"bob": "4242"}))
    with pytest.raises(pamela.PAMError) as caught:
        pamela.authenticate("bob", ["pw", "4242"], service=service.name)
    assert caught.value.errno == PAM_CRED_ERR
    assert "Failure setting user credentials" in str(caught.value)
    # The same stack asking the code echo-off: pamela passes it on.
    service = peers_read(with_codes(make(code_stack(echo=False)), {"bob": "4242"}))
    assert pamela.authenticate("bob", ["pw", "4242"], service=service.name) is None
    # One answer short: pamela's conversation fails, and pam_matrix says so.
    with pytest.raises(pamela.PAMError) as caught:
        pamela.authenticate("bob", "pw", service=service.name)
    assert caught.value.errno == PAM_AUTHINFO_UNAVAIL


def test_pamela_gives_pam_oath_its_code_as_the_second_password(peers_read):
    service = peers_read(TemporaryService.password_and_totp(users={"bob": "pw"}))
    try:
        code = service.totp_code("bob")
        assert pamela.authenticate("bob", ("pw", code), service=service.name) is None
        with pytest.raises(pamela.PAMError):  # the same code again: pam_oath refuses
            pamela.authenticate("bob", ("pw", code), service=service.name)
        # No code: pamela's conversation returns 1, which pam_oath passes on,
        # so the user is told libpam's text for 1.
        with pytest.raises(pamela.PAMError) as caught:
            pamela.authenticate("bob", "pw", service=service.name)
        assert caught.value.errno == 1
        assert "Failed to load module" in str(caught.value)
    finally:
        service.cleanup()


def test_pamela_keeps_the_handle_with_close_false(peers_read, pam_service_factory):
    service = peers_read(pam_service_factory(users={"bob": "pw"}))
    handle = pamela.authenticate("bob", "pw", service=service.name, close=False)
    assert isinstance(handle, pamela.PamHandle) and handle.handle
    assert handle.get_item(pamela.PAM_SERVICE) == service.name
    pamela.pam_end(handle)
    with pytest.raises(TypeError):
        pamela.authenticate("bob", "pw", service=service.name, close_txn=False)


def test_pamela_sessions_and_account_checks_each_start_a_new_handle(
    peers_read, pam_service_factory, tmp_path
):
    # pam_exec logs the phase of each call. Each of pamela's functions calls
    # pam_start anew: the session modules never see the handle (and the data
    # modules stored on it) that authenticated.
    log = tmp_path / "calls"
    script = tmp_path / "log.sh"
    script.write_text(f'#!/bin/sh\necho "$PAM_TYPE" >> {log}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    service = peers_read(
        pam_service_factory(
            "auth required {pam_matrix} passdb={passdb}\n"
            f"account required pam_exec.so {script}\n"
            f"session required pam_exec.so {script}\n",
            users={"bob": "pw"},
        )
    )
    starts = []
    original = pamela.PAM_START

    def counting(*args):
        starts.append(args[0])
        return original(*args)

    pamela.PAM_START = counting  # restored by monkeypatch with the redirect
    pamela.authenticate("bob", "pw", service=service.name)
    pamela.check_account("bob", service=service.name)
    pamela.open_session("bob", service=service.name)
    pamela.close_session("bob", service=service.name)
    assert len(starts) == 4
    assert log.read_text().split() == ["account", "account", "open_session", "close_session"]


# -- JupyterHub 6.1's PAMAuthenticator -----------------------------------------------


def hub_login(authenticator: PAMAuthenticator, **data: str) -> str | None:
    async def run() -> str | None:
        return await authenticator.authenticate(None, data)

    return asyncio.run(run())


def test_jupyterhub_check_account_false_still_checks_the_account(peers_read):
    service = peers_read(TemporaryService.expired_password(users={"bob": "pw"}))
    try:
        for check_account in (True, False):
            hub = PAMAuthenticator(service=service.name, check_account=check_account)
            assert hub_login(hub, username="bob", password="pw") is None
    finally:
        service.cleanup()


def test_jupyterhub_checks_the_account_twice_on_two_handles(
    peers_read, pam_service_factory, tmp_path
):
    log = tmp_path / "calls"
    script = tmp_path / "log.sh"
    script.write_text(f'#!/bin/sh\necho "$PAM_TYPE" >> {log}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    service = peers_read(
        pam_service_factory(
            "auth required {pam_matrix} passdb={passdb}\n"
            f"account required pam_exec.so {script}\n",
            users={"bob": "pw"},
        )
    )
    assert hub_login(PAMAuthenticator(service=service.name), username="bob", password="pw") == "bob"
    assert log.read_text().split() == ["account", "account"]
    log.unlink()
    hub = PAMAuthenticator(service=service.name, check_account=False)
    assert hub_login(hub, username="bob", password="pw") == "bob"
    assert log.read_text().split() == ["account"]


def test_jupyterhub_otp_field_reaches_an_echo_off_code_prompt(peers_read):
    service = peers_read(TemporaryService.password_and_totp(users={"bob": "pw"}))
    try:
        hub = PAMAuthenticator(service=service.name)
        assert hub.request_otp is False  # the field is off unless configured
        code = service.totp_code("bob")
        assert hub_login(hub, username="bob", password="pw", otp=code) == "bob"
        assert hub_login(hub, username="bob", password="pw") is None
        assert hub_login(hub, username="bob", password="pw", otp=code) is None  # replay
    finally:
        service.cleanup()


def test_jupyterhub_says_only_none_whatever_the_reason(peers_read, pam_service_factory):
    stack = (
        "auth required {pam_matrix} passdb={passdb}\n"
        "account [success=1 default=ignore] pam_succeed_if.so quiet user != old\n"
        "account required pam_stress.so expired\n"
        "account required pam_permit.so\n"
    )
    service = peers_read(pam_service_factory(stack, users={"bob": "pw", "old": "pw"}))
    hub = PAMAuthenticator(service=service.name)
    assert hub_login(hub, username="bob", password="pw") == "bob"
    # A wrong password and an expired one look the same to the hub.
    assert hub_login(hub, username="bob", password="wrong") is None
    assert hub_login(hub, username="old", password="pw") is None


# -- pamphlet, for contrast ---------------------------------------------------------


def test_pamphlet_tells_apart_what_the_peers_do_not():
    service = TemporaryService.expired_password(users={"bob": "pw"})
    try:
        with pytest.raises(pamphlet.NewAuthTokenRequired):
            pamphlet.authenticate("bob", "pw", service.name, confdir=service.confdir)
        pamphlet.authenticate(
            "bob", "pw", service.name, confdir=service.confdir, check_account=False
        )
    finally:
        service.cleanup()
