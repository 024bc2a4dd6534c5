"""An asyncio SSH server that logs users in through PAM: asyncssh with AsyncPamApplication.

    python examples/asyncssh_server.py --port 2222 --service login [--confdir DIR] [--host-key FILE]

The same behaviour as examples/ssh_server.py (paramiko, threads), on one
event loop: keyboard-interactive authentication through PAM (the stack's
questions become prompts, its info and error messages the challenge's
instructions), then ``account_management``; an exec or shell request
establishes credentials, opens the PAM session and answers ``Hello USER``
and the session's PAM environment, exit status 0; the session is closed and
the handle ended when the channel closes.

asyncssh asks for a challenge in one coroutine and hands the answers to the
next one, while PAM asks from inside a phase. The bridge is the login's
``conversation`` coroutine: it hands the messages to the pending challenge
through a queue and awaits the answers. A client that goes away cancels the
login task, which ends the conversation and frees the phase's thread.

Needs asyncssh: ``pip install 'pamphlet[ssh]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

import asyncssh

import pamphlet

logger = logging.getLogger("ssh.auth")

# What the login task hands to the challenge: messages to ask, its failure, or None.
Step = list[pamphlet.Message] | BaseException | None


class KbdintLogin(pamphlet.AsyncPamApplication):
    """A PAM login whose conversation is the SSH client's keyboard-interactive prompts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps: asyncio.Queue[Step] = asyncio.Queue()
        self.answers: asyncio.Future[list[str]] | None = None
        self.asked: list[pamphlet.Message] = []
        self.authenticated = False
        self.session_open = False
        self.session_said: list[str] = []

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
        """authenticate, then account_management; the outcome goes to the steps."""
        try:
            await self.authenticate()
            await self.account_management()
        except BaseException as error:
            self.steps.put_nowait(error)
            if not isinstance(error, Exception):
                raise  # a cancellation goes on
        else:
            self.steps.put_nowait(None)

    async def next_challenge(self) -> asyncssh.KbdIntChallenge:
        """The client's next prompts, or True/False once the login is decided."""
        step = await self.steps.get()
        if isinstance(step, BaseException):
            logger.warning("login of %s refused: %r", self.user, step)
            return False
        if step is None:
            self.authenticated = True
            logger.info("%s logged in from %s", self.user, self.rhost)
            return True
        self.asked = step
        instructions = "\n".join(message for message in step if not message.is_prompt)
        prompts = [(str(m), not m.wants_password) for m in step if m.is_prompt]
        return "", instructions, "", prompts

    def answer(self, responses: Sequence[str]) -> bool:
        """Give the client's responses to the waiting conversation; False if they do not fit."""
        if self.answers is None or self.answers.done():
            return False
        responses = list(responses)
        if len(responses) != sum(message.is_prompt for message in self.asked):
            return False
        self.answers.set_result([responses.pop(0) if m.is_prompt else "" for m in self.asked])
        return True


class PamSshServer(asyncssh.SSHServer):
    """One connection: keyboard-interactive through PAM, then one session."""

    def __init__(self, service: str, confdir: str | None) -> None:
        self.service = service
        self.confdir = confdir
        self.client_host: str | None = None
        self.login: KbdintLogin | None = None
        self.login_task: asyncio.Task[None] | None = None
        self.cleanup: asyncio.Task[None] | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.client_host = conn.get_extra_info("peername")[0]

    def connection_lost(self, exc: Exception | None) -> None:
        # A login left half done (or a session) ends now: its phase's
        # thread is released, its handle ended.
        self.cleanup = asyncio.get_running_loop().create_task(self.end_login())

    def begin_auth(self, username: str) -> bool:
        return True

    def kbdint_auth_supported(self) -> bool:
        return True

    async def get_kbdint_challenge(
        self, username: str, lang: str, submethods: str
    ) -> asyncssh.KbdIntChallenge:
        await self.end_login()  # a retry starts afresh
        self.login = KbdintLogin(self.service, username, confdir=self.confdir)
        self.login.rhost = self.client_host
        self.login_task = asyncio.get_running_loop().create_task(self.login.log_in())
        return await self.login.next_challenge()

    async def validate_kbdint_response(
        self, username: str, responses: Sequence[str]
    ) -> asyncssh.KbdIntChallenge:
        if self.login is None:
            return False
        if not self.login.answer(responses):
            logger.warning("the answers of %s did not fit the prompts", username)
            await self.end_login()
            return False
        return await self.login.next_challenge()

    async def end_login(self) -> None:
        login, task = self.login, self.login_task
        self.login = self.login_task = None
        if login is None:
            return
        if task is not None and not task.done():
            task.cancel()  # ends a conversation the client abandoned
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if login.session_open:
            login.session_open = False
            try:
                await login.close_session()
            except pamphlet.PamError as error:
                logger.warning("closing the session of %s failed: %r", login.user, error)
        user = login.user
        await login.end()
        logger.info("PAM handle of %s ended", user)

    async def run_session(self, process: asyncssh.SSHServerProcess[str]) -> None:
        login = self.login
        if login is None or not login.authenticated or login.session_open:
            process.stderr.write("session refused: one session per connection\r\n")
            process.exit(1)
            return
        try:
            await login.initialize_credentials()
            await login.open_session()
            login.session_open = True
        except pamphlet.PamError as error:
            process.stderr.write(f"session refused: {error}\r\n")
            process.exit(1)
            return
        for message in login.session_said:
            process.stderr.write(f"{message}\r\n")
        lines = [f"Hello {login.user}"]
        lines += [f"{name}={value}" for name, value in sorted(login.environ.items())]
        process.stdout.write("".join(line + "\n" for line in lines))
        process.exit(0)
        await self.end_login()  # the channel is closing: close the session, end the handle


async def handle_process(process: asyncssh.SSHServerProcess[str]) -> None:
    server = process.get_extra_info("connection").get_owner()
    await server.run_session(process)


async def serve(args: argparse.Namespace) -> None:
    if args.host_key:
        host_key = asyncssh.read_private_key(args.host_key)
    else:
        host_key = asyncssh.generate_private_key("ssh-ed25519")
    listener = await asyncssh.create_server(
        lambda: PamSshServer(args.service, args.confdir),
        "127.0.0.1",
        args.port,
        server_host_keys=[host_key],
        process_factory=handle_process,
        kbdint_auth=True,
        password_auth=False,
        public_key_auth=False,
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
