"""Throwaway PAM services for tests: no root, no /etc/pam.d.

``TemporaryService`` writes a service file into a temporary directory that
``PamApplication(..., confdir=...)`` reads (libpam's ``pam_start_confdir``).
With ``users``, it also writes a passdb for pam_wrapper's ``pam_matrix``
module, which checks real passwords against it::

    with TemporaryService(users={"alice": "secret"}) as service:
        app = MyApp(service.name, "alice", confdir=service.confdir)
        app.authenticate()
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

__all__ = [
    "PamWrapperMissingError",
    "TemporaryService",
    "module_path",
    "pam_wrapper_module",
    "matrix_stack",
]

_T = TypeVar("_T")

PAM_TYPES = ("auth", "account", "password", "session")


class PamWrapperMissingError(FileNotFoundError):
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


class TemporaryService:
    """A PAM service file in a throwaway confdir, removed by :meth:`cleanup`.

    ``stack`` is the service file's text, or its lines. In it, ``{passdb}``
    stands for the pam_matrix password file and ``{pam_matrix}`` (or any
    ``{pam_wrapper_module_name}``) for the module's absolute path. Without a
    stack, a ``users`` mapping gives a pam_matrix service for all four types.
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
        self._users: dict[str, tuple[str, str]] = {}
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
        text = _expand(text, self.passdb)
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
    def __init__(self, passdb: str) -> None:
        super().__init__(passdb=passdb)

    def __missing__(self, key: str) -> str:
        if key.startswith("pam_"):
            return module_path(key)
        raise KeyError(key)


def _expand(text: str, passdb: str) -> str:
    return text.format_map(_ModuleNames(passdb))
