"""Block-wise decode of Wan2.1 VAE latents that equals the full decode, either streamed or split over ranks.

Why carrying the cache is exact. diffusers' ``AutoencoderKLWan._decode`` (like ComfyUI's ``WanVAE.decode``) already
decodes one latent frame per decoder call. The only state that passes from one call to the next is ``feat_cache``:

- for every causal 3-D conv with temporal kernel k (k = 3, left padding k - 1 = 2), the last ``CACHE_T`` = 2 frames of
  its input stream;
- for every temporal upsampler (``WanResample`` "upsample3d"), the same for its ``time_conv``. Before that, the marker
  ``"Rep"``: the first latent frame is not doubled in time. This is why F = 1 + 4 (T - 1) and not 4 T.

Attention in the decoder works per frame, the RMS norms per pixel, and the shortcuts are 1x1x1. So nothing else
mixes frames. :class:`WanVAEDecoder` makes the same per-frame calls with the same cache list, kept across blocks. A
block-wise decode therefore runs the same operations on the same inputs as the full decode and is bit-identical to it.

Priming a span (parallel decode). A rank that decodes latent frames [s, e) starts with an empty cache at a = s - p.
It decodes frames a .. s-1, discards their pixels, and then decodes the span. The cache after frame s-1 must equal
the sequential one. We follow an *exactness front* along the decoder, in forward order. At a point in the chain
where the stream runs at r frames per latent frame, the front is the first stream index, counted from frame a, from
which values equal the sequential decode's:

- the latent itself is exact from index 0;
- a causal conv with kernel k moves the front forward by k - 1;
- a temporal upsampler's ``time_conv`` never sees the first chunk (``"Rep"``), so its input counts as exact only from
  index r. The front becomes max(front, r) + 2 and then doubles, and r doubles too;
- a conv's cache (its last k - 1 input frames before frame s) is exact iff front_in <= r p - (k - 1).

The smallest p that satisfies every cache is :func:`frames_needed_to_prime`. For the Wan2.1 VAE:

- 11 convs at r = 1 (conv_in, 4 in the mid block, 6 in up block 0): front 22;
- time_conv: 24, which becomes 48 at r = 2;
- 6 convs: 60; time_conv: 62, which becomes 124 at r = 4;
- 12 convs (up blocks 2 and 3): 148 at the input of conv_out;
- conv_out's cache needs 148 <= 4 p - 2, so **p = 38 latent frames** (152 pixel frames).

The walk also covers Wan2.2's residual up blocks (their shortcut repeats frames, so the front is multiplied by
the time factor); a Wan2.2 decoder can be wrapped with :meth:`WanVAEDecoder.from_vae`, and it also needs 38 frames.
Files are read for the Wan2.1 VAE only.

A finite prime is exact, not just close: the state holds only finitely many frames, and each depends on finitely
many latent frames. With p = 37, conv_out's cache holds two wrong frames and the span's first pixel frames differ
(``tests/test_vae.py`` checks both). The prime is a cost, not an approximation: the rank decodes p extra frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    AutoencoderKLWan,
    WanAttentionBlock,
    WanCausalConv3d,
    WanDecoder3d,
    WanResample,
    WanResidualBlock,
    WanResidualUpBlock,
    WanUpBlock,
    unpatchify,
)

from dualparal_core import logger
from dualparal_core.files.vae import vae_keys as _needed_keys

__all__ = ["WanVAEDecoder", "frames_needed_to_prime", "convert_original_to_diffusers", "decoder_state_dict"]

_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def convert_original_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of an original-Wan/ComfyUI VAE state dict (``decoder.upsamples.N``...) to diffusers' names."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers(dict(sd))


def decoder_state_dict(sd: Mapping[str, torch.Tensor], source: str = "the state dict") -> dict[str, torch.Tensor]:
    """The decoder-side tensors of a Wan2.1 VAE state dict (keys as given, either layout): what a decode needs.

    ComfyUI's ``VAE.first_stage_model.state_dict()`` holds the encoder too; this drops it (about 40 % of the bytes)
    before the weights cross to the workers. Raises ValueError naming ``source`` if it is not a Wan VAE.
    """
    _, _, needed = _needed_keys(list(sd.keys()), source)
    return {k: sd[k] for k in needed}


def _count_up_resnets(sd: Mapping[str, torch.Tensor]) -> int:
    idx = {int(k.split(".")[4]) for k in sd if k.startswith("decoder.up_blocks.0.resnets.")}
    return max(idx) if idx else -1


def frames_needed_to_prime(decoder: WanDecoder3d | WanVAEDecoder) -> int:
    """How many preceding latent frames make every cache of ``decoder`` equal to the sequential decode's state.

    Walks the decoder's modules in forward order, tracking the exactness front described in the module docstring.
    """
    if isinstance(decoder, WanVAEDecoder):
        decoder = decoder.decoder
    front, rate, need = 0, 1, 0

    def conv(m: WanCausalConv3d, front: int) -> int:
        nonlocal need
        k = m.kernel_size[0]
        if k > 1:
            need = max(need, math.ceil((front + k - 1) / rate))
        return front + k - 1

    def resnet(m: WanResidualBlock, front: int) -> int:
        short = conv(m.conv_shortcut, front) if isinstance(m.conv_shortcut, WanCausalConv3d) else front
        return max(short, conv(m.conv2, conv(m.conv1, front)))

    def resample(m: WanResample, front: int) -> int:
        nonlocal rate
        if m.mode == "upsample3d":
            front = 2 * conv(m.time_conv, max(front, rate))  # time_conv skips the first chunk ("Rep")
            rate *= 2
        elif m.mode != "upsample2d":
            raise ValueError(f"Unexpected resample mode {m.mode!r} in a Wan VAE decoder.")
        return front

    front = conv(decoder.conv_in, front)
    if not all(isinstance(m, WanAttentionBlock) for m in decoder.mid_block.attentions):
        raise ValueError("Unexpected attention module in the Wan VAE mid block.")
    for m in decoder.mid_block.resnets:  # the attention between them works per frame
        front = resnet(m, front)
    for block in decoder.up_blocks:
        start = front
        for m in block.resnets:
            front = resnet(m, front)
        if isinstance(block, WanUpBlock):
            for m in block.upsamplers or []:
                front = resample(m, front)
        elif isinstance(block, WanResidualUpBlock):  # Wan2.2: plus a shortcut that repeats frames
            factor = block.avg_shortcut.factor_t if block.avg_shortcut is not None else 1
            front = resample(block.upsampler, front) if block.upsampler is not None else front
            front = max(front, factor * start)
        else:
            raise ValueError(f"Unexpected up block {type(block).__name__} in a Wan VAE decoder.")
    front = conv(decoder.conv_out, front)
    return max(need, math.ceil(front / rate))


class WanVAEDecoder:
    """The decoder half of a Wan VAE that decodes a raw latent whole, as a stream of blocks, or as a primed span."""

    def __init__(
        self, decoder: WanDecoder3d, post_quant_conv: WanCausalConv3d, patch_size: int | None = None
    ):
        self.decoder = decoder.eval().requires_grad_(False)
        self.post_quant_conv = post_quant_conv.eval().requires_grad_(False)
        self.patch_size = patch_size
        self.z_dim = decoder.z_dim
        self.temporal_scale = 2 ** sum(
            1 for m in decoder.modules() if getattr(m, "mode", None) == "upsample3d"
        )
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in decoder.modules())
        self.prime_frames = frames_needed_to_prime(decoder)
        p = next(decoder.parameters())
        self.dtype, self.device = p.dtype, p.device

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_vae(cls, vae: AutoencoderKLWan) -> WanVAEDecoder:
        """Wrap an existing diffusers ``AutoencoderKLWan`` (shares its modules)."""
        return cls(vae.decoder, vae.post_quant_conv, vae.config.patch_size)

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        source: str = "the state dict",
    ) -> WanVAEDecoder:
        """Build the decoder from a Wan2.1 VAE state dict in the original/ComfyUI or the diffusers key layout.

        Encoder weights, if present, are ignored. ``source`` names the input in error messages.
        """
        layout, prefix, needed = _needed_keys(list(sd.keys()), source)
        sd = {k[len(prefix) :]: sd[k] for k in needed}
        if layout == "original":
            sd = convert_original_to_diffusers(sd)
        return cls._build(sd, dtype, device, source)

    @classmethod
    def from_file(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> WanVAEDecoder:
        """Load a Wan2.1 VAE file (``.safetensors``, or a torch pickle), reading only the decoder's tensors."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"VAE file {path} does not exist.")
        source = f"VAE file {path}"
        if path.suffix.lower() in _TORCH_SUFFIXES:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # any unreadable file is the same user error
                raise ValueError(f"{source} could not be read as a torch checkpoint: {e}") from e
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
            if not isinstance(sd, dict):
                raise ValueError(f"{source} holds a {type(sd).__name__}, not a state dict.")
            return cls.from_state_dict(sd, dtype, device, source=source)
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                layout, prefix, needed = _needed_keys(list(f.keys()), source)
                sd = {k[len(prefix) :]: f.get_tensor(k).to(dtype) for k in needed}
        except ValueError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{source} could not be read as a .safetensors file: {e}") from e
        if layout == "original":
            sd = convert_original_to_diffusers(sd)
        logger.info("Block Decode: loaded %d decoder tensors from %s (%s layout)", len(sd), path.name, layout)
        return cls._build(sd, dtype, device, source)

    @classmethod
    def _build(cls, sd: dict, dtype: torch.dtype, device: str | torch.device, source: str) -> WanVAEDecoder:
        try:
            conv_in = sd["decoder.conv_in.weight"]
            post_weight = sd["post_quant_conv.weight"]
        except KeyError as e:
            raise ValueError(f"{source} lacks the Wan VAE decoder tensor {e.args[0]!r}.") from None
        if any(".upsampler." in k for k in sd):
            raise ValueError(
                f"{source} is a Wan2.2-style (residual) VAE; Block Decode supports the Wan2.1 VAE."
            )
        z_dim, width = conv_in.shape[1], conv_in.shape[0]
        num_res_blocks = _count_up_resnets(sd)
        if width % 4 or num_res_blocks < 1 or post_weight.shape[0] != z_dim:
            raise ValueError(
                f"{source} has decoder shapes that are not a Wan2.1 VAE's (conv_in {tuple(conv_in.shape)})."
            )
        temporal = [f"decoder.up_blocks.{i}.upsamplers.0.time_conv.weight" in sd for i in range(3)]
        with torch.device("meta"):
            decoder = WanDecoder3d(
                dim=width // 4, z_dim=z_dim, num_res_blocks=num_res_blocks, temperal_upsample=temporal
            )
            post = WanCausalConv3d(z_dim, z_dim, 1)
        sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
        dec_sd = {k[len("decoder.") :]: v for k, v in sd.items() if k.startswith("decoder.")}
        post_sd = {k[len("post_quant_conv.") :]: v for k, v in sd.items() if k.startswith("post_quant_conv.")}
        try:
            decoder.load_state_dict(dec_sd, strict=True, assign=True)
            post.load_state_dict(post_sd, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{source} does not fit the Wan2.1 VAE decoder: {e}") from None
        return cls(decoder, post)

    # ---------------------------------------------------------------- decoding
    def num_pixel_frames(self, start: int, end: int) -> int:
        """Pixel frames that latent frames [start, end) decode to (the first latent frame gives one)."""
        return (end - start) * self.temporal_scale - (self.temporal_scale - 1 if start == 0 else 0)

    def _check(self, z: torch.Tensor) -> int:
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != self.z_dim or z.shape[2] < 1:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(
                f"latent must be a raw Wan VAE latent of shape [B, {self.z_dim}, T, h, w] (T >= 1), as in "
                f"ComfyUI's LATENT['samples']; got {got}."
            )
        return z.shape[2]

    def _step(self, z: torch.Tensor, i: int, cache: list, first: bool) -> torch.Tensor:
        """Decode latent frame ``i`` with ``cache`` (updated in place); the pixels of that frame, clamped."""
        x = self.post_quant_conv(z[:, :, i : i + 1].to(device=self.device, dtype=self.dtype))
        out = self.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first)
        if self.patch_size is not None:
            out = unpatchify(out, patch_size=self.patch_size)
        return out.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def stream(self, z: torch.Tensor, block_size: int) -> Iterator[torch.Tensor]:
        """Yield the video [B, 3, f, H, W] of each block of ``block_size`` latent frames, carrying the causal cache.

        The concatenation along dim 2 equals :meth:`decode_full`. Working memory is one latent frame's activations,
        the cache and the current block; the yielded blocks are the caller's.
        """
        total = self._check(z)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive number of latent frames; got {block_size!r}.")
        cache: list = [None] * self._num_convs
        for b0 in range(0, total, block_size):
            frames = [self._step(z, i, cache, i == 0) for i in range(b0, min(total, b0 + block_size))]
            block = frames[0] if len(frames) == 1 else torch.cat(frames, dim=2)
            del frames
            yield block

    @torch.no_grad()
    def stream_span(
        self,
        z: torch.Tensor,
        start: int,
        end: int,
        block_size: int,
        prime: int | None = None,
        on_frame: Callable[[], None] | None = None,
    ) -> Iterator[torch.Tensor]:
        """:meth:`decode_span` as a stream: yield the video of each block of ``block_size`` latent frames of
        [start, end), after priming the cache on the ``prime`` frames before ``start``.

        The concatenation equals ``decode_span(z, start, end, prime)``. ``on_frame()`` runs after every decoded
        latent frame, priming frames included (a worker checks for a cancel there; it may raise).
        """
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive number of latent frames; got {block_size!r}.")
        first, cache = self._primed(z, start, end, prime, on_frame)
        for b0 in range(start, end, block_size):
            frames = []
            for i in range(b0, min(end, b0 + block_size)):
                frames.append(self._step(z, i, cache, i == first))
                if on_frame is not None:
                    on_frame()
            block = frames[0] if len(frames) == 1 else torch.cat(frames, dim=2)
            del frames
            yield block

    def _primed(self, z: torch.Tensor, start: int, end: int, prime: int | None,
                on_frame: Callable[[], None] | None = None) -> tuple[int, list]:
        """Check a span [start, end) of ``z`` and run the ``prime`` frames before it (default :attr:`prime_frames`)
        through a fresh causal cache; returns (the first decoded frame, the cache)."""
        total = self._check(z)
        if not (0 <= start < end <= total):
            raise ValueError(f"span [start, end) = [{start}, {end}) must lie within the latent's {total} frames.")
        prime = self.prime_frames if prime is None else prime
        if prime < 0:
            raise ValueError(f"prime must be >= 0 latent frames; got {prime}.")
        first = max(0, start - prime)
        cache: list = [None] * self._num_convs
        for i in range(first, start):
            self._step(z, i, cache, i == first)
            if on_frame is not None:
                on_frame()
        return first, cache

    @torch.no_grad()
    def decode_span(self, z: torch.Tensor, start: int, end: int, prime: int | None = None) -> torch.Tensor:
        """Decode latent frames [start, end) of ``z`` after priming the cache on the ``prime`` frames before ``start``.

        ``prime=None`` uses :attr:`prime_frames`, which makes the result equal to the same frames of the
        sequential decode; the priming frames' pixels are discarded. With ``start - prime > 0`` the decode restarts
        at frame ``start - prime``. With ``prime=0`` and ``start > 0`` the span is decoded as an independent video
        (one pixel frame for its first latent frame), which is what a plain per-block decode gives.
        """
        first, cache = self._primed(z, start, end, prime)
        # A span decoded from its own first frame (start 0, or prime 0) gets one pixel frame for that frame.
        count = self.num_pixel_frames(0 if first == start else 1, end - start + (0 if first == start else 1))
        out = None
        pos = 0
        for i in range(start, end):
            frame = self._step(z, i, cache, i == first)
            if out is None:
                b, c, _, h, w = frame.shape
                out = frame.new_empty((b, c, count, h, w))
            out[:, :, pos : pos + frame.shape[2]] = frame
            pos += frame.shape[2]
        return out

    def decode_full(self, z: torch.Tensor) -> torch.Tensor:
        """Decode the whole latent [B, z_dim, T, h, w] to a video [B, 3, 1 + 4 (T - 1), H, W] in [-1, 1]."""
        return self.decode_span(z, 0, self._check(z), prime=0)
