"""The benchmark's extrapolation helpers (the README's extrapolated rows rest on them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_s1 import item_flops, job_flops, steady_rate  # noqa: E402

from dualparal_core.config import BlockLayout, WanConfig  # noqa: E402


def test_steady_rate_ignores_fill_and_drain():
    cfg = WanConfig.wan21_1_3b()
    flops = item_flops(cfg, BlockLayout(40, 8, 8), 10, 1560, 2)
    layout = BlockLayout(40, 8, 8)
    assert len(flops) == layout.num_blocks * 10
    assert sum(flops) == pytest.approx(job_flops(cfg, layout, 10, 1560, 2))
    rate = 4.0e14
    # a pipeline that fills for 3 s, then finishes block-step i after its FLOPs at `rate`, and drains slowly
    t, ticks = 3.0, []
    for i, f in enumerate(flops):
        t += f / rate if i < len(flops) - 5 else 5 * f / rate
        ticks.append(t)
    assert steady_rate(ticks, flops) == pytest.approx(rate, rel=1e-12)
    assert steady_rate(ticks[:5], flops[:5]) is None  # too few block-steps to find a middle
    assert steady_rate(ticks, flops[:-1]) is None  # ticks that do not match the schedule are not used
