"""``python -m dualparal_core bench``: its flags, and every check of them before anything starts (no torch, no
process): a refusal is one line naming the flag, the value and what works."""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dualparal_core.config import ATTENTION_BACKENDS, SAMPLER_NAMES, WanConfig, split_layers

MODELS = {"1.3b": WanConfig.wan21_1_3b, "14b": WanConfig.wan21_14b, "tiny": lambda: WanConfig.tiny(num_layers=4)}
BASELINE_ATTENTION = ("sdpa", "fa3")

HELP = """Our engine (random weights at the real shapes, through the shipped WorkerPool path) against its peers in
one run, one table: full-sequence sampling with diffusers' WanTransformer3DModel on one GPU (SDPA; --baseline-attention
fa3 adds the fastest kernel), diffusers' Ulysses context parallelism on 2+ GPUs, and with --reference DIR the
published DualParal code from a checkout. FLOPs: docs/performance.md. Example (S1, one GPU):

    python -m dualparal_core bench --model 1.3b --devices 0 --frames 72 --steps 10 --json s1.json
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="measure our engine and its peers side by side (random weights)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1.3b", choices=list(MODELS), help="Wan2.1 shapes (tiny: a CPU smoke run)")
    p.add_argument("--devices", default="auto", help="'auto' (every visible GPU, else 2 CPU ranks), GPU indices "
                                                     "'0,1' or 'cuda:0,cuda:1', 'cpu' or 'cpu:N'")
    p.add_argument("--frames", type=int, nargs="+", default=[72], help="latent frames; several values sweep the "
                                                                       "length (72 = 285 video frames)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--height", type=int, default=480, help="pixels, a multiple of 16")
    p.add_argument("--width", type=int, default=832, help="pixels, a multiple of 16")
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale (not 1: cond and uncond batched, b = 2)")
    p.add_argument("--shift", type=float, default=3.0, help="flow shift (3.0, as the published code runs)")
    p.add_argument("--sampler", default="uni_pc_bh2", choices=list(SAMPLER_NAMES),
                   help="our sampler (uni_pc_bh2: the published code's UniPC variant)")
    p.add_argument("--num-per-block", type=int, default=8, help="P: latent frames of each block")
    p.add_argument("--num-cat", type=int, default=8, help="K: context frames from each neighbour (0..P)")
    p.add_argument("--attention", nargs="+", default=["sdpa"],
                   help=f"our backend, one of {', '.join(ATTENTION_BACKENDS)}; several: a row (and a pool) each, "
                        f"compared with the first (time, peak, final latents' relative error)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="compute dtype (default: bf16 on GPUs, fp32 on CPU ranks)")
    p.add_argument("--matmul", nargs="+", default=["bf16"], choices=["bf16", "fp8"],
                   help="the blocks' GEMMs (PoolSpec.matmul; fp8: e4m3 through torch._scaled_mm, GPUs of compute "
                        "capability 8.9+, bf16): one value for every row, or one per --attention entry, paired up "
                        "(--attention fa3 fa3_fp8 fa3_fp8 --matmul bf16 bf16 fp8); one backend gets a row per value")
    p.add_argument("--fp8", action="store_true", help="add a row of the first --attention with the blocks' Linear "
                                                      "weights held in fp8 (PoolSpec.weights='fp8')")
    p.add_argument("--kv-cache", nargs="+", default=[], choices=["offload", "fp8"],
                   help="a row of the first --attention per value, the right-context K/V kept so (PoolSpec.kv_cache: "
                        "offload: in pinned host memory, the same bits; fp8: e4m3, half the bytes)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our elementwise chains (default: the product's choice, on for GPUs)")
    p.add_argument("--fuse", action="store_true", help="accepted for old command lines: our QKV projection is "
                                                       "always fused")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs of every shape before each timed run")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="full-sequence diffusers sampling on the first device")
    p.add_argument("--baseline-attention", nargs="+", default=["sdpa"], choices=list(BASELINE_ATTENTION),
                   help="the baseline's attention kernels, a row each (fa3: FlashAttention-3, pip install fa3-fwd)")
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="time only this many steps of each baseline and scale to --steps (long videos)")
    p.add_argument("--ulysses", action=argparse.BooleanOptionalAction, default=None,
                   help="diffusers' Ulysses context parallelism over the devices (default: on with 2+ GPUs)")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="a checkout of DualParal-Project/DualParal: run its code too (random weights)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the raw rows here (after every row)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds each row may take")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


@dataclass
class BenchPlan:
    """What the checks resolved."""

    devices: tuple[str, ...]
    dtype: str
    config: WanConfig
    ulysses: bool
    json: Path | None
    reference: Path | None

    @property
    def gpu(self) -> bool:
        return self.devices[0].startswith("cuda")


def _numbers(args: argparse.Namespace) -> None:
    from dualparal_core.headless.checks import FlagError, check_blocks, check_positive, check_sizes

    check_sizes(args)
    bad = [f for f in args.frames if f < 1]
    if bad:
        raise FlagError("--frames", bad[0], "latent frames must be at least 1 (72 latent frames = 285 video frames)")
    if not 1 <= args.steps <= 1000:
        raise FlagError("--steps", args.steps, "must lie between 1 and 1000 (10 for S1)")
    check_positive((("--cfg", args.cfg), ("--shift", args.shift), ("--timeout", args.timeout)))
    check_blocks(args)
    if args.warmup < 0:
        raise FlagError("--warmup", args.warmup, "must be 0 or more runs (1 is usual)")
    if args.baseline_steps is not None and not 1 <= args.baseline_steps <= args.steps:
        raise FlagError("--baseline-steps", args.baseline_steps, f"must lie between 1 and --steps={args.steps}")


def _attention(args: argparse.Namespace, gpu: bool) -> None:
    from dualparal_core.attention import FA3_PACKAGE, fa3_available
    from dualparal_core.headless.checks import FlagError

    for name in args.attention:
        if name not in ATTENTION_BACKENDS:
            raise FlagError("--attention", name, f"is not a backend; use one of {', '.join(ATTENTION_BACKENDS)}")
    fa3 = [n for n in args.attention if n.startswith("fa3")]
    for flag, wants in (("--attention", fa3[0] if fa3 else None),
                        ("--baseline-attention", "fa3" if args.baseline and "fa3" in args.baseline_attention
                         else None)):
        if wants and not gpu:
            raise FlagError(flag, wants, "FlashAttention-3 runs on Hopper GPUs (H100, H200); use sdpa on CPU")
        if wants and not fa3_available():
            raise FlagError(flag, wants, f"FlashAttention-3 is not installed in this Python: pip install "
                                         f"{FA3_PACKAGE}, or use sdpa")


def _peers(args: argparse.Namespace, devices: tuple[str, ...]) -> tuple[bool, Path | None]:
    """--ulysses and --reference against the devices; diffusers for every peer; returns (ulysses, reference)."""
    from dualparal_core.bench.reference import missing_files
    from dualparal_core.headless.checks import FlagError

    gpus = len(devices) if devices[0].startswith("cuda") else 0
    if args.ulysses and gpus < 2:
        raise FlagError("--ulysses", True, f"needs 2 or more GPUs (NCCL); --devices={args.devices!r} gives "
                                           f"{gpus or 'no'} GPU(s): name two, e.g. --devices 0,1, or drop --ulysses")
    ulysses = gpus >= 2 if args.ulysses is None else args.ulysses
    ref = None
    if args.reference is not None:
        ref = Path(os.path.abspath(os.path.expanduser(args.reference)))
        if not ref.is_dir():
            raise FlagError("--reference", args.reference, "is not a folder; give a checkout of "
                                                           "github.com/DualParal-Project/DualParal")
        missing = missing_files(str(ref))
        if missing:
            raise FlagError("--reference", args.reference, f"lacks {', '.join(missing)}: not a DualParal checkout")
        if not gpus:
            raise FlagError("--reference", args.reference, "the published code runs on GPUs only (NCCL); use "
                                                           "--devices 0,1")
    for flag, on in (("--baseline", args.baseline), ("--ulysses", ulysses), ("--reference", ref is not None)):
        if on and importlib.util.find_spec("diffusers") is None:
            raise FlagError(flag, True, "needs diffusers (pip install diffusers), which this Python lacks; or "
                                        f"pass {'--no-baseline' if flag == '--baseline' else 'no ' + flag}")
    return ulysses, ref


def _json_path(text: str | None) -> Path | None:
    from dualparal_core.headless.checks import FlagError

    if text is None:
        return None
    out = Path(os.path.abspath(os.path.expanduser(text)))
    if out.is_dir() or out.suffix.lower() != ".json":
        raise FlagError("--json", text, "name a .json file (e.g. out/s1.json)")
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise FlagError("--json", text, f"cannot be written: {folder} is not a writable folder ({e.strerror})") \
            from None
    return out


def check(args: argparse.Namespace) -> BenchPlan:
    """Every check of ``bench``'s flags, cheapest first."""
    from dualparal_core.headless.checks import FlagError, cli_devices

    _numbers(args)
    devices = cli_devices(args.devices)
    config = MODELS[args.model]()
    try:
        split_layers(config.num_layers, len(devices))
    except ValueError as e:
        raise FlagError("--devices", args.devices, str(e)) from None
    _attention(args, devices[0].startswith("cuda"))
    ulysses, ref = _peers(args, devices)
    dtype = args.dtype or ("bf16" if devices[0].startswith("cuda") else "fp32")
    if len(args.matmul) > 1 and len(args.attention) > 1 and len(args.matmul) != len(args.attention):
        raise FlagError("--matmul", " ".join(args.matmul), f"give one value, or one per --attention entry "
                                                            f"({len(args.attention)}: they pair up into rows)")
    if "fp8" in args.matmul and devices[0].startswith("cuda") and dtype != "bf16":
        raise FlagError("--matmul", "fp8", f"runs in bf16 on GPUs (torch._scaled_mm's row-wise kernels write bf16); "
                                           f"--dtype={dtype!r}: drop --dtype or pass --dtype bf16")
    return BenchPlan(devices=devices, dtype=dtype, config=config, ulysses=ulysses, json=_json_path(args.json),
                     reference=ref)
