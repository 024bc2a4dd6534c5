"""``pamphlet doctor``: say why a PAM stack will refuse a user, before anyone types a password.

::

    pamphlet doctor SERVICE [USER] [--confdir DIR] [--broker PATH] [--tty TTY]
                    [--rhost HOST] [--run OPERATION...] [--json]

:func:`diagnose` reads the stack as libpam will (:mod:`pamphlet.pamconf`),
looks at who is asking and at the user, and returns a :class:`Report`: a
list of :class:`Finding` objects, each with a severity, the module line it
concerns (file and line), a cause and a remedy. The doctor knows what the
common modules return for this user and this caller (``_Doctor.outcome``,
the ``_UNKNOWN_USER_CODES`` table), runs libpam's own dispatch rules over
each type with every finding's module failing at once, and names the
findings the refusal needs: those predict a refusal, and only those. It
assumes the user types the right password (``password_known=False``
predicts a wrong one). Rules it cannot evaluate, and modules it does not
model when their result decides a phase, are reported as "not checked" and
the phase as "not certain", never guessed. tests/test_doctor_agrees.py
holds these predictions against libpam. Without ``run`` nothing asks for a
password and nothing changes.

:func:`refusal_hint` is the one sentence that pamphlet adds to errors 7 and
9 when the cause is likely one the doctor finds; it only looks at the uid
and whether the service file exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import glob
import grp
import ipaddress
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

from .constants import ReturnCode
from .pamconf import (
    TYPES,
    Line,
    Stack,
    Verdict,
    libpam_service_name,
    module_fault,
    read_stack,
    service_paths,
    simulate,
    walk,
)

__all__ = [
    "Finding",
    "Report",
    "RunResult",
    "StackWarning",
    "diagnose",
    "refusal_hint",
    "broker_stack_warnings",
    "main",
]

ERROR, WARNING, INFO, NOT_CHECKED = "error", "warning", "info", "not checked"
#: A phase's prediction when a module the doctor does not model decides it.
NOT_CERTAIN = "not certain"
_SEVERITY_RANK = {ERROR: 0, WARNING: 1, INFO: 2, NOT_CHECKED: 3}

#: The phase each type's findings are judged by, in the order a login runs them.
PHASE_OF_TYPE = {
    "auth": "authenticate",
    "account": "acct_mgmt",
    "password": "chauthtok",
    "session": "open_session",
}
TYPE_OF_OPERATION = {
    "authenticate": "auth",
    "setcred": "auth",
    "acct_mgmt": "account",
    "chauthtok": "password",
    "open_session": "session",
    "close_session": "session",
}
#: What pam_deny returns in each phase (Linux-PAM's pam_deny.c).
_DENY_CODES = {
    "auth": ReturnCode.AUTH_ERR,
    "account": ReturnCode.AUTH_ERR,
    "password": ReturnCode.AUTHTOK_ERR,
    "session": ReturnCode.SESSION_ERR,
}
#: Modules that step aside (PAM_IGNORE) for any user, or in auth only
#: (each checked against libpam by tests/test_doctor_agrees.py).
_STEPS_ASIDE = {"pam_faildelay", "pam_warn", "pam_motd"}
_STEPS_ASIDE_IN_AUTH = {"pam_env", "pam_group"}
#: Modules that succeed for a user NSS knows unless a finding says otherwise
#: (pam_unix: the user is assumed to know the password).
_SUCCEEDS = {
    *("pam_permit", "pam_unix", "pam_shells", "pam_access", "pam_succeed_if", "pam_cap"),
    *("pam_env", "pam_group", "pam_limits", "pam_keyinit", "pam_lastlog", "pam_mail"),
    *("pam_selinux", "pam_loginuid", "pam_securetty"),
}
#: What modules return for a user NSS does not know, where it is not failure
#: for every type (pam_unix opens a session for anyone).
_UNKNOWN_USER_CODES = {
    "pam_unix": {
        "auth": ReturnCode.USER_UNKNOWN,
        "account": ReturnCode.USER_UNKNOWN,
        "password": ReturnCode.USER_UNKNOWN,
        "session": ReturnCode.SUCCESS,
    },
    "pam_shells": {"auth": ReturnCode.AUTH_ERR, "account": ReturnCode.AUTH_ERR},
    "pam_access": {t: ReturnCode.USER_UNKNOWN for t in TYPES},
    "pam_limits": {"session": ReturnCode.USER_UNKNOWN},
    "pam_keyinit": {"session": ReturnCode.USER_UNKNOWN},
    "pam_lastlog": {"session": ReturnCode.USER_UNKNOWN},
    "pam_mail": {"session": ReturnCode.USER_UNKNOWN},
    "pam_systemd": {"session": ReturnCode.USER_UNKNOWN},
    "pam_loginuid": {"session": ReturnCode.SESSION_ERR},
    "pam_motd": {"session": ReturnCode.SESSION_ERR},
}
CAP_AUDIT_CONTROL = 30
UNSET_LOGINUID = 4294967295
BROKER_SOCKET = "/run/pamphlet/broker.sock"
BROKER_POLICY = "/etc/pamphlet/broker.toml"


def _code_name(code: int | None) -> str | None:
    if code is None:
        return None
    try:
        return f"PAM_{ReturnCode(code).name}"
    except ValueError:
        return f"PAM error {code}"


@dataclasses.dataclass
class Finding:
    """One thing that will (or may) make the stack refuse, or that was not checked."""

    severity: str  # "error" (predicts a refusal), "warning", "info", "not checked"
    kind: str  # a short stable name: "not-root", "other-fallback", "locked", ...
    cause: str
    remedy: str | None = None
    #: The stack lines this concerns; the first is the one shown.
    lines: list[Line] = dataclasses.field(default_factory=list)
    #: The code those modules will return, when the doctor can predict it.
    code: int | None = None
    #: The phases this finding makes fail (filled by the dispatch simulation).
    refuses: list[str] = dataclasses.field(default_factory=list)
    #: What --run saw that this finding explains.
    seen: list[str] = dataclasses.field(default_factory=list)
    #: A file and line outside the stack (an access.conf rule, a shadow entry).
    source: str | None = None
    #: Codes for lines that return another than ``code`` (an unknown user).
    line_codes: dict[Line, int] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def line(self) -> Line | None:
        return self.lines[0] if self.lines else None

    def code_of(self, line: Line) -> int | None:
        return self.line_codes.get(line, self.code)

    def to_dict(self) -> dict[str, Any]:
        line = self.line
        return {
            "severity": self.severity,
            "kind": self.kind,
            "cause": self.cause,
            "remedy": self.remedy,
            "file": None if line is None else line.file,
            "line": None if line is None else line.number,
            "type": None if line is None else line.type,
            "module": None if line is None else line.module,
            "text": None if line is None else line.describe(),
            "via": [] if line is None else list(line.via),
            "code": self.code,
            "code_name": _code_name(self.code),
            "refuses": self.refuses,
            "seen": self.seen,
            "source": self.source,
            "lines": [f"{other.file}:{other.number}" for other in self.lines],
        }


@dataclasses.dataclass
class RunResult:
    """One operation run by ``run=``: its name and PAM's code (0 for success)."""

    operation: str
    code: int
    error: str | None = None
    text: str | None = None
    #: False when a prompt found no answer (standard input ended): the phase
    #: failed in the conversation, before the stack could say yes or no.
    answered: bool = True


@dataclasses.dataclass
class Report:
    """What :func:`diagnose` found. ``refuses`` is true when a finding predicts a refusal."""

    service: str
    user: str | None
    confdir: str | None
    broker: str | None
    caller: dict[str, Any]
    stack: Stack
    user_info: dict[str, Any] | None
    findings: list[Finding]
    runs: list[RunResult] = dataclasses.field(default_factory=list)
    #: Each judged phase: "refuses", "passes" or "not certain".
    phases: dict[str, str] = dataclasses.field(default_factory=dict)
    #: For a phase that is not certain, the modules that decide it.
    undecided: dict[str, list[Line]] = dataclasses.field(default_factory=dict)
    #: The code libpam is predicted to return for each phase that refuses.
    codes: dict[str, int] = dataclasses.field(default_factory=dict)

    def prediction(self, phase: str) -> str:
        """What the doctor predicts for ``phase``: "refuses", "passes" or "not certain".

        It judges ``authenticate``, ``acct_mgmt``, ``chauthtok`` and
        ``open_session``; ``setcred`` and ``close_session`` share their type's
        lines but are not judged, so they are "not certain".
        """
        return self.phases.get(phase, NOT_CERTAIN)

    def uncertain(self, phase: str) -> list[Line]:
        return self.undecided.get(phase, [])

    @property
    def refuses(self) -> bool:
        return any(f.severity == ERROR for f in self.findings) or any(r.code for r in self.runs)

    @property
    def exit_status(self) -> int:
        return 1 if self.refuses else 0

    def by_severity(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    def to_dict(self) -> dict[str, Any]:
        stack = self.stack
        return {
            "service": self.service,
            "user": self.user,
            "confdir": self.confdir,
            "broker": self.broker,
            "caller": self.caller,
            "user_info": self.user_info,
            "stack": {
                "name": stack.service,
                "looked_for": stack.looked_for,
                "service_file": stack.service_file,
                "other_file": stack.other_file,
                "uses_other": {t: stack.uses_other(t) for t in TYPES},
                "lines": {
                    t: [
                        {
                            "file": line.file,
                            "line": line.number,
                            "control": line.control,
                            "module": line.module,
                            "path": line.path,
                            "arguments": list(line.arguments),
                            "via": list(line.via),
                        }
                        for line in stack.lines(t)
                    ]
                    for t in TYPES
                },
            },
            "findings": [f.to_dict() for f in self.findings],
            "phases": self.phases,
            "codes": self.codes,
            "runs": [dataclasses.asdict(r) for r in self.runs],
            "refuses": self.refuses,
            "exit_status": self.exit_status,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    def format(self) -> str:
        """The report as the command prints it: most likely cause first."""
        out: list[str] = []
        who = f", user {self.user!r}" if self.user is not None else ""
        out.append(f"pamphlet doctor: PAM service {self.service!r}{who}")
        caller = self.caller
        out.append(
            f"  caller: uid {caller['uid']} ({caller['name']}), euid {caller['euid']}"
            + ("" if caller["euid"] == 0 else " - not root")
        )
        if self.broker:
            out.append(f"  through the broker at {self.broker}")
        stack = self.stack
        if stack.service_file is not None:
            out.append(f"  stack: {stack.service_file}")
        else:
            fallback = stack.other_file or "nothing (no 'other' file either)"
            out.append(f"  stack: {stack.looked_for[0]} is missing; libpam uses {fallback}")
        if self.user_info:
            info = self.user_info
            groups = ",".join(info["groups"]) or "-"
            out.append(
                f"  user: uid {info['uid']}, gid {info['gid']}, groups {groups}, "
                f"shell {info['shell']}"
            )
        errors = self.by_severity(ERROR)
        out.append("")
        unsure = [phase for phase, said in self.phases.items() if said == NOT_CERTAIN]
        if errors:
            count = "1 finding predicts" if len(errors) == 1 else f"{len(errors)} findings predict"
            out.append(f"{count} a refusal, most likely cause first:")
        elif unsure:
            out.append(
                f"No finding predicts a refusal, but whether {' and '.join(unsure)} "
                "succeed depends on modules the doctor does not model (see 'Not checked')."
            )
        else:
            out.append("No finding predicts a refusal.")
        for severity in (ERROR, WARNING, INFO):
            for finding in self.by_severity(severity):
                out.extend(_format_finding(finding, self.codes))
        for run in self.runs:
            if not run.answered:
                out.append(
                    f"\n  run: {run.operation} stopped at a prompt: {run.text}. The stack never "
                    "judged the answer; give the answers on standard input (one line each) or "
                    "run on a terminal"
                )
            elif run.code:
                explained = any(
                    any(s.startswith(f"{run.operation} ") for s in f.seen) for f in self.findings
                )
                if not explained:
                    out.append(
                        f"\n  run: {run.operation} failed with {run.error} ({run.code}); "
                        "no finding explains it (see the system log: journalctl -t "
                        "or /var/log/auth.log)"
                    )
        not_checked = self.by_severity(NOT_CHECKED)
        if not_checked:
            out.append("")
            out.append("Not checked:")
            for finding in not_checked:
                where = f" ({finding.line.where})" if finding.line else ""
                out.append(f"  - {finding.cause}{where}")
        if self.runs:
            out.append("")
            out.append("Run:")
            for run in self.runs:
                result = "success" if run.code == 0 else f"{run.error} ({run.code}): {run.text}"
                if not run.answered:
                    result = f"not answered ({run.error}, {run.code}): {run.text}"
                out.append(f"  {run.operation}: {result}")
        out.append("")
        out.append("The stack as libpam reads it:")
        width = max((len(line.where) for line in stack.all_lines()), default=0)
        for type_ in TYPES:
            lines = stack.lines(type_)
            suffix = "  (from 'other')" if stack.uses_other(type_) else ""
            if not lines:
                out.append(f"  {type_:<8} (no lines: every {PHASE_OF_TYPE[type_]} fails){suffix}")
                continue
            for line in lines:
                text = line.describe().split(" ", 1)[1]
                out.append(f"  {type_:<8} {line.where:<{width}}  {text}{suffix}")
        return "\n".join(out) + "\n"


def _format_finding(finding: Finding, codes: dict[str, int]) -> list[str]:
    out = [""]
    line = finding.line
    where = f"  {line.where}  {line.describe()}" if line is not None else ""
    label = {ERROR: "REFUSES", WARNING: "warning", INFO: "info"}[finding.severity]
    out.append(f"  {label}{where}")
    if line is not None and line.via:
        out.append(f"         included from {' -> '.join(line.via)}")
    out.append(f"         cause:  {finding.cause}")
    if finding.remedy:
        out.append(f"         remedy: {finding.remedy}")
    if finding.refuses:
        # The code libpam returns for the phase, which need not be this module's.
        failed = []
        for phase in finding.refuses:
            code = codes.get(phase, finding.code)
            failed.append(f"{phase} ({_code_name(code)}, {code})" if code else phase)
        out.append(f"         fails:  {', '.join(failed)}")
    for seen in finding.seen:
        out.append(f"         seen:   {seen}")
    return out


# -- who is asking ----------------------------------------------------------------


def _name_of_uid(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def _capabilities() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as file:
            for entry in file:
                if entry.startswith("CapEff:"):
                    return int(entry.split()[1], 16)
    except OSError:
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as file:
            return int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map", encoding="ascii") as file:
            return file.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


# -- the user ---------------------------------------------------------------------


@dataclasses.dataclass
class _User:
    name: str
    entry: pwd.struct_passwd | None
    groups: list[str]

    @property
    def uid(self) -> int | None:
        return None if self.entry is None else self.entry.pw_uid


def _lookup(name: str) -> _User:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return _User(name, None, [])
    try:
        gids = os.getgrouplist(name, entry.pw_gid)
    except OSError:
        gids = [entry.pw_gid]
    groups = []
    for gid in gids:
        try:
            groups.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            groups.append(f"#{gid}")
    return _User(name, entry, groups)


def _shadow_entry(name: str) -> tuple[list[str], int] | None:
    """The user's /etc/shadow fields and line number; None when absent.

    Raises PermissionError when the file cannot be read (not root).
    """
    with open("/etc/shadow", encoding="utf-8", errors="surrogateescape") as file:
        for number, entry in enumerate(file, 1):
            fields = entry.rstrip("\n").split(":")
            if fields[0] == name and len(fields) >= 8:
                return fields, number
    return None


def _days(value: str) -> int | None:
    try:
        return int(value) if value != "" else None
    except ValueError:
        return None


# -- the doctor -------------------------------------------------------------------


class _Doctor:
    def __init__(
        self,
        service: str,
        user: str | None,
        confdir: str | None,
        broker: str | None,
        tty: str | None,
        rhost: str | None,
        password_known: bool = True,
    ) -> None:
        self.service = service
        self.user_name = user
        self.confdir = confdir
        self.broker = broker
        self.tty = tty
        self.rhost = rhost
        self.stack = read_stack(service, confdir)
        self.findings: list[Finding] = []
        self.uid, self.euid = os.getuid(), os.geteuid()
        self.user: _User | None = None if user is None else _lookup(user)
        self.password_known = password_known
        self.phases: dict[str, str] = {}
        self.codes: dict[str, int] = {}
        self.undecided: dict[str, list[Line]] = {}
        self.unmodelled: set[Line] = set()
        self.shadow_password: str | None = None  # when root could read it

    def add(
        self, severity: str, kind: str, cause: str, remedy: str | None = None, **kw: Any
    ) -> Finding:
        finding = Finding(severity, kind, cause, remedy, **kw)
        self.findings.append(finding)
        return finding

    def modules(self, name: str, *types: str) -> list[Line]:
        return [
            line
            for type_ in (types or TYPES)
            for line in self.stack.lines(type_)
            if line.name == name and not line.must_fail
        ]

    def not_checked(self, cause: str, lines: Sequence[Line] = ()) -> None:
        self.add(NOT_CHECKED, "not-checked", cause, lines=list(lines))

    def by_severity(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    # -- the stack ------------------------------------------------------------

    def check_stack(self) -> None:
        stack = self.stack
        fatal = stack.fatal
        if fatal is not None:
            where = f"{fatal.file}:{fatal.number}" if fatal.number else fatal.file
            self.add(
                ERROR,
                "stack-unreadable",
                f"{where}: {fatal.message}",
                "fix the file named; libpam logs the same to the system log",
                refuses=["pam_start"],
                code=int(ReturnCode.ABORT),
                source=where,
            )
        if stack.not_read:
            self.not_checked(stack.not_read)
        if stack.service_file is None and stack.other_file is not None:
            looked = " and ".join(stack.looked_for)
            missing = (
                f"there is no service file {looked}"
                if stack.unreadable is None
                else f"the service file cannot be opened ({stack.unreadable})"
            )
            self.add(
                WARNING,
                "other-fallback",
                f"{missing}: libpam uses {stack.other_file} instead, for every phase",
                f"create {stack.looked_for[0]} (copy the service's stack back if it was "
                "moved; `dpkg -S` names the package that ships it)",
                source=stack.looked_for[0],
            )
        for problem in stack.problems:
            if problem.fatal:
                continue
            where = f"{problem.file}:{problem.number}" if problem.number else problem.file
            self.add(WARNING, "syntax", f"{where}: {problem.message}", "fix the line", source=where)
        seen: set[tuple[str, int]] = set()
        for type_ in TYPES:
            for line in self.stack.lines(type_):
                if line.must_fail:
                    self.add(
                        ERROR,
                        "syntax",
                        f"libpam cannot use this line ({line.must_fail}): it always fails "
                        "(PAM_PERM_DENIED)",
                        "fix the line as pam.conf(5) describes: TYPE CONTROL MODULE [ARGUMENTS]",
                        lines=[line],
                        code=int(ReturnCode.PERM_DENIED),
                    )
                    continue
                fault = module_fault(line)
                if fault and (line.file, line.number) not in seen:
                    seen.add((line.file, line.number))
                    package = _package_hint(line)
                    self.add(
                        ERROR,
                        "missing-module",
                        f"{fault}: libpam fails this phase with PAM_MODULE_UNKNOWN",
                        package or "install the module's package, or remove the line",
                        lines=[line],
                        code=int(ReturnCode.MODULE_UNKNOWN),
                    )

    # -- who is asking --------------------------------------------------------

    def check_caller(self) -> None:
        if self.euid == 0 or self.broker is not None:
            return
        caller = _name_of_uid(self.uid)
        auth = self.modules("pam_unix", "auth")
        # unix_chkpwd answers pam_unix's account check for the caller and for
        # root only (seen with Linux-PAM 1.5.2); anyone else gets
        # PAM_AUTHINFO_UNAVAIL.
        account = [] if self.user_name == "root" else self.modules("pam_unix", "account")
        python = sys.executable or "python3"
        remedy = (
            "run this process as root, or let the pamphlet broker run PAM for it: "
            f"sudo {python} -m pamphlet broker --socket {BROKER_SOCKET} --policy {BROKER_POLICY} "
            f"(a policy that allows user {caller!r} the service {self.service!r}), then "
            f"pass broker={BROKER_SOCKET!r} (or --broker {BROKER_SOCKET})"
        )
        password = self.modules("pam_unix", "password")
        if self.user_name is None or self.user_name == caller:
            # Its own password it changes through a setuid program, not here: not modelled.
            self.unmodelled.update(password)
            if auth:
                self.add(
                    INFO,
                    "not-root",
                    f"this process is not root (uid {self.uid}, {caller}): pam_unix can verify "
                    "only its own user's password here (through unix_chkpwd)",
                    remedy,
                    lines=auth,
                )
            return
        keyrings = self.modules("pam_keyinit", "session")
        causes = []
        if auth or account:
            causes.append(
                "pam_unix verifies another user's password (and account) only as root; "
                "unix_chkpwd, its helper, checks only the caller's own (syslog says 'password "
                "check failed for user')"
            )
        if password:
            causes.append("pam_unix changes another user's password only as root")
        if keyrings:
            causes.append("pam_keyinit cannot switch to another user's keyring")
        if not causes:
            return
        finding = self.add(
            ERROR,
            "not-root",
            f"this process is not root (uid {self.uid}, {caller}): " + "; ".join(causes),
            remedy,
            lines=auth + account + password + keyrings,
            code=int(ReturnCode.AUTHINFO_UNAVAIL if auth or account else ReturnCode.AUTHTOK_ERR),
        )
        finding.line_codes = {line: int(ReturnCode.SESSION_ERR) for line in keyrings}
        finding.line_codes.update((line, int(ReturnCode.AUTHTOK_ERR)) for line in password)

    def check_container(self) -> None:
        lines = self.modules("pam_loginuid", "session")
        if not lines:
            return
        caps = _capabilities()
        if caps is None:
            self.not_checked("CAP_AUDIT_CONTROL: /proc/self/status cannot be read", lines)
            return
        if caps >> CAP_AUDIT_CONTROL & 1:
            return
        if _in_user_namespace():
            self.add(
                INFO,
                "loginuid",
                "a user namespace: pam_loginuid ignores the loginuid there",
                lines=lines,
            )
            return
        current = _read_int("/proc/self/loginuid")
        target = None if self.user is None else self.user.uid
        if current is None or current == UNSET_LOGINUID:
            self.add(
                INFO,
                "loginuid",
                "this process lacks CAP_AUDIT_CONTROL, but its loginuid is not set yet, "
                "which the kernel lets it set once",
                lines=lines,
            )
            return
        if target is not None and current == target:
            return
        self.add(
            ERROR,
            "loginuid",
            f"this process lacks CAP_AUDIT_CONTROL (a container?) and its loginuid is already "
            f"set ({current}): pam_loginuid cannot change it, so open_session fails",
            "give the container the capability (docker run --cap-add AUDIT_CONTROL), or "
            "make the line 'session optional pam_loginuid.so'",
            lines=lines,
            code=int(ReturnCode.SESSION_ERR),
        )

    def check_broker(self) -> None:
        if self.broker is None:
            return
        from .application import PamApplication
        from .broker.errors import BrokerError
        from .errors import PamError

        class _Silent(PamApplication):
            def conversation(self, messages: list[Any]) -> list[None]:
                raise RuntimeError("the doctor answers no prompt")

        try:
            app = _Silent(self.service, self.user_name, broker=self.broker)
        except BrokerError as refused:
            self.add(
                ERROR,
                "broker",
                f"the broker at {self.broker} refuses this process (uid {self.uid}): "
                f"{type(refused).__name__}: {refused}",
                "add a rule for this user or group and service to the broker's policy "
                "(pamphlet broker --policy FILE --check reads it)",
                refuses=["pam_start"],
            )
            return
        except PamError as error:
            self.add(
                ERROR,
                "broker",
                f"the broker's worker could not start the service: {type(error).__name__}: {error}",
                refuses=["pam_start"],
                code=error.code,
            )
            return
        app.end()
        self.add(
            INFO,
            "broker",
            f"the broker at {self.broker} lets this process (uid {self.uid}) start "
            f"{self.service!r}; which phases its rule allows is not something it tells",
        )
        self.not_checked(
            "whether the broker reads the same stack: the one below is from "
            + (self.confdir or "/etc/pam.d")
            + " (give the broker's own --confdir, if it has one, as --confdir)"
        )

    # -- the user ---------------------------------------------------------------

    def check_user(self) -> None:
        user = self.user
        if user is None:
            return
        if user.entry is None:
            self.check_unknown_user(user)
            return
        self.check_shadow()
        if not self.password_known:
            # With nullok, an empty password lets pam_unix succeed without asking.
            empty = self.shadow_password == ""
            lines = [
                line
                for line in self.modules("pam_unix", "auth")
                if not (empty and line.flag("nullok"))
            ]
            self.add(
                WARNING,
                "wrong-password",
                "assumed: the user types a wrong password, which pam_unix refuses",
                lines=lines,
                code=int(ReturnCode.AUTH_ERR),
            )
        self.check_shells()
        self.check_faillock()
        self.check_nologin()
        self.check_securetty()
        self.check_access()
        self.check_succeed_if()

    def check_unknown_user(self, user: _User) -> None:
        """Every module that looks the user up fails, each with its own code."""
        lines: list[Line] = []
        codes: dict[Line, int] = {}
        unmodelled: set[Line] = set()
        for type_ in TYPES:
            phase = PHASE_OF_TYPE[type_]
            for line in self.stack.lines(type_):
                if line.must_fail or module_fault(line, phase):
                    continue
                code = _unknown_user_code(line, user, self)
                if code is None:
                    unmodelled.add(line)
                elif code not in (0, ReturnCode.IGNORE) and line not in lines:
                    lines.append(line)
                    codes[line] = code
        finding = self.add(
            ERROR if lines else WARNING,
            "user-unknown",
            f"NSS does not know the user {user.name!r} (getent passwd {user.name} finds "
            "nothing): "
            + (
                "the modules that look the user up fail: "
                + ", ".join(dict.fromkeys(f"{line.name} ({line.type})" for line in lines))
                if lines
                else "no module of this stack that the doctor knows looks the user up"
            ),
            "create the user, or check /etc/nsswitch.conf and its sources (sssd, ldap)",
            lines=lines,
            code=codes[lines[0]] if lines else None,
        )
        finding.line_codes = codes
        # Named by judge() only where one of them decides a phase.
        self.unmodelled.update(unmodelled)

    def check_shadow(self) -> None:
        user = self.user
        assert user is not None
        name = user.name
        auth = self.modules("pam_unix", "auth")
        account = self.modules("pam_unix", "account")
        try:
            found = _shadow_entry(name)
        except OSError as error:
            # Then what pam_unix says is not known, unless the caller's finding says it.
            why = (
                "readable only by root"
                if isinstance(error, PermissionError)
                else f"{error.strerror}"
            )
            self.not_checked(
                f"the shadow entry (locked password, expiry): /etc/shadow is {why}",
                auth + account,
            )
            return
        if found is None:
            if user.entry is not None and user.entry.pw_passwd in ("x", "*"):
                self.not_checked(
                    f"what pam_unix does for {name!r}, who has no /etc/shadow entry (NSS has "
                    "the user from elsewhere?)",
                    auth + account,
                )
            return
        fields, number = found
        source = f"/etc/shadow:{number}"
        password = self.shadow_password = fields[1]
        today = int(time.time() // 86400)
        last, maximum, warn, inactive, expire = (_days(fields[i]) for i in (2, 4, 5, 6, 7))

        def finding(type_: str, kind: str, cause: str, remedy: str, code: int) -> None:
            # Without pam_unix on the type, the entry is only information.
            lines = auth if type_ == "auth" else account
            self.add(
                ERROR if lines else INFO,
                kind,
                cause + ("" if lines else f"; no pam_unix in {type_} reads it"),
                remedy,
                lines=lines,
                code=int(code) if lines else None,
                source=source,
            )

        if password.startswith("!"):
            finding(
                "auth",
                "locked",
                f"the password of {name!r} is locked ('!' in {source})",
                f"passwd -u {name} (or usermod -U {name})",
                ReturnCode.AUTH_ERR,
            )
        elif password == "" and auth and not any(line.flag("nullok") for line in auth):
            finding(
                "auth",
                "no-password",
                f"{name!r} has an empty password ({source}) and pam_unix has no 'nullok'",
                f"set a password: passwd {name}",
                ReturnCode.AUTH_ERR,
            )
        elif password.startswith("*"):
            finding(
                "auth",
                "no-password",
                f"{name!r} has no usable password ({password!r} in {source})",
                f"set one: passwd {name}",
                ReturnCode.AUTH_ERR,
            )
        ends = None if last is None or maximum is None or maximum < 0 else last + maximum
        if expire is not None and expire >= 0 and today >= expire:
            finding(
                "account",
                "account-expired",
                f"the account {name!r} expired on {_date(expire)} ({source})",
                f"chage -E -1 {name} (or a later date: chage -E YYYY-MM-DD {name})",
                ReturnCode.ACCT_EXPIRED,
            )
        elif last == 0:
            finding(
                "account",
                "password-expired",
                f"the password of {name!r} must be changed before login (the last change "
                f"is day 0 in {source}, as 'chage -d 0' or 'passwd -e' leave it)",
                "let the user change it: run chauthtok after acct_mgmt (pamphlet's login "
                f"sequence does), or as root: passwd {name}",
                ReturnCode.NEW_AUTHTOK_REQD,
            )
        elif ends is None:
            return
        elif inactive is not None and inactive >= 0 and today >= ends + inactive:
            finding(
                "account",
                "account-expired",
                f"the password of {name!r} expired on {_date(ends)} and its {inactive} "
                f"inactive days have passed ({source}): the account is locked",
                f"as root: passwd {name} (or chage -I -1 {name})",
                ReturnCode.ACCT_EXPIRED,
            )
        elif today >= ends:
            finding(
                "account",
                "password-expired",
                f"the password of {name!r} expired on {_date(ends)} ({source})",
                f"let the user change it (chauthtok after acct_mgmt), or as root: passwd {name}",
                ReturnCode.NEW_AUTHTOK_REQD,
            )
        elif warn is not None and ends - today <= warn:
            self.add(
                INFO,
                "password-ageing",
                f"the password of {name!r} expires in {ends - today} days ({source})",
                lines=account,
                source=source,
            )

    def check_faillock(self) -> None:
        user = self.user
        assert user is not None
        lines = self.modules("pam_faillock", "auth")
        if not lines:
            return
        line = next((candidate for candidate in lines if candidate.flag("preauth")), lines[0])
        settings = _faillock_settings(line)
        if isinstance(settings, str):
            self.not_checked(settings, [line])
            return
        deny = int(settings.get("deny", "3"))
        if deny == 0:
            return
        if user.uid == 0 and "even_deny_root" not in settings:
            return
        tool = shutil.which("faillock") or next(
            (p for p in ("/usr/sbin/faillock", "/sbin/faillock") if os.path.exists(p)), None
        )
        if tool is None:
            self.not_checked("the pam_faillock tally: the faillock tool is not installed", [line])
            return
        directory = settings.get("dir", "/var/run/faillock")
        command = [tool, "--dir", directory, "--user", user.name]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as error:
            self.not_checked(f"the pam_faillock tally: {shlex.join(command)}: {error}", [line])
            return
        if result.returncode != 0:
            self.not_checked(
                f"the pam_faillock tally: {shlex.join(command)} failed: "
                f"{result.stderr.strip() or result.returncode}",
                [line],
            )
            return
        now = time.time()
        interval = float(settings.get("fail_interval", "900"))
        unlock = settings.get("root_unlock_time" if user.uid == 0 else "unlock_time", "600")
        unlock_time = 0.0 if unlock == "never" else float(unlock)
        failures = []
        for match in re.finditer(
            r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\s+\S+\s+.*?\s([VI])\s*$", result.stdout, re.M
        ):
            when = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
            if match.group(2) == "V" and when > now - interval:
                failures.append(when)
        if len(failures) < deny:
            if failures:
                self.add(
                    INFO,
                    "faillock",
                    f"{len(failures)} recent failed logins of {user.name!r} in {directory} "
                    f"(pam_faillock locks at {deny})",
                    lines=[line],
                )
            return
        latest = max(failures)
        if unlock_time and latest + unlock_time <= now:
            return
        until = (
            "until an administrator resets it"
            if not unlock_time
            else (f"for {int(latest + unlock_time - now)} more seconds")
        )
        reset = f"faillock --user {user.name} --reset" + (
            f" --dir {directory}" if directory != "/var/run/faillock" else ""
        )
        self.add(
            ERROR,
            "faillock",
            f"{user.name!r} has {len(failures)} failed logins in {directory}, at or past "
            f"pam_faillock's deny={deny}: the account is locked {until}",
            reset,
            lines=[line],
            code=int(ReturnCode.AUTH_ERR),
            source=directory,
        )

    def check_nologin(self) -> None:
        user = self.user
        assert user is not None
        for type_ in ("auth", "account"):
            for line in self.modules("pam_nologin", type_):
                present = _nologin_file(line)
                if present is None:
                    continue
                if user.uid == 0:
                    self.add(
                        INFO,
                        "nologin",
                        f"{present} exists: pam_nologin lets only root in, which this user is",
                        lines=[line],
                    )
                    continue
                self.add(
                    ERROR,
                    "nologin",
                    f"{present} exists: pam_nologin refuses every user but root "
                    "(it is what shutdown leaves behind, or an administrator's 'no logins now')",
                    f"rm {present} when logins are to be allowed again",
                    lines=[line],
                    code=int(ReturnCode.AUTH_ERR),
                    source=present,
                )

    def check_shells(self) -> None:
        user = self.user
        assert user is not None and user.entry is not None
        lines = self.modules("pam_shells", "auth", "account")
        if not lines:
            return
        path, shell = "/etc/shells", user.entry.pw_shell
        try:
            status = os.stat(path)
            with open(path, encoding="utf-8", errors="surrogateescape") as file:
                listed = {entry.rstrip("\n") for entry in file}
        except OSError as error:
            cause = f"pam_shells cannot read {path} ({error.strerror}): it refuses every user"
            remedy = f"restore {path}"
        else:
            if status.st_mode & 0o002 or not os.path.isfile(path):
                cause = f"{path} is world-writable or not a file: pam_shells refuses every user"
                remedy = f"chmod o-w {path}"
            elif shell in listed:
                return
            else:
                cause = f"the shell of {user.name!r}, {shell!r}, is not listed in {path}"
                remedy = f"add {shell} to {path}, or chsh -s /bin/bash {user.name}"
        self.add(
            ERROR, "shell", cause, remedy, lines=lines, code=int(ReturnCode.AUTH_ERR), source=path
        )

    def check_securetty(self) -> None:
        user = self.user
        assert user is not None
        lines = self.modules("pam_securetty", "auth")
        if not lines or user.uid != 0:
            return
        tty = self.tty
        if tty is None:
            self.add(
                ERROR,
                "securetty",
                "pam_securetty applies to root, and this login sets no tty (PAM_TTY), as a "
                "network service often does not: it fails with 'cannot determine user's tty'",
                "log in as another user, set the tty item (--tty, app.tty), or remove "
                "pam_securetty from a network service's stack",
                lines=lines,
                code=int(ReturnCode.SERVICE_ERR),
            )
            return
        name = tty[5:] if tty.startswith("/dev/") else tty
        path = "/etc/securetty"
        try:
            status = os.stat(path)
        except OSError:
            return  # libpam 1.5 lets root in when the file is missing
        if status.st_mode & 0o002 or not os.path.isfile(path):
            self.add(
                ERROR,
                "securetty",
                f"{path} is world-writable or not a regular file: pam_securetty refuses root",
                f"chmod o-w {path}",
                lines=lines,
                code=int(ReturnCode.AUTH_ERR),
                source=path,
            )
            return
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                listed = {entry.strip() for entry in file if entry.strip()}
        except OSError as error:
            self.not_checked(f"{path}: {error.strerror}", lines)
            return
        if name in listed:
            return
        console = ""
        try:
            with open("/sys/class/tty/console/active", encoding="ascii") as file:
                console = file.read()
        except OSError:
            pass
        if name in console.split() and not any(line.flag("noconsole") for line in lines):
            return
        self.add(
            ERROR,
            "securetty",
            f"root may log in only on the ttys {path} lists, and {name!r} is not one of them",
            f"add {name} to {path} if root logins there are intended, or log in as another user",
            lines=lines,
            code=int(ReturnCode.AUTH_ERR),
            source=path,
        )

    def check_access(self) -> None:
        user = self.user
        assert user is not None and user.entry is not None
        for type_ in TYPES:
            for line in self.modules("pam_access", type_):
                given = line.option("accessfile")
                files = [given] if given else ["/etc/security/access.conf"]
                if not os.path.exists(files[0]):
                    if given:  # seen: PAM_ABORT, for every user
                        self.add(
                            ERROR,
                            "access",
                            f"pam_access's accessfile={given} does not exist: it refuses "
                            "every user",
                            f"create {given}, or fix the path on the line",
                            lines=[line],
                            code=int(ReturnCode.ABORT),
                            source=given,
                        )
                    else:
                        self.not_checked(f"pam_access without {files[0]}", [line])
                    continue
                if not given:
                    files += sorted(glob.glob("/etc/security/access.d/*.conf"))
                origin = self.rhost or self.tty
                rules = _AccessRules(
                    user,
                    self.rhost,
                    self.tty,
                    nodefgroup=line.flag("nodefgroup"),
                    fieldsep=line.option("fieldsep") or ":",
                    listsep=line.option("listsep") or ", \t",
                )
                for path in files:
                    verdict = rules.evaluate(path)
                    if verdict is None:
                        continue
                    allowed, where, why = verdict
                    if allowed is None:
                        self.not_checked(f"pam_access: {where}: {why}", [line])
                    elif not allowed:
                        shown = f"from {origin!r}" if origin else "from here"
                        self.add(
                            ERROR,
                            "access",
                            f"{where} denies {user.name!r} {shown}: {why}",
                            f"edit {where.rsplit(':', 1)[0]} (the first rule that matches decides)",
                            lines=[line],
                            code=int(ReturnCode.PERM_DENIED),
                            source=where,
                        )
                    break

    def check_succeed_if(self) -> None:
        user = self.user
        assert user is not None and user.entry is not None
        for type_ in TYPES:
            for line in self.modules("pam_succeed_if", type_):
                subject = user
                if line.flag("use_uid"):
                    subject = _lookup(_name_of_uid(self.uid))
                result = _succeed_if(line, subject, self)
                if result is None:
                    continue
                code, text = result
                if code is None:
                    self.not_checked(f"pam_succeed_if: {text}", [line])
                elif code:
                    self.add(
                        ERROR,
                        "succeed-if",
                        f"pam_succeed_if's condition {text} is false for {subject.name!r}",
                        "change the condition, or use another user",
                        lines=[line],
                        code=int(ReturnCode.AUTH_ERR),
                    )

    # -- what the findings mean for each phase ------------------------------------

    def outcome(self, line: Line, phase: str) -> int | None:
        """What the module returns for a user NSS knows, when no finding says
        otherwise; None when the doctor does not model it.

        The user is assumed to type the right password and to pick a new one
        the stack accepts (``password_known=False`` adds a finding instead).
        """
        if module_fault(line, phase):
            return int(ReturnCode.MODULE_UNKNOWN)
        if line in self.unmodelled:
            return None
        name = line.name or ""
        if name == "pam_deny":
            return int(_DENY_CODES[line.type])
        if name == "pam_rootok":
            return 0 if self.uid == 0 else int(ReturnCode.AUTH_ERR)
        if name == "pam_nologin":
            return int(ReturnCode.IGNORE)  # no file, or root: a file refuses by finding
        if name == "pam_faillock":
            authfail = line.flag("authfail") and line.type == "auth"
            return int(ReturnCode.AUTH_ERR) if authfail else 0
        if name == "pam_lastlog" and self.euid != 0:
            return int(ReturnCode.SERVICE_ERR)  # it cannot write /var/log/lastlog
        if name in _STEPS_ASIDE or (name in _STEPS_ASIDE_IN_AUTH and line.type == "auth"):
            return int(ReturnCode.IGNORE)
        if name in _SUCCEEDS:
            return 0
        return None

    def dispatch(
        self,
        type_: str,
        applied: Sequence[Finding],
        unknown: int = 0,
        flipped: Line | None = None,
    ) -> Verdict:
        """libpam's verdict on ``type_`` with the ``applied`` findings' modules failing;
        modules not modelled return ``unknown``, except ``flipped``, which fails."""
        phase = PHASE_OF_TYPE[type_]

        def outcome(line: Line) -> int:
            for finding in applied:
                if line in finding.lines:
                    return finding.code_of(line) or 0
            code = self.outcome(line, phase)
            if code is None:
                return int(_DENY_CODES[type_]) if line is flipped else unknown
            return code

        return simulate(self.stack.entries(type_), outcome)

    def judge(self) -> None:
        """Run libpam's dispatch rules over each type with the findings' modules failing.

        A phase is "not certain" when a module the doctor does not model
        decides it; otherwise the findings whose failure it takes are the
        ones that refuse it.
        """
        self.unmodelled |= {line for f in self.by_severity(NOT_CHECKED) for line in f.lines}
        judged = [
            f
            for f in self.findings
            if f.severity in (ERROR, WARNING)
            and f.code is not None
            and f.kind not in ("missing-module", "syntax")  # already in outcome()
        ]
        # Why a finding that refuses no phase does not: by id, the words said.
        aside: dict[int, str] = {}
        for type_, phase in PHASE_OF_TYPE.items():
            entries = self.stack.entries(type_)
            concerned = [f for f in judged if any(line.type == type_ for line in f.lines)]
            dispatch = functools.partial(self.dispatch, type_)
            verdict = dispatch(concerned)
            unknown = [line for line, _ in walk(entries) if self.outcome(line, phase) is None]
            unknown = [line for line in unknown if not any(line in f.lines for f in concerned)]
            deciding = [
                line
                for line in unknown
                if bool(dispatch(concerned, flipped=line).code) != bool(verdict.code)
            ]
            if (
                unknown
                and not deciding
                and bool(dispatch(concerned, _DENY_CODES[type_]).code) != bool(verdict.code)
            ):
                deciding = unknown
            if deciding:
                self.phases[phase] = NOT_CERTAIN
                self.undecided[phase] = list(deciding)
                for finding in self.by_severity(NOT_CHECKED):
                    if any(line in deciding for line in finding.lines):
                        finding.cause += f" (it decides {phase})"
                        deciding = [line for line in deciding if line not in finding.lines]
                if deciding:
                    names = ", ".join(sorted({line.name or "?" for line in deciding}))
                    self.not_checked(
                        f"whether {phase} succeeds: it depends on {names}, which the doctor "
                        "does not model for this user",
                        deciding,
                    )
                for finding in concerned:
                    aside[id(finding)] = (
                        f"; whether {phase} refuses is not certain (see Not checked)"
                    )
                continue
            self.phases[phase] = "refuses" if verdict.code else "passes"
            if not verdict.code:
                continue
            self.codes[phase] = verdict.code
            base = dispatch(())
            responsible = [f for f in concerned if verdict.culprit in f.lines]
            if base.code:
                # The stack refuses even a user without findings: what refuses
                # first decides.
                named = [f for f in self.findings if f.code is not None and f not in judged]
                self._explain_base(type_, phase, base.code, base.culprit, named + responsible)
                for finding in concerned:
                    aside.setdefault(id(finding), "; the stack refuses earlier anyway")
            else:
                # Each finding the refusal needs, and each that alone would refuse.
                others = [[g for g in concerned if g is not f] for f in concerned]
                needed = [not dispatch(rest).code for rest in others]
                responsible += [f for f, need in zip(concerned, needed, strict=True) if need]
                responsible += [f for f in concerned if dispatch([f]).code]
            for finding in responsible:
                if phase not in finding.refuses:
                    finding.refuses.append(phase)
        for finding in judged:
            if finding.refuses:
                finding.severity = ERROR
            elif finding.severity == ERROR:
                finding.severity = WARNING
                finding.cause += aside.get(
                    id(finding), "; the stack goes on without this module here"
                )
        for finding in self.findings:
            judged_by_base = finding.kind in ("missing-module", "syntax")
            if finding.severity == ERROR and judged_by_base and not finding.refuses:
                finding.severity = WARNING
                finding.cause += "; the stack goes on without this line"

    def _explain_base(
        self, type_: str, phase: str, code: int, culprit: Line | None, concerned: list[Finding]
    ) -> None:
        for finding in concerned:
            if culprit is not None and culprit in finding.lines:
                if phase not in finding.refuses:
                    finding.refuses.append(phase)
                return
        stack = self.stack
        where = f" at {culprit.where} ({culprit.describe()})" if culprit is not None else ""
        if not stack.entries(type_):
            cause = f"the stack has no {type_} line, so {phase} always fails"
            remedy = f"add {type_} lines to {stack.service_file or stack.looked_for[0]}"
        elif stack.uses_other(type_) and stack.service_file is None:
            for finding in self.findings:
                if finding.kind == "other-fallback":
                    finding.severity = ERROR
                    if phase not in finding.refuses:
                        finding.refuses.append(phase)
                    if finding.code is None:
                        finding.code = code
                    if culprit is not None and culprit not in finding.lines:
                        finding.lines.append(culprit)
                    return
            cause = f"'other' refuses {phase}{where}"
            remedy = f"create {stack.looked_for[0]}"
        else:
            cause = f"the {type_} stack refuses every user{where}"
            remedy = "a stack that ends in pam_deny with nothing to skip it refuses by design"
        self.add(
            ERROR,
            "stack-refuses",
            cause,
            remedy,
            lines=[] if culprit is None else [culprit],
            code=code,
            refuses=[phase],
        )

    def order(self) -> None:
        positions: dict[int, int] = {}
        for index, line in enumerate(self.stack.all_lines()):
            positions.setdefault(id(line), index)
        first_phase = {phase: i for i, phase in enumerate(["pam_start", *PHASE_OF_TYPE.values()])}

        def key(finding: Finding) -> tuple[int, int, int]:
            phase = min((first_phase.get(p, 9) for p in finding.refuses), default=9)
            line = finding.line
            position = -1 if line is None else positions.get(id(line), 10_000)
            return (_SEVERITY_RANK[finding.severity], phase, position)

        self.findings.sort(key=key)


def _date(days: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(days * 86400))


def _package_hint(line: Line) -> str | None:
    name = line.name or ""
    if name in ("pam_matrix", "pam_chatty", "pam_get_items", "pam_set_items"):
        return "apt-get install libpam-wrapper (pam_wrapper's modules need their absolute path)"
    if name == "pam_oath":
        return "apt-get install libpam-oath"
    if name == "pam_google_authenticator":
        return "apt-get install libpam-google-authenticator"
    if name in ("pam_systemd",):
        return "apt-get install libpam-systemd (or make the line '-session optional ...')"
    return None


def _faillock_settings(line: Line) -> dict[str, str] | str:
    """faillock.conf overridden by the line's options; a string says why not read."""
    settings: dict[str, str] = {}
    path = line.option("conf") or "/etc/security/faillock.conf"
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            for entry in file:
                entry = entry.split("#", 1)[0].strip()
                if not entry:
                    continue
                key, equals, value = entry.partition("=")
                settings[key.strip()] = value.strip() if equals else ""
    except FileNotFoundError:
        pass
    except OSError as error:
        return f"pam_faillock's settings: {path}: {error.strerror}"
    for argument in line.arguments:
        key, equals, value = argument.partition("=")
        settings[key] = value if equals else ""
    for key in ("deny", "fail_interval", "unlock_time", "root_unlock_time"):
        number = settings.get(key)
        if number is not None and number != "never" and not number.isdigit():
            return f"pam_faillock's {key}={number!r}"
    return settings


class _AccessRules:
    """pam_access's access.conf, evaluated for one user and origin where it can be."""

    def __init__(
        self,
        user: _User,
        rhost: str | None,
        tty: str | None,
        *,
        nodefgroup: bool,
        fieldsep: str,
        listsep: str,
    ) -> None:
        self.user = user
        self.rhost = rhost
        self.tty = tty
        self.nodefgroup = nodefgroup
        self.fieldsep = fieldsep
        self.listsep = listsep

    def evaluate(self, path: str) -> tuple[bool | None, str, str] | None:
        """(allowed or None when not checked, "file:line", why); None when no rule matches."""
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                entries = file.readlines()
        except FileNotFoundError:
            return None
        except OSError as error:
            return None, path, error.strerror or str(error)
        for number, entry in enumerate(entries, 1):
            text = entry.rstrip("\n")
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            fields = text.split(self.fieldsep, 2) if self.fieldsep else [text]
            where = f"{path}:{number}"
            if len(fields) != 3 or fields[0].strip() not in ("+", "-"):
                return None, where, f"a line pam_access does not read ({text.strip()!r})"
            permission, users, origins = (field.strip() for field in fields)
            user_match = self._list(users, self._user)
            if user_match is False:
                continue
            origin_match = self._list(origins, self._origin)
            if origin_match is False:
                continue
            if user_match is None or origin_match is None:
                return None, where, f"the rule {text.strip()!r} and all after it"
            return permission == "+", where, f"the rule {text.strip()!r}"
        return None

    def _tokens(self, text: str) -> list[str]:
        return [t for t in re.split("[" + re.escape(self.listsep) + "]+", text) if t]

    def _list(self, text: str, match: Callable[[str], bool | None]) -> bool | None:
        tokens = self._tokens(text)
        if "EXCEPT" in tokens:
            cut = tokens.index("EXCEPT")
            head, tail = tokens[:cut], " ".join(tokens[cut + 1 :])
        else:
            head, tail = tokens, ""
        found: bool | None = False
        for token in head:
            result = match(token)
            if result:
                found = True
                break
            if result is None:
                found = None
        if found and tail:
            excepted = self._list(tail.replace(" ", self.listsep[0]), match)
            if excepted is None:
                return None
            return not excepted
        return found

    def _user(self, token: str) -> bool | None:
        user = self.user
        if token.upper() == "ALL":
            return True
        if token.startswith("@") or "@" in token:
            return None  # netgroups and user@host: not checked
        if token.startswith("(") and token.endswith(")"):
            return token[1:-1] in user.groups
        if token.lower() == user.name.lower():
            return True
        return not self.nodefgroup and token in user.groups

    def _origin(self, token: str) -> bool | None:
        if token.upper() == "ALL":
            return True
        if token.upper() == "LOCAL":
            return not self.rhost
        if token.startswith("@"):
            return None
        if not self.rhost:
            if self.tty is None:
                return None
            tty = self.tty[5:] if self.tty.startswith("/dev/") else self.tty
            return token in (tty, self.tty)
        host = self.rhost
        if token.lower() == host.lower():
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if "/" in token:
            try:
                return address is not None and address in ipaddress.ip_network(token, strict=False)
            except ValueError:
                return None
        if token.startswith("."):
            return address is None and host.lower().endswith(token.lower())
        if token.endswith("."):
            return address is not None and host.startswith(token)
        if address is None:
            try:
                ipaddress.ip_address(token)
            except ValueError:
                return False
            return None  # a host name against an address rule: needs DNS, not checked
        return False


_NUMERIC = {
    "<": int.__lt__,
    "lt": int.__lt__,
    "<=": int.__le__,
    "le": int.__le__,
    "eq": int.__eq__,
    ">=": int.__ge__,
    "ge": int.__ge__,
    ">": int.__gt__,
    "gt": int.__gt__,
    "ne": int.__ne__,
}
_SUCCEED_IF_FLAGS = {"debug", "use_uid", "quiet", "quiet_fail", "quiet_success", "audit"}


def _succeed_if(line: Line, user: _User, doctor: _Doctor) -> tuple[int | None, str] | None:
    """(0 when every condition holds, the module's code for the first that does not,
    or None when not checked; the condition's text).

    For a user NSS does not know, conditions on the name are still evaluated;
    the first that needs the passwd entry fails with PAM_USER_UNKNOWN.
    """
    words = [w for w in line.arguments if w not in _SUCCEED_IF_FLAGS]
    if len(words) % 3 or not words:
        return None, f"cannot read the conditions {' '.join(words)!r}"
    entry = user.entry
    values = {"user": user.name, "service": libpam_service_name(doctor.service)}
    if entry is not None:
        values.update(
            uid=str(entry.pw_uid), gid=str(entry.pw_gid), shell=entry.pw_shell, home=entry.pw_dir
        )
    if doctor.tty is not None:
        values["tty"] = doctor.tty
    if doctor.rhost is not None:
        values["rhost"] = doctor.rhost
    unknown = None
    for index in range(0, len(words), 3):
        field, op, wanted = words[index : index + 3]
        text = f"'{field} {op} {wanted}'"
        value = values.get(field)
        if value is None and entry is None and field in ("uid", "gid", "shell", "home"):
            return int(ReturnCode.USER_UNKNOWN), f"{text} (NSS does not know the user)"
        if value is None:
            unknown = f"{text} (the {field} is not known here)"
            continue
        result: bool | None
        if op in _NUMERIC:
            try:
                result = _NUMERIC[op](int(value), int(wanted))
            except ValueError:
                result = None
        elif op == "=":
            result = value == wanted
        elif op == "!=":
            result = value != wanted
        elif op in ("in", "notin"):
            result = (value in wanted.split(":")) == (op == "in")
        elif op in ("ingroup", "notingroup") and field == "user" and entry is not None:
            member = any(g in user.groups for g in wanted.split(":"))
            result = member == (op == "ingroup")
        elif op in ("=~", "!~") and "\\" not in wanted:
            result = fnmatch.fnmatchcase(value, wanted) == (op == "=~")
        else:
            result = None
        if result is None:
            unknown = f"{text} (not evaluated by the doctor)"
        elif not result:
            return int(ReturnCode.AUTH_ERR), text
    if unknown is not None:
        return None, unknown
    return 0, ""


def _nologin_file(line: Line) -> str | None:
    """The file that makes pam_nologin refuse, if it exists."""
    given = line.option("file")
    candidates = [given] if given else ["/var/run/nologin", "/etc/nologin"]
    return next((path for path in candidates if os.path.exists(path)), None)


#: Modules that never look the user up: what they return does not depend on it.
_NO_USER_NEEDED = {"pam_permit", "pam_deny", "pam_rootok", "pam_env", "pam_group", "pam_faildelay"}
_NO_USER_NEEDED |= {"pam_warn", "pam_selinux"}


def _unknown_user_code(line: Line, user: _User, doctor: _Doctor) -> int | None:
    """What the line's module returns for a user NSS does not know (0: what it
    returns for anyone); None: not modelled."""
    name = line.name or ""
    if name == "pam_succeed_if":
        subject = _lookup(_name_of_uid(doctor.uid)) if line.flag("use_uid") else user
        result = _succeed_if(line, subject, doctor)
        return None if result is None else result[0]
    if name == "pam_nologin":
        present = _nologin_file(line) is not None
        return int(ReturnCode.USER_UNKNOWN if present else ReturnCode.IGNORE)
    if name == "pam_cap":
        return int(ReturnCode.IGNORE)
    if name == "pam_securetty" and doctor.tty is None:
        return int(ReturnCode.SERVICE_ERR)  # no tty: it fails before it looks the user up
    if name in _NO_USER_NEEDED:
        return 0  # as for anyone: outcome() says what it returns
    code = _UNKNOWN_USER_CODES.get(name, {}).get(line.type)
    return None if code is None else int(code)


# -- running the phases -----------------------------------------------------------


def _run_operations(
    report: Report,
    operations: Sequence[str],
    *,
    tty: str | None,
    rhost: str | None,
    stdin: IO[str] | None,
    stderr: IO[str],
) -> None:
    """Run the operations as ``pamphlet SERVICE USER OPS`` does; record each result."""
    from . import cli
    from .broker.errors import BrokerError
    from .errors import PamError

    parsed = [cli.parse_operation(text) for text in operations]
    terminal = cli.Terminal(stdin, stderr)
    # The report comes after the run: say first what the prompts below are for.
    stderr.write(
        f"pamphlet doctor: running {', '.join(operations)} for {report.user!r} "
        f"(service {report.service!r}); answers are read from standard input\n"
    )
    stderr.flush()
    # Through a broker, the broker's own confdir applies; --confdir only says
    # where the doctor reads the stack.
    where: dict[str, Any] = (
        {"confdir": report.confdir} if report.broker is None else {"broker": report.broker}
    )
    try:
        app = cli._CommandLineApp(report.service, report.user, terminal=terminal, **where)
    except PamError as error:
        report.runs.append(
            RunResult("pam_start", int(error.code), type(error).__name__, str(error))
        )
        return
    except BrokerError as refused:
        report.runs.append(RunResult("pam_start", -1, type(refused).__name__, str(refused)))
        return
    with app:
        if tty is not None:
            app.tty = tty
        if rhost is not None:
            app.rhost = rhost
        for operation in parsed:
            phase, _ = cli._PHASES[operation.name]
            try:
                phase(app, operation.flags)
            except PamError as error:
                unanswered = error.__cause__ if isinstance(error.__cause__, EOFError) else None
                text = error.strerror if unanswered is None else str(unanswered)
                name = type(error).__name__
                report.runs.append(
                    RunResult(operation.name, int(error.code), name, text, unanswered is None)
                )
                return
            except BrokerError as refused:
                report.runs.append(
                    RunResult(operation.name, -1, type(refused).__name__, str(refused))
                )
                return
            report.runs.append(RunResult(operation.name, 0))


def _attach_runs(report: Report) -> None:
    for run in report.runs:
        if run.code == 0 or not run.answered:
            continue
        seen = f"{run.operation} failed: {run.error} ({run.code})"
        type_ = TYPE_OF_OPERATION.get(run.operation)
        phase = PHASE_OF_TYPE.get(type_ or "", run.operation)
        candidates = [
            f
            for f in report.findings
            if f.severity in (ERROR, WARNING) and (phase in f.refuses or run.operation in f.refuses)
        ]
        matching = [f for f in candidates if f.code == run.code] or candidates
        for finding in matching[:1]:
            finding.seen.append(seen)


# -- the public face ------------------------------------------------------------------


def diagnose(
    service: str,
    user: str | None = None,
    *,
    confdir: str | None = None,
    broker: str | None = None,
    tty: str | None = None,
    rhost: str | None = None,
    run: Sequence[str] = (),
    stdin: IO[str] | None = None,
    stderr: IO[str] | None = None,
    password_known: bool = True,
) -> Report:
    """Say why ``service`` would refuse ``user``; see the module's documentation.

    The prediction assumes the user types the right password (and picks a
    new one the stack accepts); ``password_known=False`` predicts a wrong one.

    ``run`` names operations to run for real, as ``pamphlet SERVICE USER OPS``
    does (prompts go to ``stderr`` and read ``stdin``); each failure is attached
    to the findings that explain it. Without ``run`` nothing asks for a
    password and nothing changes.
    """
    doctor = _Doctor(service, user, confdir, broker, tty, rhost, password_known)
    doctor.check_stack()
    doctor.check_caller()
    doctor.check_container()
    doctor.check_broker()
    doctor.check_user()
    doctor.judge()
    doctor.order()
    caller = {
        "uid": doctor.uid,
        "euid": doctor.euid,
        "name": _name_of_uid(doctor.uid),
    }
    user_info = None
    if doctor.user is not None and doctor.user.entry is not None:
        entry = doctor.user.entry
        user_info = {
            "name": entry.pw_name,
            "uid": entry.pw_uid,
            "gid": entry.pw_gid,
            "groups": doctor.user.groups,
            "home": entry.pw_dir,
            "shell": entry.pw_shell,
        }
    report = Report(
        service,
        user,
        confdir,
        broker,
        caller,
        doctor.stack,
        user_info,
        doctor.findings,
        phases=doctor.phases,
        undecided=doctor.undecided,
        codes=doctor.codes,
    )
    if run:
        if user is None:
            raise ValueError("running operations needs a user")
        _run_operations(
            report,
            run,
            tty=tty,
            rhost=rhost,
            stdin=sys.stdin if stdin is None else stdin,
            stderr=sys.stderr if stderr is None else stderr,
        )
        _attach_runs(report)
    return report


def refusal_hint(
    error: BaseException, service: str, user: str | None = None, confdir: str | None = None
) -> str | None:
    """One sentence for a refusal (error 7 or 9) whose likely cause the doctor finds.

    Cheap enough for the failure path: it looks only at the effective uid and
    whether the service file exists, and runs nothing.
    """
    code = getattr(error, "code", None)
    if code not in (ReturnCode.AUTH_ERR, ReturnCode.AUTHINFO_UNAVAIL):
        return None
    paths = service_paths(libpam_service_name(service), confdir)
    if os.geteuid() != 0:
        reason = f"this process is not root (uid {os.geteuid()})"
    elif not any(os.path.exists(path) for path in paths):
        reason = f"{paths[0]} does not exist, so libpam used 'other'"
    else:
        return None
    command = ["pamphlet", "doctor", service, *([user] if user else ["USER"])]
    if confdir is not None:
        command += ["--confdir", confdir]
    return f"PAM refused while {reason}: `{shlex.join(command)}` says which module refuses and why."


# -- the broker's stacks ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StackWarning:
    """A module of a service the broker serves that trusts the caller, not the user's answer."""

    service: str
    line: Line
    reason: str

    def __str__(self) -> str:
        return f"{self.line.where}: service {self.service!r}: {self.line.describe()}: {self.reason}"


def _caller_trust(line: Line) -> str | None:
    name = line.name
    if name == "pam_rootok":
        return (
            "pam_rootok succeeds when the caller's real uid is 0, without asking the user anything"
        )
    if name == "pam_wheel" and line.flag("trust"):
        return (
            "pam_wheel with 'trust' lets a caller in the wheel group in without a password "
            "(it judges the caller's real uid)"
        )
    if name == "pam_succeed_if":
        words = [w for w in line.arguments if w not in _SUCCEED_IF_FLAGS]
        if line.flag("use_uid"):
            return "pam_succeed_if with use_uid judges the caller's uid, not the user's answer"
        if "uid" in words[0::3]:
            return "pam_succeed_if on uid decides by who the user is, not by the user's answer"
    return None


#: Modules that refuse or let through by facts about the login, asking nothing.
_ASKS_NOTHING = {
    "pam_permit",
    "pam_rootok",
    "pam_shells",
    "pam_nologin",
    "pam_faildelay",
    "pam_env",
    "pam_group",
    "pam_cap",
    "pam_securetty",
    "pam_access",
    "pam_faillock",
    "pam_succeed_if",
    "pam_time",
    "pam_listfile",
    "pam_warn",
    "pam_echo",
    "pam_motd",
    "pam_mail",
    "pam_lastlog",
    "pam_limits",
    "pam_keyinit",
    "pam_loginuid",
    "pam_selinux",
    "pam_systemd",
}


def _grants_alone(stack: Stack, permit: Line) -> bool:
    """Whether auth succeeds with every module that could check an answer failing."""

    def outcome(line: Line) -> int:
        # pam_rootok counts as failing: its own warning covers it.
        if line is permit or (line.name in _ASKS_NOTHING and line.name != "pam_rootok"):
            return 0
        return int(ReturnCode.AUTH_ERR)

    return simulate(stack.entries("auth"), outcome).code == 0


def broker_stack_warnings(
    services: Iterable[str], confdir: str | None = None
) -> list[StackWarning]:
    """Lines of these services' stacks that trust the caller rather than the user's answer.

    For ``pamphlet broker --check`` and the broker's start: a worker runs PAM
    for a peer, and these modules judge the process rather than the user.
    """
    warnings = []
    for service in sorted(set(services)):
        stack = read_stack(service, confdir)
        seen: set[tuple[str, int]] = set()
        for line in stack.all_lines():
            reason = _caller_trust(line)
            if line.name == "pam_permit" and line.type == "auth" and _grants_alone(stack, line):
                reason = (
                    "pam_permit in auth lets the user in even when every module that checks "
                    "an answer fails"
                )
            if reason is not None and (line.file, line.number) not in seen:
                seen.add((line.file, line.number))
                warnings.append(StackWarning(service, line, reason))
    return warnings


# -- the command ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from .cli import _Parser  # usage errors exit 2, as the rest of the command line

    parser = _Parser(
        prog="pamphlet doctor",
        description=(
            "Say why a PAM service will refuse a user: reads the stack as libpam does, "
            "looks at who is asking and at the user, and names the module, its file and "
            "line, the cause and a remedy. Nothing is run unless --run is given."
        ),
        epilog=(
            "Exit status: 0 when nothing predicts a refusal, 1 when a finding does (or an "
            "operation of --run failed), 2 for a bad command line."
        ),
    )
    parser.add_argument("service", help="the PAM service, e.g. login")
    parser.add_argument("user", nargs="?", help="the user to check")
    parser.add_argument(
        "--confdir",
        metavar="DIR",
        help="read service files from DIR (with --broker: the broker's --confdir)",
    )
    parser.add_argument("--broker", metavar="PATH", help="ask the pamphlet broker on PATH")
    parser.add_argument("--tty", help="the tty item a login would set (pam_securetty, pam_access)")
    parser.add_argument("--rhost", help="the remote host a login would set (pam_access)")
    parser.add_argument(
        "--run",
        nargs="+",
        metavar="OPERATION",
        default=[],
        help="also run these operations (as 'pamphlet SERVICE USER OPERATION...' does)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """``pamphlet doctor ...``; returns the exit status."""
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parser = _parser()
    arguments = parser.parse_args(argv)
    if arguments.confdir is not None and not os.path.isdir(arguments.confdir):
        parser.error(f"--confdir {arguments.confdir!r} is not a directory")
    if arguments.run and arguments.user is None:
        parser.error("--run needs a user")
    if arguments.run:
        from .cli import UsageError, parse_operation

        try:
            for text in arguments.run:
                parse_operation(text)
        except UsageError as error:
            parser.error(str(error))
    try:
        report = diagnose(
            arguments.service,
            arguments.user,
            confdir=arguments.confdir,
            broker=arguments.broker,
            tty=arguments.tty,
            rhost=arguments.rhost,
            run=arguments.run,
            stdin=stdin,
            stderr=stderr,
        )
    except KeyboardInterrupt:
        stderr.write("\npamphlet doctor: interrupted\n")
        return 130
    stdout.write(report.to_json() + "\n" if arguments.json else report.format())
    stdout.flush()
    return report.exit_status
