"""Fault contract of the worker pool (research/reliability.md §0/§3): faults injected with DUALPARAL_FAULT or from
outside, each answered by a clear error, no process left behind, and a usable pool afterwards."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from fault_helpers import SUPPORT, alive, fault_env, reference, tiny_job, tiny_spec, wait_gone, worker_procs

from dualparal_core import pool as pool_mod
from dualparal_core.config import ModelSource, PoolSpec, Timeouts, WanConfig
from dualparal_core.pool import PoolCancelled, WorkerError, WorkerPool
from dualparal_core.rank.lead import Lead

sys.path.insert(0, SUPPORT)
from faulty_rank import Fault, parse_faults  # noqa: E402

HELPER = str(Path(__file__).with_name("fault_helpers.py"))
SLOW = "kind=slow,delay=0.03"


pytestmark = pytest.mark.usefixtures("no_leftover_workers")


def _start(world: int = 2, fault: str = "", timeouts: Timeouts = Timeouts(), **env) -> WorkerPool:  # noqa: B008
    return WorkerPool.start(tiny_spec(world), timeouts, env=fault_env(fault, **env))


@pytest.fixture(scope="module")
def pool():
    """One healthy 2-rank pool with slowed block-steps, started while the classic rendezvous port is taken."""
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 29500))
        blocker.listen()
    except OSError:
        pass  # someone else holds 29500: it is in use either way
    try:
        p = _start(2, SLOW, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
        yield p
        p.close()
    finally:
        blocker.close()


# ---------------------------------------------------------------------------------------------- unit
def test_fault_injection_is_inert_unless_set():
    assert parse_faults(None, 0) == [] and parse_faults("", 1) == []
    assert parse_faults("rank=1,kind=raise,step=3", 0) == []
    assert parse_faults("rank=1,kind=raise,step=3", 1) == [Fault("raise", "sample", 3, 1)]
    assert [f.kind for f in parse_faults("kind=slow;rank=0,kind=never_ready", 0)] == ["slow", "never_ready"]
    with pytest.raises(ValueError, match="kind"):
        parse_faults("kind=explode", 0)


def test_a_cancel_after_the_final_block_step_lets_the_job_finish():
    """By then the other ranks have finished: a stop header would sit unread and rank 0 would block on it."""
    class Conn:
        def __init__(self, *msgs):
            self.msgs = [pickle.dumps(m) for m in msgs]

        def poll(self, timeout=0):
            return bool(self.msgs)

        def recv_bytes(self):
            return self.msgs.pop(0)

    w = Lead(SimpleNamespace(timeouts=Timeouts()))
    w.conn = Conn({"op": "cancel", "job": 6}, {"op": "cancel", "job": 7})
    w.begin(7, 10)
    w.done = 10
    assert w.cancelled() is False and w.cancel  # seen, but the job is complete
    w.done = 9
    assert w.cancelled() is True
    w.conn, w.cancel = Conn({"op": "cancel", "job": 6}), False
    assert w.cancelled() is False  # another job's cancel is ignored


def test_bad_input_is_refused_before_any_spawn(monkeypatch):
    def no_spawn(*a, **k):
        raise AssertionError("a worker was spawned for invalid input")

    monkeypatch.setattr(pool_mod._Spawner, "popen", no_spawn)
    with pytest.raises(ValueError, match="at most 3"):
        WorkerPool.start(tiny_spec(4))
    with pytest.raises(ValueError, match="does not exist"):
        WorkerPool.start(PoolSpec(ModelSource(path="/nonexistent/wan.safetensors"), devices=("cpu", "cpu")))
    if torch.cuda.device_count() <= 7:
        spec = PoolSpec(ModelSource(random_config=WanConfig.tiny()), devices=("cuda:7",))
        with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES") as e:
            WorkerPool.start(spec)
        assert f"see {torch.cuda.device_count()} CUDA device" in str(e.value) and "cuda:7" in str(e.value)


# ---------------------------------------------------------------------------------------------- healthy pool
@pytest.mark.dist
def test_ready_info_and_clean_worker_interpreter(pool):
    info = pool.ready_info
    assert [i["rank"] for i in info] == [0, 1] and [i["pid"] for i in info] == pool.pids
    assert all(i["host_modules"] == [] for i in info), "a worker imported ComfyUI modules"
    assert all(i["load_count"] == 1 and i["world"] == 2 for i in info)
    assert info[0]["layers"] == (0, 2) and info[1]["layers"] == (2, 3)
    assert all(i["attention"] == "sdpa" for i in info)  # the spec's "auto" on CPU ranks
    assert info[0]["store_port"] not in (None, 29500)  # a free port, never the one already taken
    assert len({i["pool_id"] for i in info}) == 1
    assert os.stat(pool.runtime_dir).st_mode & 0o777 == 0o700


@pytest.mark.dist
def test_job_that_does_not_fit_is_refused_before_any_work(pool):
    before = pool.session.job_id
    with pytest.raises(ValueError, match="16"):
        pool.generate(tiny_job(channels=12))
    bad = tiny_job()
    bad.cond = torch.zeros(1, 5, 32)
    with pytest.raises(ValueError, match="64"):
        pool.generate(bad)
    assert pool.session.job_id == before and pool.alive


@pytest.mark.dist
def test_progress_is_monotonic_and_previews_arrive(pool):
    seen = []
    job = tiny_job("euler")
    job.preview = True
    pool.generate(job, on_progress=lambda done, total, preview: seen.append((done, total, preview)))
    assert [d for d, _, _ in seen] == list(range(1, job.num_block_steps + 1))
    assert all(t == job.num_block_steps for _, t, _ in seen)
    previews = [p for _, _, p in seen if p is not None]
    assert previews and previews[-1].shape[:2] == (1, 16)  # the last block-step always carries its preview


@pytest.mark.dist
def test_cancel_mid_job_then_the_next_job_is_correct(pool):
    pids, asked = pool.pids, []

    def should_cancel():
        return bool(asked)

    def progress(done, total, preview):
        if done == 5 and not asked:
            asked.append(time.monotonic())

    with pytest.raises(PoolCancelled):
        pool.generate(tiny_job(steps=30), on_progress=progress, should_cancel=should_cancel)
    took = time.monotonic() - asked[0]
    assert took < 1.0, f"cancel took {took:.2f} s (a block-step here is ~0.03 s)"
    assert pool.alive and pool.pids == pids
    job = tiny_job()
    assert torch.equal(pool.generate(job), reference(job))


@pytest.mark.dist
def test_a_raising_callback_stops_the_job_and_keeps_the_pool(pool):
    class Interrupted(Exception):
        pass

    def progress(done, total, preview):
        if done == 3:
            raise Interrupted()

    with pytest.raises(Interrupted):
        pool.generate(tiny_job(steps=30), on_progress=progress)
    assert pool.alive
    job = tiny_job(sampler="dpmpp_2m")
    assert torch.equal(pool.generate(job), reference(job))


# ---------------------------------------------------------------------------------------------- faults
@pytest.mark.dist
def test_kill_9_of_a_rank_mid_job_is_named_and_a_new_pool_works():
    p = _start(2, SLOW)
    pids, killed = p.pids, []

    def progress(done, total, preview):
        if done == 3 and not killed:
            os.kill(pids[1], signal.SIGKILL)
            killed.append(time.monotonic())

    try:
        with pytest.raises(WorkerError) as e:
            p.generate(tiny_job(steps=60), on_progress=progress)
    finally:
        p.close()
    assert time.monotonic() - killed[0] < 10
    assert e.value.rank == 1 and "rank 1" in str(e.value) and "SIGKILL" in str(e.value)
    assert not p.alive and wait_gone(pids, 5) == []
    with pytest.raises(WorkerError, match="start a new one"):
        p.generate(tiny_job())  # fail-stop: a faulted pool refuses at once
    q = _start(2)
    try:
        job = tiny_job()
        assert torch.equal(q.generate(job), reference(job))
    finally:
        q.close()


@pytest.mark.dist
def test_an_exception_keeps_rank_phase_message_and_traceback():
    p = _start(2, "rank=1,kind=raise,step=3")
    try:
        with pytest.raises(WorkerError) as e:
            p.generate(tiny_job())
    finally:
        p.close()
    text = str(e.value)
    assert e.value.rank == 1 and e.value.phase == "sample" and e.value.exc_type == "ValueError"
    for part in ("rank 1", "sample", "ValueError: boom-42", "Traceback", "rank/program.py"):
        assert part in text
    assert wait_gone(p.pids, 5) == []


@pytest.mark.dist
def test_a_hung_rank_is_detected_after_the_step_timeout():
    p = _start(2, "rank=1,kind=hang,step=3", Timeouts(step=3.0), DUALPARAL_HEARTBEAT="0.5")
    t0 = time.monotonic()
    try:
        with pytest.raises(WorkerError) as e:
            p.generate(tiny_job())
    finally:
        took = time.monotonic() - t0
        p.close()
    assert 0.9 * 3.0 <= took < 3.0 + 10, took
    assert e.value.rank == 1 and "Timeouts.step" in str(e.value) and "block-step 3" in str(e.value)
    assert wait_gone(p.pids, 5) == []


@pytest.mark.dist
def test_an_oom_arrives_as_torch_out_of_memory():
    p = _start(2, "rank=1,kind=oom,step=2")
    try:
        with pytest.raises(torch.OutOfMemoryError, match="rank 1") as e:
            p.generate(tiny_job())
    finally:
        p.close()
    assert isinstance(e.value.__cause__, WorkerError) and not p.alive


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["idle", "job", "start"])
def test_workers_exit_when_their_parent_is_killed(mode, tmp_path, monkeypatch):
    helper = subprocess.Popen([sys.executable, HELPER, mode], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(tmp_path)})
    parent = psutil.Process(helper.pid)
    try:
        if mode == "start":
            end = time.monotonic() + 60
            while len(worker_procs(parent)) < 2 and time.monotonic() < end:
                time.sleep(0.1)
            time.sleep(1.0)  # let them get into their startup
        else:
            want = "RUNNING" if mode == "job" else "READY"
            line = ""
            while not line.startswith(want):
                line = helper.stdout.readline()
                assert line, "the helper exited before its pool was up"
        pids = [w.pid for w in worker_procs(parent)]
        assert len(pids) == 2
    finally:
        helper.kill()
        helper.wait()
        helper.stdout.close()
    assert wait_gone(pids, 30) == [], f"workers survived their parent ({mode})"
    assert len(list(tmp_path.glob("dualparal-*"))) == 1  # the dead parent's logs: swept by the next start
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pool_mod._sweep_stale_dirs()
    assert list(tmp_path.glob("dualparal-*")) == []


@pytest.mark.dist
def test_a_worker_that_never_gets_ready_times_out_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"Timeouts\.startup=4 s"):
        _start(1, "kind=never_ready", Timeouts(startup=4.0))
    took = time.monotonic() - t0
    assert 0.9 * 4 <= took < 4 + 5, took
    assert list(tmp_path.iterdir()) == []  # runtime dir (logs) removed


@pytest.mark.dist
def test_an_interrupt_during_startup_aborts_it_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    said, t0 = [], time.monotonic()
    with pytest.raises(PoolCancelled):
        WorkerPool.start(tiny_spec(2), env=fault_env("kind=never_ready"), on_status=said.append,
                         should_abort=lambda: time.monotonic() - t0 > 1.0)
    assert time.monotonic() - t0 < 1.0 + 2 * pool_mod.POLL_S + 6  # + teardown: SIGTERM reaches them at once
    assert said and said[0].startswith("starting 2 DualParal worker")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.dist
@pytest.mark.parametrize("kind,expect", [("exit_on_start", "ValueError: no such model"),
                                         ("exit_early", "exited with code 3")])
def test_a_failed_start_reports_the_workers_own_message(kind, expect):
    with pytest.raises(WorkerError) as e:
        _start(1, f"kind={kind}")
    assert "no such model" in str(e.value) and expect in str(e.value)
    assert e.value.rank == 0 and e.value.phase == "startup"


@pytest.mark.dist
def test_close_escalates_to_sigkill_when_sigterm_is_ignored():
    p = _start(1, "kind=ignore_term", Timeouts(close_grace=1.0))
    proc = p._launch.procs[0]
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 1.0 + 2
    assert proc.returncode == -signal.SIGKILL and alive(p.pids) == []
    t0 = time.monotonic()
    p.close()  # a second close is a no-op
    assert time.monotonic() - t0 < 0.1


@pytest.mark.dist
def test_two_pools_from_non_main_threads_without_signal_handlers(monkeypatch):
    """As ComfyUI's prompt worker thread: no signal handler is installed, two pools never mix, and close() spares a
    sibling child of the host."""
    def no_signals(*a, **k):
        raise ValueError("signal only works in main thread of the main interpreter")

    monkeypatch.setattr(signal, "signal", no_signals)
    sibling = subprocess.Popen(["sleep", "60"])
    results, errors = {}, []

    def run(name):
        try:
            p = WorkerPool.start(tiny_spec(2 if name == "a" else 1))
            try:
                job = tiny_job(sampler="uni_pc")
                results[name] = (p.generate(job), {i["pool_id"] for i in p.ready_info}, p.pids)
            finally:
                p.close()
                p.close()
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not errors, errors
        ref = reference(tiny_job(sampler="uni_pc"))
        assert all(torch.equal(out, ref) for out, _, _ in results.values())
        (_, ids_a, pids_a), (_, ids_b, pids_b) = results["a"], results["b"]
        assert len(ids_a) == len(ids_b) == 1 and ids_a != ids_b
        assert alive(pids_a + pids_b) == []
        assert sibling.poll() is None, "close() hit a process it did not start"
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
    finally:
        sibling.kill()
        sibling.wait()


def test_gpu_groups_without_nccl_are_refused_before_any_spawn(monkeypatch):
    """Windows PyTorch has no NCCL: the message says what works instead, and nothing is started."""
    import torch.distributed as dist

    from dualparal_core import runtime
    from dualparal_core.config import ModelSource, PoolSpec, WanConfig
    from dualparal_core.runtime import check_spec

    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    monkeypatch.setattr(runtime, "_count_cuda", lambda env: 2)  # as on a 2-GPU Windows box
    spec = PoolSpec(ModelSource(random_config=WanConfig.tiny()), devices=("cuda:0", "cuda:1"))
    with pytest.raises(ValueError, match=r"need NCCL.*WSL2.*cpu:2"):
        check_spec(spec, {})
    check_spec(PoolSpec(ModelSource(random_config=WanConfig.tiny()), devices=("cpu", "cpu")), {})  # CPU still fine


def test_dualparal_compile_environment_switch(monkeypatch, tiny_config):
    """DUALPARAL_COMPILE=0/1 overrides the default (on for GPUs) when the spec leaves compile unset; a bad value is
    refused before any process starts, naming the variable, the value and what works."""
    from dualparal_core.config import ModelSource, PoolSpec
    from dualparal_core.runtime import check_spec, wants_compile

    spec = PoolSpec(ModelSource(random_config=tiny_config), devices=("cpu",), dtype="fp32")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("DUALPARAL_COMPILE", raising=False)
    assert wants_compile(spec, cuda) and not wants_compile(spec, cpu)
    monkeypatch.setenv("DUALPARAL_COMPILE", "0")
    assert not wants_compile(spec, cuda)
    monkeypatch.setenv("DUALPARAL_COMPILE", "1")
    assert wants_compile(spec, cpu)
    from dataclasses import replace

    assert not wants_compile(replace(spec, compile=False), cuda)  # the spec wins
    with pytest.raises(ValueError, match=r"DUALPARAL_COMPILE must be 0 or 1.*'yes'"):
        check_spec(spec, {"DUALPARAL_COMPILE": "yes"})
