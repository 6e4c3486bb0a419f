"""A rank's tie to the process that started it: it exits when that process does, whatever state it is in."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from .. import logger


def die_with_parent(parent_pid: int) -> None:
    """Exit when the parent does: PR_SET_PDEATHSIG (kernel-side, works while this process is stuck in native code)
    plus a thread that watches getppid() (any platform, and the case where the parent died before prctl ran)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError) as exc:
            logger.warning("PR_SET_PDEATHSIG unavailable (%s); relying on the parent watcher thread", exc)

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(70)  # orphaned: nobody will ever read our results, and we may hold a GPU
            time.sleep(0.5)

    if os.getppid() != parent_pid:
        os._exit(70)
    threading.Thread(target=watch, name="dualparal-parent-watch", daemon=True).start()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process of this host."""
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    except Exception:  # noqa: BLE001 - NoSuchProcess and friends
        return False
