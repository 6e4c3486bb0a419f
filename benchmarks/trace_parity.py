"""Where do 1 and 2 GPUs part? Exact checksums of every compiled call's inputs and output, and of every layer's input.

    python benchmarks/trace_parity.py OUT_DIR              # 2 GPUs: N = 1, then N = 2 twice, 1.3B shapes, GPU defaults
    TRACE_CPU=1 python benchmarks/trace_parity.py OUT_DIR  # CPU smoke run (tiny model, gloo)

Each run starts the product's pool (benchmarks/shipped.py; the GPU defaults: fused QKV, compiled chains) with
DUALPARAL_TRACE=DIR, which makes every rank's engine record its calls (dualparal_core/trace.py) and write
DIR/rank{R}.json after each job. A warm-up job, then a traced 24-latent-frame, 3-step job; every call of the
compiled elementwise chains records (block, step, layer, call, function, int64 sum of the output's bits, the same
of each tensor input).
The comparison prints the first differing calls in (step, block, layer, call) order, and those whose inputs were
identical: a function that gives other bits for the same bits in is where the runs part (how the 2-GPU difference
of the compiled path was found: docs/ARCHITECTURE.md, "Compiled elementwise chains").
"""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shipped  # noqa: E402
import torch  # noqa: E402

from dualparal_core.config import WanConfig  # noqa: E402


def run(world: int, out: str) -> None:
    """A warm-up job, then the traced one, on a pool of ``world`` ranks with DUALPARAL_TRACE=out."""
    cpu = os.environ.get("TRACE_CPU") == "1"
    cfg = WanConfig.tiny() if cpu else WanConfig.wan21_1_3b()
    h, w = (64, 64) if cpu else (480, 832)
    pool = shipped.start_pool(cfg, world, device="cpu" if cpu else "cuda", dtype="fp32" if cpu else "bf16",
                              timeout=300, env={"DUALPARAL_TRACE": str(Path(out).resolve())})
    try:
        pool.generate(shipped.make_job(cfg, 8, 2, 8, 8, h, w))
        lat = pool.generate(shipped.make_job(cfg, 24, 3, 8, 8, h, w))  # each rank's file now holds this job
    finally:
        pool.close()
    torch.save(lat, f"{out}/lat.pt")


def load(d: str) -> dict:
    rows = {}
    for f in sorted(Path(d).glob("rank*.json")):
        for r in json.loads(f.read_text()):
            rows[(tuple(r["item"]), r["layer"], r["n"], r["fn"])] = r
    return rows


def compare(a: str, b: str, name: str) -> None:
    ra, rb = load(a), load(b)
    la, lb = torch.load(f"{a}/lat.pt"), torch.load(f"{b}/lat.pt")
    print(f"{name}: latents max diff {float((la - lb).abs().max()):.3g}; keys {len(ra)} vs {len(rb)}")
    diffs = sorted((k for k in ra if k in rb and ra[k]["out"] != rb[k]["out"]),
                   key=lambda k: (k[0][1], k[0][0], k[1], k[2]))
    same_in = [k for k in diffs if ra[k]["ins"] == rb[k]["ins"]]
    print(f"  {len(diffs)} differing outputs; first (step, block order): {diffs[:6]}")
    print(f"  differing outputs with identical inputs: {len(same_in)}; first: "
          f"{[(k, ra[k]['ins'], ra[k]['out'], rb[k]['out']) for k in same_in[:4]]}")


if __name__ == "__main__":
    out = sys.argv[1]
    for name, w in (("n1", 1), ("n2a", 2), ("n2b", 2)):
        t = time.time()
        run(w, f"{out}/{name}")
        print(name, "done", round(time.time() - t), "s", flush=True)
    compare(f"{out}/n1", f"{out}/n2a", "N1 vs N2a")
    compare(f"{out}/n1", f"{out}/n2b", "N1 vs N2b")
    compare(f"{out}/n2a", f"{out}/n2b", "N2a vs N2b")
