"""The right-context K/V cache held in e4m3 (``PoolSpec.kv_cache="fp8"``) or in pinned host memory ("offload"),
dualparal_core/kvcache.py: the fp8 rounding against a bound derived from e4m3's format, the bytes against the memory
plan, N ranks against one, the error fp8 puts in sampled latents against the exact cache, and (GPU tier) the
offloaded cache giving the exact cache's bits with the GPU memory the plan says."""

from __future__ import annotations

import pytest
import torch
from fault_helpers import tiny_job, tiny_spec

from dualparal_core import kvcache
from dualparal_core.config import ModelSource, PoolSpec, WanConfig
from dualparal_core.engine import run_single_process
from dualparal_core.memplan import pinned_bytes, plan_rank
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


def _two_block_steps(stage: WanStage, frames: int = 4, k_frames: int = 2, gh: int = 4, gw: int = 4):
    """A block-step that keeps its first ``k_frames`` frames' K/V, then one that reads them as right context (the
    engine's order): the second block-step's output."""
    cfg, dev = stage.config, stage.device
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.in_channels, frames, gh * 2, gw * 2, generator=g)
    tproj, _ = stage.time_embed(torch.full((2,), 500.0))
    text = stage.prepare_text(torch.randn(2, 5, cfg.text_dim, generator=g).to(dev))
    _, cache = stage.blocks_forward(stage.embed(x), tproj, text, (frames, gh, gw), keep=(0, k_frames * gh * gw))
    return stage.blocks_forward(stage.embed(x.flip(2)), tproj, text, (frames, gh, gw), right=cache)[0]


def _bytes(entry) -> int:
    return entry.nbytes if isinstance(entry, kvcache.HostEntry) else sum(t.numel() * t.element_size() for t in entry)


@pytest.mark.parametrize("mode", ["exact", "fp8", "offload"])
def test_the_kept_bytes_are_what_the_memory_plan_says(mode):
    """A bf16 stage's real cache (every layer's kept K and V of K frames, batch 2) against memplan's cache term
    (offload: the host term; the GPU keeps OFFLOAD_LAYERS layers of it)."""
    from dualparal_core.memplan import OFFLOAD_LAYERS

    cfg = WanConfig.tiny(num_layers=5)
    stage = WanStage(cfg, range(cfg.num_layers), embed=True, head=True, dtype=torch.bfloat16)
    stage.init_random(0)
    stage.kv_keep = kvcache.KEEPERS[mode]
    frames, k_frames, gh, gw = 4, 2, 4, 4
    x = torch.randn(2, cfg.in_channels, frames, gh * 2, gw * 2)
    h = stage.embed(x)
    tproj, _ = stage.time_embed(torch.full((2,), 500.0))
    text = stage.prepare_text(torch.randn(2, 5, cfg.text_dim))
    _, cache = stage.blocks_forward(h, tproj, text, (frames, gh, gw), keep=(0, k_frames * gh * gw))
    kept = sum(_bytes(e) for e in cache.values())
    plan = plan_rank(cfg, range(cfg.num_layers), embed=True, head=True, dtype="bf16", frames_k=k_frames,
                     tpf=gh * gw, kv_cache=mode)
    exact = plan_rank(cfg, range(cfg.num_layers), embed=True, head=True, dtype="bf16", frames_k=k_frames,
                      tpf=gh * gw)
    if mode == "offload":
        assert all(isinstance(e, kvcache.HostEntry) for e in cache.values())
        assert kept == exact.cache  # the same values as the exact cache, held elsewhere
        pinned = sum(pinned_bytes(t.numel() * t.element_size()) for e in cache.values() for t in (e.k, e.v))
        assert plan.host == pinned >= kept  # as the pinned allocator takes them: each rounded up to a power of two
        assert plan.cache == exact.cache // cfg.num_layers * OFFLOAD_LAYERS
        return
    assert kept == plan.cache and plan.host == 0
    if mode == "fp8":  # one byte per value and a float32 scale per token: about half of bf16's two bytes
        assert kept == exact.cache * (cfg.dim + 4) // (2 * cfg.dim)


@pytest.mark.dist
@pytest.mark.parametrize("mode", ["fp8", "offload"])
def test_one_two_and_three_ranks_give_the_same_bits_and_only_fp8_moves_the_latents(mode, no_leftover_workers):
    from dualparal_core.pool import WorkerPool

    job = tiny_job("uni_pc", steps=3)
    one = run_single_process(build_stage(tiny_spec(1, kv_cache=mode), 0)[0], job)
    for world in (2, 3):
        pool = WorkerPool.start(tiny_spec(world, kv_cache=mode))
        try:
            assert torch.equal(pool.generate(job), one), world
        finally:
            pool.close()
    exact = run_single_process(build_stage(tiny_spec(1), 0)[0], job)
    if mode == "offload":  # the same values, held elsewhere
        assert torch.equal(one, exact)
        return
    # only the right-context frames' keys and values are rounded (RMS about 2**-5.5 of each value); the latents
    # move far less than that and are not a different model's (measured on this job: 1.1e-5)
    err = _rel(one, exact)
    assert 0 < err < 1e-2, err


def test_a_bad_mode_is_refused_by_name():
    with pytest.raises(ValueError, match=r"kv_cache='bf8' is not supported; choose one of \['exact', 'offload', 'fp8'\]"):
        PoolSpec(ModelSource(random_config=WanConfig.tiny()), kv_cache="bf8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine only)")
def test_on_a_gpu_the_offloaded_cache_gives_the_exact_bits_in_a_few_layers_of_memory():
    """Two block-steps (keep, then read as right context) of a 12-layer bf16 stage on the GPU, exact vs offload:
    the same output bits, and the second block-step's peak over the resident memory lower by the cache less the
    OFFLOAD_LAYERS layers the plan leaves on the GPU (to within one layer)."""
    from dualparal_core.memplan import OFFLOAD_LAYERS

    cfg = WanConfig.tiny(num_layers=12)
    outs, peaks = {}, {}
    for mode in ("exact", "offload", "exact"):  # exact twice: the allocator warmed the same way for both
        stage = WanStage(cfg, range(cfg.num_layers), embed=True, head=True, dtype=torch.bfloat16, device="cuda")
        stage.init_random(0)
        stage.kv_keep = kvcache.KEEPERS[mode]
        _two_block_steps(stage, frames=8, k_frames=4, gh=16, gw=16)  # warm-up (pinned and device allocators)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = _two_block_steps(stage, frames=8, k_frames=4, gh=16, gw=16)
        torch.cuda.synchronize()
        outs[mode], peaks[mode] = out.cpu(), torch.cuda.max_memory_allocated() - base
        del stage, out
        torch.cuda.empty_cache()
    assert torch.equal(outs["offload"], outs["exact"])
    layer = 4 * 16 * 16 * 2 * 2 * cfg.dim * 2  # K frames x tokens x (k, v) x batch x dim x bf16 bytes
    saved = peaks["exact"] - peaks["offload"]
    assert saved >= (cfg.num_layers - OFFLOAD_LAYERS - 1) * layer, (peaks, layer)


def test_an_offloaded_cache_that_does_not_fit_the_host_is_refused_before_the_job_runs(monkeypatch):
    """The check reads the host's available memory; here it says 16 KiB, less than the tiny job's cache (tens of
    KiB: its K frames' tokens x 2 (k, v) x batch 2 x dim x 4 bytes x layers)."""
    job = tiny_job("euler", steps=2)
    stage = build_stage(tiny_spec(1, kv_cache="offload"), 0)[0]
    monkeypatch.setattr(kvcache, "_available_host_bytes", lambda: 2**14)
    calls = []
    monkeypatch.setattr(WanStage, "blocks_forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"kv_cache='offload' keeps this job's right-context cache in pinned host "
                                         r"memory: .* GiB \(1 rank\(s\) on this host\), and this host has 0.0 GiB"):
        run_single_process(stage, job)
    assert not calls  # refused before any block-step
    monkeypatch.undo()
    assert kvcache._available_host_bytes() > 2**20  # the real reading (Linux: /proc/meminfo)


@pytest.mark.dist
def test_in_a_pool_an_offloaded_cache_that_does_not_fit_is_a_recoverable_error(no_leftover_workers):
    """Rank 0 checks a job's offloaded cache against the host (here capped at ~100 KiB by the benchmarks' switch
    DUALPARAL_HOST_MEMORY_CAP_GIB) before any rank starts the job: the caller gets the sentence as a ValueError, and
    the same workers then run a job whose cache fits (no context frames: nothing kept) as the exact cache does."""
    import dataclasses

    from dualparal_core.pool import WorkerPool

    job = tiny_job("euler", steps=2)
    pool = WorkerPool.start(tiny_spec(2, kv_cache="offload"), env={"DUALPARAL_HOST_MEMORY_CAP_GIB": "0.0001"})
    try:
        pids = list(pool.pids)
        with pytest.raises(ValueError, match=r"kv_cache='offload' keeps this job's right-context cache in pinned "
                                             r"host memory: .* \(2 rank\(s\) on this host\)"):
            pool.generate(job)
        no_ctx = dataclasses.replace(job, sampling=dataclasses.replace(job.sampling, num_cat=0))
        out = pool.generate(no_ctx)
        assert list(pool.pids) == pids  # the same workers
    finally:
        pool.close()
    assert torch.equal(out, run_single_process(build_stage(tiny_spec(1), 0)[0], no_ctx))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine only)")
def test_on_a_gpu_the_offload_copies_wait_for_what_they_copy(monkeypatch):
    """The streams' ordering under stress: every layer starts with a GPU sleep (the compute stream far behind the
    host), and every copy back to the GPU starts with one on the copy stream. A copy out that did not wait for the
    layer that computes the slice, or a layer that did not wait for the copy back, would read memory not yet
    written; the offloaded block-steps must still give the exact cache's bits."""
    cfg = WanConfig.tiny(num_layers=6)
    real_layer, real_prefetch = WanStage._layer, kvcache.HostEntry.prefetch

    def slow_layer(self, *a, **k):
        torch.cuda._sleep(4_000_000)  # a few ms of GPU time
        return real_layer(self, *a, **k)

    def slow_prefetch(self):
        if self.device.type == "cuda" and self._back is None:
            with torch.cuda.stream(kvcache._copy_stream(self.device)):
                torch.cuda._sleep(4_000_000)
        return real_prefetch(self)

    monkeypatch.setattr(WanStage, "_layer", slow_layer)
    monkeypatch.setattr(kvcache.HostEntry, "prefetch", slow_prefetch)
    outs = {}
    for mode in ("exact", "offload"):
        stage = WanStage(cfg, range(cfg.num_layers), embed=True, head=True, dtype=torch.bfloat16, device="cuda")
        stage.init_random(0)
        stage.kv_keep = kvcache.KEEPERS[mode]
        outs[mode] = _two_block_steps(stage, frames=8, k_frames=4, gh=16, gw=16).cpu()
    assert torch.equal(outs["offload"], outs["exact"])
