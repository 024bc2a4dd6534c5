"""Test harness for the web login: the server in a thread, Debian's Chromium via Selenium.

Nothing is downloaded at run time: Selenium is given Debian's
``/usr/bin/chromedriver`` and ``/usr/bin/chromium`` explicitly, so its
driver manager never runs.
"""

from __future__ import annotations

import asyncio
import html
import http.client
import pathlib
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web
from examples.web_login import WebLogin
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

_T = TypeVar("_T")


class ServerThread:
    """A :class:`WebLogin` served on 127.0.0.1 by an event loop in its own thread."""

    def __init__(self, login: WebLogin) -> None:
        self.login = login
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="web login server")
        self._thread.start()
        self._runner = web.AppRunner(login.make_app(), access_log=None)
        self.run(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.run(site.start())
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, function: Callable[[], _T]) -> _T:
        """Call a function on the server's loop (where the flows live)."""

        async def on_loop() -> _T:
            return function()

        return self.run(on_loop())

    def stop(self) -> None:
        """Shut the application down as ``runner.cleanup()`` does; once is enough."""
        if self.loop.is_closed():
            return
        try:
            self.run(self._runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def wait_until(condition: Callable[[], object], timeout: float = 15, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


class Browser:
    """Headless Chromium, with the few verbs the tests need."""

    def __init__(self) -> None:
        missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
        if missing:
            raise RuntimeError(
                f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver"
            )
        self._profile = tempfile.mkdtemp(prefix="pamphlet-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless",
            "--no-sandbox",  # we run as root in CI
            "--disable-gpu",
            "--disable-dev-shm-usage",
            # The machine has no network beyond loopback: keep Chromium from
            # trying (it stalls or logs errors otherwise).
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={self._profile}",
            "--window-size=900,760",
        ):
            options.add_argument(argument)
        self.driver = webdriver.Chrome(
            service=Service(executable_path=CHROMEDRIVER), options=options
        )
        self.driver.set_page_load_timeout(60)
        self.shots = 0

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self._profile, ignore_errors=True)

    def reset(self) -> None:
        """A fresh start for the next test: one tab, no cookies."""
        handles = self.driver.window_handles
        for handle in handles[1:]:
            self.driver.switch_to.window(handle)
            self.driver.close()
        self.driver.switch_to.window(handles[0])
        self.driver.get("about:blank")
        # (delete_all_cookies() would only clear about:blank's own cookies)
        self.driver.execute_cdp_cmd("Network.clearBrowserCookies", {})

    # -- reading the page ------------------------------------------------------

    def get(self, url: str) -> None:
        self.driver.get(url)

    @property
    def title(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "h1").text

    @property
    def text(self) -> str:
        return self.driver.find_element(By.TAG_NAME, "body").text

    @property
    def source(self) -> str:
        return self.driver.page_source

    def notices(self) -> list[tuple[str, str]]:
        """(kind, text) of every notice, kind being "info" or "error"."""
        found = []
        for element in self.driver.find_elements(By.CSS_SELECTOR, ".notice"):
            classes = element.get_attribute("class") or ""
            found.append(("error" if "error" in classes.split() else "info", element.text))
        return found

    def fields(self) -> list[tuple[str, str]]:
        """(label, input type) of every visible field, in page order."""
        result = []
        for element in self.driver.find_elements(By.CSS_SELECTOR, "form input:not([type=hidden])"):
            label = self.driver.find_element(
                By.CSS_SELECTOR, f"label[for='{element.get_attribute('id')}']"
            )
            result.append((label.text.strip(), element.get_attribute("type") or ""))
        return result

    def field(self, label: str) -> WebElement:
        for element in self.driver.find_elements(By.CSS_SELECTOR, "label"):
            if element.text.strip() == label.strip():
                return self.driver.find_element(By.ID, element.get_attribute("for") or "")
        raise NoSuchElementException(f"no field labelled {label!r} in:\n{self.text}")

    def cookie(self, name: str) -> dict[str, Any]:
        cookie = self.driver.get_cookie(name)
        assert cookie is not None, f"no cookie {name!r}"
        return dict(cookie)

    # -- acting --------------------------------------------------------------

    def fill(self, label: str, value: str) -> None:
        element = self.field(label)
        element.clear()
        element.send_keys(value)

    def click(self, button_text: str, *, wait: bool = True) -> None:
        """Click a button and (by default) wait for the page it leads to."""
        old_page = self.driver.find_element(By.TAG_NAME, "html")
        for button in self.driver.find_elements(By.TAG_NAME, "button"):
            if button.text.strip() == button_text:
                button.click()
                break
        else:
            raise NoSuchElementException(f"no button {button_text!r} in:\n{self.text}")
        if wait:
            self.wait_for_new_page(old_page)

    def submit_soon(self) -> WebElement:
        """Send the page's form without waiting; returns the page to wait on.

        chromedriver's click (and a script that submits at once) waits for the
        navigation it starts; a script timer that fires after the command has
        returned lets the test look at the server while the request is in flight.
        """
        old_page = self.driver.find_element(By.TAG_NAME, "html")
        self.driver.execute_script(
            "setTimeout(() => document.querySelector('form').requestSubmit(), 250)"
        )
        return old_page

    def wait_for_new_page(self, old_page: WebElement | None = None, timeout: float = 30) -> None:
        if old_page is not None:

            def replaced(driver: webdriver.Chrome) -> bool:
                try:
                    old_page.is_enabled()
                except WebDriverException:
                    # Stale, or "does not belong to the document": chromedriver
                    # says either once the page has been replaced.
                    return True
                return False

            WebDriverWait(self.driver, timeout).until(replaced)
        WebDriverWait(self.driver, timeout).until(
            lambda driver: driver.execute_script("return document.readyState") == "complete"
        )

    def screenshot(self, folder: pathlib.Path, name: str) -> pathlib.Path:
        """A numbered PNG of the page (the whole page, however long)."""
        self.shots += 1
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(900, max(760, int(height)))
        path = folder / f"{self.shots:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(900, 760)
        return path


class FormClient:
    """A bare HTTP client from a source address of its choice (127.0.0.2, ...).

    What an anonymous client of a login page does without a browser: keep
    cookies, send the page's hidden fields (CSRF tokens) back with its own,
    set any header. Loopback answers every 127.x.y.z address, so tests can
    be several clients on one machine.
    """

    def __init__(self, url: str, source: str = "127.0.0.1") -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.source = source
        self.cookies: dict[str, str] = {}
        self.status = 0
        self.headers: dict[str, str] = {}
        self.text = ""

    def request(
        self,
        method: str,
        path: str,
        fields: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        connection = http.client.HTTPConnection(
            self.host, self.port, timeout=60, source_address=(self.source, 0)
        )
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if fields is not None:
            body = urllib.parse.urlencode(fields)
            sent["Content-Type"] = "application/x-www-form-urlencoded"
            sent.setdefault("Referer", f"http://{self.host}:{self.port}{path}")
            sent.setdefault("Origin", f"http://{self.host}:{self.port}")
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            self.status = response.status
            self.headers = {k.lower(): v for k, v in response.getheaders()}
            for value in response.headers.get_all("Set-Cookie") or []:
                name, _, rest = value.partition("=")
                self.cookies[name.strip()] = rest.split(";", 1)[0]
            self.text = response.read().decode("utf-8", "replace")
        finally:
            connection.close()
        return self.text

    def get(self, path: str, headers: dict[str, str] | None = None) -> str:
        return self.request("GET", path, headers=headers)

    def hidden_fields(self) -> dict[str, str]:
        """The hidden inputs of the last page (CSRF tokens, step numbers)."""
        found = {}
        for tag in re.findall(r"<input[^>]*>", self.text):
            if 'type="hidden"' in tag:
                name = re.search(r'name="([^"]*)"', tag)
                value = re.search(r'value="([^"]*)"', tag)
                if name:
                    found[html.unescape(name.group(1))] = html.unescape(
                        value.group(1) if value else ""
                    )
        return found

    def post(self, path: str, fields: dict[str, str], headers: dict[str, str] | None = None) -> str:
        """Post ``fields`` with the last page's hidden fields."""
        return self.request("POST", path, {**self.hidden_fields(), **fields}, headers)

    def notices(self, css_class: str = "notice") -> list[str]:
        """The text of every paragraph of class ``css_class`` on the last page."""
        found = re.findall(
            rf'<p[^>]*class="(?:[^"]*\s)?{re.escape(css_class)}(?:\s[^"]*)?"[^>]*>(.*?)</p>',
            self.text,
            re.S,
        )
        return [html.unescape(re.sub(r"<[^>]+>", "", text)).strip() for text in found]
