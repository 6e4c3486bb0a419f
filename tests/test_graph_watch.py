"""The rule that releases a deleted Loader's workers (nodes/graph_watch.py) against a fake prompt queue: the last
graph queued decides, a prompt that can use the workers (running or pending) always keeps them, and a pool acquired
during a release waits for it. The real-ComfyUI test is tests/comfy_live/test_faults_e2e.py."""

from __future__ import annotations

import threading
import time

from test_nodes_unit import _pack_module

G = _pack_module("graph_watch")
LOADER = {"8": {"class_type": "DualParalLoader", "inputs": {}}, "9": {"class_type": "DualParalSampler"}}
PLAIN = {"5": {"class_type": "EmptyLatentImage", "inputs": {}}, "10": {"class_type": "SaveLatent"}}


class Queue:
    """ComfyUI's running + pending graphs, and the releases asked for."""

    def __init__(self):
        self.graphs: list[dict] = []
        self.released: list[str] = []

    def release(self, reason: str) -> int:
        self.released.append(reason)
        return 1


def _watch(q: Queue, poll_s: float = 3600.0):
    return G.GraphWatch(lambda: list(q.graphs), q.release, poll_s=poll_s)


def test_the_loader_is_found_by_class_type_in_any_graph():
    assert G.LOADER_NODE == "DualParalLoader"
    assert G.uses_loader(LOADER) and G.uses_loader({"12:3": {"class_type": "DualParalLoader"}})  # a subgraph's
    assert not G.uses_loader(PLAIN) and not G.uses_loader({}) and not G.uses_loader(None)
    assert not G.uses_loader({"1": "DualParalLoader", "2": {"inputs": {}}})  # junk is no Loader
    assert not G.uses_loader({"9": {"class_type": "DualParalSampler"}})  # a dangling Sampler holds no pool


def test_a_plain_graph_waits_for_the_running_loader_graph_then_releases_once():
    q = Queue()
    w = _watch(q)
    q.graphs = [LOADER]  # running
    body = {"prompt": PLAIN, "client_id": "x"}
    assert w.on_prompt(body) is body  # the handler hands ComfyUI the request unchanged
    q.graphs = [LOADER, PLAIN]
    assert not w.poll() and q.released == [] and w.armed
    q.graphs = [PLAIN]  # the Loader's prompt finished; the plain one runs
    assert w.poll() and len(q.released) == 1 and "no DualParal Loader" in q.released[0]
    assert not w.armed and not w.poll() and len(q.released) == 1


def test_a_pending_loader_graph_keeps_the_workers():
    q = Queue()
    w = _watch(q)
    w.on_prompt({"prompt": PLAIN})
    q.graphs = [PLAIN, LOADER]  # queued before this one by another tab, say: it will need them
    assert not w.poll() and q.released == []


def test_a_loader_graph_queued_last_disarms_the_watch():
    q = Queue()
    w = _watch(q)
    q.graphs = [LOADER]
    w.on_prompt({"prompt": PLAIN})
    w.on_prompt({"prompt": LOADER})
    q.graphs = []  # everything ran
    assert not w.armed and not w.poll() and q.released == []


def test_requests_without_a_graph_change_nothing():
    q = Queue()
    w = _watch(q)
    for body in ({}, {"prompt": None}, {"prompt": ["x"]}, "junk", None):
        assert w.on_prompt(body) is body
    assert not w.armed and not w.poll() and q.released == []


def test_an_unreadable_queue_keeps_the_workers(caplog):
    q = Queue()
    w = G.GraphWatch(lambda: 1 / 0, q.release, poll_s=3600.0)
    w.on_prompt({"prompt": PLAIN})
    assert not w.poll() and q.released == [] and not w.armed
    assert "the workers are kept" in caplog.text


def test_the_thread_releases_within_its_poll_and_ends():
    q = Queue()
    q.graphs = [LOADER]
    w = _watch(q, poll_s=0.02)
    w.on_prompt({"prompt": PLAIN})
    time.sleep(0.2)
    assert q.released == [] and w.armed  # still running the Loader's prompt
    q.graphs = []
    end = time.monotonic() + 5
    while w._thread is not None and time.monotonic() < end:
        time.sleep(0.01)
    assert len(q.released) == 1 and w._thread is None  # released once, and no thread is left polling


def test_an_acquire_during_a_release_waits_for_it_to_end():
    """The release is decided from a queue snapshot; a Loader prompt ComfyUI takes right after must not get a pool
    that the release then closes: its acquire passes the barrier only once the release has ended."""
    entered, go, order = threading.Event(), threading.Event(), []

    def slow_release(reason: str) -> None:
        entered.set()
        go.wait(5)
        order.append("released")

    w = G.GraphWatch(lambda: [], slow_release, poll_s=3600.0)
    w.on_prompt({"prompt": PLAIN})
    t = threading.Thread(target=w.poll)
    t.start()
    assert entered.wait(5)
    acq = threading.Thread(target=lambda: (w.barrier(), order.append("acquired")))
    acq.start()
    time.sleep(0.1)
    assert order == []  # the acquire waits
    go.set()
    t.join(5)
    acq.join(5)
    assert order == ["released", "acquired"]
