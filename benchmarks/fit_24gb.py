"""Which Wan2.2 A14B settings fit on two 24 GB cards: measured on bigger GPUs under a per-process memory cap.

    python benchmarks/fit_24gb.py                       # 2 GPUs, each capped to a 24 GiB card, the default settings
    python benchmarks/fit_24gb.py --settings 832x480:K4:3.5/1 1280x720:K0:1/1
    python benchmarks/fit_24gb.py --device cpu --tiny   # CPU smoke run of the same code path (no cap on CPU)

The ranks are the product's (benchmarks/shipped.py: WorkerPool.start, runtime.build_stage, pool.generate). Every
rank builds its slice of both experts (random weights, 14B shapes, the blocks' Linear weights in fp8 as the
Loader's `weights = fp8` keeps them), then its engine caps its CUDA allocator (``DUALPARAL_MEMORY_CAP_GIB``, read
by RankEngine: ``torch.cuda.set_per_process_memory_fraction``) to ``--gib`` minus ``--reserve`` (what a real card
loses to the CUDA context and NCCL, which live outside the allocator; the run prints what they took here). Jobs
follow each other on a pool as a user's do (no cache emptied in between). Each setting then
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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import shipped  # noqa: E402
import torch  # noqa: E402

from dualparal_core.config import WanConfig, split_layers  # noqa: E402

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


def _settings_job(cfg: WanConfig, s: Setting, P: int):
    c, c_low = GUIDANCE[s.guidance]
    return shipped.make_job(cfg, 3 * P, len(PROBE_SIGMAS) - 1, P, s.K, s.height, s.width, cfg=c, cfg_low=c_low,
                            sigma_table=PROBE_SIGMAS)


def _group(world: int, args, settings: list[Setting]) -> tuple[list[dict], dict[str, list[dict]], dict | None]:
    """Run settings in order on one pool until all are done or one runs out of memory.

    Returns the ranks' ready entries, {setting: the ranks' profiles} and the out-of-memory (setting, rank, error)
    or None. A ``--fake-oom`` setting (CPU tests of the restart path) gets a pool of its own, started with
    DUALPARAL_FAULT so that its last rank raises torch.OutOfMemoryError at its first block-step: the group stops
    before it, and the next group starts with it.
    """
    fake = set(args.fake_oom or [])
    cfg = WanConfig.tiny() if args.tiny else WanConfig.wan21_14b()
    env = {}
    if args.device == "cuda":
        env["DUALPARAL_MEMORY_CAP_GIB"] = str(args.gib - args.reserve)
    if str(settings[0]) in fake:  # the tests' fault-injecting rank (tests/support/faulty_rank.py), CPU tests only
        env.update(DUALPARAL_FAULT=f"rank={world - 1},kind=oom,step=1", DUALPARAL_RANK_MODULE="faulty_rank",
                   PYTHONPATH=str(Path(__file__).resolve().parents[1] / "tests" / "support"))
    # the boundary between the probe's 2nd and 3rd sigma: two high-noise steps, one low-noise step
    pool = shipped.start_pool(cfg, world, device=args.device, weights=args.weights, experts=2,
                              boundary=PROBE_SIGMAS[1] - 0.01, timeout=args.timeout, env=env)
    ready = [dict(rank=i["rank"], weights_gib=i["weight_bytes"] / 2**30, outside_gib=0.0) for i in pool.ready_info]
    done: dict[str, list[dict]] = {}
    try:
        for i, s in enumerate(settings):
            if i and str(s) in fake:
                break
            try:
                pool.generate(_settings_job(cfg, s, args.P))
            except torch.OutOfMemoryError as e:
                cause = e.__cause__
                error = getattr(cause, "cause", str(e)).splitlines()[0][:200]
                print(f"  {s}: out of memory on rank {getattr(cause, 'rank', '?')}", flush=True)
                return ready, done, dict(setting=str(s), rank=getattr(cause, "rank", None), error=error)
            done[str(s)] = shipped.profiles(pool)
            for entry, p in zip(ready, done[str(s)]):
                entry.update({k: p[k] for k in ("weights_gib", "outside_gib", "device_name") if k in p})
            print(f"  {s}: peak {[round(p['peak_gib'], 2) for p in done[str(s)]]} GiB", flush=True)
    finally:
        pool.close()
    return ready, done, None


def fit(world: int, args, settings: list[Setting]) -> tuple[dict, list[dict]]:
    """{setting: result} and the groups' ready entries (one per rank); a new group after each out-of-memory."""
    result: dict[str, dict] = {}
    ready: list[dict] = []
    pending = list(settings)
    while pending:
        got, done, oom = _group(world, args, pending)
        ready += got
        for text, ps in done.items():
            result[text] = dict(fits=True, seconds=max(p["loop_s"] for p in ps),
                                peak_gib=[p["peak_gib"] for p in ps], reserved_gib=[p["reserved_gib"] for p in ps])
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
    dev_name = next((m["device_name"] for m in ready if m.get("device_name")), args.device)
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
