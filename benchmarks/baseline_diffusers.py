"""One-GPU full-sequence sampling with diffusers' WanTransformer3DModel, in this process: the code lives in
dualparal_core/bench/fullseq.py (``python -m dualparal_core bench`` runs it in a process of its own)."""

from __future__ import annotations

import dataclasses

import torch

from dualparal_core.bench import fullseq
from dualparal_core.config import WanConfig


def run_full(config: WanConfig, frames: int, height: int, width: int, sigmas, cfg: float, dtype: str = "bf16",
             device: str = "cuda", text_tokens: int = 512) -> dict:
    """Time one video of ``frames`` latent frames after a warm-up of the same shape (fullseq.run)."""
    spec = dict(config=dataclasses.asdict(config), frames=frames, height=height, width=width, sigmas=list(sigmas),
                cfg=cfg, dtype=dtype, attention="sdpa", warmup=1, timed_steps=len(sigmas) - 1,
                text_tokens=text_tokens)
    res = fullseq.run(spec, torch.device("cuda:0" if device == "cuda" else "cpu"))
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(res, generate_s=None)
