"""Every flag of the headless CLI checked before any process starts or any file is read at length (headers only,
no torch): a refusal is one line that names the flag, the value and what works."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dualparal_core.config import ATTENTION_BACKENDS, BlockLayout, WanConfig, parse_devices, split_layers
from dualparal_core.files import read_header
from dualparal_core.files.vae import vae_keys
from dualparal_core.headless.gpus import visible_gpus

#: Output files the CLI writes, by extension: a video container (needs a VAE) or the latents.
VIDEO_SUFFIXES = {".mp4": "mp4", ".webm": "webm"}
LATENT_SUFFIXES = (".safetensors",)
#: Width and height must be multiples of this: the Wan2.1 VAE's 8x spatial scale times the 2x2 patch.
SIZE_MULTIPLE = 16
#: The demo's random model: WanConfig.tiny with this many layers (so at most this many ranks).
DEMO_LAYERS = 4


class FlagError(ValueError):
    """A refused flag: ``--flag='value': what is wrong; what works``."""

    def __init__(self, flag: str, value: object, why: str):
        super().__init__(f"{flag}={value!r}: {why}")


@dataclass
class Plan:
    """What the checks resolved: the devices, the dtype, the files (absolute) and the shapes of the run."""

    devices: tuple[str, ...]
    dtype: str
    latent_shape: tuple[int, int, int, int, int]
    out: Path
    video: str | None
    model: str | None = None
    config: WanConfig | None = None
    vae: str | None = None
    cond: str | None = None
    text_encoder: str | None = None


def _nearest(value: int, ok) -> str:
    """The closest values below and above ``value`` that ``ok`` accepts, as 'a or b'."""
    lo = next((v for v in range(value, 0, -1) if ok(v)), None)
    hi = next(v for v in range(max(value, 1), value + 10_000) if ok(v))
    return " or ".join(str(v) for v in dict.fromkeys(x for x in (lo, hi) if x))


def check_sizes(args: argparse.Namespace) -> None:
    """``--width`` and ``--height``: multiples of SIZE_MULTIPLE."""
    for flag, v in (("--width", args.width), ("--height", args.height)):
        if v < SIZE_MULTIPLE or v % SIZE_MULTIPLE:
            raise FlagError(flag, v, f"must be a positive multiple of {SIZE_MULTIPLE} (the Wan VAE's 8x scale times "
                                     f"the 2x2 patch); use {_nearest(v, lambda x: x % SIZE_MULTIPLE == 0)}")


def check_positive(flags) -> None:
    """(flag, value) pairs: finite positive numbers (``--cfg`` may be 0)."""
    for flag, v in flags:
        if not math.isfinite(v) or v < 0 or (v == 0 and flag != "--cfg"):
            raise FlagError(flag, v, "must be a finite positive number" + (" (1 disables guidance)"
                                                                           if flag == "--cfg" else ""))


def check_blocks(args: argparse.Namespace) -> None:
    """``--num-per-block`` (P) and ``--num-cat`` (K)."""
    if args.num_per_block < 1:
        raise FlagError("--num-per-block", args.num_per_block, "must be at least 1 latent frame (8 is usual)")
    if not 0 <= args.num_cat <= args.num_per_block:
        raise FlagError("--num-cat", args.num_cat, f"must lie between 0 and --num-per-block={args.num_per_block}")


def check_numbers(args: argparse.Namespace) -> BlockLayout:
    """Sizes, frames, steps and the other numbers; returns the block layout of the latent."""
    check_sizes(args)
    if args.frames < 1 or (args.frames - 1) % 4:
        raise FlagError("--frames", args.frames, "video frames must be 4k+1 (1, 5, 9, ..., 81; the VAE packs 4 "
                                                 f"frames per latent frame); use {_nearest(args.frames, _is_4k1)}")
    if not 1 <= args.steps <= 1000:
        raise FlagError("--steps", args.steps, "must lie between 1 and 1000 (30 is usual for Wan2.1)")
    check_positive((("--cfg", args.cfg), ("--shift", args.shift), ("--fps", args.fps)))
    if args.decode_block < 1:
        raise FlagError("--decode-block", args.decode_block, "must be at least 1 latent frame (4 is usual)")
    check_blocks(args)
    return BlockLayout((args.frames - 1) // 4 + 1, args.num_per_block, args.num_cat)


def _is_4k1(x: int) -> bool:
    return x >= 1 and (x - 1) % 4 == 0


def cli_devices(text: str) -> tuple[str, ...]:
    """``--devices`` in the project's one grammar (no ``tcp://``: the CLI starts its own ranks), against the GPUs
    this process would see (counted without torch)."""
    gpus = visible_gpus()
    devices = parse_devices(text, gpus, name="--devices", attach=False)
    missing = [d for d in devices if d.startswith("cuda:") and int(d[5:]) >= gpus]
    if missing:
        among = f"GPU indices 0..{gpus - 1}, 'auto' or 'cpu:N'" if gpus else "'cpu' or 'cpu:N' (N CPU ranks)"
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise FlagError("--devices", text, f"names {', '.join(missing)}, but this process sees {gpus} CUDA "
                                           f"device(s){'' if cvd is None else f' (CUDA_VISIBLE_DEVICES={cvd!r})'}; "
                                           f"use {among}")
    return devices


def check_devices(args: argparse.Namespace) -> tuple[tuple[str, ...], str]:
    """``--devices`` and ``--attention``; returns the devices and the dtype (bf16 on GPUs, fp32 on CPU ranks)."""
    devices = cli_devices(args.devices)
    if args.attention not in ATTENTION_BACKENDS:
        raise FlagError("--attention", args.attention, f"is not a backend; use one of {', '.join(ATTENTION_BACKENDS)}")
    return devices, args.dtype or ("bf16" if devices[0].startswith("cuda") else "fp32")


def check_out(args: argparse.Namespace, has_vae: bool) -> tuple[Path, str | None]:
    """``--out``: a known extension, a video only with a VAE, a folder that exists (or can be made) and is
    writable; returns the absolute path and the video format (None: latents)."""
    out = Path(os.path.abspath(os.path.expanduser(args.out)))
    suffix = out.suffix.lower()
    if out.is_dir():
        raise FlagError("--out", args.out, "is a folder; name a file in it (e.g. video.mp4)")
    if suffix not in VIDEO_SUFFIXES and suffix not in LATENT_SUFFIXES:
        raise FlagError("--out", args.out, "unknown extension; use .mp4 or .webm (a video) or .safetensors (latents)")
    if suffix in VIDEO_SUFFIXES and not has_vae:
        raise FlagError("--out", args.out, "a video needs --vae (wan_2.1_vae.safetensors); or write .safetensors "
                                           "latents")
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    try:  # a real write: os.access says yes to root on read-only or special file systems (/proc)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise FlagError("--out", args.out, f"cannot be written: {folder} is not a writable folder "
                                           f"({e.strerror}); pick another place") from None
    return out, VIDEO_SUFFIXES.get(suffix)


def existing_file(flag: str, path: str) -> str:
    """The absolute path of an existing file, or a FlagError."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise FlagError(flag, path, "no such file")
    if not os.path.isfile(full):
        raise FlagError(flag, path, "is a folder, not a file")
    if not os.access(full, os.R_OK):
        raise FlagError(flag, path, "cannot be read (permissions)")
    return full


def check_vae(path: str) -> str:
    """``--vae``: a readable Wan2.1 VAE (its header's key names; torch pickles: existence only)."""
    full = existing_file("--vae", path)
    if full.lower().endswith((".pt", ".pth", ".ckpt", ".bin")):
        return full
    try:
        vae_keys(list(read_header(full)), f"the file {full}")
    except ValueError as e:
        raise ValueError(f"--vae={path!r}: {e}") from None
    return full


def check_model(path: str, world: int) -> tuple[str, WanConfig]:
    """``--model``: a Wan transformer file (its header), with enough layers for one per rank."""
    from dualparal_core.files import inspect_checkpoint

    full = existing_file("--model", path)
    try:
        config = inspect_checkpoint(full).config
    except ValueError as e:
        raise ValueError(f"--model={path!r}: {e}") from None
    if config.concat_channels:
        from dualparal_core.experts import variant

        raise FlagError("--model", path, f"is an image-to-video model ({variant(config)}); the command line has no "
                                         f"image input: run it in ComfyUI with WanImageToVideo, or pick a T2V model.")
    try:
        split_layers(config.num_layers, world)
    except ValueError as e:
        raise FlagError("--devices", f"{world} ranks", str(e)) from None
    return full, config


def check_text(args: argparse.Namespace, text_dim: int) -> tuple[str | None, str | None]:
    """``--prompt`` with ``--text-encoder`` (a umt5 file whose width is the model's text width), or ``--cond`` (a
    file with 'positive' embeddings of that width); returns (cond path, text-encoder path)."""
    from dualparal_core.files.umt5 import inspect_text_encoder

    if (args.cond is None) == (args.prompt is None):
        raise FlagError("--prompt", args.prompt, "give either --prompt (with --text-encoder) or --cond (saved "
                                                 "embeddings), not both" if args.cond else
                        "missing: give --prompt \"...\" with --text-encoder umt5_xxl_fp16.safetensors, or --cond FILE")
    if args.cond is not None:
        full = existing_file("--cond", args.cond)
        try:
            header = read_header(full)
        except ValueError as e:
            raise ValueError(f"--cond={args.cond!r}: {e}") from None
        for key in ("positive", "negative"):
            shape = header.get(key, (None,))[0]
            if shape is None and key == "negative":
                continue
            if shape is None or len(shape) != 3 or shape[0] != 1 or shape[2] != text_dim:
                raise FlagError("--cond", args.cond, f"needs a tensor '{key}' of shape [1, L, {text_dim}] (found "
                                                     f"{dict((k, list(v[0])) for k, v in header.items())})")
        return full, None
    if args.text_encoder is None:
        raise FlagError("--text-encoder", None, "--prompt needs the umt5 file ComfyUI uses "
                                                "(umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors)")
    full = existing_file("--text-encoder", args.text_encoder)
    try:
        info = inspect_text_encoder(full)
    except ValueError as e:
        raise ValueError(f"--text-encoder={args.text_encoder!r}: {e}") from None
    if info.config["d_model"] != text_dim:
        raise FlagError("--text-encoder", args.text_encoder, f"is {info.config['d_model']} wide, but the model "
                                                             f"reads {text_dim}-wide text (Wan: umt5-xxl, 4096)")
    return None, full


def check_args(args: argparse.Namespace) -> Plan:
    """Every check, cheapest first; returns what the run needs (a FlagError or ValueError names the flag)."""
    layout = check_numbers(args)
    devices, dtype = check_devices(args)
    vae = check_vae(args.vae) if args.vae else None
    out, video = check_out(args, has_vae=vae is not None or args.cmd == "demo")
    shape = (1, 16, layout.num_frames, args.height // 8, args.width // 8)
    plan = Plan(devices=devices, dtype=dtype, latent_shape=shape, out=out, video=video, vae=vae)
    if args.cmd == "generate":
        plan.model, plan.config = check_model(args.model, len(devices))
        plan.cond, plan.text_encoder = check_text(args, plan.config.text_dim)
    elif len(devices) > DEMO_LAYERS:
        raise FlagError("--devices", args.devices, f"{len(devices)} ranks, but the demo model has {DEMO_LAYERS} "
                                                   f"layers (one rank needs one); use at most {DEMO_LAYERS}")
    return plan
