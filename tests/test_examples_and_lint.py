"""The README's commands are CI's; its first ends in a login; the code stays typed, lint-clean
and formatted."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def run_first_login(password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "first_login.py")],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # no terminal: getpass reads the pipe
    )


def test_first_login_with_demo_password():
    proc = run_first_login("pamphlet")
    assert proc.returncode == 0, proc.stderr
    assert "Welcome, demo!" in proc.stdout
    assert "HOMEDIR=/home/demo" in proc.stdout


def test_first_login_refuses_wrong_password():
    proc = run_first_login("wrong")
    assert proc.returncode == 1
    assert "Login refused: AuthenticationError" in proc.stderr
    assert "Welcome" not in proc.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "mypy"],
        # The whole repository: benchmarks, docs/_ext and the Python in every
        # Markdown file too (pyproject.toml excludes the API document, kept verbatim).
        ["-m", "ruff", "check", "."],
        ["-m", "ruff", "format", "--check", "."],
    ],
    ids=["mypy", "ruff-check", "ruff-format"],
)
def test_static_checks(command):
    tool = command[1]
    if (
        shutil.which(tool) is None
        and subprocess.run([sys.executable, "-c", f"import {tool}"], capture_output=True).returncode
    ):
        pytest.fail(f"{tool} is not installed: pip install -e '.[test]'")
    proc = subprocess.run(
        [sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_command_line_tool_does_not_import_asyncio():
    # asyncio is the largest import behind pamphlet; only the async flavour needs it.
    code = "import sys, pamphlet, pamphlet.cli; print('asyncio' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr
    code = "import sys, pamphlet; pamphlet.AsyncPamApplication; print('asyncio' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "True", proc.stderr


def readme_commands() -> list[str]:
    """The README's set-up command and its test command: its first two ``sh`` blocks."""
    blocks = re.findall(r"^```sh\n(.*?)^```$", (ROOT / "README.md").read_text(), re.M | re.S)
    return [block.strip() for block in blocks[:2]]


def test_ci_runs_the_readme_commands_as_written():
    setup, tests = readme_commands()
    # The set-up works with a system Python that refuses pip (PEP 668): a venv,
    # whose python3 runs the demo and the tests.
    assert "apt-get install -y python3-venv libpam-wrapper &&" in setup
    assert "python3 -m venv .venv && . .venv/bin/activate &&" in setup
    assert setup.endswith("&& python3 -m pamphlet --demo")
    assert tests == ". .venv/bin/activate && python3 -m pytest"
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup in lines
    assert tests in lines
    assert ".venv/" in (ROOT / ".gitignore").read_text().splitlines()
