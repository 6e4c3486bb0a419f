"""Image-to-video conditioning of a job: ComfyUI's concat latent (mask, then image latent) and CLIP-vision tokens.

ComfyUI's ``WanImageToVideo`` / ``WanFirstLastFrameToVideo`` put ``concat_latent_image`` (raw VAE latents of the
start/end images, grey elsewhere), ``concat_mask`` (1 where the model generates) and optionally
``clip_vision_output`` into the CONDITIONING. Its ``WAN21.concat_cond`` turns the first two into 20 channels that
are concatenated to the noisy latent before the patch embedding; :func:`build_concat` does the same here, once per
job. The engine then hands every block-step its own window's frames of it (left context included, :meth:`JobImage
.window`), and the CLIP-vision tokens become image K/V once per job (:meth:`WanStage.prepare_text`).

What ComfyUI does with unusual input, and so do we: an I2V model without image conditioning gets zeros for all 20
channels (the caller logs a warning); a T2V model ignores image conditioning; a model without ``img_emb`` ignores
the CLIP-vision tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import WanConfig


def cross_attend(q: torch.Tensor, kv, backend: str) -> torch.Tensor:
    """Cross-attention over a job's text or image K/V: one (k, v), or per batch half over ((k, v), (k, v)) when
    cond and uncond differ in length (timeline.TextBank)."""
    from .attention import attention

    if isinstance(kv[0], torch.Tensor):
        return attention(q, kv[0], kv[1], backend)
    return torch.cat([attention(q[i:i + 1], k, v, backend) for i, (k, v) in enumerate(kv)])


MASK_CHANNELS = 4
"""The concat's first channels: ``1 - concat_mask`` per latent frame, 4 per frame (one per pixel frame)."""


@dataclass
class ImageConditioning:
    """What an image-to-video job adds to the noisy latent and the text context."""

    concat: torch.Tensor | None = None
    """[B, 20, T, H, W] float32: 4 mask channels then the 16 image-latent channels in the model's normalised space,
    exactly what ComfyUI's ``WAN21.concat_cond`` returns for the job's noise; None: zeros (no image given)."""
    clip: torch.Tensor | None = None
    """[1, N, 1280] CLIP-vision penultimate hidden states (N = 257, or 514 for a first and a last image); None."""

    def validate(self, config: WanConfig, shape: tuple[int, ...]) -> None:
        """Raise ValueError naming the input and what would fit (the job's latent ``shape`` [B, C, T, H, W])."""
        b, _, t, h, w = shape
        c = self.concat
        want = (b, config.concat_channels, t, h, w)
        if c is not None and config.concat_channels and tuple(c.shape) != want:
            raise ValueError(f"the image conditioning (concat_latent_image + concat_mask) has shape "
                             f"{list(c.shape)}; this job needs {list(want)}: {config.concat_channels} channels "
                             f"(4 mask + 16 image latent) for every latent frame of latent_image.")
        if c is not None and not torch.isfinite(c).all():
            raise ValueError("concat_latent_image or concat_mask contains NaN or infinite values.")
        k = self.clip
        if k is not None and config.image_dim is not None:
            if k.ndim != 3 or k.shape[0] != 1 or k.shape[-1] != config.image_dim or k.shape[1] < 1:
                raise ValueError(f"clip_vision_output has penultimate_hidden_states of shape {list(k.shape)}; "
                                 f"this model projects [1, tokens, {config.image_dim}] (CLIP-ViT-H, "
                                 f"clip_vision_h.safetensors, through CLIP Vision Encode).")
            if not torch.isfinite(k).all():
                raise ValueError("clip_vision_output contains NaN or infinite values.")


def build_concat(noise_shape: tuple[int, ...], image: torch.Tensor | None, mask: torch.Tensor | None,
                 process_in: Callable[[torch.Tensor], torch.Tensor],
                 upscale: Callable[[torch.Tensor, int, int], torch.Tensor],
                 to_batch: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """ComfyUI's ``WAN21.concat_cond`` for a 20-channel model, on CPU in float32: [B, 20, T, H, W].

    Args:
        noise_shape: the job's latent (B, 16, T, H, W).
        image: ``concat_latent_image`` (raw VAE latents [b, 16, T', H', W']) or None (then all 20 channels are 0).
        mask: ``concat_mask`` ([1, 1 or 4, T'', H'', W''], 1 = generate) or None (then the mask channels are 0).
        process_in: the latent format's ``process_in`` (raw VAE space -> the model's normalised space).
        upscale: ``(x, width, height) -> x`` resized bilinearly with a center crop (ComfyUI's ``common_upscale``).
        to_batch: ComfyUI's ``resize_to_batch_size``.
    Raises ValueError for what ComfyUI's model cannot take either (other frame counts or channels).
    """
    B, C, T, H, W = noise_shape
    if image is None:
        return torch.zeros((B, 20, T, H, W), dtype=torch.float32)
    image = image.detach().to("cpu", torch.float32)
    if image.ndim != 5 or image.shape[1] != C:
        raise ValueError(f"concat_latent_image has shape {list(image.shape)}; it must be a Wan2.1-VAE video latent "
                         f"[batch, {C}, frames, height/8, width/8] (from WanImageToVideo / "
                         f"WanFirstLastFrameToVideo with the Wan2.1 VAE).")
    if image.shape[2] != T:
        raise ValueError(f"concat_latent_image has {image.shape[2]} latent frames but latent_image has {T}; "
                         f"connect the latent from the same WanImageToVideo node (its length sets both).")
    image = process_in(upscale(image, W, H))
    image = to_batch(image, B)
    if mask is None:
        mask = torch.zeros((B, MASK_CHANNELS, T, H, W), dtype=torch.float32)
    else:
        mask = mask.detach().to("cpu", torch.float32)
        if mask.ndim != 5:
            raise ValueError(f"concat_mask has shape {list(mask.shape)}; it must be 5-D [1, 1 or 4, frames, h, w].")
        if mask.shape[1] != MASK_CHANNELS:
            mask = mask.mean(dim=1, keepdim=True)
        mask = upscale(1.0 - mask, W, H)
        if mask.shape[2] < T:
            mask = torch.nn.functional.pad(mask, (0, 0, 0, 0, 0, T - mask.shape[2]), value=0.0)
        if mask.shape[2] != T:
            raise ValueError(f"concat_mask covers {mask.shape[2]} latent frames but latent_image has {T}; connect "
                             f"the latent from the same WanImageToVideo node.")
        if mask.shape[1] == 1:
            mask = mask.repeat(1, MASK_CHANNELS, 1, 1, 1)
        mask = to_batch(mask, B)
    return torch.cat((mask, image), dim=1).contiguous()


def image_kv(stage, text_emb: torch.Tensor, clip: torch.Tensor | None) -> dict | None:
    """Per-layer image K/V of a stage whose model has ``img_emb`` (None for the others, which ignore ``clip`` as
    ComfyUI does), once per job, as ComfyUI's ``WanModel`` computes them: from the projected CLIP-vision tokens when
    given; without them its I2V cross-attention reads the text tokens as image tokens (``context[:, :None]``), and
    so does this (``text_emb``: the text embedder's output)."""
    ie = stage.condition_embedder.image_embedder
    if ie is None:
        return None
    img = text_emb
    if clip is not None:  # img_emb; FLF2V adds its position table to the first tokens, as ComfyUI's MLPProj does
        x = clip.to(stage.device, stage.dtype)
        if ie.pos_embed is not None:
            x = x[:, :ie.pos_embed.shape[1]] + ie.pos_embed[:, :x.shape[1]].to(x.dtype)
        img = ie.norm2(ie.ff(ie.norm1(x)))
    out = {}
    for i in stage.layers:
        a = stage.blocks[str(i)].attn2
        out[i] = project_kv(img, a.add_k_proj, a.norm_added_k, a.add_v_proj, a.heads)
    return out


def project_kv(tokens: torch.Tensor, to_k, norm_k, to_v, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A cross-attention's keys and values over ``tokens`` [b, L, dim]: each [b, H, L, d], contiguous (the text's
    and the image's, once per job)."""
    k = norm_k(to_k(tokens)).unflatten(2, (heads, -1)).transpose(1, 2)
    v = to_v(tokens).unflatten(2, (heads, -1)).transpose(1, 2)
    return k.contiguous(), v.contiguous()


class JobImage:
    """One job's image conditioning as the engine reads it: each block-step's input window (the CLIP-vision tokens
    go into the text K/V, timeline.TextBank). A text-to-video model passes the latent through unchanged."""

    def __init__(self, image: ImageConditioning | None, config: WanConfig, rank: int = 0):
        self.channels = config.concat_channels
        # only rank 0 embeds: the other ranks keep no concat latent
        self.concat = image.concat if image is not None and self.channels and rank == 0 else None
        self.current: torch.Tensor | None = None
        """The concat latent of the video being sampled, on the device (see :meth:`select`)."""

    def select(self, video: int, device: torch.device) -> None:
        """Rank 0 starts sampling ``video`` of the batch: its row of the concat latent moves to the device once, so
        the block-step loop slices it there (a host-to-device copy per block-step would wait for the GPU's queue)."""
        self.current = None if self.concat is None else self.concat[video:video + 1].to(device)

    def window(self, x: torch.Tensor, s0: int, e0: int) -> torch.Tensor:
        """The model input of frames [s0, e0) of the video being sampled: its noisy latent, then (I2V) the same
        frames of the concat latent, as ComfyUI concatenates them before the patch embedding."""
        xs = x[:, :, s0:e0]
        if not self.channels:
            return xs
        if self.current is None:
            extra = xs.new_zeros((xs.shape[0], self.channels, *xs.shape[2:]))
        else:
            extra = self.current[:, :, s0:e0].to(xs.dtype)
        return torch.cat((xs, extra.expand(xs.shape[0], -1, -1, -1, -1)), dim=1)
