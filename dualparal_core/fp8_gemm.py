"""fp8 GEMMs through ``torch._scaled_mm`` (``PoolSpec.matmul="fp8"``, opt-in): the transformer blocks' big Linear
layers multiply in float8 e4m3, where a GPU's fp8 tensor cores run at about twice their bf16 rate (compute
capability 8.9 or newer: L4, L40, RTX 40xx, H100, H200, Blackwell).

Which Linears, in every block (:func:`install_scaled_mm`): the self-attention's fused QKV projection (or its three
projections when not fused), its output projection, the cross-attention's query and output projections, and both
FFN layers. Not the patch embedding, the head, the time/text/image embedders, nor the cross-attention's text and
image K/V projections (computed once per job, not per block-step).

Scaling is row-wise on both sides. A weight row (one output channel) is scaled once, at build time, so that its
largest magnitude is e4m3's largest finite value (448): float32 scale ``amax / 448``. The activations are scaled the
same way per row (one token) in every forward (:func:`quantise_rows`: one pass, compiled with the stage's elementwise
chains). ``torch._scaled_mm`` multiplies the e4m3 operands with float32 accumulation and applies both scales and the
bias in its epilogue, writing the activations' dtype (bf16 on GPUs). What it costs in exactness: e4m3 keeps 3
mantissa bits, so every operand is rounded to within 1/16 of itself; a GEMM's output is off by about 3 % of its
norm (tests/test_fp8_gemm.py measures it).

A weight already held in e4m3 (``weights="fp8"``, :class:`~dualparal_core.fp8.Fp8Linear`) is used as it is, its
scale (per tensor or per row) broadcast to the per-column scale: the model then stays exactly the fp8 model it
was loaded as, with no second rounding. Other fp8 weights (e5m2) are dequantised and quantised again per row.

The FFN is Linear -> tanh GELU -> Linear. Its first GEMM writes the pre-activation (no GELU epilogue in
``_scaled_mm``), and the GELU runs inside the second GEMM's input quantisation (:func:`gelu_quantise_rows`): one
pass over the [tokens, ffn_dim] activations instead of two. diffusers' GELU module is replaced by
:class:`GeluDeferred`, so ``ffn(x)`` and :func:`dualparal_core.chains.feed_forward` compute the same.

Shapes: on CUDA ``torch._scaled_mm`` needs both of the weight's dims to be multiples of 16, the first operand
row-major and the second column-major (we pass ``wq.t()`` of the row-major [N, K] weight; the quantised activations
are contiguous). A Linear whose shape does not fit stays what it was (a Linear in the compute dtype, or an
Fp8Linear): Wan's widths (multiples of 128; ffn 8960, 13824) always fit. The FFN converts both layers or neither.

CPU: torch's CPU ``_scaled_mm`` takes the same row-wise scales (torch 2.13) and float32 output; the CPU path exists
for the tests, not for speed.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import logger
from .fp8 import SCALE, Fp8Linear, dequantise, quantise_rows

E4M3 = torch.float8_e4m3fn
ALIGN = 16  # torch._scaled_mm on CUDA: K and N multiples of 16
MIN_CAPABILITY = (8, 9)


def gelu_quantise_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tanh-GELU (in float32) then :func:`quantise_rows`: the FFN's activation fused into its second GEMM's input."""
    return quantise_rows(F.gelu(x.float(), approximate="tanh"))


class ScaledMMLinear(nn.Module):
    """``y = x W^T + b`` with x and W in e4m3 (row-wise float32 scales), through ``torch._scaled_mm``.

    ``weight`` e4m3 [N, K] row-major, ``weight_scale`` float32 [1, N] (one per output channel); ``gelu_input``:
    apply tanh-GELU to x first (the FFN's second layer, see :class:`GeluDeferred`)."""

    #: ``use_fast_accum`` of ``torch._scaled_mm`` (Hopper: accumulate without periodic promotion to fp32; faster, less
    #: exact). Off in the product; benchmarks/profile_step.py --fast-accum turns it on to measure it.
    fast_accum = False

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 gelu_input: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.float().reshape(1, -1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.gelu_input = gelu_input
        self.quantise = gelu_quantise_rows if gelu_input else quantise_rows  # swapped for a compiled one on GPUs

    @classmethod
    @torch.no_grad()
    def convert(cls, lin: nn.Module, gelu_input: bool = False) -> ScaledMMLinear | None:
        """The fp8 version of ``lin`` (an ``nn.Linear`` or an :class:`Fp8Linear`), or None when its shape does not
        fit ``torch._scaled_mm`` or is converted already (then ``lin`` stays as it is)."""
        if not isinstance(lin, (nn.Linear, Fp8Linear)):
            return None
        n, k = lin.weight.shape
        if n % ALIGN or k % ALIGN:
            return None
        fp8 = isinstance(lin, Fp8Linear)
        # the bias in the compute dtype (the CUDA kernels take a bf16 bias for bf16 output)
        bias = None if lin.bias is None else lin.bias.detach().to(lin.compute_dtype if fp8 else lin.weight.dtype)
        if fp8:
            scale = getattr(lin, SCALE)
            scale = torch.ones(n, device=lin.weight.device) if scale is None else scale.float().reshape(-1)
            if lin.weight.dtype == E4M3 and scale.numel() in (1, n):  # as loaded: no second rounding
                return cls(lin.weight.data, scale.expand(n), bias, gelu_input)
            w = dequantise(lin.weight, getattr(lin, SCALE), torch.float32)
        else:
            w = lin.weight
        wq, ws = quantise_rows(w)
        return cls(wq, ws, bias, gelu_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = self.quantise(x)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale, bias=self.bias,
                             out_dtype=x.dtype, use_fast_accum=self.fast_accum)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, e4m3 row-wise"
                f"{', tanh-GELU on the input' if self.gelu_input else ''}")


class GeluDeferred(nn.Module):
    """diffusers' ``GELU`` (a projection, then tanh-GELU) with the activation moved into the next layer's input
    quantisation: the forward is the projection only. The ``proj`` name stays (state-dict keys, feed_forward)."""

    def __init__(self, proj: ScaledMMLinear):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def check_request(devices, dtype: str) -> None:
    """Before any process starts: fp8 GEMMs on GPUs write bf16 (the row-wise kernels' output)."""
    if any(str(d).startswith("cuda") for d in devices) and dtype != "bf16":
        raise ValueError(f"matmul='fp8' on GPUs needs dtype='bf16' (torch._scaled_mm's row-wise fp8 kernels write "
                         f"bf16); got dtype={dtype!r}: choose dtype='bf16', or matmul='bf16'.")


def check_device(device: torch.device, dtype: torch.dtype) -> None:
    """At stage build time, on the rank: a CUDA GPU with fp8 tensor cores in bf16, or the CPU (for the tests)."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type != "cuda" or torch.version.hip:
        raise ValueError(f"matmul='fp8' runs on NVIDIA GPUs (compute capability 8.9 or newer) and on the CPU (for "
                         f"tests); this rank has {device}{' (ROCm)' if torch.version.hip else ''}: use matmul='bf16'.")
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < MIN_CAPABILITY:
        raise ValueError(f"matmul='fp8' needs a GPU with fp8 tensor cores (compute capability 8.9 or newer: L4, L40, "
                         f"RTX 40xx, H100, H200, B200); {device} ({torch.cuda.get_device_name(device)}) has "
                         f"{cap[0]}.{cap[1]}: use matmul='bf16'.")
    if dtype != torch.bfloat16:
        raise ValueError(f"matmul='fp8' on GPUs needs the bf16 compute dtype (torch._scaled_mm's row-wise fp8 "
                         f"kernels write bf16); this rank computes in {dtype}: use dtype='bf16', or matmul='bf16'.")


def _swap(parent: nn.Module, name: str) -> list[ScaledMMLinear]:
    new = ScaledMMLinear.convert(parent.get_submodule(name))
    if new is None:
        return []
    if name.isdigit():  # an entry of a ModuleList (to_out[0])
        parent[int(name)] = new
    else:
        setattr(parent, name, new)
    return [new]


def _convert_ffn(ffn: nn.Module) -> list[ScaledMMLinear]:
    first, second = ffn.net[0], ffn.net[2]
    if getattr(first, "approximate", None) != "tanh" or not hasattr(first, "proj"):
        return []  # not Wan's tanh-GELU FeedForward: leave it
    a, b = ScaledMMLinear.convert(first.proj), ScaledMMLinear.convert(second, gelu_input=True)
    if a is None or b is None:
        return []  # the GELU moves into the second layer, so both convert or neither
    ffn.net[0], ffn.net[2] = GeluDeferred(a), b
    return [a, b]


def install_scaled_mm(stage: nn.Module, device: torch.device, compiled: bool = False) -> int:
    """Replace the listed Linears of every block of ``stage`` by :class:`ScaledMMLinear` (after weights, LoRAs,
    fp8 weights and the QKV fusion are in); ``compiled``: the activation quantisation as one compiled kernel (GPUs,
    with :meth:`~dualparal_core.model.WanStage.compile_elementwise`). Returns how many Linears were replaced."""
    check_device(device, stage.dtype)
    new: list[ScaledMMLinear] = []
    for blk in stage.blocks.values():
        a1, a2 = blk.attn1, blk.attn2
        qkv = ["to_qkv"] if hasattr(a1, "to_qkv") else ["to_q", "to_k", "to_v"]  # fused (fuse_qkv) or not
        for parent, name in [(a1, n) for n in qkv] + [(a1.to_out, "0"), (a2, "to_q"), (a2.to_out, "0")]:
            new += _swap(parent, name)
        new += _convert_ffn(blk.ffn)
    if compiled:
        for m in new:
            m.quantise = _compiled(m.quantise)
    logger.info("fp8 GEMMs: %d Linear layers of %d blocks through torch._scaled_mm (e4m3, row-wise scales)",
                len(new), len(stage.blocks))
    return len(new)


_COMPILED: dict = {}


def _compiled(fn):
    """``fn`` compiled once per process, called as the stage's other compiled chains are (deterministic launch
    configs unless TORCHINDUCTOR_DETERMINISTIC=0; see chains.compiled)."""
    if fn not in _COMPILED:
        from .chains import deterministic_compiled

        c = torch.compile(fn, dynamic=False)
        _COMPILED[fn] = deterministic_compiled(c) if os.environ.get("TORCHINDUCTOR_DETERMINISTIC") != "0" else c
    return _COMPILED[fn]
