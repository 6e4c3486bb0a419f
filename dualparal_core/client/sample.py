"""One sampling job as the client session runs it (:meth:`~.session.Session.run`): OP_JOB to rank 0, progress, then
the latents; on silence, the rank the group waits for, named from rank 0's heartbeats."""

from __future__ import annotations

import time

from .. import protocol as proto
from ..config import TIMEOUT_ENV
from ..protocol import Job, PoolCancelled, WorkerError


class SampleOp:
    """One sampling job: OP_JOB to rank 0, progress, then the latents."""

    phase = "sample"

    def __init__(self, job: Job, on_progress):
        self.job, self.on_progress, self.result, self.done_op = job, on_progress, None, None
        self.interval: float | None = None
        """The longest interval between two progress events (the pipeline's slowest stage, as this job shows it)."""
        self.progressed = False

    def begin(self, session, jid: int) -> None:
        self.s, self.jid, self.last = session, jid, time.monotonic()
        session.send({"op": proto.OP_JOB, "job": jid, "payload": self.job})

    def links(self) -> list:
        return []

    def handle(self, src, msg: dict) -> bool:
        if msg.get("job") != self.jid:
            return False
        if msg["op"] == proto.OP_PROGRESS:
            now = time.monotonic()
            if self.progressed:  # the first interval holds the job's set-up (text K/V, pre-warm, compilation)
                self.interval = max(self.interval or 0.0, now - self.last)
            self.last, self.progressed = now, True
            if self.on_progress is not None:
                self.on_progress(msg["done"], msg["total"], msg["preview"])
        elif msg["op"] in (proto.OP_RESULT, proto.OP_CANCELLED):
            self.done_op = msg
            return True
        return False

    @property
    def step_s(self) -> float | None:
        """How long stopping may take after a cancel: one block-step through the pipeline, i.e. the block-steps in
        flight (rank 0 collects them before it stops) times the interval; None before the job showed one."""
        if self.interval is None:
            return None
        info = self.s.ready_info
        flight = (info[0].get("in_flight") if info else None) or (len(info) + 1 if len(info) > 1 else 1)
        return flight * self.interval

    def wants_cancel(self) -> bool:
        return False

    def cancel(self) -> None:
        self.s.send({"op": proto.OP_CANCEL, "job": self.jid})

    def stopped(self) -> bool:
        return self.done_op is not None

    def finish(self, cancelled: bool):
        if cancelled or self.done_op["op"] == proto.OP_CANCELLED:
            raise PoolCancelled("DualParal sampling was cancelled.")
        self.s.job_info = self.done_op.get("info", [])
        return self.done_op["latents"]

    def end(self) -> None:
        pass

    def hang(self, silent_s: float, status: dict | None) -> WorkerError:
        """Name the rank the silent group waits for, from rank 0's last heartbeat (its peers' heartbeats)."""
        advice = (f"no progress for {silent_s:.0f} s (Timeouts.step={self.s.timeouts.step:g} s); if one block-step "
                  f"legitimately takes longer, raise it: set {TIMEOUT_ENV['step']}=SECONDS in ComfyUI's "
                  f"environment.")
        peers = (status or {}).get("peers", {})
        silent = {r: p["silent_for"] for r, p in peers.items() if p.get("stale")}
        if silent:
            r = max(silent, key=silent.get)
            return self._named(r, peers[r].get("where"),
                               f"rank {r} stopped responding (no heartbeat for {silent[r]:.0f} s: frozen or stuck "
                               f"in native code); {advice}")
        busy = {r: (p["computing_for"], p.get("step")) for r, p in peers.items() if p.get("computing_for") is not None}
        if status is not None and status.get("computing_for") is not None:
            busy[0] = (status["computing_for"], status.get("step"))
        if busy:
            r = max(busy, key=lambda k: busy[k][0])
            return self._named(r, None, f"rank {r} stopped responding: it has been computing block-step "
                                                  f"{busy[r][1]} for {busy[r][0]:.0f} s; {advice}")
        return WorkerError(None, None, "sample", f"the group stopped responding ({advice})")

    def _named(self, rank: int, where: str | None, cause: str) -> WorkerError:
        err = WorkerError(rank, where, self.phase, cause)
        return self.s.launch._named(err) if self.s.launch is not None else err
