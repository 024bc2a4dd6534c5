"""The ``PAMPHLET`` setting: one dict, read each time it is needed.

::

    PAMPHLET = {
        "SERVICE": "django",                    # the PAM service (/etc/pam.d/django)
        "BROKER": "/run/pamphlet/broker.sock",  # None: PAM in the site's own process
        "CREATE_UNKNOWN_USER": True,            # like RemoteUserBackend.create_unknown_user
        "STAFF_GROUPS": ["webadmins"],          # system groups that make is_staff
        "SUPERUSER_GROUPS": ["sudo"],           # ... is_superuser (and is_staff)
        "ENCODING": "utf-8",
        "BROKER_UID": None,                     # a broker not run by root (a container's)
        "MAX_LOGINS": 64,                       # logins in progress, in the whole site
        "MAX_LOGINS_PER_ADDRESS": 4,            # ... per client address (IPv6: per /64)
        "LOGIN_TIMEOUT": 120,                   # seconds a login waits for its next answer
        "LOGIN_STATE_DIR": None,                # where the processes count logins in progress
    }

``STAFF_GROUPS`` and ``SUPERUSER_GROUPS`` are checked at every login and set
the flags both ways (a user who left the group loses the flag); ``None``
(the default) leaves the flag to the site.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

__all__ = ["Config", "config"]

_KEYS = {
    "SERVICE",
    "BROKER",
    "CREATE_UNKNOWN_USER",
    "STAFF_GROUPS",
    "SUPERUSER_GROUPS",
    "ENCODING",
    "LOGIN_TEMPLATE",
    "BROKER_UID",
    "MAX_LOGINS",
    "MAX_LOGINS_PER_ADDRESS",
    "LOGIN_TIMEOUT",
    "LOGIN_STATE_DIR",
}


@dataclasses.dataclass(frozen=True)
class Config:
    service: str = "django"
    broker: str | None = None
    create_unknown_user: bool = True
    staff_groups: frozenset[str] | None = None
    superuser_groups: frozenset[str] | None = None
    encoding: str = "utf-8"
    login_template: str = "pamphlet/login.html"
    broker_uid: int | None = None
    max_logins: int = 64
    max_logins_per_address: int = 4
    login_timeout: float = 120.0
    login_state_dir: str | None = None


def _groups(value: Any, key: str) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(g, str) and g for g in value):
        raise ImproperlyConfigured(f"PAMPHLET[{key!r}] must be a list of group names or None")
    return frozenset(value)


def config() -> Config:
    """The ``PAMPHLET`` setting, checked; ImproperlyConfigured names what is wrong."""
    raw: Any = getattr(settings, "PAMPHLET", {})
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured("PAMPHLET must be a dict")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ImproperlyConfigured(
            f"PAMPHLET has an unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})"
        )
    defaults = Config()
    service = raw.get("SERVICE", defaults.service)
    broker = raw.get("BROKER", defaults.broker)
    create = raw.get("CREATE_UNKNOWN_USER", defaults.create_unknown_user)
    encoding = raw.get("ENCODING", defaults.encoding)
    template = raw.get("LOGIN_TEMPLATE", defaults.login_template)
    if not isinstance(service, str) or not service or "/" in service:
        raise ImproperlyConfigured("PAMPHLET['SERVICE'] must be a PAM service name")
    if broker is not None and not isinstance(broker, str):
        raise ImproperlyConfigured("PAMPHLET['BROKER'] must be the broker's socket path or None")
    if not isinstance(create, bool):
        raise ImproperlyConfigured("PAMPHLET['CREATE_UNKNOWN_USER'] must be True or False")
    if not isinstance(encoding, str) or not isinstance(template, str):
        raise ImproperlyConfigured("PAMPHLET['ENCODING'] and ['LOGIN_TEMPLATE'] are strings")
    broker_uid = raw.get("BROKER_UID", defaults.broker_uid)
    if broker_uid is not None and (type(broker_uid) is not int or broker_uid < 0):
        raise ImproperlyConfigured("PAMPHLET['BROKER_UID'] must be a uid or None")
    caps = []
    for key, default in (
        ("MAX_LOGINS", defaults.max_logins),
        ("MAX_LOGINS_PER_ADDRESS", defaults.max_logins_per_address),
        ("LOGIN_TIMEOUT", defaults.login_timeout),
    ):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ImproperlyConfigured(f"PAMPHLET[{key!r}] must be a positive number")
        caps.append(value)
    state_dir = raw.get("LOGIN_STATE_DIR")
    if state_dir is not None and (not isinstance(state_dir, str) or not os.path.isabs(state_dir)):
        raise ImproperlyConfigured("PAMPHLET['LOGIN_STATE_DIR'] must be an absolute path or None")
    return Config(
        service,
        broker,
        create,
        _groups(raw.get("STAFF_GROUPS"), "STAFF_GROUPS"),
        _groups(raw.get("SUPERUSER_GROUPS"), "SUPERUSER_GROUPS"),
        encoding,
        template,
        broker_uid,
        int(caps[0]),
        int(caps[1]),
        float(caps[2]),
        state_dir,
    )
