"""The headless CLI's flags: one parser for ``demo`` and ``generate``, whose errors are one line (no usage dump)."""

from __future__ import annotations

import argparse
import sys

from dualparal_core.config import ATTENTION_BACKENDS, DTYPES, NOISE_MODES, SAMPLER_NAMES

USAGE = """Headless DualParal: the whole pipelined schedule on a worker group, without ComfyUI.

    .venv/bin/python -m dualparal_core demo              # tiny random Wan + random VAE -> out/demo.mp4 (noise)
    .venv/bin/python -m dualparal_core generate --model wan2.1_t2v_1.3B_fp16.safetensors \\
        --text-encoder umt5_xxl_fp8_e4m3fn_scaled.safetensors --prompt "a fox in the snow" \\
        --vae wan_2.1_vae.safetensors --frames 81 --steps 30 --out out/fox.mp4
    .venv/bin/python -m dualparal_core bench --devices 0 --frames 72   # our engine and its peers, one table
"""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", default="auto", help="'auto' (every visible GPU, else 2 CPU ranks), GPU indices "
                                                     "'0,1' or 'cuda:0,cuda:1', 'cpu' or 'cpu:N'")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="compute dtype (default: bf16 on GPUs, "
                                                                       "fp32 on CPU ranks)")
    p.add_argument("--attention", default="sdpa", help=f"one of {', '.join(ATTENTION_BACKENDS)}")
    p.add_argument("--sampler", default="uni_pc", choices=list(SAMPLER_NAMES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=8.0)
    p.add_argument("--noise-mode", default="coordinated", choices=list(NOISE_MODES))
    p.add_argument("--num-per-block", type=int, default=8, help="P: latent frames of each block")
    p.add_argument("--num-cat", type=int, default=8, help="K: context frames from each neighbour (0..P)")
    p.add_argument("--vae", default=None, help="Wan2.1 VAE .safetensors (wan_2.1_vae.safetensors): decode block by "
                                               "block into --out *.mp4/*.webm")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--decode-block", type=int, default=4, help="latent frames per VAE decode block")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m dualparal_core``."""
    ap = OneLineParser(prog="python -m dualparal_core", description=USAGE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)
    demo = sub.add_parser("demo", help="tiny random Wan model and VAE built on the fly (no downloads): the video "
                                       "is coloured noise")
    gen = sub.add_parser("generate", help="a real Wan2.1/2.2 T2V .safetensors model")
    for p in (demo, gen):
        _common(p)
    from dualparal_core.bench.cli import add_parser

    add_parser(sub)
    demo.add_argument("--frames", type=int, default=161, help="video frames, 4k+1 (latent frames = (F-1)/4+1)")
    demo.add_argument("--width", type=int, default=64, help="a multiple of 16")
    demo.add_argument("--height", type=int, default=64, help="a multiple of 16")
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--cfg", type=float, default=5.0)
    demo.add_argument("--out", default="out/demo.mp4", help=".mp4/.webm video, or .safetensors latents")
    gen.add_argument("--model", required=True, help="diffusion model .safetensors (ComfyUI/original/diffusers)")
    gen.add_argument("--prompt", default=None, help="the text; needs --text-encoder")
    gen.add_argument("--negative", default="", help="the negative text (used when --cfg is not 1)")
    gen.add_argument("--text-encoder", default=None,
                     help="ComfyUI's umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors")
    gen.add_argument("--cond", default=None, help="instead of --prompt: a .safetensors with 'positive' "
                                                  "[1,L,4096] and optional 'negative' text embeddings")
    gen.add_argument("--frames", type=int, default=81, help="video frames, 4k+1")
    gen.add_argument("--width", type=int, default=832, help="a multiple of 16")
    gen.add_argument("--height", type=int, default=480, help="a multiple of 16")
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--cfg", type=float, default=5.0)
    gen.add_argument("--out", default="out/video.mp4", help=".mp4/.webm video (needs --vae), or .safetensors "
                                                           "latents")
    return ap
