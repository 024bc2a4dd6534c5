"""An SSH server that logs users in through PAM: the API document's paramiko example, completed.

    python examples/ssh_server.py --port 2222 --service login [--confdir DIR]
        [--host-key FILE] [--login-grace SECONDS] [--max-startups N]

It listens on 127.0.0.1 (``--port 0`` picks a free port and prints it) and
offers keyboard-interactive authentication only. The PAM stack's questions
become the client's prompts; its info and error messages are shown to the
client as the query's instructions, never as prompts. After authentication
comes ``account_management``; when it says the password has expired, the
change (``change_authtoken(change_expired_authtoken=True)``) follows in the
same exchange, as OpenSSH's sshd does, and only then is the user let in.
When the client runs a command or a shell, the server logs the user in for
real, as sshd does (pamphlet.process): as root, for a user that NSS knows, it
establishes credentials after initgroups, opens the PAM session and runs the
command (``SHELL -c COMMAND``) or a login shell as the user, on a
pseudo-terminal when the client asked for one; the client gets its output
and exit status, and the session is closed when the program exits. When the
server is not root, or the user has no account (the test stacks' pam_matrix
users), it says why on stderr and answers ``Hello USER`` followed by the
session's PAM environment, exit status 0, as before. When the channel
closes, the handle ends.

paramiko asks its questions in one callback and hands the answers to another,
so the conversation cannot be a blocking function: ``authenticate()`` and
``change_authtoken()`` of ThreadedPamApplication run on a thread of their
own, read with get_data() and answered with set_input(). The phases that
do not ask (account management, credentials, the session) are plain calls;
what their modules say is read with pop_messages() and shown to the client.

A client gets ``--login-grace`` seconds to log in and ask for a session
(sshd's LoginGraceTime), every PAM conversation call at most
``PHASE_TIMEOUT`` seconds to be answered, and at most ``--max-startups``
connections may be logging in at once (the first number of sshd's
MaxStartups): more are closed before the SSH banner. A client that goes away,
or runs out of time, has its conversation aborted and its handle ended: no
thread and no PAM handle outlive it.

Needs paramiko: ``pip install 'pamphlet[ssh]'``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

import paramiko

import pamphlet
from pamphlet.process import LoginRefused, UserProcess, UserSession

#: How long a PAM conversation call may wait for the client's answers.
PHASE_TIMEOUT = 60.0
#: How long a client has to log in and ask for a session (sshd's LoginGraceTime).
LOGIN_GRACE = 120.0
#: Connections not yet logged in, at most (the first number of sshd's MaxStartups).
MAX_STARTUPS = 10

logger = logging.getLogger("ssh.auth")

# What get_data() says: messages to ask, the phase's failure, or None (success).
Data = list[pamphlet.Message] | BaseException | None


class OpenHandles:
    """How many PAM handles this server holds, for its log."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    def change(self, by: int) -> int:
        with self.lock:
            self.count += by
            return self.count


open_handles = OpenHandles()


class SshAuthInterface(paramiko.server.ServerInterface):
    """The API document's SshAuthInterface (docs/api-document.md), completed.

    The document's two callbacks are kept as written; what it leaves out is
    added: info and error messages go into the query's instructions, answers
    are matched back to the prompts (a client answering a different number
    of prompts fails), account management follows authentication (and an
    expired password's change), a retry ends the previous attempt's handle,
    and :meth:`end_pam` releases everything when the connection ends.

    paramiko calls the callbacks on the transport's thread, while
    :meth:`end_pam` comes from the thread serving the connection (when the
    client goes away or its time is up). Every handle is made and dropped
    under :attr:`lock`, and none is made once :meth:`end_pam` has been
    called.
    """

    def __init__(
        self, pam_service: str, confdir: str | None = None, client_host: str | None = None
    ) -> None:
        self.pam_service = pam_service
        self.confdir = confdir
        self.client_host = client_host
        self.lock = threading.Lock()
        self.closed = False  # end_pam() was called: no more handles
        self.pam: pamphlet.ThreadedPamApplication | None = None
        self.username = ""  # the handle's user, for the log
        self.phase_thread: threading.Thread | None = None
        self.stage = "authenticate"  # or "change": the phase on phase_thread
        self.asked: list[pamphlet.Message] = []
        # The outcome held back while the client reads the last messages.
        self.verdict: int | None = None
        self.authenticated = False
        self.session_open = False

    def get_allowed_auths(self, username: str) -> str:
        return "keyboard-interactive"

    def check_auth_interactive(
        self, username: str, submethods: str
    ) -> int | paramiko.server.InteractiveQuery:
        self.end_attempt()  # a retry starts afresh: the last attempt's handle ends first
        pam = self.start_pam(username)
        if pam is None:
            return paramiko.AUTH_FAILED  # the connection is being closed
        try:
            self.stage = "authenticate"
            self.phase_thread = pam.authenticate()
        except (pamphlet.PamError, RuntimeError) as error:  # ended under us: the time is up
            return self.refuse(pam, error)
        return self.respond(pam, self.next_data(pam))

    def check_auth_interactive_response(
        self, responses: list[str]
    ) -> int | paramiko.server.InteractiveQuery:
        pam = self.pam
        if pam is None:
            return paramiko.AUTH_FAILED
        answers = self.answers_to(responses)
        if self.verdict is not None:  # the client has read the last messages
            verdict, self.verdict = self.verdict, None
            if answers != []:
                return self.refuse(pam, ValueError("answers to a round without prompts"))
            return self.accept(pam) if verdict == paramiko.AUTH_SUCCESSFUL else self.drop(pam)
        if answers is None:
            logger.warning("the answers of %s did not fit the prompts", self.username)
            return self.refuse(pam, ValueError("the answers did not fit the prompts"))
        try:
            pam.set_input(answers)
        except RuntimeError as error:  # aborted or ended under us: the time is up
            return self.refuse(pam, error)
        return self.respond(pam, self.next_data(pam))

    # -- what the document's two callbacks share ---------------------------------------

    def respond(
        self, pam: pamphlet.ThreadedPamApplication, data: Data
    ) -> int | paramiko.server.InteractiveQuery:
        """The client's next query, or the verdict, from what the phase said."""
        if isinstance(data, BaseException):
            return self.refuse(pam, data)
        if data is not None:
            return self.query(data, pam.pop_messages())
        # The phase on the thread succeeded.
        if self.phase_thread is not None:
            self.phase_thread.join()
        if self.stage == "authenticate":
            try:
                pam.account_management()
            except pamphlet.NewAuthTokenRequired:
                # As sshd: the password has expired. The client changes it
                # now, in the same keyboard-interactive exchange (what
                # account management said comes with the first question).
                logger.info("the password of %s has expired: changing it", self.username)
                self.stage = "change"
                try:
                    self.phase_thread = pam.change_authtoken(change_expired_authtoken=True)
                except (pamphlet.PamError, RuntimeError) as error:
                    return self.refuse(pam, error)
                return self.respond(pam, self.next_data(pam))
            except (pamphlet.PamError, RuntimeError) as error:
                return self.refuse(pam, error)
        return self.decide(pam, paramiko.AUTH_SUCCESSFUL)

    def query(
        self, data: list[pamphlet.Message], said: list[pamphlet.Message]
    ) -> paramiko.server.InteractiveQuery:
        self.asked = data
        q = paramiko.server.InteractiveQuery(
            instructions="\n".join([*said, *(m for m in data if not m.is_prompt)])
        )
        for prompt in data:
            if prompt.is_prompt:
                q.add_prompt(prompt, not prompt.wants_password)
        return q

    def decide(
        self, pam: pamphlet.ThreadedPamApplication, verdict: int
    ) -> int | paramiko.server.InteractiveQuery:
        """The verdict, after one more round without prompts if there is something to show."""
        said = pam.pop_messages()
        if said:
            self.verdict = verdict
            return self.query([], said)
        return self.accept(pam) if verdict == paramiko.AUTH_SUCCESSFUL else self.drop(pam)

    def refuse(
        self, pam: pamphlet.ThreadedPamApplication, error: BaseException
    ) -> int | paramiko.server.InteractiveQuery:
        logger.warning("login of %s refused: %r", self.username, error)
        pam.abort()  # a phase still waiting for answers gives up (no-op otherwise)
        if self.phase_thread is not None:
            self.phase_thread.join()
        return self.decide(pam, paramiko.AUTH_FAILED)

    def accept(self, pam: pamphlet.ThreadedPamApplication) -> int:
        with self.lock:
            if self.closed or pam is not self.pam:
                return paramiko.AUTH_FAILED  # the time ran out meanwhile
            self.authenticated = True
        logger.info("%s logged in from %s", self.username, self.client_host)
        return paramiko.AUTH_SUCCESSFUL

    def drop(self, pam: pamphlet.ThreadedPamApplication) -> int:
        """A refused attempt's handle ends now, not when the client leaves."""
        self.end_attempt()
        return paramiko.AUTH_FAILED

    def answers_to(self, responses: list[str]) -> list[str] | None:
        """One answer per message asked, ``""`` for info and error messages."""
        responses = list(responses)
        if len(responses) != sum(m.is_prompt for m in self.asked):
            return None
        return [responses.pop(0) if m.is_prompt else "" for m in self.asked]

    def next_data(self, pam: pamphlet.ThreadedPamApplication) -> Data:
        """get_data(), but a phase silent for too long is given up (and fails)."""
        try:
            return pam.get_data(timeout=PHASE_TIMEOUT)
        except TimeoutError as timeout:
            return timeout

    # -- the handle's life ---------------------------------------------------------------

    def start_pam(self, username: str) -> pamphlet.ThreadedPamApplication | None:
        """A new handle for this connection, or None once the connection is closed.

        The handle is made outside the lock (pam_start reads the service
        file) and kept only if :meth:`end_pam` has not come in the meantime.
        """
        with self.lock:
            if self.closed:
                return None
        pam = pamphlet.ThreadedPamApplication(
            self.pam_service,
            username,
            confdir=self.confdir,
            conversation_timeout=PHASE_TIMEOUT,
        )
        logger.info("PAM handle of %s started (%d open)", username, open_handles.change(1))
        with self.lock:
            if not self.closed:
                self.pam, self.username = pam, username
                self.asked, self.verdict = [], None
                pam.rhost = self.client_host
                return pam
        self.finish(pam, username, session_open=False)
        return None

    def end_attempt(self) -> None:
        """End this connection's handle, if any (a retry, a refusal); more may follow."""
        with self.lock:
            pam, self.pam = self.pam, None
            session_open, self.session_open = self.session_open, False
            self.authenticated = False
        if pam is not None:
            self.finish(pam, self.username, session_open)

    def end_pam(self) -> None:
        """The connection is over: end its handle, and refuse to make another.

        Called from the thread serving the connection while the transport's
        thread may be in the middle of a login: its conversation is aborted
        and its phase fails; a handle it makes from now on is ended at once.
        """
        with self.lock:
            self.closed = True
        self.end_attempt()

    @staticmethod
    def finish(pam: pamphlet.ThreadedPamApplication, username: str, session_open: bool) -> None:
        try:
            if session_open:
                try:
                    pam.close_session()
                except pamphlet.PamError as error:
                    logger.warning("closing the session of %s failed: %r", username, error)
                for message in pam.pop_messages():
                    logger.info("closing the session of %s: %s", username, message)
        finally:
            pam.end()  # aborts a conversation the client abandoned and waits for its thread
            logger.info("PAM handle of %s ended (%d open)", username, open_handles.change(-1))

    # -- after authentication ------------------------------------------------------------

    def open_pam_session(self, pam: pamphlet.ThreadedPamApplication) -> list[str]:
        """Credentials, then the session; the messages the modules said.

        Plain calls: a module that asks a question now fails the phase
        (nobody is there to answer).
        """
        pam.initialize_credentials()
        with self.lock:
            if pam is not self.pam:
                raise pamphlet.SessionError("the connection is closing")
            pam.open_session()
            self.session_open = True
        return [str(message) for message in pam.pop_messages()]


class SshServer(SshAuthInterface):
    """One connection: the authentication above, then one exec or shell session."""

    def __init__(
        self,
        pam_service: str,
        confdir: str | None = None,
        client_host: str | None = None,
        logged_in: threading.Event | None = None,
    ) -> None:
        super().__init__(pam_service, confdir, client_host)
        self.session_requested = threading.Event()
        self.logged_in = logged_in or threading.Event()
        self.command: bytes | None = None  # None: a shell
        self.terminal: tuple[str, int, int] | None = None  # TERM, rows, columns
        self.process: UserProcess | None = None

    def accept(self, pam: pamphlet.ThreadedPamApplication) -> int:
        verdict = super().accept(pam)
        if verdict == paramiko.AUTH_SUCCESSFUL:
            self.logged_in.set()
        return verdict

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session" and self.authenticated:
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.command = command
        self.session_requested.set()
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        self.session_requested.set()
        return True

    def check_channel_pty_request(
        self,
        channel: paramiko.Channel,
        term: bytes | str,
        width: int,
        height: int,
        pixelwidth: int,
        pixelheight: int,
        modes: bytes,
    ) -> bool:
        name = term.decode("ascii", "replace") if isinstance(term, bytes) else term
        self.terminal = (name, height or 24, width or 80)
        return True

    def check_channel_window_change_request(
        self, channel: paramiko.Channel, width: int, height: int, *pixels: int
    ) -> bool:
        process = self.process
        if process is not None and process.pty is not None and width and height:
            try:
                process.resize(height, width)
            except (OSError, ValueError):  # the program has just exited
                pass
        return True

    def run_session(self, channel: paramiko.Channel) -> None:
        pam = self.pam
        if pam is None or not self.authenticated:
            channel.sendall_stderr(b"session refused: not logged in\r\n")
            channel.send_exit_status(1)
            return
        session = UserSession(pam)
        try:
            session.check()
        except LoginRefused as why:
            logger.info("no program runs for %s: %s", self.username, why)
            channel.sendall_stderr(f"pamphlet: no shell for {self.username}: {why}\r\n".encode())
        else:
            self.run_as_user(channel, pam, session)
            return
        try:
            said = self.open_pam_session(pam)
        except (pamphlet.PamError, RuntimeError) as error:
            channel.sendall_stderr(f"session refused: {error}\r\n".encode())
            channel.send_exit_status(1)
            return
        for message in said:
            channel.sendall_stderr(f"{message}\r\n".encode())
        lines = [f"Hello {pam.user}"]
        lines += [f"{name}={value}" for name, value in sorted(pam.environ.items())]
        channel.sendall("".join(line + "\n" for line in lines).encode())
        channel.send_exit_status(0)

    def run_as_user(
        self, channel: paramiko.Channel, pam: pamphlet.ThreadedPamApplication, session: UserSession
    ) -> None:
        """The client's command, or a login shell, as the user in the PAM session."""
        environment = {}
        if self.terminal is not None:
            environment["TERM"] = self.terminal[0]
        pty = False if self.terminal is None else self.terminal[1:]
        try:
            with self.lock:
                if pam is not self.pam:
                    raise pamphlet.SessionError("the connection is closing")
            if self.command is None:
                process = session.shell(pty=pty, env=environment)
            else:
                command = self.command.decode("utf-8", "surrogateescape")
                pipes = {} if pty else {"stdin": -1, "stdout": -1, "stderr": -1}
                process = session.shell(command, pty=pty, env=environment, **pipes)
        except (pamphlet.PamError, LoginRefused, OSError) as error:
            channel.sendall_stderr(f"session refused: {error}\r\n".encode())
            channel.send_exit_status(1)
            self.close_user_session(session)
            return
        self.process = process
        for message in pam.pop_messages():
            channel.sendall_stderr(f"{message}\r\n".encode())
        logger.info("%s runs pid %d", self.username, process.pid)
        status = relay(channel, process)
        self.close_user_session(session)
        channel.send_exit_status(status)

    def close_user_session(self, session: UserSession) -> None:
        try:
            session.close()
        except pamphlet.PamError as error:
            logger.warning("closing the session of %s failed: %r", self.username, error)


def relay(channel: paramiko.Channel, process: UserProcess) -> int:
    """Copy between the channel and the program until it exits; its exit status.

    Each copying thread owns a duplicate of its descriptor and closes it when
    done, so that a thread outliving the program (a client that keeps
    typing) never writes to a number reused meanwhile.
    """
    if process.pty is not None:
        sources = [(os.dup(process.pty.fileno()), channel.sendall)]
        sink = os.dup(process.pty.fileno())
    else:
        assert process.stdin and process.stdout and process.stderr
        sources = [
            (os.dup(process.stdout.fileno()), channel.sendall),
            (os.dup(process.stderr.fileno()), channel.sendall_stderr),
        ]
        sink = os.dup(process.stdin.fileno())
        for pipe in (process.stdin, process.stdout, process.stderr):
            pipe.close()

    def copy_out(source: int, send: Callable[[bytes], object]) -> None:
        try:
            while data := os.read(source, 32768):
                send(data)
        except OSError:  # EIO: the terminal's last process has gone; or the client has
            pass
        finally:
            os.close(source)

    def copy_in() -> None:
        try:
            while data := channel.recv(32768):
                os.write(sink, data)
        except OSError:
            pass
        finally:
            os.close(sink)  # the client's EOF reaches the program
        if process.pty is not None:
            # A terminal has no EOF to pass on; the client leaving is a hangup,
            # as when sshd closes the pty: the shell gets SIGHUP.
            while process.poll() is None:
                transport = channel.get_transport()
                if channel.closed or transport is None or not transport.is_active():
                    process.send_signal(signal.SIGHUP)
                    break
                time.sleep(0.1)

    outputs = [threading.Thread(target=copy_out, args=source, daemon=True) for source in sources]
    for thread in outputs:
        thread.start()
    threading.Thread(target=copy_in, daemon=True).start()
    returncode = process.wait()
    for thread in outputs:
        thread.join(5)  # what the program wrote last, unless a daemon it left holds the pipe
    if process.pty is not None:
        process.pty.close()  # (kept until now for window changes)
    return returncode if returncode >= 0 else 128 - returncode


class Startup:
    """A connection's place among those logging in (--max-startups), given back once."""

    def __init__(self, slots: threading.Semaphore) -> None:
        self.slots = slots
        self.lock = threading.Lock()
        self.held = True

    def release(self) -> None:
        with self.lock:
            held, self.held = self.held, False
        if held:
            self.slots.release()


def serve_connection(
    sock: socket.socket,
    address: tuple[str, int],
    args: argparse.Namespace,
    host_key: paramiko.PKey,
    startup: Startup,
) -> None:
    log = logging.getLogger("ssh.server")
    logged_in = threading.Event()
    server = SshServer(args.service, args.confdir, address[0], logged_in)
    transport = paramiko.Transport(sock)
    transport.add_server_key(host_key)
    channel = None
    try:
        transport.start_server(server=server)
        # paramiko calls the authentication callbacks on the transport's own
        # thread; this one waits for the session channel, or for the client
        # to go away or its time to run out (then whatever login it left
        # half done is ended below).
        deadline = time.monotonic() + args.login_grace
        while channel is None and transport.is_active() and time.monotonic() < deadline:
            channel = transport.accept(timeout=0.2)
            if logged_in.is_set():
                startup.release()  # logged in: no longer counted among the startups
        if channel is None:
            log.info("connection from %s closed before a session", address[0])
            return
        startup.release()
        # (logged in just before the deadline: the request is on its way)
        if server.session_requested.wait(max(deadline - time.monotonic(), 10.0)):
            server.run_session(channel)
    except (paramiko.SSHException, OSError, EOFError) as error:
        log.info("connection from %s failed: %r", address[0], error)
    finally:
        if channel is not None:
            channel.close()
        server.end_pam()
        startup.release()
        # Let the client read the exit status and hang up first: closing
        # under it would cut the end of the session short.
        deadline = time.monotonic() + 10
        while channel is not None and transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        transport.close()


def load_host_key(path: str | None) -> paramiko.PKey:
    if path is None:
        return paramiko.ECDSAKey.generate()
    return paramiko.PKey.from_path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--service", required=True, help="the PAM service name")
    parser.add_argument("--confdir", help="read the PAM service from here, not /etc/pam.d")
    parser.add_argument("--host-key", help="a private key file; generated when not given")
    parser.add_argument(
        "--login-grace",
        type=float,
        default=LOGIN_GRACE,
        help="seconds a client has to log in and ask for a session",
    )
    parser.add_argument(
        "--max-startups",
        type=int,
        default=MAX_STARTUPS,
        help="connections not yet logged in, at most; more are closed at once",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    host_key = load_host_key(args.host_key)
    slots = threading.Semaphore(args.max_startups)
    with socket.create_server(("127.0.0.1", args.port)) as listener:
        print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
        while True:
            sock, address = listener.accept()
            if not slots.acquire(blocking=False):
                logger.warning("too many logins in progress: %s refused", address[0])
                sock.close()
                continue
            threading.Thread(
                target=serve_connection,
                args=(sock, address, args, host_key, Startup(slots)),
                daemon=True,
            ).start()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
