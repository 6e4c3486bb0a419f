"""How far bf16 rounding alone moves the latents (CPU): the yardstick for GPU runs that differ in kernel choice.

    python benchmarks/bf16_scale.py          # Wan2.1-1.3B shapes, random weights, 6 latent frames at 128x128, 3 steps

The same job (uni_pc, CFG 5, P = K = 2, coordinated noise) in float32 and in bfloat16 on one process; prints the
relative L2 and the largest difference of the final latents. Two bf16 runs that round differently somewhere (fused
or compiled kernels, another reduction order) can be expected to differ by about as much; a wrong block (stale or
mixed hidden states) would differ by far more.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dualparal_core.config import SamplingConfig, WanConfig  # noqa: E402
from dualparal_core.engine import RankEngine  # noqa: E402
from dualparal_core.model import WanStage  # noqa: E402
from dualparal_core.protocol import Job  # noqa: E402


def main() -> None:
    cfg = WanConfig.wan21_1_3b()
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 32, cfg.text_dim, generator=g), torch.randn(1, 32, cfg.text_dim, generator=g)
    t = torch.linspace(1, 0, 4, dtype=torch.float64)
    sigmas = tuple(float(v) for v in 8 * t / (1 + 7 * t))
    sc = SamplingConfig(sigmas=sigmas, sampler="uni_pc", cfg=5.0, seed=0, noise_mode="coordinated",
                        num_per_block=2, num_cat=2)
    job = Job(sc, (1, 16, 6, 16, 16), cond, uncond)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        stage = WanStage(cfg, range(cfg.num_layers), embed=True, head=True, dtype=dtype)
        stage.init_random(0)
        t0 = time.time()
        out[dtype] = RankEngine(stage).run_job(job)
        print(f"{dtype}: {time.time() - t0:.1f} s", flush=True)
    a, b = out[torch.float32], out[torch.bfloat16]
    print(f"bf16 vs fp32: relative L2 {float((a - b).norm() / a.norm()):.3g}, max |diff| {float((a - b).abs().max()):.3g}")


if __name__ == "__main__":
    main()
