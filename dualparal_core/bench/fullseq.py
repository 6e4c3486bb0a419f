"""Full-sequence sampling with diffusers' ``WanTransformer3DModel``: the one-GPU baseline (PyTorch SDPA, or
FlashAttention-3 for "the fastest kernel") and, on several GPUs, diffusers' own Ulysses context parallelism.

Not our code: random weights of the model's shape built on the device, held as ``from_pretrained(torch_dtype=...)``
holds them (diffusers' fp32 modules stay fp32); the whole video in one forward per step with CFG batched, as
ComfyUI users run Wan on one GPU; Euler steps on the same sigma table (the sampler's own cost is nothing next to
the model's). Each runs in a process of its own (dualparal_core.bench.child), so its peak memory is its own.
"""

from __future__ import annotations

import time

import torch

from dualparal_core.config import WanConfig
from dualparal_core.runtime import TORCH_DTYPES


def build_model(config: WanConfig, dtype: str, device: torch.device, seed: int = 0):
    """diffusers' WanTransformer3DModel with seeded random weights, in ``dtype`` but its fp32 modules."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):  # random init straight on the device: no host copy of the weights
        model = WanTransformer3DModel(**config.diffusers_kwargs())
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, p in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            p.data = p.data.to(TORCH_DTYPES[dtype])
    return model.eval()


def route_sdpa_to_fa3() -> dict:
    """Send diffusers' SDPA calls (no mask, no dropout, bf16) to FlashAttention-3 (``fa3-fwd``); returns a
    counter of the calls it took, so that the row can say the kernel was really used."""
    import importlib

    import torch.nn.functional as F

    from dualparal_core.attention import FA3_MODULE

    fa3 = importlib.import_module(FA3_MODULE)
    plain, count = F.scaled_dot_product_attention, {"fa3": 0, "sdpa": 0}

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is None and dropout_p == 0.0 and not is_causal and scale is None and not enable_gqa \
                and query.dtype == torch.bfloat16:
            count["fa3"] += 1
            out = fa3.flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
            out = out[0] if isinstance(out, tuple) else out
            return out.transpose(1, 2)
        count["sdpa"] += 1
        return plain(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = sdpa
    return count


def sample(model, x: torch.Tensor, ctx: torch.Tensor, sigmas, cfg: float) -> torch.Tensor:
    """Euler over ``sigmas`` on the flow velocity; CFG batched as [cond, uncond]."""
    b = ctx.shape[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((b,), s * 1000.0, device=x.device)
        v = model(hidden_states=x.expand(b, -1, -1, -1, -1).to(ctx.dtype), timestep=t, encoder_hidden_states=ctx,
                  return_dict=False)[0].float()
        if b == 2:
            v = v[1:2] + cfg * (v[0:1] - v[1:2])
        x = x + v * (s_next - s)
    return x


def _sync(device: torch.device, world: int) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if world > 1:
        torch.distributed.barrier()


@torch.no_grad()
def run(spec: dict, device: torch.device, world: int = 1) -> dict:
    """Time one video of ``spec['frames']`` latent frames on this process's model after ``spec['warmup']`` two-step
    warm-ups of the same shape; with ``world`` > 1, the model runs under diffusers' Ulysses context parallelism
    (torch.distributed already initialised). ``spec['timed_steps']`` < steps times that many steps and scales."""
    config, cuda = WanConfig(**spec["config"]), device.type == "cuda"
    model = build_model(config, spec["dtype"], device)
    if world > 1:
        from diffusers import ContextParallelConfig

        tokens = spec["frames"] * (spec["height"] // 16) * (spec["width"] // 16)
        odd = config.num_heads % world or tokens % world
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, ulysses_anything=bool(odd)))
    count = route_sdpa_to_fa3() if spec["attention"] == "fa3" else None
    weights = torch.cuda.memory_allocated(device) / 2**30 if cuda else 0.0
    g = torch.Generator().manual_seed(0)
    b = 2 if spec["cfg"] != 1.0 else 1
    ctx = torch.randn(b, spec["text_tokens"], config.text_dim, generator=g).to(device, TORCH_DTYPES[spec["dtype"]])
    x = torch.randn(1, config.in_channels, spec["frames"], spec["height"] // 8, spec["width"] // 8, generator=g)
    x, sigmas = x.to(device), spec["sigmas"]
    for _ in range(spec["warmup"]):
        sample(model, x, ctx, sigmas[:3], spec["cfg"])  # kernels and allocator for these shapes
    timed = sigmas[:spec["timed_steps"] + 1]
    _sync(device, world)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = sample(model, x * sigmas[0], ctx, timed, spec["cfg"])
    _sync(device, world)
    seconds = (time.perf_counter() - t0) * (len(sigmas) - 1) / (len(timed) - 1)
    if count is not None and count["fa3"] == 0:
        raise RuntimeError(f"the fa3 baseline made no FlashAttention-3 call (SDPA calls: {count['sdpa']})")
    return dict(seconds=seconds, finite=bool(torch.isfinite(out).all()), weights_gib=weights,
                peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
                reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0.0,
                device_name=torch.cuda.get_device_name(device) if cuda else "cpu")
