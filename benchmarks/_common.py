"""What the benchmarks share: their own venv, the C floor, the services, the runs.

Every benchmark is one command (``python3 benchmarks/NAME.py``). On first use
it makes ``benchmarks/.venv`` with pamphlet (editable, from this checkout) and
the peers, python-pam and pamela, which are never project dependencies, then
re-runs itself there. As root, the services go to /etc/pam.d under a unique
name (removed afterwards) so that the peers, which cannot take a confdir, and
pamphlet and C all read the same file; otherwise pamphlet and C read a confdir
and the peers sit out.
"""

from __future__ import annotations

import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv"
BUILD = HERE / ".build"
# The contenders that cannot take a confdir: they need the service in /etc/pam.d.
PEERS = ["python-pam", "pamela", "ctypes-floor"]
BENCH_PACKAGES = ["python-pam", "pamela", "pyinstrument"]

USER, PASSWORD = "bench", "bench-secret"

STACKS = {
    "pam_matrix": (
        "auth required {pam_matrix} passdb={passdb}\naccount required {pam_matrix} passdb={passdb}"
    ),
    "pam_permit": "auth required pam_permit.so\naccount required pam_permit.so",
    # One prompt (pam_stress accepts any password) with next to no module
    # work, read from a confdir even as root: libpam's own cost is smallest
    # here, so the binding's share is largest. Only C and pamphlet take a
    # confdir.
    "confdir-cheap": "auth required pam_stress.so\naccount required pam_permit.so",
}
#: The stacks that are always read from a confdir.
CONFDIR_STACKS = {"confdir-cheap"}


def ensure_venv() -> None:
    """Re-run this script in benchmarks/.venv, making it first if needed."""
    if pathlib.Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"making {VENV} (pamphlet from this checkout, python-pam, pamela)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "-e", str(ROOT), *BENCH_PACKAGES], check=True)
    os.execv(str(python), [str(python), *sys.argv])


def build_c_floor() -> str:
    """Compile transactions.c with the system compiler; returns the program."""
    BUILD.mkdir(exist_ok=True)
    program = BUILD / "transactions"
    source = HERE / "transactions.c"
    if not program.exists() or program.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(
            [os.environ.get("CC", "gcc"), "-O2", "-o", str(program), str(source), "-lpam"],
            check=True,
        )
    return str(program)


def build_scripted_module() -> str:
    """Our test module (tests/hostile/pam_scripted.c), for many-message calls."""
    sys.path.insert(0, str(ROOT / "tests"))
    import hostile_module

    BUILD.mkdir(exist_ok=True)
    return hostile_module.build(BUILD)


@dataclass
class Service:
    name: str
    confdir: str | None  # None: /etc/pam.d


@contextmanager
def services(stacks: dict[str, str]) -> Iterator[dict[str, Service]]:
    """Each stack as a service with the bench user; in /etc/pam.d as root."""
    from pamphlet.testing import TemporaryService

    made: list[TemporaryService] = []
    written: list[str] = []
    result: dict[str, Service] = {}
    try:
        for label, stack in stacks.items():
            name = f"pamphlet-bench-{os.getpid()}-{label}"
            service = TemporaryService(stack, users={USER: PASSWORD}, name=name)
            made.append(service)
            if os.geteuid() == 0 and label not in CONFDIR_STACKS:
                target = os.path.join("/etc/pam.d", name)
                shutil.copyfile(service.path(), target)
                written.append(target)
                result[label] = Service(name, None)
            else:
                result[label] = Service(name, service.confdir)
        yield result
    finally:
        for path in written:
            os.unlink(path)
        for service in made:
            service.cleanup()


def command(contender: str, c_program: str, service: Service, count: int) -> list[str]:
    """The command line that runs ``count`` transactions and prints nanoseconds."""
    args = [service.name, USER, PASSWORD, str(count)]
    if service.confdir is not None:
        args.append(service.confdir)
    if contender == "C":
        return [c_program, *args]
    return [sys.executable, str(HERE / "contender.py"), contender, *args]


def contenders_for(service: Service, wanted: Sequence[str]) -> list[str]:
    if service.confdir is not None:
        skipped = [name for name in wanted if name in PEERS]
        if skipped:
            print(f"(not root: {', '.join(skipped)} need /etc/pam.d, left out)", file=sys.stderr)
        return [name for name in wanted if name not in PEERS]
    return list(wanted)


def run_ns(cmd: list[str]) -> int:
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return int(proc.stdout.split()[-1])


def time_rounds(
    contenders: Sequence[str], c_program: str, service: Service, count: int, rounds: int
) -> dict[str, float]:
    """Median microseconds per transaction, the contenders alternating each round."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for _ in range(rounds):
        for name in order:
            ns = run_ns(command(name, c_program, service, count))
            samples[name].append(ns / count / 1000)
        order = order[1:] + order[:1]  # nobody always goes first
    return {name: statistics.median(values) for name, values in samples.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        libpam = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "libpam0g"], capture_output=True, text=True
        ).stdout
    except OSError:
        libpam = "?"
    return (
        f"{cpu}, {os.cpu_count()} CPUs; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; Linux-PAM {libpam or '?'}"
    )


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="pamphlet-bench-")
