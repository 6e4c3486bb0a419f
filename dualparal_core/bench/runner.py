"""The bench run once its flags passed their checks: our rows on one pool, then each peer in processes of its own,
one table, the raw rows in ``--json`` (rewritten after every row, so a run cut short keeps what it measured)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dualparal_core.bench import flops as F
from dualparal_core.bench.cli import BenchPlan
from dualparal_core.bench.table import add_ratios, finish, line, ratio_lines, table
from dualparal_core.headless.progress import say

#: The folder that holds the dualparal_core package (children import it from there).
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])



class Bench:
    def __init__(self, args: argparse.Namespace, plan: BenchPlan):
        self.args, self.plan, self.rows, self.latents = args, plan, [], {}
        self.tpf = (args.height // 16) * (args.width // 16)
        self.b = 2 if args.cfg != 1 else 1
        from dualparal_core.sigmas import simple_sigmas

        self.sigmas = simple_sigmas(args.steps, args.shift)
        # the peers' specs, results and logs (a failing peer's log tail is printed too); not beside --json, whose
        # folder may be one that keeps a few files only (a device's $OUT)
        self.logs = Path(tempfile.mkdtemp(prefix="dualparal-bench-"))
        self.stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def add(self, row: dict, flops: list[float]) -> None:
        self.rows.append(finish(row, flops))
        say(line(self.rows[-1]), flush=True)
        self.save()

    def save(self) -> None:
        if self.plan.json is None:
            return
        a = self.args
        add_ratios(self.rows)
        device = next((r["device_name"] for r in self.rows if r.get("device_name")), self.plan.devices[0])
        meta = dict(device=device, date=self.stamp, argv=sys.argv, model=a.model, config=dataclasses.asdict(self.plan.config),
                    devices=list(self.plan.devices), dtype=self.plan.dtype, height=a.height, width=a.width,
                    steps=a.steps, cfg=a.cfg, shift=a.shift, sampler=a.sampler, P=a.num_per_block, K=a.num_cat,
                    attention=a.attention, matmul=a.matmul, fp8=a.fp8, compile=a.compile)
        self.plan.json.parent.mkdir(parents=True, exist_ok=True)
        self.plan.json.write_text(json.dumps(dict(meta, rows=self.rows), indent=1))

    # ---------------------------------------------------------------- ours
    def ours(self) -> None:
        """Our rows: one pool per variant, every length on it. The variants: ``--attention`` and ``--matmul`` paired
        up (a single value goes with each of the other list's), then (``--fp8``) the first pair with fp8 weights; the
        first variant is "ours", the others are compared to it."""
        a = self.args
        n = max(len(a.attention), len(a.matmul))
        pairs = [(a.attention[min(i, len(a.attention) - 1)], a.matmul[min(i, len(a.matmul) - 1)]) for i in range(n)]
        variants = [(att, "dequant", mm, "exact") for att, mm in pairs]
        variants += [(pairs[0][0], "fp8", pairs[0][1], "exact")] if a.fp8 else []
        variants += [(pairs[0][0], "dequant", pairs[0][1], kv) for kv in a.kv_cache]
        for i, (att, weights, mm, kv) in enumerate(dict.fromkeys(variants)):
            self._ours_pool(att, weights, mm, kv, first=i == 0)

    def _ours_pool(self, attention: str, weights: str, matmul: str, kv_cache: str, first: bool) -> None:
        from dualparal_core.bench import ours as engine

        a, p = self.args, self.plan
        tag = "" if first and len(set(a.attention)) == 1 else f" {attention}"
        tag += (" fp8 weights" if weights == "fp8" else "") + (" fp8 GEMM" if matmul == "fp8" else "")
        tag += f" {kv_cache} K/V cache" if kv_cache != "exact" else ""
        base = dict(kind="ours" if first else f"ours{tag.replace(' ', '-')}", name=f"ours N={len(p.devices)}{tag}",
                    gpus=len(p.devices), weights=weights, attention=attention, matmul=matmul, kv_cache=kv_cache)
        try:
            pool = engine.start_pool(p.config, p.devices, dtype=p.dtype, attention=attention, compile=a.compile,
                                     weights=weights, matmul=matmul, kv_cache=kv_cache, timeout=a.timeout)
        except Exception as e:
            for f in a.frames:
                self.add(dict(base, frames=f, error=f"pool did not start: {type(e).__name__}: {e}"[:300]),
                         self.our_flops(f))
            return
        try:
            for f in a.frames:
                self.add(dict(base, frames=f, **self._ours_row(engine, pool, f, first)), self.our_flops(f))
        finally:
            pool.close()

    def _ours_row(self, engine, pool, frames: int, first: bool) -> dict:
        a, P, K = self.args, self.args.num_per_block, self.args.num_cat
        kw = dict(sampler=a.sampler, cfg=a.cfg, shift=a.shift)
        job = engine.make_job(self.plan.config, frames, a.steps, P, K, a.height, a.width, **kw)
        table_ = engine.warmup_table(self.sigmas)
        warm = engine.make_job(self.plan.config, engine.warmup_frames(frames, P, K), len(table_) - 1, P, K,
                               a.height, a.width, sigma_table=table_, **kw)
        try:
            res = engine.timed(pool, job, warm, a.warmup)
        except Exception as e:
            return dict(error=f"{type(e).__name__}: {' '.join(str(e).split())}"[:300])
        lat = res.pop("_latents").float()
        res["finite"] = bool(lat.isfinite().all())
        if first:
            self.latents[frames] = lat
        elif frames in self.latents:  # the same job (seed, noise) as our first variant: its final latents' error
            ref = self.latents[frames]
            res["latent_rel_err"] = float((lat - ref).norm() / ref.norm().clamp_min(1e-30))
        rate = F.steady_rate(res["ticks"], self.our_flops(frames))
        res["steady_tflops_per_gpu"] = rate / len(self.plan.devices) / 1e12 if rate else None
        return res

    def our_flops(self, frames: int) -> list[float]:
        from dualparal_core.config import BlockLayout

        a = self.args
        return F.item_flops(self.plan.config, BlockLayout(frames, a.num_per_block, a.num_cat), a.steps, self.tpf,
                            self.b)

    # ---------------------------------------------------------------- peers
    def spec(self, frames: int, attention: str = "sdpa") -> dict:
        a = self.args
        return dict(config=dataclasses.asdict(self.plan.config), frames=frames, steps=a.steps, height=a.height,
                    width=a.width, cfg=a.cfg, shift=a.shift, dtype=self.plan.dtype, P=a.num_per_block,
                    K=a.num_cat, device="cuda" if self.plan.gpu else "cpu", attention=attention,
                    warmup=a.warmup, timed_steps=a.baseline_steps or a.steps, text_tokens=F.TEXT_TOKENS,
                    sigmas=list(self.sigmas), reference=str(self.plan.reference) if self.plan.reference else None)

    def peers(self) -> None:
        a, p = self.args, self.plan
        note = f"{a.baseline_steps} of {a.steps} steps timed, scaled" if a.baseline_steps not in (None, a.steps) \
            else None
        for f in a.frames:
            full = F.full_sequence_flops(p.config, f, a.steps, self.tpf, self.b)
            for attn in (a.baseline_attention if a.baseline else ()):
                row = dict(kind=f"fullseq-{attn}", name=f"full-sequence diffusers {attn.upper()}", gpus=1, frames=f)
                self.add(dict(row, **self.run_peer("fullseq", self.spec(f, attn), p.devices[:1]), note=note), full)
            if p.ulysses:
                row = dict(kind="ulysses", name=f"diffusers Ulysses-{len(p.devices)} SDPA", gpus=len(p.devices),
                           frames=f)
                self.add(dict(row, **self.run_peer("fullseq", self.spec(f), p.devices), note=note), full)
            if p.reference is not None:
                self.reference(f)

    def reference(self, frames: int) -> None:
        from dualparal_core.bench.reference import ONE_GPU

        a, p = self.args, self.plan
        row = dict(kind="reference", name="published DualParal", gpus=len(p.devices), frames=frames)
        flops = F.reference_flops(p.config, frames, a.steps, self.tpf, a.num_per_block, a.num_cat)
        if len(p.devices) == 1:
            self.add(dict(row, note=ONE_GPU), flops)
        else:
            self.add(dict(row, **self.run_peer("reference", self.spec(frames), p.devices)), flops)

    def run_peer(self, kind: str, spec: dict, devices: tuple[str, ...]) -> dict:
        """Run one rank per device of a peer (dualparal_core.bench.child) and merge their results: the slowest
        rank's time, the largest peak; or ``error`` with the failing rank's message and its log."""
        tag = f"{kind}-{spec['attention']}-T{spec['frames']}-N{len(devices)}"
        spec_path = self.logs / f"{tag}.json"
        spec_path.write_text(json.dumps(spec))
        procs, outs = [], [self.logs / f"{tag}.rank{r}.out.json" for r in range(len(devices))]
        env = child_env(devices)
        for r, out in enumerate(outs):
            out.unlink(missing_ok=True)
            log = open(self.logs / f"{tag}.rank{r}.log", "w")
            procs.append((subprocess.Popen([sys.executable, "-m", "dualparal_core.bench.child", kind, str(spec_path),
                                            str(r), str(len(devices)), str(out)], env=env, stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log))
        timed_out = wait_all([p for p, _ in procs], self.args.timeout)
        for _, log in procs:
            log.close()
        results = [json.loads(o.read_text()) if o.exists() else None for o in outs]
        merged = merge(results, timed_out, self.args.timeout, self.logs / f"{tag}.rank0.log")
        if "error" in merged:
            for r in range(len(devices)):
                tail = (self.logs / f"{tag}.rank{r}.log").read_text(errors="replace").splitlines()[-25:]
                say(f"--- {tag} rank {r}: the end of its log ---", *tail, sep="\n", flush=True)
        return merged

    # ---------------------------------------------------------------- all
    def run(self) -> int:
        a, p = self.args, self.plan
        from dualparal_core.bench.ours import safe_env

        safe_env()
        say(f"bench: {a.model} shapes ({p.config.num_layers} layers, dim {p.config.dim}), {p.dtype}, "
              f"{a.height}x{a.width}, {a.steps} steps, cfg {a.cfg}, shift {a.shift}, P={a.num_per_block} "
              f"K={a.num_cat}, our attention {' '.join(a.attention)}, devices {','.join(p.devices)}; peer logs in "
              f"{self.logs}", flush=True)
        if a.fuse:
            say("note: --fuse changes nothing: the product always fuses the QKV projection", flush=True)
        self.ours()
        self.peers()
        add_ratios(self.rows)
        self.save()
        device = next((r["device_name"] for r in self.rows if r.get("device_name")), p.devices[0])
        say(f"\n{device}, {self.stamp}, command: python -m dualparal_core {' '.join(sys.argv[1:])}")
        say(table(self.rows))
        for text in ratio_lines(self.rows):
            say(text)
        if all(r.get("seconds") or r["kind"] == "reference" and r.get("note") for r in self.rows):
            shutil.rmtree(self.logs, ignore_errors=True)
            return 0
        say(f"some rows failed; the peers' logs are in {self.logs}")
        return 1


def child_env(devices: tuple[str, ...]) -> dict:
    """The children's environment: NVLink multicast off, a free port, their GPUs as cuda:0..N-1, one CPU thread
    per CPU rank, this package importable."""
    from dualparal_core.bench.ours import SAFE_ENV

    env = {**os.environ, **SAFE_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
    if devices[0].startswith("cuda"):
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [d.split(":")[1] for d in devices]
        if seen:
            ids = [seen.split(",")[int(i)].strip() for i in ids]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    else:
        env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> bool:
    """Wait for every process; past ``timeout`` kill those left (ours, by their handle). Returns timed out."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            for q in procs:
                q.wait()
            return True
    return False


def merge(results: list[dict | None], timed_out: bool, timeout: float, log: Path) -> dict:
    if timed_out:
        return dict(error=f"timed out after {timeout:.0f} s (--timeout); log {log}")
    failed = [r for r in results if r is None or "error" in r]
    if failed:
        why = failed[0]["error"] if failed[0] else "a rank ended without a result"
        return dict(error=f"{why} (log {log})")
    return dict(seconds=max(r["seconds"] for r in results), peak_gib=max(r["peak_gib"] for r in results),
                reserved_gib=max(r["reserved_gib"] for r in results),
                peak_per_rank=[r["peak_gib"] for r in results], device_name=results[0]["device_name"],
                weights_gib=max(r.get("weights_gib", 0.0) for r in results),
                finite=all(r.get("finite", True) for r in results))


def run(args: argparse.Namespace, plan: BenchPlan) -> int:
    return Bench(args, plan).run()
