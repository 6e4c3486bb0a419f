"""Test-only ComfyUI pack for the DualParal e2e tests: Wan-shaped conditioning without a text encoder, and a probe
that proves the pack's engine is importable (and its dataclasses unpicklable) under a top-level name."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import torch
from comfy_api.latest import ComfyExtension, io

EXTRAS = ["none", "concat_latent_image", "area", "two_entries", "timestep_range"]


class DualParalTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualParalTestConditioning",
            display_name="DualParal Test Conditioning",
            category="DualParal/testing",
            description="Random Wan-shaped CONDITIONING [[tensor [1, tokens, width], {pooled_output: None}]].",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Int.Input("tokens", default=512, min=1, max=4096),
                io.Int.Input("width", default=4096, min=1, max=8192),
                io.Combo.Input("extra", options=EXTRAS, default="none"),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed: int, tokens: int, width: int, extra: str) -> io.NodeOutput:
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(1, tokens, width, generator=g, dtype=torch.float32) * 0.2
        t[:, tokens // 2:] = 0.0  # zero padding after the "EOS", as umt5 conditioning has
        d = {"pooled_output": None}
        if extra == "concat_latent_image":
            d["concat_latent_image"] = torch.zeros(1, 16, 1, 4, 4)
        elif extra == "area":
            d["area"] = (8, 8, 0, 0)
        elif extra == "timestep_range":
            d["start_percent"], d["end_percent"] = 0.0, 0.5
        out = [[t, d]]
        if extra == "two_entries":
            out.append([t.clone(), {"pooled_output": None}])
        return io.NodeOutput(out)


class DualParalTestProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualParalTestProbe",
            display_name="DualParal Test Probe",
            category="DualParal/testing",
            inputs=[io.Custom("DUALPARAL_MODEL").Input("model")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        core = sys.modules.get("dualparal_core")
        spec_cls = type(model.spec)
        pack_dir = os.path.dirname(os.path.dirname(core.__file__)) if core else None
        child = subprocess.run(
            [sys.executable, "-c", "import pickle, sys; s = pickle.loads(sys.stdin.buffer.read()); "
                                   "print(type(s).__module__, type(s.source).__module__, len(s.devices))"],
            input=pickle.dumps(model.spec), capture_output=True, env={**os.environ, "PYTHONPATH": pack_dir or ""},
            timeout=120)
        info = {
            "core_file": getattr(core, "__file__", None),
            "pack_dir": pack_dir,
            "spec_module": spec_cls.__module__,
            "handle_module": type(model).__module__,
            "child_rc": child.returncode,
            "child_out": child.stdout.decode().strip(),
            "child_err": child.stderr.decode()[-2000:],
        }
        return io.NodeOutput(ui={"probe": [json.dumps(info)]})


class DualParalTestLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualParalTestLatent",
            display_name="DualParal Test Latent",
            category="DualParal/testing",
            description="A seeded random raw Wan2.1 video latent [batch, 16, frames, height, width] (latent units).",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Int.Input("frames", default=3, min=1, max=1024),
                io.Int.Input("height", default=4, min=1, max=256),
                io.Int.Input("width", default=4, min=1, max=256),
                io.Int.Input("batch", default=1, min=1, max=16),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, seed: int, frames: int, height: int, width: int, batch: int) -> io.NodeOutput:
        g = torch.Generator().manual_seed(seed)
        return io.NodeOutput({"samples": torch.randn(batch, 16, frames, height, width, generator=g) * 1.5})


class DualParalTestSaveTensor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualParalTestSaveTensor",
            display_name="DualParal Test Save Tensor",
            category="DualParal/testing",
            description="Saves an IMAGE bit-exactly (safetensors in the output folder) for the tests to compare.",
            inputs=[io.Image.Input("images"), io.String.Input("name", default="tensor")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, name: str) -> io.NodeOutput:
        import folder_paths
        from safetensors.torch import save_file

        path = os.path.join(folder_paths.get_output_directory(), f"{name}.safetensors")
        save_file({"images": images.detach().cpu().contiguous()}, path)
        return io.NodeOutput(ui={"tensors": [path]})


class DualParalTestClipVision(io.ComfyNode):
    """ComfyUI's CLIPVisionLoader builds only full-size vision models: this emits a CLIP_VISION_OUTPUT of the shape
    CLIP Vision Encode gives for clip_vision_h (penultimate_hidden_states [1, 257, 1280]), seeded."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DualParalTestClipVision",
            display_name="DualParal Test CLIP Vision Output",
            category="DualParal/testing",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1)],
            outputs=[io.ClipVisionOutput.Output()],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        import comfy.clip_vision

        out = comfy.clip_vision.Output()
        g = torch.Generator().manual_seed(seed)
        out.penultimate_hidden_states = torch.randn(1, 257, 1280, generator=g)
        return io.NodeOutput(out)


class _Ext(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [DualParalTestConditioning, DualParalTestProbe, DualParalTestLatent, DualParalTestSaveTensor,
                DualParalTestClipVision]


async def comfy_entrypoint() -> ComfyExtension:
    return _Ext()
