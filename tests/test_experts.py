"""Two experts (Wan2.2 A14B) in the engine: each block-step runs the expert of its sigma with that expert's cfg.

Against an independent reference (a plain full-sequence euler loop over two diffusers ``WanTransformer3DModel``s
that switches experts itself), the boundary extremes against single-expert runs, and the right-context rule: the
cache passes only between block-steps of the same expert (the one step of each block that is its first on the
low-noise expert runs without right context)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from dualparal_core.config import ModelSource, SamplingConfig, WanConfig
from dualparal_core.engine import run_single_process
from dualparal_core.experts import HIGH, LOW, Experts
from dualparal_core.model import WanStage
from dualparal_core.protocol import Job

SHAPE = (1, 16, 5, 4, 6)
SIGMAS = (1.0, 0.95, 0.9, 0.8, 0.6, 0.3, 0.0)  # boundary 0.875: steps 0-2 high-noise, 3-5 low-noise


def _diffusers(cfg: WanConfig, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    m = WanTransformer3DModel(**cfg.diffusers_kwargs()).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in n and p.ndim == 1 else 0.0))
    return m


def _stage(cfg: WanConfig, ref: WanTransformer3DModel) -> WanStage:
    st = WanStage(cfg, range(cfg.num_layers), embed=True, head=True)
    st.load_weights(ref.state_dict())
    return st


@pytest.fixture(scope="module")
def pair():
    cfg = WanConfig.tiny(num_layers=2)
    high, low = _diffusers(cfg, 0), _diffusers(cfg, 1)
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 11, cfg.text_dim, generator=g), torch.randn(1, 9, cfg.text_dim, generator=g)
    return cfg, (high, low), (_stage(cfg, high), _stage(cfg, low)), cond, uncond


def _plain_two_experts(models, sigmas, boundary, cfgs, x, cond, uncond):
    """Euler over the whole video, switching models by sigma: the reference, written without the engine."""
    from references import pad_contexts

    c, u = pad_contexts(cond, uncond)
    for i in range(len(sigmas) - 1):
        s = float(sigmas[i])
        e = 0 if s >= boundary else 1
        t = torch.full((1,), s * 1000.0)
        with torch.no_grad():
            vc = models[e](x, t, c, return_dict=False)[0]
            v = vc if cfgs[e] == 1.0 else (lambda vu: vu + cfgs[e] * (vc - vu))(
                models[e](x, t, u, return_dict=False)[0])
        x = x + v * (float(sigmas[i + 1]) - s)  # euler on a flow model: x + (x - denoised) / s * ds
    return x


def _job(cond, uncond, *, cfg=4.0, cfg_low=None, sigmas=SIGMAS, shape=SHAPE, P=8, K=0, noise="independent"):
    sc = SamplingConfig(sigmas=sigmas, sampler="euler", cfg=cfg, cfg_low=cfg_low, seed=42, noise_mode=noise,
                        num_per_block=P, num_cat=K)
    return Job(sc, shape, cond, uncond)


@pytest.mark.parametrize("cfg_low", [1.0, 2.5, None], ids=["cfg_low1", "cfg_low2.5", "same"])
def test_one_block_equals_a_plain_loop_that_switches_experts(pair, cfg_low):
    cfg, refs, stages, cond, uncond = pair
    out = run_single_process(Experts(stages, 0.875), _job(cond, uncond, cfg_low=cfg_low))
    noise = torch.manual_seed(42) and torch.randn(SHAPE)
    cfgs = (4.0, 4.0 if cfg_low is None else cfg_low)
    want = _plain_two_experts(refs, SIGMAS, 0.875, cfgs, SIGMAS[0] * noise, cond, uncond)
    assert ((out - want).norm() / want.norm()).item() <= 1e-5
    # and the low-noise expert mattered: the high-noise one alone gives something else
    alone = run_single_process(stages[0], _job(cond, uncond))
    assert ((out - alone).norm() / want.norm()).item() > 1e-2


def test_boundary_extremes_are_the_single_experts(pair):
    cfg, refs, stages, cond, uncond = pair
    both = Experts(stages, 0.0)  # every sigma >= 0: the high-noise expert alone, at cfg
    job = _job(cond, uncond, cfg=3.0, cfg_low=1.0, K=1, P=2)
    assert torch.equal(run_single_process(both, job), run_single_process(stages[0], _job(cond, uncond, cfg=3.0,
                                                                                        K=1, P=2)))
    sig = (0.85, 0.7, 0.4, 0.0)  # boundary 0.9 > sigma[0]: the low-noise expert alone, at cfg_low
    low = run_single_process(Experts(stages, 0.9), _job(cond, uncond, cfg=3.0, cfg_low=2.0, sigmas=sig, K=1, P=2))
    assert torch.equal(low, run_single_process(stages[1], _job(cond, uncond, cfg=2.0, sigmas=sig, K=1, P=2)))
    # cfg_low is ignored with one expert
    one = run_single_process(stages[0], _job(cond, uncond, cfg=3.0, cfg_low=7.0, K=1, P=2))
    assert torch.equal(one, run_single_process(stages[0], _job(cond, uncond, cfg=3.0, K=1, P=2)))


def _is_high(step: int) -> bool:
    return SIGMAS[step] >= 0.875


class _Spy(Experts):
    """Records, per block-step: expert, batch, whether it read a right-context cache and which expert wrote it."""

    def __init__(self, stages, boundary):
        super().__init__(stages, boundary)
        self.calls = []

    def blocks_forward(self, h, tproj, text, grid, right=None, keep=None, expert=HIGH, out_from=0):
        writer = None if right is None else right.pop("writer")
        out, cache = super().blocks_forward(h, tproj, text, grid, right=right, keep=keep, expert=expert,
                                            out_from=out_from)
        self.calls.append((expert, h.shape[0], writer, keep is not None))
        if cache is not None:
            cache["writer"] = expert
        return out, cache


def test_right_context_only_between_block_steps_of_one_expert(pair):
    cfg, refs, stages, cond, uncond = pair
    spy = _Spy(stages, 0.875)
    shape = (1, 16, 9, 4, 4)  # P=2, K=2: blocks of 4, 2, 2, 1 frames
    out = run_single_process(spy, _job(cond, uncond, cfg=3.0, cfg_low=1.0, shape=shape, P=2, K=2,
                                       noise="coordinated"))
    assert out.isfinite().all()
    from dualparal_core.schedule import Schedule

    layout = SamplingConfig(sigmas=SIGMAS, num_per_block=2, num_cat=2).layout(9)
    items = Schedule(layout, 6).items
    aware = Schedule(layout, 6, [HIGH if _is_high(s) else LOW for s in range(6)]).items  # what the engine runs
    assert len(spy.calls) == len(items)
    lost = 0
    for it, (expert, batch, writer, kept), ai in zip(items, spy.calls, aware):
        assert ai.expert == expert and bool(ai.keep) == kept and bool(ai.right) == (writer is not None)
        want = HIGH if SIGMAS[it.step] >= 0.875 else LOW
        nxt = items[it.index + 1] if it.index + 1 < len(items) else None
        # K/V are kept exactly when the next block-step will read them
        assert kept == (nxt is not None and nxt.right_ctx and _is_high(nxt.step - 1) == _is_high(nxt.step))
        assert expert == want and batch == (2 if want == HIGH else 1)  # cfg 3 on high, cfg_low 1 on low
        if writer is not None:
            assert writer == expert  # never the other expert's keys
        if it.right_ctx and writer is None:
            lost += 1
            assert SIGMAS[it.step - 1] >= 0.875 > SIGMAS[it.step]  # only the first low-noise step of a block
    assert lost == 3  # blocks 0..2 each cross while a newer block is still on the high-noise expert


def test_expert_pair_must_match_and_lora_routing_is_checked():
    cfg = WanConfig.tiny(num_layers=2)
    a = WanStage(cfg, range(2), embed=True, head=True)
    b = WanStage(WanConfig.tiny(num_layers=3), range(2), embed=True, head=True)
    with pytest.raises(ValueError, match="same shape"):
        Experts((a, b))
    with pytest.raises(ValueError, match="low-noise expert"):
        ModelSource(random_config=cfg, loras=(("x.safetensors", 1.0, "low"),))
    with pytest.raises(ValueError, match="boundary"):
        ModelSource(random_config=cfg, random_low_seed=1, boundary=1.5)
    src = ModelSource(random_config=cfg, random_low_seed=1,
                      loras=(("a", 1.0, "both"), ("h", 1.0, "high"), ("l", 1.0, "low"), ("old", 1.0)))
    assert [e[0] for e in src.expert_loras(0)] == ["a", "h", "old"]
    assert [e[0] for e in src.expert_loras(1)] == ["a", "l", "old"]


def test_prewarm_covers_both_experts_and_their_batches(pair):
    """Two experts at cfg and cfg_low 1: batches 2 and 1, and the block-step without right context at the switch —
    every one of those kernel shapes is run by pre-warm before the job's first block-step."""
    from test_engine import _recording_engine

    _, _, stages, cond, uncond = pair
    job = _job(cond, uncond, cfg=3.0, cfg_low=1.0, K=1, P=2)
    eng, calls = _recording_engine(Experts(stages, 0.875))
    out = eng.run_job(job)
    assert torch.equal(out, run_single_process(Experts(stages, 0.875), job))
    assert {c[-1] for c in calls["job"] if c[0] == "layers"} == {2, 1}  # both batches ran
    assert {c[-2] for c in calls["job"] if c[0] == "layers"} == {HIGH, LOW}
    assert set(calls["job"]) <= set(calls["warm"]), set(calls["job"]) - set(calls["warm"])
