"""``python -m examples.web_login --port PORT [--service NAME] [--confdir DIR]``.

See ``--help`` for the timeouts and the caps on logins in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from .demo import DEMO_CODE, DEMO_PASSWORD, demo_service
from .server import MAX_LOGINS, MAX_LOGINS_PER_ADDRESS, WebLogin


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.web_login",
        description="A web login through PAM. Without --service, a demo stack is built.",
    )
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--service", help="the PAM service (default: a demo stack)")
    parser.add_argument("--confdir", help="read the service here instead of /etc/pam.d")
    parser.add_argument(
        "--broker",
        metavar="PATH",
        help="run PAM in the pamphlet broker listening on PATH (a server that is not root)",
    )
    parser.add_argument(
        "--login-timeout",
        type=float,
        default=120.0,
        help="seconds before an abandoned login is released (default 120)",
    )
    parser.add_argument(
        "--session-timeout",
        type=float,
        default=1800.0,
        help="idle seconds before a session is closed (default 1800)",
    )
    parser.add_argument(
        "--max-logins",
        type=_positive,
        default=MAX_LOGINS,
        help="logins in flight (started, not yet logged in) at once; "
        f"more are told to try again later (default {MAX_LOGINS})",
    )
    parser.add_argument(
        "--max-logins-per-address",
        type=_positive,
        default=MAX_LOGINS_PER_ADDRESS,
        help="logins in flight from one client address (an IPv6 /64); behind a "
        f"reverse proxy all clients share its address (default {MAX_LOGINS_PER_ADDRESS})",
    )
    parser.add_argument(
        "--secure-cookie",
        action="store_true",
        help="mark the cookie Secure (when served over HTTPS behind a proxy)",
    )
    return parser.parse_args(argv)


async def serve(arguments: argparse.Namespace, service: str, confdir: str | None) -> None:
    login = WebLogin(
        service,
        confdir=confdir,
        broker=arguments.broker,
        login_timeout=arguments.login_timeout,
        session_timeout=arguments.session_timeout,
        secure_cookie=arguments.secure_cookie,
        max_logins=arguments.max_logins,
        max_logins_per_address=arguments.max_logins_per_address,
    )
    runner = web.AppRunner(login.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, arguments.host, arguments.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"Serving the web login for PAM service {service!r} on http://{host}:{port}/", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # releases every login: sessions closed, handles ended


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.ExitStack() as stack:
        service, confdir = arguments.service, arguments.confdir
        if service is None:
            demo = stack.enter_context(demo_service())
            service, confdir = demo.name, demo.confdir
            print(
                f"Demo stack in {demo.confdir}: log in as 'demo' with password "
                f"{DEMO_PASSWORD!r} and code {DEMO_CODE!r}, or as 'olduser' "
                "(same answers) to change an expired password.",
                flush=True,
            )
        asyncio.run(serve(arguments, service, confdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
