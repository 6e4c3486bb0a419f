"""Frozen, picklable configuration of the engine: the model's shape, the block layout, a sampling job.

Every check a user can trip lives here and raises a sentence that names the input, the value and what would
work, so that the node layer, the CLI and the workers all refuse bad input the same way before any GPU work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .devices import AUTO_CPU_RANKS, DEVICE_FORMS, check_visible, parse_devices  # noqa: F401 - the grammar's home
from .timeouts import TIMEOUT_ENV, Timeouts  # noqa: F401 - their own module; imported from here too

#: Samplers the engine implements, named as ComfyUI's KSampler names them.
SAMPLER_NAMES: tuple[str, ...] = ("euler", "uni_pc", "uni_pc_bh2", "dpmpp_2m")
#: How the initial noise of each block is drawn (DESIGN §2 "Coordinated noise").
NOISE_MODES: tuple[str, ...] = ("coordinated", "independent")
#: Compute dtypes a user may pick.
DTYPES: tuple[str, ...] = ("bf16", "fp16", "fp32")
#: How fp8 weights are held in memory: dequantised at load, or kept in fp8 and dequantised per layer on the fly.
WEIGHT_MODES: tuple[str, ...] = ("dequant", "fp8")
#: The blocks' GEMMs: in the compute dtype, or in e4m3 (fp8_gemm.py).
MATMUL_MODES: tuple[str, ...] = ("bf16", "fp8")
#: How each block keeps the right-context K/V its older neighbour reads: in the compute dtype on the GPU, the same
#: bits in pinned host memory, or in e4m3 (kvcache.py).
KV_CACHE_MODES: tuple[str, ...] = ("exact", "offload", "fp8")
#: Which expert of a Wan2.2 A14B pair a LoRA is merged into.
LORA_EXPERTS: tuple[str, ...] = ("both", "high", "low")
#: Attention backends a user may pick ("auto": FlashAttention-3 on a Hopper GPU in bf16 when ``fa3-fwd`` is
#: installed, else "sdpa"; "sdpa": PyTorch chooses; "fa3": FlashAttention-3; "fa3_fp8": FlashAttention-3 with
#: fp8 self-attention (faster, less exact: README "Attention backends"); the others force one SDPA kernel).
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "fa3", "fa3_fp8", "sdpa_flash", "sdpa_cudnn",
                                       "sdpa_efficient", "sdpa_math")


@dataclass(frozen=True)
class WanConfig:
    """Shape of a Wan2.1/2.2 T2V or I2V (in_channels 36, image_dim) transformer, inferred from a checkpoint."""

    dim: int = 1536
    """Model width (1.3B: 1536, 14B: 5120; any multiple of 128 for test models)."""
    ffn_dim: int = 8960
    """Feed-forward width."""
    num_layers: int = 30
    """Number of transformer blocks."""
    num_heads: int = 12
    """Attention heads; Wan uses head dim 128, so dim // 128."""
    in_channels: int = 16
    """Latent channels in (Wan2.1 VAE: 16)."""
    out_channels: int = 16
    """Latent channels out."""
    text_dim: int = 4096
    """Width of the text encoder's output (umt5-xxl: 4096)."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep features."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch size (t, h, w) of the patch embedding."""
    eps: float = 1e-6
    """Epsilon of the layer norms."""
    cross_attn_norm: bool = True
    """Whether cross-attention has a learned norm before it (always true for Wan T2V)."""
    rope_max_seq_len: int = 1024
    """Length of the precomputed RoPE tables."""
    image_dim: int | None = None
    """CLIP-vision width of ``img_emb`` (1280) with the k_img/v_img cross-attention (Wan2.1 I2V/FLF2V); or None."""
    image_pos_len: int | None = None  # FLF2V's ``img_emb.emb_pos`` tokens (514 = 2 x 257), or None

    def __post_init__(self) -> None:
        if self.concat_channels not in (0, 20) or (self.image_dim is None and self.image_pos_len is not None):
            raise ValueError(f"{self}: Wan I2V takes 20 channels more in than out; emb_pos needs image_dim.")
        if self.dim <= 0 or self.dim % 128:
            raise ValueError(f"Model width dim={self.dim} is not a positive multiple of 128 (Wan's head dim).")
        if self.num_heads * 128 != self.dim:
            raise ValueError(f"num_heads={self.num_heads} does not match dim={self.dim}: Wan uses dim // 128 heads.")
        if self.num_layers < 1:
            raise ValueError(f"num_layers={self.num_layers} must be at least 1.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def concat_channels(self) -> int:
        """Channels of ComfyUI's image conditioning appended to the noisy latent (0: text-to-video)."""
        return self.in_channels - self.out_channels

    def diffusers_kwargs(self) -> dict:
        """Keyword arguments for diffusers' ``WanTransformer3DModel`` with this shape."""
        same = ("in_channels", "out_channels", "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm",
                "eps", "rope_max_seq_len", "image_dim")
        return dict(patch_size=tuple(self.patch_size), num_attention_heads=self.num_heads,
                    attention_head_dim=self.head_dim, qk_norm="rms_norm_across_heads",
                    added_kv_proj_dim=self.dim if self.image_dim is not None else None,
                    pos_embed_seq_len=self.image_pos_len, **{k: getattr(self, k) for k in same})

    @classmethod
    def tiny(cls, dim: int = 128, num_layers: int = 3, ffn_dim: int = 256, text_dim: int = 64) -> WanConfig:
        """A tiny random-weights shape for tests and the demo (one head of 128)."""
        return cls(dim=dim, ffn_dim=ffn_dim, num_layers=num_layers, num_heads=dim // 128, text_dim=text_dim,
                   freq_dim=32)

    @classmethod
    def wan21_1_3b(cls) -> WanConfig:
        return cls(dim=1536, ffn_dim=8960, num_layers=30, num_heads=12)

    @classmethod
    def wan21_14b(cls) -> WanConfig:
        return cls(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40)


def split_layers(num_layers: int, world_size: int) -> list[range]:
    """Balanced contiguous layer slices, one per rank (earlier ranks take the remainder)."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1.")
    if world_size > num_layers:
        raise ValueError(
            f"{world_size} ranks for a model of {num_layers} layers: every rank needs at least one layer. "
            f"Use at most {num_layers} GPUs/ranks.")
    base, extra = divmod(num_layers, world_size)
    out, start = [], 0
    for r in range(world_size):
        n = base + (1 if r < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


MAX_CONTEXT_TOKENS = 8 * 512
"""Text tokens one prompt may have (cond and uncond each keep their own length: cross-attention runs per batch half
when they differ): the umt5 prompt ComfyUI makes is 512 tokens; eight times that is already eight times the text
K/V of every layer."""

@dataclass(frozen=True)
class BlockLayout:
    """How the latent frames are cut into blocks (DESIGN §2 "Blocks")."""

    num_frames: int
    """T, latent frames of the video."""
    num_per_block: int = 8
    """P, own frames of every block after the first."""
    num_cat: int = 8
    """K, context frames taken from each neighbour (0 disables context)."""

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"The latent has {self.num_frames} frames; it needs at least 1.")
        if self.num_per_block < 1:
            raise ValueError(f"num_per_block={self.num_per_block} must be at least 1 latent frame (8 is usual).")
        if self.num_cat < 0 or self.num_cat > self.num_per_block:
            raise ValueError(
                f"num_cat={self.num_cat} must lie between 0 and num_per_block={self.num_per_block} "
                f"(context frames come from one neighbouring block).")

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """Own frame span [start, end) of each block; B_0 takes P+K frames, later blocks P (the last may be short)."""
        first = min(self.num_frames, self.num_per_block + self.num_cat)
        spans = [(0, first)]
        start = first
        while start < self.num_frames:
            end = min(start + self.num_per_block, self.num_frames)
            spans.append((start, end))
            start = end
        return spans

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def input_span(self, j: int) -> tuple[int, int]:
        """Frames [start, end) fed to the model for block j: K left-context frames, then its own."""
        start, end = self.blocks[j]
        return (start - self.num_cat if j > 0 else start, end)

    def right_context_frames(self, j: int) -> int:
        """How many of block j's own frames its older neighbour (j-1) attends to as right context."""
        start, end = self.blocks[j]
        return min(self.num_cat, end - start)


@dataclass(frozen=True)
class SamplingConfig:
    """One sampling job's settings (everything but tensors)."""

    sigmas: tuple[float, ...]
    """The sigma table sigma[0..S], descending, sigma[S] normally 0; computed by ComfyUI's scheduler code."""
    sampler: str = "euler"
    """Sampler name, one of SAMPLER_NAMES."""
    cfg: float = 5.0
    """Classifier-free guidance scale; 1.0 skips the unconditional pass."""
    seed: int = 0
    """Noise seed (ComfyUI-compatible for noise_mode='independent')."""
    noise_mode: str = "coordinated"
    """'coordinated' (a P+K template reshuffled per block) or 'independent' (KSampler's noise)."""
    num_per_block: int = 8
    """P, frames per block."""
    num_cat: int = 8
    """K, context frames."""
    add_noise: bool = True
    """Whether to add noise to the initial latent (False: the latent is already noisy, as KSamplerAdvanced)."""
    cfg_low: float | None = None
    """Guidance scale of the low-noise expert of a two-expert model (Wan2.2 A14B); None: the same as ``cfg``.
    Ignored with one expert."""

    def __post_init__(self) -> None:
        s = self.sigmas
        if len(s) < 2:
            raise ValueError(f"sigmas has {len(s)} entries; it needs at least 2 (one step). Use steps >= 1.")
        if any(not math.isfinite(v) or v < 0 for v in s):
            raise ValueError(f"sigmas {list(s)} has a negative or non-finite value.")
        if any(b > a for a, b in zip(s, s[1:])):
            raise ValueError(f"sigmas {list(s)} must be non-increasing.")
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler_name={self.sampler!r} is not supported; choose one of {list(SAMPLER_NAMES)}.")
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode={self.noise_mode!r} is not supported; choose one of {list(NOISE_MODES)}.")
        if not math.isfinite(self.cfg) or self.cfg < 0:
            raise ValueError(f"cfg={self.cfg} must be a finite number >= 0 (1.0 disables guidance).")
        if self.cfg_low is not None and (not math.isfinite(self.cfg_low) or self.cfg_low < 0):
            raise ValueError(f"cfg_low={self.cfg_low} must be a finite number >= 0 (1.0 disables guidance for the "
                             f"low-noise expert), or None for the same as cfg.")
        BlockLayout(1, self.num_per_block, self.num_cat)  # validates P and K

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def use_cfg(self) -> bool:
        """Whether any expert runs with guidance (the job then needs a negative conditioning)."""
        return self.cfg != 1.0 or (self.cfg_low is not None and self.cfg_low != 1.0)

    def guidance(self, expert: int) -> float:
        """Guidance scale of expert 0 (the only or the high-noise one) or 1 (the low-noise one)."""
        return self.cfg if expert == 0 or self.cfg_low is None else self.cfg_low

    def layout(self, num_frames: int) -> BlockLayout:
        return BlockLayout(num_frames, self.num_per_block, self.num_cat)

    def with_(self, **kw) -> SamplingConfig:
        return replace(self, **kw)


@dataclass(frozen=True)
class ModelSource:
    """Where a worker reads its weights: checkpoint file(s) on disk, or a tiny random model built from a seed."""

    path: str | None = None
    """A .safetensors diffusion-model file (ComfyUI, original Wan or diffusers keys)."""
    random_config: WanConfig | None = None
    """Build random weights of this shape instead of reading a file (demo, tests, benchmarks)."""
    random_seed: int = 0
    """Seed of the random weights."""
    low_noise_path: str | None = None
    """Second expert (Wan2.2 A14B low-noise), optional; ``path`` is then the high-noise expert."""
    random_low_seed: int | None = None
    """With ``random_config``: also build a random low-noise expert from this seed (tests, benchmarks)."""
    boundary: float = 0.875
    """Two experts: a block-step uses the high-noise expert while its sigma >= boundary, the low-noise one after
    (Wan2.2 A14B T2V: 0.875, I2V: 0.900, as wan/configs/wan_{t2v,i2v}_A14B.py ship them). Ignored with one."""
    loras: tuple[tuple[str, float, str], ...] = field(default_factory=tuple)
    """(file, strength, expert) LoRAs merged into each rank's slice; expert "both", "high" or "low"."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.random_config is None):
            raise ValueError("ModelSource needs exactly one of path= (a checkpoint file) or random_config=.")
        if self.low_noise_path is not None and self.path is None:
            raise ValueError("low_noise_path needs path= (the high-noise expert's file); a random model takes "
                             "random_low_seed= instead.")
        if self.random_low_seed is not None and self.random_config is None:
            raise ValueError("random_low_seed only applies to a random model (random_config=); give a file as "
                             "low_noise_path= instead.")
        if not math.isfinite(self.boundary) or not 0.0 <= self.boundary <= 1.0:
            raise ValueError(f"boundary={self.boundary} must lie between 0 and 1 (a sigma; Wan2.2 A14B T2V uses "
                             f"0.875, I2V 0.9).")
        for entry in self.loras:
            if len(entry) > 2 and str(entry[2]).lower() not in LORA_EXPERTS:
                raise ValueError(f"LoRA {entry[0]!r}: expert={entry[2]!r} is not one of {list(LORA_EXPERTS)}.")
            if len(entry) > 2 and str(entry[2]).lower() == "low" and not self.two_experts:
                raise ValueError(f"LoRA {entry[0]!r} is meant for the low-noise expert (expert='low'), but the "
                                 f"model has one expert: set a low-noise model, or use expert 'both'.")

    @property
    def two_experts(self) -> bool:
        """Whether this is a Wan2.2 A14B style pair (high-noise + low-noise expert)."""
        return self.low_noise_path is not None or self.random_low_seed is not None

    def expert_loras(self, expert: int) -> list[tuple]:
        """The LoRA entries of expert 0 (the only or the high-noise one: "both" and "high") or 1 ("both", "low")."""
        want = ("both", "high") if expert == 0 else ("both", "low")
        return [e for e in self.loras if (str(e[2]).lower() if len(e) > 2 else "both") in want]


@dataclass(frozen=True)
class PoolSpec:
    """What a worker group runs: the model, the devices (one rank each), the compute dtype and attention backend."""

    source: ModelSource
    """Where the weights come from."""
    devices: tuple[str, ...] = ("cpu", "cpu")
    """One device per rank, ("cuda:0", "cuda:1") or ("cpu", "cpu"); any parse_devices form but auto/tcp."""
    dtype: str = "bf16"
    """Compute dtype, one of DTYPES."""
    attention: str = "auto"
    """Attention backend, one of ATTENTION_BACKENDS (dualparal_core/attention.py; each rank resolves "auto")."""
    max_in_flight: int | None = None
    """Block-steps rank 0 keeps in flight (default: the number of ranks + 1)."""
    compile: bool | None = None
    """torch.compile the elementwise chains of each layer (None: on for CUDA, off for CPU). The first job of a
    new shape pays a one-off compile (tens of seconds); later jobs run about 25 % faster (H100, S1 shapes)."""
    weights: str = "dequant"
    """"dequant": weights are held in the compute dtype (fp8 files dequantised at load). "fp8": the transformer
    blocks' Linear weights are held in fp8 with a float32 scale (fp8 files as stored, others quantised at load)
    and dequantised layer by layer in the forward: about half the weight memory of bf16."""
    matmul: str = "bf16"
    """"fp8" (opt-in; bf16 on GPUs of compute capability 8.9+): the blocks' big GEMMs in e4m3 (fp8_gemm.py)."""
    kv_cache: str = "exact"
    """"exact": the right-context K/V a block keeps for its older neighbour stay in the compute dtype on the GPU.
    "offload" (opt-in): the same bits in pinned host memory, a few layers of it on the GPU at a time (the largest
    item of memory nearly gone, for PCIe traffic and as much host RAM). "fp8" (opt-in): held in e4m3 with one scale
    per token, half the bytes, a rounding error (kvcache.py)."""

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError("devices is empty; give at least one device (e.g. 'cuda:0' or 'cpu').")
        # one grammar for every caller; a spec names its devices (no 'auto', no address) and holds them normalised
        object.__setattr__(self, "devices", parse_devices(self.devices, attach=False))
        self.validate()

    def validate(self) -> None:
        """Every field but the files (check_spec reads those): again for a spec that skipped __post_init__
        (unpickled, or changed in place), before any pool is stopped or started."""
        parse_devices(self.devices, attach=False)
        for name, allowed in (("dtype", DTYPES), ("weights", WEIGHT_MODES), ("attention", ATTENTION_BACKENDS),
                              ("matmul", MATMUL_MODES), ("kv_cache", KV_CACHE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; choose one of {list(allowed)}.")
        m = self.max_in_flight
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_in_flight={m!r} must be a whole number of block-steps >= 1, or None (the number "
                             f"of ranks + 1).")
        if self.compile not in (None, True, False):
            raise ValueError(f"compile={self.compile!r} must be True, False or None (on for GPUs).")
        if not isinstance(self.source, ModelSource):
            raise ValueError(f"source must be a ModelSource, got {type(self.source).__name__}.")

    @property
    def world_size(self) -> int:
        return len(self.devices)
