"""A web login that speaks PAM's whole conversation (pamphlet's AsyncPamApplication).

Run it with ``python -m examples.web_login --port 8080 --service login`` (or
without ``--service`` for a demo stack). :class:`WebLogin` is the application;
:class:`LoginFlow` keeps one browser's PAM transaction between requests.
"""

from __future__ import annotations

from .flow import BrowserLogin, LoginFlow, Stage
from .server import COOKIE, WebLogin

__all__ = ["COOKIE", "BrowserLogin", "LoginFlow", "Stage", "WebLogin"]
