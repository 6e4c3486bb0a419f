"""Where do 1 and 2 GPUs part? Exact checksums of every compiled call's inputs and output, and of every layer's input.

    python benchmarks/trace_parity.py OUT_DIR              # 2 GPUs: N = 1, then N = 2 twice, 1.3B shapes, GPU defaults
    TRACE_CPU=1 python benchmarks/trace_parity.py OUT_DIR  # CPU smoke run (tiny model, gloo)

Each run does a warm-up job, then a traced 24-latent-frame, 3-step job; every call of the compiled elementwise
chains records (block, step, layer, call, function, int64 sum of the output's bits, the same of each tensor input).
The comparison prints the first differing calls in (step, block, layer, call) order, and those whose inputs were
identical: a function that gives other bits for the same bits in is where the runs part (how the 2-GPU difference
of the compiled path was found: docs/ARCHITECTURE.md, "Compiled elementwise chains").
"""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from bench_s1 import _free_port, _sigmas, _stage, join_rank  # noqa: E402

from dualparal_core.config import SamplingConfig, WanConfig, split_layers  # noqa: E402


def _bits(t: torch.Tensor) -> torch.Tensor:
    """int64 sum of a tensor's bit patterns: equal for equal tensors, different for almost any 1-ulp change."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).sum(dtype=torch.int64)


def rank_main(rank: int, world: int, port: int, out: str, q) -> None:
    from dualparal_core.comm import destroy_groups
    from dualparal_core.engine import RankEngine
    from dualparal_core.protocol import Job

    cpu = os.environ.get("TRACE_CPU") == "1"
    dev, pipe = join_rank(rank, world, port, "cpu" if cpu else "cuda", 300)
    cfg = WanConfig.tiny() if cpu else WanConfig.wan21_1_3b()

    class Opts:  # what bench_s1._stage reads: the GPU defaults
        attention, weights, fuse, compile = "sdpa", "dequant", True, True

    dtype = torch.float32 if cpu else torch.bfloat16
    st = _stage(cfg, split_layers(cfg.num_layers, world)[rank], rank, world, dtype, dev, Opts, 0)
    eng = RankEngine(st, pipe)
    rec, cur = [], {"item": None, "layer": None, "n": 0, "on": False}
    index = {id(b): int(k) for k, b in st.blocks.items()}
    for key, fn in list(st._ew.items()):
        def traced(*args, _fn=fn, _key=key, **kwargs):
            o = _fn(*args, **kwargs)
            if cur["on"]:
                cur["n"] += 1
                rec.append((cur["item"], cur["layer"], cur["n"], _key, _bits(o),
                            [_bits(a) for a in args if torch.is_tensor(a)]))
            return o
        st._ew[key] = traced
    inner_layer, inner_layers = st._layer, eng._layers

    def layer(blk, h, *args, **kwargs):
        cur["layer"], cur["n"] = index[id(blk)], 0
        if cur["on"]:
            rec.append((cur["item"], cur["layer"], 0, "in", _bits(h), []))
        return inner_layer(blk, h, *args, **kwargs)

    def layers(item, h):
        cur["item"] = (item.block, item.step)
        return inner_layers(item, h)

    st._layer, eng._layers = layer, layers
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 512, cfg.text_dim, generator=g), torch.randn(1, 512, cfg.text_dim, generator=g)

    def job(frames, steps):
        sc = SamplingConfig(sigmas=_sigmas(steps), sampler="uni_pc", cfg=5.0, seed=0, noise_mode="coordinated",
                            num_per_block=8, num_cat=8)
        return Job(sc, (1, 16, frames, 8 if cpu else 60, 8 if cpu else 104), cond, uncond)

    eng.run_job(job(8, 2))
    cur["on"] = True
    lat = eng.run_job(job(24, 3))
    if not cpu:
        torch.cuda.synchronize(dev)
    rows = [dict(item=list(i) if i else None, layer=lay, n=n, fn=k, out=o.item(), ins=[x.item() for x in ins])
            for i, lay, n, k, o, ins in rec]
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(f"{out}/rank{rank}.json").write_text(json.dumps(rows))
    if lat is not None:
        torch.save(lat, f"{out}/lat.pt")
    q.put(rank)
    if world > 1:
        destroy_groups()


def run(world: int, out: str) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, out, q)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            q.get(timeout=100)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


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
