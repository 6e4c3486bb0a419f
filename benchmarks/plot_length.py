"""Time and memory against video length on one GPU (docs/img/length.png), from the --json output of
``python -m dualparal_core bench --frames A B ...`` (its "ours" rows, one pool, the same steps for every length).

    pip install matplotlib   # a development tool: not needed by the pack
    python benchmarks/plot_length.py benchmarks/results/2026-12-06-h100-late/len.json --out docs/img/length.png

Left: the time of the whole run and the time per block-step (the length goal compares the latter across lengths).
Right: peak GiB per GPU. Only measured rows are drawn; nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows_of(path: str) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    rows = [r for r in data["rows"] if r.get("kind") == "ours" and r.get("seconds")]
    if not rows:
        raise SystemExit(f"{path}: no measured 'ours' rows (is it the --json of python -m dualparal_core bench?)")
    return data, sorted(rows, key=lambda r: r["frames"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="--json output of python -m dualparal_core bench with several --frames")
    ap.add_argument("--out", default="docs/img/length.png")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, rows = rows_of(a.json)
    video = [r["video_frames"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(video, [r["seconds"] for r in rows], "o-", label="whole run (s)")
    left.set_xlabel("video frames")
    left.set_ylabel("seconds")
    twin = left.twinx()
    twin.plot(video, [r["ms_per_block_step"] for r in rows], "s--", color="tab:orange", label="per block-step (ms)")
    twin.set_ylabel("ms per block-step")
    twin.set_ylim(0, max(r["ms_per_block_step"] for r in rows) * 1.3)
    left.legend(loc="upper left")
    twin.legend(loc="lower right")
    right.plot(video, [r["peak_gib"] for r in rows], "o-", color="tab:green")
    right.set_ylim(0, max(r["peak_gib"] for r in rows) * 1.3)
    right.set_xlabel("video frames")
    right.set_ylabel("peak GiB per GPU (allocated)")
    for ax, r in ((right, rows[-1]),):
        ax.annotate(f"{r['peak_gib']:.2f} GiB", (r["video_frames"], r["peak_gib"]), textcoords="offset points",
                    xytext=(-40, 8))
    fig.suptitle(f"{data['model']} shapes, {data['height']}x{data['width']}, {data['steps']} steps, CFG {data['cfg']}, "
                 f"P={data['P']} K={data['K']}, {rows[0]['attention']}; {data['device']}, {data['date']} (measured)",
                 fontsize=9)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
