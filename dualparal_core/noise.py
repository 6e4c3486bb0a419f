"""Initial noise of a job: KSampler-compatible independent noise, or DualParal's coordinated per-block noise."""

from __future__ import annotations

import torch

from dualparal_core.config import NOISE_MODES, BlockLayout

__all__ = ["initial_noise", "independent_noise", "coordinated_noise"]

Shape5 = tuple[int, int, int, int, int]


def _check_shape(shape: Shape5, layout: BlockLayout | None = None) -> tuple[int, int, int, int, int]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 5 or any(n < 1 for n in shape):
        raise ValueError(f"Noise shape {shape} must be 5 positive sizes [B, C, T, H, W].")
    if layout is not None and shape[2] != layout.num_frames:
        raise ValueError(f"Noise shape {shape} has T={shape[2]} latent frames but the block layout is for "
                         f"{layout.num_frames}; build the layout from the latent's frame count.")
    return shape


def independent_noise(shape: Shape5, seed: int) -> torch.Tensor:
    """KSampler's noise: ``comfy.sample.prepare_noise(torch.zeros(shape), seed)`` bit for bit.

    ComfyUI seeds the CPU generator and draws the whole batch in one ``randn`` call; a private generator with the
    same seed gives the same stream without touching torch's global RNG. Returns [B, C, T, H, W] float32, CPU.
    """
    shape = _check_shape(shape)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32, device="cpu")


def coordinated_noise(shape: Shape5, layout: BlockLayout, seed: int) -> torch.Tensor:
    """DualParal's coordinated noise (DESIGN §2): every block's noise is a reshuffle of one P+K-frame template.

    ``g = torch.Generator().manual_seed(seed)`` draws the template [B, C, P+K, H, W] in one ``randn`` (the B
    videos together, as ComfyUI draws a batch). Block 0 takes the first min(T, P+K) frames of the template (all
    P+K when T >= P+K; a video of T <= P+K frames is that one block). For every later block, in order,
    ``perm = torch.randperm(P, generator=g)`` (one per block, shared by the batch) and
    ``template <- concat(template[:, :, -K:], template[:, :, perm])``; the block's noise is the last (block length)
    frames of the new template: K frames the previous block ended with, then its P frames reshuffled (a short
    last block of r frames takes the last r). With K = 0 the template is P frames and each block is a
    permutation of it. Each block's noise lands on its own frames [start, end) of the output.

    The published code also reshuffles once before block 0 (statistically the same: the template frames are
    i.i.d.) and, with K = 0, its ``template[-0:]`` keeps the whole template; both are defined as above here.
    Returns [B, C, T, H, W] float32, CPU.
    """
    b, c, t, h, w = _check_shape(shape, layout)
    p, k = layout.num_per_block, layout.num_cat
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    template = torch.randn((b, c, p + k, h, w), generator=g, dtype=torch.float32, device="cpu")
    out = torch.empty((b, c, t, h, w), dtype=torch.float32)
    spans = layout.blocks
    start, end = spans[0]
    out[:, :, start:end] = template[:, :, : end - start]
    for start, end in spans[1:]:
        perm = torch.randperm(p, generator=g)
        template = torch.cat((template[:, :, p:], template[:, :, perm]), dim=2)  # template[:, :, p:] is the last K
        out[:, :, start:end] = template[:, :, template.shape[2] - (end - start):]
    return out


def initial_noise(shape: Shape5, layout: BlockLayout, seed: int, mode: str) -> torch.Tensor:
    """The job's initial noise [B, C, T, H, W] (float32, CPU): mode 'coordinated' or 'independent'."""
    if mode == "coordinated":
        return coordinated_noise(shape, layout, seed)
    if mode == "independent":
        _check_shape(shape, layout)
        return independent_noise(shape, seed)
    raise ValueError(f"noise_mode={mode!r} is not supported; choose one of {list(NOISE_MODES)}.")
