"""Shared fixtures: throwaway PAM services and a scripted conversation."""

from __future__ import annotations

import os
import pathlib
import re
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pamphlet
from pamphlet.testing import TemporaryService


class ScriptedApp(pamphlet.PamApplication):
    """Answers prompts from ``answers`` in order and records every message."""

    def __init__(self, *args: Any, answers: list[str] | None = None, **kwargs: Any) -> None:
        self.answers = list(answers or [])
        self.seen: list[pamphlet.Message] = []
        super().__init__(*args, **kwargs)

    def conversation(self, messages: list[pamphlet.Message]) -> list[str]:
        self.seen.extend(messages)
        return [self.answers.pop(0) if m.is_prompt else "" for m in messages]


#: pam_unix for every type: a real system stack (needs root to read /etc/shadow).
UNIX_STACK = """\
auth required pam_unix.so
account required pam_unix.so
password required pam_unix.so yescrypt
session required pam_unix.so
"""


ACCOUNT_TOOLS = frozenset(
    {"useradd", "userdel", "usermod", "chpasswd", "chage", "passwd", "groupadd", "groupdel"}
)


def run_account_tool(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run for shadow-utils, retried while another process holds its lock.

    useradd and friends give up at once ("cannot lock /etc/passwd; try again
    later") when any other process is changing the account files, such as
    pam_unix changing a password in a broker's worker or another test run.
    """
    assert command[0] in ACCOUNT_TOOLS, command
    check = kwargs.pop("check", False)
    capture = kwargs.pop("capture_output", False)
    deadline = time.monotonic() + 30
    while True:
        done = subprocess.run(command, capture_output=True, **kwargs)
        stderr = done.stderr if isinstance(done.stderr, str) else done.stderr.decode()
        if "cannot lock" not in stderr or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not capture:
        # What the caller would have seen without capture_output.
        sys.stderr.write(stderr)
    if check:
        done.check_returncode()
    return done


@pytest.fixture
def unix_user() -> Iterator[tuple[str, str]]:
    """A throwaway system user with a password, (name, password); always removed (root)."""
    name = "pmph" + secrets.token_hex(4)
    password = "Pw-" + secrets.token_hex(8)
    run_account_tool(["useradd", "--no-create-home", "--shell", "/bin/false", name], check=True)
    try:
        run_account_tool(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
        yield name, password
    finally:
        run_account_tool(["userdel", name], check=True)


@pytest.fixture
def make_service(
    pam_service_factory: Callable[..., TemporaryService],
) -> Callable[..., TemporaryService]:
    """``make_service(stack=None, users=None, name=...)``: removed after the test.

    pamphlet's own pytest plugin (pamphlet.pytest_plugin) makes them, so the
    fixtures users get are exercised by every run of this suite."""
    return pam_service_factory


@pytest.fixture
def matrix(make_service: Callable[..., TemporaryService]) -> TemporaryService:
    """A pam_matrix service for all four types with bob:secret and alice:wonder."""
    return make_service(users={"bob": "secret", "alice": "wonder"})


@pytest.fixture(scope="session")
def scripted_module_path(tmp_path_factory: Any) -> str:
    """Our own test module, pam_scripted.so, built once per run (gcc, libpam0g-dev)."""
    import hostile_module

    return hostile_module.build(tmp_path_factory.mktemp("pam_scripted"))


@pytest.fixture
def scripted(scripted_module_path: str) -> Iterator[Any]:
    """A ``hostile_module.ScriptedModule``: stack lines that run conversation scripts."""
    import hostile_module

    module = hostile_module.ScriptedModule(scripted_module_path)
    yield module
    module.cleanup()


class LibpamGate:
    """A pam_exec script that holds a phase inside libpam (not in its conversation)
    until the test opens the gate: a deterministic "the phase is busy in a module"."""

    def __init__(self, directory: Any) -> None:
        self.entered = directory / "gate-entered"
        self.opened = directory / "gate-open"
        self.script = directory / "gate.sh"
        self.script.write_text(
            f"#!/bin/sh\ntouch {self.entered}\nwhile [ ! -e {self.opened} ]; do sleep 0.01; done\n"
        )
        self.script.chmod(0o755)

    def line(self, kind: str = "auth") -> str:
        return f"{kind} required pam_exec.so {self.script}"

    def wait_entered(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.entered.exists():
            if time.monotonic() > deadline:
                raise AssertionError("the PAM phase never reached the gate")
            time.sleep(0.01)

    def open(self) -> None:
        self.opened.touch()


@pytest.fixture
def libpam_gate(tmp_path: Any) -> LibpamGate:
    return LibpamGate(tmp_path)


def thread_count() -> int:
    """The process's threads as the kernel counts them (phase threads of the
    asyncio flavour are started below the threading module)."""
    return len(os.listdir("/proc/self/task"))


def settled_thread_count() -> int:
    """The thread count once threads of earlier tests have finished exiting."""
    previous, current = -1, thread_count()
    deadline = time.monotonic() + 5
    while current != previous and time.monotonic() < deadline:
        time.sleep(0.05)
        previous, current = current, thread_count()
    return current


def wait_for_thread_count(count: int, timeout: float = 10) -> int:
    """Poll until at most ``count`` threads are alive; returns the number seen."""
    deadline = time.monotonic() + timeout
    while thread_count() > count and time.monotonic() < deadline:
        time.sleep(0.01)
    return thread_count()


def readme_example(snippet: str) -> str:
    """The example of the README's "Servers that cannot block" that contains ``snippet``."""
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Servers that cannot block")[1]
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if snippet in b]
    return block


def run_python(code: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter (where a crash would kill it, not pytest)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    # Tests marked root need root (a throwaway system user, /etc/pam.d, a
    # mount namespace). CI runs as root; anywhere else they are skipped, and
    # in CI a skip fails the run.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (pytest.mark.root)")
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # In CI a skipped test is a gap, not a pass: make the run fail.
    skipped = terminalreporter.stats.get("skipped", [])
    if os.environ.get("CI") and skipped:
        terminalreporter.write_line(
            f"CI is set and {len(skipped)} tests were skipped: failing the run", red=True
        )


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not os.environ.get("CI"):
        return
    if reporter.stats.get("skipped") and exitstatus == 0:
        session.exitstatus = 1
