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

import pytest

import pamphlet
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
