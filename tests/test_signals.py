"""Signals while a phase runs on the main thread: one deferring handler, installed once.

pam_exec's script signals the application while libpam is in C; the next
module's conversation is where Python would first run the handler. The
handler's exception must come out of the phase (the module gets
PAM_CONV_ERR), never reach ctypes, and outside phases handlers act at once as
they always did.
"""

from __future__ import annotations

from conftest import run_python
from hostile_module import read_record
from test_core_defects import interrupting_stack

PROBE = """
import os, signal, sys, time
import pamphlet
from pamphlet.testing import TemporaryService

stack, plain = sys.argv[1], sys.argv[2]

class Stop(Exception):
    pass

def stop(signum, frame):
    raise Stop(signum)

class App(pamphlet.PamApplication):
    def conversation(self, messages):
        return ["secret" for message in messages]

with TemporaryService(plain) as first, TemporaryService(stack) as service:
    # The first phase on the main thread puts the deferring handler in place.
    warm = App(first.name, "bob", confdir=first.confdir)
    warm.authenticate()
    warm.end()
    print("sigint handler:", type(signal.getsignal(signal.SIGINT)).__name__)
    # Outside a phase, the handler acts at once, as before.
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        print("outside: nothing")
    except KeyboardInterrupt:
        print("outside: KeyboardInterrupt")
    # A handler installed over pamphlet's after that is held again at the next phase.
    signal.signal(signal.SIGINT, stop)
    app = App(service.name, "bob", confdir=service.confdir)
    try:
        app.authenticate()
        print("outcome: success")
    except pamphlet.ConversationError as exc:  # raised in the conversation: PAM_CONV_ERR
        print("outcome: ConversationError from", type(exc.__cause__).__name__)
    except BaseException as exc:
        print("outcome:", type(exc).__name__)
    app.end()
    print("ended:", app.ended)
"""


def test_a_handler_installed_after_the_first_phase_is_held_too(scripted, tmp_path):
    stack, record = interrupting_stack(scripted, tmp_path)
    for _ in range(3):  # the signal's timing is the kernel's: try it a few times
        proc = run_python(PROBE, stack, "auth required pam_permit.so")
        assert "Exception ignored" not in proc.stderr, proc.stderr
        assert "sigint handler: _Deferrer" in proc.stdout, proc.stdout + proc.stderr
        assert "outside: KeyboardInterrupt" in proc.stdout, proc.stdout + proc.stderr
        assert "outcome: ConversationError from Stop" in proc.stdout, proc.stdout + proc.stderr
        assert "ended: True" in proc.stdout
    calls = read_record(record).calls
    assert calls and all(call.rc == 19 for call in calls)  # PAM_CONV_ERR, every time
