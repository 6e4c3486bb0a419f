"""Release the worker groups once the graph has moved on: "a deleted Loader releases its pool".

ComfyUI tells no one that a node was deleted from the canvas, and its output cache is no signal either: it drops a
Loader's cached output whenever the next prompt's graph differs, so two graphs that share one Loader would reload
the weights between them. What ComfyUI does tell: every prompt queued (``PromptServer``'s on-prompt handlers, which
see the graph before validation) and the prompts it runs or holds pending (its ``PromptQueue``).

The rule: **the last graph queued decides.** When it has no DualParal Loader (the Loader was deleted, muted, or
another workflow was queued), every pool is released as soon as no running or pending prompt has a Loader; a graph
with a Loader queued before that keeps them. A pool is therefore never released while a prompt that can use it is
queued or running: that prompt's Loader (or its Sampler, when ComfyUI cached the Loader) is the only code that
acquires a pool, and it runs while its prompt is in the running list.

One race is left by that: the check of the queue and the release are not atomic with ComfyUI taking a new prompt.
``barrier`` closes it: whoever acquires a pool waits there for a release in progress, which then runs to its end
before the new pool starts. Pure: ComfyUI's queue and the registry's release are passed in, so CI tests it without
ComfyUI.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

logger = logging.getLogger("DualParal")

LOADER_NODE = "DualParalLoader"  # the Loader's node id (its class_type in a queued graph)
REASON = "the last prompt queued has no DualParal Loader (it was deleted, or another workflow runs)"


def uses_loader(prompt: object) -> bool:
    """Whether a queued graph (ComfyUI's API format: node id -> {"class_type": ..., "inputs": ...}) has a Loader."""
    if not isinstance(prompt, dict):
        return False
    return any(isinstance(node, dict) and node.get("class_type") == LOADER_NODE for node in prompt.values())


class GraphWatch:
    """``queued()`` -> the graphs ComfyUI is running or holds pending; ``release(reason)`` closes every pool.

    ``on_prompt`` is registered as a PromptServer on-prompt handler. A graph without a Loader arms the watch, one
    with a Loader disarms it; while armed, a thread polls ``queued()`` every ``poll_s`` and releases once none of
    them has a Loader, then disarms."""

    def __init__(self, queued: Callable[[], Iterable[object]], release: Callable[[str], object],
                 poll_s: float = 0.5):
        self._queued, self._release, self._poll_s = queued, release, poll_s
        self._cond = threading.Condition()  # the armed flag and the thread
        self._armed = False
        self._thread: threading.Thread | None = None
        self._releasing = threading.Lock()  # held from the queue check through the release

    def on_prompt(self, json_data):
        """The on-prompt handler: notes whether the graph just queued has a Loader; returns ``json_data`` as is."""
        prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
        if not isinstance(prompt, dict):  # not a graph: ComfyUI answers it with its own error
            return json_data
        with self._cond:
            self._armed = not uses_loader(prompt)
            if self._armed and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dualparal-graph-watch", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return json_data

    def barrier(self) -> None:
        """Wait for a release in progress to end (call it before acquiring a pool)."""
        with self._releasing:
            pass

    @property
    def armed(self) -> bool:
        with self._cond:
            return self._armed

    def poll(self) -> bool:
        """One check: release if armed and no running or pending graph has a Loader. True if it released."""
        with self._releasing:
            with self._cond:
                if not self._armed:
                    return False
                try:
                    busy = any(uses_loader(p) for p in self._queued())
                except Exception:  # ComfyUI's queue changed shape: keep the pools rather than guess
                    logger.exception("DualParal: reading ComfyUI's prompt queue failed; the workers are kept")
                    self._armed = False
                    return False
                if busy:
                    return False
                self._armed = False
            try:
                self._release(REASON)
            except Exception:
                logger.exception("DualParal: releasing the workers of a Loader that left the graph failed")
            return True

    def _run(self) -> None:
        while True:
            self.poll()
            with self._cond:
                if not self._armed:
                    self._thread = None
                    return
                self._cond.wait(self._poll_s)
