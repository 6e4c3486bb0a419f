"""Faults in a real ComfyUI server (reliability contract, guarantees 4, 5 and 8): Cancel while a worker hangs ends the
prompt within about one block-step + 2 s, ComfyUI exits within 5 s while a pool is still starting, and a graph
without the Loader releases its workers once no prompt needs them. The workers inject their faults through
tests/support/faulty_rank.py (DUALPARAL_RANK_MODULE), as the CPU tests do."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from comfy_harness import COMFY, SKIP_REASON, ComfyServer, alive, build_assets, error_of
from test_e2e import base_graph

pytestmark = [pytest.mark.comfy_live, pytest.mark.skipif(not COMFY, reason=SKIP_REASON)]
SUPPORT = str(Path(__file__).resolve().parents[1] / "support")


def _server(tmp_path_factory, fault: str) -> ComfyServer:
    base = tmp_path_factory.mktemp("comfy_fault")
    env = {"DUALPARAL_RANK_MODULE": "faulty_rank", "PYTHONPATH": SUPPORT, "DUALPARAL_FAULT": fault,
           "DUALPARAL_HEARTBEAT": "0.5"}
    return ComfyServer(base, build_assets(base), env=env).start()


def test_cancel_while_a_worker_hangs_ends_the_prompt_and_the_next_one_works(tmp_path_factory):
    """Rank 1 hangs (alive, heartbeating) at its 3rd block-step of every job; Step timeout 300 s. Cancel must not
    wait for it: the pool is torn down and the prompt ends as interrupted."""
    server = _server(tmp_path_factory, "rank=1,kind=hang,step=3")
    try:
        pid = server.queue(base_graph(length=9, steps=50, seed=3))
        deadline = time.monotonic() + 120
        while not [m for m in server.ws.of_type("progress", pid) if m["node"] == "9" and m["value"] >= 1]:
            assert time.monotonic() < deadline, f"no progress:\n{server.log_tail(3000)}"
            time.sleep(0.05)
        time.sleep(2.0)  # rank 1 is hanging by now (its 3rd block-step)
        workers = server.note_workers()
        t0 = time.monotonic()
        server.post("/interrupt", {})
        h = server.wait(pid, timeout=60)
        took = time.monotonic() - t0
        assert error_of(h).get("kind") == "execution_interrupted", h["status"]
        assert took < 2.0 + 3.0, f"cancel took {took:.1f} s"  # one block-step (ms here) + 2 s, with CPU slack
        end = time.monotonic() + 15
        while alive(workers) and time.monotonic() < end:
            time.sleep(0.1)
        assert alive(workers) == [], "the hung group was not torn down"
    finally:
        server.stop()


def test_comfyui_exits_within_5_s_while_a_pool_is_starting(tmp_path_factory):
    server = _server(tmp_path_factory, "kind=never_ready")
    stopped = False
    try:
        server.queue(base_graph(length=5, steps=2, seed=4))
        deadline = time.monotonic() + 60
        while len(server.note_workers()) < 2:
            assert time.monotonic() < deadline, f"the workers never started:\n{server.log_tail(3000)}"
            time.sleep(0.1)
        time.sleep(1.0)  # into their (never-ending) load
        workers = server.note_workers()
        t0 = time.monotonic()
        server.stop(timeout=30, sig=signal.SIGINT)
        stopped, took = True, time.monotonic() - t0
        assert took < 5.0, f"ComfyUI took {took:.1f} s to exit during a pool start"
        end = time.monotonic() + 30
        while alive(workers) and time.monotonic() < end:
            time.sleep(0.1)
        assert alive(workers) == [], "workers outlived ComfyUI"
    finally:
        if not stopped:
            server.stop()


def _plain_graph(prefix: str) -> dict:
    """A workflow without any DualParal node (what a user queues after deleting the Loader, or from another tab)."""
    return {"5": {"class_type": "EmptyHunyuanLatentVideo",
                  "inputs": {"width": 32, "height": 32, "length": 5, "batch_size": 1}},
            "10": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}}}


def _gone_within(workers: list[int], seconds: float) -> float:
    t0 = time.monotonic()
    while alive(workers) and time.monotonic() - t0 < seconds:
        time.sleep(0.1)
    return time.monotonic() - t0


def test_a_graph_without_the_loader_releases_its_workers_once_no_prompt_needs_them(tmp_path_factory):
    """Guarantee 8, "a deleted Loader releases its pool" (nodes/graph_watch.py has the rule: the last graph queued
    decides). The release waits for a running prompt that uses the workers; a graph with the Loader queued after
    the plain one keeps them; a graph whose Loader was deleted but whose Sampler is left (ComfyUI refuses it)
    releases them too; and a Loader queued again starts new ones."""
    server = _server(tmp_path_factory, "")
    try:
        server.run(base_graph(seed=5))
        workers = server.note_workers()
        assert len(workers) == 2

        # A running prompt with the Loader, a plain graph queued behind it: the running one keeps its workers.
        long_id = server.queue(base_graph(length=9, steps=40, seed=6))
        plain_id = server.queue(_plain_graph("plain_a"))
        h = server.wait(long_id, timeout=180)
        assert h["status"]["status_str"] == "success", error_of(h)
        assert server.note_workers() == workers, "the workers changed under a prompt that used them"
        server.wait(plain_id)
        took = _gone_within(workers, 10.0)
        assert alive(workers) == [], f"a graph without the Loader left its workers alive:\n{server.log_tail(3000)}"
        print(f"released {took:.1f} s after the plain graph ran")

        # The Loader again: new workers. Behind a running prompt, a plain graph and then one with the Loader: the
        # last one queued keeps them.
        server.run(base_graph(seed=7))
        workers = server.note_workers()
        assert len(workers) == 2
        ids = [server.queue(base_graph(length=9, steps=40, seed=8)), server.queue(_plain_graph("plain_b"))]
        server.run(base_graph(seed=10))
        assert all(server.wait(i)["status"]["status_str"] == "success" for i in ids)
        time.sleep(2.0)  # four polls of the watch
        assert server.note_workers() == workers, "a graph with the Loader, queued last, lost its workers"

        # The Loader deleted, its Sampler left dangling: ComfyUI refuses the graph, and the workers go all the same.
        dangling = base_graph(seed=9)
        del dangling["8"]
        with pytest.raises(AssertionError, match="refused"):
            server.queue(dangling)
        _gone_within(workers, 10.0)
        assert alive(workers) == [], "deleting the Loader left its workers alive"
    finally:
        server.stop()
