"""DualParal LoRA: a chainable list of (LoRA file, strength) for the DualParal Loader (DUALPARAL_LORAS)."""

from __future__ import annotations

from dualparal_core.config import LORA_EXPERTS

from . import bridge
from .bridge import LorasSocket, io
from .types import chain_loras


class DualParalLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualParalLoRA",
            display_name="DualParal LoRA",
            category="DualParal",
            description="Adds a Wan LoRA (ComfyUI, diffusers/PEFT or kohya key layout) to a chain for the "
                        "DualParal Loader; chain several by connecting 'previous'. Use this instead of "
                        "LoraLoaderModelOnly, which cannot reach the worker processes.",
            inputs=[
                io.Combo.Input("lora_name", options=bridge.lora_names(),
                               tooltip="LoRA file from models/loras, made for the same Wan model size."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of the LoRA's update (W += strength * up @ down * alpha / rank)."),
                LorasSocket.Input("previous", optional=True,
                                         tooltip="Earlier LoRAs of the chain (applied first)."),
                io.Combo.Input("expert", options=list(LORA_EXPERTS), default="both", optional=True,
                               tooltip="With a Wan2.2 A14B pair in the Loader: merge into both experts, only the "
                                       "high-noise one, or only the low-noise one (e.g. a lightx2v LoRA for the "
                                       "low-noise pass at cfg_low 1). With one model: 'both' or 'high'."),
            ],
            outputs=[LorasSocket.Output(display_name="loras",
                                               tooltip="The chain, for the Loader's 'loras' input.")],
        )

    @classmethod
    def execute(cls, lora_name: str, strength: float, previous=None, expert: str = "both") -> io.NodeOutput:
        bridge.full_path("loras", lora_name)  # a clear error now if the file vanished
        return io.NodeOutput(chain_loras(previous, lora_name, strength, expert))
