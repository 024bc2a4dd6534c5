"""An SSH server that logs users in through PAM: the API document's paramiko example, completed.

    python examples/ssh_server.py --port 2222 --service login [--confdir DIR] [--host-key FILE]

It listens on 127.0.0.1 (``--port 0`` picks a free port and prints it) and
offers keyboard-interactive authentication only. The PAM stack's questions
become the client's prompts; its info and error messages are shown to the
client as the query's instructions, never as prompts. After authentication
comes ``account_management``; when the client runs a command or a shell, the
server establishes credentials, opens the PAM session and answers
``Hello USER`` followed by the session's PAM environment, exit status 0. When
the channel closes, it closes the session and ends the handle.

paramiko asks its questions in one callback and hands the answers to another,
so the conversation cannot be a blocking function: each PAM phase runs on a
thread of ThreadedPamApplication, read with get_data() and answered with
set_input(). A client that goes away mid-login has its conversation aborted:
no thread and no PAM handle outlive it.

Needs paramiko: ``pip install 'pamphlet[ssh]'``.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable

import paramiko

import pamphlet

#: How long a PAM phase may stay silent before the login is given up.
PHASE_TIMEOUT = 60.0
#: How long a client has to log in and ask for a session (sshd's LoginGraceTime).
LOGIN_GRACE = 120.0


class SshAuthInterface(paramiko.server.ServerInterface):
    """The API document's SshAuthInterface (docs/api-document.md), completed.

    The document's two callbacks are kept as written; what it leaves out is
    added: info and error messages go into the query's instructions, answers
    are matched back to the prompts (a client answering a different number
    of prompts fails), account management follows authentication, a retry
    ends the previous attempt's handle, and :meth:`end_pam` releases
    everything when the client goes away.
    """

    def __init__(
        self, pam_service: str, confdir: str | None = None, client_host: str | None = None
    ) -> None:
        self.pam_service = pam_service
        self.confdir = confdir
        self.client_host = client_host
        self.logger = logging.getLogger("ssh.auth")
        self.pam: pamphlet.ThreadedPamApplication | None = None
        self.auth_thread: threading.Thread | None = None
        self.asked: list[pamphlet.Message] = []
        self.outcome: int | None = None  # decided, told once the user saw the messages
        self.session_open = False

    def get_allowed_auths(self, username: str) -> str:
        return "keyboard-interactive"

    def check_auth_interactive(
        self, username: str, submethods: str
    ) -> int | paramiko.server.InteractiveQuery:
        self.end_pam()  # a retry starts afresh: the last attempt's handle ends first
        self.pam = pamphlet.ThreadedPamApplication(self.pam_service, username, confdir=self.confdir)
        self.pam.rhost = self.client_host
        self.auth_thread = self.pam.authenticate()
        data = self.next_data()
        return self.respond(data)

    def check_auth_interactive_response(
        self, responses: list[str]
    ) -> int | paramiko.server.InteractiveQuery:
        assert self.pam is not None and self.auth_thread is not None
        if self.outcome is not None:
            outcome, self.outcome = self.outcome, None
            return outcome
        answers = self.answers_to(responses)
        if answers is None:
            self.logger.warning("the answers of %s did not fit the prompts", self.pam.user)
            self.pam.abort()
            self.auth_thread.join()
            return paramiko.AUTH_FAILED
        self.pam.set_input(answers)
        data = self.next_data()
        return self.respond(data)

    # -- what the document's two callbacks share ---------------------------------------

    def respond(
        self, data: list[pamphlet.Message] | BaseException | None
    ) -> int | paramiko.server.InteractiveQuery:
        assert self.pam is not None and self.auth_thread is not None
        if isinstance(data, BaseException):
            self.logger.warning("login of %s refused: %r", self.pam.user, data)
            self.auth_thread.join()
            return paramiko.AUTH_FAILED
        if not data:  # None: the phase succeeded
            self.auth_thread.join()
            outcome = paramiko.AUTH_SUCCESSFUL
            try:
                self.pam.account_management()  # a plain call: returns or raises
            except pamphlet.PamError as error:
                self.logger.warning("account of %s refused: %r", self.pam.user, error)
                outcome = paramiko.AUTH_FAILED
            else:
                self.logger.info("%s logged in from %s", self.pam.user, self.client_host)
            said = self.pam.pop_messages()
            if not said:
                return outcome
            # What the account modules said reaches the user before the outcome.
            self.outcome = outcome
            self.asked = said
            return paramiko.server.InteractiveQuery(instructions="\n".join(said))
        self.asked = data
        q = paramiko.server.InteractiveQuery(
            instructions="\n".join(m for m in data if not m.is_prompt)
        )
        for prompt in data:
            if prompt.is_prompt:
                q.add_prompt(prompt, not prompt.wants_password)
        return q

    def answers_to(self, responses: list[str]) -> list[str] | None:
        """One answer per message asked, ``""`` for info and error messages."""
        responses = list(responses)
        if len(responses) != sum(m.is_prompt for m in self.asked):
            return None
        return [responses.pop(0) if m.is_prompt else "" for m in self.asked]

    def next_data(self) -> list[pamphlet.Message] | BaseException | None:
        """get_data(), but a phase silent for too long is given up (and fails)."""
        assert self.pam is not None and self.auth_thread is not None
        try:
            return self.pam.get_data(timeout=PHASE_TIMEOUT)
        except TimeoutError as timeout:
            self.pam.abort()
            self.auth_thread.join()
            return timeout

    # -- after authentication ------------------------------------------------------------

    def run_quietly(self, phase: Callable[[], None]) -> list[str]:
        """Run a phase nobody can answer now: what it said; a question fails it."""
        assert self.pam is not None
        phase()
        return list(self.pam.pop_messages())

    def open_pam_session(self) -> list[str]:
        """Credentials, then the session; the messages the modules said."""
        assert self.pam is not None
        said = self.run_quietly(self.pam.initialize_credentials)
        said += self.run_quietly(self.pam.open_session)
        self.session_open = True
        return said

    def end_pam(self) -> None:
        """Close the session and end the handle; a pending conversation is aborted."""
        if self.pam is None or self.pam.ended:
            return
        if self.session_open:
            self.session_open = False
            try:
                self.run_quietly(self.pam.close_session)
            except pamphlet.PamError as error:
                self.logger.warning("closing the session of %s failed: %r", self.pam.user, error)
        user = self.pam.user
        self.pam.end()  # aborts a conversation the client abandoned and waits for its thread
        self.logger.info("PAM handle of %s ended", user)


class SshServer(SshAuthInterface):
    """One connection: the authentication above, then one exec or shell session."""

    def __init__(
        self, pam_service: str, confdir: str | None = None, client_host: str | None = None
    ) -> None:
        super().__init__(pam_service, confdir, client_host)
        self.session_requested = threading.Event()

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.session_requested.set()
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        self.session_requested.set()
        return True

    def check_channel_pty_request(self, *args: object) -> bool:
        return True

    def run_session(self, channel: paramiko.Channel) -> None:
        assert self.pam is not None
        try:
            said = self.open_pam_session()
        except pamphlet.PamError as error:
            channel.sendall_stderr(f"session refused: {error}\r\n".encode())
            channel.send_exit_status(1)
            return
        for message in said:
            channel.sendall_stderr(f"{message}\r\n".encode())
        lines = [f"Hello {self.pam.user}"]
        lines += [f"{name}={value}" for name, value in sorted(self.pam.environ.items())]
        channel.sendall("".join(line + "\n" for line in lines).encode())
        channel.send_exit_status(0)


def serve_connection(
    sock: socket.socket,
    address: tuple[str, int],
    args: argparse.Namespace,
    host_key: paramiko.PKey,
) -> None:
    logger = logging.getLogger("ssh.server")
    server = SshServer(args.service, args.confdir, address[0])
    transport = paramiko.Transport(sock)
    transport.add_server_key(host_key)
    channel = None
    try:
        transport.start_server(server=server)
        # paramiko calls the authentication callbacks on the transport's own
        # thread; this one waits for the session channel, or for the client
        # to go away (then whatever login it left half done is ended below).
        waited = 0.0
        while channel is None and transport.is_active() and waited < LOGIN_GRACE:
            channel = transport.accept(timeout=0.2)
            waited += 0.2
        if channel is None:
            logger.info("connection from %s closed before a session", address[0])
            return
        if server.session_requested.wait(LOGIN_GRACE):
            server.run_session(channel)
    except (paramiko.SSHException, OSError, EOFError) as error:
        logger.info("connection from %s failed: %r", address[0], error)
    finally:
        if channel is not None:
            channel.close()
        server.end_pam()
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    host_key = load_host_key(args.host_key)
    with socket.create_server(("127.0.0.1", args.port)) as listener:
        print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
        while True:
            sock, address = listener.accept()
            threading.Thread(
                target=serve_connection, args=(sock, address, args, host_key), daemon=True
            ).start()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
