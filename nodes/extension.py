"""The pack's V3 extension: the list of nodes ComfyUI registers (imported lazily by ``comfy_entrypoint``)."""

from __future__ import annotations

from . import bridge  # first: puts the pack's folder on sys.path for the top-level `dualparal_core` imports
from .bridge import ComfyExtension, io
from .decode import DualParalBlockDecode
from .loader import DualParalLoader
from .lora import DualParalLoRA
from .sampler import DualParalSampler
from .timeline import DualParalPromptAt

NODES: list[type[io.ComfyNode]] = [DualParalLoader, DualParalLoRA, DualParalSampler, DualParalBlockDecode,
                                   DualParalPromptAt]


class DualParalExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


__all__ = ["DualParalExtension", "NODES", "bridge"]
