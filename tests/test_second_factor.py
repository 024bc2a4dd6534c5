"""Real second factors as users deploy them: Debian's pam_oath after a password.

The codes are real TOTP codes (pamphlet.testing.totp, checked against
oathtool in test_testing.py), checked by the real pam_oath against a users
file in the service's temporary folder. Each way in is driven from outside,
as a user drives it: the ``pamphlet`` command with piped answers, the web
login example as a server process over plain HTTP, and both SSH examples
with the real OpenSSH client answering through SSH_ASKPASS.
"""

from __future__ import annotations

import contextlib
import html
import http.cookiejar
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pamphlet.testing import TemporaryService
from test_ssh_servers import SERVERS as SSH_SERVERS
from test_ssh_servers import Server as SshServer
from test_ssh_servers import Ssh

ROOT = pathlib.Path(__file__).parent.parent
USERS = {"bob": "hunter2", "alice": "wonder"}
PASSWORD_PROMPT = "Password: "


def otp_prompt(user: str) -> str:
    return f"One-time password (OATH) for `{user}': "


def wrong_code(service: TemporaryService, user: str) -> str:
    """A six-digit code that pam_oath (window 3) cannot accept now or in the next minutes."""
    now = time.time()
    near = {service.totp_code(user, now + 30 * step) for step in range(-8, 9)}
    return next(code for code in (f"{n:06d}" for n in range(1_000_000)) if code not in near)


@pytest.fixture
def totp_service() -> Iterator[TemporaryService]:
    """bob and alice, each with a password and a TOTP key (pam_matrix, then pam_oath)."""
    with TemporaryService.password_and_totp(users=USERS) as service:
        yield service


@contextlib.contextmanager
def custom_stack(stack: str) -> Iterator[TemporaryService]:
    """A stack of the test's own, with ``{pam_oath}`` lines; bob and alice have keys."""
    with TemporaryService(stack, users=USERS) as service:
        for user in USERS:
            service.add_otp_user(user)
        yield service


# -- the command line, answers piped --------------------------------------------


def run_cli(
    service: TemporaryService, user: str, *answers: str
) -> subprocess.CompletedProcess[str]:
    """``pamphlet --confdir DIR SERVICE USER authenticate acct_mgmt``, answers on
    stdin; prompts and results both in ``stdout`` (stderr joined to it)."""
    command = ["--confdir", service.confdir, service.name, user, "authenticate", "acct_mgmt"]
    return subprocess.run(
        [sys.executable, "-m", "pamphlet", *command],
        input="".join(answer + "\n" for answer in answers),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )


def test_cli_right_password_and_code(totp_service):
    proc = run_cli(totp_service, "bob", "hunter2", totp_service.totp_code("bob"))
    assert proc.returncode == 0, proc.stdout
    assert "successfully authenticated" in proc.stdout
    assert "account management done." in proc.stdout
    # Both prompts reached the user, in order, as pam_oath wrote them.
    assert proc.stdout.index(PASSWORD_PROMPT) < proc.stdout.index(otp_prompt("bob"))


def test_cli_wrong_code_is_refused(totp_service):
    proc = run_cli(totp_service, "bob", "hunter2", wrong_code(totp_service, "bob"))
    assert proc.returncode == 1
    assert "authenticate failed: AuthenticationError" in proc.stdout
    assert "account management done." not in proc.stdout


def test_cli_another_users_code_or_a_wrong_password_is_refused(totp_service):
    for answers in (
        ("hunter2", totp_service.totp_code("alice")),
        ("wonder", totp_service.totp_code("bob")),
    ):
        proc = run_cli(totp_service, "bob", *answers)
        assert proc.returncode == 1
        assert "AuthenticationError" in proc.stdout


def test_cli_a_code_used_once_is_refused_within_its_window(totp_service):
    code = totp_service.totp_code("bob")
    assert run_cli(totp_service, "bob", "hunter2", code).returncode == 0
    # The same code, a moment later and well within pam_oath's window: a replay.
    replay = run_cli(totp_service, "bob", "hunter2", code)
    assert replay.returncode == 1
    assert "AuthenticationError" in replay.stdout
    # An older code, still within the window, is refused too: pam_oath accepts
    # only codes after the last one it accepted.
    older = totp_service.totp_code("bob", time.time() - 30)
    assert run_cli(totp_service, "bob", "hunter2", older).returncode == 1
    # The next step's code (within the window) is new, and accepted.
    fresh = totp_service.totp_code("bob", time.time() + 30)
    assert run_cli(totp_service, "bob", "hunter2", fresh).returncode == 0
    # The replay of bob's code did not spend alice's.
    assert run_cli(totp_service, "alice", "wonder", totp_service.totp_code("alice")).returncode == 0


def test_cli_one_code_raced_by_four_logins_lets_one_in(totp_service):
    # pam_oath locks its users file: however the four interleave, the code
    # is accepted once.
    code = totp_service.totp_code("bob")
    command = ["--confdir", totp_service.confdir, totp_service.name, "bob", "authenticate"]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "pamphlet", *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(4)
    ]
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(f"hunter2\n{code}\n")
        process.stdin.close()
    assert sorted(process.wait(timeout=60) for process in processes) == [0, 1, 1, 1]


def test_cli_a_code_too_far_from_now_is_refused(totp_service):
    stale = totp_service.totp_code("bob", time.time() - 30 * 10)
    assert run_cli(totp_service, "bob", "hunter2", stale).returncode == 1


# -- sufficient versus required ----------------------------------------------------

PASSWORD = "auth required {pam_matrix} passdb={passdb}"
ACCOUNT = "account required pam_permit.so"


def oath(control: str) -> str:
    return f"auth {control} {{pam_oath}} usersfile={{oath_usersfile}} window=3"


def asked_prompts(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The prompts the command showed, in the order it showed them."""
    shown = [p for p in (PASSWORD_PROMPT, otp_prompt("bob")) if p in proc.stdout]
    return sorted(shown, key=proc.stdout.index)


def test_required_second_factor_needs_both():
    with custom_stack("\n".join([PASSWORD, oath("required"), ACCOUNT])) as service:
        right, wrong = service.totp_code("bob"), wrong_code(service, "bob")
        # A wrong password is not given away early: the code is still asked.
        proc = run_cli(service, "bob", "wonder", right)
        assert proc.returncode == 1
        assert asked_prompts(proc) == [PASSWORD_PROMPT, otp_prompt("bob")]
        assert run_cli(service, "bob", "hunter2", wrong).returncode == 1
        # pam_oath ran after the failed password and accepted the code, so it
        # is spent: with "required", a wrong password burns the current code.
        assert run_cli(service, "bob", "hunter2", right).returncode == 1
        fresh = service.totp_code("bob", time.time() + 30)
        assert run_cli(service, "bob", "hunter2", fresh).returncode == 0


def test_sufficient_second_factor_after_the_password_is_decoration():
    # The password is required, the code "sufficient": a wrong code fails a
    # sufficient module, which PAM then ignores, so the password alone is enough.
    with custom_stack("\n".join([PASSWORD, oath("sufficient"), ACCOUNT])) as service:
        proc = run_cli(service, "bob", "hunter2", wrong_code(service, "bob"))
        assert proc.returncode == 0, proc.stdout
        assert asked_prompts(proc) == [PASSWORD_PROMPT, otp_prompt("bob")]
        # A right code does not rescue a wrong password: the required line failed.
        assert run_cli(service, "bob", "wonder", service.totp_code("bob")).returncode == 1


def test_sufficient_code_before_the_password_replaces_it():
    # The code first and sufficient: a right code alone lets bob in (the
    # password is never asked), a wrong one falls through to the password.
    with custom_stack("\n".join([oath("sufficient"), PASSWORD, ACCOUNT])) as service:
        proc = run_cli(service, "bob", service.totp_code("bob"))
        assert proc.returncode == 0, proc.stdout
        assert asked_prompts(proc) == [otp_prompt("bob")]
        proc = run_cli(service, "bob", wrong_code(service, "bob"), "hunter2")
        assert proc.returncode == 0, proc.stdout
        assert asked_prompts(proc) == [otp_prompt("bob"), PASSWORD_PROMPT]
        assert run_cli(service, "bob", wrong_code(service, "bob"), "wonder").returncode == 1


def test_a_user_without_a_key_is_refused_unless_the_stack_says_otherwise():
    # pam_oath returns PAM_USER_UNKNOWN for a user missing from its file:
    # "required" refuses carol; [user_unknown=ignore] lets her in on her password.
    stacks = {
        "required": ("\n".join([PASSWORD, oath("required"), ACCOUNT]), 1),
        "ignore": (
            "\n".join([PASSWORD, oath("[success=ok user_unknown=ignore default=die]"), ACCOUNT]),
            0,
        ),
    }
    for stack, status in stacks.values():
        with custom_stack(stack) as service:
            service.add_user("carol", "pw")
            proc = run_cli(service, "carol", "pw", "123456")
            assert proc.returncode == status, proc.stdout


# -- the web login example, a server process, plain HTTP ---------------------------


class WebClient:
    """A browser without a browser: a cookie jar, no redirects followed, the
    pages' forms read with regular expressions."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any) -> None:
                return None

        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), NoRedirect
        )
        self.page = ""

    def request(self, path: str, form: dict[str, str] | None = None) -> int:
        data = None if form is None else urllib.parse.urlencode(form).encode()
        try:
            with self.opener.open(self.base + path, data=data, timeout=30) as response:
                self.page = response.read().decode()
                return int(response.status)
        except urllib.error.HTTPError as error:
            self.page = error.read().decode()
            return int(error.code)

    def field(self, name: str) -> str:
        match = re.search(rf'name="{name}" value="([^"]*)"', self.page)
        assert match, self.page
        return html.unescape(match.group(1))

    @property
    def title(self) -> str:
        match = re.search(r"<h1>(.*?)</h1>", self.page)
        return html.unescape(match.group(1)) if match else ""

    @property
    def labels(self) -> list[tuple[str, str]]:
        """The page's questions: (label, input type)."""
        found = re.findall(r'<label for="answer-\d+">(.*?)</label><input type="(\w+)"', self.page)
        return [(html.unescape(label), kind) for label, kind in found]

    @property
    def notices(self) -> str:
        return html.unescape(re.sub(r"<[^>]+>", " ", self.page))

    def sign_in(self, user: str) -> None:
        assert self.request("/") == 200
        status = self.request("/login", {"username": user, "csrf": self.field("csrf")})
        assert status == 303, self.page
        assert self.request("/") == 200

    def answer(self, *answers: str) -> None:
        form = {"csrf": self.field("csrf"), "step": self.field("step")}
        form.update({f"answer-{index}": answer for index, answer in enumerate(answers)})
        assert self.request("/answer", form) == 303, self.page
        assert self.request("/") == 200


@pytest.fixture
def web_login(totp_service) -> Iterator[tuple[TemporaryService, str]]:
    """``python -m examples.web_login`` serving the password-and-TOTP service."""
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "examples.web_login", "--port", "0"),
            *("--service", totp_service.name, "--confdir", totp_service.confdir),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    url = None
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
        if match:
            url = match.group(1)
        elif not line and process.poll() is not None:
            break
    if url is None:
        process.kill()
        raise AssertionError(f"the web login did not start: {process.communicate()}")
    try:
        yield totp_service, url
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert "Traceback" not in err


def test_web_login_asks_the_password_then_the_code_on_its_own_page(web_login):
    service, url = web_login
    client = WebClient(url)
    client.sign_in("bob")
    assert client.labels == [(PASSWORD_PROMPT, "password")]
    client.answer("hunter2")
    # pam_oath's prompt, exactly as written, on a page of its own, echo off.
    assert client.labels == [(otp_prompt("bob"), "password")]
    client.answer(service.totp_code("bob"))
    assert client.title == "Welcome, bob", client.page
    assert "HOMEDIR" in client.page  # the session is open: pam_matrix's variable


def test_web_login_refuses_a_wrong_code_and_a_replayed_one(web_login):
    service, url = web_login
    code = service.totp_code("alice")
    answers = [wrong_code(service, "alice"), code, code]
    for attempt, answer in enumerate(answers):
        client = WebClient(url)
        client.sign_in("alice")
        client.answer("wonder")
        assert client.labels == [(otp_prompt("alice"), "password")]
        client.answer(answer)
        if attempt == 1:
            assert client.title == "Welcome, alice", client.page
        else:
            assert client.title == "Sign in"
            assert "Login incorrect." in client.notices, client.page
            assert "Welcome" not in client.page


# -- both SSH examples, the real OpenSSH client --------------------------------------


@pytest.fixture(params=sorted(SSH_SERVERS))
def ssh_server(request, totp_service, tmp_path) -> Iterator[Callable[..., Any]]:
    if shutil.which("ssh") is None:
        pytest.fail("the OpenSSH client is missing: apt-get install openssh-client")
    server = SshServer(SSH_SERVERS[request.param], totp_service, tmp_path / "server.log")
    login = Ssh(server.port, tmp_path).run

    try:
        yield login
    finally:
        server.stop()


def test_ssh_right_password_and_code(ssh_server, totp_service):
    result, asked = ssh_server("bob", ["hunter2", totp_service.totp_code("bob")])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "Hello bob"
    # keyboard-interactive carried both of PAM's prompts, one round each.
    assert asked == [f"(bob@127.0.0.1) {PASSWORD_PROMPT}", f"(bob@127.0.0.1) {otp_prompt('bob')}"]


def test_ssh_wrong_code_and_replayed_code_are_refused(ssh_server, totp_service):
    result, asked = ssh_server("bob", ["hunter2", wrong_code(totp_service, "bob")])
    assert result.returncode == 255
    assert "Permission denied" in result.stderr and "Hello" not in result.stdout
    assert len(asked) == 2
    code = totp_service.totp_code("bob")
    result, _asked = ssh_server("bob", ["hunter2", code])
    assert result.returncode == 0, result.stderr
    result, _asked = ssh_server("bob", ["hunter2", code])
    assert result.returncode == 255
    assert "Hello" not in result.stdout
