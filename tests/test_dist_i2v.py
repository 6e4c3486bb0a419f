"""N-independence with image-to-video conditioning through the real worker pool: 1, 2 and 3 CPU ranks give
latents bit-identical to the single-process reference, over several blocks with K > 0, for Wan2.1 I2V (concat +
CLIP-vision tokens; FLF2V differs only in its per-job image tokens, tests/test_model_i2v.py) and for Wan2.2 I2V A14B
(two experts without img_emb, switched at boundary 0.9 while other blocks are still on the other expert); and each
block-step embeds its own window's frames of the concat."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from fault_helpers import SEED, tiny_job

from dualparal_core.conditioning import ImageConditioning
from dualparal_core.config import ModelSource, PoolSpec, SamplingConfig
from dualparal_core.engine import run_single_process
from dualparal_core.experts import BOUNDARY_I2V, Experts
from dualparal_core.model import WanStage
from dualparal_core.pool import WorkerPool
from dualparal_core.testing import tiny_config

pytestmark = pytest.mark.dist
_REFS: dict[str, torch.Tensor] = {}


def _job(variant: str, concat: torch.Tensor | None = None):
    """tiny_job's layout (7 frames: blocks of 4, 2 and 1, P = K = 2), cfg 3, batch 2, with image conditioning."""
    g = torch.Generator().manual_seed(7)
    if concat is None:
        concat = torch.randn(2, 20, 7, 8, 8, generator=g)
    tokens = 514 if variant == "flf2v" else 257
    return tiny_job("uni_pc", image=ImageConditioning(concat, torch.randn(1, tokens, 1280, generator=g)))


def _stage(variant, seed=SEED):
    cfg = tiny_config(variant)
    st = WanStage(cfg, range(cfg.num_layers), embed=True, head=True)
    st.init_random(seed)
    return st


def _reference(variant: str) -> torch.Tensor:
    if variant not in _REFS:
        _REFS[variant] = run_single_process(_stage(variant), _job(variant))
    return _REFS[variant]


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}rank")
def world(request):
    return request.param


def test_i2v_is_bit_identical_on_1_2_3_ranks(world, variant="i2v"):
    spec = PoolSpec(ModelSource(random_config=tiny_config(variant), random_seed=SEED), devices=("cpu",) * world,
                    dtype="fp32")
    pool = WorkerPool.start(spec)
    try:
        out = pool.generate(_job(variant))
    finally:
        pool.close()
    assert out.shape == (2, 16, 7, 8, 8)
    assert torch.equal(out, _reference(variant)), f"{variant} on {world} rank(s) differs"


# Wan2.2 I2V A14B: sigmas 1.0 and 0.95 on the high-noise expert, 0.85 on down on the low-noise one; blocks of 4, 2 and 1
# frames (P = K = 2) cross the boundary at ticks 2, 3 and 4, and the batch changes at the switch (cfg 3 -> cfg_low 1,
# and cfg 1 -> cfg_low 4).
EXPERT_SIGMAS = (1.0, 0.95, 0.85, 0.6, 0.3, 0.0)
EXPERT_JOBS = (("uni_pc", 3.0, 1.0), ("euler", 1.0, 4.0))


def _expert_job(sampler: str, cfg: float, cfg_low: float):
    job = _job("i2v_concat")
    sc = SamplingConfig(sigmas=EXPERT_SIGMAS, sampler=sampler, cfg=cfg, cfg_low=cfg_low, seed=5,
                        noise_mode="coordinated", num_per_block=2, num_cat=2)
    return replace(job, sampling=sc, image=ImageConditioning(job.image.concat))  # no img_emb: no CLIP tokens


def test_two_expert_i2v_is_bit_identical_on_1_2_3_ranks(world):
    if "experts" not in _REFS:
        pair = Experts((_stage("i2v_concat"), _stage("i2v_concat", SEED + 1)), BOUNDARY_I2V)
        _REFS["experts"] = torch.stack([run_single_process(pair, _expert_job(*a)) for a in EXPERT_JOBS])
    src = ModelSource(random_config=tiny_config("i2v_concat"), random_seed=SEED, random_low_seed=SEED + 1,
                      boundary=BOUNDARY_I2V)
    pool = WorkerPool.start(PoolSpec(src, devices=("cpu",) * world, dtype="fp32"))
    try:
        assert all(i["experts"] == 2 for i in pool.ready_info)
        out = torch.stack([pool.generate(_expert_job(*a)) for a in EXPERT_JOBS])
    finally:
        pool.close()
    assert out.shape == (2, 2, 16, 7, 8, 8)
    for a, got, want in zip(EXPERT_JOBS, out, _REFS["experts"]):
        assert torch.equal(got, want), f"two-expert I2V {a} on {world} rank(s) differs"


def test_each_block_step_embeds_its_own_window_of_the_concat():
    """Every block-step's model input is its window's noisy latent, then the same frames (left context included)
    of its own video's concat: recorded at the patch embedding, against the layout's input spans."""
    from dualparal_core.engine import RankEngine

    st = _stage("i2v")
    seen = []
    embed = st.embed
    st.embed = lambda x: (seen.append(x.clone()), embed(x))[1]
    job = _job("i2v")
    eng = RankEngine(st)
    eng.run_job(job)
    spans = [eng.layout.input_span(it.block) for it in eng.schedule.items]
    assert len(seen) == 2 * len(spans)  # two videos, every item once
    for i, x in enumerate(seen):
        video, (s0, e0) = divmod(i, len(spans))[0], spans[i % len(spans)]
        assert x.shape[1] == 36 and x.shape[2] == e0 - s0
        assert torch.equal(x[:, 16:], job.image.concat[video:video + 1, :, s0:e0])
    assert {e0 - s0 for s0, e0 in spans} == {4, 3}  # the first block alone, later ones with K = 2 left frames
