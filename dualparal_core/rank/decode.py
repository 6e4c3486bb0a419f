"""One rank's side of Block Decode (``OP_DECODE``, fields in :mod:`dualparal_core.client.decode`).

Every rank receives the op through rank 0's relay. A rank keeps one decoder, keyed by (fingerprint, dtype), on its
own device; when a rank with a span lacks it, rank 0 answers ``need_weights`` and the parent sends the op again
with the weights. Each rank with a span then opens its own authenticated connection to the address the parent put
in the op, primes the causal cache on the latent frames before its span, and sends every block's frames as soon as
they exist (``OP_FRAMES``, from a sender thread: the device decodes the next block meanwhile), then ``OP_RESULT``
with counters. Between latent frames it reads that connection: ``OP_CANCEL`` stops it after that frame
(``OP_CANCELLED``). An exception while decoding (a bad state dict, out of memory) is reported in
``OP_RESULT["failed"]`` and the rank stays up: decoding touches no process group, so the group stays usable.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
import traceback

import torch

from .. import logger
from .. import protocol as proto
from ..channel import authenticate, dumps, loads
from ..decode import pixel_offset, to_image, to_uint8


class _Stop(Exception):
    """Leave the decode loop: a cancel, or the parent is gone."""


class DecodeState:
    """What a rank keeps between decodes: one decoder and the counters the parent (and tests) read."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.decoder = None
        self.weights_received = 0
        self.decoders_built = 0
        self.decodes = 0
        self.blocks = 0


class _Sender:
    """Sends each block's frames from a thread, in order, while the device decodes the next block.

    On a GPU the frames leave through a pinned buffer (an asynchronous copy and an event): the decoder never waits
    for the copy, the pickling or the socket. At most ``depth`` blocks wait, so host memory stays bounded.
    ``out`` is anything with ``send(op, **fields)``.
    """

    def __init__(self, out, depth: int = 2) -> None:
        self.out, self.error = out, None
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.t = threading.Thread(target=self._run, name="dualparal-decode-send", daemon=True)
        self.t.start()

    def put(self, frames: torch.Tensor, **meta) -> None:
        event = None
        if frames.device.type == "cuda":
            host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            item = (event, host, frames, meta)  # the device tensor lives until its copy is done
        else:
            item = (None, frames, None, meta)
        while self.error is None:
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            event, host, _, meta = item
            try:
                if self.error is None:
                    if event is not None:
                        event.synchronize()
                    self.out.send(proto.OP_FRAMES, frames=host, **meta)
            except Exception as exc:  # noqa: BLE001 - the parent is gone; the decode loop sees it and stops
                self.error = exc
            del item, event, host, meta

    def close(self) -> None:
        """Wait until every queued block has been sent (or the connection failed)."""
        self.q.put(None)
        self.t.join()


class _Link:
    """This rank's own connection to the parent for one decode."""

    def __init__(self, rank, address: tuple[str, int], job: int):
        self.rank, self.lock = rank.rank, threading.Lock()
        sock = socket.create_connection(tuple(address), timeout=rank.timeouts.connect)
        self.conn = authenticate(sock, rank.key, server=False, timeout=rank.timeouts.connect)
        self.send("hello", job=job)

    def send(self, op: str, **kw) -> None:
        with self.lock:
            self.conn.send_bytes(dumps({"op": op, "rank": self.rank, **kw}))

    def cancelled(self, job: int) -> bool:
        while self.conn.poll(0):
            m = loads(self.conn.recv_bytes())
            if m.get("op") == proto.OP_CANCEL and m.get("job") == job:
                return True
        return False


def _ensure_decoder(state: DecodeState, msg: dict, device: torch.device):
    """The cached decoder for the message's key, built from its weights if needed; None if weights are missing."""
    key = (msg["fingerprint"], msg["dtype"])
    weights = msg.get("weights")
    if weights is not None:
        state.weights_received += 1
    if state.key == key and state.decoder is not None:
        return state.decoder
    if weights is None:
        return None
    from ..vae import WanVAEDecoder

    state.key, state.decoder = None, None  # free the old decoder before building the new one
    if device.type == "cuda":
        torch.cuda.empty_cache()
    state.decoder = WanVAEDecoder.from_state_dict(weights, msg["dtype"], device, source="the VAE weights")
    state.key = key
    state.decoders_built += 1
    return state.decoder


def serve_decode(rank, msg: dict) -> None:
    """Every rank, for one ``OP_DECODE`` that rank 0 relayed."""
    state, job = rank.decode_state, msg["job"]
    mine = msg["slices"][rank.rank] if rank.rank < len(msg["slices"]) else None
    decoder, failed = None, None
    if mine is not None:
        try:
            decoder = _ensure_decoder(state, msg, rank.dev)
        except Exception as exc:  # noqa: BLE001 - a bad state dict is the caller's error, not this rank's death
            failed = (type(exc).__name__, str(exc), traceback.format_exc())
    msg["weights"] = None  # the state dict is on the device now; drop the CPU copy
    need = rank.all_gather(mine is not None and decoder is None and failed is None)
    if any(need):
        if rank.lead is not None:
            rank.lead.send(proto.OP_RESULT, job=job, need_weights=sum(need))
        return
    if mine is None:
        return
    link = _Link(rank, msg["data"], job)
    try:
        _decode(rank, link, msg, mine, decoder, failed)
    finally:
        link.conn.close()


def _decode(rank, link: _Link, msg: dict, mine: dict, decoder, failed) -> None:
    state, job, t0 = rank.decode_state, msg["job"], time.perf_counter()

    def counters(**kw) -> dict:
        return dict(job=job, weights_received=state.weights_received, decoders_built=state.decoders_built,
                    fingerprint=state.key[0] if state.key else None, **kw)

    if failed is not None:
        return _failed(rank, link, failed, counters)
    rank.phase, rank.busy, rank.block_step = "decode", True, 0
    if rank.dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rank.dev)
    blocks, first_s, cancel, sender = 0, None, [False], _Sender(link)

    def poll() -> None:  # between latent frames, priming included
        if cancel[0] or link.cancelled(job):
            cancel[0] = True
            raise _Stop()

    try:
        for b in range(mine["latent"].shape[0]):
            frames_done = _span(rank, decoder, msg, mine, b, poll, sender, counters)
            if isinstance(frames_done, tuple):
                failed = frames_done
                break
            blocks += frames_done
            first_s = first_s or time.perf_counter() - t0
            if cancel[0] or sender.error is not None:
                break
    except _Stop:
        pass
    finally:
        sender.close()  # every block decoded so far is sent before the result (or the cancel) is
        rank.phase, rank.busy = "idle", False
        state.decodes += 1
        if rank.dev.type == "cuda":
            torch.cuda.empty_cache()  # give the activations back: ComfyUI or the next job may need them
    if sender.error is not None:
        raise sender.error  # the parent is gone mid-decode: this rank fails like any other
    if failed is not None:
        _failed(rank, link, failed, counters)
    elif cancel[0]:
        link.send(proto.OP_CANCELLED, job=job)
    else:
        peak = torch.cuda.max_memory_allocated(rank.dev) if rank.dev.type == "cuda" else None
        link.send(proto.OP_RESULT, **counters(blocks=blocks, seconds=time.perf_counter() - t0,
                                              first_block_seconds=first_s, peak_bytes=peak, device=rank.device))


def _span(rank, decoder, msg: dict, mine: dict, b: int, poll, sender: _Sender, counters):
    """Decode video ``b``'s span; returns the blocks sent, or the (type, message, traceback) of a failure."""
    z, offset, start, end = mine["latent"], mine["offset"], mine["start"], mine["end"]
    frame, sent = pixel_offset(start, decoder.temporal_scale), 0
    span = decoder.stream_span(z[b : b + 1], start - offset, end - offset, msg["block"], prime=start - offset,
                               on_frame=poll)
    while True:
        try:
            video = next(span)
            frames = to_image(video)[0]
            frames = to_uint8(frames) if msg["out"] == "uint8" else frames
            del video
            rank.decode_state.blocks += 1
        except StopIteration:
            return sent
        except _Stop:
            raise
        except Exception as exc:  # noqa: BLE001 - OOM or a bad latent: reported, the rank stays up
            return (type(exc).__name__, str(exc), traceback.format_exc())  # no frames kept alive
        sender.put(frames, job=msg["job"], video=b, frame=frame)
        if sender.error is not None:
            return sent
        frame += frames.shape[0]
        sent += 1
        rank.block_step += 1


def _failed(rank, link: _Link, failed: tuple[str, str, str], counters) -> None:
    kind, message, tb = failed
    logger.error("rank %d (%s): Block Decode failed:\n%s", rank.rank, rank.device, tb)
    link.send(proto.OP_RESULT, **counters(failed={"type": kind, "message": message, "traceback": tb}))
