"""The pamphlet command, run as a user runs it: a subprocess, real PAM stacks."""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import select
import shutil
import subprocess
import sys
import termios
import time

import pytest

from pamphlet.testing import pam_wrapper_module

MATRIX = (
    "auth required {pam_matrix} passdb={passdb} verbose\n"
    "account required {pam_matrix} passdb={passdb}\n"
    "password required {pam_matrix} passdb={passdb}\n"
    "session required {pam_matrix} passdb={passdb}\n"
)

# Each operation's pam_debug result: (operation, stack line, error class).
DEBUG_STACK = (
    "auth required pam_debug.so auth=success\n"
    "auth required pam_debug.so cred=cred_err\n"
    "account required pam_debug.so acct=acct_expired\n"
    "password required pam_debug.so prechauthtok=success chauthtok=authtok_err\n"
    "session required pam_debug.so open_session=session_err close_session=success\n"
)


def run_cli(*args: str, answers: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pamphlet", *args],
        input=answers,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # no controlling terminal: prompts read stdin
    )


def json_records(proc: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture
def matrix(pam_service_factory):
    return pam_service_factory(MATRIX, users={"bob": "secret"}, name="cli")


def in_confdir(service, *args: str) -> list[str]:
    return ["--confdir", service.confdir, service.name, *args]


# -- prompts and piped answers ---------------------------------------------


def test_piped_answers_log_in(matrix):
    proc = run_cli(*in_confdir(matrix, "bob", "authenticate", "acct_mgmt"), answers="secret\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "pamphlet: successfully authenticated",
        "pamphlet: account management done.",
    ]
    # The prompt and the module's info message go to stderr, the answer nowhere.
    assert "Password: \nAuthentication succeeded\n" in proc.stderr
    assert "secret" not in proc.stdout + proc.stderr


def test_wrong_password_fails_and_stops(matrix):
    proc = run_cli("-v", *in_confdir(matrix, "bob", "authenticate", "acct_mgmt"), answers="wrong\n")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Authentication failed\n" in proc.stderr  # pam_matrix's error message
    assert "pamphlet: authenticate failed: AuthenticationError: Authentication failure" in (
        proc.stderr
    )
    assert "performing operation - acct_mgmt" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_each_prompt_reads_one_line(matrix):
    answers = "secret\nsecret\nn3w\nn3w\n"
    proc = run_cli(*in_confdir(matrix, "bob", "authenticate", "chauthtok"), answers=answers)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "pamphlet: authentication token altered successfully."
    assert proc.stderr.splitlines() == [
        "Password: ",
        "Authentication succeeded",
        "Old password: ",
        "New Password :",
        "Verify New Password :",
    ]
    assert matrix.password_of("bob") == "n3w"


def test_end_of_input_fails_closed(matrix):
    proc = run_cli(*in_confdir(matrix, "bob", "authenticate"), answers="")
    assert proc.returncode == 1
    assert "authenticate failed: ConversationError" in proc.stderr
    assert "no answer to the prompt 'Password: ': standard input has ended" in proc.stderr


def test_answers_are_bytes_as_typed(pam_service_factory):
    # A password that is not UTF-8 reaches PAM unchanged.
    service = pam_service_factory(MATRIX, users={"bob": "x"}, name="cli")
    with open(service.passdb, "wb") as passdb:
        passdb.write(b"bob:caf\xe9:cli\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pamphlet", *in_confdir(service, "bob", "authenticate")],
        input=b"caf\xe9\n",
        capture_output=True,
        timeout=60,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stderr


# -- every operation, flags, items, environment ------------------------------


@pytest.mark.parametrize(
    ("operation", "outcome"),
    [
        ("authenticate", "pamphlet: successfully authenticated"),
        ("setcred", "setcred failed: CredentialError: Failure setting user credentials"),
        ("acct_mgmt", "acct_mgmt failed: AccountExpired: User account has expired"),
        ("chauthtok", "chauthtok failed: AuthTokenManipulationError"),
        ("open_session", "open_session failed: SessionError"),
        ("close_session", "pamphlet: session has successfully been closed."),
    ],
)
def test_each_operation(pam_service_factory, operation, outcome):
    service = pam_service_factory(DEBUG_STACK, name="debug")
    proc = run_cli(*in_confdir(service, "bob", operation))
    assert outcome in proc.stdout + proc.stderr
    assert proc.returncode == (0 if outcome.startswith("pamphlet:") else 1)


def test_setcred_flags_reach_the_module(matrix):
    proc = run_cli(
        "--json",
        *in_confdir(matrix, "bob", "authenticate", "setcred(PAM_ESTABLISH_CRED)"),
        answers="secret\n",
    )
    assert proc.returncode == 0, proc.stderr
    authenticate, setcred = json_records(proc)
    assert "CRED" not in authenticate["environ"]
    assert setcred["flags"] == ["PAM_ESTABLISH_CRED"]
    assert setcred["environ"]["CRED"] == "/tmp/bob"  # pam_matrix's setcred


def test_silent_flag_reaches_the_module(pam_service_factory):
    # pam_echo shows its text, but ignores the call under PAM_SILENT; a stack
    # that only ignores is denied.
    service = pam_service_factory("auth required pam_echo.so hello %u", name="echo")
    loud = run_cli(*in_confdir(service, "bob", "authenticate"))
    assert loud.returncode == 0 and "hello bob\n" in loud.stderr
    quiet = run_cli(*in_confdir(service, "bob", "authenticate(PAM_SILENT)"))
    assert quiet.returncode == 1
    assert "hello" not in quiet.stderr
    assert "authenticate failed: PermissionDenied" in quiet.stderr


@pytest.mark.parametrize(
    ("expression", "names"),
    [
        ("authenticate()", []),
        ("authenticate(PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK)", ["silent", "disallow"]),
        ("authenticate(PAM_DISALLOW_NULL_AUTHTOK&~PAM_SILENT)", ["disallow"]),
        ("authenticate((PAM_SILENT|PAM_DISALLOW_NULL_AUTHTOK)^PAM_SILENT)", ["disallow"]),
        ("authenticate(~~PAM_SILENT)", ["silent"]),
    ],
)
def test_flag_expressions(pam_service_factory, expression, names):
    service = pam_service_factory("auth required pam_permit.so", name="permit")
    proc = run_cli("--json", *in_confdir(service, "bob", expression))
    assert proc.returncode == 0, proc.stderr
    (record,) = json_records(proc)
    full = {"silent": "PAM_SILENT", "disallow": "PAM_DISALLOW_NULL_AUTHTOK"}
    assert sorted(record["flags"]) == sorted(full[name] for name in names)


def test_items_reach_modules(pam_service_factory):
    # pam_get_items copies every item it sees into the PAM environment.
    service = pam_service_factory(f"auth required {pam_wrapper_module('pam_get_items')}")
    proc = run_cli(
        "--json",
        "-I", "tty=/dev/pts/7",
        "-I", "rhost=client.example",
        "--item", "ruser=remote",
        "-I", "prompt=Who are you? ",
        "-I", "xdisplay=:1",
        "-I", "PAM_AUTHTOK_TYPE=UNIX",
        *in_confdir(service, "bob", "authenticate"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (record,) = json_records(proc)
    assert record["environ"] == {
        "PAM_SERVICE": service.name,
        "PAM_USER": "bob",
        "PAM_TTY": "/dev/pts/7",
        "PAM_RHOST": "client.example",
        "PAM_RUSER": "remote",
        "PAM_USER_PROMPT": "Who are you? ",
        "PAM_XDISPLAY": ":1",
        "PAM_AUTHTOK_TYPE": "UNIX",
    }


def test_item_user_overrides_the_argument(pam_service_factory):
    service = pam_service_factory("auth required pam_echo.so user=%u", name="echo")
    proc = run_cli("-I", "user=alice", *in_confdir(service, "bob", "authenticate"))
    assert "user=alice\n" in proc.stderr


def test_environment_variables_reach_modules(pam_service_factory, tmp_path):
    # pam_exec runs its program with the PAM environment.
    script = tmp_path / "check-greeting"
    script.write_text('#!/bin/sh\ntest "$GREETING" = hello\n')
    script.chmod(0o755)
    service = pam_service_factory(f"auth required pam_exec.so quiet {script}", name="exec")
    good = run_cli("-E", "GREETING=hello", *in_confdir(service, "bob", "authenticate"))
    assert good.returncode == 0, good.stderr
    bad = run_cli("--env", "GREETING=bye", *in_confdir(service, "bob", "authenticate"))
    assert bad.returncode == 1


# -- --json -------------------------------------------------------------------


def test_json_reports_each_operation(matrix):
    proc = run_cli(
        "--json",
        "-E",
        "LANG=C",
        *in_confdir(matrix, "bob", "authenticate", "open_session", "close_session"),
        answers="secret\n",
    )
    assert proc.returncode == 0, proc.stderr
    records = json_records(proc)
    assert [r["operation"] for r in records] == ["authenticate", "open_session", "close_session"]
    assert all(r["status"] == "success" and r["code"] == 0 for r in records)
    assert records[0]["messages"] == [
        {"style": "PROMPT_ECHO_OFF", "text": "Password: "},
        {"style": "TEXT_INFO", "text": "Authentication succeeded"},
    ]
    assert records[0]["environ"] == {"LANG": "C"}
    assert records[1]["environ"] == {"LANG": "C", "HOMEDIR": "/home/bob"}
    assert records[2]["environ"] == {"LANG": "C"}
    assert "secret" not in proc.stdout


def test_json_reports_the_failure(matrix):
    proc = run_cli(
        "--json", *in_confdir(matrix, "bob", "authenticate", "acct_mgmt"), answers="no\n"
    )
    assert proc.returncode == 1
    (record,) = json_records(proc)
    assert record["status"] == "failure"
    assert record["code"] == 7
    assert record["error"] == "AuthenticationError"
    assert record["error_text"] == "Authentication failure"
    assert record["messages"][-1] == {"style": "ERROR_MSG", "text": "Authentication failed"}


def test_json_reports_a_failed_start(pam_service_factory):
    service = pam_service_factory("auth required pam_permit.so", name="permit")
    proc = run_cli("--json", "--confdir", service.confdir, "no-such-service", "bob", "acct_mgmt")
    assert proc.returncode == 1
    (record,) = json_records(proc)
    assert (record["operation"], record["error"]) == ("pam_start", "Abort")


# -- --confdir and pam_start ----------------------------------------------------


def test_confdir_falls_back_to_other(pam_service_factory):
    service = pam_service_factory("auth required pam_deny.so", name="other")
    proc = run_cli("--confdir", service.confdir, "anything", "bob", "authenticate")
    assert proc.returncode == 1
    assert "authenticate failed: AuthenticationError" in proc.stderr


def test_missing_service_fails_to_start(pam_service_factory):
    service = pam_service_factory("auth required pam_permit.so", name="permit")
    proc = run_cli("-v", "--confdir", service.confdir, "no-such-service", "bob", "acct_mgmt")
    assert proc.returncode == 1
    assert "pamphlet: invoking pam_start(no-such-service, bob, ...)" in proc.stderr
    assert "pamphlet: Abort: pam_start failed: Critical error - immediate abort" in proc.stderr


def test_verbose_prints_each_step(matrix):
    proc = run_cli(
        "-v", *in_confdir(matrix, "bob", "authenticate", "open_session"), answers="secret\n"
    )
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stderr.splitlines() if line.startswith("pamphlet:")]
    assert steps == [
        "pamphlet: invoking pam_start(cli, bob, ...)",
        "pamphlet: performing operation - authenticate",
        "pamphlet: performing operation - open_session",
        "pamphlet: PAM environment now: HOMEDIR=/home/bob",
    ]


def test_only_the_named_operations_run(pam_service_factory, tmp_path):
    # Like pamtester: an open session is not closed behind the user's back.
    marker = tmp_path / "ran"
    script = tmp_path / "record"
    script.write_text(f'#!/bin/sh\necho "$PAM_TYPE" >> {marker}\n')
    script.chmod(0o755)
    service = pam_service_factory(f"session required pam_exec.so {script}", name="exec")
    proc = run_cli(*in_confdir(service, "bob", "open_session"))
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text().split() == ["open_session"]


# -- usage errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        ([], "a service, a user and at least one operation are needed"),
        (["login", "bob"], "a service, a user and at least one operation are needed"),
        (["login", "bob", "authorize"], "unknown operation 'authorize'"),
        (["login", "bob", "authenticate(PAM_FOO)"], "unknown flag 'PAM_FOO'"),
        (["login", "bob", "authenticate(PAM_SILENT|)"], "flags 'PAM_SILENT|' end too early"),
        (["login", "bob", "authenticate(PAM_SILENT"], "cannot read the operation"),
        (["login", "bob", "authenticate((PAM_SILENT)"], "unbalanced parentheses"),
        (["login", "bob", "authenticate(PAM_SILENT PAM_SILENT)"], "unexpected 'PAM_SILENT'"),
        (["login", "bob", "authenticate(1)"], "unexpected '1'"),
        (["-I", "shell=/bin/sh", "login", "bob", "authenticate"], "unknown item 'shell'"),
        (["-I", "tty", "login", "bob", "authenticate"], "the item 'tty' is not NAME=VALUE"),
        (["-E", "=x", "login", "bob", "authenticate"], "is not NAME=VALUE"),
        (["--confdir", "/nonexistent", "login", "bob", "authenticate"], "is not a directory"),
        (["--demo", "login"], "--demo takes no service"),
        (["--bogus", "login", "bob", "authenticate"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors(args, complaint):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: pamphlet")
    assert complaint in proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_script_is_installed():
    script = shutil.which(
        "pamphlet", path=os.path.dirname(sys.executable) + os.pathsep + os.defpath
    )
    assert script, "the pamphlet console script is missing: pip install -e '.[test]'"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "authenticate(PAM_SILENT|PAM_DISALLOW_NULL_AUTHTOK)" in proc.stdout


# -- the demo -----------------------------------------------------------------------


def test_demo_logs_in():
    proc = run_cli("--demo", answers="pamphlet\n")
    assert proc.returncode == 0, proc.stderr
    assert "Log in as 'demo'; the password is 'pamphlet'" in proc.stderr
    assert "Welcome, demo!" in proc.stderr
    assert "pamphlet: PAM environment now: CRED=/tmp/demo HOMEDIR=/home/demo" in proc.stderr
    assert proc.stdout.splitlines()[-1] == "pamphlet: session has successfully been closed."
    confdir = re.search(r"is in (\S+):", proc.stderr).group(1)
    assert not os.path.exists(confdir)  # the throwaway service is gone


def test_demo_refuses_a_wrong_password():
    proc = run_cli("--demo", "--json", answers="nope\n")
    assert proc.returncode == 1
    (record,) = json_records(proc)
    assert record["error"] == "AuthenticationError"


# -- on a terminal ------------------------------------------------------------------


def _take_terminal() -> None:
    # In the child, after setsid: make the pty (stdin) its controlling
    # terminal, so that Ctrl-C there interrupts it as it would a login shell.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Pty:
    """The command on a pseudo-terminal: stdin and stderr on it, stdout piped."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pamphlet", *args],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(slave)
        self.screen = b""

    def read_until(self, text: bytes, timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} never showed; the terminal shows {self.screen!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                assert chunk, f"{text!r} never showed; the terminal shows {self.screen!r}"
                self.screen += chunk
        return self.screen

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def finish(self, keep_open: bool = False) -> tuple[int, bytes]:
        stdout, _ = self.proc.communicate(timeout=60)
        try:
            while select.select([self.master], [], [], 0.2)[0]:
                chunk = os.read(self.master, 4096)
                if not chunk:
                    break
                self.screen += chunk
        except OSError:
            pass
        if not keep_open:
            os.close(self.master)
        return self.proc.returncode, stdout


def test_terminal_password_prompt_does_not_echo(matrix):
    terminal = Pty(*in_confdir(matrix, "bob", "authenticate"))
    terminal.read_until(b"Password: ")
    terminal.type(b"secret\n")
    code, stdout = terminal.finish()
    assert code == 0, terminal.screen
    assert b"pamphlet: successfully authenticated" in stdout
    assert b"Authentication succeeded" in terminal.screen
    assert b"secret" not in terminal.screen


def test_terminal_echo_on_prompt_echoes(pam_service_factory):
    # pam_matrix's `echo` option asks with PAM_PROMPT_ECHO_ON.
    service = pam_service_factory(
        "auth required {pam_matrix} passdb={passdb} echo", users={"bob": "visible"}, name="cli"
    )
    terminal = Pty(*in_confdir(service, "bob", "authenticate"))
    terminal.read_until(b"Password: ")
    terminal.type(b"visible\n")
    code, _ = terminal.finish()
    assert code == 0, terminal.screen
    assert b"visible" in terminal.screen


def test_terminal_echo_is_restored_after_interrupt(matrix):
    terminal = Pty(*in_confdir(matrix, "bob", "authenticate"))
    terminal.read_until(b"Password: ")
    terminal.type(b"\x03")  # Ctrl-C
    code, _ = terminal.finish(keep_open=True)
    assert code == 130, terminal.screen
    assert termios.tcgetattr(terminal.master)[3] & termios.ECHO  # echo is back on
    os.close(terminal.master)
    assert b"pamphlet: interrupted" in terminal.screen
    assert b"Traceback" not in terminal.screen


# -- side by side with pamtester (root: it reads /etc/pam.d) -------------------------

needs_root = pytest.mark.root  # conftest skips it without root (a failure in CI)


@pytest.fixture
def system_service(pam_service_factory, tmp_path):
    """``install(stack, users)``: the same service in a confdir and in /etc/pam.d."""
    if shutil.which("pamtester") is None:
        pytest.fail("pamtester is not installed: apt-get install pamtester")
    name = "pamphlet-cmp-" + secrets.token_hex(6)
    path = os.path.join("/etc/pam.d", name)

    def install(stack: str, users: dict[str, str] | None = None):
        service = pam_service_factory(stack, users=users, name=name)
        shutil.copyfile(service.path(), path)
        return service

    try:
        yield install
    finally:
        if os.path.exists(path):
            os.unlink(path)


# pam_matrix without `verbose`: pamtester's conversation (misc_conv) writes
# through the NULL response pointer pam_matrix passes with info messages,
# and crashes.
QUIET_MATRIX = MATRIX.replace(" verbose", "")
SUCCEED_IF_RHOST = "auth required pam_succeed_if.so quiet rhost = trusted.example"

ECHO = "auth required pam_echo.so hi"
SESSION = ["authenticate", "setcred(PAM_ESTABLISH_CRED)", "open_session", "close_session"]


def compare(name, stack, user, operations, answers="", options=(), *, succeeded):
    return pytest.param(stack, list(options), user, operations, answers, succeeded, id=name)


# Each case: what both run, and how many of its operations succeed.
COMPARISONS = [
    compare("login", QUIET_MATRIX, "bob", ["authenticate", "acct_mgmt"], "secret\n", succeeded=2),
    compare("wrong password", QUIET_MATRIX, "bob", ["authenticate"], "nope\n", succeeded=0),
    compare("unknown user", QUIET_MATRIX, "eve", ["authenticate"], "secret\n", succeeded=0),
    compare(
        "other service", QUIET_MATRIX, "carol", ["authenticate", "acct_mgmt"], "pw\n", succeeded=1
    ),
    compare("no input", QUIET_MATRIX, "bob", ["authenticate"], "", succeeded=0),
    compare("session", QUIET_MATRIX, "bob", SESSION, "secret\n", succeeded=4),
    compare("chauthtok", QUIET_MATRIX, "bob", ["chauthtok"], "secret\nn3w\nn3w\n", succeeded=1),
    compare("chauthtok wrong old", QUIET_MATRIX, "bob", ["chauthtok"], "nope\n", succeeded=0),
    compare("setcred error", DEBUG_STACK, "bob", ["authenticate", "setcred"], succeeded=1),
    compare("acct_mgmt error", DEBUG_STACK, "bob", ["acct_mgmt"], succeeded=0),
    compare("chauthtok error", DEBUG_STACK, "bob", ["chauthtok"], succeeded=0),
    compare("session error", DEBUG_STACK, "bob", ["close_session", "open_session"], succeeded=1),
    compare("echo", ECHO, "bob", ["authenticate"], succeeded=1),
    compare("silent", ECHO, "bob", ["authenticate(PAM_SILENT)"], succeeded=0),
    compare(
        "silent expression",
        ECHO,
        "bob",
        ["authenticate(PAM_SILENT|PAM_DISALLOW_NULL_AUTHTOK)"],
        succeeded=0,
    ),
    compare(
        "rhost item",
        SUCCEED_IF_RHOST,
        "root",
        ["authenticate"],
        options=["-I", "rhost=trusted.example"],
        succeeded=1,
    ),
    compare(
        "other rhost",
        SUCCEED_IF_RHOST,
        "root",
        ["authenticate"],
        options=["-I", "rhost=evil.example"],
        succeeded=0,
    ),
]


@needs_root
@pytest.mark.root
@pytest.mark.parametrize(
    ("stack", "options", "user", "operations", "answers", "succeeded"), COMPARISONS
)
def test_pamphlet_agrees_with_pamtester(
    system_service, stack, options, user, operations, answers, succeeded
):
    service = system_service(stack, {"bob": "secret", "carol": "pw"})
    service.add_user("carol", "pw", service="elsewhere")
    with open(service.passdb) as file:
        passdb = file.read()

    def outcome(command: list[str]) -> tuple[bool, list[str]]:
        with open(service.passdb, "w") as file:  # chauthtok rewrites it
            file.write(passdb)
        proc = subprocess.run(
            command, input=answers, capture_output=True, text=True, timeout=60,
            start_new_session=True,
        )  # fmt: skip
        assert proc.returncode >= 0, f"{command[0]} crashed: {proc.stderr}"
        # Their success lines, without the program's name; pamtester also
        # prints info messages on stdout.
        done = [
            line.split(": ", 1)[1]
            for line in proc.stdout.splitlines()
            if line.startswith(("pamtester: ", "pamphlet: "))
        ]
        return proc.returncode == 0, done

    args = [*options, service.name, user, *operations]
    theirs = outcome(["pamtester", *args])
    ours = outcome([sys.executable, "-m", "pamphlet", "--confdir", service.confdir, *args])
    assert ours == theirs
    assert theirs[0] == (succeeded == len(operations))
    assert len(theirs[1]) == succeeded
