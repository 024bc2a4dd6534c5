"""One Python contender of the benchmarks, in a process of its own.

    python contender.py NAME SERVICE USER PASSWORD COUNT [CONFDIR]

Runs COUNT transactions (start, authenticate, account management, end) with
the library NAME (pamphlet, python-pam, pamela, or ctypes-floor: the least a
ctypes binding can do, for reference), answering prompts with
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


def ctypes_floor_transaction(
    service: str, user: str, password: str, confdir: str | None
) -> Callable[[], None]:
    """The least any ctypes binding can do: no checks, no objects, no safety.

    A reference, not a library: it shows what the interpreter and ctypes
    cost by themselves, the floor under every Python contender.
    """
    import ctypes
    from ctypes import CFUNCTYPE, Structure, byref, c_char_p, c_int, c_void_p

    pam = ctypes.CDLL("libpam.so.0")
    libc = ctypes.CDLL(None)
    strdup = libc.strdup
    strdup.restype, strdup.argtypes = c_void_p, [c_char_p]
    calloc = libc.calloc
    calloc.restype, calloc.argtypes = c_void_p, [c_void_p, c_void_p]
    pointer_at = c_void_p.from_address
    secret = password.encode()

    @CFUNCTYPE(c_int, c_int, c_void_p, c_void_p, c_void_p)
    def answer(num_msg: int, msg: int, resp: int, appdata: int) -> int:
        array = calloc(num_msg, 16)
        for i in range(num_msg):
            if c_int.from_address(pointer_at(msg + 8 * i).value).value in (1, 2):
                pointer_at(array + 16 * i).value = strdup(secret)
        pointer_at(resp).value = array
        return 0

    class Conv(Structure):
        _fields_ = [("conv", type(answer)), ("appdata_ptr", c_void_p)]

    conv = Conv(answer, None)
    start, end = pam.pam_start, pam.pam_end
    start.argtypes = [c_char_p, c_char_p, c_void_p, c_void_p]
    end.argtypes = [c_void_p, c_int]
    phases = [pam.pam_authenticate, pam.pam_acct_mgmt]
    for phase in phases:
        phase.argtypes = [c_void_p, c_int]
    raw_service, raw_user = service.encode(), user.encode()

    def transaction() -> None:
        handle = c_void_p()
        code = start(raw_service, raw_user, byref(conv), byref(handle))
        for phase in phases:
            code = code or phase(handle, 0)
        end(handle, code)
        if code:
            raise RuntimeError(f"ctypes floor: PAM error {code}")

    return transaction


CONTENDERS = {
    "pamphlet": pamphlet_transaction,
    "python-pam": python_pam_transaction,
    "pamela": pamela_transaction,
    "ctypes-floor": ctypes_floor_transaction,
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
