"""A throwaway PAM service that shows the whole conversation in the browser.

Built with :mod:`pamphlet.testing` (pam_wrapper's pam_matrix and Linux-PAM's
own modules in a temporary confdir), so it needs no root and no /etc/pam.d:

* ``demo`` / ``pamphlet``, then the one-time code ``424242`` on a second,
  visible prompt;
* ``olduser`` / ``pamphlet``, then the same code, and the password has
  expired: the browser goes on into the password change;
* a wrong answer waits a second (pam_faildelay) before "Login incorrect".
"""

from __future__ import annotations

import os

from pamphlet.testing import TemporaryService

__all__ = ["DEMO_CODE", "DEMO_PASSWORD", "DEMO_USERS", "demo_service"]

DEMO_USERS = ("demo", "olduser")
DEMO_PASSWORD = "pamphlet"
DEMO_CODE = "424242"

DEMO_STACK = """\
auth     optional pam_faildelay.so delay=1000000
auth     optional pam_echo.so Hello %u: this page asks what the PAM stack asks.
auth     required {pam_matrix} passdb={passdb} verbose
auth     required {pam_matrix} passdb={codes} echo
account  [success=1 default=ignore] pam_succeed_if.so quiet user != olduser
account  required pam_stress.so expired
account  required {pam_matrix} passdb={passdb}
password required {pam_matrix} passdb={passdb}
session  required {pam_matrix} passdb={passdb}
"""


def demo_service(name: str = "pamphlet-web-demo") -> TemporaryService:
    """The demo service; ``cleanup()`` it (or use ``with``) when done."""
    # The stack names the codes file, which lives in the confdir that the
    # service creates: the real service file is written once that file exists.
    service = TemporaryService("", users=dict.fromkeys(DEMO_USERS, DEMO_PASSWORD), name=name)
    # pam_matrix reads "user:secret:service" lines: a second file makes the
    # second prompt a separate factor. Its folder stays writable like the first.
    codes = os.path.join(service.confdir, "codes", "passdb")
    os.makedirs(os.path.dirname(codes))
    with open(codes, "w", encoding="utf-8") as file:
        file.writelines(f"{user}:{DEMO_CODE}:{name}\n" for user in DEMO_USERS)
    service.add_service(name, DEMO_STACK.replace("{codes}", codes))
    return service
