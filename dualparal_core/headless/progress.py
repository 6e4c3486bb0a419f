"""Progress on stderr for every wait of the headless CLI (tqdm): a ticking clock with the latest status while
workers start and load, and counted bars for tensors loaded, texts encoded, block-steps sampled, frames decoded;
and :func:`say`, the command-line tools' (``generate``, ``demo``, ``bench``) lines on stdout."""

from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm


def say(*parts, sep: str = " ", flush: bool = True) -> None:
    """One line of a command-line tool's output on stdout (what it did, its table), flushed."""
    sys.stdout.write(sep.join(str(p) for p in parts) + "\n")
    if flush:
        sys.stdout.flush()


def bar(desc: str, total: int, unit: str) -> tqdm:
    """A counted bar on stderr."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)


class Waiting:
    """A bar without a count for a wait whose steps are status lines (worker start and load): on a terminal the
    elapsed time ticks every half second with the latest status after it; in a log, one line per status."""

    def __init__(self, desc: str):
        self.desc, self.t0, self.tty = desc, time.monotonic(), sys.stderr.isatty()
        self.bar = tqdm(total=None, desc=desc, file=sys.stderr, bar_format="{desc}: {elapsed} {postfix}",
                        leave=True, disable=not self.tty)
        self._stop = threading.Event()
        self._tick = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.bar.refresh()

    def status(self, text: str) -> None:
        if self.tty:
            self.bar.set_postfix_str(text)
        else:
            sys.stderr.write(f"{self.desc}: {text} ({time.monotonic() - self.t0:.1f} s)\n")
            sys.stderr.flush()

    def __enter__(self) -> Waiting:
        if self.tty:
            self._tick.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._tick.is_alive():
            self._tick.join()
        self.bar.close()


class SampleBar:
    """``on_progress(done, total, preview)`` of :meth:`WorkerPool.generate` as a bar of block-steps."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int, _preview) -> None:
        if self.bar is None:
            self.bar = bar("sampling", total, "block-step")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
