"""pamphlet.testing and its pytest plugin, used the way a user's test suite uses them."""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import pamphlet
from pamphlet import testing
from pamphlet.testing import PamWrapperMissingError, TemporaryService, pam_wrapper_module


class Password(pamphlet.PamApplication):
    def __init__(self, *args, password="", **kwargs):
        self.password = password
        super().__init__(*args, **kwargs)

    def conversation(self, messages):
        return [self.password if m.is_prompt else "" for m in messages]


def test_context_manager_removes_the_confdir():
    with TemporaryService(users={"alice": "secret"}) as service:
        confdir = service.confdir
        assert os.path.isfile(service.path())
        with service.app(Password, "alice", password="secret") as app:
            app.authenticate()
            app.account_management()
    assert not os.path.exists(confdir)


def test_module_lines_and_placeholders(pam_service_factory):
    service = pam_service_factory(
        ["auth required {pam_matrix} passdb={passdb}", "session required pam_echo.so hi"],
        users={"bob": "pw"},
        name="mine",
    )
    lines = pathlib.Path(service.path()).read_text().splitlines()
    assert lines[0] == f"auth required {pam_wrapper_module('pam_matrix')} passdb={service.passdb}"
    assert lines[1] == "session required pam_echo.so hi"
    with service.app(Password, "bob", password="pw") as app:
        app.authenticate()


def test_users_added_later_and_passwords_changed(pam_service_factory):
    service = pam_service_factory(users={})
    service.add_user("carol", "first")
    with service.app(Password, "carol", password="first") as app:
        app.authenticate()
    pamphlet.change_password("carol", "first", "second", service.name, confdir=service.confdir)
    assert service.password_of("carol") == "second"
    assert service.password_of("nobody") is None


def test_bad_user_names_are_refused_and_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ValueError, match="cannot hold ':'"):
        TemporaryService(users={"a:b": "pw"})
    assert os.listdir(tmp_path) == []


def test_as_default_serves_code_that_names_only_a_service(pam_service_factory):
    service = pam_service_factory(users={"alice": "secret"}, name="myapp")
    with service.as_default():
        pamphlet.authenticate("alice", "secret", "myapp")
    assert pamphlet.PamApplication.default_confdir is None
    with pytest.raises(pamphlet.PamError):
        # Outside the block, "myapp" is looked up in /etc/pam.d, where it is not.
        pamphlet.authenticate("alice", "secret", "myapp-" + os.urandom(4).hex())


def test_more_services_in_one_confdir(pam_service_factory):
    service = pam_service_factory("auth required pam_deny.so", name="strict")
    service.add_service("open", "auth required pam_permit.so")
    with pytest.raises(pamphlet.AuthenticationError):
        pamphlet.authenticate("x", "y", "strict", confdir=service.confdir, check_account=False)
    pamphlet.authenticate("x", "y", "open", confdir=service.confdir, check_account=False)


# -- the pytest plugin -------------------------------------------------------


def test_pam_service_defaults(pam_service):
    assert pam_service.password_of("alice") == "secret"
    assert pamphlet.PamApplication.default_confdir is None


@pytest.mark.pam_service("auth required pam_permit.so", name="permit")
def test_pam_service_marker_takes_a_stack(pam_service):
    assert pam_service.name == "permit"
    assert pathlib.Path(pam_service.path()).read_text() == "auth required pam_permit.so\n"


SAMPLE_TESTS = """
import os
import pytest
import pamphlet

CONFDIRS = os.environ["CONFDIRS_FILE"]


def remember(service):
    with open(CONFDIRS, "a") as file:
        file.write(service.confdir + "\\n")


def test_default_user(pam_service):
    remember(pam_service)
    pamphlet.authenticate("alice", "secret", pam_service.name, confdir=pam_service.confdir)


@pytest.mark.pam_service(users={"bob": "hunter2"}, name="login-form", as_default=True)
def test_code_under_test_uses_its_own_service_name(pam_service):
    remember(pam_service)
    pamphlet.authenticate("bob", "hunter2", "login-form")
    with pytest.raises(pamphlet.AuthenticationError):
        pamphlet.authenticate("bob", "wrong", "login-form")


def test_factory(pam_service_factory):
    first = pam_service_factory(users={"a": "1"}, name="one")
    second = pam_service_factory("auth required pam_deny.so", name="two")
    remember(first)
    remember(second)
    pamphlet.authenticate("a", "1", "one", confdir=first.confdir)
    with pytest.raises(pamphlet.AuthenticationError):
        pamphlet.authenticate("a", "1", "two", confdir=second.confdir, check_account=False)


def test_a_failing_login_is_reported(pam_service):
    remember(pam_service)
    pamphlet.authenticate("alice", "not the password", pam_service.name,
                          confdir=pam_service.confdir)
"""


def test_plugin_in_a_users_test_run(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    confdirs = tmp_path / "confdirs"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    env["CONFDIRS_FILE"] = str(confdirs)
    proc = subprocess.run(
        # --strict-markers: the plugin registers its marker; no -p: pytest
        # finds the plugin through its entry point, as in a user's project.
        [sys.executable, "-m", "pytest", "-q", "--strict-markers", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "1 failed, 3 passed" in proc.stdout, proc.stdout + proc.stderr
    assert "test_a_failing_login_is_reported" in proc.stdout
    assert "AuthenticationError: Authentication failure" in proc.stdout
    made = confdirs.read_text().split()
    assert len(made) == 5
    assert not [path for path in made if os.path.exists(path)]


# -- without pam_wrapper --------------------------------------------------------


def pam_wrapper_folder() -> str:
    return os.path.dirname(pam_wrapper_module("pam_matrix"))


needs_root = pytest.mark.root  # conftest skips it without root (a failure in CI)


def without_pam_wrapper(*command: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a mount namespace of its own, where an empty folder
    hides pam_wrapper's modules, as on a machine without the package."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to hide pam_wrapper")
    hide = 'mount -t tmpfs none "$0" && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "sh", "-c", hide, pam_wrapper_folder(), *command],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.root
@needs_root
@pytest.mark.parametrize(
    "code",
    [
        "TemporaryService(users={'alice': 'secret'})",
        "TemporaryService('auth required {pam_matrix} passdb={passdb}')",
    ],
)
def test_missing_pam_wrapper_names_the_package(tmp_path, code):
    script = textwrap.dedent(f"""
        import os, tempfile
        from pamphlet.testing import PamWrapperMissingError, TemporaryService
        tempfile.tempdir = {str(tmp_path)!r}
        try:
            {code}
        except PamWrapperMissingError as error:
            print("refused:", error)
        print("left behind:", os.listdir({str(tmp_path)!r}))
    """)
    proc = without_pam_wrapper(sys.executable, "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert "refused: pam_wrapper's pam_matrix.so was not found" in proc.stdout
    assert "apt-get install libpam-wrapper" in proc.stdout
    assert "left behind: []" in proc.stdout
    assert glob.glob(os.path.join(pam_wrapper_folder(), "pam_matrix.so"))  # still here outside


@pytest.mark.root
@needs_root
def test_demo_without_pam_wrapper_names_the_package():
    proc = without_pam_wrapper(sys.executable, "-m", "pamphlet", "--demo")
    assert proc.returncode == 1
    assert "apt-get install libpam-wrapper" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_module_error_is_a_file_not_found_error():
    assert issubclass(PamWrapperMissingError, FileNotFoundError)
    with pytest.raises(PamWrapperMissingError, match="libpam-wrapper"):
        pam_wrapper_module("pam_no_such_module")


# -- ready-made stacks ----------------------------------------------------------


class Answers(pamphlet.PamApplication):
    """Answers prompts in order from ``answers``; records every message."""

    def __init__(self, *args, answers=(), **kwargs):
        self.answers = list(answers)
        self.seen = []
        super().__init__(*args, **kwargs)

    def conversation(self, messages):
        self.seen.extend(messages)
        return [self.answers.pop(0) if m.is_prompt else None for m in messages]


RFC_KEY = b"12345678901234567890"  # the key of RFC 4226's and RFC 6238's test vectors


def oathtool(*arguments: str) -> str:
    if shutil.which("oathtool") is None:
        pytest.fail("oathtool is missing: apt-get install oathtool")
    return subprocess.run(
        ["oathtool", *arguments], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_codes_match_the_rfc_test_vectors():
    # RFC 4226 appendix D, RFC 6238 appendix B (SHA-1, 8 digits).
    assert [testing.hotp(RFC_KEY, n) for n in range(4)] == ["755224", "287082", "359152", "969429"]
    vectors = {59: "94287082", 1111111109: "07081804", 1234567890: "89005924"}
    for moment, code in vectors.items():
        assert testing.totp(RFC_KEY, moment, digits=8) == code
    assert testing.totp(RFC_KEY, 20000000000, digits=8) == "65353130"


def test_codes_match_oathtool():
    key = os.urandom(20)
    moment = 1_700_000_000 + int.from_bytes(os.urandom(3), "big")
    for digits in (6, 7, 8):
        assert testing.totp(key, moment, digits=digits) == oathtool(
            "--totp", f"--now=@{moment}", f"--digits={digits}", key.hex()
        )
    assert testing.hotp(key, 41) == oathtool("--counter=41", key.hex())
    # A str secret is base32, as authenticator apps show it.
    base32 = oathtool("--verbose", "--totp", key.hex()).split("Base32 secret: ")[1].split()[0]
    assert testing.totp(base32, moment) == testing.totp(key, moment)
    assert testing.totp(base32.lower(), moment) == testing.totp(key, moment)


def test_password_only():
    with TemporaryService.password_only(users={"alice": "secret"}, verbose=True) as service:
        with service.app(Answers, "alice", answers=["secret"]) as app:
            app.authenticate()
            app.account_management()
        assert app.seen == ["Password: ", "Authentication succeeded"]
        assert app.seen[0].wants_password
        with pytest.raises(pamphlet.AuthenticationError):
            pamphlet.authenticate("alice", "wrong", service.name, confdir=service.confdir)


def test_password_and_totp_asks_both_and_checks_both():
    users = {"alice": "secret", "bob": "hunter2"}
    with TemporaryService.password_and_totp(users=users) as service:
        secrets = service.otp_secrets
        assert set(secrets) == {"alice", "bob"} and secrets["alice"] != secrets["bob"]
        assert service.totp_code("alice") == oathtool("--totp", secrets["alice"].hex())
        code = service.totp_code("alice")
        with service.app(Answers, "alice", answers=["secret", code]) as app:
            app.authenticate()
            app.account_management()
        assert app.seen == ["Password: ", "One-time password (OATH) for `alice': "]
        assert all(message.wants_password for message in app.seen)
        # pam_oath recorded the code it accepted: the same code again is a replay.
        with service.app(Answers, "alice", answers=["secret", code]) as app:
            with pytest.raises(pamphlet.AuthenticationError):
                app.authenticate()
        # bob's code is not alice's; a right code does not make up for a wrong password.
        for answers in (["secret", service.totp_code("bob")], ["wrong", service.totp_code("bob")]):
            with service.app(Answers, "alice", answers=answers) as app:
                with pytest.raises(pamphlet.AuthenticationError):
                    app.authenticate()
        # pamphlet.authenticate has no code to give: it fails closed, naming the prompt.
        with pytest.raises(pamphlet.ConversationError, match="One-time password"):
            pamphlet.authenticate("bob", "hunter2", service.name, confdir=service.confdir)


def test_password_and_totp_with_given_secrets_and_digits():
    later = time.time() + 30
    with TemporaryService.password_and_totp(
        users={"alice": "secret", "carol": "pw"}, secrets={"alice": RFC_KEY}, digits=8
    ) as service:
        assert service.otp_secrets == {"alice": RFC_KEY}
        assert service.totp_code("alice", later) == testing.totp(RFC_KEY, later, digits=8)
        with service.app(Answers, "alice", answers=["secret", service.totp_code("alice")]) as app:
            app.authenticate()
        # carol has a password and no key: pam_oath does not know her.
        with service.app(Answers, "carol", answers=["pw", "12345678"]) as app:
            with pytest.raises(pamphlet.UserUnknown):
                app.authenticate()
        with pytest.raises(KeyError, match="carol"):
            service.totp_code("carol")


def test_the_usersfile_is_private_and_pam_oath_keeps_it_writable():
    with TemporaryService.password_and_totp(users={"alice": "secret"}) as service:
        usersfile = pathlib.Path(service.oath_usersfile)
        assert usersfile.stat().st_mode & 0o777 == 0o600
        assert usersfile.parent.stat().st_mode & 0o777 == 0o700
        with service.app(Answers, "alice", answers=["secret", service.totp_code("alice")]) as app:
            app.authenticate()
        # pam_oath wrote the code it accepted back into the file.
        assert service.totp_code("alice") in usersfile.read_text()
        # A key added later keeps what pam_oath recorded for the others.
        service.add_otp_user("bob", RFC_KEY)
        assert service.totp_code("alice") in usersfile.read_text()
        assert usersfile.stat().st_mode & 0o777 == 0o600


def test_counter_based_codes_through_pam_oath(pam_service_factory):
    service = pam_service_factory("auth required {pam_oath} usersfile={oath_usersfile} window=2")
    service.add_otp_user("dave", RFC_KEY, hotp=True)
    with pytest.raises(ValueError, match="hotp_code"):
        service.totp_code("dave")
    # Codes 0 and 1 skipped: within the window, code 2 is accepted; then 1 is old.
    for counter, accepted in [(2, True), (1, False), (3, True), (3, False)]:
        with service.app(Answers, "dave", answers=[service.hotp_code("dave", counter)]) as app:
            if accepted:
                app.authenticate()
            else:
                with pytest.raises(pamphlet.AuthenticationError):
                    app.authenticate()


def test_expired_password_for_everyone_or_the_named():
    with TemporaryService.expired_password(users={"alice": "a"}) as service:
        with pytest.raises(pamphlet.NewAuthTokenRequired):
            pamphlet.authenticate("alice", "a", service.name, confdir=service.confdir)
        with pytest.raises(pamphlet.AuthenticationError):
            pamphlet.authenticate("alice", "b", service.name, confdir=service.confdir)
        answers = ["a", "a", "fresh", "fresh"]
        with service.app(Answers, "alice", answers=answers) as app:
            app.authenticate()
            with pytest.raises(pamphlet.NewAuthTokenRequired):
                app.account_management()
            app.change_authtoken(change_expired_authtoken=True)
        assert service.password_of("alice") == "fresh"
    users = {"alice": "a", "bob": "b", "carol": "c"}
    with TemporaryService.expired_password(users=users, expired=["bob", "carol"]) as service:
        pamphlet.authenticate("alice", "a", service.name, confdir=service.confdir)
        for user in ("bob", "carol"):
            with pytest.raises(pamphlet.NewAuthTokenRequired):
                pamphlet.authenticate(user, users[user], service.name, confdir=service.confdir)
    with TemporaryService.expired_password(users={"alice": "a"}, expired=[]) as service:
        pamphlet.authenticate("alice", "a", service.name, confdir=service.confdir)
    with pytest.raises(ValueError):
        TemporaryService.expired_password(users={"a": "b"}, expired=["x:y"])


def test_info_only_sends_each_message_as_given_and_lets_anyone_in():
    messages = ["Hello %u, 100% sure", "two\nlines", "  [brackets] {braces}  "]
    with TemporaryService.info_only(*messages) as service:
        with service.app(Answers, "anyone") as app:
            app.authenticate()
            app.account_management()
            app.open_session()
        assert app.seen == messages
        assert all(message.is_info for message in app.seen)
    with pytest.raises(ValueError):
        TemporaryService.info_only()


def test_ready_made_stacks_leave_nothing_behind_when_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ValueError):
        TemporaryService.password_and_totp(users={"alice": "a"}, secrets={"bad name": RFC_KEY})
    with pytest.raises(ValueError):
        TemporaryService.password_and_totp(users={"alice": "a"}, digits=9)
    with pytest.raises(ValueError):
        TemporaryService.info_only("ok", "")
    assert os.listdir(tmp_path) == []


def test_a_missing_module_names_its_package():
    assert issubclass(PamWrapperMissingError, testing.PamModuleMissingError)
    with pytest.raises(testing.PamModuleMissingError, match="apt-get install some-package"):
        testing._installed_module("pam_no_such_module", "some-package")


@pytest.mark.root
@needs_root
def test_password_and_totp_without_pam_oath_names_the_package(tmp_path):
    security = os.path.dirname(testing.module_path("pam_oath"))
    script = textwrap.dedent(f"""
        import tempfile
        from pamphlet.testing import PamModuleMissingError, TemporaryService
        tempfile.tempdir = {str(tmp_path)!r}
        try:
            TemporaryService.password_and_totp(users={{"alice": "a"}})
        except PamModuleMissingError as error:
            print("refused:", error)
    """)
    hide = 'mount -t tmpfs none "$0" && exec "$@"'
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", hide, security, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "refused: the PAM module pam_oath.so was not found" in proc.stdout, proc.stderr
    assert "apt-get install libpam-oath" in proc.stdout
    assert os.listdir(tmp_path) == []
