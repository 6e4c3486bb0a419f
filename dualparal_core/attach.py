"""What a parent asks of a torchrun-started DualParal group: its address and, optionally, the model it should hold.

The group is a long-lived service (``torchrun ... -m dualparal_core.worker --serve HOST:PORT``, see
:mod:`dualparal_core.rank.program`); ``WorkerPool.attach(AttachSpec(...))`` attaches to its rank 0 through the same
client session as a local pool, but ``close()`` only detaches: the ranks keep their weights and wait for the next
attach. Both ends authenticate with the secret in ``DUALPARAL_AUTHKEY`` (multiprocessing's HMAC challenge; the
channel carries pickles, so the key is as good as a login on the group's hosts).
"""

from __future__ import annotations

from dataclasses import dataclass

from .channel import parse_address
from .config import PoolSpec
from .protocol import AttachError

__all__ = ["AttachError", "AttachSpec", "parse_address"]

START_HINT = ("start one with `{env}=<secret> torchrun --nproc-per-node <GPUs> -m dualparal_core.worker --serve "
              "{hostport} --models-dir <folder with the model files>` from the DualParal pack folder (docs/NODES.md, "
              "'Attach to a torchrun group')")


@dataclass(frozen=True)
class AttachSpec:
    """What to ask of a torchrun-started group: its address and, optionally, the model it should hold."""

    address: str
    """``tcp://HOST:PORT``, the group's ``--serve`` address."""
    model: PoolSpec | None = None
    """Model files, LoRAs, dtype, attention, ...; the group loads it (or keeps it, when it already holds exactly
    this) before the attach completes. Files are found on each host as they are named, else by their trailing path
    components under the group's ``--models-dir`` folders. ``model.devices`` is ignored: the ranks run where
    torchrun started them. None: use what the group holds (its ``--model``)."""

    def __post_init__(self) -> None:
        host, port = parse_address(self.address)
        object.__setattr__(self, "address", f"tcp://{host}:{port}")

    @property
    def devices(self) -> tuple[str, ...]:
        """One entry, the address: two specs on one address compete (a group serves one parent at a time)."""
        return (self.address,)
