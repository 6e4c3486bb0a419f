"""One DualParal rank as its own process (``python -m dualparal_core.worker``), driven by the parent's pool."""

from __future__ import annotations

import ctypes
import datetime
import os
import pickle
import platform
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Client

import torch

from . import logger
from . import protocol as proto

# Environment the pool sets for each worker:
#   DUALPARAL_CONTROL     host:port of the parent's multiprocessing Listener (loopback by default)
#   DUALPARAL_AUTHKEY     the Listener's authkey, hex
#   DUALPARAL_RANK        this worker's rank; DUALPARAL_WORLD: the number of ranks
#   DUALPARAL_INIT        optional torch.distributed init_method shared by all ranks; unset or "auto": rank 0 hosts
#                         a TCPStore on a free loopback port and the parent relays its address to the other ranks
#   DUALPARAL_PARENT_PID  the process whose death ends this worker
#   DUALPARAL_HEARTBEAT   seconds between status heartbeats while loading or sampling (default 2)
#   DUALPARAL_FAULT       fault injection for tests, see parse_faults (ignored when unset)
HOST_MODULES = ("comfy", "nodes", "server", "folder_paths")
PREVIEW_INTERVAL_S = 0.5
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
    """Faults of ``DUALPARAL_FAULT`` meant for ``rank``: ``;``-separated lists of ``key=value,...`` with keys
    rank (default: every rank), phase (startup|load|sample|decode), step (1-based block-step on that rank; for
    decode, the rank's decoded blocks counted over all decodes), kind
    (kill|raise|hang|oom|slow|exit_on_start|exit_early|never_ready|ignore_term) and delay (seconds, kind=slow)."""
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


class _ParentGone(Exception):
    """The control connection closed: the parent exited or closed the pool; leave quietly."""


def die_with_parent(parent_pid: int) -> None:
    """Exit when the parent does: PR_SET_PDEATHSIG (kernel-side, works while this process is stuck in native code)
    plus a thread that watches getppid() (any platform, and the case where the parent died before prctl ran)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError) as exc:
            logger.warning("PR_SET_PDEATHSIG unavailable (%s); relying on the parent watcher thread", exc)

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)  # orphaned: nobody will ever read our results, and we may hold a GPU
            time.sleep(0.5)

    if os.getppid() != parent_pid:
        os._exit(70)
    threading.Thread(target=watch, name="dualparal-parent-watch", daemon=True).start()


class Worker:
    """Control loop of one rank: connect, join the group, load the stage, serve jobs."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.rank, self.world = int(env["DUALPARAL_RANK"]), int(env["DUALPARAL_WORLD"])
        self.faults = parse_faults(env.get("DUALPARAL_FAULT"), self.rank)
        self.heartbeat_s = float(env.get("DUALPARAL_HEARTBEAT", "2"))
        self.phase, self.device, self.conn = "startup", "?", None
        self.busy, self.block_step, self.computing_since = False, 0, None
        self.load_count, self.group = 0, False
        self._send_lock = threading.Lock()
        self._cancel = self._closing = False

    # ------------------------------------------------------------------ control channel
    def send(self, op: str, **kw) -> None:
        data = pickle.dumps({"op": op, "rank": self.rank, "time": time.time(), **kw}, pickle.HIGHEST_PROTOCOL)
        with self._send_lock:  # progress (main thread) and heartbeats (their thread) share one connection
            self.conn.send_bytes(data)

    def recv(self) -> dict:
        try:
            return pickle.loads(self.conn.recv_bytes())
        except (EOFError, ConnectionError) as exc:
            raise _ParentGone() from exc

    def _heartbeat(self) -> None:
        while True:
            time.sleep(self.heartbeat_s)
            if not self.busy:
                continue  # an idle pool sends nothing, so nothing piles up while nobody reads
            since = self.computing_since
            try:
                self.send(proto.OP_STATUS, phase=self.phase, step=self.block_step,
                          computing_for=None if since is None else time.monotonic() - since)
            except OSError:
                return

    # ------------------------------------------------------------------ faults (tests only)
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
                           f" block-step {step}" if step else "")
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

    # ------------------------------------------------------------------ startup
    def run(self) -> None:
        if any(f.kind == "exit_early" for f in self.faults):
            sys.stderr.write("ValueError: no such model (fault injection, before connecting)\n")
            sys.stderr.flush()
            os._exit(3)
        if any(f.kind == "ignore_term" for f in self.faults):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        host, port = self.env["DUALPARAL_CONTROL"].rsplit(":", 1)
        self.conn = Client((host, int(port)), authkey=bytes.fromhex(self.env["DUALPARAL_AUTHKEY"]))
        self.send(proto.OP_STATUS, phase="startup", pid=os.getpid())
        threading.Thread(target=self._heartbeat, name="dualparal-heartbeat", daemon=True).start()
        msg = self.recv()
        if msg["op"] != proto.OP_SPEC:
            raise RuntimeError(f"expected the pool spec first, got {msg['op']!r}")
        spec, timeouts, pool_id = msg["spec"], msg["timeouts"], msg["pool_id"]
        self.fire("startup")
        device = torch.device(spec.devices[self.rank])
        self.device = str(device)
        if device.type == "cuda":
            if self.world > 1:
                from .comm import prefer_eager_module_loading

                prefer_eager_module_loading()
            torch.cuda.set_device(device)
        pipe = self._join(device, msg.get("store"), max(timeouts.startup, timeouts.step) + 30.0)
        self.phase, self.busy = "load", True
        self.send(proto.OP_STATUS, phase="load", text="loading weights")
        from .runtime import build_stage

        stage, info = build_stage(spec, self.rank, device)
        self.load_count += 1
        self.fire("load")
        self.busy = False
        self.send(proto.OP_READY, info={
            **info, "rank": self.rank, "world": self.world, "pool_id": pool_id, "pid": os.getpid(),
            "device": self.device, "gpu_uuid": self._gpu_uuid(device), "torch": torch.__version__,
            "python": platform.python_version(), "load_count": self.load_count, "threads": torch.get_num_threads(),
            "host_modules": [m for m in HOST_MODULES if m in sys.modules], "store_port": self._store_port})
        self.serve(stage, pipe, spec.max_in_flight)

    def _join(self, device: torch.device, store_addr: tuple[str, int] | None, timeout_s: float):
        """Join the process group: through DUALPARAL_INIT when set, else through a TCPStore that rank 0 hosts on a
        free loopback port and whose address the parent relays to the other ranks."""
        self._store_port = None
        if self.world == 1:
            return None
        import torch.distributed as dist

        from .comm import init_groups

        init, store = self.env.get("DUALPARAL_INIT", "auto"), None
        if init in ("", "auto"):
            init, timeout = None, datetime.timedelta(seconds=timeout_s)
            if self.rank == 0:
                # Port 0: the OS picks a free port atomically, so a port in use can never collide with us.
                store = dist.TCPStore("127.0.0.1", 0, self.world, is_master=True, wait_for_workers=False,
                                      timeout=timeout)
                self._store_port = store.port
                self.send(proto.OP_STATUS, phase="startup", store_port=store.port)
            elif store_addr is None:
                raise RuntimeError("the parent relayed no rendezvous address to this rank")
            else:
                store = dist.TCPStore(store_addr[0], store_addr[1], self.world, is_master=False, timeout=timeout)
        pipe = init_groups(self.rank, self.world, device, init, timeout_s=timeout_s, store=store)
        self.group = True
        return pipe

    @staticmethod
    def _gpu_uuid(device: torch.device) -> str | None:
        if device.type != "cuda":
            return None
        return str(torch.cuda.get_device_properties(device).uuid)

    # ------------------------------------------------------------------ serving
    def serve(self, stage, pipe, max_in_flight: int | None) -> None:
        from .engine import RankEngine

        self.engine = RankEngine(stage, pipe, max_in_flight)
        inner = stage.blocks_forward

        def blocks_forward(*args, **kw):
            self.block_step += 1
            self.computing_since = time.monotonic()  # a heartbeat naming a long compute identifies a hung rank
            if self.faults:
                self.fire("sample", self.block_step)
            try:
                return inner(*args, **kw)
            finally:
                self.computing_since = None

        stage.blocks_forward = blocks_forward
        self.phase = "idle"
        while True:
            msg = self.recv()
            op = msg["op"]
            if op == proto.OP_JOB:
                self.job(msg["job"], msg["payload"])
                if self._closing:
                    return
            elif op == proto.OP_DECODE:  # Block Decode of one span (decode_worker.py)
                from .decode_worker import serve_decode

                serve_decode(self, msg)
                if self._closing:
                    return
            elif op == proto.OP_PING:
                self.send(proto.OP_PONG)
            elif op == proto.OP_CLOSE:
                if any(f.kind == "ignore_term" for f in self.faults):
                    continue  # fault injection: play a wedged rank so close() must escalate
                return
            elif op == proto.OP_CANCEL:
                continue  # a cancel that crossed the end of its job: nothing is running
            else:
                raise RuntimeError(f"unknown control message {op!r}")

    def job(self, job_id: int, job) -> None:
        from .engine import JobCancelled

        self.phase, self.busy, self.block_step, self._cancel = "sample", True, 0, False
        self.job_id, self.done, self.total, self._last_preview = job_id, 0, job.num_block_steps, 0.0
        t0 = time.perf_counter()
        lead = self.rank == 0
        try:
            out = self.engine.run_job(job, self._progress if lead else None, self._cancelled if lead else None)
        except JobCancelled:
            self.send(proto.OP_CANCELLED, job=job_id)
        else:
            self.send(proto.OP_RESULT, job=job_id, latents=out, seconds=time.perf_counter() - t0,
                      jobs_run=self.engine.jobs_run, load_count=self.load_count, block_steps=self.block_step,
                      **self.engine.last_profile)
        self.phase, self.busy = "idle", False  # not on errors: the report names the phase they happened in

    def _progress(self, done: int, total: int, preview) -> None:
        self.done = done
        now = time.monotonic()
        if preview is not None and (done == total or now - self._last_preview >= PREVIEW_INTERVAL_S):
            self._last_preview = now
        else:
            preview = None  # previews are throttled; progress counts are not
        self.send(proto.OP_PROGRESS, job=self.job_id, done=done, total=total, preview=preview)

    def _cancelled(self) -> bool:
        """Rank 0, between block-steps: read the control connection without blocking."""
        while self.conn.poll(0):
            msg = self.recv()
            if msg["op"] == proto.OP_CANCEL and msg.get("job") == self.job_id:
                self._cancel = True
            elif msg["op"] == proto.OP_CLOSE:
                self._cancel = self._closing = True
            elif msg["op"] == proto.OP_PING:
                self.send(proto.OP_PONG)
        # After the final block-step the other ranks have finished; a stop header then would be read by the
        # next job, so a cancel that arrives that late lets the job complete.
        return self._cancel and self.done < self.total

    # ------------------------------------------------------------------ errors and teardown
    def report(self, exc: BaseException) -> None:
        tb = traceback.format_exc()
        logger.error("rank %d (%s) failed during %s:\n%s", self.rank, self.device, self.phase, tb)
        if self.conn is None:
            return
        try:
            self.send(proto.OP_ERROR, device=self.device, phase=self.phase, type=type(exc).__name__,
                      message=str(exc), traceback=tb)
        except OSError:
            pass  # the parent is gone or has already torn the pool down

    def teardown(self) -> None:
        self.busy = False
        if self.group:
            try:
                from .comm import destroy_groups

                destroy_groups()
            except Exception as exc:  # noqa: BLE001 - teardown must finish; the parent kills us anyway
                logger.warning("rank %d: destroy_process_group failed: %s", self.rank, exc)
        if self.conn is not None:
            self.conn.close()


def main() -> int:
    """Run one rank until the parent closes the pool (0), or an error was reported (1)."""
    env = os.environ
    die_with_parent(int(env.get("DUALPARAL_PARENT_PID", os.getppid())))
    threads = env.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                          else max(1, (os.cpu_count() or 1) // int(env.get("DUALPARAL_WORLD", "1"))))
    worker = Worker(env)
    try:
        worker.run()
    except _ParentGone:
        code = 0
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent with its traceback
        worker.report(exc)
        code = 1
    else:
        code = 0
    finally:
        worker.teardown()
    return code


if __name__ == "__main__":
    if "--serve" in sys.argv[1:]:  # a long-lived group started by torchrun (dualparal_core/serve.py)
        from .serve import main as serve_main

        rc = serve_main(sys.argv[1:])
    else:
        rc = main()
    sys.stderr.flush()
    os._exit(rc)  # skip interpreter finalisation: library atexit hooks must not keep a finished rank alive
