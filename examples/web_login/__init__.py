"""A web login that speaks PAM's whole conversation (pamphlet's stepwise login).

Run it with ``python -m examples.web_login --port 8080 --service login`` (or
without ``--service`` for a demo stack). :class:`WebLogin` is the application;
each browser's login is a :class:`pamphlet.stepwise.AsyncLogin`, shown through
its :class:`Visit`.
"""

from __future__ import annotations

from .server import COOKIE, Stage, Visit, WebLogin

__all__ = ["COOKIE", "Stage", "Visit", "WebLogin"]
