"""How a block keeps the right-context K/V its older neighbour reads (``PoolSpec.kv_cache``).

A block-step keeps, for every layer of its rank, the raw projected keys and values of its first K frames
(:meth:`WanStage._layer`, ``keep``); the next block-step of the older neighbour appends them to its own keys and
values. At S1 (1.3B, K = 8, CFG) that cache is 4.28 GiB on one GPU, the largest item of memory (the weights are 2.65
GiB; ``dualparal_core.memplan``), and 19 GiB for 14B.

- ``exact`` (default): kept as computed, in the compute dtype. N ranks give the same bits as one.
- ``offload`` (opt-in): kept exactly, in pinned host memory (:class:`HostEntry`): each layer's slice is copied to
  the host on a copy stream as soon as it is computed, and back one layer before it is read, so the GPU holds a few
  layers of it instead of all (S1: 4.28 GiB -> about 0.6 GiB), for the PCIe traffic of the cache (S1: 4.6 GB each
  way per block-step, beside the kernels on the copy engines: +0.2 % per block-step on an H100) and pinned host RAM
  (each kept tensor rounded up to a power of two by PyTorch's pinned allocator: S1 7.5 GiB). The same bits as
  ``exact``.
- ``fp8`` (opt-in): kept in float8 e4m3 with one float32 scale per token (row), so that each token's largest
  magnitude is e4m3's largest finite value (448), and turned back into the compute dtype when read. Half the bytes;
  each kept value is rounded to within 1/16 of itself (3 mantissa bits; tests/test_kvcache.py bounds it). Only the
  keys and values of the K right-context frames are rounded: a block's own tokens and its queries are exact. N ranks
  still give the same bits as one (the rounding is the same on every rank).

An entry is a tuple, ``(k, v)`` (exact) or ``(k8, v8, k_scale, v_scale)`` (fp8), or a :class:`HostEntry`
(offload); :func:`tokens` reads its length, :func:`load` its values.
"""

from __future__ import annotations

import os
from collections import deque

import torch

from .fp8 import quantise_rows
from .memplan import pinned_bytes


def keep_exact(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kept slice as computed (its own storage, so the window's tensors can be freed)."""
    return k.contiguous(), v.contiguous()


def quantise_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, n, dim] -> (e4m3 [b, n, dim], float32 scale [b, n, 1]); x ~= values * scale: the fp8 GEMMs' row-wise
    quantisation (:func:`~dualparal_core.fp8.quantise_rows`), one row per token."""
    q, scale = quantise_rows(x)
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)


def keep_fp8(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kept slice in e4m3 with a scale per token: (k8, v8, k_scale, v_scale)."""
    (k8, ks), (v8, vs) = quantise_tokens(k), quantise_tokens(v)
    return k8, v8, ks, vs


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The device's stream for the cache's copies (one per device and process, beside the compute stream)."""
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class HostEntry:
    """One layer's kept K/V in pinned host memory (``kv_cache="offload"``).

    Made on the compute stream's order: the slice is made contiguous there (a transient of the slice's size, as the
    exact cache makes), then copied to pinned host memory on the copy stream once the compute stream has produced
    it; :meth:`prefetch` brings it back on the copy stream, and :meth:`load` makes the compute stream wait for that
    copy alone. The caching allocators keep every buffer until the copy that reads it has run (``record_stream``;
    the host allocator records the copies' events itself). On a CPU rank there is nothing to move: the entry holds
    its own copy, as ``exact`` does."""

    __slots__ = ("k", "v", "device", "_back", "_pinned")

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.device, self._back, self._pinned = k.device, None, 0
        kc, vc = k.contiguous(), v.contiguous()
        if k.device.type != "cuda":
            self.k, self.v = kc, vc
            return
        self._pinned = pinned_bytes(kc.numel() * kc.element_size()) + pinned_bytes(vc.numel() * vc.element_size())
        PINNED["live"] += self._pinned
        PINNED["peak"] = max(PINNED["peak"], PINNED["live"])
        side = _copy_stream(k.device)
        side.wait_stream(torch.cuda.current_stream(k.device))
        with torch.cuda.stream(side):
            self.k = torch.empty(kc.shape, dtype=kc.dtype, pin_memory=True).copy_(kc, non_blocking=True)
            self.v = torch.empty(vc.shape, dtype=vc.dtype, pin_memory=True).copy_(vc, non_blocking=True)
        kc.record_stream(side)
        vc.record_stream(side)

    def __del__(self):
        PINNED["live"] -= self._pinned

    @property
    def nbytes(self) -> int:
        """Host bytes held."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def prefetch(self) -> None:
        """Start copying the entry back to its device (on the copy stream; once)."""
        if self.device.type != "cuda" or self._back is not None:
            return
        side = _copy_stream(self.device)
        with torch.cuda.stream(side):
            k = self.k.to(self.device, non_blocking=True)
            v = self.v.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        self._back = (k, v, done)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) on the device, ready for the compute stream."""
        if self.device.type != "cuda":
            return self.k, self.v
        self.prefetch()
        k, v, done = self._back
        main = torch.cuda.current_stream(self.device)
        main.wait_event(done)
        k.record_stream(main)
        v.record_stream(main)
        self._back = None
        return k, v


class Pacer:
    """Keeps the host at most ``ahead`` layers in front of the GPU while the cache is offloaded.

    The host enqueues kernels far ahead of the GPU; the compute stream's own buffers are reused in stream order
    whatever the lead, but the offload's buffers (each layer's slice on its way out, the next layer's on its way
    in) are freed only when the GPU has passed them, so an unbounded lead would hold a buffer per layer the host is
    ahead: the whole cache again. Waiting for the event of ``ahead`` layers back bounds that to a few layers, and a
    lead of two layers (tens of milliseconds of GPU work at S1) keeps the GPU fed. Inactive (no events) otherwise."""

    def __init__(self, device: torch.device, active: bool, ahead: int = 2):
        self.active = active and device.type == "cuda"
        self.ahead, self.events = ahead, deque()

    def step(self) -> None:
        if not self.active:
            return
        ev = torch.cuda.Event()
        ev.record()
        self.events.append(ev)
        if len(self.events) > self.ahead:
            self.events.popleft().synchronize()


#: Pinned bytes this process's HostEntries hold now and at most so far. PyTorch keeps freed pinned blocks cached
#: for reuse (never returned to the system while the process lives), so the most ever held is still ours: the
#: host-memory check counts it as available to the next job.
PINNED = {"live": 0, "peak": 0}


def job_cache(model, shape: tuple[int, ...], num_cat: int, batch: int) -> tuple[int, int]:
    """(bytes of one kept tensor, kept tensors on this rank) of a job's right-context cache: ``model`` a WanStage or
    an expert pair, ``shape`` the job's latent [B, C, T, H, W], ``batch`` 2 with CFG."""
    cfg = model.config
    _, ph, pw = cfg.patch_size
    hw = (shape[3] // ph) * (shape[4] // pw)
    elem = torch.finfo(model.dtype).bits // 8
    return num_cat * hw * batch * cfg.dim * elem, 2 * len(model.layers)


def check_host_memory(keeper, tensor_bytes: int, tensors: int, ranks_here: int) -> None:
    """Before a job's GPU work: an offloaded cache of ``tensors`` tensors of ``tensor_bytes`` each on this rank
    (``ranks_here`` ranks of the group share this host and hold about as much each) must fit in the host's available
    memory plus the pinned memory these ranks already hold, with a quarter left for everything else; else a
    ValueError that says what would fit. Each block is counted as the pinned allocator takes it (a power of two)."""
    if keeper is not HostEntry or not tensor_bytes:
        return
    avail = _available_host_bytes()
    if avail is None:
        return
    need = pinned_bytes(tensor_bytes) * tensors * ranks_here
    have = avail + PINNED["peak"] * ranks_here
    if need > 0.75 * have:
        raise ValueError(f"kv_cache='offload' keeps this job's right-context cache in pinned host memory: "
                         f"{need / 2**30:.1f} GiB ({ranks_here} rank(s) on this host), and this host has "
                         f"{have / 2**30:.1f} GiB for it. Choose kv_cache='exact' (GPU memory) or 'fp8' (half "
                         f"the bytes), a smaller num_cat, fewer pixels, or free host memory.")


def check_job(model, job, world: int) -> None:
    """:func:`check_host_memory` for ``job`` on a rank holding ``model`` in a group of ``world`` ranks (those on this
    host: LOCAL_WORLD_SIZE under torchrun, else all of them)."""
    if len(job.shape) != 5:  # not a video latent: the job's own validation names it
        return
    sc = job.sampling
    size, tensors = job_cache(model, tuple(job.shape), sc.num_cat, 2 if sc.use_cfg else 1)
    here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    keeper = getattr(model, "stages", (model,))[0].kv_keep  # a stage, or an expert pair (experts.Experts)
    check_host_memory(keeper, size, tensors, max(1, min(here, world)))


def _available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None (not checked); at most DUALPARAL_HOST_MEMORY_CAP_GIB when
    that is set (emulating a smaller host, as DUALPARAL_MEMORY_CAP_GIB emulates a smaller GPU)."""
    cap = os.environ.get("DUALPARAL_HOST_MEMORY_CAP_GIB")
    if cap:
        real = _meminfo_available()
        return int(float(cap) * 2**30) if real is None else min(real, int(float(cap) * 2**30))
    return _meminfo_available()


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def tokens(entry) -> int:
    """Tokens of a kept entry of any kind."""
    return (entry.k if isinstance(entry, HostEntry) else entry[0]).shape[1]


def prefetch(entry) -> None:
    """Start bringing an offloaded entry back to its device (nothing for the other kinds, or None)."""
    if isinstance(entry, HostEntry):
        entry.prefetch()


def take(right: dict | None, layer: int):
    """Pop ``layer``'s entry of a right-context cache (None without one), and start bringing the next layer's back
    while this one runs (offload)."""
    if right is None:
        return None
    entry = right.pop(layer)
    prefetch(entry)
    prefetch(next(iter(right.values()), None))
    return entry


def offloaded(keeper, right: dict | None) -> bool:
    """Whether a block-step keeps or reads an offloaded cache (then it is paced, see :class:`Pacer`)."""
    return keeper is HostEntry or any(isinstance(e, HostEntry) for e in (right or {}).values())


def load(entry, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) in ``dtype`` from a kept entry of any kind."""
    if isinstance(entry, HostEntry):
        return entry.load()
    if len(entry) == 2:
        return entry[0], entry[1]
    k8, v8, ks, vs = entry
    return (k8.float() * ks).to(dtype), (v8.float() * vs).to(dtype)


KEEPERS = {"exact": keep_exact, "offload": HostEntry, "fp8": keep_fp8}
