"""A real ComfyUI server in a subprocess (headless, CPU, loopback) with the DualParal pack and the test pack, its
tiny random model files, and a small HTTP/WebSocket client (research §8)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TESTPACK = Path(__file__).resolve().parent / "testpack"
COMFY = os.environ.get("COMFYUI_PATH")
AUTHKEY = "dualparal-e2e-" + uuid.uuid4().hex
"""DUALPARAL_AUTHKEY of the server, shared with the torchrun groups the tests start (devices=tcp://...)."""
# Comparing our workers with ComfyUI's own KSampler / VAE Decode (foreign code): both run float32 on CPU, but ComfyUI's
# Wan model attends with its own attention call over differently shaped tensors, batches cond/uncond its own way and
# decodes a batch in one call, so summation orders differ. Measured: 3e-6 (sampler latents, values ~1) and ~2e-5 (VAE
# decode, pixels in [0, 1]). 1e-4 is 5x above the worst; each test also shows a real change (a LoRA, another expert)
# moves the result by > 1e-2, far outside it. Bit-equality is kept where ComfyUI's code runs on both sides (sigmas,
# prepare_noise: the bridge calls ComfyUI's own functions).
FOREIGN_TOL = 1e-4
SKIP_REASON = "COMFYUI_PATH is not set: the comfy_live tests need a ComfyUI checkout (and its venv's python)"

#: File names as ComfyUI's own templates use them; in tests they hold tiny random weights.
MODEL_13B = "wan2.1_t2v_1.3B_fp16.safetensors"
MODEL_14B_FP8 = "wan2.1_t2v_14B_fp8_e4m3fn.safetensors"
MODEL_HIGH = "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"  # Wan2.2 A14B experts (fp16 tiny weights here,
MODEL_LOW = "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"    # so that ComfyUI's LoRA merge is exact too)
LORA_LIGHT = "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors"
MODEL_VACE = "wan2.1_vace_14B_fp16.safetensors"  # a variant the Loader refuses
LORA = "wan2.1_t2v_14B_example_lora.safetensors"
LORA_FOREIGN = "sdxl_style_lora.safetensors"
VAE = "wan_2.1_vae.safetensors"


def tiny_config():
    from dualparal_core.config import WanConfig

    # ComfyUI's Wan detection hardcodes freq_dim 256 and text_dim 4096 (comfy/model_detection.py, WanModel
    # defaults) and derives heads as dim // 128: the smallest model it loads is dim 128 with one head.
    return WanConfig(dim=128, ffn_dim=256, num_layers=2, num_heads=1, text_dim=4096, freq_dim=256)


def _tiny_lora(cfg, rank: int = 4, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(cfg.num_layers):
        for mod, (o, n) in {"self_attn.q": (cfg.dim, cfg.dim), "cross_attn.o": (cfg.dim, cfg.dim),
                            "ffn.0": (cfg.ffn_dim, cfg.dim)}.items():
            base = f"diffusion_model.blocks.{i}.{mod}"
            out[base + ".lora_down.weight"] = torch.randn(rank, n, generator=g) * 0.1
            out[base + ".lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.1
            out[base + ".alpha"] = torch.tensor(float(rank) / 2)
    return out


_VAE_SCRIPT = r"""
import sys, torch
sys.path.insert(0, ".")
from comfy.cli_args import args
args.cpu = True
import comfy.ldm.wan.vae as wv
from safetensors.torch import save_file
with torch.no_grad():
    m = wv.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in m.state_dict().items():
        x = torch.randn(v.shape, generator=g) * 0.02
        sd[k] = (x + 1.0 if k.endswith("gamma") else x).to(torch.float16).contiguous()
save_file(sd, sys.argv[1])
"""


def build_assets(base: Path) -> Path:
    """models/ + custom_nodes/ + the extra_model_paths yaml under ``base``; returns the yaml path."""
    from safetensors.torch import load_file, save_file

    from dualparal_core.checkpoint import random_state_dict, save_checkpoint

    cfg = tiny_config()
    dm, lo, va = (base / "models" / d for d in ("diffusion_models", "loras", "vae"))
    for d in (dm, lo, va, base / "custom_nodes", base / "out", base / "temp", base / "input", base / "user"):
        d.mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "DualParal").symlink_to(ROOT, target_is_directory=True)
    (base / "custom_nodes" / "dualparal_testpack").symlink_to(TESTPACK, target_is_directory=True)
    save_checkpoint(random_state_dict(cfg, seed=0), dm / MODEL_13B, "comfy", dtype=torch.float16)
    save_checkpoint(random_state_dict(cfg, seed=1), dm / MODEL_14B_FP8, "fp8")
    sd = load_file(dm / MODEL_13B)
    sd["model.diffusion_model.vace_patch_embedding.weight"] = torch.zeros(128, 96, 1, 2, 2, dtype=torch.float16)
    save_file(sd, dm / MODEL_VACE)
    save_file(_tiny_lora(cfg), lo / LORA)
    save_checkpoint(random_state_dict(cfg, seed=5), dm / MODEL_HIGH, "comfy", dtype=torch.float16)
    save_checkpoint(random_state_dict(cfg, seed=6), dm / MODEL_LOW, "comfy", dtype=torch.float16)
    save_file(_tiny_lora(cfg, seed=7), lo / LORA_LIGHT)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, lo / LORA_FOREIGN)
    subprocess.run([sys.executable, "-c", _VAE_SCRIPT, str(va / VAE)], cwd=COMFY, check=True,
                   capture_output=True, timeout=300)
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(f"dualparal_test:\n    base_path: {base}\n    custom_nodes: custom_nodes\n"
                    f"    diffusion_models: models/diffusion_models\n    loras: models/loras\n    vae: models/vae\n")
    return yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WSListener:
    """Collects the server's WebSocket JSON messages for one client id in a background thread."""

    def __init__(self, url: str, client_id: str):
        self.messages: list[tuple[float, dict]] = []
        self.binary: list[float] = []  # arrival times of binary frames (latent previews)
        self.binary_data: list[bytes] = []  # their bytes (event type, then payload: previews, status texts)
        self._url, self._cid = url, client_id
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        self._ready.wait(30)

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as s, s.ws_connect(f"{self._url}/ws?clientId={self._cid}") as ws:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.messages.append((time.monotonic(), json.loads(msg.data)))
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self.binary.append(time.monotonic())
                    self.binary_data.append(bytes(msg.data))
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break

    def of_type(self, kind: str, prompt_id: str | None = None) -> list[dict]:
        return [m["data"] for _, m in list(self.messages)
                if m.get("type") == kind and (prompt_id is None or m["data"].get("prompt_id") == prompt_id)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class ComfyServer:
    """``python main.py --cpu --listen 127.0.0.1 ...`` with our yaml; log in ``base/server.log``."""

    def __init__(self, base: Path, yaml: Path, env: dict | None = None):
        self.base, self.yaml, self.port, self.env = base, yaml, _free_port(), env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.ws: WSListener | None = None
        self.seen_workers: set[int] = set()

    def start(self, timeout: float = 180.0) -> ComfyServer:
        b = self.base
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--extra-model-paths-config", str(self.yaml),
               "--output-directory", str(b / "out"), "--temp-directory", str(b / "temp"),
               "--input-directory", str(b / "input"), "--user-directory", str(b / "user"),
               "--database-url", "sqlite:///:memory:", "--preview-method", "latent2rgb"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "DUALPARAL_AUTHKEY": AUTHKEY, **self.env}
        self._log = open(b / "server.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=COMFY, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/object_info/DualParalSampler"):
                    self.ws = WSListener(self.url, self.client_id)
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not become ready in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 8000) -> str:
        try:
            return (self.base / "server.log").read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    # ---------------------------------------------------------------------------------------------- HTTP
    def _req(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def get(self, path: str):
        return self._req("GET", path)

    def post(self, path: str, body) -> object:
        return self._req("POST", path, body)

    def queue(self, prompt: dict) -> str:
        try:
            return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"/prompt refused the graph: {e.read().decode()}") from e

    def wait(self, prompt_id: str, timeout: float = 240.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.note_workers()
            h = self.get(f"/history/{prompt_id}")
            if h and prompt_id in h:  # history is written when the prompt has finished
                return h[prompt_id]
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 240.0) -> dict:
        """Queue a prompt, wait for it, and fail with the server's error text unless it succeeded."""
        h = self.wait(self.queue(prompt), timeout)
        if h["status"]["status_str"] != "success":
            raise AssertionError(f"prompt failed: {error_of(h)}\n{self.log_tail(4000)}")
        return h

    # ---------------------------------------------------------------------------------------------- workers
    def worker_pids(self) -> list[int]:
        import psutil

        out = []
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in kids:
            try:
                cmd = " ".join(p.cmdline())
                if ("dualparal_core.worker" in cmd or "faulty_rank" in cmd) and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
            except psutil.Error:
                continue
        return sorted(out)

    def note_workers(self) -> list[int]:
        pids = self.worker_pids()
        self.seen_workers.update(pids)
        return pids

    def stop(self, timeout: float = 60.0, sig: int = signal.SIGINT) -> int | None:
        """Stop as a user does (Ctrl+C; or ``sig``), SIGKILL after ``timeout``; returns the exit code."""
        if self.ws is not None:
            self.ws.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return None if self.proc is None else self.proc.returncode


def error_of(history: dict) -> dict:
    """The execution_error (or execution_interrupted) message of a finished prompt, or {}."""
    for kind, data in history.get("status", {}).get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            return {"kind": kind, **data}
    return {}


def alive(pids) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            continue
    return out


def text_seed(text: str) -> int:
    return zlib.crc32(text.encode()) % 100000
