"""The benchmarks' one way to run DualParal: the product's WorkerPool with the ranks' own profile on. The code
lives in dualparal_core/bench/ours.py (``python -m dualparal_core bench`` uses it); this module keeps the scripts'
names (a pool by GPU count, shift-8 sigmas by default)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualparal_core.bench import ours  # noqa: E402
from dualparal_core.bench.ours import SAFE_ENV, make_job, profiles, summarise, texts, timed, warmup_frames  # noqa
from dualparal_core.sigmas import simple_sigmas  # noqa: E402

ours.safe_env()  # set at import (not setdefault): no benchmark may run with NVLink multicast on


def devices(kind: str, world: int) -> tuple[str, ...]:
    """PoolSpec.devices for ``world`` ranks: cuda:0..world-1, or CPU ranks."""
    return tuple(f"cuda:{r}" for r in range(world)) if kind == "cuda" else ("cpu",) * world


def start_pool(config, world: int, *, device: str = "cuda", **kw):
    return ours.start_pool(config, devices(device, world), **kw)


def sigmas(steps: int, shift: float = 8.0) -> tuple[float, ...]:
    return simple_sigmas(steps, shift)
