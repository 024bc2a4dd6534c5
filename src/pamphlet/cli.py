"""The ``pamphlet`` command: run a PAM stack by hand, pamtester's way.

::

    pamphlet [-v] [-I ITEM=VALUE]... [-E VAR=VALUE]... [--confdir DIR] [--json]
             SERVICE USER OPERATION...
    pamphlet --demo

The operations and their flags are pamtester's (``authenticate``,
``acct_mgmt``, ``open_session``, ``close_session``, ``chauthtok``,
``setcred``, each optionally followed by flags such as
``authenticate(PAM_SILENT|PAM_DISALLOW_NULL_AUTHTOK)``), so a pamtester script
ports by changing the command's name. Like pamtester, the command runs exactly
the operations named, in order, and stops at the first that fails.

``--exec -- CMD ARGS...`` after the operations (as root) runs CMD as the user
inside the session, su's way: ``open_session`` (the last operation) then
establishes credentials after initgroups and opens the session, CMD runs,
the session is closed, and CMD's exit status is the command's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn

from .application import PamApplication
from .broker.errors import BrokerError
from .constants import Flag, Item
from .errors import PamError
from .message import Message

__all__ = ["main", "run", "parse_flags", "parse_operation", "Operation", "UsageError"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEMO_USER = "demo"
DEMO_PASSWORD = "pamphlet"
DEMO_SERVICE = "pamphlet-demo"
DEMO_OPERATIONS = (
    "authenticate",
    "acct_mgmt",
    "setcred(PAM_ESTABLISH_CRED)",
    "open_session",
    "close_session",
)


class UsageError(ValueError):
    """A bad command line: reported with the usage, never as a traceback."""


# pamtester's flag names, plus PAM_DELETE_CRED, which pamtester leaves out.
FLAG_NAMES: dict[str, int] = {
    "PAM_SILENT": Flag.SILENT,
    "PAM_DISALLOW_NULL_AUTHTOK": Flag.DISALLOW_NULL_AUTHTOK,
    "PAM_ESTABLISH_CRED": Flag.ESTABLISH_CRED,
    "PAM_DELETE_CRED": Flag.DELETE_CRED,
    "PAM_REINITIALIZE_CRED": Flag.REINITIALIZE_CRED,
    "PAM_REFRESH_CRED": Flag.REFRESH_CRED,
    "PAM_CHANGE_EXPIRED_AUTHTOK": Flag.CHANGE_EXPIRED_AUTHTOK,
}
_ALL_FLAGS = 0
for _value in FLAG_NAMES.values():
    _ALL_FLAGS |= _value

# Item names: pamtester's (prompt), and pamphlet's property names.
ITEM_NAMES: dict[str, Item] = {
    "service": Item.SERVICE,
    "user": Item.USER,
    "prompt": Item.USER_PROMPT,
    "user_prompt": Item.USER_PROMPT,
    "tty": Item.TTY,
    "ruser": Item.RUSER,
    "rhost": Item.RHOST,
    "xdisplay": Item.XDISPLAY,
    "authtok_type": Item.AUTHTOK_TYPE,
}

# What each operation calls, and the line printed when it succeeds.
_PHASES: dict[str, tuple[Callable[[PamApplication, int], object], str]] = {
    "authenticate": (
        lambda app, flags: app.authenticate(flags=flags),
        "successfully authenticated",
    ),
    "acct_mgmt": (
        lambda app, flags: app.account_management(flags=flags),
        "account management done.",
    ),
    "open_session": (
        lambda app, flags: app.open_session(flags=flags),
        "successfully opened a session",
    ),
    "close_session": (
        lambda app, flags: app.close_session(flags=flags),
        "session has successfully been closed.",
    ),
    "chauthtok": (
        lambda app, flags: app.change_authtoken(flags=flags),
        "authentication token altered successfully.",
    ),
    # Flags 0 is what pamtester passes for a bare setcred; libpam reads it
    # as PAM_ESTABLISH_CRED.
    "setcred": (
        lambda app, flags: app.setcred(flags),
        "credential info has successfully been set.",
    ),
}
OPERATIONS = tuple(_PHASES)


# -- parsing ------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """One operation of the command line: its name and flags."""

    name: str
    flags: int

    @property
    def flag_names(self) -> list[str]:
        return [name for name, value in FLAG_NAMES.items() if self.flags & value]


_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>[|&^~()]))")


def parse_flags(expression: str) -> int:
    """Evaluate pamtester's flag syntax: names joined by ``|``, ``&``, ``^``, ``~``.

    Operators bind as in C (``~`` tightest, then ``&``, ``^``, ``|``) and
    parentheses group. The result keeps only PAM's flag bits, so that ``~``
    cannot pass bits libpam does not know.
    """
    tokens: list[str] = []
    position = 0
    text = expression.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise UsageError(f"unexpected {text[position:].strip()!r} in flags {expression!r}")
        tokens.append(match.group("name") or match.group("op"))
        position = match.end()
    if not tokens:
        return 0
    parser = _FlagParser(tokens, expression)
    value = parser.parse_or()
    if parser.index != len(tokens):
        raise UsageError(f"unexpected {tokens[parser.index]!r} in flags {expression!r}")
    return value & _ALL_FLAGS


class _FlagParser:
    def __init__(self, tokens: list[str], expression: str) -> None:
        self.tokens = tokens
        self.index = 0
        self.expression = expression

    def _peek(self) -> str | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise UsageError(f"flags {self.expression!r} end too early")
        self.index += 1
        return token

    def _binary(self, operator: str, operand: Callable[[], int], combine: Any) -> int:
        value = operand()
        while self._peek() == operator:
            self.index += 1
            value = combine(value, operand())
        return value

    def parse_or(self) -> int:
        return self._binary("|", self.parse_xor, lambda a, b: a | b)

    def parse_xor(self) -> int:
        return self._binary("^", self.parse_and, lambda a, b: a ^ b)

    def parse_and(self) -> int:
        return self._binary("&", self.parse_unary, lambda a, b: a & b)

    def parse_unary(self) -> int:
        token = self._take()
        if token == "~":
            return ~self.parse_unary()
        if token == "(":
            value = self.parse_or()
            if self._peek() != ")":
                raise UsageError(f"unbalanced parentheses in flags {self.expression!r}")
            self.index += 1
            return value
        if token in FLAG_NAMES:
            return FLAG_NAMES[token]
        if token in "|&^)":
            raise UsageError(f"unexpected {token!r} in flags {self.expression!r}")
        known = ", ".join(FLAG_NAMES)
        raise UsageError(f"unknown flag {token!r} in {self.expression!r} (known: {known})")


_OPERATION = re.compile(r"^\s*([A-Za-z_]+)\s*(?:\((.*)\))?\s*$", re.S)


def parse_operation(text: str) -> Operation:
    """``authenticate`` or ``setcred(PAM_ESTABLISH_CRED)`` -> Operation."""
    match = _OPERATION.match(text)
    if match is None:
        raise UsageError(f"cannot read the operation {text!r} (expected NAME or NAME(FLAGS))")
    name, expression = match.group(1), match.group(2)
    if name not in _PHASES:
        raise UsageError(f"unknown operation {name!r} (known: {', '.join(OPERATIONS)})")
    return Operation(name, parse_flags(expression or ""))


def _assignment(text: str, what: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise UsageError(f"{what} {text!r} is not NAME=VALUE")
    return name, value


def parse_item(text: str) -> tuple[Item, str]:
    name, value = _assignment(text, "the item")
    key = name.lower()
    if key.startswith("pam_"):
        key = key[4:]
    if key not in ITEM_NAMES:
        raise UsageError(f"unknown item {name!r} (known: {', '.join(ITEM_NAMES)})")
    return ITEM_NAMES[key], value


def parse_environment(text: str) -> tuple[str, str]:
    return _assignment(text, "the environment variable")


# -- the terminal -------------------------------------------------------------


class Terminal:
    """Where prompts are asked and messages shown.

    Prompts and messages go to ``error`` (stderr), so standard output holds
    only results. On a terminal, echo-off prompts are read without echo;
    otherwise each prompt reads one line of ``input``, so scripts can pipe
    the answers.
    """

    def __init__(self, source: IO[str] | None, error: IO[str]) -> None:
        self.input = source
        self.error = error
        # --exec: answers are read from the descriptor a byte at a time, so
        # that what follows them stays there for the command.
        self.unbuffered = False

    def _is_terminal(self) -> bool:
        try:
            return self.input is not None and self.input.isatty()
        except ValueError:  # a closed stream
            return False

    def show(self, message: Message) -> None:
        self._write(f"{message}\n")

    def ask(self, prompt: Message) -> bytes:
        terminal = self._is_terminal()
        if terminal and prompt.wants_password:
            line = self._read_without_echo(prompt)
        else:
            self._write(prompt)
            line = self._read_line()
            if not terminal:
                # The answer was not echoed: end the prompt's line ourselves.
                self._write("\n")
        if not line:
            raise EOFError(f"no answer to the prompt {str(prompt)!r}: standard input has ended")
        return line[:-1] if line.endswith(b"\n") else line

    def _write(self, text: str) -> None:
        self.error.write(text)
        self.error.flush()

    def _read_line(self) -> bytes:
        if self.input is None:
            return b""
        if self.unbuffered:
            descriptor = self.input.fileno()
            line = b""
            while not line.endswith(b"\n") and (byte := os.read(descriptor, 1)):
                line += byte
            return line
        buffer = getattr(self.input, "buffer", None)
        if buffer is not None:
            # Bytes, so that any answer reaches PAM as typed, in any encoding.
            return bytes(buffer.readline())
        return self.input.readline().encode("utf-8", "surrogateescape")

    def _read_without_echo(self, prompt: str) -> bytes:
        import termios

        assert self.input is not None
        descriptor = self.input.fileno()
        saved = termios.tcgetattr(descriptor)
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO
        # As getpass does: echo goes off before the prompt shows, and
        # TCSAFLUSH drops anything typed ahead while it was still on.
        termios.tcsetattr(descriptor, termios.TCSAFLUSH, quiet)
        try:
            self._write(prompt)
            return self._read_line()
        finally:
            termios.tcsetattr(descriptor, termios.TCSAFLUSH, saved)
            self._write("\n")


class _CommandLineApp(PamApplication):
    """Asks the terminal, and records what it was shown for --json."""

    def __init__(self, *args: Any, terminal: Terminal, **kwargs: Any) -> None:
        self.terminal = terminal
        self.shown: list[Message] = []
        super().__init__(*args, **kwargs)

    def conversation(self, messages: list[Message]) -> list[bytes | None]:
        answers: list[bytes | None] = []
        for message in messages:
            self.shown.append(message)
            if message.is_prompt:
                answers.append(self.terminal.ask(message))
            else:
                self.terminal.show(message)
                answers.append(None)
        return answers

    # Like pamtester, run only the operations named on the command line:
    # no implied close_session or setcred(PAM_DELETE_CRED) on the way out.
    _end_closes = False


# -- running ------------------------------------------------------------------


@dataclass
class Invocation:
    service: str
    user: str
    operations: list[Operation]
    items: list[tuple[Item, str]] = field(default_factory=list)
    environment: list[tuple[str, str]] = field(default_factory=list)
    confdir: str | None = None
    broker: str | None = None
    broker_uid: int | None = None
    verbose: bool = False
    json: bool = False
    show_environment: bool = False
    command: list[str] | None = None  # --exec: run as the user in the session
    session_only: bool = False


class _Runner:
    def __init__(
        self, invocation: Invocation, stdin: IO[str] | None, stdout: IO[str], stderr: IO[str]
    ) -> None:
        self.invocation = invocation
        self.stdout = stdout
        self.stderr = stderr
        self.terminal = Terminal(stdin, stderr)
        self.session: Any = None  # the UserSession of --exec

    def say(self, text: str) -> None:
        self.stderr.write(f"pamphlet: {text}\n")
        self.stderr.flush()

    def report(self, record: dict[str, Any]) -> None:
        if self.invocation.json:
            self.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.stdout.flush()

    def run(self) -> int:
        invocation = self.invocation
        if invocation.verbose:
            self.say(f"invoking pam_start({invocation.service}, {invocation.user}, ...)")
        try:
            app = _CommandLineApp(
                invocation.service,
                invocation.user,
                confdir=invocation.confdir,
                terminal=self.terminal,
                **(
                    {}
                    if invocation.broker is None
                    else {"broker": invocation.broker, "broker_uid": invocation.broker_uid}
                ),
            )
        except PamError as error:
            self.say(f"{type(error).__name__}: {error}")
            self.report(_record("pam_start", [], error, [], {}))
            return EXIT_FAILURE
        except BrokerError as refused:  # the broker's policy, not the PAM stack
            self.say(f"{type(refused).__name__}: {refused}")
            return EXIT_FAILURE
        with app:
            try:
                for item, value in invocation.items:
                    app.set_item(item, value)
                for name, value in invocation.environment:
                    app.environ[name] = value
            except (PamError, BrokerError) as error:
                self.say(f"setting items and environment failed: {type(error).__name__}: {error}")
                return EXIT_FAILURE
            if invocation.command is not None:
                from .process import UserSession

                self.session = UserSession(app, session_only=invocation.session_only)
                with contextlib.suppress(AttributeError, OSError, ValueError):
                    self.terminal.input.fileno()  # type: ignore[union-attr] # None: no descriptor
                    self.terminal.unbuffered = True
            for operation in invocation.operations:
                if not self.perform(app, operation):
                    return EXIT_FAILURE
            if invocation.command is not None:
                return self.run_command(invocation.command)
        return 0

    def run_command(self, command: list[str]) -> int:
        """--exec: CMD as the user in the session; its exit status (128+N for signal N)."""
        from .process import run_as_user

        try:
            result = run_as_user(self.session, command)
        except OSError as error:
            self.say(f"cannot run {command[0]}: {error.strerror}")
            return 127 if error.errno == 2 else 126
        if self.invocation.verbose:
            self.say(f"{command[0]} exited with status {result.returncode}")
        return result.returncode if result.returncode >= 0 else 128 - result.returncode

    def perform(self, app: _CommandLineApp, operation: Operation) -> bool:
        phase, success_text = _PHASES[operation.name]
        if self.session is not None and operation.name == "open_session":
            phase = self.open_user_session
        if self.invocation.verbose:
            self.say(f"performing operation - {operation.name}")
        app.shown = []
        before = app.environ.copy()
        error: PamError | None = None
        try:
            phase(app, operation.flags)
        except PamError as failure:
            error = failure
        except (BrokerError, RuntimeError) as refused:  # the broker's or --exec's refusal
            self.say(f"{operation.name} failed: {type(refused).__name__}: {refused}")
            return False
        environ = app.environ.copy()
        self.report(_record(operation.name, operation.flag_names, error, app.shown, environ))
        if error is not None:
            self.say(f"{operation.name} failed: {type(error).__name__}: {error}")
            if self.invocation.broker is None:
                from .doctor import refusal_hint

                hint = refusal_hint(
                    error, self.invocation.service, self.invocation.user, self.invocation.confdir
                )
                if hint is not None:
                    self.say(hint)
            return False
        if not self.invocation.json:
            self.stdout.write(f"pamphlet: {success_text}\n")
            self.stdout.flush()
        if (self.invocation.verbose or self.invocation.show_environment) and environ != before:
            shown = " ".join(f"{name}={value}" for name, value in sorted(environ.items()))
            self.say(f"PAM environment now: {shown or '(empty)'}")
        return True

    def open_user_session(self, app: PamApplication, flags: int) -> None:
        # --exec: initgroups, setcred(ESTABLISH), open_session, in su's order
        self.session.open()


def _record(
    operation: str,
    flags: list[str],
    error: PamError | None,
    shown: list[Message],
    environ: dict[str, str],
) -> dict[str, Any]:
    return {
        "operation": operation,
        "flags": flags,
        "status": "success" if error is None else "failure",
        "code": 0 if error is None else int(error.code),
        "error": None if error is None else type(error).__name__,
        "error_text": None if error is None else error.strerror,
        "messages": [{"style": m.style.name, "text": str(m)} for m in shown],
        "environ": environ,
    }


# -- the demo -----------------------------------------------------------------

DEMO_STACK = """\
auth     required {pam_matrix} passdb={passdb} verbose
account  required {pam_matrix} passdb={passdb}
password required {pam_matrix} passdb={passdb}
session  required {pam_matrix} passdb={passdb}
session  optional pam_echo.so Welcome, %u! This session runs on PAM service %s.
"""


@contextlib.contextmanager
def _demo_service(stderr: IO[str]) -> Iterator[tuple[str, str]]:
    from .testing import TemporaryService

    with TemporaryService(
        DEMO_STACK, users={DEMO_USER: DEMO_PASSWORD}, name=DEMO_SERVICE
    ) as service:
        with open(service.path(), encoding="utf-8") as file:
            stack = file.read()
        stderr.write(
            f"A throwaway PAM service {DEMO_SERVICE!r} is in {service.confdir}:\n\n"
            + "".join(f"    {line}\n" for line in stack.splitlines())
            + f"\nLog in as {DEMO_USER!r}; the password is {DEMO_PASSWORD!r}."
            " The same run by hand (while the folder exists):\n\n"
            f"    pamphlet -v --confdir {service.confdir} {DEMO_SERVICE} {DEMO_USER} "
            + " ".join(f"'{operation}'" for operation in DEMO_OPERATIONS)
            + "\n\n"
        )
        stderr.flush()
        yield DEMO_SERVICE, service.confdir


# -- the command line ---------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> _Parser:
    parser = _Parser(
        prog="pamphlet",
        description=(
            "Run PAM operations for a service and user, as pamtester does. "
            "Prompts and messages go to stderr; without a terminal each prompt "
            "reads one line of stdin."
        ),
        epilog=(
            f"operations: {', '.join(OPERATIONS)}; each may take flags, e.g. "
            "'authenticate(PAM_SILENT|PAM_DISALLOW_NULL_AUTHTOK)'. "
            f"flags: {', '.join(FLAG_NAMES)}. items: {', '.join(ITEM_NAMES)}. "
            "Exit status: 0 when every operation succeeded, 1 when one failed, "
            "2 for a bad command line. After the operations, '--exec -- CMD ARGS' (as root) "
            "runs CMD as the user in the session and exits with its status."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print each step")
    parser.add_argument(
        "-I",
        "--item",
        action="append",
        default=[],
        metavar="ITEM=VALUE",
        help="set a PAM item before the operations (tty, rhost, ruser, user_prompt, ...)",
    )
    parser.add_argument(
        "-E",
        "--env",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="set a variable in the PAM environment before the operations",
    )
    parser.add_argument(
        "--confdir",
        metavar="DIR",
        help="read the service file from DIR instead of /etc/pam.d",
    )
    parser.add_argument(
        "--broker",
        metavar="PATH",
        help="run the operations through the pamphlet broker listening on PATH",
    )
    parser.add_argument(
        "--broker-uid",
        type=int,
        metavar="UID",
        help="trust a broker running as UID besides root (a container's or a test's broker)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per operation on stdout: status, messages, PAM environment",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="log in to a throwaway PAM service with a demo user (no root needed)",
    )
    parser.add_argument(
        "--session-only",
        action="store_true",
        help="--exec after open_session alone, as runuser (without it, authenticate and "
        "acct_mgmt must have succeeded)",
    )
    parser.add_argument("service", nargs="?", help="the PAM service, e.g. login")
    parser.add_argument("user", nargs="?", help="the user to operate on")
    parser.add_argument("operations", nargs="*", metavar="operation", help="what to run, in order")
    return parser


def _invocation(arguments: argparse.Namespace) -> Invocation:
    if arguments.demo:
        if arguments.service is not None or arguments.confdir is not None:
            raise UsageError("--demo takes no service, user, operations or --confdir")
        operations = [parse_operation(text) for text in DEMO_OPERATIONS]
        service, user = DEMO_SERVICE, DEMO_USER
    else:
        if arguments.service is None or arguments.user is None or not arguments.operations:
            raise UsageError("a service, a user and at least one operation are needed")
        operations = [parse_operation(text) for text in arguments.operations]
        service, user = arguments.service, arguments.user
    if arguments.broker is not None and (arguments.confdir is not None or arguments.demo):
        raise UsageError("--broker uses the broker's own PAM configuration: no --confdir or --demo")
    if arguments.confdir is not None and not os.path.isdir(arguments.confdir):
        raise UsageError(f"--confdir {arguments.confdir!r} is not a directory")
    return Invocation(
        service=service,
        user=user,
        operations=operations,
        items=[parse_item(text) for text in arguments.item],
        environment=[parse_environment(text) for text in arguments.env],
        confdir=arguments.confdir,
        broker=arguments.broker,
        broker_uid=arguments.broker_uid,
        verbose=arguments.verbose or arguments.demo,
        json=arguments.json,
        show_environment=arguments.demo,
    )


def _split_exec(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """The arguments before ``--exec``, and the command after it (``--`` dropped)."""
    if "--exec" not in argv:
        return argv, None
    at = argv.index("--exec")
    command = argv[at + 1 :]
    return argv[:at], command[1:] if command[:1] == ["--"] else command


def _add_exec(invocation: Invocation, command: list[str] | None, session_only: bool) -> None:
    if command is None:
        if session_only:
            raise UsageError("--session-only goes with --exec")
        return
    if not command:
        raise UsageError("--exec needs a command: --exec -- CMD ARGS")
    names = [operation.name for operation in invocation.operations]
    if names[-1:] != ["open_session"]:
        raise UsageError("with --exec the last operation must be open_session: CMD runs inside it")
    if invocation.broker is not None:
        raise UsageError("--exec runs CMD here, as root: the broker starts no process as the user")
    invocation.command = command
    invocation.session_only = session_only


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run the command line ``argv``; returns the exit status."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["broker"]:  # ``pamphlet broker ...``: the broker's own command line
        from .broker.server import main as broker_main

        return broker_main(argv[1:])
    if argv[:1] == ["doctor"]:  # ``pamphlet doctor ...``: why a stack will refuse
        from .doctor import main as doctor_main

        return doctor_main(argv[1:], stdin=stdin, stdout=stdout, stderr=stderr)
    parser = _parser()
    argv, command = _split_exec(argv)
    arguments = parser.parse_args(argv)
    try:
        invocation = _invocation(arguments)
        _add_exec(invocation, command, arguments.session_only)
    except UsageError as error:
        parser.error(str(error))
    try:
        if arguments.demo:
            with _demo_service(stderr) as (_, confdir):
                invocation.confdir = confdir
                return _Runner(invocation, stdin, stdout, stderr).run()
        return _Runner(invocation, stdin, stdout, stderr).run()
    except KeyboardInterrupt:
        stderr.write("\npamphlet: interrupted\n")
        return EXIT_INTERRUPTED
    except (OSError, ValueError) as error:
        # A confdir or value pamphlet cannot use: no traceback, a reason.
        stderr.write(f"pamphlet: {type(error).__name__}: {error}\n")
        return EXIT_FAILURE


def run() -> NoReturn:
    """The console script's entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    run()
