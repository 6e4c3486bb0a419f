"""ComfyUI values <-> engine values, with the checks that name the input and the fix: the DUALPARAL_MODEL handle,
the `devices` input, CONDITIONING and LATENT. Pure: imports the engine, never ComfyUI (unit-tested without it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from dualparal_core import config
from dualparal_core.config import PoolSpec, WanConfig

#: Socket type names (stable: shared workflows refer to them).
MODEL_TYPE = "DUALPARAL_MODEL"
LORAS_TYPE = "DUALPARAL_LORAS"


@dataclass(frozen=True)
class DualParalModel:
    """The DUALPARAL_MODEL value: what a worker group runs. The live pool sits in the bridge's registry under
    ``key``; a handle whose pool was released (keep_alive off, "Unload models") restarts it on the next sample."""

    spec: PoolSpec
    """Model file, LoRAs, devices, dtype, attention: everything the workers are started with."""
    config: WanConfig
    """The model's shape (from the checkpoint header)."""
    keep_alive: bool = True
    """Keep the workers (and the weights on the GPUs) between prompts."""
    unet_name: str = ""
    """The file name as picked in the Loader (for messages)."""
    key: tuple = field(default=(), compare=False)
    """Registry key: same key, same live pool."""
    experts: int = 1
    """2 for a Wan2.2 A14B pair (high-noise + low-noise expert)."""


@dataclass(frozen=True)
class Attach:
    """`devices` named a torchrun-started group to attach to."""

    address: str


def parse_devices(text: str, gpu_count: int) -> tuple[str, ...] | Attach:
    """The Loader's `devices` string -> one torch device per rank, or an :class:`Attach` request.

    The grammar is :func:`dualparal_core.config.parse_devices` (``auto``, ``0,1,3``, ``cuda:0,cuda:1``, ``cpu:N``,
    ``tcp://HOST:PORT``); GPUs are numbered as this ComfyUI process sees them (``gpu_count``).
    """
    devices = config.parse_devices(text, gpu_count)
    if devices[0].startswith("tcp://"):
        return Attach(devices[0])
    config.check_visible(devices, gpu_count, shown=repr(text), seen_by="this ComfyUI process sees",
                         cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
    return devices


def missing_gpus(devices: tuple[str, ...], gpu_count: int) -> list[str]:
    """Devices of a loaded model that this process no longer sees (a GPU gone since loading)."""
    return [d for d in devices if d.startswith("cuda") and int(d.split(":")[1]) >= gpu_count]


# ---------------------------------------------------------------------------------------------- CONDITIONING
#: Image-to-video keys, read by nodes/image.py (WanImageToVideo, WanFirstLastFrameToVideo, CLIP Vision Encode).
_IMAGE = ("concat_latent_image", "concat_mask", "clip_vision_output")
#: Keys whose value (or None) changes nothing, so they may be present.
_NEUTRAL = {"pooled_output": None, "start_percent": 0.0, "end_percent": 1.0, "strength": 1.0}
#: Keys the engine cannot honour, with what made them and what to do instead.
_REFUSED = {
    "reference_latents": "reference latents (ReferenceLatent / Wan Fun); not supported",
    "vace_frames": "VACE control video (WanVaceToVideo); VACE models are not supported",
    "camera_conditions": "camera control (WanCameraImageToVideo); not supported",
    "area": "area conditioning (ConditioningSetArea); the sampler uses one prompt for the whole video",
    "mask": "masked conditioning (ConditioningSetMask); the sampler uses one prompt for the whole video",
    "control": "a ControlNet (ControlNetApply); not supported",
    "gligen": "GLIGEN boxes; not supported",
    "hooks": "conditioning hooks (e.g. CLIP LoRA hooks); use DualParal LoRA for LoRAs",
}


def extract_conditioning(cond, name: str, text_dim: int) -> torch.Tensor:
    """The [1, L, text_dim] text embedding of a Wan CONDITIONING (``[[tensor, {"pooled_output": None}]]``).

    Refuses what the engine cannot honour (several entries, areas/masks, I2V/VACE/ControlNet keys, a timestep
    range) with a sentence naming the input. Returns a float32 CPU copy (ComfyUI caches the original).
    """
    if not isinstance(cond, (list, tuple)) or not cond:
        raise ValueError(f"{name} is not a CONDITIONING (got {type(cond).__name__}); connect a CLIP Text Encode.")
    if len(cond) > 1:
        raise ValueError(f"{name} holds {len(cond)} conditionings (from Conditioning Combine/Concat or area "
                         f"nodes); DualParal Sampler uses one prompt for the whole video unless each is tagged "
                         f"with DualParal Prompt At (a prompt timeline). Connect a single CLIP Text Encode "
                         f"(Conditioning Concat of the texts' embeddings works too), or tag each prompt.")
    entry = cond[0]
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], torch.Tensor):
        raise ValueError(f"{name} is not a CONDITIONING entry [tensor, dict]; connect a CLIP Text Encode.")
    tensor, extras = entry[0], entry[1] or {}
    for key, value in extras.items():
        if value is None or key in _IMAGE or (key in _NEUTRAL and value == _NEUTRAL[key]):
            continue
        if key in ("start_percent", "end_percent"):
            raise ValueError(f"{name} has a timestep range ({key}={value}, from ConditioningSetTimestepRange); "
                             f"DualParal Sampler applies the prompt at every step. Remove that node.")
        if key == "strength":
            raise ValueError(f"{name} has strength={value}; DualParal Sampler applies conditioning at strength 1. "
                             f"Remove the node that set it.")
        why = _REFUSED.get(key, "a conditioning option DualParal Sampler cannot honour")
        raise ValueError(f"{name} carries {key!r}: {why}. Connect the CLIP Text Encode output directly.")
    if tensor.ndim != 3 or tensor.shape[0] != 1 or tensor.shape[-1] != text_dim:
        raise ValueError(f"{name} has an embedding of shape {list(tensor.shape)}; this model expects "
                         f"[1, tokens, {text_dim}] (umt5-xxl, loaded with Load CLIP type 'wan'). Use the Wan text "
                         f"encoder (umt5_xxl_*.safetensors).")
    return tensor.detach().to("cpu", torch.float32).clone()


# ---------------------------------------------------------------------------------------------- LATENT
def check_latent_dict(latent) -> torch.Tensor:
    """The LATENT's samples after refusing what the sampler cannot do; raises ValueError naming latent_image."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise ValueError("latent_image is not a LATENT; connect Empty Hunyuan Latent Video (or another latent).")
    if latent.get("noise_mask") is not None:
        raise ValueError("latent_image has a noise_mask (from Set Latent Noise Mask, inpainting, or a Wan2.2 "
                         "TI2V/image latent): DualParal Sampler cannot do masked sampling. Connect an unmasked "
                         "latent such as Empty Hunyuan Latent Video.")
    return latent["samples"]


def check_latent_shape(samples: torch.Tensor, config: WanConfig) -> None:
    """Shape checks against the model, before any GPU work."""
    if samples.ndim != 5:
        raise ValueError(f"latent_image has shape {list(samples.shape)}; a Wan video latent is 5-D "
                         f"[batch, {config.out_channels}, frames, height/8, width/8] (Empty Hunyuan Latent Video).")
    b, c, t, h, w = samples.shape
    if c != config.out_channels:
        hint = (" (a Wan2.2 TI2V-5B / Wan2.2-VAE latent)" if c == 48 else "")
        raise ValueError(f"latent_image has {c} channels{hint} but the model takes {config.out_channels}: use the "
                         f"Wan2.1 VAE's latent (Empty Hunyuan Latent Video gives 16 channels).")
    ph, pw = config.patch_size[1:]
    if h % ph or w % pw:
        raise ValueError(f"latent_image is {w * 8}x{h * 8} pixels ({w}x{h} latent); width and height must be "
                         f"multiples of {8 * max(ph, pw)} (e.g. 832x480).")
    if min(b, t) < 1:
        raise ValueError(f"latent_image shape {list(samples.shape)} is empty.")


def is_empty_latent(samples: torch.Tensor) -> bool:
    """ComfyUI does not shift an all-zero latent into model space (``CFGGuider.inner_sample``)."""
    return torch.count_nonzero(samples) == 0


def to_model_space(samples: torch.Tensor, latent_format) -> torch.Tensor | None:
    """Raw VAE latent -> the engine's normalised space with ``latent_format.process_in``; None for an all-zero
    latent (pure noise), exactly when KSampler skips ``process_latent_in``."""
    if is_empty_latent(samples):
        return None
    return latent_format.process_in(samples.detach().to("cpu", torch.float32)).contiguous()


def from_model_space(x: torch.Tensor, latent_format) -> torch.Tensor:
    """The engine's normalised result -> raw VAE space (``process_out``), float32 CPU, as KSampler returns it."""
    return latent_format.process_out(x.to("cpu", torch.float32)).contiguous()


def output_latent(latent: dict, samples: torch.Tensor) -> dict:
    """KSampler's return value: a copy of the input LATENT dict with new samples."""
    out = latent.copy()
    out["samples"] = samples
    return out


# ---------------------------------------------------------------------------------------------- LoRAs
def chain_loras(previous, name: str, strength: float, expert: str = "both") -> tuple[tuple[str, float, str], ...]:
    """The DUALPARAL_LORAS value: the previous chain plus this (file name, strength, expert)."""
    from dualparal_core.config import LORA_EXPERTS

    prev = tuple(previous or ())
    for item in prev:
        if not (isinstance(item, tuple) and len(item) in (2, 3)):
            raise ValueError("previous is not a DUALPARAL_LORAS chain; connect another DualParal LoRA node.")
    if expert not in LORA_EXPERTS:
        raise ValueError(f"expert={expert!r} is not one of {list(LORA_EXPERTS)}.")
    return prev + ((str(name), float(strength), str(expert)),)


def file_key(path: str) -> tuple:
    """Identity of a file for the pool registry: a replaced file (new size or mtime) means a reload."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)
