"""The parent side of Block Decode on a worker group: one primed span per rank, blocks assembled in video order.

``decode_on_pool(pool, z, weights, sink)`` splits the latent frames into contiguous spans
(:func:`dualparal_core.decode.plan_spans`), sends each rank its span, and puts every decoded block into ``sink``
(:class:`dualparal_core.decode.FrameSink`) as it arrives; the sink keeps the IMAGE and/or streams the video file in
order. Each rank primes its causal cache on the latent frames before its span (``WanVAEDecoder.stream_span``), so
the result equals the sequential decode frame for frame.

``OP_DECODE`` (parent -> rank), one per rank and job:

=============  =====================================================================================================
``job``        the job id (the pool's counter; stale messages of other jobs are ignored)
``fingerprint`` SHA-256 of the weights (:func:`dualparal_core.decode.fingerprint`): the rank's cache key, with
               ``dtype``
``dtype``      torch dtype the rank decodes in, on its own device
``weights``    the decoder's state dict (CPU tensors, ComfyUI or diffusers keys), or None: the first message of a
               job never carries them; a rank that lacks them answers ``OP_RESULT{need_weights}`` and gets a second
               message with them. So the weights cross once per pool and VAE, and never when cached.
``latent``     ``[B, C, end - offset, h, w]`` float32 CPU: the raw latent frames ``offset .. end`` (priming + span)
``offset``     first latent frame sent (= max(0, start - prime))
``start/end``  the span [start, end) whose pixels the rank returns
``block``      latent frames per block
``out``        ``"float32"`` (IMAGE values in [0, 1], exactly core VAE Decode's) or ``"uint8"`` (what Save Video
               writes; a quarter of the bytes, used when only a file is written)
=============  =====================================================================================================

Rank -> parent: ``OP_FRAMES`` per block, then ``OP_RESULT`` (counters; ``failed`` when the decode raised: the rank
stays up) or ``OP_CANCELLED``. Cancel: the parent polls ``should_cancel`` while it waits and sends ``OP_CANCEL`` to
every rank; each stops after its current latent frame, so a cancel lands within one frame's decode. A rank that
does not answer within ``Timeouts.step`` closes the pool, as for sampling. A rank that dies is a ``WorkerError``
(the pool is closed: fail-stop), exactly as for sampling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import logger
from . import protocol as proto
from .decode import MIN_SPEEDUP, FrameSink, count_blocks, fingerprint, plan_spans, weights_to_cpu
from .pool import FAULT_WINDOW_S, POLL_S, PoolCancelled, WorkerError, WorkerPool


class DecodeError(RuntimeError):
    """A rank's decode raised (bad weights, a latent that does not fit); the pool stays usable."""

    def __init__(self, rank: int, device: str, exc_type: str, message: str):
        self.rank, self.device, self.exc_type = rank, device, exc_type
        super().__init__(f"Block Decode failed on rank {rank} ({device}): {exc_type}: {message}")


@dataclass
class DecodeReport:
    """What a pool decode did: its spans, the ranks' final messages and the weight transfers."""

    spans: list[tuple[int, int]]
    blocks: int = 0
    seconds: float = 0.0
    weights_sent: int = 0
    """Messages that carried the weights in this decode (0 when every rank had them cached)."""
    ranks: list[dict] = field(default_factory=list)


def decoder_geometry(weights: dict) -> tuple[int, int, int]:
    """(prime frames, temporal scale, latent channels) of a Wan VAE state dict, from its shapes only."""
    from .vae import WanVAEDecoder

    meta = WanVAEDecoder.from_state_dict(weights, device="meta", source="the VAE weights")
    return meta.prime_frames, meta.temporal_scale, meta.z_dim


def decode_on_pool(pool: WorkerPool, z: torch.Tensor, weights: dict, sink: FrameSink, *,
                   dtype: torch.dtype = torch.float32, block_size: int = 4, weights_fingerprint: str | None = None,
                   on_progress: Callable[[int, int], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None, min_speedup: float = MIN_SPEEDUP,
                   spans: list[tuple[int, int]] | None = None) -> DecodeReport:
    """Decode the raw latent ``z`` [B, C, T, h, w] on ``pool``'s ranks into ``sink`` (the caller finishes it).

    One rank when the pool has one, or when the spans would be too short for priming to pay off (``min_speedup``,
    see :func:`plan_spans`); ``spans`` overrides the plan. Raises ValueError (bad input, before any rank sees it),
    PoolCancelled (the pool stays usable), DecodeError / torch.OutOfMemoryError (a rank's decode raised; the pool
    stays usable), WorkerError (a rank died or hung: the pool is closed).
    """
    if not isinstance(pool, WorkerPool):  # an attached torchrun group talks to the parent through rank 0 only
        raise NotImplementedError(f"Block Decode on the ranks needs a started WorkerPool, not a "
                                  f"{type(pool).__name__}; decode in the calling process instead.")
    if not pool.alive:
        raise WorkerError(None, None, "decode", "this pool is closed or had a fault; start a new one.")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive number of latent frames; got {block_size!r}.")
    weights = weights_to_cpu(weights)
    prime, _, channels = decoder_geometry(weights)
    if not isinstance(z, torch.Tensor) or z.ndim != 5 or z.shape[1] != channels or min(z.shape) < 1:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"samples must be a Wan video latent [B, {channels}, T, h, w]; got {got}.")
    z = z.detach().to("cpu", torch.float32).contiguous()
    frames = z.shape[2]
    spans = list(spans) if spans is not None else plan_spans(frames, pool.spec.world_size, prime, min_speedup)
    if not spans or spans[0][0] != 0 or spans[-1][1] != frames or any(
            a[1] != b[0] for a, b in zip(spans, spans[1:])) or any(e <= s for s, e in spans) \
            or len(spans) > pool.spec.world_size:
        raise ValueError(f"spans {spans} must cover latent frames 0..{frames} contiguously, one per rank "
                         f"(at most {pool.spec.world_size}).")
    fp = weights_fingerprint or fingerprint(weights)
    if not pool._busy.acquire(blocking=False):
        raise RuntimeError("This DualParal pool is already running a job; one job at a time.")
    pool._cancel.clear()
    try:
        return _Run(pool, z, weights, fp, dtype, block_size, sink, spans, prime).run(on_progress, should_cancel)
    finally:
        pool._busy.release()


class _Run:
    """One decode job's bookkeeping on the parent."""

    def __init__(self, pool: WorkerPool, z, weights, fp, dtype, block_size, sink: FrameSink, spans, prime):
        self.pool, self.g, self.weights, self.sink, self.spans = pool, pool._group, weights, sink, spans
        pool._job_id += 1
        self.jid = pool._job_id
        self.base = {"op": proto.OP_DECODE, "job": self.jid, "fingerprint": fp, "dtype": dtype,
                     "block": block_size, "out": "float32" if sink.keeps else "uint8"}
        self.z = z
        self.slices = [{"offset": max(0, start - prime), "start": start, "end": end} for start, end in spans]
        self.report = DecodeReport(spans=spans)
        self.total = count_blocks(spans, block_size, z.shape[0])
        self.done: dict[int, dict] = {}
        self.failed: dict[int, dict] = {}

    def send(self, rank: int, with_weights: bool) -> None:
        sl = self.slices[rank]
        latent = self.z[:, :, sl["offset"] : sl["end"]].clone()  # a copy: a view would pickle all of z
        self.g.send(rank, {**self.base, **sl, "latent": latent, "weights": self.weights if with_weights else None})
        self.report.weights_sent += int(with_weights)

    def run(self, on_progress, should_cancel) -> DecodeReport:
        pool, g, n = self.pool, self.g, len(self.spans)
        t0 = time.monotonic()
        cancel_at = None
        last = dict.fromkeys(range(n), t0)
        g.phase.update({r: "decode" for r in range(n)})
        try:
            for rank in range(n):
                self.send(rank, False)
            while len(self.done) < n:
                for rank, msg in g.pump(POLL_S):
                    if msg.get("job") != self.jid:
                        continue
                    op = msg["op"]
                    last[rank] = time.monotonic()
                    if op == proto.OP_FRAMES:
                        if cancel_at is None:
                            self.sink.put(msg["video"], msg["frame"], msg["frames"])
                            self.report.blocks += 1
                            if on_progress is not None:
                                on_progress(self.report.blocks, self.total)
                    elif op == proto.OP_RESULT and msg.get("need_weights") and cancel_at is None:
                        self.send(rank, True)
                    elif op == proto.OP_RESULT and msg.get("need_weights"):  # cancelled before it began
                        self.done[rank] = {**msg, "op": proto.OP_CANCELLED}
                        g.phase[rank] = "idle"
                    elif op in (proto.OP_RESULT, proto.OP_CANCELLED):
                        self.done[rank] = msg
                        g.phase[rank] = "idle"
                        if msg.get("failed"):
                            self.failed[rank] = msg
                if g.faulted():
                    raise g.diagnose("decode")
                now = time.monotonic()
                wants_cancel = pool._cancel.is_set() or (should_cancel is not None and should_cancel())
                if cancel_at is None and len(self.done) < n and (self.failed or wants_cancel):
                    self._cancel_rest()
                    cancel_at = now
                if cancel_at is not None and now - cancel_at > pool.timeouts.step:
                    raise self._uncooperative()
                hung = [r for r in range(n) if r not in self.done and now - last[r] > pool.timeouts.step]
                if hung and cancel_at is None:
                    r = hung[0]
                    raise WorkerError(r, pool.spec.devices[r], "decode",
                                      f"no decoded block for {now - last[r]:.0f} s (Timeouts.step="
                                      f"{pool.timeouts.step:g} s); raise Timeouts.step if one block legitimately "
                                      f"takes longer.")
        except WorkerError as err:
            g.healthy = False
            pool._fail(err)
        except OSError as exc:  # a send to a rank that just died, or close() from another thread
            if g.closed:
                raise WorkerError(None, None, "decode", "the pool was closed while decoding") from exc
            end = time.monotonic() + FAULT_WINDOW_S
            while not g.faulted() and time.monotonic() < end:
                g.pump(POLL_S)
            pool._fail(g.diagnose("decode") if g.faulted() else
                       WorkerError(None, None, "decode", f"lost the control connection: {exc}"))
        except BaseException:
            # The sink or a callback raised (disk full, the host's interrupt): stop the ranks, keep the pool.
            if len(self.done) < n:
                self._stop()
            raise
        self.report.seconds = time.monotonic() - t0
        self.report.ranks = [{k: v for k, v in self.done[r].items() if k not in ("op", "job")} for r in range(n)]
        if self.failed:
            rank = min(self.failed)
            f = self.failed[rank]["failed"]
            if f["type"] == "OutOfMemoryError":
                raise torch.OutOfMemoryError(f"Block Decode ran out of memory on rank {rank} "
                                             f"({pool.spec.devices[rank]}): {f['message']}")
            raise DecodeError(rank, pool.spec.devices[rank], f["type"], f["message"])
        if cancel_at is not None or any(m["op"] == proto.OP_CANCELLED for m in self.done.values()):
            raise PoolCancelled("Block Decode was cancelled.")
        logger.info("Block Decode: %d block(s) over %d rank(s), spans %s, in %.1f s (weights sent %d time(s))",
                    self.report.blocks, n, self.spans, self.report.seconds, self.report.weights_sent)
        return self.report

    def _cancel_rest(self) -> None:
        for rank in range(len(self.spans)):
            if rank not in self.done:
                self.g.send(rank, {"op": proto.OP_CANCEL, "job": self.jid})

    def _stop(self) -> None:
        """After the caller's own exception: cancel the ranks and wait for them, or close the pool."""
        g, n = self.g, len(self.spans)
        try:
            self._cancel_rest()
            end = time.monotonic() + self.pool.timeouts.step
            while len(self.done) < n and time.monotonic() < end and not g.faulted():
                for rank, msg in g.pump(POLL_S):
                    if msg.get("job") == self.jid and msg["op"] in (proto.OP_RESULT, proto.OP_CANCELLED):
                        self.done[rank] = msg  # need_weights too: that rank never started
        except OSError:
            pass
        if len(self.done) < n:
            logger.warning("DualParal: the workers did not stop after an interrupted decode; closing the pool")
            g.healthy = False
            self.pool.close()
        else:
            g.phase.update({r: "idle" for r in range(n)})

    def _uncooperative(self) -> PoolCancelled:
        logger.warning("DualParal: the workers did not stop within Timeouts.step=%g s of a decode cancel; closing "
                       "the pool", self.pool.timeouts.step)
        self.g.healthy = False
        self.pool.close()
        return PoolCancelled("Block Decode was cancelled; the workers did not stop in time, so the pool was shut "
                             "down (the next run starts a new one).")
