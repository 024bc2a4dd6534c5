"""pamphlet.contrib.jupyterhub: a real JupyterHub, behind its real proxy, driven by Chromium.

One hub serves the whole module (``python3 -m jupyterhub``, the PyPI package,
with configurable-http-proxy from npm in front of it). Its authenticator is
named ``"pamphlet"``, through the entry point, and reads one throwaway PAM
service that behaves differently per user (pam_succeed_if jumps):

- ``daemon``: a password (pam_matrix) and nothing else;
- ``games``: a password, then a TOTP code (Debian's pam_oath);
- ``man``: a password, then account management says the password has
  expired and the stack asks for a new one;
- ``news``: a password, then account management refuses with a message;
- ``sys``: a password, then pam_echo tells where the user signs in from.

LocalAuthenticator (which PAMAuthenticator and pamphlet's authenticator
extend) admits only users that exist on the system, so the test users are
accounts every Debian has; their passwords live only in pam_matrix's passdb.
Reaching the hub's home page (/hub/home) as the user is the proof; no
notebook server is spawned. Screenshots go into pytest's temporary folders.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import os
import pathlib
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from pamphlet.testing import TemporaryService
from web_browser import Browser, FormClient, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVICE = "jupyterhub-test"
PASSWORDS = {"daemon": "daemon-pw", "games": "games-pw", "man": "man-pw", "news": "news-pw"}
PASSWORDS["sys"] = "sys-pw"
TOTP_KEY = bytes.fromhex("3132333435363738393031323334353637383930")  # RFC 6238's
LOGIN_TIMEOUT = 6.0  # seconds an abandoned sign-in lives (c.PamphletAuthenticator.login_timeout)
PER_ADDRESS = 3  # sign-ins in progress per client address
MISSING_GROUP = "pamphlet-no-such-group"  # in admin_groups: a warning, never a 500

STACK = """\
auth     optional  pam_exec.so %(mark)s
auth     required  {pam_matrix} passdb={passdb}
auth     [success=1 default=ignore] pam_succeed_if.so quiet user != games
auth     required  pam_oath.so usersfile=%(oath)s window=2
auth     [success=1 default=ignore] pam_succeed_if.so quiet user != sys
auth     optional  pam_echo.so Signing in from %%H.
account  [success=2 default=ignore] pam_succeed_if.so quiet user != news
account  requisite pam_echo.so This account is locked. Ask the helpdesk to unlock it.
account  required  pam_deny.so
account  [success=1 default=ignore] pam_succeed_if.so quiet user != man
account  required  pam_stress.so expired
account  required  {pam_matrix} passdb={passdb}
password required  {pam_matrix} passdb={passdb}
session  required  {pam_matrix} passdb={passdb}
"""


def totp(key: bytes, at: float | None = None, step: int = 30, digits: int = 6) -> str:
    """RFC 6238 (HMAC-SHA1), the code pam_oath expects for ``HOTP/T30``."""
    counter = int((time.time() if at is None else at) // step)
    digest = hmac.new(key, struct.pack(">Q", counter), "sha1").digest()
    offset = digest[-1] & 0x0F
    number = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(number % 10**digits).zfill(digits)


def test_totp_matches_oathtool() -> None:
    """The test's own RFC 6238 agrees with Debian's oathtool (so pam_oath gets real codes)."""
    oathtool = shutil.which("oathtool")
    assert oathtool, "oathtool missing: apt-get install oathtool libpam-oath"
    now = time.time()
    if now % 30 > 28:  # not across a step boundary
        time.sleep(2.5)
        now = time.time()
    output = subprocess.run(
        [oathtool, "--totp", TOTP_KEY.hex()], capture_output=True, text=True, check=True
    )
    assert output.stdout.strip() == totp(TOTP_KEY, now)


def _proxy_command() -> str:
    """configurable-http-proxy: on PATH, or installed with npm --prefix in the cache."""
    found = shutil.which("configurable-http-proxy")
    if found:
        return found
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    for prefix in (os.environ.get("PAMPHLET_NPM_PREFIX"), cache / "pamphlet-npm"):
        if prefix:
            candidate = pathlib.Path(prefix) / "node_modules" / ".bin" / "configurable-http-proxy"
            if candidate.exists():
                return str(candidate)
    raise RuntimeError(
        "configurable-http-proxy missing: apt-get install nodejs npm && "
        "npm install -g configurable-http-proxy@5 (or npm install --prefix ~/.cache/pamphlet-npm "
        "configurable-http-proxy@5)"
    )


def _entry_point_shim(folder: pathlib.Path) -> str | None:
    """Make ``authenticator_class = "pamphlet"`` resolve to this checkout.

    A fresh ``pip install -e '.[test]'`` registers the entry point itself. In
    a checkout whose installed metadata predates it, a dist-info with the
    entry points of this checkout's pyproject.toml does the same.
    """
    installed = importlib.metadata.entry_points(group="jupyterhub.authenticators", name="pamphlet")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][
        "jupyterhub.authenticators"
    ]
    assert declared == {"pamphlet": "pamphlet.contrib.jupyterhub:PamphletAuthenticator"}
    if any(point.value == declared["pamphlet"] for point in installed):
        return None
    info = folder / "pamphlet_checkout-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pamphlet-checkout\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        f"[jupyterhub.authenticators]\npamphlet = {declared['pamphlet']}\n"
    )
    return str(folder)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Hub:
    """``python3 -m jupyterhub`` with its proxy, in a folder of its own."""

    def __init__(self, folder: pathlib.Path, service: TemporaryService) -> None:
        self.folder = folder
        self.service = service
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hub_port = _free_port()
        self.hub_url = f"http://127.0.0.1:{self.hub_port}"  # the hub itself, not its proxy
        self.log = folder / "hub.log"
        config = folder / "jupyterhub_config.py"
        config.write_text(
            f"""
c = get_config()  # noqa
c.JupyterHub.authenticator_class = "pamphlet"
c.PamphletAuthenticator.service = {SERVICE!r}
c.PamphletAuthenticator.confdir = {service.confdir!r}
c.PamphletAuthenticator.login_timeout = {LOGIN_TIMEOUT}
c.PamphletAuthenticator.allow_all = True
c.PamphletAuthenticator.admin_groups = {{"man", "{MISSING_GROUP}"}}
c.PamphletAuthenticator.trusted_proxy_ips = {{"127.0.0.1"}}
c.PamphletAuthenticator.max_pending_logins_per_address = {PER_ADDRESS}
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {self.port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {self.hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{_free_port()}"
c.ConfigurableHTTPProxy.command = [{_proxy_command()!r}]
c.ConfigurableHTTPProxy.pid_file = {str(folder / "proxy.pid")!r}
c.JupyterHub.db_url = "sqlite:///{folder / "jupyterhub.sqlite"}"
c.JupyterHub.cookie_secret_file = {str(folder / "cookie_secret")!r}
c.JupyterHub.pid_file = {str(folder / "hub.pid")!r}
c.JupyterHub.default_url = "/hub/home"
c.JupyterHub.redirect_to_server = False
"""
        )
        env = dict(os.environ)
        paths = [str(ROOT / "src")]
        shim = _entry_point_shim(folder / "shim")
        if shim:
            paths.append(shim)
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
        env["CONFIGPROXY_AUTH_TOKEN"] = os.urandom(16).hex()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(config)],
                cwd=folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(self._up, timeout=60, what=f"JupyterHub at {self.url}")
        except AssertionError:
            self.stop()
            raise AssertionError(
                f"the hub did not come up:\n{self.log.read_text()[-4000:]}"
            ) from None

    rhosts: pathlib.Path

    def seen_rhosts(self) -> list[str]:
        return self.rhosts.read_text().splitlines() if self.rhosts.exists() else []

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the hub exited:\n{self.log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/hub/login", timeout=5) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def threads(self) -> int:
        status = pathlib.Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        # The hub stops the proxy it started; make sure of it.
        pid_file = self.folder / "proxy.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                pass


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    folder = tmp_path_factory.mktemp("jupyterhub")
    oath = folder / "oath"
    oath.mkdir()
    users_file = oath / "users"
    users_file.write_text(f"HOTP/T30 games - {TOTP_KEY.hex()}\n")
    users_file.chmod(0o600)
    # pam_exec writes what PAM_RHOST each authenticate saw.
    rhosts = folder / "rhosts"
    mark = folder / "mark.sh"
    mark.write_text(f'#!/bin/sh\necho "$PAM_USER $PAM_RHOST" >> {rhosts}\n')
    mark.chmod(0o755)
    stack = STACK % {"oath": users_file, "mark": mark}
    with TemporaryService(stack, users=PASSWORDS, name=SERVICE) as service:
        running = Hub(folder, service)
        running.rhosts = rhosts
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture(scope="module")
def module_browser() -> Iterator[Browser]:
    browser = Browser()
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def browser(module_browser: Browser, hub: Hub) -> Browser:
    module_browser.reset()
    # reset() forgets the cookies of about:blank; these are the hub's.
    module_browser.get(f"{hub.url}/hub/logo")
    module_browser.driver.delete_all_cookies()
    return module_browser


# -- what a user does ----------------------------------------------------------


def notices(browser: Browser) -> list[tuple[str, str]]:
    return [
        (element.get_attribute("data-kind") or "", element.text)
        for element in browser.driver.find_elements(By.CSS_SELECTOR, ".pamphlet-notice")
    ]


def labels(browser: Browser) -> list[tuple[str, str]]:
    """(label, input type) of every field of the form."""
    result = []
    for element in browser.driver.find_elements(
        By.CSS_SELECTOR, "form input:not([type=hidden]):not([type=submit])"
    ):
        label = browser.driver.find_element(
            By.CSS_SELECTOR, f"label[for='{element.get_attribute('id')}']"
        )
        result.append((label.text.strip(), element.get_attribute("type") or ""))
    return result


def submit(browser: Browser) -> None:
    old_page = browser.driver.find_element(By.TAG_NAME, "html")
    browser.driver.find_element(By.ID, "login_submit").click()
    browser.wait_for_new_page(old_page)


def sign_in(browser: Browser, hub: Hub, user: str, password: str) -> None:
    browser.get(f"{hub.url}/hub/login")
    assert labels(browser) == [("Username:", "text"), ("Password:", "password")]
    browser.fill("Username:", user)
    browser.fill("Password:", password)
    submit(browser)


def answer(browser: Browser, label: str, value: str) -> None:
    browser.fill(label, value)
    submit(browser)


def assert_home(browser: Browser, hub: Hub, user: str) -> None:
    path = urllib.parse.urlparse(browser.driver.current_url).path
    assert path == "/hub/home", f"not at home but at {path}:\n{browser.text}"
    assert user in browser.driver.find_element(By.CSS_SELECTOR, "nav").text


def fresh_code() -> str:
    """A TOTP code with a few seconds of life left (pam_oath takes each code once)."""
    if time.time() % 30 > 25:
        time.sleep(30 - time.time() % 30 + 0.5)
    return totp(TOTP_KEY)


# -- the cases -----------------------------------------------------------------


def test_one_prompt_stack(browser: Browser, hub: Hub, tmp_path: pathlib.Path) -> None:
    """Username and password on JupyterHub's familiar page, then the hub's home."""
    browser.get(f"{hub.url}/hub/login")
    browser.screenshot(tmp_path, "sign-in")
    assert browser.title == "Sign in"
    sign_in(browser, hub, "daemon", PASSWORDS["daemon"])
    browser.screenshot(tmp_path, "home")
    assert_home(browser, hub, "daemon")
    assert browser.driver.get_cookie("pamphlet-signin") is None
    assert "Admin" not in browser.driver.find_element(By.CSS_SELECTOR, "nav").text
    # admin_groups names a group this system does not have: a warning, not a 500.
    assert f"admin_groups names {MISSING_GROUP!r}, which is not a group here" in hub.log_text()


def test_wrong_password_is_refused(browser: Browser, hub: Hub, tmp_path: pathlib.Path) -> None:
    sign_in(browser, hub, "daemon", "not-the-password")
    browser.screenshot(tmp_path, "refused")
    assert notices(browser) == [("error", "Login incorrect.")]
    assert labels(browser) == [("Username:", "text"), ("Password:", "password")]
    assert browser.driver.find_element(By.ID, "username_input").get_attribute("value") == "daemon"


def test_password_then_totp(browser: Browser, hub: Hub, tmp_path: pathlib.Path) -> None:
    """pam_oath's question gets a page of its own, in JupyterHub's style."""
    sign_in(browser, hub, "games", PASSWORDS["games"])
    browser.screenshot(tmp_path, "code")
    assert labels(browser) == [("One-time password (OATH) for `games':", "password")]
    assert browser.title == "Sign in"
    answer(browser, "One-time password (OATH) for `games':", fresh_code())
    browser.screenshot(tmp_path, "home")
    assert_home(browser, hub, "games")


def test_wrong_code_is_refused(browser: Browser, hub: Hub, tmp_path: pathlib.Path) -> None:
    sign_in(browser, hub, "games", PASSWORDS["games"])
    right = fresh_code()
    wrong = f"{(int(right) + 1) % 10**6:06d}"
    answer(browser, "One-time password (OATH) for `games':", wrong)
    browser.screenshot(tmp_path, "wrong-code")
    assert notices(browser) == [("error", "Login incorrect.")]
    assert labels(browser) == [("Username:", "text"), ("Password:", "password")]
    browser.get(f"{hub.url}/hub/home")
    assert urllib.parse.urlparse(browser.driver.current_url).path == "/hub/login"


def test_expired_password_is_changed_during_sign_in(
    browser: Browser, hub: Hub, tmp_path: pathlib.Path
) -> None:
    """acct_mgmt says NEW_AUTHTOK_REQD: the same handle asks for a new password."""
    sign_in(browser, hub, "man", PASSWORDS["man"])
    browser.screenshot(tmp_path, "old-password")
    assert browser.title == "Change your password"
    assert notices(browser) == [("info", "Your password has expired. Choose a new one.")]
    assert labels(browser) == [("Old password:", "password")]
    answer(browser, "Old password:", PASSWORDS["man"])
    browser.screenshot(tmp_path, "new-password")
    assert labels(browser) == [("New Password :", "password")]
    answer(browser, "New Password :", "a-new-secret")
    assert labels(browser) == [("Verify New Password :", "password")]
    answer(browser, "Verify New Password :", "a-new-secret")
    browser.screenshot(tmp_path, "home")
    assert_home(browser, hub, "man")
    assert hub.service.password_of("man") == "a-new-secret"
    # admin_groups = {"man"}: the man account is in the man group.
    assert "Admin" in browser.driver.find_element(By.CSS_SELECTOR, "nav").text


def test_locked_account_message_reaches_the_page(
    browser: Browser, hub: Hub, tmp_path: pathlib.Path
) -> None:
    sign_in(browser, hub, "news", PASSWORDS["news"])
    browser.screenshot(tmp_path, "locked")
    assert notices(browser) == [
        ("info", "This account is locked. Ask the helpdesk to unlock it."),
        ("error", "This account may not sign in now: Authentication failure"),
    ]
    browser.get(f"{hub.url}/hub/home")
    assert urllib.parse.urlparse(browser.driver.current_url).path == "/hub/login"


def test_messages_after_success_are_shown_with_the_clients_address(
    browser: Browser, hub: Hub, tmp_path: pathlib.Path
) -> None:
    """pam_echo's %H is PAM_RHOST: the browser's address as the hub sees it."""
    sign_in(browser, hub, "sys", PASSWORDS["sys"])
    browser.screenshot(tmp_path, "signed-in")
    assert browser.title == "Signed in"
    assert notices(browser) == [("info", "Signing in from 127.0.0.1.")]
    old_page = browser.driver.find_element(By.TAG_NAME, "html")
    browser.driver.find_element(By.ID, "pamphlet_continue").click()
    browser.wait_for_new_page(old_page)
    assert_home(browser, hub, "sys")


def test_abandoned_sign_in_is_released(browser: Browser, hub: Hub, tmp_path: pathlib.Path) -> None:
    """A closed tab: after login_timeout the conversation ends, its thread and handle go."""
    before = hub.threads()
    sign_in(browser, hub, "games", PASSWORDS["games"])
    assert labels(browser) == [("One-time password (OATH) for `games':", "password")]
    assert hub.threads() == before + 1  # the authenticate phase, waiting in the conversation
    wait_until(
        lambda: "releasing the abandoned sign-in of 'games'" in hub.log_text(),
        timeout=LOGIN_TIMEOUT * 3,
        what="the hub to release the sign-in",
    )
    wait_until(lambda: hub.threads() == before, timeout=10, what="the phase's thread to end")
    # The browser comes back: its answer answers nothing, and it is told why.
    answer(browser, "One-time password (OATH) for `games':", fresh_code())
    browser.screenshot(tmp_path, "timed-out")
    assert ("error", "Your sign-in timed out. Please start again.") in notices(browser)
    assert labels(browser) == [("Username:", "text"), ("Password:", "password")]


def test_forged_forwarding_headers_do_not_set_rhost(hub: Hub) -> None:
    """Through the proxy, rhost is the address the proxy saw: a client cannot name another."""
    client = FormClient(hub.url, "127.0.0.5")
    forged = {"X-Forwarded-For": "203.0.113.9", "X-Real-Ip": "203.0.113.10"}
    client.get("/hub/login", forged)
    client.post("/hub/login", {"username": "sys", "password": PASSWORDS["sys"]}, forged)
    assert "Signing in from 127.0.0.5." in client.text, client.text
    # JupyterHub's own idea of the address took the forged X-Real-Ip (its log
    # says so); PAM was not told that.
    assert "(@203.0.113.10)" in hub.log_text()


def test_forwarded_headers_straight_to_the_hub_do_not_reach_pam(hub: Hub) -> None:
    """X-Forwarded-For counts only from a trusted proxy: sent to the hub's own port
    (which every local account, and every notebook server, can reach), it is ignored."""
    client = FormClient(hub.hub_url, "127.0.0.6")
    forged = {"X-Forwarded-For": "203.0.113.9", "X-Real-Ip": "203.0.113.10"}
    client.get("/hub/login", forged)
    client.post("/hub/login", {"username": "daemon", "password": PASSWORDS["daemon"]}, forged)
    assert "daemon 127.0.0.6" in hub.seen_rhosts()
    assert not any("203.0.113" in line for line in hub.seen_rhosts()), hub.seen_rhosts()


def test_which_address_counts() -> None:
    """PAM_RHOST believes X-Forwarded-For only from a trusted proxy; the cap counts the
    proxy's last entry even from an untrusted one (a local proxy nobody declared)."""
    from tornado.httputil import HTTPHeaders

    from pamphlet.contrib.jupyterhub.authenticator import client_addresses

    def request(peer: str, forwarded: str | None) -> Any:
        headers = HTTPHeaders({"X-Forwarded-For": forwarded} if forwarded else {})
        context = types.SimpleNamespace(address=(peer, 40000))
        return types.SimpleNamespace(
            connection=types.SimpleNamespace(context=context), headers=headers
        )

    chain = "203.0.113.9, 198.51.100.2"
    assert client_addresses(request("127.0.0.1", chain), set()) == ("127.0.0.1", "198.51.100.2")
    assert client_addresses(request("127.0.0.1", None), set()) == ("127.0.0.1", "127.0.0.1")
    trusted = {"127.0.0.1", "10.0.0.0/8"}
    assert client_addresses(request("127.0.0.1", chain), trusted) == (
        "198.51.100.2",
        "198.51.100.2",
    )
    # The client forged the left part; the proxy appended what it saw.
    assert client_addresses(request("127.0.0.1", "203.0.113.9, 127.0.0.5"), trusted) == (
        "127.0.0.5",
        "127.0.0.5",
    )
    # Two trusted proxies in a row: the first untrusted hop is the client.
    assert client_addresses(request("127.0.0.1", "198.51.100.7, 10.1.2.3"), trusted) == (
        "198.51.100.7",
        "198.51.100.7",
    )
    assert client_addresses(request("192.0.2.50", chain), trusted) == (
        "192.0.2.50",
        "198.51.100.2",
    )
    assert client_addresses(request("127.0.0.1", "garbage"), trusted) == (
        "127.0.0.1",
        "127.0.0.1",
    )


def start_anonymously(url: str, source: str, user: str) -> FormClient:
    """A fresh client (no cookies) that signs in as ``user`` up to the stack's code prompt."""
    client = FormClient(url, source)
    client.get("/hub/login")
    client.post("/hub/login", {"username": user, "password": PASSWORDS.get(user, "x")})
    if client.status == 303:
        client.get("/hub/login")
    return client


def test_polling_does_not_keep_a_sign_in_alive(hub: Hub) -> None:
    """Only an answer extends a sign-in: a client that keeps loading the page of an
    unanswered one sees it released after login_timeout, its thread gone."""
    before = hub.threads()
    client = start_anonymously(hub.url, "127.0.0.7", "games")
    assert "One-time password" in client.text, client.text
    released = "releasing the abandoned sign-in of 'games'"
    count = hub.log_text().count(released)
    deadline = time.monotonic() + LOGIN_TIMEOUT * 3
    while hub.log_text().count(released) == count:
        assert time.monotonic() < deadline, "polling kept the sign-in alive"
        client.get("/hub/login")  # a page view, again and again
        time.sleep(0.3)
    wait_until(lambda: hub.threads() <= before, timeout=10, what="the phase's thread to end")
    client.get("/hub/login")
    assert "Your sign-in timed out" in client.text


def test_one_address_filling_its_share_leaves_room_for_others(
    browser: Browser, hub: Hub, tmp_path: pathlib.Path
) -> None:
    """One address starts sign-ins as fast as it can; a user elsewhere still signs in."""
    clients = [start_anonymously(hub.url, "127.0.0.2", "games") for _ in range(PER_ADDRESS + 3)]
    try:
        waiting = [c for c in clients if "One-time password" in c.text]
        refused = [c for c in clients if c.status == 503]
        assert len(waiting) == PER_ADDRESS, [c.status for c in clients]
        assert len(refused) == 3
        for client in refused:
            assert 1 <= int(client.headers["retry-after"]) <= LOGIN_TIMEOUT + 1
            assert "Too many sign-ins are in progress" in client.text
        sign_in(browser, hub, "daemon", PASSWORDS["daemon"])
        browser.screenshot(tmp_path, "home")
        assert_home(browser, hub, "daemon")
    finally:
        for client in clients:
            client.get("/hub/login?restart=1")


def test_one_failure_text_for_a_wrong_password_and_an_unknown_user(hub: Hub) -> None:
    pages = []
    for user, password in (("daemon", "not-the-password"), ("pamphlet-nosuchuser", "x")):
        client = FormClient(hub.url, "127.0.0.8")
        client.get("/hub/login")
        client.post("/hub/login", {"username": user, "password": password})
        pages.append((client.status, client.notices("pamphlet-notice")))
    assert pages[0] == pages[1] == (403, ["Login incorrect."]), pages


def test_form_without_xsrf_answers_nothing(hub: Hub) -> None:
    """JupyterHub's _xsrf check runs before any PAM: no token, no sign-in."""
    client = FormClient(hub.url, "127.0.0.9")
    client.get("/hub/login")
    # The fields alone, without the page's hidden _xsrf.
    client.request("POST", "/hub/login", {"username": "daemon", "password": PASSWORDS["daemon"]})
    assert "Login form invalid or expired" in client.text, client.text
    assert not any(name.startswith("jupyterhub-hub-login") for name in client.cookies)
    assert "pamphlet-signin" not in client.cookies


def test_stale_step_answers_nothing(browser: Browser, hub: Hub) -> None:
    """A form replayed for an earlier question (a second tab, a back button) is ignored."""
    sign_in(browser, hub, "games", PASSWORDS["games"])
    label = "One-time password (OATH) for `games':"
    assert labels(browser) == [(label, "password")]
    step = browser.driver.find_element(By.NAME, "step")
    browser.driver.execute_script(
        "arguments[0].value = String(Number(arguments[0].value) - 1)", step
    )
    answer(browser, label, fresh_code())
    # Still the same question: the stale answer went nowhere.
    assert labels(browser) == [(label, "password")]
    browser.get(f"{hub.url}/hub/login?restart=1")
    assert labels(browser) == [("Username:", "text"), ("Password:", "password")]


# -- the authenticator in this process: sessions, refusals ---------------------


SESSION_SCRIPT = """#!/bin/sh
echo "$PAM_TYPE user=$PAM_USER rhost=$PAM_RHOST" >> {marker}
"""


def test_sessions_open_and_close_on_the_sign_in_handle(tmp_path: pathlib.Path) -> None:
    """open_sessions: the session opens at spawn on the very handle of the sign-in.

    pam_exec sees PAM_RHOST, which only the sign-in's handle has (a new
    handle, as PAMAuthenticator makes for sessions, would have none).
    """
    from pamphlet.contrib.jupyterhub import PamphletAuthenticator
    from pamphlet.contrib.jupyterhub.authenticator import _FLOW_KEY, _Verdict

    marker = tmp_path / "sessions"
    script = tmp_path / "session.sh"
    script.write_text(SESSION_SCRIPT.format(marker=marker))
    script.chmod(0o755)
    stack = [
        "auth     required {pam_matrix} passdb={passdb}",
        "account  required {pam_matrix} passdb={passdb}",
        f"session  required pam_exec.so {script}",
    ]

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

    async def scenario(service: TemporaryService) -> None:
        authenticator = PamphletAuthenticator(
            service=service.name, confdir=service.confdir, open_sessions=True
        )
        # A name and password alone (JupyterHub's token API, another handler) get nothing.
        assert (
            await authenticator.authenticate(None, {"username": "daemon", "password": "pw"}) is None
        )
        sid = authenticator.start("daemon", "pw", rhost="192.0.2.7")
        assert await authenticator.settled(sid)
        login = authenticator.find(sid)
        assert login is not None and login.outcome is not None and login.outcome.success
        authenticator.forget(sid)
        verdict = _Verdict("daemon", login)
        assert await authenticator.authenticate(None, {_FLOW_KEY: verdict}) == {"name": "daemon"}
        await authenticator.settle(verdict, "daemon")
        assert await authenticator.authenticate(None, {_FLOW_KEY: verdict}) is None  # once only
        assert not marker.exists()  # signing in opens no session
        user, spawner = Named("daemon"), Named("")
        await authenticator.pre_spawn_start(user, spawner)
        assert marker.read_text() == "open_session user=daemon rhost=192.0.2.7\n"
        await authenticator.post_spawn_stop(user, spawner)
        assert marker.read_text().splitlines()[1] == "close_session user=daemon rhost=192.0.2.7"
        # A second spawn with no sign-in in between: a new handle, as PAMAuthenticator.
        await authenticator.pre_spawn_start(user, spawner)
        await authenticator.post_spawn_stop(user, spawner)
        assert marker.read_text().splitlines()[2:] == [
            "open_session user=daemon rhost=",
            "close_session user=daemon rhost=",
        ]

    with TemporaryService(stack, users={"daemon": "pw"}) as service:
        asyncio.run(scenario(service))


@pytest.mark.root
def test_sign_in_through_the_broker() -> None:
    """broker=: the sign-in's PAM handle lives in the broker (issue 11), the page works as
    before. The hub's process here is the test's own, as root, which the policy names."""
    from broker_harness import Broker
    from pamphlet.contrib.jupyterhub import PamphletAuthenticator

    policy = """\
        [[allow]]
        users = ["root"]
        services = ["hub"]
        """

    async def scenario(service: TemporaryService, broker: Broker) -> None:
        authenticator = PamphletAuthenticator(service="hub", broker=broker.socket)
        sid = authenticator.start("daemon", "pw", rhost="192.0.2.7")
        assert await authenticator.settled(sid)
        login = authenticator.find(sid)
        assert login is not None and login.outcome is not None
        assert login.outcome.success, login.outcome
        refused = authenticator.start("daemon", "wrong", rhost="192.0.2.8")
        assert await authenticator.settled(refused)
        failed = authenticator.find(refused)
        assert failed is not None and failed.outcome is not None
        assert not failed.outcome.success and failed.outcome.message == "Login incorrect."
        await authenticator.end_quietly(login)

    with TemporaryService(users={"daemon": "pw"}, name="hub") as service:
        broker = Broker(policy, service.confdir)
        try:
            asyncio.run(scenario(service, broker))
            assert broker.audit_lines("hub", "daemon")  # the broker did the PAM work
        finally:
            broker.stop()
            broker.cleanup()
