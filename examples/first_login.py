"""A first login through PAM: a throwaway pam_matrix stack, no root needed.

Run it and type the demo password when PAM asks for it:

    python3 examples/first_login.py

It builds a temporary PAM service (pam_wrapper's pam_matrix, with one demo
user), then runs what a login program runs: authenticate, check the account,
establish credentials, open the session, show the PAM environment, end.
"""

from __future__ import annotations

import getpass
import pathlib
import sys

import pamphlet
from pamphlet.testing import TemporaryService

DEMO_USER = "demo"
DEMO_PASSWORD = "pamphlet"


class TerminalLogin(pamphlet.PamApplication):
    """Asks on the terminal whatever the PAM stack wants to know."""

    def conversation(self, messages: list[pamphlet.Message]) -> list[str]:
        answers = []
        for message in messages:
            if not message.is_prompt:
                print(message, file=sys.stderr if message.is_error else sys.stdout)
                answers.append("")
            elif message.wants_password:
                answers.append(getpass.getpass(message))
            else:
                answers.append(input(message))
        return answers


def main() -> int:
    with TemporaryService(users={DEMO_USER: DEMO_PASSWORD}) as service:
        print(f"A throwaway PAM service is in {service.confdir}:")
        print(pathlib.Path(service.path()).read_text())
        print(f"Log in as {DEMO_USER!r}; the password is {DEMO_PASSWORD!r}.")
        with TerminalLogin(service.name, DEMO_USER, confdir=service.confdir) as app:
            try:
                app.authenticate()
                app.account_management()
            except pamphlet.PamError as error:
                print(f"Login refused: {type(error).__name__}: {error}", file=sys.stderr)
                return 1
            app.initialize_credentials()
            app.open_session()
            print(f"Welcome, {app.user}! Your session's PAM environment:")
            for name, value in sorted(app.environ.items()):
                print(f"  {name}={value}")
        print("Session closed, credentials deleted, handle ended.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
