"""A soak through one real ComfyUI server (CPU, the tests' tiny model): 50 prompts, alternating sizes and seeds, a
cancel every tenth, a changed model setting every twentieth, a killed worker every twenty-fifth. Every result must
equal the first result of the same prompt (each key's first run is on a freshly started pool, since the job is
deterministic: N-independence and the parity tests), and the server's processes, open files and resident memory must
not grow beyond the bounds below. Not part of CI (it needs a ComfyUI checkout); run it by hand:

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python benchmarks/soak_comfy.py [--prompts 50]

Prints one line per prompt and a summary table; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "comfy_live"), str(ROOT)]

import psutil  # noqa: E402
import torch  # noqa: E402
from comfy_harness import COMFY, ComfyServer, build_assets, error_of  # noqa: E402
from test_e2e import base_graph, loader, saved_latent  # noqa: E402

BOUNDS = {"workers": 2, "fds_growth": 40, "rss_growth_mb": 300.0}
"""A cpu:2 pool has 2 workers; the server's open files and resident memory may grow by these after the warm-up."""


def _graph(i: int, attention: str) -> tuple[dict, tuple]:
    length, seed = (9, 13)[i % 2], (5, 6, 7)[i % 3]
    g = base_graph(length=length, seed=seed, steps=3)
    g["8"] = loader(attention=attention)
    g["10"]["inputs"]["filename_prefix"] = f"latents/soak{i}"
    return g, (length, seed, attention)


def _cancel(server: ComfyServer, i: int, attention: str) -> str:
    g, _ = _graph(i, attention)
    g["9"]["inputs"]["steps"] = 10000
    pid = server.queue(g)
    end = time.monotonic() + 60
    while not [m for m in server.ws.of_type("progress", pid) if m["node"] == "9" and m["value"] >= 2]:
        if time.monotonic() > end:
            return "never progressed"
        time.sleep(0.05)
    t0 = time.monotonic()
    server.post("/interrupt", {})
    h = server.wait(pid, timeout=60)
    kind = error_of(h).get("kind")
    return f"cancelled in {time.monotonic() - t0:.1f} s" if kind == "execution_interrupted" else f"not cancelled: {kind}"


def _usage(server: ComfyServer) -> dict:
    p = psutil.Process(server.proc.pid)
    return {"workers": len(server.worker_pids()), "fds": p.num_fds(), "rss_mb": p.memory_info().rss / 2**20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=50)
    args = ap.parse_args(argv)
    if not COMFY:
        sys.stderr.write("COMFYUI_PATH is not set: the soak needs a ComfyUI checkout\n")
        return 2
    base = Path(tempfile.mkdtemp(prefix="dualparal-soak-"))
    server = ComfyServer(base, build_assets(base)).start()
    first: dict[tuple, torch.Tensor] = {}
    failures, usage, attention, t_start = [], {}, "sdpa", time.monotonic()
    try:
        for i in range(1, args.prompts + 1):
            t0 = time.monotonic()
            if i % 20 == 0:
                attention = "sdpa_math" if attention == "sdpa" else "sdpa"  # a changed setting: a new pool
            if i % 25 == 0 and server.worker_pids():
                os.kill(server.worker_pids()[-1], signal.SIGKILL)  # while idle: the next prompt must still work
                time.sleep(1.0)  # idle for a moment (a death at the very start of a prompt fails that prompt)
                what = "killed a worker, then "
            else:
                what = ""
            if i % 10 == 0:
                what += _cancel(server, i, attention)
                ok = what.endswith(" s")
            else:
                g, key = _graph(i, attention)
                h = server.wait(server.queue(g), timeout=240)
                ok = h["status"]["status_str"] == "success"
                if ok:
                    lat = saved_latent(server, h, "10")
                    ref = first.setdefault(key, lat)
                    ok = torch.equal(lat, ref)
                    what += f"{key}: " + ("first" if ref is lat else "equal" if ok else "DIFFERS")
                else:
                    what += f"failed: {str(error_of(h).get('exception_message', error_of(h)))[:300]}"
            if not ok:
                failures.append((i, what))
            if i in (10, args.prompts):
                time.sleep(1.0)
                usage[i] = _usage(server)
            sys.stdout.write(f"{i:3d} {time.monotonic() - t0:5.1f} s  {what}\n")
            sys.stdout.flush()
    finally:
        server.stop()
    u0, u1 = usage.get(10), usage.get(args.prompts)
    if u0 and u1:
        checks = {"workers": u1["workers"] <= BOUNDS["workers"],
                  "fds": u1["fds"] - u0["fds"] <= BOUNDS["fds_growth"],
                  "rss": u1["rss_mb"] - u0["rss_mb"] <= BOUNDS["rss_growth_mb"]}
        failures += [(0, f"{k} grew beyond its bound {BOUNDS}") for k, fine in checks.items() if not fine]
        sys.stdout.write("\n| after prompt | workers | server open files | server RSS (MB) |\n|---|---|---|---|\n")
        for n, u in usage.items():
            sys.stdout.write(f"| {n} | {u['workers']} | {u['fds']} | {u['rss_mb']:.0f} |\n")
    sys.stdout.write(f"\n{args.prompts} prompts in {time.monotonic() - t_start:.0f} s; {len(first)} distinct prompts; "
                     f"failures: {failures or 'none'}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
