"""Header-only reading of model and LoRA files: what ComfyUI's process and the pre-spawn checks may import.

Only safetensors headers are read (no tensor data), and nothing here imports torch, diffusers or the model code,
so that the node layer and :func:`dualparal_core.runtime.check_spec` stay light; the rank side reads tensors with
:mod:`dualparal_core.checkpoint` and :mod:`dualparal_core.lora`, which build on these tables.
"""

from __future__ import annotations

from dualparal_core.files.lora import LoraInfo, Target, check_lora, inspect_lora, lora_plan
from dualparal_core.files.wan import (
    KEEP_FP32,
    PREFIXES,
    REQUIRED_BLOCK,
    REQUIRED_TOP,
    CheckpointInfo,
    Source,
    check_source,
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
    "KEEP_FP32", "PREFIXES", "REQUIRED_BLOCK", "REQUIRED_TOP", "CheckpointInfo", "LoraInfo", "Source", "Target",
    "check_lora", "check_source", "diffusers_key", "expected_shapes", "file_error", "fp8_target", "in_stage",
    "info_from_header", "inspect_checkpoint", "inspect_lora", "keeps_fp32", "lora_plan", "original_key", "plan",
    "read_header", "read_index",
]
