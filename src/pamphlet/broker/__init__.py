"""pamphlet's privilege-separated PAM broker.

``pamphlet broker --socket PATH --policy FILE`` runs as root and runs each
login's PAM transaction in a worker process of its own, as its policy allows
(:mod:`pamphlet.broker.server`, :mod:`pamphlet.broker.worker`). Unprivileged
programs use it through the API they already have: ``broker=PATH`` on
PamApplication, ThreadedPamApplication, AsyncPamApplication and the one-call
helpers (:mod:`pamphlet.broker.client`). The wire format is
:mod:`pamphlet.broker.protocol`; the policy file, :mod:`pamphlet.broker.policy`.

The broker's own refusals raise the classes below; PAM's results raise the
usual :class:`~pamphlet.PamError` subclasses.
"""

from __future__ import annotations

from .errors import (
    BrokerError,
    BrokerNotTrusted,
    BrokerProtocolError,
    BrokerRefused,
    BrokerUnavailable,
    Busy,
    ConfdirNotAllowed,
    EnvironNotAllowed,
    ItemNotAllowed,
    PeerNotAllowed,
    PhaseNotAllowed,
    ResumeRefused,
    ServiceNotAllowed,
    Throttled,
    TokenExpired,
    TokenInvalid,
    TokenPeerMismatch,
    TokenUsed,
    WorkerDied,
)

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
]
