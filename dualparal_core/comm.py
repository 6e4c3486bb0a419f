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


def init_groups(rank: int, world: int, device: torch.device, init_method: str | None,
                timeout_s: float = 600.0, store: dist.Store | None = None) -> Pipe:
    """Join the worker group and return this rank's pipe (rendezvous through ``init_method`` or a ready ``store``).

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
    kw = {"store": store} if store is not None else {"init_method": init_method}
    if backend == "nccl":
        kw["device_id"] = device
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kw)
    ret = dist.new_group(ranks=list(range(world)), backend=backend) if world > 1 else None
    pipe = Pipe(rank, world, device, ret)
    pipe.warm_up()
    return pipe


def prefer_eager_module_loading() -> None:
    """Load every CUDA kernel when CUDA starts (call before it does, on GPU ranks of a pipeline).

    With torch's default CUDA_MODULE_LOADING=LAZY a kernel's module is loaded at its first launch, and that load
    waits until the whole GPU is idle. A pipeline rank always has a receive in flight whose kernel spins until a
    peer answers, and the peer may be waiting for this rank: the load never finishes (seen on two H200s: rank 0
    stuck in its first time embedding, rank 1 in its first receive). Eager loading moves all loads to start-up; the
    engine's pre-warm covers the kernels that only exist per shape (torch.compile's).
    """
    want = "EAGER"
    have = os.environ.get("CUDA_MODULE_LOADING")
    if have is None:
        os.environ["CUDA_MODULE_LOADING"] = want
    elif have != want:
        logger.warning("keeping the user's CUDA_MODULE_LOADING=%s; a GPU pipeline can deadlock on a lazily loaded "
                       "kernel (DualParal would set %s)", have, want)
    if torch.cuda.is_initialized() and have != want:
        logger.warning("CUDA started before CUDA_MODULE_LOADING=%s could apply; kernels load lazily", want)


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

    def warm_up(self) -> None:
        """Open every link of the pipe in one fixed order and check a known payload crosses it intact.

        NCCL creates a point-to-point communicator on a pair's first send/recv, and that creation is collective:
        if rank 0 first touched the return link while rank 1 first touched the forward link, each would wait for
        the other forever. Walking the pairs in the same order on every rank makes that impossible.
        """
        if self.world == 1:
            return
        for a in range(self.world - 1):  # forward links (a -> a+1), in order
            if self.rank == a:
                dist.isend(torch.full((4,), float(a + 1), device=self.device), a + 1).wait()
            elif self.rank == a + 1:
                self._check(dist.irecv, a, a + 1, None)
        if self.rank == self.world - 1:  # return link (last -> 0)
            dist.isend(torch.full((4,), -1.0, device=self.device), 0, group=self.ret_group).wait()
        elif self.rank == 0:
            self._check(dist.irecv, self.world - 1, -1, self.ret_group)

    def _check(self, op, src: int, want: float, group) -> None:
        buf = torch.zeros(4, device=self.device)
        op(buf, src, group=group).wait() if group is not None else op(buf, src).wait()
        if not bool((buf == want).all()):
            raise RuntimeError(
                f"rank {self.rank}: the link from rank {src} delivered {buf.tolist()} instead of {want}; "
                f"GPU peer-to-peer is broken on this machine. Try NCCL_P2P_DISABLE=1 (or NCCL_SHM_DISABLE=1), "
                f"check the topology with `nvidia-smi topo -m`, or use fewer GPUs.")

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
        # Built from host memory on purpose: the copy waits for the GPU to finish what is queued, which keeps rank 0's
        # host at most one item ahead of its GPU. NCCL holds every sent tensor until its send completes, so a host
        # that ran further ahead would hold more hidden states in memory (the measured runs had this throttle).
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
