"""Reference code the tests compare against, written here rather than in the product (which no longer needs it)."""

from __future__ import annotations

import math

import torch


def pad_contexts(cond: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring cond and uncond to one token count as ComfyUI batches cross-attention conds (repeat to the lcm): the
    way the engine batched a prompt pair before each prompt kept its own length."""
    a, b = cond.shape[1], uncond.shape[1]
    if a == b:
        return cond, uncond
    n = a * b // math.gcd(a, b)
    return cond.repeat(1, n // a, 1), uncond.repeat(1, n // b, 1)
