"""The headless run once the flags passed their checks: conditioning, the worker group, sampling, then the latents
or a video decoded block by block through Block Decode's sink and writer (on the group's ranks)."""

from __future__ import annotations

import argparse
import time

import torch

from dualparal_core.config import ModelSource, PoolSpec, SamplingConfig, WanConfig
from dualparal_core.decode import FrameSink, VideoWriter, num_pixel_frames
from dualparal_core.headless.checks import DEMO_LAYERS, Plan
from dualparal_core.headless.progress import SampleBar, Waiting, bar, say

#: The demo's random Wan VAE: diffusers AutoencoderKLWan with a small base width (the real one has 96).
DEMO_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                temperal_downsample=[False, True, True])

# Wan2.1 VAE latent statistics (ComfyUI's latent_formats.Wan21, diffusers' WanPipeline latents_mean/std).
WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


class CountingSink(FrameSink):
    """A FrameSink that counts the frames it receives on a bar ("frames of total")."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.bar = bar("decoding", self.total, "frame")

    def put(self, video: int, frame: int, frames: torch.Tensor) -> None:
        super().put(video, frame, frames)
        self.bar.update(frames.shape[0])


def random_vae_weights(seed: int) -> dict[str, torch.Tensor]:
    """The decoder half of a small seeded random Wan VAE (diffusers layout): the demo's VAE."""
    from diffusers import AutoencoderKLWan

    from dualparal_core.vae import decoder_state_dict

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**DEMO_VAE).eval()
    return decoder_state_dict(vae.state_dict(), source="the demo's random VAE")


def vae_weights(path: str) -> dict[str, torch.Tensor]:
    """The decoder-side tensors of a VAE file, in diffusers' layout."""
    from dualparal_core.vae import WanVAEDecoder

    dec = WanVAEDecoder.from_file(path)
    return {**{f"decoder.{k}": v for k, v in dec.decoder.state_dict().items()},
            **{f"post_quant_conv.{k}": v for k, v in dec.post_quant_conv.state_dict().items()}}


def write_video(pool, latents: torch.Tensor, weights: dict, plan: Plan, args: argparse.Namespace) -> None:
    """Decode raw latents block by block on the pool's ranks straight into the video file."""
    from dualparal_core.client.decode import decode_on_pool

    _, _, t, h, w = latents.shape
    writer = VideoWriter(plan.out, w * 8, h * 8, args.fps, fmt=plan.video)
    sink = CountingSink(1, num_pixel_frames(t), h * 8, w * 8, keep=False, writer=writer)
    try:
        gpu = plan.devices[0].startswith("cuda")
        decode_on_pool(pool, latents[:1], weights, sink, dtype=torch.bfloat16 if gpu else torch.float32,
                       block_size=args.decode_block)
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        sink.bar.close()


def demo_conditioning(seed: int, config: WanConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 32, config.text_dim, generator=g), torch.randn(1, 32, config.text_dim, generator=g)


def conditioning(args: argparse.Namespace, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) embeddings: from --cond, or --prompt/--negative through the text encoder."""
    if plan.cond is not None:
        from safetensors import safe_open

        with safe_open(plan.cond, framework="pt") as f:
            pos = f.get_tensor("positive").float()
            neg = f.get_tensor("negative").float() if "negative" in f.keys() else torch.zeros_like(pos)
        return pos, neg
    from dualparal_core.text_encoder import encode_prompts

    device = plan.devices[0] if plan.devices[0].startswith("cuda") else "cpu"
    prompts = [args.prompt] + ([args.negative] if args.cfg != 1 else [])  # cfg 1 never reads the negative
    out = encode_prompts(plan.text_encoder, prompts, device=device)
    return out[0], out[1] if len(out) > 1 else torch.zeros_like(out[0])


def start_pool(spec: PoolSpec):
    from dualparal_core.pool import WorkerPool

    with Waiting(f"starting {spec.world_size} worker(s)") as wait:
        return WorkerPool.start(spec, on_status=wait.status)


def run(args: argparse.Namespace, plan: Plan) -> int:
    """Sample (and decode) as the checked flags say; returns the exit code."""
    from dualparal_core.protocol import Job
    from dualparal_core.sigmas import simple_sigmas

    sc = SamplingConfig(sigmas=simple_sigmas(args.steps, args.shift), sampler=args.sampler, cfg=args.cfg,
                        seed=args.seed, noise_mode=args.noise_mode, num_per_block=args.num_per_block,
                        num_cat=args.num_cat)
    t = plan.latent_shape[2]
    say(f"DualParal: {t} latent frames ({args.frames} video frames) at {args.width}x{args.height}, "
          f"{sc.layout(t).num_blocks} blocks x {args.steps} steps on {', '.join(plan.devices)}", flush=True)
    if args.cmd == "demo":
        config = WanConfig.tiny(num_layers=DEMO_LAYERS)
        source, (cond, uncond) = ModelSource(random_config=config), demo_conditioning(args.seed, config)
        weights = random_vae_weights(args.seed) if plan.video and not plan.vae else None
    else:
        source, (cond, uncond), weights = ModelSource(path=plan.model), conditioning(args, plan), None
    if plan.video and weights is None:
        weights = vae_weights(plan.vae)
    spec = PoolSpec(source=source, devices=plan.devices, dtype=plan.dtype, attention=args.attention)
    job = Job(sc, plan.latent_shape, cond, uncond if args.cfg != 1 else None)
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    pool = start_pool(spec)
    try:
        t0, progress = time.time(), SampleBar()
        try:
            lat = pool.generate(job, on_progress=progress)
        finally:
            progress.close()
        say(f"sampled in {time.time() - t0:.1f} s", flush=True)
        _output(pool, lat, weights, plan, args)
    finally:
        pool.close()
    say(f"wrote {plan.out}")
    return 0


def _output(pool, lat: torch.Tensor, weights: dict | None, plan: Plan, args: argparse.Namespace) -> None:
    if plan.video is None:
        from safetensors.torch import save_file

        save_file({"latent_tensor": lat.contiguous()}, str(plan.out))
        return
    # the engine works in Wan21-normalised latent space; the VAE takes raw latents
    mean = torch.tensor(WAN21_MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(WAN21_STD).view(1, 16, 1, 1, 1)
    t0 = time.time()
    write_video(pool, lat * std + mean, weights, plan, args)
    say(f"decoded in {time.time() - t0:.1f} s", flush=True)
