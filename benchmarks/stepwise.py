"""Logins waiting at a prompt: threads and memory, before and after the stepwise login.

    sudo python3 benchmarks/stepwise.py [--count N] [--no-broker]

N logins (1,000 by default) are started at once and left waiting at the
password prompt of a pam_matrix stack, as a web site's logins wait for their
users. Measured while they all wait: this process's threads beyond its
baseline, its RSS growth, and, through the broker, the broker's workers and
their memory (PSS: each worker's own share). Then the time to end them all.

"before" is how the web front ends held a login until now: an
AsyncPamApplication whose conversation awaits the browser (the example's
and the hub's LoginFlow; with ``broker=`` the hub's too). "after" is
:class:`pamphlet.stepwise.AsyncLogin`, which every front end now uses, kept
in a LoginRegistry. Two transports: in this process, and the broker (needs
root; --no-broker skips it). Nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from broker import broker, children, pss_kib, rss_kib

from pamphlet import Message
from pamphlet.aio import AsyncPamApplication
from pamphlet.stepwise import AsyncLogin, LoginRegistry

SERVICE = "pamphlet-bench-stepwise"


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


class Waiting(AsyncPamApplication):
    """The old way: the conversation awaits an answer that the next request brings."""

    def __init__(self, *args: Any, asked: asyncio.Event, **kwargs: Any) -> None:
        self.asked = asked
        super().__init__(*args, **kwargs)

    async def conversation(self, messages: list[Message]) -> list[str]:
        self.asked.set()
        await asyncio.get_running_loop().create_future()  # the browser never answers
        return []


async def before(count: int, where: dict[str, str]) -> tuple[float, Callable[[], Awaitable[None]]]:
    apps: list[Waiting] = []
    tasks = []
    events = []
    started = time.perf_counter()
    for _ in range(count):
        asked = asyncio.Event()
        app = Waiting(SERVICE, "bench", asked=asked, **where)
        apps.append(app)
        events.append(asked)
        tasks.append(asyncio.ensure_future(app.authenticate()))
    await asyncio.gather(*(event.wait() for event in events))
    elapsed = time.perf_counter() - started

    async def end() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(app.end() for app in apps))

    return elapsed, end


async def after(count: int, where: dict[str, str]) -> tuple[float, Callable[[], Awaitable[None]]]:
    registry: LoginRegistry[AsyncLogin] = LoginRegistry(
        max_logins=count, max_per_address=count, timeout=600
    )
    started = time.perf_counter()
    logins = await asyncio.gather(
        *(
            registry.start_async(
                f"192.0.2.{i % 250}", lambda: AsyncLogin.start(SERVICE, "bench", **where)
            )
            for i in range(count)
        )
    )
    elapsed = time.perf_counter() - started
    assert all(login.step is not None for _, login in logins), "a login did not reach its prompt"
    return elapsed, lambda: registry.close_async()


def measure(
    label: str,
    how: Callable[[int, dict[str, str]], Awaitable[tuple[float, Callable[[], Awaitable[None]]]]],
    count: int,
    where: dict[str, str],
    broker_pid: int | None,
) -> list[str]:
    async def run() -> list[str]:
        base_threads, base_rss = threads(), rss_kib(os.getpid())
        elapsed, end = await how(count, where)
        await asyncio.sleep(0.5)  # let the starting threads finish
        held_threads = threads() - base_threads
        grown = (rss_kib(os.getpid()) - base_rss) / 1024
        workers = children(broker_pid) if broker_pid is not None else []
        worker_pss = sum(pss_kib(pid) for pid in workers) / 1024
        started = time.perf_counter()
        await end()
        ended = time.perf_counter() - started
        side = f"{len(workers)} workers, {worker_pss:.0f} MiB PSS" if workers else "-"
        return [
            label,
            f"{elapsed:.2f}",
            str(held_threads),
            f"{grown:.1f}",
            side,
            f"{ended:.2f}",
        ]

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="logins waiting at once")
    parser.add_argument("--no-broker", action="store_true", help="in-process only (no root)")
    args = parser.parse_args()
    with_broker = not args.no_broker
    if with_broker and os.geteuid() != 0:
        raise SystemExit("run as root for the broker (or pass --no-broker)")
    (matrix,) = glob.glob("/usr/lib/*/pam_wrapper/pam_matrix.so")
    directory = tempfile.mkdtemp(prefix="pamphlet-bench-stepwise-")
    os.chmod(directory, 0o755)
    confdir = os.path.join(directory, "confdir")
    os.mkdir(confdir)
    passdb = os.path.join(directory, "passdb")
    with open(passdb, "w") as file:
        file.write(f"bench:secret:{SERVICE}\n")
    with open(os.path.join(confdir, SERVICE), "w") as file:
        file.write(
            f"auth required {matrix} passdb={passdb}\naccount required {matrix} passdb={passdb}\n"
        )
    print(
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"{args.count} logins waiting at a password prompt at once\n"
    )
    rows = [["", "to the prompt s", "threads held", "RSS +MiB", "broker side", "end all s"]]
    try:
        local = {"confdir": confdir}
        rows.append(measure("in-process, before", before, args.count, local, None))
        rows.append(measure("in-process, after", after, args.count, local, None))
        if with_broker:
            with broker(directory, confdir, [SERVICE]) as (path, pid):
                through = {"broker": path}
                rows.append(measure("broker, before", before, args.count, through, pid))
            with broker(directory, confdir, [SERVICE]) as (path, pid):
                rows.append(
                    measure("broker, after", after, args.count, through | {"broker": path}, pid)
                )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    print(
        "\nthreads held: this process's threads beyond its baseline while every login "
        "waits; in-process each login waits inside libpam on a thread of its own (before "
        "and after alike: PAM's conversation is a blocking call). Through the broker, "
        "before held a thread per login; after holds none."
    )


if __name__ == "__main__":
    main()
