"""Setting S1 of the design (and variants): DualParal on N ranks vs one-GPU full-sequence sampling, one table.

    python benchmarks/bench_s1.py --world 2 --baseline          # 2 GPUs + the 1-GPU full-sequence baseline
    python benchmarks/bench_s1.py --device cpu --world 2 --tiny  # a CPU smoke run of the same code path
    python benchmarks/bench_s1.py --model 14b --experts 2 --weights fp8 --cfg-low 1 --world 2 --frames 40
                                                                 # Wan2.2 A14B shapes: two experts, fp8 in memory

Random weights (compute is the same as real weights). Times are sampling-loop wall time after a warm-up job of the
same shapes; FLOPs follow DESIGN §6 (multiply-add = 2, per block-step, embedding/head/text K/V left out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from dualparal_core.config import BlockLayout, SamplingConfig, WanConfig, split_layers  # noqa: E402
from dualparal_core.schedule import Schedule  # noqa: E402

MODELS = {"1.3b": WanConfig.wan21_1_3b, "14b": WanConfig.wan21_14b}


def block_step_flops(cfg: WanConfig, lq: int, lk: int, b: int, text: int = 512) -> float:
    d, f = cfg.dim, cfg.ffn_dim
    return cfg.num_layers * b * (lq * (12 * d * d + 4 * d * f) + 4 * lq * lk * d + 4 * lq * text * d)


def item_flops(cfg: WanConfig, layout: BlockLayout, steps: int, tokens_per_frame: int, b: int,
               experts: list[int] | None = None, b_low: int | None = None) -> list[float]:
    """FLOPs of each block-step in schedule order; ``experts``: the expert of each step (two experts: no right
    context between block-steps of different experts, and the low-noise expert's batch is ``b_low``)."""
    out = []
    for it in Schedule(layout, steps, experts).items:  # the items say which right-context frames each reads
        s0, e0 = layout.input_span(it.block)
        lq = (e0 - s0) * tokens_per_frame
        lk = lq + it.right * tokens_per_frame  # keys of the next-newer block's first frames
        out.append(block_step_flops(cfg, lq, lk, b if it.expert == 0 or b_low is None else b_low))
    return out


def job_flops(*args, **kw) -> float:
    return sum(item_flops(*args, **kw))


def steady_rate(ticks: list[float], flops: list[float]) -> float | None:
    """FLOP/s of the pipeline once full: the block-steps finished in the middle half of the job (``ticks``: when
    the last rank finished each block-step's head, in schedule order) over the time they took."""
    n = len(ticks)
    if n != len(flops) or n < 8:
        return None
    a, b = n // 4, (3 * n) // 4
    dt = ticks[b] - ticks[a]
    return sum(flops[a + 1:b + 1]) / dt if dt > 0 else None


def _stage(cfg, layers, rank, world, dtype, dev, args, seed):
    from dualparal_core.model import WanStage

    st = WanStage(cfg, layers, embed=rank == 0, head=rank == world - 1, dtype=dtype, device=dev,
                  attention_backend=args.attention)
    st.init_random(seed)
    if args.weights == "fp8":  # the blocks' Linear weights held in fp8, dequantised per layer
        from dualparal_core.fp8 import install_fp8_linears, quantise_state_dict

        sd = st.state_dict()
        quantise_state_dict(sd)
        install_fp8_linears(st, sd, dtype)
        del sd
    if args.fuse:
        st.fuse_qkv()
    if args.compile and dev.type == "cuda":
        st.compile_elementwise()
    return st


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sigmas(steps: int, shift: float = 8.0) -> tuple[float, ...]:
    # ComfyUI's "simple" scheduler on a shifted flow table (only the values matter for timing).
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    s = shift * t / (1 + (shift - 1) * t)
    return tuple(float(v) for v in s)


def join_rank(rank: int, world: int, port: int, device: str, timeout: float):
    """A benchmark rank's start: a watchdog, its device (one CPU thread, or its GPU with eager kernel loading as
    the workers have it) and, with world > 1, the process group. Returns (device, Pipe or None)."""
    import faulthandler

    from dualparal_core.comm import init_groups, prefer_eager_module_loading

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    # a hung rank prints every thread's stack and exits instead of holding the machine
    faulthandler.dump_traceback_later(timeout, exit=True)
    dev = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    if device == "cuda":
        if world > 1:
            prefer_eager_module_loading()
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(1)
    return dev, (init_groups(rank, world, dev, f"tcp://127.0.0.1:{port}") if world > 1 else None)


def _rank_main(rank: int, world: int, port: int, args, q) -> None:
    from dualparal_core.comm import destroy_groups
    from dualparal_core.engine import RankEngine
    from dualparal_core.experts import Experts
    from dualparal_core.protocol import Job

    cuda = args.device == "cuda"
    dev, pipe = join_rank(rank, world, port, args.device, args.timeout)
    cfg = WanConfig.tiny() if args.tiny else MODELS[args.model]()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    t0 = time.time()
    layers = split_layers(cfg.num_layers, world)[rank]
    stages = [_stage(cfg, layers, rank, world, dtype, dev, args, seed) for seed in range(args.experts)]
    st = stages[0] if args.experts == 1 else Experts(stages, args.boundary)
    load_s = time.time() - t0
    weights_gib = torch.cuda.memory_allocated(dev) / 2**30 if cuda else 0.0
    eng = RankEngine(st, pipe, max_in_flight=args.in_flight)
    if args.prewarm != "auto":
        eng.prewarm = args.prewarm == "on"
    H, W = args.height // 8, args.width // 8
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 512, cfg.text_dim, generator=g)
    uncond = torch.randn(1, 512, cfg.text_dim, generator=g)

    def job(frames, steps, P, K):
        sc = SamplingConfig(sigmas=_sigmas(steps), sampler=args.sampler, cfg=args.cfg, seed=0,
                            noise_mode="coordinated", num_per_block=P, num_cat=K, cfg_low=args.cfg_low)
        return Job(sc, (1, 16, frames, H, W), cond, uncond if sc.use_cfg else None)

    # the last rank stamps every block-step's head (a CUDA event on GPU): the steady-state rate without a 2nd run
    marks: list = []
    if rank == world - 1:
        inner_head, inner_pw, warming = eng._head, eng._prewarm, [False]

        def head(item, h):
            v = inner_head(item, h)
            if not warming[0]:
                if cuda:
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record()
                    marks.append(ev)
                else:
                    marks.append(time.perf_counter())
            return v

        def prewarm():
            warming[0] = True
            try:
                inner_pw()
            finally:
                warming[0] = False

        eng._head, eng._prewarm = head, prewarm

    def ticks() -> list[float]:
        if not marks:
            return []
        if cuda:
            torch.cuda.synchronize(dev)
            return [marks[0].elapsed_time(e) / 1e3 for e in marks]
        return [t - marks[0] for t in marks]

    results = []
    for name, frames, P, K in args.runs:
        # warm-up: same window shapes, fewer frames and steps
        eng.run_job(job(min(frames, P + K + P), 2, P, K))
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        if world > 1:
            torch.distributed.barrier()
        marks.clear()
        t0 = time.perf_counter()
        eng.run_job(job(frames, args.steps, P, K))
        if cuda:
            torch.cuda.synchronize(dev)
        if world > 1:
            torch.distributed.barrier()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else 0.0
        resv = torch.cuda.max_memory_reserved(dev) / 2**30 if cuda else 0.0
        results.append(dict(name=name, rank=rank, seconds=dt, peak_gib=peak, reserved_gib=resv, load_s=load_s,
                            ticks=ticks(),
                            weights_gib=weights_gib))
        print(f"[rank {rank}] {name}: {dt:.2f} s, peak {peak:.2f} GiB, reserved {resv:.2f} GiB", flush=True)
    if args.verify and rank == 0:
        results.append(dict(name="verify", rank=0, latents=eng.run_job(job(24, 3, args.P, args.K)).numpy()))
    elif args.verify:
        eng.run_job(job(24, 3, args.P, args.K))
    q.put(results)
    if world > 1:
        if cuda:
            torch.cuda.synchronize(dev)
        destroy_groups()


def run(world: int, args, runs) -> list[dict]:
    args.runs = runs
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    out = []
    try:
        for _ in procs:
            out.extend(q.get(timeout=args.timeout))
    finally:
        for p in procs:  # results are in: a rank stuck in teardown must not hold the run
            p.join(timeout=30)
            if p.is_alive():
                print(f"rank pid {p.pid} did not exit within 30 s of finishing; killing it", flush=True)
                p.kill()
                p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="*", default=[2],
                    help="GPU counts for DualParal (none: only the --baseline runs)")
    ap.add_argument("--model", choices=sorted(MODELS), default="1.3b")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke run)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--sampler", default="uni_pc")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, nargs="+", default=[72], help="latent frames (72 = 285 video frames)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--P", type=int, default=8)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--fuse", action="store_true", help="fused QKV projection")
    ap.add_argument("--verify", action="store_true",
                    help="also run a small job on every world size and compare the latents with world size 1")
    ap.add_argument("--compile", action="store_true", help="torch.compile the elementwise chains")
    ap.add_argument("--experts", type=int, choices=[1, 2], default=1,
                    help="2: a Wan2.2 A14B style pair (random high- and low-noise experts of --model's shape)")
    ap.add_argument("--boundary", type=float, default=0.875, help="sigma where the low-noise expert takes over")
    ap.add_argument("--cfg-low", type=float, default=None, help="cfg of the low-noise expert (default: --cfg)")
    ap.add_argument("--weights", choices=["dequant", "fp8"], default="dequant",
                    help="fp8: the blocks' Linear weights held in fp8 and dequantised per layer (PoolSpec.weights)")
    ap.add_argument("--in-flight", type=int, default=None)
    ap.add_argument("--prewarm", choices=["auto", "on", "off"], default="auto",
                    help="RankEngine.prewarm (auto: on for GPU pipelines)")
    ap.add_argument("--save-verify", default=None, help="save the --verify latents (one .npy per GPU count) here")
    ap.add_argument("--baseline", action="store_true", help="also run 1-GPU full-sequence sampling")
    ap.add_argument("--baseline-frames", type=int, nargs="+", default=None,
                    help="latent frames of the baseline runs (default: --frames)")
    ap.add_argument("--extrapolate", type=int, nargs="+", default=[],
                    help="also print rows for these latent frame counts, extrapolated from the two longest measured "
                         "runs of each GPU count (time linear in the number of blocks; labelled as extrapolated)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", default=None, help="write results here too")
    args = ap.parse_args()
    cfg = WanConfig.tiny() if args.tiny else MODELS[args.model]()
    tpf = (args.height // 16) * (args.width // 16)
    b = 2 if args.cfg != 1 else 1
    b_low = b if args.cfg_low is None else (2 if args.cfg_low != 1 else 1)
    experts = None
    if args.experts == 2:
        experts = [0 if s >= args.boundary else 1 for s in _sigmas(args.steps)[:-1]]
    rows = []
    dev_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    verify = {}
    for world in args.world:
        runs = [(f"dualparal N={world} T={f}", f, args.P, args.K) for f in args.frames]
        res = run(world, args, runs)
        for r in res:
            if r["name"] == "verify":
                verify[world] = r["latents"]
        for r in _aggregate([r for r in res if r["name"] != "verify"], world):
            f = int(r["name"].split("T=")[1])
            per_item = item_flops(cfg, BlockLayout(f, args.P, args.K), args.steps, tpf, b, experts, b_low)
            rate = steady_rate(r.get("ticks", []), per_item)
            rows.append(dict(r, world=world, frames=f, flops=sum(per_item), tick_rate=rate,
                             plan_gib=_plan(cfg, world, args, args.P, args.K, tpf, b, b_low)))
            if rate:
                print(f"N={world} T={f}: steady-state {rate / world / 1e12:.0f} TFLOP/s per GPU from the last "
                      f"rank's block-step ticks (middle half of the job)", flush=True)
            _row(rows[-1])
        rows.extend(_extrapolated([r for r in rows if r["world"] == world and "T=" in r["name"]], cfg, args, tpf, b,
                                  experts, b_low))
    if args.baseline:
        runs = [(f"full-sequence 1 GPU T={f}", f, f, 0) for f in (args.baseline_frames or args.frames)]
        for r in _aggregate([r for r in run(1, args, runs) if r["name"] != "verify"], 1):
            f = int(r["name"].split("T=")[1])
            fl = job_flops(cfg, BlockLayout(f, f, 0), args.steps, tpf, b, experts, b_low)
            rows.append(dict(r, world=1, frames=f, flops=fl, plan_gib=_plan(cfg, 1, args, f, 0, tpf, b, b_low)))
            _row(rows[-1])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{dev_name}, torch {torch.__version__}, {stamp}; {args.model if not args.tiny else 'tiny'} "
          f"{args.dtype}, {args.height}x{args.width}, {args.steps} steps, cfg {args.cfg}, P={args.P} K={args.K}, "
          f"attention={args.attention}, sampler={args.sampler}, fuse={args.fuse}, compile={args.compile}, "
          f"experts={args.experts} (boundary {args.boundary}, cfg_low {args.cfg_low}), weights={args.weights}")
    print(f"command: python {' '.join(sys.argv)}")
    print("| run | GPUs | latent frames | video frames | time (s) | TFLOP/s per GPU | peak GiB/GPU (alloc) |"
          " reserved GiB/GPU | weights GiB/GPU (alloc) | planned GiB/GPU (memplan) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        _row(r)
    if verify:
        ref_w = min(verify)
        for w, lat in sorted(verify.items()):
            d = float(abs(lat - verify[ref_w]).max())
            rel = float(np.linalg.norm(lat - verify[ref_w]) / max(np.linalg.norm(verify[ref_w]), 1e-30))
            print(f"verify: N={w} vs N={ref_w}: max |diff| = {d:.3g}, relative L2 {rel:.3g}, mean |diff| "
                  f"{float(abs(lat - verify[ref_w]).mean()):.3g} (finite: {bool(np.isfinite(lat).all())})")
    if args.save_verify:
        Path(args.save_verify).mkdir(parents=True, exist_ok=True)
        for w, lat in verify.items():
            np.save(Path(args.save_verify) / f"verify_N{w}.npy", lat)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=dev_name, date=stamp, argv=sys.argv, rows=rows), indent=1))


def _extrapolated(measured: list[dict], cfg, args, tpf, b, experts, b_low) -> list[dict]:
    """Rows for ``args.extrapolate``. Once the pipeline is full every block-step takes time in proportion to its
    FLOPs, so the time is ``fill_and_drain + FLOPs / rate``. With two measured lengths both terms come from them (the
    rate is the slope); with one, the rate is the steady-state rate of the last rank's block-step ticks. Memory is
    the longest run's measured peak: the cache holds a fixed window, so it does not grow with the video."""
    pts = sorted((r["flops"], r) for r in measured if r["name"].startswith("dualparal") and "extrapolated" not in
                 r["name"])
    if not pts or not args.extrapolate:
        return []
    f2, r2 = pts[-1]
    if len(pts) >= 2 and pts[-2][0] != f2:
        f1, r1 = pts[-2]
        per_flop = (r2["seconds"] - r1["seconds"]) / (f2 - f1)
        how = f"extrapolated from T={r1['frames']},{r2['frames']}"
        print(f"N={r2['world']}: steady-state rate {1 / per_flop / r2['world'] / 1e12:.0f} TFLOP/s per GPU, fill and "
              f"drain {r2['seconds'] - per_flop * f2:.1f} s (from T={r1['frames']},{r2['frames']})", flush=True)
    elif r2.get("tick_rate"):
        per_flop = 1.0 / r2["tick_rate"]
        how = f"extrapolated from the steady-state ticks of T={r2['frames']}"
    else:
        return []
    out = []
    for f in args.extrapolate:
        fl = job_flops(cfg, BlockLayout(f, args.P, args.K), args.steps, tpf, b, experts, b_low)
        out.append(dict(r2, name=f"dualparal N={r2['world']} T={f} ({how})", frames=f,
                        seconds=r2["seconds"] + per_flop * (fl - f2), flops=fl, ticks=[]))
        _row(out[-1])
    return out


def _row(r: dict) -> None:
    tf = r["flops"] / r["seconds"] / r["world"] / 1e12
    print(f"| {r['name']} | {r['world']} | {r['frames']} | {(r['frames'] - 1) * 4 + 1} | {r['seconds']:.1f} | "
          f"{tf:.0f} | {r['peak_gib']:.2f} | {r['reserved_gib']:.2f} | {r['weights_gib']:.2f} | "
          f"{r['plan_gib']:.2f} |", flush=True)


def _plan(cfg: WanConfig, world: int, args, P: int, K: int, tpf: int, b: int, b_low: int) -> float:
    """The largest rank's planned GiB (dualparal_core.memplan), to set beside the measured peak."""
    from dualparal_core.memplan import plan_rank

    batches = (b,) if args.experts == 1 else (b, b_low)
    dtype = args.dtype if args.dtype in ("bf16", "fp16", "fp32") else "bf16"
    return max(plan_rank(cfg, layers, embed=r == 0, head=r == world - 1, dtype=dtype, fp8=args.weights == "fp8",
                         experts=args.experts, batches=batches, frames_p=P, frames_k=K, tpf=tpf).gib()["total"]
               for r, layers in enumerate(split_layers(cfg.num_layers, world)))


def _aggregate(results: list[dict], world: int) -> list[dict]:
    """One row per run: the slowest rank's time and the largest per-rank memory."""
    by = {}
    for r in results:
        a = by.setdefault(r["name"], dict(name=r["name"], seconds=0.0, peak_gib=0.0, reserved_gib=0.0,
                                          weights_gib=0.0))
        a["weights_gib"] = max(a["weights_gib"], r.get("weights_gib", 0.0))
        a["seconds"] = max(a["seconds"], r["seconds"])
        a["peak_gib"] = max(a["peak_gib"], r["peak_gib"])
        a["reserved_gib"] = max(a["reserved_gib"], r["reserved_gib"])
        if r.get("ticks"):
            a["ticks"] = r["ticks"]
    return list(by.values())


if __name__ == "__main__":
    main()
