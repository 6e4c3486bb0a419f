"""End to end in a real ComfyUI server (headless, CPU, `devices=cpu:2`): registration, the top-level engine import,
KSampler parity, VAE decode, worker reuse, input errors, interrupt, "Unload models", keep_alive, the shipped
workflows, and no worker outliving the server. Tests run in file order and share one server."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from comfy_harness import (
    AUTHKEY,
    COMFY,
    FOREIGN_TOL,
    LORA,
    LORA_FOREIGN,
    MODEL_13B,
    MODEL_VACE,
    ROOT,
    SKIP_REASON,
    VAE,
    ComfyServer,
    _free_port,
    alive,
    build_assets,
    error_of,
    text_seed,
)

pytestmark = [pytest.mark.comfy_live, pytest.mark.skipif(not COMFY, reason=SKIP_REASON)]

WORKFLOWS = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
#: Image-to-video workflows run in test_i2v_e2e.py (its server has the I2V model files); their twins are checked here.
RUN_HERE = [w for w in WORKFLOWS if "i2v" not in w and "flf2v" not in w]
SAMPLER_INPUTS = ["model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "sampler_name",
                  "scheduler", "shift", "denoise", "num_per_block", "num_cat", "noise_mode"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    srv = ComfyServer(base, build_assets(base)).start()
    yield srv
    srv.stop()


def cond(seed: int, extra: str = "none", width: int = 4096) -> dict:
    return {"class_type": "DualParalTestConditioning",
            "inputs": {"seed": seed, "tokens": 512, "width": width, "extra": extra}}


def loader(**kw) -> dict:
    inputs = {"unet_name": MODEL_13B, "devices": "cpu:2", "dtype": "fp32", "attention": "sdpa", "keep_alive": True}
    return {"class_type": "DualParalLoader", "inputs": {**inputs, **kw}}


def sampler(latent, **kw) -> dict:
    inputs = {"model": ["8", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": latent, "seed": 42,
              "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple", "shift": 8.0, "denoise": 1.0,
              "num_per_block": 8, "num_cat": 0, "noise_mode": "independent"}
    return {"class_type": "DualParalSampler", "inputs": {**inputs, **kw}}


def base_graph(length: int = 9, batch: int = 1, **sampler_kw) -> dict:
    """Loader + test conditioning + empty latent + DualParal Sampler ("9") + SaveLatent."""
    return {
        "3": cond(1), "4": cond(2),
        "5": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": 32, "height": 32, "length": length, "batch_size": batch}},
        "8": loader(),
        "9": sampler(["5", 0], **sampler_kw),
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "latents/dp"}},
    }


def saved_latent(server: ComfyServer, history: dict, node: str) -> torch.Tensor:
    from safetensors.torch import load_file

    item = history["outputs"][node]["latents"][0]
    return load_file(server.base / "out" / item["subfolder"] / item["filename"])["latent_tensor"]


# ------------------------------------------------------------------------------------------------ tests, in order
def test_nodes_registered_with_tooltips(server):
    info = server.get("/object_info")
    want = {"DualParalLoader": ("DualParal Loader", ["DUALPARAL_MODEL"]),
            "DualParalLoRA": ("DualParal LoRA", ["DUALPARAL_LORAS"]),
            "DualParalSampler": ("DualParal Sampler", ["LATENT"]),
            "DualParalPromptAt": ("DualParal Prompt At", ["CONDITIONING"])}
    for node_id, (display, outputs) in want.items():
        n = info[node_id]
        assert n["display_name"] == display and n["category"] == "DualParal" and n["output"] == outputs
        assert n["description"] and all(n["output_tooltips"])
        for section in ("required", "optional"):
            for name, spec in n["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert info["DualParalSampler"]["input_order"]["required"] == SAMPLER_INPUTS
    assert info["DualParalSampler"]["input_order"]["optional"] == ["sigmas", "cfg_low", "transition"]
    assert info["DualParalLoader"]["input_order"] == {
        "required": ["unet_name", "devices", "dtype", "attention", "keep_alive"],
        "optional": ["loras", "low_noise_unet_name", "boundary", "weights", "kv_cache"]}
    assert info["DualParalLoRA"]["input_order"] == {"required": ["lora_name", "strength"],
                                                    "optional": ["previous", "expert"]}
    assert MODEL_13B in info["DualParalLoader"]["input"]["required"]["unet_name"][1]["options"]


def test_engine_is_imported_top_level_and_specs_unpickle_in_a_child(server):
    h = server.run({"8": loader(), "20": {"class_type": "DualParalTestProbe", "inputs": {"model": ["8", 0]}}})
    probe = json.loads(h["outputs"]["20"]["probe"][0])
    assert probe["spec_module"] == "dualparal_core.config", probe
    assert Path(probe["core_file"]).parent.parent.name == "DualParal"  # the pack folder, via the symlink
    assert probe["child_rc"] == 0, probe["child_err"]
    assert probe["child_out"] == "dualparal_core.config dualparal_core.config 2"
    assert "DualParal" in probe["handle_module"] and "/" in probe["handle_module"]  # ComfyUI's path-like name
    assert len(server.note_workers()) == 2


def test_matches_ksampler_and_flows_into_vae_decode(server):
    g = base_graph(batch=2)  # a batch of 2 latents gives 2 videos, as in KSampler
    g.update({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_13B, "weight_dtype": "default"}},
        "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 8.0}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 42, "steps": 4, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                                                   "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0]}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/ks"}},
        # uni_pc, denoise < 1 from a non-empty latent (process_in/out and the sigma truncation), on both sides
        "11": {"class_type": "KSampler", "inputs": {**g_ks(), "latent_image": ["6", 0]}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "latents/ks2"}},
        "13": sampler(["6", 0], sampler_name="uni_pc", steps=5, denoise=0.6, seed=5, cfg=3.0),
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "latents/dp2"}},
        "15": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["15", 0]}},
        "17": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["16", 0], "filename_prefix": "dp_decoded",
                                                            "fps": 16.0, "lossless": False, "quality": 80,
                                                            "method": "default"}},
    })
    pid = server.queue(g)
    h = server.wait(pid)
    assert h["status"]["status_str"] == "success", error_of(h)
    ks, dp = saved_latent(server, h, "7"), saved_latent(server, h, "10")
    assert dp.shape == ks.shape == (2, 16, 3, 4, 4)
    torch.testing.assert_close(dp, ks, rtol=FOREIGN_TOL, atol=FOREIGN_TOL)
    ks2, dp2 = saved_latent(server, h, "12"), saved_latent(server, h, "14")
    torch.testing.assert_close(dp2, ks2, rtol=FOREIGN_TOL, atol=FOREIGN_TOL)
    webp = h["outputs"]["17"]["images"][0]
    assert (server.base / "out" / webp["subfolder"] / webp["filename"]).stat().st_size > 0
    progress = [m for m in server.ws.of_type("progress", pid) if m["node"] == "9"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 8  # 2 videos x 1 block x 4 steps


def test_kv_cache_fp8_rounds_only_the_context_and_offload_changes_nothing(server):
    """The Loader's kv_cache=fp8 and kv_cache=offload beside the exact cache in one graph, with context frames
    (K = 1, three blocks): fp8 rounds the context K/V to e4m3, so the latents move a little, but not like another
    model's; offload holds the same values in host memory, so the latents are the exact cache's bits."""
    g = base_graph(num_per_block=1, num_cat=1)
    g["8"] = loader(kv_cache="fp8")
    for node, kv in (("18", "exact"), ("21", "offload")):
        g[node] = loader(kv_cache=kv)
        g[str(int(node) + 1)] = sampler(["5", 0], num_per_block=1, num_cat=1, model=[node, 0])
        g[str(int(node) + 2)] = {"class_type": "SaveLatent", "inputs": {"samples": [str(int(node) + 1), 0],
                                                                        "filename_prefix": f"latents/{kv}"}}
    h = server.run(g)
    fp8, exact, offload = (saved_latent(server, h, n) for n in ("10", "20", "23"))
    assert fp8.shape == exact.shape == (1, 16, 3, 4, 4) and torch.isfinite(fp8).all()
    rel = float((fp8 - exact).norm() / exact.norm())
    assert 0 < rel < 1e-2, rel  # the same rounding bound as tests/test_kvcache.py (measured there: 1e-5)
    assert torch.equal(offload, exact)
    server.run(base_graph())  # back to the one default pool the next tests count on (the others are released)
    assert len(server.note_workers()) == 2


def g_ks() -> dict:
    return {"model": ["2", 0], "seed": 5, "steps": 5, "cfg": 3.0, "sampler_name": "uni_pc", "scheduler": "simple",
            "denoise": 0.6, "positive": ["3", 0], "negative": ["4", 0]}


def test_same_configuration_reuses_the_workers_and_previews(server):
    before = server.note_workers()
    g = base_graph(seed=43)
    g["8"] = loader(devices="cpu: 2")  # a different string, the same configuration: the Loader re-runs
    t0 = time.monotonic()
    server.run(g)
    assert server.note_workers() == before  # no reload
    assert [t for t in server.ws.binary if t > t0]  # latent previews (--preview-method latent2rgb) were sent


@pytest.mark.parametrize("mutate,node_type,needles", [
    (lambda g: g["8"]["inputs"].update(unet_name=MODEL_VACE), "DualParalLoader", ["unet_name", "VACE"]),
    (lambda g: g["8"]["inputs"].update(devices="tcp://127.0.0.1:9"), "DualParalLoader",
     ["devices", "no DualParal group listening at tcp://127.0.0.1:9", "torchrun"]),
    (lambda g: g["8"]["inputs"].update(devices="cpu:3"), "DualParalLoader", ["devices", "3 ranks"]),
    (lambda g: g.update({"30": {"class_type": "DualParalLoRA", "inputs": {"lora_name": LORA_FOREIGN,
                                                                           "strength": 1.0}}})
     or g["8"]["inputs"].update(loras=["30", 0]), "DualParalLoader", [LORA_FOREIGN, "matches nothing"]),
    (lambda g: g.update({"31": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}},
                         "32": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0],
                                                                               "mask": ["31", 0]}}})
     or g["9"]["inputs"].update(latent_image=["32", 0]), "DualParalSampler", ["latent_image", "noise_mask"]),
    (lambda g: g.update({"4": cond(2, width=768)}), "DualParalSampler", ["negative", "4096"]),
    (lambda g: g["9"]["inputs"].update(num_per_block=2, num_cat=4), "DualParalSampler", ["num_cat"]),
], ids=["vace", "attach", "ranks", "foreign-lora", "noise-mask", "cond-width", "num-cat"])
def test_bad_input_is_a_node_error_naming_it(server, mutate, node_type, needles):
    before = server.note_workers()
    g = base_graph()
    mutate(g)
    h = server.wait(server.queue(g))
    err = error_of(h)
    assert h["status"]["status_str"] == "error" and err["kind"] == "execution_error", h["status"]
    assert err["node_type"] == node_type
    for needle in needles:
        assert needle in err["exception_message"], err["exception_message"]
    assert server.note_workers() == before  # refused before any worker was touched


def test_interrupt_stops_within_seconds_and_the_next_prompt_works(server):
    before = server.note_workers()
    pid = server.queue(base_graph(length=5, steps=10000, cfg=1.0, seed=9))
    deadline = time.monotonic() + 60
    while not [m for m in server.ws.of_type("progress", pid) if m["node"] == "9" and m["value"] >= 3]:
        assert time.monotonic() < deadline, "the long job never reported progress"
        time.sleep(0.05)
    t0 = time.monotonic()
    server.post("/interrupt", {})
    h = server.wait(pid, timeout=60)
    took = time.monotonic() - t0
    assert error_of(h).get("kind") == "execution_interrupted", h["status"]
    assert took < 10, f"interrupt took {took:.1f} s"
    last = max(m["value"] for m in server.ws.of_type("progress", pid) if m["node"] == "9")
    assert last < 10000
    assert server.note_workers() == before  # a cancel keeps the workers
    server.run(base_graph(seed=10))


def test_lora_matches_comfyui_lora_loader(server):
    """DualParal LoRA merged in the workers == ComfyUI's own LoraLoaderModelOnly on the same model and file."""
    g = base_graph(seed=12)
    g.update({
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_13B, "weight_dtype": "default"}},
        "21": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": LORA,
                                                               "strength_model": 0.8}},
        "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["21", 0], "shift": 8.0}},
        "6": {"class_type": "KSampler", "inputs": {**g_ks(), "sampler_name": "euler", "denoise": 1.0, "seed": 12,
                                                   "steps": 4, "cfg": 5.0, "latent_image": ["5", 0]}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/ks_lora"}},
        "22": {"class_type": "DualParalLoRA", "inputs": {"lora_name": LORA, "strength": 0.8}},
        "23": {"class_type": "SaveLatent", "inputs": {"samples": ["24", 0], "filename_prefix": "latents/dp_nolora"}},
        "24": sampler(["5", 0], seed=12, model=["25", 0]),
        "25": loader(),
    })
    g["8"]["inputs"]["loras"] = ["22", 0]
    h = server.run(g)
    ks, dp, plain = saved_latent(server, h, "7"), saved_latent(server, h, "10"), saved_latent(server, h, "23")
    torch.testing.assert_close(dp, ks, rtol=FOREIGN_TOL, atol=FOREIGN_TOL)
    assert (dp - plain).abs().max() > 1e-2  # the LoRA changed the result


def test_a_loader_attached_to_a_torchrun_group_matches_local_workers(server, tmp_path):
    """devices=tcp://HOST:PORT: the group loads the Loader's file, gives the local workers' latents, stays loaded
    when ComfyUI detaches (keep_alive off), and is not reloaded by the next attach."""
    port, log = _free_port(), tmp_path / "torchrun.log"
    env = {**os.environ, "DUALPARAL_AUTHKEY": AUTHKEY, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as fh:
        group = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                  "2", "-m", "dualparal_core.worker", "--serve", f"127.0.0.1:{port}"], env=env,
                                 cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while b"listening on" not in log.read_bytes():
            assert group.poll() is None and time.monotonic() < deadline, log.read_bytes()[-3000:].decode()
            time.sleep(0.2)
        ranks = [p.pid for p in psutil.Process(group.pid).children(recursive=True)]
        g = base_graph(seed=21)
        g.update({"18": loader(devices=f"tcp://127.0.0.1:{port}"), "19": sampler(["5", 0], seed=21, model=["18", 0]),
                  "20": {"class_type": "SaveLatent", "inputs": {"samples": ["19", 0], "filename_prefix": "latents/at"}}})
        h = server.run(g)
        torch.testing.assert_close(saved_latent(server, h, "20"), saved_latent(server, h, "10"), rtol=1e-5, atol=1e-5)
        g["18"]["inputs"]["keep_alive"] = False
        g["19"]["inputs"]["seed"] = g["9"]["inputs"]["seed"] = 22
        h = server.run(g)
        torch.testing.assert_close(saved_latent(server, h, "20"), saved_latent(server, h, "10"), rtol=1e-5, atol=1e-5)
        assert alive(ranks) == ranks and log.read_bytes().count(b"detached:") == 1  # detached, still loaded
        g["19"]["inputs"]["seed"] = 23
        server.run(g)  # attaches again: no reload
        assert log.read_bytes().count(b"ready in") == 2, log.read_bytes()[-3000:].decode()  # one load per rank
    finally:
        group.send_signal(signal.SIGTERM)
        try:
            group.wait(30)
        except subprocess.TimeoutExpired:
            group.kill()
            group.wait(10)
    deadline = time.monotonic() + 10
    while alive(ranks):
        assert time.monotonic() < deadline, f"ranks {alive(ranks)} outlived torchrun"
        time.sleep(0.2)


def test_unload_models_releases_the_workers_and_keep_alive_off(server):
    old = server.note_workers()
    assert old
    server.post("/free", {"unload_models": True})
    deadline = time.monotonic() + 30
    while alive(old):
        assert time.monotonic() < deadline, f"workers {alive(old)} survived 'Unload models'"
        time.sleep(0.2)
    g = base_graph(seed=11)
    g["8"] = loader(keep_alive=False)
    server.run(g)  # the cached handle restarts its workers, and keep_alive off stops them after the sampler
    assert server.note_workers() == []


def tinify(api: dict) -> dict:
    """A shipped workflow at test size: test conditioning instead of the text encoder, 32x32x21, cpu:2 fp32."""
    g = copy.deepcopy(api)
    lengths = [n["inputs"]["length"] for n in g.values() if n["class_type"] == "EmptyHunyuanLatentVideo"]
    for nid, node in list(g.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CLIPLoader":
            del g[nid]
        elif ct == "CLIPTextEncode":
            g[nid] = cond(text_seed(inp["text"]))
        elif ct == "EmptyHunyuanLatentVideo":
            inp.update(width=32, height=32, length=21)
        elif ct == "DualParalLoader":
            inp.update(devices="cpu:2", dtype="fp32")
        elif ct == "DualParalSampler":
            inp.update(steps=2, num_per_block=2, num_cat=1, **({"transition": 4} if "transition" in inp else {}))
        elif ct == "DualParalPromptAt":  # a prompt timeline: the same stretches, scaled to the 21 frames
            frame = round(inp["start"] * inp["fps"]) if inp["unit"] == "seconds" else int(inp["start"])
            inp.update(unit="frames", start=float(frame * 21 // lengths[0]))
    return g


@pytest.mark.parametrize("name", RUN_HERE)
def test_shipped_workflow_runs(server, name):
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    h = server.run(tinify(api), timeout=300)
    saves = [nid for nid, n in api.items() if n["class_type"] == "SaveVideo"
             or (n["class_type"] == "DualParalBlockDecode" and n["inputs"]["filename_prefix"])]  # streams a file
    assert saves
    for nid in saves:
        item = h["outputs"][nid]["images"][0]
        path = server.base / "out" / item["subfolder"] / item["filename"]
        assert path.suffix == ".mp4" and path.stat().st_size > 0


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """What the editor queues for a UI-format workflow (widget values by input order, links by slot)."""
    links = {lk[0]: lk for lk in ui["links"]}
    out = {}
    for node in ui["nodes"]:
        if node["type"] in ("Note", "MarkdownNote") or node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        names = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name in names:
            t, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            if isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                if not values and name in info["input_order"].get("optional", []):
                    continue  # an optional widget newer than the workflow: the editor queues its default
                inputs[name] = values.pop(0)
                if opts.get("control_after_generate") or opts.get("image_upload"):  # a UI-only widget follows
                    values.pop(0)
        assert not values, f"{node['type']} has {len(values)} widget values too many"
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                lk = links[inp["link"]]
                assert lk[3] == node["id"]
                inputs[inp["name"]] = [str(lk[1]), lk[2]]
        out[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return out


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_its_api_twin_and_a_template(server, name):
    info = server.get("/object_info")
    ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    assert ui_to_api(ui, info) == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    for lk in ui["links"]:  # every link's type is what the source outputs and the target takes
        src = next(n for n in ui["nodes"] if n["id"] == lk[1])
        dst = next(n for n in ui["nodes"] if n["id"] == lk[3])
        assert info[src["type"]]["output"][lk[2]] == lk[5] == dst["inputs"][lk[4]]["type"]
    assert name in server.get("/workflow_templates")["DualParal"]
    served = server.get(f"/api/workflow_templates/DualParal/{name}.json")
    assert served["nodes"] == ui["nodes"]


def test_no_worker_outlives_a_killed_server(server):
    """SIGKILL gives ComfyUI no chance to clean up: the workers must notice on their own."""
    other = ComfyServer(server.base, server.yaml).start()
    try:
        other.run({"8": loader(), "20": {"class_type": "DualParalTestProbe", "inputs": {"model": ["8", 0]}}})
        pids = other.note_workers()
        assert len(pids) == 2
    finally:
        other.stop(sig=signal.SIGKILL)
    deadline = time.monotonic() + 30
    while alive(pids):
        assert time.monotonic() < deadline, f"workers {alive(pids)} outlived a killed server"
        time.sleep(0.2)


def test_no_worker_outlives_the_server(server):
    pids = server.seen_workers | set(server.note_workers())
    assert pids
    server.stop()
    deadline = time.monotonic() + 30
    while alive(pids):
        assert time.monotonic() < deadline, f"workers {alive(pids)} outlived the server"
        time.sleep(0.2)
