"""``pamphlet doctor`` and ``pamphlet.diagnose`` against real stacks, real users and libpam.

Each cause gets a real stack in a throwaway confdir and, as root, a throwaway
user; each test asserts the finding, the file and line it names, and the exit
status, and where it can, that running the phases (``--run``, or
``pamphlet SERVICE USER OPS``) fails as the doctor predicted.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

import pamphlet
from broker_harness import SRC, SYSTEM_PYTHON, Broker, as_user, public_dir, public_source
from conftest import UNIX_STACK, run_account_tool
from pamphlet import cli
from pamphlet.doctor import refusal_hint

root = pytest.mark.root


def doctor(*args: str, stdin: str = "") -> tuple[int, dict[str, Any]]:
    """``pamphlet doctor ARGS --json`` in this process: (exit status, report)."""
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["doctor", *args, "--json"], stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return status, json.loads(out.getvalue())


def doctor_text(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    status = cli.main(["doctor", *args], stdin=io.StringIO(""), stdout=out, stderr=io.StringIO())
    return status, out.getvalue()


def pamphlet_run(*args: str, stdin: str = "") -> tuple[int, str]:
    """``pamphlet ARGS`` (pamtester's interface): (exit status, stderr)."""
    err = io.StringIO()
    status = cli.main(list(args), stdin=io.StringIO(stdin), stdout=io.StringIO(), stderr=err)
    return status, err.getvalue()


def login_with_doctor(
    confdir: pathlib.Path, name: str, password: str
) -> tuple[int, dict[str, Any]]:
    """The doctor on the unix service, running authenticate and acct_mgmt."""
    run = ["--run", "authenticate", "acct_mgmt"]
    return doctor("unix", name, "--confdir", str(confdir), *run, stdin=password + "\n")


def only(report: dict[str, Any], kind: str) -> dict[str, Any]:
    found = [f for f in report["findings"] if f["kind"] == kind]
    assert len(found) == 1, json.dumps(report["findings"], indent=1)
    return found[0]


def errors(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["severity"] == "error"]


@pytest.fixture
def confdir(tmp_path: pathlib.Path) -> pathlib.Path:
    directory = tmp_path / "pam.d"
    directory.mkdir()
    return directory


def write(directory: pathlib.Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return str(path)


PERMIT_ALL = """\
auth     required pam_permit.so
account  required pam_permit.so
password required pam_permit.so
session  required pam_permit.so
"""

#: Fedora's and RHEL's /etc/pam.d/other (Debian's includes the common-* files).
DENYING_OTHER = """\
#%PAM-1.0
auth     required pam_deny.so
account  required pam_deny.so
password required pam_deny.so
session  required pam_deny.so
"""


@pytest.fixture
def system_user() -> Iterator[str]:
    """A throwaway system user (uid below 1000), no password; removed after."""
    name = "pmds" + secrets.token_hex(4)
    run_account_tool(["useradd", "--system", "--no-create-home", name], check=True)
    try:
        yield name
    finally:
        run_account_tool(["userdel", name], check=True)


# -- the stack ----------------------------------------------------------------------


def test_a_healthy_stack_has_no_finding_and_exit_0(confdir: pathlib.Path) -> None:
    write(confdir, "healthy", PERMIT_ALL)
    status, report = doctor("healthy", "root", "--confdir", str(confdir))
    assert status == 0
    assert [f for f in report["findings"] if f["severity"] in ("error", "warning")] == []
    assert report["refuses"] is False
    assert [line["module"] for line in report["stack"]["lines"]["auth"]] == ["pam_permit.so"]


def test_a_missing_service_file_falls_back_to_other(confdir: pathlib.Path) -> None:
    other = write(confdir, "other", DENYING_OTHER)
    status, report = doctor("nosuchservice", "root", "--confdir", str(confdir))
    assert status == 1
    finding = only(report, "other-fallback")
    assert finding["severity"] == "error"
    assert f"no service file {confdir}/nosuchservice" in finding["cause"]
    assert (finding["file"], finding["line"]) == (other, 2)
    assert "authenticate" in finding["refuses"]
    assert finding["code"] == pamphlet.ReturnCode.AUTH_ERR
    # libpam agrees.
    ran, err = pamphlet_run("--confdir", str(confdir), "nosuchservice", "root", "authenticate")
    assert ran == 1 and "AuthenticationError" in err


def test_a_moved_login_file_is_named(confdir: pathlib.Path) -> None:
    """JupyterHub #2082: login moved away, not copied (here in a confdir copy)."""
    shutil.copy("/etc/pam.d/login", confdir / "login.moved")
    other = write(confdir, "other", DENYING_OTHER)
    status, text = doctor_text("login", "root", "--confdir", str(confdir))
    assert status == 1
    assert f"{confdir}/login is missing; libpam uses {other}" in text
    status, report = doctor("login", "root", "--confdir", str(confdir))
    finding = only(report, "other-fallback")
    assert finding["severity"] == "error"
    assert (finding["file"], finding["line"]) == (other, 2)
    assert finding["refuses"] == ["authenticate", "acct_mgmt", "chauthtok", "open_session"]
    assert report["findings"][0]["kind"] == "other-fallback"
    # Debian's own other includes the common-* files: the fallback is named,
    # but it is not what refuses.
    shutil.copy("/etc/pam.d/other", confdir / "other")
    status, report = doctor("login", "root", "--confdir", str(confdir))
    finding = only(report, "other-fallback")
    assert finding["severity"] == "warning"
    auth_files = {line["file"] for line in report["stack"]["lines"]["auth"]}
    assert auth_files == {"/etc/pam.d/common-auth"}


def test_a_missing_module_file(confdir: pathlib.Path) -> None:
    path = write(
        confdir,
        "nomodule",
        """\
        auth     required pam_permit.so
        auth     required pam_pamphlet_not_installed.so
        account  required pam_permit.so
        password required pam_permit.so
        session  required pam_permit.so
        """,
    )
    status, report = doctor("nomodule", "--confdir", str(confdir))
    assert status == 1
    finding = only(report, "missing-module")
    assert (finding["file"], finding["line"]) == (path, 2)
    assert "pam_pamphlet_not_installed.so does not exist" in finding["cause"]
    assert finding["refuses"] == ["authenticate"]
    assert finding["code"] == pamphlet.ReturnCode.MODULE_UNKNOWN
    ran, err = pamphlet_run("--confdir", str(confdir), "nomodule", "root", "authenticate")
    assert ran == 1 and "ModuleUnknown" in err


def test_an_optional_missing_module_is_only_a_warning(confdir: pathlib.Path) -> None:
    write(confdir, "optional", PERMIT_ALL + "-session optional pam_pamphlet_not_installed.so\n")
    status, report = doctor("optional", "root", "--confdir", str(confdir))
    assert status == 0
    finding = only(report, "missing-module")
    assert finding["severity"] == "warning"
    assert finding["line"] == 5


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("auht required pam_permit.so", "unknown type 'auht'"),
        ("auth requird pam_permit.so", "bad control [requird]"),
        ("auth [success=ok defualt=bad] pam_permit.so", "bad control [success=ok defualt=bad]"),
        ("auth required", "no module named"),
    ],
)
def test_a_syntax_error_names_its_line(confdir: pathlib.Path, line: str, why: str) -> None:
    path = write(confdir, "typo", f"# a comment\n{line}\n" + PERMIT_ALL)
    status, report = doctor("typo", "root", "--confdir", str(confdir))
    assert status == 1
    (finding,) = [f for f in errors(report) if f["kind"] == "syntax"]
    assert (finding["file"], finding["line"]) == (path, 2)
    assert why in finding["cause"]
    assert finding["refuses"] == ["authenticate"]
    ran, err = pamphlet_run("--confdir", str(confdir), "typo", "root", "authenticate")
    assert ran == 1 and "PermissionDenied" in err


def test_a_continuation_that_reaches_the_end_of_the_file_stops_pam_start(
    confdir: pathlib.Path,
) -> None:
    path = write(confdir, "cut", PERMIT_ALL + "auth optional pam_permit.so \\")
    status, report = doctor("cut", "root", "--confdir", str(confdir))
    assert status == 1
    finding = only(report, "stack-unreadable")
    assert finding["source"] == f"{path}:5"
    assert finding["refuses"] == ["pam_start"]
    ran, err = pamphlet_run("--confdir", str(confdir), "cut", "root", "authenticate")
    assert ran == 1 and "Abort" in err


def test_includes_and_substacks_are_followed(confdir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # Relative includes read /etc/pam.d even under a confdir: absolute paths here.
    sub = write(
        tmp_path,
        "sub",
        """\
        auth [success=done default=ignore] pam_permit.so
        auth required pam_pamphlet_not_installed.so
        """,
    )
    inner = write(tmp_path, "inner", f"auth substack {sub}\naccount include {tmp_path}/sub\n")
    service = write(
        confdir,
        "nested",
        f"""\
        auth    include {inner}
        auth    required pam_permit.so
        @include {tmp_path}/tail
        """,
    )
    write(tmp_path, "tail", "account required pam_permit.so\npassword required pam_permit.so\n")
    status, report = doctor("nested", "root", "--confdir", str(confdir))
    auth = report["stack"]["lines"]["auth"]
    assert [(line["file"], line["line"]) for line in auth] == [
        (sub, 1),
        (sub, 2),
        (service, 2),
    ]
    assert auth[1]["via"] == [f"{service}:1", f"{inner}:1"]
    assert report["stack"]["lines"]["account"][-1]["file"] == f"{tmp_path}/tail"
    # The substack's 'done' ends only the substack: its missing module is stepped
    # over, so authentication does not fail on it.
    finding = only(report, "missing-module")
    assert (finding["file"], finding["line"]) == (sub, 2)
    assert finding["severity"] == "warning"
    assert finding["via"] == [f"{service}:1", f"{inner}:1"]
    # No session lines: open_session fails, which the doctor says.
    assert status == 1
    (refusal,) = errors(report)
    assert refusal["refuses"] == ["open_session"]
    ran, _ = pamphlet_run("--confdir", str(confdir), "nested", "root", "authenticate")
    assert ran == 0


def test_a_relative_include_reads_etc_pam_d_even_under_a_confdir(confdir: pathlib.Path) -> None:
    write(confdir, "common-auth", "auth required pam_deny.so\n")  # not the one libpam reads
    write(confdir, "rel", "@include common-auth\n" + PERMIT_ALL.split("\n", 1)[1])
    _, report = doctor("rel", "root", "--confdir", str(confdir))
    files = {line["file"] for line in report["stack"]["lines"]["auth"]}
    assert files == {"/etc/pam.d/common-auth"}


# -- who is asking ------------------------------------------------------------------------


def as_nobody(
    source: pathlib.Path, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        as_user("nobody", "nogroup", SYSTEM_PYTHON, "-m", "pamphlet", *args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"},
    )


@root
def test_a_caller_that_is_not_root_cannot_check_another_users_password(
    unix_user: tuple[str, str],
) -> None:
    name, password = unix_user
    source = public_source()
    directory = public_dir("pamphlet-doctor-")
    try:
        (directory / "unix").write_text(UNIX_STACK)
        (directory / "unix").chmod(0o644)
        confdir = str(directory)
        proc = as_nobody(source, "doctor", "unix", name, "--confdir", confdir, "--json")
        assert proc.returncode == 1, proc.stderr
        report = json.loads(proc.stdout)
        assert report["caller"]["euid"] == 65534
        finding = only(report, "not-root")
        assert finding["severity"] == "error"
        assert (finding["file"], finding["line"]) == (f"{confdir}/unix", 1)
        assert finding["lines"] == [f"{confdir}/unix:{n}" for n in (1, 2, 3)]
        assert finding["refuses"] == ["authenticate", "acct_mgmt", "chauthtok"]
        assert finding["code"] == pamphlet.ReturnCode.AUTHINFO_UNAVAIL
        assert "pamphlet broker --socket" in finding["remedy"]
        # The shadow entry is not guessed at without root.
        assert any(
            f["severity"] == "not checked" and "/etc/shadow" in f["cause"]
            for f in report["findings"]
        )
        # Run for real: the right password still fails, as predicted, and the
        # failure is attached to the finding.
        proc = as_nobody(
            source,
            "doctor",
            "unix",
            name,
            "--confdir",
            confdir,
            "--run",
            "authenticate",
            "--json",
            stdin=password + "\n",
        )
        report = json.loads(proc.stdout)
        assert proc.returncode == 1
        assert report["runs"] == [
            {
                "operation": "authenticate",
                "code": 9,
                "error": "AuthinfoUnavailable",
                "text": report["runs"][0]["text"],
                "answered": True,
            }
        ]
        assert only(report, "not-root")["seen"] == ["authenticate failed: AuthinfoUnavailable (9)"]
        # The plain command says the same, with a pointer at the doctor.
        proc = as_nobody(
            source, "--confdir", confdir, "unix", name, "authenticate", stdin=password + "\n"
        )
        assert proc.returncode == 1
        assert "AuthinfoUnavailable" in proc.stderr
        assert f"pamphlet doctor unix {name} --confdir {confdir}" in proc.stderr
    finally:
        shutil.rmtree(directory)
        shutil.rmtree(source)


@root
def test_pam_loginuid_without_cap_audit_control_fails_open_session(
    confdir: pathlib.Path,
) -> None:
    path = write(confdir, "loginuid", PERMIT_ALL + "session required pam_loginuid.so\n")
    # A container: the loginuid was set by whoever started it, and the
    # capability to change it is gone.
    script = "echo 1234 > /proc/self/loginuid && exec capsh --drop=cap_audit_control -- -c " + repr(
        f"{sys.executable} -m pamphlet doctor loginuid root --confdir {confdir} --json "
        "--run open_session"
    )
    proc = subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(SRC)),
    )
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    finding = only(report, "loginuid")
    assert finding["severity"] == "error"
    assert (finding["file"], finding["line"]) == (path, 5)
    assert "CAP_AUDIT_CONTROL" in finding["cause"] and "1234" in finding["cause"]
    assert finding["seen"] == ["open_session failed: SessionError (14)"]
    # With the capability, the same stack is healthy.
    status, report = doctor("loginuid", "root", "--confdir", str(confdir))
    assert status == 0, report["findings"]


# -- the user -------------------------------------------------------------------------------


@root
def test_a_healthy_unix_stack_with_a_real_user(
    confdir: pathlib.Path, unix_user: tuple[str, str]
) -> None:
    name, password = unix_user
    write(confdir, "unix", UNIX_STACK)
    status, report = doctor("unix", name, "--confdir", str(confdir))
    assert status == 0, report["findings"]
    assert report["user_info"]["name"] == name
    status, report = login_with_doctor(confdir, name, password)
    assert status == 0
    assert [(r["operation"], r["code"]) for r in report["runs"]] == [
        ("authenticate", 0),
        ("acct_mgmt", 0),
    ]


@root
def test_an_unknown_user(confdir: pathlib.Path) -> None:
    path = write(confdir, "unix", UNIX_STACK)
    status, report = doctor("unix", "pmph-nobody-at-all", "--confdir", str(confdir))
    assert status == 1
    finding = only(report, "user-unknown")
    assert (finding["file"], finding["line"]) == (path, 1)
    assert finding["code"] == pamphlet.ReturnCode.USER_UNKNOWN


@root
@pytest.mark.parametrize(
    ("command", "kind", "line", "code", "operation"),
    [
        (["passwd", "-l"], "locked", 1, 7, "authenticate"),
        (["chage", "-d", "0"], "password-expired", 2, 12, "acct_mgmt"),
        (["chage", "-E", "0"], "account-expired", 2, 13, "acct_mgmt"),
    ],
)
def test_the_shadow_entry(
    confdir: pathlib.Path,
    unix_user: tuple[str, str],
    command: list[str],
    kind: str,
    line: int,
    code: int,
    operation: str,
) -> None:
    name, password = unix_user
    path = write(confdir, "unix", UNIX_STACK)
    subprocess.run([*command, name], check=True, capture_output=True)
    status, report = login_with_doctor(confdir, name, password)
    assert status == 1
    finding = only(report, kind)
    assert finding["severity"] == "error"
    assert (finding["file"], finding["line"]) == (path, line)
    assert finding["code"] == code
    assert finding["source"].startswith("/etc/shadow:")
    assert report["runs"][-1]["operation"] == operation
    assert report["runs"][-1]["code"] == code
    assert finding["seen"] == [f"{operation} failed: {report['runs'][-1]['error']} ({code})"]


@root
def test_a_faillock_tally_past_its_limit(
    confdir: pathlib.Path, tmp_path: pathlib.Path, unix_user: tuple[str, str]
) -> None:
    name, _ = unix_user
    tally = tmp_path / "tally"
    tally.mkdir()
    options = f"dir={tally} deny=2 unlock_time=600"
    # A service that fails every time and counts it, to fill the tally.
    fill = f"""\
auth required pam_faillock.so preauth {options}
auth [success=1 default=bad] pam_debug.so auth=auth_err
auth [default=die] pam_faillock.so authfail {options}
"""
    write(confdir, "fill", fill)
    path = write(
        confdir, "faillock", f"auth required pam_faillock.so preauth {options}\n" + PERMIT_ALL
    )
    status, report = doctor("faillock", name, "--confdir", str(confdir))
    assert status == 0, report["findings"]
    for _ in range(2):
        pamphlet_run("--confdir", str(confdir), "fill", name, "authenticate")
    status, report = doctor("faillock", name, "--confdir", str(confdir), "--run", "authenticate")
    assert status == 1
    finding = only(report, "faillock")
    assert (finding["file"], finding["line"]) == (path, 1)
    assert "2 failed logins" in finding["cause"]
    assert finding["remedy"] == f"faillock --user {name} --reset --dir {tally}"
    assert finding["seen"] == ["authenticate failed: AuthenticationError (7)"]
    # The remedy works.
    subprocess.run(["faillock", "--user", name, "--reset", "--dir", str(tally)], check=True)
    status, _ = doctor("faillock", name, "--confdir", str(confdir))
    assert status == 0


@root
def test_nologin(confdir: pathlib.Path, tmp_path: pathlib.Path, unix_user: tuple[str, str]) -> None:
    name, password = unix_user
    nologin = tmp_path / "nologin"
    path = write(confdir, "nologin", f"auth requisite pam_nologin.so file={nologin}\n" + UNIX_STACK)
    status, _ = doctor("nologin", name, "--confdir", str(confdir))
    assert status == 0
    nologin.write_text("Down for maintenance.\n")
    status, report = doctor(
        "nologin", name, "--confdir", str(confdir), "--run", "authenticate", stdin=password + "\n"
    )
    assert status == 1
    finding = only(report, "nologin")
    assert (finding["file"], finding["line"]) == (path, 1)
    assert finding["source"] == str(nologin)
    assert finding["remedy"] == f"rm {nologin} when logins are to be allowed again"
    assert finding["seen"] == ["authenticate failed: AuthenticationError (7)"]


@root
def test_securetty_refuses_root_without_a_tty(confdir: pathlib.Path) -> None:
    path = write(confdir, "securetty", "auth required pam_securetty.so\n" + PERMIT_ALL)
    status, report = doctor("securetty", "root", "--confdir", str(confdir), "--run", "authenticate")
    assert status == 1
    finding = only(report, "securetty")
    assert (finding["file"], finding["line"]) == (path, 1)
    assert finding["code"] == pamphlet.ReturnCode.SERVICE_ERR
    assert finding["seen"] == ["authenticate failed: ServiceError (3)"]


@root
def test_securetty_refuses_root_on_an_unlisted_tty(
    confdir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """pam_securetty 1.5.2 has no file option: /etc/securetty is written in a
    private mount namespace, on an overlay of /etc that only this test sees."""
    write(confdir, "securetty", "auth required pam_securetty.so\n" + PERMIT_ALL)
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    command = f"{sys.executable} -m pamphlet doctor securetty root --confdir {confdir} --json"
    script = (
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc && "
        "echo tty1 > /etc/securetty && "
        f"{command} --tty pts/7 --run authenticate > {tmp_path}/unlisted.json; "
        f"{command} --tty tty1 --run authenticate > {tmp_path}/listed.json; true"
    )
    subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        check=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(SRC)),
    )
    assert not os.path.exists("/etc/securetty")  # the namespace kept it to itself
    unlisted = json.loads((tmp_path / "unlisted.json").read_text())
    finding = only(unlisted, "securetty")
    assert finding["source"] == "/etc/securetty"
    assert "'pts/7' is not one of them" in finding["cause"]
    assert finding["seen"] == ["authenticate failed: AuthenticationError (7)"]
    listed = json.loads((tmp_path / "listed.json").read_text())
    assert listed["exit_status"] == 0 and listed["runs"][0]["code"] == 0


@root
def test_pam_access_deny(
    confdir: pathlib.Path, tmp_path: pathlib.Path, unix_user: tuple[str, str]
) -> None:
    name, _ = unix_user
    access = tmp_path / "access.conf"
    access.write_text(f"# who may log in\n+ : root : ALL\n- : {name} : ALL EXCEPT LOCAL\n")
    path = write(
        confdir,
        "access",
        PERMIT_ALL.replace(
            "account  required pam_permit.so",
            f"account  required pam_access.so accessfile={access}",
        ),
    )
    # From the network: denied by line 3.
    status, report = doctor(
        "access", name, "--confdir", str(confdir), "--rhost", "192.0.2.7", "--run", "acct_mgmt"
    )
    assert status == 1
    finding = only(report, "access")
    assert (finding["file"], finding["line"]) == (path, 2)
    assert finding["source"] == f"{access}:3"
    assert finding["seen"] == ["acct_mgmt failed: PermissionDenied (6)"]
    # Locally: the EXCEPT lets the user in.
    status, report = doctor("access", name, "--confdir", str(confdir), "--tty", "tty3")
    assert status == 0, report["findings"]
    # A netgroup cannot be evaluated here: named, not guessed.
    access.write_text(f"- : @staff : ALL\n- : {name} : ALL\n")
    status, report = doctor("access", name, "--confdir", str(confdir), "--rhost", "192.0.2.7")
    assert status == 0
    (unchecked,) = [f for f in report["findings"] if f["severity"] == "not checked"]
    assert f"{access}:1" in unchecked["cause"]


@root
def test_succeed_if_uid_against_a_system_user(confdir: pathlib.Path, system_user: str) -> None:
    path = write(
        confdir,
        "succeed",
        "auth requisite pam_succeed_if.so uid >= 1000 quiet_success\n" + PERMIT_ALL,
    )
    status, report = doctor(
        "succeed", system_user, "--confdir", str(confdir), "--run", "authenticate"
    )
    assert status == 1
    finding = only(report, "succeed-if")
    assert (finding["file"], finding["line"]) == (path, 1)
    assert "'uid >= 1000'" in finding["cause"]
    assert finding["seen"] == ["authenticate failed: AuthenticationError (7)"]
    # A condition the doctor cannot evaluate is named, not guessed.
    write(confdir, "succeed", "auth requisite pam_succeed_if.so user innetgr admins\n" + PERMIT_ALL)
    status, report = doctor("succeed", system_user, "--confdir", str(confdir))
    assert status == 0
    assert [f["severity"] for f in report["findings"] if f["kind"] == "not-checked"] == [
        "not checked"
    ]


# -- the report -------------------------------------------------------------------------------


def test_json_carries_every_finding_the_text_shows(confdir: pathlib.Path) -> None:
    write(
        confdir,
        "many",
        """\
        auht required pam_permit.so
        auth required pam_pamphlet_not_installed.so
        account required pam_permit.so
        """,
    )
    report = pamphlet.diagnose("many", "root", confdir=str(confdir))
    status, data = doctor("many", "root", "--confdir", str(confdir))
    assert status == report.exit_status == 1
    assert [f["kind"] for f in data["findings"]] == [f.kind for f in report.findings]
    assert len(data["findings"]) >= 4  # two bad lines, no password and no session lines
    _, text = doctor_text("many", "root", "--confdir", str(confdir))
    for finding in data["findings"]:
        if finding["severity"] in ("error", "warning"):
            assert finding["cause"] in text
            if finding["file"]:
                assert f"{finding['file']}:{finding['line']}" in text
    # Most likely cause first: the first line that refuses authentication.
    assert text.index("many:1") < text.index("many:2")


def test_run_agrees_with_the_plain_command(confdir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    write(
        confdir,
        "matrix",
        PERMIT_ALL.replace(
            "session  required pam_permit.so", "session required pam_pamphlet_not_installed.so"
        ),
    )
    operations = ["authenticate", "acct_mgmt", "open_session", "close_session"]
    ran, err = pamphlet_run("--confdir", str(confdir), "matrix", "root", *operations)
    status, report = doctor("matrix", "root", "--confdir", str(confdir), "--run", *operations)
    assert ran == status == 1
    assert [r["operation"] for r in report["runs"]] == ["authenticate", "acct_mgmt", "open_session"]
    failed = report["runs"][-1]
    assert f"open_session failed: {failed['error']}" in err
    assert only(report, "missing-module")["seen"] == [
        f"open_session failed: {failed['error']} (28)"
    ]


def test_usage_errors_exit_2(confdir: pathlib.Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["doctor"], stderr=io.StringIO())
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["doctor", "login", "--confdir", str(confdir / "missing")], stderr=io.StringIO())
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["doctor", "login", "root", "--run", "dance"], stderr=io.StringIO())
    assert exit_info.value.code == 2


def test_diagnose_is_a_lazy_name() -> None:
    code = (
        "import sys, pamphlet; assert 'pamphlet.doctor' not in sys.modules; "
        "pamphlet.diagnose; assert 'pamphlet.doctor' in sys.modules"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(SRC))
    )


# -- the hint where users meet the error -----------------------------------------------------


def test_the_one_call_helper_points_at_the_doctor_when_the_service_is_missing(
    confdir: pathlib.Path,
) -> None:
    write(confdir, "other", DENYING_OTHER)
    with pytest.raises(pamphlet.AuthenticationError) as raised:
        pamphlet.authenticate("root", "x", service="gone", confdir=str(confdir))
    expected = f"{confdir}/gone does not exist" if os.geteuid() == 0 else "is not root"
    (note,) = raised.value.__notes__
    assert expected in note
    assert f"`pamphlet doctor gone root --confdir {confdir}`" in note


def test_no_hint_for_a_wrong_password_as_root(make_service: Any) -> None:
    service = make_service(users={"bob": "secret"})
    error = pamphlet.AuthenticationError("Authentication failure")
    hint = refusal_hint(error, service.name, "bob", confdir=service.confdir)
    assert (hint is None) == (os.geteuid() == 0)
    assert refusal_hint(pamphlet.PermissionDenied("x"), service.name, "bob") is None


@root
def test_broker_says_what_its_policy_allows_this_caller(confdir: pathlib.Path) -> None:
    write(confdir, "brokered", PERMIT_ALL)
    broker = Broker('[[allow]]\nusers = ["root"]\nservices = ["brokered"]\n', str(confdir))
    try:
        status, report = doctor(
            "brokered",
            "root",
            "--broker",
            broker.socket,
            "--confdir",
            str(confdir),
            "--run",
            "authenticate",
            "acct_mgmt",
        )
        assert status == 0, report["findings"]
        assert [r["code"] for r in report["runs"]] == [0, 0]
        assert "lets this process (uid 0) start 'brokered'" in only(report, "broker")["cause"]
        status, report = doctor(
            "elsewhere", "root", "--broker", broker.socket, "--confdir", str(confdir)
        )
        assert status == 1
        finding = only(report, "broker")
        assert finding["severity"] == "error"
        assert "ServiceNotAllowed" in finding["cause"]
    finally:
        broker.cleanup()


# -- the reader agrees with libpam ---------------------------------------------------------

TRICKY_STACKS = {
    "silent missing module": "-auth required /nonexistent/pam_x.so\nauth required pam_permit.so\n",
    "unknown type": "foo required pam_permit.so\nauth required pam_permit.so\n",
    "bad control": "auth [success=ok defaultx=bad] pam_permit.so\n",
    "jump past the end": "auth [success=5 default=bad] pam_permit.so\n",
    "jump over pam_deny": (
        "auth [success=1 default=ignore] pam_permit.so\nauth requisite pam_deny.so\n"
        "auth required pam_permit.so\n"
    ),
    "no control": "auth\n",
    "mixed case": "AUTH Required pam_permit.so\n",
    "continued over blank and comment lines": "auth \\\n  required \\\n\n# c\n pam_permit.so\n",
    "trailing comment": "auth required pam_permit.so # a note\n",
    "a module without the function": "auth required pam_permit.so\nauth required pam_keyinit.so\n",
    "a line over the buffer": "auth required pam_permit.so " + "x" * 1100 + "\n",
    "continuation at the end": "auth required pam_permit.so \\",
    "substack with done": "auth substack {dir}/sub\nauth required pam_permit.so\n",
    "include of a missing file": "auth include {dir}/nothing\nauth required pam_permit.so\n",
    "@include of a missing file": "@include {dir}/nothing\n",
    "relative include under a confdir": "auth include sub\n",
    "empty: other": "",
}


@pytest.mark.parametrize("name", TRICKY_STACKS)
def test_the_stack_reader_predicts_what_libpam_returns(confdir: pathlib.Path, name: str) -> None:
    from pamphlet import pamconf

    write(confdir, "other", "auth required pam_deny.so\n")
    write(
        confdir,
        "sub",
        "auth [success=done default=ignore] pam_permit.so\nauth required pam_deny.so\n",
    )
    write(confdir, "tricky", TRICKY_STACKS[name].replace("{dir}", str(confdir)))

    def outcome(line: pamconf.Line) -> int:
        if pamconf.module_fault(line, "authenticate"):
            return 28
        return 7 if line.name == "pam_deny" else 0

    stack = pamconf.read_stack("tricky", str(confdir))
    predicted = 26 if stack.fatal else pamconf.simulate(stack.entries("auth"), outcome).code
    try:
        with pamphlet.PamApplication("tricky", "root", confdir=str(confdir)) as app:
            app.authenticate()
        actual = 0
    except pamphlet.PamError as error:
        actual = error.code
    assert predicted == actual


@root
@pytest.mark.parametrize(
    ("command", "operation", "pamtester_says"),
    [
        (["passwd", "-l"], "authenticate", "Authentication failure"),
        (["chage", "-E", "0"], "acct_mgmt", "User account has expired"),
    ],
)
def test_pamtester_fails_where_the_doctor_says(
    unix_user: tuple[str, str], command: list[str], operation: str, pamtester_says: str
) -> None:
    """pamtester has no confdir: a uniquely named service in /etc/pam.d, removed after."""
    name, password = unix_user
    service = "pmph-doctor-" + secrets.token_hex(4)
    path = pathlib.Path("/etc/pam.d") / service
    path.write_text(UNIX_STACK)
    try:
        status, report = doctor(service, name)
        assert status == 0, report["findings"]
        subprocess.run([*command, name], check=True, capture_output=True)
        status, report = doctor(service, name)
        assert status == 1
        (finding,) = errors(report)
        assert finding["file"] == str(path) and operation in finding["refuses"]
        proc = subprocess.run(
            ["pamtester", service, name, "authenticate", "acct_mgmt"],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0
        assert f"pamtester: {pamtester_says}" in proc.stderr
        authenticated = "successfully authenticated" in proc.stdout + proc.stderr
        assert authenticated == (operation == "acct_mgmt")
    finally:
        path.unlink()


@root
@pytest.mark.parametrize(
    "condition",
    [
        "user ingroup root",
        "user notingroup root",
        "user in root:daemon",
        "user notin root:daemon",
        "shell = /bin/bash",
        "shell != /bin/bash",
        "uid < 1000 gid < 1000",
        "service in succeed:login",
        "user =~ pmds*",
    ],
)
def test_succeed_if_conditions_agree_with_the_module(
    confdir: pathlib.Path, system_user: str, condition: str
) -> None:
    write(confdir, "succeed", f"auth required pam_succeed_if.so {condition}\n" + PERMIT_ALL)
    status, report = doctor(
        "succeed", system_user, "--confdir", str(confdir), "--run", "authenticate"
    )
    predicted = [f for f in report["findings"] if f["kind"] == "succeed-if"]
    ran = report["runs"][0]["code"]
    assert (ran != 0) == bool(predicted) == (status == 1), (condition, report["findings"])


# -- what the summary says -------------------------------------------------------------------


@root
def test_a_user_nss_does_not_know_is_refused_by_debians_chsh() -> None:
    """The lead's case: pam_shells refuses first, then common-account's pam_deny."""
    name = "pmph-no-such-" + secrets.token_hex(3)
    status, text = doctor_text("chsh", name)
    assert status == 1
    assert "1 finding predicts a refusal" in text and "No finding predicts" not in text
    status, report = doctor("chsh", name)
    finding = only(report, "user-unknown")
    assert finding["severity"] == "error"
    assert (finding["file"], finding["module"]) == ("/etc/pam.d/chsh", "pam_shells.so")
    assert finding["refuses"][:2] == ["authenticate", "acct_mgmt"]
    assert report["phases"]["authenticate"] == "refuses"
    # libpam agrees, whatever the answer.
    ran, err = pamphlet_run("chsh", name, "authenticate", stdin="x\n")
    assert ran == 1 and "AuthenticationError" in err
    ran, err = pamphlet_run("chsh", name, "acct_mgmt")
    assert ran == 1 and "AuthenticationError" in err


def test_a_module_the_doctor_does_not_model_makes_the_phase_not_certain(
    confdir: pathlib.Path,
) -> None:
    path = write(
        confdir,
        "exec",
        "auth [success=done default=ignore] pam_exec.so quiet /bin/false\n"
        "auth required pam_deny.so\n"
        "account optional pam_exec.so quiet /bin/false\naccount required pam_permit.so\n"
        "password required pam_permit.so\nsession required pam_permit.so\n",
    )
    status, text = doctor_text("exec", "root", "--confdir", str(confdir))
    assert status == 0
    assert "whether authenticate succeed depends on modules the doctor does not model" in text
    _, report = doctor("exec", "root", "--confdir", str(confdir))
    assert report["phases"]["authenticate"] == "not certain"
    # An optional line cannot decide: acct_mgmt is predicted.
    assert report["phases"]["acct_mgmt"] == "passes"
    (unchecked,) = [f for f in report["findings"] if f["severity"] == "not checked"]
    assert "it depends on pam_exec" in unchecked["cause"]
    assert (unchecked["file"], unchecked["line"]) == (path, 1)
    # Rightly so: the script decides, and /bin/false refuses.
    ran, _ = pamphlet_run("--confdir", str(confdir), "exec", "root", "authenticate")
    assert ran == 1


def test_findings_that_refuse_only_together_are_both_named(confdir: pathlib.Path) -> None:
    """Each alone is stepped over; together they fall through to pam_deny."""
    write(
        confdir,
        "together",
        "auth [success=2 default=ignore] pam_succeed_if.so user = nobody quiet\n"
        "auth [success=1 default=ignore] pam_succeed_if.so user = daemon quiet\n"
        "auth requisite pam_deny.so\nauth required pam_permit.so\n" + PERMIT_ALL,
    )
    status, report = doctor("together", "root", "--confdir", str(confdir))
    assert status == 1
    refusing = [f for f in report["findings"] if f["kind"] == "succeed-if"]
    assert [(f["line"], f["severity"], f["refuses"]) for f in refusing] == [
        (1, "error", ["authenticate"]),
        (2, "error", ["authenticate"]),
    ]
    ran, _ = pamphlet_run("--confdir", str(confdir), "together", "root", "authenticate")
    assert ran == 1


def test_run_with_no_answer_on_standard_input_stops_clearly(make_service: Any) -> None:
    """stdin at /dev/null: no hang; the phase fails at its prompt and says so."""
    service = make_service(users={"bob": "secret"})
    command = [sys.executable, "-m", "pamphlet", "doctor", service.name, "bob"]
    command += ["--confdir", service.confdir, "--run", "authenticate", "acct_mgmt"]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 1
    # The prompts come first, under a line that says what they are for.
    assert proc.stderr.startswith("pamphlet doctor: running authenticate, acct_mgmt for 'bob'")
    assert "Password: " in proc.stderr
    assert "authenticate stopped at a prompt: no answer to the prompt 'Password: '" in proc.stdout
    assert "no finding explains it" not in proc.stdout
    assert proc.stdout.startswith("pamphlet doctor: PAM service")
    proc = subprocess.run(
        [*command, "--json"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    report = json.loads(proc.stdout)
    assert [(r["operation"], r["answered"]) for r in report["runs"]] == [("authenticate", False)]
    assert all(f["seen"] == [] for f in report["findings"])
    # With the answer on standard input, the same command succeeds.
    proc = subprocess.run(
        command, input="secret\n", capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stdout
    assert "  authenticate: success\n  acct_mgmt: success\n" in proc.stdout
