"""Every name and example of the original API document (docs/api-document.md) works.

The examples run as written, in their own interpreter, with what they leave
out added in front: their imports, the ``Example`` class, answers for their
prompts, and a throwaway pam_matrix service as the default confdir.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import threading

import pytest

import pamphlet

DOCUMENT = pathlib.Path(__file__).parent.parent / "docs" / "api-document.md"
TEXT = DOCUMENT.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)

PRELUDE = """
import getpass, os, sys, six
import pamphlet
from pamphlet.testing import TemporaryService

answers = os.environ["ANSWERS"].split(",")
# getpass and input read the answers from the scripted stdin; a record of
# what was asked goes to stderr.
class Example(pamphlet.PamApplication):
    def conversation(self, messages):
        for message in messages:
            print("asked:", message, file=sys.stderr)
            yield answers.pop(0) if message.is_prompt else ""

# The examples start without a user: pam_succeed_if asks for it (login:).
_service = TemporaryService(
    "auth required pam_succeed_if.so user notin root quiet\\n"
    "auth required {pam_matrix} passdb={passdb} verbose\\n"
    "account required {pam_matrix} passdb={passdb}\\n"
    "password required {pam_matrix} passdb={passdb}\\n"
    "session required pam_echo.so tty=%t\\n"
    "session required {pam_matrix} passdb={passdb}\\n",
    users={"bob": "secret"},
    name=os.environ["SERVICE"],
)
pamphlet.PamApplication.default_confdir = _service.confdir
import atexit
atexit.register(_service.cleanup)
"""

EPILOGUE = """
print("passdb:", open(_service.passdb).read().strip())
"""


def run_example(
    block: str, *, service: str, answers: list[str], stdin: str = "", tty: bool = False
) -> subprocess.CompletedProcess[str]:
    code = PRELUDE + "\n" + block + "\n" + EPILOGUE
    env = dict(os.environ, ANSWERS=",".join(answers), SERVICE=service)
    kwargs: dict = {}
    if tty:
        # The example reads os.ttyname(stdin): give it a real terminal.
        master, slave = os.openpty()
        kwargs = {"stdin": slave}
    else:
        kwargs = {"input": stdin}
    try:
        return subprocess.run(
            [
                sys.executable,
                "-c",
                code,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            start_new_session=True,  # no controlling tty: getpass reads stdin
            **kwargs,
        )
    finally:
        if tty:
            os.close(master)
            os.close(slave)


def block_containing(snippet: str) -> str:
    (block,) = [b for b in BLOCKS if snippet in b]
    return block


def test_document_has_the_examples_we_expect():
    assert len(BLOCKS) == 6


def test_simplest_example_logs_in_with_getpass_and_input():
    block = block_containing("class MyApp(pamphlet.PamAplication)")
    proc = run_example(block, service="pamphlet-example", answers=[], stdin="bob\nsecret\n")
    assert proc.returncode == 0, proc.stderr
    assert "Authentication succeeded" in proc.stdout  # the info message, printed


def test_simplest_example_fails_closed_on_wrong_password():
    block = block_containing("class MyApp(pamphlet.PamAplication)")
    proc = run_example(block, service="pamphlet-example", answers=[], stdin="bob\nnope\n")
    assert proc.returncode == 1
    assert "pamphlet.errors.AuthenticationError: Authentication failure" in proc.stderr


def test_phases_example():
    block = block_containing("app.initialize_credentials()\napp.account_management()")
    block = "from __main__ import Example as MyApp\n" + block
    proc = run_example(block, service="pamphlet-example", answers=["bob", "secret"])
    assert proc.returncode == 0, proc.stderr
    assert "asked: Password: " in proc.stderr
    assert "asked: tty=" in proc.stderr  # pam_echo ran in open_session


def test_change_password_example():
    block = block_containing("app.authenticate()\napp.change_authtoken()")
    block = "from __main__ import Example as MyApp\n" + block
    proc = run_example(
        block, service="pamphlet-example", answers=["bob", "secret", "secret", "n3w", "n3w"]
    )
    assert proc.returncode == 0, proc.stderr
    assert "passdb: bob:n3w:" in proc.stdout


def test_items_example_on_a_terminal():
    block = block_containing("app.tty = os.ttyname")
    proc = run_example(
        block, service="pamphlet", answers=["bob", "secret", "secret", "n3w", "n3w"], tty=True
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"asked: tty=/dev/pts/\d+", proc.stderr)
    assert "passdb: bob:n3w:" in proc.stdout


def test_exception_table():
    block = block_containing("class Abort(PamError)")
    rows = re.findall(r"class (\w+)\(PamError\):\s+code = PAM_(\w+)", block)
    assert len(rows) == 24
    for name, code in rows:
        cls = getattr(pamphlet, name)
        assert issubclass(cls, pamphlet.PamError)
        assert cls.code == pamphlet.ReturnCode[code]
    assert pamphlet.CredenrialsUnavailable is pamphlet.CredentialsUnavailable
    assert pamphlet.PamAplication is pamphlet.PamApplication


FULL_API = {
    "end": [],
    "authenticate": ["silent", "disallow_null_authtoken"],
    "account_management": ["silent", "disallow_null_authtoken"],
    "acct_mgmt": ["silent", "disallow_null_authtoken"],
    "open_session": ["silent"],
    "close_session": ["silent"],
    "change_authtoken": ["silent", "change_expired_authtoken"],
    "initialize_credentials": ["silent"],
    "delete_credentials": ["silent"],
    "reinitialize_credentials": ["silent"],
    "refresh_credentials": ["silent"],
    "get_user": ["prompt"],
}


@pytest.mark.parametrize(
    "flavour", ["PamApplication", "ThreadedPamApplication", "AsyncPamApplication"]
)
@pytest.mark.parametrize("method", sorted(FULL_API))
def test_full_api_signatures(method, flavour):
    # Every flavour has every phase, with the document's keywords.
    parameters = inspect.signature(getattr(getattr(pamphlet, flavour), method)).parameters
    names = [p for p in parameters if p != "self"]
    assert names[: len(FULL_API[method])] == FULL_API[method]
    for name in FULL_API[method]:
        if name != "prompt":
            assert parameters[name].default is False
    assert method in TEXT


def test_constructor_accepts_document_keywords(tmp_path):
    from pamphlet.testing import TemporaryService

    with TemporaryService("auth required pam_permit.so") as service:
        app = pamphlet.PamApplication(
            service_name=service.name, user_name="bob", confdir=service.confdir
        )
        assert (app.service, app.user) == (service.name, "bob")
        app.end()


def test_message_styles_are_module_constants():
    for name in ("PAM_TEXT_INFO", "PAM_ERROR_MSG", "PAM_PROMPT_ECHO_ON", "PAM_PROMPT_ECHO_OFF"):
        assert name in TEXT
        assert getattr(pamphlet, name) == getattr(pamphlet.MessageStyle, name[4:])


def test_items_of_the_document_are_properties():
    for name in textwrap.dedent(
        "authtok_type rhost ruser service tty user user_prompt xdisplay"
    ).split():
        assert f"`app.{name}`" in TEXT
        assert getattr(pamphlet.PamApplication, name).__class__.__name__ == "_StringItem"


def test_threaded_pam_application_is_the_documents_subclass(matrix):
    # "the ThreadedPamApplication subclass": code written against the document
    # checks isinstance(app, pamphlet.PamApplication).
    assert issubclass(pamphlet.ThreadedPamApplication, pamphlet.PamApplication)
    app = pamphlet.ThreadedPamApplication(matrix.name, "bob", confdir=matrix.confdir)
    assert isinstance(app, pamphlet.PamApplication)
    # The document's one difference: authenticate returns the phase's thread.
    thread = app.authenticate()
    assert isinstance(thread, threading.Thread)
    assert app.get_data(timeout=30) == ["Password: "]
    app.set_input(["secret"])
    assert app.get_data(timeout=30) is None
    app.account_management()  # PamApplication's own, inherited
    app.end()
    assert not thread.is_alive()  # end() joined it
    # Not in the document: every phase of AsyncPamApplication is a coroutine,
    # so it would break every promise PamApplication's methods make.
    assert not issubclass(pamphlet.AsyncPamApplication, pamphlet.PamApplication)
