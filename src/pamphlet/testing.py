"""Throwaway PAM services for tests: no root, no /etc/pam.d.

``TemporaryService`` writes a service file into a temporary directory that
``PamApplication(..., confdir=...)`` reads (libpam's ``pam_start_confdir``).
With ``users``, it also writes a passdb for pam_wrapper's ``pam_matrix``
module, which checks real passwords against it::

    with TemporaryService(users={"alice": "secret"}) as service:
        app = MyApp(service.name, "alice", confdir=service.confdir)
        app.authenticate()

Ready-made stacks, by name: :meth:`TemporaryService.password_only`,
:meth:`TemporaryService.password_and_totp` (pam_oath, with
:meth:`TemporaryService.totp_code` for the current code),
:meth:`TemporaryService.expired_password` and
:meth:`TemporaryService.info_only`.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import hmac
import os
import secrets as _secrets
import shutil
import struct
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

__all__ = [
    "PamModuleMissingError",
    "PamWrapperMissingError",
    "TemporaryService",
    "module_path",
    "pam_wrapper_module",
    "matrix_stack",
    "hotp",
    "totp",
]

_T = TypeVar("_T")

PAM_TYPES = ("auth", "account", "password", "session")


class PamModuleMissingError(FileNotFoundError):
    """A PAM module a ready-made stack needs is not installed; the message
    names the package that has it."""


class PamWrapperMissingError(PamModuleMissingError):
    """pam_wrapper's test modules (pam_matrix, ...) are not installed."""


def _library_dirs() -> list[str]:
    dirs = []
    multiarch = sysconfig.get_config_var("MULTIARCH")
    for base in ("/usr/lib", "/lib", "/usr/lib64", "/lib64"):
        if multiarch:
            dirs.append(os.path.join(base, multiarch))
        dirs.append(base)
    dirs.extend(sorted(glob.glob("/usr/lib/*-linux-gnu*")))
    return dirs


def pam_wrapper_module(name: str) -> str:
    """The absolute path of one of pam_wrapper's modules, e.g. ``pam_matrix``."""
    filename = name if name.endswith(".so") else f"{name}.so"
    for directory in _library_dirs():
        path = os.path.join(directory, "pam_wrapper", filename)
        if os.path.exists(path):
            return path
    raise PamWrapperMissingError(
        f"pam_wrapper's {filename} was not found; on Debian and Ubuntu install "
        "it with: apt-get install libpam-wrapper"
    )


def module_path(name: str) -> str:
    """The absolute path of a PAM module: Linux-PAM's own, or pam_wrapper's."""
    filename = name if name.endswith(".so") else f"{name}.so"
    for directory in _library_dirs():
        path = os.path.join(directory, "security", filename)
        if os.path.exists(path):
            return path
    return pam_wrapper_module(filename)


def matrix_stack(passdb: str, *, options: str = "") -> list[str]:
    """A service using pam_matrix for all four module types."""
    matrix = pam_wrapper_module("pam_matrix")
    extra = f" {options}" if options else ""
    return [f"{kind} required {matrix} passdb={passdb}{extra}" for kind in PAM_TYPES]


def _key(secret: bytes | str) -> bytes:
    """A raw key: bytes as they are, a str as base32 (what authenticator apps show)."""
    if isinstance(secret, bytes):
        return secret
    text = "".join(secret.split()).upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


def hotp(secret: bytes | str, counter: int, *, digits: int = 6) -> str:
    """RFC 4226's one-time code for ``counter``: HMAC-SHA1, dynamically truncated.

    ``secret`` is the raw key, or a str in base32 (as authenticator apps and
    ``oathtool --base32`` take it).
    """
    if not 6 <= digits <= 8:
        raise ValueError(f"digits must be 6, 7 or 8, not {digits}")
    mac = hmac.new(_key(secret), struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    (value,) = struct.unpack(">I", mac[offset : offset + 4])
    return str((value & 0x7FFFFFFF) % 10**digits).zfill(digits)


def totp(secret: bytes | str, at: float | None = None, *, digits: int = 6, step: int = 30) -> str:
    """RFC 6238's time-based code at ``at`` (seconds since the epoch; now by default)."""
    moment = time.time() if at is None else at
    return hotp(secret, int(moment // step), digits=digits)


def _installed_module(name: str, package: str) -> str:
    """The absolute path of a module from a Debian package other than libpam-wrapper."""
    try:
        return module_path(name)
    except PamWrapperMissingError:
        raise PamModuleMissingError(
            f"the PAM module {name}.so was not found; on Debian and Ubuntu install "
            f"it with: apt-get install {package}"
        ) from None


def _check_field(value: str, what: str, forbidden: str = "") -> None:
    if not value or any(c.isspace() for c in value) or any(c in value for c in forbidden):
        raise ValueError(f"{what} {value!r} cannot be empty or hold whitespace or {forbidden!r}")


class TemporaryService:
    """A PAM service file in a throwaway confdir, removed by :meth:`cleanup`.

    ``stack`` is the service file's text, or its lines. In it, ``{passdb}``
    stands for the pam_matrix password file, ``{oath_usersfile}`` for
    pam_oath's users file (see :meth:`add_otp_user`) and ``{pam_matrix}``
    (or any ``{pam_module_name}``) for the module's absolute path. Without a
    stack, a ``users`` mapping gives a pam_matrix service for all four types.

    Ready-made stacks by name: :meth:`password_only`,
    :meth:`password_and_totp`, :meth:`expired_password`, :meth:`info_only`.
    """

    def __init__(
        self,
        stack: str | Iterable[str] | None = None,
        *,
        users: Mapping[str, str] | None = None,
        name: str = "pamphlet-test",
        directory: str | None = None,
    ) -> None:
        self._owns_directory = directory is None
        self.confdir = directory or tempfile.mkdtemp(prefix="pamphlet-confdir-")
        self.name = name
        # pam_matrix rewrites the passdb through a temp file beside it, so it
        # lives in a folder of its own that stays writable.
        self.passdb = os.path.join(self.confdir, "passdb", "passdb")
        # pam_oath records each user's last code in its users file, rewriting
        # it through a new file in the same folder: a folder of its own too.
        self.oath_usersfile = os.path.join(self.confdir, "oath", "users.oath")
        self._users: dict[str, tuple[str, str]] = {}
        self._otp: dict[str, tuple[bytes, bool, int, int]] = {}
        try:
            os.makedirs(os.path.dirname(self.passdb), exist_ok=True)
            for user, password in (users or {}).items():
                self.add_user(user, password, write=False)
            self._write_passdb()
            if stack is None:
                stack = matrix_stack(self.passdb)
            self.add_service(name, stack)
        except BaseException:
            # A missing pam_wrapper or a bad user must not leave the folder behind.
            self.cleanup()
            raise

    # -- ready-made stacks ------------------------------------------------------

    @classmethod
    def password_only(
        cls,
        users: Mapping[str, str],
        *,
        verbose: bool = False,
        name: str = "pamphlet-test",
        directory: str | None = None,
    ) -> TemporaryService:
        """pam_matrix for all four types: one echo-off prompt, ``'Password: '``.

        A wrong password or an unknown user raises ``AuthenticationError``.
        ``verbose=True`` adds pam_matrix's info message ``'Authentication
        succeeded'`` (or error message ``'Authentication failed'``).
        """
        options = " verbose" if verbose else ""
        stack = [f"{kind} required {{pam_matrix}} passdb={{passdb}}{options}" for kind in PAM_TYPES]
        return cls(stack, users=users, name=name, directory=directory)

    @classmethod
    def password_and_totp(
        cls,
        users: Mapping[str, str],
        secrets: Mapping[str, bytes | str] | None = None,
        *,
        window: int = 3,
        digits: int = 6,
        name: str = "pamphlet-test",
        directory: str | None = None,
    ) -> TemporaryService:
        """A password (pam_matrix), then a time-based one-time code (pam_oath).

        Two echo-off prompts, ``'Password: '`` and ``"One-time password
        (OATH) for `USER': "``; both are required. ``secrets`` maps users to
        their TOTP keys (bytes, or base32 text); without it every user gets
        a random key. :meth:`totp_code` gives a user's current code. pam_oath
        accepts codes up to ``window`` steps of 30 s away, and refuses a code
        at or before the last one it accepted from that user (a replay).
        Needs Debian's ``libpam-oath``.
        """
        oath = _installed_module("pam_oath", "libpam-oath")
        if window < 0:
            raise ValueError("window cannot be negative")
        service = cls("", users=users, name=name, directory=directory)
        try:
            keys = dict.fromkeys(users, None) if secrets is None else dict(secrets)
            for user, secret in keys.items():
                service.add_otp_user(user, secret, digits=digits)
            service.add_service(
                name,
                [
                    "auth     required {pam_matrix} passdb={passdb}",
                    f"auth     required {oath} usersfile={{oath_usersfile}} window={window}",
                    "account  required {pam_matrix} passdb={passdb}",
                    "password required {pam_matrix} passdb={passdb}",
                    "session  required {pam_matrix} passdb={passdb}",
                ],
            )
        except BaseException:
            service.cleanup()
            raise
        return service

    @classmethod
    def expired_password(
        cls,
        users: Mapping[str, str],
        *,
        expired: Iterable[str] | None = None,
        name: str = "pamphlet-test",
        directory: str | None = None,
    ) -> TemporaryService:
        """The password is right, and account management says it has expired.

        ``account_management`` raises ``NewAuthTokenRequired`` for the users
        in ``expired`` (all users by default; pam_stress's ``expired``
        option); ``change_authtoken`` then changes the password through
        pam_matrix (``'Old password: '``, ``'New Password :'``, ``'Verify New
        Password :'``), which :meth:`password_of` shows. pam_stress keeps the
        account expired after the change.
        """
        lines = ["auth     required {pam_matrix} passdb={passdb}"]
        names = None if expired is None else list(expired)
        for user in names or ():
            _check_field(user, "the user name", ":")
        if names:
            # Anyone not named skips the pam_stress line.
            lines.append(
                "account  [success=1 default=ignore] pam_succeed_if.so quiet "
                f"user notin {':'.join(names)}"
            )
        if names is None or names:
            lines.append("account  required pam_stress.so expired")
        lines += [
            "account  required {pam_matrix} passdb={passdb}",
            "password required {pam_matrix} passdb={passdb}",
            "session  required {pam_matrix} passdb={passdb}",
        ]
        return cls(lines, users=users, name=name, directory=directory)

    @classmethod
    def info_only(
        cls, *messages: str, name: str = "pamphlet-test", directory: str | None = None
    ) -> TemporaryService:
        """Info messages (pam_echo), one per conversation call, and no prompt.

        Any user is let in, by every phase (pam_permit). Each message is sent
        as given, newlines included.
        """
        if not messages:
            raise ValueError("info_only needs at least one message")
        service = cls("", name=name, directory=directory)
        try:
            folder = os.path.join(service.confdir, "messages")
            os.makedirs(folder)
            lines = []
            for number, message in enumerate(messages):
                if not isinstance(message, str) or not message or "\0" in message:
                    raise ValueError(f"message {message!r} must be a non-empty str without NUL")
                path = os.path.join(folder, str(number))
                # pam_echo expands %u, %s, ...: a literal % is written %%.
                with open(path, "w", encoding="utf-8") as file:
                    file.write(message.replace("%", "%%"))
                lines.append(f"auth     optional pam_echo.so file={path}")
            lines += [f"{kind:<8} required pam_permit.so" for kind in PAM_TYPES]
            service.add_service(name, lines)
        except BaseException:
            service.cleanup()
            raise
        return service

    # -- one-time codes (pam_oath) -----------------------------------------------

    def add_otp_user(
        self,
        user: str,
        secret: bytes | str | None = None,
        *,
        hotp: bool = False,
        digits: int = 6,
        step: int = 30,
    ) -> bytes:
        """Give ``user`` a pam_oath key in ``{oath_usersfile}``; returns the key.

        Time-based (TOTP, ``step`` seconds) unless ``hotp=True`` (counter
        based, from 0). Without ``secret``, a random 20-byte key. A user who
        already has a key gets the new one; the others' lines are kept as
        pam_oath last wrote them.
        """
        _check_field(user, "the user name")
        if not 6 <= digits <= 8:
            raise ValueError(f"pam_oath takes codes of 6, 7 or 8 digits, not {digits}")
        if step <= 0:
            raise ValueError("step must be positive")
        key = _secrets.token_bytes(20) if secret is None else _key(secret)
        if not key:
            raise ValueError("the secret is empty")
        kind = f"HOTP/E/{digits}" if hotp else f"HOTP/T{step}/{digits}"
        os.makedirs(os.path.dirname(self.oath_usersfile), mode=0o700, exist_ok=True)
        lines = []
        with contextlib.suppress(FileNotFoundError):
            with open(self.oath_usersfile, encoding="utf-8") as file:
                lines = [line for line in file if line.split()[1:2] != [user]]
        lines.append(f"{kind}\t{user}\t-\t{key.hex()}\n")
        descriptor = os.open(self.oath_usersfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(descriptor, "w", encoding="utf-8") as file:
            file.writelines(lines)
        self._otp[user] = (key, hotp, digits, step)
        return key

    @property
    def otp_secrets(self) -> dict[str, bytes]:
        """Each pam_oath user's key."""
        return {user: key for user, (key, *_rest) in self._otp.items()}

    def totp_code(self, user: str, at: float | None = None) -> str:
        """``user``'s time-based code now (or at ``at``, seconds since the epoch).

        pam_oath refuses a code at or before the last one it accepted: for a
        second login within the same 30 s, ask for ``at=time.time() + 30``.
        """
        key, is_hotp, digits, step = self._otp_of(user)
        if is_hotp:
            raise ValueError(f"{user!r} has a counter-based (HOTP) key: use hotp_code")
        return totp(key, at, digits=digits, step=step)

    def hotp_code(self, user: str, counter: int) -> str:
        """``user``'s counter-based code number ``counter`` (pam_oath starts at 0)."""
        key, is_hotp, digits, _step = self._otp_of(user)
        if not is_hotp:
            raise ValueError(f"{user!r} has a time-based (TOTP) key: use totp_code")
        return hotp(key, counter, digits=digits)

    def _otp_of(self, user: str) -> tuple[bytes, bool, int, int]:
        try:
            return self._otp[user]
        except KeyError:
            raise KeyError(f"{user!r} has no one-time password key in this service") from None

    # -- the rest ------------------------------------------------------------------

    @property
    def service(self) -> str:
        """The service name to pass to PamApplication."""
        return self.name

    def path(self, service: str | None = None) -> str:
        """The service file's path."""
        return os.path.join(self.confdir, service or self.name)

    def add_service(self, name: str, stack: str | Iterable[str]) -> str:
        """Write another service into the same confdir; returns its name."""
        text = stack if isinstance(stack, str) else "\n".join(stack)
        text = _expand(text, self.passdb, self.oath_usersfile)
        with open(os.path.join(self.confdir, name), "w", encoding="utf-8") as file:
            file.write(text.rstrip("\n") + "\n")
        return name

    def add_user(
        self,
        user: str,
        password: str,
        service: str | None = None,
        *,
        write: bool = True,
    ) -> None:
        """Add (or replace) a pam_matrix user, allowed in one service (this one by
        default): pam_matrix reads only the first passdb line of each user."""
        for field in (user, password):
            if ":" in field or "\n" in field:
                raise ValueError("pam_matrix users and passwords cannot hold ':' or newlines")
        self._users[user] = (password, service or self.name)
        if write:
            self._write_passdb()

    def _write_passdb(self) -> None:
        lines = [
            f"{user}:{password}:{service}" for user, (password, service) in self._users.items()
        ]
        with open(self.passdb, "w", encoding="utf-8") as file:
            file.write("".join(line + "\n" for line in lines))

    def password_of(self, user: str) -> str | None:
        """The user's password as pam_matrix has it now (after a chauthtok)."""
        with open(self.passdb, encoding="utf-8") as file:
            for line in file:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 2 and fields[0] == user:
                    return fields[1]
        return None

    def app(self, cls: type[_T], user: str | None = None, **kwargs: Any) -> _T:
        """``cls(self.name, user, confdir=self.confdir, **kwargs)``."""
        kwargs.setdefault("confdir", self.confdir)
        return cls(self.name, user, **kwargs)  # type: ignore[call-arg]

    @contextlib.contextmanager
    def as_default(self) -> Iterator[TemporaryService]:
        """Make applications created without ``confdir`` read this confdir.

        For tests of code that creates ``PamApplication`` objects itself, with
        only a service name: inside the block, that name is looked up here
        instead of in /etc/pam.d.
        """
        from .application import PamApplication

        previous = PamApplication.default_confdir
        PamApplication.default_confdir = self.confdir
        try:
            yield self
        finally:
            PamApplication.default_confdir = previous

    def cleanup(self) -> None:
        if self._owns_directory:
            shutil.rmtree(self.confdir, ignore_errors=True)

    def __enter__(self) -> TemporaryService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class _ModuleNames(dict[str, str]):
    def __init__(self, passdb: str, oath_usersfile: str) -> None:
        super().__init__(passdb=passdb, oath_usersfile=oath_usersfile)

    def __missing__(self, key: str) -> str:
        if key.startswith("pam_"):
            return module_path(key)
        raise KeyError(key)


def _expand(text: str, passdb: str, oath_usersfile: str) -> str:
    return text.format_map(_ModuleNames(passdb, oath_usersfile))
