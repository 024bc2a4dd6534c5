"""pytest fixtures for testing code that uses PAM: throwaway services, no root.

pytest loads this plugin by itself once pamphlet is installed (entry point
``pytest11``). It gives two fixtures:

``pam_service``
    A :class:`~pamphlet.testing.TemporaryService`, removed after the test.
    Without a marker it is a pam_matrix service for all four module types
    with the user ``alice``, password ``secret``. The ``pam_service`` marker
    takes :class:`~pamphlet.testing.TemporaryService`'s arguments, plus
    ``as_default=True`` to make applications created without a ``confdir``
    (your code's, typically) read this service::

        @pytest.mark.pam_service(users={"bob": "hunter2"}, name="myapp", as_default=True)
        def test_login_form(client, pam_service):
            ...

``pam_service_factory``
    ``pam_service_factory(stack=None, *, users=None, name=...)`` makes as
    many services as a test needs, all removed after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .testing import TemporaryService

__all__ = ["DEFAULT_USERS", "pam_service", "pam_service_factory"]

#: The users of an unconfigured ``pam_service``.
DEFAULT_USERS = {"alice": "secret"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pam_service(stack=None, *, users=None, name='pamphlet-test', as_default=False): "
        "configure the pam_service fixture (pamphlet.testing.TemporaryService's arguments)",
    )


@pytest.fixture
def pam_service_factory() -> Iterator[Callable[..., TemporaryService]]:
    """Make throwaway PAM services: ``TemporaryService``'s arguments; removed after the test."""
    services: list[TemporaryService] = []

    def make(stack: Any = None, **kwargs: Any) -> TemporaryService:
        service = TemporaryService(stack, **kwargs)
        services.append(service)
        return service

    yield make
    for service in services:
        service.cleanup()


@pytest.fixture
def pam_service(
    request: pytest.FixtureRequest, pam_service_factory: Callable[..., TemporaryService]
) -> Iterator[TemporaryService]:
    """A throwaway PAM service, configured by the ``pam_service`` marker."""
    marker = request.node.get_closest_marker("pam_service")
    args: tuple[Any, ...] = marker.args if marker else ()
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
    as_default = bool(kwargs.pop("as_default", False))
    if not args and kwargs.get("stack") is None and "users" not in kwargs:
        kwargs["users"] = dict(DEFAULT_USERS)
    service = pam_service_factory(*args, **kwargs)
    if as_default:
        with service.as_default():
            yield service
    else:
        yield service
