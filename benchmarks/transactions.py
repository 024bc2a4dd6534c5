"""Transaction cost: pamphlet against C, python-pam and pamela.

    python3 benchmarks/transactions.py [--count N] [--rounds R] [--stack pam_matrix]

A transaction is pam_start, pam_authenticate (one password prompt through
pam_matrix or pam_stress, nothing on the pam_permit stack), pam_acct_mgmt, pam_end. Each
contender runs N transactions in a process of its own per round, the
contenders alternating, R rounds; the table shows medians and the ratio to C.
Nothing here passes or fails.
"""

from __future__ import annotations

import argparse

import _common

CONTENDERS = ["C", "pamphlet", "python-pam", "pamela"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="transactions per run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--stack", choices=sorted(_common.STACKS), action="append")
    args = parser.parse_args()
    _common.ensure_venv()
    c_program = _common.build_c_floor()
    print(_common.machine())
    print(f"{args.count} transactions per run, {args.rounds} rounds, medians\n")
    rows = []
    stacks = {label: _common.STACKS[label] for label in args.stack or _common.STACKS}
    with _common.services(stacks) as services:
        for label, service in services.items():
            contenders = _common.contenders_for(service, CONTENDERS)
            medians = _common.time_rounds(contenders, c_program, service, args.count, args.rounds)
            floor = medians["C"]
            for name in contenders:
                rows.append([label, name, f"{medians[name]:.1f}", f"{medians[name] / floor:.2f}x"])
    _common.print_table(["stack", "contender", "us/transaction", "vs C"], rows)


if __name__ == "__main__":
    main()
