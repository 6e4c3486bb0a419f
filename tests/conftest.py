"""Shared test setup: one torch thread per process, tiny models built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config():
    from dualparal_core.config import WanConfig

    return WanConfig.tiny()


@pytest.fixture
def no_leftover_workers():
    """Every rank a test started is gone when it ends (the pool tests' promise); a survivor is killed, then failed."""
    from fault_helpers import worker_procs

    before = {p.pid for p in worker_procs()}  # a module's shared pool, when it is up
    yield
    left = [p for p in worker_procs() if p.pid not in before]
    for p in left:  # a stopped rank must be continued (or killed) whatever the test did
        p.kill()
    assert not left, f"worker processes outlived the test: {left}"
