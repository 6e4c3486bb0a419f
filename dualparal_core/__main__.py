"""Headless CLI: ``python -m dualparal_core demo | generate`` — the whole pipelined schedule on a worker group;
``python -m dualparal_core bench`` — our engine and its peers side by side (dualparal_core/bench).

Every flag is checked first, without torch and reading file headers only, so a typo costs a moment: a refusal is
one line on stderr naming the flag, the value and what works (exit code 2; ``--debug`` adds the traceback).
"""

from __future__ import annotations

import sys
import traceback


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stderr.write(f"python -m dualparal_core: error: {' '.join(message.split())}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    from dualparal_core.headless.args import build_parser

    args = build_parser().parse_args(argv)
    if args.cmd == "bench":
        from dualparal_core.bench.cli import check as check_args
    else:
        from dualparal_core.headless.checks import check_args
    try:
        plan = check_args(args)
    except ValueError as e:
        return _fail(str(e), 2, args.debug)
    if args.cmd == "bench":
        from dualparal_core.bench.runner import run
    else:
        from dualparal_core.headless.run import run

    try:
        return run(args, plan)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, args.debug)
    except Exception as e:  # one line unless --debug: the checks above caught the user's typos already
        return _fail(f"{type(e).__name__}: {e}", 1, args.debug)


if __name__ == "__main__":
    sys.exit(main())
