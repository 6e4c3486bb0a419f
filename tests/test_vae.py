"""Block Decode engine: streamed, spanned and loaded Wan VAE decodes equal our own full decode bit for bit, that full
decode equals diffusers' within a justified float32 tolerance, and the stream's memory is flat."""

from __future__ import annotations

import ctypes
import gc
import re
import threading
import time

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from dualparal_core.vae import WanVAEDecoder, frames_needed_to_prime

WAN21 = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
)


def make_vae(seed: int = 0, **overrides) -> AutoencoderKLWan:
    """A seeded random Wan VAE; norm gains and biases are randomised too, so a mis-mapped key shows up."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**{**WAN21, **overrides}).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return vae


def to_original_layout(sd: dict) -> dict:
    """Invert diffusers' ``convert_wan_vae_to_diffusers``: diffusers names -> original Wan / ComfyUI names."""
    inner = [
        ("norm1.", "residual.0."),
        ("conv1.", "residual.2."),
        ("norm2.", "residual.3."),
        ("conv2.", "residual.6."),
    ]
    rules = [
        (r"^quant_conv\.", "conv1."),
        (r"^post_quant_conv\.", "conv2."),
        (r"^(en|de)coder\.conv_in\.", r"\1coder.conv1."),
        (r"^(en|de)coder\.norm_out\.", r"\1coder.head.0."),
        (r"^(en|de)coder\.conv_out\.", r"\1coder.head.2."),
        (r"^(en|de)coder\.mid_block\.attentions\.0\.", r"\1coder.middle.1."),
        (r"^(en|de)coder\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}coder.middle.{2 * int(m[2])}."),
        (r"^encoder\.down_blocks\.", "encoder.downsamples."),
        (
            r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.",
            lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.",
        ),
        (r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}."),
    ]
    out = {}
    for key, value in sd.items():
        new = key
        if re.search(r"resnets\.\d\.|^encoder\.down_blocks\.\d+\.(norm|conv[12]\.|conv_shortcut)", key):
            tail = new.rsplit(".", 2)
            head, leaf = ".".join(tail[:-2]) + ".", ".".join(tail[-2:])
            for a, b in [*inner, ("conv_shortcut.", "shortcut.")]:
                if leaf.startswith(a):
                    leaf = b + leaf[len(a) :]
            new = head + leaf
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        out[new] = value
    return out


# --------------------------------------------------------------------------- comparing with diffusers (foreign code)
# Our decoder runs diffusers' own modules, but calls them frame by frame (post_quant_conv per latent frame, the causal
# cache carried between calls) where diffusers' decode calls post_quant_conv once on the whole latent. The same float32
# arithmetic on a differently shaped tensor may pick another CPU kernel (AVX2 vs AVX-512 blocking, oneDNN's choice per
# shape), which changes the summation order and so the last bits of each output; the ~30 convolutions that follow
# (each a float32 sum of up to 384 * 27 = 10,368 products) carry that rounding to the output. Measured on 2 cores with
# 1 thread, on outputs in [-1, 1] (the decoder's clamp): 3.2e-6 (Wan2.1 widths), 1.0e-5, 2.0e-5 and 3.0e-6 (the three
# structures below) on an AMD EPYC; 0 on the Intel machine the tests were first written on. The tolerance is 5x the
# worst of those, and four orders of magnitude below what a real bug does (test_foreign_tolerance_catches_real_bugs:
# a zeroed conv 1.2, a 1 % error in one norm's gain 2.6e-3, two norms swapped far above).
# Where both sides are our own code (stream vs full, spans, loaded files, N ranks) the tests keep torch.equal.
FOREIGN_ATOL = 1e-4


def assert_matches_diffusers(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.isfinite().all()
    err = (ours - theirs).abs().max().item()
    assert err <= FOREIGN_ATOL, f"max |ours - diffusers| = {err:.3g} > {FOREIGN_ATOL} (float32 reordering is ~2e-5)"


# --------------------------------------------------------------------------- real Wan2.1 VAE shapes, tiny frames
@pytest.fixture(scope="module")
def wan21():
    vae = make_vae(0)
    z = torch.randn(1, 16, 7, 2, 2, generator=torch.Generator().manual_seed(1)) * 2.0
    with torch.no_grad():
        ref = vae.decode(z).sample
    assert ref.shape == (1, 3, 25, 16, 16)
    assert (ref.abs() < 1).float().mean() > 0.9, "random weights should not saturate the output clamp"
    return vae, z, ref


@pytest.mark.parametrize("block_size", [1, 2, 3, 7])
def test_stream_equals_our_full_decode_and_diffusers(wan21, block_size):
    vae, z, ref = wan21
    dec = WanVAEDecoder.from_vae(vae)
    blocks = list(dec.stream(z, block_size))
    sizes = [b.shape[2] for b in blocks]
    expected = [dec.num_pixel_frames(s, min(7, s + block_size)) for s in range(0, 7, block_size)]
    assert sizes == expected and sizes[0] == 1 + 4 * (min(7, block_size) - 1)
    # Same per-frame calls on the same inputs with the same cache as our full decode: bit-identical, not merely close.
    full = dec.decode_full(z)
    assert torch.equal(torch.cat(blocks, dim=2), full)
    assert_matches_diffusers(full, ref)


def test_decode_full_and_prime_count_of_wan21(wan21):
    vae, z, ref = wan21
    dec = WanVAEDecoder.from_vae(vae)
    assert_matches_diffusers(dec.decode_full(z), ref)
    assert dec.temporal_scale == 4
    assert frames_needed_to_prime(vae.decoder) == dec.prime_frames == 38


def test_original_layout_file_loads_identically(wan21, tmp_path):
    vae, z, ref = wan21
    full = vae.state_dict()
    orig = to_original_layout(full)
    # Key names and shapes of ComfyUI's wan_2.1_vae.safetensors.
    assert orig["decoder.conv1.weight"].shape == (384, 16, 3, 3, 3)
    assert orig["decoder.upsamples.3.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    assert orig["decoder.upsamples.4.shortcut.weight"].shape == (384, 192, 1, 1, 1)
    assert orig["decoder.upsamples.11.resample.1.weight"].shape == (96, 192, 3, 3)
    assert {"conv2.weight", "decoder.head.2.weight", "decoder.middle.1.to_qkv.weight"} <= orig.keys()
    # The inverse is exact: diffusers' own conversion maps every key back.
    back = convert_wan_vae_to_diffusers(dict(orig))
    assert back.keys() == full.keys() and all(back[k] is full[k] for k in full)

    # Loaded from the original layout, our decoder computes exactly what it computes on diffusers' own modules.
    ours = WanVAEDecoder.from_vae(vae).decode_full(z)
    dec = WanVAEDecoder.from_state_dict(orig)
    assert torch.equal(dec.decode_full(z), ours)
    path = tmp_path / "wan_2.1_vae.safetensors"  # with the encoder in it, as users have it
    save_file({k: v.contiguous() for k, v in orig.items()}, str(path))
    assert torch.equal(WanVAEDecoder.from_file(path).decode_full(z), ours)
    assert_matches_diffusers(ours, ref)


def test_foreign_tolerance_catches_real_bugs(wan21):
    """The control for FOREIGN_ATOL: each planted bug lands far outside it (measured: 1.24, 2.6e-3, > 1e-2)."""
    vae, z, ref = wan21

    def decode_with(change) -> torch.Tensor:
        bad = make_vae(0)
        bad.load_state_dict(vae.state_dict())
        with torch.no_grad():
            change(bad.decoder)
        return WanVAEDecoder.from_vae(bad).decode_full(z)

    def dropped_conv(d):
        d.up_blocks[1].resnets[0].conv2.weight.zero_()
        d.up_blocks[1].resnets[0].conv2.bias.zero_()

    def norm_gain_off_by_one_percent(d):
        d.mid_block.resnets[0].norm1.gamma.mul_(1.01)

    def swapped_norms(d):
        r = d.up_blocks[0].resnets[0]
        g1, g2 = r.norm1.gamma.clone(), r.norm2.gamma.clone()
        r.norm1.gamma.copy_(g2)
        r.norm2.gamma.copy_(g1)

    for change in (dropped_conv, norm_gain_off_by_one_percent, swapped_norms):
        err = (decode_with(change) - ref).abs().max().item()
        assert err > 10 * FOREIGN_ATOL, f"{change.__name__}: {err:.3g} would pass as rounding"


# --------------------------------------------------------------------------- small widths: same temporal structure
@pytest.fixture(scope="module")
def small():
    vae = make_vae(3, base_dim=8)
    z = torch.randn(2, 16, 41, 2, 2, generator=torch.Generator().manual_seed(4))
    return vae, z, WanVAEDecoder.from_vae(vae).decode_full(z)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_from_file_layouts(small, tmp_path, layout, fmt):
    vae, z, ref = small
    sd = vae.state_dict() if layout == "diffusers" else to_original_layout(vae.state_dict())
    path = tmp_path / f"vae.{fmt}"
    if fmt == "pt":
        torch.save({"vae." + k: v for k, v in sd.items()}, path)  # prefixed keys are accepted too
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    dec = WanVAEDecoder.from_file(path)
    assert sum(p.numel() for p in dec.decoder.parameters()) == sum(
        p.numel() for p in vae.decoder.parameters()
    )
    assert torch.equal(dec.decode_full(z[:, :, :5]), ref[:, :, :17])


def test_from_file_bf16(small, tmp_path):
    vae, z, ref = small
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in to_original_layout(vae.state_dict()).items()}, str(path))
    dec = WanVAEDecoder.from_file(path, dtype=torch.bfloat16)
    assert dec.dtype == torch.bfloat16 and next(dec.decoder.parameters()).dtype == torch.bfloat16
    out = dec.decode_full(z[:, :, :3])
    assert out.dtype == torch.bfloat16 and (out.float() - ref[:, :, :9]).abs().max() < 0.1


def _differing_frames(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    return (a - b).abs().amax(dim=(0, 1, 3, 4)).nonzero().flatten().tolist()


def test_decode_span_prime_is_exact_and_minimal(small):
    vae, z, ref = small
    dec = WanVAEDecoder.from_vae(vae)
    p = dec.prime_frames
    assert p == 38
    for start in (p + 1, p + 2):
        want = ref[:, :, 1 + 4 * (start - 1) :]
        assert torch.equal(dec.decode_span(z, start, 41, p), want)
        assert torch.equal(dec.decode_span(z, start, 41), want)  # prime=None is the exact prime
        # One frame less: conv_out's cache holds two inexact frames, so exactly the span's first two pixel frames
        # differ (the exactness front of the module docstring lands at pixel frame 4 * start).
        assert _differing_frames(dec.decode_span(z, start, 41, p - 1), want) == [0, 1]
    # Spans that reach back to frame 0, and a split into three spans, reproduce the full decode.
    assert torch.equal(dec.decode_span(z, 5, 9, p), ref[:, :, 17:33])
    spans = [dec.decode_span(z, a, b, p) for a, b in ((0, 3), (3, 40), (40, 41))]
    assert torch.equal(torch.cat(spans, dim=2), ref)
    # prime=0 decodes the span as its own video: one pixel frame for its first latent frame.
    assert dec.decode_span(z, 39, 41, 0).shape[2] == 5


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (dict(base_dim=4, num_res_blocks=1), 30),
        (dict(base_dim=4, temperal_downsample=[False, False, True]), 43),
        # Wan2.2-style decoder (residual up blocks that repeat frames, 2x2 patches), through from_vae only.
        (dict(base_dim=8, z_dim=8, is_residual=True, patch_size=2, in_channels=12, out_channels=12), 38),
    ],
)
def test_prime_count_follows_the_structure(overrides, expected):
    vae = make_vae(5, **overrides)
    dec = WanVAEDecoder.from_vae(vae)
    p, s = dec.prime_frames, expected + 1
    assert p == expected
    z = torch.randn(1, dec.z_dim, s + 2, 2, 2, generator=torch.Generator().manual_seed(6))
    ref = dec.decode_full(z)
    with torch.no_grad():
        assert_matches_diffusers(ref, vae.decode(z).sample)
    # The prime count is pinned on our own full decode, bit for bit: one frame too few changes the span's first two
    # pixel frames by only 2.4e-7 to 6.0e-7 here (measured on these three structures), far below FOREIGN_ATOL, so a
    # tolerance could not see it; torch.equal against our own decode does.
    want = ref[:, :, 1 + dec.temporal_scale * (s - 1) :]
    assert torch.equal(dec.decode_span(z, s, s + 2, p), want)
    assert _differing_frames(dec.decode_span(z, s, s + 2, p - 1), want) == [0, 1]


# --------------------------------------------------------------------------- bad input
def test_bad_latent_shapes(small):
    dec = WanVAEDecoder.from_vae(small[0])
    for bad in (torch.zeros(1, 4, 3, 2, 2), torch.zeros(16, 3, 2, 2), torch.zeros(1, 16, 0, 2, 2)):
        with pytest.raises(ValueError, match=r"latent .*\[B, 16, T, h, w\]"):
            dec.decode_full(bad)
    with pytest.raises(ValueError, match=r"latent .*got \(1, 4, 3, 2, 2\)"):
        next(dec.stream(torch.zeros(1, 4, 3, 2, 2), 2))
    with pytest.raises(ValueError, match="block_size"):
        next(dec.stream(torch.zeros(1, 16, 3, 2, 2), 0))
    with pytest.raises(ValueError, match=r"span \[start, end\) = \[2, 5\)"):
        dec.decode_span(torch.zeros(1, 16, 3, 2, 2), 2, 5, 1)


def test_bad_files(tmp_path):
    other = tmp_path / "wan2.1_t2v_1.3B.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(ValueError, match=re.escape(str(other)) + ".*not a Wan VAE"):
        WanVAEDecoder.from_file(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        WanVAEDecoder.from_file(junk)
    wan22 = tmp_path / "wan2.2_vae.safetensors"
    save_file(
        {
            k: torch.zeros(1)
            for k in (
                "decoder.middle.0.residual.0.gamma",
                "decoder.upsamples.0.upsamples.0.residual.2.weight",
            )
        },
        str(wan22),
    )
    with pytest.raises(ValueError, match="Wan2.2 VAE"):
        WanVAEDecoder.from_file(wan22)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        WanVAEDecoder.from_file(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="the state dict .*not a Wan VAE"):
        WanVAEDecoder.from_state_dict({"x": torch.zeros(1)})


# --------------------------------------------------------------------------- memory
class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_probe():
    """Bytes malloc has handed out and not got back (torch's CPU tensors included); None off glibc >= 2.33."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def live() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    return live


def _peak_above_start(live, fn):
    gc.collect()
    start = live()
    peak, stop = [start], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], live())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
    return max(peak[0], live()) - start, result


def test_stream_working_memory_is_flat():
    live = _heap_probe()
    if live is None:
        pytest.skip("needs glibc's mallinfo2 to count live heap bytes")
    dec = WanVAEDecoder.from_vae(make_vae(7, base_dim=8))
    zs = {t: torch.randn(1, 16, t, 6, 6, generator=torch.Generator().manual_seed(t)) for t in (8, 32)}

    def consume(z):
        after = []
        for block in dec.stream(z, 2):
            del block  # the caller would move it to CPU / disk here
            after.append(live())
        return after

    consume(zs[8])  # warm-up: first-use allocations of torch and the conv kernels
    peak8, _ = _peak_above_start(live, lambda: consume(zs[8]))
    peak32, after = _peak_above_start(live, lambda: consume(zs[32]))
    full8, _ = _peak_above_start(live, lambda: dec.decode_full(zs[8]))
    full32, _ = _peak_above_start(live, lambda: dec.decode_full(zs[32]))
    frame_bytes = 3 * 48 * 48 * 4
    mb = 2**20
    print(
        f"stream peak T=8 {peak8 / mb:.2f} MB, T=32 {peak32 / mb:.2f} MB; decode_full {full8 / mb:.2f} -> {full32 / mb:.2f} MB"
    )
    # Between blocks, what stream() holds is constant: the cache only (Python's own small objects aside).
    assert max(after[1:]) - min(after[1:]) < 64 * 1024
    # The peak does not grow with the number of frames ...
    assert abs(peak32 - peak8) < max(256 * 1024, 0.02 * peak8)
    # ... while the probe does see a full decode's output growing (96 more pixel frames).
    assert full32 - full8 > 0.8 * 96 * frame_bytes
