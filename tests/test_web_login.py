"""The web login example in a real headless browser, against real PAM stacks.

Each test serves ``examples.web_login`` on 127.0.0.1 from a thread of this
process (so it can look at the server's PAM transactions and thread count),
drives Debian's Chromium through Selenium, and saves a screenshot of every
page into its temporary folder.
"""

from __future__ import annotations

import collections
import gc
import http.client
import http.cookiejar
import os
import pathlib
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from examples.web_login import COOKIE, Stage, Visit, WebLogin
from examples.web_login.demo import DEMO_CODE, DEMO_PASSWORD

from pamphlet.constants import Phase
from pamphlet.stepwise import AsyncLogin, LoginSequence
from pamphlet.testing import TemporaryService
from web_browser import Browser, ServerThread, wait_until

ROOT = pathlib.Path(__file__).parent.parent

MATRIX_STACK = """\
auth     required {pam_matrix} passdb={passdb} verbose
account  required {pam_matrix} passdb={passdb}
password required {pam_matrix} passdb={passdb}
session  required {pam_matrix} passdb={passdb}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    browser = Browser()
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def page(browser: Browser) -> Browser:
    browser.reset()
    browser.shots = 0
    return browser


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerThread]]:
    """``serve(service, **WebLogin options)``: the web login, stopped after the test."""
    servers: list[ServerThread] = []

    def start(service: TemporaryService, **options: Any) -> ServerThread:
        server = ServerThread(WebLogin(service.name, confdir=service.confdir, **options))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def flows_of(server: ServerThread) -> list[Visit]:
    return server.call(lambda: list(server.login.visits.values()))


def sign_in(page: Browser, server: ServerThread, user: str, shots: pathlib.Path) -> None:
    page.get(server.url + "/")
    assert page.title == "Sign in"
    page.fill("User name", user)
    page.screenshot(shots, "start")
    page.click("Continue")


def answer(page: Browser, label: str, value: str, shots: pathlib.Path, name: str) -> None:
    page.fill(label, value)
    page.screenshot(shots, name)
    page.click("Continue")


def thread_names() -> list[str]:
    """The OS threads of this process: pamphlet starts phase threads with the
    low-level ``_thread`` module, which ``threading.enumerate`` does not list."""
    names = []
    for task in pathlib.Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except FileNotFoundError:
            pass  # the thread ended while we looked
    return sorted(names)


def wait_for_threads(expected: list[str], timeout: float = 15) -> None:
    """Wait until this process has no OS thread beyond ``expected`` (names sorted).

    Fewer is fine: a thread of an earlier test may still have been ending
    when the baseline was taken."""
    try:
        wait_until(
            lambda: not collections.Counter(thread_names()) - collections.Counter(expected),
            timeout=timeout,
        )
    except AssertionError:
        raise AssertionError(f"threads {thread_names()}, expected {expected}") from None


def recorded_session_stack(tmp_path: pathlib.Path) -> tuple[str, pathlib.Path]:
    """MATRIX_STACK plus pam_exec writing "open_session USER" / "close_session USER"
    lines into the returned file: proof of which session calls really ran."""
    log = tmp_path / "session-log"
    script = tmp_path / "record-session.sh"
    script.write_text(f'#!/bin/sh\necho "$PAM_TYPE $PAM_USER" >> {log}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return MATRIX_STACK + f"session required pam_exec.so {script}\n", log


# -- the flows a user sees ------------------------------------------------------


def test_right_password_opens_a_session_and_shows_its_environment(
    page, serve, make_service, tmp_path
):
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    server = serve(service)
    sign_in(page, server, "bob", tmp_path)
    cookie_before = page.cookie(COOKIE)

    assert page.title == "Sign in"
    assert "Signing in as bob" in page.text
    assert page.fields() == [("Password:", "password")]
    answer(page, "Password:", "secret", tmp_path, "password")

    assert page.title == "Welcome, bob"
    page.screenshot(tmp_path, "welcome")
    # pam_matrix's "verbose" info message, shown as info, not lost.
    assert page.notices() == [("info", "Authentication succeeded")]
    # setcred and open_session ran: pam_matrix put these in the PAM environment.
    assert "HOMEDIR /home/bob" in page.text
    assert re.search(r"^CRED \S+", page.text, re.MULTILINE)
    [flow] = flows_of(server)
    assert flow.stage is Stage.WELCOME and not flow.ended

    cookie = page.cookie(COOKIE)
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert len(cookie["value"]) >= 43  # 32 random bytes, urlsafe base64
    # A new id after the login: the one the browser had before is worthless.
    assert cookie["value"] != cookie_before["value"]
    assert cookie_before["value"] not in server.call(lambda: dict(server.login.visits))


def test_wrong_password_is_refused_after_a_delay_that_holds_no_thread(
    page, serve, make_service, tmp_path
):
    stack = "auth optional pam_faildelay.so delay=2000000\n" + MATRIX_STACK
    service = make_service(stack, users={"bob": "secret"})
    server = serve(service)
    threads_before = thread_names()
    sign_in(page, server, "bob", tmp_path)
    [flow] = flows_of(server)
    page.fill("Password:", "wrong")
    page.screenshot(tmp_path, "wrong-password")
    started = time.monotonic()
    old_page = page.submit_soon()

    # While libpam's delay runs, the failed login holds no thread of its own,
    # and another browser is served at once.
    wait_until(lambda: flow.stage is Stage.WORKING, what="the POST to arrive")
    time.sleep(0.5)
    assert flow.stage is Stage.WORKING, "the delay is over already"
    # None beyond those before (fewer is fine: one of an earlier test may
    # have been ending when they were counted).
    assert not collections.Counter(thread_names()) - collections.Counter(threads_before)
    other = urllib.request.urlopen(server.url + "/", timeout=10)
    assert b"<h1>Sign in</h1>" in other.read()
    assert flow.stage is Stage.WORKING, "the other request waited for the delay"

    page.wait_for_new_page(old_page)
    # libpam draws the delay at random, between half and one and a half times
    # what was asked (_pam_compute_delay).
    assert time.monotonic() - started >= 0.5 * 2.0
    page.screenshot(tmp_path, "refused")
    assert page.title == "Sign in"
    assert page.notices() == [
        ("error", "Authentication failed"),  # pam_matrix's own message
        ("error", "Login incorrect."),
    ]
    assert page.field("User name").get_attribute("value") == "bob"
    # The refused transaction is over: its handle is ended, its page was
    # shown once, and the browser starts afresh.
    assert flows_of(server) == []
    assert "Traceback" not in page.source


def test_two_prompt_stack_asks_one_page_at_a_time(page, serve, make_service, tmp_path):
    service = make_service(users={"bob": "secret"})
    codes = tmp_path / "codes" / "passdb"
    codes.parent.mkdir()
    codes.write_text(f"bob:271828:{service.name}\n")
    service.add_service(
        service.name,
        f"auth required {{pam_matrix}} passdb={{passdb}} verbose\n"
        f"auth required {{pam_matrix}} passdb={codes} echo\n"
        + "\n".join(MATRIX_STACK.splitlines()[1:]),
    )
    server = serve(service)
    sign_in(page, server, "bob", tmp_path)
    assert page.fields() == [("Password:", "password")]
    answer(page, "Password:", "secret", tmp_path, "first-prompt")

    # The second module's prompt is echo-on: a text field. The first module's
    # info message, which came in a conversation call of its own, is shown
    # above it.
    assert page.title == "Sign in"
    assert page.fields() == [("Password:", "text")]
    assert page.notices() == [("info", "Authentication succeeded")]
    answer(page, "Password:", "271828", tmp_path, "second-prompt")
    assert page.title == "Welcome, bob"
    page.screenshot(tmp_path, "welcome")

    # A wrong second answer fails the whole login.
    page.click("Log out")
    sign_in(page, server, "bob", tmp_path)
    answer(page, "Password:", "secret", tmp_path, "first-again")
    answer(page, "Password:", "000000", tmp_path, "wrong-code")
    assert page.title == "Sign in"
    assert ("error", "Login incorrect.") in page.notices()


def test_a_stack_that_asks_nothing_logs_straight_in(page, serve, make_service, tmp_path):
    service = make_service(
        "\n".join(
            f"{kind} required pam_permit.so" for kind in ("auth", "account", "password", "session")
        )
    )
    server = serve(service)
    sign_in(page, server, "carol", tmp_path)
    assert page.title == "Welcome, carol"
    assert "The PAM stack set no environment variables." in page.text
    page.screenshot(tmp_path, "welcome")


def test_expired_password_is_changed_in_the_same_flow(page, serve, make_service, tmp_path):
    stack = MATRIX_STACK.replace("account ", "account  required pam_stress.so expired\naccount ", 1)
    service = make_service(stack, users={"bob": "secret"})
    server = serve(service)
    sign_in(page, server, "bob", tmp_path)
    answer(page, "Password:", "secret", tmp_path, "password")

    # acct_mgmt said PAM_NEW_AUTHTOK_REQD: pam_chauthtok with
    # PAM_CHANGE_EXPIRED_AUTHTOK converses next, one prompt per page.
    assert page.title == "Change your password"
    assert page.notices() == [
        ("info", "Authentication succeeded"),
        ("info", "Your password has expired. Choose a new one."),
    ]
    assert page.fields() == [("Old password:", "password")]
    answer(page, "Old password:", "secret", tmp_path, "old-password")
    assert page.fields() == [("New Password :", "password")]
    answer(page, "New Password :", "n3w-secret", tmp_path, "new-password")
    assert page.fields() == [("Verify New Password :", "password")]
    answer(page, "Verify New Password :", "n3w-secret", tmp_path, "verify-password")

    assert page.title == "Welcome, bob"
    page.screenshot(tmp_path, "welcome")
    assert service.password_of("bob") == "n3w-secret"


def test_mismatched_new_passwords_end_the_login_with_the_modules_message(
    page, serve, make_service, tmp_path
):
    stack = MATRIX_STACK.replace("account ", "account  required pam_stress.so expired\naccount ", 1)
    service = make_service(stack, users={"bob": "secret"})
    server = serve(service)
    sign_in(page, server, "bob", tmp_path)
    answer(page, "Password:", "secret", tmp_path, "password")
    answer(page, "Old password:", "secret", tmp_path, "old-password")
    answer(page, "New Password :", "one", tmp_path, "new-password")
    answer(page, "Verify New Password :", "two", tmp_path, "verify-password")
    page.screenshot(tmp_path, "refused")
    assert page.title == "Sign in"
    notices = page.notices()
    assert ("error", "Passwords do not match") in notices
    assert notices[-1][0] == "error"
    assert notices[-1][1].startswith("Your password was not changed: ")
    assert service.password_of("bob") == "secret"
    assert flows_of(server) == []


def test_logout_closes_the_session_and_ends_the_handle(page, serve, make_service, tmp_path):
    stack, marker = recorded_session_stack(tmp_path)
    service = make_service(stack, users={"bob": "secret"})
    server = serve(service)
    threads_before = thread_names()
    sign_in(page, server, "bob", tmp_path)
    answer(page, "Password:", "secret", tmp_path, "password")
    assert page.title == "Welcome, bob"
    assert marker.read_text() == "open_session bob\n"
    [flow] = flows_of(server)

    page.click("Log out")
    page.screenshot(tmp_path, "logged-out")
    assert page.title == "Sign in"
    assert page.notices() == [("info", "You have logged out.")]
    assert marker.read_text() == "open_session bob\nclose_session bob\n"
    assert flow.ended
    assert flows_of(server) == []
    wait_until(lambda: thread_names() == threads_before, what="the PAM threads to finish")

    # The old page's form is now stale: going back and posting it does nothing.
    page.driver.back()
    page.get(server.url + "/")
    assert page.title == "Sign in"


def test_abandoned_login_is_released_after_the_timeout(page, serve, make_service, tmp_path):
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    server = serve(service, login_timeout=1.0)
    threads_before = thread_names()
    sign_in(page, server, "bob", tmp_path)
    assert page.fields() == [("Password:", "password")]
    [flow] = flows_of(server)
    assert flow.stage is Stage.ASKING and not flow.ended
    # While the form is open, the PAM phase waits inside libpam on its thread.
    assert len(thread_names()) > len(threads_before)

    # The user closes the tab: nothing more comes from this browser.
    page.driver.switch_to.new_window("tab")
    first, second = page.driver.window_handles
    page.driver.switch_to.window(first)
    page.driver.close()
    page.driver.switch_to.window(second)

    wait_until(lambda: flow.ended, timeout=20, what="the handle to be ended")
    assert flow.stage is Stage.EXPIRED
    assert flow.busy is None or flow.busy.done()
    wait_until(lambda: thread_names() == threads_before, what="the PAM thread to finish")

    # Coming back later in another tab: the browser is told, and starts again.
    page.get(server.url + "/")
    page.screenshot(tmp_path, "timed-out")
    assert page.title == "Sign in"
    assert page.notices() == [
        ("error", "Your sign-in timed out and was cancelled. Please start again.")
    ]
    assert flows_of(server) == []


def test_idle_session_is_closed_after_the_session_timeout(page, serve, make_service, tmp_path):
    stack, marker = recorded_session_stack(tmp_path)
    service = make_service(stack, users={"bob": "secret"})
    server = serve(service, session_timeout=1.0)
    sign_in(page, server, "bob", tmp_path)
    answer(page, "Password:", "secret", tmp_path, "password")
    assert page.title == "Welcome, bob"
    [flow] = flows_of(server)
    wait_until(lambda: flow.ended, timeout=20, what="the idle session to be ended")
    assert marker.read_text() == "open_session bob\nclose_session bob\n"
    page.get(server.url + "/")
    assert page.title == "Sign in"
    assert "timed out" in page.notices()[0][1]


def test_a_slow_stack_shows_a_page_that_waits_for_it(page, serve, make_service, tmp_path):
    service = make_service(
        "auth required pam_exec.so /bin/sleep 2\n"
        + "\n".join(f"{kind} required pam_permit.so" for kind in ("auth", "account", "session"))
    )
    server = serve(service, wait_timeout=0.3)
    sign_in(page, server, "carol", tmp_path)
    # One read of the whole page: it reloads itself every second.
    source = page.source
    assert "<h1>Sign in</h1>" in source
    assert "Please wait: the PAM stack is still working." in source
    page.screenshot(tmp_path, "please-wait")
    # The page refreshes itself until the stack is done.
    wait_until(lambda: "<h1>Welcome, carol</h1>" in page.source, what="the welcome page")


def test_cancel_releases_the_login(page, serve, make_service, tmp_path):
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    server = serve(service)
    sign_in(page, server, "bob", tmp_path)
    [flow] = flows_of(server)
    page.click("Cancel")
    assert page.title == "Sign in"
    assert flow.ended
    assert flows_of(server) == []


# -- what a browser must not see or be able to do -------------------------------


class Client:
    """A plain HTTP client with a cookie jar and no redirects followed."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any) -> None:
                return None

        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), NoRedirect
        )

    def request(self, path: str, form: dict[str, str] | None = None) -> tuple[int, str, Any]:
        data = None if form is None else urllib.parse.urlencode(form).encode()
        try:
            with self.opener.open(self.base + path, data=data, timeout=30) as response:
                return response.status, response.read().decode(), response.headers
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(), error.headers

    def csrf(self) -> str:
        status, body, _headers = self.request("/")
        match = re.search(r'name="csrf" value="([0-9a-f]+)"', body)
        assert status == 200 and match, body
        return match.group(1)


def test_forms_need_the_csrf_token_of_their_own_cookie(serve, make_service):
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    server = serve(service)
    client, other = Client(server.url), Client(server.url)
    token, other_token = client.csrf(), other.csrf()
    assert token != other_token

    status, body, headers = client.request("/", None)
    assert "HttpOnly" in str(headers.get("Set-Cookie", "HttpOnly"))
    for form in ({"username": "bob"}, {"username": "bob", "csrf": other_token}):
        status, body, headers = client.request("/login", form)
        assert status == 403
        assert "<h1>Form expired</h1>" in body
        assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert flows_of(server) == []  # no PAM transaction was started

    status, body, headers = client.request("/login", {"username": "bob", "csrf": token})
    assert status == 303 and headers["Location"] == "/"
    [flow] = flows_of(server)
    assert flow.stage is Stage.ASKING
    # The login POST spent the id it came with: the token of that id is
    # worth nothing now, and the new id has a token of its own.
    status, body, _headers = client.request(
        "/answer", {"step": str(flow.step), "answer-0": "secret", "csrf": token}
    )
    assert status == 403 and flow.stage is Stage.ASKING
    token = client.csrf()
    # Answers need the token too, and the step of the question they answer.
    status, body, _headers = client.request("/answer", {"step": "1", "answer-0": "secret"})
    assert status == 403
    status, body, _headers = client.request(
        "/answer", {"step": "7", "answer-0": "secret", "csrf": token}
    )
    assert status == 303 and flow.stage is Stage.ASKING
    status, body, _headers = client.request(
        "/answer", {"step": str(flow.step), "answer-0": "secret", "csrf": token}
    )
    assert status == 303
    assert flow.stage is Stage.WELCOME


def test_an_answer_with_a_nul_byte_fails_closed(serve, make_service):
    # A browser cannot type NUL, but a forged form can send %00. Truncated at
    # the NUL, "secret\0junk" would be the right password: it must fail.
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    server = serve(service)
    client = Client(server.url)
    token = client.csrf()
    client.request("/login", {"username": "bob", "csrf": token})
    [flow] = flows_of(server)
    status, _body, _headers = client.request(
        "/answer", {"step": str(flow.step), "answer-0": "secret\0junk", "csrf": client.csrf()}
    )
    assert status == 303
    status, body, _headers = client.request("/")
    assert "Login incorrect." in body and "Welcome" not in body
    assert flow.ended


def test_first_cookie_is_httponly_and_samesite_strict(serve, make_service):
    server = serve(make_service(MATRIX_STACK, users={"bob": "secret"}))
    with urllib.request.urlopen(server.url + "/", timeout=10) as response:
        cookie = response.headers["Set-Cookie"]
        assert response.headers["Cache-Control"] == "no-store"
    assert cookie.startswith(f"{COOKIE}=")
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes


def test_errors_never_show_a_traceback(page, serve, make_service, tmp_path, monkeypatch):
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    server = serve(service)

    # A bug while rendering a page: the browser gets a sentence, the log the rest.
    from examples.web_login import pages

    def broken_welcome_page(*args: Any) -> str:
        raise RuntimeError("internal detail 0xdeadbeef")

    monkeypatch.setattr(pages, "welcome_page", broken_welcome_page)
    sign_in(page, server, "bob", tmp_path)
    answer(page, "Password:", "secret", tmp_path, "password")
    page.screenshot(tmp_path, "server-error")
    assert page.title == "Something went wrong"
    assert "0xdeadbeef" not in page.source and "Traceback" not in page.source
    monkeypatch.undo()

    # A bug inside the login (its sequence breaks before the session): the
    # login fails closed and the handle ends.
    original = LoginSequence.next_call

    def broken_next_call(self: LoginSequence, done: Phase | None, code: int) -> Any:
        if done is Phase.ACCT_MGMT:
            raise RuntimeError("internal detail 0xfeedface")
        return original(self, done, code)

    page.reset()
    monkeypatch.setattr(LoginSequence, "next_call", broken_next_call)
    sign_in(page, server, "bob", tmp_path)
    [flow] = [flow for flow in flows_of(server) if flow.stage is Stage.ASKING]
    answer(page, "Password:", "secret", tmp_path, "password-again")
    page.screenshot(tmp_path, "flow-error")
    assert page.title == "Sign in"
    assert page.notices()[-1] == ("error", "Something went wrong on our side. Please try again.")
    assert "0xfeedface" not in page.source and "Traceback" not in page.source
    assert flow.ended

    status, body, _headers = Client(server.url).request("/no/such/page")
    assert status == 404 and "Traceback" not in body


# -- attacks: fixation, races, holding resources ---------------------------------


def fetch(
    base: str,
    path: str,
    *,
    sid: str | None = None,
    form: dict[str, str] | None = None,
    raw_form: bytes | None = None,
    source: str = "127.0.0.1",
) -> tuple[int, http.client.HTTPMessage, str, str | None]:
    """One request as an attacker's script sends it: the cookie set by hand, from
    the loopback address ``source``; ``raw_form`` is a POST body sent as it is.
    (status, headers, body, the id the answer sets)."""
    host, port = urllib.parse.urlsplit(base).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    try:
        headers = {"Cookie": f"{COOKIE}={sid}"} if sid is not None else {}
        body = raw_form if form is None else urllib.parse.urlencode(form).encode()
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        connection.request("POST" if body is not None else "GET", path, body, headers)
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    issued = None
    for header in response.headers.get_all("Set-Cookie") or []:
        match = re.match(rf"{COOKIE}=([^;]*)", header)
        if match:
            issued = match.group(1)
    return response.status, response.headers, text, issued


def csrf_in(body: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', body)
    assert match, body
    return match.group(1)


def new_visitor(base: str, source: str = "127.0.0.1") -> tuple[str, str]:
    """(id, CSRF token) of a first visit, as the server issues them."""
    status, _headers, body, sid = fetch(base, "/", source=source)
    assert status == 200 and sid, body
    return sid, csrf_in(body)


def start_login(
    base: str, user: str = "bob", source: str = "127.0.0.1"
) -> tuple[int, http.client.HTTPMessage, str, str | None]:
    """POST /login as a new visitor; the id returned is the one the client holds after it."""
    sid, csrf = new_visitor(base, source)
    status, headers, body, issued = fetch(
        base, "/login", sid=sid, form={"username": user, "csrf": csrf}, source=source
    )
    return status, headers, body, issued or sid


@pytest.fixture
def created_flows(monkeypatch: pytest.MonkeyPatch) -> list[AsyncLogin]:
    """Every login the server starts, whether its tables keep it or not."""
    from examples.web_login import server as server_module

    created: list[AsyncLogin] = []

    class Recorded(AsyncLogin):
        @classmethod
        async def start(cls, *args: Any, **kwargs: Any) -> AsyncLogin:
            login = await super().start(*args, **kwargs)
            created.append(login)
            return login

    monkeypatch.setattr(server_module, "AsyncLogin", Recorded)
    return created


def all_released(logins: list[AsyncLogin]) -> bool:
    return all(login.ended for login in logins)


def test_a_planted_id_never_becomes_logged_in(page, serve, make_service, tmp_path):
    # The account phase takes a second after the last answer: the window in
    # which an attacker who planted the victim's id polls for the logged-in page.
    stack = MATRIX_STACK.replace(
        "account ", "account  required pam_exec.so /bin/sleep 1\naccount ", 1
    )
    service = make_service(stack, users={"bob": "secret"})
    server = serve(service)

    # An id the server never issued is not adopted: it answers with its own,
    # and a form sent under the made-up id starts nothing.
    made_up = "A" * 43
    status, _headers, body, issued = fetch(server.url, "/", sid=made_up)
    assert status == 200 and issued and issued != made_up
    status, _headers, body, _issued = fetch(
        server.url, "/login", sid=made_up, form={"username": "bob", "csrf": csrf_in(body)}
    )
    assert status == 403
    assert flows_of(server) == []

    # The attacker gets a genuine id and plants it in the victim's browser
    # (a sibling subdomain can set it), then polls the site with it.
    planted, _csrf = new_visitor(server.url)
    page.get(server.url + "/style.css")
    page.driver.add_cookie({"name": COOKIE, "value": planted, "path": "/"})
    seen_by_attacker: list[str] = []
    attacker_ids = {planted}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for sid in list(attacker_ids):
                _status, _headers, text, issued = fetch(server.url, "/", sid=sid)
                seen_by_attacker.append(text)
                if issued:
                    attacker_ids.add(issued)
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        ids_before_login = {planted}
        page.get(server.url + "/")
        ids_before_login.add(page.cookie(COOKIE)["value"])
        page.fill("User name", "bob")
        page.click("Continue")
        ids_before_login.add(page.cookie(COOKIE)["value"])
        assert page.fields() == [("Password:", "password")]
        answer(page, "Password:", "secret", tmp_path, "password")
        assert page.title == "Welcome, bob"
        time.sleep(0.3)  # the attacker polls on, after the login
    finally:
        stop.set()
        poller.join()

    logged_in = page.cookie(COOKIE)["value"]
    assert logged_in not in ids_before_login | attacker_ids
    assert seen_by_attacker, "the attacker never got an answer"
    for text in seen_by_attacker:
        assert "Welcome" not in text and "bob" not in text
    for sid in ids_before_login | attacker_ids:
        _status, _headers, text, _issued = fetch(server.url, "/", sid=sid)
        assert "<h1>Sign in</h1>" in text and "Welcome" not in text
    assert server.call(lambda: list(server.login.visits)) == [logged_in]
    page.get(server.url + "/")
    assert page.title == "Welcome, bob"


def test_a_login_slower_than_a_request_still_gets_an_id_made_after_it(serve, make_service):
    # The answer's response goes out before the stack is done: the id it
    # carries predates the login, so the first request that sees the login
    # done replaces it, and only the browser holding it can send that request.
    stack = MATRIX_STACK.replace(
        "account ", "account  required pam_exec.so /bin/sleep 1\naccount ", 1
    )
    service = make_service(stack, users={"bob": "secret"})
    server = serve(service, wait_timeout=0.2)
    _status, _headers, _body, sid = start_login(server.url)
    [flow] = flows_of(server)
    _status, _headers, body, _issued = fetch(server.url, "/", sid=sid)
    status, _headers, _body, answered = fetch(
        server.url,
        "/answer",
        sid=sid,
        form={"csrf": csrf_in(body), "step": str(flow.step), "answer-0": "secret"},
    )
    assert status == 303 and answered and answered != sid
    assert not flow.logged_in
    ids = [answered]
    body = ""
    while "Welcome" not in body:
        _status, _headers, body, issued = fetch(server.url, "/", sid=ids[-1])
        if issued:
            ids.append(issued)
        assert "Welcome" in body or "Please wait" in body, body
    assert len(ids) == 2, "the id was not replaced when the login was done"
    for old in (sid, answered):
        _status, _headers, body, _issued = fetch(server.url, "/", sid=old)
        assert "<h1>Sign in</h1>" in body
    _status, _headers, body, issued = fetch(server.url, "/", sid=ids[-1])
    assert "<h1>Welcome, bob</h1>" in body and issued is None


def test_concurrent_logins_with_one_id_leave_no_flow_behind(serve, make_service, created_flows):
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    threads_without_server = thread_names()
    server = serve(service, login_timeout=1.0)
    threads_before = thread_names()

    def burst() -> list[int]:
        sid, csrf = new_visitor(server.url)
        barrier = threading.Barrier(10)
        statuses: list[int] = []

        def post() -> None:
            barrier.wait()
            status, _headers, _body, _issued = fetch(
                server.url, "/login", sid=sid, form={"username": "bob", "csrf": csrf}
            )
            statuses.append(status)

        posters = [threading.Thread(target=post) for _ in range(10)]
        for poster in posters:
            poster.start()
        for poster in posters:
            poster.join()
        return statuses

    statuses = burst()
    assert len(statuses) == 10 and set(statuses) == {303}
    assert len(created_flows) == 10
    # One browser id, one login: each new one replaced the one before.
    wait_until(
        lambda: sum(not flow.ended for flow in created_flows) <= 1,
        what="the replaced logins to be released",
    )
    # After the login timeout nothing is left: no handle, no thread, no flow.
    wait_until(lambda: all_released(created_flows), what="every login to be released")
    wait_for_threads(threads_before)
    assert [flow for flow in flows_of(server) if not flow.stage.finished] == []
    assert server.call(lambda: len(server.login.registry)) == 0

    # Again, and the server stops before the timeout: shutdown releases them all.
    server.login.login_timeout = 60.0
    created_flows.clear()
    assert set(burst()) == {303}
    assert sum(not flow.ended for flow in created_flows) >= 1
    server.stop()
    assert all_released(created_flows)
    wait_for_threads(threads_without_server)


def test_polling_does_not_keep_an_unanswered_login_alive(serve, make_service, tmp_path):
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    server = serve(service, login_timeout=1.0)
    threads_before = thread_names()
    started = time.monotonic()
    status, _headers, _body, sid = start_login(server.url)
    assert status == 303 and sid
    [flow] = flows_of(server)
    assert flow.stage is Stage.ASKING

    # The client polls the page and never answers: the login ends at the
    # login timeout all the same, and the next poll says so. (That page is
    # shown once: the poll that sees it is the one to look at.)
    timed_out = False
    while not timed_out and time.monotonic() - started < 10:
        _status, _headers, body, issued = fetch(server.url, "/", sid=sid)
        timed_out = "Your sign-in timed out and was cancelled." in body
        sid = issued or sid
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    assert flow.ended, "polling kept the login alive"
    assert timed_out, body
    assert 1.0 <= elapsed < 5.0
    assert flow.stage is Stage.EXPIRED
    wait_for_threads(threads_before)


def test_answers_extend_a_login_and_nothing_else_does(serve, make_service, tmp_path):
    # Two prompts: each answer starts the login timeout afresh.
    service = make_service(users={"bob": "secret"})
    codes = tmp_path / "codes" / "passdb"
    codes.parent.mkdir()
    codes.write_text(f"bob:271828:{service.name}\n")
    service.add_service(
        service.name,
        f"auth required {{pam_matrix}} passdb={{passdb}}\n"
        f"auth required {{pam_matrix}} passdb={codes} echo\n"
        + "\n".join(MATRIX_STACK.splitlines()[1:]),
    )
    server = serve(service, login_timeout=3.0)
    _status, _headers, _body, sid = start_login(server.url)
    assert sid
    [flow] = flows_of(server)
    _status, _headers, body, _issued = fetch(server.url, "/", sid=sid)
    time.sleep(2.0)
    _status, _headers, _body, issued = fetch(
        server.url,
        "/answer",
        sid=sid,
        form={"csrf": csrf_in(body), "step": str(flow.step), "answer-0": "secret"},
    )
    sid = issued or sid
    time.sleep(2.0)  # 4 s since the login began, 2 s since the answer
    assert not flow.ended
    _status, _headers, body, _issued = fetch(server.url, "/", sid=sid)
    assert "Signing in as" in body
    _status, _headers, _body, issued = fetch(
        server.url,
        "/answer",
        sid=sid,
        form={"csrf": csrf_in(body), "step": str(flow.step), "answer-0": "271828"},
    )
    sid = issued or sid
    _status, _headers, body, _issued = fetch(server.url, "/", sid=sid)
    assert "<h1>Welcome, bob</h1>" in body


def test_logins_in_flight_are_capped_overall_and_per_address(
    page, serve, make_service, tmp_path, created_flows
):
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    server = serve(service, login_timeout=5.0, max_logins=4, max_logins_per_address=2)
    threads_before = thread_names()

    def over_the_cap(status: int, headers: http.client.HTTPMessage, body: str) -> None:
        assert status == 503, body
        assert 1 <= int(headers["Retry-After"]) <= 5
        assert "<h1>Try again later</h1>" in body

    for _ in range(2):
        status, _headers, _body, _sid = start_login(server.url, source="127.0.0.2")
        assert status == 303
    # A third from the same address is refused, and starts no PAM transaction.
    over_the_cap(*start_login(server.url, source="127.0.0.2")[:3])
    assert len(created_flows) == 2
    # Meanwhile a user at another address signs in, all the way.
    sign_in(page, server, "bob", tmp_path)
    answer(page, "Password:", "secret", tmp_path, "other-address")
    assert page.title == "Welcome, bob"
    page.click("Log out")
    assert len(created_flows) == 3
    created_flows.pop()
    # Another address still gets in, up to the overall cap.
    for _ in range(2):
        status, _headers, _body, _sid = start_login(server.url, source="127.0.0.3")
        assert status == 303
    status, headers, body, _sid = start_login(server.url, source="127.0.0.4")
    over_the_cap(status, headers, body)
    assert "Too many sign-ins are in progress" in body
    assert len(created_flows) == 4

    # What a browser shows over the cap.
    page.get(server.url + "/")
    page.fill("User name", "bob")
    page.click("Continue")
    shot = page.screenshot(tmp_path, "over-the-cap")
    assert page.title == "Try again later"
    assert "Please try again in" in page.text
    print(f"screenshot: {shot}")

    # The logins nobody answers are released at the timeout; then there is room again.
    wait_until(lambda: all_released(created_flows), timeout=30, what="the logins to be released")
    wait_for_threads(threads_before)
    status, _headers, _body, _sid = start_login(server.url, source="127.0.0.2")
    assert status == 303


def test_a_login_replaced_by_a_refused_one_is_still_released(serve, make_service, created_flows):
    # A's login is replaced by a POST /login with A's id and token that comes
    # from address B, which is at its share: that POST gets the 503, and A's
    # login, which it replaced, must end all the same: no handle, no thread
    # left inside libpam that the registry no longer counts.
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    server = serve(service, login_timeout=60.0, max_logins_per_address=1)
    address_a, address_b = "127.0.0.2", "127.0.0.3"
    status, _headers, _body, _sid = start_login(server.url, source=address_b)
    assert status == 303
    [login_of_b] = created_flows
    threads_with_b = thread_names()
    for _ in range(3):
        status, _headers, _body, sid = start_login(server.url, source=address_a)
        assert status == 303 and sid
        _status, _headers, body, _issued = fetch(server.url, "/", sid=sid, source=address_a)
        assert "Signing in as" in body
        status, headers, body, _issued = fetch(
            server.url,
            "/login",
            sid=sid,
            form={"username": "bob", "csrf": csrf_in(body)},
            source=address_b,
        )
        assert status == 503 and "Retry-After" in headers, body
        # created_flows[0] is B's login; every later one was A's.
        wait_until(
            lambda: all_released(created_flows[1:]), what="the replaced login to be released"
        )
        wait_for_threads(threads_with_b)
        assert server.call(lambda: len(server.login.registry)) == 1
        # A's place is free again: A can start a new login.
        status, _headers, _body, sid = start_login(server.url, source=address_a)
        assert status == 303
        _status, _headers, body, _issued = fetch(server.url, "/", sid=sid, source=address_a)
        fetch(server.url, "/cancel", sid=sid, form={"csrf": csrf_in(body)}, source=address_a)
        wait_until(lambda: created_flows[-1].ended, what="the cancelled login to be released")
    assert not login_of_b.ended
    assert all_released([login for login in created_flows if login is not login_of_b])


def test_a_cancelled_login_leaves_nothing_behind_in_the_server(serve, make_service, created_flows):
    # Each login started from a fresh id and cancelled must be forgotten:
    # nothing of it (its visit, its login) may stay in the server's tables,
    # or an anonymous client grows the server's memory without bound.
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    server = serve(service)
    threads_before = thread_names()
    for _ in range(5):
        status, _headers, _body, sid = start_login(server.url)
        assert status == 303 and sid
        _status, _headers, body, _issued = fetch(server.url, "/", sid=sid)
        status, _headers, _body, _issued = fetch(
            server.url, "/cancel", sid=sid, form={"csrf": csrf_in(body)}
        )
        assert status == 303
    assert len(created_flows) == 5 and all_released(created_flows)
    wait_for_threads(threads_before)
    left = [weakref.ref(login) for login in created_flows]
    created_flows.clear()

    def all_forgotten() -> bool:
        gc.collect()
        return all(login() is None for login in left)

    wait_until(all_forgotten, timeout=5, what="the server to forget the cancelled logins")


def test_a_form_that_is_not_utf8_is_a_bad_request(serve, make_service, caplog):
    # Raw bytes that are not UTF-8 are malformed input like any other: a 400,
    # no traceback in the answer or the log (which the client could flood).
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    server = serve(service)
    sid, csrf = new_visitor(server.url)
    status, _headers, body, _issued = fetch(
        server.url, "/login", sid=sid, raw_form=b"username=\xff\xfe&csrf=" + csrf.encode()
    )
    assert status == 400, body
    assert "Traceback" not in body
    status, _headers, _body, sid = start_login(server.url)
    assert status == 303 and sid
    [flow] = [flow for flow in flows_of(server) if flow.stage is Stage.ASKING]
    _status, _headers, body, _issued = fetch(server.url, "/", sid=sid)
    status, _headers, body, _issued = fetch(
        server.url,
        "/answer",
        sid=sid,
        raw_form=f"csrf={csrf_in(body)}&step={flow.step}&answer-0=".encode() + b"\xffsecret",
    )
    assert status == 400, body
    assert flow.stage is Stage.ASKING  # nothing reached PAM
    assert [record for record in caplog.records if record.levelno >= 40] == []


def test_one_failure_text_for_a_wrong_password_and_an_unknown_user(serve, make_service):
    service = make_service(MATRIX_STACK, users={"bob": "secret"})
    server = serve(service)
    pages = []
    for user, password in (("bob", "wrong"), ("nosuchuser", "secret")):
        _status, _headers, _body, sid = start_login(server.url, user)
        _status, _headers, body, _issued = fetch(server.url, "/", sid=sid)
        [flow] = [f for f in flows_of(server) if f.stage is Stage.ASKING]
        _status, _headers, _body, issued = fetch(
            server.url,
            "/answer",
            sid=sid,
            form={"csrf": csrf_in(body), "step": str(flow.step), "answer-0": password},
        )
        _status, _headers, body, _issued = fetch(server.url, "/", sid=issued or sid)
        pages.append(re.findall(r'<p class="notice (\w+)"[^>]*>([^<]*)</p>', body))
    assert (
        pages[0] == pages[1] == [("error", "Authentication failed"), ("error", "Login incorrect.")]
    )


# -- the command of the README --------------------------------------------------


def start_command(*arguments: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.web_login", "--port", "0", *arguments],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
        if match:
            return process, match.group(1)
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"the server did not start: {process.communicate()}")


def stop_command(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return err


def test_the_demo_command_logs_in_with_two_prompts(page, tmp_path):
    process, url = start_command()
    try:
        page.get(url + "/")
        page.fill("User name", "demo")
        page.screenshot(tmp_path, "demo-start")
        page.click("Continue")
        assert page.notices() == [("info", "Hello demo: this page asks what the PAM stack asks.")]
        answer(page, "Password:", DEMO_PASSWORD, tmp_path, "demo-password")
        assert page.fields() == [("Password:", "text")]
        answer(page, "Password:", DEMO_CODE, tmp_path, "demo-code")
        assert page.title == "Welcome, demo"
        page.screenshot(tmp_path, "demo-welcome")
        page.click("Log out")
        assert page.notices() == [("info", "You have logged out.")]

        # The demo's other user has an expired password: the flow goes on
        # into the change, and only that user's (pam_succeed_if).
        page.fill("User name", "olduser")
        page.click("Continue")
        answer(page, "Password:", DEMO_PASSWORD, tmp_path, "olduser-password")
        answer(page, "Password:", DEMO_CODE, tmp_path, "olduser-code")
        assert page.title == "Change your password"
        answer(page, "Old password:", DEMO_PASSWORD, tmp_path, "olduser-old")
        answer(page, "New Password :", "fresh-one", tmp_path, "olduser-new")
        answer(page, "Verify New Password :", "fresh-one", tmp_path, "olduser-verify")
        assert page.title == "Welcome, olduser"
    finally:
        err = stop_command(process)
    assert "Traceback" not in err


def test_the_command_with_a_service_and_confdir(page, make_service, tmp_path):
    stack, marker = recorded_session_stack(tmp_path)
    service = make_service(stack, users={"bob": "secret"})
    process, url = start_command("--service", service.name, "--confdir", service.confdir)
    try:
        page.get(url + "/")
        page.fill("User name", "bob")
        page.click("Continue")
        answer(page, "Password:", "secret", tmp_path, "password")
        assert page.title == "Welcome, bob"
        assert marker.read_text() == "open_session bob\n"
    finally:
        err = stop_command(process)
    # Stopping the server with a session open closes it and ends the handle.
    assert marker.read_text() == "open_session bob\nclose_session bob\n"
    assert "Traceback" not in err and "never ended" not in err


def process_threads(pid: int) -> int:
    return len(list(pathlib.Path(f"/proc/{pid}/task").iterdir()))


def test_the_command_caps_logins_and_releases_them_at_the_timeout(tmp_path):
    process, url = start_command(
        "--login-timeout", "3", "--max-logins", "3", "--max-logins-per-address", "2"
    )
    try:
        threads_before = process_threads(process.pid)
        # Made-up ids start nothing: the form they carry is refused.
        for number in range(5):
            status, _headers, body, issued = fetch(url, "/", sid=f"made-up-{number}")
            assert issued and not issued.startswith("made-up")
            status, _headers, body, _issued = fetch(
                url, "/login", sid=f"made-up-{number}", form={"username": "demo", "csrf": "0"}
            )
            assert status == 403
        assert process_threads(process.pid) == threads_before

        for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3"):
            status, _headers, body, _sid = start_login(url, "demo", source)
            assert status == 303
        assert process_threads(process.pid) == threads_before + 3  # one per login
        status, headers, body, _sid = start_login(url, "demo", "127.0.0.2")
        assert status == 503 and 1 <= int(headers["Retry-After"]) <= 3
        assert "Too many sign-ins from your network" in body
        status, headers, body, _sid = start_login(url, "demo", "127.0.0.4")
        assert status == 503 and "Too many sign-ins are in progress" in body

        # Polled or not, the logins nobody answers end at the timeout.
        wait_until(
            lambda: process_threads(process.pid) == threads_before,
            what="the server's PAM threads to finish",
        )
        status, _headers, _body, _sid = start_login(url, "demo", "127.0.0.4")
        assert status == 303
    finally:
        err = stop_command(process)
    assert "Traceback" not in err and "never ended" not in err


def test_readme_shows_the_command_and_its_options_exist():
    from examples.web_login.__main__ import parse_arguments

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A web login") :]
    commands = re.findall(r"^python3? -m examples\.web_login.*$", section, re.MULTILINE)
    assert commands, "the README's web login section shows no command"
    for command in commands:
        arguments = command.split()[3:]
        parse_arguments([arg for arg in arguments if not arg.startswith("[")])
