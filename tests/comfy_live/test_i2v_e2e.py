"""Image-to-video in a real ComfyUI server, through ComfyUI's own conditioning nodes: LoadImage ->
WanImageToVideo / WanFirstLastFrameToVideo -> DualParal Sampler gives the LATENT of ComfyUI's KSampler on the same
graph (one block, no context, independent noise) for Wan2.1 I2V with and without a clip_vision_output, FLF2V, and
Wan2.2 I2V A14B's layout (no img_emb); the A14B pair of experts gives the LATENT of ComfyUI's two-KSamplerAdvanced
chain split where sigma crosses Wan2.2 I2V's boundary 0.9 (the Loader's default for 36-channel files); a multi-block first-last-frame run works; a T2V model ignores image
conditioning with a warning, as ComfyUI's KSampler ignores it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from comfy_harness import (
    COMFY,
    FOREIGN_TOL,
    SKIP_REASON,
    VAE,
    ComfyServer,
    build_assets,
    error_of,
    tiny_config,
)

pytestmark = [pytest.mark.comfy_live, pytest.mark.skipif(not COMFY, reason=SKIP_REASON)]
MODELS = {"i2v": "wan2.1_i2v_480p_14B_fp8_scaled.safetensors", "flf2v": "wan2.1_flf2v_720p_14B_fp16.safetensors",
          "i2v_concat": "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"}
LOW = "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"  # (fp16 weights under the shipped names, for exact parity)
LORAS = ("wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
         "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors")
T2V = "wan2.1_t2v_1.3B_fp16.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from comfy_harness import _tiny_lora
    from PIL import Image
    from safetensors.torch import save_file

    from dualparal_core.checkpoint import random_state_dict, save_checkpoint

    base = tmp_path_factory.mktemp("comfy_i2v")
    yaml = build_assets(base)
    image = {"i2v": {"in_channels": 36, "image_dim": 1280}, "i2v_concat": {"in_channels": 36},
             "flf2v": {"in_channels": 36, "image_dim": 1280, "image_pos_len": 514}}
    for i, (variant, name) in enumerate([*MODELS.items(), ("i2v_concat", LOW)]):
        cfg = replace(tiny_config(), **image[variant])
        save_checkpoint(random_state_dict(cfg, seed=20 + i), base / "models" / "diffusion_models" / name, "comfy",
                        dtype=torch.float16)
    for i, name in enumerate(LORAS):
        save_file(_tiny_lora(tiny_config(), seed=30 + i), base / "models" / "loras" / name)
    g = torch.Generator().manual_seed(0)
    for name in ("start", "end", "example"):
        px = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()  # resized+cropped to 32x32
        Image.fromarray(px).save(base / "input" / f"{name}.png")
    srv = ComfyServer(base, yaml).start()
    yield srv
    srv.stop()


def _saved(server: ComfyServer, history: dict, node: str) -> torch.Tensor:
    from safetensors.torch import load_file

    item = history["outputs"][node]["latents"][0]
    return load_file(server.base / "out" / item["subfolder"] / item["filename"])["latent_tensor"]


def _common() -> dict:
    return {
        "3": {"class_type": "DualParalTestConditioning", "inputs": {"seed": 1, "tokens": 512, "width": 4096,
                                                                     "extra": "none"}},
        "4": {"class_type": "DualParalTestConditioning", "inputs": {"seed": 2, "tokens": 512, "width": 4096,
                                                                     "extra": "none"}},
        "15": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "20": {"class_type": "LoadImage", "inputs": {"image": "start.png"}},
        "21": {"class_type": "LoadImage", "inputs": {"image": "end.png"}},
        "22": {"class_type": "DualParalTestClipVision", "inputs": {"seed": 5}},
        "23": {"class_type": "DualParalTestClipVision", "inputs": {"seed": 6}},
    }


def _i2v(node: str, length: int, clip: bool, image: bool = True) -> dict:
    inputs = {"positive": ["3", 0], "negative": ["4", 0], "vae": ["15", 0], "width": 32, "height": 32,
              "length": length, "batch_size": 1}
    if image:
        inputs["start_image"] = ["20", 0]
    if clip:
        inputs["clip_vision_output"] = ["22", 0]
    return {node: {"class_type": "WanImageToVideo", "inputs": inputs}}


def _flf(node: str, length: int) -> dict:
    return {node: {"class_type": "WanFirstLastFrameToVideo", "inputs": {
        "positive": ["3", 0], "negative": ["4", 0], "vae": ["15", 0], "width": 32, "height": 32, "length": length,
        "batch_size": 1, "start_image": ["20", 0], "end_image": ["21", 0], "clip_vision_start_image": ["22", 0],
        "clip_vision_end_image": ["23", 0]}}}


def _pair(tag: str, model: str, cond: str, **dp) -> dict:
    """KSampler and DualParal Sampler on the conditioning node ``cond`` (its positive, negative and latent)."""
    ks = {"seed": 42, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
          "positive": [cond, 0], "negative": [cond, 1], "latent_image": [cond, 2]}
    sampler = {**ks, "shift": 8.0, "num_per_block": 8, "num_cat": 0, "noise_mode": "independent", **dp}
    return {
        f"{tag}u": {"class_type": "UNETLoader", "inputs": {"unet_name": model, "weight_dtype": "default"}},
        f"{tag}m": {"class_type": "ModelSamplingSD3", "inputs": {"model": [f"{tag}u", 0], "shift": 8.0}},
        f"{tag}k": {"class_type": "KSampler", "inputs": {"model": [f"{tag}m", 0], **ks}},
        f"{tag}K": {"class_type": "SaveLatent", "inputs": {"samples": [f"{tag}k", 0], "filename_prefix": f"i2v/{tag}k"}},
        f"{tag}l": {"class_type": "DualParalLoader", "inputs": {"unet_name": model, "devices": "cpu:2",
                                                                 "dtype": "fp32", "attention": "sdpa",
                                                                 "keep_alive": True}},
        f"{tag}d": {"class_type": "DualParalSampler", "inputs": {"model": [f"{tag}l", 0], **sampler}},
        f"{tag}D": {"class_type": "SaveLatent", "inputs": {"samples": [f"{tag}d", 0], "filename_prefix": f"i2v/{tag}d"}},
    }


@pytest.mark.parametrize("variant", ["i2v", "flf2v", "i2v_concat"])
def test_one_block_matches_ksampler_on_comfys_own_i2v_conditioning(server, variant):
    g = _common()
    if variant == "flf2v":  # both images and both CLIP-vision outputs (514 tokens with emb_pos)
        g.update(_flf("30", 9))
        g.update(_pair("a", MODELS[variant], "30"))
    else:  # with a clip_vision_output, and without one (Wan2.1 I2V then reads text tokens as image tokens)
        g.update(_i2v("30", 9, clip=True))
        g.update(_i2v("31", 9, clip=False))
        g.update(_pair("a", MODELS[variant], "30"))
        g.update(_pair("b", MODELS[variant], "31"))
        g.update(_i2v("32", 9, clip=True, image=False))  # no start image: ComfyUI zero-fills, so do we
        g.update(_pair("c", MODELS[variant], "32"))
        for tag in "bc":  # one Loader, one worker group
            del g[f"{tag}l"]
            g[f"{tag}d"]["inputs"]["model"] = ["al", 0]
    h = server.run(g, timeout=400)
    assert h["status"]["status_str"] == "success", error_of(h)
    for tag in ("a", "b", "c") if variant != "flf2v" else ("a",):
        ks, dp = _saved(server, h, f"{tag}K"), _saved(server, h, f"{tag}D")
        assert dp.shape == ks.shape == (1, 16, 3, 4, 4)
        torch.testing.assert_close(dp, ks, rtol=FOREIGN_TOL, atol=FOREIGN_TOL)
    if variant != "flf2v":  # the conditioning is live: the start image moves the result far beyond the tolerance
        a, b, c = (_saved(server, h, f"{t}D") for t in "abc")
        assert (a - c).abs().max() > 100 * FOREIGN_TOL
        if variant == "i2v":  # and so does the CLIP-vision output
            assert (a - b).abs().max() > 100 * FOREIGN_TOL
        else:  # a model without img_emb ignores it, as ComfyUI does
            assert torch.equal(a, b)
    assert "got no start image" in server.log_tail(200000) or variant == "flf2v"


def test_two_i2v_experts_equal_two_ksampler_advanced_split_at_the_boundary(server):
    """Wan2.2 I2V A14B as users chain it in ComfyUI: WanImageToVideo's conditioning into a high-noise
    KSamplerAdvanced (cfg 3.5, steps 0..2) and a low-noise one (the lightx2v LoRA, cfg 1, steps 2..end). Shift 8,
    simple, 4 steps: sigmas 1.0, 0.96, 0.889, 0.727, so the I2V boundary 0.9 splits after step 2, where T2V's
    0.875 would not: the Loader's default boundary (-1: the model's own) must be I2V's. The DualParal Sampler with
    both files, a LoRA on the low-noise expert and cfg_low 1 gives ComfyUI's LATENT; at boundary 0.875 (step 2 on
    the high-noise expert) it does not."""
    g = _common()
    g.update(_i2v("30", 9, clip=False))
    adv = {"noise_seed": 42, "steps": 4, "sampler_name": "euler", "scheduler": "simple", "positive": ["30", 0],
           "negative": ["30", 1]}
    loader = {"unet_name": MODELS["i2v_concat"], "low_noise_unet_name": LOW, "devices": "cpu:2", "dtype": "fp32",
              "attention": "sdpa", "keep_alive": True, "loras": ["40", 0]}
    sampler = {"positive": ["30", 0], "negative": ["30", 1], "latent_image": ["30", 2], "seed": 42, "steps": 4,
               "cfg": 3.5, "cfg_low": 1.0, "sampler_name": "euler", "scheduler": "simple", "shift": 8.0,
               "denoise": 1.0, "num_per_block": 8, "num_cat": 0, "noise_mode": "independent"}
    g.update({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODELS["i2v_concat"], "weight_dtype": "default"}},
        "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 8.0}},
        "11": {"class_type": "UNETLoader", "inputs": {"unet_name": LOW, "weight_dtype": "default"}},
        "12": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["11", 0], "lora_name": LORAS[1],
                                                               "strength_model": 1.0}},
        "13": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["12", 0], "shift": 8.0}},
        "6": {"class_type": "KSamplerAdvanced", "inputs": {
            **adv, "model": ["2", 0], "add_noise": "enable", "cfg": 3.5, "latent_image": ["30", 2],
            "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}},
        "7": {"class_type": "KSamplerAdvanced", "inputs": {
            **adv, "model": ["13", 0], "add_noise": "disable", "cfg": 1.0, "latent_image": ["6", 0],
            "start_at_step": 2, "end_at_step": 10000, "return_with_leftover_noise": "disable"}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "i2v/ks_a14b"}},
        "40": {"class_type": "DualParalLoRA", "inputs": {"lora_name": LORAS[1], "strength": 1.0, "expert": "low"}},
        "41": {"class_type": "DualParalLoader", "inputs": loader},
        "42": {"class_type": "DualParalSampler", "inputs": {"model": ["41", 0], **sampler}},
        "43": {"class_type": "SaveLatent", "inputs": {"samples": ["42", 0], "filename_prefix": "i2v/dp_a14b"}},
        "44": {"class_type": "DualParalLoader", "inputs": {**loader, "boundary": 0.875}},
        "45": {"class_type": "DualParalSampler", "inputs": {"model": ["44", 0], **sampler}},
        "46": {"class_type": "SaveLatent", "inputs": {"samples": ["45", 0], "filename_prefix": "i2v/dp_t2v_b"}},
    })
    h = server.run(g, timeout=400)
    ks, dp, t2v_boundary = _saved(server, h, "14"), _saved(server, h, "43"), _saved(server, h, "46")
    assert dp.shape == ks.shape == (1, 16, 3, 4, 4)
    torch.testing.assert_close(dp, ks, rtol=FOREIGN_TOL, atol=FOREIGN_TOL)  # measured 1e-6 (values up to ~9)
    assert (t2v_boundary - ks).abs().max() > 100 * FOREIGN_TOL


def test_multi_block_first_last_frame_runs(server):
    g = _common()
    g.update(_flf("30", 33))  # 9 latent frames: blocks of 3, 2, 2, 2 with P = 2, K = 1
    g["40"] = {"class_type": "DualParalLoader", "inputs": {"unet_name": MODELS["flf2v"], "devices": "cpu:2",
                                                           "dtype": "fp32", "attention": "sdpa", "keep_alive": True}}
    g["41"] = {"class_type": "DualParalSampler", "inputs": {
        "model": ["40", 0], "positive": ["30", 0], "negative": ["30", 1], "latent_image": ["30", 2], "seed": 3,
        "steps": 3, "cfg": 4.0, "sampler_name": "uni_pc", "scheduler": "simple", "shift": 5.0, "denoise": 1.0,
        "num_per_block": 2, "num_cat": 1, "noise_mode": "coordinated"}}
    g["42"] = {"class_type": "SaveLatent", "inputs": {"samples": ["41", 0], "filename_prefix": "i2v/flf_long"}}
    h = server.run(g, timeout=400)
    assert h["status"]["status_str"] == "success", error_of(h)
    out = _saved(server, h, "42")
    assert out.shape == (1, 16, 9, 4, 4) and torch.isfinite(out).all()


def test_a_t2v_model_ignores_image_conditioning_with_a_warning(server):
    g = _common()
    g.update(_i2v("30", 9, clip=True))
    g.update(_pair("a", T2V, "30"))
    h = server.run(g, timeout=400)
    assert h["status"]["status_str"] == "success", error_of(h)
    torch.testing.assert_close(_saved(server, h, "aD"), _saved(server, h, "aK"), rtol=FOREIGN_TOL, atol=FOREIGN_TOL)
    assert "the model is text-to-video, so the image conditioning" in server.log_tail(200000)


def _tinify(api: dict) -> dict:
    """A shipped I2V workflow at test size: test_e2e's tinify, the image nodes at 32x32 and 21 frames, and the
    CLIP-vision encoder (full size only in ComfyUI) replaced by the test node."""
    from test_e2e import tinify

    g = tinify(api)
    for nid, node in list(g.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CLIPVisionLoader":
            del g[nid]
        elif ct == "CLIPVisionEncode":
            g[nid] = {"class_type": "DualParalTestClipVision", "inputs": {"seed": int(nid)}}
        elif ct in ("WanImageToVideo", "WanFirstLastFrameToVideo"):
            inp.update(width=32, height=32, length=21)
    return g


@pytest.mark.parametrize("name", ["wan21_i2v_14B_long_video", "wan22_i2v_A14B_lightx2v",
                                  "wan21_flf2v_14B_first_last_frame"])
def test_shipped_i2v_workflow_runs(server, name):
    import json

    from comfy_harness import ROOT

    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    h = server.run(_tinify(api), timeout=400)
    assert h["status"]["status_str"] == "success", error_of(h)
    saves = [nid for nid, n in api.items() if n["class_type"] == "SaveVideo"]
    assert saves
    for nid in saves:
        item = h["outputs"][nid]["images"][0]
        path = server.base / "out" / item["subfolder"] / item["filename"]
        assert path.suffix == ".mp4" and path.stat().st_size > 0
