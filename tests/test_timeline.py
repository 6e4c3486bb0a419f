"""The prompt timeline (issue 18): a prompt per stretch of the video, text K/V built once per prompt or blend.

References: with K = 0 every block is an independent video, so the timeline must equal a plain sampling loop of
diffusers' own Wan forward over each block alone with its own prompt (written here); N ranks must equal one process
bit for bit; the K/V counter is a wrapper around the stage's own ``prepare_text``."""

from __future__ import annotations

import weakref

import pytest
import torch
from fault_helpers import reference, tiny_job, tiny_spec
from references import pad_contexts
from test_engine import SIGMAS, _denoiser, _plain
from test_engine import setup as setup  # noqa: F401 - the module fixture (diffusers' Wan + our stage)

from dualparal_core.config import BlockLayout, SamplingConfig, WanConfig
from dualparal_core.engine import run_single_process
from dualparal_core.protocol import Job
from dualparal_core.timeline import Timeline, Track, first_video_frame, video_frames


def _texts(n: int, tokens: int, dim: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, tokens, dim, generator=g) for _ in range(n)]


def test_video_frames_and_the_block_each_stretch_starts():
    assert video_frames(21) == 81 and [first_video_frame(t) for t in (0, 1, 2, 20)] == [0, 1, 5, 77]
    layout = BlockLayout(6, 2, 0)  # blocks at latent 0, 2, 4 -> video frames 0, 5, 13
    a, b = _texts(2, 3, 8, 0)
    on = Timeline(Track((a, b), (0, 5)))  # a stretch starting exactly at a block's first frame takes that block
    after = Timeline(Track((a, b), (0, 6)))  # one frame later: block 1 keeps the first prompt
    assert [p for p, _ in on.plan(layout)] == [((0, 1.0),), ((1, 1.0),), ((1, 1.0),)]
    assert [p for p, _ in after.plan(layout)] == [((0, 1.0),), ((0, 1.0),), ((1, 1.0),)]
    # transition 8 centred on frame 6: block 1 (frame 5) 5/8 old + 3/8 new, block 2 (frame 13) all new
    blend = Timeline(Track((a, b), (0, 6)), transition=8).plan(layout)
    assert blend[1][0] == ((0, 0.625), (1, 0.375)) and blend[2][0] == ((1, 1.0),)
    assert Timeline(Track((a, b), (0, 6)), transition=8).block_labels(layout)[1] == "prompt 1 62% + prompt 2 38%"


def test_k0_two_prompt_timeline_equals_each_block_sampled_alone_with_its_prompt(setup):  # noqa: F811
    cfg, ref, stage, cond, uncond = setup
    a, b = _texts(2, cond.shape[1], cfg.text_dim, 7)
    shape = (1, 16, 6, 4, 6)  # K = 0, P = 2: three independent blocks at video frames 0, 5, 13
    sc = SamplingConfig(sigmas=SIGMAS, sampler="euler", cfg=3.0, seed=42, noise_mode="independent",
                        num_per_block=2, num_cat=0)
    tl = Timeline(Track((a, b), (0, 6)))  # block 0 and 1 (frames 0, 5): a; block 2 (frame 13): b
    out = run_single_process(stage, Job(sc, shape, a, uncond, timeline=tl))
    noise = torch.manual_seed(42) and torch.randn(shape)  # KSampler's prepare_noise, written out
    want = torch.empty(shape)
    for (s, e), prompt in zip(((0, 2), (2, 4), (4, 6)), (a, a, b)):
        want[:, :, s:e] = _plain("euler", SIGMAS, SIGMAS[0] * noise[:, :, s:e], _denoiser(ref, prompt, uncond, 3.0))
    # diffusers' forward against ours, float32: test_engine measured ~1e-6 for the same comparison; a wrong prompt
    # on a block moves it by far more (checked below)
    for s, e in ((0, 2), (2, 4), (4, 6)):
        o, w = out[:, :, s:e], want[:, :, s:e]
        assert ((o - w).norm() / w.norm()).item() <= 1e-5, (s, e)
    single = run_single_process(stage, Job(sc, shape, a, uncond))
    assert torch.equal(single[:, :, :4], out[:, :, :4])  # the blocks of prompt a are today's result, bit for bit
    assert ((single[:, :, 4:] - out[:, :, 4:]).norm() / out[:, :, 4:].norm()).item() > 1e-2


def _counting(stage):
    """Wrap ``stage.prepare_text``: (calls, alive) counters; alive counts K/V sets not yet freed."""
    seen = {"calls": 0, "alive": 0, "max_alive": 0}
    inner = stage.prepare_text

    def gone():
        seen["alive"] -= 1

    def counted(ctx, *args, **kwargs):
        kv = inner(ctx, *args, **kwargs)
        seen["calls"] += 1
        seen["alive"] += 1
        seen["max_alive"] = max(seen["max_alive"], seen["alive"])
        weakref.finalize(kv, gone)
        return kv

    stage.prepare_text = counted
    return seen


@pytest.mark.parametrize("transition,builds", [(0, 3), (16, 5)])
def test_text_kv_are_built_once_per_prompt_or_blend_and_freed_after_their_last_block(setup, transition,
                                                                                     builds):  # noqa: F811
    cfg, ref, stage, cond, uncond = setup
    a, b, c = _texts(3, cond.shape[1], cfg.text_dim, 3)
    # 6 blocks at video frames 0, 9, 17, 25, 33, 41; stretches a | b from 17 | c from 33: a a b b c c, and with
    # transition 16 centred on 17 and 33: a a ab b bc c (5 distinct)
    sc = SamplingConfig(sigmas=(1.0, 0.5, 0.0), sampler="euler", cfg=3.0, seed=1, num_per_block=2, num_cat=1)
    job = Job(sc, (1, 16, 13, 4, 4), a, uncond, timeline=Timeline(Track((a, b, c), (0, 17, 33)),
                                                                   transition=transition))
    seen = _counting(stage)
    try:
        run_single_process(stage, job)
    finally:
        del stage.prepare_text
    assert seen["calls"] == builds  # once per distinct prompt or blend (cond and uncond batched: one call each)
    # two steps: at most two blocks are in flight, so at most two prompts' K/V are alive, however many prompts
    assert seen["max_alive"] <= 2 and seen["alive"] == 0


def test_two_experts_build_each_prompt_once_per_expert_and_skip_the_negative_without_cfg():
    """Wan2.2 A14B: the high-noise expert at cfg 3 reads (positive, negative) blends, the low-noise one at cfg_low 1
    the positive alone, so a negative that changes where the positive does not costs the low expert nothing."""
    from test_experts import _diffusers, _stage

    from dualparal_core.experts import Experts

    cfg = WanConfig.tiny(num_layers=2)
    high, low = _stage(cfg, _diffusers(cfg, 0)), _stage(cfg, _diffusers(cfg, 1))
    a, b, n1, n2 = _texts(4, 6, cfg.text_dim, 5)
    sc = SamplingConfig(sigmas=(1.0, 0.9, 0.5, 0.0), sampler="euler", cfg=3.0, cfg_low=1.0, seed=1,
                        num_per_block=2, num_cat=1)  # steps 0, 1 high-noise, step 2 low-noise
    # blocks at video frames 0, 9, 17: positive a b b, negative n1 n1 n2
    tl = Timeline(Track((a, b), (0, 9)), Track((n1, n2), (0, 17)))
    seen = {"high": _counting(high), "low": _counting(low)}
    try:
        run_single_process(Experts((high, low), 0.875), Job(sc, (1, 16, 7, 4, 4), a, n1, timeline=tl))
    finally:
        del high.prepare_text, low.prepare_text
    assert seen["high"]["calls"] == 3 and seen["low"]["calls"] == 2  # (a,n1) (b,n1) (b,n2); a, b
    assert seen["high"]["alive"] == seen["low"]["alive"] == 0


def test_a_tag_on_the_negative_only_changes_the_negative_per_stretch(setup):  # noqa: F811
    """Documented rule: an untagged positive covers the whole video; a tagged negative changes per stretch."""
    cfg, ref, stage, cond, uncond = setup
    n1, n2 = _texts(2, 4, cfg.text_dim, 9)  # a negative of another length than the positive: split halves
    sc = SamplingConfig(sigmas=SIGMAS, sampler="euler", cfg=3.0, seed=5, num_per_block=2, num_cat=0)
    shape = (1, 16, 7, 4, 4)  # K = 0: independent blocks at video frames 0, 5, 13, 21
    tl = Timeline(Track.single(cond), Track((n1, n2), (0, 17)))
    out = run_single_process(stage, Job(sc, shape, cond, n1, timeline=tl))
    assert [k for _, k in tl.plan(BlockLayout(7, 2, 0))] == [((0, 1.0),)] * 3 + [((1, 1.0),)]
    only_n1 = run_single_process(stage, Job(sc, shape, cond, n1))
    assert torch.equal(out[:, :, :6], only_n1[:, :, :6])  # the blocks of the first negative: today's result
    assert not torch.allclose(out[:, :, 6:], only_n1[:, :, 6:])


def test_cross_attention_per_batch_half_equals_padding_to_the_lcm(setup):  # noqa: F811
    cfg, ref, stage, cond, uncond = setup
    c, u = _texts(1, 6, cfg.text_dim, 1)[0], _texts(1, 4, cfg.text_dim, 2)[0]
    a, b = stage.prepare_text(c), stage.prepare_text(u)
    split = type(a)({i: (a.kv[i], b.kv[i]) for i in a.kv})
    padded = stage.prepare_text(torch.cat(pad_contexts(c, u)))  # the old way: both repeated to 12 tokens
    h = torch.randn(2, 3 * 2 * 3, cfg.dim)
    tproj = stage.time_embed(torch.tensor([500.0, 500.0]))[0]
    x, _ = stage.blocks_forward(h, tproj, split, (3, 2, 3))
    y, _ = stage.blocks_forward(h, tproj, padded, (3, 2, 3))
    # repeating every key n times leaves softmax weights unchanged: only float32 summation order differs (~1e-7)
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


TINY = WanConfig.tiny()


@pytest.mark.parametrize("starts,texts,transition,needle", [
    ((0, 30), None, 0, "starts at video frame 30 but the video has 25 frames"),
    ((0, 8, 8), None, 0, "prompt 2 and prompt 3 both start at video frame 8"),
    ((4, 8), None, 0, "first must start at 0"),
    ((0, 12), [5, 6], 8, "only prompts of one token count can blend"),
    ((0, 12), [5, 5], -1, "transition=-1"),
])
def test_bad_timelines_are_refused_naming_the_stretch(starts, texts, transition, needle):
    job = tiny_job(batch=1)  # 7 latent frames: 25 video frames
    lens = texts or [5] * len(starts)
    tl = Timeline(Track(tuple(torch.zeros(1, n, 64) for n in lens), starts), transition=transition)
    job.timeline = tl
    with pytest.raises(ValueError, match=needle):
        job.validate(TINY)


def test_a_stretch_no_block_starts_in_is_named_in_a_warning():
    layout = BlockLayout(13, 2, 1)  # blocks at video frames 0, 9, 17, 25, 33, 41
    a, b, c = _texts(3, 2, 8, 0)
    tl = Timeline(Track((a, b, c), (0, 18, 24), ("sea", "storm", "sun")))
    (msg,) = tl.unused(layout)
    assert "storm" in msg and "18-23" in msg and "shorter than a block" in msg
    assert Timeline(Track((a, b, c), (0, 18, 24)), transition=8).unused(layout) == []  # blended in: used


def _dist_job(**kw) -> Job:
    """13 latent frames, P = K = 2: 6 blocks at video frames 0, 13, 21, 29, 37, 45; three prompts with a
    transition around each boundary and a tagged negative."""
    job = tiny_job(batch=1, frames=13, **kw)
    pos = tuple(_texts(3, 5, 64, 21))
    neg = tuple(_texts(2, 3, 64, 22))  # another length than the positive: cross-attention per batch half
    job.cond, job.uncond = pos[0], neg[0]
    job.timeline = Timeline(Track(pos, (0, 20, 36)), Track(neg, (0, 30)), transition=8)
    return job


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2, 3])
def test_n_ranks_with_a_timeline_match_the_single_process_reference(world, no_leftover_workers):
    from dualparal_core.pool import WorkerPool

    job = _dist_job()
    want = reference(job)
    plain = _dist_job()
    plain.timeline = None
    # the timeline changes the video (the tiny random model reads text weakly: 4e-3, far above float noise)
    assert ((reference(plain) - want).norm() / want.norm()).item() > 1e-3
    pool = WorkerPool.start(tiny_spec(world))
    try:
        assert torch.equal(pool.generate(job), want), f"{world} rank(s) differ"
    finally:
        pool.close()


# ------------------------------------------------------------------------------------------------ node layer
def _node(name: str):
    from test_nodes_unit import _pack_module  # the pack's node modules, imported as ComfyUI imports them

    return _pack_module(name)


def _entry(seed: int, tokens: int = 7, **extra):
    return [[torch.randn(1, tokens, 4096, generator=torch.Generator().manual_seed(seed)),
             {"pooled_output": None, **extra}]]


def test_tags_are_read_back_in_start_order_whatever_the_combine_order():
    P = _node("prompts")
    assert P.start_frame(2.5, "seconds", 16) == 40 and P.start_frame(33, "frames", 16) == 33
    with pytest.raises(ValueError, match="not a whole frame"):
        P.start_frame(3.5, "frames", 16)
    a, b, c = _entry(1), _entry(2), _entry(3)
    chained = P.tag(b, 40, "storm", previous=P.tag(a, 0, "calm sea"))  # the node's `previous` chain
    combined = P.tag(c, 80, "") + chained  # Conditioning Combine is list concatenation, in any order
    # WanImageToVideo & co. copy each entry's dict and add keys (node_helpers.conditioning_set_values): written out
    copied = [[t, {**d, "some_key_a_node_adds": None}] for t, d in combined]
    track = P.read_track(copied, "positive", 4096)
    assert track.starts == (0, 40, 80) and track.labels == ("calm sea", "storm", "prompt at frame 80")
    assert all(torch.equal(x, y[0][0]) for x, y in zip(track.texts, (a, b, c)))
    assert "dualparal_start" not in a[0][1]  # the input entries are not modified (ComfyUI caches them)


def test_untagged_prompts_give_exactly_todays_job_and_mixed_tags_are_refused():
    P = _node("prompts")
    T = _node("types")
    pos, neg = _entry(1), _entry(2, tokens=5)
    cond, uncond, tl = P.conditionings(pos, neg, True, 4096, 8)
    assert tl is None and torch.equal(cond, T.extract_conditioning(pos, "positive", 4096))
    assert torch.equal(uncond, T.extract_conditioning(neg, "negative", 4096))
    with pytest.raises(ValueError, match="holds 2 conditionings"):  # combined without tags: as before
        P.conditionings(pos + neg, neg, True, 4096, 0)
    with pytest.raises(ValueError, match="entry 2 has no DualParal Prompt At tag"):
        P.conditionings(P.tag(pos, 0, "a") + _entry(3), neg, True, 4096, 0)
    cond, uncond, tl = P.conditionings(pos, P.tag(neg, 0, "n1") + P.tag(_entry(4, 5), 20, "n2"), True, 4096, 0)
    assert tl.negative.starts == (0, 20) and tl.positive.starts == (0,) and torch.equal(uncond, tl.negative.texts[0])
    _, uncond, tl = P.conditionings(pos, P.tag(neg, 0, "n1"), False, 4096, 0)  # cfg 1: the negative is unused
    assert tl is None and uncond is None
    with pytest.raises(ValueError, match=r"positive \(storm\) carries 'vace_frames'"):  # (I2V keys pass: issue 17)
        P.conditionings(P.tag(_entry(5, vace_frames=torch.zeros(1)), 0, "storm"), neg, True, 4096, 0)


def test_status_line_names_the_newest_blocks_prompt_once_per_change():
    from dualparal_core.schedule import Schedule

    P = _node("prompts")
    layout = BlockLayout(13, 2, 1)  # 6 blocks at video frames 0, 9, 17, 25, 33, 41
    a, b = _texts(2, 2, 8, 0)
    line = P.status_lines(Timeline(Track((a, b), (0, 17), ("sea", "storm"))), Schedule(layout, 2))
    shown = [line(d) for d in range(1, 13)]  # items: b0 | b1 b0 | b2 b1 | b3 b2 | b4 b3 | b5 b4 | b5
    assert [s for s in shown if s] == [f"block {j}/6: {p}" for j, p in
                                       ((1, "sea"), (2, "sea"), (3, "storm"), (4, "storm"), (5, "storm"),
                                        (6, "storm"))]
    assert shown[2] is None  # block 1 is still the newest: nothing new to show
