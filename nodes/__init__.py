"""The ComfyUI-facing layer: the only code that knows ComfyUI exists."""


async def comfy_entrypoint():
    from .extension import DualParalExtension

    return DualParalExtension()
