"""The right-context K/V cache held in e4m3 (``PoolSpec.kv_cache="fp8"``, dualparal_core/kvcache.py): the rounding
against a bound derived from e4m3's format, the bytes against the memory plan, N ranks against one, and the error it
puts in sampled latents against the exact cache."""

from __future__ import annotations

import pytest
import torch
from fault_helpers import tiny_job, tiny_spec

from dualparal_core import kvcache
from dualparal_core.config import ModelSource, PoolSpec, WanConfig
from dualparal_core.engine import run_single_process
from dualparal_core.memplan import plan_rank
from dualparal_core.model import WanStage
from dualparal_core.runtime import build_stage


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_each_kept_value_is_within_e4m3s_rounding_of_itself():
    """e4m3 has 3 mantissa bits: a normal value is rounded to within 2**-4 of itself. Each token is scaled so that
    its largest magnitude is 448; values under e4m3's smallest normal (2**-6 after scaling) are spaced 2**-9 apart,
    so they move by at most 2**-10 times the token's scale. Tokens of very different magnitudes check the scale is
    per token (one scale per tensor would flush the small tokens to zero)."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 37, 256, generator=g) * torch.logspace(-4, 3, 37)[None, :, None]
    v = torch.randn(2, 37, 256, generator=g)
    k[0, 3] = 0.0  # an all-zero token stays zero, not NaN
    entry = kvcache.keep_fp8(k, v)
    assert entry[0].dtype == torch.float8_e4m3fn and entry[0].shape == k.shape
    for x, back, scale in ((k, kvcache.load(entry, torch.float32)[0], entry[2]),
                           (v, kvcache.load(entry, torch.float32)[1], entry[3])):
        bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
        assert ((back - x).abs() <= bound).all()
        assert torch.isfinite(back).all()
    assert torch.equal(kvcache.load(entry, torch.float32)[0][0, 3], torch.zeros(256))
    exact = kvcache.keep_exact(k, v)
    assert kvcache.load(exact, torch.float32)[0] is exact[0]  # the exact cache is read as kept


@pytest.mark.parametrize("mode", ["exact", "fp8"])
def test_the_kept_bytes_are_what_the_memory_plan_says(mode):
    """A bf16 stage's real cache (every layer's kept K and V of K frames, batch 2) against memplan's cache term."""
    cfg = WanConfig.tiny(num_layers=2)
    stage = WanStage(cfg, range(cfg.num_layers), embed=True, head=True, dtype=torch.bfloat16)
    stage.init_random(0)
    stage.kv_keep = kvcache.KEEPERS[mode]
    frames, k_frames, gh, gw = 4, 2, 4, 4
    x = torch.randn(2, cfg.in_channels, frames, gh * 2, gw * 2)
    h = stage.embed(x)
    tproj, _ = stage.time_embed(torch.full((2,), 500.0))
    text = stage.prepare_text(torch.randn(2, 5, cfg.text_dim))
    _, cache = stage.blocks_forward(h, tproj, text, (frames, gh, gw), keep=(0, k_frames * gh * gw))
    kept = sum(t.numel() * t.element_size() for kv in cache.values() for t in kv)
    plan = plan_rank(cfg, range(cfg.num_layers), embed=True, head=True, dtype="bf16", frames_k=k_frames,
                     tpf=gh * gw, kv_cache=mode)
    assert kept == plan.cache
    if mode == "fp8":  # one byte per value and a float32 scale per token: about half of bf16's two bytes
        exact = plan_rank(cfg, range(cfg.num_layers), embed=True, head=True, dtype="bf16", frames_k=k_frames,
                          tpf=gh * gw).cache
        assert kept == exact * (cfg.dim + 4) // (2 * cfg.dim)


@pytest.mark.dist
def test_one_two_and_three_ranks_give_the_same_bits_and_the_error_is_the_caches_rounding(no_leftover_workers):
    from dualparal_core.pool import WorkerPool

    job = tiny_job("uni_pc", steps=3)
    one = run_single_process(build_stage(tiny_spec(1, kv_cache="fp8"), 0)[0], job)
    for world in (2, 3):
        pool = WorkerPool.start(tiny_spec(world, kv_cache="fp8"))
        try:
            assert torch.equal(pool.generate(job), one), world
        finally:
            pool.close()
    exact = run_single_process(build_stage(tiny_spec(1), 0)[0], job)
    # only the right-context frames' keys and values are rounded (RMS about 2**-5.5 of each value); the latents
    # move far less than that and are not a different model's (measured on this job: 1.1e-5)
    err = _rel(one, exact)
    assert 0 < err < 1e-2, err


def test_a_bad_mode_is_refused_by_name():
    with pytest.raises(ValueError, match=r"kv_cache='bf8' is not supported; choose one of \['exact', 'fp8'\]"):
        PoolSpec(ModelSource(random_config=WanConfig.tiny()), kv_cache="bf8")
