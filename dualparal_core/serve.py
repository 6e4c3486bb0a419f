"""A long-lived DualParal worker group started by torchrun, serving the parents that attach to its rank 0.

    cd ComfyUI/custom_nodes/DualParal          # or put this folder on PYTHONPATH
    DUALPARAL_AUTHKEY=<secret> torchrun --nproc-per-node 2 -m dualparal_core.worker --serve 127.0.0.1:29600 \\
        --models-dir ../../models/diffusion_models --models-dir ../../models/loras

Rank 0 listens on ``--serve`` (mutual HMAC with DUALPARAL_AUTHKEY), serves one parent at a time and relays its
messages to the other ranks over a gloo control group (``broadcast_object_list``): only rank 0 talks to the parent.
A parent that leaves (detach, ComfyUI exit or crash) ends nothing: the group keeps its weights and waits for the next.
A model request is loaded by every rank (files found on each host, see :func:`find_file`); a failed load is reported
with the rank, host and traceback and the group keeps serving. A rank that fails mid-job takes the group down
(fail-stop: torchrun stops the others; ``--max-restarts`` brings it back): rank 0 reports the root cause first, from
the other ranks' error reports in the rendezvous store, the pids of ranks on its own host, and heartbeats.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import pickle
import platform
import socket
import sys
import threading
import time
import traceback
from dataclasses import replace
from typing import NoReturn

import torch

from . import __version__, logger
from . import protocol as proto
from .channel import KEY_ENV
from .config import DTYPES, ModelSource, PoolSpec, WanConfig
from .serve_lead import FAULT_WINDOW_S, OP_LOAD, OP_NOOP, LeadRank
from .worker import HOST_MODULES, die_with_parent

CONTROL_TIMEOUT_S = 6 * 3600.0
"""Timeout of the control group's collectives; rank 0 broadcasts a no-op every KEEPALIVE_S while idle, so only a
wedged load or a dead rank 0 ever runs into it."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun ... -m dualparal_core.worker --serve HOST:PORT",
                                description="A long-lived DualParal worker group (one rank per GPU) that ComfyUI's "
                                            "DualParal Loader attaches to with devices=tcp://HOST:PORT.")
    p.add_argument("--serve", required=True, metavar="HOST:PORT",
                   help="where rank 0 listens; a bare PORT means 127.0.0.1 (use 0.0.0.0 only on a trusted network)")
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="folder searched for the model and LoRA files a parent names (repeatable)")
    p.add_argument("--model", help="load this file at start (a path, or a name under --models-dir)")
    p.add_argument("--random-tiny", type=int, metavar="SEED", help="load a tiny random Wan at start (tests)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the start-up model")
    p.add_argument("--attention", default="sdpa", help="attention backend of the start-up model")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto", help="auto: cuda:LOCAL_RANK when there is "
                   "a GPU")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a pipeline send/receive may wait")
    return p.parse_args(argv)


def find_file(path: str, dirs: list[str], host: str) -> str:
    """``path`` as it is on this host, else its trailing components (longest first) under one of ``dirs``: a path
    of the ComfyUI host (``.../ComfyUI/models/loras/wan/x.safetensors``) finds ``DIR/wan/x.safetensors``."""
    p = os.path.expanduser(str(path))
    if os.path.isfile(p):
        return os.path.realpath(p)
    parts = [x for x in p.replace("\\", "/").split("/") if x not in ("", ".", "..")]
    for d in dirs:
        for i in range(max(0, len(parts) - 4), len(parts)):
            cand = os.path.join(os.path.expanduser(d), *parts[i:])
            if os.path.isfile(cand):
                return os.path.realpath(cand)
    raise FileNotFoundError(f"{path!r} is not on host {host} (searched {dirs or 'no --models-dir'}): copy the file "
                            f"there, or start the group with --models-dir pointing at the folder that holds it.")


class GroupRank(LeadRank):
    """One rank of a torchrun-started group; rank 0 also owns the listener, the parent and the fault monitor."""

    def __init__(self, args: argparse.Namespace, env, key: bytes):
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        super().__init__({**env, "DUALPARAL_RANK": str(rank), "DUALPARAL_WORLD": str(world)})
        self.args, self.key, self.local_rank = args, key, int(env.get("LOCAL_RANK", "0"))
        self.host, self.dev = socket.gethostname(), torch.device("cpu")
        self.pipe = self.ctl = self.kv = self.stage = self.engine = self.loaded = None
        self.infos: list[dict] = []
        self.peers: list[dict] = []
        self.load_info: dict = {}
        self.client, self._lost, self._beats = None, False, {}
        self._fail_lock = threading.Lock()

    # ------------------------------------------------------------------ start
    def run(self) -> NoReturn:
        self.fire("startup")
        if self.world > 1 and self.args.device != "cpu":  # before anything starts CUDA (see the function)
            from .comm import prefer_eager_module_loading

            prefer_eager_module_loading()
        if self.args.device == "auto" and torch.cuda.is_available():
            n = torch.cuda.device_count()
            if self.local_rank >= n:
                raise RuntimeError(f"local rank {self.local_rank} has no GPU: host {self.host} has {n}; start at "
                                   f"most --nproc-per-node {n} here.")
            self.dev = torch.device(f"cuda:{self.local_rank}")
            torch.cuda.set_device(self.dev)
        self.device = str(self.dev)
        if self.rank == 0:
            self._listen()  # before the rendezvous: a taken port fails at once
        self._join()
        threading.Thread(target=self._beat, name="dualparal-heartbeat", daemon=True).start()
        if self.rank == 0:
            self._watch()
        if self.args.random_tiny is not None or self.args.model:
            src = (ModelSource(random_config=WanConfig.tiny(), random_seed=self.args.random_tiny)
                   if self.args.random_tiny is not None else ModelSource(path=self.args.model))
            err = self._load(PoolSpec(src, devices=("cpu",), dtype=self.args.dtype, attention=self.args.attention))
            if err is not None:
                raise RuntimeError(f"the start-up model did not load on rank {err['rank']} ({err['host']}): "
                                   f"{err['type']}: {err['message']}")
        if self.rank == 0:
            logger.info("DualParal group of %d rank(s) ready, listening on %s", self.world, self.args.serve)
            self._lead()
        else:
            self._follow()

    def _join(self) -> None:
        self.peers = [self._me()]
        if self.world == 1:
            return
        import torch.distributed as dist

        from .comm import init_groups

        timeout = datetime.timedelta(seconds=self.args.timeout)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))  # torchrun's MASTER_ADDR/PORT, RANK, ...
        self.pipe = init_groups(self.rank, self.world, self.dev, None, timeout_s=self.args.timeout, store=store)
        self.group = True
        self.ctl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT_S))
        # a client of its own for error reports and heartbeats (threads), under a prefix per torchrun restart
        kv = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=datetime.timedelta(seconds=60))
        self.kv = dist.PrefixStore(f"dualparal/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", kv)
        self.kv.set(f"hb/{self.rank}", pickle.dumps({"n": 0}))
        self.peers = self._all_gather(self._me())

    def _me(self) -> dict:
        return {"rank": self.rank, "host": self.host, "pid": os.getpid(), "device": self.device,
                "local_rank": self.local_rank}

    # ------------------------------------------------------------------ control group
    def _bcast(self, msg: dict | None = None) -> dict:
        if self.world == 1:
            return msg
        import torch.distributed as dist

        box = [msg]
        dist.broadcast_object_list(box, src=0, group=self.ctl, device=torch.device("cpu"))
        return box[0]

    def _all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.ctl)
        return out

    def _follow(self) -> NoReturn:
        while True:
            msg = self._bcast()
            if msg["op"] == OP_LOAD:
                self._load(msg["model"])
            elif msg["op"] == proto.OP_JOB:
                self._job(msg["job"], msg["payload"])
            elif msg["op"] != OP_NOOP:
                raise RuntimeError(f"unknown group message {msg['op']!r}")

    # ------------------------------------------------------------------ model
    def _load(self, model: PoolSpec | None) -> dict | None:
        """Every rank: hold ``model`` (reload only when it or a file changed); returns the first rank's error."""
        from .runtime import build_stage

        self.phase, self.busy = "load", True
        try:
            if model is None:
                if self.loaded is None:
                    raise RuntimeError("the group holds no model: attach with one (the Loader sends its unet_name), "
                                       "or start the group with --model NAME.")
            else:
                spec = self._resolve(model)
                files = [spec.source.path, getattr(spec.source, "low_noise_path", None)]
                files += [e[0] for e in spec.source.loras]
                key = (spec, tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files if f))
                if key != self.loaded:
                    self._drop()
                    if self.rank == 0:
                        self.send(proto.OP_STATUS, phase="load", text="loading weights")
                    stage, self.load_info = build_stage(spec, self.rank, self.dev)
                    self.load_count += 1
                    self.fire("load")
                    self._install(stage, spec)
                    self.loaded = key
            mine = {"ok": True, **self._info()}
        except Exception as exc:  # noqa: BLE001 - reported to the parent; the group keeps serving
            self._drop()
            mine = {"ok": False, **self._report(exc, "load")}
        finally:
            self.phase, self.busy = "idle", False
        everyone = self._all_gather(mine)
        bad = [m for m in everyone if not m["ok"]]
        if not bad and any(m["config"] != everyone[0]["config"] for m in everyone):
            m = next(m for m in everyone if m["config"] != everyone[0]["config"])
            bad = [{**m, "phase": "load", "type": "ValueError", "traceback": "", "message": (
                f"the model file on host {m['host']} differs from rank 0's on {everyone[0]['host']} "
                f"({m['config']} vs {everyone[0]['config']}); put the same file on every host.")}]
        if bad:
            self._drop()
            return bad[0]
        self.infos = everyone
        return None

    def _resolve(self, model: PoolSpec) -> PoolSpec:
        """The request with its files found on this host and this group's ranks (only their number matters to
        build_stage, which gets the real device: GPU names may repeat across hosts, PoolSpec forbids that)."""
        src, dirs, changes = model.source, self.args.models_dir, {}
        if src.path is not None:
            changes["path"] = find_file(src.path, dirs, self.host)
        if getattr(src, "low_noise_path", None) is not None:
            changes["low_noise_path"] = find_file(src.low_noise_path, dirs, self.host)
        if src.loras:
            changes["loras"] = tuple((find_file(e[0], dirs, self.host), *e[1:]) for e in src.loras)
        slots = (("cpu",) * self.world if self.dev.type == "cpu" else tuple(f"cuda:{r}" for r in range(self.world)))
        return replace(model, source=replace(src, **changes), devices=slots)

    def _install(self, stage, spec: PoolSpec) -> None:
        from .engine import RankEngine

        inner = stage.blocks_forward

        def blocks_forward(*args, **kw):
            self.block_step += 1
            self.computing_since = time.monotonic()
            if self.faults:
                self.fire("sample", self.block_step)
            try:
                return inner(*args, **kw)
            finally:
                self.computing_since = None

        stage.blocks_forward = blocks_forward
        self.stage, self.engine = stage, RankEngine(stage, self.pipe, spec.max_in_flight)

    def _drop(self) -> None:
        self.stage = self.engine = self.loaded = None
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()

    def _info(self) -> dict:
        gpu = str(torch.cuda.get_device_properties(self.dev).uuid) if self.dev.type == "cuda" else None
        return {**self._me(), **self.load_info, "world": self.world, "gpu_uuid": gpu, "torch": torch.__version__,
                "python": platform.python_version(), "dualparal": __version__, "load_count": self.load_count,
                "threads": torch.get_num_threads(), "host_modules": [m for m in HOST_MODULES if m in sys.modules]}

    # ------------------------------------------------------------------ jobs (every rank)
    def _job(self, jid: int, job) -> None:
        from .engine import JobCancelled

        self.phase, self.busy, self.block_step, self._cancel = "sample", True, 0, False
        self.job_id, self.done, self.total, self._last_preview = jid, 0, job.num_block_steps, 0.0
        lead, t0, out = self.rank == 0, time.perf_counter(), None
        try:
            out = self.engine.run_job(job, self._progress if lead else None, self._cancelled if lead else None)
            status = proto.OP_RESULT
        except JobCancelled:
            status = proto.OP_CANCELLED
        self.phase, self.busy = "idle", False  # not on errors: the report names the phase they happened in
        mine = {"rank": self.rank, "host": self.host, "status": status, "seconds": time.perf_counter() - t0,
                "jobs_run": self.engine.jobs_run, "load_count": self.load_count, "block_steps": self.block_step,
                **self.engine.last_profile}
        everyone = self._gather(mine)
        if not lead:
            return
        if out is None or any(m["status"] == proto.OP_CANCELLED for m in everyone):
            self.send(proto.OP_CANCELLED, job=jid)
        else:
            self.send(proto.OP_RESULT, job=jid, latents=out, info=everyone, seconds=time.perf_counter() - t0)

    def _gather(self, obj) -> list | None:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.ctl)
        return out

    # ------------------------------------------------------------------ faults
    def _report(self, exc: BaseException, phase: str) -> dict:
        return {"rank": self.rank, "device": self.device, "host": self.host, "phase": phase,
                "type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(),
                "time": time.time()}

    def crash(self, exc: BaseException) -> None:
        """This rank failed: other ranks leave their report in the store for rank 0; rank 0 names the root cause
        (a peer's failure usually reaches it as a communication error) to the parent, then exits."""
        report = self._report(exc, self.phase)
        if self.rank != 0:
            logger.error("rank %d (%s on %s) failed during %s:\n%s", self.rank, self.device, self.host, self.phase,
                         report["traceback"])
            try:
                self.kv.set(f"error/{self.rank}", pickle.dumps(report))
                self.kv.add("errors", 1)
            except Exception:  # noqa: BLE001 - no store: rank 0 names us from our pid or heartbeats
                pass
            return
        end = time.monotonic() + FAULT_WINDOW_S
        while self.kv is not None and time.monotonic() < end:
            fault = self._peer_fault(stale=True)
            if fault is not None:
                self._fail(fault)
            time.sleep(0.1)
        self._fail(report)

    def _beat(self) -> None:
        n = 0
        while True:
            time.sleep(self.heartbeat_s)
            n += 1
            since = self.computing_since
            state = {"n": n, "phase": self.phase, "step": self.block_step,
                     "computing_for": None if since is None else time.monotonic() - since}
            if self.rank != 0:
                try:
                    self.kv.set(f"hb/{self.rank}", pickle.dumps(state))
                except Exception:  # noqa: BLE001 - the store went down with the group
                    return
            elif self.busy and self.conn is not None:
                self.send(proto.OP_STATUS, **{k: v for k, v in state.items() if k != "n"}, peers=self._peer_states())


def main(argv: list[str]) -> int:
    """Serve until the group is stopped; 2 when DUALPARAL_AUTHKEY is missing, 1 after a failure."""
    args = parse_args(argv)
    key = os.environ.get(KEY_ENV, "")
    if not key:
        logger.error("%s is not set. The group only accepts parents that know this secret: export the same value "
                     "where torchrun runs and where ComfyUI runs, e.g. `export %s=$(python -c \"import secrets; "
                     "print(secrets.token_hex(32))\")`.", KEY_ENV, KEY_ENV)
        return 2
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by a torchrun agent: exit with it
        die_with_parent(os.getppid())
    threads = os.environ.get("OMP_NUM_THREADS", "")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                          else max(1, (os.cpu_count() or 1) // local_world))
    rank = GroupRank(args, os.environ, key.encode())
    try:
        rank.run()
    except BaseException as exc:  # noqa: BLE001 - reported with its traceback (rank 0: to the parent)
        rank.crash(exc)
        return 1
    return 0
