"""The one rank program: every DualParal rank, of a local pool or of a torchrun-started group, runs this.

    torchrun --nproc-per-node 2 -m dualparal_core.worker --serve 127.0.0.1:29600 --models-dir DIR   # a service
    python -m dualparal_core.worker --serve 127.0.0.1:0 --exit-on-detach --device cuda:1            # a local pool

A local pool is a torchrun-style group that the parent launched itself (:mod:`dualparal_core.client.launch`): the
parent plays torchrun's agent (it hosts the rendezvous store on loopback and sets RANK, WORLD_SIZE, MASTER_ADDR,
...), then attaches to rank 0 like any other client. So there is one way to join (env://), one control group
(gloo, rank 0 broadcasts the parent's ops), one fault monitor (rank 0, :mod:`.lead`), and every op (load, sample,
decode) works on both. Only rank 0 talks to the parent, except for Block Decode's frames, which each rank sends on
its own authenticated connection (:mod:`.decode`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import socket
import sys
import threading
import time
import traceback
from dataclasses import replace

import torch

from .. import __version__, logger
from .. import protocol as proto
from ..channel import KEY_ENV
from ..config import ModelSource, PoolSpec, Timeouts, WanConfig
from .cli import find_file, parse_args
from .decode import DecodeState, serve_decode
from .life import die_with_parent

HOST_MODULES = ("comfy", "nodes", "server", "folder_paths")
"""Modules of a ComfyUI process: a rank that has any of them imported was started the wrong way."""


class Rank:
    """One rank: its device, the groups, the loaded stage, the op loop; rank 0 also owns a :class:`Lead`."""

    def __init__(self, args: argparse.Namespace, env, key: bytes):
        self.args, self.env, self.key = args, env, key
        self.rank, self.world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.timeouts = Timeouts.from_env(env)
        self.pool_id = env.get("DUALPARAL_POOL_ID")
        self.host, self.dev, self.device = socket.gethostname(), torch.device("cpu"), "cpu"
        self.phase, self.busy, self.block_step, self.computing_since = "startup", False, 0, None
        self.pipe = self.ctl = self.kv = self.stage = self.engine = self.loaded = None
        self.group, self.load_count, self.load_info = False, 0, {}
        self.peers: list[dict] = []
        self.infos: list[dict] = []
        self.decode_state = DecodeState()
        self.lead = None

    # ------------------------------------------------------------------ start
    def run(self) -> None:
        self._bind_device()
        if self.rank == 0:
            from .lead import Lead

            self.lead = Lead(self)
            self.lead.listen()  # before the rendezvous: a taken port fails at once
        # from here on: rank 0 beats to the parents that wait for it (through the rendezvous and the start-up
        # model too); the others beat into the store once they joined
        threading.Thread(target=self._beat, name="dualparal-heartbeat", daemon=True).start()
        self._join()
        if self.lead is not None:
            self.lead.watch()
        self._startup_model()
        if self.lead is not None:
            self.lead.publish_port()
            logger.info("DualParal group of %d rank(s) ready, listening on %s:%d", self.world,
                        *self.lead.address)
            self.lead.serve_forever()
            self.bcast({"op": proto.OP_EXIT})
        else:
            self.follow()

    def _bind_device(self) -> None:
        want = self.args.device
        if self.world > 1 and want != "cpu":  # before anything starts CUDA (see the function)
            from ..comm import prefer_eager_module_loading

            prefer_eager_module_loading()
        if want == "auto" and torch.cuda.is_available():
            n = torch.cuda.device_count()
            if self.local_rank >= n:
                raise RuntimeError(f"local rank {self.local_rank} has no GPU: host {self.host} has {n}; start at "
                                   f"most --nproc-per-node {n} here.")
            self.dev = torch.device(f"cuda:{self.local_rank}")
        elif want not in ("auto", "cpu"):
            self.dev = torch.device(want)
        if self.dev.type == "cuda":
            torch.cuda.set_device(self.dev)
        self.device = str(self.dev)

    def _join(self) -> None:
        """env:// as torchrun sets it (a local pool's parent sets the same variables and hosts the store)."""
        self.peers = [self._me()]
        if "MASTER_ADDR" not in self.env:
            return  # a lone rank started by hand: no store, no group
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.args.timeout)
        addr, port = self.env["MASTER_ADDR"], int(self.env["MASTER_PORT"])
        # a client of its own for error reports, heartbeats and rank 0's port, under a prefix per torchrun restart
        kv = dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=60))
        self.kv = dist.PrefixStore(f"dualparal/{self.env.get('TORCHELASTIC_RESTART_COUNT', '0')}", kv)
        self.kv.set(f"hb/{self.rank}", proto.write_store("beat", self._beat_state(0)))
        if self.world == 1:
            return
        from ..comm import init_groups

        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        self.pipe = init_groups(self.rank, self.world, self.dev, None, timeout_s=self.args.timeout, store=store)
        self.group = True
        self.ctl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeouts.control))
        self.peers = self.all_gather(self._me())

    def _me(self) -> dict:
        return {"rank": self.rank, "host": self.host, "pid": os.getpid(), "device": self.device,
                "local_rank": self.local_rank}

    def _startup_model(self) -> None:
        a = self.args
        if a.random_tiny is None and not a.model:
            return
        src = (ModelSource(random_config=WanConfig.tiny(), random_seed=a.random_tiny) if a.random_tiny is not None
               else ModelSource(path=a.model))
        err = self.load(PoolSpec(src, devices=("cpu",), dtype=a.dtype, attention=a.attention))
        if err is not None:
            raise RuntimeError(f"the start-up model did not load on rank {err['rank']} ({err['host']}): "
                               f"{err['type']}: {err['message']}")

    # ------------------------------------------------------------------ control group
    def bcast(self, msg: dict | None = None) -> dict:
        if self.world == 1:
            return msg
        import torch.distributed as dist

        box = [msg]
        dist.broadcast_object_list(box, src=0, group=self.ctl, device=torch.device("cpu"))
        return box[0]

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.ctl)
        return out

    def gather(self, obj) -> list | None:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.ctl)
        return out

    def follow(self) -> None:
        """Ranks 1..N-1: do what rank 0 broadcasts, until it ends the group."""
        while True:
            msg = self.bcast()
            op = msg["op"]
            if op == proto.OP_LOAD:
                self.load(msg["model"])
            elif op == proto.OP_JOB:
                self.job(msg["job"], msg["payload"])
            elif op == proto.OP_DECODE:
                serve_decode(self, msg)
            elif op == proto.OP_EXIT:
                return
            elif op != proto.OP_NOOP:
                raise RuntimeError(f"unknown group message {op!r}")

    # ------------------------------------------------------------------ model
    def load(self, model: PoolSpec | None) -> dict | None:
        """Every rank: hold ``model`` (reload only when it or a file changed); returns the first rank's error."""
        self.phase, self.busy = "load", True
        try:
            if model is None:
                if self.loaded is None:
                    raise RuntimeError("the group holds no model: attach with one (the Loader sends its unet_name), "
                                       "or start the group with --model NAME.")
            else:
                spec = self._resolve(model)
                files = [spec.source.path, spec.source.low_noise_path, *(e[0] for e in spec.source.loras)]
                key = (spec, tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files if f))
                if key != self.loaded:
                    self._drop()
                    if self.lead is not None:
                        self.lead.send(proto.OP_STATUS, phase="load", text="loading weights")
                    self._install(self.build(spec), spec)
                    self.load_count += 1
                    self.loaded = key
            mine = {"ok": True, **self._info()}
        except Exception as exc:  # noqa: BLE001 - reported to the parent; the group keeps serving
            self._drop()
            mine = {"ok": False, **self.report(exc, "load")}
        finally:
            self.phase, self.busy = "idle", False
        return self._agree(self.all_gather(mine))

    def _agree(self, everyone: list[dict]) -> dict | None:
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

    def build(self, spec: PoolSpec):
        """This rank's slice of ``spec``'s model on its device (a seam: tests wrap it to inject load faults)."""
        from ..runtime import build_stage

        stage, self.load_info = build_stage(spec, self.rank, self.dev)
        return stage

    def _resolve(self, model: PoolSpec) -> PoolSpec:
        """The request with its files found on this host and this group's ranks (only their number matters to
        build_stage, which gets the real device: GPU names may repeat across hosts, PoolSpec forbids that)."""
        src, dirs, changes = model.source, self.args.models_dir, {}
        if src.path is not None:
            changes["path"] = find_file(src.path, dirs, self.host)
        if src.low_noise_path is not None:
            changes["low_noise_path"] = find_file(src.low_noise_path, dirs, self.host)
        if src.loras:
            changes["loras"] = tuple((find_file(e[0], dirs, self.host), *e[1:]) for e in src.loras)
        slots = (("cpu",) * self.world if self.dev.type == "cpu" else tuple(f"cuda:{r}" for r in range(self.world)))
        return replace(model, source=replace(src, **changes), devices=slots)

    def _install(self, stage, spec: PoolSpec) -> None:
        from ..engine import RankEngine

        inner = stage.blocks_forward

        def blocks_forward(*args, **kw):
            self.block_step += 1
            self.computing_since = time.monotonic()  # a heartbeat naming a long compute identifies a hung rank
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
                "threads": torch.get_num_threads(), "host_modules": [m for m in HOST_MODULES if m in sys.modules],
                "pool_id": self.pool_id, "store_port": int(self.env["MASTER_PORT"]) if self.kv else None,
                "heartbeat": self.timeouts.heartbeat, "in_flight": getattr(self.engine, "max_in_flight", None)}

    # ------------------------------------------------------------------ jobs (every rank)
    def job(self, jid: int, job) -> None:
        from ..engine import JobCancelled

        self.phase, self.busy, self.block_step = "sample", True, 0
        lead, t0, out = self.lead, time.perf_counter(), None
        if lead is not None:
            lead.begin(jid, job.num_block_steps)
        try:
            out = self.engine.run_job(job, lead.progress if lead else None, lead.cancelled if lead else None)
            status = proto.OP_RESULT
        except JobCancelled:
            status = proto.OP_CANCELLED
        self.phase, self.busy = "idle", False  # not on errors: the report names the phase they happened in
        mine = {"rank": self.rank, "host": self.host, "status": status, "seconds": time.perf_counter() - t0,
                "jobs_run": self.engine.jobs_run, "load_count": self.load_count, "block_steps": self.block_step,
                **getattr(self.engine, "last_profile", {})}
        everyone = self.gather(mine)
        if lead is None:
            return
        if out is None or any(m["status"] == proto.OP_CANCELLED for m in everyone):
            lead.send(proto.OP_CANCELLED, job=jid)
        else:
            lead.send(proto.OP_RESULT, job=jid, latents=out, info=everyone, seconds=time.perf_counter() - t0)

    # ------------------------------------------------------------------ heartbeats and faults
    def _beat_state(self, n: int) -> dict:
        since = self.computing_since
        return {"n": n, "phase": self.phase, "step": self.block_step,
                "computing_for": None if since is None else time.monotonic() - since}

    def _beat(self) -> None:
        n = 0
        while True:
            time.sleep(self.timeouts.heartbeat)
            n += 1
            state = self._beat_state(n)
            if self.lead is not None:
                self.lead.beat(state)
            elif self.kv is not None:
                try:
                    self.kv.set(f"hb/{self.rank}", proto.write_store("beat", state))
                except Exception:  # noqa: BLE001 - the store went down with the group
                    return

    def report(self, exc: BaseException, phase: str) -> dict:
        return {"rank": self.rank, "device": self.device, "host": self.host, "phase": phase,
                "type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(),
                "time": time.time()}

    def crash(self, exc: BaseException) -> None:
        """This rank failed: other ranks leave their report in the store for rank 0; rank 0 names the root cause
        (a peer's failure usually reaches it as a communication error) to the parent, then exits."""
        report = self.report(exc, self.phase)
        if self.lead is not None:
            self.lead.crash(report)
        logger.error("rank %d (%s on %s) failed during %s:\n%s", self.rank, self.device, self.host, self.phase,
                     report["traceback"])
        try:
            self.kv.set(f"error/{self.rank}", proto.write_store("report", report))
            self.kv.add("errors", 1)
        except Exception:  # noqa: BLE001 - no store: rank 0 names us from our pid or heartbeats
            pass


def main(argv: list[str], rank_class: type[Rank] = Rank) -> int:
    """Serve until the group ends (0); 2 when DUALPARAL_AUTHKEY is missing, 1 after a failure."""
    args = parse_args(argv)
    key = os.environ.get(KEY_ENV, "")
    if not key:
        logger.error("%s is not set. The group only accepts parents that know this secret: export the same value "
                     "where torchrun runs and where ComfyUI runs, e.g. `export %s=$(python -c \"import secrets; "
                     "print(secrets.token_hex(32))\")`.", KEY_ENV, KEY_ENV)
        return 2
    parent = os.environ.get("DUALPARAL_PARENT_PID")
    if parent or "TORCHELASTIC_RUN_ID" in os.environ:  # a local pool's parent, or a torchrun agent: exit with it
        die_with_parent(int(parent) if parent else os.getppid())
    threads = os.environ.get("OMP_NUM_THREADS", "")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                          else max(1, (os.cpu_count() or 1) // local_world))
    rank = rank_class(args, os.environ, key.encode())
    try:
        rank.run()
    except BaseException as exc:  # noqa: BLE001 - reported with its traceback (rank 0: to the parent)
        rank.crash(exc)
        return 1  # no teardown: the groups may be wedged; the parent or torchrun ends the others
    if rank.group:
        try:
            from ..comm import destroy_groups

            destroy_groups()
        except Exception as exc:  # noqa: BLE001 - teardown must finish; the parent kills us anyway
            logger.warning("rank %d: destroy_process_group failed: %s", rank.rank, exc)
    return 0
