"""The prompt timeline in a real ComfyUI server: DualParal Prompt At chained and joined by core Conditioning Combine
into the Sampler's positive; the status line names the newest block's prompt; a single untagged prompt gives the
LATENT it gave before (bit-equal to the same prompt tagged at 0, and to itself with a transition set); tags survive
WanImageToVideo's copies (the same latent through it); bad timelines are node errors naming the stretch, before any worker is touched."""

from __future__ import annotations

import struct

import pytest
import torch
from comfy_harness import COMFY, SKIP_REASON, VAE, ComfyServer, build_assets, error_of
from test_e2e import cond, loader, saved_latent

pytestmark = [pytest.mark.comfy_live, pytest.mark.skipif(not COMFY, reason=SKIP_REASON)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_timeline")
    srv = ComfyServer(base, build_assets(base)).start()
    yield srv
    srv.stop()


def prompt_at(c: str, start: float, label: str, previous: str | None = None, unit: str = "frames") -> dict:
    inputs = {"conditioning": [c, 0], "start": start, "unit": unit, "fps": 16.0, "label": label}
    if previous is not None:
        inputs["previous"] = [previous, 0]
    return {"class_type": "DualParalPromptAt", "inputs": inputs}


def graph(positive: str = "43", transition: int = 8, **sampler_kw) -> dict:
    """49 video frames (13 latent), P = K = 2: blocks start at video frames 0, 13, 21, 29, 37, 45, so sea (from 0),
    storm (from 20, i.e. 1.25 s) and sun (from 36) take two blocks each, blended over 8 frames at each start."""
    return {
        "3": cond(1), "31": cond(3), "32": cond(4), "4": cond(2),
        "40": prompt_at("3", 0, "sea"),
        "41": prompt_at("31", 1.25, "storm", previous="40", unit="seconds"),
        "42": prompt_at("32", 36, "sun"),
        "43": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["42", 0],
                                                                "conditioning_2": ["41", 0]}},
        "5": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": 32, "height": 32, "length": 49, "batch_size": 1}},
        "8": loader(),
        "9": {"class_type": "DualParalSampler", "inputs": {
            "model": ["8", 0], "positive": [positive, 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": 42, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple", "shift": 8.0,
            "denoise": 1.0, "num_per_block": 2, "num_cat": 2, "noise_mode": "coordinated",
            "transition": transition, **sampler_kw}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "latents/tl"}},
    }


def status_texts(server: ComfyServer, node: str) -> list[str]:
    """The TEXT binary events (server.send_progress_text: type 3, node id length, node id, text) for ``node``."""
    out = []
    for data in server.ws.binary_data:
        if len(data) < 8 or struct.unpack(">I", data[:4])[0] != 3:
            continue
        n = struct.unpack(">I", data[4:8])[0]
        if data[8:8 + n].decode() == node:
            out.append(data[8 + n:].decode())
    return out


def test_a_three_prompt_timeline_runs_and_shows_each_blocks_prompt(server):
    h = server.run(graph())
    timeline = saved_latent(server, h, "10")
    texts = status_texts(server, "9")
    for want in ("block 1/6: sea", "block 3/6: sea", "storm", "block 6/6: sun"):
        assert any(want in t for t in texts), texts
    h = server.run(graph(positive="3"))  # the first prompt alone
    single = saved_latent(server, h, "10")
    assert timeline.shape == single.shape == (1, 16, 13, 4, 4)
    assert (timeline[:, :, 9:] - single[:, :, 9:]).abs().max() > 1e-3  # the sun's blocks changed


def test_a_single_untagged_prompt_gives_the_same_latent_as_before(server):
    """'Before' is pinned two ways: test_e2e checks this untagged path against ComfyUI's KSampler; here a one-stretch
    timeline and a transition without tags must not move a bit of it."""
    shown = len(status_texts(server, "9"))
    untagged = saved_latent(server, server.run(graph(positive="3", transition=0)), "10")
    g = graph(positive="40", transition=0)  # the same prompt, tagged at frame 0: a one-stretch timeline
    assert torch.equal(saved_latent(server, server.run(g), "10"), untagged)
    g = graph(positive="3", transition=8)  # a transition without tags changes nothing
    assert torch.equal(saved_latent(server, server.run(g), "10"), untagged)
    assert len(status_texts(server, "9")) > shown  # the tagged run showed its prompt; the untagged ones nothing


def test_tags_survive_wan_image_to_video(server):
    plain = saved_latent(server, server.run(graph()), "10")
    g = graph()
    g.update({
        "50": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0}},
        "51": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "52": {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["43", 0], "negative": ["4", 0], "vae": ["51", 0], "width": 32, "height": 32,
            "length": 49, "batch_size": 1, "start_image": ["50", 0]}},
    })
    g["9"]["inputs"].update(positive=["52", 0], negative=["52", 1], latent_image=["52", 2])
    shown = len(status_texts(server, "9"))
    h = server.run(g)
    # WanImageToVideo copied every entry's dict and added its image keys. The Sampler still reads the three tagged
    # stretches: this T2V model ignores the image keys (as ComfyUI's own T2V model does, with a warning) and the
    # node's empty latent is zeros like EmptyHunyuanLatentVideo's, so the latent is the timeline's own, bit for bit
    assert torch.equal(saved_latent(server, h, "10"), plain)
    texts = status_texts(server, "9")[shown:]
    assert any("storm" in t for t in texts) and any("block 6/6: sun" in t for t in texts), texts


@pytest.mark.parametrize("mutate,needles", [
    (lambda g: g.update({"43": {"class_type": "ConditioningCombine",
                                "inputs": {"conditioning_1": ["41", 0], "conditioning_2": ["32", 0]}}}),
     ["positive", "entry 3 has no DualParal Prompt At tag"]),
    (lambda g: g["42"]["inputs"].update(start=999), ["positive sun starts at video frame 999",
                                                      "the video has 49 frames"]),
    (lambda g: g["42"]["inputs"].update(start=20), ["sun and storm both start at video frame 20"]),
    (lambda g: g["40"]["inputs"].update(start=4), ["first must start at 0"]),
    (lambda g: g.update({"32": {**cond(4), "inputs": {**cond(4)["inputs"], "tokens": 256}}}),
     ["only prompts of one token count can blend", "256 tokens"]),
], ids=["untagged-mixed", "past-the-end", "same-start", "no-start-at-0", "blend-lengths"])
def test_bad_timelines_are_node_errors_naming_the_stretch(server, mutate, needles):
    before = server.note_workers()
    g = graph()
    mutate(g)
    h = server.wait(server.queue(g))
    err = error_of(h)
    assert h["status"]["status_str"] == "error" and err["node_type"] == "DualParalSampler", h["status"]
    for needle in needles:
        assert needle in err["exception_message"], err["exception_message"]
    assert server.note_workers() == before
