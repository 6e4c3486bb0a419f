"""The product's rank program with faults wrapped around its seams, where a test asks for them (DUALPARAL_FAULT).

Run by a local pool when the test sets ``DUALPARAL_RANK_MODULE=faulty_rank`` (with this folder on PYTHONPATH, see
``fault_helpers.fault_env``); fault injection lives here, never in the product. ``DUALPARAL_FAULT`` is a
``;``-separated list of ``key=value,...`` with keys rank (default: every rank), phase (startup|load|sample|decode),
step (1-based block-step on that rank; for decode, the rank's decoded blocks counted over all decodes; for load,
the rank's n-th model load, a torchrun group's start-up model being the first), kind
(kill|raise|hang|oom|slow|exit_on_start|exit_early|never_ready|ignore_term) and delay (seconds, kind=slow).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dualparal_core import logger  # noqa: E402
from dualparal_core.rank import decode as rank_decode  # noqa: E402
from dualparal_core.rank.lead import Lead  # noqa: E402
from dualparal_core.rank.program import Rank, main  # noqa: E402

_KIND_PHASE = {"exit_on_start": "startup", "exit_early": "startup", "ignore_term": "startup",
               "never_ready": "load"}
FAULT_KINDS = ("kill", "raise", "hang", "oom", "slow", "exit_on_start", "exit_early", "never_ready", "ignore_term")


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``kind`` at ``phase`` (at this rank's ``step``-th block-step when sampling)."""

    kind: str
    phase: str
    step: int = 1
    rank: int | None = None
    delay: float = 0.05


def parse_faults(text: str | None, rank: int) -> list[Fault]:
    """The faults of ``text`` (DUALPARAL_FAULT) meant for ``rank``."""
    out = []
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        kv = dict(item.split("=", 1) for item in part.replace(" ", "").split(",") if item)
        kind = kv.get("kind", "")
        if kind not in FAULT_KINDS:
            raise ValueError(f"DUALPARAL_FAULT: kind={kind!r} is not one of {list(FAULT_KINDS)}.")
        f = Fault(kind, kv.get("phase", _KIND_PHASE.get(kind, "sample")), int(kv.get("step", 1)),
                  int(kv["rank"]) if kv.get("rank", "all") != "all" else None, float(kv.get("delay", 0.05)))
        if f.rank is None or f.rank == rank:
            out.append(f)
    return out


class FaultyRank(Rank):
    """A Rank that fires the faults of DUALPARAL_FAULT at its seams: start, build, each block-step, each decoded
    block."""

    def __init__(self, args, env, key):
        super().__init__(args, env, key)
        self.faults = parse_faults(env.get("DUALPARAL_FAULT"), self.rank)
        if any(f.kind == "ignore_term" for f in self.faults):
            args.exit_on_detach = False  # play a wedged rank: a detach does not end it either
            watch = Lead.watch

            def watch_then_ignore(lead):
                watch(lead)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)

            Lead.watch = watch_then_ignore
        if any(f.phase == "decode" for f in self.faults):
            to_image, decoded = rank_decode.to_image, [0]

            def fire_then_convert(video):  # once per decoded block, counted over all decodes
                decoded[0] += 1
                self.fire("decode", decoded[0])
                return to_image(video)

            rank_decode.to_image = fire_then_convert

    def fire(self, phase: str, step: int | None = None) -> None:
        for f in self.faults:
            if f.phase != phase:
                continue
            if f.kind == "slow":
                time.sleep(f.delay)
                continue
            if step is not None and step != f.step:
                continue
            logger.warning("rank %d: injecting fault %s at %s%s", self.rank, f.kind, phase,
                           f" step {step}" if step else "")
            if f.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.kind == "raise":
                raise ValueError("boom-42")
            elif f.kind == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (fault injection)")
            elif f.kind == "exit_on_start":
                raise ValueError("no such model")
            elif f.kind in ("hang", "never_ready"):
                while True:
                    time.sleep(3600)

    def run(self) -> None:
        if any(f.kind == "exit_early" for f in self.faults):
            sys.stderr.write("ValueError: no such model (fault injection, before joining)\n")
            sys.stderr.flush()
            os._exit(3)
        self.fire("startup")
        super().run()

    def build(self, spec):
        stage = super().build(spec)
        self.builds = getattr(self, "builds", 0) + 1
        self.fire("load", self.builds)
        return stage

    def _install(self, stage, spec) -> None:
        inner = stage.blocks_forward

        def blocks_forward(*args, **kw):  # inside the product's instrumentation: block_step is already counted
            if self.faults:
                self.fire("sample", self.block_step)
            return inner(*args, **kw)

        stage.blocks_forward = blocks_forward
        super()._install(stage, spec)


if __name__ == "__main__":
    rc = main(sys.argv[1:], FaultyRank)
    sys.stderr.flush()
    os._exit(rc)
