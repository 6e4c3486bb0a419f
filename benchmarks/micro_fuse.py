"""Candidate fusions for the block-step's non-matmul work, timed at S1's shapes (49,920 tokens, 1.3B widths).

    python benchmarks/micro_fuse.py             # GPU; prints one row per variant: median ms and error vs fp32

Each candidate computes the same function as today's code; the error column is against an fp32 reference of
that function on the same random inputs (bf16 operands: expect 1e-3 to 1e-2, and the same as today's variant).
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F


def bench(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    dev = "cuda"
    N, D, Fd = 49920, 1536, 8960
    bf = torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(N, D, device=dev, dtype=bf)
    h = torch.randn(N, D, device=dev, dtype=bf)
    w1 = torch.randn(Fd, D, device=dev, dtype=bf) * D ** -0.5
    b1 = torch.randn(Fd, device=dev, dtype=bf) * 0.01
    w2 = torch.randn(D, Fd, device=dev, dtype=bf) * Fd ** -0.5
    b2 = torch.randn(D, device=dev, dtype=bf) * 0.01
    gate = torch.randn(1, D, device=dev, dtype=torch.float32) * 0.1
    rows = []
    ref1 = F.gelu(x.double() @ w1.double().t() + b1.double(), approximate="tanh")
    sep = lambda: F.gelu(F.linear(x, w1, b1), approximate="tanh")  # noqa: E731
    epi = lambda: torch._addmm_activation(b1, x, w1.t(), use_gelu=True)  # noqa: E731
    gemm_only = lambda: F.linear(x, w1, b1)  # noqa: E731
    rows.append(("ffn1 linear+gelu (today)", bench(sep), rel(sep(), ref1)))
    rows.append(("ffn1 addmm gelu epilogue", bench(epi), rel(epi(), ref1)))
    rows.append(("ffn1 linear only (floor)", bench(gemm_only), float("nan")))
    y = sep()
    ref2 = h.double() + (y.double() @ w2.double().t() + b2.double()) * gate.double()
    today = lambda: torch.addcmul(h.float(), F.linear(y, w2, b2).float(), gate).to(bf)  # noqa: E731

    def folded():  # gate folded into W2 and b2 (both halves share the step's gate), residual as GEMM's C
        wg = (w2.float() * gate.t()).to(bf)
        c = torch.addcmul(h.float(), b2.float(), gate).to(bf)  # in the engine: fused into the previous kernel
        return torch.addmm(c, y, wg.t())

    def folded_gemm_only():
        wg = (w2.float() * gate.t()).to(bf)
        return torch.addmm(h, y, wg.t())

    rows.append(("ffn2 linear + gated residual (today)", bench(today), rel(today(), ref2)))
    rows.append(("ffn2 gate in W, residual as C", bench(folded), rel(folded(), ref2)))
    rows.append(("ffn2 gate in W, C=h (no bias pass)", bench(folded_gemm_only), float("nan")))
    rows.append(("ffn2 linear only (floor)", bench(lambda: F.linear(y, w2, b2)), float("nan")))
    big = torch.empty(N * D * 4 // 2, device=dev, dtype=bf)
    ms = bench(lambda: big.clone())
    rows.append((f"copy {big.numel() * 2 / 2**30:.2f} GiB (r+w {2 * big.numel() * 2 / ms / 1e9:.0f} GB/s)", ms,
                 float("nan")))
    flops1 = 2 * N * D * Fd
    print(f"device {torch.cuda.get_device_name()}, N={N}, D={D}, F={Fd}; ffn GEMM {flops1 / 1e12:.2f} TFLOP each")
    for name, ms, err in rows:
        tf = flops1 / ms / 1e9 if name.startswith("ffn") else float("nan")
        print(f"{name:42} {ms:8.3f} ms  {tf:6.0f} TFLOP/s  err {err:.2e}")


if __name__ == "__main__":
    sys.exit(main())
