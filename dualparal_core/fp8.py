"""fp8 weights kept in fp8 in memory and dequantised layer by layer in the forward (``PoolSpec.weights="fp8"``).

The transformer blocks' Linear weights (``blocks.N.*.weight``, 2-D) are the bulk of a Wan model; holding them in
fp8 halves the weight memory of bf16. :class:`Fp8Linear` holds the fp8 weight and its float32 scale and, in each
forward, dequantises exactly as :func:`dualparal_core.checkpoint.load_stage_weights` does at load time
(``(w.float() * scale).to(dtype)``), then calls ``F.linear``: given the same fp8 values and scales, the fp8 path
gives the same numbers as dequantising at load. (``torch._scaled_mm`` would skip the dequantised copy but exists
only on recent GPUs, not on CPU, and rounds differently.)

State-dict convention: a kept weight is ``<module>.weight`` (fp8) with ``<module>.scale_weight`` (float32, a
scalar or one value per output row; absent for plain unscaled fp8 files).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import fp8_target

FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
#: Largest finite float8_e4m3fn value (the scale maps a tensor's amax onto it).
E4M3_MAX = 448.0
SCALE = "scale_weight"


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def scale_key(weight_key: str) -> str:
    return weight_key[: -len("weight")] + SCALE


def quantise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor float8_e4m3fn with a float32 scale amax / 448 (as ComfyUI's fp8-scaled files store weights)."""
    w32 = w.to(torch.float32)
    scale = (w32.abs().max() / E4M3_MAX).clamp_min(1e-12)
    return (w32 / scale).to(torch.float8_e4m3fn), scale.reshape(())


def quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 values [M, K] contiguous, float32 scale [M, 1]), M the product of the leading dims: each
    row scaled so that its largest magnitude is 448; x ~= values * scale. Saturating (clamped before the cast); an
    all-zero row gives zeros, not NaN (the smallest scale is 1e-12). The fp8 GEMMs' activations and weights
    (fp8_gemm.py) and the fp8 context cache (kvcache.py) use it."""
    x = x.reshape(-1, x.shape[-1]).float()
    scale = (x.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_min(1e-12)
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def dequantise(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 weight -> ``dtype``, exactly as the checkpoint loader dequantises (float32 product, then cast)."""
    t = w.to(torch.float32)
    if scale is not None:
        t = t * scale
    return t.to(dtype)


class Fp8Linear(nn.Module):
    """A Linear whose weight stays in fp8 (with an optional float32 scale) and is dequantised per forward."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                 dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer(SCALE, None if scale is None else scale.to(torch.float32))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantised(self) -> torch.Tensor:
        return dequantise(self.weight, getattr(self, SCALE), self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantised(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.weight.dtype} -> {self.compute_dtype}"

    @classmethod
    def cat(cls, parts: list[Fp8Linear]) -> Fp8Linear:
        """One Linear for several stacked along the output (the fused q/k/v): a per-row scale keeps each part's
        dequantised values bit-identical."""
        rows = [torch.full((p.out_features, 1), 1.0, device=p.weight.device) if getattr(p, SCALE) is None
                else getattr(p, SCALE).reshape(-1, 1).expand(p.out_features, 1) for p in parts]
        scale = None if all(getattr(p, SCALE) is None for p in parts) else torch.cat(rows).contiguous()
        bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
        return cls(torch.cat([p.weight for p in parts]), scale, bias, parts[0].compute_dtype)


def quantise_state_dict(sd: dict[str, torch.Tensor], keys=None) -> int:
    """Quantise (in place) the fp8 targets among ``keys`` (default: all) that are not fp8 yet; returns how many."""
    n = 0
    for k in list(sd if keys is None else keys):
        if k in sd and fp8_target(k, sd[k].shape) and not is_fp8(sd[k]):
            sd[k], sd[scale_key(k)] = quantise(sd[k])
            n += 1
    return n


def dequantise_state_dict(sd: dict[str, torch.Tensor], keys, dtype: torch.dtype) -> list[str]:
    """Dequantise (in place, to ``dtype``) the fp8 weights among ``keys``; returns the keys changed."""
    out = []
    for k in keys:
        if k in sd and is_fp8(sd[k]):
            sd[k] = dequantise(sd[k], sd.pop(scale_key(k), None), dtype)
            out.append(k)
    return out


def install_fp8_linears(stage: nn.Module, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Replace every Linear of ``stage`` whose weight ``sd`` holds in fp8 by an :class:`Fp8Linear` built from the
    fp8 tensors of ``sd`` (its bias too); returns how many were replaced."""
    n = 0
    for k, w in sd.items():
        if not (is_fp8(w) and fp8_target(k, w.shape)):
            continue
        path = k[: -len(".weight")]
        parent_name, _, child = path.rpartition(".")
        parent = stage.get_submodule(parent_name)
        old = getattr(parent, child)
        if not isinstance(old, (nn.Linear, Fp8Linear)) or tuple(old.weight.shape) != tuple(w.shape):
            raise ValueError(f"fp8 weight {k} {list(w.shape)} does not match the model's {type(old).__name__}.")
        bias = sd.get(path + ".bias")
        setattr(parent, child, Fp8Linear(w, sd.get(scale_key(k)), None if bias is None else bias.to(dtype), dtype))
        n += 1
    return n
