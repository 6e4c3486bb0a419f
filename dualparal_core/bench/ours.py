"""Our engine, measured through the shipped path: the product's WorkerPool, with the ranks' own profile on.

Every DualParal figure comes through here, so it is what a user gets: the ranks start as the pool starts them
(``python -m dualparal_core.worker``), build their stage with ``runtime.build_stage`` (QKV always fused, the
elementwise chains compiled as ``PoolSpec.compile`` / ``DUALPARAL_COMPILE`` say), and send what they measured
(``RankEngine.last_profile``, ``DUALPARAL_PROFILE=1``) with their result, which the pool keeps in ``job_info``.
"""

from __future__ import annotations

import os
import time

import torch

from dualparal_core.config import ModelSource, PoolSpec, SamplingConfig, Timeouts, WanConfig
from dualparal_core.protocol import Job
from dualparal_core.sigmas import simple_sigmas

#: NVLink multicast off in this process and every process it starts: on a shared host it can put the GPUs out of
#: service. Applied by :func:`safe_env` before any pool or peer starts.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def safe_env() -> None:
    os.environ.update(SAFE_ENV)


def start_pool(config: WanConfig, devices: tuple[str, ...], *, dtype: str = "bf16", attention: str = "sdpa",
               compile: bool | None = None, weights: str = "dequant", experts: int = 1, boundary: float = 0.875,
               in_flight: int | None = None, timeout: float = 900.0, env: dict | None = None, matmul: str = "bf16",
               kv_cache: str = "exact"):
    """A pool of random weights (seed 0; the low-noise expert seed 1) with profiling on."""
    from dualparal_core.pool import WorkerPool

    safe_env()
    src = ModelSource(random_config=config, random_seed=0, random_low_seed=1 if experts == 2 else None,
                      boundary=boundary)
    spec = PoolSpec(src, devices=tuple(devices), dtype=dtype, attention=attention, max_in_flight=in_flight,
                    compile=compile, weights=weights, matmul=matmul, kv_cache=kv_cache)
    env = {**SAFE_ENV, "DUALPARAL_PROFILE": "1", **(env or {})}
    # a first block-step that compiles its kernels sends no progress for a while: allow it the whole timeout
    return WorkerPool.start(spec, Timeouts(startup=timeout, step=timeout), env=env)


def texts(config: WanConfig, tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positive and negative text conditioning [1, tokens, text_dim] (umt5 pads to 512 tokens)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, tokens, config.text_dim, generator=g),
            torch.randn(1, tokens, config.text_dim, generator=g))


def make_job(config: WanConfig, frames: int, steps: int, P: int, K: int, height: int, width: int, *,
             sampler: str = "uni_pc", cfg: float = 5.0, cfg_low: float | None = None, shift: float = 8.0,
             sigma_table: tuple[float, ...] | None = None, text_tokens: int = 512) -> Job:
    """One video of ``frames`` latent frames at ``height`` x ``width`` pixels, coordinated noise, seed 0."""
    sc = SamplingConfig(sigmas=sigma_table or simple_sigmas(steps, shift), sampler=sampler, cfg=cfg, cfg_low=cfg_low,
                        seed=0, noise_mode="coordinated", num_per_block=P, num_cat=K)
    cond, uncond = texts(config, text_tokens)
    return Job(sc, (1, config.out_channels, frames, height // 8, width // 8), cond, uncond if sc.use_cfg else None)


def warmup_frames(frames: int, P: int, K: int) -> int:
    """Latent frames of a warm-up job with every window shape of a ``frames``-frame job: the first block, two
    full blocks (left and right context) and the short last block, if the job has one."""
    short = (frames - P - K) % P if frames > P + K else 0
    return min(frames, P + K + P + short)


def warmup_table(sigmas: tuple[float, ...], experts: int = 1) -> tuple[float, ...]:
    """A short sigma table with the first and last sigmas of ``sigmas`` (with two experts both run, the low-noise
    one also with right context)."""
    tail = 3 if experts == 2 else 2
    return sigmas[:1] + sigmas[-tail:] if len(sigmas) > tail else sigmas


def profiles(pool) -> list[dict]:
    """Each rank's profile of the pool's last job (RankEngine.last_profile, sent with its result)."""
    missing = [i.get("rank", r) for r, i in enumerate(pool.job_info) if "profile" not in i]
    if missing:
        raise RuntimeError(f"ranks {missing} sent no profile: their rank program does not add "
                           f"RankEngine.last_profile to its result (DUALPARAL_PROFILE=1 was set)")
    return [i["profile"] for i in pool.job_info]


def summarise(profs: list[dict]) -> dict:
    """The slowest rank's time, the largest per-rank memory, the last rank's block-step ticks."""
    return dict(seconds=max(p["loop_s"] for p in profs), peak_gib=max(p["peak_gib"] for p in profs),
                reserved_gib=max(p["reserved_gib"] for p in profs),
                weights_gib=max(p.get("weights_gib", 0.0) for p in profs), ticks=profs[-1]["ticks"],
                peak_per_rank=[p["peak_gib"] for p in profs], device_name=profs[0].get("device_name", "cpu"))


def timed(pool, job: Job, warmup: Job | None, warmups: int = 1) -> dict:
    """Run ``warmup`` ``warmups`` times, then ``job`` on the pool: :func:`summarise` of the ranks' profiles of
    ``job``, plus ``generate_s`` (the caller's wall time of ``pool.generate``: the trip to the ranks and back) and
    the job's latents (``_latents``: not for a JSON row)."""
    for _ in range(warmups if warmup is not None else 0):
        pool.generate(warmup)
    t0 = time.perf_counter()
    latents = pool.generate(job)
    generate_s = time.perf_counter() - t0
    return dict(summarise(profiles(pool)), generate_s=generate_s, _latents=latents)
