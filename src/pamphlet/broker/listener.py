"""The broker's listening socket: the one systemd passed, or one bound at a path.

Whoever can write the socket's directory can put a socket of their own at the
path: use a directory that root owns and nobody else may write.
"""

from __future__ import annotations

import grp
import os
import socket
import stat

__all__ = ["systemd_listener", "bind"]


def systemd_listener() -> socket.socket | None:
    """The socket systemd passed (socket activation), if it passed exactly one."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if os.environ.get("LISTEN_FDS") != "1":
        raise SystemExit("pamphlet broker: systemd must pass exactly one socket (LISTEN_FDS=1)")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    listener = socket.socket(fileno=3)
    if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM:
        raise SystemExit("pamphlet broker: the socket systemd passed is not a Unix stream socket")
    os.set_inheritable(3, False)
    return listener


def bind(path: str, mode: int, group: str | None) -> socket.socket:
    """Listen on ``path`` with ``mode`` and ``group``; a stale socket is replaced,
    a live broker's is not."""
    gid = -1
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise SystemExit(f"pamphlet broker: no group named {group!r}") from None
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise SystemExit(f"pamphlet broker: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise SystemExit(f"pamphlet broker: another broker listens on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound under a temporary name and renamed into place once it listens
    # with its final owner and mode: a client never finds a socket that
    # refuses it or lets the wrong peers in.
    building = f"{path}.{os.getpid()}.new"
    old_umask = os.umask(0o177)
    try:
        listener.bind(building)
    finally:
        os.umask(old_umask)
    try:
        os.chown(building, -1, gid)
        os.chmod(building, mode)
        listener.listen(socket.SOMAXCONN)
        os.rename(building, path)
    except BaseException:
        os.unlink(building)
        listener.close()
        raise
    return listener
