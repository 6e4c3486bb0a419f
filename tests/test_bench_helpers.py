"""The benchmarks' helpers (the README's extrapolated rows rest on them) and their path through the product: CPU
smoke runs of bench_s1 and fit_24gb on WorkerPool ranks, and the engine's profile and trace switches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_s1 import item_flops, job_flops, steady_rate  # noqa: E402
from fault_helpers import tiny_job, worker_procs  # noqa: E402

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
    """CPU gloo ranks of the product's pool with the tiny model; one setting raises torch.OutOfMemoryError on the
    last rank (DUALPARAL_FAULT, in a group of its own). The pool is closed, a new one runs the settings left,
    settings that need at least as much are marked without running, and no rank process is left behind."""
    import argparse

    from fit_24gb import Setting, fit

    args = argparse.Namespace(device="cpu", tiny=True, P=8, weights="fp8", gib=24.0, reserve=1.0, timeout=120,
                              fake_oom=["64x64:K2:3.5/1"])
    settings = [Setting.parse(t) for t in ("64x64:K0:1/1", "64x64:K2:3.5/1", "128x64:K0:1/1", "64x64:K4:3.5/3.5")]
    result, ready = fit(2, args, settings)
    assert result["64x64:K0:1/1"]["fits"] and result["128x64:K0:1/1"]["fits"]
    assert not result["64x64:K2:3.5/1"]["fits"] and "rank 1" in result["64x64:K2:3.5/1"]["why"]
    assert "OutOfMemoryError" in result["64x64:K2:3.5/1"]["why"]
    assert not result["64x64:K4:3.5/3.5"]["fits"]
    assert "needs at least what 64x64:K2:3.5/1" in result["64x64:K4:3.5/3.5"]["why"]
    # three pools of two ranks: up to the fake OOM, the fake OOM's own, the setting left after it
    assert [m["rank"] for m in ready] == [0, 1] * 3
    assert worker_procs() == []


def test_bench_s1_runs_through_the_pool_on_cpu(capsys):
    """bench_s1's main path end to end on CPU ranks of the product's pool, 1 and 2 ranks: every row is printed,
    with a finite positive TFLOP/s, and the ranks' profiles (ticks included) came back through job_info."""
    import math

    from bench_s1 import main

    rows = main(["--device", "cpu", "--tiny", "--dtype", "fp32", "--world", "1", "2", "--height", "32", "--width",
                 "32", "--frames", "8", "12", "--steps", "2", "--P", "2", "--K", "2", "--extrapolate", "40", "--fuse"])
    out = capsys.readouterr().out
    assert "--fuse is ignored" in out
    table = out[out.index("| run |"):].splitlines()
    names = [line.split(" | ")[0].lstrip("| ") for line in table[2:] if line.startswith("| ")]
    want = [f"dualparal N={n} T={t}" for n in (1, 2) for t in (8, 12, "40 (extrapolated from T=8,12)")]
    assert names == want
    col = table[0].split(" | ").index("TFLOP/s per GPU")
    for line in table[2:2 + len(want)]:
        tf = float(line.split(" | ")[col])
        assert math.isfinite(tf) and tf > 0, line
    measured = [r for r in rows if "extrapolated" not in r["name"]]
    assert all(r["generate_s"] >= r["seconds"] > 0 for r in measured)
    assert [len(r["ticks"]) for r in measured] == [6, 10] * 2  # block-steps: (3 and 5 blocks) x 2 steps
    assert all(r["tick_rate"] for r in measured if r["frames"] == 12)
    assert worker_procs() == []


def test_engine_profile_and_trace_switches(monkeypatch, tmp_path):
    """DUALPARAL_PROFILE=1 fills last_profile after each job (the same latents as without); DUALPARAL_TRACE=DIR
    writes the job's calls; neither set: last_profile stays empty."""
    import json

    from fault_helpers import full_stage

    from dualparal_core.engine import RankEngine

    job = tiny_job(batch=1)
    plain = RankEngine(full_stage())
    want = plain.run_job(job)
    assert plain.last_profile == {}
    monkeypatch.setenv("DUALPARAL_PROFILE", "1")
    monkeypatch.setenv("DUALPARAL_TRACE", str(tmp_path))
    eng = RankEngine(full_stage())
    assert torch.equal(eng.run_job(job), want)
    prof = eng.last_profile["profile"]
    assert prof["block_steps"] == job.num_block_steps == len(prof["ticks"])
    assert prof["ticks"] == sorted(prof["ticks"]) and 0 < prof["ticks"][-1] <= prof["loop_s"]
    assert prof["peak_gib"] == prof["reserved_gib"] == 0.0  # CPU
    rows = json.loads((tmp_path / "rank0.json").read_text())
    assert {tuple(r["item"]) for r in rows} == {(it.block, it.step) for it in eng.schedule.items}
    assert {r["fn"] for r in rows} >= {"in", "modulate", "rope_qk", "gated_residual"}
