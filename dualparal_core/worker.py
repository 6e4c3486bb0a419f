"""``python -m dualparal_core.worker --serve HOST:PORT``: start one rank of a DualParal group (see
:mod:`dualparal_core.rank.program`). torchrun starts it for a long-lived group; a local pool's parent starts it with
``--exit-on-detach`` (:mod:`dualparal_core.client.launch`)."""

from __future__ import annotations

import os
import sys


def run(argv: list[str]) -> None:
    from .rank.program import main

    rc = main(argv)
    sys.stderr.flush()
    os._exit(rc)  # skip interpreter finalisation: library atexit hooks must not keep a finished rank alive


if __name__ == "__main__":
    run(sys.argv[1:])
