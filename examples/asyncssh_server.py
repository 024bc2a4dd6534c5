"""An asyncio SSH server that logs users in through PAM: asyncssh with AsyncPamApplication.

    python examples/asyncssh_server.py --port 2222 --service login [--confdir DIR]
        [--host-key FILE] [--login-grace SECONDS] [--max-startups N]

The same behaviour as examples/ssh_server.py (paramiko, threads), on one
event loop: keyboard-interactive authentication through PAM (the stack's
questions become prompts, its info and error messages the challenge's
instructions), then ``account_management``; when the password has expired,
the change (``change_authtoken(change_expired_authtoken=True)``) follows in
the same exchange, as OpenSSH's sshd does, and only then is the user let in.
An exec or shell request logs the user in for real (pamphlet.process): as
root, for a user that NSS knows, credentials are established after
initgroups, the PAM session opened, and the command (``SHELL -c COMMAND``) or
a login shell runs as the user, on a pseudo-terminal when the client asked
for one; its output and exit status go to the client, and the session is
closed when it exits. Not root, or a user without an account (the test
stacks' pam_matrix users): the server says why on stderr and answers
``Hello USER`` and the session's PAM environment, exit status 0, as before.
The handle is ended when the channel closes.

asyncssh asks for a challenge in one coroutine and hands the answers to the
next one, while PAM asks from inside a phase. The bridge is the login's
``conversation`` coroutine: it hands the messages to the pending challenge
through a queue and awaits the answers.

Each login's phases run in a task of their own (:attr:`KbdintLogin.task`),
never in asyncssh's authentication tasks: asyncssh cancels those when the
client retries or goes away, as often as it likes, and a phase cancelled
twice would stop waiting for its thread while that thread is still inside
libpam. A login is ended by one closing task (:func:`close_login`), started
once per login and never cancelled: it cancels the phase once, waits for its
thread, closes the session and ends the handle. Whoever needs the login gone
awaits that task through :func:`asyncio.shield`, so that its own
cancellation goes on and the closing still completes.

Needs asyncssh: ``pip install 'pamphlet[ssh]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import asyncssh

import pamphlet
from pamphlet.process import LoginRefused, UserProcess, UserSession

logger = logging.getLogger("ssh.auth")

#: How long a client has to log in (sshd's LoginGraceTime; asyncssh's login_timeout).
LOGIN_GRACE = 120.0
#: Connections not yet logged in, at most (the first number of sshd's MaxStartups).
MAX_STARTUPS = 10

# What the login task hands to the challenge: messages to ask, its failure, or None.
Step = list[pamphlet.Message] | BaseException | None

#: Logins whose PAM handle has not been ended yet, and the tasks ending them.
open_logins: set[KbdintLogin] = set()
closing_tasks: set[asyncio.Task[None]] = set()
#: Connections that have not logged in yet (see --max-startups).
startups: set[PamSshServer] = set()


class KbdintLogin(pamphlet.AsyncPamApplication):
    """A PAM login whose conversation is the SSH client's keyboard-interactive prompts."""

    def __init__(self, service: str, username: str, **kwargs: Any) -> None:
        super().__init__(service, username, **kwargs)
        # For the log: reading the `user` item needs the handle, which a
        # phase may be holding inside libpam.
        self.username = username
        self.steps: asyncio.Queue[Step] = asyncio.Queue()
        self.answers: asyncio.Future[list[str]] | None = None
        self.asked: list[pamphlet.Message] = []
        self.authenticated = False
        self.session_open = False
        self.session_said: list[str] = []
        self.running = False  # a program runs as the user: the session stays until it exits
        self.task: asyncio.Task[None] | None = None
        self.closing: asyncio.Task[None] | None = None

    async def conversation(self, messages: list[pamphlet.Message]) -> list[str]:
        if self.authenticated:
            # Credentials and session: nobody can be asked any more. Keep
            # what the modules say for the session; a question fails the phase.
            if any(message.is_prompt for message in messages):
                raise PermissionError("a session module asked a question after authentication")
            self.session_said.extend(messages)
            return [""] * len(messages)
        self.answers = asyncio.get_running_loop().create_future()
        self.steps.put_nowait(messages)
        return await self.answers

    async def log_in(self) -> None:
        """authenticate, account_management (and an expired password's change).

        The outcome goes to the steps: None, or the exception that refused
        the login. A cancellation (only :func:`close_login` cancels this
        task) goes on.
        """
        try:
            await self.authenticate()
            try:
                await self.account_management()
            except pamphlet.NewAuthTokenRequired:
                # As sshd: the password has expired. The client changes it
                # now, in the same keyboard-interactive exchange; the login
                # goes on only if the change succeeds.
                logger.info("the password of %s has expired: changing it", self.username)
                await self.change_authtoken(change_expired_authtoken=True)
        except Exception as error:
            self.steps.put_nowait(error)
        else:
            self.steps.put_nowait(None)

    def answer(self, responses: Sequence[str]) -> bool:
        """Give the client's responses to the waiting conversation; False if they do not fit."""
        if self.answers is None or self.answers.done():
            return False
        responses = list(responses)
        if len(responses) != sum(message.is_prompt for message in self.asked):
            return False
        self.answers.set_result([responses.pop(0) if m.is_prompt else "" for m in self.asked])
        return True


def start_login(service: str, username: str, confdir: str | None, rhost: str | None) -> KbdintLogin:
    login = KbdintLogin(service, username, confdir=confdir)
    open_logins.add(login)
    logger.info("PAM handle of %s started (%d open)", username, len(open_logins))
    login.rhost = rhost
    login.task = asyncio.get_running_loop().create_task(login.log_in())
    return login


def close_login(login: KbdintLogin) -> asyncio.Task[None]:
    """The task that ends ``login``: started on the first call, the same one after.

    Await it through :func:`asyncio.shield`: it must run to its end even if
    the one awaiting it is cancelled (asyncssh cancels its authentication
    tasks when the client retries or goes away).
    """
    if login.closing is None:
        login.closing = asyncio.get_running_loop().create_task(_close(login))
        closing_tasks.add(login.closing)
        login.closing.add_done_callback(closing_tasks.discard)
    return login.closing


async def _close(login: KbdintLogin) -> None:
    try:
        task = login.task
        if task is not None and not task.done():
            # Cancelled once, and only here: the phase aborts its conversation
            # (PAM_CONV_ERR) and waits for its thread to leave libpam.
            task.cancel()
            await asyncio.wait([task])
        if login.session_open:
            login.session_open = False
            try:
                await login.close_session()
            except pamphlet.PamError as error:
                logger.warning("closing the session of %s failed: %r", login.username, error)
        await login.end()
    except Exception:
        logger.exception("ending the PAM handle of %s failed", login.username)
        raise
    finally:
        open_logins.discard(login)
    logger.info("PAM handle of %s ended (%d open)", login.username, len(open_logins))


class PamSshServer(asyncssh.SSHServer):
    """One connection: keyboard-interactive through PAM, then one session."""

    def __init__(self, service: str, confdir: str | None, max_startups: int) -> None:
        self.service = service
        self.confdir = confdir
        self.max_startups = max_startups
        self.client_host: str | None = None
        self.login: KbdintLogin | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.client_host = conn.get_extra_info("peername")[0]
        if len(startups) >= self.max_startups:
            logger.warning("too many logins in progress: %s refused", self.client_host)
            conn.abort()
            return
        startups.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # A login left half done (or a session) ends now: its phase's
        # thread is released, its handle ended.
        startups.discard(self)
        login = self.login
        if login is not None and login.running:
            return  # run_as_user ends it once the program has exited (a pty's gets SIGHUP)
        self.release_login()

    def release_login(self) -> asyncio.Task[None] | None:
        """Start ending this connection's login, if any; the task that ends it."""
        login, self.login = self.login, None
        return None if login is None else close_login(login)

    async def end_login(self) -> None:
        """End this connection's login and wait until it has ended.

        Cancelling the caller does not stop the ending: the closing task
        runs on, and the cancellation goes on to the caller's caller.
        """
        closing = self.release_login()
        if closing is not None:
            await asyncio.shield(closing)

    def begin_auth(self, username: str) -> bool:
        return True

    def kbdint_auth_supported(self) -> bool:
        return True

    async def get_kbdint_challenge(
        self, username: str, lang: str, submethods: str
    ) -> asyncssh.KbdIntChallenge:
        await self.end_login()  # a retry starts afresh, once the last attempt has ended
        self.login = start_login(self.service, username, self.confdir, self.client_host)
        return await self.next_challenge(self.login)

    async def validate_kbdint_response(
        self, username: str, responses: Sequence[str]
    ) -> asyncssh.KbdIntChallenge:
        login = self.login
        if login is None:
            return False
        if not login.answer(responses):
            logger.warning("the answers of %s did not fit the prompts", login.username)
            await self.end_login()
            return False
        return await self.next_challenge(login)

    async def next_challenge(self, login: KbdintLogin) -> asyncssh.KbdIntChallenge:
        """The client's next prompts, or True/False once the login is decided."""
        step = await login.steps.get()
        if isinstance(step, BaseException):
            logger.warning("login of %s refused: %r", login.username, step)
            if login is self.login:
                await self.end_login()
            return False
        if step is None:
            login.authenticated = True
            startups.discard(self)
            logger.info("%s logged in from %s", login.username, self.client_host)
            return True
        login.asked = step
        instructions = "\n".join(message for message in step if not message.is_prompt)
        prompts = [(str(m), not m.wants_password) for m in step if m.is_prompt]
        return "", instructions, "", prompts

    async def run_session(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        login = self.login
        if login is None or not login.authenticated or login.session_open:
            process.stderr.write(b"session refused: one session per connection\r\n")
            process.exit(1)
            return
        session = UserSession(login)
        try:
            session.check()
        except LoginRefused as why:
            logger.info("no program runs for %s: %s", login.username, why)
            process.stderr.write(f"pamphlet: no shell for {login.username}: {why}\r\n".encode())
        else:
            await self.run_as_user(process, login, session)
            return
        try:
            await login.initialize_credentials()
            await login.open_session()
            login.session_open = True
        except pamphlet.PamError as error:
            process.stderr.write(f"session refused: {error}\r\n".encode())
            process.exit(1)
            return
        for message in login.session_said:
            process.stderr.write(f"{message}\r\n".encode())
        lines = [f"Hello {login.user}"]
        lines += [f"{name}={value}" for name, value in sorted(login.environ.items())]
        process.stdout.write("".join(line + "\n" for line in lines).encode())
        process.exit(0)
        await self.end_login()  # the channel is closing: close the session, end the handle

    async def run_as_user(
        self, process: asyncssh.SSHServerProcess[bytes], login: KbdintLogin, session: UserSession
    ) -> None:
        """The client's command, or a login shell, as the user in the PAM session.

        The session's phases and the start run on a thread (they block; the
        phases' conversation runs here, on the loop); the copying is the loop's.
        """
        environment = {}
        terminal = process.get_terminal_type()
        pty: bool | tuple[int, int] = False
        if terminal is not None:
            environment["TERM"] = terminal
            columns, rows = process.get_terminal_size()[:2]
            pty = (rows or 24, columns or 80)
        command = process.command
        pipes = {} if pty else {"stdin": -1, "stdout": -1, "stderr": -1}

        def start() -> UserProcess:
            if command is None:
                return session.shell(pty=pty, env=environment)
            return session.shell(command, pty=pty, env=environment, **pipes)

        try:
            child = await asyncio.to_thread(start)
        except (pamphlet.PamError, LoginRefused, OSError) as error:
            process.stderr.write(f"session refused: {error}\r\n".encode())
            process.exit(1)
            try:
                await asyncio.to_thread(session.close)
            except pamphlet.PamError as failure:
                logger.warning("closing the session of %s failed: %r", login.username, failure)
            await self.end_login()
            return
        for message in login.session_said:
            process.stderr.write(f"{message}\r\n".encode())
        logger.info("%s runs pid %d", login.username, child.pid)
        login.running = True
        try:
            status = await relay(process, child)
            try:
                await asyncio.to_thread(session.close)
            except pamphlet.PamError as error:
                logger.warning("closing the session of %s failed: %r", login.username, error)
        finally:
            login.running = False
        process.exit(status)
        await self.end_login()


async def relay(process: asyncssh.SSHServerProcess[bytes], child: UserProcess) -> int:
    """Copy between the channel and the program until it exits; its exit status."""
    loop = asyncio.get_running_loop()
    if child.pty is not None:
        outputs = [(os.dup(child.pty.fileno()), process.stdout.write)]
        sink = os.dup(child.pty.fileno())
    else:
        assert child.stdin and child.stdout and child.stderr
        outputs = [
            (os.dup(child.stdout.fileno()), process.stdout.write),
            (os.dup(child.stderr.fileno()), process.stderr.write),
        ]
        sink = os.dup(child.stdin.fileno())
        for pipe in (child.stdin, child.stdout, child.stderr):
            pipe.close()

    async def copy_out(source: int, write: Callable[[bytes], object]) -> None:
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(source, "rb", 0)
        )
        try:
            while data := await reader.read(32768):
                write(data)
        except OSError:  # EIO: the terminal's last process has gone
            pass
        finally:
            transport.close()

    async def copy_in() -> None:
        try:
            while True:
                try:
                    data = await process.stdin.read(32768)
                except asyncssh.TerminalSizeChanged as change:
                    if child.pty is not None and change.height and change.width:
                        child.resize(change.height, change.width)
                    continue
                if not data:
                    break
                os.write(sink, data)  # small, typed input: a blocking write is brief
        except (OSError, ValueError, asyncssh.Error):
            pass
        finally:
            os.close(sink)  # the client's EOF reaches the program
        if child.pty is not None:
            # A terminal has no EOF to pass on; the client leaving is a hangup,
            # as when sshd closes the pty: the shell gets SIGHUP.
            await process.channel.wait_closed()
            if child.poll() is None:
                child.send_signal(signal.SIGHUP)

    copies = [loop.create_task(copy_out(*output)) for output in outputs]
    typing = loop.create_task(copy_in())
    returncode = await asyncio.to_thread(child.wait)
    await asyncio.wait(copies, timeout=5)  # what it wrote last, unless a daemon holds the pipe
    typing.cancel()
    if child.pty is not None:
        child.pty.close()  # (kept until now for window changes)
    return returncode if returncode >= 0 else 128 - returncode


async def handle_process(process: asyncssh.SSHServerProcess[bytes]) -> None:
    server = process.get_extra_info("connection").get_owner()
    await server.run_session(process)


async def serve(args: argparse.Namespace) -> None:
    if args.host_key:
        host_key = asyncssh.read_private_key(args.host_key)
    else:
        host_key = asyncssh.generate_private_key("ssh-ed25519")
    listener = await asyncssh.create_server(
        lambda: PamSshServer(args.service, args.confdir, args.max_startups),
        "127.0.0.1",
        args.port,
        server_host_keys=[host_key],
        process_factory=handle_process,
        kbdint_auth=True,
        password_auth=False,
        public_key_auth=False,
        login_timeout=args.login_grace,
        encoding=None,  # bytes: a program's output is not ours to decode
        line_editor=False,  # a pty's echo and editing are the program's
    )
    port = listener.sockets[0].getsockname()[1]
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await listener.wait_closed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--service", required=True, help="the PAM service name")
    parser.add_argument("--confdir", help="read the PAM service from here, not /etc/pam.d")
    parser.add_argument("--host-key", help="a private key file; generated when not given")
    parser.add_argument(
        "--login-grace", type=float, default=LOGIN_GRACE, help="seconds a client has to log in"
    )
    parser.add_argument(
        "--max-startups",
        type=int,
        default=MAX_STARTUPS,
        help="connections not yet logged in, at most; more are closed at once",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
