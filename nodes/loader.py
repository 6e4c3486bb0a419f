"""DualParal Loader: a Wan T2V/I2V diffusion model file + devices -> a DUALPARAL_MODEL handle on a live worker group."""

from __future__ import annotations

from dualparal_core.attach import AttachSpec
from dualparal_core.config import (
    ATTENTION_BACKENDS,
    DTYPES,
    KV_CACHE_MODES,
    WEIGHT_MODES,
    ModelSource,
    PoolSpec,
    split_layers,
)
from dualparal_core.experts import default_boundary
from dualparal_core.files import check_lora, check_source, inspect_checkpoint

from . import bridge
from .bridge import LorasSocket, ModelSocket, io
from .graph_watch import LOADER_NODE
from .types import Attach, DualParalModel, file_key, parse_devices

WEIGHTS_TOOLTIP = ("dequant: weights held in dtype (fp8 files dequantised at load). fp8: the transformer blocks' "
                   "weights stay fp8 on the GPUs and are dequantised layer by layer (about half the memory of bf16; "
                   "two A14B experts on 24 GB cards).")
KV_CACHE_TOOLTIP = ("exact: the context K/V each block keeps for its neighbour stay on the GPU in dtype. offload: "
                    "the same values in the computer's RAM (pinned), a few layers of them on the GPU at a time: the "
                    "largest item of memory nearly gone (1.3B at 480x832: 4.3 GiB per GPU, 14B: 19 GiB on one GPU), "
                    "RAM used instead (the cache rounded up per block: 7.5 GiB for 1.3B at 480x832), the same video. fp8: kept in fp8 with a scale per token, half the "
                    "memory (1.3B: 4.3 -> 2.1 GiB, 14B: 19 -> 9.6 GiB on one GPU); the context frames' keys and "
                    "values are rounded (less exact).")


class DualParalLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=LOADER_NODE,  # "DualParalLoader": shared workflows name it
            display_name="DualParal Loader",
            category="DualParal",
            description="Loads a Wan2.1/2.2 text- or image-to-video diffusion model split layer-wise over several GPUs (one "
                        "worker process per GPU) for the DualParal Sampler. The workers stay loaded between "
                        "prompts while keep_alive is on; 'Unload models' stops them.",
            inputs=[
                io.Combo.Input("unet_name", options=bridge.diffusion_model_names(),
                               tooltip="Wan T2V or I2V diffusion model from models/diffusion_models (e.g. "
                                       "wan2.1_t2v_1.3B_fp16.safetensors, wan2.1_i2v_480p_14B_fp8_scaled"
                                       ".safetensors; fp16/bf16/fp32 or fp8 scaled). VACE, camera, TI2V-5B and "
                                       "GGUF files are refused."),
                io.String.Input("devices", default="auto",
                                tooltip="Where the ranks run: 'auto' (every GPU ComfyUI sees, or cpu:2 without "
                                        "GPUs), a GPU list like '0,1,3', 'cpu:N' (N CPU ranks, for testing), or "
                                        "tcp://HOST:PORT to attach to a torchrun-started group."),
                io.Combo.Input("dtype", options=list(DTYPES), default="bf16",
                               tooltip="Compute dtype of the workers (bf16 recommended on GPUs; fp8 files are "
                                       "dequantised to it)."),
                io.Combo.Input("attention", options=list(ATTENTION_BACKENDS), default="auto",
                               tooltip="Attention kernel: 'auto' takes FlashAttention-3 on H100/H200 in bf16 "
                                       "when the fa3-fwd package is installed (about 20 % faster attention), "
                                       "else PyTorch's SDPA; 'sdpa' lets PyTorch choose; 'fa3' requires "
                                       "FlashAttention-3; the sdpa_* entries force one PyTorch kernel."),
                io.Boolean.Input("keep_alive", default=True,
                                 tooltip="Keep the workers and their weights loaded after the prompt (fast next "
                                         "run). Off: they exit when the sampler finishes."),
                LorasSocket.Input("loras", optional=True,
                                         tooltip="LoRAs from a DualParal LoRA chain; each worker merges them into "
                                                 "its own layers."),
                io.Combo.Input("low_noise_unet_name", options=["none", *bridge.diffusion_model_names()],
                               default="none", optional=True,
                               tooltip="Wan2.2 A14B: the low-noise expert (e.g. wan2.2_t2v_low_noise_14B_fp8_scaled"
                                       ".safetensors); unet_name is then the high-noise one. Every GPU holds its "
                                       "layers of both. 'none': one model."),
                io.Float.Input("boundary", default=-1.0, min=-1.0, max=1.0, step=0.005, round=0.001, optional=True,
                               tooltip="With a low-noise expert: a block-step uses the high-noise expert while its "
                                       "sigma >= boundary, the low-noise one after. -1: the model's own, as Wan2.2 "
                                       "ships it (T2V A14B 0.875, I2V A14B 0.900, detected from the file)."),
                io.Combo.Input("weights", options=list(WEIGHT_MODES), default="dequant", optional=True,
                               tooltip=WEIGHTS_TOOLTIP),
                io.Combo.Input("kv_cache", options=list(KV_CACHE_MODES), default="exact", optional=True,
                               tooltip=KV_CACHE_TOOLTIP),
            ],
            outputs=[ModelSocket.Output(display_name="model",
                                               tooltip="Handle on the worker group, for the DualParal Sampler.")],
        )

    @classmethod
    def execute(cls, unet_name: str, devices: str, dtype: str, attention: str, keep_alive: bool,
                loras=None, low_noise_unet_name: str = "none", boundary: float = -1.0,
                weights: str = "dequant", kv_cache: str = "exact") -> io.NodeOutput:
        path = bridge.full_path("diffusion_models", unet_name)
        try:
            info = inspect_checkpoint(path)
        except ValueError as e:
            raise ValueError(f"unet_name={unet_name!r} cannot be loaded: {e}") from e
        devs = parse_devices(devices, bridge.gpu_count())
        attach = devs if isinstance(devs, Attach) else None
        if attach is not None:  # a torchrun-started group: its ranks and layer split are its own
            devs = ("cpu",)
        try:
            split_layers(info.config.num_layers, len(devs))
        except ValueError as e:
            raise ValueError(f"devices={devices!r}: {e}") from e
        low = _low_noise(path, low_noise_unet_name)
        boundary = float(boundary) if boundary is not None and boundary >= 0 else default_boundary(info.config)
        lora_entries, lora_keys = [], []
        for name, strength, *expert in loras or ():
            lpath = bridge.full_path("loras", name)
            check_lora(lpath, info.config)  # header only: refuses a LoRA that matches nothing or does not fit
            expert = expert[0] if expert else "both"
            if expert == "low" and low is None:
                raise ValueError(f"loras: {name!r} is meant for the low-noise expert (expert 'low'), but "
                                 f"low_noise_unet_name is 'none'. Pick the low-noise model, or set the LoRA's "
                                 f"expert to 'both'.")
            lora_entries.append((lpath, float(strength), expert))
            lora_keys.append((file_key(lpath), float(strength), expert))
        src = ModelSource(path=path, low_noise_path=low, boundary=boundary if low else 0.875,
                          loras=tuple(lora_entries))
        spec = PoolSpec(source=src, devices=devs, dtype=dtype, attention=attention, weights=weights, kv_cache=kv_cache)
        key = (file_key(path), devs, dtype, attention, tuple(lora_keys), weights, kv_cache)
        if low is not None:
            key += (file_key(low), float(boundary))
        if attach is not None:  # the group finds the files on its hosts (by path, else under its --models-dir)
            spec, key = AttachSpec(attach.address, spec), ("attach", attach.address, *key)
        handle = DualParalModel(spec=spec, config=info.config, keep_alive=bool(keep_alive), unet_name=unet_name,
                                key=key, experts=2 if low else 1)
        bridge.acquire(handle)  # start (or reuse) the workers now: load errors show on this node
        return io.NodeOutput(handle)


def _low_noise(high_path: str, name: str | None) -> str | None:
    """The low-noise expert's path, or None; refuses a file of another shape than the high-noise one, naming both."""
    if not name or name == "none":
        return None
    low = bridge.full_path("diffusion_models", name)
    try:
        check_source(ModelSource(path=high_path, low_noise_path=low))
    except ValueError as e:
        raise ValueError(f"low_noise_unet_name={name!r} cannot be loaded: {e}") from e
    return low
