"""Which Wan2.2 A14B settings fit on N GPUs of a given size — a PLAN computed from shapes, not a measurement.

    python benchmarks/plan_memory.py                    # two 24 GiB cards (the default)
    python benchmarks/plan_memory.py --gpus 4 --gib 24 --all

Per rank: both experts' layer slices (weights exact), text K/V, the right-context cache, one layer's activations
on a (P + K)-frame window and the pipe's kept hidden states (see dualparal_core/memplan.py for each formula).
A setting fits when the largest rank's plan stays under the card minus --reserve GiB (CUDA context, NCCL buffers,
allocator fragmentation). Check a plan on the GPUs before relying on it: the worker logs planned and actual
weights, and the CUDA peak, at load time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualparal_core.config import WanConfig, split_layers  # noqa: E402
from dualparal_core.memplan import plan_rank, tokens_per_frame  # noqa: E402

RESOLUTIONS = ((480, 832), (720, 1280))
CFG_MODES = {"cfg 3.5 / cfg_low 1": (2, 1), "cfg 1 / cfg_low 1": (1, 1), "cfg 3.5 / cfg_low 3.5": (2, 2)}


def plan(gpus: int, weights: str, height: int, width: int, P: int, K: int, batches: tuple[int, ...],
         experts: int = 2) -> dict:
    """The largest rank's plan (GiB per term) for Wan2.2 A14B (Wan2.1-14B shapes) on ``gpus`` ranks."""
    cfg = WanConfig.wan21_14b()
    tpf = tokens_per_frame(cfg, height, width)
    ranks = []
    for r, layers in enumerate(split_layers(cfg.num_layers, gpus)):
        ranks.append(plan_rank(cfg, layers, embed=r == 0, head=r == gpus - 1, dtype="bf16", fp8=weights == "fp8",
                               experts=experts, batches=batches, frames_p=P, frames_k=K, tpf=tpf).gib())
    return max(ranks, key=lambda g: g["total"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--gib", type=float, default=24.0, help="memory of one card, GiB")
    ap.add_argument("--reserve", type=float, default=1.5, help="GiB kept for CUDA context, NCCL and fragmentation")
    ap.add_argument("--P", type=int, nargs="+", default=[8])
    ap.add_argument("--K", type=int, nargs="+", default=[0, 2, 4, 8])
    ap.add_argument("--all", action="store_true", help="every row (default: fp8 rows, bf16 summarised)")
    args = ap.parse_args()
    budget = args.gib - args.reserve
    print(f"PLAN (computed, not measured): Wan2.2 A14B, two experts, on {args.gpus} x {args.gib:g} GiB; "
          f"a setting fits if the largest rank plans <= {budget:g} GiB ({args.reserve:g} GiB reserved).\n")
    print("| weights | resolution | P | K | cfg | weights GiB | text K/V | cache | activations | pipe | total GiB |"
          " fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for weights in ("fp8", "bf16"):
        for (h, w) in RESOLUTIONS:
            for P in args.P:
                for K in args.K:
                    for name, batches in CFG_MODES.items():
                        g = plan(args.gpus, weights, h, w, P, K, batches)
                        if weights == "bf16" and not args.all and (h, w, K, name) != (480, 832, 0,
                                                                                       "cfg 1 / cfg_low 1"):
                            continue
                        fits = "yes" if g["total"] <= budget else "no"
                        print(f"| {weights} | {w}x{h} | {P} | {K} | {name} | {g['weights']:.1f} | "
                              f"{g['text_kv']:.2f} | {g['cache']:.1f} | {g['activations']:.1f} | {g['pipe']:.1f} | "
                              f"{g['total']:.1f} | {fits} |")


if __name__ == "__main__":
    main()
