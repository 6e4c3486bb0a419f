"""The elementwise chains of a Wan layer (norms, adaLN modulation, gated residuals, qk-norm + RoPE, the right
context's concatenation) in torch, and their fused versions for GPUs (:func:`compiled`).

Each chain is one function of :data:`ELEMENTWISE`; a stage calls them through its ``_ew`` table, which holds these
functions as they are (CPU ranks, the tests' exact reference) or :func:`compiled`'s: torch.compile'd, and on CUDA
with Triton the qk-norm + RoPE chain and the LayerNorm chains as the hand-written kernels of
:mod:`dualparal_core.kernels` (Inductor's kernels for them fall far short of the memory bandwidth;
docs/performance.md).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x0, x1) of x [B, L, H, d] by cos/sin [1, L, 1, d/2] (diffusers' Wan convention), in fp32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm (no affine, fp32) then adaLN modulation, back to h's dtype: h [b, L, D], shift/scale [b, 1, D]."""
    return torch.addcmul(shift, F.layer_norm(h.float(), (h.shape[-1],), eps=eps), 1 + scale).type_as(h)


def gated_residual(h: torch.Tensor, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """h + o * gate computed in fp32, back to h's dtype."""
    return torch.addcmul(h.float(), o.float(), gate).type_as(h)


def rope_qk(x: torch.Tensor, norm_w: torch.Tensor, eps: float, heads: int, cos: torch.Tensor,
            sin: torch.Tensor, right: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm across heads (Wan's qk norm), split heads, RoPE: [b, L, D] -> [b, H, L, d]. ``right``: raw keys
    [b, R, D] appended after ``x`` first (compiled, the concatenation is part of the same kernel: no copy)."""
    if right is not None:
        x = torch.cat([x, right], dim=1)
    x = F.rms_norm(x, (x.shape[-1],), norm_w, eps)
    return apply_rope(x.unflatten(2, (heads, -1)), cos, sin).transpose(1, 2)


def affine_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan's cross-attention input norm (diffusers' FP32LayerNorm with affine weights), back to h's dtype."""
    return F.layer_norm(h.float(), (h.shape[-1],), weight.float(), bias.float(), eps).type_as(h)


def rms_heads(x: torch.Tensor, norm_w: torch.Tensor, eps: float, heads: int) -> torch.Tensor:
    """RMSNorm across heads, then split heads: [b, L, D] -> [b, H, L, d] (the cross-attention's queries)."""
    return F.rms_norm(x, (x.shape[-1],), norm_w, eps).unflatten(2, (heads, -1)).transpose(1, 2)


def add_modulate(h: torch.Tensor, o: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-attention's residual ``h + o`` and the FFN's modulated input from it, in one pass."""
    h = h + o
    return h, modulate(h, shift, scale, eps)


def cat_tokens(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The window's values and the right context's, one sequence: [b, L, D] + [b, R, D] -> [b, L + R, D]
    (compiled, one pass over a strided slice of the fused QKV output instead of the eager cat's two)."""
    return torch.cat([a, b], dim=1)


ELEMENTWISE = {"modulate": modulate, "gated_residual": gated_residual, "rope_qk": rope_qk,
               "affine_norm": affine_norm, "rms_heads": rms_heads, "add_modulate": add_modulate,
               "cat_tokens": cat_tokens}


def feed_forward(ffn: nn.Module, x: torch.Tensor, epilogue: bool) -> torch.Tensor:
    """diffusers' Wan FeedForward (Linear, tanh-GELU, Linear). ``epilogue``: the GELU runs in the first GEMM's
    epilogue (cuBLASLt's GELU_BIAS, the tanh approximation), saving one pass over the [L, ffn_dim] activations
    (measured on an H100 at S1's shape: 2.50 -> 2.04 ms per layer, error against fp32 2.6e-3 -> 1.7e-3)."""
    proj = ffn.net[0].proj
    if not epilogue or type(proj) is not nn.Linear or proj.bias is None:
        return ffn(x)
    y = torch._addmm_activation(proj.bias, x.flatten(0, 1), proj.weight.t(), use_gelu=True)
    return ffn.net[2](y.view(*x.shape[:-1], -1))


def deterministic_compiled(fn):
    """Call a compiled function with torch's deterministic-algorithms flag on (warn-only), so that Inductor, which
    reads the flag when it builds a kernel, keeps one launch config per reduction instead of timing several. Only
    these elementwise calls run under it (no cuBLAS or other eager op), and always under it, so Dynamo's guard on
    the flag never asks for a recompile."""
    def call(*args, **kwargs):
        if torch.are_deterministic_algorithms_enabled():
            return fn(*args, **kwargs)
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # Inductor's scratch buffers: no NaN fill
        try:
            return fn(*args, **kwargs)
        finally:
            torch.use_deterministic_algorithms(False)
            torch.utils.deterministic.fill_uninitialized_memory = fill

    return call


def compiled(device: torch.device) -> dict:
    """:data:`ELEMENTWISE` fused for ``device``: each chain torch.compile'd (deterministic launch configs, below),
    and on CUDA with Triton ``rope_qk`` and the LayerNorm chains as the kernels of :mod:`dualparal_core.kernels`
    (DUALPARAL_TRITON=0: compiled like the others)."""
    import torch._dynamo

    # one graph per window shape (with/without right context, short last block, each resolution): allow many
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Inductor may time several launch configs of a reduction (block size, warps) on the GPU at its first call
    # and keep the fastest; the configs sum in different orders, so the choice moves the last bits of every
    # norm. On two H200s the second GPU's rope_qk kept another config than the first GPU's (its timing runs
    # beside a spinning NCCL receive): 2 GPUs gave other latents than 1, and than each other (traced with
    # benchmarks/trace_parity.py: identical inputs, different outputs). Picking the config without timing makes
    # it a function of the shapes alone. Inductor's switches for that moved between versions, so set each one
    # this torch has, and compile under deterministic algorithms, which the reduction-config filter of torch
    # 2.11 and 2.13 (the versions read) also honours (see deterministic_compiled).
    import torch._inductor.config as inductor_config

    det = os.environ.get("TORCHINDUCTOR_DETERMINISTIC") != "0"
    if det:
        for holder, name in ((inductor_config, "deterministic"),
                             (getattr(inductor_config, "test_configs", None), "force_filter_reduction_configs")):
            if holder is not None and hasattr(holder, name):
                setattr(holder, name, True)
        inductor_config.triton.autotune_pointwise = False
    wrap = deterministic_compiled if det else (lambda f: f)
    ew = {k: wrap(torch.compile(f, dynamic=False)) for k, f in ELEMENTWISE.items()}
    from . import kernels

    if device.type == "cuda" and kernels.available() and os.environ.get("DUALPARAL_TRITON") != "0":
        for name in ("rope_qk", "modulate", "add_modulate", "affine_norm"):  # one launch config each: the same
            ew[name] = getattr(kernels, "rms_rope" if name == "rope_qk" else name)  # bits on every GPU of a kind
    return ew
