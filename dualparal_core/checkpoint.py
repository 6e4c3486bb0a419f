"""Reading the tensors of Wan2.1/2.2 text-to-video ``.safetensors`` files in every layout, one rank's slice at a time.

What the header says (key tables, the model shape, the keep-in-fp32 and fp8 rules) is :mod:`dualparal_core.files`,
re-exported here for the rank side and for callers that name it through this module.
"""

from __future__ import annotations

import os
import time

import torch

from dualparal_core import logger
from dualparal_core.config import WanConfig
from dualparal_core.files.wan import (
    KEEP_FP32,
    PREFIXES,
    REQUIRED_BLOCK,
    REQUIRED_TOP,
    CheckpointInfo,
    diffusers_key,
    expected_shapes,
    file_error,
    fp8_target,
    in_stage,
    info_from_header,
    inspect_checkpoint,
    keeps_fp32,
    original_key,
    plan,
    read_header,
    read_index,
)

__all__ = [
    "KEEP_FP32", "PREFIXES", "REQUIRED_BLOCK", "REQUIRED_TOP", "CheckpointInfo", "diffusers_key", "expected_shapes",
    "fp8_target", "in_stage", "info_from_header", "inspect_checkpoint", "keeps_fp32", "load_stage_weights",
    "original_key", "random_state_dict", "read_header", "save_checkpoint",
]

_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _read_tensor(fh, entry: tuple[tuple[int, ...], str, int, int], base: int, path: str, key: str) -> torch.Tensor:
    """Read one tensor into memory it owns (no file mapping outlives the call; host memory = this tensor)."""
    shape, dtype, start, end = entry
    tdtype = _TORCH_DTYPES[dtype]
    if end - start != tdtype.itemsize * torch.Size(shape).numel():
        raise file_error(path, f"has an inconsistent header: tensor {key!r} {list(shape)} {dtype} spans "
                               f"{end - start} bytes.")
    if end == start:
        return torch.empty(shape, dtype=tdtype)
    buf = bytearray(end - start)
    fh.seek(base + start)
    if fh.readinto(buf) != len(buf):
        raise file_error(path, f"is truncated: tensor {key!r} could not be read in full. Download the file again.")
    return torch.frombuffer(buf, dtype=torch.uint8).view(tdtype).reshape(shape)


def _target_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if keeps_fp32(name) else dtype


def load_stage_weights(path: str, layers: range, *, embed: bool, head: bool, dtype: torch.dtype,
                       device: str | torch.device = "cpu", info: CheckpointInfo | None = None,
                       keep_fp8: bool = False) -> dict[str, torch.Tensor]:
    """Read one rank's slice: diffusers names with absolute block indices, tensor by tensor (host memory ~ the slice).

    Tensors are read with plain positioned reads into memory they own (no mmap of the whole file, whose touched
    pages would count against the process and keep the file mapped while the weights live).

    Returns ``blocks.{i}.*`` for i in ``layers``, always ``condition_embedder.*``, ``patch_embedding.*`` when
    ``embed``, ``proj_out.*`` and the top-level ``scale_shift_table`` when ``head``. fp8 weights are dequantised
    (``weight.float() * scale_weight``); everything is cast to ``dtype`` except diffusers' keep-in-fp32 modules.
    ``keep_fp8``: the blocks' Linear weights stay fp8 instead, with their scale as ``<module>.scale_weight``
    (weights stored in another dtype are quantised per tensor), for :mod:`dualparal_core.fp8`.
    """
    from dualparal_core.fp8 import is_fp8, quantise, scale_key

    path = os.fspath(path)
    index, base = read_index(path)
    plan_info, sources = plan({k: v[:2] for k, v in index.items()}, path)
    if info is not None and (info.config, info.layout, info.quant) != (plan_info.config, plan_info.layout,
                                                                       plan_info.quant):
        raise file_error(path, f"changed since it was inspected (now {plan_info}, was {info}); load the model again.")
    info = plan_info
    n = info.config.num_layers
    if len(layers) == 0 or layers[0] < 0 or layers[-1] >= n:
        raise ValueError(f"Layers {layers} are not a non-empty part of the {n} blocks of '{path}'.")
    wanted = sorted(((name, src) for name, src in sources.items() if in_stage(name, layers, embed, head)),
                    key=lambda item: index[item[1].key][2])  # in file order: sequential reads
    t0, out, nbytes = time.perf_counter(), {}, 0
    with open(path, "rb") as fh:
        for name, src in wanted:
            t = _read_tensor(fh, index[src.key], base, path, src.key).to(device)
            if keep_fp8 and fp8_target(name, t.shape):
                if not is_fp8(t):
                    out[name], out[scale_key(name)] = quantise(t)
                else:
                    out[name] = t
                    if src.scale is not None:
                        out[scale_key(name)] = _read_tensor(fh, index[src.scale], base, path, src.scale).to(
                            device, torch.float32)
                nbytes += t.numel() * out[name].element_size()
                continue
            if src.scale is not None:
                scale = _read_tensor(fh, index[src.scale], base, path, src.scale).to(device, torch.float32)
                try:
                    t = t.to(torch.float32) * scale
                except RuntimeError as e:
                    raise file_error(path, f"has a scale of shape {list(scale.shape)} for {src.key} "
                                           f"{list(t.shape)} that does not broadcast: {e}") from e
            out[name] = t.to(_target_dtype(name, dtype))
            nbytes += out[name].numel() * out[name].element_size()
    logger.info("Read %d tensors (%.1f MB) of blocks %d..%d%s%s from %s (%s, %s) in %.2f s", len(out), nbytes / 2**20,
                layers[0], layers[-1], " +embed" if embed else "", " +head" if head else "", os.path.basename(path),
                info.layout, info.quant if info.quant != "none" else info.dtype, time.perf_counter() - t0)
    return out


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str, layout: str,
                    dtype: torch.dtype | None = None) -> None:
    """Write a full diffusers-format state dict in one of the layouts users have (tests and benchmarks).

    ``layout``: "diffusers", "original", "comfy" (original + ``model.diffusion_model.``), "comfy_bare"
    (original + ``diffusion_model.``), "fp8_scaled" (comfy, e4m3fn block Linear weights with float32
    ``scale_weight`` = amax/448 and a ``scaled_fp8`` marker) or "fp8" (comfy, plain e4m3fn cast).
    ``dtype`` casts the floating tensors first (the non-fp8 ones for the fp8 layouts).
    """
    from safetensors.torch import save_file

    prefixes = {"diffusers": "", "original": "", "comfy": PREFIXES[0], "comfy_bare": PREFIXES[1],
                "fp8_scaled": PREFIXES[0], "fp8": PREFIXES[0]}
    if layout not in prefixes:
        raise ValueError(f"layout={layout!r} is not one of {list(prefixes)}.")
    prefix, out = prefixes[layout], {}
    for name, t in state_dict.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        key = name if layout == "diffusers" else original_key(name)
        if key is None:
            raise ValueError(f"State dict key {name!r} is not a Wan T2V transformer weight.")
        key = prefix + key
        if layout.startswith("fp8") and fp8_target(name, t.shape):
            w = t.to(torch.float32)
            if layout == "fp8_scaled":
                scale = (w.abs().max() / 448.0).clamp_min(1e-12)
                out[key[:-6] + "scale_weight"] = scale.reshape(())
                w = w / scale
            t = w.to(torch.float8_e4m3fn)
        out[key] = t.contiguous().clone()
    if layout == "fp8_scaled":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(out, os.fspath(path), metadata={"format": "pt"})


def random_state_dict(config: WanConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full diffusers-format float32 state dict of small random weights, none of them zero or exactly one.

    The model is built on the meta device only for its key names and shapes; the values come from a CPU
    generator seeded with ``seed`` (weights and biases ~ N(0, 0.02), norm weights ~ 1 + N(0, 0.05)).
    """
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**config.diffusers_kwargs())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        x = torch.randn(p.shape, generator=g, dtype=torch.float32)
        is_norm = any(c.startswith("norm") for c in name.split(".")[:-1]) and name.endswith(".weight")
        out[name] = 1.0 + 0.05 * x if is_norm else 0.02 * x
    return out
