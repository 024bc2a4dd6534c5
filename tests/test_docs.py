"""The user guide builds, and every example in it runs as written.

Examples run in a fresh interpreter (``python`` blocks) or shell
(``console`` blocks: ``$ `` lines are commands, the others their output),
against throwaway PAM services: ``login`` and ``passwd`` (pam_matrix, users
alice/secret and bob/hunter2, pam_env in the session) and ``expired-login``
(alice's password has expired). Python examples see them as the default
confdir; console examples find them in ``./pam.d``.

A ``text`` block right after a ``python`` block is its expected standard
output (a line ``...`` stands for any lines). An HTML comment right before a
block sets options: ``stdin="..."`` (answers piped in), ``exit=N``,
``continue`` (run after the page's previous python block(s)), ``pytest``
(the block is a test file: pytest runs it) and ``requires=Name`` (the example
needs ``pamphlet.Name``).
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

import pamphlet
from pamphlet.testing import TemporaryService

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"
# The original API document has its own test (test_api_document.py).
PAGES = sorted(p for p in DOCS.rglob("*.md") if p.name != "api-document.md")
README_SECTIONS_FROM = "## Command line"
LANGUAGES = {"python", "console", "text"}

GUIDE_STACK = """\
auth     required {{pam_matrix}} passdb={{passdb}} verbose
account  required {{pam_matrix}} passdb={{passdb}}
password required {{pam_matrix}} passdb={{passdb}}
session  required {{pam_matrix}} passdb={{passdb}}
session  required pam_env.so readenv=0 conffile={environment}
"""
EXPIRED_STACK = """\
auth     required {pam_matrix} passdb={passdb}
account  required pam_stress.so expired
password required {pam_matrix} passdb={passdb}
session  required {pam_matrix} passdb={passdb}
"""
ENVIRONMENT = "MAIL DEFAULT=/var/mail/@{PAM_USER}\nLANG DEFAULT=C.UTF-8\n"


def guide_services(directory: str | None = None) -> TemporaryService:
    service = TemporaryService(
        "", users={"alice": "secret", "bob": "hunter2"}, name="login", directory=directory
    )
    environment = os.path.join(service.confdir, "environment.conf")
    with open(environment, "w") as file:
        file.write(ENVIRONMENT)
    stack = GUIDE_STACK.format(environment=environment)
    service.add_service("login", stack)
    service.add_service("passwd", stack)
    service.add_service("expired-login", EXPIRED_STACK)
    return service


@dataclass
class Block:
    page: pathlib.Path
    line: int
    language: str
    code: str
    options: dict[str, str] = field(default_factory=dict)
    output: str | None = None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(
    r"(?:<!--\s*test:(?P<options>.*?)-->\s*\n)?^```(?P<language>\w*)[^\n]*\n(?P<code>.*?)^```\s*$",
    re.S | re.M,
)


def parse_options(text: str) -> dict[str, str]:
    options = {}
    for word in shlex.split(text):
        key, _, value = word.partition("=")
        options[key] = value.encode().decode("unicode_escape") if value else "yes"
    return options


def blocks_of(page: pathlib.Path, start: str | None = None) -> list[Block]:
    text = page.read_text()
    offset = text.index(start) if start else 0
    found: list[Block] = []
    previous_end = -1
    for match in _FENCE.finditer(text, offset):
        block = Block(
            page,
            text.count("\n", 0, match.start("language")) + 1,
            match.group("language"),
            match.group("code"),
            parse_options(match.group("options") or ""),
        )
        between = text[previous_end : match.start()] if previous_end >= 0 else "x"
        if (
            block.language == "text"
            and found
            and found[-1].language == "python"
            and not between.strip()
        ):
            found[-1].output = block.code
        else:
            found.append(block)
        previous_end = match.end()
    return found


def all_blocks() -> list[Block]:
    blocks = [block for page in PAGES for block in blocks_of(page)]
    return blocks + blocks_of(ROOT / "README.md", README_SECTIONS_FROM)


BLOCKS = all_blocks()
PYTHON = [b for b in BLOCKS if b.language == "python"]
CONSOLE = [b for b in BLOCKS if b.language == "console"]


def matches(expected: str, actual: str) -> bool:
    """``expected``'s lines equal ``actual``'s; a ``...`` line stands for any
    lines, a ``...`` within a line for any text."""
    pattern = ""
    for line in expected.rstrip("\n").split("\n"):
        if line == "...":
            pattern += r"(?:.*\n)*?"
        else:
            parts = [re.escape(part) for part in line.rstrip().split("...")]
            pattern += ".*?".join(parts) + r"[ \t]*\n"
    lines = "".join(line.rstrip() + "\n" for line in actual.rstrip("\n").split("\n"))
    return re.fullmatch(pattern, lines) is not None


def program_of(block: Block) -> str:
    """The block's code, after the blocks it continues."""
    if "continue" not in block.options:
        return block.code
    page_blocks = [b for b in PYTHON if b.page == block.page and b.line < block.line]
    if not page_blocks:
        raise AssertionError(f"{block.name} continues nothing")
    return program_of(page_blocks[-1]) + "\n" + block.code


PRELUDE = (
    "import os, pamphlet\n"
    'pamphlet.PamApplication.default_confdir = os.environ["PAMPHLET_GUIDE_CONFDIR"]\n'
)


def test_blocks_were_found():
    pages = {b.page.name for b in PYTHON}
    assert {"index.md", "conversation.md", "testing.md", "migration.md"} <= pages
    assert CONSOLE


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_block_language_is_known(block):
    assert block.language in LANGUAGES, (
        f"{block.name}: a ```{block.language} block; examples are python or console "
        "(and run), text is output or prose"
    )


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_example(block, tmp_path):
    required = block.options.get("requires")
    if required:
        assert hasattr(pamphlet, required), (
            f"{block.name} needs pamphlet.{required}, which this branch does not have yet"
        )
    if "pytest" in block.options:
        # A test file: pytest runs it, with pamphlet's plugin, as it would a user's.
        script = tmp_path / "test_example.py"
        script.write_text(program_of(block))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)]
    else:
        script = tmp_path / "example.py"
        script.write_text(PRELUDE + program_of(block))
        command = [sys.executable, str(script)]
    with guide_services() as services:
        proc = subprocess.run(
            command,
            input=block.options.get("stdin", ""),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            # Unbuffered, as in a terminal: an example's prints and its
            # subprocess's output show in the order the page shows.
            env=dict(os.environ, PAMPHLET_GUIDE_CONFDIR=services.confdir, PYTHONUNBUFFERED="1"),
            start_new_session=True,  # no terminal: getpass and input read stdin
        )
    expected_exit = int(block.options.get("exit", "0"))
    assert proc.returncode == expected_exit, f"{block.name}\n{proc.stdout}\n{proc.stderr}"
    if block.output is not None:
        assert matches(block.output, proc.stdout), (
            f"{block.name} printed:\n{proc.stdout}\nthe page shows:\n{block.output}"
        )


@pytest.mark.parametrize("block", CONSOLE, ids=[b.name for b in CONSOLE])
def test_console_example(block, tmp_path):
    (tmp_path / "pam.d").mkdir()
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", os.defpath))
    with guide_services(str(tmp_path / "pam.d")):
        commands = re.split(r"^\$ ", block.code, flags=re.M)[1:]
        assert commands, f"{block.name} has no '$ ' command"
        for chunk in commands:
            command, _, expected = chunk.partition("\n")
            proc = subprocess.run(
                ["bash", "-c", f"set -o pipefail; {command}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=120,
                cwd=tmp_path,
                env=env,
                start_new_session=True,
            )
            assert matches(expected, proc.stdout), (
                f"{block.name}: $ {command}\nprinted:\n{proc.stdout}\nthe page shows:\n{expected}"
            )


def test_docs_build(tmp_path):
    # --strict: a broken link, a missing page or a docstring mkdocstrings
    # cannot render fails the build.
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reference = (tmp_path / "reference" / "index.html").read_text()
    for name in ("PamApplication", "authenticate", "change_password", "TemporaryService"):
        assert name in reference
    assert "Credentials" in (tmp_path / "guide" / "credentials" / "index.html").read_text()


def test_readme_first_command_ends_in_the_demo():
    # The README's set-up command ends in the demo; its last step runs here.
    first = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    last_step = first.strip().split("&&")[-1].split()
    assert last_step == ["python3", "-m", "pamphlet", "--demo"]
    proc = subprocess.run(
        [sys.executable, *last_step[1:]],
        input="pamphlet\n",
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Welcome, demo!" in proc.stderr
