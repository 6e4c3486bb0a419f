"""benchmarks/plot_length.py reads the bench's --json: only measured "ours" rows, by length; anything else is refused
with the file named (matplotlib, a development tool, is not needed for this)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import plot_length  # noqa: E402


def test_reads_the_measured_rows_of_ours_by_length(tmp_path):
    rows = [dict(kind="ours", frames=257, seconds=9.0), dict(kind="fullseq-sdpa", frames=72, seconds=5.0),
            dict(kind="ours", frames=72, seconds=2.0), dict(kind="ours", frames=100, error="timed out")]
    f = tmp_path / "len.json"
    f.write_text(json.dumps(dict(model="1.3b", rows=rows)))
    _, got = plot_length.rows_of(str(f))
    assert [r["frames"] for r in got] == [72, 257]


def test_a_file_without_our_rows_is_refused_by_name(tmp_path):
    f = tmp_path / "other.json"
    f.write_text(json.dumps(dict(rows=[dict(kind="ulysses", frames=72, seconds=1.0)])))
    with pytest.raises(SystemExit, match="other.json: no measured 'ours' rows"):
        plot_length.rows_of(str(f))
