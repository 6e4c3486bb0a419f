"""Shared pieces of the pool tests: tiny specs and jobs, the reference run, orphan checks, a parent to kill.

Run as a script (``python tests/fault_helpers.py idle|job|start``) it plays ComfyUI: it starts a 2-rank pool and
prints ``READY`` (idle, job) or ``RUNNING`` (job, once sampling) so that a test can SIGKILL it at that moment.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from dualparal_core.config import ModelSource, PoolSpec, SamplingConfig, WanConfig  # noqa: E402
from dualparal_core.protocol import Job  # noqa: E402

SEED = 11
SIGMAS = (1.0, 0.75, 0.4, 0.0)
SUPPORT = str(Path(__file__).resolve().parent / "support")
RANK_MARKS = ("dualparal_core.worker", "faulty_rank")
"""What a rank's command line holds: the product's entry point, or the fault-injecting wrapper of tests/support."""


def fault_env(fault: str = "", **env) -> dict[str, str]:
    """Environment for a local pool whose ranks inject ``fault`` (tests/support/faulty_rank.py; inert when empty)."""
    path = os.pathsep.join([SUPPORT, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)])
    return {"DUALPARAL_FAULT": fault, "DUALPARAL_RANK_MODULE": "faulty_rank", "PYTHONPATH": path, **env}


def tiny_spec(world: int = 2, seed: int = SEED, **kw) -> PoolSpec:
    """A CPU pool of the tiny random Wan (3 layers), float32 so that results are bit-comparable."""
    return PoolSpec(ModelSource(random_config=WanConfig.tiny(), random_seed=seed), devices=("cpu",) * world,
                    dtype="fp32", **kw)


def tiny_job(sampler: str = "euler", steps: int | None = None, batch: int = 2, channels: int = 16,
             frames: int = 7, **kw) -> Job:
    """cfg > 1, K = P = 2 over 7 frames (blocks of 4, 2 and a short 1), coordinated noise, batch 2."""
    sigmas = SIGMAS if steps is None else tuple(1.0 - i / steps for i in range(steps + 1))
    g = torch.Generator().manual_seed(1)
    sc = SamplingConfig(sigmas=sigmas, sampler=sampler, cfg=3.0, seed=5, noise_mode="coordinated",
                        num_per_block=2, num_cat=2)
    return Job(sc, (batch, channels, frames, 8, 8), cond=torch.randn(1, 5, 64, generator=g),
               uncond=torch.randn(1, 3, 64, generator=g), **kw)


def full_stage(seed: int = SEED, state_dict: dict | None = None):
    """The single-process reference stage: every layer, the embedding and the head."""
    from dualparal_core.model import WanStage

    cfg = WanConfig.tiny()
    stage = WanStage(cfg, range(cfg.num_layers), embed=True, head=True, dtype=torch.float32)
    if state_dict is None:
        stage.init_random(seed)
    else:
        stage.load_weights(state_dict)
    return stage


def reference(job: Job, stage=None) -> torch.Tensor:
    from dualparal_core.engine import run_single_process

    return run_single_process(stage if stage is not None else full_stage(), job)


def worker_procs(parent: psutil.Process | None = None) -> list[psutil.Process]:
    """Live dualparal workers below ``parent`` (default: this process)."""
    out = []
    for p in (parent or psutil.Process()).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if any(m in cmd for m in RANK_MARKS) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return out


def alive(pids: list[int]) -> list[int]:
    """The pids that still run (zombies count as gone: they hold no memory and no GPU)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    end = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < end:
        time.sleep(0.05)
    return alive(pids)


def _play_parent(mode: str) -> None:
    from dualparal_core.config import Timeouts
    from dualparal_core.pool import WorkerPool

    env = fault_env({"start": "kind=never_ready", "job": "kind=slow,delay=0.05"}.get(mode, ""))
    pool = WorkerPool.start(tiny_spec(2), Timeouts(startup=300), env=env)
    print("READY", *pool.pids, flush=True)
    if mode == "job":
        said = []

        def progress(done, total, preview):
            if not said:
                said.append(print("RUNNING", flush=True))

        pool.generate(tiny_job(steps=200), on_progress=progress)
    time.sleep(3600)


if __name__ == "__main__":
    _play_parent(sys.argv[1])
