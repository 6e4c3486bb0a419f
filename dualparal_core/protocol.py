"""What crosses the process boundary: the sampling job and the control messages, plain data and tensors only.

Messages are dicts ``{"op": str, ...}`` whose values are numbers, strings, lists, tensors or the frozen dataclasses
of :mod:`dualparal_core.config` / this module. Both sides import ``dualparal_core`` as a top-level package, so a
pickled instance unpickles under the same module name in the worker (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SamplingConfig, WanConfig

# control-channel operations (parent -> worker)
OP_JOB = "job"
OP_CANCEL = "cancel"
OP_CLOSE = "close"
OP_PING = "ping"
OP_SPEC = "spec"
OP_DECODE = "decode"  # Block Decode of one span on one rank (dualparal_core/decode_pool.py documents the fields)
# worker -> parent
OP_FRAMES = "frames"  # one decoded block of an OP_DECODE: {"job", "video", "frame", "frames": [n, H, W, 3]}
OP_READY = "ready"
OP_PROGRESS = "progress"
OP_RESULT = "result"
OP_ERROR = "error"
OP_CANCELLED = "cancelled"
OP_PONG = "pong"
OP_STATUS = "status"


@dataclass
class Job:
    """One sampling request: B videos of shape ``shape`` (latent frames T), in the model's normalised space."""

    sampling: SamplingConfig
    shape: tuple[int, int, int, int, int]
    """(B, C, T, H, W) of the latent."""
    cond: torch.Tensor
    """Positive text conditioning [1, L, text_dim] (float32, CPU)."""
    uncond: torch.Tensor | None = None
    """Negative text conditioning [1, L', text_dim], required when cfg != 1."""
    latent: torch.Tensor | None = None
    """Initial latent [B, C, T, H, W] in normalised space (None: zeros, i.e. pure noise)."""
    noise: torch.Tensor | None = None
    """Explicit initial noise [B, C, T, H, W] (tests); None: drawn from sampling.seed / noise_mode."""
    preview: bool = False
    """Whether progress events carry the x0 of the block just stepped (for ComfyUI's latent previews)."""

    def validate(self, config: WanConfig) -> None:
        """Raise ValueError naming the input, the value and what would work, before any GPU work."""
        if len(self.shape) != 5:
            raise ValueError(f"latent_image has shape {tuple(self.shape)}; a Wan video latent is 5-D "
                             f"[batch, {config.in_channels}, frames, height/8, width/8].")
        b, c, t, h, w = self.shape
        if c != config.in_channels:
            raise ValueError(f"latent_image has {c} channels but the model takes {config.in_channels} "
                             f"(Wan2.1 VAE latents have 16; TI2V-5B's 48-channel latents are not supported).")
        pt, ph, pw = config.patch_size
        if h % ph or w % pw or t % pt:
            raise ValueError(f"latent_image is {h}x{w} (latent pixels); both must be divisible by the patch size "
                             f"{ph}x{pw}: use a pixel width/height divisible by {8 * ph} (e.g. 832x480).")
        if b < 1 or t < 1:
            raise ValueError(f"latent_image shape {tuple(self.shape)} is empty.")
        for name, ctx in (("positive", self.cond), ("negative", self.uncond)):
            if ctx is None:
                if name == "negative" and self.sampling.use_cfg:
                    sc = self.sampling
                    which = f"cfg={sc.cfg}" if sc.cfg != 1.0 else f"cfg_low={sc.cfg_low}"
                    raise ValueError(f"{which} needs a negative conditioning; connect one or set it to 1.0.")
                continue
            if ctx.ndim != 3 or ctx.shape[0] != 1 or ctx.shape[-1] != config.text_dim:
                raise ValueError(f"{name} conditioning has shape {tuple(ctx.shape)}; this model expects "
                                 f"[1, tokens, {config.text_dim}] (umt5-xxl text embeddings for Wan).")
            if not torch.isfinite(ctx).all():
                raise ValueError(f"{name} conditioning contains NaN or infinite values.")
        for name, tens in (("latent_image", self.latent), ("noise", self.noise)):
            if tens is None:
                continue
            if tuple(tens.shape) != tuple(self.shape):
                raise ValueError(f"{name} has shape {tuple(tens.shape)}, expected {tuple(self.shape)}.")
            if not torch.isfinite(tens).all():
                raise ValueError(f"{name} contains NaN or infinite values; it cannot be sampled from.")

    @property
    def num_block_steps(self) -> int:
        layout = self.sampling.layout(self.shape[2])
        return self.shape[0] * layout.num_blocks * self.sampling.steps


def pad_contexts(cond: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring cond and uncond to one token count as ComfyUI batches cross-attention conds (repeat to the lcm)."""
    a, b = cond.shape[1], uncond.shape[1]
    if a == b:
        return cond, uncond
    n = a * b // math.gcd(a, b)
    return cond.repeat(1, n // a, 1), uncond.repeat(1, n // b, 1)
