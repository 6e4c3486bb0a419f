"""Which Wan2.2 A14B settings fit on two 24 GB cards: measured on bigger GPUs under a per-process memory cap.

    python benchmarks/fit_24gb.py                       # 2 GPUs, each capped to a 24 GiB card, the default settings
    python benchmarks/fit_24gb.py --settings 832x480:K4:3.5/1 1280x720:K0:1/1
    python benchmarks/fit_24gb.py --device cpu --tiny   # CPU smoke run of the same code path (no cap on CPU)

Every rank builds its slice of both experts (random weights, 14B shapes, the blocks' Linear weights in fp8 as the
Loader's `weights = fp8` keeps them), then caps its CUDA allocator with
``torch.cuda.set_per_process_memory_fraction`` to ``--gib`` minus ``--reserve`` (what a real card loses to the
CUDA context and NCCL, which live outside the allocator; the run prints what they took here). Each setting then
runs one short job whose three blocks and two expert passes contain every window shape of a long video (left
and right context, batch 2 with CFG and batch 1 without), so its peak is the peak of a video of any length.

A setting that runs out of memory on any rank ends the group (a pipeline cannot go on with one rank gone); the
script starts a new group for the settings left, skipping those that need at least as much in every respect
(resolution, K, guidance). Settings are tried in the order of memplan's plan, smallest first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from bench_s1 import _free_port, _stage, join_rank  # noqa: E402

from dualparal_core.config import SamplingConfig, WanConfig, split_layers  # noqa: E402

# the sigmas of the probe job: two steps above the boundary (high-noise expert), one below (low-noise expert)
PROBE_SIGMAS = (1.0, 0.93, 0.5, 0.0)
GUIDANCE = {"1/1": (1.0, 1.0), "3.5/1": (3.5, 1.0), "3.5/3.5": (3.5, 3.5)}
DEFAULT_SETTINGS = ["832x480:K0:3.5/1", "832x480:K2:1/1", "832x480:K4:1/1", "1280x720:K0:1/1",
                    "832x480:K2:3.5/1", "832x480:K8:1/1", "832x480:K4:3.5/1", "1280x720:K2:1/1",
                    "1280x720:K0:3.5/1"]


@dataclass(frozen=True)
class Setting:
    width: int
    height: int
    K: int
    guidance: str

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``WIDTHxHEIGHT:K<num_cat>:<cfg>/<cfg_low>``, e.g. ``832x480:K4:3.5/1``."""
        try:
            res, k, g = text.split(":")
            w, h = (int(v) for v in res.lower().split("x"))
            if not k.upper().startswith("K") or g not in GUIDANCE or w % 16 or h % 16:
                raise ValueError
            return cls(w, h, int(k[1:]), g)
        except ValueError:
            raise SystemExit(f"--settings: {text!r} is not WIDTHxHEIGHT:K<n>:<cfg>/<cfg_low> with a size that is a "
                             f"multiple of 16 and guidance one of {sorted(GUIDANCE)}; e.g. 832x480:K4:3.5/1") from None

    def __str__(self) -> str:
        return f"{self.width}x{self.height}:K{self.K}:{self.guidance}"

    def batches(self) -> tuple[int, int]:
        return tuple(2 if c != 1.0 else 1 for c in GUIDANCE[self.guidance])

    def covers(self, other: Setting) -> bool:
        """Whether this setting needs at least as much memory as ``other`` in every respect (so it cannot fit
        where ``other`` did not)."""
        return (self.width * self.height >= other.width * other.height and self.K >= other.K
                and all(a >= b for a, b in zip(self.batches(), other.batches(), strict=True)))


def planned_gib(cfg: WanConfig, world: int, s: Setting, P: int, fp8: bool) -> float:
    from dualparal_core.memplan import plan_rank

    tpf = (s.height // 16) * (s.width // 16)
    return max(plan_rank(cfg, layers, embed=r == 0, head=r == world - 1, dtype="bf16", fp8=fp8, experts=2,
                         batches=s.batches(), frames_p=P, frames_k=s.K, tpf=tpf).gib()["total"]
               for r, layers in enumerate(split_layers(cfg.num_layers, world)))


def _rank_main(rank: int, world: int, port: int, args, settings: list[str], q) -> None:
    from dualparal_core.comm import destroy_groups
    from dualparal_core.engine import RankEngine
    from dualparal_core.experts import Experts
    from dualparal_core.protocol import Job

    cuda = args.device == "cuda"
    dev, pipe = join_rank(rank, world, port, args.device, args.timeout)
    cfg = WanConfig.tiny() if args.tiny else WanConfig.wan21_14b()
    layers = split_layers(cfg.num_layers, world)[rank]
    args.attention, args.fuse, args.compile = "sdpa", False, False
    st = Experts([_stage(cfg, layers, rank, world, torch.bfloat16, dev, args, seed) for seed in (0, 1)],
                 PROBE_SIGMAS[1] - 0.01)  # boundary between the probe's 2nd and 3rd sigma
    eng = RankEngine(st, pipe)
    cap = None
    if cuda:
        weights = torch.cuda.memory_allocated(dev) / 2**30
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        outside = (total - free - torch.cuda.memory_reserved(dev)) / 2**30  # context, NCCL, cuBLAS workspaces
        cap = (args.gib - args.reserve) * 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), dev)
        q.put(dict(kind="ready", rank=rank, weights_gib=weights, outside_gib=outside))
    else:
        q.put(dict(kind="ready", rank=rank, weights_gib=0.0, outside_gib=0.0))
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 512, cfg.text_dim, generator=g)
    uncond = torch.randn(1, 512, cfg.text_dim, generator=g)
    fake_oom = {s for s in (args.fake_oom or [])}
    for text in settings:
        s = Setting.parse(text)
        c, c_low = GUIDANCE[s.guidance]
        sc = SamplingConfig(sigmas=PROBE_SIGMAS, sampler="uni_pc", cfg=c, cfg_low=c_low, seed=0,
                            noise_mode="coordinated", num_per_block=args.P, num_cat=s.K)
        job = Job(sc, (1, 16, 3 * args.P, s.height // 8, s.width // 8), cond, uncond if sc.use_cfg else None)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        try:
            if text in fake_oom and rank == world - 1:  # CPU tests of the restart path
                raise torch.OutOfMemoryError("fake out-of-memory (--fake-oom)")
            eng.run_job(job)
            if cuda:
                torch.cuda.synchronize(dev)
        except torch.OutOfMemoryError as e:
            q.put(dict(kind="oom", rank=rank, setting=text, error=str(e).splitlines()[0][:200]))
            time.sleep(60)  # the parent ends the group
            os._exit(3)
        q.put(dict(kind="done", rank=rank, setting=text, seconds=time.perf_counter() - t0,
                   peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else 0.0,
                   reserved_gib=torch.cuda.max_memory_reserved(dev) / 2**30 if cuda else 0.0))
    q.put(dict(kind="end", rank=rank))
    if world > 1:
        destroy_groups()


def _group(world: int, args, settings: list[str]) -> list[dict]:
    """Run settings in order on one group until all are done or one runs out of memory; the group's messages."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, args, settings, q)) for r in range(world)]
    for p in procs:
        p.start()
    out, ended = [], 0
    try:
        while ended < world:
            try:
                m = q.get(timeout=args.timeout)
            except queue.Empty:
                out.append(dict(kind="timeout"))
                break
            out.append(m)
            print(f"  {m}", flush=True)
            if m["kind"] == "oom":
                break
            ended += m["kind"] == "end"
    finally:
        for p in procs:
            if ended < world:
                p.kill()
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return out


def fit(world: int, args, settings: list[Setting]) -> tuple[dict, list[dict]]:
    """{setting: result} and the groups' ready messages; a new group after each out-of-memory."""
    result: dict[str, dict] = {}
    ready: list[dict] = []
    pending = list(settings)
    while pending:
        msgs = _group(world, args, [str(s) for s in pending])
        ready += [m for m in msgs if m["kind"] == "ready"]
        done: dict[str, list[dict]] = {}
        for m in msgs:
            if m["kind"] == "done":
                done.setdefault(m["setting"], []).append(m)
        for text, ms in done.items():
            if len(ms) == world:
                result[text] = dict(fits=True, seconds=max(m["seconds"] for m in ms),
                                    peak_gib=[m["peak_gib"] for m in sorted(ms, key=lambda m: m["rank"])],
                                    reserved_gib=[m["reserved_gib"] for m in sorted(ms, key=lambda m: m["rank"])])
        oom = next((m for m in msgs if m["kind"] == "oom"), None)
        if oom is None and any(m["kind"] == "timeout" for m in msgs):
            raise SystemExit(f"the group stopped answering within --timeout {args.timeout} s; messages: {msgs}")
        if oom is not None:
            bad = Setting.parse(oom["setting"])
            result[str(bad)] = dict(fits=False, why=f"out of memory on rank {oom['rank']}: {oom['error']}")
            for s in pending:
                if str(s) not in result and s.covers(bad):
                    result[str(s)] = dict(fits=False, why=f"needs at least what {bad} needs")
        pending = [s for s in pending if str(s) not in result]
    return result, ready


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--gib", type=float, default=24.0, help="memory of the emulated card, GiB")
    ap.add_argument("--reserve", type=float, default=1.0,
                    help="GiB of the card the allocator may not use (CUDA context, NCCL; measured and printed here)")
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                    help="WIDTHxHEIGHT:K<num_cat>:<cfg>/<cfg_low> (guidance: 1/1, 3.5/1 or 3.5/3.5)")
    ap.add_argument("--P", type=int, default=8)
    ap.add_argument("--weights", choices=["dequant", "fp8"], default="fp8")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke run)")
    ap.add_argument("--fake-oom", nargs="*", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    settings = [Setting.parse(t) for t in args.settings]
    cfg = WanConfig.tiny() if args.tiny else WanConfig.wan21_14b()
    plan = {str(s): planned_gib(cfg, args.gpus, s, args.P, args.weights == "fp8") for s in settings}
    settings.sort(key=lambda s: plan[str(s)])
    t0 = time.time()
    result, ready = fit(args.gpus, args, settings)
    dev_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"\n{dev_name}, torch {torch.__version__}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
          f"{time.time() - t0:.0f} s; Wan2.2 A14B shapes (two experts, random), {args.weights} weights, P={args.P}, "
          f"{args.gpus} GPUs each capped to {args.gib:g} - {args.reserve:g} GiB of allocator memory")
    if ready:
        print(f"weights per GPU {max(m['weights_gib'] for m in ready):.2f} GiB; outside the allocator (CUDA context, "
              f"NCCL) up to {max(m['outside_gib'] for m in ready):.2f} GiB per GPU")
    print("command: python " + " ".join(sys.argv))
    print("| resolution | K | cfg / cfg_low | planned GiB (memplan) | fits | peak GiB per GPU (alloc) | "
          "reserved GiB per GPU | probe job (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for s in settings:
        r = result[str(s)]
        if r["fits"]:
            print(f"| {s.width}×{s.height} | {s.K} | {s.guidance} | {plan[str(s)]:.1f} | ✓ | "
                  f"{' / '.join(f'{v:.2f}' for v in r['peak_gib'])} | "
                  f"{' / '.join(f'{v:.2f}' for v in r['reserved_gib'])} | {r['seconds']:.1f} |")
        else:
            print(f"| {s.width}×{s.height} | {s.K} | {s.guidance} | {plan[str(s)]:.1f} | ✗ ({r['why']}) | | | |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(result=result, plan=plan, ready=ready, argv=sys.argv,
                                                   device=dev_name), indent=1))


if __name__ == "__main__":
    main()
