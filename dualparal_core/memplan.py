"""A per-rank GPU memory plan: weights, text K/V, right-context cache, activations and pipe buffers.

Computed from shapes, not measured. Weights are exact (every tensor of the slice, per expert, in the dtype it is
held in). The rest are estimates of what is alive at a rank's peak, the last layer of a block-step:

- text K/V: cross-attention K and V of every layer of the rank, per expert used, once per job:
  ``2 · b · 512 · dim · bytes · layers`` (umt5 pads prompts to 512 tokens);
- right-context cache: ``K · tokens per frame · dim · 2 (k, v) · b · layers · bytes`` (one cache is alive: the
  engine releases the one it reads layer by layer while it builds the next); with ``kv_cache="offload"`` that is
  pinned host memory (``host``, not in the GPU total; each kept tensor rounded up to a power of two, as PyTorch's
  pinned allocator takes it) and the GPU holds ``OFFLOAD_LAYERS`` layers of it (the slices on
  their way out and in while the host runs at most two layers ahead, kvcache.Pacer);
- activations of one layer on a window of ``(P + K) · tokens per frame`` tokens: ``b · L · dim · (8 + 13 · bytes)``
  — calibrated on the eager CPU layer (peak RSS of one layer at 1280 wide, f/d 2.7: about 31 bytes per
  b·L·dim element in bf16, 51–55 in fp32); torch.compile'd elementwise chains (the CUDA default) need less;
  with fp8 weights add the largest Linear's dequantised copy (float32 product, then the compute dtype);
- pipe buffers on ranks that send hidden states (all but the last): up to 4 sent hidden states are kept alive
  (``Pipe._keep``), ``4 · b · L · dim · bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import WanConfig

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TEXT_TOKENS = 512
#: Bytes per b·L·dim element of one layer's forward at its peak: ACT_BASE + ACT_PER_BYTE · element size.
ACT_BASE, ACT_PER_BYTE = 8, 13
#: Hidden states a sending rank keeps alive for its asynchronous sends.
PIPE_KEPT = 4
#: Layers of an offloaded right-context cache on the GPU at once (kvcache.HostEntry, kvcache.Pacer).
OFFLOAD_LAYERS = 4


def pinned_bytes(nbytes: int) -> int:
    """What PyTorch's pinned-memory allocator takes for a block of ``nbytes``: rounded up to a power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def tokens_per_frame(config: WanConfig, height: int = 480, width: int = 832) -> int:
    """Tokens of one latent frame at a pixel resolution (VAE stride 8, then the patch size)."""
    _, ph, pw = config.patch_size
    return (height // 8 // ph) * (width // 8 // pw)


def weight_bytes(config: WanConfig, layers: range, *, embed: bool, head: bool, dtype: str = "bf16",
                 fp8: bool = False) -> int:
    """Bytes of one expert's slice as a stage holds it (keep-in-fp32 modules in fp32, fp8 targets in fp8 +
    a float32 scale when ``fp8``)."""
    from .files import expected_shapes, fp8_target, in_stage, keeps_fp32

    total = 0
    for name, shape in expected_shapes(config).items():
        if not in_stage(name, layers, embed, head):
            continue
        n = 1
        for s in shape:
            n *= s
        if fp8 and fp8_target(name, shape):
            total += n + 4
        else:
            total += n * (4 if keeps_fp32(name) else DTYPE_BYTES[dtype])
    return total


@dataclass(frozen=True)
class RankPlan:
    """Planned bytes of one rank (see the module docstring for what each term counts)."""

    weights: int
    text_kv: int
    cache: int
    activations: int
    pipe: int
    host: int = 0  # pinned host memory of an offloaded cache (not in the GPU total)

    @property
    def total(self) -> int:
        return self.weights + self.text_kv + self.cache + self.activations + self.pipe

    def gib(self) -> dict[str, float]:
        return {k: getattr(self, k) / GIB for k in ("weights", "text_kv", "cache", "activations", "pipe", "total",
                                                      "host")}


def plan_rank(config: WanConfig, layers: range, *, embed: bool, head: bool, dtype: str = "bf16",
              fp8: bool = False, experts: int = 1, batches: tuple[int, ...] = (2,), frames_p: int = 8,
              frames_k: int = 8, tpf: int | None = None, kv_cache: str = "exact") -> RankPlan:
    """Plan one rank. ``batches``: the batch of each expert used (2 with CFG, 1 at cfg 1); the peak terms take
    the largest. ``frames_p``/``frames_k``: P and K; ``tpf``: tokens per latent frame (default 480x832);
    ``kv_cache``: PoolSpec.kv_cache ("fp8": one byte per value and a float32 scale per token; "offload": the
    cache in ``host``, OFFLOAD_LAYERS layers of it on the GPU)."""
    tpf = tokens_per_frame(config) if tpf is None else tpf
    es, d, n = DTYPE_BYTES[dtype], config.dim, len(layers)
    b = max(batches)
    w = experts * weight_bytes(config, layers, embed=embed, head=head, dtype=dtype, fp8=fp8)
    tokens = TEXT_TOKENS + ((config.image_pos_len or 257) if config.image_dim is not None else 0)  # + CLIP-vision
    text = sum(2 * bb * tokens * d * es * n for bb in batches)
    cache = frames_k * tpf * 2 * b * n * ((d + 4) if kv_cache == "fp8" else d * es)
    host = 0
    if kv_cache == "offload":  # pinned blocks are rounded up to a power of two, one per kept k or v tensor
        host = pinned_bytes(frames_k * tpf * b * d * es) * 2 * n
        cache = cache // n * min(n, OFFLOAD_LAYERS)
    unit = b * (frames_p + frames_k) * tpf * d  # elements of one window's hidden states
    act = unit * (ACT_BASE + ACT_PER_BYTE * es)
    if fp8:  # Fp8Linear's transient: the biggest weight (the fused q/k/v or an FFN matrix) in float32 and dtype
        act += max(3 * d * d, config.ffn_dim * d) * (4 + es)
    pipe = 0 if head else PIPE_KEPT * unit * es
    return RankPlan(w, text, cache, act, pipe, host)


def load_report(config: WanConfig, layers: range, *, embed: bool, head: bool, dtype: str, fp8: bool,
                experts: int, actual_weight_bytes: int) -> str:
    """The line a rank logs at load time: weights planned vs actual, and the per-frame terms at 480x832."""
    tpf = tokens_per_frame(config)
    one = plan_rank(config, layers, embed=embed, head=head, dtype=dtype, fp8=fp8, experts=experts,
                    batches=(2,), frames_p=1, frames_k=1, tpf=tpf)
    es, n = DTYPE_BYTES[dtype], len(layers)
    per_k = tpf * config.dim * 2 * 2 * n * es  # cache bytes per context frame, with CFG
    per_frame = 2 * tpf * config.dim * (ACT_BASE + ACT_PER_BYTE * es)
    ex = plan_rank(config, layers, embed=embed, head=head, dtype=dtype, fp8=fp8, experts=experts,
                   batches=(2,) * experts, frames_p=8, frames_k=8, tpf=tpf)
    return (f"memory plan (GiB): weights {one.weights / GIB:.3f} planned, {actual_weight_bytes / GIB:.3f} actual "
            f"({experts} expert{'s' if experts > 1 else ''}, {'fp8' if fp8 else dtype}); per 480x832 latent frame "
            f"with CFG: right-context cache {per_k / GIB:.3f} per K frame, activations {per_frame / GIB:.3f} per "
            f"window frame; text K/V {ex.text_kv / GIB:.2f}; planned total at 480x832, P=8, K=8, CFG: "
            f"{ex.total / GIB:.1f}")
