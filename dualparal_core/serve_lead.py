"""Rank 0 of a torchrun-started group (the other half of :class:`dualparal_core.serve.GroupRank`): the listener,
one attached parent at a time, and the fault monitor that tells the parent which rank failed before the group goes.

Root cause, in order: a rank on this host whose process is gone without a report (killed, crashed in native code),
else the earliest error report another rank left in the rendezvous store, else (once a fault is certain) a rank
whose heartbeats in the store stopped (another host). torchrun's SIGTERM is caught so that this report goes out
before rank 0 exits.
"""

from __future__ import annotations

import os
import pickle
import queue
import select
import signal
import socket
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import wait
from typing import NoReturn

from . import __version__, logger
from . import protocol as proto
from .channel import CONNECT_S, KEY_ENV, authenticate
from .worker import Worker, _ParentGone

OP_NOOP, OP_LOAD = "noop", "load"  # rank 0 -> the other ranks only
KEEPALIVE_S = 30.0
"""While idle, rank 0 broadcasts a no-op at least this often (the control group's collectives have a timeout)."""
MONITOR_S = 0.2
FAULT_WINDOW_S = 1.5
"""After a fault shows on rank 0, how long it looks for another rank's report before naming itself."""


def _pid_alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    except Exception:  # noqa: BLE001 - NoSuchProcess and friends
        return False


def _drain(conn) -> None:
    """Read what the peer sent: closing a socket with unread data resets the connection, and a reset can discard
    our last message (an error report, a refusal) before the peer reads it."""
    try:
        while conn.poll(0):
            conn.recv_bytes()
    except (OSError, EOFError):
        pass


class LeadRank(Worker):
    """Rank 0's methods; the state lives in GroupRank (which subclasses this)."""

    # ------------------------------------------------------------------ channel to the parent (rank 0)
    def send(self, op: str, **kw) -> None:
        data = pickle.dumps({"op": op, "rank": self.rank, "host": self.host, "time": time.time(), **kw},
                            pickle.HIGHEST_PROTOCOL)
        with self._send_lock:  # progress (main thread), heartbeats and fault reports (their threads)
            if self.conn is None:
                return
            try:
                self.conn.send_bytes(data)
            except OSError:  # the parent left: stop a running job at the next block-step, then wait for the next
                self._lost = self._cancel = True

    def _cancelled(self) -> bool:
        if not self._lost:
            try:
                return super()._cancelled()
            except (_ParentGone, OSError):
                self._lost = True
        self._cancel = True
        return self.done < self.total

    # ------------------------------------------------------------------ rank 0: parents
    def _listen(self) -> None:
        host, _, port = self.args.serve.rpartition(":")
        host = (host or "127.0.0.1").strip("[]")
        try:
            self.server = socket.create_server((host, int(port)), backlog=16)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot listen on --serve {self.args.serve} ({exc}): the port is in use or the "
                               f"address is not on this host; pick another --serve address.") from None
        self._incoming: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        threading.Thread(target=self._accept, name="dualparal-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(sock, f"{addr[0]}:{addr[1]}"), daemon=True).start()

    def _handshake(self, sock: socket.socket, who: str) -> None:
        try:
            conn = authenticate(sock, self.key, server=True)
        except AuthenticationError:
            logger.warning("refused a connection from %s: it has another %s", who, KEY_ENV)
            return
        except (OSError, EOFError):
            logger.info("a connection from %s did not complete the handshake", who)
            return
        self._incoming.put((conn, who))
        os.write(self._wake_w, b"!")

    def _lead(self) -> NoReturn:
        while True:
            try:
                conn, who = self._incoming.get_nowait()
            except queue.Empty:
                if wait([self._wake_r], KEEPALIVE_S):
                    os.read(self._wake_r, 4096)
                else:
                    self._bcast({"op": OP_NOOP})
                continue
            self._serve(conn, who)

    def _serve(self, conn, who: str) -> None:
        """One parent, until it detaches or vanishes. Any other exception is fatal and propagates with the
        connection kept, so that crash() tells this parent which rank failed."""
        self.conn, self._lost, self._closing, self.client = conn, False, False, who
        try:
            self._session(conn, who)
        except _ParentGone:
            pass
        with self._send_lock:
            self.conn = None
        _drain(conn)
        conn.close()
        logger.info("detached: %s", self.client)

    def _session(self, conn, who: str) -> None:
        if not conn.poll(CONNECT_S):
            return
        hello = self.recv()
        if hello.get("op") != proto.OP_SPEC or hello.get("version") != __version__:
            self.send(proto.OP_ERROR, phase="attach", message=(
                f"this group runs DualParal {__version__} and the client {hello.get('version')}: install the "
                f"same version on every host and where ComfyUI runs."))
            return
        self.client = f"{hello.get('client', '?')} from {who}"
        err = self._load(self._bcast({"op": OP_LOAD, "model": hello.get("model")})["model"])
        if err is not None:
            self.send(proto.OP_ERROR, **err)
            return
        self.send(proto.OP_READY, info=self.infos)
        logger.info("attached: %s", self.client)
        while not (self._lost or self._closing):
            ready = wait([conn, self._wake_r], KEEPALIVE_S)
            if conn in ready:
                self._dispatch(self.recv())
            elif ready:
                os.read(self._wake_r, 4096)
                if not conn.poll(0):  # a pending message (or EOF) of ours first: it may be a detach
                    self._turn_away()
            else:
                self._bcast({"op": OP_NOOP})

    def _dispatch(self, msg: dict) -> None:
        op = msg["op"]
        if op == proto.OP_JOB:
            try:
                msg["payload"].validate(self.stage.config)
            except ValueError as exc:
                self.send(proto.OP_ERROR, recoverable=True, phase="sample", type="ValueError", message=str(exc))
                return
            self._job(msg["job"], self._bcast(msg)["payload"])
        elif op == proto.OP_PING:
            self.send(proto.OP_PONG)
        elif op == proto.OP_CLOSE:
            self._closing = True
        elif op != proto.OP_CANCEL:  # a cancel that crossed the end of its job: nothing runs
            logger.warning("ignoring control message %r from %s", op, self.client)

    def _turn_away(self) -> None:
        while True:
            try:
                other, who = self._incoming.get_nowait()
            except queue.Empty:
                return
            try:
                other.poll(2.0)  # its hello
                _drain(other)
                other.send_bytes(pickle.dumps({"op": proto.OP_ERROR, "phase": "attach", "rank": 0, "message": (
                    f"the group is in use by {self.client}; detach it first (ComfyUI: Unload models) or start "
                    f"another group on another port.")}))
            except OSError:
                pass
            other.close()
            logger.info("turned away %s: in use by %s", who, self.client)

    def _fail(self, report: dict, code: int = 1) -> NoReturn:
        with self._fail_lock:  # the first fault wins; a second caller waits here for the exit
            log = logger.error if code else logger.info
            log("DualParal group: rank %s (%s on %s) %s during %s: %s: %s\n%s", report["rank"], report.get("device"),
                report.get("host"), "failed" if code else "stopped", report.get("phase"), report.get("type"),
                report.get("message"), report.get("traceback", ""))
            self.send(proto.OP_ERROR, **report)
            conn = self.conn
            if conn is not None:
                _drain(conn)
            sys.stderr.flush()
            os._exit(code)

    def _watch(self) -> None:
        """SIGTERM (torchrun stopping the group) must not kill rank 0 before it told the parent why."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.signal(signal.SIGTERM, lambda *a: None)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._monitor, args=(r,), name="dualparal-monitor", daemon=True).start()

    def _monitor(self, wake: int) -> NoReturn:
        next_beat = 0.0
        while True:
            if select.select([wake], [], [], MONITOR_S)[0] and signal.SIGTERM in os.read(wake, 512):
                self._stopping()
            if self.kv is not None:
                if time.monotonic() >= next_beat:
                    self._read_beats()
                    next_beat = time.monotonic() + self.heartbeat_s
                fault = self._peer_fault()
                if fault is not None:
                    self._fail(fault)

    def _stopping(self) -> NoReturn:
        """torchrun sent SIGTERM: its group was stopped, or a rank failed. An attached parent learns which."""
        end = time.monotonic() + FAULT_WINDOW_S
        while self.conn is not None and self.kv is not None and time.monotonic() < end:
            fault = self._peer_fault(stale=True)
            if fault is not None:
                self._fail(fault)
            time.sleep(0.1)
        self._fail({"rank": None, "phase": self.phase, "type": "SIGTERM", "message": (
            "the group is shutting down: its torchrun agent sent SIGTERM (it was stopped, or a rank failed: see "
            "the torchrun output)."), "traceback": ""}, code=0)

    def _read_beats(self) -> None:
        for r in range(1, self.world):
            try:
                raw = self.kv.get(f"hb/{r}")
            except Exception:  # noqa: BLE001 - the store is going down with the group
                return
            if r not in self._beats or self._beats[r][0] != raw:
                self._beats[r] = (raw, time.monotonic())

    def _peer_states(self) -> dict:
        now, out = time.monotonic(), {}
        for r, (raw, at) in list(self._beats.items()):
            st, p = pickle.loads(raw), self.peers[r]
            cf = st.get("computing_for")
            out[r] = {"silent_for": now - at, "stale": now - at > 3 * self.heartbeat_s + 1, "step": st.get("step"),
                      "computing_for": None if cf is None else cf + now - at, "where": f"{p['device']} on {p['host']}"}
        return out

    def _peer_fault(self, stale: bool = False) -> dict | None:
        """A rank on this host that died without a report, else the earliest report, else (``stale``) a rank whose
        heartbeats stopped."""
        reports = []
        try:
            if int(self.kv.add("errors", 0)):
                reports = [pickle.loads(self.kv.get(f"error/{r}")) for r in range(1, self.world)
                           if self.kv.check([f"error/{r}"])]
        except Exception:  # noqa: BLE001 - the store is going down with the group
            pass
        told = {m["rank"] for m in reports}
        for p in self.peers[1:]:
            if p["host"] == self.host and p["rank"] not in told and not _pid_alive(p["pid"]):
                return {"rank": p["rank"], "device": p["device"], "host": p["host"], "phase": self.phase,
                        "type": None, "traceback": "", "message": (
                            f"rank {p['rank']} (pid {p['pid']}) exited without a word: killed (e.g. by the OOM "
                            f"killer or kill -9) or crashed in native code; torchrun's output has its exit status.")}
        if reports:
            return min(reports, key=lambda m: m["time"])
        if stale:
            for r, st in self._peer_states().items():
                if st["stale"]:
                    p = self.peers[r]
                    return {"rank": r, "device": p["device"], "host": p["host"], "phase": self.phase, "type": None,
                            "traceback": "", "message": f"rank {r} stopped sending heartbeats "
                                                        f"{st['silent_for']:.0f} s ago (killed, frozen or cut off)."}
        return None
