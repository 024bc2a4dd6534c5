"""The credentials a worker runs libpam with: those of a setuid-root program.

``su``, ``passwd`` and ``chsh`` are setuid root: their real uid is the user
who ran them, their effective uid is 0. Modules are written for that: they
ask ``getuid() == 0`` ("is the caller root?", pam_rootok, pam_unix's
old-password shortcut in chauthtok) and rely on the effective uid for the
privilege to read /etc/shadow. A worker therefore takes, before pam_start:

- real uid = the peer's uid (SO_PEERCRED), effective and saved uid 0;
- real gid = the peer's gid, effective and saved gid 0, and root's
  supplementary groups (as a program that is setuid *and* setgid root:
  files a module creates keep root's group, as they did before);
- not dumpable, and no core files: the peer may signal a process whose real
  uid is its own (SIGSTOP, SIGSEGV, SIGQUIT ...), and a core of a worker
  holds other people's passwords. Non-dumpable also keeps /proc/PID/mem,
  environ, fd/ and ptrace away from the peer (they need the dumpable flag or
  CAP_SYS_PTRACE; ptrace needs the effective uid to match anyway).

The broker enforces the worker's deadlines from outside
(:mod:`pamphlet.broker.watchdog`), because the peer can stop its worker.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal

__all__ = ["harden_worker", "become_setuid_program"]

_PR_SET_DUMPABLE = 4
#: Signals that only make sense for a terminal, or that a peer sends to
#: disturb its worker: they do nothing here (SIGSTOP cannot be ignored).
_IGNORED = (
    signal.SIGHUP,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def harden_worker() -> None:
    """In a fresh worker, before it knows its peer: not dumpable, no core, deaf
    to the signals above. (Off the login's path: spares do it while they wait.)"""
    libc = ctypes.CDLL(None, use_errno=True)  # prctl has no binding in os
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(error)}")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for signum in _IGNORED:
        signal.signal(signum, signal.SIG_IGN)


def become_setuid_program(uid: int, gid: int) -> None:
    """Take the peer's real uid and gid, keep effective root; fail closed.

    :func:`harden_worker` must have run: there is never a moment at which the
    peer could attach to, or dump, a process with its own real uid.
    """
    os.setresgid(gid, 0, 0)
    os.setresuid(uid, 0, 0)
    if os.getresuid() != (uid, 0, 0) or os.getresgid() != (gid, 0, 0):
        raise OSError(f"the worker's credentials are {os.getresuid()}, not ({uid}, 0, 0)")
