"""The handle's life: end(), context managers, garbage collection, errors after end."""

from __future__ import annotations

import gc
import pickle
import warnings

import pytest

import pamphlet
from conftest import ScriptedApp, run_python

DEBUG_STACK = (
    "auth required pam_debug.so auth=success cred=success\n"
    "session required pam_debug.so open_session=success close_session=success"
)


@pytest.fixture
def exec_service(make_service, tmp_path):
    """A session stack whose pam_exec script logs each PAM_TYPE it runs for."""
    marker = tmp_path / "marker"
    script = tmp_path / "log-type.sh"
    script.write_text(f'#!/bin/sh\necho "$PAM_TYPE $PAM_USER" >> {marker}\n')
    script.chmod(0o755)
    service = make_service(f"auth required pam_permit.so\nsession required pam_exec.so {script}")
    service.marker = marker
    return service


def test_end_closes_open_session_and_deletes_credentials(make_service):
    service = make_service(DEBUG_STACK)
    app = service.app(ScriptedApp, "bob")
    app.initialize_credentials()
    app.open_session()
    assert app.seen == ["cred=success", "open_session=success"]
    app.end()
    # close_session first, then setcred(PAM_DELETE_CRED), as login(1) does.
    assert app.seen[2:] == ["close_session=success", "cred=success"]
    assert app.ended


def test_end_does_not_repeat_what_was_done(make_service):
    service = make_service(DEBUG_STACK)
    app = service.app(ScriptedApp, "bob")
    app.initialize_credentials()
    app.open_session()
    app.close_session()
    app.delete_credentials()
    seen = list(app.seen)
    app.end()
    assert app.seen == seen


def test_pam_exec_proves_session_closed_by_end(exec_service):
    app = exec_service.app(ScriptedApp, "bob")
    app.open_session()
    app.end()
    assert exec_service.marker.read_text().split("\n")[:2] == [
        "open_session bob",
        "close_session bob",
    ]


def test_context_manager_ends(exec_service):
    with exec_service.app(ScriptedApp, "bob") as app:
        app.open_session()
    assert app.ended
    assert "close_session bob" in exec_service.marker.read_text()


def test_context_manager_ends_on_exception(exec_service):
    with pytest.raises(ZeroDivisionError), exec_service.app(ScriptedApp, "bob") as app:
        app.open_session()
        1 / 0  # noqa: B018
    assert app.ended
    assert "close_session bob" in exec_service.marker.read_text()


def test_end_is_idempotent_and_everything_after_raises(make_service):
    service = make_service(DEBUG_STACK)
    app = service.app(ScriptedApp, "bob")
    app.end()
    app.end()
    calls = [
        app.authenticate,
        app.account_management,
        app.acct_mgmt,
        app.open_session,
        app.close_session,
        app.change_authtoken,
        app.initialize_credentials,
        app.delete_credentials,
        app.reinitialize_credentials,
        app.refresh_credentials,
        app.get_user,
        lambda: app.user,
        lambda: setattr(app, "tty", "x"),
        lambda: app.environ["A"],
        lambda: len(app.environ),
        lambda: app.xauthdata,
        lambda: setattr(app, "fail_delay", None),
    ]
    for call in calls:
        with pytest.raises(pamphlet.HandleEndedError, match="ended"):
            call()
    assert repr(app) == "<ScriptedApp (ended)>"


def test_garbage_collected_app_ends_with_resource_warning(exec_service):
    app = exec_service.app(ScriptedApp, "bob")
    app.open_session()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del app
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)
    assert "close_session bob" in exec_service.marker.read_text()


def test_garbage_collected_app_in_a_cycle_is_ended_without_conversing(make_service):
    # A finalizer runs at the collector's whim, on whatever thread: the user
    # cannot be there to answer, so the conversation is not called.
    service = make_service(DEBUG_STACK)
    seen = []

    class App(pamphlet.PamApplication):
        def conversation(self, messages):
            seen.extend(messages)
            return [""] * len(messages)

    app = service.app(App, "bob")
    app.open_session()
    app.cycle = app  # only the cyclic collector can free it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del app
        gc.collect()
    assert seen == ["open_session=success"]
    assert gc.garbage == []


def test_failed_construction_leaves_nothing_behind(tmp_path):
    before = len(pamphlet.conversation._conversants)
    for _ in range(3):
        with pytest.raises(pamphlet.Abort):
            ScriptedApp("missing", "bob", confdir=str(tmp_path))
    assert len(pamphlet.conversation._conversants) == before


def test_errors_pickle_and_carry_code():
    error = pamphlet.UserUnknown("User not known to the underlying authentication module")
    assert error.code == 10
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is pamphlet.UserUnknown and copy.code == 10 and str(copy) == str(error)


def test_interpreter_exit_with_open_handle_is_clean(exec_service):
    code = f"""
    import pamphlet
    class App(pamphlet.PamApplication):
        def conversation(self, messages):
            return [""] * len(messages)
    app = App({exec_service.name!r}, "bob", confdir={exec_service.confdir!r})
    app.open_session()
    print("opened")
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "close_session bob" in exec_service.marker.read_text()


def test_no_confdir_support_message_is_clear(monkeypatch, exec_service):
    from pamphlet import _libpam

    monkeypatch.setattr(_libpam, "_pam_start_confdir", None)
    with pytest.raises(NotImplementedError, match="pam_start_confdir"):
        exec_service.app(ScriptedApp, "bob")


def test_default_confdir_for_code_that_creates_apps_itself(exec_service):
    with exec_service.as_default():
        app = ScriptedApp(exec_service.name, "bob")
        app.open_session()
        app.end()
    assert pamphlet.PamApplication.default_confdir is None
    assert "open_session bob" in exec_service.marker.read_text()


@pytest.mark.parametrize("reentry", ["end", "authenticate", "open_session", "get_user"])
def test_conversation_cannot_reenter_libpam(matrix, reentry):
    class App(pamphlet.PamApplication):
        def conversation(self, messages):
            getattr(self, reentry)()
            return ["secret"]

    app = matrix.app(App, "bob")
    with pytest.raises(pamphlet.ConversationError) as info:
        app.authenticate()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "inside the conversation" in str(info.value.__cause__)
    assert not app.ended
    app.user = "alice"  # the handle is intact and usable
    app.end()
    assert app.ended
