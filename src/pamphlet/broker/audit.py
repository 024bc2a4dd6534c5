"""The broker's audit log: one line per transaction, refusal or event.

Lines are ``key=value`` pairs; a value the client chose (a user name, an
address) is quoted as JSON when it holds anything but plain characters, so
it can never forge a field or a line. Refusals of peers that no rule names
are the one thing anybody on the machine can cause at will (the socket is
usually mode 0666), so they are summarized: the first refusal of a uid in an
interval gets its line, the rest are counted and written as one summary
line when the interval ends.
"""

from __future__ import annotations

import json
import os
import re
import sys
import syslog
from typing import IO, Any

__all__ = ["Audit", "RefusalSummary"]


class Audit:
    """One line per transaction: syslog (LOG_AUTHPRIV) when /dev/log exists, else stderr."""

    def __init__(self, where: str = "auto", stream: IO[str] | None = None) -> None:
        if where == "auto":
            where = "syslog" if os.path.exists("/dev/log") else "stderr"
        self.where = where
        self.stream = stream or sys.stderr
        if where == "syslog":
            syslog.openlog("pamphlet-broker", syslog.LOG_PID, syslog.LOG_AUTHPRIV)

    def log(self, **fields: Any) -> None:
        line = " ".join(f"{key}={_value(value)}" for key, value in fields.items())
        if self.where == "syslog":
            syslog.syslog(syslog.LOG_INFO, line)
        else:
            self.stream.write(f"pamphlet-broker[{os.getpid()}]: {line}\n")
            self.stream.flush()


_PLAIN = re.compile(r"[A-Za-z0-9._@:/,+#-]+")


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value) or "-"
    text = str(value)
    # Client-chosen text (user, rhost) can never forge a field or a line.
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


#: At most this many uids are told apart within one interval; refusals of
#: any further uid go into one shared count (a bound on the broker's memory).
_TRACKED_UIDS = 1024


class RefusalSummary:
    """Rate-limits the audit lines of refused unknown peers: a summary per interval."""

    def __init__(self, audit: Audit, interval: float = 60.0) -> None:
        self.audit = audit
        self.interval = interval
        self.started = 0.0
        self.suppressed: dict[int | None, int] = {}

    @property
    def next_flush(self) -> float | None:
        return self.started + self.interval if self.suppressed else None

    def refused(self, now: float, uid: int, **fields: Any) -> None:
        """A refusal: written when it is the uid's first in this interval, else counted."""
        if now - self.started >= self.interval:
            self.flush(now)
        key = uid if uid in self.suppressed or len(self.suppressed) < _TRACKED_UIDS else None
        if key in self.suppressed:
            self.suppressed[key] += 1
            return
        self.suppressed[key] = 0
        self.audit.log(peer_uid=uid, **fields)

    def flush(self, now: float) -> None:
        """Write the interval's summary lines and start a new interval."""
        for uid, count in self.suppressed.items():
            if count:
                self.audit.log(
                    event="refusals-summarized",
                    peer_uid="other" if uid is None else uid,
                    outcome="refused:peer",
                    more=count,
                    seconds=f"{self.interval:g}",
                )
        self.suppressed = {}
        self.started = now
