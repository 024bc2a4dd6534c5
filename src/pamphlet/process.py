"""Run a program as the authenticated user, inside the PAM session: su's order.

The parent, as root, does what util-linux ``su`` does before it forks:
``initgroups``, ``pam_setcred(PAM_ESTABLISH_CRED)``, ``pam_open_session``.
The child is started by :class:`subprocess.Popen`, whose C code between fork
and exec does the rest with no Python in between (a threaded server may fork
safely): ``setsid``, ``setgroups``, ``setregid``, ``setreuid`` (real,
effective and saved ids alike), every descriptor closed but stdio, the
environment replaced. Popen then executes a few lines of Python, already
running as the user (``_CHILD``): they take the controlling terminal
(a pty), change to the home directory (``/`` when it is missing, as sshd),
and execute the program with the ``argv[0]`` asked for (``-bash`` for a
login shell). The parent waits, then ``pam_close_session``, then
``pam_setcred(PAM_DELETE_CRED)``; ending the handle stays the application's.

See the guide's "Sessions and processes" for the order and why.
"""

from __future__ import annotations

import asyncio
import errno as errno_codes
import fcntl
import grp
import inspect
import json
import logging
import os
import pwd
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Mapping, Sequence
from types import FrameType, TracebackType
from typing import IO, Any, Self

from . import _libpam
from .application import ApplicationBase
from .constants import Phase, ReturnCode
from .errors import HandleEndedError

__all__ = [
    "UserSession",
    "UserProcess",
    "run_as_user",
    "LoginRefused",
    "NotRootError",
    "UnknownUserError",
    "LoginIncompleteError",
    "BrokeredHandleError",
    "DEFAULT_PATH",
]

audit = logging.getLogger("pamphlet.process")

#: PATH for the user's programs (Debian's ENV_PATH in /etc/login.defs);
#: root gets ENV_SUPATH. pam_env may set its own, which wins.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Seconds between forwarding a signal to the child and killing it (su's 2 s).
KILL_AFTER = 2.0

_SUCCESS = int(ReturnCode.SUCCESS)
_NEW_AUTHTOK_REQD = int(ReturnCode.NEW_AUTHTOK_REQD)

# Module calls that change this whole process: initgroups and pam_group's
# setcred change its groups, pam_limits and pam_umask change its limits and
# umask in open_session. Each is borrowed for one PAM call and given back,
# one login at a time.
_PROCESS_STATE = threading.Lock()
_LIMITS = tuple(
    sorted(
        getattr(resource, name)
        for name in dir(resource)
        if name.startswith("RLIMIT_") and isinstance(getattr(resource, name), int)
    )
)


class LoginRefused(RuntimeError):
    """pamphlet refused to run anything as the user; nothing was started."""


class NotRootError(LoginRefused, PermissionError):
    """Running a program as another user needs root (setgroups, setgid, setuid)."""


class UnknownUserError(LoginRefused, LookupError):
    """The authenticated user has no account that NSS (getpwnam) knows."""


class LoginIncompleteError(LoginRefused):
    """A phase that must come first did not succeed on this handle."""


class BrokeredHandleError(LoginRefused):
    """The handle lives in a broker's worker: its modules change that process, not this one."""


def _refuse(error: LoginRefused, app: ApplicationBase, user: str | None) -> LoginRefused:
    audit.warning(
        "refused=%s service=%s user=%s reason=%s",
        type(error).__name__,
        json.dumps(_safe(lambda: app.service)),
        json.dumps(user),
        json.dumps(str(error)),
    )
    return error


def _safe(read: Callable[[], str | None]) -> str | None:
    try:
        return read()
    except Exception:
        return None


def _limits() -> dict[int, tuple[int, int]]:
    return {limit: resource.getrlimit(limit) for limit in _LIMITS}


def _umask() -> int:
    # Read, never set-and-restore: another thread creating a file in between
    # would get the wrong mode.
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise OSError(errno_codes.ENOTSUP, "no Umask line in /proc/self/status")


def _restore_limits(saved: dict[int, tuple[int, int]]) -> None:
    for limit, value in saved.items():
        if resource.getrlimit(limit) != value:
            try:
                resource.setrlimit(limit, value)
            except (OSError, ValueError) as error:
                # A hard limit a module lowered comes back only with
                # CAP_SYS_RESOURCE, which containers often drop.
                audit.warning(
                    "this process keeps the limit %d=%s that a session module set: %s",
                    limit,
                    resource.getrlimit(limit),
                    error,
                )


class UserSession:
    """The PAM session of an authenticated user, and the programs run in it.

    ::

        with UserSession(app) as session:          # checks; opens on first use
            process = session.popen(["id", "-un"], stdout=subprocess.PIPE)
            output, _ = process.communicate()
        # here: close_session, then setcred(PAM_DELETE_CRED)

    Refuses (:class:`LoginRefused`) unless this process is root, the user
    item names an account NSS knows, and ``authenticate`` and
    ``account_management`` succeeded on this handle (an expired password
    counts once ``change_authtoken`` succeeded after it). With
    ``session_only=True`` only the session is required, as ``runuser``.

    :meth:`open` establishes credentials (after ``initgroups``) and opens
    the session, unless the application already did; :meth:`close` closes
    and deletes what :meth:`open` opened. Works with every flavour; with
    :class:`~pamphlet.AsyncPamApplication`, make the session on the event
    loop and call :meth:`open`, :meth:`close` and ``wait`` from a thread
    (``await asyncio.to_thread(session.open)``): its phases run on the loop.
    """

    def __init__(self, app: ApplicationBase, *, session_only: bool = False) -> None:
        self.app = app
        self.session_only = session_only
        self.processes: list[UserProcess] = []
        self._lock = threading.RLock()
        self._opened = False
        self._established_here = False
        self._session_opened_here = False
        self._account: pwd.struct_passwd | None = None
        self._groups: list[int] = []
        self._limits: dict[int, tuple[int, int]] | None = None
        self._umask: int = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        flavour = sys.modules.get("pamphlet.aio")
        if flavour is not None and isinstance(app, flavour.AsyncPamApplication):
            self._loop = asyncio.get_running_loop()  # its phases are coroutines on this loop

    # -- checks -------------------------------------------------------------------

    @property
    def account(self) -> pwd.struct_passwd:
        """The user's passwd entry (the PAM user item, read after the phases)."""
        if self._account is None:
            self.check()
        assert self._account is not None
        return self._account

    def check(self) -> None:
        """Raise the LoginRefused that stops anything from running as the user, if any."""
        app = self.app
        user = _safe(lambda: app.user)
        if os.geteuid() != 0:
            raise _refuse(
                NotRootError(
                    f"running a program as {user!r} needs root (this process runs as uid "
                    f"{os.geteuid()}): setgroups, setgid and setuid need it. The pamphlet broker "
                    "authenticates and opens sessions for an unprivileged server, but starts no "
                    "process as the user: run this part as root, as sshd's privileged monitor does"
                ),
                app,
                user,
            )
        if app.ended:
            raise HandleEndedError("the PAM handle has ended: nothing runs in its session")
        if not isinstance(app._transaction._handle, _libpam.Handle):
            raise _refuse(
                BrokeredHandleError(
                    f"the PAM handle of {user!r} lives in a pamphlet broker worker: pam_group, "
                    "pam_limits and pam_env would set up that worker, not the process started "
                    "here; run the login in this process (as root) to run programs in it"
                ),
                app,
                user,
            )
        if not user:
            raise _refuse(UnknownUserError("the PAM handle names no user"), app, user)
        try:
            account = pwd.getpwnam(user)
        except KeyError:
            raise _refuse(
                UnknownUserError(
                    f"the user {user!r} has no account that NSS knows (getpwnam): "
                    "PAM said who they are, but there is no uid, home or shell to run as"
                ),
                app,
                user,
            ) from None
        results = app._transaction.results
        missing = []
        if not self.session_only:
            if results.get(Phase.AUTHENTICATE) != _SUCCESS:
                missing.append("authenticate")
            account_result = results.get(Phase.ACCT_MGMT)
            changed = results.get(Phase.CHAUTHTOK) == _SUCCESS
            if not (
                account_result == _SUCCESS or (account_result == _NEW_AUTHTOK_REQD and changed)
            ):
                missing.append("acct_mgmt")
        for phase in (Phase.SETCRED, Phase.OPEN_SESSION):
            if results.get(phase, _SUCCESS) != _SUCCESS:
                missing.append(f"{phase.value} (it failed)")
        if missing:
            raise _refuse(
                LoginIncompleteError(
                    f"nothing runs as {user!r}: {', '.join(missing)} did not succeed on this "
                    "PAM handle"
                    + ("" if self.session_only else " (session_only=True skips the login checks)")
                ),
                app,
                user,
            )
        self._account = account

    # -- the session ----------------------------------------------------------------

    def _phase(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        outcome = method(*args, **kwargs)
        if inspect.isawaitable(outcome):  # AsyncPamApplication: on its loop
            assert self._loop is not None
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self._loop:
                outcome.close()  # type: ignore[attr-defined]
                raise RuntimeError(
                    "UserSession of an AsyncPamApplication: call open(), close() and wait() "
                    "from a thread (asyncio.to_thread), not on its event loop"
                )
            asyncio.run_coroutine_threadsafe(outcome, self._loop).result()  # type: ignore[arg-type]

    @property
    def opened(self) -> bool:
        """Whether :meth:`open` succeeded (and :meth:`close` has not run)."""
        return self._opened

    def open(self) -> None:
        """initgroups, setcred(ESTABLISH), open_session: those not done on this handle yet.

        A failure deletes the credentials established here and raises.
        """
        with self._lock:
            if self._opened:
                return
            self.check()
            account = self.account
            transaction = self.app._transaction
            if not transaction.credentials_established:
                with _PROCESS_STATE:
                    saved = os.getgroups()
                    # Before setcred: pam_group adds its groups to these.
                    os.initgroups(account.pw_name, account.pw_gid)
                    try:
                        self._phase(self.app.initialize_credentials)  # type: ignore[attr-defined]
                        self._groups = os.getgroups()
                    finally:
                        os.setgroups(saved)
                self._established_here = True
            else:
                # Established by the caller without initgroups first: the
                # account's own groups (any that pam_group added went to this process).
                self._groups = os.getgrouplist(account.pw_name, account.pw_gid)
            if not transaction.session_open:
                try:
                    with _PROCESS_STATE:
                        limits, umask = _limits(), _umask()
                        try:
                            self._phase(self.app.open_session)  # type: ignore[attr-defined]
                            self._limits, self._umask = _limits(), _umask()
                        finally:
                            _restore_limits(limits)
                            os.umask(umask)
                except BaseException:
                    self._delete_credentials()
                    raise
                self._session_opened_here = True
            audit.info(
                "opened service=%s user=%s uid=%d groups=%s",
                json.dumps(_safe(lambda: self.app.service)),
                json.dumps(account.pw_name),
                account.pw_uid,
                ",".join(map(str, self._groups)),
            )
            self._opened = True

    def _delete_credentials(self) -> None:
        if self._established_here:
            self._established_here = False
            self._phase(self.app.delete_credentials)  # type: ignore[attr-defined]

    def close(self) -> None:
        """close_session, then setcred(DELETE): what :meth:`open` did; both are tried.

        Does not wait for processes; :meth:`wait` (or leaving the ``with``) does.
        """
        with self._lock:
            failure: BaseException | None = None
            if self._session_opened_here:
                self._session_opened_here = False
                try:
                    self._phase(self.app.close_session)  # type: ignore[attr-defined]
                except BaseException as error:
                    failure = error
            try:
                self._delete_credentials()
            except BaseException as error:
                failure = failure or error
            if self._opened:
                self._opened = False
                audit.info(
                    "closed service=%s user=%s",
                    json.dumps(_safe(lambda: self.app.service)),
                    json.dumps(self._account.pw_name if self._account else None),
                )
            if failure is not None:
                raise failure

    def wait(self) -> None:
        """Wait until every process started in this session has exited."""
        for process in self.processes:
            process.wait()

    def __enter__(self) -> Self:
        self.check()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            for process in self.processes:
                if process.poll() is None:
                    process.terminate()
        try:
            self.wait()
        finally:
            self.close()

    # -- processes ---------------------------------------------------------------------

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The child's environment: the login variables, the PAM environment, ``extra``.

        Never this process's own environment.
        """
        account = self.account
        environment = {
            "HOME": account.pw_dir,
            "SHELL": account.pw_shell or "/bin/sh",
            "USER": account.pw_name,
            "LOGNAME": account.pw_name,
            "PATH": ROOT_PATH if account.pw_uid == 0 else DEFAULT_PATH,
        }
        environment.update(self.app.environ.items())
        if extra:
            environment.update(extra)
        return environment

    def popen(
        self,
        args: Sequence[str | bytes],
        *,
        executable: str | bytes | None = None,
        argv0: str | bytes | None = None,
        stdin: Any = None,
        stdout: Any = None,
        stderr: Any = None,
        pty: bool | tuple[int, int] = False,
        env: Mapping[str, str] | None = None,
        text: bool | None = None,
        encoding: str | None = None,
        errors: str | None = None,
        bufsize: int = -1,
    ) -> UserProcess:
        """Start ``args`` as the user in this session (opened first if need be).

        ``stdin``, ``stdout``, ``stderr``, ``text``, ``encoding``,
        ``errors``, ``bufsize`` are Popen's. ``executable`` is looked up in
        the user's PATH when it has no slash; ``argv0`` replaces
        ``args[0]`` as the program sees it (``-bash`` for a login shell).
        ``pty=True`` (or ``(rows, columns)``) gives the child a new
        pseudo-terminal as stdin, stdout, stderr and controlling terminal,
        and sets the PAM_TTY item to its name; the parent's side is
        :attr:`UserProcess.pty`. ``env`` adds to :meth:`environment`.
        """
        return UserProcess(
            self,
            args,
            executable=executable,
            argv0=argv0,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pty=pty,
            env=env,
            text=text,
            encoding=encoding,
            errors=errors,
            bufsize=bufsize,
        )

    def shell(self, command: str | None = None, **kwargs: Any) -> UserProcess:
        """The user's shell: a login shell (``-sh`` as argv[0]), or ``sh -c command``."""
        shell = self.account.pw_shell or "/bin/sh"
        if command is None:
            name = "-" + os.path.basename(shell)
            return self.popen([shell], executable=shell, argv0=name, **kwargs)
        return self.popen([shell, "-c", command], executable=shell, **kwargs)


# What runs in the child after Popen's exec, as the user, in a fresh
# interpreter with no threads: reads its orders from the socket (fd argv[1]),
# takes the terminal, changes directory, executes. The socket is close-on-exec:
# the parent reads EOF once the program runs, or the errno that stopped it.
_CHILD = """\
import json, os, signal, sys
channel = int(sys.argv[1])
data = b""
while True:
    chunk = os.read(channel, 65536)
    if not chunk:
        break
    data += chunk
orders = json.loads(data)
raw = lambda text: text.encode("latin-1")
os.set_inheritable(channel, False)
for number in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(number, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_SETMASK, ())
step = "setrlimit"
try:
    import resource
    for limit, soft, hard in orders["limits"]:
        if resource.getrlimit(limit) != (soft, hard):
            resource.setrlimit(limit, (soft, hard))
    step = "TIOCSCTTY"
    if orders["ctty"]:
        import fcntl, termios
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    step = "chdir"
    try:
        os.chdir(raw(orders["home"]))
    except OSError as error:
        os.write(2, b"Could not chdir to home directory " + raw(orders["home"])
                 + b": " + os.strerror(error.errno).encode() + b"\\n")
        os.chdir("/")
        os.write(channel, b"cwd /\\n")
    step = "exec"
    environment = {raw(k): raw(v) for k, v in orders["env"]}
    program = raw(orders["executable"])
    arguments = [raw(a) for a in orders["argv"]]
    if b"/" in program:
        os.execve(program, arguments, environment)
    path = environment.get(b"PATH", b"/usr/bin:/bin")
    last = OSError(2, "No such file or directory")
    for folder in path.split(b":"):
        try:
            os.execve(os.path.join(folder or b".", program), arguments, environment)
        except OSError as error:
            if error.errno not in (2, 20):
                last = error
            if error.errno not in (2, 20, 13):
                raise
    raise last
except BaseException as error:
    number = getattr(error, "errno", None) or 22
    os.write(channel, ("error %s %d" % (step, number)).encode())
    os._exit(127)
"""


def _interpreter() -> str:
    """A Python the user may run: this one's real file, or the system's."""
    candidates = [getattr(sys, "_base_executable", ""), sys.executable, "/usr/bin/python3"]
    for candidate in candidates:
        if not candidate:
            continue
        path = os.path.realpath(candidate)
        if _world_runnable(path):
            return path
    raise LoginRefused(
        f"no Python interpreter that other users may run (tried {candidates}); the child "
        "needs one to take its terminal and change directory as the user"
    )


def _world_runnable(path: str) -> bool:
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        folder = os.path.dirname(path)
        while True:
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(folder)
            if parent == folder:
                return True
            folder = parent
    except OSError:
        return False


def _latin1(value: str | bytes) -> str:
    raw = value if isinstance(value, bytes) else os.fsencode(value)
    if 0 in raw:
        raise ValueError(f"{value!r} contains a NUL byte")
    return raw.decode("latin-1")


def _set_window_size(descriptor: int, rows: int, columns: int) -> None:
    fcntl.ioctl(descriptor, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


class UserProcess(subprocess.Popen):  # type: ignore[type-arg]
    """A program running as the user in a :class:`UserSession`: a subprocess.Popen.

    ``stdin``, ``stdout``, ``stderr``, ``returncode``, ``wait()``,
    ``communicate()``, ``send_signal()`` are Popen's; ``args`` are the
    program's own. :attr:`pty` is the parent's side of the pseudo-terminal
    (None without one), :attr:`cwd` where the program started (the home
    directory, or ``/`` when that was missing).
    """

    pty: IO[bytes] | None
    cwd: str

    def __init__(
        self,
        session: UserSession,
        args: Sequence[str | bytes],
        *,
        executable: str | bytes | None,
        argv0: str | bytes | None,
        stdin: Any,
        stdout: Any,
        stderr: Any,
        pty: bool | tuple[int, int],
        env: Mapping[str, str] | None,
        text: bool | None,
        encoding: str | None,
        errors: str | None,
        bufsize: int,
    ) -> None:
        if isinstance(args, (str, bytes)) or not args:
            raise TypeError("args must be a non-empty list: the program and its arguments")
        self.session = session
        self.pty = None
        session.check()
        account = session.account
        interpreter = _interpreter()
        slave = -1
        master = -1
        try:
            if pty:
                master, slave = os.openpty()
                rows, columns = pty if isinstance(pty, tuple) else (24, 80)
                _set_window_size(slave, rows, columns)
                tty_name = os.ttyname(slave)
                # As sshd: the terminal belongs to the user, writable by group tty.
                try:
                    tty_group = grp.getgrnam("tty").gr_gid
                except KeyError:
                    tty_group = account.pw_gid
                os.fchown(slave, account.pw_uid, tty_group)
                os.fchmod(slave, 0o620)
                session.app.tty = tty_name
                stdin = slave if stdin is None else stdin
                stdout = slave if stdout is None else stdout
                stderr = slave if stderr is None else stderr
            session.open()
            environment = session.environment(env)
            program = executable if executable is not None else args[0]
            argv = list(args)
            if argv0 is not None:
                argv[0] = argv0
            orders = {
                "ctty": bool(pty),
                "home": _latin1(account.pw_dir),
                "executable": _latin1(program),
                "argv": [_latin1(a) for a in argv],
                "env": [(_latin1(k), _latin1(v)) for k, v in environment.items()],
            }
            ours, theirs = socket.socketpair()
        except BaseException:
            for descriptor in (slave, master):
                if descriptor >= 0:
                    os.close(descriptor)
            raise
        try:
            with ours, theirs:
                super().__init__(
                    [interpreter, "-I", "-S", "-c", _CHILD, str(theirs.fileno())],
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    text=text,
                    encoding=encoding,
                    errors=errors,
                    bufsize=bufsize,
                    env={},
                    close_fds=True,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,
                    user=account.pw_uid,
                    group=account.pw_gid,
                    extra_groups=session._groups,
                    umask=session._umask,
                    cwd="/",
                )
                theirs.close()
                self.args = list(args)
                self._start(ours, orders)
        except BaseException:
            if master >= 0:
                os.close(master)
            raise
        finally:
            if slave >= 0:
                os.close(slave)
        if master >= 0:
            self.pty = open(master, "r+b", buffering=0)  # noqa: SIM115 - the caller's to close
        session.processes.append(self)
        audit.info(
            "started user=%s pid=%d program=%s",
            json.dumps(account.pw_name),
            self.pid,
            json.dumps(os.fsdecode(program)),
        )

    def _start(self, channel: socket.socket, orders: dict[str, Any]) -> None:
        """Give the waiting child its limits and orders; raise what stopped its exec."""
        try:
            limits = self.session._limits or {}
            for limit, (soft, hard) in limits.items():
                ours = resource.getrlimit(limit)[1]
                if ours != resource.RLIM_INFINITY and (
                    hard == resource.RLIM_INFINITY or hard > ours
                ):
                    # A raised hard limit: only root can give it (the child
                    # sets the others itself, as the user).
                    resource.prlimit(self.pid, limit, (soft, hard))
            orders["limits"] = [[limit, *value] for limit, value in limits.items()]
            channel.sendall(json.dumps(orders).encode("ascii"))
            channel.shutdown(socket.SHUT_WR)
            report = b""
            while chunk := channel.recv(4096):
                report += chunk
        except BaseException:
            self.kill()
            self.wait()
            raise
        self.cwd = self.session.account.pw_dir
        for line in report.decode("ascii", "replace").splitlines():
            words = line.split()
            if words[:2] == ["cwd", "/"]:
                self.cwd = "/"
            elif words[:1] == ["error"] and len(words) == 3:
                self.wait()
                number = int(words[2])
                program = os.fsdecode(orders["executable"].encode("latin-1"))
                if words[1] == "exec":
                    raise OSError(number, os.strerror(number), program)
                raise OSError(number, f"{os.strerror(number)} ({words[1]} in the child)")

    def resize(self, rows: int, columns: int) -> None:
        """Set the pseudo-terminal's window size (the child gets SIGWINCH)."""
        if self.pty is None:
            raise ValueError("this process has no pseudo-terminal")
        _set_window_size(self.pty.fileno(), rows, columns)

    def __exit__(self, *exc_info: Any) -> None:
        super().__exit__(*exc_info)
        if self.pty is not None:
            self.pty.close()


class _Forwarder:
    """While the child runs: signals that would end the parent go to the child."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)

    def __init__(self, process: UserProcess) -> None:
        self.process = process
        self.caught: int | None = None
        self.saved: dict[int, Any] = {}
        self.timer: threading.Timer | None = None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self.saved[number] = signal.signal(number, self.forward)
        return self

    def forward(self, number: int, frame: FrameType | None) -> None:
        if self.caught is None:
            self.caught = number
            # As su: the child gets SIGTERM, and SIGKILL if it outlives the grace.
            self.timer = threading.Timer(KILL_AFTER, self.process.kill)
            self.timer.daemon = True
            self.timer.start()
        self.process.send_signal(signal.SIGTERM if number != signal.SIGHUP else number)

    def __exit__(self, *exc_info: object) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for number, handler in self.saved.items():
            signal.signal(number, handler)


def run_as_user(
    app: ApplicationBase | UserSession,
    args: Sequence[str | bytes],
    *,
    session_only: bool = False,
    input: bytes | str | None = None,  # noqa: A002 - subprocess.run's name
    capture_output: bool = False,
    **popen_kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """su in one call: open the session, run ``args`` as the user, wait, close.

    Like :func:`subprocess.run` (``input``, ``capture_output``, the Popen
    arguments of :meth:`UserSession.popen`); returns a CompletedProcess
    whose ``returncode`` is negative when a signal ended the program. On the
    main thread, SIGTERM, SIGHUP, SIGINT and SIGQUIT to this process are
    passed to the program (SIGKILL after :data:`KILL_AFTER` seconds), the
    session is closed, and then the signal takes its course here. ``app``
    may be a :class:`UserSession` (opened or not): it is closed at the end.
    """
    if capture_output:
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stderr", subprocess.PIPE)
    if input is not None:
        popen_kwargs.setdefault("stdin", subprocess.PIPE)
    caught: int | None = None
    session = app if isinstance(app, UserSession) else UserSession(app, session_only=session_only)
    with session:
        with session.popen(args, **popen_kwargs) as process, _Forwarder(process) as forwarder:
            stdout, stderr = process.communicate(input)
        caught = forwarder.caught
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if caught is not None:
        signal.raise_signal(caught)  # the session is closed: now it may end this process
    return result
