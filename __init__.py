"""ComfyUI entry point of the DualParal pack: only re-exports the node extension (no heavy imports here)."""

from .nodes import comfy_entrypoint  # noqa: F401  (ComfyUI looks this name up)
