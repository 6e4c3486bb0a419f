"""Rank 0's extra duties: the listener, one attached parent at a time, the relay of its ops to the other ranks, and
the fault monitor that tells the parent which rank failed before the group goes.

Root cause, in order: a rank on this host whose process is gone without a report (killed, crashed in native code),
else the earliest error report another rank left in the rendezvous store, else (once a fault is certain) a rank
whose heartbeats in the store stopped (another host). Store values are plain JSON checked against a schema
(:func:`dualparal_core.protocol.read_store`): the store has no authentication, so anything else is ignored. SIGTERM
(torchrun stopping the group) is caught so that this report goes out before rank 0 exits.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import sys
import threading
import time
from multiprocessing.connection import wait
from typing import NoReturn

from .. import __version__, kvcache, logger
from .. import protocol as proto
from ..channel import dumps, loads
from .decode import serve_decode
from .door import Door
from .life import pid_alive

PREVIEW_INTERVAL_S = 0.5
"""Latent previews are sent at most this often (progress counts always)."""


class _ParentGone(Exception):
    """The parent's connection closed: it detached, exited or crashed."""


def _drain(conn) -> None:
    """Read what the peer sent: closing a socket with unread data resets the connection, and a reset can discard
    our last message (an error report, a refusal) before the peer reads it."""
    try:
        while conn.poll(0):
            conn.recv_bytes()
    except (OSError, EOFError):
        pass


class Lead:
    """Rank 0's side of the group; ``rank`` is the :class:`~.program.Rank` it serves."""

    def __init__(self, rank):
        self.r, self.t = rank, rank.timeouts
        self.conn, self.client, self.lost, self.closing, self.serving = None, None, False, False, False
        self.job_id, self.done, self.total, self.cancel, self.last_preview = None, 0, 0, False, 0.0
        self.beats: dict[int, tuple[bytes, float]] = {}
        self.send_lock, self.fail_lock = threading.Lock(), threading.Lock()
        self.bad_store_values = 0

    # ------------------------------------------------------------------ listener
    def listen(self) -> None:
        self.door = Door(self.r.args.serve, self.r.key, self.t.connect, self.send_lock,
                         lambda: self._status({"phase": self.r.phase}))
        self.door.listen()
        self.address, self.wake_r = self.door.address, self.door.wake_r

    def publish_port(self) -> None:
        """Tell a local pool's parent (which hosts the store) where to attach: the port the OS picked."""
        if self.r.kv is not None:
            self.r.kv.set("serve", proto.write_store("port", {"port": int(self.address[1])}))

    def serve_forever(self) -> None:
        """One parent at a time, until the first one detaches (``--exit-on-detach``) or forever."""
        while True:
            try:
                conn, who = self.door.next()
            except queue.Empty:
                if wait([self.wake_r], self.t.keepalive):
                    os.read(self.wake_r, 4096)
                else:
                    self.r.bcast({"op": proto.OP_NOOP})
                continue
            self._serve(conn, who)
            if self.r.args.exit_on_detach:
                return

    # ------------------------------------------------------------------ one parent
    def send(self, op: str, **kw) -> None:
        data = dumps({"op": op, "rank": 0, "host": self.r.host, "time": time.time(), **kw})
        with self.send_lock:  # progress (main thread), heartbeats and fault reports (their threads)
            if self.conn is None:
                return
            try:
                self.conn.send_bytes(data)
            except OSError:  # the parent left: stop a running job at the next block-step, then wait for the next
                self.lost = self.cancel = True

    def recv(self) -> dict:
        try:
            return loads(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise _ParentGone() from exc

    def _serve(self, conn, who: str) -> None:
        """One parent, until it detaches or vanishes. Any other exception is fatal and propagates with the
        connection kept, so that crash() tells this parent which rank failed."""
        self.conn, self.lost, self.closing, self.client = conn, False, False, who
        try:
            self._session(conn, who)
        except _ParentGone:
            pass
        with self.send_lock:
            self.conn = None
        _drain(conn)
        conn.close()
        logger.info("detached: %s", self.client)

    def _session(self, conn, who: str) -> None:
        if not conn.poll(self.t.connect):
            return
        hello = self.recv()
        if hello.get("op") != proto.OP_SPEC or hello.get("version") != __version__:
            self.send(proto.OP_ERROR, phase="attach", message=(
                f"this group runs DualParal {__version__} and the client {hello.get('version')}: install the "
                f"same version on every host and where ComfyUI runs."))
            return
        self.client = f"{hello.get('client', '?')} from {who}"
        self.serving = True  # heartbeats (and a frozen peer's detection) through the load and its gather too
        try:
            err = self.r.load(self.r.bcast({"op": proto.OP_LOAD, "model": hello.get("model")})["model"])
        finally:
            self.serving = False
        if err is not None:
            self.send(proto.OP_ERROR, **err)
            return
        self.send(proto.OP_READY, info=self.r.infos)
        logger.info("attached: %s", self.client)
        while not (self.lost or self.closing):
            ready = wait([conn, self.wake_r], self.t.keepalive)
            if conn in ready:
                self._dispatch(self.recv())
            elif ready:
                os.read(self.wake_r, 4096)
                if not conn.poll(0):  # a pending message (or EOF) of ours first: it may be a detach
                    self._turn_away()
            else:
                self.r.bcast({"op": proto.OP_NOOP})

    def _dispatch(self, msg: dict) -> None:
        self.serving = msg["op"] in (proto.OP_JOB, proto.OP_DECODE)  # heartbeats for the whole op, gathers included
        try:
            self._run_op(msg)
        finally:
            # a decode goes on after rank 0's own span (the others send their blocks straight to the parent): it
            # beats until the parent says the decode is over (OP_IDLE), or the parent takes it for frozen
            self.serving = msg["op"] == proto.OP_DECODE

    def _run_op(self, msg: dict) -> None:
        op = msg["op"]
        if op == proto.OP_JOB:
            try:
                msg["payload"].validate(self.r.stage.config)
                kvcache.check_job(self.r.stage, msg["payload"], self.r.world)  # an offloaded cache must fit the host
            except ValueError as exc:
                self.send(proto.OP_ERROR, recoverable=True, phase="sample", type="ValueError", message=str(exc))
                return
            self.r.job(msg["job"], self.r.bcast(msg)["payload"])
        elif op == proto.OP_DECODE:
            serve_decode(self.r, self.r.bcast(msg))
        elif op == proto.OP_PING:
            self.send(proto.OP_PONG)
        elif op == proto.OP_CLOSE:
            self.closing = True
        elif op not in (proto.OP_CANCEL, proto.OP_IDLE):  # a cancel that crossed the end of its job: nothing runs
            logger.warning("ignoring control message %r from %s", op, self.client)

    def _turn_away(self) -> None:
        while True:
            try:
                other, who = self.door.next()
            except queue.Empty:
                return
            try:
                other.poll(2.0)  # its hello
                _drain(other)
                other.send_bytes(dumps({"op": proto.OP_ERROR, "phase": "attach", "rank": 0, "message": (
                    f"the group is in use by {self.client}; detach it first (ComfyUI: Unload models) or start "
                    f"another group on another port.")}))
            except OSError:
                pass
            other.close()
            logger.info("turned away %s: in use by %s", who, self.client)

    # ------------------------------------------------------------------ a job's progress and cancel
    def begin(self, job_id: int, total: int) -> None:
        self.job_id, self.done, self.total, self.cancel, self.last_preview = job_id, 0, total, False, 0.0

    def progress(self, done: int, total: int, preview) -> None:
        self.done = done
        now = time.monotonic()
        if preview is not None and (done == total or now - self.last_preview >= PREVIEW_INTERVAL_S):
            self.last_preview = now
        else:
            preview = None  # previews are throttled; progress counts are not
        self.send(proto.OP_PROGRESS, job=self.job_id, done=done, total=total, preview=preview)

    def cancelled(self) -> bool:
        """Between block-steps: read the parent's connection without blocking."""
        try:
            while not self.lost and self.conn is not None and self.conn.poll(0):
                msg = self.recv()
                if msg["op"] == proto.OP_CANCEL and msg.get("job") == self.job_id:
                    self.cancel = True
                elif msg["op"] == proto.OP_CLOSE:
                    self.cancel = self.closing = True
                elif msg["op"] == proto.OP_PING:
                    self.send(proto.OP_PONG)
        except (_ParentGone, OSError):
            self.lost = self.cancel = True
        # After the final block-step the other ranks have finished; a stop header then would be read by the
        # next job, so a cancel that arrives that late lets the job complete.
        return self.cancel and self.done < self.total

    def beat(self, state: dict) -> None:
        """From the heartbeat thread: while an op runs, or while the parent waits for an answer that the main thread
        cannot give (stuck in a collective with a frozen peer), tell it this rank lives and how its peers do. Its
        absence is how the parent sees that rank 0 itself is frozen."""
        with self.send_lock:
            conn = self.conn
            try:
                waited = conn is not None and conn.poll(0)  # only looks: the main thread does the reading
            except (OSError, EOFError):
                waited = False
        if conn is not None and (self.r.busy or self.serving or waited):
            self.send(**self._status(state))
        if self.door.waiting:  # parents waiting during the rendezvous, the start-up model or another's job
            self.door.tell_waiting(self._status(state))

    def _status(self, state: dict) -> dict:
        """A heartbeat: this rank's state, its peers' and its interval (so that an attached parent knows it before
        the group is ready, and tells a frozen rank 0 from a long load)."""
        return {"op": proto.OP_STATUS, "rank": 0, **{k: v for k, v in state.items() if k != "n"},
                "peers": self.peer_states(), "heartbeat": self.t.heartbeat}

    # ------------------------------------------------------------------ faults
    def fail(self, report: dict, code: int = 1) -> NoReturn:
        with self.fail_lock:  # the first fault wins; a second caller waits here for the exit
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

    def crash(self, report: dict) -> NoReturn:
        """Rank 0 itself failed (often a peer's failure reaching it as a communication error): name the root
        cause, preferring a peer's, then exit."""
        self._window()
        self.fail(report)

    def _window(self) -> None:
        end = time.monotonic() + self.t.fault_window
        while self.r.kv is not None and time.monotonic() < end:
            fault = self.peer_fault(stale=True)
            if fault is not None:
                self.fail(fault)
            time.sleep(0.1)

    def watch(self) -> None:
        """SIGTERM (torchrun stopping the group) must not kill rank 0 before it told the parent why."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.signal(signal.SIGTERM, lambda *a: None)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._monitor, args=(r,), name="dualparal-monitor", daemon=True).start()

    def _monitor(self, wake: int) -> NoReturn:
        next_beat = 0.0
        while True:
            if select.select([wake], [], [], self.t.monitor)[0] and signal.SIGTERM in os.read(wake, 512):
                self._stopping()
            if self.r.kv is not None:
                if time.monotonic() >= next_beat:
                    self._read_beats()
                    next_beat = time.monotonic() + self.t.heartbeat
                # while an op runs, a frozen peer (stale heartbeats) is a fault too: the group fails, and an attached
                # group's torchrun agent restarts it (idle or loading, only reports and deaths count)
                fault = self.peer_fault(stale=self.serving)
                if fault is not None:
                    self.fail(fault)

    def _stopping(self) -> NoReturn:
        """SIGTERM: the group was stopped (torchrun, or a local pool's parent), or a rank failed. Say which."""
        if self.conn is not None:
            self._window()
        self.fail({"rank": None, "phase": self.r.phase, "type": "SIGTERM", "message": (
            "the group is shutting down: its torchrun agent (or the local pool's parent) sent SIGTERM (it was "
            "stopped, or a rank failed: see the torchrun output or the rank logs)."), "traceback": ""}, code=0)

    def _read_beats(self) -> None:
        for r in range(1, self.r.world):
            try:
                raw = self.r.kv.get(f"hb/{r}")
            except Exception:  # noqa: BLE001 - the store is going down with the group
                return
            if r not in self.beats or self.beats[r][0] != raw:
                self.beats[r] = (raw, time.monotonic())

    def peer_states(self) -> dict:
        now, out = time.monotonic(), {}
        for r, (raw, at) in list(self.beats.items()):
            st, p = proto.read_store("beat", raw), self.r.peers[r]
            cf = st.get("computing_for") if st else None
            out[r] = {"silent_for": now - at, "stale": now - at > 3 * self.t.heartbeat + 1,
                      "step": st.get("step") if st else None,
                      "computing_for": None if cf is None else cf + now - at, "where": f"{p['device']} on {p['host']}"}
        return out

    def _reports(self) -> list[dict]:
        """Valid error reports of the other ranks; a value that is not one is logged (once) and ignored."""
        out = []
        try:
            if not int(self.r.kv.add("errors", 0)):
                return out
            for r in range(1, self.r.world):
                if not self.r.kv.check([f"error/{r}"]):
                    continue
                rep = proto.read_store("report", self.r.kv.get(f"error/{r}"))
                if rep is None or rep["rank"] != r:
                    self.bad_store_values += 1
                    if self.bad_store_values == 1:
                        logger.warning("ignoring a malformed error report under error/%d in the rendezvous store "
                                       "(written by something other than a DualParal rank?)", r)
                    continue
                out.append(rep)
        except Exception:  # noqa: BLE001 - the store is going down with the group
            pass
        return out

    def peer_fault(self, stale: bool = False) -> dict | None:
        """A rank on this host that died without a report, else the earliest report, else (``stale``) a rank whose
        heartbeats stopped."""
        reports = self._reports()
        told = {m["rank"] for m in reports}
        for p in self.r.peers[1:]:
            if p["host"] == self.r.host and p["rank"] not in told and not pid_alive(p["pid"]):
                return {"rank": p["rank"], "device": p["device"], "host": p["host"], "phase": self.r.phase,
                        "type": None, "traceback": "", "message": (
                            f"rank {p['rank']} (pid {p['pid']}) exited without a word: killed (e.g. by the OOM "
                            f"killer or kill -9) or crashed in native code.")}
        if reports:
            return min(reports, key=lambda m: m["time"])
        if stale:
            for r, st in self.peer_states().items():
                if st["stale"]:
                    p = self.r.peers[r]
                    return {"rank": r, "device": p["device"], "host": p["host"], "phase": self.r.phase, "type": None,
                            "traceback": "", "message": (
                                f"rank {r} stopped sending heartbeats {st['silent_for']:.0f} s ago (none within 3 x "
                                f"{self.t.heartbeat:g} s + 1 s; a rank beats from a thread of its own, even while "
                                f"it computes): it was killed, is frozen (SIGSTOP, a debugger, a hung driver call "
                                f"holding the GIL) or is cut off.")}
        return None
