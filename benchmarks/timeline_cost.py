"""What a prompt timeline costs per block-step against one prompt (issue 18), through the product's pool.

    python benchmarks/timeline_cost.py --json $OUT/timeline.json            # 1.3B shapes, 832x480, one GPU
    python benchmarks/timeline_cost.py --tiny --device cpu --height 32 --width 32 --frames 13 --P 2 --K 2

The same video (``--frames`` latent frames, P/K blocks, ``--steps``), run alternately with one prompt and with a
three-prompt timeline whose starts and ``--transition`` make every block's text a different prompt or blend (the
worst case: one text K/V build per block). ``per_step_s`` is the slowest rank's run_job time (device synchronised
at both ends, RankEngine's profile) divided by the block-steps; the median of ``--repeats`` runs each, after a
warm-up job of the same shapes. Random weights (compute is the same as real weights).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from shipped import make_job, start_pool, timed  # noqa: E402

from dualparal_core.config import WanConfig  # noqa: E402
from dualparal_core.timeline import Timeline, Track, first_video_frame  # noqa: E402


def timeline_job(config: WanConfig, a: argparse.Namespace):
    job = make_job(config, a.frames, a.steps, a.P, a.K, a.height, a.width)
    g = torch.Generator().manual_seed(1)
    texts = (job.cond, *(torch.randn(job.cond.shape, generator=g) for _ in range(2)))
    blocks = [first_video_frame(s) for s, _ in job.sampling.layout(a.frames).blocks]
    # stretches start between blocks so that, with the transition, the middle blocks take blends
    starts = (0, (blocks[1] + blocks[2]) // 2 + 1, (blocks[-2] + blocks[-1]) // 2 + 1)
    tl = Timeline(Track(texts, starts, ("a", "b", "c")), transition=a.transition)
    job.timeline = tl
    return job, len({k for k in tl.plan(job.sampling.layout(a.frames))})


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=45, help="latent frames (45: 5 blocks with P = K = 8)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--P", type=int, default=8)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--transition", type=int, default=64, help="video frames")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--attention", default="sdpa", help="the pool's attention backend (fa3 on Hopper with fa3-fwd)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    config = WanConfig.tiny() if a.tiny else WanConfig.wan21_1_3b()
    pool = start_pool(config, a.world, device=a.device, dtype="fp32" if a.device == "cpu" else "bf16",
                      attention=a.attention)
    try:
        single = make_job(config, a.frames, a.steps, a.P, a.K, a.height, a.width)
        tl, distinct = timeline_job(config, a)
        pool.generate(single)  # warm-up: compiles every window shape
        runs = {"single": [], "timeline": []}
        for _ in range(a.repeats):
            for name, job in (("single", single), ("timeline", tl)):
                r = timed(pool, job, None)
                runs[name].append(dict(per_step_s=r["seconds"] / job.num_block_steps, peak_gib=r["peak_gib"],
                                       device=r["device_name"]))
    finally:
        pool.close()
    row = {"date": datetime.date.today().isoformat(), "config": "tiny" if a.tiny else "wan21_1.3b",
           "device": runs["single"][0]["device"], "world": a.world, "frames": a.frames, "P": a.P, "K": a.K,
           "steps": a.steps, "size": f"{a.width}x{a.height}", "distinct_texts": distinct,
           "command": "python benchmarks/timeline_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for name, rs in runs.items():
        row[f"{name}_per_step_s"] = statistics.median(r["per_step_s"] for r in rs)
        row[f"{name}_all_s"] = [round(r["per_step_s"], 4) for r in rs]
        row[f"{name}_peak_gib"] = max(r["peak_gib"] for r in rs)
    row["ratio"] = row["timeline_per_step_s"] / row["single_per_step_s"]
    sys.stdout.write(json.dumps(row, indent=1) + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=1))
    return row


if __name__ == "__main__":
    main()
