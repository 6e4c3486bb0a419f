"""The parent side of a torchrun-started DualParal group: attach to its rank 0, run jobs, detach.

The group is a long-lived service (``torchrun ... -m dualparal_core.worker --serve HOST:PORT``, see
:mod:`dualparal_core.serve`); an :class:`AttachedPool` has the job API of :class:`~dualparal_core.pool.WorkerPool`
but ``close()`` only detaches: the remote ranks keep their weights and wait for the next attach. Both ends
authenticate with the secret in ``DUALPARAL_AUTHKEY`` (multiprocessing's HMAC challenge; the channel carries pickles,
so the key is as good as a login on the group's hosts).
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection
from typing import NoReturn

import torch

from . import __version__, logger
from . import protocol as proto
from .channel import CONNECT_S, KEY_ENV, AttachError, authenticate, load_key, parse_address
from .config import PoolSpec, Timeouts, WanConfig
from .protocol import Job

__all__ = ["AttachError", "AttachSpec", "AttachedPool", "parse_address"]

START_HINT = ("start one with `{env}=<secret> torchrun --nproc-per-node <GPUs> -m dualparal_core.worker --serve "
              "{hostport} --models-dir <folder with the model files>` from the DualParal pack folder (docs/NODES.md, "
              "'Attach to a torchrun group')")


@dataclass(frozen=True)
class AttachSpec:
    """What to ask of a torchrun-started group: its address and, optionally, the model it should hold."""

    address: str
    """``tcp://HOST:PORT``, the group's ``--serve`` address."""
    model: PoolSpec | None = None
    """Model files, LoRAs, dtype, attention, ...; the group loads it (or keeps it, when it already holds exactly
    this) before the attach completes. Files are found on each host as they are named, else by their trailing path
    components under the group's ``--models-dir`` folders. ``model.devices`` is ignored: the ranks run where
    torchrun started them. None: use what the group holds (its ``--model``)."""

    def __post_init__(self) -> None:
        host, port = parse_address(self.address)
        object.__setattr__(self, "address", f"tcp://{host}:{port}")

    @property
    def devices(self) -> tuple[str, ...]:
        """One entry, the address: two specs on one address compete (a group serves one parent at a time)."""
        return (self.address,)


def _close_conn(conn: Connection) -> None:
    """Finaliser: say goodbye (the group goes back to waiting at once) and close."""
    try:
        conn.send_bytes(pickle.dumps({"op": proto.OP_CLOSE}, pickle.HIGHEST_PROTOCOL))
    except OSError:
        pass
    conn.close()


class _Lost(Exception):
    """The connection to rank 0 closed."""


class AttachedPool:
    """A connection to rank 0 of a running group; the job API of WorkerPool. ``close()`` detaches only."""

    spec: AttachSpec
    ready_info: list[dict]
    config: WanConfig

    @classmethod
    def connect(cls, target: str | AttachSpec, timeouts: Timeouts = Timeouts(), *,  # noqa: B008 - frozen
                authkey: bytes | str | None = None,
                on_status: Callable[[str], None] | None = None,
                should_abort: Callable[[], bool] | None = None) -> AttachedPool:
        """Connect, authenticate, have the group load ``spec.model`` (if given) and wait until it is ready.

        Raises AttachError (nothing listens, wrong key, in use, version mismatch), WorkerError (a rank failed to
        load: the group keeps running), TimeoutError (not ready within ``timeouts.startup``) or PoolCancelled.
        """
        spec = target if isinstance(target, AttachSpec) else AttachSpec(str(target))
        host, port = parse_address(spec.address)
        key = load_key(authkey)
        status = on_status or (lambda s: None)
        hint = START_HINT.format(env=KEY_ENV, hostport=f"{host}:{port}")
        try:
            sock = socket.create_connection((host, port), timeout=CONNECT_S)
        except OSError as exc:
            raise AttachError(f"no DualParal group listening at {spec.address} ({exc.strerror or exc}): "
                              f"{hint}.") from None
        try:
            conn = authenticate(sock, key, server=False)
        except AuthenticationError:
            raise AttachError(f"authentication failed at {spec.address}: {KEY_ENV} here differs from the key the "
                              f"group was started with; set the same value in both environments.") from None
        except (OSError, EOFError):
            raise AttachError(f"{spec.address} accepted the connection but did not complete the DualParal "
                              f"handshake within {CONNECT_S:g} s: is another service on that port, or is it not "
                              f"a DualParal group ({hint})?") from None
        self = cls.__new__(cls)
        self.spec, self.timeouts, self._conn = spec, timeouts, conn
        self.ready_info, self.job_info, self._job_id, self._fault = [], [], 0, None
        self._busy, self._cancel, self._healthy = threading.Lock(), threading.Event(), True
        self._finalizer = weakref.finalize(self, _close_conn, conn)
        try:
            self._send({"op": proto.OP_SPEC, "model": spec.model, "version": __version__,
                        "client": f"{socket.gethostname()} pid {os.getpid()}"})
            status(f"attaching to the DualParal group at {spec.address}")
            self._await_ready(status, should_abort)
        except BaseException as exc:
            self._healthy = False
            self.close()
            if isinstance(exc, (_Lost, OSError)) and not isinstance(exc, AttachError):
                raise AttachError(f"the DualParal group at {spec.address} closed the connection while attaching "
                                  f"(it stopped or restarted: see its torchrun output).") from None
            raise
        return self

    def _await_ready(self, status: Callable[[str], None], should_abort: Callable[[], bool] | None) -> None:
        from .pool import POLL_S, PoolCancelled

        t0 = time.monotonic()
        while True:
            msg = self._recv(POLL_S)
            if msg is not None:
                op = msg["op"]
                if op == proto.OP_ERROR:
                    if msg.get("phase") == "attach":
                        raise AttachError(f"{self.spec.address}: {msg['message']}")
                    raise self._error(msg)
                if op == proto.OP_STATUS and msg.get("text"):
                    status(f"{self.spec.address} rank {msg.get('rank', 0)}: {msg['text']}")
                if op == proto.OP_READY:
                    self.ready_info = msg["info"]
                    self.config = self.ready_info[0]["config"]
                    hosts = sorted({i["host"] for i in self.ready_info})
                    logger.info("DualParal: attached to %s: %d rank(s) on %s, in %.1f s", self.spec.address,
                                len(self.ready_info), ", ".join(hosts), time.monotonic() - t0)
                    status(f"attached to {len(self.ready_info)} rank(s) at {self.spec.address}")
                    return
            if should_abort is not None and should_abort():
                raise PoolCancelled(f"attaching to {self.spec.address} was interrupted; the group keeps running.")
            elapsed = time.monotonic() - t0
            if elapsed > self.timeouts.startup:
                raise TimeoutError(
                    f"the DualParal group at {self.spec.address} was not ready after {elapsed:.0f} s "
                    f"(Timeouts.startup={self.timeouts.startup:g} s): it is still loading the model, or serving "
                    f"another job first. Raise Timeouts.startup if loading legitimately takes longer.")

    # ------------------------------------------------------------------ channel
    def _send(self, msg: dict) -> None:
        self._conn.send_bytes(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL))

    def _recv(self, timeout: float) -> dict | None:
        try:
            if not self._conn.poll(timeout):
                return None
            return pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise _Lost() from exc

    def _error(self, msg: dict):
        """A rank's error report -> WorkerError (the rank, its device and host, phase, traceback)."""
        from .pool import WorkerError

        where = f"{msg.get('device', '?')} on {msg.get('host', '?')}"
        cause = f"{msg['type']}: {msg.get('message', '')}" if msg.get("type") else msg.get("message", "")
        if msg.get("traceback"):
            cause += f"\n{msg['traceback']}"
        return WorkerError(msg.get("rank"), where, msg.get("phase", "sample"), cause, msg.get("type"))

    def _lost(self, phase: str):
        from .pool import WorkerError

        return WorkerError(None, None, phase, f"lost the connection to the DualParal group at {self.spec.address}: "
                           f"it stopped (see its torchrun output; a group started with --max-restarts comes back "
                           f"by itself, and the next run attaches again).")

    # ------------------------------------------------------------------ state
    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def pids(self) -> list[int]:
        """Always empty: the ranks are not this process's children (their pids are in ``ready_info``)."""
        return []

    @property
    def alive(self) -> bool:
        if not self._healthy or not self._finalizer.alive:
            return False
        if self._busy.acquire(blocking=False):  # idle: a report or an EOF that arrived meanwhile means a fault
            try:
                while self._healthy and self._conn.poll(0):
                    msg = self._recv(0)
                    if msg is not None and msg["op"] == proto.OP_ERROR:
                        self._fault, self._healthy = self._error(msg), False
            except (_Lost, OSError):
                self._healthy = False
            finally:
                self._busy.release()
        return self._healthy

    def __repr__(self) -> str:
        return f"AttachedPool({self.spec.address}, ranks={len(self.ready_info)}, alive={self.alive})"

    # ------------------------------------------------------------------ jobs
    def cancel(self) -> None:
        """Ask the running ``generate`` (from any thread) to stop after the current block-step."""
        self._cancel.set()

    def generate(self, job: Job, on_progress: Callable[[int, int, torch.Tensor | None], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Run ``job`` on the group; returns the latents [B, C, T, H, W] (float32, CPU). Raises as
        WorkerPool.generate; after a WorkerError this object is detached (the next run attaches again)."""
        from .pool import WorkerError

        if not isinstance(job, Job):
            raise TypeError(f"expected a dualparal_core.protocol.Job, got {type(job).__name__}")
        if not self.alive:
            raise self._fault or WorkerError(None, None, "sample", f"detached from {self.spec.address} (closed or "
                                             f"had a fault); attach again.")
        job.validate(self.config)
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("This DualParal pool is already running a job; one job at a time.")
        self._cancel.clear()
        try:
            return self._run(job, on_progress, should_cancel)
        finally:
            self._busy.release()

    def _run(self, job: Job, on_progress, should_cancel) -> torch.Tensor:
        from .pool import POLL_S, PoolCancelled, WorkerError

        self._job_id += 1
        jid, cancel_at, last, status = self._job_id, None, time.monotonic(), None
        try:
            self._send({"op": proto.OP_JOB, "job": jid, "payload": job})
            while True:
                msg = self._recv(POLL_S)
                if msg is not None:
                    op = msg["op"]
                    if op == proto.OP_ERROR:
                        if msg.get("recoverable"):
                            raise ValueError(msg["message"])
                        self._fail(self._error(msg))
                    if op == proto.OP_STATUS:
                        status = msg
                    elif msg.get("job") == jid:
                        if op == proto.OP_PROGRESS:
                            last = time.monotonic()
                            if on_progress is not None:
                                on_progress(msg["done"], msg["total"], msg["preview"])
                        elif op == proto.OP_CANCELLED:
                            raise PoolCancelled("DualParal sampling was cancelled.")
                        elif op == proto.OP_RESULT:
                            if cancel_at is not None:
                                raise PoolCancelled("DualParal sampling was cancelled.")
                            self.job_info = msg.get("info", [])
                            return msg["latents"]
                now = time.monotonic()
                if cancel_at is None and (self._cancel.is_set() or (should_cancel is not None and should_cancel())):
                    self._send({"op": proto.OP_CANCEL, "job": jid})
                    cancel_at = now
                if cancel_at is not None and now - cancel_at > self.timeouts.step:
                    self._healthy = False
                    self.close()
                    raise PoolCancelled(f"DualParal sampling was cancelled; the group at {self.spec.address} did "
                                        f"not stop within Timeouts.step={self.timeouts.step:g} s, so this process "
                                        f"detached from it.")
                if now - last > self.timeouts.step:
                    self._fail(self._hang(now - last, status))
        except (PoolCancelled, ValueError, WorkerError, torch.OutOfMemoryError):
            raise
        except (_Lost, OSError):
            self._fail(self._lost("sample"))
        except BaseException:
            # A callback raised (e.g. the host's interrupt): stop the job cooperatively so the group stays usable.
            self._stop(jid)
            raise

    def _hang(self, silent_s: float, status: dict | None):
        """Name the rank the silent group waits for, from rank 0's last heartbeat (its peers' heartbeats)."""
        from .pool import WorkerError

        advice = (f"no progress for {silent_s:.0f} s (Timeouts.step={self.timeouts.step:g} s); raise Timeouts.step "
                  f"if one block-step legitimately takes longer. The group at {self.spec.address} may be wedged: "
                  f"restart it if the next run fails.")
        peers = (status or {}).get("peers", {})
        silent = {r: p["silent_for"] for r, p in peers.items() if p.get("stale")}
        if silent:
            r = max(silent, key=silent.get)
            return WorkerError(r, peers[r].get("where"), "sample",
                               f"rank {r} stopped responding (no heartbeat for {silent[r]:.0f} s); {advice}")
        busy = {r: p["computing_for"] for r, p in peers.items() if p.get("computing_for") is not None}
        if status is not None and status.get("computing_for") is not None:
            busy[0] = status["computing_for"]
        if busy:
            r = max(busy, key=busy.get)
            return WorkerError(r, None, "sample", f"rank {r} stopped responding: it has been computing one "
                                                  f"block-step for {busy[r]:.0f} s; {advice}")
        return WorkerError(None, None, "sample", f"the group stopped responding ({advice})")

    def _fail(self, err) -> NoReturn:
        self._healthy = False
        self._fault = err
        self.close()  # fail-stop for this connection; the group itself decides whether it survives
        if err.exc_type == "OutOfMemoryError":
            raise torch.OutOfMemoryError(str(err)) from err
        raise err

    def _stop(self, jid: int) -> None:
        from .pool import POLL_S

        try:
            self._send({"op": proto.OP_CANCEL, "job": jid})
            end = time.monotonic() + self.timeouts.step
            while time.monotonic() < end:
                msg = self._recv(POLL_S)
                if msg is not None and msg.get("job") == jid and msg["op"] in (proto.OP_RESULT, proto.OP_CANCELLED):
                    return
                if msg is not None and msg["op"] == proto.OP_ERROR:
                    break
        except (_Lost, OSError):
            pass
        logger.warning("DualParal: the group at %s did not stop after an interrupted job; detaching",
                       self.spec.address)
        self._healthy = False
        self.close()

    def close(self) -> None:
        """Detach: the group keeps running with its weights loaded and waits for the next attach. Idempotent."""
        self._finalizer()
