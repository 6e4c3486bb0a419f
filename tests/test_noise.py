"""Initial noise: KSampler-identical independent noise, and coordinated noise checked against its construction."""

from __future__ import annotations

import pytest
import torch
from comfy_import import import_comfy

from dualparal_core.config import BlockLayout
from dualparal_core.noise import coordinated_noise, independent_noise, initial_noise


def replay(shape, p: int, k: int, seed: int):
    """The draws coordinated noise is defined by, taken again from a fresh generator: template, then perms."""
    b, c, t, h, w = shape
    g = torch.Generator().manual_seed(seed)
    template = torch.randn((b, c, p + k, h, w), generator=g)
    n_later = len(BlockLayout(t, p, k).blocks) - 1
    return template, [torch.randperm(p, generator=g) for _ in range(n_later)]


def expected_by_index(shape, p: int, k: int, seed: int) -> torch.Tensor:
    """Coordinated noise built as frame *indices* into the original template (no tensor concatenation)."""
    b, c, t, h, w = shape
    template, perms = replay(shape, p, k, seed)
    ids = list(range(p + k))  # which original template frame sits at each template slot
    frames = ids[: min(t, p + k)]
    for perm in perms:
        ids = ids[p:] + [ids[i] for i in perm.tolist()]  # K tail slots, then the P head slots reshuffled
        frames += ids[-min(p, t - len(frames)):]
    assert len(frames) == t
    return template[:, :, frames]


def frame_keys(x: torch.Tensor) -> list[tuple]:
    """Hashable content of each frame of one video [C, T, H, W]."""
    return [tuple(x[:, f].flatten().tolist()) for f in range(x.shape[1])]


def test_independent_is_comfyui_prepare_noise_formula():
    shape, seed = (2, 4, 5, 3, 6), 123456789
    with torch.random.fork_rng():
        generator = torch.manual_seed(seed)  # comfy.sample.prepare_noise(latent, seed), written out
        ref = torch.randn(torch.zeros(shape).size(), dtype=torch.float32, layout=torch.strided,
                          generator=generator, device="cpu")
    got = independent_noise(shape, seed)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.equal(got, ref)
    assert torch.equal(initial_noise(shape, BlockLayout(5, 2, 1), seed, "independent"), ref)


@pytest.mark.parametrize("t,p,k", [(26, 8, 4), (24, 8, 8), (21, 4, 0), (9, 3, 2), (13, 5, 5), (7, 8, 4), (12, 8, 4)])
def test_coordinated_equals_construction(t, p, k):
    shape, seed = (1, 3, t, 2, 3), 42
    got = coordinated_noise(shape, BlockLayout(t, p, k), seed)
    assert got.shape == shape and got.dtype == torch.float32
    assert torch.equal(got, expected_by_index(shape, p, k, seed))


def test_block_structure():
    t, p, k, shape, seed = 30, 8, 4, (1, 2, 30, 2, 2), 7
    layout = BlockLayout(t, p, k)
    got = coordinated_noise(shape, layout, seed)
    template, perms = replay(shape, p, k, seed)
    spans = layout.blocks
    assert spans == [(0, 12), (12, 20), (20, 28), (28, 30)]
    assert torch.equal(got[:, :, 0:12], template)  # B_0 is the whole P+K template
    prev = template
    for (start, end), perm in zip(spans[1:], perms):
        new = torch.cat((prev[:, :, -k:], prev[:, :, :p][:, :, perm]), dim=2)
        block = got[:, :, start:end]
        assert torch.equal(block, new[:, :, -(end - start):])
        # The window the model sees (K context frames of the previous block, then this block) is the new template.
        if end - start == p:
            assert torch.equal(got[:, :, start - k:end], new)
            # Its P own frames are the previous template's first P frames, reshuffled.
            assert sorted(frame_keys(block[0])) == sorted(frame_keys(prev[0, :, :p]))
        # Every block's frames are frames of the one template drawn from the seed.
        assert set(frame_keys(block[0])) <= set(frame_keys(template[0]))
        prev = new


def test_short_last_block_takes_the_template_tail():
    t, p, k, shape = 10, 4, 2, (1, 2, 10, 1, 1)  # blocks (0, 6), (6, 10)
    t2, p2, k2, shape2 = 11, 4, 2, (1, 2, 11, 1, 1)  # blocks (0, 6), (6, 10), (10, 11)
    got = coordinated_noise(shape2, BlockLayout(t2, p2, k2), 3)
    longer = coordinated_noise((1, 2, 14, 1, 1), BlockLayout(14, p2, k2), 3)  # same draws, full last block
    assert torch.equal(got, longer[:, :, list(range(10)) + [13]])
    assert torch.equal(coordinated_noise(shape, BlockLayout(t, p, k), 3), got[:, :, :10])


def test_one_block_when_t_at_most_p_plus_k():
    shape = (1, 2, 5, 2, 2)
    template, perms = replay(shape, 4, 3, 11)
    assert perms == []
    assert torch.equal(coordinated_noise(shape, BlockLayout(5, 4, 3), 11), template[:, :, :5])
    full = (1, 2, 7, 2, 2)
    assert torch.equal(coordinated_noise(full, BlockLayout(7, 4, 3), 11), replay(full, 4, 3, 11)[0])


def test_k_zero_blocks_are_permutations_of_the_template():
    p, shape = 4, (1, 2, 12, 2, 2)
    got = coordinated_noise(shape, BlockLayout(12, p, 0), 5)
    template = replay(shape, p, 0, 5)[0]
    assert torch.equal(got[:, :, :p], template)
    keys = sorted(frame_keys(template[0]))
    for start in (4, 8):
        assert sorted(frame_keys(got[0, :, start:start + p])) == keys


def test_batch_videos_differ_but_share_the_permutations():
    shape, layout = (2, 2, 20, 2, 2), BlockLayout(20, 6, 2)
    got = coordinated_noise(shape, layout, 9)
    assert not torch.allclose(got[0], got[1])
    # Recover, per video, which B_0 frame each later frame is: the same map for both videos (one perm per block).
    maps = []
    for v in range(2):
        index = {key: i for i, key in enumerate(frame_keys(got[v, :, :8]))}
        maps.append([index[key] for key in frame_keys(got[v])])
    assert maps[0] == maps[1]
    assert torch.equal(got, expected_by_index(shape, 6, 2, 9))


def test_deterministic_per_seed():
    shape, layout = (1, 2, 20, 2, 2), BlockLayout(20, 6, 2)
    a, b = coordinated_noise(shape, layout, 1), coordinated_noise(shape, layout, 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, coordinated_noise(shape, layout, 2))
    assert torch.equal(initial_noise(shape, layout, 1, "coordinated"), a)
    assert torch.equal(independent_noise(shape, 1), independent_noise(shape, 1))


def test_bad_input():
    layout = BlockLayout(20, 6, 2)
    with pytest.raises(ValueError, match="coordinated"):
        initial_noise((1, 2, 20, 2, 2), layout, 0, "shared")
    with pytest.raises(ValueError, match="T=19"):
        initial_noise((1, 2, 19, 2, 2), layout, 0, "coordinated")
    with pytest.raises(ValueError, match="T=19"):
        initial_noise((1, 2, 19, 2, 2), layout, 0, "independent")
    with pytest.raises(ValueError, match="5 positive"):
        independent_noise((1, 2, 20, 2), 0)


@pytest.mark.comfy_live
def test_independent_equals_comfyui_prepare_noise():
    (sample,) = import_comfy("comfy.sample", why="comparing with comfy.sample.prepare_noise")
    for shape, seed in (((1, 16, 5, 4, 6), 0), ((2, 4, 3, 2, 2), 2**63 + 5)):
        with torch.random.fork_rng():
            ref = sample.prepare_noise(torch.zeros(shape), seed)
        assert torch.equal(independent_noise(shape, seed), ref)
