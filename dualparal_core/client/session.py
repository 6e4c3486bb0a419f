"""The one client session: the parent's authenticated connection to rank 0 of a group, local or torchrun-started.

It attaches (connect, authenticate, hello with the model, wait until every rank loaded it), runs ops one at a time
through one loop (:meth:`Session.run`: sampling in :mod:`.sample`, Block Decode in :mod:`.decode`), cancels, names
the rank that failed, froze or hung, and detaches. A local pool's session also owns the :class:`~.launch.Launch` of its ranks: then the
exit codes of its own children join the diagnosis, and closing the session ends the ranks.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, wait
from typing import NoReturn

import torch

from .. import __version__, logger
from .. import protocol as proto
from ..channel import KEY_ENV, authenticate, dumps, loads
from ..config import TIMEOUT_ENV, Timeouts
from ..protocol import AttachError, PoolCancelled, WorkerError
from .launch import Launch
from .sample import SampleOp  # noqa: F401 - re-exported: the sampling op of Session.run


class Lost(Exception):
    """The connection to rank 0 closed."""


class Session:
    """One parent's attachment to a group's rank 0; ``label`` names the group in messages."""

    def __init__(self, conn: Connection, timeouts: Timeouts, label: str, launch: Launch | None = None):
        self.conn, self.timeouts, self.label, self.launch = conn, timeouts, label, launch
        self.ready_info: list[dict] = []
        self.job_info: list[dict] = []
        self.config = None
        self.status: dict | None = None
        self.job_id, self.healthy, self.closed, self.fault = 0, True, False, None
        self.busy, self.cancel_flag = threading.Lock(), threading.Event()
        self.cancel_at: float | None = None
        self.heard = time.monotonic()
        self.group_beat: float | None = None  # rank 0's heartbeat interval, from its first heartbeat

    # ------------------------------------------------------------------ attach
    @classmethod
    def connect(cls, host: str, port: int, key: bytes, timeouts: Timeouts, label: str,
                launch: Launch | None = None, hint: str = "") -> Session:
        """Connect and authenticate; AttachError with the reason when nothing (or something else) answers."""
        try:
            sock = socket.create_connection((host, port), timeout=timeouts.connect)
        except OSError as exc:
            raise AttachError(f"no DualParal group listening at {label.rsplit(' at ', 1)[-1]} "
                              f"({exc.strerror or exc}){hint}.") from None
        local_host = sock.getsockname()[0]  # where this parent is reachable from rank 0 (Block Decode's links)
        try:
            conn = authenticate(sock, key, server=False, timeout=timeouts.connect)
        except AuthenticationError:
            raise AttachError(f"authentication failed at {label}: {KEY_ENV} here differs from the key the group "
                              f"was started with; set the same value in both environments.") from None
        except (OSError, EOFError):
            raise AttachError(f"{label} accepted the connection but did not complete the DualParal handshake "
                              f"within {timeouts.connect:g} s: is another service on that port, or is it not a "
                              f"DualParal group{hint}?") from None
        self = cls(conn, timeouts, label, launch)
        self.key, self.local_host = key, local_host
        return self

    def attach(self, model, status: Callable[[str], None], should_abort: Callable[[], bool] | None,
               t0: float) -> None:
        """Hello with ``model``; wait until every rank holds it (AttachError, WorkerError, TimeoutError,
        PoolCancelled)."""
        try:
            self.send({"op": proto.OP_SPEC, "model": model, "version": __version__,
                       "client": f"{socket.gethostname()} pid {os.getpid()}"})
            self.heard = time.monotonic()
            while True:
                msg = self.recv(self.timeouts.poll)
                if msg is not None:
                    self._heard(msg)
                    if self._ready(msg, status, t0):
                        return
                if self.launch is not None and self.launch.poll():
                    raise self.launch.diagnose("load", self._pending_report())
                if self.launch is not None or self.group_beat is not None:  # beats at a known interval
                    self._frozen_while_loading(msg)
                if should_abort is not None and should_abort():
                    raise PoolCancelled(f"starting {self.label} was interrupted" + (
                        "; no worker is left running." if self.launch else "; the group keeps running."))
                if time.monotonic() - t0 > self.timeouts.startup:
                    raise TimeoutError(
                        f"{self.label} was not ready after {time.monotonic() - t0:.0f} s (Timeouts.startup="
                        f"{self.timeouts.startup:g} s): it is still loading the model" +
                        ("" if self.launch else ", or serving another job first") +
                        f". If loading the model legitimately takes longer (large checkpoint, slow disk), raise "
                        f"it: set {TIMEOUT_ENV['startup']}=SECONDS in ComfyUI's environment.")
        except Lost:
            if self.launch is not None:
                raise self.launch.diagnose("load") from None
            raise AttachError(f"{self.label} closed the connection while attaching (it stopped or restarted: see "
                              f"its torchrun output).") from None

    def _heard(self, msg: dict) -> None:
        """Any message from rank 0; a heartbeat also says its interval (an attached group's own setting)."""
        self.heard = time.monotonic()
        beat = msg.get("heartbeat") if msg["op"] == proto.OP_STATUS else None
        if isinstance(beat, (int, float)) and 0 < beat < float("inf"):
            self.group_beat = float(beat)

    def _frozen_while_loading(self, msg: dict | None) -> None:
        """While the group loads (or rank 0 loads its start-up model before it serves us), rank 0 beats with its
        peers' states, as during a job: name a frozen rank now rather than at the startup timeout. A local pool's
        ranks beat at our interval; an attached group's interval is known from its first heartbeat."""
        now = time.monotonic()
        if msg is not None:
            stale = {r: p for r, p in (msg.get("peers") or {}).items() if p.get("stale")}
            if msg["op"] == proto.OP_STATUS and stale:
                r = max(stale, key=lambda k: stale[k]["silent_for"])
                raise self.frozen("load", r, stale[r]["silent_for"], stale[r].get("where"))
        elif now - self.heard > self.stale_after:
            raise self.frozen("load", 0, now - self.heard, None)

    def _ready(self, msg: dict, status: Callable[[str], None], t0: float) -> bool:
        op = msg["op"]
        if op == proto.OP_ERROR:
            if msg.get("phase") == "attach":
                raise AttachError(f"{self.label}: {msg['message']}")
            raise self.error(msg, "load")
        if op == proto.OP_STATUS and msg.get("text"):
            status(f"rank {msg.get('rank', 0)}: {msg['text']}")
        if op != proto.OP_READY:
            return False
        self.ready_info = msg["info"]
        self.config = self.ready_info[0]["config"]  # what the ranks actually built: jobs are checked against it
        hosts = sorted({i["host"] for i in self.ready_info})
        logger.info("DualParal: %s ready: %d rank(s) on %s, in %.1f s", self.label, len(self.ready_info),
                    ", ".join(hosts), time.monotonic() - t0)
        return True

    # ------------------------------------------------------------------ channel
    def send(self, msg: dict) -> None:
        self.conn.send_bytes(dumps(msg))

    def recv(self, timeout: float) -> dict | None:
        try:
            if not self.conn.poll(timeout):
                return None
            return loads(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise Lost() from exc

    def error(self, msg: dict, phase: str) -> WorkerError:
        """A rank's report -> WorkerError; a local pool adds what it sees of its children."""
        if self.launch is not None:
            return self.launch.diagnose(phase, msg)
        return proto.error_from_report(msg, phase)

    @property
    def alive(self) -> bool:
        if not self.healthy or self.closed:
            return False
        if not self.busy.acquire(blocking=False):  # a job runs: its loop names any fault
            return self.launch is None or self.launch.alive()
        try:  # idle: a report, an EOF or a rank's exit that came meanwhile is a fault, named now
            report = None
            while self.healthy and self.conn.poll(0):
                msg = self.recv(0)
                if msg is not None and msg["op"] == proto.OP_ERROR:
                    report = msg
                    self.fault, self.healthy = self.error(msg, "idle"), False
        except (Lost, OSError):
            self.healthy = False
        finally:
            self.busy.release()
        if self.launch is not None and (not self.healthy or not self.launch.alive()):
            if self.fault is None or report is not None:
                self.fault = self.launch.diagnose("idle", report)  # which rank, killed by what, its log
            self.healthy = False
            self.close()
            logger.warning("DualParal: %s failed while idle: %s", self.label, self.fault)
        return self.healthy

    # ------------------------------------------------------------------ the one run loop
    def run(self, op, should_cancel: Callable[[], bool] | None):
        """Run ``op`` (an object with begin/handle/cancel/links/finish, see SampleOp) to its end."""
        if not self.alive:
            raise self.closed_error(op.phase)
        if not self.busy.acquire(blocking=False):
            raise RuntimeError("This DualParal pool is already running a job; one job at a time.")
        self.cancel_flag.clear()
        try:
            return self._loop(op, should_cancel)
        finally:
            self.busy.release()

    def _pending_report(self) -> dict | None:
        """Rank 0's report of a fault that this parent saw first as a rank's exit: it may still be on its way."""
        end = time.monotonic() + self.timeouts.fault_window
        try:
            while time.monotonic() < end:
                msg = self.recv(self.timeouts.poll)
                if msg is not None and msg["op"] == proto.OP_ERROR:
                    return msg
        except Lost:
            pass  # rank 0 is gone too: the exit codes say the rest
        return None

    def _launch_fault(self, phase: str) -> NoReturn:
        """A local rank exited mid-op: name the root cause from rank 0's report and the exit codes, then fail."""
        self.fail(self.launch.diagnose(phase, self._pending_report()))

    def closed_error(self, phase: str) -> WorkerError:
        """What a closed or faulted session answers: the fault itself (its rank, its cause) when there was one."""
        again = " (or attach again)." if self.launch is None else "."
        f = self.fault
        if f is None:
            return WorkerError(None, None, phase, f"{self.label} is closed or had a fault; start a new one{again}")
        return WorkerError(f.rank, f.device, f.phase, f"{f.cause}\n{self.label} was closed after that fault; start "
                           f"a new one{again}", f.exc_type)

    def _loop(self, op, should_cancel):
        self.job_id += 1
        self.cancel_at = None
        try:
            op.begin(self, self.job_id)
            self.heard = time.monotonic()  # the last message from rank 0: heartbeats flow while an op runs
            while True:
                for src, msg in self._pump(op):
                    if src is self.conn:
                        self.heard = time.monotonic()
                        if msg["op"] == proto.OP_ERROR:
                            if msg.get("recoverable"):
                                raise ValueError(msg["message"])
                            self.fail(self.error(msg, op.phase))
                    if src is self.conn and msg["op"] == proto.OP_STATUS:
                        self._status(op, msg)
                    elif op.handle(src, msg):
                        return op.finish(self.cancel_at is not None)
                if self.launch is not None and self.launch.poll():
                    self._launch_fault(op.phase)
                self._watch(op, should_cancel)
        except (PoolCancelled, ValueError, WorkerError, torch.OutOfMemoryError, proto.DecodeError):
            raise
        except (Lost, OSError) as exc:
            if self.closed:
                raise WorkerError(None, None, op.phase, f"{self.label} was closed while the job ran") from exc
            self.fail(self.launch.diagnose(op.phase) if self.launch is not None else self._lost(op.phase))
        except BaseException:
            # A callback raised (e.g. the host's interrupt): stop the job cooperatively so the pool stays usable.
            self._stop(op)
            raise
        finally:
            op.end()

    def _watch(self, op, should_cancel) -> None:
        """The clocks of a running op: cancel (and its deadline), a frozen rank 0, a silent group."""
        now = time.monotonic()
        if self.cancel_at is None and (self.cancel_flag.is_set() or (should_cancel is not None and should_cancel())
                                       or op.wants_cancel()):
            op.cancel()
            self.cancel_at = now
        if self.cancel_at is not None and self._cancel_overdue(op, now):
            raise self._uncooperative(op)
        if now - self.heard > self.stale_after and not self._unread():
            self.fail(self.frozen(op.phase, 0, now - self.heard, None))
        if now - op.last > self.timeouts.step:
            self.fail(op.hang(now - op.last, self.status))

    def _unread(self) -> bool:
        """Whether rank 0 sent something this parent has not read yet: then the silence is ours (a slow callback, a
        large send, a starved CPU), not a frozen rank 0's."""
        try:
            return self.conn.poll(0)
        except (OSError, EOFError):
            return False

    def _status(self, op, msg: dict) -> None:
        """Rank 0's heartbeat: a peer it marks stale (no heartbeat in the store) is frozen or cut off."""
        self.status = msg
        stale = {r: p for r, p in (msg.get("peers") or {}).items() if p.get("stale")}
        if stale:
            r = max(stale, key=lambda k: stale[k]["silent_for"])
            self.fail(self.frozen(op.phase, r, stale[r]["silent_for"], stale[r].get("where")))

    @property
    def stale_after(self) -> float:
        """No message from rank 0 for this long while an op runs: it is frozen (its group's heartbeat counts)."""
        group = [i.get("heartbeat") or 0.0 for i in self.ready_info[:1]] + [self.group_beat or 0.0]
        return replace(self.timeouts, heartbeat=max([self.timeouts.heartbeat, *group])).stale_after

    def frozen(self, phase: str, rank: int, silent_s: float, where: str | None) -> WorkerError:
        err = WorkerError(rank, where, phase, (
            f"rank {rank} stopped sending heartbeats {silent_s:.0f} s ago (none within {self.stale_after:g} s = 3 x "
            f"{TIMEOUT_ENV['heartbeat']} + 1 s, though a rank beats from a thread of its own even while it "
            f"computes): its process is frozen (SIGSTOP, a debugger, a hung driver call holding the GIL) or cut "
            f"off."))
        return self.launch.frozen(err) if self.launch is not None else err

    def _cancel_overdue(self, op, now: float) -> bool:
        """One block-step (the longest this op has shown) + Timeouts.cancel_grace after the cancel; before the op
        has shown one, only the heartbeat and step clocks apply (a first block-step may include compilation)."""
        step = op.step_s
        limit = self.timeouts.step if step is None else step + self.timeouts.cancel_grace
        return now - self.cancel_at > limit

    def _pump(self, op) -> list[tuple[object, dict]]:
        conns = [self.conn, *op.links()]
        out = []
        for c in wait(conns, self.timeouts.poll):
            if c is self.conn:
                msg = self.recv(0)
                if msg is not None:
                    out.append((c, msg))
            else:
                out.extend((c, m) for m in op.read(c))
        return out

    def _stop(self, op) -> None:
        """After the caller's own exception: cancel, wait for the ranks to stop (as a cancel would), or close."""
        try:
            op.cancel()
            self.cancel_at = time.monotonic()
            while not op.stopped() and not self._cancel_overdue(op, time.monotonic()) and (
                    time.monotonic() - self.heard <= self.stale_after):
                for src, msg in self._pump(op):
                    if src is self.conn:
                        self.heard = time.monotonic()
                        if msg["op"] == proto.OP_ERROR:
                            raise Lost()
                    op.handle(src, msg)
        except (Lost, OSError, Exception):  # noqa: BLE001 - we are already raising the caller's exception
            pass
        if not op.stopped():
            logger.warning("DualParal: %s did not stop after an interrupted job; closing it", self.label)
            self.healthy = False
            self.close(grace=self.timeouts.abort_grace)

    def _uncooperative(self, op) -> PoolCancelled:
        waited = time.monotonic() - self.cancel_at
        logger.warning("DualParal: %s did not stop within %.1f s of a cancel; %s", self.label, waited,
                       "shutting it down" if self.launch else "detaching from it and counting it as failed")
        self.fault = WorkerError(None, None, op.phase, f"{self.label} did not stop within {waited:.1f} s of a "
                                 f"cancel (a rank does not answer)")
        self.healthy = False
        self.close(grace=self.timeouts.abort_grace)
        return PoolCancelled(f"DualParal {op.phase} was cancelled; {self.label} did not stop within one block-step "
                             f"+ {self.timeouts.cancel_grace:g} s ({waited:.1f} s), so " + (
                                 "the pool was shut down (the next run starts a new one)." if self.launch else
                                 "this process detached from it and counts it as failed: if it does not recover, "
                                 "restart the group (torchrun --max-restarts restarts it when a rank exits)."))

    def fail(self, err: WorkerError) -> NoReturn:
        self.healthy, self.fault = False, err
        self.close()  # fail-stop: a pool that had a fault is never reused
        if self.cancel_at is not None:  # the user asked to stop: the prompt ends as cancelled, the fault is logged
            logger.warning("DualParal: after a cancel, %s", err)
            raise PoolCancelled(f"DualParal {err.phase} was cancelled; meanwhile {err}") from err
        if err.exc_type == "OutOfMemoryError":  # so that the host's OOM handling (ComfyUI's tips) runs
            raise torch.OutOfMemoryError(str(err)) from err
        raise err

    def _lost(self, phase: str) -> WorkerError:
        return WorkerError(None, None, phase, f"lost the connection to {self.label}: it stopped (see its torchrun "
                           f"output; a group started with --max-restarts comes back by itself, and the next run "
                           f"attaches again).")

    def close(self, grace: float | None = None) -> None:
        """Detach (a local pool's ranks then end; the session tears them down, SIGTERM to SIGKILL in ``grace``,
        default Timeouts.close_grace). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.healthy:
            try:
                self.send({"op": proto.OP_CLOSE})
            except OSError:
                pass
        self.conn.close()
        if self.launch is not None:
            self.launch.teardown(polite=self.healthy, grace=grace)
