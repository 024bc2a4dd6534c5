"""The PAM environment of a handle, as a MutableMapping like os.environ."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._transaction import Transaction

__all__ = ["PamEnvironment"]


class PamEnvironment(MutableMapping[str, str]):
    """``app.environ``: read and change the variables the PAM stack keeps.

    Modules such as pam_env put variables here; an application passes them to
    the session it starts. Each access asks libpam, so what a module changes
    shows at once.
    """

    __slots__ = ("_transaction",)

    def __init__(self, transaction: Transaction) -> None:
        self._transaction = transaction

    def _name(self, name: str) -> bytes:
        if not isinstance(name, str):
            raise TypeError(f"PAM environment names are str, not {type(name).__name__}")
        raw = self._transaction.encode(name, "environment name")
        if not raw or b"=" in raw:
            raise ValueError(f"{name!r} is not a valid PAM environment name")
        return raw

    def __getitem__(self, name: str) -> str:
        value = self._transaction.getenv(self._name(name))
        if value is None:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"PAM environment values are str, not {type(value).__name__}")
        raw_value = self._transaction.encode(value, "environment value")
        self._transaction.putenv(self._name(name) + b"=" + raw_value)

    def __delitem__(self, name: str) -> None:
        if not self._transaction.unsetenv(self._name(name)):
            raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, _ in self._transaction.environment()])

    def __len__(self) -> int:
        return len(self._transaction.environment())

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
        return dict(self._transaction.environment())

    def __repr__(self) -> str:
        return f"PamEnvironment({self.copy()!r})"
