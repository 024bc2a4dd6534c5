"""What the broker costs: the same logins in-process and through ``pamphlet broker``.

    sudo python3 benchmarks/broker.py [--count N] [--total T] [--in-flight K]

Needs root (the broker runs PAM as root; one stack lives in /etc/pam.d).
A login is start, authenticate, acct_mgmt, end, by a PamApplication in this
process, once with libpam here and once with ``broker=PATH``. Two stacks:
pam_permit from a confdir (no conversation: the broker's own cost), and
pam_matrix from /etc/pam.d (one password prompt relayed to the client).
Printed side by side: logins per second (one client, then 4 threads),
median and p99 latency per login and what the broker adds; then the memory
of K transactions in flight and the broker's RSS over T transactions.
Nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pamphlet

THREADS = 4


class Login(pamphlet.PamApplication):
    def conversation(self, messages: list[pamphlet.Message]) -> list[str | None]:
        return ["secret" if m.is_prompt else None for m in messages]


def one_login(service: str, **where: str) -> float:
    started = time.perf_counter()
    with Login(service, "bench", **where) as app:
        app.authenticate()
        app.account_management()
    return time.perf_counter() - started


def run(service: str, count: int, **where: str) -> list[float]:
    for _ in range(min(200, count // 10)):  # warm-up
        one_login(service, **where)
    return [one_login(service, **where) for _ in range(count)]


def run_threads(service: str, count: int, **where: str) -> float:
    """Logins per second with THREADS client threads."""
    per_thread = count // THREADS

    def work() -> None:
        for _ in range(per_thread):
            one_login(service, **where)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return per_thread * THREADS / (time.perf_counter() - started)


def p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99)]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as file:
        for line in file:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as file:
                    if int(file.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except OSError:
                pass
    return found


@contextlib.contextmanager
def broker(directory: str, confdir: str | None, services: list[str]) -> Iterator[tuple[str, int]]:
    policy = os.path.join(directory, f"policy-{len(os.listdir(directory))}.toml")
    with open(policy, "w") as file:
        file.write(
            f'[[allow]]\nusers = ["root"]\nservices = {services!r}\nmax_in_flight = 1000\n'
            "[limits]\nmax_pending_per_peer = 1000\n"
            "[throttle]\npeer_slow_after = 100000\npeer_refuse_after = 100000\n"
        )
    path = os.path.join(directory, f"broker-{len(os.listdir(directory))}.sock")
    command = [
        sys.executable,
        "-m",
        "pamphlet",
        "broker",
        "--socket",
        path,
        "--policy",
        policy,
        "--audit",
        "stderr",
    ]
    if confdir is not None:
        command += ["--confdir", confdir]
    log = open(os.path.join(directory, "audit.log"), "a")  # noqa: SIM115
    process = subprocess.Popen(command, stderr=log)
    try:
        while not os.path.exists(path):
            if process.poll() is not None:
                raise SystemExit("the broker did not start; see its log")
            time.sleep(0.01)
        yield path, process.pid
    finally:
        process.terminate()
        process.wait()
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="logins per measurement")
    parser.add_argument("--total", type=int, default=10_000, help="logins for the RSS run")
    parser.add_argument("--in-flight", type=int, default=100, help="transactions held at once")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the broker runs PAM as root, and a stack goes in /etc/pam.d")
    (matrix,) = glob.glob("/usr/lib/*/pam_wrapper/pam_matrix.so")
    directory = tempfile.mkdtemp(prefix="pamphlet-bench-broker-")
    os.chmod(directory, 0o755)
    confdir = os.path.join(directory, "confdir")
    os.mkdir(confdir)
    permit = "pamphlet-bench-permit"
    with open(os.path.join(confdir, permit), "w") as file:
        file.write("auth required pam_permit.so\naccount required pam_permit.so\n")
    etc_service = "pamphlet-bench-" + secrets.token_hex(4)
    passdb = os.path.join(directory, "passdb")
    with open(passdb, "w") as file:
        file.write(f"bench:secret:{etc_service}\n")
    etc_path = f"/etc/pam.d/{etc_service}"
    with open(etc_path, "w") as file:
        file.write(
            f"auth required {matrix} passdb={passdb}\naccount required {matrix} passdb={passdb}\n"
        )
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {args.count} logins per run\n")
    try:
        rows = []
        stacks = [
            ("pam_permit, confdir", permit, confdir),
            ("pam_matrix, /etc/pam.d", etc_service, None),
        ]
        for label, service, service_confdir in stacks:
            local: dict[str, str] = {} if service_confdir is None else {"confdir": service_confdir}
            with broker(directory, service_confdir, [service]) as (path, _):
                inproc = run(service, args.count, **local)
                brokered = run(service, args.count, broker=path)
                inproc_parallel = run_threads(service, args.count, **local)
                brokered_parallel = run_threads(service, args.count, broker=path)
            for name, times, parallel in (
                ("in-process", inproc, inproc_parallel),
                ("broker", brokered, brokered_parallel),
            ):
                rows.append(
                    (
                        label,
                        name,
                        len(times) / sum(times),
                        parallel,
                        statistics.median(times) * 1e3,
                        p99(times) * 1e3,
                    )
                )
            added = statistics.median(brokered) - statistics.median(inproc)
            added_p99 = p99(brokered) - p99(inproc)
            rows.append(
                (
                    label,
                    "broker / in-process",
                    f"{sum(inproc) / sum(brokered):.2f}x",
                    f"{brokered_parallel / inproc_parallel:.2f}x",
                    f"+{added * 1e3:.2f}",
                    f"+{added_p99 * 1e3:.2f}",
                )
            )
        header = ("stack", "how", "logins/s", f"logins/s x{THREADS}", "median ms", "p99 ms")
        print("  ".join(f"{h:>24}" if i < 2 else f"{h:>14}" for i, h in enumerate(header)))
        for row in rows:
            cells = []
            for i, cell in enumerate(row):
                text = (
                    f"{cell:.1f}"
                    if isinstance(cell, float) and i < 4
                    else (f"{cell:.3f}" if isinstance(cell, float) else str(cell))
                )
                cells.append(f"{text:>24}" if i < 2 else f"{text:>14}")
            print("  ".join(cells))

        print("\nmemory, pam_permit stack:")
        with broker(directory, confdir, [permit]) as (path, pid):
            before = rss_kib(pid)
            held = []
            for _ in range(args.in_flight):
                app = Login(permit, "bench", broker=path)
                app.authenticate()
                held.append(app)
            workers = children(pid)
            rss = [rss_kib(w) for w in workers]
            pss = [pss_kib(w) for w in workers]
            print(
                f"  {len(workers)} transactions in flight: worker RSS median "
                f"{statistics.median(rss) / 1024:.1f} MiB, PSS median "
                f"{statistics.median(pss) / 1024:.2f} MiB (its own share), "
                f"total PSS {sum(pss) / 1024:.1f} MiB; broker RSS {before / 1024:.1f} MiB"
            )
            for app in held:
                app.end()
            samples = []
            done = 0
            for target in (1000, args.total // 2, args.total):
                while done < target:
                    one_login(permit, broker=path)
                    done += 1
                samples.append(f"{done}: {rss_kib(pid) / 1024:.2f} MiB")
            print(f"  broker RSS at start {before / 1024:.2f} MiB; after " + ", ".join(samples))
    finally:
        os.unlink(etc_path)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
