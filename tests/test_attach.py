"""Attaching to a torchrun-started group (``-m dualparal_core.worker --serve``): the same latents as the
single-process engine, detach/re-attach without a reload, cancel, clear refusals (no group, wrong key, in use, a
missing file), a parent that vanishes mid-job, and a failed rank named to the parent; no process outlives a test."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from fault_helpers import RANK_MARKS, SEED, SUPPORT, full_stage, reference, tiny_job, wait_gone

from dualparal_core import protocol as proto
from dualparal_core.attach import AttachError, AttachSpec
from dualparal_core.config import ModelSource, PoolSpec, Timeouts, WanConfig
from dualparal_core.pool import PoolCancelled, WorkerError, WorkerPool

ROOT = Path(__file__).resolve().parents[1]
KEY = "dualparal-test-" + secrets.token_hex(8)
TINY = PoolSpec(ModelSource(random_config=WanConfig.tiny(), random_seed=SEED), devices=("cpu",), dtype="fp32")
MARKS = (*RANK_MARKS, "torch.distributed.run")


def _ours() -> set[int]:
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if any(m in " ".join(p.cmdline()) for m in MARKS) and p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.Error:
            pass
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Group:
    """``torchrun --standalone --nproc-per-node N -m dualparal_core.worker --serve 127.0.0.1:PORT --random-tiny``."""

    def __init__(self, log: Path, nproc: int = 2, fault: str = "", extra: tuple[str, ...] = ()):
        self.port = _free_port()
        self.address, self.log = f"tcp://127.0.0.1:{self.port}", log
        env = {**os.environ, "DUALPARAL_AUTHKEY": KEY, "PYTHONPATH": os.pathsep.join([str(ROOT), SUPPORT]),
               "OMP_NUM_THREADS": "1", "DUALPARAL_HEARTBEAT": "0.5", "DUALPARAL_FAULT": fault}
        module = "faulty_rank" if fault else "dualparal_core.worker"  # tests/support: fault hooks, then the product
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", module, "--serve", f"127.0.0.1:{self.port}", "--random-tiny", str(SEED),
               "--dtype", "fp32", *extra]
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def attach(self, model: PoolSpec | None = None, timeout: float = 120.0, **kw):
        """Attach as soon as rank 0 listens (it binds before the rendezvous, then loads the start-up model)."""
        end = time.monotonic() + timeout
        while True:
            try:
                return WorkerPool.attach(AttachSpec(self.address, model), Timeouts(startup=timeout), authkey=KEY,
                                         **kw)
            except AttachError as e:
                if "no DualParal group listening" not in str(e) or time.monotonic() > end:
                    raise
                assert self.proc.poll() is None, f"torchrun exited:\n{self.tail()}"
                time.sleep(0.2)

    def tree(self) -> list[int]:
        try:
            agent = psutil.Process(self.proc.pid)
            return [agent.pid] + [c.pid for c in agent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def tail(self) -> str:
        return self.log.read_bytes()[-4000:].decode(errors="replace")

    def stop(self) -> None:
        pids = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the agent stops its workers, then exits
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        for pid in wait_gone(pids, 5):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(5)


SHARED: list[Group] = []  # the module's group: checked when its fixture ends


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    before = _ours()
    yield
    shared = {pid for g in SHARED for pid in g.tree()}
    left = wait_gone(sorted(_ours() - before - shared), 10)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived the test: {left}"


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """--models-dir of the shared group: a tiny checkpoint file, found there by its name."""
    from dualparal_core.checkpoint import random_state_dict, save_checkpoint

    d = tmp_path_factory.mktemp("models")
    sd = random_state_dict(WanConfig.tiny(), seed=3)
    save_checkpoint(sd, str(d / "wan_tiny.safetensors"), "comfy", dtype=torch.float32)
    return d, sd


@pytest.fixture(scope="module")
def group(tmp_path_factory, ckpt_dir):
    g = Group(tmp_path_factory.mktemp("group") / "torchrun.log", fault="kind=slow,delay=0.03",
              extra=("--models-dir", str(ckpt_dir[0])))
    SHARED.append(g)
    yield g
    g.stop()
    SHARED.remove(g)
    assert wait_gone(g.tree(), 10) == [], "the group outlived its fixture"


# ---------------------------------------------------------------------------------------------- no group needed
def test_serve_refuses_to_start_without_a_key():
    env = {k: v for k, v in os.environ.items() if k != "DUALPARAL_AUTHKEY"}
    r = subprocess.run([sys.executable, "-m", "dualparal_core.worker", "--serve", "127.0.0.1:0"], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "DUALPARAL_AUTHKEY is not set" in r.stderr, r.stderr


def test_attaching_where_nothing_listens_fails_fast():
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(AttachError) as e:
        WorkerPool.attach(f"tcp://127.0.0.1:{port}", authkey=KEY)
    assert time.monotonic() - t0 < 2.0
    msg = str(e.value)
    for part in (f"no DualParal group listening at tcp://127.0.0.1:{port}", "torchrun", "-m dualparal_core.worker",
                 f"--serve 127.0.0.1:{port}", "DUALPARAL_AUTHKEY"):
        assert part in msg, msg


def test_attaching_without_a_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("DUALPARAL_AUTHKEY", raising=False)
    with pytest.raises(AttachError, match="DUALPARAL_AUTHKEY is not set"):
        WorkerPool.attach("tcp://127.0.0.1:9")
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        AttachSpec("tcp://nowhere")
    assert AttachSpec("10.0.0.5:29600").devices == ("tcp://10.0.0.5:29600",)


# ---------------------------------------------------------------------------------------------- shared group
@pytest.mark.dist
def test_a_job_equals_the_single_process_engine_and_reattaching_does_not_reload(group):
    p = group.attach()  # whatever the group holds: its --random-tiny start-up model
    info = p.ready_info
    workers = group.tree()[1:]
    assert [i["rank"] for i in info] == [0, 1] and {i["pid"] for i in info} <= set(workers)
    assert all(i["load_count"] == 1 and i["host_modules"] == [] and i["world"] == 2 for i in info)
    assert p.config == WanConfig.tiny() and p.pids == [] and p.spec.devices == (group.address,)
    job = tiny_job()
    out = p.generate(job)
    assert torch.equal(out, reference(job))
    assert [i["rank"] for i in p.job_info] == [0, 1] and all(i["block_steps"] > 0 for i in p.job_info)
    p.close()
    assert not p.alive and psutil.pid_exists(info[1]["pid"])  # detached, the group lives on
    q = group.attach(TINY)  # the same model, asked for explicitly: kept, not reloaded
    try:
        assert [i["load_count"] for i in q.ready_info] == [1, 1]
        assert [i["pid"] for i in q.ready_info] == [i["pid"] for i in info]
        assert torch.equal(q.generate(tiny_job(sampler="uni_pc")), reference(tiny_job(sampler="uni_pc")))
    finally:
        q.close()


@pytest.mark.dist
def test_cancel_mid_job_then_the_next_job_is_correct(group):
    p = group.attach(TINY)
    asked = []

    def progress(done, total, preview):
        if done == 5 and not asked:
            asked.append(time.monotonic())

    try:
        with pytest.raises(PoolCancelled):
            p.generate(tiny_job(steps=30), on_progress=progress, should_cancel=lambda: bool(asked))
        assert time.monotonic() - asked[0] < 1.0 and p.alive
        job = tiny_job(sampler="dpmpp_2m")
        assert torch.equal(p.generate(job), reference(job))
    finally:
        p.close()


@pytest.mark.dist
def test_a_wrong_key_and_a_second_client_are_refused_with_clear_messages(group):
    with pytest.raises(AttachError) as e:
        WorkerPool.attach(group.address, authkey="not-the-key")
    assert "authentication failed" in str(e.value) and "DUALPARAL_AUTHKEY" in str(e.value)
    p = group.attach(TINY)
    try:
        with pytest.raises(AttachError, match="in use by .* pid"):
            WorkerPool.attach(group.address, authkey=KEY)
    finally:
        p.close()
    group.attach(TINY, timeout=10).close()  # the first client's detach freed the group at once


@pytest.mark.dist
def test_a_parent_that_vanishes_mid_job_leaves_the_group_serving(group):
    p = group.attach(TINY)
    p.session.send({"op": proto.OP_JOB, "job": 1, "payload": tiny_job(steps=500)})
    end = time.monotonic() + 30
    while (m := p.session.recv(0.1)) is None or m["op"] != proto.OP_PROGRESS:
        assert time.monotonic() < end
    p._finalizer.detach()
    p.session.conn.close()  # as a SIGKILLed ComfyUI: no goodbye
    t0 = time.monotonic()
    q = group.attach(TINY, timeout=30)
    try:
        assert time.monotonic() - t0 < 5, "the group did not stop the orphaned job at its next block-step"
        job = tiny_job()
        assert torch.equal(q.generate(job), reference(job))
    finally:
        q.close()


@pytest.mark.dist
def test_a_missing_file_is_a_load_error_and_files_are_found_under_models_dir(group, ckpt_dir):
    missing = PoolSpec(ModelSource(path="wan_missing.safetensors"), devices=("cpu",), dtype="fp32")
    with pytest.raises(WorkerError) as e:
        group.attach(missing)
    assert e.value.rank == 0 and e.value.phase == "load" and "wan_missing.safetensors" in str(e.value)
    assert "--models-dir" in str(e.value) and str(ckpt_dir[0]) in str(e.value)
    with pytest.raises(WorkerError, match="holds no model"):
        group.attach()  # the failed load left nothing half-loaded
    # a ComfyUI path of another host: found under --models-dir by its trailing components
    other_host = PoolSpec(ModelSource(path="/elsewhere/ComfyUI/models/diffusion_models/wan_tiny.safetensors"),
                          devices=("cpu",), dtype="fp32")
    p = group.attach(other_host)
    try:
        assert [i["load_count"] for i in p.ready_info] == [2, 2]
        job = tiny_job()
        assert torch.equal(p.generate(job), reference(job, full_stage(state_dict=ckpt_dir[1])))
    finally:
        p.close()


@pytest.mark.dist
def test_block_decode_runs_on_an_attached_group(group):
    """Each rank of the torchrun group decodes its primed span and sends its frames on its own connection: the
    IMAGE equals the sequential decode bit for bit, the weights cross once, a cancel keeps the group usable."""
    from test_decode_parallel import latent, run
    from test_decode_parallel import reference as decoded
    from test_vae import make_vae, to_original_layout

    from dualparal_core.vae import WanVAEDecoder

    vae = make_vae(3, base_dim=4)
    dec, sd = WanVAEDecoder.from_vae(vae), to_original_layout(vae.state_dict())
    z = latent(2, 44)
    p = group.attach(TINY)
    try:
        sink, report = run(p, z, sd, block_size=3, spans=[(0, 40), (40, 44)])
        assert report.spans == [(0, 40), (40, 44)] and report.weights_sent == 2
        assert torch.equal(sink.image, decoded(dec, z))
        seen = []
        with pytest.raises(PoolCancelled):
            run(p, latent(1, 60, seed=7), sd, block_size=1, spans=[(0, 50), (50, 60)],
                on_progress=lambda d, t: seen.append(d), should_cancel=lambda: len(seen) >= 2)
        assert p.alive
        again, report = run(p, z, sd, block_size=3, spans=[(0, 40), (40, 44)])
        assert report.weights_sent == 0 and torch.equal(again.image, sink.image)
        job = tiny_job()
        assert torch.equal(p.generate(job), reference(job))  # and sampling still works after decoding
    finally:
        p.close()


# ---------------------------------------------------------------------------------------------- faults (own group)
@pytest.mark.dist
def test_killing_a_rank_mid_job_names_it_and_the_group_goes(tmp_path):
    g = Group(tmp_path / "torchrun.log", fault="kind=slow,delay=0.03")
    try:
        p = g.attach(TINY)
        victim, killed = p.ready_info[1]["pid"], []

        def progress(done, total, preview):
            if done == 3 and not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(time.monotonic())

        with pytest.raises(WorkerError) as e:
            p.generate(tiny_job(steps=60), on_progress=progress)
        assert time.monotonic() - killed[0] < 10
        assert e.value.rank == 1 and "rank 1" in str(e.value) and str(victim) in str(e.value), str(e.value)
        assert not p.alive
        g.proc.wait(30)  # max-restarts 0: torchrun gives up and leaves nothing
        assert g.proc.returncode != 0 and wait_gone(g.tree(), 10) == []
    finally:
        g.stop()


@pytest.mark.dist
def test_an_exception_on_another_rank_reaches_the_parent_with_its_traceback(tmp_path):
    g = Group(tmp_path / "torchrun.log", fault="rank=1,kind=raise,step=3")
    try:
        p = g.attach(TINY)
        with pytest.raises(WorkerError) as e:
            p.generate(tiny_job())
        text = str(e.value)
        assert e.value.rank == 1 and e.value.phase == "sample" and e.value.exc_type == "ValueError", text
        for part in ("rank 1", "ValueError: boom-42", "Traceback", "rank/program.py"):
            assert part in text, text
        g.proc.wait(30)
        assert wait_gone(g.tree(), 10) == []
    finally:
        g.stop()


def _rank_proc(g: Group, rank: int) -> psutil.Process:
    for pid in g.tree()[1:]:
        try:
            p = psutil.Process(pid)
            if p.environ().get("RANK") == str(rank) and "DUALPARAL_FAULT" in p.environ():
                return p
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} in the group:\n{g.tail()}")


@pytest.mark.dist
@pytest.mark.parametrize("load", ["start-up", "attach"])
def test_a_rank_0_frozen_while_an_attached_group_loads_is_named_from_its_heartbeats(tmp_path, load):
    """Rank 0 loads forever (alive, beating) and is then frozen (SIGSTOP): while it loads its start-up model (the
    parent waits in its queue) or the model the parent asked for. The parent learns the group's heartbeat interval
    from rank 0's first heartbeat, so it names rank 0 within 3 heartbeats + 1 s, not at the startup timeout (60 s
    here; before, only that applied to an attached group)."""
    import threading

    step = 1 if load == "start-up" else 2  # the start-up model is rank 0's first load
    g = Group(tmp_path / "torchrun.log", fault=f"rank=0,kind=never_ready,step={step}")
    other = PoolSpec(ModelSource(random_config=WanConfig.tiny(), random_seed=SEED + 1), devices=("cpu",),
                     dtype="fp32")  # another model than the start-up one: the attach loads it
    box: dict = {}

    def attach():
        try:
            box["pool"] = g.attach(TINY if load == "start-up" else other, timeout=60.0)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            box["error"] = exc

    t = threading.Thread(target=attach)
    victim = None
    try:
        t.start()
        end = time.monotonic() + 90

        def injected() -> bool:
            return "injecting fault never_ready" in g.log.read_bytes().decode(errors="replace")

        while not injected() and time.monotonic() < end:
            time.sleep(0.2)
        assert injected(), g.tail()
        time.sleep(1.0)  # into its never-ending load, with the parent attached and waiting
        assert t.is_alive(), box
        victim = _rank_proc(g, 0)
        victim.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        t.join(60)
        took = time.monotonic() - t0
        err = box.get("error")
        assert isinstance(err, WorkerError), box
        assert err.rank == 0 and err.phase == "load" and "stopped sending heartbeats" in str(err), str(err)
        assert took < 15, f"named after {took:.1f} s"
    finally:
        if victim is not None:
            try:
                victim.send_signal(signal.SIGCONT)
                victim.kill()
            except psutil.Error:
                pass
        t.join(60)
        g.stop()
