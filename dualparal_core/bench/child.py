"""One rank of a peer row, in a process of its own so that its peak memory is its own:

    python -m dualparal_core.bench.child KIND SPEC.json RANK WORLD OUT.json

KIND is ``fullseq`` (diffusers full-sequence sampling; with WORLD > 1 under Ulysses context parallelism over
NCCL) or ``reference`` (the published DualParal code; it sets up NCCL itself). The result (or the error) is written
to OUT.json; the process then leaves at once (``os._exit``), so that no pending NCCL operation of a peer's code can
hold it open.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def _fullseq(spec: dict, rank: int, world: int) -> dict:
    import torch

    from dualparal_core.bench import fullseq

    torch.set_grad_enabled(False)
    if spec["device"] == "cpu":
        torch.set_num_threads(1)
        return fullseq.run(spec, torch.device("cpu"))
    device = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    return fullseq.run(spec, device, world)


def main(argv: list[str]) -> int:
    from dualparal_core.rank.life import die_with_parent

    die_with_parent(os.getppid())  # a bench stopped from outside (timeout, Ctrl-C) leaves no peer on the GPU
    kind, spec_path, rank, world, out = argv[0], argv[1], int(argv[2]), int(argv[3]), Path(argv[4])
    try:
        spec = json.loads(Path(spec_path).read_text())
        if kind == "fullseq":
            result = _fullseq(spec, rank, world)
        elif kind == "reference":
            from dualparal_core.bench import reference

            result = reference.run(spec, rank, world, str(out.parent))
        else:
            raise ValueError(f"unknown peer kind {kind!r}")
        result = dict(result, rank=rank)
        code = 0
    except BaseException as e:  # the row says what failed; the parent goes on with the next row
        traceback.print_exc()
        result, code = dict(rank=rank, error=f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]), 1
    out.write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
