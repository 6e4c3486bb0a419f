"""How a block keeps the right-context K/V its older neighbour reads (``PoolSpec.kv_cache``).

A block-step keeps, for every layer of its rank, the raw projected keys and values of its first K frames
(:meth:`WanStage._layer`, ``keep``); the next block-step of the older neighbour appends them to its own keys and
values. At S1 (1.3B, K = 8, CFG) that cache is 4.28 GiB on one GPU, the largest item of memory (the weights are 2.65
GiB; ``dualparal_core.memplan``), and 19 GiB for 14B.

- ``exact`` (default): kept as computed, in the compute dtype. N ranks give the same bits as one.
- ``fp8`` (opt-in): kept in float8 e4m3 with one float32 scale per token (row), so that each token's largest
  magnitude is e4m3's largest finite value (448), and turned back into the compute dtype when read. Half the bytes;
  each kept value is rounded to within 1/16 of itself (3 mantissa bits; tests/test_kvcache.py bounds it). Only the
  keys and values of the K right-context frames are rounded: a block's own tokens and its queries are exact. N ranks
  still give the same bits as one (the rounding is the same on every rank).

An entry is a tuple: ``(k, v)`` (exact) or ``(k8, v8, k_scale, v_scale)`` (fp8); ``entry[0]`` is always the keys
[b, tokens, dim], whose shape the stage reads.
"""

from __future__ import annotations

import torch

from .fp8 import quantise_rows


def keep_exact(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kept slice as computed (its own storage, so the window's tensors can be freed)."""
    return k.contiguous(), v.contiguous()


def quantise_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, n, dim] -> (e4m3 [b, n, dim], float32 scale [b, n, 1]); x ~= values * scale: the fp8 GEMMs' row-wise
    quantisation (:func:`~dualparal_core.fp8.quantise_rows`), one row per token."""
    q, scale = quantise_rows(x)
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)


def keep_fp8(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kept slice in e4m3 with a scale per token: (k8, v8, k_scale, v_scale)."""
    (k8, ks), (v8, vs) = quantise_tokens(k), quantise_tokens(v)
    return k8, v8, ks, vs


def load(entry: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) in ``dtype`` from a kept entry of either kind."""
    if len(entry) == 2:
        return entry[0], entry[1]
    k8, v8, ks, vs = entry
    return (k8.float() * ks).to(dtype), (v8.float() * vs).to(dtype)


KEEPERS = {"exact": keep_exact, "fp8": keep_fp8}
