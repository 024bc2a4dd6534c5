"""One Python contender of the benchmarks, in a process of its own.

    python contender.py NAME SERVICE USER PASSWORD COUNT [CONFDIR]

Runs COUNT transactions (start, authenticate, account management, end) with
the library NAME (pamphlet, python-pam or pamela), answering prompts with
PASSWORD, and prints the elapsed nanoseconds, like transactions.c does.
Exits 1 if any transaction fails. The peers cannot take a confdir; they read
SERVICE from /etc/pam.d.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def pamphlet_transaction(
    service: str, user: str, password: str, confdir: str | None
) -> Callable[[], None]:
    import pamphlet

    class Bench(pamphlet.PamApplication):
        def conversation(self, messages: list[pamphlet.Message]) -> list[str | None]:
            return [password if message.is_prompt else None for message in messages]

    def transaction() -> None:
        with Bench(service, user, confdir=confdir) as app:
            app.authenticate()
            app.account_management()

    return transaction


def python_pam_transaction(
    service: str, user: str, password: str, confdir: str | None
) -> Callable[[], None]:
    import pam  # python-pam

    def transaction() -> None:
        # resetcreds=False: the same libpam calls as the others, no setcred.
        if not pam.authenticate(user, password, service=service, resetcreds=False):
            raise RuntimeError("python-pam: authentication failed")

    return transaction


def pamela_transaction(
    service: str, user: str, password: str, confdir: str | None
) -> Callable[[], None]:
    import pamela

    def transaction() -> None:
        # check=True is pam_acct_mgmt; resetcred=0 skips pam_setcred.
        pamela.authenticate(user, password, service=service, resetcred=0, check=True)

    return transaction


CONTENDERS = {
    "pamphlet": pamphlet_transaction,
    "python-pam": python_pam_transaction,
    "pamela": pamela_transaction,
}


def main(argv: list[str]) -> int:
    name, service, user, password, count = argv[:5]
    confdir = argv[5] if len(argv) > 5 else None
    if confdir is not None and name != "pamphlet":
        print(f"{name} cannot read a confdir", file=sys.stderr)
        return 2
    transaction = CONTENDERS[name](service, user, password, confdir)
    transaction()  # imports, first dlopen of the modules: not part of the figure
    start = time.perf_counter_ns()
    for _ in range(int(count)):
        transaction()
    print(time.perf_counter_ns() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
