"""The live worker groups of this ComfyUI process, keyed by what they were started with.

Same key -> the same live pool (no reload). A new key closes every pool that shares its devices before the new
one starts (two groups never fight over a GPU), after its inputs passed every check (a bad input never costs a
healthy pool). ``close_all`` (ComfyUI exiting, "Unload models") never waits for a start in progress: it closes what
exists, and the start sees its ``should_abort`` turn true and tears its own ranks down. Pure: the starter is passed
in, so tests use a fake pool.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from dualparal_core.protocol import PoolCancelled

logger = logging.getLogger("DualParal")


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether two device lists compete: a shared GPU, or both on the CPU (host memory)."""
    if all(d == "cpu" for d in a) and all(d == "cpu" for d in b):
        return True
    return bool(set(a) & set(b))


def _describe(spec) -> str:
    model = getattr(spec, "model", None) or spec  # an attach request names its model
    src = getattr(model, "source", None)
    name = os.path.basename(src.path) if src is not None and src.path else "a random model"
    return f"{name} ({getattr(model, 'dtype', '?')}, attention {getattr(model, 'attention', '?')})"


class PoolRegistry:
    """Pools by key. ``starter(spec, **start_kw)`` starts one; ``before_start(spec)`` runs first (frees ComfyUI's
    VRAM); ``check(spec)`` raises ValueError for a spec that cannot start, before any pool is stopped."""

    def __init__(self, starter: Callable, before_start: Callable | None = None, check: Callable | None = None):
        self._starter, self._before_start, self._check = starter, before_start, check
        self._pools: dict[tuple, object] = {}
        self._lock = threading.RLock()  # one acquire (stop the competitors, start) at a time
        self._state = threading.Lock()  # the dict and the epoch: never held across a start or a close
        self._epoch = 0  # close_all() bumps it: a start begun before aborts
        self._evicted: dict[tuple, tuple] = {}  # key -> the key whose start stopped its pool

    def get(self, key: tuple):
        """The live pool under ``key``, or None."""
        with self._state:
            pool = self._pools.get(key)
        return pool if pool is not None and pool.alive else None

    def acquire(self, key: tuple, spec, **start_kw):
        """The live pool for ``key``, starting it (after closing competing pools) when there is none.

        The registry adds its own abort to the caller's ``should_abort`` (a caller passing None opts out): a
        ``close_all`` during the start makes it raise PoolCancelled."""
        if self._check is not None:
            self._check(spec)
        with self._lock:
            pool = self.get(key)
            if pool is not None:
                return pool
            with self._state:
                epoch, dead = self._epoch, self._pools.get(key)
            if dead is not None:
                self._close(key, "its workers are gone; starting new ones" + self._fault(dead))
            self._close_competitors(key, spec)
            if self._before_start is not None:
                self._before_start(spec)
            if start_kw.get("should_abort", ...) is not None:
                start_kw["should_abort"] = self._aborter(epoch, start_kw.get("should_abort"))
            pool = self._starter(spec, **start_kw)
            with self._state:
                kept = self._epoch == epoch
                if kept:
                    self._pools[key] = pool
            if not kept:  # close_all ran while it started, and the start finished anyway
                self._close_pool(pool, "ComfyUI unloaded all models (or is exiting) while it started")
                raise PoolCancelled("starting the DualParal workers was interrupted (ComfyUI unloaded all models "
                                    "or is exiting); they were stopped.")
            return pool

    def _aborter(self, epoch: int, theirs: Callable | None) -> Callable[[], bool]:
        return lambda: self._epoch != epoch or (theirs is not None and theirs())

    def _close_competitors(self, key: tuple, spec) -> None:
        with self._state:
            others = [k for k, p in self._pools.items() if k != key and _overlap(p.spec.devices, spec.devices)]
            pools = {k: self._pools[k] for k in others}
        if others and self._evicted.get(key) in others:  # they stopped us last time; now we stop them
            devices = sorted(set(spec.devices) & {d for k in others for d in pools[k].spec.devices})
            logger.warning(
                "DualParal: two DualParal Loaders with different settings take turns on the same devices (%s): %s "
                "and %s. Each one stops the other's workers, so every prompt reloads the weights. Give each Loader "
                "its own devices, or the same model and settings.", ", ".join(devices or spec.devices),
                _describe(spec), ", ".join(_describe(pools[k].spec) for k in others))
        for other in others:
            self._evicted[other] = key
            self._close(other, "another model/configuration is being loaded on the same devices")

    def release(self, key: tuple, reason: str) -> bool:
        """Close the pool under ``key`` (if any); True if one was closed."""
        return self._close(key, reason)

    def close_all(self, reason: str) -> int:
        """Close every pool, and abort a start in progress without waiting for it; returns how many there were."""
        with self._state:
            self._epoch += 1
            pools, self._pools = self._pools, {}
        for pool in pools.values():
            self._close_pool(pool, reason)
        return len(pools)

    def _close(self, key: tuple, reason: str) -> bool:
        with self._state:
            pool = self._pools.pop(key, None)
        if pool is None:
            return False
        self._close_pool(pool, reason)
        return True

    @staticmethod
    def _close_pool(pool, reason: str) -> None:
        what = "Detaching from the DualParal group" if hasattr(pool.spec, "address") else "Stopping DualParal workers"
        logger.info("%s (%s): %s", what, ", ".join(pool.spec.devices), reason)
        try:
            pool.close()
        except Exception:  # closing must never mask the caller's own error; the pool logs its own details
            logger.exception("Closing a DualParal worker group failed")

    @staticmethod
    def _fault(pool) -> str:
        box = getattr(pool, "_box", None)  # a WorkerPool's session, which kept the fault that ended it
        fault = getattr(box[0], "fault", None) if box else None
        return f" (the fault was: {str(fault).splitlines()[0]})" if fault else ""

    def __len__(self) -> int:
        with self._state:
            pools = list(self._pools.values())
        return sum(1 for p in pools if p.alive)

    @property
    def pools(self) -> list:
        with self._state:
            return list(self._pools.values())
