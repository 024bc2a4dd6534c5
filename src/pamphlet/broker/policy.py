"""The broker's policy: which peers may run which PAM services and phases.

A TOML file, read with the standard library's tomllib::

    [[allow]]
    users = ["www-data"]          # peer user names, and/or
    groups = ["webapps"]          # peer group names (the peer user's groups)
    services = ["webapp"]         # PAM services this peer may use
    phases = ["authenticate", "acct_mgmt", "chauthtok"]   # the default
    max_in_flight = 64            # transactions at once per peer uid of this rule
    max_in_flight_total = 256     # transactions at once for the rule as a whole
                                  # (default: 4 x max_in_flight)

    [throttle]                    # optional; these are the defaults
    window = 900                  # seconds a failure is remembered
    user_slow_after = 5           # failures per (peer uid, target user)
    user_refuse_after = 10
    rhost_slow_after = 10         # failures per (peer uid, PAM_RHOST): one client
    rhost_refuse_after = 30       # address of a peer that serves many
    peer_slow_after = 100         # failures per peer uid, all users together
    peer_refuse_after = 300
    delay = 1.0                   # seconds added per failure past *_slow_after
    max_delay = 10.0

    [limits]                      # optional; these are the defaults
    start_timeout = 10            # seconds for the first frame of a connection
    frame_timeout = 10            # seconds for any frame, once its first byte came
    conversation_timeout = 120    # seconds for the client to answer a conversation
    idle_timeout = 300            # seconds between requests (no open session)
    max_pending_per_peer = 32     # connections of one uid not yet started
    detach_timeout = 300          # seconds a detached transaction waits to be resumed (0: off)

Logins whose outcome is not known yet count against these limits as if they
had failed (:mod:`pamphlet.broker.throttle`). The peer's identity is the
kernel's (SO_PEERCRED), never the client's word.
"""

from __future__ import annotations

import dataclasses
import grp
import pwd
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "PolicyError",
    "Policy",
    "Rule",
    "Throttle",
    "Limits",
    "Peer",
    "PHASES",
    "DEFAULT_PHASES",
    "SETTABLE_ITEMS",
    "load",
    "parse",
]

PHASES = ("authenticate", "acct_mgmt", "chauthtok", "setcred", "open_session", "close_session")
DEFAULT_PHASES = ("authenticate", "acct_mgmt", "chauthtok")
#: item number -> name: the only items a client may set (PAM_USER, PAM_TTY,
#: PAM_RHOST, PAM_RUSER).
SETTABLE_ITEMS = {2: "user", 3: "tty", 4: "rhost", 8: "ruser"}


class PolicyError(ValueError):
    """The policy file cannot be used; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class Rule:
    index: int
    users: frozenset[str]
    groups: frozenset[str]
    services: frozenset[str]
    phases: frozenset[str]
    max_in_flight: int  # per peer uid
    max_in_flight_total: int  # the rule as a whole
    setenv: frozenset[str]
    require_authentication: bool

    def matches(self, peer: Peer) -> bool:
        return peer.user in self.users or not self.groups.isdisjoint(peer.groups)

    def allows_phase(self, phase: str) -> bool:
        if phase == "close_session":
            return "close_session" in self.phases or "open_session" in self.phases
        return phase in self.phases

    def describe(self) -> str:
        return f"[[allow]] rule {self.index + 1}"


@dataclasses.dataclass(frozen=True)
class Throttle:
    window: float = 900.0
    user_slow_after: int = 5
    user_refuse_after: int = 10
    rhost_slow_after: int = 10
    rhost_refuse_after: int = 30
    peer_slow_after: int = 100
    peer_refuse_after: int = 300
    delay: float = 1.0
    max_delay: float = 10.0


@dataclasses.dataclass(frozen=True)
class Limits:
    start_timeout: float = 10.0
    frame_timeout: float = 10.0
    conversation_timeout: float = 120.0
    idle_timeout: float = 300.0
    max_pending_per_peer: int = 32
    #: Seconds a detached transaction waits for its resume (0: no detaching).
    detach_timeout: float = 300.0


@dataclasses.dataclass(frozen=True)
class Peer:
    """Who is at the other end of a connection, as the kernel says."""

    pid: int
    uid: int
    gid: int
    user: str
    groups: frozenset[str]

    @classmethod
    def from_credentials(cls, pid: int, uid: int, gid: int) -> Peer:
        try:
            entry = pwd.getpwuid(uid)
            user, primary = entry.pw_name, entry.pw_gid
            gids = set(_grouplist(user, primary))
        except KeyError:
            user, gids = f"#{uid}", set()
        gids.add(gid)  # the peer's effective gid, from SO_PEERCRED
        names = set()
        for number in gids:
            try:
                names.add(grp.getgrgid(number).gr_name)
            except KeyError:
                names.add(f"#{number}")
        return cls(pid, uid, gid, user, frozenset(names))


def _grouplist(user: str, primary: int) -> Iterable[int]:
    import os

    try:
        return os.getgrouplist(user, primary)
    except OSError:
        return [primary]


@dataclasses.dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    throttle: Throttle = Throttle()
    limits: Limits = Limits()

    def rules_for(self, peer: Peer) -> list[Rule]:
        return [rule for rule in self.rules if rule.matches(peer)]

    def rule_for(self, peer: Peer, service: str) -> Rule | None:
        for rule in self.rules_for(peer):
            if service in rule.services:
                return rule
        return None


def load(path: str) -> Policy:
    """Read and check a policy file; PolicyError names the problem."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise PolicyError(f"cannot read the policy file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"the policy file {path} is not valid TOML: {exc}") from exc
    try:
        return parse(data)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None


def _strings(table: Mapping[str, Any], key: str, where: str) -> frozenset[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where}: {key} must be a list of non-empty strings")
    return frozenset(value)


def _number(table: Mapping[str, Any], key: str, default: Any, where: str, *, integer: bool) -> Any:
    value: Any = table.get(key, default)
    wrong_type = isinstance(value, bool) or not isinstance(value, (int, float))
    if wrong_type or (integer and not isinstance(value, int)) or value < 0:
        kind = "a non-negative integer" if integer else "a non-negative number"
        raise PolicyError(f"{where}: {key} must be {kind}, not {value!r}")
    return value if integer else float(value)


def _no_unknown(table: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")


_RULE_KEYS = (
    "users",
    "groups",
    "services",
    "phases",
    "max_in_flight",
    "max_in_flight_total",
    "setenv",
    "require_authentication",
)


def _rule(index: int, table: Any) -> Rule:
    where = f"[[allow]] rule {index + 1}"
    if not isinstance(table, dict):
        raise PolicyError(f"{where} must be a table")
    _no_unknown(table, _RULE_KEYS, where)
    users = _strings(table, "users", where)
    groups = _strings(table, "groups", where)
    if not users and not groups:
        raise PolicyError(f"{where} names no users and no groups: it would match no peer")
    services = _strings(table, "services", where)
    if not services:
        raise PolicyError(f"{where} names no services")
    phases = _strings(table, "phases", where) if "phases" in table else frozenset(DEFAULT_PHASES)
    bad = sorted(phases - set(PHASES))
    if bad:
        raise PolicyError(f"{where}: unknown phase {bad[0]!r} (known: {', '.join(PHASES)})")
    max_in_flight = _number(table, "max_in_flight", 64, where, integer=True)
    if max_in_flight < 1:
        raise PolicyError(f"{where}: max_in_flight must be at least 1")
    total = _number(table, "max_in_flight_total", 4 * max_in_flight, where, integer=True)
    if total < max_in_flight:
        raise PolicyError(f"{where}: max_in_flight_total must not be below max_in_flight")
    require = table.get("require_authentication", True)
    if not isinstance(require, bool):
        raise PolicyError(f"{where}: require_authentication must be true or false")
    return Rule(
        index,
        users,
        groups,
        services,
        phases,
        max_in_flight,
        total,
        _strings(table, "setenv", where),
        require,
    )


def parse(data: Mapping[str, Any]) -> Policy:
    """A Policy from the parsed TOML document."""
    _no_unknown(data, ("allow", "throttle", "limits"), "the policy")
    rules = data.get("allow")
    if not isinstance(rules, list) or not rules:
        raise PolicyError("the policy has no [[allow]] rules: every peer would be refused")
    throttle_table = data.get("throttle", {})
    limits_table = data.get("limits", {})
    for name, table in (("[throttle]", throttle_table), ("[limits]", limits_table)):
        if not isinstance(table, dict):
            raise PolicyError(f"{name} must be a table")
    throttle_fields = {f.name: f for f in dataclasses.fields(Throttle)}
    _no_unknown(throttle_table, throttle_fields, "[throttle]")
    throttle = Throttle(
        **{
            name: _number(
                throttle_table, name, field.default, "[throttle]", integer=field.type == "int"
            )
            for name, field in throttle_fields.items()
        }
    )
    for kind in ("user", "rhost", "peer"):
        if getattr(throttle, f"{kind}_refuse_after") < getattr(throttle, f"{kind}_slow_after"):
            raise PolicyError(
                f"[throttle]: {kind}_refuse_after must not be below {kind}_slow_after"
            )
    limit_fields = {f.name: f for f in dataclasses.fields(Limits)}
    _no_unknown(limits_table, limit_fields, "[limits]")
    limits = Limits(
        **{
            name: _number(
                limits_table, name, field.default, "[limits]", integer=field.type == "int"
            )
            for name, field in limit_fields.items()
        }
    )
    for name in ("start_timeout", "frame_timeout", "conversation_timeout", "idle_timeout"):
        if getattr(limits, name) <= 0:
            raise PolicyError(f"[limits]: {name} must be above 0")
    return Policy(tuple(_rule(i, table) for i, table in enumerate(rules)), throttle, limits)
