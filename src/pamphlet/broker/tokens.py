"""Resume tokens for detached transactions (docs/guide/protocol.md, "Detach and resume").

A token is ``ID.SECRET``: the id (64 random bits) finds the entry, the
secret (256 random bits) is compared in constant time. It is good for one
resume before its deadline. Used and expired ids are remembered (a bounded
number, oldest forgotten first) so that a replay is told apart from a token
that never was; an unknown id and a wrong secret get the same answer, so
neither can be probed.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import secrets
from typing import Generic, TypeVar

__all__ = ["Tokens", "Lookup", "RETIRED_TOKENS"]

#: Token ids remembered after their token was used or expired.
RETIRED_TOKENS = 4096

Holder = TypeVar("Holder")


@dataclasses.dataclass(eq=False)
class _Live(Generic[Holder]):
    holder: Holder
    secret: bytes
    deadline: float


@dataclasses.dataclass(frozen=True)
class Lookup(Generic[Holder]):
    """What a presented token names: its holder, or why it is refused (or both,
    for a live token past its deadline: the holder must then be expired)."""

    token_id: str | None
    holder: Holder | None
    refusal: str | None  # token-used, token-expired, token-invalid, or None


class Tokens(Generic[Holder]):
    """The live tokens, each naming the holder (a worker) that waits for it."""

    def __init__(self) -> None:
        self.live: dict[str, _Live[Holder]] = {}
        self.retired: collections.OrderedDict[str, tuple[bytes, str]] = collections.OrderedDict()

    def issue(self, holder: Holder, deadline: float) -> tuple[str, str]:
        """(token id, the whole token to hand to the client)."""
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        self.live[token_id] = _Live(holder, secret.encode("ascii"), deadline)
        return token_id, f"{token_id}.{secret}"

    def retire(self, token_id: str, reason: str) -> Holder | None:
        """The token is spent ("used") or dead ("expired"); its holder, if it was live."""
        entry = self.live.pop(token_id, None)
        if entry is None:
            return None
        self.retired[token_id] = (entry.secret, reason)
        while len(self.retired) > RETIRED_TOKENS:
            self.retired.popitem(last=False)
        return entry.holder

    def deadlines(self) -> list[float]:
        return [entry.deadline for entry in self.live.values()]

    def past(self, now: float) -> list[str]:
        """The ids of live tokens past their deadline."""
        return [token_id for token_id, entry in self.live.items() if entry.deadline <= now]

    def look_up(self, token: str, now: float) -> Lookup[Holder]:
        token_id, _, secret_text = token.partition(".")
        secret = secret_text.encode("ascii")
        entry = self.live.get(token_id)
        if entry is not None and hmac.compare_digest(entry.secret, secret):
            expired = entry.deadline <= now
            return Lookup(token_id, entry.holder, "token-expired" if expired else None)
        retired = self.retired.get(token_id)
        if retired is not None and hmac.compare_digest(retired[0], secret):
            kind = "token-used" if retired[1] == "used" else "token-expired"
            return Lookup(token_id, None, kind)
        return Lookup(None, None, "token-invalid")
