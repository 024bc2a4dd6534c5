"""The README's first command ends in a login; the code stays typed and lint-clean."""

from __future__ import annotations

import pathlib
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
