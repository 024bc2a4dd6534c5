"""The README's broker try-out, typed as a user with sudo rights would type it.

The two commands are read from the README. They run in a checkout after the
README's set-up command, emulated: a folder the user owns with a ``.venv``
(Debian's python3, the worktree's source on its path, and the ``pamphlet``
script pip writes). sudo is not installed on the CI machine, so the first
command runs as root the way sudo runs it: ``secure_path`` for PATH (Debian's
sudoers default), SUDO_USER set, nothing else of the user's environment. The
second runs as the user (setpriv), with the user's password on stdin. The
socket directory is made unique per run (other test runs share /run).
"""

from __future__ import annotations

import os
import pathlib
import re
import secrets
import shlex
import stat
import subprocess
import time
from collections.abc import Iterator

import pytest

from broker_harness import SYSTEM_PYTHON, public_dir, public_source

pytestmark = pytest.mark.root

README = pathlib.Path(__file__).parent.parent / "README.md"
SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def try_out_commands() -> list[str]:
    """The ``$ `` lines of the README's broker try-out block."""
    text = README.read_text()
    section = text[text.index("## Unprivileged servers: the broker") :]
    block = re.search(r"```text\n(.*?)```", section, re.S)
    assert block is not None
    commands = [line[2:] for line in block.group(1).splitlines() if line.startswith("$ ")]
    assert len(commands) == 2, commands
    return commands


@pytest.fixture
def user_checkout(unix_user: tuple[str, str]) -> Iterator[pathlib.Path]:
    """A checkout of the user's after the README's set-up: pamphlet in .venv."""
    name, _ = unix_user
    checkout = public_dir("pamphlet-checkout-")
    source = public_source()
    venv = checkout / ".venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site_packages,) = venv.glob("lib/python3*/site-packages")
    (site_packages / "pamphlet-source.pth").write_text(f"{source}\n")
    script = venv / "bin" / "pamphlet"
    script.write_text(
        f"#!{venv}/bin/python3\nimport sys\nfrom pamphlet.cli import run\nsys.exit(run())\n"
    )
    script.chmod(0o755)
    subprocess.run(["chown", "-R", f"{name}:{name}", str(checkout)], check=True)
    yield checkout
    subprocess.run(["rm", "-rf", str(checkout), str(source)], check=True)


def test_the_readme_broker_try_out_works_as_written(user_checkout, unix_user):
    name, password = unix_user
    as_root, as_user = try_out_commands()
    assert as_root.startswith("sudo ")
    directory = f"/run/pamphlet-try-{secrets.token_hex(4)}"
    as_root, as_user = (c.replace("/run/pamphlet/", f"{directory}/") for c in (as_root, as_user))
    as_root = as_root.replace("/run/pamphlet ", f"{directory} ")
    sudo_env = {"PATH": SECURE_PATH, "SUDO_USER": name, "HOME": "/root", "USER": "root"}
    broker = subprocess.Popen(
        ["/bin/sh", "-c", "exec " + as_root.removeprefix("sudo ")],  # sudo execs
        cwd=user_checkout,
        env=sudo_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        socket_path = shlex.split(as_user)[2]
        deadline = time.monotonic() + 30
        while not os.path.exists(socket_path):
            assert broker.poll() is None, broker.communicate()[1]
            assert time.monotonic() < deadline, "the broker did not start"
            time.sleep(0.05)
        folder = os.stat(os.path.dirname(socket_path))
        assert folder.st_uid == 0 and not folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        login = subprocess.run(
            [
                "setpriv",
                f"--reuid={name}",
                f"--regid={name}",
                "--init-groups",
                "/bin/sh",
                "-c",
                as_user,
            ],
            cwd=user_checkout,
            env={"PATH": "/usr/bin:/bin", "USER": name, "HOME": str(user_checkout)},
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert login.returncode == 0, login.stderr
        assert "successfully authenticated" in login.stdout
    finally:
        broker.terminate()
        _, audit = broker.communicate(timeout=30)
        subprocess.run(["rm", "-rf", directory], check=True)
    assert broker.returncode == 0, audit
    assert re.search(rf"user={name} .*outcome=success", audit), audit
