"""Block Decode, the parts every path shares: span planning, frame conversion, the weights' fingerprint, the
in-process (one device) decode and the frame sink that assembles blocks and streams them to a video file.

The parallel path (the worker group's GPUs) is :mod:`dualparal_core.client.decode` (parent side) and
:mod:`dualparal_core.rank.decode` (rank side). ComfyUI is never imported here.

Frames. A decoded block is ``[B, 3, f, H, W]`` in [-1, 1]. :func:`to_image` turns it into ComfyUI's IMAGE layout
``[B, f, H, W, 3]``, float32 in [0, 1], with exactly the arithmetic of core *VAE Decode* (``VAE.process_output``,
``clamp((x + 1) / 2, 0, 1)`` on the float32 cast, then ``movedim(1, -1)``). :func:`to_uint8` is what core *Save
Video* writes for such an image (``(x * 255).clamp(0, 255).byte()``).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from . import logger

#: Video containers Block Decode writes: name -> (extension, ffmpeg encoder, extra output options).
VIDEO_FORMATS: dict[str, tuple[str, str, list[str]]] = {
    "mp4": (".mp4", "libx264", []),
    "webm": (".webm", "libvpx-vp9", ["-b:v", "0", "-row-mt", "1"]),
}
#: Largest crf each encoder accepts.
MAX_CRF = {"mp4": 51, "webm": 63}
#: A parallel decode must be predicted this much faster than one rank alone, or one rank decodes everything.
MIN_SPEEDUP = 1.25


class DecodeCancelled(Exception):
    """The caller's ``should_cancel`` turned true between blocks."""


# ---------------------------------------------------------------------------------------------- frames
def to_image(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, f, H, W] decoder output -> [B, f, H, W, 3] float32 in [0, 1], as core VAE Decode computes it."""
    return torch.clamp((video.float() + 1.0) / 2.0, min=0.0, max=1.0).movedim(1, -1)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """IMAGE values in [0, 1] -> uint8, as core Save Video converts them (``(x * 255).clamp(0, 255).byte()``)."""
    if image.dtype == torch.uint8:
        return image
    return (image * 255).clamp(0, 255).to(torch.uint8)


def pixel_offset(start: int, temporal_scale: int = 4) -> int:
    """Index of the first pixel frame of latent frame ``start`` (the first latent frame gives one pixel frame)."""
    return 0 if start == 0 else 1 + temporal_scale * (start - 1)


def num_pixel_frames(latent_frames: int, temporal_scale: int = 4) -> int:
    return pixel_offset(latent_frames, temporal_scale) if latent_frames > 0 else 0


# ---------------------------------------------------------------------------------------------- planning
def estimated_time(spans: list[tuple[int, int]], prime: int) -> int:
    """Latent-frame decodes of the busiest rank: its span plus the priming frames before it."""
    return max(end - start + min(prime, start) for start, end in spans)


def _balanced(frames: int, n: int, prime: int) -> list[tuple[int, int]]:
    """n spans whose busiest rank does the least work: rank 0 takes p frames more than the others."""
    work = math.ceil((frames + (n - 1) * prime) / n)
    if work - prime >= 1:
        starts = [0] + [min(frames, work + k * (work - prime)) for k in range(n - 1)]
    else:  # shorter than the prime: no balance helps, split evenly
        starts = [round(k * frames / n) for k in range(n)]
    return [(a, b) for a, b in zip(starts, starts[1:] + [frames]) if b > a]


def plan_spans(frames: int, ranks: int, prime: int, min_speedup: float = MIN_SPEEDUP) -> list[tuple[int, int]]:
    """One contiguous span of latent frames per rank, balanced so that every rank does the same work.

    Rank 0 starts at frame 0 and needs no priming; every other rank decodes ``prime`` extra frames first. With n
    ranks the busiest does W = (T + (n - 1) p) / n frame decodes, against T for one rank, so n ranks pay off only
    when T is well above p. The n that minimises W is used (fewest ranks on a tie), and a single span (one rank)
    unless the predicted speed-up T / W reaches ``min_speedup``. ``min_speedup <= 0`` forces a split over every
    rank that gets a frame (tests, benchmarks).
    """
    if frames < 1 or ranks < 1:
        raise ValueError(f"need at least one latent frame and one rank (got {frames} frames, {ranks} ranks).")
    if min_speedup <= 0:
        return _balanced(frames, min(ranks, frames), prime)
    best = [(0, frames)]
    for n in range(2, min(ranks, frames) + 1):
        spans = _balanced(frames, n, prime)
        if estimated_time(spans, prime) < estimated_time(best, prime):
            best = spans
    if len(best) > 1 and frames / estimated_time(best, prime) < min_speedup:
        return [(0, frames)]
    return best


def count_blocks(spans: list[tuple[int, int]], block_size: int, videos: int = 1) -> int:
    return videos * sum(math.ceil((e - s) / block_size) for s, e in spans)


# ---------------------------------------------------------------------------------------------- weights
def fingerprint(sd: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict: the key under which a worker caches the
    decoder (about 0.2 s for the Wan2.1 decoder's 73 M float32 parameters on one CPU core)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)};".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def weights_to_cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors (no copy for those already so) that pickle to the workers."""
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------- output
class VideoWriter:
    """Frames -> a video file through imageio-ffmpeg's bundled ffmpeg (h264 mp4 or vp9 webm, yuv420p, crf)."""

    def __init__(self, path: str | Path, width: int, height: int, fps: float = 16.0, fmt: str = "mp4",
                 crf: int = 19, metadata: Mapping[str, str] | None = None):
        """``metadata``: container tags (ComfyUI's Save Video stores ``prompt`` and ``workflow`` as JSON, which
        the editor reads back when the file is dropped on it); a value over 100 000 characters is left out."""
        import imageio_ffmpeg

        if fmt not in VIDEO_FORMATS:
            raise ValueError(f"format={fmt!r} is not one of {sorted(VIDEO_FORMATS)}.")
        if not 0 <= int(crf) <= MAX_CRF[fmt]:
            raise ValueError(f"crf={crf} is out of range for {fmt} (0..{MAX_CRF[fmt]}; lower is better quality).")
        if fps <= 0:
            raise ValueError(f"fps={fps} must be positive (Wan2.1 runs at 16).")
        if width % 2 or height % 2:
            raise ValueError(f"{width}x{height}: yuv420p video needs an even width and height.")
        _, codec, extra = VIDEO_FORMATS[fmt]
        tags = []
        for key, value in (metadata or {}).items():
            if len(value) > 100_000:  # one argv string may not exceed 128 KiB on Linux
                logger.warning("Block Decode: metadata %r (%d characters) is too long for the video file", key,
                               len(value))
                continue
            tags += ["-metadata", f"{key}={value}"]
        if tags and fmt == "mp4":
            tags = ["-movflags", "use_metadata_tags", *tags]
        self.path, self.size, self.frames = Path(path), (width, height), 0
        self._gen = imageio_ffmpeg.write_frames(
            str(self.path), (width, height), fps=float(fps), codec=codec, pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p", macro_block_size=1, quality=None, ffmpeg_log_level="error",
            output_params=["-crf", str(int(crf)), *extra, *tags])
        self._gen.send(None)

    def write(self, frames: torch.Tensor) -> None:
        """``frames`` [n, H, W, 3], uint8 or float in [0, 1]."""
        data = to_uint8(frames).cpu().contiguous()
        if tuple(data.shape[1:]) != (self.size[1], self.size[0], 3):
            raise ValueError(f"frames of shape {tuple(data.shape)} do not fit a {self.size[0]}x{self.size[1]} video.")
        self._gen.send(data.numpy())
        self.frames += data.shape[0]

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()  # waits for ffmpeg to finish the file
            self._gen = None

    def abort(self) -> None:
        """Close and delete the partial file."""
        self.close()
        self.path.unlink(missing_ok=True)


class FrameSink:
    """Assembles decoded blocks that arrive in any order (parallel spans) into the IMAGE and/or a video file.

    ``put(video, frame, frames)`` takes ``frames`` [n, H, W, 3] of video ``video`` starting at pixel frame
    ``frame``. With ``keep`` the IMAGE ``[videos * frames, H, W, 3]`` (float32, core VAE Decode's layout) is filled
    in place. A ``writer`` receives frames strictly in order: a block that arrives early waits in the IMAGE (with
    ``keep``) or, without it, in a spool file on disk (uint8), so the parent's memory stays flat in video length.
    Without ``keep`` only the very last frame is kept (:attr:`image` returns it).
    """

    def __init__(self, videos: int, frames: int, height: int, width: int, *, keep: bool = True,
                 writer: VideoWriter | None = None, spool_dir: str | None = None):
        if not keep and writer is None:
            raise ValueError("nothing to output: keep the frames, or give a video writer (or both).")
        self.frames, self.total, self.shape = frames, videos * frames, (height, width, 3)
        self.writer, self.spool_dir = writer, spool_dir
        self._image = torch.empty((self.total, height, width, 3), dtype=torch.float32) if keep else None
        self._last: torch.Tensor | None = None
        self._next = 0  # frames handed to the writer
        self._pending: dict[int, tuple[int, int | None]] = {}  # start -> (count, spool offset)
        self._spool = None
        self.received = 0
        self.spooled_bytes = 0

    def put(self, video: int, frame: int, frames: torch.Tensor) -> None:
        g, n = video * self.frames + frame, frames.shape[0]
        if tuple(frames.shape[1:]) != self.shape or not (0 <= frame and frame + n <= self.frames) or n < 1:
            raise ValueError(f"block of shape {tuple(frames.shape)} at video {video}, frame {frame} does not fit "
                             f"{self.frames} frames of {self.shape}.")
        if self._image is not None:
            if frames.dtype == torch.uint8:
                raise ValueError("the IMAGE needs float frames (ask the ranks for float32).")
            self._image[g : g + n] = frames
        elif g + n == self.total:
            self._last = frames[-1:].float() / 255.0 if frames.dtype == torch.uint8 else frames[-1:].float().clone()
        self.received += n
        if self.writer is None:
            return
        if g == self._next:
            self.writer.write(frames)
            self._next += n
            self._drain()
        elif self._image is not None:
            self._pending[g] = (n, None)
        else:
            self._pending[g] = (n, self._stash(to_uint8(frames)))

    def _stash(self, frames: torch.Tensor) -> int:
        if self._spool is None:
            if self.spool_dir:
                os.makedirs(self.spool_dir, exist_ok=True)
            self._spool = tempfile.TemporaryFile(prefix="dualparal-frames-", dir=self.spool_dir)
        self._spool.seek(0, os.SEEK_END)
        offset = self._spool.tell()
        self._spool.write(memoryview(frames.contiguous().numpy()).cast("B"))
        self.spooled_bytes += frames.numel()
        return offset

    def _drain(self) -> None:
        while self._next in self._pending:
            n, offset = self._pending.pop(self._next)
            if offset is None:
                block = self._image[self._next : self._next + n]
            else:
                self._spool.seek(offset)
                raw = bytearray(self._spool.read(n * math.prod(self.shape)))
                block = torch.frombuffer(raw, dtype=torch.uint8).view(n, *self.shape)
            self.writer.write(block)
            self._next += n

    @property
    def keeps(self) -> bool:
        """Whether every frame is kept (the IMAGE); else only the file gets them."""
        return self._image is not None

    @property
    def image(self) -> torch.Tensor:
        """The IMAGE: every frame (``keep``), else the last frame ``[1, H, W, 3]``."""
        return self._image if self._image is not None else self._last

    def finish(self) -> None:
        """Check completeness and close the writer and the spool."""
        try:
            if self.received != self.total or (self.writer is not None and self._next != self.total):
                raise RuntimeError(f"Block Decode lost frames: received {self.received} of {self.total}, wrote "
                                   f"{self._next}.")
        finally:
            self._close_spool()
        if self.writer is not None:
            self.writer.close()

    def abort(self) -> None:
        """Cancel or error: delete the partial video file and the spool."""
        self._close_spool()
        if self.writer is not None:
            self.writer.abort()

    def _close_spool(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


# ---------------------------------------------------------------------------------------------- one device
def decode_local(decoder, z: torch.Tensor, block_size: int, sink: FrameSink,
                 on_progress: Callable[[int, int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None) -> int:
    """Decode every video of ``z`` [B, C, T, h, w] on ``decoder``'s device, block by block, into ``sink``.

    ``should_cancel`` is polled between blocks (raises :class:`DecodeCancelled`); ``on_progress(done, total)``
    counts blocks. Returns the number of blocks. The caller finishes or aborts the sink.
    """
    videos, total_t = z.shape[0], z.shape[2]
    total = count_blocks([(0, total_t)], block_size, videos)
    done = 0
    for b in range(videos):
        frame = 0
        for block in decoder.stream(z[b : b + 1], block_size):
            frames = to_image(block)[0]
            # Only the file wants these frames: cross to the CPU as uint8, a quarter of the bytes.
            sink.put(b, frame, (frames if sink.keeps else to_uint8(frames)).cpu())
            frame += frames.shape[0]
            done += 1
            del block, frames
            if on_progress is not None:
                on_progress(done, total)
            if should_cancel is not None and done < total and should_cancel():
                raise DecodeCancelled("Block Decode was cancelled.")
    logger.debug("Block Decode: %d block(s) of %d latent frames decoded on %s", done, block_size, decoder.device)
    return done
