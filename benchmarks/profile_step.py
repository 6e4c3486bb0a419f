"""Where a block-step's time goes: one S1 block-step of our stage under the torch profiler, kernels grouped.

    python benchmarks/profile_step.py                      # GPU: 1.3B shapes, S1's window, each backend installed
    python benchmarks/profile_step.py --device cpu --tiny  # a CPU smoke run of the same code
    python benchmarks/profile_step.py --backends fa3 fa3_fp8 --matmul fp8   # + each backend with fp8 GEMMs

The window is S1's steady block-step: K + P = 16 latent frames at 480x832 (24,960 tokens), the next-newer block's
first K = 8 frames as right context (keys 37,440), batch 2 (CFG), keeping K frames' K/V for the older neighbour,
the last layer computing the own frames' queries only (as the engine's head stage does; --full-last-layer: all).
Prints, per variant: the block-step's median time (CUDA events, after warm-up), its FLOP rate (formula of
docs/performance.md), and the GPU time per kernel group (GEMM, attention, compiled elementwise, other elementwise,
copies, norms) with the time the GPU sat idle between kernels inside the block-step (host overhead, launch gaps,
syncs; ``--sync-debug`` lists any host synchronisation), and the
block-step output's relative error against the first variant ("err"). ``--matmul fp8`` adds, after every backend in
bf16, each backend with the blocks' GEMMs in e4m3 (``PoolSpec.matmul="fp8"``, dualparal_core/fp8_gemm.py), with its
error against the same backend in bf16 ("vs bf16"): the per-forward cost of the fp8 GEMMs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dualparal_core import kvcache  # noqa: E402
from dualparal_core.bench.flops import block_step_flops  # noqa: E402
from dualparal_core.config import WanConfig  # noqa: E402
from dualparal_core.model import WanStage  # noqa: E402

GROUPS = (  # first match wins; names as the CUDA kernels are called on Hopper with torch 2.11
    ("attention", ("flash", "fmha", "attention", "cudnn_generated", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")),
    ("compiled", ("triton_", "rms_rope", "ln_kernel")),  # Inductor's and our Triton kernels
    ("norm", ("layer_norm", "rms_norm", "norm_kernel")),
    ("copy", ("copy", "cat", "Memcpy", "memcpy", "transpose")),
    ("gelu", ("gelu",)),
    ("elementwise", ("elementwise", "vectorized", "reduce")),
)


def group_of(name: str) -> str:
    for g, keys in GROUPS:
        if any(k in name for k in keys):
            return g
    return "other"


def build(args, backend: str, matmul: str = "bf16") -> WanStage:
    cfg = WanConfig.tiny() if args.tiny else WanConfig.wan21_1_3b()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    st = WanStage(cfg, range(cfg.num_layers), embed=True, head=True, dtype=dtype, device=dev,
                  attention_backend=backend)
    st.init_random(0)
    st.fuse_qkv()
    compiled = dev.type == "cuda" and not args.no_compile
    if compiled:
        st.compile_elementwise()
    if matmul == "fp8":
        from dualparal_core.fp8_gemm import ScaledMMLinear, install_scaled_mm

        ScaledMMLinear.fast_accum = _FAST[0] = args.fast_accum
        install_scaled_mm(st, dev, compiled=compiled)
    return st


def inputs(st: WanStage, args):
    cfg, dev, dt = st.config, st.device, st.dtype
    gh, gw = args.height // 16, args.width // 16
    hw = gh * gw
    frames, right = args.P + args.K, args.K
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(2, frames * hw, cfg.dim, device=dev, dtype=dt, generator=g)
    rk = torch.randn(2, right * hw, cfg.dim, device=dev, dtype=dt, generator=g)
    rv = torch.randn(2, right * hw, cfg.dim, device=dev, dtype=dt, generator=g)
    text = st.prepare_text(torch.randn(2, 512, cfg.text_dim, device=dev, generator=g))
    tproj, _ = st.time_embed(torch.tensor([500.0, 500.0]))
    keep = (args.K * hw, args.K * hw)
    return h, rk, rv, text, tproj, keep, (frames, gh, gw), frames * hw, (frames + right) * hw


def run_once(st, inp):
    h, rk, rv, text, tproj, keep, grid, _, _ = inp
    if not hasattr(st, "_right_entries"):  # the right context as the stage's cache mode keeps it (reusable)
        st._right_entries = {i: st.kv_keep(rk, rv) for i in st.layers}
    right = dict(st._right_entries)
    out_from = keep[0] if OWN_ONLY[0] else 0  # the engine's last layer: the own frames' queries (keep[0] = K frames)
    return st.blocks_forward(h, tproj, text, grid, right=right, keep=keep, out_from=out_from)


OWN_ONLY = [True]  # --full-last-layer: False


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_steps(st, inp, reps: int) -> list[float]:
    dev = st.device
    out = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run_once(st, inp)
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            run_once(st, inp)
            out.append(time.perf_counter() - t)
    return out


def sync_debug(st, inp) -> list[str]:
    """One block-step with CUDA's sync debug mode on: the host synchronisations it makes (each a message and the
    innermost frames of our code that caused it)."""
    import traceback
    import warnings

    if st.device.type != "cuda":
        return []
    found = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_once(st, inp)
            sync(st.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        found.append(f"{w.category.__name__}: {str(w.message)[:160]} at {w.filename}:{w.lineno}")
    del traceback
    return found


def gaps(prof, top: int = 12) -> list[tuple[float, str, str]]:
    """The longest stretches with no CUDA kernel running inside the profiled block-step: (ms, kernel before,
    kernel after)."""
    ks = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                if ev.device_type == torch.autograd.DeviceType.CUDA)
    out, end, last = [], None, ""
    for s, e, n in ks:
        if end is not None and s > end:
            out.append(((s - end) / 1e3, last[:60], n[:60]))
        if end is None or e > end:
            end, last = e, n
    return sorted(out, reverse=True)[:top] + [(sum(g[0] for g in out), "all gaps", f"{len(out)} gaps")]


def profile_groups(st, inp, trace: str | None = None) -> tuple[dict[str, float], float, list, float]:
    from torch.profiler import ProfilerActivity, profile

    dev = st.device
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        run_once(st, inp)
        sync(dev)
    wall = time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(trace)
    idle = 0.0
    if dev.type == "cuda":
        found = gaps(prof)
        idle = found[-1][0] / 1e3
        for ms, a, b in found[:4]:
            print(f"  gap {ms:8.3f} ms  after {a}  before {b}")
    groups: dict[str, float] = {}
    names: dict[str, float] = {}
    for ev in prof.events():
        if dev.type == "cuda" and ev.device_type == torch.autograd.DeviceType.CUDA:
            groups[group_of(ev.name)] = groups.get(group_of(ev.name), 0.0) + ev.device_time / 1e6
            names[ev.name[:90]] = names.get(ev.name[:90], 0.0) + ev.device_time / 1e6
    top = sorted(names.items(), key=lambda kv: -kv[1])[:25]
    return groups, wall, top, idle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--P", type=int, default=8)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--backends", nargs="+", default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--matmul", choices=["bf16", "fp8"], default="bf16",
                   help="fp8: also run every backend with the blocks' GEMMs in e4m3 (torch._scaled_mm)")
    p.add_argument("--fast-accum", action="store_true", help="the fp8 GEMMs with use_fast_accum (Hopper)")
    p.add_argument("--json", default=None)
    p.add_argument("--kv-cache", nargs="*", default=[], choices=["offload", "fp8"],
                   help="also run the first backend with the right-context cache kept so (PoolSpec.kv_cache)")
    p.add_argument("--inductor-rope", action="store_true",
                   help="also run the first backend with the qk-norm + RoPE chain compiled by Inductor "
                        "(DUALPARAL_TRITON=0) instead of the Triton kernel (dualparal_core/kernels.py)")
    p.add_argument("--full-last-layer", action="store_true",
                   help="the last layer computes every query (before 2026-12-07) instead of the own frames' only")
    p.add_argument("--sync-debug", action="store_true", help="list the host synchronisations of one block-step")
    p.add_argument("--trace", default=None, metavar="DIR", help="write each variant's chrome trace here")
    args = p.parse_args()
    OWN_ONLY[0] = not args.full_last_layer
    if args.backends is None:
        from dualparal_core.attention import fa3_available

        args.backends = ["sdpa"] + (["fa3"] if args.device != "cpu" and fa3_available() else [])
    rows = []
    ref = None  # the first variant's output (on the host): every other variant's relative error against it
    bf16_out = {}  # each backend's output with bf16 GEMMs: the fp8-GEMM variant's error against it
    variants = [(b, "bf16", "exact") for b in args.backends]
    variants += [(b, "fp8", "exact") for b in args.backends if args.matmul == "fp8"]
    variants += [(args.backends[0], "bf16", kv) for kv in args.kv_cache]
    variants += [(args.backends[0], "bf16", "inductor")] if args.inductor_rope else []
    for backend, matmul, kv in variants:
        os.environ["DUALPARAL_TRITON"] = "0" if kv == "inductor" else "1"
        st = build(args, backend, matmul)
        kv = "exact" if kv == "inductor" else kv
        st.kv_keep = kvcache.KEEPERS[kv]
        inp = inputs(st, args)
        own = inp[7] - inp[5][0] if OWN_ONLY[0] else None
        fl = block_step_flops(st.config, inp[7], inp[8], 2, own=own)
        time_steps(st, inp, 2)  # warm-up: compiles, cuBLAS handles, FA3 module load
        ts = time_steps(st, inp, args.reps)
        med = statistics.median(ts)
        out = run_once(st, inp)[0].float().cpu()
        ref = out if ref is None else ref
        err = ((out - ref).norm() / ref.norm()).item()
        if matmul == "bf16":
            bf16_out[backend] = out
        base = bf16_out[backend]
        err_bf16 = ((out - base).norm() / base.norm()).item() if matmul == "fp8" else None
        del out
        label = label_of(backend, matmul) + ("" if kv == "exact" else f"+kv_{kv}")
        label += "+inductor_rope" if os.environ["DUALPARAL_TRITON"] == "0" else ""
        if args.sync_debug:
            for line in sync_debug(st, inp) or ["no host synchronisation"]:
                print(f"  {label} sync: {line}")
        trace = None if not args.trace else str(Path(args.trace) / f"{label}.json")
        if trace:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
        groups, wall, top, idle = profile_groups(st, inp, trace)
        busy = sum(groups.values())
        row = {"backend": label, "attention": backend, "matmul": matmul, "err_vs_bf16_gemm": err_bf16,
               "median_s": med, "spread_s": max(ts) - min(ts), "tflops": fl / med / 1e12,
               "flops": fl, "profiled_wall_s": wall, "idle_s": idle, "kernel_s": busy, "groups_s": groups, "top_kernels_s": top,
               "err_vs_first": err,
               "peak_gib": torch.cuda.max_memory_allocated(st.device) / 2**30 if st.device.type == "cuda" else 0}
        rows.append(row)
        del st, inp
        if args.device != "cpu":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(f"\nblock-step: q {inp_tokens(args)} tokens, batch 2, device "
          f"{torch.cuda.get_device_name() if args.device != 'cpu' else 'cpu'}")
    print(f"{'variant':16} {'median s':>9} {'spread':>7} {'TFLOP/s':>8} {'peak GiB':>8} {'err':>8} {'vs bf16':>8}  "
          f"kernel time by group (ms)")
    for r in rows:
        gs = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(r["groups_s"].items(), key=lambda kv: -kv[1]))
        vs = "-" if r["err_vs_bf16_gemm"] is None else f"{r['err_vs_bf16_gemm']:.1e}"
        print(f"{r['backend']:16} {r['median_s']:9.4f} {r['spread_s']:7.4f} {r['tflops']:8.1f} {r['peak_gib']:8.2f}"
              f" {r['err_vs_first']:8.1e} {vs:>8}"
              f"  {gs}; idle between kernels {r['idle_s'] * 1e3:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def label_of(backend: str, matmul: str) -> str:
    return backend + ("+fp8gemm" + ("(fast)" if _FAST[0] else "") if matmul == "fp8" else "")


_FAST = [False]  # --fast-accum, for the labels


def inp_tokens(args) -> str:
    hw = (args.height // 16) * (args.width // 16)
    return f"{(args.P + args.K) * hw} / k {(args.P + 2 * args.K) * hw}"


if __name__ == "__main__":
    main()
