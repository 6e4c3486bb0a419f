"""How busy the DualParal pipeline keeps N GPUs: replay the engine's issue policy on the real schedule.

    python benchmarks/bubbles.py                      # S1 (72 latent frames) and 1,025 frames, N = 1, 2, 4, 8
    python benchmarks/bubbles.py --steps 4            # a 4-step distilled model: at most 4 blocks in flight

Each block-step costs its FLOPs (DESIGN §6) spread over the ranks in proportion to the layers each owns; rank 0
issues a block-step when its inputs are back and fewer than ``max_in_flight`` (N + 1) are out, exactly as
``engine.RankEngine`` does; communication and the sampler step are taken as free. The result is an upper bound on
the speed-up (no kernel is faster with more GPUs here): what the schedule itself allows, bubbles included.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualparal_core.config import BlockLayout, WanConfig, split_layers  # noqa: E402
from dualparal_core.schedule import Schedule  # noqa: E402


def item_flops(cfg: WanConfig, layout: BlockLayout, item, tpf: int, b: int = 2) -> float:
    s0, e0 = layout.input_span(item.block)
    lq = (e0 - s0) * tpf
    lk = lq + item.right * tpf  # the schedule item says which right-context frames it reads
    d, f = cfg.dim, cfg.ffn_dim
    return b * (lq * (12 * d * d + 4 * d * f) + 4 * lq * lk * d + 4 * lq * 512 * d)  # per layer


def simulate(cfg: WanConfig, layout: BlockLayout, steps: int, world: int, tpf: int,
             max_in_flight: int | None = None) -> dict:
    """Makespan (in layer-FLOP units), busy fraction per rank and the count of rank-0 waits."""
    sch = Schedule(layout, steps)
    shares = [len(r) for r in split_layers(cfg.num_layers, world)]
    cost = [item_flops(cfg, layout, it, tpf) for it in sch.items]
    mif = max_in_flight or (world + 1 if world > 1 else 1)  # the engine's default
    free = [0.0] * world          # when each rank is next free
    clock = 0.0                   # rank 0's host timeline
    done_at: dict[int, float] = {}
    finished = [False] * len(cost)
    pending: deque[int] = deque()
    nxt = 0
    for _ in range(len(cost)):
        while nxt < len(cost) and len(pending) < mif and all(finished[d] for d in sch.deps(sch.items[nxt])):
            t = max(clock, free[0])
            for r in range(world):
                t = max(t, free[r]) + cost[nxt] * shares[r]
                free[r] = t
            clock = free[0]
            done_at[nxt] = t
            pending.append(nxt)
            nxt += 1
        idx = pending.popleft()
        clock = max(clock, done_at[idx])
        finished[idx] = True
    makespan = max(done_at.values())
    work = sum(cost) * cfg.num_layers
    return dict(makespan=makespan, work=work, util=[sum(cost) * s / makespan for s in shares])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["1.3b", "14b"], default="1.3b")
    ap.add_argument("--frames", type=int, nargs="+", default=[72, 257])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--P", type=int, default=8)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    cfg = WanConfig.wan21_1_3b() if args.model == "1.3b" else WanConfig.wan21_14b()
    tpf = (480 // 16) * (832 // 16)
    print(f"Wan2.1-{args.model} shapes, 480x832, {args.steps} steps, P={args.P} K={args.K}: schedule replay "
          f"(compute only, no communication)")
    print("| latent frames | video frames | blocks | block-steps | GPUs | speed-up over 1 GPU | busy per GPU "
          "(min..max) |")
    print("|---|---|---|---|---|---|---|")
    for f in args.frames:
        lay = BlockLayout(f, args.P, args.K)
        base = simulate(cfg, lay, args.steps, 1, tpf)["makespan"]
        for w in args.world:
            r = simulate(cfg, lay, args.steps, w, tpf)
            print(f"| {f} | {(f - 1) * 4 + 1} | {lay.num_blocks} | {lay.num_blocks * args.steps} | {w} | "
                  f"{base / r['makespan']:.2f}x | {min(r['util']):.0%}..{max(r['util']):.0%} |")


if __name__ == "__main__":
    main()
