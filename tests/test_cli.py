"""The headless CLI: every bad flag is one line naming the flag, refused before torch is imported or any worker
starts; the demo writes a playable video of the requested size and length."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI's main() and reports on a last stderr line whether torch was imported (it must not be, for a
# refused flag: the checks read headers only).
WRAPPER = """
import sys
import dualparal_core.__main__ as m
try:
    rc = m.main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
sys.stderr.write("TORCH_IMPORTED=%s\\n" % ("torch" in sys.modules))
sys.exit(rc)
"""


def cli(*argv: str, timeout: float = 60) -> tuple[int, list[str], str, float]:
    """(exit code, stderr lines without the marker, the marker, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    lines = p.stderr.strip().splitlines()
    return p.returncode, lines[:-1], lines[-1] if lines else "", time.monotonic() - t0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Wan model, a conditioning file, a file that is no VAE and a text file."""
    from dualparal_core.checkpoint import random_state_dict, save_checkpoint
    from dualparal_core.config import WanConfig

    d = tmp_path_factory.mktemp("cli")
    cfg = WanConfig.tiny(num_layers=2)
    save_checkpoint(random_state_dict(cfg), str(d / "model.safetensors"), "comfy")
    save_file({"positive": torch.randn(1, 8, cfg.text_dim)}, str(d / "cond.safetensors"))
    save_file({"positive": torch.randn(1, 8, 17)}, str(d / "cond_wide.safetensors"))
    save_file({"x": torch.zeros(3)}, str(d / "notvae.safetensors"))
    (d / "text.txt").write_text("hello")
    return d


def _gen(files: Path, *extra: str) -> list[str]:
    base = {"--model": str(files / "model.safetensors"), "--cond": str(files / "cond.safetensors"),
            "--devices": "cpu", "--out": str(files / "o.safetensors")}
    for flag, value in zip(extra[::2], extra[1::2]):
        base[flag] = value
    args = ["generate"]
    for flag, value in base.items():
        if value is not None:
            args += [flag, value]
    return args


BAD_DEMO = [
    (["--width", "60"], "--width", "48 or 64"),
    (["--height", "0"], "--height", "16"),
    (["--frames", "0"], "--frames", "4k+1"),
    (["--frames", "80"], "--frames", "77 or 81"),
    (["--steps", "0"], "--steps", "between 1"),
    (["--attention", "bogus"], "--attention", "sdpa_flash"),
    (["--devices", "99"], "--devices", "cuda:99"),
    (["--devices", "tcp://h:1"], "--devices", "starts its own ranks"),
    (["--devices", "cpu:9"], "--devices", "at most 4"),
    (["--num-cat", "9"], "--num-cat", "--num-per-block"),
    (["--out", "video.avi"], "--out", ".mp4"),
    (["--out", "/proc/x/video.mp4"], "--out", "writable"),
    (["--vae", "/nonexistent/vae.safetensors"], "--vae", "no such file"),
    (["--dtype", "fp64"], "--dtype", "bf16"),
]


@pytest.mark.parametrize("argv,flag,hint", BAD_DEMO, ids=[" ".join(a) for a, _, _ in BAD_DEMO])
def test_bad_demo_flag_is_one_line_before_torch(argv, flag, hint):
    rc, lines, marker, took = cli("demo", *argv)
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert flag in lines[0] and hint in lines[0], lines[0]
    assert marker == "TORCH_IMPORTED=False"
    assert "Traceback" not in lines[0] and took < 10


def test_devices_without_gpus_suggests_what_the_cli_takes():
    if torch.cuda.device_count():
        pytest.skip("this machine has GPUs")
    rc, lines, marker, _ = cli("demo", "--devices", "0,1")
    assert rc == 2 and len(lines) == 1 and marker == "TORCH_IMPORTED=False"
    assert "--devices='0,1'" in lines[0] and "'cpu:N'" in lines[0] and "ComfyUI" not in lines[0]


def bad_generate(files: Path) -> list:
    return [
        (["--model", str(files / "missing.safetensors")], "--model", "no such file"),
        (["--model", str(files / "text.txt")], "--model", "not a safetensors file"),
        (["--vae", str(files / "notvae.safetensors")], "--vae", "not a Wan VAE"),
        (["--vae", str(files / "model.safetensors")], "--vae", "not a Wan VAE"),
        (["--cond", str(files / "missing.safetensors")], "--cond", "no such file"),
        (["--cond", str(files / "text.txt")], "--cond", "not a safetensors file"),
        (["--cond", str(files / "cond_wide.safetensors")], "--cond", "[1, L, 64]"),
        (["--cond", None, "--prompt", "a fox"], "--text-encoder", "umt5_xxl"),
        (["--prompt", "a fox"], "--prompt", "not both"),
        (["--cond", None], "--prompt", "missing"),
        (["--cond", None, "--prompt", "a fox", "--text-encoder", str(files / "model.safetensors")],
         "--text-encoder", "not a T5/umt5"),
        (["--devices", "cpu:3"], "--devices", "at most 2"),
        (["--out", str(files / "o.mp4")], "--out", "needs --vae"),
        (["--out", str(files)], "--out", "folder"),
    ]


def test_bad_generate_flags_are_one_line_before_torch(files):
    for extra, flag, hint in bad_generate(files):
        argv = _gen(files, *[x for x in extra])
        rc, lines, marker, took = cli(*argv)
        assert rc == 2, (extra, lines)
        assert len(lines) == 1, (extra, lines)
        assert flag in lines[0] and hint in lines[0], (extra, lines[0])
        assert marker == "TORCH_IMPORTED=False", extra
        assert took < 10


def test_debug_shows_the_traceback(files):
    rc, lines, _, _ = cli("demo", "--width", "60", "--debug")
    assert rc == 2 and any("Traceback" in ln for ln in lines) and "--width=60" in lines[-1]


def read_video(path: Path) -> tuple[tuple[int, int], int, float]:
    """(size, frame count, fps) as ffmpeg reads the file back."""
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    n = sum(1 for _ in gen)
    return tuple(meta["size"]), n, meta["fps"]


def test_demo_writes_a_video_of_the_requested_size_and_length(tmp_path):
    out = tmp_path / "sub" / "demo.mp4"
    p = subprocess.run([sys.executable, "-m", "dualparal_core", "demo", "--frames", "21", "--width", "48",
                        "--height", "32", "--steps", "2", "--num-per-block", "2", "--num-cat", "1", "--fps", "8",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_video(out) == ((48, 32), 21, 8.0)
    for wait in ("starting 2 worker(s)", "sampling", "decoding"):  # progress for every wait
        assert wait in p.stderr, p.stderr[-3000:]
    assert "21/21" in p.stderr  # frames of total


def test_generate_from_a_prompt_through_the_umt5_file(files, tmp_path):
    """--prompt/--negative with ComfyUI's umt5 layout (a tiny one, fp8 scaled): the text is encoded once, then
    the workers sample; the latents are what the same job gives with the embeddings saved to --cond."""
    from safetensors.torch import load_file

    from dualparal_core.text_encoder import encode_prompts
    sys.path.insert(0, str(ROOT / "tests"))
    from umt5_tiny import write_tiny

    te, _ = write_tiny(tmp_path, fp8=True)
    pos, neg = encode_prompts(str(te), ["a fox in the snow", "blurred"])
    save_file({"positive": pos, "negative": neg}, str(tmp_path / "saved.safetensors"))
    common = ["--model", str(files / "model.safetensors"), "--devices", "cpu", "--frames", "9", "--width", "32",
              "--height", "32", "--steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    logs = {}
    for name, extra in (("text", ["--text-encoder", str(te), "--prompt", "a fox in the snow", "--negative",
                                  "blurred"]), ("cond", ["--cond", str(tmp_path / "saved.safetensors")])):
        p = subprocess.run([sys.executable, "-m", "dualparal_core", "generate", *common, *extra, "--out",
                            str(tmp_path / f"{name}.safetensors")], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, stdin=subprocess.DEVNULL, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        logs[name] = p.stderr
    assert "encoding text" in logs["text"] and "loading text encoder" in logs["text"]
    assert "encoding text" not in logs["cond"]
    a = load_file(str(tmp_path / "text.safetensors"))["latent_tensor"]
    b = load_file(str(tmp_path / "cond.safetensors"))["latent_tensor"]
    assert a.shape == (1, 16, 3, 4, 4) and torch.equal(a, b)


def test_the_readmes_tiny_files_drive_generate_to_an_mp4(tmp_path):
    """The README's headless example, as pasted: the tiny stand-in files (python -m dualparal_core.testing DIR, what
    `bash scripts/run.sh tiny-files DIR` runs), then generate from a prompt to an mp4 of the requested size."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = dict(cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=env)
    p = subprocess.run([sys.executable, "-m", "dualparal_core.testing", str(tmp_path)], **run)
    assert p.returncode == 0, p.stderr[-3000:]
    names = {"model": "wan_tiny_t2v.safetensors", "text_encoder": "umt5_tiny_fp8_e4m3fn_scaled.safetensors",
             "vae": "wan_vae_tiny.safetensors"}
    assert all(f"{k}: {tmp_path / v}" in p.stdout for k, v in names.items()), p.stdout
    out = tmp_path / "fox.mp4"
    p = subprocess.run([sys.executable, "-m", "dualparal_core", "generate", "--model", str(tmp_path / names["model"]),
                        "--text-encoder", str(tmp_path / names["text_encoder"]), "--prompt",
                        "a fox moving quickly in a beautiful winter scenery", "--negative", "static, blurred details",
                        "--vae", str(tmp_path / names["vae"]), "--frames", "17", "--width", "64", "--height", "64",
                        "--steps", "4", "--out", str(out)], **run)
    assert p.returncode == 0, p.stderr[-3000:]
    assert read_video(out)[:2] == ((64, 64), 17)
