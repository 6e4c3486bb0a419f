"""Time and memory per GPU against the GPU count (docs/img/scaling.png), from the --json output of bench_s1.py or
``python -m dualparal_core bench`` (its "ours" rows; one file per GPU count can be given).

    pip install matplotlib   # a development tool: not needed by the pack
    python benchmarks/plot_scaling.py benchmarks/results/2026-11-23-h200x2/s1.json --out docs/img/scaling.png

Measured rows are drawn as filled markers, rows bench_s1.py extrapolated (``--extrapolate``) as open markers, and
for GPU counts without a measurement the bound that ``bubbles.py``'s schedule replay gives (the 1-GPU time divided
by the replayed speed-up; compute only) as a dotted line, labelled as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bubbles import simulate  # noqa: E402

from dualparal_core.config import BlockLayout, WanConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="--json output of bench_s1.py or of bench (1.3B shapes)")
    ap.add_argument("--out", default="docs/img/scaling.png")
    ap.add_argument("--bound", type=int, nargs="*", default=[4, 8], help="GPU counts to draw the replay bound for")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = [json.loads(Path(p).read_text()) for p in args.json]
    data = files[0]
    rows = [dict(r, world=r.get("world", r.get("gpus"))) for d in files for r in d["rows"]
            if r["name"].startswith("dualparal") or r.get("kind") == "ours" and r.get("seconds")]
    cfg, tpf = WanConfig.wan21_1_3b(), (480 // 16) * (832 // 16)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for frames, colour in ((72, "tab:blue"), (257, "tab:orange")):
        pts = sorted((r["world"], r) for r in rows if r["frames"] == frames)
        if not pts:
            continue
        label = f"{frames} latent frames ({(frames - 1) * 4 + 1} video frames)"
        xs = [w for w, _ in pts]
        ys = [r["seconds"] for _, r in pts]
        ax_t.plot(xs, ys, "-", color=colour, label=label)
        for w, r in pts:
            open_ = "extrapolated" in r["name"]
            ax_t.plot([w], [r["seconds"]], "o", color=colour, mfc="white" if open_ else colour)
            ax_t.annotate(f"{r['seconds']:.0f} s", (w, r["seconds"]), textcoords="offset points", xytext=(6, 4),
                          fontsize=8)
        one = dict(pts).get(1)
        if one is not None and args.bound:
            lay = BlockLayout(frames, 8, 8)
            base = simulate(cfg, lay, 10, 1, tpf)["makespan"]
            bx = [max(xs)] + args.bound
            by = [dict(pts)[max(xs)]["seconds"]] + [one["seconds"] * simulate(cfg, lay, 10, w, tpf)["makespan"] / base
                                                     for w in args.bound]
            ax_t.plot(bx, by, ":", color=colour, label=f"{frames}: schedule-replay bound (not measured)")
        if frames == 72:
            ax_m.plot(xs, [r["peak_gib"] for _, r in pts], "o-", color=colour, label=f"{label}: peak allocated")
            ax_m.plot(xs, [r["reserved_gib"] for _, r in pts], "s--", color=colour, mfc="white",
                      label=f"{label}: peak reserved")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8])
        ax.set_xticklabels(["1", "2", "4", "8"])
        ax.set_xlabel("GPUs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_ylabel("sampling time (s), 10 steps")
    ax_t.set_title("time (filled: measured, open: extrapolated)", fontsize=9)
    ax_m.set_ylabel("GiB per GPU")
    ax_m.set_ylim(bottom=0)
    ax_m.set_title("memory per GPU (measured)", fontsize=9)
    fig.suptitle(f"DualParal, Wan2.1-1.3B shapes, 480x832, P=K=8 — {data['device']}, {data['date']}", fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
