"""Wan2.2 A14B (two experts) in a real ComfyUI server: the Loader's low-noise expert and boundary, the Sampler's
cfg_low and a DualParal LoRA on the low-noise expert give the same LATENT as ComfyUI's own two-KSamplerAdvanced
chain split where sigma crosses the boundary; and the new inputs' errors name them."""

from __future__ import annotations

import time

import pytest
import torch
from comfy_harness import (
    COMFY,
    FOREIGN_TOL,
    LORA,
    MODEL_HIGH,
    MODEL_LOW,
    SKIP_REASON,
    ComfyServer,
    alive,
    build_assets,
    error_of,
)

pytestmark = [pytest.mark.comfy_live, pytest.mark.skipif(not COMFY, reason=SKIP_REASON)]
MODEL_ODD = "wan2.2_t2v_other_shape.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from dualparal_core.checkpoint import random_state_dict, save_checkpoint
    from dualparal_core.config import WanConfig

    base = tmp_path_factory.mktemp("comfy_experts")
    yaml = build_assets(base)
    odd = WanConfig(dim=128, ffn_dim=256, num_layers=3, num_heads=1, text_dim=4096, freq_dim=256)
    save_checkpoint(random_state_dict(odd, seed=9), base / "models" / "diffusion_models" / MODEL_ODD, "comfy",
                    dtype=torch.float16)
    srv = ComfyServer(base, yaml).start()
    yield srv
    srv.stop()


def _cond(seed: int) -> dict:
    return {"class_type": "DualParalTestConditioning",
            "inputs": {"seed": seed, "tokens": 512, "width": 4096, "extra": "none"}}


def _graph(**loader_kw) -> dict:
    loader = {"unet_name": MODEL_HIGH, "devices": "cpu:2", "dtype": "fp32", "attention": "sdpa", "keep_alive": True,
              "low_noise_unet_name": MODEL_LOW, "boundary": 0.9, **loader_kw}
    return {
        "3": _cond(1), "4": _cond(2),
        "5": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": 32, "height": 32, "length": 9, "batch_size": 1}},
        "8": {"class_type": "DualParalLoader", "inputs": loader},
        "9": {"class_type": "DualParalSampler", "inputs": {
            "model": ["8", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": 42,
            "steps": 4, "cfg": 5.0, "cfg_low": 1.0, "sampler_name": "euler", "scheduler": "simple", "shift": 8.0,
            "denoise": 1.0, "num_per_block": 8, "num_cat": 0, "noise_mode": "independent"}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "latents/dp_a14b"}},
    }


def _saved(server: ComfyServer, history: dict, node: str) -> torch.Tensor:
    from safetensors.torch import load_file

    item = history["outputs"][node]["latents"][0]
    return load_file(server.base / "out" / item["subfolder"] / item["filename"])["latent_tensor"]


def test_new_inputs_are_optional_widgets(server):
    info = server.get("/object_info")
    assert info["DualParalLoader"]["input_order"]["optional"] == ["loras", "low_noise_unet_name", "boundary",
                                                                  "weights", "kv_cache"]
    assert info["DualParalLoader"]["input"]["optional"]["weights"][1]["options"] == ["dequant", "fp8"]
    assert info["DualParalLoader"]["input"]["optional"]["kv_cache"][1]["options"] == ["exact", "offload", "fp8"]
    low = info["DualParalLoader"]["input"]["optional"]["low_noise_unet_name"]
    assert low[1]["options"][0] == "none" and MODEL_LOW in low[1]["options"] and low[1]["default"] == "none"
    assert info["DualParalLoader"]["input"]["optional"]["boundary"][1]["default"] == -1.0  # the model's own
    assert info["DualParalSampler"]["input_order"]["optional"] == ["sigmas", "cfg_low", "transition"]
    assert info["DualParalSampler"]["input"]["optional"]["cfg_low"][1]["default"] == -1.0
    assert info["DualParalLoRA"]["input_order"]["optional"] == ["previous", "expert"]
    assert info["DualParalLoRA"]["input"]["optional"]["expert"][1]["options"] == ["both", "high", "low"]


def test_two_experts_equal_two_ksampler_advanced_split_at_the_boundary(server):
    """Shift 8, simple, 4 steps: sigmas 1.0, 0.96, 0.89, 0.73 -> boundary 0.9 splits after step 2. The high-noise
    expert runs at cfg 5, the low-noise one (with a LoRA, only there) at cfg_low 1."""
    g = _graph()
    g.update({
        "20": {"class_type": "DualParalLoRA", "inputs": {"lora_name": LORA, "strength": 0.8, "expert": "low"}},
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_HIGH, "weight_dtype": "default"}},
        "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 8.0}},
        "11": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_LOW, "weight_dtype": "default"}},
        "12": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["11", 0], "lora_name": LORA,
                                                               "strength_model": 0.8}},
        "13": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["12", 0], "shift": 8.0}},
        "6": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["2", 0], "add_noise": "enable", "noise_seed": 42, "steps": 4, "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}},
        "7": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["13", 0], "add_noise": "disable", "noise_seed": 42, "steps": 4, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["6", 0], "start_at_step": 2, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "latents/ks_a14b"}},
        # the high-noise expert alone (boundary 0): a different result, so the switch is real
        "21": {"class_type": "DualParalSampler", "inputs": {**g["9"]["inputs"], "model": ["22", 0]}},
        "22": {"class_type": "DualParalLoader", "inputs": {**g["8"]["inputs"], "boundary": 0.0}},
        "23": {"class_type": "SaveLatent", "inputs": {"samples": ["21", 0], "filename_prefix": "latents/dp_high"}},
    })
    g["8"]["inputs"]["loras"] = ["20", 0]
    h = server.run(g, timeout=300)
    ks, dp, high = _saved(server, h, "14"), _saved(server, h, "10"), _saved(server, h, "23")
    assert dp.shape == ks.shape == (1, 16, 3, 4, 4)
    torch.testing.assert_close(dp, ks, rtol=FOREIGN_TOL, atol=FOREIGN_TOL)
    assert (dp - high).abs().max() > 1e-2


@pytest.mark.parametrize("mutate,needles", [
    (lambda g: g["8"]["inputs"].update(low_noise_unet_name=MODEL_ODD),
     ["low_noise_unet_name", "differ in shape", MODEL_HIGH, MODEL_ODD]),
    (lambda g: g.update({"20": {"class_type": "DualParalLoRA",
                                "inputs": {"lora_name": LORA, "strength": 1.0, "expert": "low"}}})
     or g["8"]["inputs"].update(loras=["20", 0], low_noise_unet_name="none"),
     ["loras", LORA, "low_noise_unet_name"]),
], ids=["shape", "low-lora-without-low-model"])
def test_expert_errors_name_the_inputs(server, mutate, needles):
    g = _graph()
    mutate(g)
    h = server.wait(server.queue(g))
    err = error_of(h)
    assert h["status"]["status_str"] == "error" and err["node_type"] == "DualParalLoader", h["status"]
    for needle in needles:
        assert needle in err["exception_message"], err["exception_message"]


def test_no_worker_outlives_the_server(server):
    pids = server.seen_workers | set(server.note_workers())
    assert pids
    server.stop()
    deadline = time.monotonic() + 30
    while alive(pids):
        assert time.monotonic() < deadline, f"workers {alive(pids)} outlived the server"
        time.sleep(0.2)
