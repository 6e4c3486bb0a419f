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


def test_fit_settings_parse_and_order():
    from fit_24gb import Setting

    a, b = Setting.parse("832x480:K2:1/1"), Setting.parse("1280x720:K4:3.5/1")
    assert (a.width, a.height, a.K, a.batches()) == (832, 480, 2, (1, 1))
    assert b.batches() == (2, 1)
    assert b.covers(a) and not a.covers(b)
    # more pixels but less context: neither needs at least what the other needs
    c = Setting.parse("1280x720:K0:1/1")
    assert not c.covers(a) and not a.covers(c)
    with pytest.raises(SystemExit, match="832x481:K2:1/1"):
        Setting.parse("832x481:K2:1/1")
    with pytest.raises(SystemExit, match="guidance one of"):
        Setting.parse("832x480:K2:2/1")


def test_fit_starts_a_new_group_after_out_of_memory_and_skips_what_needs_more():
    """CPU gloo ranks with the tiny model; one setting raises torch.OutOfMemoryError on the last rank. The group is
    ended, a new one runs the settings left, settings that need at least as much are marked without running, and
    no rank process is left behind."""
    import argparse

    import torch.multiprocessing as mp
    from fit_24gb import Setting, fit

    args = argparse.Namespace(device="cpu", tiny=True, P=8, weights="fp8", gib=24.0, reserve=1.0, timeout=120,
                              fake_oom=["64x64:K2:3.5/1"])
    settings = [Setting.parse(t) for t in ("64x64:K0:1/1", "64x64:K2:3.5/1", "128x64:K0:1/1", "64x64:K4:3.5/3.5")]
    result, ready = fit(2, args, settings)
    assert result["64x64:K0:1/1"]["fits"] and result["128x64:K0:1/1"]["fits"]
    assert not result["64x64:K2:3.5/1"]["fits"] and "rank 1" in result["64x64:K2:3.5/1"]["why"]
    assert not result["64x64:K4:3.5/3.5"]["fits"]
    assert "needs at least what 64x64:K2:3.5/1" in result["64x64:K4:3.5/3.5"]["why"]
    assert len(ready) == 4  # two groups of two ranks
    assert mp.active_children() == []
