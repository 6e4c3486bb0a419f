"""The parent side of Block Decode on a worker group (local or attached): one primed span per rank, blocks
assembled in video order.

``decode_on_pool(pool, z, weights, sink)`` splits the latent frames into contiguous spans
(:func:`dualparal_core.decode.plan_spans`) and runs one :class:`DecodeOp` through the pool's session: every decoded
block goes into ``sink`` (:class:`dualparal_core.decode.FrameSink`) as it arrives; the sink keeps the IMAGE and/or
streams the video file in order. Each rank primes its causal cache on the latent frames before its span
(``WanVAEDecoder.stream_span``), so the result equals the sequential decode frame for frame.

``OP_DECODE`` (parent -> rank 0, relayed to every rank):

=================  =================================================================================================
``job``            the session's job id
``fingerprint``    SHA-256 of the weights (:func:`dualparal_core.decode.fingerprint`): a rank's cache key, with
                   ``dtype``
``dtype``          torch dtype the ranks decode in, each on its own device
``weights``        the decoder's state dict (CPU tensors, ComfyUI or diffusers keys), or None: the first op of a job
                   never carries them; when a rank with a span lacks them, rank 0 answers
                   ``OP_RESULT{need_weights}`` and the op is sent again with them. So the weights cross once per
                   group and VAE, and never when cached.
``slices``         one dict per span, rank r takes ``slices[r]``: ``latent`` ``[B, C, end - offset, h, w]`` float32
                   CPU (the raw latent frames ``offset .. end``: priming + span), ``offset`` (= max(0, start -
                   prime)), ``start``/``end`` (the span whose pixels the rank returns)
``block``          latent frames per block
``out``            ``"float32"`` (IMAGE values in [0, 1], exactly core VAE Decode's) or ``"uint8"`` (what Save Video
                   writes; a quarter of the bytes, used when only a file is written)
``data``           (host, port) where this parent listens for the ranks' own connections (same key as rank 0's)
=================  =================================================================================================

Rank r -> parent, on its own connection: ``hello``, ``OP_FRAMES`` per block, then ``OP_RESULT`` (counters; ``failed``
when the decode raised: the rank stays up) or ``OP_CANCELLED``. Cancel: ``OP_CANCEL`` on every rank's connection;
each stops after its current latent frame. A rank that sends nothing within ``Timeouts.step`` closes the pool; a
rank that dies is a ``WorkerError`` (fail-stop), exactly as for sampling.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch

from .. import logger
from .. import protocol as proto
from ..channel import authenticate, dumps, loads
from ..config import TIMEOUT_ENV
from ..decode import MIN_SPEEDUP, FrameSink, count_blocks, fingerprint, plan_spans, weights_to_cpu
from ..protocol import DecodeError, PoolCancelled, WorkerError
from .session import Lost, Session


@dataclass
class DecodeReport:
    """What a pool decode did: its spans, the ranks' final messages and the weight transfers."""

    spans: list[tuple[int, int]]
    blocks: int = 0
    seconds: float = 0.0
    weights_sent: int = 0
    """Ranks that received the weights in this decode (0 when every rank had them cached)."""
    ranks: list[dict] = field(default_factory=list)


def decoder_geometry(weights: dict) -> tuple[int, int, int]:
    """(prime frames, temporal scale, latent channels) of a Wan VAE state dict, from its shapes only."""
    from ..vae import WanVAEDecoder

    meta = WanVAEDecoder.from_state_dict(weights, device="meta", source="the VAE weights")
    return meta.prime_frames, meta.temporal_scale, meta.z_dim


def decode_on_pool(pool, z: torch.Tensor, weights: dict, sink: FrameSink, *,
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
    from ..pool import WorkerPool

    if not isinstance(pool, WorkerPool):
        raise TypeError(f"Block Decode on the ranks needs a WorkerPool (started or attached), not a "
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
    frames, world = z.shape[2], len(pool.ready_info)
    spans = list(spans) if spans is not None else plan_spans(frames, world, prime, min_speedup)
    if not spans or spans[0][0] != 0 or spans[-1][1] != frames or any(
            a[1] != b[0] for a, b in zip(spans, spans[1:])) or any(e <= s for s, e in spans) or len(spans) > world:
        raise ValueError(f"spans {spans} must cover latent frames 0..{frames} contiguously, one per rank "
                         f"(at most {world}).")
    op = DecodeOp(z, weights, weights_fingerprint or fingerprint(weights), dtype, block_size, sink, spans, prime,
                  on_progress, [i.get("device") for i in pool.ready_info])
    return pool.session.run(op, should_cancel)


class DecodeOp:
    """One decode job's bookkeeping on the parent (run by :meth:`Session.run`)."""

    phase = "decode"

    def __init__(self, z, weights, fp, dtype, block_size, sink: FrameSink, spans, prime, on_progress, devices):
        self.weights, self.sink, self.spans, self.on_progress, self.devices = weights, sink, spans, on_progress, devices
        self.base = {"op": proto.OP_DECODE, "fingerprint": fp, "dtype": dtype, "block": block_size,
                     "out": "float32" if sink.keeps else "uint8"}
        # Views, not copies: pickling them writes z's storage once for all slices, the least the parent can hold.
        self.slices = [{"offset": max(0, s - prime), "start": s, "end": e,
                        "latent": z[:, :, max(0, s - prime) : e]} for s, e in spans]
        self.report = DecodeReport(spans=spans)
        self.total = count_blocks(spans, block_size, z.shape[0])
        self.conns: dict[Connection, int] = {}
        self.done: dict[int, dict] = {}
        self.failed: dict[int, dict] = {}
        self.cancelling = False
        self.framed: set[int] = set()
        self.step_s: float | None = None
        """The longest interval between two blocks of one rank: how long a cancel may take to be obeyed."""

    # ------------------------------------------------------------------ the session's hooks
    def begin(self, session: Session, jid: int) -> None:
        self.s, self.jid, self.t0 = session, jid, time.monotonic()
        self.seen = dict.fromkeys(range(len(self.spans)), self.t0)
        self.server = socket.create_server((session.local_host, 0), backlog=len(self.spans) + 4)
        self.base.update(job=jid, data=self.server.getsockname()[:2])
        self._send(with_weights=False)

    def _send(self, with_weights: bool) -> None:
        self.s.send({**self.base, "slices": self.slices, "weights": self.weights if with_weights else None})

    def links(self) -> list:
        return [self.server, *self.conns]

    def read(self, c) -> list[dict]:
        if c is self.server:
            return self._accept()
        out = []
        try:
            while c.poll(0):
                out.append(loads(c.recv_bytes()))
            return out
        except (EOFError, OSError):
            rank = self.conns.pop(c)
            c.close()
            final = any(m["op"] in (proto.OP_RESULT, proto.OP_CANCELLED) for m in out)
            if not final and rank not in self.done:  # it vanished mid-decode: rank 0 (or the launch) says how
                raise Lost() from None
            return out

    def _accept(self) -> list[dict]:
        sock, _ = self.server.accept()
        try:
            conn = authenticate(sock, self.s.key, server=True, timeout=self.s.timeouts.connect)
            hello = loads(conn.recv_bytes()) if conn.poll(self.s.timeouts.connect) else {}
        except Exception:  # noqa: BLE001 - not one of our ranks: ignore it
            logger.warning("Block Decode: ignored a connection that did not authenticate")
            return []
        if hello.get("op") != "hello" or hello.get("job") != self.jid or not 0 <= hello.get("rank", -1) < len(
                self.spans):
            conn.close()
            return []
        self.conns[conn] = hello["rank"]
        if self.cancelling:
            conn.send_bytes(dumps({"op": proto.OP_CANCEL, "job": self.jid}))
        return []

    def handle(self, src, msg: dict) -> bool:
        if src is self.s.conn:
            if msg.get("job") == self.jid and msg["op"] == proto.OP_RESULT and msg.get("need_weights"):
                if self.cancelling:  # cancelled before any rank began
                    self.done = {r: {"op": proto.OP_CANCELLED} for r in range(len(self.spans))}
                    return True
                self.report.weights_sent += msg["need_weights"]
                self._send(with_weights=True)
            return False
        rank, now = self.conns.get(src, msg.get("rank")), time.monotonic()
        if rank in self.framed:  # a rank's first block holds its priming: one decode step is a later interval
            self.step_s = max(self.step_s or 0.0, now - self.seen[rank])
        if msg["op"] == proto.OP_FRAMES:
            self.framed.add(rank)
        self.seen[rank] = now
        if msg["op"] == proto.OP_FRAMES and not self.cancelling:
            self.sink.put(msg["video"], msg["frame"], msg["frames"])
            self.report.blocks += 1
            if self.on_progress is not None:
                self.on_progress(self.report.blocks, self.total)
        elif msg["op"] in (proto.OP_RESULT, proto.OP_CANCELLED):
            self.done[rank] = msg
            if msg.get("failed"):
                self.failed[rank] = msg
        return len(self.done) == len(self.spans)

    def wants_cancel(self) -> bool:
        return bool(self.failed) and len(self.done) < len(self.spans)

    def cancel(self) -> None:
        self.cancelling = True
        for conn, rank in list(self.conns.items()):
            if rank not in self.done:
                try:
                    conn.send_bytes(dumps({"op": proto.OP_CANCEL, "job": self.jid}))
                except OSError:
                    pass

    def stopped(self) -> bool:
        return len(self.done) == len(self.spans)

    @property
    def last(self) -> float:
        waiting = [self.seen[r] for r in range(len(self.spans)) if r not in self.done]
        return min(waiting) if waiting else time.monotonic()

    def hang(self, silent_s: float, status: dict | None) -> WorkerError:
        r = min((r for r in range(len(self.spans)) if r not in self.done), key=lambda r: self.seen[r])
        return WorkerError(r, self.devices[r], "decode", f"no decoded block for {silent_s:.0f} s (Timeouts.step="
                           f"{self.s.timeouts.step:g} s); if one block legitimately takes longer, raise it: set "
                           f"{TIMEOUT_ENV['step']}=SECONDS in ComfyUI's environment.")

    def end(self) -> None:
        self.server.close()
        for conn in self.conns:
            conn.close()
        try:  # rank 0 beats on after its own span until now (the other ranks may have decoded longer)
            self.s.send({"op": proto.OP_IDLE})
        except (OSError, ValueError):  # closed after a fault
            pass

    def finish(self, cancelled: bool) -> DecodeReport:
        self.report.seconds = time.monotonic() - self.t0
        self.report.ranks = [{k: v for k, v in self.done[r].items() if k not in ("op", "job")}
                             for r in range(len(self.spans))]
        if self.failed:
            rank = min(self.failed)
            f = self.failed[rank]["failed"]
            if f["type"] == "OutOfMemoryError":
                raise torch.OutOfMemoryError(f"Block Decode ran out of memory on rank {rank} "
                                             f"({self.devices[rank]}): {f['message']}")
            raise DecodeError(rank, self.devices[rank], f["type"], f["message"])
        if cancelled or any(m["op"] == proto.OP_CANCELLED for m in self.done.values()):
            raise PoolCancelled("Block Decode was cancelled.")
        logger.info("Block Decode: %d block(s) over %d rank(s), spans %s, in %.1f s (weights sent to %d rank(s))",
                    self.report.blocks, len(self.spans), self.spans, self.report.seconds, self.report.weights_sent)
        return self.report
