"""Block Decode in a real ComfyUI server (headless, CPU): registration, equality with core VAE Decode on ComfyUI's
device and on a cpu:2 worker group (split into two primed spans: DUALPARAL_DECODE_PARALLEL=always), the streamed
mp4/webm files, return_frames off, input errors, cancel on both paths, and no worker outliving the server.
Tests run in file order and share one server."""

from __future__ import annotations

import os
import time

import pytest
import torch
from comfy_harness import (
    COMFY,
    FOREIGN_TOL,
    MODEL_13B,
    SKIP_REASON,
    VAE,
    ComfyServer,
    alive,
    build_assets,
    error_of,
)

pytestmark = [pytest.mark.comfy_live, pytest.mark.skipif(not COMFY, reason=SKIP_REASON)]

INPUTS = ["samples", "vae", "block_size", "filename_prefix", "format", "fps", "crf", "return_frames"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_bd")
    yaml = build_assets(base)
    old = os.environ.get("DUALPARAL_DECODE_PARALLEL")
    os.environ["DUALPARAL_DECODE_PARALLEL"] = "always"  # split even these short test videos over the ranks
    try:
        srv = ComfyServer(base, yaml).start()
    finally:
        if old is None:
            os.environ.pop("DUALPARAL_DECODE_PARALLEL")
        else:
            os.environ["DUALPARAL_DECODE_PARALLEL"] = old
    yield srv
    srv.stop()


def latent(frames: int, batch: int = 1, seed: int = 3) -> dict:
    return {"class_type": "DualParalTestLatent",
            "inputs": {"seed": seed, "frames": frames, "height": 4, "width": 4, "batch": batch}}


def block_decode(model: bool = False, **kw) -> dict:
    inputs = {"samples": ["1", 0], "vae": ["2", 0], "block_size": 2, "filename_prefix": "", "format": "mp4",
              "fps": 16.0, "crf": 19, "return_frames": True}
    if model:
        inputs["model"] = ["9", 0]
    return {"class_type": "DualParalBlockDecode", "inputs": {**inputs, **kw}}


def save(src: str, name: str) -> dict:
    return {"class_type": "DualParalTestSaveTensor", "inputs": {"images": [src, 0], "name": name}}


def graph(frames: int = 5, batch: int = 1, **extra) -> dict:
    return {"1": latent(frames, batch), "2": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
            "9": {"class_type": "DualParalLoader",
                  "inputs": {"unet_name": MODEL_13B, "devices": "cpu:2", "dtype": "fp32", "attention": "sdpa",
                             "keep_alive": True}},
            **extra}


def tensor(h: dict, node: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(h["outputs"][node]["tensors"][0])["images"]


def video_file(server: ComfyServer, h: dict, node: str):
    item = h["outputs"][node]["images"][0]
    assert item["type"] == "output" and h["outputs"][node]["animated"] == [True]
    return server.base / "out" / item["subfolder"] / item["filename"]


def probe(path) -> tuple[int, tuple[int, int]]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    size = next(reader)["size"]
    return sum(1 for _ in reader), size


def tags(path) -> dict:
    import subprocess

    import imageio_ffmpeg

    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                         capture_output=True, check=True, timeout=60).stdout.decode()
    pairs = (line.split("=", 1) for line in out.splitlines() if "=" in line and not line.startswith(";"))
    return {k.lower(): v for k, v in pairs}  # Matroska (webm) upper-cases tag names


# ------------------------------------------------------------------------------------------------ tests, in order
def test_registered_with_tooltips(server):
    n = server.get("/object_info/DualParalBlockDecode")["DualParalBlockDecode"]
    assert n["display_name"] == "Block Decode" and n["category"] == "DualParal" and n["output"] == ["IMAGE"]
    assert n["output_node"] is True and n["description"] and all(n["output_tooltips"])
    assert n["input_order"]["required"] == INPUTS and n["input_order"]["optional"] == ["model"]
    for section in ("required", "optional"):
        for name, spec in n["input"][section].items():
            assert spec[1].get("tooltip"), name
    assert n["input"]["required"]["format"][1]["options"] == ["mp4", "webm"]


def test_equals_vae_decode_here_and_on_the_workers(server):
    """2 videos of 5 latent frames (17 video frames each): core VAE Decode, Block Decode on ComfyUI's device, and on
    the cpu:2 workers (spans [0, 2) and [2, 5): rank 1 primes on frames 0..1)."""
    g = graph(batch=2, **{
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": save("3", "core"),
        "5": block_decode(), "6": save("5", "local"),
        "7": block_decode(model=True), "8": save("7", "workers"),
    })
    pid = server.queue(g)
    h = server.wait(pid)
    assert h["status"]["status_str"] == "success", error_of(h)
    core, local, workers = tensor(h, "4"), tensor(h, "6"), tensor(h, "8")
    assert core.shape == (34, 32, 32, 3) and core.dtype == torch.float32
    assert local.shape == workers.shape == core.shape and local.dtype == workers.dtype == torch.float32
    # ComfyUI decodes the batch in one call, Block Decode one video at a time: float rounding only
    torch.testing.assert_close(local, core, rtol=0, atol=FOREIGN_TOL)
    torch.testing.assert_close(workers, core, rtol=0, atol=FOREIGN_TOL)
    assert (core.std(dim=0) > 1e-3).float().mean() > 0.5, "the random VAE should give moving pictures"
    for node, blocks in (("5", 6), ("7", 6)):  # 2 x ceil(5/2) blocks here; 2 x (1 + 2) over the two spans
        steps = [m for m in server.ws.of_type("progress", pid) if m["node"] == node]
        assert steps and steps[-1]["value"] == steps[-1]["max"] == blocks, steps
    assert len(server.note_workers()) == 2


def test_streams_mp4_and_webm_files(server):
    g = graph(**{
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": save("3", "core1"),
        "5": block_decode(model=True, filename_prefix="video/bd", return_frames=False, crf=10), "6": save("5", "last"),
        "7": block_decode(filename_prefix="video/bd_webm", format="webm", fps=8.0), "8": save("7", "all"),
    })
    h = server.run(g)
    mp4, webm = video_file(server, h, "5"), video_file(server, h, "7")
    assert mp4.suffix == ".mp4" and mp4.name.startswith("bd_") and mp4.parent.name == "video"
    assert webm.suffix == ".webm"
    for path in (mp4, webm):
        assert probe(path) == (17, (32, 32))
        assert '"DualParalBlockDecode"' in tags(path).get("prompt", "")  # the workflow travels with the file
    core = tensor(h, "4")
    last = tensor(h, "6")  # return_frames off: only the last frame, at the file's 8-bit precision
    assert last.shape == (1, 32, 32, 3)
    torch.testing.assert_close(last, core[-1:], rtol=0, atol=1 / 255 + 1e-6)
    torch.testing.assert_close(tensor(h, "8"), core, rtol=0, atol=FOREIGN_TOL)


def test_bad_input_is_a_node_error(server):
    h = server.wait(server.queue(graph(**{"5": block_decode(return_frames=False)})))
    err = error_of(h)
    assert err.get("node_type") == "DualParalBlockDecode", h["status"]
    assert "filename_prefix" in err["exception_message"] and "return_frames" in err["exception_message"]


@pytest.mark.parametrize("on_workers", [False, True], ids=["comfy-device", "workers"])
def test_cancel_during_decode(server, on_workers):
    before = server.note_workers()
    prefix = f"video/cancel_{int(on_workers)}"
    g = graph(frames=80, **{"5": block_decode(model=on_workers, block_size=1, filename_prefix=prefix),
                            "6": save("5", "never")})
    g["1"]["inputs"]["seed"] = 11 + int(on_workers)
    pid = server.queue(g)
    deadline = time.monotonic() + 120
    while not [m for m in server.ws.of_type("progress", pid) if m["node"] == "5"]:
        assert time.monotonic() < deadline, "the decode never reported progress"
        time.sleep(0.05)
    t0 = time.monotonic()
    server.post("/interrupt", {})
    h = server.wait(pid, timeout=120)
    took = time.monotonic() - t0
    assert error_of(h).get("kind") == "execution_interrupted", h["status"]
    assert took < 15, f"interrupt took {took:.1f} s"
    done = max(m["value"] for m in server.ws.of_type("progress", pid) if m["node"] == "5")
    assert done < 80
    assert not list((server.base / "out" / "video").glob("cancel_*")), "the partial video was not removed"
    assert server.note_workers() == before  # a cancel keeps the workers
    if on_workers:  # and they decode again
        h = server.run(graph(frames=3, **{"5": block_decode(model=True), "6": save("5", "after")}))
        assert tensor(h, "6").shape == (9, 32, 32, 3)


def test_no_worker_outlives_the_server(server):
    pids = server.seen_workers | set(server.note_workers())
    assert pids
    server.stop()
    deadline = time.monotonic() + 30
    while alive(pids):
        assert time.monotonic() < deadline, f"workers {alive(pids)} outlived the server"
        time.sleep(0.2)
