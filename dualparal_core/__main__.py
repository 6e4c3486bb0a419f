"""Headless CLI: ``python -m dualparal_core demo | generate`` — the whole pipelined schedule on a worker group.

    python -m dualparal_core demo                     # tiny random Wan, all visible GPUs (or 2 CPU ranks)
    python -m dualparal_core generate --model wan2.1_t2v_1.3B_fp16.safetensors --cond prompt.safetensors \\
        --frames 285 --steps 30 --vae wan_2.1_vae.safetensors --out video.mp4
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _devices(arg: str) -> tuple[str, ...]:
    """``--devices`` in the grammar of :func:`~dualparal_core.config.parse_devices` (no ``tcp://``: the CLI
    starts its own ranks), checked against the GPUs this process sees."""
    import torch

    from .config import check_visible, parse_devices

    gpus = torch.cuda.device_count()
    try:
        devices = parse_devices(arg, gpus, name="--devices", attach=False)
        check_visible(devices, gpus, shown=repr(arg), name="--devices",
                      cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return devices


class _Bar:
    """A one-line progress bar on stderr (block-steps done of total)."""

    def __init__(self) -> None:
        self.t0 = time.time()

    def __call__(self, done: int, total: int, _preview) -> None:
        w = 30
        fill = int(w * done / max(total, 1))
        el = time.time() - self.t0
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (w - fill)}] {done}/{total} block-steps  {el:6.1f} s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _write_video(latents, vae_path: str, out: str, fps: float, block: int, pool=None) -> None:
    """Decode block by block straight into an mp4: on the pool's ranks (one primed span each) when given and the
    VAE is a .safetensors file, else in this process."""
    import torch

    from .decode import FrameSink, VideoWriter, decode_local, num_pixel_frames
    from .vae import WanVAEDecoder, decoder_state_dict

    _, _, t, h, w = latents.shape
    sink = FrameSink(1, num_pixel_frames(t), h * 8, w * 8, keep=False, writer=VideoWriter(out, w * 8, h * 8, fps))
    try:
        if pool is not None and vae_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            from .client.decode import decode_on_pool

            sd = decoder_state_dict(load_file(vae_path), source=f"VAE file {vae_path}")
            gpu = pool.spec.devices[0].startswith("cuda")
            decode_on_pool(pool, latents[:1], sd, sink, dtype=torch.bfloat16 if gpu else torch.float32,
                           block_size=block)
        else:
            decode_local(WanVAEDecoder.from_file(vae_path), latents[:1], block, sink)
        sink.finish()
    except BaseException:
        sink.abort()
        raise


def _run(args, source, cond, uncond) -> int:
    import torch
    from safetensors.torch import save_file

    from .config import PoolSpec, SamplingConfig
    from .pool import WorkerPool
    from .protocol import Job
    from .sigmas import simple_sigmas

    spec = PoolSpec(source=source, devices=_devices(args.devices), dtype=args.dtype, attention=args.attention)
    sc = SamplingConfig(sigmas=simple_sigmas(args.steps, args.shift), sampler=args.sampler, cfg=args.cfg,
                        seed=args.seed, noise_mode=args.noise_mode, num_per_block=args.num_per_block,
                        num_cat=args.num_cat)
    latent_frames = (args.frames - 1) // 4 + 1
    shape = (1, 16, latent_frames, args.height // 8, args.width // 8)
    job = Job(sc, shape, cond, uncond if args.cfg != 1 else None)
    print(f"DualParal: {latent_frames} latent frames ({args.frames} video frames) at {args.width}x{args.height}, "
          f"{sc.layout(latent_frames).num_blocks} blocks x {args.steps} steps on {', '.join(spec.devices)}")
    out = Path(args.out)
    if out.suffix == ".mp4" and not args.vae:
        raise SystemExit("--out *.mp4 needs --vae (a Wan2.1 VAE .safetensors); or write .safetensors latents")
    out.parent.mkdir(parents=True, exist_ok=True)
    pool = WorkerPool.start(spec, on_status=lambda s: print(f"  {s}"))
    try:
        t0 = time.time()
        lat = pool.generate(job, on_progress=_Bar())
        print(f"sampled in {time.time() - t0:.1f} s")
        if out.suffix == ".mp4":
            # the engine works in Wan21-normalised latent space; the VAE takes raw latents
            mean = torch.tensor(WAN21_MEAN).view(1, 16, 1, 1, 1)
            std = torch.tensor(WAN21_STD).view(1, 16, 1, 1, 1)
            t0 = time.time()
            _write_video(lat * std + mean, args.vae, str(out), args.fps, args.decode_block, pool)
            print(f"decoded in {time.time() - t0:.1f} s")
        else:
            save_file({"latent_tensor": lat.contiguous()}, str(out))
    finally:
        pool.close()
    print(f"wrote {out}")
    return 0


# Wan2.1 VAE latent statistics (ComfyUI's latent_formats.Wan21, diffusers' WanPipeline latents_mean/std).
WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dualparal_core", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="tiny random Wan model built on the fly (no downloads)")
    gen = sub.add_parser("generate", help="a real Wan2.1/2.2 T2V .safetensors model")
    for p in (demo, gen):
        p.add_argument("--devices", default="auto", help="'auto', GPUs '0,1' or 'cuda:0,cuda:1', 'cpu:N'")
        p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
        p.add_argument("--attention", default="sdpa")
        p.add_argument("--sampler", default="uni_pc", choices=["euler", "uni_pc", "uni_pc_bh2", "dpmpp_2m"])
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--shift", type=float, default=8.0)
        p.add_argument("--noise-mode", default="coordinated", choices=["coordinated", "independent"])
        p.add_argument("--num-per-block", type=int, default=8)
        p.add_argument("--num-cat", type=int, default=8)
        p.add_argument("--vae", default=None, help="Wan2.1 VAE .safetensors: decode block by block to --out *.mp4")
        p.add_argument("--fps", type=float, default=16.0)
        p.add_argument("--decode-block", type=int, default=4, help="latent frames per VAE decode block")
    demo.add_argument("--frames", type=int, default=161, help="video frames (latent frames = (F-1)/4+1)")
    demo.add_argument("--width", type=int, default=64)
    demo.add_argument("--height", type=int, default=64)
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--cfg", type=float, default=5.0)
    demo.add_argument("--out", default="out/demo_latents.safetensors")
    gen.add_argument("--model", required=True, help="diffusion model .safetensors (ComfyUI/original/diffusers)")
    gen.add_argument("--cond", required=True,
                     help=".safetensors with 'positive' [1,L,4096] and optional 'negative' text embeddings")
    gen.add_argument("--frames", type=int, default=81)
    gen.add_argument("--width", type=int, default=832)
    gen.add_argument("--height", type=int, default=480)
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--cfg", type=float, default=5.0)
    gen.add_argument("--out", default="out/video.mp4")
    args = ap.parse_args(argv)
    import torch

    from .config import ModelSource, WanConfig

    if args.cmd == "demo":
        args.dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
        cfg = WanConfig.tiny(num_layers=4)
        g = torch.Generator().manual_seed(args.seed)
        cond = torch.randn(1, 32, cfg.text_dim, generator=g)
        uncond = torch.randn(1, 32, cfg.text_dim, generator=g)
        return _run(args, ModelSource(random_config=cfg), cond, uncond)
    from safetensors.torch import load_file

    args.dtype = args.dtype or "bf16"
    tens = load_file(args.cond)
    if "positive" not in tens:
        raise SystemExit(f"--cond {args.cond}: no tensor named 'positive' (found {sorted(tens)})")
    return _run(args, ModelSource(path=args.model), tens["positive"].float(),
                tens.get("negative", torch.zeros_like(tens["positive"])).float())


if __name__ == "__main__":
    sys.exit(main())
