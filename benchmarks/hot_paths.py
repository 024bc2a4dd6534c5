"""Where pamphlet's own time goes: pyinstrument over the transaction benchmark.

    python3 benchmarks/hot_paths.py [--count N] [--stack pam_matrix]

Runs N pamphlet transactions (the contender of transactions.py) under
pyinstrument and prints the call tree, libpam's own work shown as the time
inside the phase calls. For instruction-exact figures use instructions.py.
"""

from __future__ import annotations

import argparse

import _common
import contender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--stack", choices=sorted(_common.STACKS), default="pam_matrix")
    args = parser.parse_args()
    _common.ensure_venv()
    from pyinstrument import Profiler

    with _common.services({args.stack: _common.STACKS[args.stack]}) as services:
        service = services[args.stack]
        transaction = contender.pamphlet_transaction(
            service.name, _common.USER, _common.PASSWORD, service.confdir
        )
        transaction()
        profiler = Profiler(interval=0.0001)
        profiler.start()
        for _ in range(args.count):
            transaction()
        profiler.stop()
    print(profiler.output_text(unicode=True, color=False, show_all=False))


if __name__ == "__main__":
    main()
