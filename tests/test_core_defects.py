"""The defects a review found in the core, tried as an attacker would: one test each.

Each ran against the real libpam, and each failed before the core was
reshaped (issue 9). Cases that once crashed the interpreter run in a
subprocess of their own.
"""

from __future__ import annotations

import json
import threading

import pytest

import pamphlet
from conftest import ScriptedApp, run_python
from hostile_module import Call, read_record

ITEM_PROBE = """
import json, sys
import pamphlet
from pamphlet.testing import TemporaryService

results = {}
with TemporaryService("auth required pam_permit.so") as service:
    app = pamphlet.PamApplication(service.name, "bob", confdir=service.confdir)
    for item in (pamphlet.Item.CONV, pamphlet.Item.FAIL_DELAY, pamphlet.Item.XAUTHDATA, 99):
        for action in ("get", "set"):
            try:
                if action == "get":
                    app.get_item(item)
                else:
                    app.set_item(item, "x" * 64)
                results[f"{action} {int(item)}"] = "accepted"
            except ValueError as exc:
                results[f"{action} {int(item)}"] = str(exc)
    app.end()
print(json.dumps(results))
"""


def test_defect1_get_item_and_set_item_refuse_items_that_are_not_strings():
    # libpam would read a Python buffer as a struct pam_conv or a function
    # pointer: a segfault, or a pointer leaked to the caller.
    proc = run_python(ITEM_PROBE)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for key, outcome in results.items():
        assert outcome != "accepted", key
    assert "CONV is not a string item" in results["set 5"]
    assert "FAIL_DELAY is not a string item" in results["get 10"]
    assert "xauthdata" in results["get 12"]
    assert "99 is not a PAM item" in results["set 99"]


SIGINT_PROBE = """
import sys
import pamphlet
from pamphlet.testing import TemporaryService

stack = sys.argv[1]

class App(pamphlet.PamApplication):
    def conversation(self, messages):
        return ["secret" for message in messages]

with TemporaryService(stack) as service:
    app = App(service.name, "bob", confdir=service.confdir)
    try:
        app.authenticate()
        print("outcome: success")
    except KeyboardInterrupt:
        print("outcome: KeyboardInterrupt")
    except BaseException as exc:
        print("outcome:", type(exc).__name__)
    app.end()
    print("ended:", app.ended)
"""


def interrupting_stack(scripted, tmp_path):
    """pam_exec's script sends SIGINT to the application while libpam is in C,
    then a module asks; returns the stack and the module's record."""
    script = tmp_path / "interrupt.sh"
    script.write_text("#!/bin/sh\nkill -INT $PPID\nsleep 0.2\n")
    script.chmod(0o755)
    line, record = scripted.line([Call([(1, b"Password: ")], expect=[b"secret"])])
    return f"auth required pam_exec.so {script}\n{line}\n", record


def test_defect2_sigint_as_libpam_calls_the_conversation_is_conv_err_and_keyboardinterrupt(
    scripted, tmp_path
):
    # Python sees the signal at the first bytecode it runs: the conversation
    # callback that the next module calls. It must not reach ctypes (which
    # would print "Exception ignored" and hand the module an undefined code).
    stack, record = interrupting_stack(scripted, tmp_path)
    for _ in range(3):  # the signal's timing is the kernel's: try it a few times
        proc = run_python(SIGINT_PROBE, stack)
        assert "Exception ignored" not in proc.stderr, proc.stderr
        assert "outcome: KeyboardInterrupt" in proc.stdout, proc.stdout + proc.stderr
        assert "ended: True" in proc.stdout
    calls = read_record(record).calls
    assert calls and all(call.rc == 19 for call in calls)  # PAM_CONV_ERR, every time


def test_defect3_set_input_after_abort_is_refused_and_the_phase_fails(matrix):
    for _ in range(20):  # the window is before the phase thread wakes
        app = pamphlet.ThreadedPamApplication(matrix.name, "bob", confdir=matrix.confdir)
        thread = app.authenticate()
        assert app.get_data(timeout=30) == ["Password: "]
        app.abort()
        with pytest.raises(pamphlet.ConversationStateError, match="aborted"):
            app.set_input(["secret"])  # the right password, too late
        outcome = app.get_data(timeout=30)
        assert isinstance(outcome, pamphlet.ConversationError)
        thread.join(10)
        app.end()


def test_defect3_set_input_while_end_aborts_is_refused(matrix):
    app = pamphlet.ThreadedPamApplication(matrix.name, "bob", confdir=matrix.confdir)
    thread = app.authenticate()
    assert app.get_data(timeout=30) == ["Password: "]
    ender = threading.Thread(target=app.end)
    ender.start()
    ender.join(10)
    with pytest.raises(pamphlet.ConversationStateError):
        app.set_input(["secret"])
    thread.join(10)
    assert app.ended


def test_defect4_a_session_opened_while_the_conversation_failed_is_closed_by_end(
    make_service, tmp_path
):
    marker = tmp_path / "types"
    script = tmp_path / "mark.sh"
    script.write_text(f'#!/bin/sh\necho "$PAM_TYPE" >> {marker}\n')
    script.chmod(0o755)
    # pam_echo is optional: libpam opens the session although our
    # conversation raised during it.
    service = make_service(
        f"session optional pam_echo.so hello\nsession required pam_exec.so {script}\n"
        "auth required pam_permit.so"
    )

    class Raising(pamphlet.PamApplication):
        def conversation(self, messages):
            raise LookupError("the client went away")

    app = service.app(Raising, "bob")
    with pytest.raises(pamphlet.ConversationError):
        app.open_session()
    assert marker.read_text().split() == ["open_session"]
    app.end()
    assert marker.read_text().split() == ["open_session", "close_session"]


def test_defect4_credentials_established_while_the_conversation_failed_are_deleted(
    make_service, scripted
):
    line, record = scripted.line(
        [Call([(4, b"hello")], expect=[None])], kind="auth", control="optional"
    )
    service = make_service(f"{line}\nauth required pam_permit.so")

    class Raising(pamphlet.PamApplication):
        def conversation(self, messages):
            raise LookupError("broken")

    app = service.app(Raising, "bob")
    with pytest.raises(pamphlet.ConversationError):
        app.initialize_credentials()
    app.end()
    # setcred ran twice: ESTABLISH, then DELETE from end()
    flags = read_record(record).flags
    assert [f & int(pamphlet.Flag.DELETE_CRED) for f in flags] == [
        0,
        int(pamphlet.Flag.DELETE_CRED),
    ]


LYING_STR = """
import sys
import pamphlet
from pamphlet.testing import TemporaryService

class LyingBytes(bytes):
    def __contains__(self, item):
        return False

class LyingStr(str):
    def encode(self, *args, **kwargs):
        return LyingBytes(b"sec\\0ret")

class App(pamphlet.PamApplication):
    def conversation(self, messages):
        return [LyingStr("sec\\0ret") for m in messages]

with TemporaryService(users={"bob": "sec"}) as service:
    app = App(service.name, "bob", confdir=service.confdir)
    try:
        app.authenticate()
        print("LOGGED IN")
    except pamphlet.PamError as exc:
        print(type(exc).__name__, type(exc.__cause__).__name__)
    app.end()
"""


def test_defect5_a_lying_str_subclass_cannot_smuggle_a_nul_past_the_checks():
    # Password "sec": a secret cut at the NUL would log in.
    proc = run_python(LYING_STR)
    assert proc.returncode == 0, proc.stderr
    assert "LOGGED IN" not in proc.stdout
    assert proc.stdout.split() == ["ConversationError", "ValueError"]


def test_defect7_get_user_that_raises_keeps_the_status_end_passes_to_pam_end(
    make_service, scripted
):
    line, record = scripted.line([])
    service = make_service(f"{line}\nauth required pam_deny.so")

    class Raising(ScriptedApp):
        def conversation(self, messages):
            raise LookupError("no user name to give")

    app = service.app(Raising, "bob")
    with pytest.raises(pamphlet.AuthenticationError):
        app.authenticate()
    app.user = None
    with pytest.raises(pamphlet.ConversationError):
        app.get_user()
    app.end()
    # pam_end gets the last phase's status (PAM_AUTH_ERR), not get_user's.
    assert read_record(record).end_status == [int(pamphlet.ReturnCode.AUTH_ERR)]


def test_disallow_null_authtoken_reaches_the_module(make_service, scripted):
    line, record = scripted.line([])
    service = make_service(line)
    with service.app(ScriptedApp, "bob") as app:
        app.authenticate(disallow_null_authtoken=True)
        app.authenticate()
    flags = read_record(record).flags
    assert flags == [int(pamphlet.Flag.DISALLOW_NULL_AUTHTOK), 0]


def test_pytest_plugin_and_testing_do_not_load_libpam():
    code = (
        "import sys, pamphlet.pytest_plugin, pamphlet.testing\n"
        "print('pamphlet._libpam' in sys.modules, 'ctypes' in sys.modules)"
    )
    proc = run_python(code)
    assert proc.stdout.split() == ["False", "False"], proc.stderr
    proc = run_python(
        "import sys, pamphlet; pamphlet.PamApplication; print('pamphlet._libpam' in sys.modules)"
    )
    assert proc.stdout.strip() == "True", proc.stderr


def test_each_string_item_property_documents_itself():
    docs = {
        name: getattr(pamphlet.PamApplication, name).__doc__ for name in ("rhost", "tty", "user")
    }
    assert docs["rhost"] == "The host the user connects from."
    assert len(set(docs.values())) == 3
