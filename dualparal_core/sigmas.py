"""Sigma tables for the CLI, as ComfyUI computes them for Wan (flow matching, shifted): no ComfyUI import.

Inside ComfyUI the nodes use ComfyUI's own scheduler code; this module only serves ``python -m dualparal_core``.
"""

from __future__ import annotations

import torch

SCHEDULERS = ("simple",)


def flow_sigma_table(shift: float, timesteps: int = 1000) -> torch.Tensor:
    """ComfyUI's ModelSamplingDiscreteFlow table: time_snr_shift(shift, t) for t = 1/1000 .. 1."""
    t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
    return shift * t / (1 + (shift - 1) * t)


def simple_sigmas(steps: int, shift: float = 8.0, denoise: float = 1.0) -> tuple[float, ...]:
    """ComfyUI's "simple" scheduler on the shifted table, with KSampler's denoise truncation."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")
    if not 0 < denoise <= 1:
        raise ValueError(f"denoise={denoise} must be in (0, 1].")
    total = int(steps / denoise)
    table = flow_sigma_table(shift).float()
    ss = len(table) / total
    sig = [float(table[-(1 + int(x * ss))]) for x in range(total)] + [0.0]
    return tuple(sig[-(steps + 1):])
