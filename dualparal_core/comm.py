"""Process groups and the point-to-point pipe between neighbouring ranks (NCCL on CUDA, gloo on CPU).

Two groups carry the pipeline: the world group for the forward direction (rank r -> r+1) and a second group for
the return of velocities (last rank -> rank 0). With two ranks both directions join the same pair of processes;
separate groups give them separate NCCL communicators and streams, so a forward send can never queue behind a
return receive (which would deadlock a two-stage pipeline).
"""

from __future__ import annotations

import datetime
import os
from collections import deque

import torch
import torch.distributed as dist

from . import logger

HEADER_STOP = -1


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_groups(rank: int, world: int, device: torch.device, init_method: str,
                timeout_s: float = 600.0) -> Pipe:
    """Join the worker group and return this rank's pipe.

    NCCL fault settings: async error handling (a failed or timed-out collective tears the process down instead of
    hanging it), set only where the user has not chosen otherwise.
    """
    backend = backend_for(device)
    if backend == "nccl":
        for k, v in (("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3"), ("NCCL_NVLS_ENABLE", "0"),
                     ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
            if k in os.environ and os.environ[k] != v:
                logger.warning("keeping the user's %s=%s (DualParal would set %s)", k, os.environ[k], v)
            os.environ.setdefault(k, v)
    kw = {}
    if backend == "nccl":
        kw["device_id"] = device
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kw)
    ret = dist.new_group(ranks=list(range(world)), backend=backend) if world > 1 else None
    return Pipe(rank, world, device, ret)


def destroy_groups() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Pipe:
    """Sends hidden states along the pipeline and velocities back to rank 0, without host round trips on GPU."""

    def __init__(self, rank: int, world: int, device: torch.device, ret_group=None):
        self.rank, self.world, self.device, self.ret_group = rank, world, device, ret_group
        self._sends: deque = deque()

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world - 1

    def _keep(self, work, *tensors) -> None:
        # A send's tensors must stay alive until it completes (gloo reads them asynchronously).
        self._sends.append((work, tensors))
        while len(self._sends) > 8:
            w, _ = self._sends.popleft()
            w.wait()

    def flush(self) -> None:
        while self._sends:
            w, _ = self._sends.popleft()
            w.wait()

    def send_next(self, header: int, h: torch.Tensor | None = None) -> None:
        """Header (item index, or HEADER_STOP) and, unless stopping, the hidden states to rank + 1."""
        hdr = torch.tensor([header], dtype=torch.int64, device=self.device)
        self._keep(dist.isend(hdr, self.rank + 1), hdr)
        if h is not None:
            self._keep(dist.isend(h, self.rank + 1), h)

    def recv_header(self) -> int:
        hdr = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.irecv(hdr, self.rank - 1).wait()
        return int(hdr.item())

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.irecv(buf, self.rank - 1).wait()
        return buf

    def send_first(self, v: torch.Tensor) -> None:
        """Velocity of a block's own frames, last rank -> rank 0."""
        self._keep(dist.isend(v, 0, group=self.ret_group), v)

    def irecv_last(self, shape: tuple[int, ...]):
        """Post the receive of a velocity from the last rank; returns (work, buffer)."""
        buf = torch.empty(shape, dtype=torch.float32, device=self.device)
        return dist.irecv(buf, self.world - 1, group=self.ret_group), buf
