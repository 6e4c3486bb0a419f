"""Attention backends on the S1 shapes (queries of a P+K window, keys with/without right context), TFLOP/s.

    python benchmarks/attn_bench.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dualparal_core.model import ATTENTION_BACKENDS, attention  # noqa: E402


def bench(backend: str, lq: int, lk: int, heads: int = 12, b: int = 2, d: int = 128, iters: int = 10) -> float:
    q = torch.randn(b, heads, lq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, heads, lk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for _ in range(3):
        attention(q, k, v, backend)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        attention(q, k, v, backend)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    return 4 * b * heads * lq * lk * d / (ms / 1e3) / 1e12


def main() -> None:
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| backend | Lq | Lk | TFLOP/s |")
    print("|---|---|---|---|")
    for lq, lk in ((24960, 24960), (24960, 37440), (112320, 112320)):
        for be in ATTENTION_BACKENDS:
            if be == "sdpa_math":
                continue
            try:
                tf = f"{bench(be, lq, lk):.0f}"
            except Exception as e:  # a backend may not support the shape on this GPU
                tf = f"n/a ({type(e).__name__})"
            print(f"| {be} | {lq} | {lk} | {tf} |")


if __name__ == "__main__":
    main()
