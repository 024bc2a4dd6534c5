"""``PamBackend``: Django's AUTHENTICATION_BACKENDS entry for a PAM service."""

from __future__ import annotations

import grp
import logging
import os
import pwd
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend

import pamphlet

from ...broker.errors import BrokerError
from ...message import Message
from .conf import Config, config

__all__ = ["PamBackend", "system_groups"]

logger = logging.getLogger("pamphlet.contrib.django")


class _MoreThanAPassword(Exception):
    """The stack asked a second question; a password form cannot answer it."""


class _PasswordLogin(pamphlet.PamApplication):
    """Answers exactly one echo-off prompt with the password, and fails on any other."""

    def __init__(self, cfg: Config, user: str, password: str) -> None:
        self._password = password
        self._answered = False
        super().__init__(
            cfg.service, user, broker=cfg.broker, broker_uid=cfg.broker_uid, encoding=cfg.encoding
        )

    def conversation(self, messages: list[Message]) -> list[str | None]:
        answers: list[str | None] = []
        for message in messages:
            if not message.is_prompt:
                answers.append(None)
            elif message.wants_password and not self._answered:
                self._answered = True
                answers.append(self._password)
            else:
                raise _MoreThanAPassword(f"the stack asked {str(message)!r} after the password")
        return answers


def system_groups(username: str) -> frozenset[str]:
    """The names of ``username``'s system groups (primary and supplementary);
    empty when the system does not know the user."""
    try:
        entry = pwd.getpwnam(username)
    except (KeyError, UnicodeEncodeError):
        return frozenset()
    try:
        gids = os.getgrouplist(username, entry.pw_gid)
    except OSError:
        gids = [entry.pw_gid]
    names = set()
    for gid in gids:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            pass
    return frozenset(names)


class PamBackend(ModelBackend):
    """Checks a user name and password with PAM: ``authenticate``, then ``acct_mgmt``.

    A stack that asks more than one password (a one-time code), or an
    account whose password must be changed, cannot pass here: use
    :class:`~pamphlet.contrib.django.views.PamLoginView` for those. On
    success the Django user is created (unless ``CREATE_UNKNOWN_USER`` is
    False) or updated, its ``is_staff``/``is_superuser`` set from
    ``STAFF_GROUPS``/``SUPERUSER_GROUPS``. Permissions are ModelBackend's.
    """

    #: None: the ``CREATE_UNKNOWN_USER`` setting decides (a subclass may fix it).
    create_unknown_user: bool | None = None

    def authenticate(
        self,
        request: Any,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> Any:
        if username is None or password is None or not username:
            return None
        cfg = config()
        try:
            with _PasswordLogin(cfg, username, password) as app:
                if request is not None and request.META.get("REMOTE_ADDR"):
                    app.rhost = request.META["REMOTE_ADDR"]
                app.authenticate()
                app.account_management()
                pam_user = app.user or username
        except (pamphlet.PamError, BrokerError, _MoreThanAPassword) as exc:
            logger.info("PAM login of %r refused: %s", username, exc)
            return None
        user = self.sync_user(request, pam_user, cfg)
        if user is None or not self.user_can_authenticate(user):
            return None
        return user

    def sync_user(self, request: Any, username: str, cfg: Config | None = None) -> Any:
        """The Django user for a PAM user who just logged in: created when
        allowed, its staff and superuser flags set from its system groups.
        None when there is no such user and creating is off."""
        cfg = cfg or config()
        model = get_user_model()
        username = self.clean_username(username)
        create = self.create_unknown_user
        if create is None:
            create = cfg.create_unknown_user
        if create:
            user, created = model._default_manager.get_or_create(**{model.USERNAME_FIELD: username})
            if created:
                user.set_unusable_password()  # PAM holds the password, never Django
                user.save()
                user = self.configure_user(request, user, created=True)
        else:
            try:
                user = model._default_manager.get_by_natural_key(username)
            except model.DoesNotExist:
                return None
        self.map_groups(user, username, cfg)
        return user

    def clean_username(self, username: str) -> str:
        """Hook: the Django user name for a PAM user name (unchanged by default)."""
        return username

    def configure_user(self, request: Any, user: Any, created: bool = True) -> Any:
        """Hook: set up a user this backend just created; returns the user."""
        return user

    def map_groups(self, user: Any, username: str, cfg: Config) -> None:
        """Set ``is_staff`` and ``is_superuser`` from the user's system groups."""
        if cfg.staff_groups is None and cfg.superuser_groups is None:
            return
        groups = system_groups(username)
        changed = []
        superuser = None
        if cfg.superuser_groups is not None:
            superuser = not groups.isdisjoint(cfg.superuser_groups)
            if user.is_superuser != superuser:
                user.is_superuser = superuser
                changed.append("is_superuser")
        if cfg.staff_groups is not None:
            staff = bool(superuser) or not groups.isdisjoint(cfg.staff_groups)
        else:
            staff = bool(superuser) or user.is_staff  # a superuser needs is_staff for the admin
        if user.is_staff != staff:
            user.is_staff = staff
            changed.append("is_staff")
        if changed:
            user.save(update_fields=changed)
