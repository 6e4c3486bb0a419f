"""Two experts through the real worker pool: 1, 2 and 3 CPU ranks give latents bit-identical to the single-process
engine, with K > 0, blocks crossing the boundary at different ticks, and the batch changing between block-steps
(cfg > 1 on one expert, 1 on the other, both ways round); and a pair read from files (fp8 kept in memory, a LoRA
on the low-noise expert only) on 2 ranks equals the same model built on one."""

from __future__ import annotations

import pytest
import torch
from fault_helpers import SEED, full_stage

from dualparal_core.config import ModelSource, PoolSpec, SamplingConfig, WanConfig
from dualparal_core.engine import run_single_process
from dualparal_core.experts import Experts
from dualparal_core.pool import WorkerPool
from dualparal_core.protocol import Job

pytestmark = pytest.mark.dist
SIGMAS = (1.0, 0.95, 0.85, 0.6, 0.3, 0.0)  # boundary 0.9: steps 0-1 high-noise, 2-4 low-noise
BOUNDARY = 0.9
JOBS = {"uni_pc cfg 3 / cfg_low 1": ("uni_pc", 3.0, 1.0), "euler cfg 1 / cfg_low 4": ("euler", 1.0, 4.0)}
_REFS: dict[str, torch.Tensor] = {}


def _job(sampler: str, cfg: float, cfg_low: float | None) -> Job:
    g = torch.Generator().manual_seed(1)
    sc = SamplingConfig(sigmas=SIGMAS, sampler=sampler, cfg=cfg, cfg_low=cfg_low, seed=5, noise_mode="coordinated",
                        num_per_block=2, num_cat=2)  # 7 frames: blocks of 4, 2 and 1 frames cross at ticks 2, 3, 4
    return Job(sc, (2, 16, 7, 8, 8), cond=torch.randn(1, 5, 64, generator=g), uncond=torch.randn(1, 3, 64, generator=g))


def _reference(name: str) -> torch.Tensor:
    if name not in _REFS:
        pair = Experts((full_stage(SEED), full_stage(SEED + 1)), BOUNDARY)
        _REFS[name] = run_single_process(pair, _job(*JOBS[name]))
    return _REFS[name]


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}rank")
def pool(request):
    src = ModelSource(random_config=WanConfig.tiny(), random_seed=SEED, random_low_seed=SEED + 1, boundary=BOUNDARY)
    p = WorkerPool.start(PoolSpec(src, devices=("cpu",) * request.param, dtype="fp32"))
    yield p
    p.close()


def test_two_experts_match_the_single_process_engine(pool):
    assert all(i["experts"] == 2 for i in pool.ready_info)
    for name, args in JOBS.items():
        out = pool.generate(_job(*args))
        assert torch.equal(out, _reference(name)), f"{name} on {pool.spec.world_size} rank(s) differs"


def test_expert_files_fp8_in_memory_and_a_low_noise_lora(tmp_path):
    from test_lora import _factors, _save

    from dualparal_core.checkpoint import random_state_dict, save_checkpoint
    from dualparal_core.runtime import build_stage

    cfg = WanConfig.tiny()
    hi, lo = tmp_path / "high.safetensors", tmp_path / "low.safetensors"
    save_checkpoint(random_state_dict(cfg, 1), str(hi), "fp8_scaled")
    save_checkpoint(random_state_dict(cfg, 2), str(lo), "comfy", dtype=torch.bfloat16)
    lora = _save(tmp_path / "lora.safetensors", _factors(4), "comfy")
    src = ModelSource(path=str(hi), low_noise_path=str(lo), boundary=BOUNDARY, loras=((lora, 0.7, "low"),))
    spec = PoolSpec(src, devices=("cpu", "cpu"), dtype="fp32", weights="fp8")
    ref_model, _ = build_stage(PoolSpec(src, devices=("cpu",), dtype="fp32", weights="fp8"), 0)
    job = _job("uni_pc", 3.0, 1.0)
    p = WorkerPool.start(spec)
    try:
        assert torch.equal(p.generate(job), run_single_process(ref_model, job))
    finally:
        p.close()
