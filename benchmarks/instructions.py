"""Instruction counts: user-space instructions per transaction, immune to noise.

    python3 benchmarks/instructions.py [--low N] [--high M] [--stack pam_matrix]

Runs each contender of transactions.py under ``valgrind --tool=callgrind`` at
N and at M transactions and subtracts: start-up and imports cancel out, what
is left is the cost of M - N transactions. The table shows instructions per
transaction and each Python library's overhead over C's; ctypes-floor is
the least any ctypes binding can do (no checks, no safety), for reference.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess

import _common

CONTENDERS = ["C", "pamphlet", "python-pam", "pamela", "ctypes-floor"]


def instructions(cmd: list[str]) -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is needed: apt-get install valgrind")
    proc = subprocess.run(
        [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"{' '.join(cmd)} failed under callgrind:\n{proc.stderr[-3000:]}")
    return int(found.group(1))


def per_transaction(
    name: str, c_program: str, service: _common.Service, low: int, high: int
) -> float:
    counts = [instructions(_common.command(name, c_program, service, n)) for n in (low, high)]
    return (counts[1] - counts[0]) / (high - low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--low", type=int, default=20)
    parser.add_argument("--high", type=int, default=220)
    parser.add_argument("--stack", choices=sorted(_common.STACKS), action="append")
    parser.add_argument("--contender", choices=CONTENDERS, action="append")
    args = parser.parse_args()
    _common.ensure_venv()
    c_program = _common.build_c_floor()
    stacks = {label: _common.STACKS[label] for label in args.stack or ["pam_matrix"]}
    print(_common.machine())
    print(f"callgrind, ({args.high} - {args.low} transactions) / {args.high - args.low}\n")
    rows = []
    with _common.services(stacks) as services:
        for label, service in services.items():
            wanted = ["C", *[c for c in args.contender or CONTENDERS if c != "C"]]
            counts = {
                name: per_transaction(name, c_program, service, args.low, args.high)
                for name in _common.contenders_for(service, wanted)
            }
            for name, count in counts.items():
                over = "" if name == "C" else f"{(count - counts['C']) / 1000:+.1f} k"
                rows.append([label, name, f"{count / 1000:.1f} k", over])
    _common.print_table(["stack", "contender", "instructions/transaction", "over C"], rows)


if __name__ == "__main__":
    main()
