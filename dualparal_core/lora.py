"""Wan LoRAs merged into one rank's slice of diffusers-named weights.

Which modules a file changes, in which layout, and whether it fits a model is read from its header by
:mod:`dualparal_core.files.lora` (re-exported here). Merge maths (as ComfyUI's ``weight_adapter/lora.py``):
``W += strength · (up @ down) · alpha / rank`` with rank = down.shape[0] and alpha = rank when the file has none;
``W += strength · diff`` for full differences.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch

from dualparal_core import logger
from dualparal_core.files.lora import LoraInfo, Target, check_lora, inspect_lora, lora_plan

__all__ = ["LoraInfo", "inspect_lora", "check_lora", "merge_loras", "lora_plan"]

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def _owned(module: str, layers: range | None, state_dict: Mapping[str, torch.Tensor]) -> bool:
    m = _BLOCK_RE.match(module)
    if m and layers is not None and int(m.group(1)) not in layers:
        return False
    return any(k in state_dict for k in (module, module + ".weight", module + ".bias"))


def _delta(f, t: Target, shape: torch.Size, device) -> torch.Tensor:
    """``(up @ down) · alpha / rank`` in float32, shaped like the weight (Linear or Conv3d)."""
    down = f.get_tensor(t.down).to(device, torch.float32)
    up = f.get_tensor(t.up).to(device, torch.float32)
    rank = down.shape[0]
    alpha = float(f.get_tensor(t.alpha).float().item()) if t.alpha else float(rank)
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * (alpha / rank)


def _add(state_dict: dict, key: str, delta: torch.Tensor, strength: float) -> None:
    w = state_dict[key]
    if tuple(delta.shape) != tuple(w.shape):
        raise ValueError(f"update of shape {list(delta.shape)} for {key} of shape {list(w.shape)}")
    state_dict[key] = (w.to(torch.float32) + strength * delta.to(w.device, torch.float32)).to(w.dtype)


def merge_loras(state_dict: dict[str, torch.Tensor], loras: Sequence[tuple], layers: range | None = None,
                ) -> dict[str, torch.Tensor]:
    """Merge LoRAs into one rank's slice, in place, and return it.

    Args:
        state_dict: diffusers-named weights with absolute block indices (what ``load_stage_weights`` returns);
            only the tensors present are changed.
        loras: ``(path, strength)`` or ``(path, strength, expert)`` entries, applied in order (``expert`` is
            ignored here: the caller passes the entries meant for this model).
        layers: the blocks this rank owns (None: whatever blocks are in ``state_dict``).
    Raises ValueError naming the file when a LoRA matches nothing in a Wan T2V model, or an update's shape does
    not fit the weight. The update is computed in float32 on the weight's device, then cast back.
    """
    for entry in loras:
        path, strength = os.fspath(entry[0]), float(entry[1])
        info = inspect_lora(path)
        if strength == 0.0:
            continue
        from safetensors import safe_open

        changed = 0
        with safe_open(path, framework="pt", device="cpu") as f:
            for module, t in info.targets.items():
                if not _owned(module, layers, state_dict):
                    continue
                wkey, bkey = module + ".weight", module + ".bias"
                pkey = module if module in state_dict else wkey  # a bare parameter (diff of a modulation)
                try:
                    if t.down and wkey in state_dict:
                        _add(state_dict, wkey, _delta(f, t, state_dict[wkey].shape, state_dict[wkey].device), strength)
                        changed += 1
                    if t.diff and pkey in state_dict:
                        _add(state_dict, pkey, f.get_tensor(t.diff), strength)
                        changed += 1
                    if t.diff_b and bkey in state_dict:
                        _add(state_dict, bkey, f.get_tensor(t.diff_b), strength)
                        changed += 1
                except (ValueError, RuntimeError) as e:
                    raise ValueError(f"LoRA '{path}' does not fit this model: {e}. It was made for a Wan model "
                                     f"of another size or variant.") from e
        logger.info("LoRA %s (strength %g, %s layout): merged into %d tensors%s", os.path.basename(path), strength,
                    info.layout, changed, "" if layers is None else f" of blocks {layers.start}..{layers.stop - 1}")
    return state_dict
