"""The schedule replay (benchmarks/bubbles.py) that bounds the 1/2/4/8-GPU speed-ups: it prints the table for
1, 2, 4 and 8 GPUs, one GPU has no bubble (its time is the schedule's whole work), N GPUs never beat N x, and the
README's table is what the script prints."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bubbles():
    spec = importlib.util.spec_from_file_location("bubbles_under_test", ROOT / "benchmarks" / "bubbles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _table(text: str) -> dict[tuple[int, int], str]:
    """(latent frames, GPUs) -> the speed-up cell of the script's table."""
    rows = re.findall(r"^\| (\d+) \| \d+ \| \d+ \| \d+ \| (\d+) \| ([\d.]+)x \|", text, re.M)
    return {(int(f), int(n)): s for f, n, s in rows}


def test_the_replay_prints_the_1_2_4_8_gpu_bounds(bubbles, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bubbles.py"])
    bubbles.main()
    table = _table(capsys.readouterr().out)
    assert sorted(table) == [(f, n) for f in (72, 257) for n in (1, 2, 4, 8)]
    assert table[(72, 1)] == table[(257, 1)] == "1.00"
    for f in (72, 257):
        s = [float(table[(f, n)]) for n in (1, 2, 4, 8)]
        assert s == sorted(s) and all(x <= n for x, n in zip(s, (1, 2, 4, 8), strict=True)), s
    # the README quotes the same bounds (section "How far the schedule lets N GPUs go")
    readme = (ROOT / "README.md").read_text()
    for f, label in ((72, "72 (285)"), (257, "257 (1,025)")):
        row = re.search(rf"^\| {re.escape(label)} \| ([\d.]+)× \| ([\d.]+)× \| ([\d.]+)× \|", readme, re.M)
        assert row is not None, label
        assert list(row.groups()) == [table[(f, n)] for n in (2, 4, 8)], (label, row.groups())


def test_one_gpu_has_no_bubble_and_n_gpus_keep_the_work(bubbles):
    """One rank runs every block-step back to back: its time is the sum of their costs. With N ranks each rank is
    busy for its layer share of that same work."""
    from dualparal_core.config import BlockLayout, WanConfig

    cfg, lay = WanConfig.wan21_1_3b(), BlockLayout(72, 8, 8)
    one = bubbles.simulate(cfg, lay, 10, 1, 30 * 52)
    assert one["makespan"] == pytest.approx(one["work"], rel=1e-12) and one["util"] == [pytest.approx(1.0)]
    four = bubbles.simulate(cfg, lay, 10, 4, 30 * 52)
    assert four["work"] == one["work"]
    assert sum(u * four["makespan"] for u in four["util"]) == pytest.approx(one["work"], rel=1e-9)
