"""The timeouts of a worker group (how long a start, a block-step, a heartbeat may take), and the environment
variables that raise them. Imported from :mod:`dualparal_core.config` too."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

#: The documented environment variables of the timeouts a user may need to raise (seconds), by field.
TIMEOUT_ENV: dict[str, str] = {"startup": "DUALPARAL_STARTUP_TIMEOUT", "step": "DUALPARAL_STEP_TIMEOUT",
                               "heartbeat": "DUALPARAL_HEARTBEAT"}


@dataclass(frozen=True)
class Timeouts:
    """Every timing constant of the worker group, in seconds (one place: the parent and the ranks read these)."""

    startup: float = 600.0
    """From spawn until every rank has loaded its weights and reported ready; env DUALPARAL_STARTUP_TIMEOUT."""
    step: float = 300.0
    """Longest silence allowed from a busy, alive group (no progress event) before it is declared hung; env
    DUALPARAL_STEP_TIMEOUT. A frozen rank (no heartbeat) is named sooner, after ``stale_after``."""
    close_grace: float = 5.0
    """After SIGTERM, how long to wait before SIGKILL."""
    heartbeat: float = 2.0
    """Between a busy rank's heartbeats (rank 0 to the parent, the others into the store); env DUALPARAL_HEARTBEAT."""
    poll: float = 0.05
    """How often every blocking wait of the parent checks children, messages and its abort/cancel callbacks."""
    fault_window: float = 1.5
    """After the first sign of a fault, how long to gather the other ranks' reports before naming a root cause."""
    keepalive: float = 30.0
    """While idle, rank 0 broadcasts a no-op at least this often (the control group's collectives time out)."""
    monitor: float = 0.2
    """How often rank 0's fault monitor reads the store and its host's rank pids."""
    connect: float = 10.0
    """Bound on a TCP connect and on the authentication handshake (a firewall dropping packets, a foreign port)."""
    control: float = 6 * 3600.0
    """Timeout of the control group's collectives: the longest a rank may wait for the next op."""
    cancel_grace: float = 1.0
    """After a cancel, how long beyond one block-step (the longest seen in the job) the ranks get to stop; then a
    local pool is torn down and an attached group detached (a rank that does not answer must not hold the queue)."""
    abort_grace: float = 0.3
    """Tearing down ranks that did not answer a cancel: SIGTERM to SIGKILL (nothing is left to save)."""

    @property
    def stale_after(self) -> float:
        """No heartbeat for this long: the process is frozen (SIGSTOP, a GIL-holding native call) or cut off."""
        return 3 * self.heartbeat + 1.0

    @classmethod
    def from_env(cls, env, base: Timeouts | None = None) -> Timeouts:
        """``base`` (default: the defaults) with the TIMEOUT_ENV variables of ``env`` applied to the fields that
        ``base`` leaves at their default (what a caller set explicitly wins). The one place they are read."""
        base = base or cls()
        changes = {}
        for name, var in TIMEOUT_ENV.items():
            raw = str(env.get(var) or "").strip()
            if not raw or getattr(base, name) != getattr(cls, name):
                continue
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{var}={raw!r} must be a positive number of seconds (default "
                                 f"{getattr(cls, name):g}).")
            changes[name] = value
        return replace(base, **changes)
