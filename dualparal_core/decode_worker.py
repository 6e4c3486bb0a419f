"""One rank's side of Block Decode: the ``OP_DECODE`` message of :mod:`dualparal_core.decode_pool`.

The rank keeps one decoder, keyed by (fingerprint, dtype), on its own device; a message without weights for a key
it lacks is answered with ``need_weights`` and the parent sends them. It primes the causal cache on the latent
frames before its span, decodes the span block by block and sends every block's frames as soon as they exist
(``OP_FRAMES``, from a sender thread: the device decodes the next block meanwhile), then ``OP_RESULT`` with
counters. Between latent frames (priming included) it reads the control connection: ``OP_CANCEL`` of this job
stops it after that frame (``OP_CANCELLED``); ``OP_CLOSE`` stops it and ends the worker. An exception while
decoding (a bad state dict, out of memory) is reported in ``OP_RESULT["failed"]`` and the rank stays up: decoding
touches no process group, so the pool stays usable for sampling.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback

import torch

from . import logger
from . import protocol as proto
from .decode import pixel_offset, to_image, to_uint8


class _Stop(Exception):
    """Leave the decode loop: a cancel, a close, or the parent is gone (``gone`` holds why)."""


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
    """

    def __init__(self, worker, depth: int = 2) -> None:
        self.worker, self.error = worker, None
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
                    self.worker.send(proto.OP_FRAMES, frames=host, **meta)
            except Exception as exc:  # noqa: BLE001 - the parent is gone; the decode loop sees it and stops
                self.error = exc
            del item, event, host, meta

    def close(self) -> None:
        """Wait until every queued block has been sent (or the connection failed)."""
        self.q.put(None)
        self.t.join()


def _state(worker) -> DecodeState:
    state = getattr(worker, "decode_state", None)
    if state is None:
        state = worker.decode_state = DecodeState()
    return state


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
    from .vae import WanVAEDecoder

    state.key, state.decoder = None, None  # free the old decoder before building the new one
    if device.type == "cuda":
        torch.cuda.empty_cache()
    state.decoder = WanVAEDecoder.from_state_dict(weights, msg["dtype"], device, source="the VAE weights")
    state.key = key
    state.decoders_built += 1
    return state.decoder


def serve_decode(worker, msg: dict) -> None:
    """Handle one ``OP_DECODE`` on ``worker`` (a :class:`dualparal_core.worker.Worker`)."""
    job = msg["job"]
    state = _state(worker)
    device = torch.device(worker.device)
    stop = {"cancel": False, "gone": None}

    def counters(**kw) -> dict:
        return dict(job=job, weights_received=state.weights_received, decoders_built=state.decoders_built,
                    fingerprint=state.key[0] if state.key else None, **kw)

    def poll() -> None:
        """Between latent frames: read the control connection without blocking."""
        try:
            while worker.conn.poll(0):
                m = worker.recv()
                if m["op"] == proto.OP_CANCEL and m.get("job") == job:
                    stop["cancel"] = True
                elif m["op"] == proto.OP_CLOSE:
                    stop["cancel"] = worker._closing = True
                elif m["op"] == proto.OP_PING:
                    worker.send(proto.OP_PONG)
        except Exception as exc:  # noqa: BLE001 - the worker's own "parent gone", re-raised after the loop
            stop["gone"] = exc
            raise _Stop() from exc
        if stop["cancel"]:
            raise _Stop()

    t0 = time.perf_counter()
    try:
        decoder = _ensure_decoder(state, msg, device)
    except Exception as exc:  # noqa: BLE001 - a bad state dict is the caller's error, not this rank's death
        msg["weights"] = None
        _failed(worker, (type(exc).__name__, str(exc), traceback.format_exc()), counters)
        return
    msg["weights"] = None  # the state dict is on the device now; drop the CPU copy
    if decoder is None:
        worker.send(proto.OP_RESULT, **counters(need_weights=True))
        return
    z, offset, start, end = msg["latent"], msg["offset"], msg["start"], msg["end"]
    block, uint8 = msg["block"], msg["out"] == "uint8"
    worker.phase, worker.busy, worker.block_step = "decode", True, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    blocks, first_block_s, failed = 0, None, None
    sender = _Sender(worker)
    try:
        for b in range(z.shape[0]):
            frame = pixel_offset(start, decoder.temporal_scale)
            span = decoder.stream_span(z[b : b + 1], start - offset, end - offset, block, prime=start - offset,
                                       on_frame=poll)
            while failed is None:
                try:
                    video = next(span)
                    frames = to_image(video)[0]
                    frames = to_uint8(frames) if uint8 else frames
                    del video
                    state.blocks += 1
                    if worker.faults:  # tests: DUALPARAL_FAULT phase=decode, step = this rank's blocks so far
                        worker.fire("decode", state.blocks)
                except (StopIteration, _Stop):
                    break
                except Exception as exc:  # noqa: BLE001 - OOM or a bad latent: reported, the rank stays up
                    failed = (type(exc).__name__, str(exc), traceback.format_exc())  # no frames kept alive
                    break
                sender.put(frames, job=job, video=b, frame=frame)
                if sender.error is not None:
                    stop["gone"] = sender.error
                    break
                frame += frames.shape[0]
                blocks += 1
                worker.block_step = blocks
                first_block_s = first_block_s or time.perf_counter() - t0
            if failed is not None or stop["cancel"] or stop["gone"] is not None:
                break
    finally:
        frames = None
        sender.close()  # every block decoded so far is sent before the result (or the cancel) is
        if sender.error is not None and stop["gone"] is None:
            stop["gone"] = sender.error
        worker.phase, worker.busy = "idle", False
        state.decodes += 1
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the activations back: ComfyUI or the next job may need them
    if stop["gone"] is not None:
        raise stop["gone"]
    if failed is not None:
        _failed(worker, failed, counters)
    elif stop["cancel"]:
        worker.send(proto.OP_CANCELLED, job=job)
    else:
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        worker.send(proto.OP_RESULT, **counters(blocks=blocks, seconds=time.perf_counter() - t0,
                                                first_block_seconds=first_block_s, peak_bytes=peak,
                                                device=worker.device))


def _failed(worker, failed: tuple[str, str, str], counters) -> None:
    kind, message, tb = failed
    logger.error("rank %d (%s): Block Decode failed:\n%s", worker.rank, worker.device, tb)
    worker.send(proto.OP_RESULT, **counters(failed={"type": kind, "message": message, "traceback": tb}))
