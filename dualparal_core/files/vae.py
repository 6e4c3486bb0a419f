"""Wan VAE files recognised from their key names alone (no torch): the layout, the prefix and the decoder's keys."""

from __future__ import annotations

from collections.abc import Sequence

# A key that only a Wan VAE has, in each layout (ComfyUI itself detects the Wan VAE by the first one).
ORIGINAL_MARK = "decoder.middle.0.residual.0.gamma"
DIFFUSERS_MARK = "decoder.mid_block.resnets.0.norm1.gamma"
# Wan2.2's VAE (48 channels, TI2V-5B) in the original layout (ComfyUI's own test, sd.py).
WAN22_MARK = "decoder.upsamples.0.upsamples.0.residual.2.weight"


def vae_keys(keys: Sequence[str], source: str) -> tuple[str, str, list[str]]:
    """The layout ("original" or "diffusers"), the key prefix and the decoder-side keys of a Wan2.1 VAE; raise
    ValueError naming ``source`` if the keys are no Wan2.1 VAE's."""
    found = [(k, m, lay) for m, lay in ((ORIGINAL_MARK, "original"), (DIFFUSERS_MARK, "diffusers"))
             for k in keys if k.endswith(m)]
    if not found:
        raise ValueError(
            f"{source} is not a Wan VAE: it has neither '{ORIGINAL_MARK}' (ComfyUI's wan_2.1_vae.safetensors) "
            f"nor '{DIFFUSERS_MARK}' (diffusers' AutoencoderKLWan). Pick the Wan2.1 VAE file.")
    hit, mark, layout = found[0]
    prefix = hit[: -len(mark)]
    if layout == "original" and any(k == prefix + WAN22_MARK for k in keys):
        raise ValueError(
            f"{source} is the Wan2.2 VAE (48 latent channels, used by TI2V-5B only); Block Decode supports the "
            "Wan2.1 VAE (wan_2.1_vae.safetensors, also used by Wan2.2 A14B). Use ComfyUI's VAE Decode for 5B.")
    post = ("conv2.",) if layout == "original" else ("post_quant_conv.",)
    needed = [k for k in keys if k.startswith(prefix) and k[len(prefix):].startswith(("decoder.", *post))]
    return layout, prefix, needed
