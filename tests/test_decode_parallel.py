"""Block Decode over the worker group (CPU ranks, gloo): one primed span per rank reproduces the sequential decode bit
for bit, the weights cross once per pool, the parent's memory stays flat while streaming, cancel and decode errors
leave the pool usable, a dead rank is a WorkerError."""

from __future__ import annotations

import math

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from fault_helpers import fault_env, tiny_job, tiny_spec
from test_vae import _heap_probe, _peak_above_start, make_vae, to_original_layout

from dualparal_core.client.decode import DecodeError, decode_on_pool, decoder_geometry
from dualparal_core.config import Timeouts
from dualparal_core.decode import (
    FrameSink,
    VideoWriter,
    count_blocks,
    decode_local,
    estimated_time,
    num_pixel_frames,
    plan_spans,
    to_image,
    to_uint8,
)
from dualparal_core.pool import PoolCancelled, WorkerError, WorkerPool
from dualparal_core.vae import WanVAEDecoder

pytestmark = [pytest.mark.dist, pytest.mark.usefixtures("no_leftover_workers")]


@pytest.fixture(scope="module")
def pool():
    p = WorkerPool.start(tiny_spec(3))
    yield p
    p.close()


@pytest.fixture(scope="module")
def small():
    """A Wan2.1-structured VAE (prime 38) at width 8, its weights in ComfyUI's key layout."""
    vae = make_vae(3, base_dim=8)
    return WanVAEDecoder.from_vae(vae), to_original_layout(vae.state_dict())


def reference(dec: WanVAEDecoder, z: torch.Tensor) -> torch.Tensor:
    """The sequential decode as an IMAGE [B * F, H, W, 3], one video at a time (as the ranks decode)."""
    return torch.cat([to_image(dec.decode_full(z[b : b + 1]))[0] for b in range(z.shape[0])])


def latent(b: int, t: int, h: int = 2, w: int = 2, seed: int = 4) -> torch.Tensor:
    return torch.randn(b, 16, t, h, w, generator=torch.Generator().manual_seed(seed))


def run(pool, z, sd, *, keep=True, writer=None, **kw):
    sink = FrameSink(z.shape[0], num_pixel_frames(z.shape[2]), 8 * z.shape[3], 8 * z.shape[4], keep=keep,
                     writer=writer)
    report = decode_on_pool(pool, z, sd, sink, **kw)
    sink.finish()
    return sink, report


# ---------------------------------------------------------------------------------------------- planning
def test_plan_spans():
    spans = plan_spans(257, 2, 38)
    assert spans == [(0, 148), (148, 257)]  # rank 0 takes the prime's worth more: both do 147-148 frame decodes
    assert estimated_time(spans, 38) == 148
    for frames, ranks in ((257, 8), (961, 8), (81, 3), (100, 5)):
        spans = plan_spans(frames, ranks, 38)
        assert spans[0][0] == 0 and spans[-1][1] == frames and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        busiest = estimated_time(spans, 38)
        assert busiest <= math.ceil((frames + (len(spans) - 1) * 38) / len(spans))
        assert frames / busiest >= 1.25
    assert plan_spans(41, 8, 38) == [(0, 41)]  # too short: priming would eat the gain
    assert plan_spans(300, 1, 38) == [(0, 300)]
    assert plan_spans(3, 2, 38, min_speedup=0) == [(0, 2), (2, 3)]
    assert plan_spans(44, 3, 38, min_speedup=0) == [(0, 40), (40, 42), (42, 44)]
    assert count_blocks([(0, 40), (40, 44)], 3, videos=2) == 2 * (14 + 2)


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("spans", [[(0, 40), (40, 44)], [(0, 39), (39, 41), (41, 44)], None],
                         ids=["2-ranks", "3-ranks", "planned-one-rank"])
def test_parallel_decode_equals_sequential(pool, small, spans):
    """Spans starting after frame 38 prime on a full 38 frames; fp32 on CPU is bit-identical."""
    dec, sd = small
    z = latent(2, 44)
    sink, report = run(pool, z, sd, block_size=3, spans=spans)
    assert report.spans == (spans or [(0, 44)])
    assert report.blocks == count_blocks(report.spans, 3, videos=2)
    assert sink.image.shape == (2 * 173, 16, 16, 3) and sink.image.dtype == torch.float32
    assert torch.equal(sink.image, reference(dec, z))


def test_weights_cross_once_per_pool(pool):
    dec = WanVAEDecoder.from_vae(make_vae(9, base_dim=4))
    sd = make_vae(9, base_dim=4).state_dict()  # diffusers keys this time
    z = latent(1, 6, seed=5)
    ref = reference(dec, z)
    first = run(pool, z, sd, spans=[(0, 3), (3, 6)])
    second = run(pool, z, sd, spans=[(0, 3), (3, 6)])
    for sink, _ in (first, second):
        assert torch.equal(sink.image, ref)
    r1, r2 = first[1], second[1]
    assert r1.weights_sent == 2 and r2.weights_sent == 0
    assert [r["weights_received"] for r in r2.ranks] == [r["weights_received"] for r in r1.ranks]
    assert [r["decoders_built"] for r in r2.ranks] == [r["decoders_built"] for r in r1.ranks]
    assert r2.ranks[0]["fingerprint"] == r1.ranks[0]["fingerprint"]


def test_sequential_paths_agree(small):
    """decode_local (ComfyUI's device) == decode_full, and a uint8-only sink keeps just the last frame."""
    dec, _ = small
    z = latent(2, 5)
    ref = reference(dec, z)
    sink = FrameSink(2, 17, 16, 16)
    assert decode_local(dec, z, 2, sink) == 2 * 3
    sink.finish()
    assert torch.equal(sink.image, ref)

    class Null:
        frames = 0

        def write(self, f):
            self.frames += f.shape[0]

        close = abort = lambda self: None

    sink = FrameSink(2, 17, 16, 16, keep=False, writer=Null())
    decode_local(dec, z, 2, sink)
    sink.finish()
    assert sink.writer.frames == 34
    assert torch.equal(sink.image, to_uint8(ref[-1:]).float() / 255)


# ---------------------------------------------------------------------------------------------- files, memory
def test_streamed_file_has_every_frame_in_order(pool, small, tmp_path):
    dec, sd = small
    z = latent(1, 112, 4, 4, seed=6)
    ref = reference(dec, z)
    path = tmp_path / "v.mp4"
    # rank 1 primes on 38 frames and decodes 8: it is done while rank 0 is still at its 46th frame of 104 (a wide
    # margin: the ranks share two CPU cores with the parent, and the order must not hang on the scheduler)
    sink, _ = run(pool, z, sd, keep=False, writer=VideoWriter(path, 32, 32, 16, "mp4", 0), block_size=2,
                  spans=[(0, 104), (104, 112)])
    assert sink.spooled_bytes > 0  # rank 1's blocks came early and waited on disk
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    got = np.stack([np.frombuffer(f, np.uint8).reshape(32, 32, 3) for f in reader])
    assert meta["size"] == (32, 32) and got.shape[0] == num_pixel_frames(112) == 445
    want = to_uint8(ref).numpy().astype(np.float32)
    err = np.abs(got.astype(np.float32) - want).mean(axis=(1, 2, 3))
    assert err.max() < 12, err  # yuv420p at crf 0: chroma subsampling only; a swapped block would be far off
    shuffled = np.abs(got.astype(np.float32) - want[::-1]).mean()
    assert shuffled > 2 * err.mean()


HW = 4  # latent side: 32x32 pixels


def test_streaming_parent_memory_is_flat(pool, small):
    live = _heap_probe()
    if live is None:
        pytest.skip("needs glibc's mallinfo2 to count live heap bytes")
    _, sd = small

    class Null:
        def write(self, f):
            pass

        close = abort = lambda self: None

    def stream(t):
        z = latent(1, t, HW, HW, seed=t)
        sink = FrameSink(1, num_pixel_frames(t), 8 * HW, 8 * HW, keep=False, writer=Null())
        # rank 1 primes on 38 frames and decodes the last 4 while rank 0 decodes the rest, so its blocks come early
        # (by a wide margin: the ranks share two CPU cores with the parent) and must wait on disk, not in memory
        report = decode_on_pool(pool, z, sd, sink, block_size=2, min_speedup=0, spans=[(0, t - 4), (t - 4, t)])
        sink.finish()
        return sink.spooled_bytes, report

    stream(44)  # warm-up
    peak_short, _ = _peak_above_start(live, lambda: stream(48))
    peak_long, (spooled, report) = _peak_above_start(live, lambda: stream(96))
    grown = num_pixel_frames(96) - num_pixel_frames(48)
    video = grown * 64 * HW * HW * 3
    print(f"parent peak: T=48 {peak_short / 2**20:.2f} MB, T=96 {peak_long / 2**20:.2f} MB; the 192 more frames are "
          f"{video / 2**20:.2f} MB as uint8; spooled {spooled / 2**20:.2f} MB; spans {report.spans}")
    assert spooled > 0
    # what grows is the latent the parent holds (1/12 of the uint8 frames it decodes to), not the frames
    assert peak_long - peak_short < 0.25 * video


# ---------------------------------------------------------------------------------------------- cancel, faults
def test_cancel_stops_the_ranks_and_keeps_the_pool(pool, small):
    dec, sd = small
    z = latent(1, 160, seed=7)
    seen = []
    with pytest.raises(PoolCancelled):
        run(pool, z, sd, block_size=1, spans=[(0, 99), (99, 160)], on_progress=lambda d, t: seen.append(d),
            should_cancel=lambda: len(seen) >= 2)
    assert 2 <= len(seen) < 40  # stopped within a frame or so of the cancel, not after 160 blocks
    assert pool.alive
    z = latent(1, 41, seed=8)
    sink, _ = run(pool, z, sd, spans=[(0, 39), (39, 41)])
    assert torch.equal(sink.image, reference(dec, z))


def test_decode_errors_keep_the_pool_and_a_dead_rank_closes_it(small):
    dec, sd = small
    p = WorkerPool.start(tiny_spec(2), env=fault_env(
        "rank=1,phase=decode,kind=raise,step=2;rank=1,phase=decode,kind=oom,step=3;rank=1,phase=decode,kind=kill,step=4"))
    try:
        z = latent(1, 8, seed=9)
        with pytest.raises(DecodeError, match=r"rank 1 \(cpu\).*boom-42"):
            run(p, z, sd, block_size=1, spans=[(0, 4), (4, 8)])
        assert p.alive
        with pytest.raises(torch.OutOfMemoryError, match="rank 1"):
            run(p, z, sd, block_size=1, spans=[(0, 4), (4, 8)])
        sink, _ = run(p, z, sd, spans=[(0, 8)])  # rank 0 alone
        assert torch.equal(sink.image, reference(dec, z))
        torch.testing.assert_close(p.generate(tiny_job(batch=1)).shape, torch.Size([1, 16, 7, 8, 8]))
        with pytest.raises(WorkerError, match="rank 1"):
            run(p, z, sd, block_size=1, spans=[(0, 4), (4, 8)])
        assert not p.alive
    finally:
        p.close()


def test_bad_input_is_refused_before_any_rank(pool, small):
    _, sd = small
    with pytest.raises(ValueError, match=r"\[B, 16, T, h, w\]"):
        run(pool, torch.zeros(1, 48, 3, 2, 2), sd)
    with pytest.raises(ValueError, match="not a Wan VAE"):
        run(pool, latent(1, 3), {"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="spans"):
        run(pool, latent(1, 3), sd, spans=[(0, 1), (2, 3)])
    assert decoder_geometry(sd) == (38, 4, 16)
    with pytest.raises(TypeError, match="WorkerPool"):
        run(object(), latent(1, 3), sd)


# ---------------------------------------------------------------------------------------------- real width
@pytest.mark.slow
def test_real_wan21_shape_over_three_ranks(pool):
    """The real Wan2.1 decoder (width 96, 73 M parameters) at a 2x2 latent, 44 frames over 3 ranks."""
    vae = make_vae(0)
    dec, sd = WanVAEDecoder.from_vae(vae), to_original_layout(vae.state_dict())
    z = latent(1, 44, seed=1) * 2.0
    sink, report = run(pool, z, sd, block_size=4, spans=[(0, 40), (40, 42), (42, 44)])
    assert report.weights_sent == 3
    assert torch.equal(sink.image, reference(dec, z))


def test_the_frame_sender_keeps_block_order_and_reports_a_lost_parent():
    """Frames leave from a thread while the next block decodes: in order, all of them before close() returns, and
    a failed send (the parent is gone) is reported to the decode loop instead of being lost."""
    import threading
    import time as _time

    from dualparal_core.rank.decode import _Sender

    class FakeWorker:
        def __init__(self, fail_at=None):
            self.got, self.fail_at = [], fail_at

        def send(self, op, **kw):
            _time.sleep(0.01)  # slower than the producer: the queue fills and put() waits
            if self.fail_at is not None and kw["frame"] == self.fail_at:
                raise ConnectionResetError("parent gone")
            self.got.append((op, kw["frame"], float(kw["frames"][0, 0, 0, 0])))

    w = FakeWorker()
    s = _Sender(w, depth=2)
    for i in range(12):
        s.put(torch.full((1, 2, 2, 3), float(i)), frame=i)
    s.close()
    assert [g[1] for g in w.got] == list(range(12)) and [g[2] for g in w.got] == [float(i) for i in range(12)]
    assert s.error is None and not s.t.is_alive()

    w = FakeWorker(fail_at=3)
    s = _Sender(w, depth=2)
    done = threading.Event()

    def produce():
        for i in range(50):
            s.put(torch.zeros(1, 2, 2, 3), frame=i)
            if s.error is not None:
                break
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    assert done.wait(10), "put() must not block forever once the parent is gone"
    s.close()
    assert isinstance(s.error, ConnectionResetError) and [g[1] for g in w.got] == [0, 1, 2]


def test_rank_0_beats_on_while_the_other_ranks_still_decode(small):
    """Rank 0's span is one frame, rank 1's seven slow ones: rank 0 is done long before the decode is, and its
    heartbeats must go on until then, or the parent takes its silence for a frozen rank 0 (3 x 0.3 s + 1 s here).
    Found in real ComfyUI: Block Decode on two workers failed with "rank 0 stopped sending heartbeats"."""
    dec, sd = small
    p = WorkerPool.start(tiny_spec(2), Timeouts(heartbeat=0.3), env=fault_env(
        "rank=1,phase=decode,kind=slow,delay=0.6", DUALPARAL_HEARTBEAT="0.3"))
    try:
        z = latent(1, 8, seed=6)
        sink, report = run(p, z, sd, block_size=1, spans=[(0, 1), (1, 8)])
        assert report.seconds > p.session.stale_after + 1.0  # rank 1 decoded past rank 0's silence limit
        assert torch.equal(sink.image, reference(dec, z))
        assert p.alive
        sink, _ = run(p, z, sd, spans=[(0, 8)])  # the pool goes on: the next decode (rank 0 alone) works
        assert torch.equal(sink.image, reference(dec, z))
    finally:
        p.close()
