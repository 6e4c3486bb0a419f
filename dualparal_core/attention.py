"""The one attention function and its backends: which ones exist, which one ``auto`` picks on a device, and the
error when a requested one is missing.

``auto`` picks FlashAttention-3 (the forward-only registry wheel ``fa3-fwd``) on a Hopper GPU (compute capability
9.x) in bf16 when it imports, else PyTorch's ``scaled_dot_product_attention`` (which chooses cuDNN / flash /
efficient itself). Measured at the block-step's shape on one H100 (q 24,960 tokens, k 37,440, 12 heads x 128,
batch 2, bf16): FA3 707 TFLOP/s, SDPA (cuDNN) 580, at the same error against an fp32 reference (README, "Attention
backends"). The ``sdpa_*`` names pin one of PyTorch's kernels.
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
    if name == "fa3" and not fa3_available():
        raise ValueError(f"attention='fa3' needs FlashAttention-3, which is not installed in this Python: "
                         f"`pip install {FA3_PACKAGE}` (Hopper GPUs: H100, H200; bf16), or choose 'auto' or 'sdpa'.")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a rank uses for ``name`` on ``device`` in ``dtype`` (``auto`` resolved, ``fa3`` checked)."""
    check_backend(name)
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    if name == "fa3" and not (hopper and dtype == torch.bfloat16):
        raise ValueError(f"attention='fa3' runs on Hopper GPUs (H100, H200) in bf16; this rank has {device} "
                         f"in {dtype}: choose 'auto' or 'sdpa'.")
    if name != "auto":
        return name
    chosen = "fa3" if hopper and dtype == torch.bfloat16 and fa3_available() else "sdpa"
    why = ("FlashAttention-3 on a Hopper GPU in bf16" if chosen == "fa3" else
           f"PyTorch SDPA ({'no ' + FA3_PACKAGE + ' installed' if hopper and not fa3_available() else device})")
    logger.info("attention: auto -> %s (%s)", chosen, why)
    return chosen


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Non-causal attention. q [B, H, Lq, d], k/v [B, H, Lk, d] -> [B, H, Lq, d]."""
    if backend in ("sdpa", "auto"):
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "fa3":
        fa3 = importlib.import_module(FA3_MODULE)  # cached after the first call
        out = fa3.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, L, H, d] layout
        return out.transpose(1, 2)
    kind = _SDPA_KINDS.get(backend)
    if kind is None:
        check_backend(backend)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, kind)):
        return F.scaled_dot_product_attention(q, k, v)
