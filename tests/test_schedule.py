"""Block layout and schedule bookkeeping against DESIGN §2, recomputed independently in each test."""

from __future__ import annotations

import pytest

from dualparal_core.config import BlockLayout, SamplingConfig
from dualparal_core.schedule import Schedule


@pytest.mark.parametrize("T,P,K,want", [
    (72, 8, 8, [(0, 16)] + [(16 + 8 * i, 24 + 8 * i) for i in range(7)]),
    (21, 8, 4, [(0, 12), (12, 20), (20, 21)]),   # short last block of 1 frame
    (5, 8, 8, [(0, 5)]),                          # T smaller than one block
    (16, 8, 8, [(0, 16)]),                        # exactly one block
    (10, 3, 0, [(0, 3), (3, 6), (6, 9), (9, 10)]),
])
def test_blocks(T, P, K, want):
    lay = BlockLayout(T, P, K)
    assert lay.blocks == want
    # Every frame belongs to exactly one block.
    covered = [f for s, e in lay.blocks for f in range(s, e)]
    assert covered == list(range(T))
    for j, (s, e) in enumerate(lay.blocks):
        s0, e0 = lay.input_span(j)
        assert e0 == e and s0 == (s - K if j else s)
        assert lay.right_context_frames(j) == min(K, e - s)


def test_s1_anchor_counts():
    # DESIGN §6: 72 frames, P=K=8, 10 steps -> 8 blocks, 80 block-steps, 17 ticks, 63 with right context.
    sch = Schedule(BlockLayout(72, 8, 8), 10)
    assert (sch.layout.num_blocks, len(sch), sch.num_ticks) == (8, 80, 17)
    assert sum(it.right_ctx for it in sch.items) == 63


@pytest.mark.parametrize("T,P,K,S", [(72, 8, 8, 10), (21, 8, 4, 3), (5, 8, 8, 4), (30, 4, 2, 1), (9, 2, 1, 7)])
def test_every_block_takes_every_step_in_order(T, P, K, S):
    sch = Schedule(BlockLayout(T, P, K), S)
    n = sch.layout.num_blocks
    assert len(sch) == n * S
    seen = {j: [] for j in range(n)}
    for idx, it in enumerate(sch.items):
        assert it.index == idx
        assert it.step == it.tick - it.block          # block j enters at tick j
        seen[it.block].append(it.step)
    assert all(seen[j] == list(range(S)) for j in range(n))
    # Within a tick, newest block first; only the first item of a tick lacks right context.
    by_tick: dict[int, list] = {}
    for it in sch.items:
        by_tick.setdefault(it.tick, []).append(it)
    assert sorted(by_tick) == list(range(n + S - 1))
    for _t, its in by_tick.items():
        assert [i.block for i in its] == sorted((i.block for i in its), reverse=True)
        assert [i.right_ctx for i in its] == [False] + [True] * (len(its) - 1)
        # right context comes from the next-newer block, processed just before in the same tick
        for a, b in zip(its, its[1:]):
            assert b.block == a.block - 1


def test_deps_read_the_states_design_defines():
    sch = Schedule(BlockLayout(40, 8, 8), 5)
    pos = {(it.block, it.tick): it.index for it in sch.items}
    for it in sch.items:
        want = set()
        if it.step > 0:
            want.add(pos[(it.block, it.tick - 1)])       # own previous step
        if it.block > 0:
            want.add(pos[(it.block - 1, it.tick - 1)])   # left neighbour at the start of this tick
        assert set(sch.deps(it)) == want
        assert all(d < it.index for d in sch.deps(it))  # issue order respects every dependency
        # the left neighbour's step of this tick comes after this item, so its state is the one of tick-1
        if it.block > 0 and (it.block - 1, it.tick) in pos:
            assert pos[(it.block - 1, it.tick)] > it.index


@pytest.mark.parametrize("T,P,K,S,experts", [
    (72, 8, 8, 10, None),                          # S1
    (21, 8, 4, 3, None),                           # short last block: its neighbour reads 1 frame
    (30, 4, 0, 5, None),                           # no context at all
    (9, 2, 2, 6, [0, 0, 0, 1, 1, 1]),              # Wan2.2 A14B: high-noise steps, then low-noise ones
    (23, 4, 3, 7, [0, 0, 1, 1, 1, 1, 1]),
    (9, 2, 1, 7, [0, 1, 0, 1, 0, 1, 0]),           # alternating: no item ever has right context
])
def test_items_carry_right_and_keep_frames(T, P, K, S, experts):
    """Each item's expert, right-context and kept frames against DESIGN §2 written out by hand: block j at tick t
    reads the first min(K, |B_{j+1}|) frames of B_{j+1} when B_{j+1} is in flight at t (it then ran just before,
    one step behind) on the same expert; it keeps its own first min(K, |B_j|) frames when B_{j-1} will read them."""
    lay = BlockLayout(T, P, K)
    ex = experts or [0] * S
    sizes = [e - s for s, e in lay.blocks]

    def in_flight(j, t):
        return 0 <= j < len(sizes) and 0 <= t - j < S

    sch = Schedule(lay, S, experts)
    for it in sch.items:
        t, j, s = it.tick, it.block, it.step
        right = min(K, sizes[j + 1]) if in_flight(j + 1, t) and ex[s - 1] == ex[s] else 0
        keep = min(K, sizes[j]) if in_flight(j - 1, t) and ex[s] == ex[s + 1] else 0
        assert (it.expert, it.right, it.keep) == (ex[s], right, keep), it
    if experts is None and K:
        assert sum(it.right > 0 for it in sch.items) == sum(it.right_ctx for it in sch.items)
    if experts == [0, 1, 0, 1, 0, 1, 0]:
        assert not any(it.right or it.keep for it in sch.items)


def test_experts_must_cover_every_step():
    with pytest.raises(ValueError, match="experts has 2 entries for 3 steps"):
        Schedule(BlockLayout(8, 4, 2), 3, [0, 1])


def test_single_step_schedule():
    sch = Schedule(BlockLayout(24, 8, 8), 1)
    assert [(i.tick, i.block) for i in sch.items] == [(0, 0), (1, 1)]
    assert not any(i.right_ctx for i in sch.items)
    assert sch.max_in_flight() == 1


@pytest.mark.parametrize("kw,needle", [
    (dict(num_per_block=0), "num_per_block=0"),
    (dict(num_cat=9), "num_cat=9"),
    (dict(num_cat=-1), "num_cat=-1"),
    (dict(sampler="ddim"), "sampler_name='ddim'"),
    (dict(noise_mode="fancy"), "noise_mode='fancy'"),
    (dict(sigmas=(1.0,)), "steps >= 1"),
    (dict(cfg=float("nan")), "cfg=nan"),
])
def test_bad_sampling_settings_name_the_input(kw, needle):
    base = dict(sigmas=(1.0, 0.5, 0.0), num_per_block=8, num_cat=8)
    base.update(kw)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        SamplingConfig(**base)


def test_steps_below_one_rejected():
    with pytest.raises(ValueError, match="steps=0"):
        Schedule(BlockLayout(8, 8, 0), 0)
