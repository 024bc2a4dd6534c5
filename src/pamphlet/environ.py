"""The PAM environment of a handle, as a MutableMapping like os.environ."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING

from . import _libpam
from .constants import ReturnCode

if TYPE_CHECKING:
    from .application import PamApplication

__all__ = ["PamEnvironment"]


class PamEnvironment(MutableMapping[str, str]):
    """``app.environ``: read and change the variables the PAM stack keeps.

    Modules such as pam_env put variables here; an application passes them to
    the session it starts. Each access asks libpam, so what a module changes
    shows at once.
    """

    __slots__ = ("_app",)

    def __init__(self, app: PamApplication) -> None:
        self._app = app

    def _name(self, name: str) -> bytes:
        if not isinstance(name, str):
            raise TypeError(f"PAM environment names are str, not {type(name).__name__}")
        raw = self._app._encode(name, "environment name")
        if not raw or b"=" in raw:
            raise ValueError(f"{name!r} is not a valid PAM environment name")
        return raw

    def __getitem__(self, name: str) -> str:
        with self._app._lock:
            value = _libpam.getenv(self._app._require_handle(), self._name(name))
        if value is None:
            raise KeyError(name)
        return self._app._decode(value)

    def __setitem__(self, name: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"PAM environment values are str, not {type(value).__name__}")
        entry = self._name(name) + b"=" + self._app._encode(value, "environment value")
        with self._app._lock:
            code = _libpam.pam_putenv(self._app._require_handle(), entry)
            self._app._check(code)

    def __delitem__(self, name: str) -> None:
        raw = self._name(name)
        with self._app._lock:
            code = _libpam.pam_putenv(self._app._require_handle(), raw)
            if code == ReturnCode.BAD_ITEM:
                raise KeyError(name)
            self._app._check(code)

    def _entries(self) -> list[tuple[str, str]]:
        with self._app._lock:
            handle = self._app._require_handle()
            entries = _libpam.getenvlist(handle)
            if entries is None:
                self._app._check(ReturnCode.BUF_ERR)
                return []
        decode = self._app._decode
        pairs = []
        for entry in entries:
            name, _, value = entry.partition(b"=")
            pairs.append((decode(name), decode(value)))
        return pairs

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, _ in self._entries()])

    def __len__(self) -> int:
        return len(self._entries())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self[name]
        except KeyError:
            return False
        return True

    def copy(self) -> dict[str, str]:
        """A plain dict of the environment as it is now (one libpam call)."""
        return dict(self._entries())

    def __repr__(self) -> str:
        return f"PamEnvironment({self.copy()!r})"
