"""What the broker's client raises when the broker, not PAM, says no.

PAM's own results through the broker raise the usual
:class:`~pamphlet.PamError` subclasses (AuthenticationError, ...). The
classes here are the broker's: it could not be reached, it refused the
request by policy, or the worker serving the login died.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "BrokerUnavailable",
    "BrokerNotTrusted",
    "BrokerProtocolError",
    "WorkerDied",
    "BrokerRefused",
    "PeerNotAllowed",
    "ServiceNotAllowed",
    "PhaseNotAllowed",
    "ItemNotAllowed",
    "EnvironNotAllowed",
    "ConfdirNotAllowed",
    "Throttled",
    "Busy",
    "ResumeRefused",
    "TokenInvalid",
    "TokenExpired",
    "TokenUsed",
    "TokenPeerMismatch",
    "refusal",
]


class BrokerError(Exception):
    """The broker, not the PAM stack, ended the request. Never a success."""


class BrokerUnavailable(BrokerError):
    """The broker's socket could not be reached (not running, no permission)."""


class BrokerNotTrusted(BrokerError):
    """What listens at the broker's path is not the broker: its uid is neither
    0 nor the ``broker_uid`` given. Nothing was sent to it.

    ``uid`` and ``pid`` are the listener's, from ``SO_PEERCRED`` (None when
    they could not be read).
    """

    def __init__(self, path: str, uid: int | None, pid: int | None, reason: str) -> None:
        self.path = path
        self.uid = uid
        self.pid = pid
        super().__init__(f"the process listening on {path} is not a trusted broker: {reason}")


class BrokerProtocolError(BrokerError):
    """A frame outside the protocol, or the connection closed mid-request."""


class WorkerDied(BrokerError):
    """The process running this login ended without an answer (a module crashed,
    or the broker was stopped). The transaction is over; start a new one."""


class BrokerRefused(BrokerError):
    """The broker's policy refused the request. ``kind`` names the rule."""

    kind = "refused"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class PeerNotAllowed(BrokerRefused):
    """No ``[[allow]]`` rule names this process's user or groups."""

    kind = "peer"


class ServiceNotAllowed(BrokerRefused):
    """The policy does not let this peer use this PAM service."""

    kind = "service"


class PhaseNotAllowed(BrokerRefused):
    """The policy does not allow this phase (or it needs a successful
    authenticate first in the same transaction)."""

    kind = "phase"


class ItemNotAllowed(BrokerRefused):
    """Only rhost, ruser, tty and user may be set through the broker."""

    kind = "item"


class EnvironNotAllowed(BrokerRefused):
    """The policy does not let this peer set this PAM environment variable."""

    kind = "environ"


class ConfdirNotAllowed(BrokerRefused):
    """A client never chooses the confdir, modules or service file."""

    kind = "confdir"


class Throttled(BrokerRefused):
    """Too many failed logins from this peer (for this user, or in all)."""

    kind = "throttled"


class Busy(BrokerRefused):
    """This peer's rule already has ``max_in_flight`` transactions running."""

    kind = "busy"


class ResumeRefused(BrokerRefused):
    """A resume token was refused (one of the four classes below); the
    transaction it named, if any, is not reachable with it."""

    kind = "resume"


class TokenInvalid(ResumeRefused):
    """No detached transaction has this token (never issued, or a wrong secret)."""

    kind = "token-invalid"


class TokenExpired(ResumeRefused):
    """The token's transaction waited longer than the broker's ``detach_timeout``
    (or its worker ended): the transaction has ended."""

    kind = "token-expired"


class TokenUsed(ResumeRefused):
    """The token was presented before: a token is good for one resume."""

    kind = "token-used"


class TokenPeerMismatch(ResumeRefused):
    """The token belongs to a transaction of another peer uid. The token is
    burnt and that transaction ended."""

    kind = "token-peer"


def _subclasses(cls: type[BrokerRefused]) -> list[type[BrokerRefused]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


_BY_KIND: dict[str, type[BrokerRefused]] = {cls.kind: cls for cls in _subclasses(BrokerRefused)}


def refusal(kind: object, message: object) -> BrokerRefused:
    """The exception for a refusal frame; an unknown kind is a plain BrokerRefused."""
    cls = _BY_KIND.get(kind, BrokerRefused) if isinstance(kind, str) else BrokerRefused
    return cls(str(message))
