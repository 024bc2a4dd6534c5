"""ThreadedPamApplication: phases on their own threads, driven by get_data / set_input."""

from __future__ import annotations

import gc
import logging
import pathlib
import re
import threading
import warnings

import paramiko
import pytest

import pamphlet
from conftest import (
    readme_example,
    run_python,
    settled_thread_count,
    wait_for_thread_count,
)
from pamphlet import ThreadedPamApplication

DOCUMENT = pathlib.Path(__file__).parent.parent / "docs" / "api-document.md"


def start(service, user="bob", **kwargs):
    return service.app(ThreadedPamApplication, user, **kwargs)


def test_document_flow_right_password(matrix):
    baseline = settled_thread_count()
    app = start(matrix)
    thread = app.authenticate()
    assert isinstance(thread, threading.Thread) and thread.is_alive()
    data = app.get_data()
    assert data == ["Password: "]
    assert data[0].wants_password
    app.set_input(["secret"])
    assert app.get_data() is None
    thread.join(10)
    assert not thread.is_alive()
    app.end()
    assert wait_for_thread_count(baseline) == baseline


def test_document_flow_wrong_password(matrix):
    app = start(matrix)
    thread = app.authenticate()
    app.get_data()
    app.set_input(["wrong"])
    data = app.get_data()
    assert isinstance(data, pamphlet.AuthenticationError)
    thread.join(10)
    assert not thread.is_alive()
    # the outcome stays until the next phase: asking again is no success
    assert app.get_data() is data
    app.end()


def test_all_messages_of_a_call_come_in_order_with_info_answered_empty(make_service):
    service = make_service(
        "auth required pam_echo.so Welcome %u\n"
        "auth required {pam_matrix} passdb={passdb} verbose\n",
        users={"bob": "secret"},
    )
    app = start(service)
    thread = app.authenticate()
    seen = []
    data = app.get_data()
    while isinstance(data, list):
        seen.extend((str(m), m.style) for m in data)
        app.set_input(["secret" if m.is_prompt else "" for m in data])
        data = app.get_data()
    assert data is None
    thread.join(10)
    assert seen == [
        ("Welcome bob", pamphlet.PAM_TEXT_INFO),
        ("Password: ", pamphlet.PAM_PROMPT_ECHO_OFF),
        ("Authentication succeeded", pamphlet.PAM_TEXT_INFO),
    ]
    app.end()


def test_timeout_is_never_success(make_service, libpam_gate):
    service = make_service(
        libpam_gate.line() + "\nauth required {pam_matrix} passdb={passdb}",
        users={"bob": "secret"},
    )
    app = start(service)
    thread = app.authenticate()
    libpam_gate.wait_entered()
    with pytest.raises(TimeoutError):
        app.get_data(timeout=0.05)
    libpam_gate.open()
    assert app.get_data(timeout=30) == ["Password: "]
    app.set_input(["wrong"])
    assert isinstance(app.get_data(timeout=30), pamphlet.AuthenticationError)
    thread.join(10)
    app.end()


def test_timeout_while_libpam_sleeps_its_failure_delay(make_service):
    service = make_service(
        "auth required pam_faildelay.so delay=1000000\nauth required {pam_matrix} passdb={passdb}",
        users={"bob": "secret"},
    )
    app = start(service)
    thread = app.authenticate()
    app.get_data()
    app.set_input(["wrong"])
    # libpam sleeps on the phase's thread before the failure is known
    with pytest.raises(TimeoutError):
        app.get_data(timeout=0.05)
    assert isinstance(app.get_data(timeout=30), pamphlet.AuthenticationError)
    thread.join(10)
    app.end()


def test_abort_releases_the_conversation_and_the_thread(matrix):
    baseline = settled_thread_count()
    app = start(matrix)
    thread = app.authenticate()
    assert app.get_data() == ["Password: "]
    app.abort()
    thread.join(10)
    assert not thread.is_alive()
    data = app.get_data()
    assert isinstance(data, pamphlet.ConversationError)
    assert isinstance(data.__cause__, pamphlet.ConversationAborted)
    with pytest.raises(pamphlet.ConversationStateError):
        app.set_input(["secret"])  # too late: nothing is pending any more
    # the handle is still good: a new attempt works, then it ends
    thread = app.authenticate()
    app.get_data()
    app.set_input(["secret"])
    assert app.get_data() is None
    app.end()
    assert app.ended
    assert wait_for_thread_count(baseline) == baseline


def test_abort_before_the_conversation_fails_it_when_it_comes(make_service, libpam_gate):
    service = make_service(
        libpam_gate.line() + "\nauth required {pam_matrix} passdb={passdb}",
        users={"bob": "secret"},
    )
    app = start(service)
    thread = app.authenticate()
    libpam_gate.wait_entered()
    app.abort()
    libpam_gate.open()
    assert isinstance(app.get_data(timeout=30), pamphlet.ConversationError)
    thread.join(10)
    app.end()


def test_end_aborts_a_pending_conversation(matrix):
    baseline = settled_thread_count()
    app = start(matrix)
    thread = app.authenticate()
    app.get_data()
    app.end()
    assert not thread.is_alive()
    assert app.ended
    assert isinstance(app.get_data(), pamphlet.ConversationError)
    with pytest.raises(pamphlet.HandleEndedError):
        app.authenticate()
    assert wait_for_thread_count(baseline) == baseline


def test_conversation_timeout_releases_an_unanswered_call(matrix):
    app = start(matrix, conversation_timeout=0.1)
    thread = app.authenticate()
    assert app.get_data() == ["Password: "]
    thread.join(30)
    data = app.get_data()
    assert isinstance(data, pamphlet.ConversationError)
    assert "no answer came within 0.1 s" in str(data.__cause__)
    app.end()


def test_set_input_errors_are_clear_and_leave_the_call_pending(matrix):
    app = start(matrix)
    with pytest.raises(pamphlet.ConversationStateError, match="no phase has been started"):
        app.get_data()
    thread = app.authenticate()
    app.get_data()
    with pytest.raises(ValueError, match="2 answers for 1 messages"):
        app.set_input(["secret", "more"])
    with pytest.raises(TypeError, match="not a string"):
        app.set_input("secret")
    assert app.get_data() == ["Password: "]  # still waiting, same question
    app.set_input(["secret"])
    assert app.get_data() is None
    with pytest.raises(pamphlet.ConversationStateError, match="no conversation is waiting"):
        app.set_input(["secret"])
    thread.join(10)
    app.end()


def test_a_bad_answer_fails_closed(matrix):
    app = start(matrix)
    app.authenticate()
    app.get_data()
    app.set_input(["sec\0ret"])
    data = app.get_data()
    assert isinstance(data, pamphlet.ConversationError)
    assert "NUL" in str(data.__cause__)
    app.end()


def test_a_second_phase_while_one_runs_is_refused(matrix):
    app = start(matrix)
    app.authenticate()
    app.get_data()
    with pytest.raises(pamphlet.HandleBusyError, match="already running"):
        app.account_management()
    with pytest.raises(pamphlet.HandleBusyError, match="already running"):
        app.change_authtoken()
    app.set_input(["secret"])
    assert app.get_data() is None
    # once the outcome is out, the next phase may start at once
    assert app.account_management() is None
    thread = app.authenticate()
    assert app.get_data() == ["Password: "]
    app.set_input(["secret"])
    assert app.get_data() is None
    thread.join(10)
    app.end()


def test_items_and_environ_while_the_conversation_waits(matrix):
    app = start(matrix)
    app.authenticate()
    app.get_data()
    # the phase thread is parked in the conversation: the handle is lent
    assert app.user == "bob"
    app.rhost = "client.example"
    app.environ["LOGIN_FROM"] = "ssh"
    app.set_input(["secret"])
    assert app.get_data() is None
    assert app.rhost == "client.example"
    assert app.environ["LOGIN_FROM"] == "ssh"
    app.end()


def test_items_while_the_phase_is_inside_libpam_raise_at_once(make_service, libpam_gate):
    service = make_service(libpam_gate.line() + "\nauth required pam_permit.so")
    app = start(service)
    thread = app.authenticate()
    libpam_gate.wait_entered()
    with pytest.raises(pamphlet.HandleBusyError):
        app.user  # noqa: B018
    with pytest.raises(pamphlet.HandleBusyError):
        app.environ["X"] = "1"
    libpam_gate.open()
    assert app.get_data(timeout=30) is None
    thread.join(10)
    assert app.user == "bob"
    app.end()


def test_only_authenticate_change_authtoken_and_get_user_return_threads(matrix):
    app = start(matrix)
    thread = app.authenticate()
    assert isinstance(thread, threading.Thread)
    app.get_data()
    app.set_input(["secret"])
    assert app.get_data() is None
    thread.join(10)
    # The other phases are plain calls, as the API document's code expects.
    assert app.acct_mgmt() is None
    assert app.initialize_credentials() is None
    assert app.open_session() is None
    assert app.environ["HOMEDIR"] == "/home/bob"
    assert "CRED" in app.environ
    assert app.close_session() is None
    assert "HOMEDIR" not in app.environ
    app.end()


def test_threaded_account_management_after_login_raises_for_a_refused_account(make_service):
    # Code written from the API document: join the login thread, then ask the
    # account. A refused account must raise there, not hand back a thread.
    service = make_service(users={"bob": "secret"})
    service.add_service(
        "other-service", "auth required {pam_matrix} passdb={passdb}\naccount required pam_deny.so"
    )
    app = pamphlet.ThreadedPamApplication("other-service", "bob", confdir=service.confdir)
    thread = app.authenticate()
    assert isinstance(thread, threading.Thread)
    assert app.get_data() == ["Password: "]
    app.set_input(["secret"])
    assert app.get_data() is None
    thread.join(10)
    with pytest.raises(pamphlet.AuthenticationError):
        app.account_management()
    app.end()


def test_threaded_plain_phase_keeps_messages_for_the_server_to_relay(make_service):
    service = make_service(
        "session required pam_echo.so opening for %u\nauth required pam_permit.so"
    )
    app = pamphlet.ThreadedPamApplication(service.name, "bob", confdir=service.confdir)
    assert app.open_session() is None
    assert app.pop_messages() == ["opening for bob"]
    assert app.pop_messages() == []
    app.end()


def test_threaded_plain_phase_fails_closed_on_a_prompt_and_names_it(make_service, scripted):
    from hostile_module import Call

    line, _ = scripted.line(
        [Call([(1, b"One-time code: ")], expect=[b"x"])], kind="account", control="optional"
    )
    service = make_service(f"{line}\naccount required pam_permit.so")
    app = pamphlet.ThreadedPamApplication(service.name, "bob", confdir=service.confdir)
    # optional + permit: only pamphlet can make this fail; it must, and at once.
    with pytest.raises(pamphlet.ConversationError) as caught:
        app.account_management()
    cause = caught.value.__cause__
    assert isinstance(cause, pamphlet.UnansweredPromptError)
    assert cause.prompt == "One-time code: " and "One-time code" in str(cause)
    app.end()


def test_threaded_subclass_with_a_conversation_answers_plain_phases(make_service, scripted):
    from hostile_module import Call, read_record

    line, record = scripted.line([Call([(1, b"Code: ")], expect=[b"42"])], kind="account")
    service = make_service(line)

    class Answering(pamphlet.ThreadedPamApplication):
        def conversation(self, messages):
            return ["42" for _ in messages]

    app = Answering(service.name, "bob", confdir=service.confdir)
    assert app.account_management() is None
    assert read_record(record).mismatches == []
    app.end()


def test_change_authtoken_converses_through_get_data(matrix):
    app = start(matrix)
    thread = app.change_authtoken()
    asked = []
    data = app.get_data()
    answers = {"Old password: ": "secret", "New Password :": "n3w", "Verify New Password :": "n3w"}
    while isinstance(data, list):
        asked.extend(data)
        app.set_input([answers[m] for m in data])
        data = app.get_data()
    assert data is None, data
    thread.join(10)
    assert asked == list(answers)
    assert matrix.password_of("bob") == "n3w"
    app.end()


def test_get_user_asks_through_get_data(make_service):
    service = make_service("auth required pam_permit.so")
    app = service.app(ThreadedPamApplication)
    thread = app.get_user("Who? ")
    assert app.get_data() == ["Who? "]
    app.set_input(["carol"])
    assert app.get_data() is None
    thread.join(10)
    assert app.user == "carol"
    app.end()


def test_end_does_not_converse_but_closes_the_session(make_service, tmp_path):
    marker = tmp_path / "closed"
    service = make_service(
        "auth required pam_permit.so\n"
        "session required pam_echo.so closing\n"
        f"session required pam_exec.so /bin/touch {marker}\n"
    )
    app = start(service)
    app.open_session()
    assert app.pop_messages() == ["closing"]  # open_session says it too, kept to relay
    app.end()  # pam_echo cannot speak now; the close still runs pam_exec
    assert marker.exists()


def test_a_forgotten_application_is_ended_by_the_collector(matrix):
    app = start(matrix)
    thread = app.authenticate()
    app.get_data()
    app.set_input(["secret"])
    assert app.get_data() is None
    thread.join(10)
    del thread
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del app
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)


def test_many_threaded_logins_leave_no_thread_behind(matrix):
    baseline = settled_thread_count()
    apps = [start(matrix) for _ in range(50)]
    threads = [app.authenticate() for app in apps]
    for index, app in enumerate(apps):
        assert app.get_data(timeout=30) == ["Password: "]
        app.set_input(["secret" if index % 2 else "nope"])
    for index, app in enumerate(apps):
        outcome = app.get_data(timeout=30)
        if index % 2:
            assert outcome is None
        else:
            assert isinstance(outcome, pamphlet.AuthenticationError)
        app.end()
    assert not any(thread.is_alive() for thread in threads)
    assert wait_for_thread_count(baseline) == baseline


# -- the API document's SshAuthInterface, as written, with the real paramiko ----------


def document_ssh_interface():
    (block,) = [
        b
        for b in re.findall(r"```python\n(.*?)```", DOCUMENT.read_text(), re.S)
        if "class SshAuthInterface" in b
    ]
    namespace = {"paramiko": paramiko, "pamphlet": pamphlet, "logging": logging}
    exec(block, namespace)
    return namespace["SshAuthInterface"]


@pytest.mark.parametrize(("password", "expected"), [("secret", 0), ("nope", 1)])
def test_document_ssh_interface_as_written(matrix, password, expected):
    SshAuthInterface = document_ssh_interface()
    with matrix.as_default():
        interface = SshAuthInterface(matrix.name)
        assert interface.get_allowed_auths("bob") == "keyboard-interactive"
        query = interface.check_auth_interactive("bob", "")
        assert isinstance(interface.pam, pamphlet.PamApplication)  # "the subclass"
        assert isinstance(query, paramiko.server.InteractiveQuery)
        assert query.prompts == [("Password: ", False)]  # echo off for a password
        result = interface.check_auth_interactive_response([password])
    assert result == [paramiko.AUTH_SUCCESSFUL, paramiko.AUTH_FAILED][expected]
    assert not interface.auth_thread.is_alive()
    interface.pam.end()


def test_document_ssh_interface_fails_closed_when_the_stack_fails_at_once(make_service):
    service = make_service("auth required pam_deny.so")
    SshAuthInterface = document_ssh_interface()
    with service.as_default():
        interface = SshAuthInterface(service.name)
        assert interface.check_auth_interactive("bob", "") == paramiko.AUTH_FAILED
    assert not interface.auth_thread.is_alive()
    interface.pam.end()


@pytest.mark.parametrize(("answer", "printed"), [("secret", "logged in"), ("wrong", "refused: ")])
def test_readme_threaded_example(answer, printed):
    block = readme_example("pamphlet.ThreadedPamApplication(")
    proc = run_python(block.replace('["secret" if', f'["{answer}" if'))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(printed)
    if answer == "wrong":
        assert "AuthenticationError" in proc.stdout
