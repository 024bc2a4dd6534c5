"""``pamphlet broker --check`` reads the stacks its policy names (issue 15).

It warns, naming the file and line, about modules that trust the caller
rather than the user's answer, and the broker prints and audits the same
warnings when it starts. The stack is a copy of Debian's ``chsh`` in a
confdir, as the broker is told to read it.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from broker_harness import SRC, Broker

POLICY = """\
[[allow]]
users = ["nobody"]
services = ["chsh", "open", "gated"]
"""


@pytest.fixture
def confdir(tmp_path: pathlib.Path) -> pathlib.Path:
    directory = tmp_path / "pam.d"
    directory.mkdir()
    shutil.copy("/etc/pam.d/chsh", directory / "chsh")
    (directory / "open").write_text("auth sufficient pam_permit.so\nauth required pam_unix.so\n")
    (directory / "gated").write_text(
        textwrap.dedent(
            """\
            auth sufficient pam_wheel.so trust group=sudo
            auth [success=1 default=ignore] pam_succeed_if.so uid < 1000
            @include common-auth
            account include common-account
            """
        )
    )
    return directory


def line_of(path: pathlib.Path, text: str) -> int:
    (number,) = [
        n
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line.split()[:3] == text.split()
    ]
    return number


def check(policy: pathlib.Path, confdir: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pamphlet",
            "broker",
            "--policy",
            str(policy),
            "--confdir",
            str(confdir),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )


def test_check_warns_about_modules_that_trust_the_caller(
    confdir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    proc = check(policy, confdir)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if "warning:" in line]
    rootok = line_of(confdir / "chsh", "auth sufficient pam_rootok.so")
    expected = {
        f"{confdir}/chsh:{rootok}": "pam_rootok",
        f"{confdir}/open:1": "pam_permit",
        f"{confdir}/gated:1": "pam_wheel with 'trust'",
        f"{confdir}/gated:2": "pam_succeed_if on uid",
    }
    for where, what in expected.items():
        (found,) = [w for w in warnings if f" {where}: " in w]
        assert what in found
    assert len(warnings) == len(expected), warnings
    # Debian's common-auth ends in pam_permit, reached only after pam_unix
    # succeeded: not a module that lets anyone in.
    assert "common-auth" not in proc.stdout


def test_a_policy_of_safe_stacks_has_no_warning(tmp_path: pathlib.Path) -> None:
    confdir = tmp_path / "pam.d"
    confdir.mkdir()
    (confdir / "webapp").write_text("@include common-auth\n@include common-account\n")
    policy = tmp_path / "policy.toml"
    policy.write_text('[[allow]]\nusers = ["nobody"]\nservices = ["webapp"]\n')
    proc = check(policy, confdir)
    assert proc.returncode == 0
    assert "warning" not in proc.stdout + proc.stderr


@pytest.mark.root
def test_the_broker_prints_and_audits_the_warnings_when_it_starts(
    confdir: pathlib.Path,
) -> None:
    broker = Broker(POLICY, str(confdir))
    try:
        rootok = line_of(confdir / "chsh", "auth sufficient pam_rootok.so")
        (audit,) = broker.audit_lines("event=stack-warning", "service=chsh")
        assert f"file={confdir}/chsh line={rootok} module=pam_rootok.so" in audit
        printed = broker.audit_lines("pamphlet broker: warning:", f"{confdir}/chsh:{rootok}")
        assert len(printed) == 1
        assert len(broker.audit_lines("event=stack-warning")) == 4
    finally:
        broker.cleanup()
