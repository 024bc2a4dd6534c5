"""``python -m pamphlet``: the ``pamphlet`` command (see :mod:`pamphlet.cli`)."""

from __future__ import annotations

from .cli import run

if __name__ == "__main__":
    run()
