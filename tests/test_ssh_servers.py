"""The two example SSH servers, logged into with the real OpenSSH client.

ssh runs without a terminal (setsid, stdin from /dev/null); SSH_ASKPASS
(tests/askpass.py) answers its keyboard-interactive prompts and records them.
The servers authenticate against pam_matrix stacks in throwaway confdirs.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time

import paramiko
import pytest

import pamphlet
from conftest import UNIX_STACK, LibpamGate, run_account_tool

ROOT = pathlib.Path(__file__).parent.parent
ASKPASS = pathlib.Path(__file__).parent / "askpass.py"
SERVERS = {
    "paramiko": ROOT / "examples" / "ssh_server.py",
    "asyncssh": ROOT / "examples" / "asyncssh_server.py",
}

STACK = """\
auth optional pam_echo.so Welcome to pamphlet, %u
auth required {pam_matrix} passdb={passdb} verbose
account required {pam_matrix} passdb={passdb}
password required {pam_matrix} passdb={passdb}
session required {pam_matrix} passdb={passdb}
session optional pam_echo.so Your session, %u
"""


class Server:
    """An example server in a subprocess, listening on a free port."""

    def __init__(self, script: pathlib.Path, service, log: pathlib.Path, *options: str) -> None:
        self.log = log
        self.stderr = open(log, "w")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, str(script), "--port", "0", "--service", service.name]
        command += ["--confdir", service.confdir]
        command += options
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        line = self.process.stdout.readline()
        if not line.startswith("listening on 127.0.0.1:"):
            self.stop()
            raise AssertionError(f"the server did not start: {line!r}\n{log.read_text()}")
        self.port = int(line.rsplit(":", 1)[1])

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/task"))

    def wait_for_threads(self, count: int, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.threads() != count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.threads()

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while self.log.read_text().count(text) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.log.read_text()

    def handles(self) -> tuple[int, int]:
        """How many PAM handles the server has started and ended, from its log."""
        log = self.log.read_text()
        return log.count(" started ("), log.count(" ended (")

    def wait_for_handles_ended(self, timeout: float = 30) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        started, ended = self.handles()
        while started != ended and time.monotonic() < deadline:
            time.sleep(0.02)
            started, ended = self.handles()
        return started, ended

    def settled_threads(self) -> int:
        """The thread count once it has stopped changing (threads of past logins gone)."""
        previous, current = -1, self.threads()
        while current != previous:
            time.sleep(0.2)
            previous, current = current, self.threads()
        return current

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr.close()


class Ssh:
    """The OpenSSH client, answering prompts through askpass."""

    def __init__(self, port: int, directory: pathlib.Path) -> None:
        self.port = port
        self.directory = directory
        self.runs = 0

    def command(self, user: str, remote: tuple[str, ...] = ("hello",), *options: str) -> list[str]:
        return [
            "ssh",
            *options,
            "-F",
            "/dev/null",
            "-p",
            str(self.port),
            "-o",
            "PreferredAuthentications=keyboard-interactive",
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "NumberOfPasswordPrompts=1",
            "-o",
            "ConnectTimeout=30",
            f"{user}@127.0.0.1",
            *remote,
        ]

    def start(
        self,
        user: str,
        answers: list[str],
        remote: tuple[str, ...] = ("hello",),
        *options: str,
        stdin: int = subprocess.DEVNULL,
    ) -> tuple[subprocess.Popen[str], pathlib.Path]:
        """Start ssh; askpass answers its prompts with ``answers``, in order.

        ``remote`` is the command (empty: a shell), ``options`` go before the
        others (``-tt`` for a pty)."""
        self.runs += 1
        log = self.directory / f"askpass-{self.runs}.log"
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DISPLAY", "SSH_AUTH_SOCK", "WAYLAND_DISPLAY")
        }
        env.update(
            SSH_ASKPASS=str(ASKPASS),
            SSH_ASKPASS_REQUIRE="force",
            ASKPASS_LOG=str(log),
            ASKPASS_ANSWERS=json.dumps(answers),
        )
        process = subprocess.Popen(
            self.command(user, remote, *options),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # no controlling terminal: ssh uses askpass
        )
        return process, log

    def run(
        self,
        user: str,
        answers: list[str],
        remote: tuple[str, ...] = ("hello",),
        *options: str,
        typed: str | None = None,
    ) -> tuple[subprocess.CompletedProcess[str], list]:
        stdin = subprocess.DEVNULL if typed is None else subprocess.PIPE
        process, log = self.start(user, answers, remote, *options, stdin=stdin)
        try:
            stdout, stderr = process.communicate(typed, timeout=60)
        finally:
            process.kill()
        asked = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), asked


@pytest.fixture(params=sorted(SERVERS))
def server_script(request):
    if shutil.which("ssh") is None:
        pytest.fail("the OpenSSH client is missing: apt-get install openssh-client")
    return SERVERS[request.param]


@pytest.fixture
def login(server_script, make_service, tmp_path):
    """``login(stack) -> (server, ssh)`` with users bob:secret and alice:wonder."""
    started = []

    def start(stack: str = STACK, *options: str, service=None):
        if service is None:
            service = make_service(stack, users={"bob": "secret", "alice": "wonder"})
        server = Server(server_script, service, tmp_path / "server.log", *options)
        started.append(server)
        return server, Ssh(server.port, tmp_path)

    yield start
    for server in started:
        server.stop()


def test_right_password_logs_in_and_runs_the_session(login):
    server, ssh = login()
    result, asked = ssh.run("bob", ["secret"])
    assert result.returncode == 0, result.stderr + server.log.read_text()
    lines = result.stdout.splitlines()
    assert lines[0] == "Hello bob"
    assert "HOMEDIR=/home/bob" in lines  # set by pam_matrix's open_session
    assert any(line.startswith("CRED=") for line in lines)  # and by its setcred
    # the info messages were shown, not asked
    assert asked == ["(bob@127.0.0.1) Password: "]
    assert "Welcome to pamphlet, bob" in result.stderr
    assert "Authentication succeeded" in result.stderr
    assert "Your session, bob" in result.stderr  # said by a session module
    if os.geteuid() == 0:  # why there is no shell: bob is a pam_matrix user only
        assert "no shell for bob: the user 'bob' has no account that NSS knows" in result.stderr
    else:
        assert "no shell for bob: running a program as 'bob' needs root" in result.stderr
    # the channel closed: the session was closed and the handle ended
    assert "PAM handle of bob ended" in server.wait_for_log("PAM handle of bob ended")


def test_wrong_password_is_refused(login):
    server, ssh = login()
    result, asked = ssh.run("bob", ["wonder"])
    assert result.returncode == 255
    assert "Permission denied" in result.stderr
    assert "Hello" not in result.stdout
    assert "Authentication failed" in result.stderr  # pam_matrix's error message, shown
    assert asked == ["(bob@127.0.0.1) Password: "]
    log = server.wait_for_log("PAM handle of bob ended")
    assert "AuthenticationError" in log


def test_unknown_user_is_refused(login):
    _, ssh = login()
    result, _ = ssh.run("mallory", ["secret"])
    assert result.returncode == 255
    assert "Hello" not in result.stdout


def test_account_management_can_refuse_after_a_right_password(login):
    stack = STACK.replace(
        "account required {pam_matrix} passdb={passdb}",
        "account required pam_debug.so acct=perm_denied",
    )
    server, ssh = login(stack)
    result, asked = ssh.run("bob", ["secret"])
    assert result.returncode == 255
    assert "Hello" not in result.stdout
    assert asked == ["(bob@127.0.0.1) Password: "]
    assert "acct" in result.stderr  # pam_debug's message during account management
    assert "PermissionDenied" in server.wait_for_log("PermissionDenied")


def second_factor_stack(tmp_path: pathlib.Path) -> str:
    tokens = tmp_path / "tokens" / "passdb"
    tokens.parent.mkdir()
    tokens.write_text("bob:424242:pamphlet-test\n")
    return STACK.replace(
        "auth required {pam_matrix} passdb={passdb} verbose\n",
        "auth required {pam_matrix} passdb={passdb}\n"
        f"auth required {{pam_matrix}} passdb={tokens} echo verbose\n",
    )


@pytest.mark.parametrize(
    ("answers", "logged_in"),
    [(["secret", "424242"], True), (["secret", "000000"], False)],
    ids=["right-token", "wrong-token"],
)
def test_password_then_second_factor(login, tmp_path, answers, logged_in):
    server, ssh = login(second_factor_stack(tmp_path))
    result, asked = ssh.run("bob", answers)
    assert asked == ["(bob@127.0.0.1) Password: "] * 2  # two prompts, two round trips
    if logged_in:
        assert result.returncode == 0, result.stderr + server.log.read_text()
        assert result.stdout.startswith("Hello bob\n")
    else:
        assert result.returncode == 255
        assert "Hello" not in result.stdout


def test_an_abandoned_login_frees_its_thread_and_handle(login):
    server, ssh = login()
    result, _ = ssh.run("alice", ["wonder"])  # warm up: threads a server keeps
    assert result.returncode == 0, result.stderr
    server.wait_for_log("PAM handle of alice ended")
    baseline = server.wait_for_threads(server.threads())
    time.sleep(0.5)
    baseline = server.threads()

    process, askpass_log = ssh.start("bob", ["<hang up>"])
    try:
        deadline = time.monotonic() + 30
        while not askpass_log.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        # ssh shows the prompt: the server's PAM phase waits in its conversation
        assert server.threads() > baseline
        (askpass_log.parent / (askpass_log.name + ".hangup")).touch()
        process.wait(30)
    finally:
        process.kill()
        process.wait()
    assert server.wait_for_threads(baseline) == baseline
    assert "PAM handle of bob ended" in server.wait_for_log("PAM handle of bob ended")
    # and the server still serves
    result, _ = ssh.run("bob", ["secret"])
    assert result.returncode == 0, result.stderr


def test_answers_that_do_not_fit_the_prompts_are_refused(login):
    """OpenSSH always answers every prompt; paramiko's client can be told not to."""
    server, _ = login()
    transport = paramiko.Transport(("127.0.0.1", server.port))
    try:
        transport.start_client(timeout=30)

        def two_answers_to_one_prompt(title, instructions, prompts):
            return ["secret", "secret"] if prompts else []

        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_interactive("bob", two_answers_to_one_prompt)
    finally:
        transport.close()
    log = server.wait_for_log("PAM handle of bob ended")
    assert "the answers of bob did not fit the prompts" in log
    assert "logged in" not in log


def kbdint_request(user: str) -> paramiko.Message:
    """A USERAUTH_REQUEST for keyboard-interactive, as a client sends it."""
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_USERAUTH_REQUEST)
    message.add_string(user)
    message.add_string("ssh-connection")
    message.add_string("keyboard-interactive")
    message.add_string("")  # language
    message.add_string("")  # submethods
    return message


def test_a_login_retried_then_dropped_ends_every_handle(login, tmp_path):
    """The client retries while the server waits for its answers, then hangs up.

    The first attempt's phase is held inside libpam (a pam_exec gate after
    its aborted conversation) while the retry waits for it to end, and the
    client drops right then: asyncssh cancels the waiting retry, as it
    cancels any authentication in progress when the connection goes.
    Every PAM handle the server started must still be ended, at once, and
    every thread it started for the login must be gone.
    """
    gate = LibpamGate(tmp_path)
    stack = STACK.replace(
        "auth required {pam_matrix} passdb={passdb} verbose\n",
        "auth required {pam_matrix} passdb={passdb} verbose\n" + gate.line("auth") + "\n",
    )
    server, ssh = login(stack)
    gate.open()  # warm up: the threads a server keeps once it has served a login
    result, _ = ssh.run("alice", ["wonder"])
    assert result.returncode == 0, result.stderr + server.log.read_text()
    assert server.wait_for_handles_ended() == (1, 1)
    baseline = server.settled_threads()
    gate.opened.unlink()
    gate.entered.unlink()

    sock = socket.create_connection(("127.0.0.1", server.port))
    transport = paramiko.Transport(sock)
    retried, dropped = threading.Event(), threading.Event()

    def retry_instead_of_answering(title, instructions, prompts):
        if prompts and not retried.is_set():
            transport._send_message(kbdint_request("bob"))
            retried.set()
            dropped.wait(60)
        return ["secret"] * len(prompts)

    def authenticate():
        try:
            transport.auth_interactive("bob", retry_instead_of_answering)
        except (paramiko.SSHException, EOFError, OSError):
            pass  # the connection is dropped under it

    client = threading.Thread(target=authenticate, daemon=True)
    try:
        transport.start_client(timeout=30)
        client.start()
        assert retried.wait(30)
        # the first attempt's phase: conversation aborted by the retry, now
        # inside libpam, and the retry waits for it to end
        gate.wait_entered()
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    finally:
        dropped.set()
        transport.close()
        client.join(30)
    gate.open()
    started, ended = server.wait_for_handles_ended()
    log = server.log.read_text()
    assert started >= 2 and ended == started, log
    assert [line for line in log.splitlines() if " ended (" in line][-1].endswith("(0 open)")
    assert server.wait_for_threads(baseline) == baseline
    # and the server still serves
    result, _ = ssh.run("bob", ["secret"])
    assert result.returncode == 0, result.stderr + server.log.read_text()


@pytest.fixture
def expired_user(unix_user):
    """A throwaway system user whose password has expired (``chage -d 0``).

    As root the servers run the client's command as the user, through the
    account's shell: /bin/sh, and the command says hello (see GREET)."""
    run_account_tool(["chage", "-d", "0", unix_user[0]], check=True)
    run_account_tool(["usermod", "--shell", "/bin/sh", unix_user[0]], check=True)
    return unix_user


#: The command a system user's login runs: the pam_matrix users' greeting, as the user.
GREET = ("echo Hello $(id -un)",)


@pytest.mark.root  # pam_unix reads and writes /etc/shadow
def test_an_expired_password_is_changed_in_the_same_exchange(login, make_service, expired_user):
    """As OpenSSH's sshd: account management says the password has expired,
    the client changes it in the same keyboard-interactive exchange, and only
    then is let in; the new password is the one that works next time."""
    name, old = expired_user
    new = "Nw-" + secrets.token_hex(8)
    server, ssh = login(service=make_service(UNIX_STACK))
    result, asked = ssh.run(name, [old, old, new, new], GREET)
    assert result.returncode == 0, result.stderr + server.log.read_text()
    assert result.stdout.startswith(f"Hello {name}\n")
    prefix = f"({name}@127.0.0.1) "
    assert asked == [
        prefix + "Password: ",
        prefix + "Current password: ",
        prefix + "New password: ",
        prefix + "Retype new password: ",
    ]
    # pam_unix's messages were shown to the client, not asked
    assert "You are required to change your password immediately" in result.stderr
    assert f"Changing password for {name}." in result.stderr
    assert "PAM handle of " + name + " ended" in server.wait_for_log(f"PAM handle of {name} ended")

    # the change took: the new password logs in, with nothing more to change
    result, asked = ssh.run(name, [new], GREET)
    assert result.returncode == 0, result.stderr + server.log.read_text()
    assert asked == [prefix + "Password: "]
    result, _ = ssh.run(name, [old])
    assert result.returncode == 255


@pytest.mark.root
def test_an_expired_password_not_changed_is_refused(login, make_service, expired_user):
    name, old = expired_user
    server, ssh = login(service=make_service(UNIX_STACK))
    # the right password, then a wrong current password for the change
    result, asked = ssh.run(name, [old, "wrong", "Nw-x1y2z3w4", "Nw-x1y2z3w4"])
    assert result.returncode == 255
    assert "Hello" not in result.stdout
    assert len(asked) == 2  # Password, Current password: the change failed there
    assert "PAM handle of " + name + " ended" in server.wait_for_log(f"PAM handle of {name} ended")
    # still expired, still the old password: the next login must change it
    new = "Nw-" + secrets.token_hex(8)
    result, asked = ssh.run(name, [old, old, new, new], GREET)
    assert result.returncode == 0, result.stderr + server.log.read_text()
    assert len(asked) == 4


def test_paramiko_the_login_grace_ending_mid_retry_leaves_no_handle(matrix, monkeypatch):
    """The grace time ends (serve_connection calls end_pam) while the transport's
    thread is between ending a retried attempt's handle and making the next:
    that next handle must not be kept, nor wait for answers that never come."""
    from examples import ssh_server

    made: list[pamphlet.ThreadedPamApplication] = []
    making, made_go_on = threading.Event(), threading.Event()

    class HeldApplication(pamphlet.ThreadedPamApplication):
        def __init__(self, *args, **kwargs):
            making.set()
            made_go_on.wait(30)  # held between the old handle's end and the new one
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(pamphlet, "ThreadedPamApplication", HeldApplication)
    server = ssh_server.SshServer(matrix.name, matrix.confdir, "127.0.0.1")
    outcome = []
    transport_thread = threading.Thread(
        target=lambda: outcome.append(server.check_auth_interactive("bob", "")), daemon=True
    )
    try:
        transport_thread.start()
        assert making.wait(30)
        server.end_pam()  # the login grace time is over
        made_go_on.set()
        transport_thread.join(30)
        assert outcome == [paramiko.AUTH_FAILED]
        assert len(made) == 1
        assert made[0].ended  # ended at once, not left for the garbage collector
        assert made[0].conversation_timeout is not None
        assert server.pam is None
    finally:
        made_go_on.set()
        for app in made:
            app.end()


def test_paramiko_every_handle_has_a_conversation_timeout(matrix):
    from examples import ssh_server

    server = ssh_server.SshServer(matrix.name, matrix.confdir, "127.0.0.1")
    try:
        query = server.check_auth_interactive("bob", "")
        assert isinstance(query, paramiko.server.InteractiveQuery)
        assert server.pam is not None
        assert 0 < server.pam.conversation_timeout <= ssh_server.LOGIN_GRACE
    finally:
        server.end_pam()
    assert server.pam is None


def banner_or_eof(sock: socket.socket) -> bytes:
    """The server's first bytes: its SSH banner, or b"" if it closed the connection."""
    sock.settimeout(30)
    try:
        return sock.recv(64)
    except ConnectionResetError:
        return b""


def test_connections_logging_in_are_capped(login):
    """--max-startups 2: a third connection that has not logged in is closed before
    the banner; a slot freed by a client leaving is given to the next."""
    server, ssh = login(STACK, "--max-startups", "2")
    result, _ = ssh.run("alice", ["wonder"])  # warm up
    assert result.returncode == 0, result.stderr + server.log.read_text()
    server.wait_for_handles_ended()
    baseline = server.settled_threads()
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    refused = []
    try:
        for sock in held:
            assert banner_or_eof(sock).startswith(b"SSH-2.0-")
        for _ in range(10):
            refused.append(socket.create_connection(("127.0.0.1", server.port)))
            assert banner_or_eof(refused[-1]) == b""
        assert "too many logins in progress" in server.log.read_text()
        result, _ = ssh.run("bob", ["secret"])
        assert result.returncode == 255
        assert "Hello" not in result.stdout
        assert server.threads() <= baseline + 8  # two connections' worth, not twelve
    finally:
        for sock in held + refused:
            sock.close()
    # the slots come back when the connections end
    deadline = time.monotonic() + 30
    while True:
        result, _ = ssh.run("bob", ["secret"])
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert result.returncode == 0, result.stderr + server.log.read_text()


def test_a_login_past_its_grace_time_is_ended(login):
    """--login-grace 2: a client that never answers is disconnected, its handle
    ended and its threads gone, without waiting for the conversation timeout."""
    server, ssh = login(STACK, "--login-grace", "2")
    result, _ = ssh.run("alice", ["wonder"])  # warm up
    assert result.returncode == 0, result.stderr + server.log.read_text()
    server.wait_for_handles_ended()
    baseline = server.settled_threads()
    process, askpass_log = ssh.start("bob", ["<hang up>"])  # waits at the prompt
    try:
        deadline = time.monotonic() + 30
        while not askpass_log.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert askpass_log.exists()  # the server's phase waits in its conversation
        # (ssh itself notices only once askpass returns)
        started, ended = server.wait_for_handles_ended()
        assert started == ended == 2, server.log.read_text()
        assert server.wait_for_threads(baseline) == baseline
    finally:
        (askpass_log.parent / (askpass_log.name + ".hangup")).touch()
        process.kill()
        process.wait()


# -- a real login: root, a system user, pamphlet.process ---------------------------

LOGIN_STACK = """\
auth     required pam_unix.so
account  required pam_unix.so
password required pam_unix.so yescrypt
session  required pam_exec.so quiet {marker}
session  required pam_unix.so
"""


@pytest.fixture
def login_account(tmp_path):
    """A throwaway system user with a home and /bin/sh, and a session marker script."""
    name = "pmph" + secrets.token_hex(4)
    password = "Pw-" + secrets.token_hex(8)
    run_account_tool(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
    try:
        run_account_tool(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
        markers = tmp_path / "markers"
        script = tmp_path / "marker.sh"
        script.write_text(f'#!/bin/sh\necho "$PAM_TYPE $PAM_TTY" >> {markers}\n')
        script.chmod(0o755)
        yield name, password, script, markers
    finally:
        run_account_tool(["userdel", "--remove", name], check=True, capture_output=True)


def wait_for_lines(path: pathlib.Path, count: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.02)
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.root
def test_root_runs_the_command_as_the_user(login, make_service, login_account):
    name, password, script, markers = login_account
    server, ssh = login(service=make_service(LOGIN_STACK.format(marker=script)))
    result, _ = ssh.run(name, [password], ("id -un; echo $HOME; pwd; exit 3",))
    assert result.returncode == 3, result.stderr + server.log.read_text()
    home = f"/home/{name}"
    assert result.stdout.splitlines() == [name, home, home]
    assert "Hello" not in result.stdout
    # the session was opened before the command and closed once it exited
    assert [line.split()[0] for line in wait_for_lines(markers, 2)] == [
        "open_session",
        "close_session",
    ]
    assert "PAM handle of " + name + " ended" in server.wait_for_log(f"PAM handle of {name} ended")


@pytest.mark.root
def test_root_gives_a_login_shell_on_a_pty(login, make_service, login_account):
    name, password, script, markers = login_account
    server, ssh = login(service=make_service(LOGIN_STACK.format(marker=script)))
    typed = 'echo "answer=$((6*7))"; tty; echo "arg""v0=$0"; exit 4\n'
    result, _ = ssh.run(name, [password], (), "-tt", typed=typed)
    assert result.returncode == 4, result.stderr + server.log.read_text()
    assert "answer=42" in result.stdout
    assert "argv0=-sh" in result.stdout  # a login shell
    (terminal,) = [line for line in result.stdout.splitlines() if line.startswith("/dev/pts/")]
    # PAM_TTY was the pty's name; the session closed when the client left
    assert wait_for_lines(markers, 2) == [
        f"open_session {terminal.strip()}",
        f"close_session {terminal.strip()}",
    ]


@pytest.mark.root
def test_a_client_that_hangs_up_ends_the_program_and_the_session(
    login, make_service, login_account
):
    """As sshd: the client's connection drops while its program runs on a pty;
    the program gets SIGHUP, and the session is closed once it has gone."""
    name, password, script, markers = login_account
    server, ssh = login(service=make_service(LOGIN_STACK.format(marker=script)))
    process, _ = ssh.start(
        name, [password], ("echo pid=$$; exec sleep 60",), "-tt", stdin=subprocess.PIPE
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("pid="), line + server.log.read_text()
        pid = int(line.strip()[4:])
        assert os.path.exists(f"/proc/{pid}")
        process.kill()  # the client goes away without a word
        process.wait(30)
    finally:
        process.kill()
        process.wait()
    lines = wait_for_lines(markers, 2)
    assert [line.split()[0] for line in lines] == ["open_session", "close_session"]
    assert not os.path.exists(f"/proc/{pid}")
    assert "PAM handle of " + name + " ended" in server.wait_for_log(f"PAM handle of {name} ended")
