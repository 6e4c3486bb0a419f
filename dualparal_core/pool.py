"""The parent side of a DualParal worker group: start, drive, cancel and tear down ``dualparal_core.worker`` ranks."""

from __future__ import annotations

import os
import pickle
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, Listener, wait
from pathlib import Path
from typing import NoReturn

import torch

from . import logger
from . import protocol as proto
from .config import PoolSpec, Timeouts
from .protocol import Job
from .runtime import check_spec

POLL_S = 0.05
"""How often every blocking wait checks children, messages and the caller's abort/cancel callbacks."""
FAULT_WINDOW_S = 1.0
"""After the first sign of a fault, how long to gather the other ranks' reports before naming a root cause."""
PACK_ROOT = str(Path(__file__).resolve().parent.parent)


class WorkerError(RuntimeError):
    """A rank failed: ``rank`` (None: the group as a whole), ``device``, ``phase`` and ``cause`` (with the worker's
    traceback when it sent one); ``exc_type`` is the worker's exception type name, when there was one."""

    def __init__(self, rank: int | None, device: str | None, phase: str, cause: str, exc_type: str | None = None):
        self.rank, self.device, self.phase, self.cause, self.exc_type = rank, device, phase, cause, exc_type
        who = f"rank {rank} ({device})" if rank is not None else "worker group"
        when = "while idle" if phase == "idle" else f"during {phase}"
        super().__init__(f"DualParal {who} failed {when}: {cause}")


class PoolCancelled(Exception):
    """The caller cancelled: a job (the pool stays usable) or a start (nothing is left running)."""


class _Spawner:
    """Runs every Popen on one process-lifetime thread: PR_SET_PDEATHSIG fires when the *thread* that forked a worker
    exits, so spawning from ComfyUI's short-lived or pooled threads would kill workers when that thread ends."""

    _lock = threading.Lock()
    _thread: threading.Thread | None = None
    _jobs: queue.Queue = queue.Queue()

    @classmethod
    def popen(cls, args: list[str], **kw) -> subprocess.Popen:
        with cls._lock:
            if cls._thread is None or not cls._thread.is_alive():
                cls._thread = threading.Thread(target=cls._loop, name="dualparal-spawner", daemon=True)
                cls._thread.start()
        box: queue.Queue = queue.Queue(1)
        cls._jobs.put((args, kw, box))
        ok, value = box.get()
        if not ok:
            raise value
        return value

    @classmethod
    def _loop(cls) -> None:
        while True:
            args, kw, box = cls._jobs.get()
            try:
                box.put((True, subprocess.Popen(args, **kw)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                box.put((False, exc))


def _tail(path: str | None, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 4000))
            return "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
    except (OSError, TypeError):
        return ""


def _signame(rc: int) -> str:
    try:
        return f"signal {signal.Signals(-rc).name} ({-rc})"
    except ValueError:
        return f"signal {-rc}"


def _sweep_stale_dirs() -> None:
    """Remove the runtime dirs of parents that died without running their finaliser (SIGKILL, OOM killer)."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name.split("-")[1] if name.startswith("dualparal-") and name.count("-") == 2 else ""
        path = os.path.join(root, name)
        try:
            if pid.isdigit() and os.stat(path).st_uid == os.getuid():
                os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive under another user, or gone meanwhile: not ours to touch


class _Group:
    """The processes, connections and files of one pool; teardown() is its finaliser and never needs the pool."""

    def __init__(self, spec: PoolSpec, timeouts: Timeouts):
        self.spec, self.timeouts, self.world = spec, timeouts, spec.world_size
        self.procs: list[subprocess.Popen] = []
        self.logs: list[str] = []
        self.conns: dict[int, Connection] = {}
        self.unmapped: list[Connection] = []
        self.errors: dict[int, dict] = {}
        self.exits: dict[int, int] = {}
        self.status: dict[int, tuple[float, dict]] = {}
        self.phase: dict[int, str] = {}
        self.seen: dict[int, float] = {}
        self.rundir: str | None = None
        self.listener: Listener | None = None
        self.accepted: queue.Queue = queue.Queue()
        self.stop_accept = threading.Event()
        self.accept_thread: threading.Thread | None = None
        self.healthy, self.closed = True, False
        self.pool_id = secrets.token_hex(8)
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ launch
    def launch(self, env: dict[str, str]) -> None:
        _sweep_stale_dirs()
        # mode 0700, logs only, removed at close; the pid in the name lets a later pool sweep it if we get killed
        self.rundir = tempfile.mkdtemp(prefix=f"dualparal-{os.getpid()}-")
        authkey = secrets.token_bytes(32)
        self.listener = Listener(("127.0.0.1", 0), authkey=authkey)
        self.accept_thread = threading.Thread(target=self._accept, name="dualparal-accept", daemon=True)
        self.accept_thread.start()
        host, port = self.listener.address
        env = {**env, "DUALPARAL_CONTROL": f"{host}:{port}", "DUALPARAL_AUTHKEY": authkey.hex(),
               "DUALPARAL_WORLD": str(self.world), "DUALPARAL_PARENT_PID": str(os.getpid())}
        for rank in range(self.world):
            log = os.path.join(self.rundir, f"rank{rank}.log")
            self.logs.append(log)
            with open(log, "wb") as fh:
                # One new session per worker: its own process group, out of reach of the terminal's Ctrl-C,
                # and killpg on it can only hit processes this pool started.
                self.procs.append(_Spawner.popen(
                    [sys.executable, "-m", "dualparal_core.worker"], env={**env, "DUALPARAL_RANK": str(rank)},
                    cwd=self.rundir, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True))
            self.phase[rank] = "startup"

    def _accept(self) -> None:
        got = 0
        while got < self.world and not self.stop_accept.is_set():
            try:
                conn = self.listener.accept()
            except Exception:  # noqa: BLE001 - a stranger failing the handshake must not stop our workers joining
                if self.stop_accept.is_set():
                    return
                time.sleep(0.01)
                continue
            self.accepted.put(conn)
            got += 1

    def stop_accepting(self) -> None:
        if self.listener is None:
            return
        self.stop_accept.set()
        if self.accept_thread is not None and self.accept_thread.is_alive():
            try:  # wake the thread blocked in accept(): it sees the stop flag once this handshake fails
                socket.create_connection(self.listener.address, timeout=1.0).close()
            except OSError:
                pass
            self.accept_thread.join(2.0)
        self.listener.close()
        self.listener = None

    # ------------------------------------------------------------------ messages and deaths
    def send(self, rank: int, msg: dict) -> None:
        self.conns[rank].send_bytes(pickle.dumps(msg, pickle.HIGHEST_PROTOCOL))

    def pump(self, timeout: float) -> list[tuple[int, dict]]:
        """Wait up to ``timeout`` for messages; returns (rank, message) pairs. Records errors, statuses, exits."""
        while not self.accepted.empty():
            self.unmapped.append(self.accepted.get())
        conns = list(self.conns.values()) + self.unmapped
        ready = wait(conns, timeout) if conns else (time.sleep(timeout) or [])
        out = []
        for conn in ready:
            try:
                msg = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                self._drop(conn)  # the worker is gone: poll() below says how
                continue
            rank = msg.get("rank")
            if conn in self.unmapped:
                self.unmapped.remove(conn)
                if not isinstance(rank, int) or not 0 <= rank < self.world or rank in self.conns \
                        or msg.get("pid") != self.procs[rank].pid:
                    logger.warning("dropping a control connection that claims rank %r", rank)
                    conn.close()
                    continue
                self.conns[rank] = conn
            self.seen[rank] = time.monotonic()
            if msg["op"] == proto.OP_ERROR:
                self.errors.setdefault(rank, msg)
            elif msg["op"] == proto.OP_STATUS:
                self.status[rank] = (time.monotonic(), msg)
                self.phase[rank] = msg.get("phase", self.phase.get(rank))
            out.append((rank, msg))
        for rank, proc in enumerate(self.procs):
            if rank not in self.exits and proc.poll() is not None:
                self.exits[rank] = proc.returncode
        return out

    def _drop(self, conn: Connection) -> None:
        conn.close()
        if conn in self.unmapped:
            self.unmapped.remove(conn)
        for rank, c in list(self.conns.items()):
            if c is conn:
                del self.conns[rank]

    def faulted(self) -> bool:
        return bool(self.errors or self.exits)

    def diagnose(self, phase: str) -> WorkerError:
        """Gather reports for a moment, then name the root cause: a rank killed by a signal without a word, else
        the earliest reported exception, else the first rank that exited (with the tail of its log)."""
        self.healthy = False
        end = time.monotonic() + FAULT_WINDOW_S
        while time.monotonic() < end and len(set(self.errors) | set(self.exits)) < self.world:
            self.pump(POLL_S)
        signalled = sorted(r for r, rc in self.exits.items() if rc < 0 and r not in self.errors)
        if signalled:
            r = signalled[0]
            cause = f"the process was killed by {_signame(self.exits[r])}"
            tail = _tail(self.logs[r])
            return WorkerError(r, self.spec.devices[r], self.phase.get(r, phase),
                               cause + (f"\nLast lines of its log:\n{tail}" if tail else ""))
        if self.errors:
            e = min(self.errors.values(), key=lambda m: m.get("time", 0.0))
            return WorkerError(e["rank"], e.get("device") or self.spec.devices[e["rank"]], e.get("phase", phase),
                               f"{e['type']}: {e['message']}\n{e['traceback']}", e["type"])
        r = min(self.exits)
        tail = _tail(self.logs[r])
        return WorkerError(r, self.spec.devices[r], self.phase.get(r, phase),
                           f"the process exited with code {self.exits[r]}"
                           + (f"\nLast lines of its log:\n{tail}" if tail else ""))

    def diagnose_hang(self, silent_s: float, hb_s: float) -> WorkerError:
        """Name the rank a silent group is waiting for: one that stopped sending heartbeats (frozen), else one
        that has been inside its layers the longest; the others are only waiting for it."""
        self.healthy = False
        now, t = time.monotonic(), self.timeouts.step
        advice = f"no progress for {silent_s:.0f} s (Timeouts.step={t:g} s); raise Timeouts.step if one " \
                 f"block-step legitimately takes longer."
        frozen = [r for r in range(self.world) if now - self.seen.get(r, 0.0) > 3 * hb_s + 1.0]
        if frozen:
            r = frozen[0]
            return WorkerError(r, self.spec.devices[r], "sample", f"rank {r} stopped responding (no message for "
                               f"{now - self.seen.get(r, now):.0f} s: frozen or stuck in native code); {advice}")
        busy = {r: m["computing_for"] + now - at for r, (at, m) in self.status.items()
                if m.get("computing_for") is not None and now - at < 3 * hb_s + 1.0}  # this job's heartbeats
        if busy:
            r = max(busy, key=busy.get)
            step = self.status[r][1].get("step")
            return WorkerError(r, self.spec.devices[r], "sample", f"rank {r} stopped responding: it has been "
                               f"computing block-step {step} for {busy[r]:.0f} s; {advice}")
        return WorkerError(None, None, "sample", f"the ranks stopped responding ({advice})")

    # ------------------------------------------------------------------ teardown
    def teardown(self) -> None:
        """OP_CLOSE (healthy pools), SIGTERM to every worker's process group, grace, SIGKILL; reap; remove files."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.stop_accepting()
        t0, grace = time.monotonic(), self.timeouts.close_grace

        def wait_until(deadline: float) -> bool:
            while time.monotonic() < deadline:
                if all(p.poll() is not None for p in self.procs):
                    return True
                time.sleep(0.02)
            return all(p.poll() is not None for p in self.procs)

        if self.healthy:
            for rank in list(self.conns):
                try:
                    self.send(rank, {"op": proto.OP_CLOSE})
                except OSError:
                    pass
            wait_until(t0 + grace / 2)
        for sig, deadline in ((signal.SIGTERM, t0 + grace), (signal.SIGKILL, None)):
            for p in self.procs:
                # Kill by process group, also after the leader exited: that reaches anything a rank started.
                try:
                    os.killpg(p.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            if deadline is not None and wait_until(deadline):
                break
        for p in self.procs:
            try:
                p.wait(5.0)
            except subprocess.TimeoutExpired:
                logger.warning("DualParal worker pid %d did not exit after SIGKILL (stuck in the kernel?)", p.pid)
        for conn in list(self.conns.values()) + self.unmapped:
            conn.close()
        if self.rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)


class WorkerPool:
    """A started group of ranks holding one model; ``generate`` runs jobs on it until ``close`` (or a fault)."""

    spec: PoolSpec
    ready_info: list[dict]

    @classmethod
    def start(cls, spec: PoolSpec, timeouts: Timeouts = Timeouts(), *,  # noqa: B008 - frozen, never mutated
              env: dict | None = None,
              on_status: Callable[[str], None] | None = None,
              should_abort: Callable[[], bool] | None = None) -> WorkerPool:
        """Validate, spawn one worker per device and wait until every rank has loaded its slice and is ready.

        Raises ValueError (bad input, before any spawn), WorkerError (a rank failed to start, with its cause),
        TimeoutError (not ready within ``timeouts.startup``) or PoolCancelled (``should_abort()`` turned true);
        nothing is left running after any of them.
        """
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(
            [PACK_ROOT] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p and p != PACK_ROOT])
        child_env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # cuda:N means what nvidia-smi calls GPU N
        spec, config = check_spec(spec, child_env)
        self = cls.__new__(cls)
        self.spec, self.timeouts, self.config = spec, timeouts, config
        self.ready_info, self.job_info, self._job_id = [], [], 0
        self._busy, self._cancel = threading.Lock(), threading.Event()
        self._group = group = _Group(spec, timeouts)
        self._heartbeat_s = float(child_env.get("DUALPARAL_HEARTBEAT", "2"))
        self._finalizer = weakref.finalize(self, group.teardown)  # also runs at interpreter exit
        try:
            group.launch(child_env)
            self._await_ready(child_env.get("DUALPARAL_INIT"), on_status or (lambda s: None), should_abort)
        except BaseException:
            group.healthy = False
            self.close()
            raise
        return self

    @classmethod
    def attach(cls, target, timeouts: Timeouts = Timeouts(), **kw):  # noqa: B008 - frozen, never mutated
        """Attach to a group that torchrun started (``-m dualparal_core.worker --serve``): ``target`` is
        ``tcp://HOST:PORT`` or an AttachSpec; same job API, but close() only detaches (dualparal_core.attach)."""
        from .attach import AttachedPool

        return AttachedPool.connect(target, timeouts, **kw)

    def _await_ready(self, init: str | None, status: Callable[[str], None],
                     should_abort: Callable[[], bool] | None) -> None:
        g, t0 = self._group, time.monotonic()
        status(f"starting {g.world} DualParal worker(s) on {', '.join(self.spec.devices)}")
        ready: dict[int, dict] = {}
        waiting: list[int] = []
        explicit_init, store = init not in (None, "", "auto"), None
        while len(ready) < g.world:
            for rank, msg in g.pump(POLL_S):
                op = msg["op"]
                if op == proto.OP_STATUS and "pid" in msg:  # hello: rank 0 (or everyone, given an init_method) starts
                    waiting.append(rank)
                if op == proto.OP_STATUS and msg.get("store_port"):
                    store = ("127.0.0.1", msg["store_port"])
                if op == proto.OP_STATUS and msg.get("text"):
                    status(f"rank {rank}: {msg['text']}")
                if op == proto.OP_READY:
                    info = msg["info"]
                    if info.get("pool_id") != g.pool_id or info.get("world") != g.world:
                        raise WorkerError(rank, self.spec.devices[rank], "startup",
                                          "the rank joined another pool (pool id / world size mismatch)")
                    ready[rank] = info
                    status(f"rank {rank} ready on {info['device']} ({info['load_s']:.1f} s)")
            for rank in [r for r in waiting if r == 0 or store or explicit_init]:
                waiting.remove(rank)
                try:
                    g.send(rank, {"op": proto.OP_SPEC, "spec": self.spec, "timeouts": self.timeouts,
                                  "pool_id": g.pool_id, "store": store})
                except OSError:
                    pass  # it died after saying hello: poll() reports how, just below
            if g.faulted():
                raise g.diagnose("startup")
            if should_abort is not None and should_abort():
                raise PoolCancelled("DualParal worker startup was interrupted; no worker is left running.")
            elapsed = time.monotonic() - t0
            if elapsed > self.timeouts.startup:
                late = ", ".join(f"rank {r} ({self.spec.devices[r]}, {g.phase.get(r, 'startup')})"
                                 for r in range(g.world) if r not in ready)
                raise TimeoutError(
                    f"DualParal workers were not ready after {elapsed:.0f} s (Timeouts.startup="
                    f"{self.timeouts.startup:g} s); still starting: {late}. Raise Timeouts.startup if loading the "
                    f"model legitimately takes longer (large checkpoint, slow disk).")
        g.stop_accepting()
        self.ready_info = [ready[r] for r in range(g.world)]
        self.config = self.ready_info[0]["config"]  # what rank 0 actually built: jobs are checked against it
        g.phase.update({r: "idle" for r in range(g.world)})
        port = self.ready_info[0].get("store_port")
        logger.info("DualParal pool ready: %d rank(s), pids %s%s, in %.1f s", g.world, self.pids,
                    f", rendezvous 127.0.0.1:{port}" if port else "", time.monotonic() - t0)
        status(f"all {g.world} rank(s) ready")

    # ------------------------------------------------------------------ state
    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._group.procs]

    @property
    def alive(self) -> bool:
        g = self._group
        return g.healthy and not g.closed and all(p.poll() is None for p in g.procs)

    @property
    def runtime_dir(self) -> str | None:
        return self._group.rundir

    def __repr__(self) -> str:
        return f"WorkerPool(devices={list(self.spec.devices)}, pids={self.pids}, alive={self.alive})"

    # ------------------------------------------------------------------ jobs
    def cancel(self) -> None:
        """Ask the running ``generate`` (from any thread) to stop after the current block-step."""
        self._cancel.set()

    def generate(self, job: Job, on_progress: Callable[[int, int, torch.Tensor | None], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Run ``job`` on every rank; returns the latents [B, C, T, H, W] (float32, CPU).

        Raises ValueError (the job does not fit the model, before any worker sees it), PoolCancelled (the pool
        stays usable), WorkerError or torch.OutOfMemoryError (a rank failed: the pool is closed, build a new one).
        """
        if not isinstance(job, Job):
            raise TypeError(f"expected a dualparal_core.protocol.Job, got {type(job).__name__}")
        if not self.alive:
            raise WorkerError(None, None, "sample", "this pool is closed or had a fault; start a new one.")
        job.validate(self.config)
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("This DualParal pool is already running a job; one job at a time.")
        self._cancel.clear()
        try:
            return self._run(job, on_progress, should_cancel)
        finally:
            self._busy.release()

    def _run(self, job: Job, on_progress, should_cancel) -> torch.Tensor:
        g = self._group
        self._job_id += 1
        jid, cancel_at, done = self._job_id, None, {}
        g.phase.update({r: "sample" for r in range(g.world)})
        try:
            for rank in range(g.world):
                g.send(rank, {"op": proto.OP_JOB, "job": jid, "payload": job})
            last = time.monotonic()
            while True:
                for rank, msg in g.pump(POLL_S):
                    if msg.get("job") != jid:
                        continue
                    if msg["op"] == proto.OP_PROGRESS:
                        last = time.monotonic()
                        if on_progress is not None:
                            on_progress(msg["done"], msg["total"], msg["preview"])
                    elif msg["op"] in (proto.OP_RESULT, proto.OP_CANCELLED):
                        done[rank], last = msg, time.monotonic()
                if g.faulted():
                    raise g.diagnose("sample")
                if len(done) == g.world:
                    if cancel_at is not None or any(m["op"] == proto.OP_CANCELLED for m in done.values()):
                        raise PoolCancelled("DualParal sampling was cancelled.")
                    self.job_info = [{k: v for k, v in done[r].items() if k != "latents"} for r in range(g.world)]
                    g.phase.update({r: "idle" for r in range(g.world)})
                    return done[0]["latents"]
                now = time.monotonic()
                if cancel_at is None and (self._cancel.is_set() or (should_cancel is not None and should_cancel())):
                    g.send(0, {"op": proto.OP_CANCEL, "job": jid})
                    cancel_at = now
                if cancel_at is not None and now - cancel_at > self.timeouts.step:
                    raise self._uncooperative()
                if now - last > self.timeouts.step:
                    raise g.diagnose_hang(now - last, self._heartbeat_s)
        except PoolCancelled:
            raise
        except WorkerError as err:
            self._fail(err)
        except OSError as exc:  # a send to a rank that just died, or close() from another thread
            if g.closed:
                raise WorkerError(None, None, "sample", "the pool was closed while the job ran") from exc
            end = time.monotonic() + FAULT_WINDOW_S
            while not g.faulted() and time.monotonic() < end:
                g.pump(POLL_S)  # the death that broke the connection shows in poll() within moments
            self._fail(g.diagnose("sample") if g.faulted() else
                       WorkerError(None, None, "sample", f"lost the control connection: {exc}"))
        except BaseException:
            # A callback raised (e.g. the host's interrupt): stop the job cooperatively so the pool stays usable.
            if len(done) < g.world:
                self._stop(jid, done)
            raise

    def _fail(self, err: WorkerError) -> NoReturn:
        self.close()  # fail-stop: a pool that had a fault is never reused
        if err.exc_type == "OutOfMemoryError":  # so that the host's OOM handling (ComfyUI's tips) runs
            raise torch.OutOfMemoryError(str(err)) from err
        raise err

    def _stop(self, jid: int, done: dict) -> None:
        g = self._group
        try:
            g.send(0, {"op": proto.OP_CANCEL, "job": jid})
            end = time.monotonic() + self.timeouts.step
            while len(done) < g.world and time.monotonic() < end and not g.faulted():
                for rank, msg in g.pump(POLL_S):
                    if msg.get("job") == jid and msg["op"] in (proto.OP_RESULT, proto.OP_CANCELLED):
                        done[rank] = msg
        except OSError:
            pass
        if len(done) < g.world:
            logger.warning("DualParal: the workers did not stop after an interrupted job; closing the pool")
            g.healthy = False
            self.close()

    def _uncooperative(self) -> PoolCancelled:
        logger.warning("DualParal: the workers did not stop within Timeouts.step=%g s of a cancel; closing the pool",
                       self.timeouts.step)
        self._group.healthy = False
        self.close()
        return PoolCancelled("DualParal sampling was cancelled; the workers did not stop in time, so the pool "
                             "was shut down (the next run starts a new one).")

    def close(self) -> None:
        """Stop every worker (OP_CLOSE, SIGTERM, grace, SIGKILL), reap them, remove the runtime dir. Idempotent."""
        self._finalizer()
