"""Liveness of a busy or idle pool (research/reliability.md §0 items 2 and 5): a frozen rank (SIGSTOP: no heartbeat
from its side thread either) is named from the heartbeat stream long before Timeouts.step; Cancel ends a prompt
within one block-step + 2 s even when a rank does not answer; a rank that dies while the pool is idle is noticed;
the timeouts are knobs a user can set (one documented environment variable each)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from fault_helpers import fault_env, tiny_job, tiny_spec, wait_gone, worker_procs

from dualparal_core.client.launch import Launch
from dualparal_core.config import Timeouts
from dualparal_core.pool import PoolCancelled, WorkerError, WorkerPool

SLOW = "kind=slow,delay=0.03"


pytestmark = pytest.mark.usefixtures("no_leftover_workers")


def _start(timeouts: Timeouts, fault: str = SLOW) -> WorkerPool:
    return WorkerPool.start(tiny_spec(2), timeouts, env=fault_env(fault))


def _resume(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


@pytest.mark.dist
@pytest.mark.parametrize("victim", [1, 0])
def test_a_frozen_rank_is_named_from_the_heartbeats_long_before_the_step_timeout(victim):
    """Rank 1 frozen: rank 0's heartbeats mark it stale. Rank 0 frozen: its heartbeats stop altogether. Either way
    the detection comes from the heartbeat stream (3 x 0.3 s + 1 s), not from Timeouts.step (300 s)."""
    p = _start(Timeouts(step=300.0, heartbeat=0.3))
    pids, stopped = p.pids, []

    def progress(done, total, preview):
        if done == 3 and not stopped:
            os.kill(pids[victim], signal.SIGSTOP)
            stopped.append(time.monotonic())

    try:
        with pytest.raises(WorkerError) as e:
            p.generate(tiny_job(steps=200), on_progress=progress)
        took = time.monotonic() - stopped[0]
    finally:
        _resume(pids)
        p.close()
    assert took < 30, took
    assert e.value.rank == victim and f"rank {victim}" in str(e.value), str(e.value)
    assert "heartbeat" in str(e.value) and "stopped" in str(e.value)
    assert not p.alive and wait_gone(pids, 10) == []
    print(f"frozen rank {victim} named {took:.1f} s after SIGSTOP")


@pytest.mark.dist
def test_cancel_ends_the_prompt_within_a_block_step_and_2_s_when_a_rank_does_not_answer():
    """Heartbeats at the default 2 s (stale after 7 s): the cancel, not the frozen-rank detection, must end it."""
    p = _start(Timeouts(step=300.0))
    pids, marks, asked = p.pids, [], []

    def progress(done, total, preview):
        marks.append(time.monotonic())
        if done == 4 and not asked:
            os.kill(pids[1], signal.SIGSTOP)
            asked.append(time.monotonic())

    try:
        with pytest.raises(PoolCancelled, match="did not stop"):
            p.generate(tiny_job(steps=200), on_progress=progress, should_cancel=lambda: bool(asked))
        took = time.monotonic() - asked[0]
    finally:
        _resume(pids)
    # one block-step through the pipeline: rank 0 collects the 3 block-steps in flight (2 ranks + 1) before it stops,
    # and progress events come one stage apart
    block_step = 3 * max(b - a for a, b in zip(marks, marks[1:]))
    assert took < block_step + 2.0, (took, block_step)
    assert not p.alive and wait_gone(pids, 3) == []  # a local pool is torn down (the next prompt starts one)
    assert p._launch.closed and not os.path.exists(p.runtime_dir)
    print(f"cancel ended the prompt {took:.2f} s after it was asked (one block-step here: {block_step:.3f} s)")


@pytest.mark.dist
def test_a_rank_that_dies_while_the_pool_is_idle_is_noticed_and_named():
    p = _start(Timeouts(), "")
    pids = p.pids
    try:
        assert p.alive
        os.kill(pids[1], signal.SIGKILL)
        end = time.monotonic() + 5
        while p.alive and time.monotonic() < end:
            time.sleep(0.05)
        assert not p.alive, "the death of an idle rank went unnoticed"
        with pytest.raises(WorkerError) as e:
            p.generate(tiny_job())
    finally:
        p.close()
    assert e.value.rank == 1 and "rank 1" in str(e.value) and "SIGKILL" in str(e.value), str(e.value)
    assert "start a new one" in str(e.value)
    assert wait_gone(pids, 5) == []


# ---------------------------------------------------------------------------------------------- knobs
def test_timeouts_are_set_from_documented_environment_variables():
    env = {"DUALPARAL_STEP_TIMEOUT": "900", "DUALPARAL_STARTUP_TIMEOUT": "1800", "DUALPARAL_HEARTBEAT": "1.5"}
    t = Timeouts.from_env(env)
    assert (t.step, t.startup, t.heartbeat) == (900.0, 1800.0, 1.5)
    assert Timeouts.from_env({}) == Timeouts()
    mine = Timeouts(step=3.0)  # what a caller set explicitly wins over the environment; the rest comes from it
    assert Timeouts.from_env(env, base=mine) == Timeouts(step=3.0, startup=1800.0, heartbeat=1.5)
    for bad in ("ten", "0", "-5", "nan"):
        with pytest.raises(ValueError, match=f"DUALPARAL_STEP_TIMEOUT={bad!r}.*seconds"):
            Timeouts.from_env({"DUALPARAL_STEP_TIMEOUT": bad})


def test_timeout_errors_name_the_knob_that_exists():
    launch = Launch(tiny_spec(1), Timeouts(startup=4.0))
    with pytest.raises(TimeoutError, match=r"Timeouts\.startup=4 s.*DUALPARAL_STARTUP_TIMEOUT"):
        launch.check_startup_deadline(time.monotonic() - 10, "joining the group")
    from types import SimpleNamespace

    from dualparal_core.client.sample import SampleOp

    op = SampleOp(tiny_job(), None)
    op.s = SimpleNamespace(timeouts=Timeouts(step=3.0), launch=None)
    err = op.hang(4.0, None)
    assert "Timeouts.step=3 s" in str(err) and "DUALPARAL_STEP_TIMEOUT" in str(err)


# ---------------------------------------------------------------------------------------------- leftovers
def test_the_stale_dir_sweep_removes_only_dead_pools_dirs_of_ours(tmp_path, monkeypatch):
    """Only a dir named dualparal-PID-..., holding the owner mark a pool writes (this host, this pid namespace,
    the same PID), whose PID is dead: never another instance's live dir, nor a look-alike that is not ours."""
    import json
    import subprocess
    import sys
    import tempfile

    from dualparal_core.client import launch as launch_mod

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = gone.pid

    def make(name: str, mark: dict | None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "rank0.log").write_text("a log\n")
        if mark is not None:
            (d / launch_mod.OWNER_FILE).write_text(json.dumps(mark))
        return d

    ours = launch_mod.owner_mark(dead)
    swept = make(f"dualparal-{dead}-abcd1234", ours)
    live = make("dualparal-1-abcd1234", launch_mod.owner_mark(1))  # pid 1 lives: another instance's pool
    lookalike = make(f"dualparal-{dead}-backup99", None)  # a dead pid in the name, but nothing says it is ours
    other_ns = make(f"dualparal-{dead}-ns000000", {**ours, "pidns": "pid:[1]"})  # another container's pids
    wrong_pid = make(f"dualparal-{dead}-pid00000", launch_mod.owner_mark(dead + 1))
    launch_mod.sweep_stale_dirs()
    assert not swept.exists()
    for kept in (live, lookalike, other_ns, wrong_pid):
        assert (kept / "rank0.log").exists(), kept.name


@pytest.mark.dist
def test_a_rank_frozen_while_the_pool_loads_is_named_long_before_the_startup_timeout():
    """Hole 3 during load: rank 1 loads forever (alive) and is then frozen (SIGSTOP); the start fails naming it
    from the heartbeats within seconds, not at Timeouts.startup (300 s here)."""
    import threading as _threading

    box: dict = {}

    def start():
        try:
            box["pool"] = WorkerPool.start(tiny_spec(2), Timeouts(startup=300.0, heartbeat=0.3),
                                            env=fault_env("rank=1,kind=never_ready", DUALPARAL_HEARTBEAT="0.3"))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            box["error"] = exc

    t = _threading.Thread(target=start)
    t.start()
    victim, end = None, time.monotonic() + 60
    while victim is None and time.monotonic() < end:
        for p in worker_procs():
            try:
                if p.environ().get("RANK") == "1" and "[DualParal]" in open(
                        os.path.join(p.cwd(), "rank1.log")).read():
                    victim = p
            except (OSError, psutil.Error):
                pass
        time.sleep(0.2)
    assert victim is not None, "rank 1 never started"
    time.sleep(1.0)  # inside its never-ending load
    victim.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        t.join(60)
        took = time.monotonic() - t0
        assert isinstance(box.get("error"), WorkerError), box
        assert box["error"].rank == 1 and "heartbeat" in str(box["error"]), str(box["error"])
        assert took < 15, took
    finally:
        try:
            victim.send_signal(signal.SIGCONT)
            victim.kill()
        except psutil.Error:
            pass
        if "pool" in box:
            box["pool"].close()


@pytest.mark.dist
def test_a_slow_parent_is_not_taken_for_a_frozen_rank_0():
    """The parent's own pauses (a slow progress callback: ComfyUI's preview, a video writer, a starved CPU) are not
    rank 0's silence: its heartbeats wait unread in the socket meanwhile. Before, the parent named rank 0 frozen
    (3 x 0.3 s + 1 s here) and closed a healthy pool."""
    import torch
    from fault_helpers import reference

    p = WorkerPool.start(tiny_spec(2), Timeouts(heartbeat=0.3), env={"DUALPARAL_HEARTBEAT": "0.3"})
    try:
        paused: list[int] = []

        def on_progress(done, total, x0):
            if not paused:
                paused.append(done)
                time.sleep(p.session.stale_after + 1.0)

        job = tiny_job("euler")
        out = p.generate(job, on_progress=on_progress)
        assert paused and torch.equal(out, reference(job))
        assert p.alive
    finally:
        p.close()
