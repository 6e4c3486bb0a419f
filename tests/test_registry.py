"""The pool registry of the node layer (nodes/registry.py) against fake pools, and once against a real slow start:
ComfyUI's exit never waits for a start in progress, inputs are checked before any pool is stopped, and two Loaders
that take turns on the same devices are called out."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from fault_helpers import fault_env, tiny_spec, wait_gone, worker_procs
from test_nodes_unit import FakePool, R, _spec

from dualparal_core.config import Timeouts
from dualparal_core.protocol import PoolCancelled


class SlowStart:
    """A starter that takes ``seconds`` unless its should_abort turns true first (then it raises, as
    WorkerPool.start does after tearing its ranks down)."""

    def __init__(self, seconds: float = 30.0, obey: bool = True, fast_first: bool = False):
        self.seconds, self.obey, self.began, self.release = seconds, obey, threading.Event(), threading.Event()
        self.aborted, self.fast = False, fast_first

    def __call__(self, spec, should_abort=None, **kw):
        if self.fast:
            self.fast = False
            return FakePool(spec, **kw)
        self.began.set()
        end = time.monotonic() + self.seconds
        while time.monotonic() < end and not self.release.is_set():
            if self.obey and should_abort is not None and should_abort():
                self.aborted = True
                raise PoolCancelled("starting the pool was interrupted; no worker is left running.")
            time.sleep(0.01)
        return FakePool(spec, **kw)


def _in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - looked at by the test
            out["error"] = exc
        out["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_close_all_does_not_wait_for_a_start_in_progress():
    start = SlowStart(fast_first=True)
    reg = R.PoolRegistry(start)
    old = reg.acquire(("old",), _spec("cuda:2"))  # a live pool on other devices: closed at once
    starting, res = _in_thread(reg.acquire, ("a",), _spec("cuda:0", "cuda:1"), should_abort=lambda: False)
    assert start.began.wait(5)
    t0 = time.monotonic()
    closing, done = _in_thread(reg.close_all, "ComfyUI is exiting")
    closing.join(5)
    took = time.monotonic() - t0
    starting.join(5)  # the start notices by itself (its should_abort turned true)
    start.release.set()
    assert took < 0.5, f"close_all waited {took:.1f} s for a start in progress"
    assert done["value"] == 1 and old.closed == 1
    assert start.aborted and isinstance(res["error"], PoolCancelled) and res["at"] - t0 < 1.0
    assert reg.pools == [] and len(reg) == 0
    again = reg.acquire(("a",), _spec("cuda:0", "cuda:1"))  # the registry works on after close_all (Unload models)
    assert again.alive and reg.get(("a",)) is again


def test_a_start_that_ends_after_close_all_is_closed_not_kept():
    start = SlowStart(obey=False)  # ignores should_abort: the start completes just after close_all
    reg = R.PoolRegistry(start)
    starting, res = _in_thread(reg.acquire, ("a",), _spec("cpu"))
    assert start.began.wait(5)
    assert reg.close_all("ComfyUI unloaded all models") == 0
    start.release.set()
    starting.join(5)
    assert isinstance(res["error"], PoolCancelled)
    assert FakePool.started[-1].closed == 1 and reg.pools == []


def test_inputs_are_checked_before_any_pool_is_stopped():
    checked = []

    def check(spec):
        checked.append(spec)
        if spec.dtype == "fp16":
            raise ValueError("dtype='fp16' is refused by this check")

    reg = R.PoolRegistry(FakePool, check=check)
    a = reg.acquire(("a",), _spec("cuda:0", "cuda:1"))
    bad = _spec("cuda:0", "cuda:1")
    object.__setattr__(bad, "dtype", "fp16")
    with pytest.raises(ValueError, match="fp16"):
        reg.acquire(("b",), bad)
    assert a.alive and a.closed == 0 and reg.get(("a",)) is a  # the healthy pool was not stopped
    assert reg.acquire(("a",), _spec("cuda:0", "cuda:1")) is a and len(checked) == 3


def test_two_loaders_taking_turns_on_the_same_devices_are_called_out(caplog):
    reg = R.PoolRegistry(FakePool)
    caplog.set_level(logging.INFO, logger="DualParal")
    reg.acquire(("a",), _spec("cuda:0", "cuda:1"))
    reg.acquire(("b",), _spec("cuda:1"))
    assert "take turns" not in caplog.text  # one replacement is a change of settings, not a tug of war
    reg.acquire(("a",), _spec("cuda:0", "cuda:1"))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, caplog.text
    text = warned[0].getMessage()
    assert "two DualParal Loaders" in text and "cuda:1" in text and "every prompt" in text


@pytest.mark.dist
def test_close_all_returns_at_once_while_a_real_pool_is_still_starting():
    from dualparal_core.pool import WorkerPool

    def starter(spec, **kw):
        return WorkerPool.start(spec, Timeouts(startup=60.0), env=fault_env("kind=never_ready"), **kw)

    reg = R.PoolRegistry(starter)
    starting, res = _in_thread(reg.acquire, ("a",), tiny_spec(2), should_abort=lambda: False)
    end = time.monotonic() + 60
    while len(worker_procs()) < 2 and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(1.0)  # into their startup (rank 0 never gets ready)
    pids = [p.pid for p in worker_procs()]
    assert len(pids) == 2
    t0 = time.monotonic()
    closing, _ = _in_thread(reg.close_all, "ComfyUI is exiting")
    closing.join(10)
    took = time.monotonic() - t0
    starting.join(30)
    assert took < 1.0, f"close_all waited {took:.1f} s for the start"
    assert isinstance(res.get("error"), PoolCancelled), res
    assert res["at"] - t0 < 5.0 and wait_gone(pids, 5) == []
    print(f"close_all returned in {took:.3f} s; the start ended {res['at'] - t0:.2f} s later, ranks gone")
