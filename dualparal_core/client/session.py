"""The one client session: the parent's authenticated connection to rank 0 of a group, local or torchrun-started.

It attaches (connect, authenticate, hello with the model, wait until every rank loaded it), runs ops one at a time
through one loop (:meth:`Session.run`: sampling here, Block Decode in :mod:`.decode`), cancels, names the rank that
failed or hung, and detaches. A local pool's session also owns the :class:`~.launch.Launch` of its ranks: then the
exit codes of its own children join the diagnosis, and closing the session ends the ranks.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, wait
from typing import NoReturn

import torch

from .. import __version__, logger
from .. import protocol as proto
from ..channel import KEY_ENV, authenticate, dumps, loads
from ..config import Timeouts
from ..protocol import AttachError, Job, PoolCancelled, WorkerError
from .launch import Launch


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
            while True:
                msg = self.recv(self.timeouts.poll)
                if msg is not None and self._ready(msg, status, t0):
                    return
                if self.launch is not None:
                    self.launch.check("load")
                if should_abort is not None and should_abort():
                    raise PoolCancelled(f"starting {self.label} was interrupted" + (
                        "; no worker is left running." if self.launch else "; the group keeps running."))
                if time.monotonic() - t0 > self.timeouts.startup:
                    raise TimeoutError(
                        f"{self.label} was not ready after {time.monotonic() - t0:.0f} s (Timeouts.startup="
                        f"{self.timeouts.startup:g} s): it is still loading the model" +
                        ("" if self.launch else ", or serving another job first") +
                        ". Raise Timeouts.startup if loading the model legitimately takes longer (large "
                        "checkpoint, slow disk).")
        except Lost:
            if self.launch is not None:
                raise self.launch.diagnose("load") from None
            raise AttachError(f"{self.label} closed the connection while attaching (it stopped or restarted: see "
                              f"its torchrun output).") from None

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
        if not self.healthy or self.closed or (self.launch is not None and not self.launch.alive()):
            return False
        if self.busy.acquire(blocking=False):  # idle: a report or an EOF that arrived meanwhile means a fault
            try:
                while self.healthy and self.conn.poll(0):
                    msg = self.recv(0)
                    if msg is not None and msg["op"] == proto.OP_ERROR:
                        self.fault, self.healthy = self.error(msg, "idle"), False
            except (Lost, OSError):
                self.healthy = False
            finally:
                self.busy.release()
        return self.healthy

    # ------------------------------------------------------------------ the one run loop
    def run(self, op, should_cancel: Callable[[], bool] | None):
        """Run ``op`` (an object with begin/handle/cancel/links/finish, see SampleOp) to its end."""
        if not self.alive:
            raise WorkerError(None, None, op.phase, f"{self.label} is closed or had a fault; start a new one (or "
                              f"attach again)." + (f" The fault was: {self.fault}" if self.fault else ""))
        if not self.busy.acquire(blocking=False):
            raise RuntimeError("This DualParal pool is already running a job; one job at a time.")
        self.cancel_flag.clear()
        try:
            return self._loop(op, should_cancel)
        finally:
            self.busy.release()

    def _loop(self, op, should_cancel):
        self.job_id += 1
        cancel_at = None
        try:
            op.begin(self, self.job_id)
            while True:
                for src, msg in self._pump(op):
                    if src is self.conn and msg["op"] == proto.OP_ERROR:
                        if msg.get("recoverable"):
                            raise ValueError(msg["message"])
                        self.fail(self.error(msg, op.phase))
                    if src is self.conn and msg["op"] == proto.OP_STATUS:
                        self.status = msg
                    elif op.handle(src, msg):
                        return op.finish(cancel_at is not None)
                if self.launch is not None:
                    self.launch.check(op.phase)
                now = time.monotonic()
                if cancel_at is None and (self.cancel_flag.is_set() or (should_cancel is not None and should_cancel())
                                          or op.wants_cancel()):
                    op.cancel()
                    cancel_at = now
                if cancel_at is not None and now - cancel_at > self.timeouts.step:
                    raise self._uncooperative(op.phase)
                if now - op.last > self.timeouts.step:
                    self.fail(op.hang(now - op.last, self.status))
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
        """After the caller's own exception: cancel, wait for the ranks to stop, or close."""
        try:
            op.cancel()
            end = time.monotonic() + self.timeouts.step
            while time.monotonic() < end and not op.stopped():
                for src, msg in self._pump(op):
                    if src is self.conn and msg["op"] == proto.OP_ERROR:
                        end = 0
                        break
                    op.handle(src, msg)
        except (Lost, OSError, Exception):  # noqa: BLE001 - we are already raising the caller's exception
            pass
        if not op.stopped():
            logger.warning("DualParal: %s did not stop after an interrupted job; closing it", self.label)
            self.healthy = False
            self.close()

    def _uncooperative(self, phase: str) -> PoolCancelled:
        logger.warning("DualParal: %s did not stop within Timeouts.step=%g s of a cancel; closing it", self.label,
                       self.timeouts.step)
        self.healthy = False
        self.close()
        return PoolCancelled(f"DualParal {phase} was cancelled; {self.label} did not stop within Timeouts.step="
                             f"{self.timeouts.step:g} s, so " + ("the pool was shut down (the next run starts a new "
                             "one)." if self.launch else "this process detached from it."))

    def fail(self, err: WorkerError) -> NoReturn:
        self.healthy, self.fault = False, err
        self.close()  # fail-stop: a pool that had a fault is never reused
        if err.exc_type == "OutOfMemoryError":  # so that the host's OOM handling (ComfyUI's tips) runs
            raise torch.OutOfMemoryError(str(err)) from err
        raise err

    def _lost(self, phase: str) -> WorkerError:
        return WorkerError(None, None, phase, f"lost the connection to {self.label}: it stopped (see its torchrun "
                           f"output; a group started with --max-restarts comes back by itself, and the next run "
                           f"attaches again).")

    def close(self) -> None:
        """Detach (a local pool's ranks then end; the session tears them down). Idempotent."""
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
            self.launch.teardown(polite=self.healthy)


class SampleOp:
    """One sampling job: OP_JOB to rank 0, progress, then the latents."""

    phase = "sample"

    def __init__(self, job: Job, on_progress):
        self.job, self.on_progress, self.result, self.done_op = job, on_progress, None, None

    def begin(self, session: Session, jid: int) -> None:
        self.s, self.jid, self.last = session, jid, time.monotonic()
        session.send({"op": proto.OP_JOB, "job": jid, "payload": self.job})

    def links(self) -> list:
        return []

    def handle(self, src, msg: dict) -> bool:
        if msg.get("job") != self.jid:
            return False
        if msg["op"] == proto.OP_PROGRESS:
            self.last = time.monotonic()
            if self.on_progress is not None:
                self.on_progress(msg["done"], msg["total"], msg["preview"])
        elif msg["op"] in (proto.OP_RESULT, proto.OP_CANCELLED):
            self.done_op = msg
            return True
        return False

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
        advice = (f"no progress for {silent_s:.0f} s (Timeouts.step={self.s.timeouts.step:g} s); raise "
                  f"Timeouts.step if one block-step legitimately takes longer.")
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
