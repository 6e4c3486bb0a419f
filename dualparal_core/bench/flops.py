"""FLOPs of a block-step (docs/performance.md, "How we count FLOPs"), for our schedule and for each peer's.

A multiply-add counts 2. Per transformer layer and batch element, a block-step whose window has ``lq`` query tokens,
``lk`` self-attention key tokens (the window plus the right context) and ``text`` text tokens costs:

* GEMMs on the window's tokens: self-attention Q, K, V and output (4 x 2·d²), cross-attention Q and output
  (2 x 2·d²), the FFN (2 x 2·d·f): ``lq · (12·d² + 4·d·f)``;
* self-attention ``Q·Kᵀ`` and ``P·V``: ``4 · lq · lk · d``;
* cross-attention against the text: ``4 · lq · text · d``.

The model's last layer computes the left-context tokens as keys and values only (the head reads the own frames):
there, with ``own`` query tokens, the fused Q, K, V GEMM still runs on all ``lq`` tokens (``6·d²`` each) and the
rest on ``own``: ``lq · 6·d² + own · (6·d² + 4·d·f) + 4 · own · lk · d + 4 · own · text · d``.

Left out (each under 1 % at the real shapes, and the same for every row): the patch embedding and head, the time
embedding and modulation tables, the text embedder and the cross-attention K/V of the text (computed once per
job), norms, RoPE and the sampler. The right-context K/V are projected once, by the block that owns those frames,
so they cost no GEMM in the block-step that reads them.
"""

from __future__ import annotations

from dualparal_core.config import BlockLayout, WanConfig
from dualparal_core.schedule import Schedule

#: Text tokens of the conditioning (umt5 pads every prompt to 512).
TEXT_TOKENS = 512


def block_step_flops(cfg: WanConfig, lq: int, lk: int, b: int, text: int = TEXT_TOKENS,
                     layers: int | None = None, own: int | None = None) -> float:
    """FLOPs of one block-step over ``layers`` layers (default: all) at batch ``b``; ``own``: the query tokens of
    the last of them when it computes only the own frames' (None: all ``lq``)."""
    d, f = cfg.dim, cfg.ffn_dim
    n = cfg.num_layers if layers is None else layers

    def layer(q: int) -> int:  # q query tokens; the fused Q, K, V GEMM on all lq
        return lq * 6 * d * d + q * (6 * d * d + 4 * d * f) + 4 * q * lk * d + 4 * q * text * d

    return float(b * ((n - 1) * layer(lq) + layer(lq if own is None else own)))


def item_flops(cfg: WanConfig, layout: BlockLayout, steps: int, tokens_per_frame: int, b: int,
               experts: list[int] | None = None, b_low: int | None = None) -> list[float]:
    """FLOPs of each of our block-steps in schedule order; ``experts``: the expert of each step (two experts: no
    right context between block-steps of different experts, and the low-noise expert's batch is ``b_low``)."""
    out = []
    for it in Schedule(layout, steps, experts).items:  # the items say which right-context frames each reads
        s0, e0 = layout.input_span(it.block)
        lq = (e0 - s0) * tokens_per_frame
        lk = lq + it.right * tokens_per_frame  # keys of the next-newer block's first frames
        own = (layout.blocks[it.block][1] - layout.blocks[it.block][0]) * tokens_per_frame  # the last layer's queries
        out.append(block_step_flops(cfg, lq, lk, b if it.expert == 0 or b_low is None else b_low, own=own))
    return out


def job_flops(*args, **kw) -> float:
    return sum(item_flops(*args, **kw))


def full_sequence_flops(cfg: WanConfig, frames: int, steps: int, tokens_per_frame: int, b: int) -> list[float]:
    """Full-sequence sampling (the diffusers baseline, Ulysses): one block-step per step over the whole video."""
    n = frames * tokens_per_frame
    return [block_step_flops(cfg, n, n, b)] * steps


def reference_flops(cfg: WanConfig, frames: int, steps: int, tokens_per_frame: int, P: int, K: int) -> list[float]:
    """The published DualParal code's block-steps (examples/DualParal_Wan.py, as read there): ceil(T / P) blocks,
    the first of P + K fresh frames, each later one read with the last K frames of its older neighbour, so every
    window has P + K frames; its keys add the first K frames of the next-newer block whenever that block is in the
    queue (not at a block's first step, when it is the newest, nor for the last block). CFG is always batched (2)."""
    blocks = -(-frames // P)
    lq = (P + K) * tokens_per_frame
    out = []
    for blk in range(blocks):
        for step in range(steps):
            newer = blk + 1 < blocks and step > 0
            out.append(block_step_flops(cfg, lq, lq + (K * tokens_per_frame if newer else 0), 2))
    return out


def steady_rate(ticks: list[float], flops: list[float]) -> float | None:
    """FLOP/s of the pipeline once full: the block-steps finished in the middle half of the job (``ticks``: when
    the last rank finished each block-step's head, in schedule order) over the time they took."""
    n = len(ticks)
    if n != len(flops) or n < 8:
        return None
    a, b = n // 4, (3 * n) // 4
    dt = ticks[b] - ticks[a]
    return sum(flops[a + 1:b + 1]) / dt if dt > 0 else None
