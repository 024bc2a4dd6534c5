"""A program run as the user inside the PAM session (pamphlet.process), as root.

A throwaway system user with a home and a supplementary group logs in
through a confdir stack of real modules: pam_unix, pam_exec markers in every
type, pam_group (adding a throwaway group), pam_env, pam_limits. Each login
runs in a process of its own (tests/login_scenario.py) inside a private mount
namespace, where /etc/security/group.conf is bind-mounted from the test's
own file: pam_group 1.5.2 has no option to read another one, and the
machine's file is never touched.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import pathlib
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

import pamphlet
from conftest import run_account_tool
from pamphlet.process import LoginIncompleteError, NotRootError, UnknownUserError, UserSession

pytestmark = pytest.mark.root

SCENARIO = pathlib.Path(__file__).parent / "login_scenario.py"
NOFILE_SOFT, NOFILE_HARD = 777, 888

STACK = """\
auth     required pam_unix.so
auth     required pam_exec.so quiet {marker}
auth     optional pam_group.so
auth     optional pam_debug.so auth=success cred=success
account  required pam_unix.so
account  required pam_exec.so quiet {marker}
session  required pam_exec.so quiet {marker}
{session_extra}session  required pam_env.so readenv=1 conffile={pam_env} envfile={envfile} \
user_readenv=0
session  required pam_limits.so conf={limits}
session  required pam_unix.so
"""

#: What the child prints: who it is, its ids, groups, directory, environment, limit.
REPORT = (
    "echo child-start >> {markers}; "
    'echo "user=$(id -un)"; echo "groups=$(id -G)"; grep -E "^(Uid|Gid):" /proc/self/status; '
    'echo "cwd=$(pwd)"; echo "nofile=$(ulimit -n)"; '
    'ls -l /proc/self/fd | sed -n "s/^.* \\([0-9]*\\) -> /fd:\\1 /p"; '
    "env | sed 's/^/env:/'; echo child-end >> {markers}"
)


@dataclasses.dataclass
class Account:
    name: str
    password: str
    extra_group: str  # a supplementary group of the account
    pam_group: str  # the group pam_group adds


@dataclasses.dataclass
class Site:
    """The stack's files, in a folder the user's programs may write to (markers)."""

    account: Account
    folder: pathlib.Path
    confdir: pathlib.Path
    service: str = "pmph-login"

    @property
    def markers(self) -> pathlib.Path:
        return self.folder / "markers"

    def marker_lines(self) -> list[str]:
        return self.markers.read_text().split()

    def write_stack(self, session_extra: str = "") -> None:
        (self.confdir / self.service).write_text(
            STACK.format(
                marker=self.folder / "marker.sh",
                pam_env=self.folder / "pam_env.conf",
                envfile=self.folder / "environment",
                limits=self.folder / "limits.conf",
                session_extra=session_extra,
            )
        )

    def run(self, command: list[str], **orders: object) -> dict:
        """One login in its own process and mount namespace; its JSON report."""
        process = self.start(command, **orders)
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        return json.loads(stdout)

    def start(self, command: list[str], **orders: object) -> subprocess.Popen[str]:
        orders = {
            "service": self.service,
            "confdir": str(self.confdir),
            "user": self.account.name,
            "password": self.account.password,
            "command": command,
            **orders,
        }
        group_conf = self.folder / "group.conf"
        script = f'mount --bind {group_conf} /etc/security/group.conf && exec "$0" "$@"'
        environment = dict(os.environ, PAMPHLET_SERVER_SECRET="do-not-leak")
        return subprocess.Popen(
            [
                *("unshare", "--mount", "--propagation", "private", "sh", "-c", script),
                *(sys.executable, str(SCENARIO), json.dumps(orders)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )


@pytest.fixture
def account() -> Iterator[Account]:
    name = "pmph" + secrets.token_hex(4)
    made = Account(name, "Pw-" + secrets.token_hex(8), name + "x", name + "g")
    run_account_tool(["groupadd", made.extra_group], check=True)
    run_account_tool(["groupadd", made.pam_group], check=True)
    try:
        run_account_tool(
            ["useradd", "--create-home", "--shell", "/bin/sh", "-G", made.extra_group, name],
            check=True,
        )
        try:
            run_account_tool(["chpasswd"], input=f"{name}:{made.password}\n", text=True, check=True)
            yield made
        finally:
            run_account_tool(["userdel", "--remove", name], check=True, capture_output=True)
    finally:
        run_account_tool(["groupdel", made.extra_group], check=True)
        run_account_tool(["groupdel", made.pam_group], check=True)


@pytest.fixture
def site(account: Account) -> Iterator[Site]:
    folder = pathlib.Path(tempfile.mkdtemp(prefix="pamphlet-login-"))
    folder.chmod(0o755)
    confdir = folder / "pam.d"
    confdir.mkdir()
    made = Site(account, folder, confdir)
    made.markers.touch()
    made.markers.chmod(0o666)  # the child, as the user, writes its own markers
    marker = folder / "marker.sh"
    marker.write_text(f'#!/bin/sh\necho "$PAM_TYPE" >> {made.markers}\n')
    marker.chmod(0o755)
    (folder / "pam_env.conf").write_text("PMPH_FROM_PAM_ENV DEFAULT=set-for-@{PAM_USER}\n")
    (folder / "environment").write_text("")
    (folder / "limits.conf").write_text(
        f"{account.name} soft nofile {NOFILE_SOFT}\n{account.name} hard nofile {NOFILE_HARD}\n"
    )
    (folder / "group.conf").write_text(f"*;*;{account.name};Al0000-2400;{account.pam_group}\n")
    made.write_stack()
    yield made
    shutil.rmtree(folder)


def lines_of(report: dict) -> dict[str, str]:
    found = {}
    for line in report["stdout"].splitlines():
        separator = ":" if line.startswith(("Uid:", "Gid:")) else "="
        key, sep, value = line.partition(separator)
        if sep:
            found.setdefault(key, value)
    return found


def test_the_program_runs_as_the_user_in_the_session(site: Site) -> None:
    account = site.account
    report = site.run(["sh", "-c", REPORT.format(markers=site.markers)])
    assert report["failed"] == {} and report["refused"] is None, report
    assert report["returncode"] == 0, report
    seen = lines_of(report)
    entry = pwd.getpwnam(account.name)
    assert seen["user"] == account.name
    # real, effective, saved and filesystem ids: all the user's
    assert seen["Uid"].split() == [str(entry.pw_uid)] * 4
    assert seen["Gid"].split() == [str(entry.pw_gid)] * 4
    # exactly the account's groups, plus the one pam_group added
    expected = set(os.getgrouplist(account.name, entry.pw_gid))
    assert grp.getgrnam(account.extra_group).gr_gid in expected
    expected.add(grp.getgrnam(account.pam_group).gr_gid)
    assert {int(g) for g in seen["groups"].split()} == expected
    assert seen["cwd"] == entry.pw_dir
    assert seen["nofile"] == str(NOFILE_SOFT)  # pam_limits, in the session
    # no descriptor of the server (it holds inheritable ones): stdio, and ls's own
    descriptors = [line[3:].split() for line in report["stdout"].splitlines() if line[:3] == "fd:"]
    assert [d[0] for d in descriptors] == ["0", "1", "2", "3"], descriptors
    assert descriptors[3][1].startswith("/proc/") and descriptors[3][1].endswith("/fd")
    environment = {
        line[4:].partition("=")[0]: line[4:].partition("=")[2]
        for line in report["stdout"].splitlines()
        if line.startswith("env:")
    }
    assert environment["PMPH_FROM_PAM_ENV"] == f"set-for-{account.name}"
    assert environment["HOME"] == entry.pw_dir
    assert environment["USER"] == environment["LOGNAME"] == account.name
    assert environment["SHELL"] == "/bin/sh"
    assert environment["PATH"] == pamphlet.process.DEFAULT_PATH
    assert "PAMPHLET_SERVER_SECRET" not in environment
    assert not any(name.startswith("PYTEST") for name in environment)
    # the order: auth, account, open_session, the child, then close_session
    assert site.marker_lines() == [
        "auth",
        "account",
        "open_session",
        "child-start",
        "child-end",
        "close_session",
    ]
    # and the server got its own groups back after pam_group's setcred
    assert grp.getgrnam(account.pam_group).gr_gid not in report["server_groups"]


def test_the_session_api_reports_the_home_directory(site: Site) -> None:
    report = site.run(["true"], session_api=True)
    assert report["returncode"] == 0, report
    assert report["cwd"] == pwd.getpwnam(site.account.name).pw_dir


def test_a_missing_home_starts_in_root(site: Site) -> None:
    shutil.rmtree(pwd.getpwnam(site.account.name).pw_dir)
    report = site.run(["pwd"], session_api=True)
    assert report["returncode"] == 0, report
    assert report["stdout"] == "/\n"
    assert report["cwd"] == "/"


def test_a_wrong_password_runs_nothing(site: Site) -> None:
    report = site.run(
        ["sh", "-c", f"echo child-start >> {site.markers}"], password="wrong-" + "x" * 8
    )
    assert report["failed"]["authenticate"] == "AuthenticationError"
    assert report["refused"][0] == "LoginIncompleteError"
    assert "authenticate" in report["refused"][1]
    assert "child-start" not in site.marker_lines()
    assert "open_session" not in site.marker_lines()


def test_an_expired_account_runs_nothing(site: Site) -> None:
    run_account_tool(["chage", "-E", "0", site.account.name], check=True)
    report = site.run(["sh", "-c", f"echo child-start >> {site.markers}"])
    assert report["failed"] == {"acct_mgmt": "AccountExpired"}
    assert report["refused"][0] == "LoginIncompleteError"
    assert "acct_mgmt" in report["refused"][1]
    # (required: the stack goes on after pam_unix refused, then fails)
    assert site.marker_lines() == ["auth", "account"]


def test_a_failing_session_module_runs_nothing_and_deletes_the_credentials(site: Site) -> None:
    site.write_stack(session_extra="session  required pam_exec.so quiet /bin/false\n")
    report = site.run(["sh", "-c", f"echo child-start >> {site.markers}"])
    assert report["failed"] == {"session": "SystemError"}  # pam_exec: the script failed
    assert "child-start" not in site.marker_lines()
    # pam_debug speaks on each setcred: established, then deleted
    assert report["said"].count("cred=success") == 2


def test_exit_status_and_death_by_signal_as_subprocess(site: Site) -> None:
    assert site.run(["sh", "-c", "exit 7"])["returncode"] == 7
    assert site.run(["sh", "-c", "kill -TERM $$"])["returncode"] == -signal.SIGTERM


@pytest.mark.parametrize("trap", ["", "trap '' TERM; "], ids=["plain", "ignoring-SIGTERM"])
def test_sigterm_to_the_server_ends_the_child_and_closes_the_session(site: Site, trap) -> None:
    """As su: SIGTERM goes to the program (SIGKILL after 2 s if it ignores it), the
    session is closed, then the server dies of the signal it got."""
    start = f"{trap}echo child-start $$ >> {site.markers}; exec sleep 60"
    process = site.start(["sh", "-c", start])
    try:
        deadline = time.monotonic() + 30
        while "child-start" not in site.markers.read_text():
            assert time.monotonic() < deadline, process.stderr
            time.sleep(0.02)
        child = int(site.marker_lines()[site.marker_lines().index("child-start") + 1])
        # the scenario's python runs under unshare's sh (exec'd): same pid
        os.kill(process.pid, signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGTERM  # the signal took its course after closing
    assert site.marker_lines()[-1] == "close_session"
    assert not os.path.exists(f"/proc/{child}")


def test_the_child_cannot_become_root_again(site: Site) -> None:
    code = (
        "import os\n"
        "for call in (lambda: os.setuid(0), lambda: os.setresuid(0, 0, 0), lambda: os.setgid(0)):\n"
        "    try:\n        call()\n        print('regained')\n"
        "    except PermissionError:\n        print('refused')\n"
        "print(os.getresuid(), os.getresgid())\n"
    )
    report = site.run(["/usr/bin/python3", "-c", code])
    entry = pwd.getpwnam(site.account.name)
    assert report["stdout"].splitlines() == [
        "refused",
        "refused",
        "refused",
        str((entry.pw_uid,) * 3) + " " + str((entry.pw_gid,) * 3),
    ]


def test_runuser_mode_needs_only_the_session(site: Site) -> None:
    report = site.run(["id", "-un"], phases=[])
    assert report["refused"][0] == "LoginIncompleteError"
    report = site.run(["id", "-un"], phases=[], session_only=True)
    assert report["stdout"] == site.account.name + "\n"
    assert site.marker_lines() == ["open_session", "close_session"]


def test_refusals_without_root_or_without_an_account(matrix, unix_user) -> None:
    class Login(pamphlet.PamApplication):
        def conversation(self, messages):
            return ["secret" if m.is_prompt else "" for m in messages]

    with Login(matrix.name, "bob", confdir=matrix.confdir) as app:
        app.authenticate()
        app.account_management()
        with pytest.raises(UnknownUserError, match="no account that NSS knows"):
            UserSession(app).popen(["true"])
    code = f"""
import os, pamphlet
from pamphlet.process import UserSession, NotRootError
with pamphlet.PamApplication({matrix.name!r}, {unix_user[0]!r}, confdir={matrix.confdir!r}) as app:
    os.setresuid(65534, 65534, 65534)  # a server that dropped root after pam_start
    try:
        UserSession(app, session_only=True).popen(["true"])
    except NotRootError as error:
        print("refused:", error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "refused: running a program as" in result.stdout, result.stderr
    assert "needs root" in result.stdout and "broker" in result.stdout
    assert NotRootError.__mro__[1] is pamphlet.process.LoginRefused


def test_a_refusal_writes_an_audit_line(matrix, caplog) -> None:
    class Login(pamphlet.PamApplication):
        def conversation(self, messages):
            return ["wrong" if m.is_prompt else "" for m in messages]

    with Login(matrix.name, "root", confdir=matrix.confdir) as app:
        with pytest.raises(pamphlet.PamError):
            app.authenticate()
        with pytest.raises(LoginIncompleteError):
            UserSession(app).popen(["true"])
    (line,) = [r.getMessage() for r in caplog.records if r.name == "pamphlet.process"]
    assert line.startswith("refused=LoginIncompleteError ")
    assert 'user="root"' in line


PERMIT_STACK = """\
auth     required pam_permit.so
account  required pam_permit.so
session  required pam_exec.so quiet {script}
"""


class Permitted(pamphlet.PamApplication):
    def conversation(self, messages):
        return ["" for _ in messages]


def read_until(terminal, text: bytes, timeout: float = 30) -> bytes:
    """What the pty said, up to and including ``text``."""
    import select

    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline, seen
        if select.select([terminal], [], [], 0.1)[0]:
            try:
                seen += os.read(terminal.fileno(), 4096)
            except OSError:  # EIO: the child has gone
                break
    return seen


def test_a_pty_is_the_controlling_terminal_and_pam_tty(unix_user, tmp_path) -> None:
    seen_tty = tmp_path / "pam_tty"
    script = tmp_path / "tty.sh"
    script.write_text(f'#!/bin/sh\necho "$PAM_TYPE $PAM_TTY" >> {seen_tty}\n')
    script.chmod(0o755)
    service = pamphlet.testing.TemporaryService(PERMIT_STACK.format(script=script))
    try:
        with Permitted(service.name, unix_user[0], confdir=service.confdir) as app:
            app.authenticate()
            app.account_management()
            with UserSession(app) as session:
                # a login shell (the account's is /bin/false)
                process = session.popen(["/bin/sh"], argv0="-sh", pty=(33, 101))
                assert process.args == ["/bin/sh"]
                terminal = process.pty
                assert terminal is not None
                terminal.write(b'tty; stty size; ps -o tty= -p $$; echo "arg""v0=$0"\n')
                said = read_until(terminal, b"argv0=-sh")
                process.resize(40, 120)
                terminal.write(b"stty size; exit 5\n")
                said += read_until(terminal, b"40 120")
                assert process.wait(30) == 5
                terminal.close()
            name = app.tty
    finally:
        service.cleanup()
    assert name is not None and name.startswith("/dev/pts/")
    text = said.decode()
    assert name in text  # tty printed the PAM_TTY item's terminal
    assert "33 101" in text
    assert "\r\n" + name[len("/dev/") :] + "\r\n" in text  # ps: the controlling terminal
    assert "argv0=-sh" in text
    assert seen_tty.read_text().split("\n")[:2] == [
        f"open_session {name}",
        f"close_session {name}",
    ]


def test_the_command_line_runs_the_command_as_the_user(unix_user, make_service) -> None:
    from conftest import UNIX_STACK
    from test_cli import run_cli

    name, password = unix_user
    service = make_service(UNIX_STACK)
    operations = [service.name, name, "authenticate", "acct_mgmt", "open_session"]
    result = run_cli(
        "--confdir",
        service.confdir,
        *operations,
        "--exec",
        "--",
        "sh",
        "-c",
        "id -un; exit 7",
        answers=password + "\n",
    )
    assert result.returncode == 7, result.stderr
    assert result.stdout.splitlines() == [
        "pamphlet: successfully authenticated",
        "pamphlet: account management done.",
        "pamphlet: successfully opened a session",
        name,
    ]
    # the account has no home: sshd's words, and the program starts in /
    assert f"Could not chdir to home directory /home/{name}" in result.stderr

    wrong = run_cli(
        "--confdir", service.confdir, *operations, "--exec", "--", "id", answers="wrong\n"
    )
    assert wrong.returncode == 1
    assert name not in wrong.stdout
    assert "authenticate failed" in wrong.stderr

    skipped = run_cli(
        "--confdir", service.confdir, service.name, name, "open_session", "--exec", "--", "id"
    )
    assert skipped.returncode == 1
    assert "LoginIncompleteError" in skipped.stderr and "authenticate" in skipped.stderr
    runuser = run_cli(
        "--confdir", service.confdir, "--session-only", service.name, name, "open_session",
        "--exec", "--", "id", "-un",
    )  # fmt: skip
    assert runuser.returncode == 0, runuser.stderr
    assert runuser.stdout.splitlines()[-1] == name
    # what follows the answers on standard input is the command's
    piped = run_cli(
        "--confdir", service.confdir, *operations, "--exec", "--", "cat",
        answers=password + "\nfor the command\n",
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.splitlines()[-1] == "for the command"
    bad = run_cli("--confdir", service.confdir, service.name, name, "authenticate", "--exec")
    assert bad.returncode == 2
    assert "--exec" in bad.stderr


def test_a_handle_in_a_broker_worker_is_refused(unix_user) -> None:
    """The worker's process got the session's groups and limits, not this one."""
    from broker_harness import Broker, public_dir

    confdir = public_dir("pamphlet-confdir-")
    (confdir / "permit").write_text(
        "auth required pam_permit.so\naccount required pam_permit.so\n"
        "session required pam_permit.so\n"
    )
    broker = Broker('[[allow]]\nusers = ["root"]\nservices = ["permit"]\n', str(confdir))
    try:
        with Permitted("permit", unix_user[0], broker=broker.socket) as app:
            app.authenticate()
            app.account_management()
            with pytest.raises(pamphlet.process.BrokeredHandleError, match="broker worker"):
                UserSession(app).popen(["true"])
    finally:
        broker.cleanup()
        shutil.rmtree(confdir)
