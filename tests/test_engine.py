"""The single-process engine against a plain full-sequence sampling loop written here (DESIGN §5 property 2):
one block covering every frame, no context and independent noise must reproduce it for every sampler."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from test_samplers import _load_k_diffusion_sampling, unipc_reference

from dualparal_core.config import SamplingConfig, WanConfig
from dualparal_core.engine import JobCancelled, run_single_process
from dualparal_core.model import WanStage
from dualparal_core.protocol import Job

SHAPE = (2, 16, 5, 4, 6)  # two videos, 5 latent frames
SIGMAS = (1.0, 0.9, 0.75, 0.5, 0.2, 0.0)


@pytest.fixture(scope="module")
def setup():
    cfg = WanConfig.tiny(num_layers=2)
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg.diffusers_kwargs()).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in n and p.ndim == 1 else 0.0))
    stage = WanStage(cfg, range(2), embed=True, head=True)
    stage.load_weights(ref.state_dict())
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 11, cfg.text_dim, generator=g), torch.randn(1, 11, cfg.text_dim, generator=g)
    return cfg, ref, stage, cond, uncond


def _denoiser(ref, cond, uncond, cfg_scale):
    """x0 prediction of diffusers' own Wan forward on the whole video, with CFG on the velocity."""
    def fn(x, sigma):
        s = float(sigma.reshape(-1)[0])
        with torch.no_grad():
            t = torch.full((x.shape[0],), s * 1000.0)
            vc = ref(x, t, cond.expand(x.shape[0], -1, -1), return_dict=False)[0]
            vu = ref(x, t, uncond.expand(x.shape[0], -1, -1), return_dict=False)[0]
        return x - s * (vu + cfg_scale * (vc - vu))
    return fn


def _plain(name, sigmas, x, model):
    s = torch.tensor(sigmas, dtype=torch.float32)
    if name == "euler":  # the two-line formula
        for i in range(len(s) - 1):
            x = x + (x - model(x, s[i])) / s[i] * (s[i + 1] - s[i])
        return x
    if name == "dpmpp_2m":
        return _load_k_diffusion_sampling().sample_dpmpp_2m(
            lambda xx, ss: model(xx, ss), x, s, disable=True)
    out = unipc_reference({"uni_pc": "bh1", "uni_pc_bh2": "bh2"}[name], s, x, model)
    # KSampler's last act for a flow model is inverse_noise_scaling, latent / (1 - sigma_last); ComfyUI's uni_pc
    # has replaced a final 0 in the table by 0.001 in place, so KSampler divides by 1 - 0.001.
    return out / (1 - 0.001)


@pytest.mark.parametrize("sampler", ["euler", "uni_pc", "uni_pc_bh2", "dpmpp_2m"])
def test_one_block_equals_plain_full_sequence_sampling(setup, sampler):
    cfg, ref, stage, cond, uncond = setup
    sc = SamplingConfig(sigmas=SIGMAS, sampler=sampler, cfg=3.0, seed=42, noise_mode="independent",
                        num_per_block=8, num_cat=0)
    out = run_single_process(stage, Job(sc, SHAPE, cond, uncond))
    noise = torch.manual_seed(42) and torch.randn(SHAPE)   # KSampler's prepare_noise, written out
    model = _denoiser(ref, cond, uncond, 3.0)
    want = torch.cat([_plain(sampler, SIGMAS, SIGMAS[0] * noise[b:b + 1], model) for b in range(2)])
    # float32 throughout; uni_pc's reference runs diffusers' solver on x/sqrt(1+sigma^2) (ComfyUI's VE reading of
    # the table), whose extra roundings leave ~1e-5 — far below the 1e-3 any real difference in the maths gives.
    tol = 5e-5 if sampler.startswith("uni_pc") else 1e-5
    assert ((out - want).norm() / want.norm()).item() <= tol


def test_cfg_one_skips_the_negative(setup):
    cfg, ref, stage, cond, uncond = setup
    sc = SamplingConfig(sigmas=SIGMAS, sampler="euler", cfg=1.0, seed=1, noise_mode="independent",
                        num_per_block=8, num_cat=0)
    out = run_single_process(stage, Job(sc, SHAPE, cond, None))
    noise = torch.manual_seed(1) and torch.randn(SHAPE)
    want = torch.cat([_plain("euler", SIGMAS, SIGMAS[0] * noise[b:b + 1], _denoiser(ref, cond, cond, 1.0))
                      for b in range(2)])
    assert ((out - want).norm() / want.norm()).item() <= 1e-5


def test_blocks_with_context_differ_from_without_and_are_deterministic(setup):
    cfg, ref, stage, cond, uncond = setup
    shape = (1, 16, 9, 4, 4)

    def run(K):
        sc = SamplingConfig(sigmas=SIGMAS, sampler="uni_pc", cfg=3.0, seed=5, num_per_block=3, num_cat=K)
        return run_single_process(stage, Job(sc, shape, cond, uncond))

    a, b, c = run(2), run(2), run(0)
    assert torch.equal(a, b) and a.isfinite().all()
    assert not torch.allclose(a, c)


def test_progress_counts_block_steps_and_cancel_stops(setup):
    cfg, ref, stage, cond, uncond = setup
    sc = SamplingConfig(sigmas=SIGMAS, sampler="euler", cfg=3.0, seed=5, num_per_block=2, num_cat=1)
    job = Job(sc, (1, 16, 7, 4, 4), cond, uncond, preview=True)  # blocks of 3, 2, 2 frames -> 15 block-steps
    seen = []
    run_single_process(stage, job, progress=lambda d, t, p: seen.append((d, t, None if p is None else p.shape)))
    assert [s[0] for s in seen] == list(range(1, 16)) and {s[1] for s in seen} == {15}
    assert all(s[2] is not None and s[2][2] in (2, 3) for s in seen)  # x0 preview of the block just stepped
    count = []
    with pytest.raises(JobCancelled):
        run_single_process(stage, job, progress=lambda d, t, p: count.append(d), cancelled=lambda: len(count) >= 4)
    assert len(count) == 4


@pytest.mark.parametrize("bad,needle", [
    (dict(shape=(1, 16, 5, 4)), "5-D"),
    (dict(shape=(1, 48, 5, 4, 4)), "48 channels"),
    (dict(shape=(1, 16, 5, 3, 4)), "divisible by the patch size"),
    (dict(cond=torch.zeros(1, 7, 99)), "positive conditioning has shape"),
    (dict(uncond=None), "needs a negative conditioning"),
    (dict(latent=torch.full((1, 16, 5, 4, 4), float("nan"))), "NaN"),
])
def test_bad_jobs_are_refused_before_any_work(setup, bad, needle):
    cfg, ref, stage, cond, uncond = setup
    sc = SamplingConfig(sigmas=SIGMAS, sampler="euler", cfg=3.0)
    kw = dict(sampling=sc, shape=(1, 16, 5, 4, 4), cond=cond, uncond=uncond)
    kw.update(bad)
    with pytest.raises(ValueError, match=needle):
        run_single_process(stage, Job(**kw))


def _recording_engine(stage):
    """A RankEngine with pre-warm on, recording the shapes of every layer and head call and whether pre-warm made
    it (the property pre-warm exists for: no kernel shape is new once the pipeline runs)."""
    from dualparal_core.engine import RankEngine

    eng = RankEngine(stage)
    eng.prewarm = True
    calls = {"warm": [], "job": []}
    phase = ["job"]
    inner_bf, inner_head, inner_pw = eng.model.blocks_forward, eng._head, eng._prewarm

    def bf(h, tproj, text, grid, right=None, keep=None, expert=0, out_from=0):
        r = None if right is None else next(iter(right.values()))[0].shape
        kv = text.kv[0]  # (k, v), or one (k, v) per batch half when cond and uncond differ in length
        ts = tuple(kv[0].shape) if isinstance(kv[0], torch.Tensor) else tuple(tuple(p[0].shape) for p in kv)
        calls[phase[0]].append(("layers", tuple(h.shape), tuple(grid), r, keep, out_from, ts, expert, h.shape[0]))
        return inner_bf(h, tproj, text, grid, right=right, keep=keep, expert=expert, out_from=out_from)

    def head(item, h):
        calls[phase[0]].append(("head", tuple(h.shape), eng._window(item)))
        return inner_head(item, h)

    def pw():
        phase[0] = "warm"
        try:
            inner_pw()
        finally:
            phase[0] = "job"

    eng.model.blocks_forward, eng._head, eng._prewarm = bf, head, pw
    return eng, calls


@pytest.mark.parametrize("frames,P,K", [(9, 3, 2), (8, 3, 1), (5, 2, 0)])
def test_prewarm_runs_every_kernel_shape_of_the_job_before_it_starts(setup, frames, P, K):
    cfg, ref, stage, cond, uncond = setup
    sc = SamplingConfig(sigmas=SIGMAS, sampler="uni_pc", cfg=3.0, seed=5, num_per_block=P, num_cat=K)
    job = Job(sc, (1, 16, frames, 4, 4), cond, uncond)
    eng, calls = _recording_engine(stage)
    out = eng.run_job(job)
    assert torch.equal(out, run_single_process(stage, job))  # pre-warm leaves no trace in the result
    assert calls["job"] and set(calls["job"]) <= set(calls["warm"]), set(calls["job"]) - set(calls["warm"])
    assert len(calls["warm"]) == len(set(calls["warm"]))  # each shape once
    n_warm = len(calls["warm"])
    eng.run_job(job)  # same shapes: nothing new to warm
    assert len(calls["warm"]) == n_warm
    eng.run_job(Job(sc, (1, 16, frames + 3, 4, 4), cond, uncond))  # a new last-block length: only that is warmed
    assert len(calls["job"]) > 0 and set(calls["job"]) <= set(calls["warm"])
