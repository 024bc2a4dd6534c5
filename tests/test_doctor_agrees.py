"""The doctor's prediction against what libpam does, stack by stack and user by user.

For each real stack (Debian's own services in /etc/pam.d, and confdir stacks
built from the modules the doctor models) and each kind of user (root,
nobody, a name NSS does not know, throwaway users: healthy, locked, with an
expired password, with an expired account, with a shell not in /etc/shells),
each phase is run for real and compared with ``diagnose()``'s prediction.

The doctor assumes the user types the right password: the real run answers
every prompt with it (users without one get a made-up answer), and a second
run with a wrong answer is compared with ``diagnose(..., password_known=False)``.
A phase the doctor marks "not certain" must name why; it is counted, not
compared. The default run covers a slice; ``-m slow`` sweeps every pair.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import os
import pickle
import secrets
import subprocess
import sysconfig
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pamphlet
from conftest import run_account_tool
from pamphlet import cli, pamconf
from pamphlet.doctor import diagnose

pytestmark = pytest.mark.root

PR_SET_DUMPABLE = 4
#: Where a login comes from: (PAM_TTY, PAM_RHOST).
Origin = tuple[str | None, str | None]
NOWHERE: Origin = (None, None)
ORIGINS: tuple[Origin, ...] = (("tty1", None), ("pts/3", "192.0.2.7"), (None, "198.51.100.1"))

#: The phases compared. chauthtok would change real passwords; it is left out.
PHASES = ("authenticate", "acct_mgmt", "open_session")

DEBIAN_SERVICES = (
    *("login", "su", "su-l", "chsh", "chfn", "passwd", "other", "runuser", "runuser-l"),
    *("chpasswd", "newusers"),
)

#: Confdir stacks; {dir} is the confdir. "common-*" include Debian's own files.
CONFDIR_STACKS = {
    "common-auth": "@include common-auth\n@include common-account\n@include common-session\n",
    "deny": "auth required pam_deny.so\naccount required pam_deny.so\n"
    "session required pam_deny.so\n",
    "permit": "auth required pam_permit.so\naccount required pam_permit.so\n"
    "session required pam_permit.so\n",
    "shells": "auth required pam_shells.so\nauth required pam_permit.so\n"
    "account required pam_shells.so\nsession required pam_permit.so\n",
    "succeed-if": (
        "auth requisite pam_succeed_if.so uid >= 1000 quiet\nauth required pam_permit.so\n"
        "account [success=1 default=ignore] pam_succeed_if.so user ingroup root\n"
        "account requisite pam_deny.so\naccount required pam_permit.so\n"
        "session required pam_succeed_if.so shell = /bin/sh\n"
    ),
    "nologin": (
        "auth requisite pam_nologin.so file={dir}/nologin\nauth required pam_permit.so\n"
        "account required pam_nologin.so file={dir}/absent\n"
        "session required pam_nologin.so file={dir}/nologin\nsession required pam_permit.so\n"
    ),
    "access": (
        "auth required pam_access.so accessfile={dir}/access.conf\nauth required pam_permit.so\n"
        "account required pam_access.so accessfile={dir}/access.conf\n"
        "session required pam_permit.so\n"
    ),
    "unix-sufficient": (
        "auth sufficient pam_unix.so\nauth required pam_deny.so\n"
        "account sufficient pam_unix.so\naccount required pam_deny.so\n"
        "session required pam_unix.so\n"
    ),
    "jumps": (
        "auth [success=2 default=ignore] pam_unix.so\n"
        "auth [success=1 default=ignore] pam_succeed_if.so user = nobody\n"
        "auth requisite pam_deny.so\nauth required pam_permit.so\n"
        "account [success=ok new_authtok_reqd=ok acct_expired=1 default=bad] pam_unix.so\n"
        "account [default=done] pam_permit.so\naccount required pam_deny.so\n"
        "session required pam_permit.so\n"
    ),
    "substack": (
        "auth substack {dir}/sub\nauth required pam_shells.so\n"
        "account substack {dir}/sub\nsession required pam_permit.so\n"
    ),
    "rootok": (
        "auth sufficient pam_rootok.so\nauth required pam_deny.so\n"
        "account sufficient pam_rootok.so\naccount required pam_unix.so\n"
        "session optional pam_rootok.so\nsession required pam_limits.so\n"
    ),
    "no-nullok": (
        "auth required pam_unix.so\naccount required pam_unix.so\nsession required pam_unix.so\n"
    ),
    "access-origin": (
        "auth required pam_access.so accessfile={dir}/access-origin.conf\n"
        "auth required pam_permit.so\n"
        "account required pam_access.so accessfile={dir}/access-origin.conf\n"
        "session required pam_permit.so\n"
    ),
    "access-missing": (
        "auth required pam_access.so accessfile={dir}/absent.conf\n"
        "auth required pam_permit.so\naccount required pam_permit.so\n"
        "session required pam_permit.so\n"
    ),
    "securetty": (
        "auth required pam_securetty.so\nauth required pam_permit.so\n"
        "account required pam_permit.so\nsession required pam_permit.so\n"
    ),
    "all-ignore": (
        "auth required pam_env.so\nauth optional pam_faildelay.so delay=1\n"
        "account required pam_nologin.so file={dir}/absent\nsession required pam_motd.so\n"
    ),
    "faillock": (
        "auth required pam_faillock.so preauth dir={dir}/tally\n"
        "auth [success=1 default=bad] pam_unix.so\n"
        "auth [default=die] pam_faillock.so authfail dir={dir}/tally\n"
        "auth sufficient pam_faillock.so authsucc dir={dir}/tally\n"
        "account required pam_faillock.so dir={dir}/tally\naccount required pam_unix.so\n"
        "session required pam_permit.so\n"
    ),
    "substack-reset": (
        "auth substack {dir}/sub-reset\nauth required pam_permit.so\n"
        "account [success=ok default=reset] pam_shells.so\naccount required pam_permit.so\n"
        "session required pam_permit.so\n"
    ),
}

SUB_RESET = """\
auth [success=ok default=reset] pam_shells.so
auth [success=ok user_unknown=die default=ignore] pam_unix.so
auth requisite pam_succeed_if.so uid >= 1000 quiet
"""

SUBSTACK = """\
auth [success=done default=die] pam_unix.so
auth required pam_permit.so
account [success=ok default=die] pam_unix.so
account [default=done] pam_permit.so
account required pam_deny.so
"""

ACCESS_CONF = "-:root:ALL\n+:ALL:ALL\n"
ACCESS_ORIGIN_CONF = "+:root:LOCAL\n-:ALL EXCEPT nobody:192.0.2.0/24\n-:root:ALL\n+:ALL:ALL\n"

USERS = (
    *("root", "nobody", "unknown", "healthy", "locked", "expired", "account-expired"),
    *("badshell", "empty", "aged", "inactive"),
)


def days_ago(days: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() - days * 86400))


#: A slice of the sweep for the default run: the pairs most likely to disagree.
DEFAULT_SLICE = (
    ("chsh", "unknown"),
    ("login", "healthy"),
    ("login", "locked"),
    ("su", "expired"),
    ("other", "account-expired"),
    ("chfn", "nobody"),
    ("shells", "badshell"),
    ("succeed-if", "root"),
    ("access", "unknown"),
    ("nologin", "healthy"),
    ("jumps", "account-expired"),
    ("substack", "badshell"),
    ("rootok", "unknown"),
    ("access-missing", "healthy"),
    ("faillock", "empty"),
    ("runuser-l", "unknown"),
)


class Users:
    """Throwaway users for the sweep, one of each kind; (name, password or None)."""

    def __init__(self) -> None:
        self.names: dict[str, tuple[str, str | None]] = {
            "root": ("root", None),
            "nobody": ("nobody", None),
            "unknown": ("pmdu" + secrets.token_hex(4), None),
        }
        setup = {
            "healthy": [],
            "locked": [["passwd", "-l"]],
            "expired": [["chage", "-d", "0"]],
            "account-expired": [["chage", "-E", "0"]],
            "badshell": [["usermod", "-s", "/bin/false"]],
            "empty": [["passwd", "-d"]],
            # Changed 30 days ago, at most 5 days old: aged out; 2 inactive days after.
            "aged": [["chage", "-d", days_ago(30), "-M", "5"]],
            "inactive": [["chage", "-d", days_ago(30), "-M", "5", "-I", "2"]],
        }
        for kind, commands in setup.items():
            name = "pmda" + secrets.token_hex(4)
            password = "Pw-" + secrets.token_hex(8)
            run_account_tool(
                ["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True
            )
            self.names[kind] = (name, password)
            run_account_tool(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
            for command in commands:
                subprocess.run([*command, name], check=True, capture_output=True)

    def cleanup(self) -> None:
        for name, password in self.names.values():
            if password is not None:
                run_account_tool(["userdel", name], check=False, capture_output=True)


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    made = Users()
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: Any) -> str:
    directory = tmp_path_factory.mktemp("agree") / "pam.d"
    directory.mkdir()
    for name, text in CONFDIR_STACKS.items():
        (directory / name).write_text(text.replace("{dir}", str(directory)))
    (directory / "sub").write_text(SUBSTACK)
    (directory / "sub-reset").write_text(SUB_RESET)
    (directory / "other").write_text(textwrap.dedent("auth required pam_deny.so\n"))
    (directory / "nologin").write_text("no logins now\n")
    (directory / "access.conf").write_text(ACCESS_CONF)
    (directory / "access-origin.conf").write_text(ACCESS_ORIGIN_CONF)
    return str(directory)


class _Answering(pamphlet.PamApplication):
    """Answers every prompt with one text; libpam's failure delay is not slept."""

    def __init__(self, *args: Any, answer: str, **kwargs: Any) -> None:
        self.answer = answer
        super().__init__(*args, **kwargs)
        self.fail_delay = lambda status, usec: None

    def conversation(self, messages: list[pamphlet.Message]) -> list[str]:
        return [self.answer if m.is_prompt else "" for m in messages]


def in_child(function: Callable[[], Any], caller: int | None = None) -> Any:
    """``function()``'s result, run in a child process (as uid ``caller`` if given):
    session modules change the process (limits, keyrings, the loginuid), and the
    doctor and the modules judge the caller by its real uid."""
    # What a child as nobody cannot import (this interpreter may live under /root).
    sysconfig.get_config_vars()
    pamconf.module_directory()
    codecs.lookup("ascii")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            if caller is not None:
                os.setgroups([])
                os.setresgid(caller, caller, caller)
                os.setresuid(caller, caller, caller)
                # As a program started by that user is (a uid change makes the
                # process undumpable, and then /proc/self is root's).
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
            try:
                data = pickle.dumps((True, function()))
            except BaseException:
                data = pickle.dumps((False, traceback.format_exc()))
            with os.fdopen(write, "wb") as pipe:
                pipe.write(data)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(child, 0)
    assert data, "the child died before it reported"
    ok, result = pickle.loads(data)
    assert ok, f"in the child: {result}"
    return result


def run_phase(
    service: str, user: str, confdir: str | None, phase: str, answer: str, origin: Origin = NOWHERE
) -> int:
    """The phase's code from libpam (0 for success)."""
    with _Answering(service, user, confdir=confdir, answer=answer) as app:
        tty, rhost = origin
        if tty is not None:
            app.tty = tty
        if rhost is not None:
            app.rhost = rhost
        try:
            cli._PHASES[phase][0](app, 0)
        except pamphlet.PamError as error:
            return int(error.code)
    return 0


def predict_and_run(
    service: str, user: str, confdir: str | None, answer: str, known: bool, origin: Origin
) -> tuple[dict[str, str], dict[str, list[str]], dict[str, int]]:
    """(the doctor's predictions, the lines of phases not certain, libpam's codes)."""
    tty, rhost = origin
    report = diagnose(service, user, confdir=confdir, password_known=known, tty=tty, rhost=rhost)
    # The headline never contradicts a finding: naming a failing phase is a refusal.
    for finding in report.findings:
        assert bool(finding.refuses) <= (finding.severity == "error"), finding
    refused = [p for p, said in report.phases.items() if said == "refuses"]
    assert report.refuses == bool(refused), (report.phases, report.findings)
    undecided = {p: [line.where for line in report.uncertain(p)] for p in PHASES}
    actual = {phase: run_phase(service, user, confdir, phase, answer, origin) for phase in PHASES}
    return report.phases, undecided, actual


def compare(
    service: str,
    kind: str,
    users: Users,
    stacks: str,
    caller: int | None = None,
    origin: Origin = NOWHERE,
) -> tuple[list[str], list[str]]:
    """(mismatches, phases the doctor called not certain) for one stack and user."""
    confdir = stacks if service in CONFDIR_STACKS else None
    name, password = users.names[kind]
    mismatches, uncertain = [], []
    for known in (True, False):
        answer = password if (known and password) else "wrong-" + secrets.token_hex(4)
        run = functools.partial(predict_and_run, service, name, confdir, answer, known, origin)
        predictions, undecided, actual = in_child(run, caller)
        for phase in PHASES:
            predicted = predictions[phase]
            by = "" if caller is None else f" as uid {caller}"
            by += "" if origin == NOWHERE else f" from {origin}"
            label = f"{service} {kind} {phase} ({'right' if known else 'wrong'} password{by})"
            if predicted == "not certain":
                assert undecided[phase], label
                uncertain.append(label)
            elif (predicted == "refuses") != (actual[phase] != 0):
                mismatches.append(
                    f"{label}: predicted {predicted}, libpam returned {actual[phase]}"
                )
    return mismatches, uncertain


@pytest.mark.parametrize(("service", "kind"), DEFAULT_SLICE)
def test_the_doctor_predicts_what_libpam_does(
    service: str, kind: str, users: Users, stacks: str
) -> None:
    mismatches, _ = compare(service, kind, users, stacks)
    assert mismatches == []


@pytest.mark.slow
@pytest.mark.parametrize("service", DEBIAN_SERVICES + tuple(CONFDIR_STACKS))
def test_the_sweep_every_stack_and_user(service: str, users: Users, stacks: str) -> None:
    found: list[str] = []
    for kind in USERS:
        found += compare(service, kind, users, stacks)[0]
    assert found == []


#: Debian's services that a caller who is not root meets (setuid programs run
#: PAM with the caller's real uid, as the doctor and the modules see it here).
AS_NOBODY = ("login", "su", "chsh", "chfn", "passwd", "other", "runuser-l", "newusers")


@pytest.mark.parametrize(("service", "kind"), [("login", "healthy"), ("su", "root")])
def test_the_doctor_predicts_what_libpam_does_for_a_caller_that_is_not_root(
    service: str, kind: str, users: Users, stacks: str
) -> None:
    mismatches, _ = compare(service, kind, users, stacks, caller=65534)
    assert mismatches == []


@pytest.mark.slow
@pytest.mark.parametrize("service", AS_NOBODY)
def test_the_sweep_as_a_caller_that_is_not_root(service: str, users: Users, stacks: str) -> None:
    found: list[str] = []
    for kind in USERS:
        found += compare(service, kind, users, stacks, caller=65534)[0]
    assert found == []


@pytest.mark.slow
@pytest.mark.parametrize("origin", ORIGINS)
@pytest.mark.parametrize("service", ["login", "securetty", "access", "access-origin"])
def test_the_sweep_from_a_tty_or_a_remote_host(
    service: str, origin: Origin, users: Users, stacks: str
) -> None:
    found: list[str] = []
    for kind in USERS:
        found += compare(service, kind, users, stacks, origin=origin)[0]
    assert found == []


def predict_and_change(service: str, user: str, new_password: str) -> tuple[str, int]:
    """(the doctor's prediction for chauthtok, libpam's code for it)."""
    predicted = diagnose(service, user).prediction("chauthtok")
    return predicted, run_phase(service, user, None, "chauthtok", new_password)


def compare_chauthtok(service: str, kind: str, name: str, caller: int | None) -> list[str]:
    """Every prompt (new, retyped; the current one as not root) gets one new password."""
    change = functools.partial(predict_and_change, service, name, "Nw-" + secrets.token_hex(8))
    predicted, actual = in_child(change, caller)
    if predicted == "not certain" or (predicted == "refuses") == (actual != 0):
        return []
    return [f"{service} {kind} chauthtok as uid {caller}: predicted {predicted}, got {actual}"]


@pytest.mark.parametrize("caller", [None, 65534])
def test_chauthtok_as_predicted_with_debians_passwd(
    unix_user: tuple[str, str], caller: int | None
) -> None:
    assert compare_chauthtok("passwd", "healthy", unix_user[0], caller) == []


@pytest.mark.slow
@pytest.mark.parametrize("caller", [None, 65534])
def test_the_chauthtok_sweep(caller: int | None) -> None:
    """Its own users, as the passwords change; never root's or nobody's."""
    users = Users()
    try:
        found: list[str] = []
        for kind in USERS:
            if kind in ("root", "nobody"):
                continue
            for service in ("passwd", "login", "other", "chfn"):
                found += compare_chauthtok(service, kind, users.names[kind][0], caller)
        assert found == []
    finally:
        users.cleanup()
