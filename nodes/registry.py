"""The live worker groups of this ComfyUI process, keyed by what they were started with.

Same key -> the same live pool (no reload). A new key closes every pool that shares its devices before the new
one starts (two groups never fight over a GPU). Pure: the starter is passed in, so tests use a fake pool.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger("DualParal")


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether two device lists compete: a shared GPU, or both on the CPU (host memory)."""
    if all(d == "cpu" for d in a) and all(d == "cpu" for d in b):
        return True
    return bool(set(a) & set(b))


class PoolRegistry:
    """Pools by key. ``starter(spec)`` starts one; ``before_start(spec)`` runs first (frees ComfyUI's VRAM)."""

    def __init__(self, starter: Callable, before_start: Callable | None = None):
        self._starter = starter
        self._before_start = before_start
        self._pools: dict[tuple, object] = {}
        self._lock = threading.RLock()

    def get(self, key: tuple):
        """The live pool under ``key``, or None."""
        with self._lock:
            pool = self._pools.get(key)
            return pool if pool is not None and pool.alive else None

    def acquire(self, key: tuple, spec, **start_kw):
        """The live pool for ``key``, starting it (after closing competing pools) when there is none."""
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None and pool.alive:
                return pool
            if pool is not None:
                self._close(key, "its workers are gone; starting new ones")
            for other in [k for k, p in self._pools.items() if _overlap(p.spec.devices, spec.devices)]:
                self._close(other, "another model/configuration is being loaded on the same devices")
            if self._before_start is not None:
                self._before_start(spec)
            pool = self._starter(spec, **start_kw)
            self._pools[key] = pool
            return pool

    def release(self, key: tuple, reason: str) -> bool:
        """Close the pool under ``key`` (if any); True if one was closed."""
        with self._lock:
            return self._close(key, reason)

    def close_all(self, reason: str) -> int:
        """Close every pool; returns how many there were."""
        with self._lock:
            keys = list(self._pools)
            for k in keys:
                self._close(k, reason)
            return len(keys)

    def _close(self, key: tuple, reason: str) -> bool:
        pool = self._pools.pop(key, None)
        if pool is None:
            return False
        what = "Detaching from the DualParal group" if hasattr(pool.spec, "address") else "Stopping DualParal workers"
        logger.info("%s (%s): %s", what, ", ".join(pool.spec.devices), reason)
        try:
            pool.close()
        except Exception:  # closing must never mask the caller's own error; the pool logs its own details
            logger.exception("Closing a DualParal worker group failed")
        return True

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for p in self._pools.values() if p.alive)

    @property
    def pools(self) -> list:
        with self._lock:
            return list(self._pools.values())
