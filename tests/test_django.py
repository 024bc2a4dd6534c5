"""pamphlet.contrib.django in a real Django project, served by gunicorn with two
worker processes, driven by headless Chromium, against real PAM stacks.

The stack (service ``django``, in the broker's confdir) is what a site with
optional second factors deploys: ``pam_unix`` for the password, then
``pam_oath`` (TOTP) for the users of one system group. The broker runs as
root on a socket in a temporary folder; gunicorn's workers (root here too)
reach PAM only through it. The users are throwaway system users; one has an
expired password (``chage -d 0``).

A middleware of the test project puts the serving worker's pid in a response
header and at the foot of every page, so a test can prove that the two
requests of one login were served by different processes. Screenshots go to
the test's temporary folder (or ``$PAMPHLET_SCREENSHOTS``), never the repository.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pathlib
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from selenium.webdriver.common.by import By

import web_browser
from broker_harness import SRC, Broker, public_dir
from conftest import run_account_tool
from web_browser import Browser, FormClient, wait_until

pytestmark = pytest.mark.root  # system users, a root broker

SUFFIX = secrets.token_hex(3)
OTP_GROUP = f"pdjotp{SUFFIX}"
STAFF_GROUP = f"pdjstf{SUFFIX}"
USERS = {
    # name: (groups, has a TOTP secret)
    "plain": ([STAFF_GROUP], False),
    "totp": ([OTP_GROUP], True),
    "expired": ([], False),
    "wrong": ([OTP_GROUP], True),
    "racer1": ([OTP_GROUP], True),
    "racer2": ([OTP_GROUP], True),
}

STACK = """\
auth     requisite pam_unix.so
auth     [success=1 default=ignore] pam_succeed_if.so quiet user notingroup {otp_group}
auth     required  pam_oath.so usersfile={oath}/${{USER}} window=3 digits=6
account  required  pam_unix.so
password required  pam_unix.so yescrypt
"""

POLICY = """\
[[allow]]
users = ["root"]
services = ["django"]
max_in_flight = 12

# Small budgets, so that a test can spend one address's: the site's users
# all share its uid, and one address must not spend the peer's budget.
[throttle]
rhost_slow_after = 8
rhost_refuse_after = 8
peer_slow_after = 40
peer_refuse_after = 40

[limits]
detach_timeout = 120
"""

SETTINGS = """\
SECRET_KEY = "test-only-{secret}"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = "site_urls"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "pamphlet.contrib.django",
]
MIDDLEWARE = [
    "site_views.WorkerPid",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {{
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {{
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        }},
    }}
]
DATABASES = {{
    "default": {{
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": "{db}",
        "OPTIONS": {{"timeout": 30}},
    }}
}}
USE_TZ = True
STATIC_URL = "/static/"
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"

# What a site copies (docs/guide/django.md):
AUTHENTICATION_BACKENDS = ["pamphlet.contrib.django.backends.PamBackend"]
PAMPHLET = {{
    "SERVICE": "django",
    "BROKER": "{broker}",
    "STAFF_GROUPS": ["{staff_group}"],
    "SUPERUSER_GROUPS": [],
}}
"""

URLS = """\
from django.contrib import admin
from django.urls import path

from pamphlet.contrib.django.views import PamLoginView
import site_views

urlpatterns = [
    path("", site_views.home),
    path("login/", PamLoginView.as_view()),
    path("hold/<str:name>/", site_views.hold),
    path("admin/", admin.site.urls),
]
"""

VIEWS = """\
import os
import pathlib
import time

from django.contrib import messages
from django.http import HttpResponse, HttpResponseRedirect
from django.utils.html import escape

HOLDS = pathlib.Path({holds!r})


class WorkerPid:
    \"\"\"Which gunicorn worker served the request: a header, and a line on the page.\"\"\"

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response["X-Worker-Pid"] = str(os.getpid())
        if response.get("Content-Type", "").startswith("text/html"):
            line = f'<p id="served-by">served by worker {{os.getpid()}}</p></body>'.encode()
            response.content = response.content.replace(b"</body>", line)
            if response.has_header("Content-Length"):
                response["Content-Length"] = str(len(response.content))
        return response


def home(request):
    if not request.user.is_authenticated:
        return HttpResponseRedirect("/login/?next=/")
    user = request.user
    notes = "".join(
        f'<p class="notice {{m.tags}}">{{escape(str(m))}}</p>'
        for m in messages.get_messages(request)
    )
    return HttpResponse(
        f"<!DOCTYPE html><html><body><h1>Welcome, {{escape(user.username)}}</h1>{{notes}}"
        f'<p id="flags">staff: {{user.is_staff}}, superuser: {{user.is_superuser}}</p>'
        "</body></html>"
    )


def hold(request, name):
    \"\"\"Keep this worker busy until the test releases it (the next request goes elsewhere).\"\"\"
    (HOLDS / f"{{name}}.pid").write_text(str(os.getpid()))
    deadline = time.monotonic() + 20
    while not (HOLDS / f"{{name}}.release").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return HttpResponse(str(os.getpid()), content_type="text/plain")
"""


def totp(secret_hex: str, at: float | None = None, step: int = 30, digits: int = 6) -> str:
    """RFC 6238 (HMAC-SHA1, as pam_oath's HOTP/T30)."""
    counter = int((time.time() if at is None else at) // step)
    digest = hmac.new(bytes.fromhex(secret_hex), struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


class Site:
    """The broker, the Django project and gunicorn (two workers), with the system users."""

    def __init__(self) -> None:
        self.folder = public_dir("pamphlet-django-")
        self.holds = self.folder / "holds"
        self.holds.mkdir()
        self.users: dict[str, tuple[str, str, str | None]] = {}  # key: (name, password, secret)
        self._made_users: list[str] = []
        self._made_groups: list[str] = []
        self.broker: Broker | None = None
        self.gunicorn: subprocess.Popen[bytes] | None = None
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for group in (OTP_GROUP, STAFF_GROUP):
            run_account_tool(["groupadd", group], check=True)
            self._made_groups.append(group)
        for key, (groups, has_secret) in USERS.items():
            name = f"pdj{key}{SUFFIX}"
            password = "Pw-" + secrets.token_hex(8)
            command = ["useradd", "--no-create-home", "--shell", "/bin/false"]
            if groups:
                command += ["--groups", ",".join(groups)]
            subprocess.run([*command, name], check=True)
            self._made_users.append(name)
            run_account_tool(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
            if key == "expired":
                run_account_tool(["chage", "-d", "0", name], check=True)
            secret = secrets.token_hex(20) if has_secret else None
            if secret is not None:
                # One users file per user: pam_oath rewrites the file at each
                # login under a lock it does not wait for, and two logins at
                # once on a shared file failed one of them (PAM_AUTH_ERR).
                path = self.folder / "oath" / name
                path.parent.mkdir(mode=0o700, exist_ok=True)
                path.write_text(f"HOTP/T30/6 {name} - {secret}\n")
                path.chmod(0o600)
            self.users[key] = (name, password, secret)
        confdir = self.folder / "pam.d"
        confdir.mkdir()
        (confdir / "django").write_text(
            STACK.format(otp_group=OTP_GROUP, oath=self.folder / "oath")
        )
        self.broker = Broker(POLICY, str(confdir))

        project = self.folder / "project"
        project.mkdir()
        (project / "site_settings.py").write_text(
            SETTINGS.format(
                secret=secrets.token_hex(16),
                db=self.folder / "db.sqlite3",
                broker=self.broker.socket,
                staff_group=STAFF_GROUP,
            )
        )
        (project / "site_urls.py").write_text(URLS)
        (project / "site_views.py").write_text(VIEWS.format(holds=str(self.holds)))
        env = dict(
            os.environ,
            PYTHONPATH=f"{project}:{SRC}",
            DJANGO_SETTINGS_MODULE="site_settings",
        )
        subprocess.run(
            [sys.executable, "-m", "django", "migrate", "--no-input", "-v", "0"],
            env=env,
            check=True,
            cwd=project,
        )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(self.folder / "gunicorn.log", "w")  # noqa: SIM115 - closed in stop()
        self.gunicorn = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                "2",
                "--bind",
                f"127.0.0.1:{port}",
                "--timeout",
                "60",
                "django.core.wsgi:get_wsgi_application()",
            ],
            env=env,
            cwd=project,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: len(self.worker_pids()) == 2 and self._answers(), 60, "gunicorn")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/login/", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def worker_pids(self) -> set[int]:
        assert self.gunicorn is not None
        found = set()
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as file:
                        fields = file.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.gunicorn.pid:
                    found.add(int(name))
        return found

    def occupy(self, pid: int) -> threading.Event:
        """Keep worker ``pid`` busy until the returned event is set.

        Hold requests go in until one lands on ``pid``; one that lands on the
        other worker is kept until then (so the next must land on ``pid``)
        and released after.
        """
        release = threading.Event()
        others: list[str] = []
        while True:
            name = secrets.token_hex(4)
            threading.Thread(target=self._hold, args=(name, release), daemon=True).start()
            pid_file = self.holds / f"{name}.pid"
            wait_until(pid_file.exists, 15, "a hold request to start")
            wait_until(lambda f=pid_file: f.read_text().strip(), 5, "the pid")
            if int(pid_file.read_text()) == pid:
                break
            others.append(name)
            assert len(others) < 3, "the hold requests never reached the worker"
        for other in others:
            (self.holds / f"{other}.release").touch()
        release.holds = name  # type: ignore[attr-defined]
        return release

    def _hold(self, name: str, release: threading.Event) -> None:
        def wait_and_release() -> None:
            release.wait(30)
            (self.holds / f"{name}.release").touch()

        threading.Thread(target=wait_and_release, daemon=True).start()
        with urllib.request.urlopen(f"{self.url}/hold/{name}/", timeout=40) as response:
            response.read()

    def stop(self) -> None:
        if self.gunicorn is not None:
            self.gunicorn.terminate()
            try:
                self.gunicorn.wait(30)
            except subprocess.TimeoutExpired:
                self.gunicorn.kill()
                self.gunicorn.wait()
            self.log.close()
        if self.broker is not None:
            self.broker.cleanup()
        for name in self._made_users:
            run_account_tool(["userdel", name], check=False)
        for group in self._made_groups:
            run_account_tool(["groupdel", group], check=False)
        subprocess.run(["rm", "-rf", str(self.folder)], check=False)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    site = Site()
    try:
        yield site
    finally:
        site.stop()


class _NoPreconnect(web_browser.webdriver.ChromeOptions):  # type: ignore[misc]
    """Chromium without speculative connections.

    gunicorn's sync workers serve one connection at a time, and a socket
    Chromium opens ahead of a navigation it predicts (with no request on it
    yet) pins a worker until it is used: with two browsers, both workers.
    In production a buffering proxy (nginx) sits in front, as gunicorn's
    documentation asks; here the browsers are told not to preconnect.
    """

    def __init__(self) -> None:
        super().__init__()
        self.add_experimental_option("prefs", {"net.network_prediction_options": 2})
        self.add_argument("--disable-features=NetworkPrediction,SpeculativePreconnect")


def _browser() -> Browser:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(web_browser.webdriver, "ChromeOptions", _NoPreconnect)
        return Browser()


@pytest.fixture(scope="module")
def browsers() -> Iterator[list[Browser]]:
    opened: list[Browser] = []
    try:
        opened.append(_browser())
        opened.append(_browser())
        yield opened
    finally:
        for browser in opened:
            browser.quit()


@pytest.fixture
def page(browsers: list[Browser]) -> Browser:
    browsers[0].reset()
    browsers[0].shots = 0
    return browsers[0]


@pytest.fixture
def shots(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = os.environ.get("PAMPHLET_SCREENSHOTS")
    if folder:
        path = pathlib.Path(folder) / os.environ.get("PYTEST_CURRENT_TEST", "x").split(":")[-1]
        path = path.with_name(path.name.split(" ")[0])
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path


def served_by(page: Browser) -> int:
    return int(page.driver.find_element(By.ID, "served-by").text.split()[-1])


def start_login(page: Browser, site: Site, user: str, shots: pathlib.Path) -> None:
    page.get(site.url + "/login/?next=/")
    assert page.title == "Sign in"
    assert page.fields() == [("Username", "text")]
    page.screenshot(shots, "username")
    page.fill("Username", user)
    page.click("Continue")


def answer(page: Browser, label: str, value: str, shots: pathlib.Path, name: str) -> None:
    page.screenshot(shots, name)
    page.fill(label, value)
    page.click("Continue")


def oath_label(user: str) -> str:
    return f"One-time password (OATH) for `{user}':"


# -- the cases ---------------------------------------------------------------------------


def test_password_only(site: Site, page: Browser, shots: pathlib.Path) -> None:
    name, password, _ = site.users["plain"]
    start_login(page, site, name, shots)
    assert page.fields() == [("Password:", "password")]
    assert f"Signing in as {name}" in page.text
    answer(page, "Password:", password, shots, "password")
    page.screenshot(shots, "welcome")
    assert page.title == f"Welcome, {name}"
    # The user is in STAFF_GROUP: the backend's group mapping made it staff.
    assert "staff: True, superuser: False" in page.text


def test_backend_behind_the_admin_login(site: Site, page: Browser, shots: pathlib.Path) -> None:
    """Django's own admin login form, through PamBackend (AUTHENTICATION_BACKENDS)."""
    name, password, _ = site.users["plain"]
    page.get(site.url + "/admin/login/?next=/admin/")
    page.screenshot(shots, "admin-login")

    def log_in(name: str, secret: str) -> None:
        page.fill("Username:", name)
        page.fill("Password:", secret)
        old = page.driver.find_element(By.TAG_NAME, "html")
        page.driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        page.wait_for_new_page(old)

    log_in(name, "not-" + password)
    page.screenshot(shots, "admin-wrong-password")
    assert "Please enter the correct username and password for a staff account" in page.text
    log_in(name, password)
    page.screenshot(shots, "admin-home")
    assert "Site administration" in page.text

    # A user of the OTP group cannot pass a password-only form: the backend
    # answers one password prompt and refuses the stack's second question.
    otp_name, otp_password, _ = site.users["wrong"]
    page.reset()
    page.get(site.url + "/admin/login/?next=/admin/")
    log_in(otp_name, otp_password)
    assert "Please enter the correct username" in page.text


def test_password_and_totp(site: Site, page: Browser, shots: pathlib.Path) -> None:
    name, password, secret = site.users["totp"]
    assert secret is not None
    start_login(page, site, name, shots)
    first = served_by(page)
    answer(page, "Password:", password, shots, "password")
    assert page.title == "Sign in"
    assert page.fields() == [(oath_label(name), "password")]
    answer(page, oath_label(name), totp(secret), shots, "code")
    page.screenshot(shots, "welcome")
    assert page.title == f"Welcome, {name}"
    assert "staff: False" in page.text
    assert served_by(page) in site.worker_pids() and first in site.worker_pids()
    # One transaction in the broker for the whole login: detached at each
    # prompt, resumed by the next request, ended once, with success.
    assert site.broker is not None
    (line,) = site.broker.audit_lines(f"user={name}", "phases=", "outcome=success")
    assert "phases=authenticate:0,acct_mgmt:0" in line
    assert len(site.broker.audit_lines(f"user={name}", "outcome=resumed")) == 2


def test_wrong_code(site: Site, page: Browser, shots: pathlib.Path) -> None:
    name, password, secret = site.users["wrong"]
    assert secret is not None
    start_login(page, site, name, shots)
    answer(page, "Password:", password, shots, "password")
    right = totp(secret)
    wrong = f"{(int(right) + 1) % 1000000:06d}"
    answer(page, oath_label(name), wrong, shots, "wrong-code")
    page.screenshot(shots, "refused")
    assert page.title == "Sign in"
    assert ("error", "Login incorrect.") in page.notices()
    assert page.fields() == [("Username", "text")]
    assert page.driver.get_cookie("sessionid") is None or "Welcome" not in page.text
    page.get(site.url + "/")
    assert page.title == "Sign in"  # not signed in
    # The next attempt, with the right code, passes.
    start_login(page, site, name, shots)
    answer(page, "Password:", password, shots, "password-again")
    answer(page, oath_label(name), totp(secret), shots, "right-code")
    assert page.title == f"Welcome, {name}"


def test_expired_password_is_changed_on_the_same_handle(
    site: Site, page: Browser, shots: pathlib.Path
) -> None:
    name, password, _ = site.users["expired"]
    new_password = "New-" + secrets.token_hex(8)
    start_login(page, site, name, shots)
    answer(page, "Password:", password, shots, "password")
    page.screenshot(shots, "expired")
    assert page.title == "Change your password"
    notices = page.notices()
    assert (
        "error",
        "You are required to change your password immediately (administrator enforced).",
    ) in notices
    assert ("info", "Your password has expired. Choose a new one.") in notices
    assert ("info", f"Changing password for {name}.") in notices
    assert page.fields() == [("Current password:", "password")]
    answer(page, "Current password:", password, shots, "current")
    assert page.fields() == [("New password:", "password")]
    answer(page, "New password:", new_password, shots, "new")
    assert page.fields() == [("Retype new password:", "password")]
    answer(page, "Retype new password:", new_password, shots, "retype")
    page.screenshot(shots, "welcome")
    assert page.title == f"Welcome, {name}"
    assert site.broker is not None
    # (The broker's outcome is "failure" for a transaction with a non-zero
    # phase; the phases show what happened: expired, then changed.)
    (line,) = site.broker.audit_lines(f"user={name}", "phases=")
    assert "phases=authenticate:0,acct_mgmt:12,chauthtok:0" in line
    assert "end=client" in line
    # The new password is the password now, and no longer expired.
    page.reset()
    start_login(page, site, name, shots)
    answer(page, "Password:", new_password, shots, "new-password-login")
    assert page.title == f"Welcome, {name}"


def test_a_second_login_races_the_first_on_another_worker(
    site: Site, browsers: list[Browser], shots: pathlib.Path
) -> None:
    first, second = browsers
    for browser in browsers:
        browser.reset()
    name1, password1, secret1 = site.users["racer1"]
    name2, password2, secret2 = site.users["racer2"]
    assert secret1 is not None and secret2 is not None

    start_login(first, site, name1, shots)
    start_login(second, site, name2, shots)
    pid_of_step1 = served_by(first)

    # The next request of the first login must reach the other worker: the
    # worker that served its first step is kept busy meanwhile.
    release = site.occupy(pid_of_step1)
    try:
        answer(first, "Password:", password1, shots, "first-password")
        pid_of_step2 = served_by(first)
    finally:
        release.set()
    assert pid_of_step2 != pid_of_step1
    assert {pid_of_step1, pid_of_step2} == site.worker_pids()
    assert first.fields() == [(oath_label(name1), "password")]

    answer(second, "Password:", password2, shots, "second-password")
    assert second.fields() == [(oath_label(name2), "password")]

    # Both codes at once: the two logins run side by side and do not cross.
    first.fill(oath_label(name1), totp(secret1))
    second.fill(oath_label(name2), totp(secret2))
    pages = [browser.submit_soon() for browser in browsers]
    for browser, old in zip(browsers, pages, strict=True):
        browser.wait_for_new_page(old)
    first.screenshot(shots, "first-welcome")
    second.screenshot(shots, "second-welcome")
    assert site.broker is not None
    seen = f"{first.text}\n---\n{second.text}\n---\n{site.broker.audit_text()}"
    assert first.title == f"Welcome, {name1}", seen
    assert second.title == f"Welcome, {name2}", seen
    # Each browser's session is its own user's.
    first.get(site.url + "/")
    second.get(site.url + "/")
    assert (first.title, second.title) == (f"Welcome, {name1}", f"Welcome, {name2}")
    assert site.broker is not None
    for name in (name1, name2):
        (line,) = site.broker.audit_lines(f"user={name}", "outcome=success")
        assert "phases=authenticate:0,acct_mgmt:0" in line


BROKER_WORDS = ("[[allow]]", "max_in_flight", "rule ", "transactions of")


def anonymous_start(site: Site, source: str, name: str) -> FormClient:
    """A fresh client (no session) at ``source`` that starts a login for ``name``."""
    client = FormClient(site.url, source)
    client.get("/login/")
    client.post("/login/", {"action": "start", "username": name})
    return client


def test_one_address_starting_logins_leaves_room_for_everybody_else(
    site: Site, page: Browser, shots: pathlib.Path
) -> None:
    # An anonymous client at 127.0.0.2 starts logins for made-up names, each
    # from a fresh session, as fast as it can. On main each start held a
    # broker transaction until the rule's max_in_flight was full, and every
    # user then read "... transactions of [[allow]] rule 1 are running".
    clients = [
        anonymous_start(site, "127.0.0.2", f"nobody{secrets.token_hex(3)}") for _ in range(16)
    ]
    try:
        statuses = [client.status for client in clients]
        started = [c for c in clients if c.status == 200 and "Password:" in c.text]
        refused = [c for c in clients if c.status == 503]
        # 4 per address in the whole site (LOGIN_STATE_DIR), whichever worker serves.
        assert len(started) == 4, statuses
        assert len(refused) == len(clients) - len(started), statuses
        for client in refused:
            assert 1 <= int(client.headers["retry-after"]) <= 120
            assert "Too many sign-ins are in progress" in client.text
        for client in clients:
            assert not any(word in client.text for word in BROKER_WORDS), client.text
        # Meanwhile a user at another address signs in.
        name, password, _ = site.users["plain"]
        start_login(page, site, name, shots)
        answer(page, "Password:", password, shots, "password")
        assert page.title == f"Welcome, {name}", page.text
    finally:
        for client in clients:
            if client.status == 200 and "Password:" in client.text:
                client.post("/login/", {"action": "cancel"})
    # The client address reached PAM (and the broker's audit) as rhost.
    assert site.broker is not None
    assert site.broker.audit_lines("rhost=127.0.0.2", "user=nobody")


def test_one_failure_text_for_a_wrong_password_and_an_unknown_user(site: Site) -> None:
    name, _, _ = site.users["plain"]
    pages = []
    for user in (name, f"pdjnosuch{secrets.token_hex(3)}"):
        client = anonymous_start(site, "127.0.0.3", user)
        assert "Password:" in client.text  # pam_unix asks an unknown user too
        client.post("/login/", {"action": "answer", "answer-0": "not-the-password"})
        assert client.status == 200
        pages.append(client.notices())
    assert pages[0] == pages[1] == ["Login incorrect."], pages


def test_failures_for_made_up_names_from_one_address_leave_the_site_open(
    site: Site, page: Browser, shots: pathlib.Path
) -> None:
    # An anonymous client at 127.0.0.4 guesses for made-up names until the
    # broker throttles its address (rhost_refuse_after = 8). On main the
    # broker counted failures per peer uid only: the site's, so every user
    # of the site was then locked out. Every page reads the same.
    assert site.broker is not None
    for _ in range(45):  # past the peer's budget (40), had it been the one to stop it
        client = anonymous_start(site, "127.0.0.4", f"pdjmade{secrets.token_hex(3)}")
        if "Password:" in client.text:
            client.post("/login/", {"action": "answer", "answer-0": "a-guess"})
        assert client.status == 200
        assert client.notices() == ["Login incorrect."], client.text
        assert not any(word in client.text for word in BROKER_WORDS), client.text
        if site.broker.audit_lines("rhost=127.0.0.4", "throttled", timeout=0):
            break
    audit = site.broker.audit_text()
    assert site.broker.audit_lines("rhost=127.0.0.4", "throttled", timeout=0), audit
    guessed = site.broker.audit_lines("rhost=127.0.0.4", "outcome=failure", timeout=0)
    assert len(guessed) == 8, audit
    # Meanwhile a user at another address signs in.
    name, password, _ = site.users["plain"]
    start_login(page, site, name, shots)
    answer(page, "Password:", password, shots, "password")
    assert page.title == f"Welcome, {name}", page.text


def test_totp_function_agrees_with_oathtool() -> None:
    secret = secrets.token_hex(20)
    now = time.time()
    if int(now) % 30 > 27:  # stay inside one time step for both
        time.sleep(3)
    expected = subprocess.run(
        ["oathtool", "--totp", secret], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert totp(secret) == expected
