"""Shared fixtures: throwaway PAM services and a scripted conversation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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


@pytest.fixture
def make_service(tmp_path: Any) -> Iterator[Callable[..., TemporaryService]]:
    """``make_service(stack=None, users=None, name=...)``: removed after the test."""
    services: list[TemporaryService] = []

    def make(stack: Any = None, **kwargs: Any) -> TemporaryService:
        service = TemporaryService(stack, **kwargs)
        services.append(service)
        return service

    yield make
    for service in services:
        service.cleanup()


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


def run_python(code: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter (where a crash would kill it, not pytest)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


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
