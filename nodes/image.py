"""The image-to-video part of a CONDITIONING -> the job's :class:`ImageConditioning`, as ComfyUI's Wan model reads
it: ``concat_latent_image`` and ``concat_mask`` (``WanImageToVideo``, ``WanFirstLastFrameToVideo``) and
``clip_vision_output``. Pure: ComfyUI's resize helpers come in as arguments (unit-tested without ComfyUI)."""

from __future__ import annotations

import logging

import torch

from dualparal_core.conditioning import ImageConditioning, build_concat
from dualparal_core.config import WanConfig

logger = logging.getLogger("DualParal")
#: The CONDITIONING keys read here (extract_conditioning lets them through).
IMAGE_KEYS = ("concat_latent_image", "concat_mask", "clip_vision_output")


def _values(cond) -> dict:
    ok = isinstance(cond, (list, tuple)) and cond and isinstance(cond[0], (list, tuple)) and len(cond[0]) == 2
    extras = (cond[0][1] or {}) if ok else {}
    out = {k: extras.get(k) for k in IMAGE_KEYS}
    clip = out["clip_vision_output"]
    if clip is not None:
        states = getattr(clip, "penultimate_hidden_states", None)
        if not isinstance(states, torch.Tensor):
            raise ValueError("clip_vision_output has no penultimate_hidden_states tensor; connect CLIP Vision "
                             "Encode (crop 'none' or 'center') fed by Load CLIP Vision with clip_vision_h.")
        out["clip_vision_output"] = states
    return out


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.equal(a, b)


def image_conditioning(positive, negative, config: WanConfig, noise_shape: tuple[int, ...], process_in, upscale,
                       to_batch) -> ImageConditioning | None:
    """The job's image conditioning, built once as ``WAN21.concat_cond`` builds it (see :func:`build_concat`).

    ``negative`` (None without CFG) must carry the same image conditioning as ``positive`` (WanImageToVideo sets
    both): the engine batches cond and uncond with one image. Logs what ComfyUI's model would silently do with a
    mismatch between the model and the conditioning (a T2V model ignores it; an I2V model without it gets zeros).
    """
    pos = _values(positive)
    if negative is not None:
        neg = _values(negative)
        diff = [k for k in IMAGE_KEYS if not _same(pos[k], neg[k])]
        if diff:
            raise ValueError(f"positive and negative carry different image conditioning ({', '.join(diff)}); "
                             f"DualParal Sampler uses one image for both. Take both from the same "
                             f"WanImageToVideo / WanFirstLastFrameToVideo node.")
    given = [k for k in IMAGE_KEYS if pos[k] is not None]
    if not config.concat_channels:
        if given:
            logger.warning("DualParal Sampler: the model is text-to-video, so the image conditioning (%s) is "
                           "ignored, as ComfyUI's KSampler ignores it. Load an I2V model to start from the image.",
                           ", ".join(given))
        return None
    if pos["concat_latent_image"] is None:
        logger.warning("DualParal Sampler: the I2V model got no start image (no concat_latent_image): the image "
                       "and mask channels are zero, as in ComfyUI. Connect WanImageToVideo with a start_image.")
    clip = pos["clip_vision_output"]
    if config.image_dim is None:
        if clip is not None:
            logger.warning("DualParal Sampler: this I2V model has no CLIP-vision projection (Wan2.2 I2V A14B): "
                           "clip_vision_output is ignored, as in ComfyUI.")
        clip = None
    elif clip is None:
        logger.warning("DualParal Sampler: this Wan2.1 I2V/FLF2V model got no clip_vision_output; as in ComfyUI it "
                       "then reads the text tokens in its image cross-attention. Connect Load CLIP Vision "
                       "(clip_vision_h) -> CLIP Vision Encode -> WanImageToVideo's clip_vision_output.")
    concat = build_concat(tuple(noise_shape), pos["concat_latent_image"], pos["concat_mask"], process_in,
                          upscale, to_batch)
    return ImageConditioning(concat, None if clip is None else clip.detach().to("cpu", torch.float32).clone())
