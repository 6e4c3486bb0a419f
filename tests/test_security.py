"""Holes found under attack (the reliability issue's holes 1 and 2), each with a test that failed on the code before
the one rank program: the rendezvous store is unauthenticated, so nothing read from it may be unpickled, and a local
pool must listen on loopback only."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import signal
import time

import psutil
import pytest
import torch.distributed as dist
from fault_helpers import fault_env, tiny_job, tiny_spec, wait_gone

from dualparal_core import protocol as proto
from dualparal_core.pool import WorkerError, WorkerPool
from dualparal_core.rank.door import MAX_HANDSHAKES

pytestmark = [pytest.mark.dist, pytest.mark.usefixtures("no_leftover_workers")]


class _Evil:
    """Unpickling this creates ``path``: proof that a value read from the store was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _listening(pid: int) -> list[str]:
    return [c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


def test_a_local_pool_listens_on_loopback_only():
    """The store (in this process), rank 0's control port and the ranks' gloo sockets: 127.0.0.1 / ::1 only."""
    p = WorkerPool.start(tiny_spec(2))
    try:
        ips = [ip for pid in [os.getpid(), *p.pids] for ip in _listening(pid)]
        assert ips, "a pool listens somewhere: its rendezvous store and rank 0's control port"
        bad = [ip for ip in ips if ip not in ("127.0.0.1", "::1")]
        assert not bad, f"a local pool listens beyond loopback: {bad}"
    finally:
        p.close()


def _store_of(pool: WorkerPool) -> dist.TCPStore:
    """A client of the group's rendezvous store, as anyone who reaches its port can make one."""
    pid = pool.ready_info[0]["pid"]
    port = int(psutil.Process(pid).environ()["MASTER_PORT"])
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))


@pytest.mark.parametrize("how", ["local", "torchrun"])
def test_store_values_are_never_unpickled_and_the_monitor_survives_junk(tmp_path, how):
    marker = tmp_path / "pwned"
    group = None
    if how == "local":
        p = WorkerPool.start(tiny_spec(2), env=fault_env("kind=slow,delay=0.03", DUALPARAL_HEARTBEAT="0.3"))
    else:
        from test_attach import TINY, Group

        group = Group(tmp_path / "torchrun.log", fault="kind=slow,delay=0.03")
        p = group.attach(TINY)
    try:
        store = _store_of(p)
        junk = [pickle.dumps(_Evil(str(marker))), b"\x80\x04junk", json.dumps({"kind": "report", "rank": "1"}).encode(),
                json.dumps([1, 2, 3]).encode(), b"\xff" * 70000]
        for i, value in enumerate(junk):
            for key in ("dualparal/0/error/1", "dualparal/0//error/1"):  # today's key and the old double slash
                store.set(key, value)
            for key in ("dualparal/0/errors", "dualparal/0//errors"):
                store.add(key, 1)
            store.set("dualparal/0/hb/1", value if i else b"{}")  # a heartbeat that is not one
            time.sleep(0.5)  # several monitor rounds (0.2 s) read it
        assert not marker.exists(), "a pickle written into the rendezvous store ran code on rank 0"
        assert p.alive, "junk in the store took the group down"
        # the monitor still names a real fault: kill rank 1 mid-job
        pids, killed = [i["pid"] for i in p.ready_info], []

        def progress(done, total, preview):
            if done == 3 and not killed:
                os.kill(pids[1], signal.SIGKILL)
                killed.append(time.monotonic())

        with pytest.raises(WorkerError) as e:
            p.generate(tiny_job(steps=60), on_progress=progress)
        assert time.monotonic() - killed[0] < 10 and e.value.rank == 1, str(e.value)
        assert wait_gone(pids, 30) == []
    finally:
        p.close()
        if group is not None:
            group.stop()


def test_store_values_round_trip_and_reject_what_is_not_ours():
    report = {"rank": 1, "device": "cuda:1", "host": "h", "phase": "sample", "type": "ValueError",
              "message": "boom", "traceback": "Traceback ...", "time": 1.5}
    assert proto.read_store("report", proto.write_store("report", report)) == report
    beat = {"n": 3, "phase": "sample", "step": 7, "computing_for": None}
    assert proto.read_store("beat", proto.write_store("beat", beat)) == beat
    for raw in (pickle.dumps(report), b"", b"null", json.dumps({**report, "kind": "report", "extra": 1}).encode(),
                json.dumps({**report, "kind": "report", "rank": True}).encode(),
                json.dumps({**report, "kind": "beat"}).encode()):
        assert proto.read_store("report", raw) is None, raw
    with pytest.raises(ValueError, match="not a valid report"):
        proto.write_store("report", {"rank": "one"})


def test_silent_connections_cost_rank_0_no_thread_pile_and_no_stall():
    """Hole 7: 300 connections that never authenticate. Rank 0 authenticates at most a few at once (the rest are
    closed at once) and each attempt ends within Timeouts.connect; the pool keeps working meanwhile."""
    import socket

    p = WorkerPool.start(tiny_spec(1))
    socks = []
    try:
        rank0 = psutil.Process(p.pids[0])
        threads_before = rank0.num_threads()
        port = next(c.laddr.port for c in rank0.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
                    and c.laddr.port != p.ready_info[0]["store_port"])
        for _ in range(300):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                pass  # refused or reset: also fine, what matters is rank 0's state
        time.sleep(1.0)
        # each handshake in flight is a thread and its timer; before the bound: ~2 per connection (600 here)
        assert rank0.num_threads() <= threads_before + 2 * MAX_HANDSHAKES + 4, (threads_before, rank0.num_threads())
        t0 = time.monotonic()
        job = tiny_job()
        assert p.generate(job).shape == job.shape and time.monotonic() - t0 < 30
    finally:
        for s in socks:
            s.close()
        p.close()


def test_the_handshake_gives_a_keyless_listener_no_mac_and_checks_both_sides():
    """Reliability hole 5: a listener that does not know the key (a port a shared workflow names) receives our nonce
    and nothing derived from the key; with the key, both sides prove it over both nonces; a wrong proof is refused."""
    import socket
    import threading
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Connection

    from dualparal_core.channel import NONCE, authenticate

    def tcp_pair():
        with socket.create_server(("127.0.0.1", 0)) as srv:
            a = socket.create_connection(srv.getsockname())
            b, _ = srv.accept()
        return a, b

    # a fake server: records everything the client sends, answers with a made-up proof
    a, b = tcp_pair()
    got = []

    def fake_server():
        c = Connection(b.detach())
        got.append(c.recv_bytes())
        c.send_bytes(b"\0" * NONCE + b"\1" * 32)
        try:
            while c.poll(1.0):
                got.append(c.recv_bytes())
        except (EOFError, OSError):
            pass

    t = threading.Thread(target=fake_server)
    t.start()
    with pytest.raises(AuthenticationError):
        authenticate(a, b"the-key", server=False, timeout=5)
    t.join(5)
    assert [len(m) for m in got] == [NONCE], "the client sent more than its nonce to a keyless listener"

    def server(sock, result):
        try:
            result["conn"] = authenticate(sock, b"k1", server=True, timeout=5)
        except Exception as exc:  # noqa: BLE001 - inspected below
            result["error"] = exc

    for client_key, ok in ((b"k1", True), (b"k2", False)):
        a, b = tcp_pair()
        result = {}
        t = threading.Thread(target=server, args=(b, result))
        t.start()
        if ok:
            conn = authenticate(a, client_key, server=False, timeout=5)
            t.join(5)
            conn.send_bytes(b"hello")
            assert result["conn"].recv_bytes() == b"hello"
            conn.close()
            result["conn"].close()
        else:
            with pytest.raises(AuthenticationError):
                authenticate(a, client_key, server=False, timeout=5)
            t.join(5)
            assert isinstance(result.get("error"), (AuthenticationError, EOFError, OSError))


def test_attaching_outside_the_allow_list_contacts_nothing(monkeypatch):
    """Reliability hole 5: a workflow's devices=tcp://HOST:PORT is refused before any connection unless the address
    is loopback or listed in DUALPARAL_ATTACH_ALLOW; the same sentence whatever listens there."""
    import socket

    from dualparal_core.channel import check_allowed
    from dualparal_core.protocol import AttachError

    check_allowed("127.0.0.1", 9)
    check_allowed("localhost", 9)
    monkeypatch.setenv("DUALPARAL_ATTACH_ALLOW", "127.0.0.1")
    calls = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(OSError))
    messages = set()
    for host in ("192.0.2.7", "203.0.113.9", "example.invalid"):  # documentation ranges and a name that resolves nowhere
        with pytest.raises(AttachError, match="DUALPARAL_ATTACH_ALLOW") as e:
            WorkerPool.attach(f"tcp://{host}:29600", authkey="k")
        messages.add(str(e.value).replace(host, "HOST"))
    assert calls == [] and len(messages) == 1
    monkeypatch.setenv("DUALPARAL_ATTACH_ALLOW", "192.0.2.0/24")
    check_allowed("192.0.2.7", 29600)  # listed: allowed (not contacted here)
    monkeypatch.setenv("DUALPARAL_ATTACH_ALLOW", "not-an-address")
    with pytest.raises(AttachError, match="not an address or network"):
        check_allowed("192.0.2.7", 29600)
