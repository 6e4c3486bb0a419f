"""The parent's handle on a worker group: ``WorkerPool.start`` launches a local pool, ``WorkerPool.attach`` joins a
torchrun-started one; both are one :class:`~dualparal_core.client.session.Session` with rank 0 (the local one also
owns its :class:`~dualparal_core.client.launch.Launch`), so sampling, decoding, cancel and faults work alike."""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from . import logger
from .client.launch import Launch, Spawner, sweep_stale_dirs
from .client.sample import SampleOp
from .client.session import Session
from .config import PoolSpec, Timeouts
from .protocol import Job, PoolCancelled, WorkerError
from .runtime import check_spec

__all__ = ["PoolCancelled", "WorkerError", "WorkerPool"]

PACK_ROOT = str(Path(__file__).resolve().parent.parent)
_Spawner = Spawner  # the tests patch its popen to prove a refusal happens before any spawn
_sweep_stale_dirs = sweep_stale_dirs
POLL_S = Timeouts.poll


def child_env(env: dict | None) -> dict[str, str]:
    """The environment of a local pool's ranks: ours, ``env``, the pack on PYTHONPATH, PCI bus order."""
    child = {**os.environ, **(env or {})}
    child["PYTHONPATH"] = os.pathsep.join(
        [PACK_ROOT] + [p for p in child.get("PYTHONPATH", "").split(os.pathsep) if p and p != PACK_ROOT])
    child.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # cuda:N means what nvidia-smi calls GPU N
    return child


def _finalize(session_box: list, launch: Launch | None) -> None:
    if session_box:
        session_box[0].close()
    elif launch is not None:
        launch.teardown(polite=False)


class WorkerPool:
    """A group of ranks holding one model; ``generate`` runs jobs on it until ``close`` (or a fault)."""

    spec: PoolSpec

    @classmethod
    def start(cls, spec: PoolSpec, timeouts: Timeouts = Timeouts(), *,  # noqa: B008 - frozen, never mutated
              env: dict | None = None,
              on_status: Callable[[str], None] | None = None,
              should_abort: Callable[[], bool] | None = None) -> WorkerPool:
        """Validate, start one rank per device and wait until every rank has loaded its slice and is ready.

        Raises ValueError (bad input, before any spawn), WorkerError (a rank failed to start, with its cause),
        TimeoutError (not ready within ``timeouts.startup``) or PoolCancelled (``should_abort()`` turned true);
        nothing is left running after any of them.
        """
        env = child_env(env)
        spec, _ = check_spec(spec, env)
        timeouts = Timeouts.from_env(env, base=timeouts)  # DUALPARAL_*_TIMEOUT where the caller set none
        status = on_status or (lambda s: None)
        launch, box = Launch(spec, timeouts), []
        self = cls._new(spec, timeouts, launch, box)
        t0 = time.monotonic()
        try:
            status(f"starting {spec.world_size} DualParal worker(s) on {', '.join(spec.devices)}")
            launch.start(env)
            port = launch.rank0_port(t0, should_abort)
            session = Session.connect("127.0.0.1", port, launch.key, timeouts, "the local DualParal pool", launch)
            box.append(session)
            session.attach(spec, status, should_abort, t0)
        except BaseException:
            if box:
                box[0].healthy = False
            self.close()
            raise
        logger.info("DualParal pool ready: %d rank(s), pids %s, rendezvous 127.0.0.1:%d and rank 0 at 127.0.0.1:%d "
                    "(loopback only), in %.1f s", spec.world_size, self.pids, launch.store_port, port,
                    time.monotonic() - t0)
        status(f"all {spec.world_size} rank(s) ready")
        return self

    @classmethod
    def attach(cls, target, timeouts: Timeouts = Timeouts(), *,  # noqa: B008 - frozen, never mutated
               authkey: bytes | str | None = None,
               on_status: Callable[[str], None] | None = None,
               should_abort: Callable[[], bool] | None = None) -> WorkerPool:
        """Attach to a group that torchrun started (``-m dualparal_core.worker --serve``): ``target`` is
        ``tcp://HOST:PORT`` or an AttachSpec; the same API, but close() only detaches (the group keeps serving).

        Raises AttachError (nothing listens, wrong key, in use, version mismatch), WorkerError (a rank failed to
        load: the group keeps running), TimeoutError (not ready within ``timeouts.startup``) or PoolCancelled.
        """
        from .attach import START_HINT, AttachSpec
        from .channel import KEY_ENV, check_allowed, load_key, parse_address

        spec = target if isinstance(target, AttachSpec) else AttachSpec(str(target))
        timeouts = Timeouts.from_env(os.environ, base=timeouts)
        host, port = parse_address(spec.address)
        check_allowed(host, port)  # before the key is read or anything is contacted
        hint = ": " + START_HINT.format(env=KEY_ENV, hostport=f"{host}:{port}")
        session = Session.connect(host, port, load_key(authkey), timeouts, f"the DualParal group at {spec.address}",
                                  hint=hint)
        self = cls._new(spec, timeouts, None, [session])
        try:
            (on_status or (lambda s: None))(f"attaching to the DualParal group at {spec.address}")
            session.attach(spec.model, on_status or (lambda s: None), should_abort, time.monotonic())
        except BaseException:
            session.healthy = False
            self.close()
            raise
        return self

    @classmethod
    def _new(cls, spec, timeouts: Timeouts, launch: Launch | None, box: list) -> WorkerPool:
        self = cls.__new__(cls)
        self.spec, self.timeouts, self._launch, self._box = spec, timeouts, launch, box
        self._finalizer = weakref.finalize(self, _finalize, box, launch)  # also runs at interpreter exit
        return self

    # ------------------------------------------------------------------ state
    @property
    def session(self) -> Session:
        return self._box[0]

    @property
    def config(self):
        return self.session.config

    @property
    def ready_info(self) -> list[dict]:
        return self.session.ready_info if self._box else []

    @property
    def job_info(self) -> list[dict]:
        return self.session.job_info

    @property
    def address(self) -> str | None:
        return getattr(self.spec, "address", None)

    @property
    def pids(self) -> list[int]:
        """The local ranks' pids (empty when attached: those ranks are not this process's children)."""
        return [p.pid for p in self._launch.procs] if self._launch is not None else []

    @property
    def alive(self) -> bool:
        return bool(self._box) and self._finalizer.alive and self.session.alive

    @property
    def runtime_dir(self) -> str | None:
        return self._launch.rundir if self._launch is not None else None

    def __repr__(self) -> str:
        where = self.address or list(self.spec.devices)
        return f"WorkerPool({where}, pids={self.pids}, alive={self.alive})"

    # ------------------------------------------------------------------ jobs
    def cancel(self) -> None:
        """Ask the running ``generate`` or decode (from any thread) to stop after the current block-step."""
        if self._box:
            self.session.cancel_flag.set()

    def generate(self, job: Job, on_progress: Callable[[int, int, torch.Tensor | None], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
        """Run ``job`` on every rank; returns the latents [B, C, T, H, W] (float32, CPU).

        Raises ValueError (the job does not fit the model, before any rank sees it), PoolCancelled (the pool
        stays usable), WorkerError or torch.OutOfMemoryError (a rank failed: the pool is closed, build a new one).
        """
        if not isinstance(job, Job):
            raise TypeError(f"expected a dualparal_core.protocol.Job, got {type(job).__name__}")
        if not self.alive:
            if self._box:
                raise self.session.closed_error("sample")  # the fault, naming its rank, when there was one
            raise WorkerError(None, None, "sample", "this pool is closed; start a new one.")
        job.validate(self.config)
        return self.session.run(SampleOp(job, on_progress), should_cancel)

    def close(self) -> None:
        """Detach; a local pool's ranks end (OP_CLOSE, then SIGTERM, grace, SIGKILL) and its files go. Idempotent."""
        self._finalizer()
