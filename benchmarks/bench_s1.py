"""Setting S1 of the design (and variants): DualParal on N GPUs against one-GPU full-sequence sampling, one table.

    python benchmarks/bench_s1.py --world 2 --baseline          # 2 GPUs + the 1-GPU one-block baseline
    python benchmarks/bench_s1.py --device cpu --tiny --world 1 2 --height 32 --width 32 --frames 8 12 \\
        --steps 2 --P 2 --K 2                                    # a CPU smoke run of the same code path
    python benchmarks/bench_s1.py --model 14b --experts 2 --weights fp8 --cfg-low 1 --world 2 --frames 40
                                                                 # Wan2.2 A14B shapes: two experts, fp8 in memory

Every DualParal row, and the one-block ``--baseline`` row (DualParal with P = T, K = 0: plain full-sequence
sampling), runs through the product (benchmarks/shipped.py): ``WorkerPool.start`` with a PoolSpec of random
weights, ``pool.generate``, and the ranks' own measurements (``DUALPARAL_PROFILE=1``, RankEngine.last_profile). The
QKV projection is therefore always fused (``--fuse`` is accepted for old commands and ignored), and the elementwise
chains are compiled as the product decides (on for GPUs; ``--compile`` / ``--no-compile`` set PoolSpec.compile).
``--diffusers-baseline`` adds diffusers' WanTransformer3DModel sampling the whole video on one GPU, in this process
(benchmarks/baseline_diffusers.py; not our code, so not through the pool), when diffusers is importable.

Random weights (compute is the same as real weights). ``time`` is the slowest rank's run_job wall time (device
synchronised at both ends) of a job run after a warm-up job with the same window shapes on the same pool;
``generate()`` is the caller's wall time of that job (its trip to the ranks and the latents' way back included).
FLOPs follow docs/performance.md (dualparal_core/bench/flops.py). ``python -m dualparal_core bench`` is the product's
benchmark (our engine and its peers in one table); this script keeps the sweeps it lacks (GPU counts, two experts,
--extrapolate, --verify).

S1 at N = 1 on the device machine, one command from the repository root (the diffusers row only where diffusers
imports, e.g. from wheels carried in .whl/; NVLink multicast stays off in this process and every rank)::

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1; \
    if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; fi; \
    D=$(python3 -c 'import diffusers' 2>/dev/null && echo --diffusers-baseline); set -o pipefail; \
    python3 benchmarks/bench_s1.py --world 1 --frames 72 --compile --baseline $D --timeout 540 \
    --json $OUT/s1_n1.json 2>&1 | tee $OUT/s1_n1.log

(about 400 s on one H100/H200: pool start, the DualParal row, the one-block row, the diffusers row, each after
its warm-up; ``bash benchmarks/gpu_tables.sh s1-n1`` runs the same under a time limit with logs in $OUT.)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import shipped  # noqa: E402
import torch  # noqa: E402

from dualparal_core.bench.flops import block_step_flops, item_flops, job_flops, steady_rate  # noqa: E402,F401
from dualparal_core.conditioning import ImageConditioning  # noqa: E402
from dualparal_core.config import KV_CACHE_MODES, BlockLayout, WanConfig, split_layers  # noqa: E402

MODELS = {"1.3b": WanConfig.wan21_1_3b, "14b": WanConfig.wan21_14b}
_sigmas = shipped.sigmas  # the name other scripts imported


class Setup:
    """What every row of one invocation shares: the model shape, tokens per frame, batches, experts per step."""

    def __init__(self, args):
        self.args = args
        self.cfg = WanConfig.tiny() if args.tiny else MODELS[args.model]()
        if args.i2v:  # Wan2.1 I2V: 36 channels in (16 noisy + 20 image conditioning), img_emb and k_img/v_img
            self.cfg = dataclasses.replace(self.cfg, in_channels=self.cfg.out_channels + 20, image_dim=1280)
        self.tpf = (args.height // 16) * (args.width // 16)
        self.b = 2 if args.cfg != 1 else 1
        self.b_low = self.b if args.cfg_low is None else (2 if args.cfg_low != 1 else 1)
        self.experts = None
        if args.experts == 2:
            self.experts = [0 if s >= args.boundary else 1 for s in shipped.sigmas(args.steps)[:-1]]

    def item_flops(self, frames: int, P: int, K: int, steps: int | None = None) -> list[float]:
        a = self.args
        experts = self.experts if steps is None else self.experts_of(steps)
        return item_flops(self.cfg, BlockLayout(frames, P, K), steps or a.steps, self.tpf, self.b, experts,
                          self.b_low)

    def experts_of(self, steps: int) -> list[int] | None:
        a = self.args
        return None if a.experts == 1 else [0 if s >= a.boundary else 1 for s in shipped.sigmas(steps)[:-1]]

    def job(self, frames: int, steps: int, P: int, K: int, sigma_table: tuple[float, ...] | None = None):
        a = self.args
        job = shipped.make_job(self.cfg, frames, steps, P, K, a.height, a.width, sampler=a.sampler, cfg=a.cfg,
                               cfg_low=a.cfg_low, sigma_table=sigma_table)
        if a.i2v:  # what WanImageToVideo + CLIPVisionEncode give: a concat latent for every frame, 257 CLIP tokens
            g = torch.Generator().manual_seed(2)
            b, _, t, h, w = job.shape
            job.image = ImageConditioning(concat=torch.randn(b, 20, t, h, w, generator=g),
                                          clip=torch.randn(1, 257, 1280, generator=g))
        return job

    def warmup(self, frames: int, P: int, K: int):
        """A short job with every kernel shape of the real one: its window shapes, and the first and last sigmas
        of the real table, so that with two experts both run, the low-noise one also with right context."""
        s = shipped.sigmas(self.args.steps)
        tail = 3 if self.args.experts == 2 else 2
        table = s[:1] + s[-tail:] if len(s) > tail else s
        return self.job(shipped.warmup_frames(frames, P, K), len(table) - 1, P, K, sigma_table=table)

    def pool(self, world: int):
        a = self.args
        return shipped.start_pool(self.cfg, world, device=a.device, dtype=a.dtype, attention=a.attention,
                                  compile=a.compile, weights=a.weights, experts=a.experts, boundary=a.boundary,
                                  in_flight=a.in_flight, timeout=a.timeout, matmul=a.matmul,
                                  kv_cache=a.kv_cache)

    def plan(self, world: int, P: int, K: int) -> float:
        """The largest rank's planned GiB (dualparal_core.memplan), to set beside the measured peak."""
        from dualparal_core.memplan import plan_rank

        a = self.args
        batches = (self.b,) if a.experts == 1 else (self.b, self.b_low)
        return max(plan_rank(self.cfg, layers, embed=r == 0, head=r == world - 1, dtype=a.dtype,
                             fp8=a.weights == "fp8", experts=a.experts, batches=batches, frames_p=P, frames_k=K,
                             tpf=self.tpf, kv_cache=a.kv_cache).gib()["total"]
                   for r, layers in enumerate(split_layers(self.cfg.num_layers, world)))

    def measure(self, pool, name: str, world: int, frames: int, P: int, K: int) -> dict:
        """One row: a warm-up job with every window shape of the real one, then the real one, on ``pool``."""
        a = self.args
        res = shipped.timed(pool, self.job(frames, a.steps, P, K), self.warmup(frames, P, K))
        latents = res.pop("_latents")
        if a.save_latents:  # to compare two runs' final latents (e.g. fa3_fp8 against fa3)
            Path(a.save_latents).mkdir(parents=True, exist_ok=True)
            gemm = "_fp8gemm" if a.matmul == "fp8" else ""
            np.save(Path(a.save_latents) / f"{a.attention}{gemm}_N{world}_T{frames}.npy", latents.numpy())
        per_item = self.item_flops(frames, P, K)
        row = dict(res, name=name, world=world, frames=frames, flops=sum(per_item),
                   tick_rate=steady_rate(res["ticks"], per_item) if BlockLayout(frames, P, K).num_blocks > 1 else None,
                   plan_gib=self.plan(world, P, K))
        if row["tick_rate"]:
            print(f"{name}: steady-state {row['tick_rate'] / world / 1e12:.3g} TFLOP/s per GPU from the last "
                  f"rank's block-step ticks (middle half of the job)", flush=True)
        _row(row)
        return row


def run_world(setup: Setup, world: int, verify: dict) -> list[dict]:
    """The DualParal rows of one GPU count (and, on one GPU, the one-block baseline rows) on one pool."""
    a = setup.args
    rows = []
    pool = setup.pool(world)
    try:
        for f in a.frames:
            rows.append(setup.measure(pool, f"dualparal N={world} T={f}", world, f, a.P, a.K))
        rows.extend(_extrapolated(rows, setup))
        if a.baseline and world == 1:
            rows.extend(run_baseline(setup, pool))
        if a.verify:
            verify[world] = pool.generate(setup.job(24, 3, a.P, a.K)).numpy()
    finally:
        pool.close()
    return rows


def run_baseline(setup: Setup, pool=None) -> list[dict]:
    """Full-sequence sampling on one GPU: DualParal with one block covering the whole video (P = T, K = 0)."""
    a = setup.args
    own = pool is None
    pool = setup.pool(1) if own else pool
    try:
        return [setup.measure(pool, f"full-sequence 1 GPU T={f}", 1, f, f, 0) for f in (a.baseline_frames or a.frames)]
    finally:
        if own:
            pool.close()


def run_diffusers(setup: Setup) -> list[dict]:
    """diffusers' WanTransformer3DModel over the whole video on one GPU (in this process, after every pool)."""
    from baseline_diffusers import run_full

    a, rows = setup.args, []
    for f in (a.baseline_frames or a.frames):
        res = run_full(setup.cfg, f, a.height, a.width, shipped.sigmas(a.steps), a.cfg, a.dtype, a.device)
        rows.append(dict(res, name=f"diffusers full-sequence 1 GPU T={f}", world=1, frames=f,
                         flops=sum(setup.item_flops(f, f, 0)), plan_gib=setup.plan(1, f, 0), ticks=[]))
        _row(rows[-1])
    return rows


def _extrapolated(measured: list[dict], setup: Setup) -> list[dict]:
    """Rows for ``--extrapolate``. Once the pipeline is full every block-step takes time in proportion to its
    FLOPs, so the time is ``fill_and_drain + FLOPs / rate``. With two measured lengths both terms come from them (the
    rate is the slope); with one, the rate is the steady-state rate of the last rank's block-step ticks. Memory is
    the longest run's measured peak: the cache holds a fixed window, so it does not grow with the video."""
    a = setup.args
    pts = sorted((r["flops"], r) for r in measured if r["name"].startswith("dualparal"))
    if not pts or not a.extrapolate:
        return []
    f2, r2 = pts[-1]
    if len(pts) >= 2 and pts[-2][0] != f2:
        f1, r1 = pts[-2]
        per_flop = (r2["seconds"] - r1["seconds"]) / (f2 - f1)
        how = f"extrapolated from T={r1['frames']},{r2['frames']}"
        print(f"N={r2['world']}: steady-state rate {1 / per_flop / r2['world'] / 1e12:.3g} TFLOP/s per GPU, fill "
              f"and drain {r2['seconds'] - per_flop * f2:.1f} s (from T={r1['frames']},{r2['frames']})", flush=True)
    elif r2.get("tick_rate"):
        per_flop = 1.0 / r2["tick_rate"]
        how = f"extrapolated from the steady-state ticks of T={r2['frames']}"
    else:
        return []
    out = []
    steps = a.extrapolate_steps or a.steps
    if steps != a.steps:
        how += f", {steps} steps"
    for f in a.extrapolate:
        fl = sum(setup.item_flops(f, a.P, a.K, steps))
        out.append(dict(r2, name=f"dualparal N={r2['world']} T={f} ({how})", frames=f, generate_s=None,
                        seconds=r2["seconds"] + per_flop * (fl - f2), flops=fl, ticks=[]))
        _row(out[-1])
    return out


HEADER = ("| run | GPUs | latent frames | video frames | time (s) | generate() (s) | TFLOP/s per GPU | "
          "peak GiB/GPU (alloc) | reserved GiB/GPU | weights GiB/GPU (alloc) | planned GiB/GPU (memplan) |")


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 10 else f"{v:.3g}"


def _row(r: dict) -> None:
    tf = r["flops"] / r["seconds"] / r["world"] / 1e12
    gen = "" if r.get("generate_s") is None else f"{r['generate_s']:.1f}"
    print(f"| {r['name']} | {r['world']} | {r['frames']} | {(r['frames'] - 1) * 4 + 1} | {r['seconds']:.1f} | {gen} | "
          f"{_fmt(tf)} | {r['peak_gib']:.2f} | {r['reserved_gib']:.2f} | {r['weights_gib']:.2f} | "
          f"{r['plan_gib']:.2f} |", flush=True)


def _print_verify(verify: dict, save: str | None) -> None:
    if not verify:
        return
    ref_w = min(verify)
    for w, lat in sorted(verify.items()):
        ref = verify[ref_w]
        rel = float(np.linalg.norm(lat - ref) / max(np.linalg.norm(ref), 1e-30))
        print(f"verify: N={w} vs N={ref_w}: max |diff| = {float(abs(lat - ref).max()):.3g}, relative L2 {rel:.3g}, "
              f"mean |diff| {float(abs(lat - ref).mean()):.3g} (finite: {bool(np.isfinite(lat).all())})")
    if save:
        Path(save).mkdir(parents=True, exist_ok=True)
        for w, lat in verify.items():
            np.save(Path(save) / f"verify_N{w}.npy", lat)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.fuse:
        print("note: --fuse is ignored: the product always fuses the QKV projection (runtime.build_stage)")
    setup, rows, verify = Setup(args), [], {}
    for world in args.world:
        rows.extend(run_world(setup, world, verify))
    if args.baseline and 1 not in args.world:
        rows.extend(run_baseline(setup))
    if args.diffusers_baseline:
        rows.extend(run_diffusers(setup))
    dev_name = next((r["device_name"] for r in rows if r.get("device_name")), args.device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{dev_name}, torch {torch.__version__}, {stamp}; {args.model if not args.tiny else 'tiny'}"
          f"{' I2V (36 channels in, img_emb, 257 CLIP tokens)' if args.i2v else ''} "
          f"{args.dtype}, {args.height}x{args.width}, {args.steps} steps, cfg {args.cfg}, P={args.P} K={args.K}, "
          f"attention={args.attention}, sampler={args.sampler}, shipped path (WorkerPool; fused QKV), "
          f"compile={'product default' if args.compile is None else args.compile}, experts={args.experts} "
          f"(boundary {args.boundary}, cfg_low {args.cfg_low}), weights={args.weights}, matmul={args.matmul}")
    print(f"command: python {' '.join(sys.argv if argv is None else ['benchmarks/bench_s1.py', *argv])}")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for r in rows:
        _row(r)
    _print_verify(verify, args.save_verify)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=dev_name, date=stamp, argv=argv or sys.argv, rows=rows),
                                              indent=1))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="*", default=[2],
                    help="GPU counts for DualParal (none: only the --baseline runs)")
    ap.add_argument("--model", choices=sorted(MODELS), default="1.3b")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke run)")
    ap.add_argument("--i2v", action="store_true",
                    help="Wan2.1 I2V shapes of --model (in_channels 36, img_emb, k_img/v_img): the job carries a "
                         "random concat latent for every frame and 257 CLIP-vision tokens, as WanImageToVideo with "
                         "CLIPVisionEncode gives; its FLOPs are counted as T2V's (the image cross-attention, 257 "
                         "keys, is under 1 %%)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--sampler", default="uni_pc")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, nargs="+", default=[72], help="latent frames (72 = 285 video frames)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--P", type=int, default=8)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--fuse", action="store_true", help="ignored (kept for old commands): the product always fuses")
    ap.add_argument("--verify", action="store_true",
                    help="also run a small job on every world size and compare the latents with world size 1")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="PoolSpec.compile: torch.compile the elementwise chains (default: the product's choice, "
                         "on for GPUs; DUALPARAL_COMPILE=0/1 also applies then)")
    ap.add_argument("--experts", type=int, choices=[1, 2], default=1,
                    help="2: a Wan2.2 A14B style pair (random high- and low-noise experts of --model's shape)")
    ap.add_argument("--boundary", type=float, default=0.875, help="sigma where the low-noise expert takes over")
    ap.add_argument("--cfg-low", type=float, default=None, help="cfg of the low-noise expert (default: --cfg)")
    ap.add_argument("--weights", choices=["dequant", "fp8"], default="dequant",
                    help="PoolSpec.weights (fp8: the blocks' Linear weights held in fp8, dequantised per layer)")
    ap.add_argument("--kv-cache", choices=list(KV_CACHE_MODES), default="exact",
                    help="PoolSpec.kv_cache (fp8: the right-context K/V kept in e4m3, a scale per token)")
    ap.add_argument("--matmul", choices=["bf16", "fp8"], default="bf16",
                    help="PoolSpec.matmul (fp8: the blocks' GEMMs in e4m3 through torch._scaled_mm; GPUs of compute "
                         "capability 8.9+, bf16)")
    ap.add_argument("--in-flight", type=int, default=None, help="PoolSpec.max_in_flight")
    ap.add_argument("--save-verify", default=None, help="save the --verify latents (one .npy per GPU count) here")
    ap.add_argument("--baseline", action="store_true",
                    help="also run 1-GPU full-sequence sampling (one block, through the pool)")
    ap.add_argument("--diffusers-baseline", action="store_true",
                    help="also run diffusers' WanTransformer3DModel over the whole video on one GPU")
    ap.add_argument("--baseline-frames", type=int, nargs="+", default=None,
                    help="latent frames of the baseline runs (default: --frames)")
    ap.add_argument("--extrapolate", type=int, nargs="+", default=[],
                    help="also print rows for these latent frame counts, extrapolated from the two longest measured "
                         "runs of each GPU count (time linear in the number of blocks; labelled as extrapolated)")
    ap.add_argument("--extrapolate-steps", type=int, default=None,
                    help="steps of the --extrapolate rows (default: --steps); e.g. measure 4 steps of 14B, "
                         "extrapolate to S1's 10 (the rate per FLOP is the measured one)")
    ap.add_argument("--timeout", type=float, default=900,
                    help="Timeouts.startup and .step of the pools (s)")
    ap.add_argument("--json", default=None, help="write results here too")
    ap.add_argument("--save-latents", default=None, help="save each DualParal row's final latents (.npy) here")
    return ap.parse_args(argv)


if __name__ == "__main__":
    main()
