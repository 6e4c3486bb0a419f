"""Wan2.2 I2V A14B in the engine: two experts (high-noise, low-noise) of the I2V layout without ``img_emb`` (36 input
channels: the noisy latent, then ComfyUI's 4 mask + 16 image-latent concat channels), switched at Wan2.2 I2V's
boundary 0.900. One block with independent noise equals a plain full-sequence Euler loop written here over two
diffusers ``WanTransformer3DModel``s that appends the concat to the latent at every step and picks the expert and its
guidance scale from the step's sigma itself, as Wan2.2's sampler does (``t >= boundary * 1000``: the high-noise model
and ``guide_scale[1]``; below: the low-noise model and ``guide_scale[0]``)."""

from __future__ import annotations

import pytest
import torch
from test_experts import _diffusers, _stage

from dualparal_core.conditioning import ImageConditioning
from dualparal_core.config import SamplingConfig
from dualparal_core.engine import run_single_process
from dualparal_core.experts import BOUNDARY_I2V, HIGH, LOW, Experts
from dualparal_core.protocol import Job
from dualparal_core.testing import tiny_config

SHAPE = (2, 16, 5, 4, 6)  # two videos (a different image each), 5 latent frames: one block
SIGMAS = (1.0, 0.95, 0.9, 0.7, 0.4, 0.0)  # steps 0-2 on the high-noise expert (0.9 itself included), 3-4 low-noise
CFG = 3.5  # Wan2.2 I2V A14B's sample_guide_scale for the high-noise expert
# float32 throughout, diffusers' forward against ours over 5 Euler steps: the operation order differs (measured 1.3e-7
# to 2.7e-7 relative here, as in tests/test_engine_i2v.py and tests/test_experts.py); 1e-5 is far below what a real
# difference gives (the switch one step late, or no concat on the low-noise expert: measured ~0.2 to 0.3 relative,
# checked below to be > 1e-2).
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def pair():
    cfg = tiny_config("i2v_concat", num_layers=2)
    assert cfg.concat_channels == 20 and cfg.image_dim is None  # Wan2.2 I2V A14B's layout: no img_emb
    high, low = _diffusers(cfg, 0), _diffusers(cfg, 1)
    assert high.condition_embedder.image_embedder is None
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 11, cfg.text_dim, generator=g), torch.randn(1, 7, cfg.text_dim, generator=g)
    concat = torch.randn(2, 20, *SHAPE[2:], generator=g)
    concat[:, :4] = (torch.rand(2, 4, *SHAPE[2:], generator=g) > 0.5).float()  # mask channels are 0/1
    noise = torch.randn(SHAPE, generator=g)
    return cfg, (high, low), (_stage(cfg, high), _stage(cfg, low)), cond, uncond, concat, noise


def _plain_two_expert_i2v(models, cfgs, x, concat, cond, uncond, boundary=BOUNDARY_I2V, low_concat=None):
    """Euler over one whole video: at each step the expert of its sigma, fed [x, concat] on 36 channels, with that
    expert's guidance scale (one forward without guidance). ``low_concat`` replaces the concat on the low-noise
    steps (to show the test sees it)."""
    for i in range(len(SIGMAS) - 1):
        s, s1 = float(SIGMAS[i]), float(SIGMAS[i + 1])
        e = 0 if s * 1000.0 >= boundary * 1000.0 else 1
        c = concat if e == 0 or low_concat is None else low_concat
        t = torch.full((1,), s * 1000.0)
        with torch.no_grad():
            xin = torch.cat([x, c], dim=1)
            vc = models[e](xin, t, cond, return_dict=False)[0]
            v = vc if cfgs[e] == 1.0 else (lambda vu: vu + cfgs[e] * (vc - vu))(
                models[e](xin, t, uncond, return_dict=False)[0])
        x = x + v * (s1 - s)  # euler on a flow model: x + (x - denoised) / s * ds, denoised = x - s * v
    return x


def _job(cond, uncond, concat, noise, cfg_low):
    sc = SamplingConfig(sigmas=SIGMAS, sampler="euler", cfg=CFG, cfg_low=cfg_low, seed=42,
                        noise_mode="independent", num_per_block=8, num_cat=0)
    return Job(sc, SHAPE, cond, uncond, noise=noise, image=ImageConditioning(concat))


def _want(refs, cfgs, concat, noise, cond, uncond, **kw):
    return torch.cat([_plain_two_expert_i2v(refs, cfgs, noise[b:b + 1].clone(), concat[b:b + 1], cond, uncond, **kw)
                      for b in range(SHAPE[0])])


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("cfg_low", [1.0, 2.5, None], ids=["cfg_low1", "cfg_low2.5", "same"])
def test_one_block_equals_a_plain_two_expert_i2v_loop(pair, cfg_low):
    _, refs, stages, cond, uncond, concat, noise = pair
    experts = Experts(stages, BOUNDARY_I2V)
    assert [experts.expert(s) for s in SIGMAS[:-1]] == [HIGH, HIGH, HIGH, LOW, LOW]  # sigma == boundary: high
    out = run_single_process(experts, _job(cond, uncond, concat, noise, cfg_low))
    cfgs = (CFG, CFG if cfg_low is None else cfg_low)
    want = _want(refs, cfgs, concat, noise, cond, uncond)
    assert _rel(out, want) <= REL_TOL
    # the reference is sensitive to what this test is about: the low-noise expert reading its own video's concat,
    # the switch at the boundary (and not one step later), and the low-noise expert itself
    assert _rel(out, _want(refs, cfgs, concat, noise, cond, uncond, low_concat=torch.zeros_like(concat[:1]))) > 1e-2
    assert _rel(out, _want(refs, cfgs, concat, noise, cond, uncond, boundary=0.7)) > 1e-2
    alone = run_single_process(stages[0], _job(cond, uncond, concat, noise, None))
    assert _rel(alone, want) > 1e-2


def test_two_expert_i2v_over_several_blocks_is_the_experts_own_runs_at_the_extremes(pair):
    """Several blocks with K > 0: a boundary below every sigma runs the high-noise expert alone at cfg, one above
    every sigma the low-noise expert alone at cfg_low — bit for bit the single-stage I2V runs (our code against
    itself), so the pair's routing of the concat windows adds nothing of its own."""
    _, _, stages, cond, uncond, concat, noise = pair
    sc = SamplingConfig(sigmas=SIGMAS, sampler="uni_pc", cfg=CFG, cfg_low=2.0, seed=42, noise_mode="coordinated",
                        num_per_block=2, num_cat=1)
    image = ImageConditioning(concat)
    job = Job(sc, SHAPE, cond, uncond, image=image)
    assert torch.equal(run_single_process(Experts(stages, 0.0), job), run_single_process(stages[0], job))
    low = run_single_process(Experts(stages, 1.01), job)
    assert torch.equal(low, run_single_process(stages[1], Job(sc.with_(cfg=2.0, cfg_low=None), SHAPE, cond, uncond,
                                                               image=image)))
