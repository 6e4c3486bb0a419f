"""Launching a local pool: the parent plays torchrun's agent for ranks of the one rank program on this host.

It hosts the rendezvous store on a loopback socket it bound itself (torch's TCPStore server otherwise listens on
every interface, whatever MASTER_ADDR says), sets the variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT, TORCHELASTIC_USE_AGENT_STORE), starts ``python -m dualparal_core.worker --serve 127.0.0.1:0
--exit-on-detach`` once per device, each in its own session, and learns from the store which port rank 0 listens on.
Then a :class:`~dualparal_core.client.session.Session` attaches to rank 0 exactly as to a torchrun-started group.
What only a parent of its own children can do stays here: exit codes, log tails, and teardown (SIGTERM to each
rank's process group, grace, SIGKILL, reap, remove the runtime dir).
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

from .. import logger
from .. import protocol as proto
from ..config import TIMEOUT_ENV, PoolSpec, Timeouts
from ..protocol import PoolCancelled, WorkerError

RANK_MODULE_ENV = "DUALPARAL_RANK_MODULE"
"""The module each rank runs (default ``dualparal_core.worker``); the tests point it at a wrapper that injects
faults (``tests/support/faulty_rank.py``), so that no fault hook lives in the product."""


class Spawner:
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


def tail(path: str | None, lines: int = 15) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 4000))
            return "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
    except (OSError, TypeError):
        return ""


def signame(rc: int) -> str:
    try:
        return f"signal {signal.Signals(-rc).name} ({-rc})"
    except ValueError:
        return f"signal {-rc}"


OWNER_FILE = "owner.json"
"""In a pool's runtime dir: who made it (the parent's pid, host, pid namespace); the sweep removes nothing else."""
_DIR_RE = re.compile(r"dualparal-(\d+)-[a-z0-9_]{8}")  # what mkdtemp(prefix=f"dualparal-{pid}-") makes


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def owner_mark(pid: int) -> dict:
    """The owner mark of a runtime dir made by process ``pid`` of this host and pid namespace."""
    return {"pid": int(pid), "host": socket.gethostname(), "pidns": _pid_namespace()}


def _stale(path: str, pid: int) -> bool:
    """Ours (our uid, our mark: this host and pid namespace, the pid of its name) and its parent is gone."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return False
        with open(os.path.join(path, OWNER_FILE)) as fh:
            mark = json.load(fh)
    except (OSError, ValueError):
        return False  # not a dir of ours, or not marked: someone else's, never touched
    if mark != owner_mark(pid):
        return False  # another host or container (its pids are not ours to judge), or a name that lies
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # alive under another user
    return False


def sweep_stale_dirs() -> None:
    """Remove the runtime dirs of our pools whose parent died without running its finaliser (SIGKILL, OOM killer);
    a live parent's dir, another instance's (another host or pid namespace sharing the temp dir) and any dir
    without our owner mark are left alone."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        m = _DIR_RE.fullmatch(name)
        if m and _stale(os.path.join(root, name), int(m.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


class Launch:
    """The processes, store and files of one local pool; teardown() is its finaliser and never needs the pool."""

    def __init__(self, spec: PoolSpec, timeouts: Timeouts):
        self.spec, self.timeouts, self.world = spec, timeouts, spec.world_size
        self.procs: list[subprocess.Popen] = []
        self.logs: list[str] = []
        self.exits: dict[int, int] = {}
        self.rundir: str | None = None
        self.store, self.store_port = None, None
        self.key = secrets.token_hex(32).encode()  # as the ranks read it: DUALPARAL_AUTHKEY, encoded
        self.pool_id = secrets.token_hex(8)
        self.closed, self.lock = False, threading.Lock()

    # ------------------------------------------------------------------ start
    def start(self, env: dict[str, str]) -> None:
        import torch.distributed as dist

        sweep_stale_dirs()
        # mode 0700, logs only, removed at close; the pid in the name lets a later pool sweep it if we get killed
        self.rundir = tempfile.mkdtemp(prefix=f"dualparal-{os.getpid()}-")
        with open(os.path.join(self.rundir, OWNER_FILE), "w") as fh:
            json.dump(owner_mark(os.getpid()), fh)
        sock = socket.create_server(("127.0.0.1", 0), backlog=64)  # loopback only, a free port
        port = self.store_port = sock.getsockname()[1]
        # the store takes the bound socket over (and closes it with itself)
        self.store = dist.TCPStore("127.0.0.1", port, None, True, datetime.timedelta(seconds=30),
                                   wait_for_workers=False, master_listen_fd=sock.detach())
        t = self.timeouts
        env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(self.world),
               "LOCAL_WORLD_SIZE": str(self.world), "TORCHELASTIC_USE_AGENT_STORE": "True",
               "TORCHELASTIC_RESTART_COUNT": "0", "DUALPARAL_AUTHKEY": self.key.decode(),
               "DUALPARAL_PARENT_PID": str(os.getpid()), "DUALPARAL_POOL_ID": self.pool_id,
               "DUALPARAL_HEARTBEAT": f"{t.heartbeat:g}"}
        env.pop("TORCHELASTIC_RUN_ID", None)
        module = env.get(RANK_MODULE_ENV) or "dualparal_core.worker"
        for rank, device in enumerate(self.spec.devices):
            log = os.path.join(self.rundir, f"rank{rank}.log")
            self.logs.append(log)
            args = [sys.executable, "-m", module, "--serve", "127.0.0.1:0", "--exit-on-detach", "--device", device,
                    "--timeout", f"{max(t.startup, t.step) + 30.0:g}"]
            with open(log, "wb") as fh:
                # One new session per worker: its own process group, out of reach of the terminal's Ctrl-C,
                # and killpg on it can only hit processes this pool started.
                self.procs.append(Spawner.popen(
                    args, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=self.rundir,
                    stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                    close_fds=True))

    def rank0_port(self, t0: float, should_abort) -> int:
        """Wait until rank 0 published where it listens (after every rank joined the group)."""
        key = "dualparal/0/serve"
        while True:
            if self.store.check([key]):
                port = proto.read_store("port", self.store.get(key))
                if port is None:
                    raise WorkerError(0, self.spec.devices[0], "startup", "rank 0 published no valid port")
                return port["port"]
            self.check("startup")
            if should_abort is not None and should_abort():
                raise PoolCancelled("DualParal worker startup was interrupted; no worker is left running.")
            self.check_startup_deadline(t0, "joining the group")
            time.sleep(self.timeouts.poll)

    def check_startup_deadline(self, t0: float, doing: str) -> None:
        elapsed = time.monotonic() - t0
        if elapsed > self.timeouts.startup:
            raise TimeoutError(
                f"DualParal workers were not ready after {elapsed:.0f} s (Timeouts.startup="
                f"{self.timeouts.startup:g} s); still {doing} on {', '.join(self.spec.devices)}. If loading the "
                f"model legitimately takes longer (large checkpoint, slow disk), raise it: set "
                f"{TIMEOUT_ENV['startup']}=SECONDS in ComfyUI's environment.")

    # ------------------------------------------------------------------ deaths
    def poll(self) -> dict[int, int]:
        for rank, proc in enumerate(self.procs):
            if rank not in self.exits and proc.poll() is not None:
                self.exits[rank] = proc.returncode
        return self.exits

    def check(self, phase: str) -> None:
        if self.poll():
            raise self.diagnose(phase)

    def alive(self) -> bool:
        return not self.closed and not self.poll()

    def diagnose(self, phase: str, report: dict | None = None) -> WorkerError:
        """Name the root cause from rank 0's report (if any) and what this parent sees of its children: a rank
        killed by a signal without a word, else the report, else the first rank that exited (with its log tail)."""
        end = time.monotonic() + self.timeouts.fault_window
        while time.monotonic() < end and len(self.poll()) < self.world:
            time.sleep(self.timeouts.poll)
        if report is not None and report.get("type") is not None and report.get("rank") is not None:
            return self._named(proto.error_from_report(report, phase))  # a rank's own exception
        signalled = sorted(r for r, rc in self.exits.items() if rc < 0)
        if signalled:
            r = signalled[0]
            return self._exited(r, report.get("phase", phase) if report else phase,
                                f"the process was killed by {signame(self.exits[r])}")
        if report is not None and report.get("rank") is not None:
            return self._named(proto.error_from_report(report, phase))
        if self.exits:
            r = min(self.exits)
            return self._exited(r, phase, f"the process exited with code {self.exits[r]}")
        return proto.error_from_report(report or {"message": "the group failed without a report"}, phase)

    def _named(self, err: WorkerError) -> WorkerError:
        """The error with the device as this pool's spec names it (a local pool: one host)."""
        if err.rank is None or not 0 <= err.rank < self.world:
            return err
        return WorkerError(err.rank, self.spec.devices[err.rank], err.phase, err.cause, err.exc_type)

    def frozen(self, err: WorkerError) -> WorkerError:
        """A rank named as frozen, with what this parent sees of its process (stopped by a signal, or not)."""
        err = self._named(err)
        try:
            import psutil

            state = psutil.Process(self.procs[err.rank].pid).status()
        except Exception:  # noqa: BLE001 - gone meanwhile, or no psutil: the heartbeats said enough
            return err
        if state in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
            err = WorkerError(err.rank, err.device, err.phase, f"{err.cause} Its process (pid "
                              f"{self.procs[err.rank].pid}) is stopped (SIGSTOP, Ctrl-Z or a debugger).")
        return err

    def _exited(self, r: int, phase: str, cause: str) -> WorkerError:
        log = tail(self.logs[r])
        return WorkerError(r, self.spec.devices[r], phase, cause + (f"\nLast lines of its log:\n{log}" if log else ""))

    # ------------------------------------------------------------------ teardown
    def teardown(self, polite: bool, grace: float | None = None) -> None:
        """(``polite``: rank 0 was told to end the group) grace, SIGTERM (and SIGCONT, so that a stopped rank sees
        it) to every rank's process group, grace (default ``close_grace``), SIGKILL; reap; close the store; remove
        the files."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        t0, grace = time.monotonic(), self.timeouts.close_grace if grace is None else grace

        def wait_until(deadline: float) -> bool:
            while time.monotonic() < deadline:
                if all(p.poll() is not None for p in self.procs):
                    return True
                time.sleep(0.02)
            return all(p.poll() is not None for p in self.procs)

        if polite:
            wait_until(t0 + grace / 2)
        for sig, deadline in ((signal.SIGTERM, t0 + grace), (signal.SIGKILL, None)):
            for p in self.procs:
                # Kill by process group, also after the leader exited: that reaches anything a rank started.
                for one in (sig, signal.SIGCONT) if sig == signal.SIGTERM else (sig,):
                    try:
                        os.killpg(p.pid, one)
                    except (ProcessLookupError, PermissionError):
                        pass
            if deadline is not None and wait_until(deadline):
                break
        for p in self.procs:
            try:
                p.wait(5.0)
            except subprocess.TimeoutExpired:
                logger.warning("DualParal worker pid %d did not exit after SIGKILL (stuck in the kernel?)", p.pid)
        self.store = None
        if self.rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)
