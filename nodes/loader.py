"""DualParal Loader: a Wan T2V diffusion model file + devices -> a DUALPARAL_MODEL handle on a live worker group."""

from __future__ import annotations

from dualparal_core.checkpoint import inspect_checkpoint
from dualparal_core.config import DTYPES, ModelSource, PoolSpec, split_layers
from dualparal_core.lora import check_lora
from dualparal_core.model import ATTENTION_BACKENDS

from . import bridge
from .bridge import LorasSocket, ModelSocket, io
from .types import Attach, DualParalModel, file_key, parse_devices


class DualParalLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualParalLoader",
            display_name="DualParal Loader",
            category="DualParal",
            description="Loads a Wan2.1/2.2 text-to-video diffusion model split layer-wise over several GPUs (one "
                        "worker process per GPU) for the DualParal Sampler. The workers stay loaded between "
                        "prompts while keep_alive is on; 'Unload models' stops them.",
            inputs=[
                io.Combo.Input("unet_name", options=bridge.diffusion_model_names(),
                               tooltip="Wan T2V diffusion model from models/diffusion_models (e.g. "
                                       "wan2.1_t2v_1.3B_fp16.safetensors; fp16/bf16/fp32 or fp8 scaled). I2V, "
                                       "VACE, TI2V-5B and GGUF files are refused."),
                io.String.Input("devices", default="auto",
                                tooltip="Where the ranks run: 'auto' (every GPU ComfyUI sees, or cpu:2 without "
                                        "GPUs), a GPU list like '0,1,3', 'cpu:N' (N CPU ranks, for testing), or "
                                        "tcp://HOST:PORT to attach to a torchrun-started group."),
                io.Combo.Input("dtype", options=list(DTYPES), default="bf16",
                               tooltip="Compute dtype of the workers (bf16 recommended on GPUs; fp8 files are "
                                       "dequantised to it)."),
                io.Combo.Input("attention", options=list(ATTENTION_BACKENDS), default="sdpa",
                               tooltip="Attention kernel: 'sdpa' lets PyTorch choose; the others force one "
                                       "scaled_dot_product_attention backend."),
                io.Boolean.Input("keep_alive", default=True,
                                 tooltip="Keep the workers and their weights loaded after the prompt (fast next "
                                         "run). Off: they exit when the sampler finishes."),
                LorasSocket.Input("loras", optional=True,
                                         tooltip="LoRAs from a DualParal LoRA chain; each worker merges them into "
                                                 "its own layers."),
            ],
            outputs=[ModelSocket.Output(display_name="model",
                                               tooltip="Handle on the worker group, for the DualParal Sampler.")],
        )

    @classmethod
    def execute(cls, unet_name: str, devices: str, dtype: str, attention: str, keep_alive: bool,
                loras=None) -> io.NodeOutput:
        path = bridge.full_path("diffusion_models", unet_name)
        try:
            info = inspect_checkpoint(path)
        except ValueError as e:
            raise ValueError(f"unet_name={unet_name!r} cannot be loaded: {e}") from e
        devs = parse_devices(devices, bridge.gpu_count())
        if isinstance(devs, Attach):
            if not bridge.supports_attach():
                raise NotImplementedError(
                    f"devices={devices!r}: attaching to a torchrun-started group is not supported by this version "
                    f"of DualParal yet. Use 'auto', a GPU list like '0,1' or 'cpu:N'.")
            raise NotImplementedError(f"devices={devices!r}: attach is not wired into the Loader yet.")
        try:
            split_layers(info.config.num_layers, len(devs))
        except ValueError as e:
            raise ValueError(f"devices={devices!r}: {e}") from e
        lora_entries, lora_keys = [], []
        for name, strength in loras or ():
            lpath = bridge.full_path("loras", name)
            check_lora(lpath, info.config)  # header only: refuses a LoRA that matches nothing or does not fit
            lora_entries.append((lpath, float(strength), "both"))
            lora_keys.append((file_key(lpath), float(strength)))
        spec = PoolSpec(source=ModelSource(path=path, loras=tuple(lora_entries)), devices=devs, dtype=dtype,
                        attention=attention)
        key = (file_key(path), devs, dtype, attention, tuple(lora_keys))
        handle = DualParalModel(spec=spec, config=info.config, keep_alive=bool(keep_alive), unet_name=unet_name,
                                key=key)
        bridge.acquire(handle)  # start (or reuse) the workers now: load errors show on this node
        return io.NodeOutput(handle)
