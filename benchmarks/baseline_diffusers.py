"""One-GPU full-sequence sampling with diffusers' WanTransformer3DModel: the baseline that is not our code.

Random weights of the model's shape in the compute dtype, the whole video in one forward per step with CFG batched
(as the published DualParal code and ComfyUI run it), Euler steps on the same sigma table (the sampler's own cost
is nothing next to the model's). It runs in the calling process and starts no ranks; bench_s1.py calls it after
its pools are closed, so the GPU holds nothing else.
"""

from __future__ import annotations

import time

import torch

from dualparal_core.config import WanConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sample(model, x: torch.Tensor, ctx: torch.Tensor, sigmas, cfg: float) -> torch.Tensor:
    """Euler over ``sigmas`` on the flow velocity; CFG batched as [cond, uncond]."""
    b = 2 if cfg != 1.0 else 1
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((b,), s * 1000.0, device=x.device)
        v = model(hidden_states=x.expand(b, -1, -1, -1, -1).to(ctx.dtype), timestep=t, encoder_hidden_states=ctx,
                  return_dict=False)[0].float()
        if b == 2:
            v = v[1:2] + cfg * (v[0:1] - v[1:2])
        x = x + v * (s_next - s)
    return x


@torch.no_grad()
def run_full(config: WanConfig, frames: int, height: int, width: int, sigmas, cfg: float, dtype: str = "bf16",
             device: str = "cuda", text_tokens: int = 512) -> dict:
    """Time one video of ``frames`` latent frames after a one-step warm-up of the same shape; returns
    ``seconds``, ``peak_gib`` / ``reserved_gib`` (CUDA allocator peaks of the timed run; 0 on CPU) and
    ``weights_gib``."""
    from diffusers import WanTransformer3DModel

    dev = torch.device("cuda:0" if device == "cuda" else "cpu")
    cuda = dev.type == "cuda"
    with torch.device(dev):  # random init straight on the device: no host copy of the weights
        model = WanTransformer3DModel(**config.diffusers_kwargs())
    # as from_pretrained(torch_dtype=...) loads it: the modules diffusers keeps in float32 stay in float32
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for p_name, p in model.named_parameters():
        if not any(k in p_name.split(".") for k in keep):
            p.data = p.data.to(DTYPES[dtype])
    model.eval()
    weights = torch.cuda.memory_allocated(dev) / 2**30 if cuda else 0.0
    g = torch.Generator().manual_seed(0)
    b = 2 if cfg != 1.0 else 1
    ctx = torch.randn(b, text_tokens, config.text_dim, generator=g).to(dev, DTYPES[dtype])
    x = torch.randn(1, config.in_channels, frames, height // 8, width // 8, generator=g).to(dev)
    _sample(model, x, ctx, sigmas[:2], cfg)  # warm-up: kernels and allocator for these shapes
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    out = _sample(model, x * sigmas[0], ctx, sigmas, cfg)
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(out).all():  # random weights: a warning, the timing still stands
        print("warning: the diffusers baseline's latents are not finite (random weights)", flush=True)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else 0.0
    reserved = torch.cuda.max_memory_reserved(dev) / 2**30 if cuda else 0.0
    del model, ctx, x, out
    if cuda:
        torch.cuda.empty_cache()
    return dict(seconds=seconds, generate_s=None, peak_gib=peak, reserved_gib=reserved, weights_gib=weights,
                device_name=torch.cuda.get_device_name(dev) if cuda else "cpu")
