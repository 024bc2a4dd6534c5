"""The broker's throttle: failed logins per peer, with reservations for those in flight.

Failures are remembered for ``window`` seconds in three kinds of bucket, all
within one peer uid: per target user, per client address (PAM_RHOST, when
the client set one) and for the peer as a whole. A login that passes the
check *reserves* a place in each of its buckets until its outcome is known:
so the logins in flight plus the failures already counted never exceed a
limit, however many start at once, and a login that waits (at a prompt, or
detached) holds its place while it waits. A reservation whose worker dies
before it reports an outcome counts as a failure: the peer can signal its
own worker, and must not be able to take back a guess whose answer it
guessed from the timing.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from .policy import Throttle

__all__ = ["FailureCounter", "Reservation"]

#: A bucket: ("user", uid, name), ("rhost", uid, address) or ("peer", uid).
Key = tuple[Any, ...]


@dataclasses.dataclass(eq=False)
class Reservation:
    """The places one authenticate holds until its outcome is known."""

    uid: int
    user: str | None = None
    rhost: str | None = None
    keys: list[Key] = dataclasses.field(default_factory=list)


class FailureCounter:
    """Failed authentications per (peer, user), (peer, rhost) and peer, plus those in flight."""

    def __init__(self, settings: Throttle) -> None:
        self.settings = settings
        self.failures: dict[Key, collections.deque[float]] = {}
        self.held: collections.Counter[Key] = collections.Counter()
        self._pruned = 0.0

    def _limits(self, key: Key) -> tuple[int, int]:
        s = self.settings
        if key[0] == "user":
            return s.user_slow_after, s.user_refuse_after
        if key[0] == "rhost":
            return s.rhost_slow_after, s.rhost_refuse_after
        return s.peer_slow_after, s.peer_refuse_after

    def _recent(self, key: Key, now: float) -> int:
        times = self.failures.get(key)
        if not times:
            return 0
        horizon = now - self.settings.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self.failures[key]
        return len(times)

    @staticmethod
    def _keys(uid: int, user: str | None, rhost: str | None) -> list[Key]:
        keys: list[Key] = [("peer", uid)]
        if rhost is not None:
            keys.insert(0, ("rhost", uid, rhost))
        if user is not None:
            keys.insert(0, ("user", uid, user))
        return keys

    def _judge(self, keys: list[Key], now: float) -> tuple[str | None, float]:
        """(refusal text or None, seconds to wait first) for a login in these buckets."""
        s = self.settings
        delay = 0.0
        for key in keys:
            failed, in_flight = self._recent(key, now), self.held[key]
            slow_after, refuse_after = self._limits(key)
            counted = failed + in_flight
            if counted >= refuse_after:
                return _refusal(key, failed, in_flight, refuse_after, s.window), 0.0
            if counted >= slow_after:
                delay = max(delay, s.delay * (counted - slow_after + 1))
        return None, min(delay, s.max_delay)

    def check(
        self, uid: int, user: str | None, now: float, rhost: str | None = None
    ) -> tuple[str | None, float]:
        """(refusal text or None, seconds to wait before trying); reserves nothing."""
        return self._judge(self._keys(uid, user, rhost), now)

    def reserve(
        self,
        reservation: Reservation | None,
        uid: int,
        user: str | None,
        rhost: str | None,
        now: float,
    ) -> tuple[str | None, float, Reservation | None]:
        """Check, and hold a place in every bucket this login falls in.

        ``reservation`` is the one the same authenticate already holds (the
        user became known during it): only its new buckets are checked and
        added. On a refusal nothing new is held.
        """
        if reservation is None:
            reservation = Reservation(uid)
        user = user if user is not None else reservation.user
        rhost = rhost if rhost is not None else reservation.rhost
        new = [key for key in self._keys(uid, user, rhost) if key not in reservation.keys]
        refusal, delay = self._judge(new, now)
        if refusal is not None:
            return refusal, 0.0, reservation if reservation.keys else None
        for key in new:
            self.held[key] += 1
        reservation.keys += new
        reservation.user, reservation.rhost = user, rhost
        return None, delay, reservation

    def release(self, reservation: Reservation) -> list[Key]:
        """Give the places back, counting nothing; the keys they were in."""
        keys = reservation.keys
        for key in keys:
            self.held[key] -= 1
            if self.held[key] <= 0:
                del self.held[key]
        reservation.keys = []
        return keys

    def settle(self, reservation: Reservation, code: int, now: float, user: str | None) -> None:
        """The outcome is known: give the places back, and count a failure in each."""
        keys = self.release(reservation)
        # The final user (a module may have changed PAM_USER) and the peer
        # always count, reserved or not.
        keys += [k for k in self._keys(reservation.uid, user, None) if k not in keys]
        if code == 0:
            for key in keys:
                if key[0] == "user":
                    self.failures.pop(key, None)
            return
        for key in keys:
            # Kept to the limit in force: a reload that raised it must not
            # leave a bucket capped at the old one (it would never refuse).
            keep = self._limits(key)[1] + 1
            times = self.failures.get(key)
            if times is None or times.maxlen != keep:
                times = self.failures[key] = collections.deque(times or (), maxlen=keep)
            times.append(now)
        if now - self._pruned > 60:
            self._pruned = now
            for key in list(self.failures):
                self._recent(key, now)


def _refusal(key: Key, failed: int, in_flight: int, limit: int, window: float) -> str:
    if key[0] == "user":
        whom = f"for {key[2]!r} from this peer"
    elif key[0] == "rhost":
        whom = f"from address {key[2]!r} of this peer"
    else:
        whom = "from this peer"
    return (
        f"{failed} failed logins and {in_flight} in progress {whom} in the last "
        f"{window:g} s (the limit is {limit}): refused until they age out"
    )
