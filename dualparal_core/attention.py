"""The one attention function and its backends: which ones exist, which one ``auto`` picks on a device, and the
error when a requested one is missing.

``auto`` picks FlashAttention-3 (the forward-only registry wheel ``fa3-fwd``) on a Hopper GPU (compute capability
9.x) in bf16 when it imports, else PyTorch's ``scaled_dot_product_attention`` (which chooses cuDNN / flash /
efficient itself). Measured at the block-step's shape on one H100 (q 24,960 tokens, k 37,440, 12 heads x 128,
batch 2, bf16): FA3 707 TFLOP/s, SDPA (cuDNN) 580, at the same error against an fp32 reference (README, "Attention
backends"). The ``sdpa_*`` names pin one of PyTorch's kernels.

``fa3_fp8`` (never chosen by ``auto``: it trades exactness for speed) runs the video's self-attention through FA3's
float8 e4m3 kernel: q, k and v are scaled per (batch, head) so that each head's largest magnitude maps onto e4m3's
largest value, and the kernel undoes the scales (its ``*_descale`` inputs). The text cross-attention stays in bf16.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F

from . import logger
from .config import ATTENTION_BACKENDS

FA3_MODULE = "fa3_fwd_interface"
FA3_PACKAGE = "fa3-fwd==0.0.3"
E4M3_MAX = 448.0  # float8 e4m3fn's largest finite value
_SDPA_KINDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
               "sdpa_efficient": "EFFICIENT_ATTENTION", "sdpa_math": "MATH"}


def fa3_available() -> bool:
    """Whether the FlashAttention-3 wheel is installed here (a look-up, no CUDA work)."""
    return importlib.util.find_spec(FA3_MODULE) is not None


def check_backend(name: str) -> None:
    """Raise ValueError naming the input, the value and what works (the package to install for a missing one)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={name!r} is not supported; choose one of {list(ATTENTION_BACKENDS)} "
                         f"('auto' picks the fastest that is installed).")
    if name in ("fa3", "fa3_fp8") and not fa3_available():
        raise ValueError(f"attention={name!r} needs FlashAttention-3, which is not installed in this Python: "
                         f"`pip install {FA3_PACKAGE}` (Hopper GPUs: H100, H200; bf16), or choose 'auto' or 'sdpa'.")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a rank uses for ``name`` on ``device`` in ``dtype`` (``auto`` resolved, ``fa3`` checked)."""
    check_backend(name)
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    if name in ("fa3", "fa3_fp8") and not (hopper and dtype == torch.bfloat16):
        raise ValueError(f"attention={name!r} runs on Hopper GPUs (H100, H200) in bf16; this rank has {device} "
                         f"in {dtype}: choose 'auto' or 'sdpa'.")
    if name != "auto":
        return name
    chosen = "fa3" if hopper and dtype == torch.bfloat16 and fa3_available() else "sdpa"
    why = ("FlashAttention-3 on a Hopper GPU in bf16" if chosen == "fa3" else
           f"PyTorch SDPA ({'no ' + FA3_PACKAGE + ' installed' if hopper and not fa3_available() else device})")
    logger.info("attention: auto -> %s (%s)", chosen, why)
    return chosen


def cross_backend(backend: str) -> str:
    """The backend of the text cross-attention: ``fa3_fp8`` keeps it in bf16 (short keys, a small share of the
    time; the prompt's keys stay exact)."""
    return "fa3" if backend == "fa3_fp8" else backend


def fp8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, d] -> (float8 e4m3 values, float32 descale [B, H]): each (batch, head) scaled so that its
    largest magnitude is e4m3's largest finite value (448); x ~= values * descale."""
    amax = x.abs().amax(dim=(2, 3)).float().clamp_min(1e-12)
    descale = amax / E4M3_MAX
    return (x.float() / descale[:, :, None, None]).to(torch.float8_e4m3fn), descale


_quantise = fp8_per_head  # compiled on first GPU use (one fused pass per tensor instead of four)


def _fa3_fp8(fa3, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    global _quantise
    if q.is_cuda and _quantise is fp8_per_head:
        _quantise = torch.compile(fp8_per_head, dynamic=False)
    (q8, qs), (k8, ks), (v8, vs) = _quantise(q), _quantise(k), _quantise(v)
    out = fa3.flash_attn_func(q8.transpose(1, 2), k8.transpose(1, 2), v8.transpose(1, 2),
                              q_descale=qs, k_descale=ks, v_descale=vs)
    return out.transpose(1, 2).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Non-causal attention. q [B, H, Lq, d], k/v [B, H, Lk, d] -> [B, H, Lq, d]."""
    if backend in ("sdpa", "auto"):
        return F.scaled_dot_product_attention(q, k, v)
    if backend in ("fa3", "fa3_fp8"):
        fa3 = importlib.import_module(FA3_MODULE)  # cached after the first call
        if backend == "fa3_fp8":
            return _fa3_fp8(fa3, q, k, v)
        out = fa3.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, L, H, d] layout
        return out.transpose(1, 2)
    kind = _SDPA_KINDS.get(backend)
    if kind is None:
        check_backend(backend)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, kind)):
        return F.scaled_dot_product_attention(q, k, v)
