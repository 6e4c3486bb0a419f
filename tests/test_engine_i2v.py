"""Image-to-video through the engine: one block equals a plain full-sequence Euler loop written here driving
diffusers' own I2V transformer (the concat latent before the patch embedding, the CLIP-vision tokens), and the
concat of ComfyUI's ``WAN21.concat_cond`` rebuilt by :func:`build_concat` on hand-made inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from dualparal_core.conditioning import ImageConditioning, build_concat
from dualparal_core.config import SamplingConfig
from dualparal_core.engine import run_single_process
from dualparal_core.model import WanStage
from dualparal_core.protocol import Job
from dualparal_core.testing import tiny_config

SHAPE = (2, 16, 5, 4, 6)  # two videos, 5 latent frames
SIGMAS = (1.0, 0.9, 0.75, 0.5, 0.2, 0.0)
# float32 throughout, diffusers' forward against ours over 5 Euler steps: per-forward differences of ~1e-7
# relative (operation order) grow slowly through the steps; 1e-5 is far below the O(1e-2) any real difference
# (a wrong channel order, a missing image K/V, another frame's concat) gives.
REL_TOL = 1e-5


def _model(variant):
    cfg = tiny_config(variant, num_layers=2)
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg.diffusers_kwargs()).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if "norm" in n and p.ndim == 1 else 0.0))
    stage = WanStage(cfg, range(2), embed=True, head=True)
    stage.load_weights(ref.state_dict())
    return cfg, ref, stage


def _plain_euler(ref, x, concat, cond, uncond, clip, cfg_scale):
    """Euler over the whole video with diffusers' forward, the concat appended to x at every step."""
    s = torch.tensor(SIGMAS, dtype=torch.float32)
    for i in range(len(s) - 1):
        t = torch.full((1,), float(s[i]) * 1000.0)
        with torch.no_grad():
            xin = torch.cat([x, concat], dim=1)
            vc = ref(xin, t, cond, encoder_hidden_states_image=clip, return_dict=False)[0]
            vu = ref(xin, t, uncond, encoder_hidden_states_image=clip, return_dict=False)[0]
        den = x - s[i] * (vu + cfg_scale * (vc - vu))
        x = x + (x - den) / s[i] * (s[i + 1] - s[i])
    return x


@pytest.mark.parametrize("variant", ["i2v", "i2v_concat"])
def test_one_block_equals_plain_full_sequence_i2v_sampling(variant):
    cfg, ref, stage = _model(variant)
    g = torch.Generator().manual_seed(3)
    # diffusers splits image from text tokens assuming 512 text tokens
    cond, uncond = torch.randn(1, 512, cfg.text_dim, generator=g), torch.randn(1, 512, cfg.text_dim, generator=g)
    clip = torch.randn(1, 257, 1280, generator=g) if variant == "i2v" else None
    concat = torch.randn(2, 20, 5, 4, 6, generator=g)  # a different image per video of the batch
    noise = torch.randn(SHAPE, generator=g)
    sc = SamplingConfig(sigmas=SIGMAS, sampler="euler", cfg=3.0, seed=42, noise_mode="independent",
                        num_per_block=8, num_cat=0)
    job = Job(sc, SHAPE, cond, uncond, noise=noise, image=ImageConditioning(concat, clip))
    out = run_single_process(stage, job)
    want = torch.cat([_plain_euler(ref, noise[b:b + 1].clone(), concat[b:b + 1], cond, uncond, clip, 3.0)
                      for b in range(2)])
    assert ((out - want).norm() / want.norm()).item() <= REL_TOL
    # the image is read: another concat gives another video
    other = run_single_process(stage, Job(sc, SHAPE, cond, uncond, noise=noise,
                                          image=ImageConditioning(concat.flip(2), clip)))
    assert ((other - out).norm() / out.norm()).item() > 1e-3


def test_image_kv_are_computed_once_per_job_whatever_the_prompts(monkeypatch):
    """The CLIP-vision tokens' K/V are the same for every prompt of a timeline and every video of the batch: one
    computation per job and expert (a counter), and the timeline's blocks of its first prompt are that prompt's
    plain result, bit for bit."""
    import dualparal_core.model as model_mod
    import dualparal_core.timeline as timeline_mod
    from dualparal_core.timeline import Timeline, Track

    cfg, _, stage = _model("i2v")
    g = torch.Generator().manual_seed(5)
    a, b, uncond = (torch.randn(1, 512, cfg.text_dim, generator=g) for _ in range(3))
    clip = torch.randn(1, 257, 1280, generator=g)
    concat = torch.randn(2, 20, 6, 4, 6, generator=g)
    sc = SamplingConfig(sigmas=SIGMAS, sampler="euler", cfg=3.0, seed=42, noise_mode="independent",
                        num_per_block=2, num_cat=0)
    calls = {"bank": 0, "model": 0}

    def counting(name, inner):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return inner(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(timeline_mod, "image_kv", counting("bank", timeline_mod.image_kv))
    monkeypatch.setattr(model_mod, "image_kv", counting("model", model_mod.image_kv))
    image = ImageConditioning(concat, clip)
    tl = Timeline(Track((a, b), (0, 6)))  # blocks at video frames 0, 5, 13: a, a, b
    out = run_single_process(stage, Job(sc, (2, 16, 6, 4, 6), a, uncond, timeline=tl, image=image))
    assert calls == {"bank": 1, "model": 0}  # two prompts, two videos: the image K/V once
    single = run_single_process(stage, Job(sc, (2, 16, 6, 4, 6), a, uncond, image=image))
    assert torch.equal(single[:, :, :4], out[:, :, :4])
    assert ((single[:, :, 4:] - out[:, :, 4:]).norm() / out[:, :, 4:].norm()).item() > 1e-3


def _upscale(x, w, h):  # what ComfyUI's common_upscale does for a same-aspect bilinear resize (no crop needed)
    b, c, t = x.shape[:3]
    y = F.interpolate(x.movedim(2, 1).reshape(-1, c, *x.shape[-2:]), size=(h, w), mode="bilinear")
    return y.reshape(b, t, c, h, w).movedim(1, 2)


def test_build_concat_follows_comfy_concat_cond():
    """WanImageToVideo's one-channel mask (1 = generate) becomes 1 - mask on 4 channels before the processed image
    latent; a mask shorter than the video is padded with zeros; no image gives 20 zero channels."""
    img = torch.randn(1, 16, 3, 2, 3)
    mask = torch.ones(1, 1, 2, 2, 3)
    mask[:, :, 0] = 0.0
    def batch(x, b):
        return x.expand(b, *x.shape[1:])

    out = build_concat((2, 16, 3, 2, 3), img, mask, lambda x: 2 * x + 1, _upscale, batch)
    assert out.shape == (2, 20, 3, 2, 3)
    assert torch.equal(out[:, :4, 0], torch.ones(2, 4, 2, 3))
    assert torch.equal(out[:, :4, 1:], torch.zeros(2, 4, 2, 2, 3))
    assert torch.equal(out[:, 4:], (2 * img + 1).expand(2, -1, -1, -1, -1))
    assert torch.equal(build_concat((1, 16, 3, 2, 3), None, mask, None, None, None), torch.zeros(1, 20, 3, 2, 3))
    with pytest.raises(ValueError, match="concat_latent_image has 2 latent frames but latent_image has 3"):
        build_concat((1, 16, 3, 2, 3), img[:, :, :2], None, lambda x: x, _upscale, lambda x, b: x)


def test_bad_image_conditioning_is_refused_before_sampling():
    cfg = tiny_config("i2v")
    sc = SamplingConfig(sigmas=SIGMAS, sampler="euler", cfg=1.0)
    cond = torch.zeros(1, 4, cfg.text_dim)
    with pytest.raises(ValueError, match=r"image conditioning.*\[1, 20, 4, 4, 6\]"):
        Job(sc, (1, 16, 4, 4, 6), cond, image=ImageConditioning(torch.zeros(1, 20, 5, 4, 6))).validate(cfg)
    with pytest.raises(ValueError, match=r"clip_vision_output.*\[1, 257, 1024\].*1280"):
        Job(sc, (1, 16, 4, 4, 6), cond, image=ImageConditioning(clip=torch.zeros(1, 257, 1024))).validate(cfg)
