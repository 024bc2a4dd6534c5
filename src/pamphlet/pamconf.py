"""PAM stacks read as Linux-PAM 1.5 reads them (pam.conf(5)), without running them.

:func:`read_stack` returns the lines libpam will dispatch for a service,
type by type, each with the file and line it came from, its control's
actions, and the module file it resolves to. It follows libpam's own code
rather than the manual where the two differ, because the point is to say
what libpam will do:

- the service name is lowercased and cut to its last ``/`` component;
- ``/etc/pam.d/NAME``, then ``/usr/lib/pam.d/NAME``; under a confdir only
  ``CONFDIR/NAME``. The ``other`` file is read too, and a type that the
  service file has no line for is taken from ``other`` (so a missing file
  falls back to ``other`` type by type);
- relative ``include``, ``substack`` and Debian's ``@include`` read from
  ``/etc/pam.d`` (then ``/usr/lib/pam.d``) even under a confdir;
- lines are joined as libpam's ``_pam_assemble_line`` does: a ``#`` ends a
  line, a trailing ``\\`` continues it, and the buffer is 1024 bytes;
- a line libpam cannot use becomes a line that always fails (an unknown
  type fails ``auth``), a missing module fails its phase with
  PAM_MODULE_UNKNOWN, and a few faults make ``pam_start`` itself fail.

:func:`simulate` runs libpam's dispatch rules over a type's lines with
outcomes the caller predicts, to tell a failing module that refuses from
one the stack steps over.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
import struct
import sysconfig
from collections.abc import Callable, Iterator, Sequence

from .constants import ReturnCode

__all__ = [
    "TYPES",
    "PHASES_OF_TYPE",
    "Line",
    "Substack",
    "Problem",
    "Stack",
    "read_stack",
    "service_paths",
    "module_directory",
    "module_fault",
    "simulate",
    "walk",
    "Outcome",
]

TYPES = ("auth", "account", "password", "session")
#: The libpam calls each type's lines serve, and the symbol each needs.
PHASES_OF_TYPE: dict[str, tuple[tuple[str, str], ...]] = {
    "auth": (("authenticate", "pam_sm_authenticate"), ("setcred", "pam_sm_setcred")),
    "account": (("acct_mgmt", "pam_sm_acct_mgmt"),),
    "password": (("chauthtok", "pam_sm_chauthtok"),),
    "session": (("open_session", "pam_sm_open_session"), ("close_session", "pam_sm_close_session")),
}

PAM_D = ("/etc/pam.d", "/usr/lib/pam.d")
DEFAULT_SERVICE = "other"
BUF_SIZE = 1024  # libpam 1.5's line buffer
SUBSTACK_MAX_LEVEL = 16

# pam_tokens.h: the return names in code order, then "default"; the actions.
RETURN_NAMES = (
    *("success", "open_err", "symbol_err", "service_err", "system_err", "buf_err"),
    *("perm_denied", "auth_err", "cred_insufficient", "authinfo_unavail", "user_unknown"),
    *("maxtries", "new_authtok_reqd", "acct_expired", "session_err", "cred_unavail"),
    *("cred_expired", "cred_err", "no_module_data", "conv_err", "authtok_err"),
    *("authtok_recover_err", "authtok_lock_busy", "authtok_disable_aging", "try_again"),
    *("ignore", "abort", "authtok_expired", "module_unknown", "bad_item", "conv_again"),
    *("incomplete", "default"),
)
RETURN_VALUES = len(RETURN_NAMES) - 1
IGNORE, OK, DONE, BAD, DIE, RESET, UNDEF = 0, -1, -2, -3, -4, -5, -6
ACTION_NAMES = ("ignore", "ok", "done", "bad", "die", "reset")


@dataclasses.dataclass(frozen=True)
class Line:
    """One line of a stack as libpam keeps it."""

    file: str
    number: int  # the first physical line of the (possibly continued) line
    text: str
    type: str  # auth, account, password or session (a bad type counts as auth)
    control: str  # as written, brackets removed
    actions: tuple[int, ...]  # what each return code does (IGNORE, OK, ... or a jump)
    module: str | None  # as written
    path: str | None  # the file libpam will dlopen
    arguments: tuple[str, ...]
    silent: bool = False  # a "-type" line: libpam does not log a missing module
    must_fail: str | None = None  # why libpam makes this line always fail
    via: tuple[str, ...] = ()  # "file:line" of each include that led here
    other: bool = False  # read for the "other" service

    @property
    def where(self) -> str:
        return f"{self.file}:{self.number}"

    @property
    def name(self) -> str | None:
        """The module's name as libpam logs it: pam_unix for .../pam_unix.so."""
        if self.module is None:
            return None
        base = self.module.rsplit("/", 1)[-1]
        return base.rsplit(".", 1)[0] if "." in base else base

    def option(self, name: str) -> str | None:
        """The value of ``name=VALUE`` among the arguments (the last wins), or None."""
        found = None
        for argument in self.arguments:
            key, equals, value = argument.partition("=")
            if equals and key == name:
                found = value
        return found

    def flag(self, name: str) -> bool:
        return name in self.arguments

    def describe(self) -> str:
        control = (
            f"[{self.control}]" if " " in self.control or "=" in self.control else self.control
        )
        parts = [self.type, control, self.module or "(no module)", *self.arguments]
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Substack:
    """A ``substack`` line and the lines it stands for (one module to its parent)."""

    line: Line
    entries: tuple[Line | Substack, ...]


Entry = Line | Substack


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something in the files that libpam will not read as written."""

    file: str
    number: int | None
    message: str
    #: pam_start itself fails (PAM_ABORT), or libpam crashes: nothing runs.
    fatal: bool = False


@dataclasses.dataclass
class Stack:
    service: str  # the name libpam uses (lowercased, last path component)
    confdir: str | None
    looked_for: list[str]  # where the service file was looked for, in order
    service_file: str | None  # the file read, None when missing
    unreadable: str | None  # a service file that exists but cannot be opened
    other_file: str | None
    conf: dict[str, list[Entry]]
    other: dict[str, list[Entry]]
    problems: list[Problem]
    not_read: str | None = None  # a configuration the reader does not handle

    def entries(self, type_: str) -> list[Entry]:
        """What libpam dispatches for ``type_``: the service's lines, else other's."""
        return self.conf[type_] or self.other[type_]

    def uses_other(self, type_: str) -> bool:
        return not self.conf[type_] and bool(self.other[type_])

    @property
    def fatal(self) -> Problem | None:
        for problem in self.problems:
            if problem.fatal:
                return problem
        if self.service_file is None and self.other_file is None:
            return Problem(
                self.looked_for[0],
                None,
                "neither the service file nor an 'other' file exists: pam_start fails "
                "with PAM_ABORT",
                fatal=True,
            )
        return None

    def lines(self, type_: str) -> list[Line]:
        """Every module line of ``type_``, substacks flattened, in order."""
        return [line for line, _ in walk(self.entries(type_))]

    def all_lines(self) -> Iterator[Line]:
        for type_ in TYPES:
            yield from self.lines(type_)


def walk(entries: Sequence[Entry], depth: int = 0) -> Iterator[tuple[Line, int]]:
    """Each module line with its substack depth (substack lines themselves left out)."""
    for entry in entries:
        if isinstance(entry, Substack):
            yield from walk(entry.entries, depth + 1)
        else:
            yield entry, depth


# -- where the files are -----------------------------------------------------------


def _libpam_files() -> list[str]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    found: list[str] = []
    for base in ("/lib", "/usr/lib", "/lib64", "/usr/lib64"):
        for directory in filter(None, (os.path.join(base, multiarch) if multiarch else "", base)):
            path = os.path.join(directory, "libpam.so.0")
            if os.path.exists(path) and path not in found:
                found.append(path)
    found += [p for p in sorted(glob.glob("/usr/lib/*/libpam.so.0")) if p not in found]
    return found


@functools.lru_cache(maxsize=1)
def module_directory() -> str:
    """Where libpam looks for modules named without a path (its DEFAULT_MODULE_PATH).

    Read from the libpam of this system, which has it compiled in.
    """
    for path in _libpam_files():
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError:
            continue
        match = re.search(rb"\x00(/[A-Za-z0-9_.+/-]*/security/)\x00", data)
        if match:
            return os.fsdecode(match.group(1))
    multiarch = sysconfig.get_config_var("MULTIARCH")
    guess = f"/lib/{multiarch}/security/" if multiarch else "/lib/security/"
    return guess if os.path.isdir(guess) else "/lib/security/"


def libpam_service_name(service: str) -> str:
    """The name pam_start keeps: its last path component, lowercased."""
    return service.rsplit("/", 1)[-1].lower()


def service_paths(name: str, confdir: str | None) -> list[str]:
    """Where libpam looks for a service (or other) file, in order."""
    if name.startswith("/"):
        return [name]
    if confdir is not None:
        return [os.path.join(confdir, name)]
    return [os.path.join(directory, name) for directory in PAM_D]


def include_paths(name: str) -> list[str]:
    # libpam 1.5.2 opens includes without the confdir (PAM-FACTS: checked here).
    return service_paths(name, None)


def _open_first(paths: Sequence[str]) -> tuple[str | None, bytes | None, str | None]:
    """(path, contents, why an existing file could not be read)."""
    unreadable = None
    for path in paths:
        try:
            with open(path, "rb") as file:
                return path, file.read(), None
        except FileNotFoundError:
            continue
        except IsADirectoryError:
            return path, b"", None  # fopen succeeds on a directory; reading ends at once
        except OSError as error:
            if unreadable is None:
                unreadable = f"{path}: {error.strerror}"
    return None, None, unreadable


# -- reading lines as libpam does ---------------------------------------------------


def assemble(data: bytes) -> Iterator[tuple[int, bytes | None]]:
    """Lines as ``_pam_assemble_line`` gives them: (first line number, text).

    Text None means libpam's read fails here (a continuation that reaches the
    end of the file, or continued lines over the buffer): the whole file is
    an error. A physical line over the buffer is cut, its rest read as a line
    of its own, as fgets does.
    """
    position = 0
    newlines = 0
    while True:
        offset = 0  # bytes of the buffer that continued lines hold
        parts: list[bytes] = []
        first: int | None = None
        while True:
            room = BUF_SIZE - offset
            if room <= 1:
                yield (first or newlines + 1), None
                return
            if position >= len(data):
                if parts:
                    yield (first or newlines), None
                return
            limit = room - 1  # fgets stores at most size - 1 bytes
            newline = data.find(b"\n", position, position + limit)
            end = newline + 1 if newline != -1 else min(len(data), position + limit)
            chunk = data[position:end]
            line_number = newlines + 1
            position = end
            newlines += chunk.count(b"\n")
            lead = len(chunk) - len(chunk.lstrip(b" \n\t"))
            body = chunk[lead:]
            if not body or body.startswith(b"#"):
                continue  # nothing kept; the buffer does not move
            if first is None:
                first = line_number
            hash_at = body.find(b"#")
            if hash_at != -1:
                parts.append(chunk[: lead + hash_at])
                break
            trimmed = chunk.rstrip(b" \t\n")
            if trimmed.endswith(b"\\"):
                kept = trimmed[:-1] + b" "
                parts.append(kept)
                offset += len(kept)
                continue
            parts.append(chunk)
            break
        yield first, b"".join(parts)


class _Tokens:
    """``_pam_StrTok`` over one line: blanks split, ``[...]`` is one token."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.position: int | None = 0

    def next(self) -> str | None:
        if self.position is None:
            return None
        text, i = self.text, self.position
        while i < len(text) and text[i] in " \n\t":
            i += 1
        if i >= len(text):
            self.position = None
            return None
        if text[i] == "[":
            out = []
            j = i + 1
            while j < len(text) and text[j] != "]":
                if text[j] == "\\" and j + 1 < len(text) and text[j + 1] == "]":
                    j += 1
                out.append(text[j])
                j += 1
            token = "".join(out)
            end = j + 1 if j < len(text) else j
        else:
            j = i
            while j < len(text) and text[j] not in " \n\t":
                j += 1
            token = text[i:j]
            end = j + 1 if j < len(text) else j
        self.position = end if end < len(text) else None
        return token

    def rest(self) -> list[str]:
        values = []
        while (token := self.next()) is not None:
            values.append(token)
        return values


def parse_control(text: str) -> tuple[tuple[int, ...], str | None]:
    """A bracketed control's actions, as ``_pam_parse_control`` reads them.

    Returns (actions, error); on an error every code is ``bad``, as in libpam.
    """
    actions = [UNDEF] * RETURN_VALUES
    tok = text
    error = None
    while tok:
        tok = tok.lstrip()
        if not tok:
            break
        for ret, name in enumerate(RETURN_NAMES):  # noqa: B007 - ret is used after the loop
            if tok.startswith(name):
                break
        else:
            error = f"expecting a return value at {tok!r}"
            break
        tok = tok[len(name) :]
        if not tok:
            error = f"expecting a return value at {name!r}"
            break
        tok = tok.lstrip()
        if not tok.startswith("="):
            error = f"expecting '=' after {name!r}"
            break
        tok = tok[1:].lstrip()
        if not tok:
            error = f"expecting an action after {name}="
            break
        for index, action_name in enumerate(ACTION_NAMES):
            if tok.startswith(action_name):
                action = -index
                tok = tok[len(action_name) :]
                break
        else:
            digits = re.match(r"[0-9]+", tok)
            if digits is None:
                error = f"expecting an action or a jump number at {tok!r}"
                break
            action = int(digits.group())
            tok = tok[digits.end() :]
            if action == 0:
                error = "a jump of 0 (use 'ignore')"
                break
        if ret == RETURN_VALUES:
            actions = [action if a == UNDEF else a for a in actions]
        else:
            actions[ret] = action
    if error is not None:
        return tuple([BAD] * RETURN_VALUES), error
    return tuple(BAD if a == UNDEF else a for a in actions), None


def _keyword_actions(control: str) -> tuple[int, ...] | None:
    key = control.lower()
    actions = [UNDEF] * RETURN_VALUES
    if key in ("required", "requisite"):
        actions[0] = actions[ReturnCode.NEW_AUTHTOK_REQD] = OK
        actions[ReturnCode.IGNORE] = IGNORE
        default = BAD if key == "required" else DIE
    elif key == "optional":
        actions[0] = actions[ReturnCode.NEW_AUTHTOK_REQD] = OK
        default = IGNORE
    elif key == "sufficient":
        actions[0] = actions[ReturnCode.NEW_AUTHTOK_REQD] = DONE
        default = IGNORE
    else:
        return None
    return tuple(default if a == UNDEF else a for a in actions)


# -- reading files ------------------------------------------------------------------


class _Reader:
    def __init__(self, confdir: str | None) -> None:
        self.confdir = confdir
        self.problems: list[Problem] = []
        self.module_dir = module_directory()

    def resolve(self, module: str) -> str:
        return module if module.startswith("/") else self.module_dir + module

    def load(
        self,
        path: str,
        data: bytes,
        requested: str | None,
        via: tuple[str, ...],
        level: int,
        chain: tuple[str, ...],
        other: bool,
    ) -> tuple[dict[str, list[Entry]], bool]:
        """The entries of one file by type, and whether libpam reads it without error."""
        result: dict[str, list[Entry]] = {t: [] for t in TYPES}
        for number, raw in assemble(data):
            if raw is None:
                self.problems.append(
                    Problem(
                        path,
                        number,
                        "libpam cannot read past this line (a continuation '\\' that reaches "
                        f"the end of the file, or a line over {BUF_SIZE} bytes): the whole file "
                        "is an error",
                        fatal=not via,
                    )
                )
                return result, False
            text = raw.decode("utf-8", "surrogateescape")
            ok = self._line(path, number, text, requested, via, level, chain, other, result)
            if not ok:
                return result, False
        return result, True

    def _line(
        self,
        path: str,
        number: int,
        text: str,
        requested: str | None,
        via: tuple[str, ...],
        level: int,
        chain: tuple[str, ...],
        other: bool,
        result: dict[str, list[Entry]],
    ) -> bool:
        tokens = _Tokens(text)
        where = f"{path}:{number}"

        def make(
            control: str,
            actions: tuple[int, ...],
            module: str | None,
            resolved: str | None,
            arguments: tuple[str, ...],
            must_fail: str | None,
        ) -> Line:
            assert type_ is not None
            return Line(
                path,
                number,
                text,
                type_,
                control,
                actions,
                module,
                resolved,
                arguments,
                silent,
                must_fail,
                via,
                other,
            )

        type_token = tokens.next()
        must_fail = None
        silent = False
        at_include = False
        type_: str | None
        if type_token is None:  # cannot happen after assemble, kept for symmetry with libpam
            return True
        word = type_token
        if word.startswith("-"):
            silent = True
            word = word[1:]
        if word.lower() in TYPES:
            type_ = word.lower()
        elif word.lower() == "@include":  # Debian's patch: every type of the file
            at_include = True
            type_ = requested
        else:
            type_ = requested or "auth"
            must_fail = f"unknown type {type_token!r}: libpam makes it an {type_} line that fails"
        if requested is not None and type_ != requested:
            return True
        if at_include:
            target = tokens.next()
            if target is None:
                self.problems.append(
                    Problem(
                        path,
                        number,
                        "@include names no file: libpam 1.5.2 crashes the application "
                        "(seen: a segmentation fault)",
                        fatal=True,
                    )
                )
                return False
            included, ok = self._include(
                target, type_, (*via, where), level, chain, other, path, number
            )
            if ok:
                for key, entries in included.items():
                    result[key].extend(entries)
                return True
            if type_ is None:
                # At the top, libpam adds a handler of no type, which fails the whole file.
                self.problems.append(
                    Problem(
                        path,
                        number,
                        f"@include {target}: the file cannot be read, so pam_start fails "
                        "with PAM_ABORT",
                        fatal=not via,
                    )
                )
                return False
            must_fail = f"@include {target} cannot be read"
            line = make("", (BAD,) * RETURN_VALUES, None, None, (), must_fail)
            result[type_].append(line)
            return True
        assert type_ is not None
        control = tokens.next()
        include = substack = False
        if control is None:
            actions: tuple[int, ...] = (BAD,) * RETURN_VALUES
            must_fail = must_fail or "no control (required, sufficient, ...) on the line"
            control = ""
        elif control.lower() == "include":
            include = True
            actions = (BAD,) * RETURN_VALUES
        elif control.lower() == "substack":
            include = substack = True
            actions = (BAD,) * RETURN_VALUES
        else:
            keyword = _keyword_actions(control)
            if keyword is not None:
                actions = keyword
            else:
                actions, error = parse_control(control)
                if error is not None:
                    # The module still runs, but every result counts as a failure.
                    must_fail = must_fail or f"bad control [{control}]: {error}"
        module = tokens.next()
        if include:
            if module is None:
                must_fail = must_fail or f"{control} names no file"
            else:
                included, ok = self._include(
                    module, type_, (*via, where), level + int(substack), chain, other, path, number
                )
                if ok:  # libpam drops a bad type's failure once the include reads
                    if substack:
                        head = make(control, (BAD,) * RETURN_VALUES, None, module, (), None)
                        result[type_].append(Substack(head, tuple(included[type_])))
                    else:
                        result[type_].extend(included[type_])
                    return True
                must_fail = must_fail or f"{control} {module}: the file cannot be read"
            line = make(control, (BAD,) * RETURN_VALUES, None, None, (), must_fail)
            result[type_].append(line)
            return True
        if module is None:
            must_fail = must_fail or "no module named on the line"
        arguments = tuple(tokens.rest())
        resolved = None if module is None or must_fail else self.resolve(module)
        result[type_].append(make(control, actions, module, resolved, arguments, must_fail))
        return True

    def _include(
        self,
        name: str,
        type_: str | None,
        via: tuple[str, ...],
        level: int,
        chain: tuple[str, ...],
        other: bool,
        path: str,
        number: int,
    ) -> tuple[dict[str, list[Entry]], bool]:
        empty: dict[str, list[Entry]] = {t: [] for t in TYPES}
        if level >= SUBSTACK_MAX_LEVEL:
            self.problems.append(
                Problem(
                    path, number, f"substacks nest deeper than {SUBSTACK_MAX_LEVEL}: the line fails"
                )
            )
            return empty, False
        paths = include_paths(name)
        found, data, unreadable = _open_first(paths)
        if found is None or data is None:
            why = unreadable or f"no such file ({' or '.join(paths)})"
            self.problems.append(Problem(path, number, f"include {name!r}: {why}"))
            return empty, False
        key = os.path.realpath(found)
        if key in chain:
            self.problems.append(
                Problem(
                    path,
                    number,
                    f"{found} includes itself (through {' -> '.join(via)}): libpam 1.5.2 "
                    "recurses without end and crashes the application",
                    fatal=True,
                )
            )
            return empty, False
        return self.load(found, data, type_, via, level, (*chain, key), other)


def read_stack(service: str, confdir: str | None = None) -> Stack:
    """The stack libpam will build for ``service`` (optionally under ``confdir``)."""
    name = libpam_service_name(service)
    looked_for = service_paths(name, confdir)
    reader = _Reader(confdir)
    not_read = None
    if confdir is None and not any(os.path.isdir(d) for d in PAM_D):
        not_read = "/etc/pam.conf (no /etc/pam.d): the doctor reads only /etc/pam.d files"
    service_file, data, unreadable = _open_first(looked_for)
    conf: dict[str, list[Entry]] = {t: [] for t in TYPES}
    other: dict[str, list[Entry]] = {t: [] for t in TYPES}
    other_file = None
    ok = True
    is_other = name == DEFAULT_SERVICE
    if service_file is not None and data is not None:
        key = os.path.realpath(service_file)
        conf, ok = reader.load(service_file, data, None, (), 0, (key,), is_other)
    if ok:
        other_path, other_data, _ = _open_first(service_paths(DEFAULT_SERVICE, confdir))
        if other_path is not None and other_data is not None:
            other_file = other_path
            key = os.path.realpath(other_path)
            other, _ = reader.load(other_path, other_data, None, (), 0, (key,), True)
    if is_other:
        other, conf = conf, {t: [] for t in TYPES}
    stack = Stack(
        name,
        confdir,
        looked_for,
        service_file,
        unreadable,
        other_file,
        conf,
        other,
        reader.problems,
        not_read,
    )
    if unreadable is not None and service_file is None:
        stack.problems.append(
            Problem(
                looked_for[0],
                None,
                f"{unreadable}: libpam cannot open it and falls back to 'other' as if it "
                "were missing",
            )
        )
    return stack


# -- module files -------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _exported(path: str, mtime: float) -> frozenset[str] | None:
    """The defined dynamic symbols of an ELF shared object, or None if it is not one."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or len(data) < 64:
        return None
    wide = data[4] == 2
    endian = "<" if data[5] == 1 else ">"
    try:
        if wide:
            (shoff,) = struct.unpack_from(endian + "Q", data, 0x28)
            shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x3A)
        else:
            (shoff,) = struct.unpack_from(endian + "I", data, 0x20)
            shentsize, shnum = struct.unpack_from(endian + "HH", data, 0x2E)
        sections = []
        for index in range(shnum):
            base = shoff + index * shentsize
            if wide:
                _, kind, _, _, offset, size, link, _, _, entsize = struct.unpack_from(
                    endian + "IIQQQQIIQQ", data, base
                )
            else:
                _, kind, _, _, offset, size, link, _, _, entsize = struct.unpack_from(
                    endian + "IIIIIIIIII", data, base
                )
            sections.append((kind, offset, size, link, entsize))
        names: set[str] = set()
        for kind, offset, size, link, entsize in sections:
            if kind != 11 or not entsize:  # SHT_DYNSYM
                continue
            strings_offset = sections[link][1]
            for at in range(offset, offset + size, entsize):
                if wide:
                    name_at, _, _, shndx = struct.unpack_from(endian + "IBBH", data, at)
                else:
                    (name_at,) = struct.unpack_from(endian + "I", data, at)
                    (shndx,) = struct.unpack_from(endian + "H", data, at + 14)
                if shndx == 0 or name_at == 0:
                    continue  # undefined: imported, not exported
                start = strings_offset + name_at
                names.add(data[start : data.index(b"\x00", start)].decode("ascii", "replace"))
        return frozenset(names)
    except (struct.error, IndexError, ValueError):
        return None


def module_fault(line: Line, phase: str | None = None) -> str | None:
    """Why libpam cannot call this line's module (for ``phase``), or None.

    A module that cannot be loaded, or lacks the function of its phase,
    makes that phase's call return PAM_MODULE_UNKNOWN.
    """
    if line.path is None:
        return None
    if "$ISA" in line.path:
        return None  # libpam substitutes its own ISA directory: not checked
    try:
        status = os.stat(line.path)
    except FileNotFoundError:
        where = (
            ""
            if line.module and line.module.startswith("/")
            else f" (libpam looks in {module_directory()})"
        )
        hint = (
            " (the line ends in a carriage return: a file with Windows line ends?)"
            if line.path.endswith("\r")
            else ""
        )
        return f"{line.path} does not exist{where}{hint}"
    except OSError as error:
        return f"{line.path}: {error.strerror}"
    if not os.path.isfile(line.path):
        return f"{line.path} is not a file"
    symbols = _exported(line.path, status.st_mtime)
    if symbols is None:
        if not os.access(line.path, os.R_OK):
            return None  # not readable here; libpam's dlopen may still work: not checked
        return f"{line.path} is not a shared library libpam can load"
    needed = [
        symbol
        for name, symbol in PHASES_OF_TYPE.get(line.type, ())
        if phase is None or name == phase
    ]
    if needed and phase is None:
        needed = needed[:1]
    missing = [symbol for symbol in needed if symbol not in symbols]
    if missing:
        return f"{line.name} has no {missing[0]}: it cannot serve a {line.type} line"
    return None


# -- what libpam's dispatcher does with outcomes -------------------------------------

#: A module's predicted return code for one line.
Outcome = Callable[[Line], int]

_UNDEF, _POSITIVE, _NEGATIVE = 0, 1, 2
MUST_FAIL_CODE = int(ReturnCode.PERM_DENIED)


@dataclasses.dataclass(frozen=True)
class Verdict:
    code: int
    #: The line whose result decided a failure (the one that set the negative
    #: impression), or None.
    culprit: Line | None


@dataclasses.dataclass
class _State:
    status: int = MUST_FAIL_CODE
    impression: int = _UNDEF
    culprit: Line | None = None


def simulate(entries: Sequence[Entry], outcome: Outcome) -> Verdict:
    """The code libpam's dispatcher returns for these lines and predicted outcomes.

    A substack shares the stack's state: its ``done`` and ``die`` end only the
    substack, ``reset`` goes back to the state at its start, and a jump in
    the parent counts it as one module (pam.conf(5)).
    """
    state = _State()
    _dispatch(entries, outcome, state, _State())
    code = state.status
    if code == 0 and state.impression != _POSITIVE:
        code = MUST_FAIL_CODE
    return Verdict(code, state.culprit if code != 0 else None)


def _dispatch(entries: Sequence[Entry], outcome: Outcome, state: _State, saved: _State) -> None:
    index = 0
    while index < len(entries):
        entry = entries[index]
        index += 1
        if isinstance(entry, Substack):
            _dispatch(entry.entries, outcome, state, dataclasses.replace(state))
            continue
        retval = MUST_FAIL_CODE if entry.must_fail else outcome(entry)
        action = entry.actions[retval] if 0 <= retval < RETURN_VALUES else BAD
        if action == RESET:
            state.status, state.impression, state.culprit = (
                saved.status,
                saved.impression,
                saved.culprit,
            )
        elif action in (OK, DONE):
            undecided = state.impression == _UNDEF
            if (undecided or (state.impression == _POSITIVE and state.status == 0)) and (
                retval != ReturnCode.IGNORE
            ):
                state.impression, state.status = _POSITIVE, retval
            if state.impression != _NEGATIVE and action == DONE:
                return
        elif action in (BAD, DIE):
            if state.impression != _NEGATIVE:
                state.impression = _NEGATIVE
                state.status = MUST_FAIL_CODE if retval == 0 else retval
                state.culprit = entry
            if action == DIE:
                return
        elif action > 0:
            if action > len(entries) - index:  # libpam: "bad jump in stack"
                state.impression, state.status, state.culprit = _NEGATIVE, MUST_FAIL_CODE, entry
                return
            index += action
