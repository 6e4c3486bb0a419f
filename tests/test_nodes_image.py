"""The Sampler's reading of image-to-video CONDITIONING (nodes/image.py), without ComfyUI: what WanImageToVideo and
WanFirstLastFrameToVideo put there becomes the job's ImageConditioning; the mismatches ComfyUI's model lets pass
are logged as it handles them (zeros, ignored), and what it cannot take is refused naming the input."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from test_nodes_unit import _pack_module

from dualparal_core.testing import tiny_config

IMG = _pack_module("image")
SHAPE = (1, 16, 3, 2, 2)


def _cond(**extras):
    return [[torch.zeros(1, 4, 64), {"pooled_output": None, **extras}]]


def _build(pos, neg=None, variant="i2v"):
    def upscale(x, w, h):
        assert x.shape[-2:] == (h, w)  # same size here: ComfyUI's resize is exercised in the real-ComfyUI tests
        return x

    return IMG.image_conditioning(pos, neg, tiny_config(variant), SHAPE, lambda x: x * 2, upscale,
                                lambda x, b: x[:b])


def _image_cond(seed=0):
    g = torch.Generator().manual_seed(seed)
    clip = SimpleNamespace(penultimate_hidden_states=torch.randn(1, 257, 1280, generator=g))
    mask = torch.ones(1, 1, 3, 2, 2)
    mask[:, :, 0] = 0.0
    return {"concat_latent_image": torch.randn(1, 16, 3, 2, 2, generator=g), "concat_mask": mask,
            "clip_vision_output": clip}


def test_wan_image_to_video_conditioning_becomes_the_jobs_image():
    extras = _image_cond()
    img = _build(_cond(**extras), _cond(**extras))
    assert img.concat.shape == (1, 20, 3, 2, 2)
    assert torch.equal(img.concat[:, :4, 0], torch.ones(1, 4, 2, 2)) and not img.concat[:, :4, 1:].any()
    assert torch.equal(img.concat[:, 4:], extras["concat_latent_image"] * 2)  # process_in applied
    assert torch.equal(img.clip, extras["clip_vision_output"].penultimate_hidden_states)


def test_mismatches_comfy_lets_pass_are_handled_as_comfy_does_and_logged(caplog):
    extras = _image_cond()
    with caplog.at_level(logging.WARNING, logger="DualParal"):
        assert _build(_cond(**extras), variant="t2v") is None
        assert "text-to-video, so the image conditioning" in caplog.text
        img = _build(_cond(), variant="i2v")
        assert not img.concat.any() and img.clip is None
        assert "got no start image" in caplog.text and "no clip_vision_output" in caplog.text
        img = _build(_cond(**extras), variant="i2v_concat")
        assert img.clip is None and "clip_vision_output is ignored" in caplog.text


def test_what_comfy_cannot_take_is_refused_naming_the_input():
    a, b = _image_cond(0), _image_cond(1)
    with pytest.raises(ValueError, match="positive and negative carry different image conditioning"):
        _build(_cond(**a), _cond(**b))
    with pytest.raises(ValueError, match="concat_latent_image has 2 latent frames but latent_image has 3"):
        _build(_cond(concat_latent_image=torch.zeros(1, 16, 2, 2, 2)))
    with pytest.raises(ValueError, match="concat_latent_image has shape.*Wan2.1-VAE"):
        _build(_cond(concat_latent_image=torch.zeros(1, 48, 3, 2, 2)))
    with pytest.raises(ValueError, match="clip_vision_output has no penultimate_hidden_states"):
        _build(_cond(clip_vision_output=object()))
